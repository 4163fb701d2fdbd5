//! The 16550A UART on COM1 (vm-superio), wired to the host console: guest output goes to a
//! writer (stdout), host input is read on the event thread and fed to the receive FIFO.
//! When the FIFO is full the input fd is taken out of the event loop until the guest has
//! read the FIFO empty, so no byte is dropped.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::{debug, warn};
use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState as UartState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::config::TokenBucketConfig;
use crate::devices::bus::BusDevice;
use crate::metrics::{add, UartMetrics};
use crate::rate_limiter::{Reduction, TokenBucket};

/// An interrupt line backed by an eventfd registered with KVM as an irqfd.
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Tells the event thread that the guest emptied the receive FIFO.
#[derive(Debug)]
pub struct InputReady(EventFd);

impl SerialEvents for InputReady {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.write(1) {
            warn!("serial: cannot signal input space: {e}");
        }
    }
}

/// Where the guest's console output goes: counted, limited in bandwidth when a limit is set
/// (bytes over it are dropped and counted, as Firecracker's `PUT /serial` rate limiter does:
/// a guest printing without end cannot fill the host's disk or hold up its reader), then
/// written through.
pub struct ConsoleOutput {
    inner: Box<dyn Write + Send>,
    limit: Option<TokenBucket>,
    metrics: Arc<UartMetrics>,
}

impl ConsoleOutput {
    /// Output to `inner`, limited by `limit` when given, counted in `metrics`.
    pub fn new(
        inner: Box<dyn Write + Send>,
        limit: Option<&TokenBucketConfig>,
        metrics: Arc<UartMetrics>,
    ) -> Self {
        Self {
            inner,
            limit: limit.and_then(|c| TokenBucket::new(c, Instant::now())),
            metrics,
        }
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let len = buf.len() as u64;
        add(&self.metrics.write_count, len);
        if let Some(bucket) = &mut self.limit {
            if bucket.reduce(len, Instant::now()) != Reduction::Taken {
                add(&self.metrics.rate_limiter_dropped_bytes, len);
                return Ok(buf.len());
            }
        }
        self.inner.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes each byte straight through, so prompts without a newline show at once.
pub struct Unbuffered<W: Write>(pub W);

impl<W: Write> Write for Unbuffered<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.0.write(buf)?;
        self.0.flush()?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// The UART's registers and receive FIFO, as a snapshot holds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

/// The guest's serial console.
pub struct SerialDevice {
    serial: Serial<IrqLine, InputReady, Box<dyn Write + Send>>,
    input: Option<File>,
    input_paused: bool,
    input_ready: EventFd,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("input", &self.input)
            .finish()
    }
}

impl SerialDevice {
    /// A UART raising `irq`, writing to `out` and reading host input from `input`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>, input: Option<File>) -> io::Result<Self> {
        Self::build(&UartState::default(), irq, out, input)
    }

    fn build(
        uart: &UartState,
        irq: EventFd,
        out: Box<dyn Write + Send>,
        input: Option<File>,
    ) -> io::Result<Self> {
        let input_ready = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let events = InputReady(input_ready.try_clone()?);
        let serial = Serial::from_state(uart, IrqLine(irq), events, out)
            .map_err(|e| io::Error::other(format!("the saved serial port is invalid: {e:?}")))?;
        Ok(Self {
            serial,
            input,
            input_paused: false,
            input_ready,
        })
    }

    /// The UART's state, for a snapshot.
    pub fn save(&self) -> SerialState {
        let s = self.serial.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART as [`SerialDevice::new`] makes it, with the registers and FIFO `state` saved;
    /// an interrupt the state shows pending is raised again. A FIFO longer than the UART's is
    /// refused.
    pub fn from_state(
        state: &SerialState,
        irq: EventFd,
        out: Box<dyn Write + Send>,
        input: Option<File>,
    ) -> io::Result<Self> {
        let uart = UartState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        Self::build(&uart, irq, out, input)
    }

    /// Moves as much pending host input into the FIFO as it has room for.
    fn pump_input(&mut self, ops: &mut EventOps) {
        let Some(input) = self.input.as_mut() else {
            return;
        };
        let room = self.serial.fifo_capacity();
        if room == 0 {
            // Wait for the guest to drain the FIFO (InputReady) before reading more.
            if ops.remove(Events::new(input, EventSet::IN)).is_ok() {
                self.input_paused = true;
            }
            return;
        }
        let mut buf = [0u8; 64];
        let want = room.min(buf.len());
        match input.read(&mut buf[..want]) {
            Ok(0) => {
                debug!("serial: console input closed");
                let _ = ops.remove(Events::new(input, EventSet::IN));
                self.input = None;
            }
            Ok(n) => {
                if let Err(e) = self.serial.enqueue_raw_bytes(&buf[..n]) {
                    warn!("serial: cannot queue input: {e:?}");
                }
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                warn!("serial: console input failed, detaching it: {e}");
                let _ = ops.remove(Events::new(input, EventSet::IN));
                self.input = None;
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) => data[0] = self.serial.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            if let Err(e) = self.serial.write(off, *value) {
                debug!("serial: write failed: {e:?}");
            }
        }
    }
}

impl MutEventSubscriber for SerialDevice {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.input_ready, EventSet::IN)) {
            warn!("serial: cannot watch the input-ready event: {e}");
        }
        if let Some(input) = &self.input {
            // Regular files and /dev/null cannot be polled: such input is simply not used.
            if let Err(e) = ops.add(Events::new(input, EventSet::IN)) {
                debug!("serial: console input not pollable, ignoring it: {e}");
                self.input = None;
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.input_ready.as_raw_fd() {
            let _ = self.input_ready.read();
            if self.input_paused {
                if let Some(input) = &self.input {
                    // Level-triggered: pending input shows up on the next wait.
                    if ops.add(Events::new(input, EventSet::IN)).is_ok() {
                        self.input_paused = false;
                    }
                }
            }
        } else if events.event_set().contains(EventSet::IN) {
            self.pump_input(ops);
        } else if let Some(input) = self.input.take() {
            // Hang-up or error without data: the console is gone.
            let _ = ops.remove(Events::new(&input, EventSet::IN));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::SubscriberOps;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_the_writer_and_raises_the_irq() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev =
            SerialDevice::new(irq.try_clone().unwrap(), Box::new(sink.clone()), None).unwrap();
        dev.write(1, &[0x02]); // IER: transmitter-empty interrupt
        dev.write(0, b"h");
        dev.write(0, b"i");
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn input_flows_through_the_event_loop_without_loss() {
        let (reader, mut writer) = std::io::pipe().unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let input = File::from(std::os::fd::OwnedFd::from(reader));
        let dev = Arc::new(Mutex::new(
            SerialDevice::new(irq, Box::new(io::sink()), Some(input)).unwrap(),
        ));
        let mut em =
            event_manager::EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
                .unwrap();
        em.add_subscriber(dev.clone());
        let data: Vec<u8> = (0..200u8).collect();
        writer.write_all(&data).unwrap();
        let mut got = Vec::new();
        for _ in 0..100 {
            em.run_with_timeout(10).unwrap();
            let mut d = dev.lock().unwrap();
            // The guest reads the FIFO dry (LSR bit 0 says data is ready).
            while d.serial.read(5) & 1 == 1 {
                got.push(d.serial.read(0));
            }
            if got.len() == data.len() {
                break;
            }
        }
        assert_eq!(got, data);
    }

    #[test]
    fn odd_access_sizes_are_ignored() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, Box::new(io::sink()), None).unwrap();
        let mut d = [0u8; 2];
        dev.read(0, &mut d);
        assert_eq!(d, [0xff, 0xff]);
        dev.write(0, &[1, 2]);
        dev.write(300, &[1]);
    }
}
