//! The Firecracker API over its real Unix socket: a VM configured, booted, paused, resumed and
//! sent Ctrl-Alt-Del entirely through it; bad requests of every kind; the config file route.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::api::{call, fault, send_raw, Running};
use common::test_guest;

const LIMIT: Duration = Duration::from_secs(60);

fn tmp(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name)
}

fn boot_source(cmdline: &str) -> String {
    format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 {cmdline}"}}"#,
        test_guest().display()
    )
}

fn ticks(lines: &[String]) -> usize {
    lines.iter().filter(|l| l.starts_with("tick ")).count()
}

#[test]
fn boot_pause_resume_and_ctrl_alt_del_through_the_api() {
    let mut vm = Running::start("api-boot", &[]);
    let metrics = tmp("api-boot.metrics");
    let _ = std::fs::remove_file(&metrics);
    assert_eq!(vm.call("GET", "/", None).0, 200);
    let (status, body) = vm.call("GET", "/", None);
    assert_eq!(status, 200);
    assert!(body.contains(r#""state":"Not started""#), "{body}");
    for (method, path, body) in [
        ("PUT", "/boot-source", boot_source("checks=ctrlaltdel")),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 256}"#.to_owned(),
        ),
        (
            "PUT",
            "/metrics",
            format!(r#"{{"metrics_path": "{}"}}"#, metrics.display()),
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#.to_owned(),
        ),
    ] {
        let (status, answer) = vm.call(method, path, Some(&body));
        assert_eq!(status, 204, "{method} {path}: {answer}");
    }
    vm.wait_for("keys: waiting for Ctrl-Alt-Del", LIMIT);
    vm.wait_for("tick 2", LIMIT);
    assert!(vm.call("GET", "/", None).1.contains(r#""state":"Running""#));

    // Paused: no ticks. Lines already in the pipe may still arrive, so drain first.
    assert_eq!(
        vm.call("PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0,
        204
    );
    assert!(vm.call("GET", "/", None).1.contains(r#""state":"Paused""#));
    vm.lines_within(Duration::from_millis(300));
    let while_paused = vm.lines_within(Duration::from_secs(1));
    assert_eq!(
        ticks(&while_paused),
        0,
        "ticks while paused: {while_paused:?}"
    );
    assert_eq!(
        vm.call("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0,
        204
    );
    vm.wait_for("tick", Duration::from_secs(10));

    // Post-boot rules.
    let (status, body) = vm.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(status, 400);
    assert!(
        fault(&body).contains("after starting the microVM"),
        "{body}"
    );
    let (status, body) = vm.call("PUT", "/boot-source", Some(&boot_source("")));
    assert_eq!(
        (status, fault(&body).contains("after starting")),
        (400, true)
    );
    assert_eq!(
        vm.call(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "FlushMetrics"}"#)
        )
        .0,
        204
    );
    let (status, config) = vm.call("GET", "/vm/config", None);
    assert_eq!(status, 200);
    assert!(config.contains(r#""vcpu_count":2"#) && config.contains(r#""mem_size_mib":256"#));

    // Ctrl-Alt-Del reaches the guest's i8042 driver, which then powers off.
    assert_eq!(
        vm.call(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "SendCtrlAltDel"}"#)
        )
        .0,
        204
    );
    vm.wait_for("PASS ctrlaltdel", LIMIT);
    assert_eq!(vm.wait(LIMIT), Some(0), "{}", vm.stderr());
    assert!(
        vm.console().contains("keys: 14 11 e0 71"),
        "{}",
        vm.console()
    );
    assert!(!vm.sock.exists(), "the socket is removed at exit");

    // Metrics, in Firecracker's document: a line at boot, one per flush and one at exit, each
    // counting since the line before (vCPU exits, API requests by route).
    let text = std::fs::read_to_string(&metrics).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    let (boot, flush, exit) = (&lines[0], &lines[1], &lines[2]);
    let put = |line: &serde_json::Value, counter: &str| line["put_api_requests"][counter].clone();
    assert_eq!(put(boot, "boot_source_count"), 1, "{boot}");
    assert_eq!(put(boot, "actions_count"), 1, "{boot}");
    assert_eq!(boot["get_api_requests"]["instance_info_count"], 2, "{boot}");
    // After boot: a refused PUT /boot-source (counted, not a body that failed to parse), a
    // refused InstanceStart and the FlushMetrics.
    assert_eq!(put(flush, "boot_source_count"), 1, "{flush}");
    assert_eq!(put(flush, "boot_source_fails"), 0, "{flush}");
    assert_eq!(put(flush, "actions_count"), 2, "{flush}");
    assert!(
        flush["vcpu"]["exit_io_out"].as_u64().unwrap() > 0,
        "{flush}"
    );
    assert_eq!(put(exit, "boot_source_count"), 0, "{exit}");
    assert_eq!(put(exit, "actions_count"), 1, "{exit}");
    assert!(exit["vcpu"]["exit_io_out"].as_u64().unwrap() > 0, "{exit}");
}

#[test]
fn bad_requests_get_clear_faults_and_leave_skiff_up() {
    let vm = Running::start("api-bad", &[]);
    let huge = format!(r#"{{"kernel_image_path": "{}"}}"#, "x".repeat(60_000));
    let cases: Vec<(&str, &str, Option<&str>, &str)> = vec![
        (
            "PUT",
            "/boot-source",
            Some("{not json"),
            "key must be a string",
        ),
        (
            "PUT",
            "/boot-source",
            Some(r#"{"kernel_image_path": 7}"#),
            "invalid type",
        ),
        (
            "PUT",
            "/boot-source",
            Some("{}"),
            "missing field `kernel_image_path`",
        ),
        (
            "PUT",
            "/boot-source",
            Some(r#"{"kernel_image_path": "/k", "x": 1}"#),
            "unknown field `x`",
        ),
        ("PUT", "/boot-source", None, "Empty request body"),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": -1, "mem_size_mib": 128}"#),
            "invalid value",
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 99999999999999999999}"#),
            "invalid type",
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 64, "mem_size_mib": 128}"#),
            "The vCPU number is invalid!",
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1}"#),
            "missing field `mem_size_mib`",
        ),
        (
            "PUT",
            "/drives/d",
            Some(r#"{"drive_id": "d", "is_root_device": false}"#),
            "path_on_host is required",
        ),
        (
            "PUT",
            "/network-interfaces/e",
            Some(r#"{"iface_id": "e", "host_dev_name": "t", "guest_mac": "nope"}"#),
            "not an address like",
        ),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type": "Reboot"}"#),
            "unknown variant",
        ),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#),
            "without kernel configuration",
        ),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type": "SendCtrlAltDel"}"#),
            "before starting",
        ),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type": "FlushMetrics"}"#),
            "The requested operation is not supported before starting the microVM.",
        ),
        (
            "PATCH",
            "/vm",
            Some(r#"{"state": "Paused"}"#),
            "before starting",
        ),
        (
            "PATCH",
            "/drives/d",
            Some(r#"{"drive_id": "d"}"#),
            "before starting",
        ),
        (
            "PUT",
            "/vsock",
            Some(r#"{"guest_cid": 2, "uds_path": "/tmp/v.sock"}"#),
            "guest_cid 2 is reserved",
        ),
        (
            "GET",
            "/nowhere",
            None,
            "Invalid request method and/or path: GET /nowhere.",
        ),
        (
            "POST",
            "/actions",
            Some("{}"),
            "Invalid request method and/or path",
        ),
        (
            "PUT",
            "/boot-source",
            Some(&huge),
            "larger than the limit of 51200",
        ),
        (
            "PUT",
            "/metrics",
            Some(r#"{"metrics_path": "/nonexistent/dir/m"}"#),
            "cannot open metrics file",
        ),
    ];
    for (method, path, body, want) in cases {
        let (status, answer) = vm.call(method, path, body);
        assert_eq!(status, 400, "{method} {path} {body:?}: {answer}");
        let message = fault(&answer);
        assert!(
            message.contains(want),
            "{method} {path}: {message:?} lacks {want:?}"
        );
    }
    // A kernel that does not exist: refused when put, with the reason (Firecracker's text
    // first); InstanceStart without a kernel is refused too.
    let missing = r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#;
    let (status, answer) = vm.call("PUT", "/boot-source", Some(missing));
    assert_eq!(status, 400);
    assert!(
        fault(&answer).contains("cannot read kernel /nonexistent/vmlinux"),
        "{answer}"
    );
    let (status, _) = vm.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(status, 400);

    // A client that disconnects mid-request, and one that stalls mid-body, do not stop others.
    {
        let mut s = UnixStream::connect(&vm.sock).unwrap();
        s.write_all(b"PUT /boot-source HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"kern")
            .unwrap();
    }
    let mut stalled = UnixStream::connect(&vm.sock).unwrap();
    stalled
        .write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        .unwrap();
    let t = Instant::now();
    assert_eq!(vm.call("GET", "/", None).0, 200);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "a stalled client held the API"
    );
    drop(stalled);
    let (status, _) = send_raw(&vm.sock, b"garbage\r\n\r\n");
    assert_eq!(status, 400);

    // Nothing above changed the configuration, and Skiff is still serving.
    let (status, config) = vm.call("GET", "/machine-config", None);
    assert_eq!(status, 200);
    assert!(config.contains(r#""vcpu_count":1"#) && config.contains(r#""mem_size_mib":128"#));
}

#[test]
fn a_drive_that_is_a_fifo_is_refused_and_the_api_stays_up() {
    // Opening a FIFO read-only used to wait for a writer: InstanceStart never answered, and
    // since the controller carries out every request, nothing else did either. The drive is
    // checked when it is put, as Firecracker does.
    let vm = Running::start("api-fifo-drive", &[]);
    let pipe = tmp("api-drive.fifo");
    let _ = std::fs::remove_file(&pipe);
    let made = std::process::Command::new("mkfifo")
        .arg(&pipe)
        .status()
        .unwrap();
    assert!(made.success());
    assert_eq!(
        vm.call("PUT", "/boot-source", Some(&boot_source(""))).0,
        204
    );
    let drive = format!(
        r#"{{"drive_id": "fifo", "path_on_host": "{}", "is_root_device": false, "is_read_only": true}}"#,
        pipe.display()
    );
    let t = Instant::now();
    let (status, answer) = vm.call("PUT", "/drives/fifo", Some(&drive));
    assert_eq!(status, 400, "{answer}");
    assert!(
        fault(&answer).contains(&format!(
            "disk image {} is not a regular file or block device",
            pipe.display()
        )),
        "{answer}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let (status, body) = vm.call("GET", "/", None);
    assert_eq!(status, 200);
    assert!(body.contains(r#""state":"Not started""#), "{body}");
}

/// Skiff booting the test guest with `boot_args` from a config file named after `name`, with
/// no API, logging at info level, and `flags` added.
fn boot_from_config_file(name: &str, boot_args: &str, vcpus: u32, flags: &[&str]) -> Running {
    let file = tmp(&format!("{name}.json"));
    std::fs::write(
        &file,
        format!(
            r#"{{"boot-source": {}, "machine-config": {{"vcpu_count": {vcpus}, "mem_size_mib": 128}}}}"#,
            boot_source(boot_args)
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(common::skiff_bin());
    cmd.arg("--config-file")
        .arg(&file)
        .args(["--no-api", "--level", "Info"])
        .args(flags);
    Running::spawn(cmd, PathBuf::new())
}

#[test]
fn config_file_boots_without_an_api() {
    let mut vm = boot_from_config_file(
        "api-config",
        "checks=progress,smp cpus=2 boot_done=3",
        2,
        &["--boot-timer"],
    );
    assert_eq!(vm.wait(LIMIT), Some(0), "{}", vm.stderr());
    // The guest writes the boot-complete code three times: the boot completed once.
    assert_eq!(
        vm.stderr().matches("Guest-boot-time = ").count(),
        1,
        "{}",
        vm.stderr()
    );
    // With the process's CPU time, as Firecracker's boot timer gives it.
    assert!(
        vm.stderr().contains(" CPU us ") && vm.stderr().contains(" CPU ms"),
        "{}",
        vm.stderr()
    );
    assert!(vm.console().contains("PASS smp"), "{}", vm.console());
    assert!(
        vm.console().contains("DONE passed=2 failed=0"),
        "{}",
        vm.console()
    );
}

/// The config file's `"enable-pci": true` is `--enable-pci`: the devices go on PCI.
#[test]
fn config_file_enable_pci_puts_virtio_on_pci() {
    let file = tmp("api-pci.json");
    std::fs::write(
        &file,
        format!(
            r#"{{"boot-source": {}, "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}}, "enable-pci": true}}"#,
            boot_source("checks=progress")
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(common::skiff_bin());
    cmd.arg("--config-file")
        .arg(&file)
        .args(["--no-api", "--level", "Info"]);
    let mut vm = Running::spawn(cmd, PathBuf::new());
    assert_eq!(vm.wait(LIMIT), Some(0), "{}", vm.stderr());
    assert!(
        vm.stderr()
            .contains("--enable-pci: virtio devices on virtio-pci"),
        "{}",
        vm.stderr()
    );
}

#[test]
fn config_file_and_flag_errors_are_one_line() {
    let bad_json = tmp("api-bad.json");
    std::fs::write(&bad_json, "{\"boot-source\": ").unwrap();
    let vsock = tmp("api-vsock.json");
    std::fs::write(
        &vsock,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": {}}}, "vsock": {{"guest_cid": 1, "uds_path": "/v"}}}}"#,
            serde_json::to_string(common::test_guest().to_str().unwrap()).unwrap()
        ),
    )
    .unwrap();
    let bad_pci = tmp("api-bad-pci.json");
    std::fs::write(
        &bad_pci,
        format!(
            r#"{{"boot-source": {}, "enable-pci": "yes"}}"#,
            boot_source("")
        ),
    )
    .unwrap();
    let busy = tmp("api-busy.sock");
    std::fs::write(&busy, "not a socket").unwrap();
    for (args, want) in [
        (
            vec!["--config-file", bad_pci.to_str().unwrap(), "--no-api"],
            "expected a boolean".to_owned(),
        ),
        (vec!["--no-api"], "--no-api needs --config-file".to_owned()),
        (
            vec!["--config-file", "/nonexistent.json", "--no-api"],
            "cannot read config file /nonexistent.json".to_owned(),
        ),
        (
            vec!["--config-file", bad_json.to_str().unwrap(), "--no-api"],
            format!("config file {}: EOF while parsing", bad_json.display()),
        ),
        (
            vec!["--config-file", vsock.to_str().unwrap(), "--no-api"],
            "guest_cid 1 is reserved".to_owned(),
        ),
        (
            vec!["--api-sock", busy.to_str().unwrap()],
            format!(
                "Failed to open the API socket at: {}. Check that it is not already used",
                busy.display()
            ),
        ),
    ] {
        let out = common::run_skiff(&args, Duration::from_secs(20), None);
        assert_eq!(out.code, Some(1), "{args:?}: {}", out.stderr);
        let errors = out.error_lines();
        assert_eq!(errors.len(), 1, "{args:?}: {}", out.stderr);
        assert!(errors[0].contains(&want), "{args:?}: {}", errors[0]);
    }
    // The file that was in the way is still there, untouched; no temporary name is left.
    assert_eq!(std::fs::read_to_string(&busy).unwrap(), "not a socket");
    assert_eq!(leftovers(&busy), Vec::<String>::new());
}

/// Entries beside `sock` that start with its temporary name's prefix (`.NAME.`).
fn leftovers(sock: &Path) -> Vec<String> {
    let prefix = format!(".{}.", sock.file_name().unwrap().to_str().unwrap());
    std::fs::read_dir(sock.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// Removes what a failed earlier run may have left beside `sock`.
fn clean_leftovers(sock: &Path) {
    let _ = std::fs::remove_file(sock);
    for name in leftovers(sock) {
        let p = sock.with_file_name(name);
        let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
    }
}

#[test]
fn api_socket_is_private_whatever_the_umask() {
    let sock = tmp("api-umask.sock");
    clean_leftovers(&sock);
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(r#"umask 0 && exec "$0" --api-sock "$1""#)
        .arg(common::skiff_bin())
        .arg(&sock);
    let vm = Running::spawn(cmd, sock.clone());
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < LIMIT, "no API socket: {}", vm.stderr());
        std::thread::sleep(Duration::from_millis(2));
    }
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o600,
        "{:o}",
        meta.permissions().mode()
    );
    assert_eq!(vm.call("GET", "/", None).0, 200);
    assert_eq!(leftovers(&sock), Vec::<String>::new());
}

/// Starts `skiff --api-sock sock`, with stdio out of the way.
fn spawn_api(sock: &Path) -> common::KillOnDrop {
    let child = std::process::Command::new(common::skiff_bin())
        .arg("--api-sock")
        .arg(sock)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    common::KillOnDrop(child)
}

fn sigterm(child: &common::KillOnDrop) {
    let pid = i32::try_from(child.0.id()).unwrap();
    // SAFETY: kill(2) takes no pointers; the child is not reaped yet, so `pid` is still ours.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
}

#[test]
fn an_early_termination_signal_leaves_no_api_socket() {
    // Skiff used to install its signal handlers only once it began serving calls, some
    // milliseconds after the socket appeared: a SIGTERM in between killed it with the socket
    // left behind, and the next start on that path failed.
    let sock = tmp("api-early-signal.sock");
    let check = |when: &str, mut skiff: common::KillOnDrop| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while skiff.0.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "{when}: SIGTERM did not end Skiff"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            sock.symlink_metadata().is_err(),
            "{when}: the API socket was left behind"
        );
        assert_eq!(leftovers(&sock), Vec::<String>::new(), "{when}");
    };
    for delay_ms in 0..=30 {
        clean_leftovers(&sock);
        let skiff = spawn_api(&sock);
        std::thread::sleep(Duration::from_millis(delay_ms));
        sigterm(&skiff);
        check(&format!("SIGTERM after {delay_ms} ms"), skiff);
    }
    for _ in 0..10 {
        clean_leftovers(&sock);
        let skiff = spawn_api(&sock);
        let start = Instant::now();
        while sock.symlink_metadata().is_err() {
            assert!(start.elapsed() < LIMIT, "no API socket");
            std::hint::spin_loop();
        }
        sigterm(&skiff);
        check("SIGTERM as the socket appears", skiff);
    }
    // A fresh start on the same path works.
    let _skiff = spawn_api(&sock);
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < LIMIT, "no API socket on the second start");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(call(&sock, "GET", "/", None).0, 200);
}

#[test]
fn connections_past_the_cap_get_503_and_the_others_keep_working() {
    // Skiff serves 10 connections at once, as Firecracker; it used to accept without limit,
    // so a client could take every file descriptor it had.
    const CAP: usize = 10;
    let vm = Running::start("api-cap", &[]);
    let connect = || {
        let s = UnixStream::connect(&vm.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    };
    // Each answered once, so each has surely been accepted.
    let mut held: Vec<UnixStream> = (0..CAP)
        .map(|_| {
            let mut s = connect();
            assert_eq!(common::api::call_on(&mut s, "GET", "/").0, 200);
            s
        })
        .collect();
    let mut extra = connect();
    let mut answer = String::new();
    extra
        .read_to_string(&mut answer)
        .expect("the connection past the cap is answered and closed");
    let (status, body) = common::api::parse_answer(&answer);
    assert_eq!(status, 503, "{answer}");
    assert_eq!(fault(&body), "Too many open connections");
    // The connections already open are still served.
    for s in &mut held {
        assert_eq!(common::api::call_on(s, "GET", "/version").0, 200);
    }
    // A client that leaves frees its place for the next.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, answer) = vm.call("GET", "/", None);
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{answer}");
        assert!(Instant::now() < deadline, "the freed place was not reused");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn running_out_of_file_descriptors_neither_floods_the_log_nor_stops_the_api() {
    // At the fd limit accept() fails with EMFILE for as long as a connection waits; Skiff
    // used to log a warning for each try, about 90 a second.
    let vm = Running::start("api-emfile", &[]);
    assert_eq!(vm.call("GET", "/", None).0, 200);
    let pid = i32::try_from(vm.child.id()).unwrap();
    // Lower Skiff's RLIMIT_NOFILE so that exactly two more descriptors fit.
    let used: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let mut limit = 0;
    let mut free = 0;
    while free < 2 {
        if !used.contains(&limit) {
            free += 1;
        }
        limit += 1;
    }
    let rlim = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: `rlim` is a valid rlimit read during the call; the old-limit pointer may be null.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &rlim, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let held: Vec<UnixStream> = (0..2)
        .map(|_| {
            let mut s = UnixStream::connect(&vm.sock).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            assert_eq!(common::api::call_on(&mut s, "GET", "/").0, 200);
            s
        })
        .collect();
    // The kernel queues this one, but Skiff cannot accept it while the others are open.
    let mut waiting = UnixStream::connect(&vm.sock).unwrap();
    waiting
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let lines = vm.stderr().lines().count();
    assert!(
        (1..=2).contains(&lines),
        "{lines} log lines in 2 s of EMFILE:\n{}",
        vm.stderr()
    );
    assert!(vm.stderr().contains("accept failed"), "{}", vm.stderr());
    drop(held);
    waiting
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = String::new();
    waiting
        .read_to_string(&mut answer)
        .expect("the waiting client is served once descriptors are free");
    assert_eq!(common::api::parse_answer(&answer).0, 200, "{answer}");
    assert!(vm.stderr().lines().count() <= 2, "{}", vm.stderr());
}

/// Whether strace can trace a child here (it is missing, or ptrace is forbidden, in some
/// containers).
fn strace_works() -> bool {
    std::process::Command::new("strace")
        .args(["-o", "/dev/null", "true"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn an_api_socket_path_taken_during_startup_is_left_alone() {
    // Skiff checks that the path is free, binds under a temporary name, then renames. A file
    // created at the path in between must make the start fail, never be replaced. strace
    // holds bind() for half a second to open that window wide.
    if !strace_works() {
        eprintln!("skipped: strace cannot trace processes here");
        return;
    }
    let sock = tmp("api-race.sock");
    clean_leftovers(&sock);
    let mut cmd = std::process::Command::new("strace");
    cmd.args(["-o", "/dev/null", "-e", "trace=bind"])
        .args(["-e", "inject=bind:delay_exit=500000", "--"])
        .arg(common::skiff_bin())
        .arg("--api-sock")
        .arg(&sock);
    let mut vm = Running::spawn(cmd, sock.clone());
    let start = Instant::now();
    let temporary = loop {
        if let Some(name) = leftovers(&sock).pop() {
            break name;
        }
        assert!(
            start.elapsed() < LIMIT,
            "no temporary name: {}",
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    // The temporary name carries Skiff's pid (strace is the child we know).
    let pid: i32 = temporary
        .trim_start_matches(".api-race.sock.")
        .split(['.', '-'])
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {temporary}"));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&sock)
        .and_then(|mut f| f.write_all(b"precious"))
        .expect("the path is still free while bind() is held");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut status = None;
    while status.is_none() && Instant::now() < deadline {
        status = vm.child.try_wait().unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    if status.is_none() {
        // Still serving on the path it took over. strace has not reaped it, so the pid is
        // still this Skiff's.
        // SAFETY: kill(2) takes no pointers; `pid` names our own, not yet reaped, grandchild.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let kept = std::fs::read(&sock);
    assert!(
        status.is_some(),
        "Skiff kept running; the path now holds {kept:?}"
    );
    assert_eq!(kept.unwrap(), b"precious");
    assert_eq!(status.unwrap().code(), Some(1), "{}", vm.stderr());
    assert!(
        vm.stderr().contains(&format!(
            "Failed to open the API socket at: {}. Check that it is not already used",
            sock.display()
        )),
        "{}",
        vm.stderr()
    );
    assert_eq!(leftovers(&sock), Vec::<String>::new());
}

#[test]
fn a_second_client_is_served_while_the_vm_runs() {
    // The API answers quickly even while the guest keeps a vCPU busy.
    let vm = Running::start("api-busy-guest", &[]);
    assert_eq!(
        vm.call(
            "PUT",
            "/boot-source",
            Some(&boot_source("checks=ctrlaltdel"))
        )
        .0,
        204
    );
    assert_eq!(
        vm.call(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#)
        )
        .0,
        204
    );
    vm.wait_for("tick 1", LIMIT);
    // Logger and metrics are set before boot, as in Firecracker (the running VM's main thread
    // may open no file under its seccomp filter).
    for (path, body) in [
        ("/logger", r#"{"log_path": "/tmp/skiff-after-boot.log"}"#),
        (
            "/metrics",
            r#"{"metrics_path": "/tmp/skiff-after-boot.metrics"}"#,
        ),
    ] {
        let (status, answer) = vm.call("PUT", path, Some(body));
        assert_eq!(status, 400, "PUT {path} after boot: {answer}");
        assert!(
            fault(&answer).contains("not supported after starting"),
            "{answer}"
        );
    }
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(call(&vm.sock, "GET", "/machine-config", None).0, 200);
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}

#[test]
fn every_documented_route_is_served_as_documented() {
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::root().join("resources/api/openapi.json")).unwrap(),
    )
    .unwrap();
    let vm = Running::start("api-doc", &[]);
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 13);
    for (path, ops) in paths {
        let concrete =
            (path.replace("{drive_id}", "d").replace("{iface_id}", "e")).replace("{id}", "p");
        for method in ["get", "put", "patch", "post", "delete"] {
            let upper = method.to_uppercase();
            let body = (method == "put" || method == "patch").then_some("{}");
            let (status, answer) = vm.call(&upper, &concrete, body);
            let routed = !answer.contains("Invalid request method and/or path");
            match ops.get(method) {
                Some(op) => {
                    assert!(
                        routed,
                        "{upper} {path} is documented but not routed: {answer}"
                    );
                    let documented = op["responses"].as_object().unwrap();
                    assert!(
                        documented.contains_key(&status.to_string())
                            || (status >= 400 && documented.contains_key("default")),
                        "{upper} {path}: status {status} is not documented ({answer})"
                    );
                }
                // Endpoints of later work refuse every method alike.
                None => assert!(
                    !routed || answer.contains("not supported by Skiff yet"),
                    "{upper} {path} is served but not documented"
                ),
            }
        }
    }
}

/// Firecracker's logging and PCI start flags, which clients pass on every start, are taken:
/// --enable-pci putting virtio on PCI, --show-log-origin with each line's
/// source, --module keeping only that module's lines. Each made Skiff exit 2 before.
#[test]
fn firecracker_start_flags_are_taken() {
    let run = |extra: &[&str]| {
        let mut vm = boot_from_config_file("api-fc-flags", "checks=progress", 1, extra);
        assert_eq!(vm.wait(LIMIT), Some(0), "{extra:?}: {}", vm.stderr());
        vm.stderr()
    };
    let log = run(&["--enable-pci", "--show-level", "--show-log-origin"]);
    assert!(
        log.contains(
            "--enable-pci: virtio devices on virtio-pci (bus 0, ECAM at 0xe0000000, MSI-X)"
        ),
        "{log}"
    );
    // Firecracker's line format: `<UTC time> [<id>:<thread>:<level>:<file>:<line>] message`,
    // and its key lines.
    assert!(
        log.lines()
            .any(|l| l.contains(":INFO:src/devices/legacy/progress.rs:")),
        "no line with its origin: {log}"
    );
    let first = log
        .lines()
        .find(|l| l.contains("Running Firecracker v1.16.1"))
        .unwrap_or_else(|| panic!("{log}"));
    let (time, rest) = first.split_once(' ').unwrap();
    assert!(
        time.len() == 29 && time.as_bytes()[10] == b'T' && time.as_bytes()[19] == b'.',
        "{first}"
    );
    assert!(
        rest.starts_with("[anonymous-instance:main:INFO:"),
        "{first}"
    );
    for key in [
        "Kernel loaded using PVH boot protocol",
        "Firecracker exiting successfully. exit_code=0",
    ] {
        assert!(log.contains(key), "no {key:?} in\n{log}");
    }
    let only_vmm = run(&["--module", "skiff::vmm"]);
    assert!(!only_vmm.contains("boot progress"), "{only_vmm}");
}

/// `PUT /serial`: the console's output goes to the file given, and its rate limiter lets a
/// bucket's worth through and drops the rest, counted in the metrics (`uart`). A named pipe
/// nobody reads is refused at InstanceStart in one line, and Skiff stays up.
#[test]
fn put_serial_sends_the_console_to_a_file_at_the_rate_given() {
    let out = tmp("serial-out.txt");
    let metrics = tmp("serial-metrics.json");
    let _ = std::fs::remove_file(&metrics);
    let vm = Running::start("api-serial", &[]);
    let body = format!(
        r#"{{"serial_out_path": "{}", "rate_limiter": {{"size": 300, "refill_time": 3600000}}}}"#,
        out.display()
    );
    assert_eq!(vm.call("PUT", "/serial", Some(&body)).0, 204);
    let body = format!(r#"{{"metrics_path": "{}"}}"#, metrics.display());
    assert_eq!(vm.call("PUT", "/metrics", Some(&body)).0, 204);
    // About 1 KB of console output over 5 s: 100 ticks of 9 bytes and the banner.
    let source = boot_source("checks=ticks ticks_max=100");
    assert_eq!(vm.call("PUT", "/boot-source", Some(&source)).0, 204);
    let (_, config) = vm.call("GET", "/vm/config", None);
    assert!(config.contains(r#""serial":{"#), "{config}");
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(vm.call("PUT", "/actions", Some(start)).0, 204);
    // The guest ticks for 5 s, then resets; its last lines were dropped, so wait on the file's
    // owner to end rather than on the console.
    let deadline = Instant::now() + LIMIT;
    loop {
        let flushed = vm.call(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "FlushMetrics"}"#),
        );
        let total = common::metrics_total(&metrics);
        let written = total["uart"]["write_count"].as_u64().unwrap_or(0);
        if written > 600 || flushed.0 != 204 {
            let dropped = total["uart"]["rate_limiter_dropped_bytes"]
                .as_u64()
                .unwrap();
            let text = std::fs::read(&out).unwrap();
            assert!(
                text.len() <= 300,
                "{} bytes through a 300-byte bucket",
                text.len()
            );
            assert!(text.starts_with(b"skiff-testguest: pvh boot"), "{text:?}");
            assert_eq!(text.len() as u64 + dropped, written, "{total}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest wrote only {written} bytes"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A named pipe without a reader.
    let fifo = tmp("serial-fifo");
    let _ = std::fs::remove_file(&fifo);
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path alive across the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let vm = Running::start("api-serial-fifo", &[]);
    let body = format!(r#"{{"serial_out_path": "{}"}}"#, fifo.display());
    assert_eq!(vm.call("PUT", "/serial", Some(&body)).0, 204);
    assert_eq!(vm.call("PUT", "/boot-source", Some(&source)).0, 204);
    let (status, answer) = vm.call("PUT", "/actions", Some(start));
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer.contains("serial-fifo") && !answer.contains('\n'),
        "{answer}"
    );
    assert_eq!(vm.call("GET", "/", None).0, 200);
    let _ = std::fs::remove_file(&fifo);
}

/// Checked when put, as Firecracker checks them: a kernel or initrd that cannot be opened, a
/// drive image that cannot be opened, a guest MAC another interface has (Firecracker's text);
/// a multicast-looking MAC and a drive id longer than virtio-blk's 20-byte serial are taken.
#[test]
fn configuration_is_checked_when_put_as_firecracker_does() {
    let vm = Running::start("api-put-checks", &[]);
    let missing = tmp("no-such-kernel");
    let body = format!(r#"{{"kernel_image_path": "{}"}}"#, missing.display());
    let (status, answer) = vm.call("PUT", "/boot-source", Some(&body));
    assert_eq!(status, 400, "{answer}");
    assert!(
        fault(&answer).starts_with("The kernel file cannot be opened:"),
        "{answer}"
    );
    let body = format!(
        r#"{{"kernel_image_path": "{}", "initrd_path": "{}"}}"#,
        test_guest().display(),
        missing.display()
    );
    let (status, answer) = vm.call("PUT", "/boot-source", Some(&body));
    assert_eq!(status, 400, "{answer}");
    assert!(
        fault(&answer).starts_with("The initrd file cannot be opened"),
        "{answer}"
    );
    let body = format!(
        r#"{{"drive_id": "d", "path_on_host": "{}", "is_root_device": false}}"#,
        missing.display()
    );
    let (status, answer) = vm.call("PUT", "/drives/d", Some(&body));
    assert_eq!(status, 400, "{answer}");
    assert!(
        fault(&answer).starts_with("Unable to create the block device:"),
        "{answer}"
    );
    let image = tmp("put-checks.img");
    std::fs::write(&image, vec![0u8; 4096]).unwrap();
    let long = "a-drive-id-longer-than-twenty-bytes";
    let body = format!(
        r#"{{"drive_id": "{long}", "path_on_host": "{}", "is_root_device": false}}"#,
        image.display()
    );
    assert_eq!(
        vm.call("PUT", &format!("/drives/{long}"), Some(&body)).0,
        204
    );

    let nic = |id: &str, tap: &str, mac: &str| {
        let body =
            format!(r#"{{"iface_id": "{id}", "host_dev_name": "{tap}", "guest_mac": "{mac}"}}"#);
        vm.call("PUT", &format!("/network-interfaces/{id}"), Some(&body))
    };
    assert_eq!(nic("a", "tapa", "07:00:00:00:00:01").0, 204);
    let (status, answer) = nic("b", "tapb", "07:00:00:00:00:01");
    assert_eq!(status, 400, "{answer}");
    assert_eq!(
        fault(&answer),
        "The MAC address is already in use: 07:00:00:00:00:01"
    );
    // The same interface may be put again with its own address.
    assert_eq!(nic("a", "tapa", "07:00:00:00:00:01").0, 204);

    // Firecracker's fault texts, Skiff's detail after them where it helps.
    let root = |id: &str| {
        let body = format!(
            r#"{{"drive_id": "{id}", "path_on_host": "{}", "is_root_device": true}}"#,
            image.display()
        );
        vm.call("PUT", &format!("/drives/{id}"), Some(&body))
    };
    assert_eq!(root("r1").0, 204);
    let (_, answer) = root("r2");
    assert!(
        fault(&answer).starts_with("A root block device already exists!"),
        "{answer}"
    );
    let (_, answer) = vm.call(
        "PUT",
        "/drives/x",
        Some(r#"{"drive_id": "y", "path_on_host": "/i", "is_root_device": false}"#),
    );
    assert!(
        fault(&answer).starts_with("The id from the path does not match the id from the body!"),
        "{answer}"
    );
    let (_, answer) = vm.call(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 0}"#),
    );
    assert!(
        fault(&answer).starts_with("The memory size (MiB) is invalid."),
        "{answer}"
    );
    let (_, answer) = vm.call("PUT", "/machine-config", Some(r#"{"vcpu_count": 1}"#));
    assert_eq!(
        fault(&answer),
        "An error occurred when deserializing the json body of a request: missing field `mem_size_mib`."
    );
    let (_, answer) = vm.call("PUT", "/machine-config", Some(r#"{"vcpu_count": "one"}"#));
    assert!(
        fault(&answer).starts_with(
            "An error occurred when deserializing the json body of a request: invalid type"
        ),
        "{answer}"
    );
}

/// One version everywhere, as clients parse it: `--version` starts with Firecracker's
/// `Firecracker v1.16.1`, and `GET /` and `GET /version` say 1.16.1. A PATCH of a drive that
/// changes nothing gets Firecracker's answer.
#[test]
fn one_version_everywhere_and_firecrackers_patch_rule() {
    let out = std::process::Command::new(common::skiff_bin())
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("Firecracker v1.16.1 (Skiff "), "{text}");
    let vm = Running::start("api-version", &[]);
    let (_, version) = vm.call("GET", "/version", None);
    assert!(
        version.contains(r#""firecracker_version":"1.16.1""#),
        "{version}"
    );
    let (_, instance) = vm.call("GET", "/", None);
    assert!(instance.contains(r#""vmm_version":"1.16.1""#), "{instance}");

    let image = tmp("patch-rule.img");
    std::fs::write(&image, vec![0u8; 4096]).unwrap();
    let drive = format!(
        r#"{{"drive_id": "d", "path_on_host": "{}", "is_root_device": false}}"#,
        image.display()
    );
    assert_eq!(vm.call("PUT", "/drives/d", Some(&drive)).0, 204);
    let source = boot_source("checks=ctrlaltdel");
    assert_eq!(vm.call("PUT", "/boot-source", Some(&source)).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(vm.call("PUT", "/actions", Some(start)).0, 204);
    let (status, answer) = vm.call("PATCH", "/drives/d", Some(r#"{"drive_id": "d"}"#));
    assert_eq!(status, 400, "{answer}");
    assert_eq!(fault(&answer), "Running method expected different backend.");
    let cad = r#"{"action_type": "SendCtrlAltDel"}"#;
    assert_eq!(vm.call("PUT", "/actions", Some(cad)).0, 204);
    vm.wait_for("PASS ctrlaltdel", LIMIT);
}

/// A declared body over the 51200-byte limit is refused at once, whatever arrives after the
/// headers (it used to wait 5 s for a body the client never sent), with the message under
/// `error` as Firecracker's clients read it.
#[test]
fn an_oversized_declared_body_is_refused_at_once() {
    let vm = Running::start("api-oversized", &[]);
    let t = Instant::now();
    let (status, answer) = send_raw(
        &vm.sock,
        b"PUT /boot-source HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 51201\r\n\r\n{",
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(status, 400, "{answer}");
    let doc: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert!(
        doc["error"]
            .as_str()
            .unwrap()
            .contains("Request payload with size 51201 is larger than the limit of 51200"),
        "{answer}"
    );
    assert_eq!(vm.call("GET", "/", None).0, 200);
}

/// Drives as Firecracker has them: `cache_type` and `io_engine` reported as set (Async: on
/// io_uring), and an image swapped after boot by `PATCH /drives` with `path_on_host` (the
/// requests in flight finish on the old image first): the guest sees the new capacity
/// (configuration interrupt) and reads the new file (its marker, written to the old one, is gone); a missing file gets Firecracker's error.
#[test]
fn drive_options_are_reported_and_an_image_is_swapped_after_boot() {
    let old = tmp("swap-old.img");
    let new = tmp("swap-new.img");
    std::fs::write(&old, vec![0u8; 8 << 20]).unwrap();
    std::fs::write(&new, vec![0u8; 16 << 20]).unwrap();
    let vm = Running::start("api-drive-swap", &[]);
    let drive = format!(
        r#"{{"drive_id": "d", "path_on_host": "{}", "is_root_device": false, "cache_type": "Writeback", "io_engine": "Async"}}"#,
        old.display()
    );
    assert_eq!(vm.call("PUT", "/drives/d", Some(&drive)).0, 204);
    let (_, config) = vm.call("GET", "/vm/config", None);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["drives"][0]["cache_type"], "Writeback", "{config}");
    assert_eq!(config["drives"][0]["io_engine"], "Async", "{config}");
    let source = boot_source("checks=snapshot");
    assert_eq!(vm.call("PUT", "/boot-source", Some(&source)).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(vm.call("PUT", "/actions", Some(start)).0, 204);
    vm.wait_for("snapshot: disk capacity 16384 sectors", LIMIT);
    vm.wait_for("snap-tick 3", LIMIT);

    let missing = format!(
        r#"{{"drive_id": "d", "path_on_host": "{}"}}"#,
        tmp("no-such.img").display()
    );
    let (status, answer) = vm.call("PATCH", "/drives/d", Some(&missing));
    assert_eq!(status, 400, "{answer}");
    assert!(
        fault(&answer).starts_with("Unable to patch the block device:"),
        "{answer}"
    );
    let swap = format!(
        r#"{{"drive_id": "d", "path_on_host": "{}"}}"#,
        new.display()
    );
    assert_eq!(vm.call("PATCH", "/drives/d", Some(&swap)).0, 204);
    // The two lines come in either order (the swap may fall between the tick's capacity read
    // and its marker read).
    let deadline = Instant::now() + LIMIT;
    while !(vm
        .console()
        .contains("snapshot: disk capacity 32768 sectors")
        && vm.console().contains("FAIL snapshot: disk marker differs"))
    {
        assert!(Instant::now() < deadline, "{}", vm.console());
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, config) = vm.call("GET", "/vm/config", None);
    assert!(config.contains("swap-new.img"), "{config}");
    let cad = r#"{"action_type": "SendCtrlAltDel"}"#;
    assert_eq!(vm.call("PUT", "/actions", Some(cad)).0, 204);
    vm.wait_for("DONE passed=", LIMIT);
}

/// `smt` through `PUT /machine-config`: an odd vCPU count above 1 gets Firecracker's text; an
/// even one is taken, shown, and the guest sees two threads per core.
#[test]
fn smt_through_the_api() {
    let vm = Running::start("api-smt", &[]);
    let (status, answer) = vm.call(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 3, "mem_size_mib": 128, "smt": true}"#),
    );
    assert_eq!(status, 400, "{answer}");
    assert_eq!(
        fault(&answer),
        "The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled."
    );
    let machine = r#"{"vcpu_count": 2, "mem_size_mib": 128, "smt": true}"#;
    assert_eq!(vm.call("PUT", "/machine-config", Some(machine)).0, 204);
    let (_, shown) = vm.call("GET", "/machine-config", None);
    assert!(shown.contains(r#""smt":true"#), "{shown}");
    let source = boot_source("checks=smp,ctrlaltdel cpus=2");
    assert_eq!(vm.call("PUT", "/boot-source", Some(&source)).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(vm.call("PUT", "/actions", Some(start)).0, 204);
    vm.wait_for("smp: 2 thread(s) per core", LIMIT);
    vm.wait_for("PASS smp", LIMIT);
    let cad = r#"{"action_type": "SendCtrlAltDel"}"#;
    assert_eq!(vm.call("PUT", "/actions", Some(cad)).0, 204);
    vm.wait_for("PASS ctrlaltdel", LIMIT);
}

/// `PUT /cpu-config`, Firecracker's custom CPU template: a CPUID bit cleared and an MSR bit
/// cleared, as the guest reads them (KVM's feature leaf 0x40000001 EAX bit 1, NOP_IO_DELAY,
/// which KVM sets; MSR 0x1a0 bit 0, which Skiff sets); a bad bitmap is one line; GET /vm/config
/// shows the template. (A KVM PVM host does not let the template reach every leaf: leaf 7
/// comes from the host there.)
#[test]
fn a_custom_cpu_template_changes_what_the_guest_reads() {
    let vm = Running::start("api-cpu-config", &[]);
    let (status, answer) = vm.call(
        "PUT",
        "/cpu-config",
        Some(r#"{"msr_modifiers": [{"addr": "0x1a0", "bitmap": "0b2"}]}"#),
    );
    assert_eq!(status, 400, "{answer}");
    assert!(fault(&answer).contains("'2' is not 0, 1 or x"), "{answer}");
    let template = format!(
        r#"{{"cpuid_modifiers": [{{"leaf": "0x40000001", "subleaf": "0x0", "flags": 0, "modifiers": [{{"register": "eax", "bitmap": "0b{}0x"}}]}}], "msr_modifiers": [{{"addr": "0x1a0", "bitmap": "0b0"}}]}}"#,
        "x".repeat(30)
    );
    assert_eq!(vm.call("PUT", "/cpu-config", Some(&template)).0, 204);
    let (_, config) = vm.call("GET", "/vm/config", None);
    assert!(config.contains(r#""cpu-config":{"#), "{config}");
    let source = boot_source("checks=cpuinfo,ctrlaltdel cpuid_leaf=1073741825 msr=416");
    assert_eq!(vm.call("PUT", "/boot-source", Some(&source)).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(vm.call("PUT", "/actions", Some(start)).0, 204);
    let cpuid = vm.wait_for("cpuid 40000001:", LIMIT);
    let eax = cpuid
        .split("eax=")
        .nth(1)
        .and_then(|r| u32::from_str_radix(r.split_whitespace().next()?, 16).ok())
        .unwrap_or_else(|| panic!("{cpuid}"));
    assert_eq!(eax & 0b10, 0, "{cpuid}");
    assert_ne!(eax & 0b1, 0, "a kept bit changed: {cpuid}");
    let msr = vm.wait_for("msr 1a0:", LIMIT);
    assert!(msr.trim_end().ends_with(": 0"), "{msr}");
    let cad = r#"{"action_type": "SendCtrlAltDel"}"#;
    assert_eq!(vm.call("PUT", "/actions", Some(cad)).0, 204);
    vm.wait_for("PASS ctrlaltdel", LIMIT);
}
