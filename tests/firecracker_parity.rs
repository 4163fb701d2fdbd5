//! Skiff against what Firecracker 1.16.1 itself answered, captured in `tests/firecracker/`
//! (by running the real binary with the same requests; paths there are placeholders such as
//! `@KERNEL@`): `GET /vm/config` key for key, its document as a config file in both
//! directions, and the metrics file's groups and counter names.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::api::Running;
use common::netns::NetNs;
use common::test_guest;
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(60);

fn tmp(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// A captured Firecracker document with its placeholders replaced.
fn firecracker_doc(name: &str, paths: &[(&str, &str)]) -> Value {
    let file = common::root().join("tests/firecracker").join(name);
    let mut text = std::fs::read_to_string(&file).unwrap();
    for (placeholder, path) in paths {
        text = text.replace(placeholder, path);
    }
    serde_json::from_str(&text).unwrap()
}

fn json_of((status, body): (u16, String)) -> Value {
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The files the devices' document names, made for `tag`.
struct Files {
    disk: PathBuf,
    pmem: PathBuf,
    vsock: PathBuf,
}

impl Files {
    fn new(tag: &str) -> Self {
        let files = Self {
            disk: tmp(&format!("{tag}-disk.img")),
            pmem: tmp(&format!("{tag}-pmem.img")),
            vsock: tmp(&format!("{tag}-v.sock")),
        };
        std::fs::write(&files.disk, vec![0u8; 1 << 20]).unwrap();
        std::fs::write(&files.pmem, vec![0u8; 2 << 20]).unwrap();
        let _ = std::fs::remove_file(&files.vsock);
        files
    }

    fn paths(&self) -> Vec<(&'static str, String)> {
        vec![
            ("@KERNEL@", test_guest().display().to_string()),
            ("@DISK@", self.disk.display().to_string()),
            ("@PMEM@", self.pmem.display().to_string()),
            ("@VSOCK@", self.vsock.display().to_string()),
        ]
    }

    fn devices_doc(&self) -> Value {
        let paths = self.paths();
        let pairs: Vec<(&str, &str)> = paths.iter().map(|(p, v)| (*p, v.as_str())).collect();
        firecracker_doc("vm-config-devices.json", &pairs)
    }
}

/// A namespace with the TAPs `tap0` and `tap1` that the devices' document names.
fn namespace(tag: &str) -> NetNs {
    let ns = NetNs::new(tag);
    for tap in ["tap0", "tap1"] {
        let ok = Command::new("ip")
            .args(["-n", ns.name(), "tuntap", "add", "dev", tap, "mode", "tap"])
            .status()
            .unwrap();
        assert!(ok.success());
    }
    ns
}

/// Skiff in `ns` with its API on a fresh socket and `extra` flags.
fn skiff_in(ns: &NetNs, name: &str, extra: &[&str]) -> Running {
    let sock = Running::fresh_sock(name);
    let mut args = vec!["--api-sock", sock.to_str().unwrap()];
    args.extend(extra);
    let vm = Running::spawn(ns.command(common::skiff_bin(), &args), sock);
    vm.wait_for_socket();
    vm
}

/// With nothing configured, and with every kind of device (drives with and without a rate
/// limiter, interfaces with and without a MAC, vsock, entropy, MMDS, pmem, hot-plug memory,
/// balloon) configured by the same requests Firecracker was sent, `GET /vm/config` answers
/// Firecracker's document exactly: every null key and empty list where it has them.
#[test]
fn get_vm_config_answers_firecrackers_document() {
    let bare = Running::start("fc-config-bare", &[]);
    assert_eq!(
        json_of(bare.call("GET", "/vm/config", None)),
        firecracker_doc("vm-config-bare.json", &[])
    );
    drop(bare);

    let ns = namespace("fcconfig");
    let files = Files::new("fc-config");
    let want = files.devices_doc();
    let vm = skiff_in(&ns, "fc-config-devices", &[]);
    let put = |path: &str, body: Value| {
        let (status, answer) = vm.call("PUT", path, Some(&body.to_string()));
        assert_eq!(status, 204, "PUT {path}: {answer}");
    };
    put(
        "/boot-source",
        json!({"kernel_image_path": test_guest(), "boot_args": "checks=serial,blk"}),
    );
    put(
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 64}),
    );
    put(
        "/drives/rootfs",
        json!({"drive_id": "rootfs", "path_on_host": files.disk, "is_root_device": false, "is_read_only": false}),
    );
    put(
        "/network-interfaces/eth0",
        json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}),
    );
    put("/vsock", json!({"guest_cid": 3, "uds_path": files.vsock}));
    put("/entropy", json!({}));
    put(
        "/drives/d2",
        json!({"drive_id": "d2", "path_on_host": files.disk, "is_root_device": false,
               "partuuid": "abc", "is_read_only": true, "cache_type": "Writeback",
               "rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}),
    );
    put(
        "/network-interfaces/eth1",
        json!({"iface_id": "eth1", "host_dev_name": "tap1",
               "rx_rate_limiter": {"ops": {"size": 10, "one_time_burst": 5, "refill_time": 100}}}),
    );
    put("/mmds/config", json!({"network_interfaces": ["eth0"]}));
    put(
        "/pmem/pm0",
        json!({"id": "pm0", "path_on_host": files.pmem}),
    );
    put("/hotplug/memory", json!({"total_size_mib": 256}));
    put(
        "/balloon",
        json!({"amount_mib": 0, "deflate_on_oom": false}),
    );
    assert_eq!(json_of(vm.call("GET", "/vm/config", None)), want);
}

/// Firecracker's own document (every section present, null or empty where unset) is a config
/// file Skiff boots from, and Skiff's `GET /vm/config` answer in turn boots Skiff to the same
/// configuration: the document goes both ways.
#[test]
fn firecrackers_document_and_skiffs_feed_each_other_as_config_files() {
    let ns = namespace("fcfeed");
    let files = Files::new("fc-feed");
    let mut doc = files.devices_doc();
    // A guest that stays up while the API is asked, then resets.
    doc["boot-source"]["boot_args"] = json!("checks=ticks ticks_max=30");
    for round in ["firecracker", "skiff"] {
        // The same files again (the vsock socket of the round before removed).
        let _ = Files::new("fc-feed");
        let file = tmp(&format!("fc-feed-{round}.json"));
        std::fs::write(&file, doc.to_string()).unwrap();
        let mut vm = skiff_in(
            &ns,
            &format!("fc-feed-{round}"),
            &["--config-file", file.to_str().unwrap()],
        );
        vm.wait_for("tick 1", LIMIT);
        let shown = json_of(vm.call("GET", "/vm/config", None));
        assert_eq!(shown, doc, "{round}'s document, as Skiff shows it");
        assert_eq!(vm.wait(LIMIT), Some(0), "{}", vm.stderr());
        doc = shown;
    }
}

/// The names of a metrics document: its groups and counters, numbers left out.
fn names(doc: &Value) -> Value {
    match doc {
        Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), names(v))).collect(),
        _ => Value::Null,
    }
}

/// Metrics set through the API (no `emit_id`: 1.16.1 has none and refuses it, as Skiff
/// does); the guest reads and writes its drive `rootfs` and sends on its interface `eth0`.
/// The file has a line at boot, one per FlushMetrics and one at exit, each with exactly the
/// groups and counter names of the line Firecracker wrote for the same devices, and the
/// counters moved: block and net I/O, vCPU exits, console bytes, API requests by route.
#[test]
fn metrics_lines_have_firecrackers_groups_and_names_and_count() {
    let ns = NetNs::with_tap("fcmetrics", "tap0", "172.30.0.1/24");
    let disk = tmp("fc-metrics-disk.img");
    let mut image = vec![0u8; 8 << 20];
    for (i, byte) in image[2048 * 512..][..4096].iter_mut().enumerate() {
        *byte = (i * 7 + 3).to_le_bytes()[0];
    }
    std::fs::write(&disk, image).unwrap();
    let metrics = tmp("fc-metrics.json");
    let _ = std::fs::remove_file(&metrics);
    let mut vm = skiff_in(&ns, "fc-metrics", &[]);
    let put = |path: &str, body: Value| {
        let (status, answer) = vm.call("PUT", path, Some(&body.to_string()));
        assert_eq!(status, 204, "PUT {path}: {answer}");
    };
    let (status, _) = vm.call(
        "PUT",
        "/metrics",
        Some(&json!({"metrics_path": metrics, "emit_id": true}).to_string()),
    );
    assert_eq!(status, 400, "emit_id is not in Firecracker 1.16.1");
    put("/metrics", json!({"metrics_path": metrics}));
    put(
        "/boot-source",
        json!({"kernel_image_path": test_guest(), "boot_args":
            "console=ttyS0 checks=blk,net net_ip=172.30.0.2 net_peer=172.30.0.1 net_tx=4 net_rx=0"}),
    );
    put(
        "/machine-config",
        json!({"vcpu_count": 2, "mem_size_mib": 128}),
    );
    put(
        "/drives/rootfs",
        json!({"drive_id": "rootfs", "path_on_host": disk, "is_root_device": false}),
    );
    put(
        "/network-interfaces/eth0",
        json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:1e:00:02"}),
    );
    put("/actions", json!({"action_type": "InstanceStart"}));
    vm.wait_for("PASS blk", LIMIT);
    vm.wait_for("net: sent 4 datagrams", LIMIT);
    put("/actions", json!({"action_type": "FlushMetrics"}));
    assert_eq!(vm.wait(LIMIT), Some(0), "{}", vm.stderr());

    let theirs: Value = serde_json::from_str(
        &std::fs::read_to_string(common::root().join("tests/firecracker/metrics.json")).unwrap(),
    )
    .unwrap();
    let text = std::fs::read_to_string(&metrics).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "boot, FlushMetrics, exit: {text}");
    for line in &lines {
        assert_eq!(names(line), names(&theirs), "{line}");
    }
    let boot = &lines[0];
    assert_eq!(boot["put_api_requests"]["drive_count"], 1, "{boot}");
    assert_eq!(boot["put_api_requests"]["network_count"], 1, "{boot}");
    assert_eq!(boot["put_api_requests"]["metrics_count"], 2, "{boot}");
    assert_eq!(boot["put_api_requests"]["metrics_fails"], 1, "{boot}");
    let total = common::metrics_total(&metrics);
    for (group, counter) in [
        ("block_rootfs", "read_count"),
        ("block_rootfs", "read_bytes"),
        ("block_rootfs", "write_count"),
        ("block_rootfs", "write_bytes"),
        ("block_rootfs", "flush_count"),
        ("block", "read_count"),
        ("net_eth0", "tx_packets_count"),
        ("net_eth0", "tx_bytes_count"),
        ("net", "tx_packets_count"),
        ("vcpu", "exit_io_out"),
        ("vcpu", "exit_mmio_write"),
        ("uart", "write_count"),
    ] {
        assert!(
            total[group][counter].as_u64() > Some(0),
            "{group}.{counter}: {total}"
        );
    }
    // Counted since the line before: the drive's PUT is in the boot line only.
    assert_eq!(total["put_api_requests"]["drive_count"], 1, "{total}");
}

/// The head and body of the answer to one request sent whole on a new connection.
fn raw_answer(vm: &Running, method: &str, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(&vm.sock).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

/// `cpu_template` in `PUT` or `PATCH /machine-config` gets Firecracker's `Deprecation: true`
/// header and warning line; a request without it gets no such header.
#[test]
fn cpu_template_in_machine_config_is_answered_as_deprecated() {
    let vm = Running::start("fc-deprecation", &["--level", "Warning"]);
    let with = r#"{"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "None"}"#;
    let answer = raw_answer(&vm, "PUT", "/machine-config", with);
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    assert!(answer.contains("\r\nDeprecation: true\r\n"), "{answer}");
    let answer = raw_answer(
        &vm,
        "PATCH",
        "/machine-config",
        r#"{"cpu_template": "None"}"#,
    );
    assert!(answer.contains("\r\nDeprecation: true\r\n"), "{answer}");
    for (method, body) in [
        ("PUT", r#"{"vcpu_count": 1, "mem_size_mib": 128}"#),
        ("PATCH", r#"{"vcpu_count": 2, "cpu_template": null}"#),
    ] {
        let answer = raw_answer(&vm, method, "/machine-config", body);
        assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
        assert!(!answer.contains("Deprecation"), "{method} {body}: {answer}");
    }
    let log = || vm.stderr();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !log().contains("PATCH /machine-config: cpu_template field is deprecated.") {
        assert!(std::time::Instant::now() < deadline, "{}", log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(log().contains("PUT /machine-config: cpu_template field is deprecated."));
}
