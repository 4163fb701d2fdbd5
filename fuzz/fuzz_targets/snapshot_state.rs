//! Snapshot state files as a client may hand them to `PUT /snapshot/load`: checked and decoded
//! as a restore does (header, version, length, checksum, the state), then the checks made
//! before anything is built (CPU, vCPUs, memory regions), the description `GET /vm/config`
//! shows afterwards, and every saved queue turned back into a virtqueue and checked against a
//! small guest memory, as the transport's restore does.
//!
//! The checksum makes nearly every mutation fail early, so the target also fixes it up: when
//! the input is long enough, its last 4 bytes are replaced by the CRC-32 of the rest before a
//! second pass. Seeds: real state files (fuzz/seeds/snapshot_state).

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

fn exercise(bytes: &[u8]) {
    let Ok(state) = skiff::snapshot::parse_state(Path::new("fuzz.snap"), bytes) else {
        return;
    };
    let _ = state.check();
    let mut config = skiff::VmConfig::new("");
    state.describe_in(&mut config, &[("net0".into(), "tap-fuzz".into())]);
    let mem = skiff::vstate::memory::anonymous(&[(GuestAddress(0), 0x10_0000)]).expect("memory");
    for b in &state.devices.balloon {
        let _ = skiff::devices::virtio::balloon::Balloon::from_state(&b.device);
    }
    let queues = (state.devices.blocks.iter().map(|b| (&b.transport, &b.device.virtio)))
        .chain(state.devices.nets.iter().map(|n| (&n.transport, &n.device.virtio)))
        .chain(state.devices.vsock.iter().map(|v| (&v.transport, &v.device.virtio)))
        .chain((state.devices.balloon.iter()).map(|b| (&b.transport, &b.device.virtio)));
    for (transport, virtio) in queues {
        for q in transport.queues.iter().chain(&virtio.queues) {
            if let Ok(queue) = q.to_queue() {
                let _ = virtio_queue::QueueT::is_valid(&queue, &mem);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    exercise(data);
    if data.len() > 4 {
        let mut fixed = data.to_vec();
        let n = fixed.len() - 4;
        let crc = crc32(&fixed[..n]);
        fixed[n..].copy_from_slice(&crc.to_le_bytes());
        exercise(&fixed);
    }
});
