//! An i8042 keyboard controller with just what a microVM needs: the CPU reset command (how
//! Linux reboots with `reboot=k`), the controller commands Linux's probe uses, and a
//! Ctrl-Alt-Del key sequence injected from the host on IRQ 1.

use log::debug;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

/// Data port offset (0x60) and command/status offset (0x64).
const OFFSET_DATA: u64 = 0;
const OFFSET_COMMAND: u64 = 4;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_INPUT_PORT: u8 = 0xc0;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_WRITE_KBD_BUF: u8 = 0xd2;
const CMD_RESET_CPU: u8 = 0xfe;

/// Status: output buffer full.
const SB_OUT_FULL: u8 = 0x01;
/// Status: system flag (POST passed).
const SB_SYS_FLAG: u8 = 0x04;
/// Status: the last write was a command.
const SB_LAST_WAS_CMD: u8 = 0x08;

/// Control byte: keyboard interrupt enabled.
const CB_KBD_INT: u8 = 0x01;
/// Control byte: system flag.
const CB_SYS_FLAG: u8 = 0x04;
/// Control byte: keyboard clock disabled.
const CB_KBD_DISABLED: u8 = 0x10;

const KBD_ACK: u8 = 0xfa;
const KBD_RESET: u8 = 0xff;
const KBD_SELF_TEST_OK: u8 = 0xaa;
const SELF_TEST_OK: u8 = 0x55;

/// Scan code set 2: Ctrl make, Alt make, Del make (extended).
const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];

const BUF_SIZE: usize = 16;

/// Errors from host-side requests.
#[derive(Debug, thiserror::Error)]
pub enum I8042Error {
    /// The guest has not read earlier keys yet.
    #[error("i8042 keyboard buffer is full")]
    BufferFull,
    /// Raising the keyboard interrupt failed.
    #[error("cannot raise the keyboard interrupt")]
    Irq(#[source] std::io::Error),
}

/// The controller's registers and pending output bytes, as a snapshot holds them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    /// Status register.
    pub status: u8,
    /// Controller configuration byte.
    pub control: u8,
    /// Output port.
    pub outp: u8,
    /// A command waiting for its data byte.
    pub pending_cmd: Option<u8>,
    /// Bytes waiting for the guest, oldest first.
    pub pending: Vec<u8>,
}

/// The i8042 controller.
pub struct I8042 {
    status: u8,
    control: u8,
    outp: u8,
    pending_cmd: Option<u8>,
    buf: [u8; BUF_SIZE],
    head: usize,
    len: usize,
    kbd_irq: EventFd,
    on_reset: Box<dyn Fn() + Send>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042")
            .field("status", &self.status)
            .field("control", &self.control)
            .finish()
    }
}

impl I8042 {
    /// A controller raising `kbd_irq` for keyboard data and calling `on_reset` when the guest
    /// asks for a CPU reset.
    pub fn new(kbd_irq: EventFd, on_reset: Box<dyn Fn() + Send>) -> Self {
        Self {
            status: SB_SYS_FLAG,
            control: CB_KBD_INT | CB_SYS_FLAG,
            outp: 0,
            pending_cmd: None,
            buf: [0; BUF_SIZE],
            head: 0,
            len: 0,
            kbd_irq,
            on_reset,
        }
    }

    /// The controller's state, for a snapshot.
    pub fn save(&self) -> I8042State {
        I8042State {
            status: self.status,
            control: self.control,
            outp: self.outp,
            pending_cmd: self.pending_cmd,
            pending: (0..self.len)
                .map(|i| self.buf[(self.head + i) % BUF_SIZE])
                .collect(),
        }
    }

    /// A controller as [`I8042::new`] makes it, with the registers and pending bytes `state`
    /// saved (those beyond its buffer dropped).
    pub fn from_state(
        state: &I8042State,
        kbd_irq: EventFd,
        on_reset: Box<dyn Fn() + Send>,
    ) -> Self {
        let mut dev = Self::new(kbd_irq, on_reset);
        for &b in &state.pending {
            dev.push(b);
        }
        dev.status = state.status;
        dev.control = state.control;
        dev.outp = state.outp;
        dev.pending_cmd = state.pending_cmd;
        dev
    }

    /// Queues the Ctrl-Alt-Del key sequence for the guest and raises IRQ 1.
    pub fn trigger_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        if BUF_SIZE - self.len < CTRL_ALT_DEL.len() {
            return Err(I8042Error::BufferFull);
        }
        for b in CTRL_ALT_DEL {
            self.push(b);
        }
        self.kbd_irq.write(1).map_err(I8042Error::Irq)
    }

    fn push(&mut self, byte: u8) -> bool {
        if self.len == BUF_SIZE {
            return false;
        }
        self.buf[(self.head + self.len) % BUF_SIZE] = byte;
        self.len += 1;
        self.status |= SB_OUT_FULL;
        true
    }

    fn pop(&mut self) -> Option<u8> {
        if self.len == 0 {
            return None;
        }
        let b = self.buf[self.head];
        self.head = (self.head + 1) % BUF_SIZE;
        self.len -= 1;
        if self.len == 0 {
            self.status &= !SB_OUT_FULL;
        }
        Some(b)
    }

    /// Pushes a reply byte and raises the keyboard interrupt if the guest enabled it.
    fn reply(&mut self, byte: u8) {
        if self.push(byte) && self.control & CB_KBD_INT != 0 {
            if let Err(e) = self.kbd_irq.write(1) {
                debug!("i8042: cannot raise IRQ 1: {e}");
            }
        }
    }

    fn command(&mut self, cmd: u8) {
        self.status |= SB_LAST_WAS_CMD;
        match cmd {
            CMD_READ_CTR => self.reply(self.control),
            CMD_WRITE_CTR | CMD_WRITE_OUTP | CMD_WRITE_KBD_BUF => self.pending_cmd = Some(cmd),
            CMD_DISABLE_AUX | CMD_ENABLE_AUX => {}
            CMD_SELF_TEST => self.reply(SELF_TEST_OK),
            CMD_KBD_TEST => self.reply(0),
            CMD_DISABLE_KBD => self.control |= CB_KBD_DISABLED,
            CMD_ENABLE_KBD => self.control &= !CB_KBD_DISABLED,
            CMD_READ_INPUT_PORT => self.reply(0),
            CMD_READ_OUTP => self.reply(self.outp),
            CMD_RESET_CPU => (self.on_reset)(),
            other => debug!("i8042: ignoring command {other:#x}"),
        }
    }

    fn data(&mut self, value: u8) {
        self.status &= !SB_LAST_WAS_CMD;
        match self.pending_cmd.take() {
            Some(CMD_WRITE_CTR) => self.control = value,
            Some(CMD_WRITE_OUTP) => self.outp = value,
            Some(_) => self.reply(value),
            None => {
                // A command for the keyboard itself: acknowledge it; a reset also passes BAT.
                self.reply(KBD_ACK);
                if value == KBD_RESET {
                    self.reply(KBD_SELF_TEST_OK);
                }
            }
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            OFFSET_DATA => {
                let v = self.pop().unwrap_or(0);
                if self.len > 0 && self.control & CB_KBD_INT != 0 {
                    let _ = self.kbd_irq.write(1);
                }
                v
            }
            OFFSET_COMMAND => self.status,
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (OFFSET_DATA, [v]) => self.data(*v),
            (OFFSET_COMMAND, [v]) => self.command(*v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    fn device() -> (I8042, EventFd, Arc<AtomicU32>) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let resets = Arc::new(AtomicU32::new(0));
        let r = resets.clone();
        let dev = I8042::new(
            irq.try_clone().unwrap(),
            Box::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            }),
        );
        (dev, irq, resets)
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut d = [0u8];
        dev.read(offset, &mut d);
        d[0]
    }

    #[test]
    fn reset_command_resets() {
        let (mut dev, _, resets) = device();
        dev.write(OFFSET_COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn ctrl_alt_del_sequence_and_irq() {
        let (mut dev, irq, _) = device();
        dev.trigger_ctrl_alt_del().unwrap();
        assert!(irq.read().unwrap() >= 1);
        let mut keys = Vec::new();
        while read(&mut dev, OFFSET_COMMAND) & SB_OUT_FULL != 0 {
            keys.push(read(&mut dev, OFFSET_DATA));
        }
        assert_eq!(keys, CTRL_ALT_DEL);
        for _ in 0..4 {
            dev.trigger_ctrl_alt_del().unwrap();
        }
        assert!(matches!(
            dev.trigger_ctrl_alt_del(),
            Err(I8042Error::BufferFull)
        ));
    }

    #[test]
    fn control_byte_and_self_test() {
        let (mut dev, _, _) = device();
        dev.write(OFFSET_COMMAND, &[CMD_WRITE_CTR]);
        dev.write(OFFSET_DATA, &[0x45]);
        dev.write(OFFSET_COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, OFFSET_DATA), 0x45);
        dev.write(OFFSET_COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut dev, OFFSET_DATA), SELF_TEST_OK);
        dev.write(OFFSET_DATA, &[KBD_RESET]);
        assert_eq!(read(&mut dev, OFFSET_DATA), KBD_ACK);
        assert_eq!(read(&mut dev, OFFSET_DATA), KBD_SELF_TEST_OK);
        assert_eq!(read(&mut dev, OFFSET_COMMAND) & SB_OUT_FULL, 0);
    }

    #[test]
    fn buffer_overflow_from_the_guest_is_bounded() {
        let (mut dev, _, _) = device();
        for _ in 0..100 {
            dev.write(OFFSET_DATA, &[0x00]);
        }
        assert_eq!(dev.len, BUF_SIZE);
    }
}
