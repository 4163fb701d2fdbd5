//! virtio-blk through the real path: the test guest drives the device like a driver, and the
//! host checks the image file afterwards. The data-path tests run on both engines (`Sync`,
//! `Async` on io_uring), with seccomp on as Skiff runs by default.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{as_strs, run_args, run_skiff, test_guest, Transport};
use skiff::builder::RestoreConfig;
use skiff::config::{CacheType, ConsoleInput, DiskConfig, IoEngine};
use skiff::snapshot::SnapshotType;
use skiff::{Vm, VmConfig};

const LIMIT: Duration = Duration::from_secs(60);
/// Where the host puts data for the guest, and where the guest writes (sectors).
const HOST_SECTOR: usize = 2048;
const GUEST_SECTOR: usize = 4096;

fn host_pattern(i: usize) -> u8 {
    (i * 7 + 3).to_le_bytes()[0]
}

fn guest_pattern(i: usize) -> u8 {
    (i * 13 + 5).to_le_bytes()[0] ^ 0x5a
}

/// An 8 MiB image with the host pattern at HOST_SECTOR.
fn image(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let mut bytes = vec![0u8; 8 << 20];
    for i in 0..4096 {
        bytes[HOST_SECTOR * 512 + i] = host_pattern(i);
    }
    std::fs::write(&path, bytes).unwrap();
    path
}

/// The `--disk` engines every data-path test runs on.
const ENGINES: [&str; 2] = ["sync", "async"];

fn run_blk(transport: Transport, disk_spec: &str, extra: &str) -> common::Outcome {
    let args = run_args(test_guest(), None, &format!("checks=blk {extra}"), 1, 128);
    let mut args = as_strs(&args);
    args.extend(transport.flags());
    args.extend(["--disk", disk_spec]);
    run_skiff(&args, LIMIT, None)
}

fn guest_bytes_in(path: &Path) -> bool {
    let bytes = std::fs::read(path).unwrap();
    (0..8192).all(|i| bytes[GUEST_SECTOR * 512 + i] == guest_pattern(i))
}

#[test]
fn guest_reads_writes_flushes_and_the_bytes_reach_the_file() {
    for transport in Transport::BOTH {
        for engine in ENGINES {
            reads_writes_flushes(transport, engine);
        }
    }
}

fn reads_writes_flushes(transport: Transport, engine: &str) {
    let img = image(&format!("blk-rw-{transport:?}-{engine}.img"));
    let spec = format!(
        "path={},id=test-disk-7,cache=writeback,engine={engine}",
        img.display()
    );
    let out = run_blk(transport, &spec, "");
    let lines = out.lines();
    assert!(
        lines.contains(&"PASS blk"),
        "{transport:?} {engine}\n{}\n{}",
        out.stdout,
        out.stderr
    );
    assert!(lines.contains(&"blk: id 'test-disk-7'"), "{}", out.stdout);
    // IOAPIC pin 5 on MMIO; none on PCI, whose interrupts are MSI-X.
    let irq = match transport {
        Transport::Mmio => "5",
        Transport::Pci => "65535",
    };
    let capacity = format!("blk: capacity 16384 sectors, irq {irq}");
    assert!(lines.contains(&capacity.as_str()), "{}", out.stdout);
    assert_eq!(out.code, Some(0));
    assert!(
        guest_bytes_in(&img),
        "{transport:?} {engine}: the guest's write is not in the image"
    );
}

#[test]
fn read_only_disk_refuses_writes_and_stays_unchanged() {
    for transport in Transport::BOTH {
        for engine in ENGINES {
            read_only_refuses_writes(transport, engine);
        }
    }
}

fn read_only_refuses_writes(transport: Transport, engine: &str) {
    let img = image(&format!("blk-ro-{transport:?}-{engine}.img"));
    let before = std::fs::read(&img).unwrap();
    let spec = format!("path={},readonly=on,engine={engine}", img.display());
    let out = run_blk(transport, &spec, "blk_ro=1");
    assert!(
        out.lines().contains(&"blk: write refused (read-only)"),
        "{transport:?} {engine}: {}",
        out.stdout
    );
    assert!(out.lines().contains(&"PASS blk"), "{}", out.stdout);
    assert_eq!(std::fs::read(&img).unwrap(), before);
}

#[test]
fn two_disks_get_two_slots_and_irqs() {
    let a = image("blk-a.img");
    let b = image("blk-b.img");
    let args = run_args(test_guest(), None, "checks=blk", 1, 128);
    let mut args = as_strs(&args);
    let (da, db) = (
        format!("path={}", a.display()),
        format!("path={},root=on", b.display()),
    );
    args.extend(["--disk", &da, "--disk", &db]);
    let out = run_skiff(&args, LIMIT, None);
    // root=on puts the second disk first: /dev/vda, slot 0, IRQ 5, and adds root=/dev/vda.
    assert!(out.stdout.contains("root=/dev/vda rw virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"), "{}", out.stdout);
    assert!(out.lines().contains(&"PASS blk"), "{}", out.stdout);
    assert!(guest_bytes_in(&b) && !guest_bytes_in(&a));
}

#[test]
fn benchmark_work_runs_and_reports() {
    for engine in ENGINES {
        benchmark_runs(engine);
    }
}

fn benchmark_runs(engine: &str) {
    // tools/bench relies on this guest mode; here it runs small.
    let img = image(&format!("blk-bench-{engine}.img"));
    let args = run_args(
        test_guest(),
        None,
        "checks=blkbench bench_mib=2 bench_ios=20",
        1,
        128,
    );
    let mut args = as_strs(&args);
    let disk = format!("path={},engine={engine}", img.display());
    args.extend(["--disk", &disk]);
    let out = run_skiff(&args, LIMIT, None);
    let lines = out.lines();
    assert!(lines.contains(&"PASS blkbench"), "{}", out.stdout);
    // The loops run in the guest's ring 3 (native on PVM hosts), driving the device from there.
    assert!(
        lines.contains(&"bench: blkbench in ring 3"),
        "{}",
        out.stdout
    );
    for row in [
        "BENCH blk seq-read-64k-qd8 ops=32 bytes=2097152 us=",
        "BENCH blk seq-write-64k-qd8+flush ops=32 bytes=2097152 us=",
        "BENCH blk rand-read-4k-qd1 ops=20 bytes=81920 us=",
        "BENCH blk rand-read-4k-qd32 ops=80 bytes=327680 us=",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(row)),
            "{row}\n{}",
            out.stdout
        );
    }
}

/// A guest that breaks its queue (an available index past the queue, a ring zeroed under the
/// live device) gets DEVICE_NEEDS_RESET, and after a reset the device works again; a storm of
/// configuration writes at debug level leaves a bounded log. Before, the first broken index
/// span the event thread forever, the guest's reset then blocked its vCPU on the device's lock,
/// and this test ran into its time limit.
#[test]
fn a_guest_that_breaks_its_queue_hurts_only_itself() {
    for transport in Transport::BOTH {
        for engine in ENGINES {
            breaks_its_queue(transport, engine);
        }
    }
}

fn breaks_its_queue(transport: Transport, engine: &str) {
    let img = image(&format!("blk-hostile-{transport:?}-{engine}.img"));
    let mut args = run_args(test_guest(), None, "checks=hostile storm=50000", 1, 128);
    assert_eq!(args[..2], ["--log-level", "info"]);
    args[1] = "debug".into();
    let mut args = as_strs(&args);
    let disk = format!("path={},engine={engine}", img.display());
    args.extend(transport.flags());
    args.extend(["--disk", &disk]);
    let out = run_skiff(&args, LIMIT, None);
    let lines = out.lines();
    for want in [
        "hostile: index past the queue: device needs reset",
        "hostile: reset, set up again, 3 reads",
        "hostile: zeroed ring: device needs reset, reset, read",
        "hostile: 50000 writes to read-only configuration bytes",
        "PASS hostile",
    ] {
        assert!(
            lines.contains(&want),
            "{transport:?}: {want}\n{}\n{}",
            out.stdout,
            out.stderr
        );
    }
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let storm_lines = out
        .stderr
        .lines()
        .filter(|l| l.contains("read-only configuration byte"))
        .count();
    // 10 lines a second at most (the storm takes well under 10 s, even under emulation).
    assert!(
        (1..=100).contains(&storm_lines),
        "{storm_lines} log lines for 50000 guest writes"
    );
}

/// Word `w` (little-endian u64) of 4 KiB block `b` as round `r` of the guest's `blkdeep`
/// check writes it.
fn deep_word(r: u64, b: u64, w: u64) -> u64 {
    (r << 48 | b << 16 | w) ^ 0x5a5a_5a5a_5a5a_5a5a
}

/// Whether the image holds round `r` of `blkdeep` in its `blocks` blocks from `sector`.
fn deep_bytes_in(path: &Path, r: u64, blocks: usize, sector: usize) -> bool {
    let bytes = std::fs::read(path).unwrap();
    let words = bytes[sector * 512..].chunks_exact(8).take(blocks * 512);
    words.enumerate().all(|(i, word)| {
        let (b, w) = (i as u64 / 512, i as u64 % 512);
        u64::from_le_bytes(word.try_into().unwrap()) == deep_word(r, b, w)
    })
}

/// The test guest in-process through the library, with one disk on `img` carried out by
/// `engine`, its console going to `console`.
fn library_vm(cmdline: &str, img: &Path, engine: IoEngine, console: &Path) -> VmConfig {
    let mut config = VmConfig::new(test_guest());
    config.cmdline = format!("console=ttyS0 {cmdline}");
    config.console_input = ConsoleInput::None;
    config.console_output = Some(console.to_owned());
    config.disks.push(DiskConfig {
        path: img.to_owned(),
        read_only: false,
        id: Some("deep".into()),
        root: false,
        partuuid: None,
        rate_limiter: None,
        cache_type: CacheType::Writeback,
        io_engine: engine,
    });
    config
}

fn wait_for_console(path: &Path, text: &str) -> String {
    let start = std::time::Instant::now();
    loop {
        let now = std::fs::read_to_string(path).unwrap_or_default();
        if now.contains(text) {
            return now;
        }
        assert!(
            start.elapsed() < LIMIT,
            "no {text:?} in the console:\n{now}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Writes the image's dirty pages back and drops all its pages from the host's page cache.
fn drop_host_cache(path: &Path) {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    file.sync_data().unwrap();
    // SAFETY: advice on a descriptor this function owns; no memory is involved.
    let dropped = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(dropped, 0);
}

fn tmp(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// A guest that keeps 40 requests in flight, more than the Async engine's io_uring holds
/// (32): requests wait on the available ring until completions free room, none is lost or
/// answered twice, the guest reads back what it wrote, and the image holds every byte. The
/// metrics show the full ring was met (Async only) and how many submissions it took.
#[test]
fn a_queue_deeper_than_the_ring_loses_nothing() {
    const { assert!(skiff::devices::virtio::block::RING_ENTRIES < 40) };
    for engine in [IoEngine::Sync, IoEngine::Async] {
        let img = image(&format!("blk-deep-{engine:?}.img"));
        let console = tmp(&format!("blk-deep-{engine:?}.console"));
        let config = library_vm("checks=blkdeep deep_rounds=2", &img, engine, &console);
        let mut vm = Vm::new(&config).unwrap();
        vm.start().unwrap();
        vm.wait().unwrap();
        let text = std::fs::read_to_string(&console).unwrap();
        assert!(
            text.contains("blkdeep: round 1: 96 writes, flush, 96 reads checked, 40 in flight")
                && text.contains("PASS blkdeep"),
            "{engine:?}\n{text}"
        );
        assert!(
            deep_bytes_in(&img, 1, 96, 8192),
            "{engine:?}: the image lacks the guest's bytes"
        );
        let block = &vm.metrics()["block"]["deep"];
        assert_eq!(block["write_count"], 192, "{engine:?}: {block}");
        assert_eq!(block["read_count"], 192, "{engine:?}: {block}");
        assert_eq!(block["flush_count"], 2, "{engine:?}: {block}");
        assert_eq!(block["io_errors"], 0, "{engine:?}: {block}");
        let throttled = block["io_engine_throttled_events"].as_u64().unwrap();
        let submits = block["io_engine_submits"].as_u64().unwrap();
        if engine == IoEngine::Async {
            assert!(throttled > 0, "the ring was never full: {block}");
            assert!((1..=386).contains(&submits), "{block}");
        } else {
            assert_eq!((throttled, submits), (0, 0), "{block}");
        }
    }
}

/// A snapshot taken while the guest keeps 40 requests in flight: the snapshot waits for the
/// requests the ring holds and answers them first, so the guest finds every request answered
/// or still on its available ring and goes on to the end, both where it was snapshotted
/// (resumed) and restored in a new VM; the image then holds its last round's bytes.
#[test]
fn a_snapshot_under_a_deep_queue_loses_no_request() {
    for engine in [IoEngine::Async, IoEngine::Sync] {
        let img = image(&format!("blk-deep-snap-{engine:?}.img"));
        let console = tmp(&format!("blk-deep-snap-{engine:?}.console"));
        let (snap, mem) = (tmp("blk-deep.snap"), tmp("blk-deep.mem"));
        let config = library_vm("checks=blkdeep deep_rounds=8", &img, engine, &console);
        let mut vm = Vm::new(&config).unwrap();
        vm.start().unwrap();
        wait_for_console(&console, "blkdeep: round 0");
        // Snapshots until one finds requests in the ring (Async; 60 tries at most, the figure
        // logged: timing decides, and the unit test
        // a_reset_answers_nothing_and_a_snapshot_wait_answers_everything pins the path): before
        // each, the image's pages leave the host's cache, so the guest's reads and flushes go
        // to the disk and stay in flight a while.
        let mut tries = 0;
        loop {
            tries += 1;
            drop_host_cache(&img);
            std::thread::sleep(Duration::from_millis(3));
            vm.pause().unwrap();
            vm.snapshot(SnapshotType::Full, &snap, &mem).unwrap();
            let waited = vm.metrics()["block"]["deep"]["io_engine_waited"]
                .as_u64()
                .unwrap();
            if engine == IoEngine::Sync || waited > 0 || tries == 60 {
                common::log_figure(&format!(
                    "{engine:?}: snapshot {tries} waited for {waited} requests in flight"
                ));
                break;
            }
            vm.resume().unwrap();
        }
        // The disk as the snapshot saw it (Skiff's snapshots do not hold disks), for the
        // restore after the snapshotted VM has gone on writing.
        let disk_then = std::fs::read(&img).unwrap();
        let before = std::fs::read_to_string(&console).unwrap();
        assert!(
            !before.contains("PASS blkdeep"),
            "done before the snapshot:\n{before}"
        );
        vm.resume().unwrap();
        wait_for_console(&console, "PASS blkdeep");
        vm.wait().unwrap();
        drop(vm);
        assert!(
            deep_bytes_in(&img, 7, 96, 8192),
            "{engine:?}: the image lacks the last round"
        );
        std::fs::write(&img, disk_then).unwrap();

        let console2 = tmp(&format!("blk-deep-snap-{engine:?}-restored.console"));
        let mut restore = RestoreConfig::new(&snap, &mem);
        restore.console.output = Some(console2.clone());
        let (mut vm, state) = Vm::restore(&restore).unwrap();
        assert_eq!(state.devices.blocks[0].device.io_engine, engine);
        vm.start().unwrap();
        let text = wait_for_console(&console2, "PASS blkdeep");
        assert!(
            text.contains("blkdeep: round 7: 96 writes"),
            "{engine:?}\n{text}"
        );
        vm.request_stop();
        drop(vm);
        assert!(
            deep_bytes_in(&img, 7, 96, 8192),
            "{engine:?}: the image lacks the last round"
        );
    }
}

/// The driver publishes 40 reads of blocks the host's page cache does not hold and resets the
/// device as soon as it is draining them: on Async the reset usually finds the ring's 32 in
/// flight (its debug line says so), waits for them, and after it nothing is written to the
/// guest (buffers, status bytes, used ring); set up again, the device reads. On Sync the reset
/// waits for the drain, and the check holds as well.
#[test]
fn a_reset_with_requests_in_flight_leaves_the_guest_alone() {
    for engine in ENGINES {
        let img = image(&format!("blk-reset-{engine}.img"));
        drop_host_cache(&img);
        let out = {
            let mut args = run_args(test_guest(), None, "checks=blkreset", 1, 128);
            args[1] = "debug".into();
            let mut args = as_strs(&args);
            let disk = format!("path={},engine={engine}", img.display());
            args.extend(["--disk", &disk]);
            run_skiff(&args, LIMIT, None)
        };
        assert!(
            out.lines().contains(&"PASS blkreset"),
            "{engine}\n{}\n{}",
            out.stdout,
            out.stderr
        );
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        if let Some(line) = out.lines().iter().find(|l| l.starts_with("blkreset: ")) {
            common::log_figure(&format!("{engine}: {line}"));
        }
        // The guest resets once the device is draining (notifications off), and the drain
        // holds the device until it has submitted: the reads, off the page cache, are then
        // mostly still in the ring (32 in most runs here; under load the event thread may
        // finish first, so the figure is logged, not required: the unit test
        // a_reset_answers_nothing_and_a_snapshot_wait_answers_everything pins the path).
        let waited = out
            .stderr
            .lines()
            .find(|l| l.contains("requests in flight"));
        if let Some(line) = waited {
            common::log_figure(&format!("{engine}: {line}"));
        }
    }
}

/// The descriptors of process `pid` (beyond stdio) with their open flags and targets.
fn descriptors(pid: &str) -> Vec<(u32, u32, PathBuf)> {
    let mut fds = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let entry = entry.unwrap();
        let fd: u32 = entry.file_name().to_string_lossy().parse().unwrap();
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue; // closed meanwhile
        };
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
            .unwrap();
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap_or_default();
        if fd > 2 {
            fds.push((fd, flags, target));
        }
    }
    fds
}

/// Every file descriptor a running Skiff opened is close-on-exec, so an embedder that spawns
/// children leaks none of them (eventfds for queues, interrupts and control, the disk image,
/// an Async disk's io_uring, KVM). Before, every eventfd lacked O_CLOEXEC.
#[test]
fn no_descriptor_leaks_into_children() {
    use common::api::Running;
    let cloexec = libc::O_CLOEXEC as u32;
    // What this test process passes on itself (from whoever started it) is not Skiff's.
    let inherited: Vec<u32> = descriptors("self")
        .into_iter()
        .filter(|(_, flags, _)| flags & cloexec == 0)
        .map(|(fd, _, _)| fd)
        .collect();
    let img = image("blk-cloexec.img");
    let img2 = image("blk-cloexec-async.img");
    let args = run_args(test_guest(), None, "checks=ctrlaltdel", 1, 128);
    let mut cmd = std::process::Command::new(common::skiff_bin());
    cmd.args(&args)
        .args(["--disk", &format!("path={}", img.display())])
        .args(["--disk", &format!("path={},engine=async", img2.display())]);
    let mut vm = Running::spawn(cmd, PathBuf::new());
    vm.wait_for("tick 1", LIMIT);
    let mut checked = 0;
    let mut rings = 0;
    for (fd, flags, target) in descriptors(&vm.child.id().to_string()) {
        rings += usize::from(target.to_string_lossy().contains("io_uring"));
        if inherited.contains(&fd) {
            continue;
        }
        assert_ne!(
            flags & cloexec,
            0,
            "fd {fd} ({}) is inherited by children",
            target.display()
        );
        checked += 1;
    }
    // KVM, the VM, a vCPU, memory, the images and a dozen eventfds at least; the Async
    // disk's io_uring among them.
    assert!(checked > 10, "only {checked} descriptors");
    assert_eq!(rings, 1, "one io_uring, for the Async disk");
    let _ = vm.child.kill();
    let _ = vm.wait(Duration::from_secs(10));
}

/// One `BENCH blk phase-N-...` line of the guest's `blkrate` check: (ops, bytes, µs).
fn phases(console: &str) -> Vec<(u64, u64, u64)> {
    let field = |line: &str, key: &str| -> u64 {
        line.split(' ')
            .find_map(|f| f.strip_prefix(key))
            .and_then(|v| v.trim_end_matches('\r').parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
    };
    console
        .lines()
        .filter(|l| l.starts_with("BENCH blk phase-"))
        .map(|l| (field(l, "ops="), field(l, "bytes="), field(l, "us=")))
        .collect()
}

/// Checks that `done` tokens (ops or bytes) spent in `us` microseconds came at `limit` a
/// second within 10 %, allowing for the bucket: the window may have started with between
/// `in_bucket.start()` and `in_bucket.end()` tokens already there.
fn assert_near_limit(
    what: &str,
    done: u64,
    us: u64,
    in_bucket: std::ops::RangeInclusive<u64>,
    limit: f64,
    console: &str,
) {
    let secs = us as f64 / 1e6;
    let (low, high) = (
        (done - in_bucket.end()) as f64 / secs,
        (done - in_bucket.start()) as f64 / secs,
    );
    eprintln!("{what}: {done} in {secs:.3} s, {low:.1} to {high:.1}/s, limit {limit:.1}/s");
    assert!(
        low <= 1.1 * limit && high >= 0.9 * limit,
        "{what}: {done} in {secs:.3} s is {low:.1} to {high:.1}/s, the limit {limit:.1}/s\n{console}"
    );
}

/// Sums of (ops, bytes, µs) over `phases`.
fn total(phases: &[(u64, u64, u64)]) -> (u64, u64, u64) {
    phases
        .iter()
        .fold((0, 0, 0), |(n, b, t), p| (n + p.0, b + p.1, t + p.2))
}

const MIB: u64 = 1 << 20;

/// A bandwidth limit of 4 MiB/s (a 1 MiB bucket refilled in 250 ms) from the config file holds
/// the guest's reads to that rate, as the guest measures it: 20 MiB, of which the full bucket
/// gives the first at once, take 19/4 s within 10 %. (Phase by phase the figures wander when
/// the guest's vCPU is kept from running between phases: the bucket refills meanwhile and the
/// next phase is quicker. Over the whole run it evens out.)
#[test]
fn bandwidth_limit_holds_the_guest_to_its_rate() {
    for engine in ["Sync", "Async"] {
        bandwidth_limit_holds(engine);
    }
}

fn bandwidth_limit_holds(engine: &str) {
    let img = image(&format!("blk-bandwidth-{engine}.img"));
    let config = tmp(&format!("blk-bandwidth-{engine}.json"));
    let doc = serde_json::json!({
        "boot-source": {
            "kernel_image_path": test_guest(),
            "boot_args": "console=ttyS0 checks=blkrate rate_mib=4 rate_phases=5",
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "drives": [{
            "drive_id": "limited",
            "path_on_host": img,
            "is_root_device": false,
            "rate_limiter": {"bandwidth": {"size": MIB, "refill_time": 250}},
            "io_engine": engine,
        }],
    });
    std::fs::write(&config, doc.to_string()).unwrap();
    let config = config.display().to_string();
    let out = run_skiff(&["--config-file", &config, "--no-api"], LIMIT, None);
    assert!(
        out.lines().contains(&"PASS blkrate"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    let phases = phases(&out.stdout);
    assert_eq!(phases.len(), 5, "{}", out.stdout);
    let (_, bytes, us) = total(&phases);
    assert_eq!(bytes, 20 * MIB);
    let limit = 4.0 * MIB as f64;
    assert_near_limit("20 MiB", bytes, us, MIB..=MIB, limit, &out.stdout);
}

/// An ops limit set through the API (32 requests a second, 4 in the bucket) and raised by
/// PATCH while the guest reads (to 128 a second, 16 in the bucket): the guest's phases before
/// the change run at the old rate and those after it at the new one, within 10 % allowing for
/// the buckets; GET /vm/config shows the new limit.
#[test]
fn patching_the_ops_limit_changes_the_rate_while_the_guest_runs() {
    use common::api::{fault, Running};
    let img = image("blk-patch.img");
    let mut vm = Running::start("blk-patch", &[]);
    let boot = serde_json::json!({
        "kernel_image_path": test_guest(),
        "boot_args": "console=ttyS0 checks=blkrate rate_mib=2 rate_phases=10",
    });
    let drive = serde_json::json!({
        "drive_id": "scratch",
        "path_on_host": img,
        "is_root_device": false,
        "rate_limiter": {"ops": {"size": 4, "refill_time": 125}},
    });
    for (method, path, body) in [
        ("PUT", "/boot-source", boot.to_string()),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 128}"#.to_owned(),
        ),
        ("PUT", "/drives/scratch", drive.to_string()),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#.to_owned(),
        ),
    ] {
        let (status, answer) = vm.call(method, path, Some(&body));
        assert_eq!(status, 204, "{method} {path}: {answer}");
    }
    vm.wait_for("BENCH blk phase-2-", LIMIT);
    let faster =
        r#"{"drive_id": "scratch", "rate_limiter": {"ops": {"size": 16, "refill_time": 125}}}"#;
    let (status, answer) = vm.call("PATCH", "/drives/scratch", Some(faster));
    assert_eq!(status, 204, "{answer}");
    let (status, answer) = vm.call(
        "PATCH",
        "/drives/other",
        Some(r#"{"drive_id": "other", "rate_limiter": {}}"#),
    );
    assert_eq!(status, 400);
    assert!(
        fault(&answer).contains("drive other does not exist"),
        "{answer}"
    );
    let (_, config) = vm.call("GET", "/vm/config", None);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        config["drives"][0]["rate_limiter"],
        serde_json::json!({"bandwidth": null, "ops": {"size": 16, "one_time_burst": null, "refill_time": 125}})
    );
    vm.wait_for("PASS blkrate", LIMIT);
    assert_eq!(vm.wait(LIMIT), Some(0), "{}", vm.stderr());
    let console = vm.console();
    let phases = phases(&console);
    assert_eq!(phases.len(), 10, "{console}");
    // Phase 0 spends the first full bucket, phase 3 is the one the change lands in (the host
    // answers within a phase, a second), and phase 4 the new bucket's first fill.
    let (ops, _, us) = total(&phases[1..3]);
    assert_near_limit("phases 1-2, before", ops, us, 0..=4, 32.0, &console);
    let (ops, _, us) = total(&phases[5..]);
    assert_near_limit("phases 5-9, after", ops, us, 0..=16, 128.0, &console);
}

/// The guest side of the snapshot tests (tests/snapshot.rs) on a plain boot: the `snapshot`
/// check writes its marker to sector `snap_sector`, then ticks, reading it back every tick,
/// and passes. The marker must be in the image afterwards, exactly as the host builds it.
#[test]
fn the_snapshot_check_ticks_and_keeps_its_disk_marker() {
    let img = image("blk-snapshot.img");
    let args = run_args(
        test_guest(),
        None,
        "checks=snapshot ticks_max=20 snap_seed=7 snap_sector=24",
        1,
        64,
    );
    let mut args = as_strs(&args);
    let disk = format!("path={}", img.display());
    args.extend(["--disk", &disk]);
    let out = run_skiff(&args, LIMIT, None);
    let lines = out.lines();
    assert!(
        lines.contains(&"snapshot: disk marker written at sector 24"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    let ticks: Vec<u64> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("snap-tick ")?.parse().ok())
        .collect();
    assert_eq!(ticks, (0..20).collect::<Vec<_>>(), "{}", out.stdout);
    for want in [
        "snapshot: 20 ticks done",
        "snapshot: 20 marker reads, 0 datagrams sent",
        "PASS snapshot",
        "DONE passed=1 failed=0",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(want)),
            "no {want:?}\n{}",
            out.stdout
        );
    }
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(
        bytes[24 * 512..25 * 512],
        common::snapshot_marker(7)[..],
        "the marker is not at sector 24 of the image"
    );
}

/// The snapshot check's read-back is not vacuous: the host overwrites the marker while the
/// guest ticks, and the guest reports it once and fails the check once.
#[test]
fn the_snapshot_check_sees_its_marker_change() {
    let img = image("blk-snapshot-changed.img");
    let args = run_args(test_guest(), None, "checks=snapshot ticks_max=60", 1, 64);
    let disk = format!("path={}", img.display());
    let vm = std::thread::spawn(move || {
        let mut args = as_strs(&args);
        args.extend(["--disk", &disk]);
        run_skiff(&args, LIMIT, None)
    });
    let marker = common::snapshot_marker(1);
    let start = std::time::Instant::now();
    while std::fs::read(&img).unwrap()[8 * 512..9 * 512] != marker[..] {
        assert!(start.elapsed() < LIMIT, "the guest never wrote its marker");
        std::thread::sleep(Duration::from_millis(20));
    }
    // In place: rewriting the whole file would truncate it under the guest's reads.
    let changed = [marker[100] ^ 0xff];
    let file = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    std::os::unix::fs::FileExt::write_at(&file, &changed, 8 * 512 + 100).unwrap();
    let out = vm.join().unwrap();
    let lines = out.lines();
    let reported = lines
        .iter()
        .filter(|l| l.starts_with("FAIL snapshot: disk marker differs at tick "))
        .count();
    assert_eq!(reported, 1, "{}", out.stdout);
    assert!(
        lines.contains(&"FAIL snapshot: disk marker differs")
            && lines.contains(&"DONE passed=0 failed=1"),
        "{}",
        out.stdout
    );
}

/// A hostile driver of a virtio-pci disk (the test guest's pcihostile check): writes to
/// read-only and unaligned configuration space, its BAR moved over guest RAM and back, an MSI-X
/// entry past the table, a notification of a queue that does not exist, bad common-
/// configuration offsets. Each gets one debug line; nothing panics, and the disk still answers.
#[test]
fn a_hostile_pci_driver_gets_log_lines_and_the_disk_still_answers() {
    let img = image("blk-pcihostile.img");
    let mut args = run_args(test_guest(), None, "checks=pcihostile", 1, 128);
    args[1] = "debug".into();
    let mut args = as_strs(&args);
    let disk = format!("path={}", img.display());
    args.extend(["--enable-pci", "--disk", &disk]);
    let out = run_skiff(&args, LIMIT, None);
    assert!(
        out.lines().contains(&"PASS pcihostile"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    for line in [
        "pci: unaligned 2-byte ECAM write at 0x8041",
        "pci: 00:01.0 BAR at 0x100000 is outside the PCI window or overlaps another BAR: not decoded",
        "virtio-pci: MSI-X table write at 0x640 beyond its 2 entries",
        "virtio-pci: notification of queue 7, which does not exist",
        "virtio-pci: 1-byte write to common configuration 0x3f ignored",
        "virtio-pci: write to read-only common configuration 0x12",
    ] {
        assert!(out.stderr.contains(line), "{line}\n{}", out.stderr);
    }
}
