//! The persistent memory device (virtio-pmem) driven by the test guest's `pmem` check: the
//! guest finds its region from the configuration space, reads what the host put in the file,
//! writes a pattern and flushes, after which the host finds the pattern in the file; a
//! read-only file stays as it was. Set up from the command line and through `PUT /pmem/{id}`,
//! with one-line errors for files that cannot back a device.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::api::{fault, Running};
use common::{as_strs, run_args, run_skiff, test_guest, Transport};

const LIMIT: Duration = Duration::from_secs(60);
/// Where the guest writes its pattern, and how much.
const PATTERN_OFFSET: usize = 1 << 20;
const PATTERN_BYTES: usize = 4096;
const GUEST_TEXT: &[u8] = b"SKIFF-PMEM-GUEST";

fn temp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pmem");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A 3 MiB file (not a multiple of the 2 MiB granule: the device pads it) that starts with the
/// text the guest looks for; byte i after it is i % 251.
fn host_file(name: &str) -> PathBuf {
    let path = temp(name);
    let mut bytes: Vec<u8> = (0..3usize << 20)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    bytes[..16].copy_from_slice(b"SKIFF-PMEM-HOST\n");
    std::fs::write(&path, bytes).unwrap();
    path
}

/// What the guest writes at the pattern offset (its `pmem_pattern`).
fn guest_pattern() -> Vec<u8> {
    (0..PATTERN_BYTES)
        .map(|i| match GUEST_TEXT.get(i) {
            Some(&b) => b,
            None => (i * 13 + 5).to_le_bytes()[0],
        })
        .collect()
}

fn run_with_pmem(spec: &str, cmdline: &str) -> common::Outcome {
    run_with_pmem_on(Transport::Mmio, spec, cmdline)
}

fn run_with_pmem_on(transport: Transport, spec: &str, cmdline: &str) -> common::Outcome {
    let mut args = run_args(test_guest(), None, cmdline, 1, 64);
    args.extend(["--pmem".to_owned(), spec.to_owned()]);
    args.extend(transport.flags().iter().map(|f| (*f).to_owned()));
    run_skiff(&as_strs(&args), LIMIT, None)
}

fn assert_passed(out: &common::Outcome) {
    assert!(
        out.lines().contains(&"PASS pmem"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}

/// Read-write: the region is the file padded to 4 MiB at 4 GiB (the first address above a
/// 64 MiB guest's RAM and the 32-bit hole); after the guest's flush the file holds its
/// pattern and nothing else changed.
#[test]
fn the_guest_reads_the_file_writes_it_and_flushes() {
    for transport in Transport::BOTH {
        reads_writes_and_flushes_on(transport);
    }
}

fn reads_writes_and_flushes_on(transport: Transport) {
    let path = host_file(&format!("rw-{transport:?}.img"));
    let before = std::fs::read(&path).unwrap();
    let spec = format!("path={},root=on", path.display());
    let out = run_with_pmem_on(transport, &spec, "console=ttyS0 checks=pmem");
    assert_passed(&out);
    assert!(
        out.lines().contains(&"pmem: region 100000000 size 400000"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("root=/dev/pmem0 rw"), "{}", out.stdout);
    let after = std::fs::read(&path).unwrap();
    assert_eq!(after.len(), before.len(), "the file's size changed");
    assert_eq!(
        &after[PATTERN_OFFSET..PATTERN_OFFSET + PATTERN_BYTES],
        guest_pattern().as_slice(),
        "the guest's pattern is not in the file"
    );
    assert_eq!(after[..PATTERN_OFFSET], before[..PATTERN_OFFSET]);
    assert_eq!(
        after[PATTERN_OFFSET + PATTERN_BYTES..],
        before[PATTERN_OFFSET + PATTERN_BYTES..]
    );
}

/// Read-only: the guest's writes go nowhere (KVM hands them to Skiff as MMIO writes, which
/// nothing answers), the guest reads the file unchanged, and the file is byte for byte as it
/// was; a flush still answers 0.
#[test]
fn a_read_only_file_is_left_as_it_was() {
    let path = host_file("ro.img");
    let before = std::fs::read(&path).unwrap();
    let spec = format!("path={},readonly=on,root=on", path.display());
    let out = run_with_pmem(&spec, "console=ttyS0 checks=pmem pmem_ro=1");
    assert_passed(&out);
    assert!(out.stdout.contains("root=/dev/pmem0 ro"), "{}", out.stdout);
    assert!(
        std::fs::read(&path).unwrap() == before,
        "the read-only file changed"
    );
}

/// A file that cannot back a device is one line naming it, and Skiff exits 1.
#[test]
fn unusable_files_are_one_line_errors() {
    let dir = temp("a-directory");
    std::fs::create_dir_all(&dir).unwrap();
    let empty = temp("empty.img");
    std::fs::write(&empty, b"").unwrap();
    let fifo = temp("fifo");
    let _ = std::fs::remove_file(&fifo);
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    let cases: [(&Path, &str); 5] = [
        (Path::new("/nonexistent/pmem.img"), "No such file"),
        (&dir, "is a directory"),
        (&empty, "is empty"),
        (&fifo, "is not a regular file"),
        (Path::new("/dev/null"), "is not a regular file"),
    ];
    for (path, why) in cases {
        for extra in ["", ",readonly=on"] {
            let spec = format!("path={}{extra}", path.display());
            let out = run_with_pmem(&spec, "console=ttyS0 checks=pmem");
            assert_eq!(out.code, Some(1), "{spec}: {}", out.stderr);
            let errors = out.error_lines();
            assert_eq!(errors.len(), 1, "{spec}: {}", out.stderr);
            assert!(
                errors[0].contains("pmem file")
                    && errors[0].to_lowercase().contains(&why.to_lowercase()),
                "{spec}: {}",
                errors[0]
            );
        }
    }
}

/// Through the API: `PUT /pmem/{id}` before boot (bad bodies and a second root device
/// refused in one line), shown by `GET /vm/config`, refused after boot; the flush counted in
/// the metrics; `PATCH /pmem/{id}` changes the rate limiter of the running device.
#[test]
fn put_pmem_sets_up_the_device_and_patch_changes_its_limiter() {
    let path = host_file("api.img");
    let vm = Running::start("pmem-api", &[]);
    let body = |id: &str, extra: &str| {
        format!(
            r#"{{"id": "{id}", "path_on_host": {}{extra}}}"#,
            serde_json::to_string(path.to_str().unwrap()).unwrap()
        )
    };
    for (url, bad, why) in [
        ("/pmem/a", body("b", ""), "does not match"),
        (
            "/pmem/a",
            r#"{"id": "a"}"#.to_owned(),
            "missing field `path_on_host`",
        ),
        (
            "/pmem/a",
            body("a", r#", "colour": 1"#),
            "unknown field `colour`",
        ),
        ("/pmem/a.b", body("a.b", ""), "invalid pmem id"),
    ] {
        let (status, answer) = vm.call("PUT", url, Some(&bad));
        assert_eq!(status, 400, "{bad}: {answer}");
        assert!(fault(&answer).contains(why), "{bad}: {answer}");
    }
    let drive = format!(
        r#"{{"drive_id": "root", "path_on_host": {}, "is_root_device": true}}"#,
        serde_json::to_string(path.to_str().unwrap()).unwrap()
    );
    assert_eq!(vm.call("PUT", "/drives/root", Some(&drive)).0, 204);
    let (status, answer) = vm.call(
        "PUT",
        "/pmem/pm0",
        Some(&body("pm0", r#", "root_device": true"#)),
    );
    assert_eq!(status, 400, "{answer}");
    assert!(fault(&answer).contains("drive root already is"), "{answer}");
    let disk = temp("api-disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let not_root = format!(
        r#"{{"drive_id": "root", "path_on_host": {}, "is_root_device": false}}"#,
        serde_json::to_string(disk.to_str().unwrap()).unwrap()
    );
    assert_eq!(vm.call("PUT", "/drives/root", Some(&not_root)).0, 204);
    let limited =
        r#", "root_device": true, "rate_limiter": {"ops": {"size": 10, "refill_time": 1000}}"#;
    let (status, answer) = vm.call("PUT", "/pmem/pm0", Some(&body("pm0", limited)));
    assert_eq!(status, 204, "{answer}");
    let (status, answer) = vm.call(
        "PUT",
        "/pmem/pm1",
        Some(&body("pm1", r#", "root_device": true"#)),
    );
    assert_eq!(status, 400, "{answer}");
    assert!(fault(&answer).contains("pmem pm0 already is"), "{answer}");
    let boot = format!(
        r#"{{"kernel_image_path": {}, "boot_args": "console=ttyS0 checks=pmem,ctrlaltdel"}}"#,
        serde_json::to_string(test_guest().to_str().unwrap()).unwrap()
    );
    assert_eq!(vm.call("PUT", "/boot-source", Some(&boot)).0, 204);
    let machine = r#"{"vcpu_count": 1, "mem_size_mib": 64}"#;
    assert_eq!(vm.call("PUT", "/machine-config", Some(machine)).0, 204);
    let metrics = temp("metrics.json");
    let _ = std::fs::remove_file(&metrics);
    let m = format!(
        r#"{{"metrics_path": {}}}"#,
        serde_json::to_string(metrics.to_str().unwrap()).unwrap()
    );
    assert_eq!(vm.call("PUT", "/metrics", Some(&m)).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    let (status, answer) = vm.call("PUT", "/actions", Some(start));
    assert_eq!(status, 204, "{answer}");
    vm.wait_for("PASS pmem", LIMIT);
    assert!(
        vm.console().contains("root=/dev/pmem0 rw"),
        "{}",
        vm.console()
    );

    let (_, config) = vm.call("GET", "/vm/config", None);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        config["pmem"],
        serde_json::json!([{"id": "pm0", "path_on_host": path.to_str().unwrap(),
            "root_device": true, "read_only": false,
            "rate_limiter": {"bandwidth": null,
                             "ops": {"size": 10, "one_time_burst": null, "refill_time": 1000}}}]),
        "{config}"
    );
    let (status, answer) = vm.call("PUT", "/pmem/pm0", Some(&body("pm0", "")));
    assert_eq!(status, 400, "after boot: {answer}");
    let patch = r#"{"id": "pm0", "rate_limiter": {"ops": {"size": 0, "refill_time": 0}, "bandwidth": {"size": 1048576, "refill_time": 100}}}"#;
    let (status, answer) = vm.call("PATCH", "/pmem/pm0", Some(patch));
    assert_eq!(status, 204, "{answer}");
    let (status, answer) = vm.call("PATCH", "/pmem/nope", Some(r#"{"id": "nope"}"#));
    assert_eq!(status, 400, "{answer}");
    let (_, config) = vm.call("GET", "/vm/config", None);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        config["pmem"][0]["rate_limiter"],
        serde_json::json!({"bandwidth": {"size": 1048576, "one_time_burst": null, "refill_time": 100},
                           "ops": null}),
        "{config}"
    );
    let flush = r#"{"action_type": "FlushMetrics"}"#;
    assert_eq!(vm.call("PUT", "/actions", Some(flush)).0, 204);
    // Firecracker's names: the device's group, and the request too broken to answer.
    let doc = common::metrics_total(&metrics);
    assert!(
        doc["pmem_pm0"]["queue_event_count"].as_u64() >= Some(1),
        "{doc}"
    );
    assert_eq!(doc["pmem_pm0"]["event_fails"], 1, "{doc}");
    assert_eq!(doc["pmem"]["event_fails"], 1, "{doc}");
    let cad = r#"{"action_type": "SendCtrlAltDel"}"#;
    assert_eq!(vm.call("PUT", "/actions", Some(cad)).0, 204);
    vm.wait_for("PASS ctrlaltdel", LIMIT);
}
