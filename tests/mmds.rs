//! The microVM metadata service through the real path: the test guest's `mmds` check (see
//! resources/testguest/guest.c) ARPs for the service's address and makes HTTP exchanges over
//! its own TCP on a virtio-net interface whose TAP sits in a throw-away network namespace. The
//! host puts the store through the API (or `--metadata`), checks what the guest printed, and
//! reads every frame the guest sent on the TAP with a packet socket bound to it: the host's
//! ARP request gets there, nothing for the service does.

mod common;

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::api::{fault, Running};
use common::netns::NetNs;
use common::{run_command, skiff_bin, test_guest, Outcome};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(120);
const GUEST_MAC: [u8; 6] = [6, 0, 0xac, 0x1e, 0, 2];
const MMDS_IP: [u8; 4] = [169, 254, 169, 254];

fn tmp(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name)
}

fn store() -> Value {
    json!({"latest": {"meta-data": {
        "ami-id": "ami-12345678",
        "reservation-id": "r-fea54097",
        "network": {"mac": "06:00:ac:1e:00:02"}
    }}})
}

/// Every frame the guest sends on a TAP: a packet socket bound to the TAP in its namespace.
struct Capture(OwnedFd);

impl Capture {
    fn start(ns: &NetNs, dev: &str) -> Self {
        let name = CString::new(dev).unwrap();
        let fd = ns.run_in(move || {
            let all = i32::from(u16::try_from(libc::ETH_P_ALL).unwrap().to_be());
            // SAFETY: socket takes plain integers; the result is checked before use.
            let raw = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    all,
                )
            };
            assert!(raw >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
            // SAFETY: `raw` was just returned by socket and nothing else owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: `name` is a NUL-terminated string that outlives the call.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert_ne!(index, 0, "no interface {name:?}");
            // SAFETY: sockaddr_ll is a plain C struct for which all zeros is valid.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
            addr.sll_protocol = u16::try_from(libc::ETH_P_ALL).unwrap().to_be();
            addr.sll_ifindex = i32::try_from(index).unwrap();
            let len = u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap();
            // SAFETY: `addr` is a valid sockaddr_ll of `len` bytes for the call's duration.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
                    len,
                )
            };
            assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
            fd
        });
        let size: libc::c_int = 8 << 20;
        // SAFETY: setsockopt reads an int through the pointer, valid for the call.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                std::ptr::addr_of!(size).cast(),
                u32::try_from(std::mem::size_of::<libc::c_int>()).unwrap(),
            );
        }
        Self(fd)
    }

    /// The frames captured so far that came from the guest's MAC.
    fn guest_frames(&self) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: recv writes at most `buf.len()` bytes into `buf`, valid for the call.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else { break };
            if n >= 14 && buf[6..12] == GUEST_MAC {
                frames.push(buf[..n].to_vec());
            }
        }
        frames
    }
}

/// Whether an Ethernet frame is ARP about, or IPv4 to, `ip`.
fn for_address(frame: &[u8], ip: [u8; 4]) -> bool {
    match (frame.get(12..14), frame.len()) {
        (Some([8, 6]), n) if n >= 42 => frame[38..42] == ip,
        (Some([8, 0]), n) if n >= 34 => frame[30..34] == ip,
        _ => false,
    }
}

/// Checks the capture: the guest's frames reached the TAP (its ARP for the host, at least),
/// none of them for the service at `ip`.
fn assert_none_reached_the_tap(capture: &Capture, ip: [u8; 4]) {
    let frames = capture.guest_frames();
    assert!(
        frames.iter().any(|f| f[12..14] == [8, 6]),
        "the capture saw none of the guest's frames ({} in all): is it working?",
        frames.len()
    );
    let leaked: Vec<_> = frames.iter().filter(|f| for_address(f, ip)).collect();
    assert!(
        leaked.is_empty(),
        "{} frames for the service reached the TAP: {leaked:?}",
        leaked.len()
    );
}

/// What the guest printed for one request: "mmds: round R: LABEL -> STATUS" and the body's
/// "mmds-body: " lines.
fn answer(console: &str, round: u32, label: &str) -> (u16, String) {
    let lines: Vec<&str> = console.lines().map(|l| l.trim_end_matches('\r')).collect();
    let head = format!("mmds: round {round}: {label} -> ");
    let at = lines
        .iter()
        .position(|l| l.starts_with(&head))
        .unwrap_or_else(|| panic!("no line {head:?}\n{console}"));
    let status = lines[at][head.len()..]
        .parse()
        .unwrap_or_else(|_| panic!("{}\n{console}", lines[at]));
    let body: Vec<&str> = lines[at + 1..]
        .iter()
        .map_while(|l| l.strip_prefix("mmds-body: "))
        .collect();
    (status, body.join("\n"))
}

fn expect(console: &str, round: u32, label: &str, status: u16, body: &str) {
    assert_eq!(
        answer(console, round, label),
        (status, body.to_owned()),
        "round {round}: {label}\n{console}"
    );
}

/// A Skiff in `ns` serving its API on a fresh socket, with `extra` flags.
fn start_in(ns: &NetNs, name: &str, extra: &[&str]) -> Running {
    let sock = Running::fresh_sock(name);
    let mut args = vec!["--api-sock", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let vm = Running::spawn(ns.command(skiff_bin(), &args), sock);
    vm.wait_for_socket();
    vm
}

fn ok(vm: &Running, method: &str, path: &str, body: &str) {
    let (status, answer) = vm.call(method, path, Some(body));
    assert_eq!(
        status,
        204,
        "{method} {path} {body}: {answer}\n{}",
        vm.stderr()
    );
}

fn get_json(vm: &Running, path: &str) -> Value {
    let (status, body) = vm.call("GET", path, None);
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Configures the test guest's `mmds` check with `cmdline` added, eth0 on tap0 and MMDS V2 on
/// it, through the API.
fn configure_v2(vm: &Running, cmdline: &str) {
    let source = json!({
        "kernel_image_path": test_guest(),
        "boot_args": format!("console=ttyS0 checks=mmds {cmdline}")
    });
    ok(vm, "PUT", "/boot-source", &source.to_string());
    ok(
        vm,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
    );
    ok(
        vm,
        "PUT",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:1e:00:02"}"#,
    );
    ok(
        vm,
        "PUT",
        "/mmds/config",
        r#"{"version": "V2", "network_interfaces": ["eth0"]}"#,
    );
}

/// MMDS V2 configured and filled through the API: the guest's GET without a token (or with a
/// made-up one) gets Firecracker's 401s, its token opens the store; the store's values, IMDS
/// listing and JSON are what the host put (and patched); a PUT while the guest runs is what
/// it reads next, and its token still holds; no frame for the service reaches the TAP; the
/// metrics count the connections and the requests without a valid token.
#[test]
fn v2_through_the_api_needs_a_token_and_stays_off_the_tap() {
    let ns = NetNs::with_tap("mmds-v2", "tap0", "172.30.0.1/24");
    let capture = Capture::start(&ns, "tap0");
    let metrics = tmp("mmds-v2.metrics");
    let _ = std::fs::remove_file(&metrics);
    let mut vm = start_in(&ns, "mmds-v2", &[]);
    ok(
        &vm,
        "PUT",
        "/metrics",
        &json!({"metrics_path": metrics}).to_string(),
    );
    configure_v2(&vm, "mmds_rounds=2");
    ok(&vm, "PUT", "/mmds", &store().to_string());
    let patch =
        json!({"latest": {"meta-data": {"reservation-id": null, "instance-type": "t2.micro"}}});
    ok(&vm, "PATCH", "/mmds", &patch.to_string());
    let mut want = store();
    want["latest"]["meta-data"]
        .as_object_mut()
        .unwrap()
        .remove("reservation-id");
    want["latest"]["meta-data"]["instance-type"] = json!("t2.micro");
    assert_eq!(get_json(&vm, "/mmds"), want);
    let config = get_json(&vm, "/vm/config");
    assert_eq!(
        config["mmds-config"],
        json!({"version": "V2", "network_interfaces": ["eth0"],
               "ipv4_address": "169.254.169.254", "imds_compat": false})
    );
    ok(
        &vm,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );

    vm.wait_for("mmds: round 2 waits for a key", LIMIT);
    let console = vm.console();
    let no_token = "No MMDS token provided. Use `X-metadata-token` or `X-aws-ec2-metadata-token` header to specify the session token.";
    expect(&console, 1, "GET path no-token", 401, no_token);
    expect(
        &console,
        1,
        "GET path bad-token",
        401,
        "MMDS token not valid.",
    );
    assert!(
        console.contains("mmds: round 1: PUT token -> 200 (64 bytes)"),
        "{console}"
    );
    expect(&console, 1, "GET path token", 200, "ami-12345678");
    expect(
        &console,
        1,
        "GET list token",
        200,
        "ami-id\ninstance-type\nnetwork/",
    );
    let (status, json_body) = answer(&console, 1, "GET list token json");
    assert_eq!(status, 200);
    let shown: Value = serde_json::from_str(&json_body).unwrap();
    assert_eq!(shown, want["latest"]["meta-data"]);

    // While the guest runs: the store changes, the configuration does not.
    ok(
        &vm,
        "PUT",
        "/mmds",
        r#"{"latest": {"meta-data": {"ami-id": "ami-87654321"}}}"#,
    );
    let (status, answer_body) = vm.call(
        "PUT",
        "/mmds/config",
        Some(r#"{"network_interfaces": ["eth0"]}"#),
    );
    assert_eq!(
        (status, fault(&answer_body).as_str()),
        (
            400,
            "The requested operation is not supported after starting the microVM."
        )
    );
    ok(
        &vm,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    vm.wait_for("DONE passed=", LIMIT);
    let console = vm.console();
    expect(&console, 2, "GET path old-token", 200, "ami-87654321");
    expect(&console, 2, "GET path token", 200, "ami-87654321");
    assert!(console.contains("PASS mmds"), "{console}");
    assert!(
        console.contains("0 bad checksums, 0 unexpected segments"),
        "{console}"
    );
    assert_eq!(vm.wait(LIMIT), Some(0), "{}", vm.stderr());

    assert_none_reached_the_tap(&capture, MMDS_IP);
    let total = common::metrics_total(&metrics);
    let m = &total["mmds"];
    // Two rounds: 6 and 7 exchanges, each on its own connection, closed by both sides.
    assert_eq!(m["connections_created"], 13, "{m}");
    assert_eq!(m["connections_destroyed"], 13, "{m}");
    assert_eq!(
        (m["rx_no_token"].as_u64(), m["rx_invalid_token"].as_u64()),
        (Some(2), Some(2)),
        "{m}"
    );
    assert_eq!(m["tx_errors"], 0, "{m}");
    assert!(m["rx_accepted"].as_u64() > Some(13), "{m}");
}

/// MMDS V1 at another address from the config file, its store from `--metadata`, no API:
/// every GET is answered, token or not.
#[test]
fn v1_from_a_config_file_and_metadata_answers_without_a_token() {
    let ns = NetNs::with_tap("mmds-v1", "tap0", "172.30.0.1/24");
    let capture = Capture::start(&ns, "tap0");
    let metadata = tmp("mmds-v1-metadata.json");
    std::fs::write(&metadata, store().to_string()).unwrap();
    let config = tmp("mmds-v1.json");
    let doc = json!({
        "boot-source": {"kernel_image_path": test_guest(),
                        "boot_args": "console=ttyS0 checks=mmds mmds_ip=169.254.170.2 mmds_list=/latest"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:1e:00:02"}],
        "mmds-config": {"network_interfaces": ["eth0"], "ipv4_address": "169.254.170.2"}
    });
    std::fs::write(&config, doc.to_string()).unwrap();
    let args = [
        "--no-api",
        "--config-file",
        config.to_str().unwrap(),
        "--metadata",
        metadata.to_str().unwrap(),
    ];
    let out: Outcome = run_command(ns.command(skiff_bin(), &args), LIMIT, None, None);
    let console = out.stdout.as_str();
    assert!(
        console.contains("mmds: ARP: 169.254.170.2 is at 06:01:23:45:67:01"),
        "{console}\n{}",
        out.stderr
    );
    for label in ["GET path no-token", "GET path bad-token", "GET path token"] {
        expect(console, 1, label, 200, "ami-12345678");
    }
    expect(console, 1, "GET list token", 200, "meta-data/");
    let (_, json_body) = answer(console, 1, "GET list token json");
    assert_eq!(
        serde_json::from_str::<Value>(&json_body).unwrap(),
        store()["latest"]
    );
    assert!(console.contains("PASS mmds"), "{console}");
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_none_reached_the_tap(&capture, [169, 254, 170, 2]);
}

/// The control for the capture: without MMDS the guest's ARP requests for 169.254.169.254
/// reach the TAP (and nobody answers them).
#[test]
fn without_mmds_the_frames_reach_the_tap() {
    let ns = NetNs::with_tap("mmds-none", "tap0", "172.30.0.1/24");
    let capture = Capture::start(&ns, "tap0");
    let vm = start_in(&ns, "mmds-none", &[]);
    let source =
        json!({"kernel_image_path": test_guest(), "boot_args": "console=ttyS0 checks=mmds"});
    ok(&vm, "PUT", "/boot-source", &source.to_string());
    ok(
        &vm,
        "PUT",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:1e:00:02"}"#,
    );
    ok(
        &vm,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    let line = vm.wait_for("FAIL mmds", LIMIT);
    assert!(
        line.contains("no ARP reply for the service's address"),
        "{line}"
    );
    let asked = capture
        .guest_frames()
        .iter()
        .filter(|f| for_address(f, MMDS_IP))
        .count();
    assert!(
        asked > 0,
        "no ARP request for the service's address on the TAP"
    );
}

/// The API's refusals and limits, before any boot: `GET /mmds` of an empty store is `{}`, a
/// PATCH before a PUT, a store over `--mmds-size-limit` (413), a body over
/// `--http-api-max-payload-size`, a configuration naming no interface or an unknown one or an
/// address that is not link-local: each with Firecracker's words.
#[test]
fn api_limits_and_refusals() {
    let vm = Running::start(
        "mmds-api",
        &[
            "--mmds-size-limit",
            "64",
            "--http-api-max-payload-size",
            "200",
        ],
    );
    assert_eq!(get_json(&vm, "/mmds"), json!({}));
    let (status, body) = vm.call("PATCH", "/mmds", Some(r#"{"a": 1}"#));
    assert_eq!(
        (status, fault(&body).as_str()),
        (400, "MMDS error: The MMDS data store is not initialized.")
    );
    let big = json!({"key": "x".repeat(60)}).to_string();
    let (status, body) = vm.call("PUT", "/mmds", Some(&big));
    assert_eq!(
        (status, fault(&body).as_str()),
        (
            413,
            "MMDS limit exceeded error: The MMDS patch request doesn't fit."
        )
    );
    ok(&vm, "PUT", "/mmds", r#"{"key": "small"}"#);
    let (status, _) = vm.call(
        "PATCH",
        "/mmds",
        Some(&json!({"more": "y".repeat(60)}).to_string()),
    );
    assert_eq!(status, 413);
    assert_eq!(get_json(&vm, "/mmds"), json!({"key": "small"}), "unchanged");
    let huge = json!({"key": "z".repeat(300)}).to_string();
    let (status, body) = vm.call("PUT", "/mmds", Some(&huge));
    assert_eq!(
        (status, fault(&body)),
        (
            400,
            format!(
                "Request payload with size {} is larger than the limit of 200 allowed by server.",
                huge.len()
            )
        )
    );
    for (config, why) in [
        (r#"{"network_interfaces": []}"#, "MMMDS config error: The list of network interface IDs that allow forwarding MMDS requests is empty."),
        (r#"{"network_interfaces": ["eth0"]}"#, "MMMDS config error: The list of network interface IDs provided contains at least one ID that does not correspond to any existing network interface."),
        (r#"{"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"}"#, "MMMDS config error: The MMDS IPv4 address is not link local."),
    ] {
        let (status, body) = vm.call("PUT", "/mmds/config", Some(config));
        assert_eq!((status, fault(&body).as_str()), (400, why), "{config}");
    }
    let config = get_json(&vm, "/vm/config");
    assert_eq!(config["mmds-config"], serde_json::Value::Null, "{config}");
}

/// `--metadata` that cannot be used ends Skiff at start with one line saying why.
#[test]
fn a_bad_metadata_file_is_one_error_line() {
    let bad = tmp("mmds-bad-metadata.json");
    std::fs::write(&bad, "{not json").unwrap();
    let missing = Path::new("/nonexistent/metadata.json");
    for (file, why) in [
        (bad.as_path(), "metadata file"),
        (missing, "cannot read metadata file"),
    ] {
        let sock = Running::fresh_sock("mmds-bad-metadata");
        let mut cmd = std::process::Command::new(skiff_bin());
        cmd.arg("--api-sock").arg(&sock).arg("--metadata").arg(file);
        let out = run_command(cmd, LIMIT, None, None);
        assert_eq!(out.code, Some(1), "{}", out.stderr);
        let errors = out.error_lines();
        assert_eq!(errors.len(), 1, "{}", out.stderr);
        assert!(errors[0].contains(why), "{}", errors[0]);
        assert!(!sock.exists(), "no API socket is left");
    }
}

/// A snapshot keeps the service's configuration, as Firecracker does, but not its data store
/// nor its tokens: the restored process shows `mmds-config`, starts with an empty store that a
/// PUT fills, and the guest's token from before the snapshot is refused while a new one works.
#[test]
fn a_snapshot_keeps_the_configuration_not_the_store_nor_the_tokens() {
    let ns = NetNs::with_tap("mmds-snap", "tap0", "172.30.0.1/24");
    let capture = Capture::start(&ns, "tap0");
    let dir = tmp("mmds-snap");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (state, mem) = (dir.join("vm.snap"), dir.join("vm.mem"));
    let mut vm = start_in(&ns, "mmds-snap", &[]);
    configure_v2(&vm, "mmds_rounds=2");
    ok(&vm, "PUT", "/mmds", &store().to_string());
    ok(
        &vm,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    vm.wait_for("mmds: round 2 waits for a key", LIMIT);
    expect(&vm.console(), 1, "GET path token", 200, "ami-12345678");
    ok(&vm, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    let create = json!({"snapshot_type": "Full", "snapshot_path": state, "mem_file_path": mem});
    ok(&vm, "PUT", "/snapshot/create", &create.to_string());
    let _ = vm.child.kill();
    let _ = vm.child.wait();

    let mut vm = start_in(&ns, "mmds-snap-restored", &[]);
    let load = json!({"snapshot_path": state,
                      "mem_backend": {"backend_type": "File", "backend_path": mem},
                      "resume_vm": true});
    ok(&vm, "PUT", "/snapshot/load", &load.to_string());
    let config = get_json(&vm, "/vm/config");
    assert_eq!(
        config["mmds-config"],
        json!({"version": "V2", "network_interfaces": ["eth0"],
               "ipv4_address": "169.254.169.254", "imds_compat": false})
    );
    assert_eq!(get_json(&vm, "/mmds"), json!({}), "the store is not kept");
    ok(
        &vm,
        "PUT",
        "/mmds",
        r#"{"latest": {"meta-data": {"ami-id": "ami-restored"}}}"#,
    );
    ok(
        &vm,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    vm.wait_for("DONE passed=", LIMIT);
    let console = vm.console();
    expect(
        &console,
        2,
        "GET path old-token",
        401,
        "MMDS token not valid.",
    );
    expect(&console, 2, "GET path token", 200, "ami-restored");
    assert!(console.contains("PASS mmds"), "{console}");
    assert_eq!(vm.wait(LIMIT), Some(0), "{}", vm.stderr());
    assert_none_reached_the_tap(&capture, MMDS_IP);
}
