//! The virtio-mmio register file as a hostile driver uses it: any sequence of reads and writes
//! of any size at any offset of the window, interleaved with the device thread draining the
//! queue and the guest rewriting its memory. Runs Skiff's `MmioTransport` over a `Block`.
//!
//! Checked besides "no panic": the identification registers never change, the status register
//! only ever shows bits of the status machine, a reset clears status and interrupt, and no
//! register access waits for the device: the transport takes the device's lock only for a
//! status change (feature acceptance, activation, reset), so every other access runs here
//! with that lock held by this very thread, and one that tried to take it would never return
//! (libFuzzer reports the hang as a timeout, with its input).
//!
//! Input: a u16 length of the operation list, the operations, then the guest memory image.
//! Each operation is a kind byte (bits 0-2: read, write, write to a known register, device
//! thread drains the queue, guest writes memory; bits 3-4: access size 1, 2, 4 or 8) and its
//! operands.

#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use skiff::devices::virtio::block::Block;
use skiff::devices::virtio::{status, MmioTransport, VirtioDevice};
use skiff::devices::BusDevice;
use skiff_fuzz::{guest_memory, unnamed_file, Input};
use vm_memory::{Bytes, GuestAddress};

const REG_STATUS: u64 = 0x70;
const REG_INTERRUPT_STATUS: u64 = 0x60;
/// Every register of the version 2 layout (virtio 1.2, 4.2.2) and the first configuration
/// bytes, for the operation that picks one by index.
const REGISTERS: &[u64] = &[
    0x000, 0x004, 0x008, 0x00c, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050,
    0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4, 0x0fc, 0x100, 0x104,
];
const STATUS_BITS: u32 = status::ACKNOWLEDGE
    | status::DRIVER
    | status::FEATURES_OK
    | status::DRIVER_OK
    | status::DEVICE_NEEDS_RESET
    | status::FAILED;

fn read(t: &mut MmioTransport, offset: u64, len: usize) -> u64 {
    let mut buf = [0u8; 8];
    t.read(offset, &mut buf[..len]);
    u64::from_le_bytes(buf)
}

fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
    read(t, offset, 4) as u32
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let ops_len = input.u16();
    let mut ops = Input::new(input.bytes(ops_len.into()));
    let mem = guest_memory(input.rest());

    let (_image, path) = unnamed_file(&[0x5a; 4096]);
    let block = Arc::new(Mutex::new(Block::new(&path, false, "fuzz").expect("image")));
    let device: Arc<Mutex<dyn VirtioDevice>> = block.clone();
    let mut t = MmioTransport::new(mem.clone(), device).expect("transport");

    while !ops.is_empty() {
        let kind = ops.u8();
        let len = 1usize << ((kind >> 3) & 3);
        let (offset, write) = match kind & 7 {
            0 | 1 => (u64::from(ops.u16() & 0xfff), None),
            2 | 3 => (u64::from(ops.u16() & 0xfff), Some(ops.u64())),
            4 => {
                let reg = REGISTERS[usize::from(ops.u8()) % REGISTERS.len()];
                (reg, Some(u64::from(ops.u32())))
            }
            5 => {
                block.lock().unwrap().process_queue();
                continue;
            }
            _ => {
                let at = GuestAddress(u64::from(ops.u16()));
                let _ = mem.write_obj(ops.u32(), at);
                continue;
            }
        };
        // A 4-byte status write may take the device's lock; nothing else may.
        let may_lock = write.is_some() && offset == REG_STATUS && (kind & 7 == 4 || len == 4);
        let len = if kind & 7 == 4 { 4 } else { len };
        let held = (!may_lock).then(|| block.lock().unwrap());
        match write {
            Some(value) => t.write(offset, &value.to_le_bytes()[..len]),
            None => {
                let value = read(&mut t, offset, len);
                let expected = match offset {
                    0x000 => Some(0x7472_6976), // "virt"
                    0x004 => Some(2),
                    0x008 => Some(2), // block
                    _ => None,
                };
                if let (Some(e), 4) = (expected, len) {
                    assert_eq!(value, e, "register {offset:#x}");
                }
            }
        }
        drop(held);
        let s = read32(&mut t, REG_STATUS);
        assert_eq!(s & !STATUS_BITS, 0, "status {s:#x}");
        if may_lock && write.is_some_and(|v| v as u32 == 0) {
            assert_eq!(s, 0, "status after a reset");
            assert_eq!(
                read32(&mut t, REG_INTERRUPT_STATUS),
                0,
                "interrupt after a reset"
            );
        }
    }
});
