//! The balloon (virtio-balloon) driven by the test guest's `balloon` check through
//! Firecracker's API: the guest writes some of its memory, and inflating the balloon over
//! those pages gives them back to the host (the VMM's resident memory drops by about as much;
//! deflated pages read zeros); `PATCH /balloon` reaches the guest by a configuration interrupt;
//! statistics come from the guest every interval; free page reporting and hinting give their
//! ranges back; bad requests get Firecracker's one-line faults; metrics count it all.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::api::{fault, Running};
use common::{log_figure, test_guest, Transport};

const LIMIT: Duration = Duration::from_secs(60);
const MEM_MIB: u64 = 256;
const BEFORE_START: &str = "The requested operation is not supported before starting the microVM.";

fn tmp(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name)
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

/// Sends a request that must answer `status`; returns the body.
fn expect(vm: &Running, status: u16, method: &str, path: &str, body: Option<&str>) -> String {
    let (got, answer) = vm.call(method, path, body);
    assert_eq!(
        got,
        status,
        "{method} {path} {body:?}: {answer}\nconsole:\n{}\nstderr:\n{}",
        vm.console(),
        vm.stderr()
    );
    answer
}

/// A request that must be refused with exactly `message`, on one line.
fn refused(vm: &Running, method: &str, path: &str, body: Option<&str>, message: &str) {
    let answer = expect(vm, 400, method, path, body);
    assert_eq!(fault(&answer), message, "{method} {path}");
}

/// Configures and starts the test guest's `balloon` check (`args` added to its command line)
/// with the balloon `balloon` (none when empty) on MEM_MIB of memory.
fn boot(vm: &Running, args: &str, balloon: &str) {
    boot_checks(vm, &format!("checks=balloon {args}"), balloon);
}

/// [`boot`] with any `checks=` and parameters.
fn boot_checks(vm: &Running, args: &str, balloon: &str) {
    let source = format!(
        r#"{{"kernel_image_path": {}, "boot_args": "console=ttyS0 {args}"}}"#,
        serde_json::to_string(test_guest().to_str().unwrap()).unwrap()
    );
    expect(vm, 204, "PUT", "/boot-source", Some(&source));
    let machine = format!(r#"{{"vcpu_count": 1, "mem_size_mib": {MEM_MIB}}}"#);
    expect(vm, 204, "PUT", "/machine-config", Some(&machine));
    if !balloon.is_empty() {
        expect(vm, 204, "PUT", "/balloon", Some(balloon));
    }
    let start = r#"{"action_type": "InstanceStart"}"#;
    expect(vm, 204, "PUT", "/actions", Some(start));
}

/// Sends Ctrl-Alt-Del, which ends the guest's check: it must pass and Skiff end with 0.
fn end(mut vm: Running) {
    let action = r#"{"action_type": "SendCtrlAltDel"}"#;
    expect(&vm, 204, "PUT", "/actions", Some(action));
    vm.wait_for("DONE passed=", LIMIT);
    let console = vm.console();
    assert!(
        console.contains("PASS balloon") && !console.contains("FAIL"),
        "{console}"
    );
    assert_eq!(vm.wait(LIMIT), Some(0), "{}", vm.stderr());
}

/// The process's resident memory in bytes (smaps_rollup's Rss, or statm where there is none).
fn rss(pid: u32) -> u64 {
    if let Ok(rollup) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
        let kb = rollup.lines().find_map(|l| {
            l.strip_prefix("Rss:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse::<u64>()
                .ok()
        });
        if let Some(kb) = kb {
            return kb << 10;
        }
    }
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap();
    let pages: u64 = statm.split(' ').nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// Writes the metrics now and returns the balloon's counters.
fn balloon_metrics(vm: &Running, file: &std::path::Path) -> serde_json::Value {
    let flush = r#"{"action_type": "FlushMetrics"}"#;
    expect(vm, 204, "PUT", "/actions", Some(flush));
    common::metrics_total(file)["balloon"].clone()
}

fn metrics_file(vm: &Running, name: &str) -> PathBuf {
    let file = tmp(&format!("{name}.metrics"));
    let _ = std::fs::remove_file(&file);
    let body = format!(
        r#"{{"metrics_path": {}}}"#,
        serde_json::to_string(file.to_str().unwrap()).unwrap()
    );
    expect(vm, 204, "PUT", "/metrics", Some(&body));
    file
}

/// The guest writes 64 MiB (the VMM's resident memory goes up by that much), then the
/// balloon is inflated to 64 MiB over those pages by `PATCH /balloon`, which the guest hears
/// of by a configuration interrupt: the resident memory goes down by about 64 MiB. Deflated
/// again, the guest gets its pages back reading zeros. Requests the balloon cannot do are
/// refused with Firecracker's faults.
#[test]
fn inflating_gives_the_guest_memory_back_to_the_host() {
    let vm = Running::start("balloon-rss", &[]);
    let metrics = metrics_file(&vm, "balloon-rss");
    boot(
        &vm,
        "balloon_touch_mib=64",
        r#"{"amount_mib": 0, "deflate_on_oom": true}"#,
    );
    vm.wait_for("balloon: touched 64 MiB", LIMIT);
    vm.wait_for("balloon: at target 0 pages", LIMIT);
    let pid = vm.child.id();
    let touched = rss(pid);

    expect(&vm, 204, "PATCH", "/balloon", Some(r#"{"amount_mib": 64}"#));
    let line = vm.wait_for("balloon: configuration change 1", LIMIT);
    assert!(line.contains("target 16384 pages"), "{line}");
    vm.wait_for("balloon: at target 16384 pages", LIMIT);
    let ballooned = rss(pid);
    log_figure(&format!(
        "balloon: VMM resident memory {:.1} MiB with 64 MiB written by the guest, {:.1} MiB \
         after inflating 64 MiB ({:.1} MiB given back)",
        mib(touched),
        mib(ballooned),
        mib(touched.saturating_sub(ballooned))
    ));
    assert!(
        touched >= ballooned + (60 << 20),
        "resident memory {:.1} MiB -> {:.1} MiB: inflating 64 MiB should give about that back",
        mib(touched),
        mib(ballooned)
    );
    let shown = json(&expect(&vm, 200, "GET", "/balloon", None));
    assert_eq!(
        shown,
        serde_json::json!({"amount_mib": 64, "deflate_on_oom": true,
            "stats_polling_interval_s": 0, "free_page_hinting": false,
            "free_page_reporting": false, "actual_pages": 16384, "actual_mib": 64})
    );
    let config = json(&expect(&vm, 200, "GET", "/vm/config", None));
    assert_eq!(config["balloon"]["amount_mib"], 64, "{config}");

    refused(
        &vm,
        "PATCH",
        "/balloon",
        Some(r#"{"amount_mib": 300}"#),
        "Balloon update error: Balloon: Requested memory should be less than 300MiB",
    );
    refused(
        &vm,
        "GET",
        "/balloon/statistics",
        None,
        "Internal VMM error: Balloon: Received stats query when stats are disabled.",
    );
    refused(
        &vm,
        "PATCH",
        "/balloon/hinting/start",
        None,
        "Balloon update error: Balloon: Attempting to use hinting when not enabled",
    );
    refused(
        &vm,
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 1, "deflate_on_oom": false}"#),
        "The requested operation is not supported after starting the microVM.",
    );

    expect(&vm, 204, "PATCH", "/balloon", Some(r#"{"amount_mib": 0}"#));
    let line = vm.wait_for("balloon: deflated", LIMIT);
    assert!(line.contains("deflated 16384 pages, 0 not zero"), "{line}");
    let m = balloon_metrics(&vm, &metrics);
    assert!(m["inflate_count"].as_u64().unwrap() >= 1, "{m}");
    assert!(m["deflate_count"].as_u64().unwrap() >= 1, "{m}");
    assert_eq!(m["event_fails"], 0, "{m}");
    end(vm);
}

/// With a polling interval the guest's statistics come back every interval under Firecracker's
/// names; a new interval takes effect with an update at once; statistics cannot be turned off.
#[test]
fn statistics_come_from_the_guest_every_interval() {
    for transport in Transport::BOTH {
        statistics_on(transport);
    }
}

fn statistics_on(transport: Transport) {
    let vm = Running::start(&format!("balloon-stats-{transport:?}"), transport.flags());
    boot(
        &vm,
        "balloon_touch_mib=8",
        r#"{"amount_mib": 4, "deflate_on_oom": false, "stats_polling_interval_s": 1}"#,
    );
    vm.wait_for("balloon: at target 1024 pages", LIMIT);
    let stats = || json(&expect(&vm, 200, "GET", "/balloon/statistics", None));
    let deadline = Instant::now() + LIMIT;
    let first = loop {
        let s = stats();
        if s["minor_faults"].as_u64().unwrap_or(0) >= 3 {
            break s;
        }
        assert!(Instant::now() < deadline, "no statistics updates: {s}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(first["total_memory"], MEM_MIB << 20, "{first}");
    assert_eq!(first["major_faults"], 7, "{first}");
    assert_eq!(first["free_memory"], (MEM_MIB << 20) - (4 << 20), "{first}");
    for (key, value) in [
        ("target_pages", 1024),
        ("actual_pages", 1024),
        ("target_mib", 4),
        ("actual_mib", 4),
    ] {
        assert_eq!(first[key], value, "{key}: {first}");
    }
    assert!(first.get("swap_in").is_none(), "never given: {first}");

    refused(
        &vm,
        "PATCH",
        "/balloon/statistics",
        Some(r#"{"stats_polling_interval_s": 0}"#),
        "Balloon update error: Balloon: Statistics cannot be enabled/disabled after activation.",
    );
    let before = stats()["minor_faults"].as_u64().unwrap();
    let patch = r#"{"stats_polling_interval_s": 30}"#;
    expect(&vm, 204, "PATCH", "/balloon/statistics", Some(patch));
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats()["minor_faults"].as_u64().unwrap() <= before {
        assert!(
            Instant::now() < deadline,
            "no update at once after the new interval"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let shown = json(&expect(&vm, 200, "GET", "/balloon", None));
    assert_eq!(shown["stats_polling_interval_s"], 30, "{shown}");
    end(vm);
}

/// Before boot only PUT and GET work, and Firecracker's checks against guest memory hold both
/// ways; a VM without a balloon says so; every fault is Firecracker's, on one line.
#[test]
fn bad_balloon_requests_get_firecracker_faults() {
    let vm = Running::start("balloon-bad", &[]);
    refused(
        &vm,
        "GET",
        "/balloon",
        None,
        "Balloon config error: No balloon device found.",
    );
    for (method, path, body) in [
        ("PATCH", "/balloon", Some(r#"{"amount_mib": 1}"#)),
        ("GET", "/balloon/statistics", None),
        (
            "PATCH",
            "/balloon/statistics",
            Some(r#"{"stats_polling_interval_s": 1}"#),
        ),
        ("PATCH", "/balloon/hinting/start", None),
        ("GET", "/balloon/hinting/status", None),
        ("PATCH", "/balloon/hinting/stop", None),
    ] {
        refused(&vm, method, path, body, BEFORE_START);
    }
    let machine = format!(r#"{{"vcpu_count": 1, "mem_size_mib": {MEM_MIB}}}"#);
    expect(&vm, 204, "PUT", "/machine-config", Some(&machine));
    refused(
        &vm,
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 257, "deflate_on_oom": false}"#),
        "Balloon config error: Amount of pages requested is too large.",
    );
    let answer = expect(
        &vm,
        400,
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 1, "deflate_on_oom": false, "colour": 1}"#),
    );
    assert!(
        fault(&answer).contains("unknown field `colour`"),
        "{answer}"
    );
    let answer = expect(&vm, 400, "PUT", "/balloon", Some(r#"{"amount_mib": 1}"#));
    assert!(
        fault(&answer).contains("missing field `deflate_on_oom`"),
        "{answer}"
    );
    let good = r#"{"amount_mib": 128, "deflate_on_oom": false}"#;
    expect(&vm, 204, "PUT", "/balloon", Some(good));
    refused(
        &vm,
        "PATCH",
        "/machine-config",
        Some(r#"{"mem_size_mib": 64}"#),
        "The memory size (MiB) is smaller than the previously set balloon device target size.",
    );
    let shown = json(&expect(&vm, 200, "GET", "/balloon", None));
    assert_eq!(shown["amount_mib"], 128, "{shown}");
    assert_eq!(shown["actual_mib"], 0, "{shown}");
    let config = json(&expect(&vm, 200, "GET", "/vm/config", None));
    assert_eq!(config["balloon"]["amount_mib"], 128, "{config}");
    drop(vm);

    // A VM without a balloon.
    let vm = Running::start("balloon-none", &[]);
    boot_checks(&vm, "checks=ctrlaltdel", "");
    vm.wait_for("keys: waiting", LIMIT);
    for (method, path, body, prefix) in [
        (
            "PATCH",
            "/balloon",
            Some(r#"{"amount_mib": 1}"#),
            "Balloon update error",
        ),
        ("GET", "/balloon", None, "Internal VMM error"),
        ("GET", "/balloon/statistics", None, "Internal VMM error"),
    ] {
        let message = format!("{prefix}: Failed perform action on device: Device not found");
        refused(&vm, method, path, body, &message);
    }
}

/// Free page reporting: the ranges the guest reports go back to the host (they read zeros).
/// Free page hinting: a run started through the API, hinted ranges given back while it runs,
/// the guest's STOP left to the host (`acknowledge_on_stop` false) until `hinting/stop` sends
/// DONE. The balloon comes from the config file, and the metrics count the bytes.
#[test]
fn free_page_reporting_and_hinting_give_their_ranges_back() {
    let file = tmp("balloon-free.json");
    let metrics = tmp("balloon-free.metrics");
    let _ = std::fs::remove_file(&metrics);
    let doc = serde_json::json!({
        "boot-source": {
            "kernel_image_path": test_guest(),
            "boot_args": "console=ttyS0 checks=balloon balloon_touch_mib=4 \
                          balloon_report_mib=4 balloon_hint_mib=16",
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": MEM_MIB},
        "balloon": {"amount_mib": 0, "deflate_on_oom": false,
                    "free_page_hinting": true, "free_page_reporting": true},
        "metrics": {"metrics_path": metrics},
    });
    std::fs::write(&file, doc.to_string()).unwrap();
    let vm = Running::start("balloon-free", &["--config-file", file.to_str().unwrap()]);
    let line = vm.wait_for("balloon: reported", LIMIT);
    assert!(
        line.contains("reported 4 MiB free, 0 pages not zero"),
        "{line}"
    );
    vm.wait_for("balloon: at target 0 pages", LIMIT);
    let status = || json(&expect(&vm, 200, "GET", "/balloon/hinting/status", None));
    assert_eq!(
        status(),
        serde_json::json!({"host_cmd": 0, "guest_cmd": null})
    );
    let pid = vm.child.id();
    let before = rss(pid);
    let start = r#"{"acknowledge_on_stop": false}"#;
    expect(&vm, 204, "PATCH", "/balloon/hinting/start", Some(start));
    vm.wait_for("balloon: hinting run 2 sent 16 MiB", LIMIT);
    let after = rss(pid);
    log_figure(&format!(
        "balloon: hinting 16 MiB took the VMM's resident memory from {:.1} MiB to {:.1} MiB",
        mib(before),
        mib(after)
    ));
    assert!(
        before >= after + (14 << 20),
        "{:.1} MiB -> {:.1} MiB",
        mib(before),
        mib(after)
    );
    assert_eq!(
        status(),
        serde_json::json!({"host_cmd": 2, "guest_cmd": 0}),
        "the guest's STOP, not yet answered"
    );
    expect(&vm, 204, "PATCH", "/balloon/hinting/stop", None);
    let line = vm.wait_for("balloon: hinting run 2 done", LIMIT);
    assert!(line.contains("0 pages not zero"), "{line}");
    assert_eq!(status()["host_cmd"], 1);
    let m = balloon_metrics(&vm, &metrics);
    assert_eq!(m["free_page_report_freed"], 4 << 20, "{m}");
    assert_eq!(m["free_page_report_count"], 4, "{m}");
    assert_eq!(m["free_page_hint_freed"], 16 << 20, "{m}");
    assert_eq!(m["free_page_hint_fails"], 0, "{m}");
    let config = json(&expect(&vm, 200, "GET", "/vm/config", None));
    let mut balloon = doc["balloon"].clone();
    balloon["stats_polling_interval_s"] = 0.into();
    assert_eq!(config["balloon"], balloon, "every field shown");
    end(vm);
}
