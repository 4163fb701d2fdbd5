//! virtio-net frames both ways with a hostile driver: the transmit and receive queues, their
//! chains and buffers come from the input (the guest's memory), and so do the frames the host
//! side sends. Runs Skiff's `Net` on a datagram socket standing in for the TAP, as its unit
//! tests and benchmarks do, and checks what reaches the host and what the device counts.
//!
//! Input: `sizes` (log2 of the RX queue size in bits 0-3, of the TX queue in bits 4-7), `cfg`
//! (bit 0: EVENT_IDX; 1: every offered feature; 2: a MAC; bits 4-7: receive passes), six ring
//! addresses (RX desc, avail, used, TX desc, avail, used; u16 each), a frame count (low 3 bits),
//! each frame as a u16 length (bit 15 adds 64 KiB) and its bytes (zeros past the input's end),
//! then the guest memory image from address 0.

#![no_main]

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;

use libfuzzer_sys::fuzz_target;
use skiff::devices::virtio::net::{Net, Tap, MAX_FRAME_LEN, VNET_HDR_LEN};
use skiff::devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use skiff_fuzz::{guest_memory, queue, Input};

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let sizes = input.u8();
    let cfg = input.u8();
    let rings: Vec<u64> = (0..6).map(|_| u64::from(input.u16())).collect();
    let mut frames = Vec::new();
    for _ in 0..input.u8() & 7 {
        let len = input.u16();
        let len = usize::from(len & 0x7fff) + if len & 0x8000 != 0 { 0x1_0000 } else { 0 };
        let mut frame = input.bytes(len).to_vec();
        frame.resize(len, 0);
        frames.push(frame);
    }
    let mem = guest_memory(input.rest());

    let (Some(rx), Some(tx)) = (
        queue(&mem, sizes & 0xf, rings[0], rings[1], rings[2]),
        queue(&mem, sizes >> 4, rings[3], rings[4], rings[5]),
    ) else {
        return;
    };
    let (dev_end, host) = UnixDatagram::pair().expect("socket pair");
    dev_end.set_nonblocking(true).expect("non-blocking");
    host.set_nonblocking(true).expect("non-blocking");
    let tap = Tap::from_file(File::from(OwnedFd::from(dev_end)), "fuzz0");
    let mac = (cfg & 4 != 0).then_some([6, 0, 0, 0, 0, 1]);
    let mut net = Net::with_tap(tap, mac).expect("device");
    let features = if cfg & 2 != 0 {
        net.avail_features()
    } else {
        let mut f = 1u64 << VIRTIO_F_VERSION_1;
        if cfg & 1 != 0 {
            f |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        f
    };
    net.set_acked_features(features);
    net.activate(mem, vec![rx, tx]).expect("activation");

    // Transmit: whatever reaches the TAP is one whole frame behind its header.
    net.process_tx();
    let mut sink = vec![0u8; MAX_FRAME_LEN + 1];
    let mut sent = 0;
    while let Ok(n) = host.recv(&mut sink) {
        assert!(
            n > VNET_HDR_LEN && n <= MAX_FRAME_LEN,
            "a {n}-byte frame reached the TAP"
        );
        sent += 1;
    }
    assert_eq!(net.counters().tx_frames, sent);

    // Receive: every frame offered is delivered, dropped or still waiting.
    let mut offered = 0;
    for frame in &frames {
        if host.send(frame).is_ok() {
            offered += 1;
        }
    }
    for _ in 0..=(cfg >> 4) {
        net.process_rx();
    }
    let c = net.counters();
    assert!(
        c.rx_frames + c.rx_dropped <= offered,
        "{offered} frames offered, {c:?}"
    );
});
