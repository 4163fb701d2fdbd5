//! The vsock device driven from both ends: the test guest's `vsock` check (a driver with a
//! socket echoing on port 52 and, when asked, connections out to host port 53 sending a
//! pattern) and host programs written here against Firecracker's host protocol: `CONNECT
//! <port>\n` on the device's socket, answered `OK <host port>\n`; a guest connection to host
//! port P reaching the listener at `<uds_path>_P`. Every byte is compared (and its FNV-1a
//! hash against the guest's), under back-pressure both ways, with many connections at once,
//! after hostile packets from the guest and bad host clients.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::api::Running;
use common::{test_guest, Transport};

const LIMIT: Duration = Duration::from_secs(120);

/// A fresh directory for one test's sockets (short: a socket path holds 107 bytes).
fn sock_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("skv-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `skiff run` of the test guest with a vsock device on `dir/v.sock` and `params` on its
/// command line; returns once the guest's driver is ready.
fn start(dir: &Path, params: &str) -> Running {
    start_on(Transport::Mmio, dir, params)
}

/// [`start`] on `transport`.
fn start_on(transport: Transport, dir: &Path, params: &str) -> Running {
    let mut cmd = Command::new(common::skiff_bin());
    cmd.args(["--log-level", "info", "run", "--memory", "64", "--kernel"])
        .arg(test_guest())
        .arg("--cmdline")
        .arg(format!("console=ttyS0 checks=vsock {params}"))
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", dir.join("v.sock").display()))
        .args(transport.flags());
    let vm = Running::spawn(cmd, dir.join("none"));
    vm.wait_for("vsock: cid 3 ready", LIMIT);
    vm
}

/// Waits for the guest's check to end: PASS vsock, and Skiff ends with status 0.
fn finish(mut vm: Running) -> String {
    vm.wait_for("DONE passed=", LIMIT);
    let console = vm.console();
    assert!(
        console.contains("PASS vsock") && !console.contains("FAIL"),
        "{console}\nstderr:\n{}",
        vm.stderr()
    );
    assert_eq!(vm.wait(LIMIT), Some(0), "{}", vm.stderr());
    console
}

/// Connects to the device's socket and asks for guest port `port`; the host port Skiff gave
/// the connection, or None when the guest refused (the stream closed before `OK`).
fn connect(uds: &Path, port: u32) -> (UnixStream, Option<u32>) {
    let mut s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        match s.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            _ => return (s, None),
        }
    }
    let text = String::from_utf8(line).unwrap();
    let port = text
        .strip_prefix("OK ")
        .and_then(|p| p.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("not an OK line: {text:?}"));
    (s, Some(port))
}

/// FNV-1a (64 bits), as the guest hashes what it gets and sends.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `len` bytes that differ from connection to connection.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// The guest's pattern for connections to the host (its `vs_pattern`).
fn pattern(i: usize) -> u8 {
    let i = i as u64;
    (i.wrapping_mul(31) ^ (i >> 9)).to_le_bytes()[0]
}

/// Sends `bytes` on `s` (from a thread, then the end of stream) while reading what comes
/// back, `pause` between reads of at most `chunk` bytes; returns what came back.
fn echo(s: UnixStream, bytes: Vec<u8>, chunk: usize, pause: Duration) -> Vec<u8> {
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        writer.write_all(&bytes).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    let mut reader = s;
    let mut buf = vec![0u8; chunk];
    loop {
        let n = reader.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        back.extend_from_slice(&buf[..n]);
        std::thread::sleep(pause);
    }
    sender.join().unwrap();
    back
}

/// The `fnv` the guest printed for an echo connection from host port `port`.
fn guest_echo_fnv(console: &str, port: u32) -> Option<(u64, u64)> {
    let prefix = format!("vsock: echo port {port} closed: ");
    let line = console.lines().find_map(|l| l.strip_prefix(&prefix))?;
    let bytes = line.split(' ').next()?.parse().ok()?;
    let hash = line.split("fnv ").nth(1)?.split(',').next()?;
    let hash = u64::from_str_radix(hash, 16).ok()?;
    Some((bytes, hash))
}

/// Through the API: `PUT /vsock` (a reserved CID and a taken path refused), `GET /vm/config`
/// shows it; a host
/// program's `CONNECT 52` gets `OK` and a port in [2^30, 2^31), and 1 MiB comes back byte for
/// byte, the guest's hash of what it got equal to the host's of what it sent; the metrics
/// count the connection and the bytes both ways.
#[test]
fn a_host_connection_to_guest_port_52_gets_a_mib_echoed() {
    let dir = sock_dir("api");
    let uds = dir.join("v.sock");
    let vm = Running::start("vsock-api", &[]);
    let (status, answer) = vm.call(
        "PUT",
        "/vsock",
        Some(r#"{"guest_cid": 2, "uds_path": "/tmp/x.sock"}"#),
    );
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("guest_cid 2 is reserved"), "{answer}");
    let taken = dir.join("taken");
    std::fs::write(&taken, "").unwrap();
    let body = format!(
        r#"{{"guest_cid": 3, "uds_path": {}}}"#,
        serde_json::to_string(taken.to_str().unwrap()).unwrap()
    );
    let (status, answer) = vm.call("PUT", "/vsock", Some(&body));
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("already exists"), "{answer}");
    let body = format!(
        r#"{{"vsock_id": "v", "guest_cid": 3, "uds_path": {}}}"#,
        serde_json::to_string(uds.to_str().unwrap()).unwrap()
    );
    assert_eq!(vm.call("PUT", "/vsock", Some(&body)).0, 204);
    let boot = format!(
        r#"{{"kernel_image_path": {}, "boot_args": "console=ttyS0 checks=vsock"}}"#,
        serde_json::to_string(test_guest().to_str().unwrap()).unwrap()
    );
    assert_eq!(vm.call("PUT", "/boot-source", Some(&boot)).0, 204);
    let metrics = dir.join("metrics");
    let body = format!(
        r#"{{"metrics_path": {}}}"#,
        serde_json::to_string(metrics.to_str().unwrap()).unwrap()
    );
    assert_eq!(vm.call("PUT", "/metrics", Some(&body)).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(vm.call("PUT", "/actions", Some(start)).0, 204);
    vm.wait_for("vsock: cid 3 ready", LIMIT);
    let (_, config) = vm.call("GET", "/vm/config", None);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        config["vsock"],
        serde_json::json!({"vsock_id": "v", "guest_cid": 3, "uds_path": uds.to_str().unwrap()}),
        "{config}"
    );
    assert_eq!(vm.call("PUT", "/vsock", Some("{}")).0, 400, "after boot");

    let (s, port) = connect(&uds, 52);
    let port = port.expect("the guest accepted");
    assert!((1 << 30..1 << 31).contains(&port), "host port {port}");
    let sent = data(1 << 20, 1);
    let started = Instant::now();
    let back = echo(s, sent.clone(), 65536, Duration::ZERO);
    common::log_figure(&format!(
        "vsock echo of 1 MiB: {:?} (debug build)",
        started.elapsed()
    ));
    assert!(
        back == sent,
        "{} bytes came back, not the ones sent",
        back.len()
    );
    vm.wait_for(&format!("vsock: echo port {port} closed"), LIMIT);
    assert_eq!(
        guest_echo_fnv(&vm.console(), port),
        Some((1 << 20, fnv(&sent))),
        "{}",
        vm.console()
    );
    let flush = r#"{"action_type": "FlushMetrics"}"#;
    assert_eq!(vm.call("PUT", "/actions", Some(flush)).0, 204);
    let doc = common::metrics_total(&metrics);
    let m = &doc["vsock"];
    assert_eq!(m["conns_added"], 1, "{m}");
    assert_eq!(m["conns_removed"], 1, "{m}");
    assert_eq!(m["conns_killed"], 0, "{m}");
    assert!(m["rx_bytes_count"].as_u64().unwrap() >= 1 << 20, "{m}");
    assert!(m["tx_bytes_count"].as_u64().unwrap() >= 1 << 20, "{m}");
    let keys = r#"{"action_type": "SendCtrlAltDel"}"#;
    assert_eq!(vm.call("PUT", "/actions", Some(keys)).0, 204);
    vm.wait_for("PASS vsock", LIMIT);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Eight host connections at once, each echoed in full; the others are not held up by any.
#[test]
fn several_host_connections_are_served_at_once() {
    let dir = sock_dir("many");
    let vm = start(&dir, "vsock_done=8");
    let uds = dir.join("v.sock");
    let clients: Vec<_> = (0..8u64)
        .map(|i| {
            let uds = uds.clone();
            std::thread::spawn(move || {
                let (s, port) = connect(&uds, 52);
                let sent = data(192 << 10, i + 10);
                let back = echo(s, sent.clone(), 4096, Duration::ZERO);
                assert!(back == sent, "connection {i}: {} bytes back", back.len());
                (port.unwrap(), fnv(&sent))
            })
        })
        .collect();
    let results: Vec<(u32, u64)> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let console = finish(vm);
    for (port, hash) in results {
        assert_eq!(
            guest_echo_fnv(&console, port),
            Some((192 << 10, hash)),
            "{console}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Reads every connection `listener` gets (`conns` of them), `pause` between reads of at
/// most `chunk` bytes; returns what each sent.
fn serve(
    listener: UnixListener,
    conns: usize,
    chunk: usize,
    pause: Duration,
) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
    std::thread::spawn(move || {
        let readers: Vec<_> = (0..conns)
            .map(|_| {
                let (mut s, _) = listener.accept().unwrap();
                std::thread::spawn(move || {
                    let mut all = Vec::new();
                    let mut buf = vec![0u8; chunk];
                    loop {
                        let n = s.read(&mut buf).unwrap();
                        if n == 0 {
                            return all;
                        }
                        all.extend_from_slice(&buf[..n]);
                        std::thread::sleep(pause);
                    }
                })
            })
            .collect();
        readers.into_iter().map(|r| r.join().unwrap()).collect()
    })
}

fn assert_pattern(got: &[u8], len: usize) {
    assert_eq!(got.len(), len);
    if let Some(i) = (0..len).find(|&i| got[i] != pattern(i)) {
        panic!("byte {i} of {len} differs from the guest's pattern");
    }
}

/// The guest connects to host port 53 twice: both reach the listener at `<uds_path>_53`
/// and deliver 1 MiB of the pattern, then their end of stream. A port with no listener is
/// refused (RST), which the guest reports.
#[test]
fn guest_connections_reach_the_host_listener_on_their_port() {
    for transport in Transport::BOTH {
        let dir = sock_dir(&format!("out-{transport:?}"));
        let listener = UnixListener::bind(dir.join("v.sock_53")).unwrap();
        let host = serve(listener, 2, 65536, Duration::ZERO);
        let params = "vsock_out=1048576 vsock_out_conns=2 vsock_done=2";
        let vm = start_on(transport, &dir, params);
        for got in host.join().unwrap() {
            assert_pattern(&got, 1 << 20);
        }
        let console = finish(vm);
        assert_eq!(
            console
                .matches("to host port 53 closed: 1048576 bytes sent")
                .count(),
            2,
            "{transport:?}: {console}"
        );
    }

    let dir = sock_dir("refused");
    let vm = start(
        &dir,
        "vsock_out=1000 vsock_out_port=54 vsock_refused=1 vsock_done=1",
    );
    let console = finish(vm);
    assert!(console.contains("to host port 54 refused"), "{console}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Slow host readers lose nothing: a listener reading 4 KiB every 10 ms holds the guest's
/// sends back by credit (Skiff buffers at most 64 KiB of them), and a host echo client that
/// writes fast but reads slowly waits on the guest's credit (the guest counts any byte
/// beyond it as an overrun and fails).
#[test]
fn slow_host_readers_stall_the_sender_and_lose_nothing() {
    let dir = sock_dir("slow");
    let listener = UnixListener::bind(dir.join("v.sock_53")).unwrap();
    let host = serve(listener, 1, 4096, Duration::from_millis(10));
    let vm = start(&dir, "vsock_out=524288 vsock_done=2");
    let (s, port) = connect(&dir.join("v.sock"), 52);
    let sent = data(512 << 10, 7);
    let back = echo(s, sent.clone(), 4096, Duration::from_millis(10));
    assert!(back == sent, "{} bytes came back", back.len());
    assert_pattern(&host.join().unwrap()[0], 512 << 10);
    let console = finish(vm);
    assert_eq!(
        guest_echo_fnv(&console, port.unwrap()),
        Some((512 << 10, fnv(&sent)))
    );
    assert!(console.contains(" 0 overruns"), "{console}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A guest sending hostile packets (short chains, lengths past the chain or any packet, an
/// unknown operation, another socket type, forged CIDs, replies for no connection, a
/// device-writable buffer, memory outside the guest, 1000 requests to a closed port) gets an
/// RST for each that deserves one and nothing else; bad host clients (a wrong line, silence,
/// a port the guest does not listen on) are closed; and Skiff serves a good connection after
/// all of it.
#[test]
fn hostile_packets_and_bad_clients_leave_skiff_serving() {
    let dir = sock_dir("hostile");
    let vm = start(&dir, "vsock_hostile=1 vsock_done=1");
    let hostile = vm.wait_for("vsock: hostile:", LIMIT);
    assert!(
        hostile.contains("1006 resets back of 1006 expected"),
        "{hostile}"
    );
    let uds = dir.join("v.sock");
    let mut wrong = UnixStream::connect(&uds).unwrap();
    wrong.write_all(b"HELLO 52\n").unwrap();
    let silent = UnixStream::connect(&uds).unwrap();
    let (mut nobody, port) = connect(&uds, 77);
    assert_eq!(port, None, "the guest does not listen on 77");
    let mut b = [0u8; 1];
    assert_eq!(nobody.read(&mut b).unwrap_or(0), 0);
    assert_eq!(wrong.read(&mut b).unwrap_or(0), 0);
    let (s, port) = connect(&uds, 52);
    let sent = data(256 << 10, 3);
    assert!(echo(s, sent.clone(), 65536, Duration::ZERO) == sent);
    drop(silent);
    let console = finish(vm);
    assert_eq!(
        guest_echo_fnv(&console, port.unwrap()),
        Some((256 << 10, fnv(&sent)))
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A reserved CID and a socket that cannot be made are one line each, and Skiff exits 1.
#[test]
fn bad_vsock_settings_are_one_line() {
    let dir = sock_dir("bad");
    let taken = dir.join("taken");
    std::fs::write(&taken, "").unwrap();
    for (spec, want) in [
        (
            "cid=2,uds=/tmp/x.sock".to_owned(),
            "guest_cid 2 is reserved",
        ),
        ("cid=3".to_owned(), "uds= is missing"),
        (
            format!("cid=3,uds={}", taken.display()),
            "cannot listen on the vsock socket",
        ),
    ] {
        let args = [
            "run",
            "--kernel",
            test_guest().to_str().unwrap(),
            "--vsock",
            &spec,
        ];
        let out = common::run_skiff(&args, LIMIT, None);
        assert_ne!(out.code, Some(0), "{spec}");
        assert!(out.stderr.contains(want), "{spec}: {}", out.stderr);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
