//! Exit dispatch cost: a port write through the shared bus, as a vCPU does for each PIO exit.

use std::hint::black_box;
use std::sync::{Arc, Mutex};

use criterion::{criterion_group, criterion_main, Criterion};
use skiff::devices::{Bus, BusDevice};

/// A device that does nothing, so the figure is the bus's own cost.
struct Null;

impl BusDevice for Null {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

fn bus_dispatch(c: &mut Criterion) {
    let mut bus = Bus::new();
    // A PC's worth of port ranges, as the device manager lays them out.
    for (base, len) in [
        (0x3f8, 8),
        (0x2f8, 8),
        (0x60, 5),
        (0x80, 1),
        (0x70, 2),
        (0xcf8, 8),
        (0x500, 16),
        (0x1000, 64),
    ] {
        bus.insert(Arc::new(Mutex::new(Null)), base, len).unwrap();
    }
    c.bench_function("bus write hit (serial THR)", |b| {
        b.iter(|| bus.write(black_box(0x3f8), black_box(b"x")));
    });
    let mut data = [0u8; 1];
    c.bench_function("bus read hit (serial LSR)", |b| {
        b.iter(|| bus.read(black_box(0x3fd), black_box(&mut data)));
    });
    c.bench_function("bus write miss (unmapped port)", |b| {
        b.iter(|| bus.write(black_box(0xf4), black_box(&[0])));
    });
}

criterion_group!(benches, bus_dispatch);
criterion_main!(benches);
