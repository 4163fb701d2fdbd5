//! virtio-vsock with a hostile driver and a hostile host program, through a real event
//! manager: the receive, transmit and event queues, their chains and every packet the guest
//! sends come from the input (the guest's memory), and so do the bytes a host program writes
//! to the device's socket (a CONNECT line or not). A listener at `<uds_path>_53` takes what
//! the guest's connections to port 53 send. Checks that nothing panics or hangs and that the
//! connections made and gone add up.
//!
//! Input: `sizes` (log2 of the RX queue size in bits 0-3, of the TX queue in bits 4-7), `cfg`
//! (log2 of the event queue size in bits 0-3; bit 4: EVENT_IDX; bit 5: a restored device,
//! which owes a transport reset; bit 6: a host program connects; bit 7: a device reset at the
//! end), nine ring addresses (RX, TX and event queue: desc, avail, used; u16 each), a length
//! (u8) and that many bytes the host program writes, then the guest memory image from
//! address 0.

#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use skiff::devices::virtio::vsock::Vsock;
use skiff::devices::virtio::{QueueSnapshot, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use skiff_fuzz::{guest_memory, queue, Input};

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let sizes = input.u8();
    let cfg = input.u8();
    let rings: Vec<u64> = (0..9).map(|_| u64::from(input.u16())).collect();
    let len = usize::from(input.u8());
    let host_bytes = input.bytes(len).to_vec();
    let mem = guest_memory(input.rest());
    let (Some(rx), Some(tx), Some(ev)) = (
        queue(&mem, sizes & 0xf, rings[0], rings[1], rings[2]),
        queue(&mem, sizes >> 4, rings[3], rings[4], rings[5]),
        queue(&mem, cfg & 0xf, rings[6], rings[7], rings[8]),
    ) else {
        return;
    };

    let dir = std::env::temp_dir().join(format!("skiff-fuzz-vsock-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("v.sock");
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(dir.join("v.sock_53"));
    let listener = UnixListener::bind(dir.join("v.sock_53")).expect("listener");
    listener.set_nonblocking(true).expect("non-blocking");
    let mut vsock = Vsock::new(3, &path).expect("device");
    if cfg & 0x20 != 0 {
        // A restored device: its saved state says the driver had it running.
        let mut state = vsock.save();
        state.virtio.queues = vec![QueueSnapshot::from(&rx)];
        drop(vsock);
        let _ = std::fs::remove_file(&path);
        vsock = Vsock::from_state(None, &state).expect("restored device");
    }
    let mut features = 1u64 << VIRTIO_F_VERSION_1;
    if cfg & 0x10 != 0 {
        features |= 1 << VIRTIO_RING_F_EVENT_IDX;
    }
    vsock.set_acked_features(features);
    let metrics = vsock.metrics();
    let vsock = Arc::new(Mutex::new(vsock));
    let mut manager = EventManager::<Arc<Mutex<Vsock>>>::new().expect("event manager");
    manager.add_subscriber(vsock.clone());
    vsock
        .lock()
        .unwrap()
        .activate(mem, vec![rx, tx, ev])
        .expect("activation");

    let mut host = (cfg & 0x40 != 0).then(|| {
        let mut s = UnixStream::connect(&path).expect("host connection");
        s.set_nonblocking(true).expect("non-blocking");
        let _ = s.write_all(&host_bytes);
        s
    });
    let mut accepted = Vec::new();
    let mut sink = [0u8; 4096];
    for round in 0..12 {
        let _ = manager.run_with_timeout(0);
        while let Ok((s, _)) = listener.accept() {
            s.set_nonblocking(true).expect("non-blocking");
            accepted.push(s);
        }
        for s in &mut accepted {
            while matches!(s.read(&mut sink), Ok(1..)) {}
            let _ = s.write(b"from the host");
        }
        if let Some(h) = host.as_mut() {
            while matches!(h.read(&mut sink), Ok(1..)) {}
        }
        if round == 8 && cfg & 0x80 != 0 {
            vsock.lock().unwrap().reset();
        }
    }
    let added = metrics.conns_added.load(Ordering::Relaxed);
    let removed = metrics.conns_removed.load(Ordering::Relaxed);
    assert!(
        added.saturating_sub(removed) <= 1023,
        "{added} connections made, {removed} gone"
    );
    drop(manager);
    drop(vsock);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(dir.join("v.sock_53"));
});
