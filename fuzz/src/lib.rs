//! What Skiff's fuzz targets share: a reader that turns the fuzzer's bytes into numbers (zero
//! once they run out, so every input means something), guest memory filled from the input,
//! split queues placed where the input says, and files that live only as long as the process
//! holds them.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use skiff::vstate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Reads numbers off the front of the input; past its end every read gives zero.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// The next `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    /// What is left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    /// Whether nothing is left.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    /// A byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// Guest RAM of the device targets: two adjacent regions (a buffer may run from one into the
/// other), a one-page hole, then a last page (a buffer may run into the hole).
pub const GUEST_RAM: &[(u64, usize)] = &[(0, 0x8000), (0x8000, 0x8000), (0x1_1000, 0x1000)];

/// First byte past the guest RAM, the hole included.
pub const GUEST_END: u64 = 0x1_2000;

/// [`GUEST_RAM`], with `image` copied in from address 0 (what does not fit is dropped).
pub fn guest_memory(image: &[u8]) -> GuestMemoryMmap {
    let ranges: Vec<_> = GUEST_RAM
        .iter()
        .map(|&(a, l)| (GuestAddress(a), l))
        .collect();
    let mem = skiff::vstate::memory::anonymous(&ranges).expect("guest memory");
    let n = image.len().min(0x1_0000);
    mem.write_slice(&image[..n], GuestAddress(0))
        .expect("image fits the first regions");
    mem
}

/// A split queue of `1 << (log2_size % 9)` entries whose descriptor table, available ring
/// and used ring are at the given addresses (rounded down to their alignment, virtio 1.2,
/// 2.7), ready and checked as the MMIO transport checks it at DRIVER_OK: `None` when the
/// transport would refuse it.
pub fn queue(
    mem: &GuestMemoryMmap,
    log2_size: u8,
    desc: u64,
    avail: u64,
    used: u64,
) -> Option<Queue> {
    let mut q = Queue::new(256).expect("queue");
    q.try_set_size(1 << (log2_size % 9)).ok()?;
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(desc & !0xf);
    q.set_desc_table_address(lo, hi);
    let (lo, hi) = split(avail & !0x1);
    q.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(used & !0x3);
    q.set_used_ring_address(lo, hi);
    q.set_ready(true);
    q.is_valid(mem).then_some(q)
}

/// A file holding `bytes` with no name on the file system (it goes when the process does),
/// and a path that opens it again: `/proc/self/fd/N`, for Skiff functions that take a path.
pub fn unnamed_file(bytes: &[u8]) -> (File, PathBuf) {
    let dir = std::env::temp_dir();
    let path = dir.join(format!(
        "skiff-fuzz-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("temporary file");
    std::fs::remove_file(&path).expect("unlink temporary file");
    file.write_all(bytes).expect("write temporary file");
    let fd_path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    (file, fd_path)
}
