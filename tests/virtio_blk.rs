//! virtio-blk through the real path: the test guest drives the device like a driver, and the
//! host checks the image file afterwards.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{as_strs, run_args, run_skiff, test_guest, Transport};

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
        let img = image(&format!("blk-rw-{transport:?}.img"));
        let out = run_blk(
            transport,
            &format!("path={},id=test-disk-7", img.display()),
            "",
        );
        let lines = out.lines();
        assert!(
            lines.contains(&"PASS blk"),
            "{transport:?}\n{}\n{}",
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
            "{transport:?}: the guest's write is not in the image"
        );
    }
}

#[test]
fn read_only_disk_refuses_writes_and_stays_unchanged() {
    for transport in Transport::BOTH {
        let img = image(&format!("blk-ro-{transport:?}.img"));
        let before = std::fs::read(&img).unwrap();
        let spec = format!("path={},readonly=on", img.display());
        let out = run_blk(transport, &spec, "blk_ro=1");
        assert!(
            out.lines().contains(&"blk: write refused (read-only)"),
            "{transport:?}: {}",
            out.stdout
        );
        assert!(out.lines().contains(&"PASS blk"), "{}", out.stdout);
        assert_eq!(std::fs::read(&img).unwrap(), before);
    }
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
    // tools/bench relies on this guest mode; here it runs small.
    let img = image("blk-bench.img");
    let args = run_args(
        test_guest(),
        None,
        "checks=blkbench bench_mib=2 bench_ios=20",
        1,
        128,
    );
    let mut args = as_strs(&args);
    let disk = format!("path={}", img.display());
    args.extend(["--disk", &disk]);
    let out = run_skiff(&args, LIMIT, None);
    let lines = out.lines();
    assert!(lines.contains(&"PASS blkbench"), "{}", out.stdout);
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
        hostile_guest(transport);
    }
}

fn hostile_guest(transport: Transport) {
    let img = image(&format!("blk-hostile-{transport:?}.img"));
    let mut args = run_args(test_guest(), None, "checks=hostile storm=50000", 1, 128);
    assert_eq!(args[..2], ["--log-level", "info"]);
    args[1] = "debug".into();
    let mut args = as_strs(&args);
    let disk = format!("path={}", img.display());
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
/// KVM). Before, every eventfd lacked O_CLOEXEC.
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
    let args = run_args(test_guest(), None, "checks=ctrlaltdel", 1, 128);
    let mut cmd = std::process::Command::new(common::skiff_bin());
    cmd.args(&args)
        .args(["--disk", &format!("path={}", img.display())]);
    let mut vm = Running::spawn(cmd, PathBuf::new());
    vm.wait_for("tick 1", LIMIT);
    let mut checked = 0;
    for (fd, flags, target) in descriptors(&vm.child.id().to_string()) {
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
    // KVM, the VM, a vCPU, memory, the image and a dozen eventfds at least.
    assert!(checked > 10, "only {checked} descriptors");
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
    let img = image("blk-bandwidth.img");
    let config = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("blk-bandwidth.json");
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
