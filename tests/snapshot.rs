//! Snapshots through the Firecracker API: the test guest's `snapshot` check (a tick counter in
//! guest memory, a disk marker read back every tick, a datagram every tick, a clock that must
//! neither go back nor leap) is paused, saved, and loaded into a new Skiff process, which must
//! carry on from the same tick with the same disk and TAP.
//!
//! What these tests assume of Skiff, which is Firecracker's API unless said otherwise:
//! - `PATCH /vm {"state": "Paused" | "Resumed"}`.
//! - `PUT /snapshot/create {"snapshot_type": "Full" | "Diff", "snapshot_path", "mem_file_path"}`
//!   answers 204 on a paused VM and 400 otherwise (running, or not started); the VM stays
//!   paused and can be resumed. Both files are created, or replaced. The memory file holds the
//!   guest's memory regions in order: exactly `mem_size_mib` MiB here.
//! - `Diff` needs `track_dirty_pages` (machine-config, or the load that made the VM) and writes
//!   only the pages dirtied since the last snapshot, Full or Diff, by the vCPUs and by the
//!   devices alike (used rings, data read from disk), each at its offset in `mem_file_path`,
//!   which is opened without truncating it. Written into a copy of the previous snapshot's
//!   memory file, it leaves a complete image of guest memory at this moment: Firecracker's
//!   snapshot-editor `rebase` merge, done in place. Written to a new file, the file has the
//!   guest's size and holes for every clean page. A snapshot may clear the dirty pages
//!   (Firecracker's Full and Diff both do), so of the two taken at one moment the Diff goes
//!   first.
//! - `PUT /snapshot/load {"snapshot_path", "mem_backend": {"backend_type": "File",
//!   "backend_path"}, "track_dirty_pages", "resume_vm"}` answers 204 on a process where nothing
//!   was configured (400 after `PUT /machine-config`). With `resume_vm` false the VM is
//!   `Paused` (as `GET /` says) until `PATCH /vm` resumes it.
//! - `"mem_backend": {"backend_type": "Uffd", "backend_path": SOCKET}` is Firecracker's
//!   handshake: guest memory mapped anonymous, registered with a userfaultfd, which is sent to
//!   the handler listening on SOCKET with a JSON array of the regions' mappings
//!   (`base_host_virt_addr`, `size`, `offset`, `page_size`, `page_size_kib`); the handler in
//!   `tests/common/uffd.rs` is written to that alone. Nothing listening there is a 400.
//! - A restored VM prints to the new process's standard output, and opens the drive and TAP
//!   paths saved in the snapshot as they were given at boot: a relative path stays relative
//!   and is opened from the new process's working directory (how the clones get a disk each).
//! - The guest's clock continues from the moment of the snapshot (Firecracker saves and
//!   restores the KVM clock); the guest fails its check if it goes back or leaps over 10 s.
//! - Every refusal is a 400 with a one-line `fault_message`; Skiff keeps serving, and a
//!   process whose loads were refused is still fresh: a good load then works.
//! - The snapshot file starts with the magic `SKIFFSNP` and a u32 little-endian format version
//!   at offset 8, which the loader checks first (before any checksum, so another version is
//!   reported as such); a checksum over the contents catches a corrupt byte or a truncation.

mod common;

use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::api::{call, fault, Running};
use common::netns::NetNs;
use common::uffd::FaultHandler;
use common::{skiff_bin, snapshot_marker, test_guest};

const LIMIT: Duration = Duration::from_secs(60);
const MEM_MIB: u64 = 64;
const DISK_BYTES: usize = 8 << 20;
const PAGE: usize = 4096;
/// The guest's marker sector, and after it the clone identity and the clone record.
const MARKER_SECTOR: usize = 8;
const CLONE_ID_SECTOR: usize = 9;
const CLONE_RECORD_SECTOR: usize = 10;
/// How far past the last tick before a snapshot the first one after it may be: the next, or
/// the one after when the snapshot cut a tick's line short (its rest is printed first).
const TICK_SLACK: u64 = 3;

/// A fresh, empty directory for one test's files.
fn work_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("snapshot")
        .join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// A zeroed disk image.
fn disk_image(path: &Path) {
    fs::write(path, vec![0u8; DISK_BYTES]).unwrap();
}

fn sector(image: &Path, n: usize) -> Vec<u8> {
    fs::read(image).unwrap()[n * 512..(n + 1) * 512].to_vec()
}

fn write_sector(image: &Path, n: usize, data: &[u8]) {
    let mut bytes = data.to_vec();
    bytes.resize(512, 0);
    let file = fs::OpenOptions::new().write(true).open(image).unwrap();
    file.write_at(&bytes, (n * 512) as u64).unwrap();
}

fn json_path(path: &Path) -> String {
    serde_json::to_string(path.to_str().unwrap()).unwrap()
}

/// Where `needle` first occurs in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// CRC-32 (IEEE, as zlib), the state file's checksum over everything before its last 4 bytes.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A snapshot's two files.
struct Snap {
    state: PathBuf,
    mem: PathBuf,
}

impl Snap {
    fn in_dir(dir: &Path, name: &str) -> Self {
        Self {
            state: dir.join(format!("{name}.snap")),
            mem: dir.join(format!("{name}.mem")),
        }
    }

    fn create_body(&self, kind: &str) -> String {
        format!(
            r#"{{"snapshot_type": "{kind}", "snapshot_path": {}, "mem_file_path": {}}}"#,
            json_path(&self.state),
            json_path(&self.mem)
        )
    }

    fn load_body(&self, track_dirty_pages: bool, resume_vm: bool) -> String {
        format!(
            r#"{{"snapshot_path": {}, "mem_backend": {{"backend_type": "File", "backend_path": {}}}, "track_dirty_pages": {track_dirty_pages}, "resume_vm": {resume_vm}}}"#,
            json_path(&self.state),
            json_path(&self.mem)
        )
    }
}

impl Snap {
    /// A load whose memory comes from the page-fault handler on `socket`.
    fn uffd_load_body(&self, socket: &Path, track_dirty_pages: bool, resume_vm: bool) -> String {
        format!(
            r#"{{"snapshot_path": {}, "mem_backend": {{"backend_type": "Uffd", "backend_path": {}}}, "track_dirty_pages": {track_dirty_pages}, "resume_vm": {resume_vm}}}"#,
            json_path(&self.state),
            json_path(socket)
        )
    }
}

/// Sends a request that must answer 204; otherwise fails naming what it was for.
fn expect_204(vm: &Running, method: &str, path: &str, body: &str, what: &str) {
    let (status, answer) = vm.call(method, path, Some(body));
    assert!(
        status == 204,
        "{what}: {method} {path} {body}\nanswered {status} {answer}, expected 204 (the API \
         contract is at the top of tests/snapshot.rs)\nconsole:\n{}\nstderr:\n{}",
        vm.console(),
        vm.stderr()
    );
}

/// Sends a request that must be refused: a 400 whose one-line fault contains one of `any_of`
/// (case-insensitive) and does not say the endpoint is missing. Returns the fault.
fn expect_refused(
    vm: &Running,
    method: &str,
    path: &str,
    body: &str,
    case: &str,
    any_of: &[&str],
) -> String {
    let (status, answer) = vm.call(method, path, Some(body));
    assert_eq!(
        status, 400,
        "{case}: {method} {path} {body}\nanswered {status} {answer}, expected a 400 refusal"
    );
    let message = fault(&answer);
    let lower = message.to_lowercase();
    assert!(
        !lower.contains("not supported by skiff yet"),
        "{case}: refused only because snapshots are not implemented yet: {message}"
    );
    assert!(
        !message.trim().is_empty() && !message.contains('\n'),
        "{case}: the fault should be one line: {message:?}"
    );
    assert!(
        any_of.iter().any(|w| lower.contains(&w.to_lowercase())),
        "{case}: the fault {message:?} does not say why (expected one of {any_of:?})"
    );
    message
}

/// The `state` field of `GET /`.
fn vm_state(vm: &Running) -> String {
    let (status, body) = vm.call("GET", "/", None);
    assert_eq!(
        status, 200,
        "GET / answered {status} {body}: Skiff stopped serving"
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["state"].as_str().unwrap_or_default().to_owned()
}

/// A drive for [`boot`]: `PUT /drives/disk` with `path` as given (relative or not).
fn drive(path: &str) -> (String, String) {
    (
        "/drives/disk".to_owned(),
        format!(
            r#"{{"drive_id": "disk", "path_on_host": {}, "is_root_device": false, "is_read_only": false}}"#,
            serde_json::to_string(path).unwrap()
        ),
    )
}

/// Boots the test guest's `snapshot` check (2 vCPUs, MEM_MIB) with `cmdline` added, after
/// the `devices` requests (path, body).
fn boot(vm: &Running, cmdline: &str, devices: &[(String, String)], track_dirty_pages: bool) {
    let source = format!(
        r#"{{"kernel_image_path": {}, "boot_args": "console=ttyS0 checks=snapshot {cmdline}"}}"#,
        json_path(test_guest())
    );
    expect_204(vm, "PUT", "/boot-source", &source, "boot source");
    let machine = format!(
        r#"{{"vcpu_count": 2, "mem_size_mib": {MEM_MIB}, "track_dirty_pages": {track_dirty_pages}}}"#
    );
    expect_204(vm, "PUT", "/machine-config", &machine, "machine config");
    for (path, body) in devices {
        expect_204(vm, "PUT", path, body, "device");
    }
    let start = r#"{"action_type": "InstanceStart"}"#;
    expect_204(vm, "PUT", "/actions", start, "InstanceStart");
}

fn set_state(vm: &Running, state: &str) {
    let body = format!(r#"{{"state": "{state}"}}"#);
    expect_204(vm, "PATCH", "/vm", &body, &format!("PATCH /vm {state}"));
}

/// The ticks in complete console lines, in order.
fn ticks_in(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| {
            l.trim_end_matches('\r')
                .strip_prefix("snap-tick ")?
                .parse()
                .ok()
        })
        .collect()
}

/// Pauses the VM; returns the last tick it printed (lines still in the pipe arrive first).
fn pause(vm: &Running) -> u64 {
    set_state(vm, "Paused");
    vm.lines_within(Duration::from_millis(300));
    let last = *ticks_in(&vm.console())
        .last()
        .unwrap_or_else(|| panic!("no snap-tick before the pause:\n{}", vm.console()));
    last
}

/// Waits for the next `snap-tick N` and checks that it continues from `before`: the next
/// tick, or the one after (TICK_SLACK); not a restart, not a leap.
fn next_tick_after(vm: &Running, before: u64, after_what: &str) -> u64 {
    let deadline = Instant::now() + LIMIT;
    let tick = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = vm.try_wait_for("snap-tick ", left).unwrap_or_else(|| {
            panic!(
                "no snap-tick within {LIMIT:?} {after_what} (between ticks the guest waits in \
                 HLT for its periodic LAPIC timer: are the vCPU, LAPIC and clock state restored \
                 and the vCPUs running?)\nconsole:\n{}\nstderr:\n{}",
                vm.console(),
                vm.stderr()
            )
        });
        if let Some(n) = ticks_in(&line).first() {
            break *n;
        }
    };
    assert!(
        tick > before && tick <= before + TICK_SLACK,
        "{after_what} the guest printed snap-tick {tick}, the last before was {before}: it should \
         continue at {}..={} from the counter in its memory (0 is a restart)\nconsole:\n{}",
        before + 1,
        before + TICK_SLACK,
        vm.console()
    );
    tick
}

/// The first console line containing `text`, from everything printed so far (lines another
/// wait already took included); None when none came within `limit`.
fn console_line(vm: &Running, text: &str, limit: Duration) -> Option<String> {
    let deadline = Instant::now() + limit;
    loop {
        let console = vm.console();
        if let Some(line) = console.lines().find(|l| l.contains(text)) {
            return Some(line.trim_end_matches('\r').to_owned());
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A restored guest continues: it does not boot again.
fn assert_no_second_boot(vm: &Running) {
    assert!(
        !vm.console().contains("skiff-testguest:"),
        "the restored guest booted again instead of continuing:\n{}",
        vm.console()
    );
}

/// Creates `kind` snapshot `snap` of the paused VM; both files must be there afterwards.
fn create(vm: &Running, kind: &str, snap: &Snap) {
    let body = snap.create_body(kind);
    expect_204(
        vm,
        "PUT",
        "/snapshot/create",
        &body,
        &format!("{kind} snapshot of the paused VM"),
    );
    assert!(
        snap.state.is_file() && snap.mem.is_file(),
        "{kind} snapshot answered 204 but {} or {} is missing",
        snap.state.display(),
        snap.mem.display()
    );
    let len = fs::metadata(&snap.mem).unwrap().len();
    assert_eq!(
        len,
        MEM_MIB << 20,
        "the memory file of a {kind} snapshot should be the guest's {MEM_MIB} MiB"
    );
}

/// A new Skiff process, API on a new socket, that loads `snap`.
fn restore(name: &str, snap: &Snap, track_dirty_pages: bool, resume_vm: bool) -> Running {
    let vm = Running::start(name, &[]);
    let body = snap.load_body(track_dirty_pages, resume_vm);
    expect_204(
        &vm,
        "PUT",
        "/snapshot/load",
        &body,
        "load into a fresh process",
    );
    vm
}

/// Ends the process (SIGKILL), as a host would after its snapshot, releasing disk and TAP.
fn kill(vm: &mut Running) {
    let _ = vm.child.kill();
    let _ = vm.child.wait();
}

/// Sends Ctrl-Alt-Del, which ends the guest's tick loop; its check must pass (no disk,
/// clock or network problem since boot, restore included) and Skiff end with status 0.
fn end_with_ctrl_alt_del(vm: &mut Running) {
    let action = r#"{"action_type": "SendCtrlAltDel"}"#;
    expect_204(vm, "PUT", "/actions", action, "SendCtrlAltDel");
    if vm.try_wait_for("DONE passed=", LIMIT).is_none() {
        panic!(
            "the guest did not end on Ctrl-Alt-Del (a key at the i8042 ends its tick loop: is \
             the i8042 restored?)\nconsole:\n{}\nstderr:\n{}",
            vm.console(),
            vm.stderr()
        );
    }
    let console = vm.console();
    assert!(
        console.contains("PASS snapshot") && !console.contains("FAIL"),
        "the guest's snapshot check failed (its FAIL lines say what: disk marker, clock, \
         network)\nconsole:\n{console}\nstderr:\n{}",
        vm.stderr()
    );
    assert_eq!(vm.wait(LIMIT), Some(0), "{}", vm.stderr());
}

/// The baseline, which needs no snapshot: the guest and the helpers above as the snapshot
/// tests use them, through the API with a disk and 2 vCPUs. Pausing stops the ticks,
/// resuming continues them from the next, Ctrl-Alt-Del ends the check with PASS, and the
/// marker is in the image. When this passes and a snapshot test fails, the snapshot is why.
#[test]
fn baseline_pause_resume_and_ctrl_alt_del_without_a_snapshot() {
    let dir = work_dir("baseline");
    let disk = dir.join("disk.img");
    disk_image(&disk);
    let mut vm = Running::start("snap-baseline", &[]);
    boot(&vm, "", &[drive(disk.to_str().unwrap())], true);
    vm.wait_for("snapshot: disk marker written at sector 8", LIMIT);
    vm.wait_for("snap-tick 5", LIMIT);
    let before = pause(&vm);
    let quiet = vm.lines_within(Duration::from_secs(1));
    assert!(
        ticks_in(&quiet.join("\n")).is_empty(),
        "ticks while paused: {quiet:?}"
    );
    set_state(&vm, "Resumed");
    let tick = next_tick_after(&vm, before, "after PATCH Resumed");
    vm.wait_for(&format!("snap-tick {}", tick + 2), LIMIT);
    end_with_ctrl_alt_del(&mut vm);
    assert_eq!(sector(&disk, MARKER_SECTOR), snapshot_marker(1));
}

/// The clone side without a snapshot, booted as the clones' source is: the drive given by
/// the relative path `disk.img` is opened from Skiff's working directory and kept relative
/// in the configuration; the guest reads the identity the host put on that disk, says so,
/// and records it with the tick on the disk.
#[test]
fn baseline_a_relative_drive_path_and_the_clone_identity() {
    let dir = work_dir("baseline-clone");
    let disk = dir.join("disk.img");
    disk_image(&disk);
    write_sector(&disk, CLONE_ID_SECTOR, b"SKIFF-CLONE-ID 5\n");
    let mut vm = Running::start_in("snap-baseline-clone", Some(&dir), &[]);
    boot(&vm, "snap_clone=1", &[drive("disk.img")], false);
    vm.wait_for("snap-clone: id 5 at tick 0", LIMIT);
    vm.wait_for("snap-tick 3", LIMIT);
    let (status, config) = vm.call("GET", "/vm/config", None);
    assert_eq!(status, 200, "{config}");
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        config["drives"][0]["path_on_host"], "disk.img",
        "the drive's relative path is not kept as given"
    );
    end_with_ctrl_alt_del(&mut vm);
    let record = sector(&disk, CLONE_RECORD_SECTOR);
    assert!(
        record.starts_with(b"SKIFF-CLONE-SEEN 5 tick "),
        "{:?}",
        String::from_utf8_lossy(&record)
    );
}

/// Boots with a disk, pauses at tick 5 or later, takes a Full snapshot, kills the process;
/// returns the last tick before the snapshot.
fn boot_and_snapshot(name: &str, dir: &Path, snap: &Snap) -> u64 {
    let disk = dir.join("disk.img");
    disk_image(&disk);
    let mut vm = Running::start(name, &[]);
    boot(&vm, "", &[drive(disk.to_str().unwrap())], false);
    vm.wait_for("snap-tick 5", LIMIT);
    let before = pause(&vm);
    create(&vm, "Full", snap);
    kill(&mut vm);
    assert_eq!(
        sector(&disk, MARKER_SECTOR),
        snapshot_marker(1),
        "the guest's marker is not on the disk at the snapshot"
    );
    before
}

/// Create, kill, load with resume_vm: the new process's guest continues from the tick after
/// the snapshot's, without booting again, reads its disk marker back every tick, and ends on
/// Ctrl-Alt-Del with its check passed.
#[test]
fn full_snapshot_loaded_in_a_new_process_continues_the_guest() {
    let dir = work_dir("full");
    let snap = Snap::in_dir(&dir, "full");
    let before = boot_and_snapshot("snap-full", &dir, &snap);
    let mut vm = restore("snap-full-restored", &snap, false, true);
    assert_eq!(vm_state(&vm), "Running", "after a load with resume_vm true");
    let tick = next_tick_after(&vm, before, "after the load");
    vm.wait_for(&format!("snap-tick {}", tick + 3), LIMIT);
    assert_no_second_boot(&vm);
    end_with_ctrl_alt_del(&mut vm);
}

/// The same with resume_vm false: the loaded VM is Paused and prints nothing until
/// PATCH /vm Resumed, then continues from the tick after the snapshot's.
/// The warm path for pools: a process started with `--warm-restore` has made its VM, memory
/// and vCPUs for the snapshot before the load arrives; the load then maps the memory file over
/// the prepared memory. The guest goes on as from a cold load, with dirty pages tracked when
/// the load asks (the prepared memory slots are registered again with dirty logging): a diff
/// taken afterwards holds the pages the guest wrote, not the whole memory.
#[test]
fn a_process_prepared_with_warm_restore_loads_the_snapshot_and_goes_on() {
    let dir = work_dir("warm");
    let snap = Snap::in_dir(&dir, "warm");
    let before = boot_and_snapshot("snap-warm", &dir, &snap);
    let warm = snap.state.to_str().unwrap().to_owned();
    let mut vm = Running::start("snap-warm-restored", &["--warm-restore", &warm]);
    expect_204(
        &vm,
        "PUT",
        "/snapshot/load",
        &snap.load_body(true, true),
        "load into a process prepared for it",
    );
    let tick = next_tick_after(&vm, before, "after the warm load");
    vm.wait_for(&format!("snap-tick {}", tick + 3), LIMIT);
    assert_no_second_boot(&vm);
    pause(&vm);
    let diff = Snap::in_dir(&dir, "warm-diff");
    create(&vm, "Diff", &diff);
    let written =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&diff.mem).unwrap()) * 512;
    assert!(
        written > 0 && written < (MEM_MIB << 20) / 4,
        "a diff after a warm load wrote {written} bytes of a {MEM_MIB} MiB guest"
    );
    set_state(&vm, "Resumed");
    end_with_ctrl_alt_del(&mut vm);

    // A snapshot that is not there is refused at start, in one line.
    let mut cmd = std::process::Command::new(common::skiff_bin());
    cmd.args(["--api-sock", dir.join("never.sock").to_str().unwrap()])
        .args(["--warm-restore", dir.join("missing.snap").to_str().unwrap()]);
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without the snapshot");
    assert!(
        err.contains("missing.snap") && err.lines().count() == 1,
        "{err}"
    );
}

#[test]
fn full_snapshot_loaded_paused_runs_only_after_patch_resumed() {
    let dir = work_dir("full-paused");
    let snap = Snap::in_dir(&dir, "full");
    let before = boot_and_snapshot("snap-paused", &dir, &snap);
    let mut vm = restore("snap-paused-restored", &snap, false, false);
    assert_eq!(vm_state(&vm), "Paused", "after a load with resume_vm false");
    let quiet = vm.lines_within(Duration::from_secs(1));
    assert!(
        ticks_in(&quiet.join("\n")).is_empty(),
        "the VM ran before PATCH /vm Resumed: {quiet:?}"
    );
    set_state(&vm, "Resumed");
    assert_eq!(vm_state(&vm), "Running");
    let tick = next_tick_after(&vm, before, "after the load and PATCH Resumed");
    vm.wait_for(&format!("snap-tick {}", tick + 3), LIMIT);
    assert_no_second_boot(&vm);
    end_with_ctrl_alt_del(&mut vm);
}

/// The Uffd backend, with a handler of our own written to Firecracker's handshake: a Full
/// snapshot loaded with resume_vm continues from the tick after the snapshot's, its disk
/// marker read back every tick, and ends on Ctrl-Alt-Del with its check passed, its memory
/// filled by the handler (which was told of the guest's one region, at offset 0 of the memory
/// file, 4 KiB pages). Loaded with track_dirty_pages, it then takes a Diff of the few pages
/// dirtied since, as a VM restored from the file would.
#[test]
fn full_snapshot_loaded_through_a_uffd_handler_continues_the_guest() {
    let dir = work_dir("uffd");
    let snap = Snap::in_dir(&dir, "full");
    let before = boot_and_snapshot("snap-uffd", &dir, &snap);
    let socket = dir.join("uffd.sock");
    let handler = FaultHandler::listen(&socket, &snap.mem);
    let mut vm = Running::start("snap-uffd-restored", &[]);
    let body = snap.uffd_load_body(&socket, true, true);
    expect_204(
        &vm,
        "PUT",
        "/snapshot/load",
        &body,
        "load with the Uffd backend",
    );
    assert_eq!(
        vm_state(&vm),
        "Running",
        "after a Uffd load with resume_vm true"
    );
    let tick = next_tick_after(&vm, before, "after the Uffd load");
    vm.wait_for(&format!("snap-tick {}", tick + 3), LIMIT);
    assert_no_second_boot(&vm);
    assert!(
        handler.filled() > 0,
        "the guest runs but the handler filled no page: is guest memory registered with the \
         userfaultfd?"
    );
    pause(&vm);
    let diff = Snap::in_dir(&dir, "diff");
    create(&vm, "Diff", &diff);
    let allocated = fs::metadata(&diff.mem).unwrap().blocks() * 512;
    assert!(
        allocated > 0 && allocated < (MEM_MIB << 20) / 2,
        "a Diff of a Uffd-backed VM should hold only the pages dirtied since the load, not \
         {allocated} bytes of {MEM_MIB} MiB"
    );
    set_state(&vm, "Resumed");
    end_with_ctrl_alt_del(&mut vm);
    let served = handler.finish();
    let expected = common::uffd::Mapping {
        base_host_virt_addr: served.mappings[0].base_host_virt_addr,
        size: MEM_MIB << 20,
        offset: 0,
        page_size: PAGE as u64,
        page_size_kib: PAGE as u64,
    };
    assert_eq!(served.mappings, vec![expected], "the handshake's regions");
    assert!(
        served.copied > 0,
        "no page came from the memory file: {served:?}"
    );
    assert_eq!(
        sector(&dir.join("disk.img"), MARKER_SECTOR),
        snapshot_marker(1)
    );
}

/// The Uffd backend on a process prepared with `--warm-restore`: the prepared memory goes to
/// the handler untouched, which fills it, and the guest continues from the next tick.
#[test]
fn a_warm_process_loads_through_a_uffd_handler() {
    let dir = work_dir("uffd-warm");
    let snap = Snap::in_dir(&dir, "full");
    let before = boot_and_snapshot("snap-uffd-warm", &dir, &snap);
    let socket = dir.join("uffd.sock");
    let handler = FaultHandler::listen(&socket, &snap.mem);
    let warm = snap.state.to_str().unwrap().to_owned();
    let mut vm = Running::start("snap-uffd-warm-restored", &["--warm-restore", &warm]);
    let body = snap.uffd_load_body(&socket, false, true);
    expect_204(
        &vm,
        "PUT",
        "/snapshot/load",
        &body,
        "a warm load with the Uffd backend",
    );
    let tick = next_tick_after(&vm, before, "after the warm Uffd load");
    vm.wait_for(&format!("snap-tick {}", tick + 2), LIMIT);
    assert_no_second_boot(&vm);
    end_with_ctrl_alt_del(&mut vm);
    let served = handler.finish();
    assert!(
        served.copied > 0,
        "no page came from the memory file: {served:?}"
    );
}

/// A Uffd load with nothing at backend_path, or a socket nobody listens on any more: each a
/// 400 with one line saying it cannot connect, the process still fresh, and the same
/// snapshot then loads from its memory file and continues.
#[test]
fn a_uffd_load_without_a_handler_is_refused_and_a_file_load_then_works() {
    let dir = work_dir("uffd-bad");
    let snap = Snap::in_dir(&dir, "full");
    let before = boot_and_snapshot("snap-uffd-bad", &dir, &snap);
    let gone = dir.join("gone.sock");
    drop(std::os::unix::net::UnixListener::bind(&gone).unwrap());
    let mut vm = Running::start("snap-uffd-bad-loader", &[]);
    let cases = [
        (
            dir.join("absent.sock"),
            "a backend_path that does not exist",
            "no such file",
        ),
        (
            gone,
            "a socket whose listener is gone",
            "connection refused",
        ),
    ];
    for (socket, case, why) in cases {
        let body = snap.uffd_load_body(&socket, false, true);
        let message = expect_refused(&vm, "PUT", "/snapshot/load", &body, case, &[why]);
        assert!(
            message.contains("page-fault handler") && message.contains(socket.to_str().unwrap()),
            "{case}: the fault should name the handler's socket: {message}"
        );
        assert_eq!(
            vm_state(&vm),
            "Not started",
            "after the refused load with {case}, the process should still be fresh"
        );
    }
    let body = snap.load_body(false, true);
    expect_204(
        &vm,
        "PUT",
        "/snapshot/load",
        &body,
        "a File load after refused Uffd loads",
    );
    next_tick_after(
        &vm,
        before,
        "after the File load that followed refused Uffd loads",
    );
    end_with_ctrl_alt_del(&mut vm);
}

/// 4 KiB pages that differ between two memory images, by index.
fn differing_pages(a: &[u8], b: &[u8]) -> Vec<usize> {
    let pages = a.chunks(PAGE).zip(b.chunks(PAGE));
    pages
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .collect()
}

/// A Diff on top of a Full (semantics at the top of this file). With dirty-page tracking,
/// Full snapshot A, resume, tick, pause; at that one moment a Diff written into a copy of
/// A's memory file (B), then a Full (C). B's memory must equal C's page for page (the VM was
/// paused in between, so any difference is a page the Diff missed), and B and C restored
/// each continue from the same tick. Then C's restored VM, tracking dirty pages as loaded,
/// takes a Diff into a new file: the guest's size, mostly holes.
#[test]
fn diff_snapshot_into_a_copy_of_the_full_restores_the_same_guest_as_a_full() {
    let dir = work_dir("diff");
    let disk = dir.join("disk.img");
    disk_image(&disk);
    let (a, b, c) = (
        Snap::in_dir(&dir, "a"),
        Snap::in_dir(&dir, "b"),
        Snap::in_dir(&dir, "c"),
    );
    let mut vm = Running::start("snap-diff", &[]);
    boot(&vm, "", &[drive(disk.to_str().unwrap())], true);
    vm.wait_for("snap-tick 3", LIMIT);
    let at_a = pause(&vm);
    create(&vm, "Full", &a);
    set_state(&vm, "Resumed");
    vm.wait_for(&format!("snap-tick {}", at_a + 6), LIMIT);
    let before = pause(&vm);
    fs::copy(&a.mem, &b.mem).unwrap();
    create(&vm, "Diff", &b);
    create(&vm, "Full", &c);
    kill(&mut vm);

    let (mem_a, mem_b, mem_c) = (
        fs::read(&a.mem).unwrap(),
        fs::read(&b.mem).unwrap(),
        fs::read(&c.mem).unwrap(),
    );
    let changed = differing_pages(&mem_a, &mem_c);
    assert!(
        !changed.is_empty(),
        "the guest's memory did not change between A and C"
    );
    let missed = differing_pages(&mem_b, &mem_c);
    assert!(
        missed.is_empty(),
        "the Diff written into a copy of A's memory file differs from the Full taken at the \
         same moment in {} of the {} pages changed since A (first at offset {:#x}): a Diff must \
         hold every page dirtied since the last snapshot, by devices too (used rings, disk \
         reads), not only what KVM's dirty log shows, and must not truncate the file",
        missed.len(),
        changed.len(),
        missed[0] * PAGE
    );

    let mut from_b = restore("snap-diff-b", &b, false, true);
    let tick_b = next_tick_after(&from_b, before, "after loading the Diff merged into A");
    assert_no_second_boot(&from_b);
    end_with_ctrl_alt_del(&mut from_b);

    let mut from_c = restore("snap-diff-c", &c, true, true);
    let tick_c = next_tick_after(&from_c, before, "after loading the Full");
    assert_eq!(tick_b, tick_c, "B and C hold the same moment of the guest");
    from_c.wait_for(&format!("snap-tick {}", tick_c + 3), LIMIT);
    let d = Snap::in_dir(&dir, "d");
    pause(&from_c);
    create(&from_c, "Diff", &d);
    let allocated = fs::metadata(&d.mem).unwrap().blocks() * 512;
    assert!(
        allocated > 0 && allocated < (MEM_MIB << 20) / 2,
        "a Diff into a new file should write only the few pages dirtied since the load, not \
         {allocated} bytes of {MEM_MIB} MiB"
    );
    set_state(&from_c, "Resumed");
    end_with_ctrl_alt_del(&mut from_c);
}

/// Bad requests, each a 400 with a one-line fault saying why, Skiff serving on: on the
/// source VM, a snapshot while it runs, a Diff without dirty-page tracking, a snapshot into a
/// missing directory (the VM then still snapshots and runs); on a fresh process, a snapshot
/// before boot and a load after PUT /machine-config; on another fresh process, loads of a
/// missing, a truncated, a corrupted and a wrong-version snapshot file, of a missing memory
/// file and of one a page short, after which that process is still fresh and loads the good
/// snapshot, whose guest continues.
#[test]
fn bad_snapshot_requests_are_refused_with_one_line_and_skiff_stays_usable() {
    let dir = work_dir("bad");
    let disk = dir.join("disk.img");
    disk_image(&disk);
    let good = Snap::in_dir(&dir, "good");
    let mut vm = Running::start("snap-bad-source", &[]);
    boot(&vm, "", &[drive(disk.to_str().unwrap())], false);
    vm.wait_for("snap-tick 3", LIMIT);
    expect_refused(
        &vm,
        "PUT",
        "/snapshot/create",
        &good.create_body("Full"),
        "a snapshot of a running VM",
        &["paus", "running"],
    );
    vm.wait_for("snap-tick", LIMIT);
    let before_refusals = pause(&vm);
    expect_refused(
        &vm,
        "PUT",
        "/snapshot/create",
        &good.create_body("Diff"),
        "a Diff without track_dirty_pages",
        &["dirty", "track"],
    );
    let nowhere = Snap::in_dir(&dir.join("absent"), "x");
    expect_refused(
        &vm,
        "PUT",
        "/snapshot/create",
        &nowhere.create_body("Full"),
        "a snapshot into a missing directory",
        &["no such file", "not found", "does not exist"],
    );
    assert_eq!(vm_state(&vm), "Paused", "after refused snapshots");
    set_state(&vm, "Resumed");
    next_tick_after(
        &vm,
        before_refusals,
        "after refused snapshots and PATCH Resumed",
    );
    let before = pause(&vm);
    create(&vm, "Full", &good);
    kill(&mut vm);

    let fresh = Running::start("snap-bad-fresh", &[]);
    expect_refused(
        &fresh,
        "PUT",
        "/snapshot/create",
        &Snap::in_dir(&dir, "early").create_body("Full"),
        "a snapshot before boot",
        &[
            "before starting",
            "not started",
            "not booted",
            "before boot",
        ],
    );
    let machine = format!(r#"{{"vcpu_count": 2, "mem_size_mib": {MEM_MIB}}}"#);
    expect_204(&fresh, "PUT", "/machine-config", &machine, "machine config");
    expect_refused(
        &fresh,
        "PUT",
        "/snapshot/load",
        &good.load_body(false, true),
        "a load after PUT /machine-config",
        &["configur"],
    );
    assert_eq!(vm_state(&fresh), "Not started");

    // The bad files, made from the good ones.
    let state = fs::read(&good.state).unwrap();
    assert!(
        state.len() > 12 && &state[..8] == b"SKIFFSNP",
        "the snapshot file does not start with the magic SKIFFSNP that these tests assume \
         (then a u32 little-endian format version at offset 8): {:?}",
        String::from_utf8_lossy(&state[..state.len().min(16)])
    );
    let bad_state = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        fs::write(&path, bytes).unwrap();
        path
    };
    let truncated = bad_state("truncated.snap", &state[..state.len() / 2]);
    let mut corrupt = state.clone();
    corrupt[state.len() / 2] ^= 0xff;
    let corrupt = bad_state("corrupt.snap", &corrupt);
    let mut version = state.clone();
    for b in &mut version[8..12] {
        *b ^= 0xff;
    }
    let version = bad_state("version.snap", &version);
    // Taken on another CPU: the vendor string in the state changed and the checksum made
    // right again, so only the CPU check can refuse it.
    let mut other_cpu = state.clone();
    let (ours, theirs): (&[u8], &[u8]) = match find(&state, b"GenuineIntel") {
        Some(_) => (b"GenuineIntel", b"AuthenticAMD"),
        None => (b"AuthenticAMD", b"GenuineIntel"),
    };
    let at = find(&state, ours).expect("the host's CPU vendor in the state file");
    other_cpu[at..at + 12].copy_from_slice(theirs);
    let n = other_cpu.len() - 4;
    let crc = crc32(&other_cpu[..n]);
    other_cpu[n..].copy_from_slice(&crc.to_le_bytes());
    let other_cpu = bad_state("other-cpu.snap", &other_cpu);
    let short_mem = dir.join("short.mem");
    fs::copy(&good.mem, &short_mem).unwrap();
    let file = fs::OpenOptions::new().write(true).open(&short_mem).unwrap();
    file.set_len((MEM_MIB << 20) - PAGE as u64).unwrap();
    drop(file);

    const MISSING: &[&str] = &["no such file", "not found", "does not exist"];
    const CUT: &[&str] = &[
        "truncat",
        "short",
        "end of file",
        "eof",
        "incomplete",
        "checksum",
        "crc",
    ];
    const CORRUPT: &[&str] = &["checksum", "crc", "corrupt", "integrity"];
    const SHORT: &[&str] = &["short", "small", "size", "length", "truncat"];
    let (absent_state, absent_mem) = (dir.join("absent.snap"), dir.join("absent.mem"));
    let cases = [
        ("a missing snapshot file", &absent_state, &good.mem, MISSING),
        ("a snapshot file cut in half", &truncated, &good.mem, CUT),
        (
            "a snapshot file with a byte flipped in the middle",
            &corrupt,
            &good.mem,
            CORRUPT,
        ),
        (
            "a snapshot file with another format version",
            &version,
            &good.mem,
            &["version"],
        ),
        (
            "a snapshot taken on another CPU vendor",
            &other_cpu,
            &good.mem,
            &["cpu"],
        ),
        ("a missing memory file", &good.state, &absent_mem, MISSING),
        (
            "a memory file a page shorter than the guest's memory",
            &good.state,
            &short_mem,
            SHORT,
        ),
    ];
    let mut loader = Running::start("snap-bad-loader", &[]);
    for (case, state, mem, any_of) in cases {
        let snap = Snap {
            state: state.clone(),
            mem: mem.clone(),
        };
        let body = snap.load_body(false, true);
        expect_refused(&loader, "PUT", "/snapshot/load", &body, case, any_of);
        assert_eq!(
            vm_state(&loader),
            "Not started",
            "after the refused load of {case}, the process should still be fresh"
        );
    }
    let body = good.load_body(false, true);
    expect_204(
        &loader,
        "PUT",
        "/snapshot/load",
        &body,
        "the good load after refused ones",
    );
    next_tick_after(
        &loader,
        before,
        "after the good load that followed refused ones",
    );
    end_with_ctrl_alt_del(&mut loader);
}

/// Eight clones of one snapshot, restored at once, each on its own disk. The guest booted
/// with its drive given by the relative path `disk.img`, from the directory `vm0`; each
/// clone's process runs in its own directory `vm<k>` holding a copy of the disk as it was at
/// the snapshot, into whose sector 9 the host then wrote `SKIFF-CLONE-ID <k>`. The clones'
/// memory is identical, so the disk is the only thing that can tell them apart: with
/// `snap_clone=1` each guest reads that identity at every tick, prints it, and writes
/// `SKIFF-CLONE-SEEN <k> tick <n>` to sector 10. Clone k printing k proves it reads its own
/// file, and that record, in its own file only, proves its writes land there; the source's
/// disk stays as it was at the snapshot. A drive path made absolute at boot or in the
/// snapshot would send every clone to vm0's disk, which holds no identity.
#[test]
fn eight_clones_from_one_snapshot_each_use_their_own_disk() {
    const CLONES: usize = 8;
    let dir = work_dir("clones");
    let source_dir = dir.join("vm0");
    fs::create_dir(&source_dir).unwrap();
    let source_disk = source_dir.join("disk.img");
    disk_image(&source_disk);
    let snap = Snap::in_dir(&dir, "base");
    let mut vm = Running::start_in("snap-clone-source", Some(&source_dir), &[]);
    boot(&vm, "snap_clone=1", &[drive("disk.img")], false);
    vm.wait_for("snap-tick 3", LIMIT);
    let before = pause(&vm);
    create(&vm, "Full", &snap);
    kill(&mut vm);
    let source_bytes = fs::read(&source_disk).unwrap();
    assert_eq!(
        source_bytes[MARKER_SECTOR * 512..(MARKER_SECTOR + 1) * 512],
        snapshot_marker(1)[..]
    );

    let mut clones = Vec::new();
    for k in 1..=CLONES {
        let clone_dir = dir.join(format!("vm{k}"));
        fs::create_dir(&clone_dir).unwrap();
        let disk = clone_dir.join("disk.img");
        fs::write(&disk, &source_bytes).unwrap();
        write_sector(
            &disk,
            CLONE_ID_SECTOR,
            format!("SKIFF-CLONE-ID {k}\n").as_bytes(),
        );
        clones.push((
            Running::start_in(&format!("snap-clone-{k}"), Some(&clone_dir), &[]),
            disk,
        ));
    }
    // All loads at once, one thread each.
    let body = snap.load_body(false, true);
    let answers: Vec<(u16, String)> = std::thread::scope(|s| {
        let calls: Vec<_> = clones
            .iter()
            .map(|(vm, _)| {
                let (sock, body) = (vm.sock.clone(), &body);
                s.spawn(move || call(&sock, "PUT", "/snapshot/load", Some(body)))
            })
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    for (k, (status, answer)) in answers.iter().enumerate() {
        assert_eq!(
            *status,
            204,
            "clone {}: PUT /snapshot/load answered {answer}",
            k + 1
        );
    }

    for (k, (vm, _)) in clones.iter().enumerate() {
        let k = k + 1;
        next_tick_after(vm, before, &format!("in clone {k} after the load"));
        assert_no_second_boot(vm);
        // From the whole console: a snapshot taken inside the tick that printed `before`
        // has the identity line of that tick come before the next tick's.
        let line =
            console_line(vm, "snap-clone: id ", Duration::from_secs(20)).unwrap_or_else(|| {
                panic!(
                "clone {k} never read the identity written into vm{k}/disk.img: it opened another \
                 file. Does Skiff keep the drive's relative path disk.img as given at boot, and \
                 open it from the new process's working directory?\nconsole:\n{}",
                vm.console()
            )
            });
        let (id, tick) = line
            .strip_prefix("snap-clone: id ")
            .and_then(|r| r.split_once(" at tick "))
            .and_then(|(id, tick)| Some((id.parse::<usize>().ok()?, tick.parse::<u64>().ok()?)))
            .unwrap_or_else(|| panic!("clone {k}: malformed line {line:?}"));
        assert_eq!(
            id, k,
            "clone {k} read clone {id}'s identity: the clones share a disk"
        );
        assert!(
            (before..=before + TICK_SLACK).contains(&tick),
            "clone {k} first read its identity at tick {tick}, the snapshot was at {before}"
        );
    }
    for (vm, _) in &mut clones {
        end_with_ctrl_alt_del(vm);
    }
    for (k, (_, disk)) in clones.iter().enumerate() {
        let k = k + 1;
        let record = sector(disk, CLONE_RECORD_SECTOR);
        let want = format!("SKIFF-CLONE-SEEN {k} tick ");
        assert!(
            record.starts_with(want.as_bytes()),
            "vm{k}/disk.img should hold clone {k}'s record, holds {:?}",
            String::from_utf8_lossy(&record[..40])
        );
        assert_eq!(
            sector(disk, MARKER_SECTOR),
            snapshot_marker(1),
            "clone {k}'s marker"
        );
    }
    assert!(
        fs::read(&source_disk).unwrap() == source_bytes,
        "the source's disk changed after the snapshot: a clone wrote to vm0/disk.img"
    );
}

const GUEST: &str = "172.30.0.2:5556";
const HOST: &str = "172.30.0.1:5555";

/// The guest's "snap-tick N" datagrams that arrive on `sock` until it has been quiet for
/// `quiet`, or `until` arrived.
fn datagrams(sock: &UdpSocket, quiet: Duration, until: Option<u64>) -> Vec<u64> {
    sock.set_read_timeout(Some(quiet)).unwrap();
    let guest: SocketAddr = GUEST.parse().unwrap();
    let mut buf = [0u8; 2048];
    let mut got = Vec::new();
    while let Ok((n, from)) = sock.recv_from(&mut buf) {
        assert_eq!(from, guest);
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        let tick = text
            .strip_prefix("snap-tick ")
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("unexpected datagram {text:?}"));
        got.push(tick);
        if Some(tick) == until {
            break;
        }
    }
    got
}

/// A Skiff started in `ns`, API on a new socket.
fn start_in_netns(ns: &NetNs, name: &str) -> Running {
    let sock = Running::fresh_sock(name);
    let cmd = ns.command(skiff_bin(), &["--api-sock", sock.to_str().unwrap()]);
    let vm = Running::spawn(cmd, sock);
    vm.wait_for_socket();
    vm
}

/// The TAP path in the snapshot: a guest sending "snap-tick N" to the host every tick is
/// snapshotted, killed and loaded by a new process in the same network namespace, whose
/// TAP persists. The host's socket receives every tick once, in order, across the restore:
/// no frame lost or sent twice, the guest's learnt addresses still good.
#[test]
fn a_restored_vm_carries_on_sending_on_its_tap() {
    let ns = NetNs::with_tap("snapnet", "tap0", "172.30.0.1/24");
    let sock = ns.udp_socket(HOST.parse().unwrap());
    let dir = work_dir("net");
    let snap = Snap::in_dir(&dir, "net");
    let mut vm = start_in_netns(&ns, "snap-net");
    let nic = (
        "/network-interfaces/eth0".to_owned(),
        r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:1e:00:02"}"#
            .to_owned(),
    );
    boot(&vm, "", &[nic], false);
    let mut got = datagrams(&sock, Duration::from_secs(30), Some(5));
    assert_eq!(
        got.last(),
        Some(&5),
        "no snap-tick 5 datagram\n{}",
        vm.console()
    );
    let before = pause(&vm);
    create(&vm, "Full", &snap);
    kill(&mut vm);
    got.extend(datagrams(&sock, Duration::from_millis(300), None));

    let mut vm = start_in_netns(&ns, "snap-net-restored");
    let body = snap.load_body(false, true);
    expect_204(
        &vm,
        "PUT",
        "/snapshot/load",
        &body,
        "load into a fresh process",
    );
    let tick = next_tick_after(&vm, before, "after the load");
    got.extend(datagrams(&sock, Duration::from_secs(10), Some(tick + 3)));
    end_with_ctrl_alt_del(&mut vm);
    let last = *got.last().unwrap();
    assert!(
        last >= tick + 3,
        "datagrams stopped after the restore: {got:?}"
    );
    assert_eq!(
        got,
        (0..=last).collect::<Vec<_>>(),
        "every tick's datagram once, in order, across the restore (the last before it was \
         {before})"
    );
}

/// `network_overrides`: the snapshot's TAP is gone when the clone starts (deleted, and another
/// made in its place with the host's address), and the load puts the interface on the new one.
/// The guest's datagrams arrive through it, from the tick after the snapshot on.
#[test]
fn a_network_override_puts_a_restored_nic_on_another_tap() {
    let ns = NetNs::with_tap("snapover", "tap0", "172.30.0.1/24");
    let sock = ns.udp_socket(HOST.parse().unwrap());
    let dir = work_dir("net-override");
    let snap = Snap::in_dir(&dir, "net");
    let mut vm = start_in_netns(&ns, "snap-over");
    let nic = (
        "/network-interfaces/eth0".to_owned(),
        r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:1e:00:02"}"#
            .to_owned(),
    );
    boot(&vm, "", &[nic], false);
    let got = datagrams(&sock, Duration::from_secs(30), Some(3));
    assert_eq!(
        got.last(),
        Some(&3),
        "no snap-tick 3 datagram\n{}",
        vm.console()
    );
    let before = pause(&vm);
    create(&vm, "Full", &snap);
    kill(&mut vm);
    datagrams(&sock, Duration::from_millis(300), None);
    let ip = |args: &[&str]| {
        let out = ns.command("ip", args).output().unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // The guest remembers the host's MAC (its ARP cache is in the snapshot): the new TAP
    // gets the old one's, as a clone's namespace would be set up alike.
    let link = ns.link("tap0").unwrap();
    let mac = link
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap()
        .to_owned();
    ip(&["link", "del", "tap0"]);
    ip(&["tuntap", "add", "dev", "tap1", "mode", "tap"]);
    ip(&["link", "set", "tap1", "address", &mac]);
    ip(&["addr", "add", "172.30.0.1/24", "dev", "tap1"]);
    ip(&["link", "set", "tap1", "up"]);

    let mut vm = start_in_netns(&ns, "snap-over-restored");
    let body = format!(
        r#"{{"snapshot_path": {}, "mem_backend": {{"backend_type": "File", "backend_path": {}}}, "resume_vm": true, "network_overrides": [{{"iface_id": "eth0", "host_dev_name": "tap1"}}]}}"#,
        json_path(&snap.state),
        json_path(&snap.mem)
    );
    expect_204(&vm, "PUT", "/snapshot/load", &body, "load onto another TAP");
    let (_, config) = vm.call("GET", "/vm/config", None);
    assert!(config.contains(r#""host_dev_name":"tap1""#), "{config}");
    let tick = next_tick_after(&vm, before, "after the load");
    let after = datagrams(&sock, Duration::from_secs(10), Some(tick + 3));
    end_with_ctrl_alt_del(&mut vm);
    assert!(
        after.contains(&(tick + 3)) && after.iter().all(|&t| t > before),
        "datagrams through tap1 after the restore: {after:?} (last before: {before})"
    );
    assert!(
        ns.link("tap0").is_none(),
        "the saved TAP was made again instead"
    );
}

/// The entropy device across a restore: the guest asks it for bytes at every tick, before the
/// snapshot and after the load (its `snapshot` check fails if it stops answering), and the
/// restored VM's `GET /vm/config` shows it with its rate limiter.
#[test]
fn a_restored_entropy_device_goes_on_answering() {
    let dir = work_dir("entropy");
    let snap = Snap::in_dir(&dir, "entropy");
    let mut vm = Running::start("snap-rng", &[]);
    let entropy = (
        "/entropy".to_owned(),
        r#"{"rate_limiter": {"ops": {"size": 1000, "refill_time": 100}}}"#.to_owned(),
    );
    boot(&vm, "", &[entropy], false);
    vm.wait_for("snap-tick 3", LIMIT);
    assert!(vm.console().contains("entropy yes"), "{}", vm.console());
    let before = pause(&vm);
    create(&vm, "Full", &snap);
    kill(&mut vm);

    let mut vm = restore("snap-rng-restored", &snap, false, true);
    let tick = next_tick_after(&vm, before, "after the load");
    vm.wait_for(&format!("snap-tick {}", tick + 3), LIMIT);
    let (_, config) = vm.call("GET", "/vm/config", None);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        config["entropy"]["rate_limiter"]["ops"]["size"], 1000,
        "{config}"
    );
    end_with_ctrl_alt_del(&mut vm);
}

/// A host program's echo through the vsock device at `uds`: `CONNECT 52`, `OK <port>`, then
/// `bytes` sent with the end of stream, and what the guest's port 52 sent back.
fn vsock_echo(uds: &Path, bytes: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let mut s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s.write_all(b"CONNECT 52\n").unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "closed before OK: {line:?}");
        line.push(byte[0]);
    }
    assert!(line.starts_with(b"OK "), "{line:?}");
    let mut writer = s.try_clone().unwrap();
    let sent = bytes.to_vec();
    let sender = std::thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    sender.join().unwrap();
    back
}

/// The vsock device across a restore. Connections do not survive it (nor in Firecracker):
/// the restored guest gets VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, which its check prints, and a
/// host program connecting after the load is echoed as before it. The first process's socket
/// is still there, so a load without `vsock_override` is refused in one line (the process
/// stays fresh) and one with it listens at the new path, which `GET /vm/config` shows.
#[test]
fn a_restored_vsock_device_resets_its_transport_and_takes_new_connections() {
    let dir = work_dir("vsock");
    let snap = Snap::in_dir(&dir, "vsock");
    let (first, second) = (dir.join("a.sock"), dir.join("b.sock"));
    let mut vm = Running::start("snap-vsock", &[]);
    let vsock = (
        "/vsock".to_owned(),
        format!(r#"{{"guest_cid": 3, "uds_path": {}}}"#, json_path(&first)),
    );
    boot(&vm, "", &[vsock], false);
    vm.wait_for("snap-tick 3", LIMIT);
    assert!(vm.console().contains("vsock yes"), "{}", vm.console());
    let bytes: Vec<u8> = (0..65536u32)
        .map(|i| (i * 7 + i / 251).to_le_bytes()[0])
        .collect();
    assert!(
        vsock_echo(&first, &bytes) == bytes,
        "echo before the snapshot"
    );
    // The guest has the connection's RST once it says so; a snapshot taken before would
    // catch it half-closed (and the restored guest's reset would end it uncounted).
    vm.wait_for("closed: 65536 bytes in", LIMIT);
    let before = pause(&vm);
    create(&vm, "Full", &snap);
    kill(&mut vm);
    assert!(
        first.exists(),
        "Skiff leaves its socket, as Firecracker does"
    );

    let mut vm = Running::start("snap-vsock-restored", &[]);
    let load = snap.load_body(false, true);
    expect_refused(
        &vm,
        "PUT",
        "/snapshot/load",
        &load,
        "the saved socket path is taken",
        &["cannot listen on the vsock socket"],
    );
    let with_override = format!(
        r#"{}, "vsock_override": {{"uds_path": {}}}}}"#,
        load.trim_end_matches('}'),
        json_path(&second)
    );
    expect_204(
        &vm,
        "PUT",
        "/snapshot/load",
        &with_override,
        "load with vsock_override",
    );
    vm.wait_for("vsock: transport reset (cid 3)", LIMIT);
    let tick = next_tick_after(&vm, before, "after the load");
    vm.wait_for(&format!("snap-tick {}", tick + 2), LIMIT);
    assert!(vsock_echo(&second, &bytes) == bytes, "echo after the load");
    vm.wait_for("closed: 65536 bytes in", LIMIT);
    let (_, config) = vm.call("GET", "/vm/config", None);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        config["vsock"]["uds_path"],
        second.to_str().unwrap(),
        "{config}"
    );
    end_with_ctrl_alt_del(&mut vm);
    assert!(
        vm.console()
            .contains("snapshot: vsock: 2 connections closed, 1 transport resets"),
        "{}",
        vm.console()
    );
}

/// Boots the test guest's `balloon` check on MEM_MIB: it writes 24 MiB from 32 MiB, with a
/// balloon of `amount_mib` and statistics every second.
fn boot_balloon(vm: &Running, amount_mib: u32, track_dirty_pages: bool) {
    let source = format!(
        r#"{{"kernel_image_path": {}, "boot_args": "console=ttyS0 checks=balloon balloon_area=32 balloon_area_mib=32 balloon_touch_mib=24"}}"#,
        json_path(test_guest())
    );
    expect_204(vm, "PUT", "/boot-source", &source, "boot source");
    let machine = format!(
        r#"{{"vcpu_count": 1, "mem_size_mib": {MEM_MIB}, "track_dirty_pages": {track_dirty_pages}}}"#
    );
    expect_204(vm, "PUT", "/machine-config", &machine, "machine config");
    let balloon = format!(
        r#"{{"amount_mib": {amount_mib}, "deflate_on_oom": true, "stats_polling_interval_s": 1}}"#
    );
    expect_204(vm, "PUT", "/balloon", &balloon, "balloon");
    let start = r#"{"action_type": "InstanceStart"}"#;
    expect_204(vm, "PUT", "/actions", start, "InstanceStart");
}

/// Pages the balloon gave back changed to zeros without a guest write in KVM's dirty log: a
/// Diff must still hold them. Full A, inflate 8 MiB over pages the guest wrote, then at one
/// moment a Diff into a copy of A's memory file (B) and a Full (C): B equals C page for page,
/// and the inflated pages are zeros in both.
#[test]
fn a_diff_holds_the_pages_the_balloon_gave_back() {
    let dir = work_dir("balloon-diff");
    let (a, b, c) = (
        Snap::in_dir(&dir, "a"),
        Snap::in_dir(&dir, "b"),
        Snap::in_dir(&dir, "c"),
    );
    let mut vm = Running::start("snap-balloon-diff", &[]);
    boot_balloon(&vm, 0, true);
    vm.wait_for("balloon: at target 0 pages", LIMIT);
    set_state(&vm, "Paused");
    create(&vm, "Full", &a);
    set_state(&vm, "Resumed");
    expect_204(&vm, "PATCH", "/balloon", r#"{"amount_mib": 8}"#, "inflate");
    vm.wait_for("balloon: at target 2048 pages", LIMIT);
    set_state(&vm, "Paused");
    fs::copy(&a.mem, &b.mem).unwrap();
    create(&vm, "Diff", &b);
    create(&vm, "Full", &c);
    kill(&mut vm);
    let (mem_a, mem_b, mem_c) = (
        fs::read(&a.mem).unwrap(),
        fs::read(&b.mem).unwrap(),
        fs::read(&c.mem).unwrap(),
    );
    let ballooned = (32 << 20)..(40 << 20);
    assert!(
        mem_a[ballooned.clone()].iter().any(|&x| x != 0),
        "the guest had written the pages it then gave up"
    );
    assert!(
        mem_c[ballooned.clone()].iter().all(|&x| x == 0),
        "inflated pages in the Full"
    );
    let missed = differing_pages(&mem_b, &mem_c);
    assert!(
        missed.is_empty(),
        "the Diff merged into A differs from the Full in {} pages (first at {:#x}); inflated \
         pages are {:#x}..{:#x}",
        missed.len(),
        missed.first().map_or(0, |p| p * PAGE),
        ballooned.start,
        ballooned.end
    );
}

/// The balloon across a restore (the test guest's `balloon` check): inflated to 8 MiB of the
/// 24 MiB the guest wrote, saved, loaded in a new process, where `GET /balloon` shows the same
/// target and actual size, the saved statistics are there and new ones come, and the balloon
/// inflates to 24 MiB and deflates to 0 on `PATCH /balloon`. The pages inflated after the load
/// are in the memory file with the guest's bytes: they must read zeros once deflated, which
/// only holds if the restored VM gives them back by mapping anonymous memory over them
/// (`MADV_DONTNEED` on the private file mapping would bring the file's bytes back).
#[test]
fn a_ballooned_guest_restores_with_its_balloon() {
    let dir = work_dir("balloon");
    let snap = Snap::in_dir(&dir, "balloon");
    let mut vm = Running::start("snap-balloon", &[]);
    boot_balloon(&vm, 8, false);
    vm.wait_for("balloon: at target 2048 pages", LIMIT);
    set_state(&vm, "Paused");
    create(&vm, "Full", &snap);
    kill(&mut vm);

    let mut vm = restore("snap-balloon-restored", &snap, false, true);
    let get = |path: &str| -> serde_json::Value {
        let (status, body) = vm.call("GET", path, None);
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    };
    assert_eq!(
        get("/balloon"),
        serde_json::json!({"amount_mib": 8, "deflate_on_oom": true,
            "stats_polling_interval_s": 1, "free_page_hinting": false,
            "free_page_reporting": false, "actual_pages": 2048, "actual_mib": 8})
    );
    assert_eq!(get("/vm/config")["balloon"]["amount_mib"], 8);
    let stats = get("/balloon/statistics");
    assert_eq!(stats["total_memory"], MEM_MIB << 20, "saved: {stats}");
    let sent = stats["minor_faults"].as_u64().unwrap();
    let deadline = Instant::now() + LIMIT;
    while get("/balloon/statistics")["minor_faults"].as_u64() <= Some(sent) {
        assert!(
            Instant::now() < deadline,
            "no statistics update after the load"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    expect_204(&vm, "PATCH", "/balloon", r#"{"amount_mib": 24}"#, "inflate");
    vm.wait_for("balloon: at target 6144 pages", LIMIT);
    expect_204(&vm, "PATCH", "/balloon", r#"{"amount_mib": 0}"#, "deflate");
    let line = vm.wait_for("balloon: deflated", LIMIT);
    assert!(
        line.contains("deflated 6144 pages, 0 not zero"),
        "pages inflated after the load came back with the snapshot's bytes: {line}"
    );
    let action = r#"{"action_type": "SendCtrlAltDel"}"#;
    expect_204(&vm, "PUT", "/actions", action, "SendCtrlAltDel");
    vm.wait_for("DONE passed=", LIMIT);
    let console = vm.console();
    assert!(
        console.contains("PASS balloon") && !console.contains("FAIL"),
        "{console}"
    );
    assert_eq!(vm.wait(LIMIT), Some(0), "{}", vm.stderr());
}

/// A pmem device across a restore: the region is mapped again from the file at the same guest
/// address, so the restored guest reads the file as the host has it at restore time (here
/// rewritten after the snapshot), not as it was when the snapshot was taken; the guest's
/// `snapshot` check prints the file's first line whenever it changes. `GET /vm/config` shows
/// the device, and a file that no longer fills the saved region is refused in one line.
#[test]
fn a_restored_pmem_device_maps_the_file_again() {
    let dir = work_dir("pmem");
    let snap = Snap::in_dir(&dir, "pmem");
    let file = dir.join("pmem.img");
    let mut bytes = vec![0u8; 2 << 20];
    bytes[..12].copy_from_slice(b"PMEM-BEFORE\n");
    fs::write(&file, &bytes).unwrap();
    let mut vm = Running::start("snap-pmem", &[]);
    let pmem = (
        "/pmem/pm0".to_owned(),
        format!(
            r#"{{"id": "pm0", "path_on_host": {}, "read_only": true}}"#,
            json_path(&file)
        ),
    );
    boot(&vm, "", &[pmem], false);
    vm.wait_for("snap-pmem: PMEM-BEFORE", LIMIT);
    assert!(vm.console().contains("pmem yes"), "{}", vm.console());
    let before = pause(&vm);
    create(&vm, "Full", &snap);
    kill(&mut vm);

    // The file is the host's: what it holds at restore time is what the guest reads.
    bytes[..11].copy_from_slice(b"PMEM-AFTER\n");
    fs::write(&file, &bytes).unwrap();
    let mut vm = restore("snap-pmem-restored", &snap, false, true);
    let tick = next_tick_after(&vm, before, "after the load");
    vm.wait_for("snap-pmem: PMEM-AFTER", LIMIT);
    vm.wait_for(&format!("snap-tick {}", tick + 2), LIMIT);
    let (_, config) = vm.call("GET", "/vm/config", None);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["pmem"][0]["id"], "pm0", "{config}");
    assert_eq!(config["pmem"][0]["read_only"], true, "{config}");
    end_with_ctrl_alt_del(&mut vm);

    // A file grown past the saved region no longer fits where the guest expects it.
    fs::write(&file, vec![0u8; 3 << 20]).unwrap();
    let vm = Running::start("snap-pmem-grown", &[]);
    let message = expect_refused(
        &vm,
        "PUT",
        "/snapshot/load",
        &snap.load_body(false, true),
        "a grown pmem file",
        &["pmem"],
    );
    assert!(message.contains("snapshot's had 2097152"), "{message}");
}

/// Hot-plugged memory across a restore. The guest's `mem` check plugs the 256 MiB the host
/// requests (a 512 MiB region at 4 GiB, right after this guest's RAM and the 32-bit hole) and
/// writes a word to each page; its `snapshot` check then verifies the words and asks the device
/// for the blocks' state at every tick. The memory file grows by the region, after RAM (its
/// regions in order): the plugged part holds the guest's words, the rest is holes. A Diff
/// taken first (dirty pages tracked since boot, the hot-plug slots' KVM dirty logs included)
/// restores the same guest: it carries on with its plugged memory intact, and
/// `GET /hotplug/memory` shows what was plugged.
#[test]
fn hot_plugged_memory_survives_a_restore() {
    const REGION_MIB: u64 = 512;
    const PLUGGED_MIB: u64 = 256;
    let dir = work_dir("memory-hotplug");
    let full = Snap::in_dir(&dir, "full");
    let diff = Snap::in_dir(&dir, "diff");
    let mut vm = Running::start("snap-hotplug", &[]);
    let hotplug = format!(r#"{{"total_size_mib": {REGION_MIB}}}"#);
    expect_204(&vm, "PUT", "/hotplug/memory", &hotplug, "hot-plug memory");
    let source = format!(
        r#"{{"kernel_image_path": {}, "boot_args": "console=ttyS0 checks=mem,snapshot mem_keep=1"}}"#,
        json_path(test_guest())
    );
    expect_204(&vm, "PUT", "/boot-source", &source, "boot source");
    let machine =
        format!(r#"{{"vcpu_count": 2, "mem_size_mib": {MEM_MIB}, "track_dirty_pages": true}}"#);
    expect_204(&vm, "PUT", "/machine-config", &machine, "machine config");
    expect_204(
        &vm,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
        "InstanceStart",
    );
    vm.wait_for("mem: waiting for the host to request memory", LIMIT);
    let size = format!(r#"{{"requested_size_mib": {PLUGGED_MIB}}}"#);
    expect_204(
        &vm,
        "PATCH",
        "/hotplug/memory",
        &size,
        "PATCH /hotplug/memory",
    );
    vm.wait_for("PASS mem", LIMIT);
    vm.wait_for(&format!("hot-plugged {PLUGGED_MIB} MiB"), LIMIT);
    vm.wait_for("snap-tick 3", LIMIT);
    let before = pause(&vm);
    for (kind, snap) in [("Diff", &diff), ("Full", &full)] {
        expect_204(
            &vm,
            "PUT",
            "/snapshot/create",
            &snap.create_body(kind),
            kind,
        );
    }
    kill(&mut vm);

    let region_at = MEM_MIB << 20;
    for snap in [&full, &diff] {
        let file = fs::File::open(&snap.mem).unwrap();
        let len = file.metadata().unwrap().len();
        assert_eq!(len, (MEM_MIB + REGION_MIB) << 20, "{}", snap.mem.display());
        for page in [0, 1, 4095, (PLUGGED_MIB << 8) - 1] {
            let gpa = (1u64 << 32) + page * PAGE as u64;
            let mut word = [0u8; 8];
            file.read_exact_at(&mut word, region_at + page * PAGE as u64)
                .unwrap();
            assert_eq!(
                u64::from_le_bytes(word),
                gpa ^ 0x534b_4946_4600_0000,
                "{}: page {page} of the hot-plug region",
                snap.mem.display()
            );
        }
        let on_disk = file.metadata().unwrap().blocks() * 512;
        assert!(
            on_disk < (MEM_MIB + PLUGGED_MIB) << 20,
            "{}: {on_disk} bytes on disk: the unplugged part should be holes",
            snap.mem.display()
        );
    }

    let mut vm = restore("snap-hotplug-restored", &diff, false, true);
    let tick = next_tick_after(&vm, before, "after loading the Diff");
    vm.wait_for(&format!("snap-tick {}", tick + 3), LIMIT);
    let (_, status) = vm.call("GET", "/hotplug/memory", None);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(
        status,
        serde_json::json!({"total_size_mib": REGION_MIB, "slot_size_mib": 128,
            "block_size_mib": 2, "plugged_size_mib": PLUGGED_MIB,
            "requested_size_mib": PLUGGED_MIB})
    );
    let (_, config) = vm.call("GET", "/vm/config", None);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        config["memory-hotplug"]["total_size_mib"], REGION_MIB,
        "{config}"
    );
    end_with_ctrl_alt_del(&mut vm);
}

/// A VM started with `--enable-pci`: its snapshot holds the PCI functions (configuration
/// space, BARs, MSI-X table and vector choices), and a new process loading it (no flag: the
/// state says PCI) puts the bus back with the MSI routes and queue ioeventfds, so the guest's
/// disk keeps answering by MSI-X: ticks continue from the snapshot's, the disk marker reads
/// back every tick, and the check passes on Ctrl-Alt-Del.
#[test]
fn a_pci_vm_snapshot_loads_in_a_new_process_and_its_disk_goes_on() {
    let dir = work_dir("pci-full");
    let disk = dir.join("disk.img");
    disk_image(&disk);
    let mut vm = Running::start("snap-pci", &["--enable-pci"]);
    boot(&vm, "", &[drive(disk.to_str().unwrap())], false);
    vm.wait_for("snapshot: disk marker written at sector 8", LIMIT);
    vm.wait_for("snap-tick 5", LIMIT);
    let before = pause(&vm);
    let snap = Snap::in_dir(&dir, "pci");
    create(&vm, "Full", &snap);
    kill(&mut vm);
    assert_eq!(sector(&disk, MARKER_SECTOR), snapshot_marker(1));
    let mut vm = restore("snap-pci-restored", &snap, false, true);
    let tick = next_tick_after(&vm, before, "after loading the PCI VM");
    vm.wait_for(&format!("snap-tick {}", tick + 3), LIMIT);
    assert_no_second_boot(&vm);
    end_with_ctrl_alt_del(&mut vm);
}
