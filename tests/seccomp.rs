//! seccomp through the real path: every thread of a running Skiff is under a filter, a thread
//! that makes a call outside its filter ends Skiff with one line naming it, and the flags that
//! change the filters behave as documented.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::api::Running;
use common::{as_strs, run_args, run_skiff, test_guest};

const LIMIT: Duration = Duration::from_secs(60);

/// Each thread's name and its `Seccomp:` mode (0 none, 2 filter) from /proc; KVM's own kernel
/// workers that it attaches to the process (`kvm-nx-lpage-recovery`) are left out.
fn thread_modes(pid: u32) -> Vec<(String, u32)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let Ok(status) = std::fs::read_to_string(task.join("status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_owned())
                .unwrap()
        };
        let name = field("Name:");
        if !name.starts_with("kvm") {
            threads.push((name, field("Seccomp:").parse().unwrap()));
        }
    }
    threads.sort();
    threads
}

/// A running VM with two vCPUs, served through the API (so every kind of thread exists).
fn running_vm(name: &str, extra: &[&str]) -> Running {
    let vm = Running::start(name, extra);
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "checks=ctrlaltdel"}}"#,
        test_guest().display()
    );
    assert_eq!(vm.call("PUT", "/boot-source", Some(&boot)).0, 204);
    let machine = r#"{"vcpu_count": 2, "mem_size_mib": 64}"#;
    assert_eq!(vm.call("PUT", "/machine-config", Some(machine)).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(vm.call("PUT", "/actions", Some(start)).0, 204);
    vm.wait_for("tick 1", LIMIT);
    // The API still answers under its filter, and so does the main thread under its own.
    assert_eq!(vm.call("GET", "/machine-config", None).0, 200);
    let pause = r#"{"state": "Paused"}"#;
    assert_eq!(vm.call("PATCH", "/vm", Some(pause)).0, 204);
    let resume = r#"{"state": "Resumed"}"#;
    assert_eq!(vm.call("PATCH", "/vm", Some(resume)).0, 204);
    vm
}

#[test]
fn every_thread_runs_under_its_filter() {
    let mut vm = running_vm("seccomp-on", &[]);
    let modes = thread_modes(vm.child.id());
    let names: Vec<&str> = modes.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "skiff",
            "skiff-api",
            "skiff-events",
            "skiff-vcpu-0",
            "skiff-vcpu-1"
        ],
        "{modes:?}"
    );
    for (name, mode) in &modes {
        assert_eq!(*mode, 2, "{name} runs without a filter: {modes:?}");
    }
    let ctrl_alt_del = r#"{"action_type": "SendCtrlAltDel"}"#;
    assert_eq!(vm.call("PUT", "/actions", Some(ctrl_alt_del)).0, 204);
    assert_eq!(vm.wait(LIMIT), Some(0), "{}", vm.stderr());
}

#[test]
fn no_seccomp_runs_every_thread_unfiltered() {
    let mut vm = running_vm("seccomp-off", &["--no-seccomp"]);
    for (name, mode) in thread_modes(vm.child.id()) {
        assert_eq!(mode, 0, "{name}");
    }
    let _ = vm.child.kill();
    let _ = vm.wait(LIMIT);
}

/// A custom filter file whose vCPU filter lacks ioctl: the first KVM_RUN is a forbidden call,
/// and Skiff ends at once with Firecracker's status for it and a line naming thread and call
/// (the report needs write and exit_group, which the file allows).
#[test]
fn a_forbidden_call_ends_skiff_with_one_line() {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("seccomp-no-ioctl.json");
    let filter = r#"{"vcpu": {"mismatch_action": "trap", "match_action": "allow",
        "filter": [{"syscall": "write"}, {"syscall": "futex"}, {"syscall": "exit_group"}]}}"#;
    std::fs::write(&path, filter).unwrap();
    let args = run_args(test_guest(), None, "checks=e820", 1, 64);
    let mut args = as_strs(&args);
    let file = path.to_string_lossy().into_owned();
    args.splice(0..0, ["--seccomp-filter", &file]);
    let out = run_skiff(&args, LIMIT, None);
    assert_eq!(out.code, Some(148), "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!(
            "skiff: error: seccomp: the vcpu thread made system call {}, which its filter forbids",
            libc::SYS_ioctl
        )),
        "{}",
        out.stderr
    );
    assert!(
        !out.stdout.contains("PASS e820"),
        "the guest ran: {}",
        out.stdout
    );
}

#[test]
fn a_bad_filter_file_is_one_error_before_anything_starts() {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("seccomp-bad.json");
    std::fs::write(&path, r#"{"vcpu": {"mismatch_action": "explode"}}"#).unwrap();
    let file = path.to_string_lossy().into_owned();
    for args in [
        vec![
            "--seccomp-filter",
            &file,
            "--no-api",
            "--config-file",
            "/nonexistent",
        ],
        vec![
            "--seccomp-filter",
            "/nonexistent.json",
            "--api-sock",
            "/tmp/never.sock",
        ],
    ] {
        let out = run_skiff(&args, LIMIT, None);
        assert_eq!(out.code, Some(1), "{args:?}: {}", out.stderr);
        let errors = out.error_lines();
        assert_eq!(errors.len(), 1, "{args:?}: {}", out.stderr);
        assert!(errors[0].contains("seccomp filter file"), "{}", errors[0]);
    }
    let out = run_skiff(&["--no-seccomp", "--seccomp-filter", &file], LIMIT, None);
    assert_eq!(out.code, Some(2), "the two flags conflict: {}", out.stderr);
}
