//! The library API as an embedder uses it, in-process: configure, start, pause, resume, send
//! keys, read metrics, stop.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::test_guest;
use skiff::config::ConsoleInput;
use skiff::{GuestExit, Vm, VmConfig, VmState};

fn console_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name)
}

fn wait_for_console(path: &Path, text: &str) {
    let start = Instant::now();
    while !std::fs::read_to_string(path)
        .unwrap_or_default()
        .contains(text)
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no {text:?} in the console:\n{}",
            std::fs::read_to_string(path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn ticking_guest(console: &Path) -> VmConfig {
    let mut config = VmConfig::new(test_guest());
    config.cmdline = "console=ttyS0 checks=ctrlaltdel".into();
    config.console_input = ConsoleInput::None;
    config.console_output = Some(console.to_owned());
    config
}

fn port_writes(vm: &Vm) -> u64 {
    vm.metrics()["vcpu"][0]["exit_io_out"].as_u64().unwrap()
}

#[test]
fn embedder_starts_pauses_resumes_and_ends_a_vm() {
    let console = console_file("library-cad.console");
    let mut vm = Vm::new(&ticking_guest(&console)).unwrap();
    assert_eq!(vm.state(), VmState::Created);
    vm.start().unwrap();
    assert_eq!(vm.state(), VmState::Running);
    wait_for_console(&console, "tick 2");

    vm.pause().unwrap();
    assert_eq!(vm.state(), VmState::Paused);
    let (exits, printed) = (port_writes(&vm), std::fs::read(&console).unwrap().len());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(port_writes(&vm), exits, "a paused vCPU kept running");
    assert_eq!(std::fs::read(&console).unwrap().len(), printed);

    vm.resume().unwrap();
    let start = Instant::now();
    while port_writes(&vm) == exits {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no progress after resume"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    vm.send_ctrl_alt_del().unwrap();
    assert_eq!(vm.wait().unwrap(), GuestExit::I8042Reset);
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(text.contains("PASS ctrlaltdel"), "{text}");
    assert_eq!(vm.state(), VmState::Stopped);
}

#[test]
fn embedder_stops_a_running_vm() {
    let console = console_file("library-stop.console");
    let mut vm = Vm::new(&ticking_guest(&console)).unwrap();
    assert!(vm.pause().is_err(), "a VM that never started cannot pause");
    vm.start().unwrap();
    wait_for_console(&console, "tick 1");
    vm.request_stop();
    assert_eq!(vm.wait().unwrap(), GuestExit::Stopped(None));
    assert!(vm.start().is_err(), "a stopped VM does not start again");
}

/// Snapshot and restore in-process: a ticking guest is paused, saved, dropped, and built
/// again from its files; it goes on ticking from where it stopped (the ticks are printed from
/// a counter in guest memory, so a restart would begin at 0 again) and still answers
/// Ctrl-Alt-Del.
#[test]
fn a_restored_vm_goes_on_from_where_it_was_saved() {
    let console = console_file("library-snap.console");
    let snap = console_file("library-snap.state");
    let mem = console_file("library-snap.mem");
    let mut vm = Vm::new(&ticking_guest(&console)).unwrap();
    vm.start().unwrap();
    wait_for_console(&console, "tick 3");
    vm.pause().unwrap();
    let before = std::fs::read_to_string(&console).unwrap();
    let last: u64 = before
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .unwrap();
    vm.snapshot(skiff::snapshot::SnapshotType::Full, &snap, &mem)
        .unwrap();
    drop(vm);

    let console2 = console_file("library-snap-restored.console");
    let mut restore = skiff::builder::RestoreConfig::new(&snap, &mem);
    restore.console.input = ConsoleInput::None;
    restore.console.output = Some(console2.clone());
    let (mut vm, state) = Vm::restore(&restore).unwrap();
    assert_eq!(state.vcpus.len(), 1);
    vm.start().unwrap();
    let next = format!("tick {}", last + 1);
    wait_for_console(&console2, &next);
    let after = std::fs::read_to_string(&console2).unwrap();
    assert!(
        !after.contains("skiff-testguest:") && !after.contains("tick 0\n"),
        "the guest started again instead of going on:\n{after}"
    );
    vm.send_ctrl_alt_del().unwrap();
    let exit = vm.wait().unwrap();
    assert_eq!(exit, GuestExit::I8042Reset);
    assert!(std::fs::read_to_string(&console2)
        .unwrap()
        .contains("PASS ctrlaltdel"));
}

/// The host's 2 MiB huge page pool: `HugePages_<field>` from /proc/meminfo.
fn huge_pages(field: &str) -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(&format!("HugePages_{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no HugePages_{field} in /proc/meminfo"))
}

/// Grows the host's pool so that `pages` more are free, and puts its size back when dropped.
struct HugePagePool(u64);

impl HugePagePool {
    fn reserve(pages: u64) -> Self {
        let total = huge_pages("Total");
        let missing = pages.saturating_sub(huge_pages("Free"));
        let path = "/proc/sys/vm/nr_hugepages";
        std::fs::write(path, (total + missing).to_string())
            .expect("grow the host's huge page pool (needs root)");
        assert!(
            huge_pages("Free") >= pages,
            "the host could not set aside {pages} huge pages"
        );
        Self(total)
    }
}

impl Drop for HugePagePool {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", self.0.to_string());
    }
}

/// kB of 2 MiB hugetlbfs pages this process has in a mapping of exactly `size_kb`, from
/// /proc/self/smaps (0 when there is no such mapping).
fn hugetlb_kb_in_mapping_of(size_kb: u64) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let field = |entry: &str, name: &str| -> u64 {
        entry
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    // Each mapping starts with a line whose first word is its address range.
    let mut entries = Vec::new();
    for line in smaps.lines() {
        if line
            .split_whitespace()
            .next()
            .is_some_and(|w| w.contains('-') && !w.ends_with(':'))
        {
            entries.push(String::new());
        }
        if let Some(e) = entries.last_mut() {
            e.push_str(line);
            e.push('\n');
        }
    }
    entries
        .iter()
        .filter(|e| field(e, "Size:") == size_kb && field(e, "KernelPageSize:") == 2048)
        .map(|e| field(e, "Private_Hugetlb:") + field(e, "Shared_Hugetlb:"))
        .sum()
}

/// `huge_pages: 2M` backs the guest's RAM with the host's hugetlbfs pool: the guest boots and
/// runs, and the pages it touched are 2 MiB pages of a mapping of its memory's size. A pool
/// too small is a clear error when the VM is built, never a SIGBUS later.
#[test]
fn guest_memory_in_2m_huge_pages() {
    let console = console_file("library-huge.console");
    let mut config = ticking_guest(&console);
    config.memory_mib = 66;
    config.huge_pages = skiff::config::HugePages::Huge2M;
    {
        let _pool = HugePagePool::reserve(33);
        let mut vm = Vm::new(&config).unwrap();
        vm.start().unwrap();
        wait_for_console(&console, "tick 1");
        let huge_kb = hugetlb_kb_in_mapping_of(66 << 10);
        assert!(huge_kb >= 2048, "no 2 MiB pages behind the guest's memory");
        vm.send_ctrl_alt_del().unwrap();
        assert_eq!(vm.wait().unwrap(), GuestExit::I8042Reset);
        assert!(std::fs::read_to_string(&console)
            .unwrap()
            .contains("PASS ctrlaltdel"));
    }

    config.memory_mib = 2 * (huge_pages("Free") + 1);
    let Err(err) = Vm::new(&config) else {
        panic!("a pool too small is taken")
    };
    let text = err.to_string();
    assert!(
        text.contains("huge pages") && text.contains("nr_hugepages") && !text.contains('\n'),
        "{text}"
    );
    config.memory_mib = 65;
    let Err(err) = Vm::new(&config) else {
        panic!("an odd size is taken")
    };
    assert!(err.to_string().contains("2 MiB"), "{err}");
}

/// The io_uring descriptors this process holds.
fn io_urings() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().contains("io_uring"))
        .count()
}

/// An embedder's VM with an Async disk, stopped while the guest keeps 40 requests in flight:
/// the stop waits for them, and once the VM is dropped its io_uring is closed (no other test
/// here makes one).
#[test]
fn a_stopped_vm_with_an_async_disk_leaves_no_ring_behind() {
    use skiff::config::{CacheType, DiskConfig, IoEngine};
    let console = console_file("library-async.console");
    let img = console_file("library-async.img");
    std::fs::write(&img, vec![0u8; 8 << 20]).unwrap();
    let mut config = ticking_guest(&console);
    config.cmdline = "console=ttyS0 checks=blkdeep deep_rounds=1000".into();
    config.disks.push(DiskConfig {
        path: img,
        read_only: false,
        id: None,
        root: false,
        partuuid: None,
        rate_limiter: None,
        cache_type: CacheType::Writeback,
        io_engine: IoEngine::Async,
    });
    assert_eq!(io_urings(), 0);
    let mut vm = Vm::new(&config).unwrap();
    assert_eq!(io_urings(), 1);
    vm.start().unwrap();
    wait_for_console(&console, "blkdeep: round 1");
    vm.request_stop();
    vm.wait().unwrap();
    drop(vm);
    assert_eq!(io_urings(), 0, "the ring outlived its VM");
}
