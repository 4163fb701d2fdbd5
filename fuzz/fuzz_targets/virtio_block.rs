//! virtio-blk requests as a hostile driver writes them: descriptor chains, request headers and
//! buffers all come from the input, which is the guest's memory. Runs Skiff's `Block` on an
//! image file (the request parser and executor in block/request.rs, the chain splitter and the
//! queue drain in virtio/mod.rs) and checks that no request reaches past the image.
//!
//! Input: `cfg` (bits 0-3: log2 queue size; 4: EVENT_IDX; 5: read-only; 6-7: extra queue
//! drains), `sectors` (bits 0-3: image sectors - 1; bit 4: a partial sector at the end), the
//! descriptor table, available ring and used ring addresses (u16 each), then the guest memory
//! image from address 0.

#![no_main]

use std::os::unix::fs::FileExt;

use libfuzzer_sys::fuzz_target;
use skiff::devices::virtio::block::Block;
use skiff::devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use skiff_fuzz::{guest_memory, queue, unnamed_file, Input};

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let cfg = input.u8();
    let sectors = input.u8();
    let (desc, avail, used) = (input.u16(), input.u16(), input.u16());
    let mem = guest_memory(input.rest());

    let read_only = cfg & 0x20 != 0;
    let mut size = (u64::from(sectors & 0xf) + 1) * 512;
    if sectors & 0x10 != 0 {
        size += 100;
    }
    let image: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let (file, path) = unnamed_file(&image);
    let mut block = Block::new(&path, read_only, "fuzz").expect("image opens");

    let Some(q) = queue(&mem, cfg & 0xf, desc.into(), avail.into(), used.into()) else {
        return;
    };
    let mut features = 1u64 << VIRTIO_F_VERSION_1;
    if cfg & 0x10 != 0 {
        features |= 1 << VIRTIO_RING_F_EVENT_IDX;
    }
    block.set_acked_features(features);
    block.activate(mem, vec![q]).expect("activation");
    for _ in 0..=(cfg >> 6) {
        block.process_queue();
    }

    // Nothing past the image's last whole sector was touched, and a read-only image not at
    // all.
    let len = file.metadata().expect("image metadata").len();
    assert_eq!(len, size, "the image changed size");
    let mut after = vec![0u8; image.len()];
    file.read_exact_at(&mut after, 0).expect("read image back");
    let whole = image.len() / 512 * 512;
    assert_eq!(
        after[whole..],
        image[whole..],
        "a partial sector was written"
    );
    if read_only {
        assert!(after == image, "a read-only image was written");
    }
});
