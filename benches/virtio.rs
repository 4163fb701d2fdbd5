//! Device hot paths on a split queue in plain memory, without a guest: one virtio-blk 4 KiB
//! read request (parse, pread from the page cache, copy to guest memory, used ring), the same
//! on the Async engine one at a time and 32 per queue drain (push, one io_uring_enter, reap,
//! status and used ring: the VMM's cost per request), and one
//! 1500-byte frame each way through virtio-net (a datagram socket stands in for the TAP).
//! The rings are laid out here: virtio-queue's MockSplitQueue puts its used ring over the
//! second half of its avail ring, which a long run reaches.

use std::fs::File;
use std::hint::black_box;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use skiff::config::{CacheType, IoEngine};
use skiff::devices::virtio::block::Block;
use skiff::devices::virtio::net::{Net, Tap};
use skiff::devices::virtio::VirtioDevice;
use skiff::vstate::memory::GuestMemoryMmap;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const VERSION_1: u64 = 1 << 32;

const SIZE: u16 = 256;

/// A split queue of SIZE entries at `base`: descriptor table, then the avail ring (flags say
/// "no interrupt", so the figure is the device's work, not an eventfd write), then the used ring.
struct Ring<'a> {
    mem: &'a GuestMemoryMmap,
    base: u64,
    next: u16,
}

impl<'a> Ring<'a> {
    fn new(mem: &'a GuestMemoryMmap, base: u64) -> Self {
        mem.write_obj(1u16, GuestAddress(base + 0x1000)).unwrap();
        Self { mem, base, next: 0 }
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(SIZE).unwrap();
        let lo = |a: u64| Some(u32::try_from(a & 0xffff_ffff).unwrap());
        q.set_desc_table_address(lo(self.base), Some(0));
        q.set_avail_ring_address(lo(self.base + 0x1000), Some(0));
        q.set_used_ring_address(lo(self.base + 0x2000), Some(0));
        q.set_size(SIZE);
        q.set_ready(true);
        q
    }

    /// Writes `descs` as one chain from descriptor 0 and makes it available.
    fn push(&mut self, descs: &[(u64, u32, u16)]) {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let i = u16::try_from(i).unwrap();
            let more = usize::from(i) + 1 < descs.len();
            let d = Descriptor::new(addr, len, flags | if more { F_NEXT } else { 0 }, i + 1);
            self.mem
                .write_obj(
                    RawDescriptor::from(d),
                    GuestAddress(self.base + 16 * u64::from(i)),
                )
                .unwrap();
        }
        let slot = self.base + 0x1000 + 4 + 2 * u64::from(self.next % SIZE);
        self.mem.write_obj(0u16, GuestAddress(slot)).unwrap();
        self.next = self.next.wrapping_add(1);
        self.mem
            .write_obj(self.next, GuestAddress(self.base + 0x1002))
            .unwrap();
    }
}

fn mem() -> GuestMemoryMmap {
    skiff::vstate::memory::anonymous(&[(GuestAddress(0), 0x40_0000)]).unwrap()
}

fn block_read(c: &mut Criterion) {
    block_read_on(c, IoEngine::Sync, 1);
    block_read_on(c, IoEngine::Async, 1);
    block_read_on(c, IoEngine::Async, 32);
}

fn block_read_on(c: &mut Criterion, engine: IoEngine, per_drain: u64) {
    let path = std::env::temp_dir().join(format!("skiff-bench-{}.img", std::process::id()));
    let mut f = File::create(&path).unwrap();
    f.write_all(&vec![0x5a; 1 << 20]).unwrap();
    drop(f);
    let m = mem();
    let mut ring = Ring::new(&m, 0x1_0000);
    let mut blk = Block::with_engine(&path, false, "bench", CacheType::Unsafe, engine).unwrap();
    std::fs::remove_file(&path).unwrap();
    blk.set_acked_features(VERSION_1);
    blk.activate(m.clone(), vec![ring.queue()]).unwrap();
    // Header: read (0), sector 8.
    m.write_slice(
        &[0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0],
        GuestAddress(0x2_0000),
    )
    .unwrap();
    let chain = [
        (0x2_0000, 16, 0),
        (0x3_0000, 4096, F_WRITE),
        (0x2_1000, 1, F_WRITE),
    ];
    let name = match (engine, per_drain) {
        (IoEngine::Sync, _) => "virtio-blk 4 KiB read request".to_owned(),
        (IoEngine::Async, n) => format!("virtio-blk 4 KiB read request, Async, {n} per drain"),
    };
    let mut group = c.benchmark_group("block");
    group.throughput(Throughput::Elements(per_drain));
    group.bench_function(name, |b| {
        b.iter(|| {
            for _ in 0..per_drain {
                ring.push(black_box(&chain));
            }
            blk.process_queue();
            blk.complete_in_flight();
        });
    });
    group.finish();
    let status: u8 = m.read_obj(GuestAddress(0x2_1000)).unwrap();
    assert_eq!(status, 0, "the requests failed");
}

fn net_frames(c: &mut Criterion) {
    let m = mem();
    let (dev_end, host) = UnixDatagram::pair().unwrap();
    dev_end.set_nonblocking(true).unwrap();
    host.set_nonblocking(true).unwrap();
    let tap = Tap::from_file(File::from(OwnedFd::from(dev_end)), "bench");
    let mut net = Net::with_tap(tap, None).unwrap();
    let (mut rx, mut tx) = (Ring::new(&m, 0x1_0000), Ring::new(&m, 0x2_0000));
    net.set_acked_features(VERSION_1);
    net.activate(m.clone(), vec![rx.queue(), tx.queue()])
        .unwrap();
    let mut sink = [0u8; 2048];
    let frame = [0u8; 1512];
    m.write_slice(&frame, GuestAddress(0x3_0000)).unwrap();
    c.bench_function("virtio-net TX 1500-byte frame", |b| {
        b.iter(|| {
            tx.push(&[(0x3_0000, 1512, 0)]);
            net.process_tx();
            black_box(host.recv(&mut sink).expect("the frame reached the TAP"));
        });
    });
    c.bench_function("virtio-net RX 1500-byte frame", |b| {
        b.iter(|| {
            host.send(black_box(&frame)).unwrap();
            rx.push(&[(0x4_0000, 2048, F_WRITE)]);
            black_box(net.process_rx());
        });
    });
    let c = net.counters();
    assert_eq!((c.tx_dropped, c.rx_dropped), (0, 0), "{c:?}");
}

criterion_group!(benches, block_read, net_frames);
criterion_main!(benches);
