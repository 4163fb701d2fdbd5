//! The entropy device (virtio-rng) driven by the test guest's `rng` check: requests filled
//! with random bytes (one and two buffers, different each time), a device-readable buffer left
//! unfilled, set up from the command line and through `PUT /entropy`, limited by its rate
//! limiter, counted in the metrics, and carried across a snapshot.

mod common;

use std::time::Duration;

use common::api::Running;
use common::{as_strs, run_args, run_skiff, test_guest, Transport};

const LIMIT: Duration = Duration::from_secs(60);

fn run_with_entropy(extra: &[&str], cmdline: &str) -> common::Outcome {
    let mut args = run_args(test_guest(), None, cmdline, 1, 64);
    args.extend(extra.iter().map(|s| s.to_string()));
    run_skiff(&as_strs(&args), LIMIT, None)
}

#[test]
fn the_guest_gets_random_bytes_from_the_command_line_device() {
    for transport in Transport::BOTH {
        let mut flags = vec!["--entropy"];
        flags.extend(transport.flags());
        let out = run_with_entropy(&flags, "console=ttyS0 checks=rng");
        assert!(
            out.lines().contains(&"PASS rng"),
            "{transport:?}\n{}\n{}",
            out.stdout,
            out.stderr
        );
        assert_eq!(out.code, Some(0), "{}", out.stderr);
    }
}

/// `--entropy ops=20`: 40 more requests at 20 a second, after the bucket's second's worth,
/// take about a second by the guest's clock; without the limit they take milliseconds.
#[test]
fn the_rate_limiter_holds_the_guest_to_its_rate() {
    let out = run_with_entropy(
        &["--entropy", "ops=20"],
        "console=ttyS0 checks=rng rng_ios=40",
    );
    assert!(
        out.lines().contains(&"PASS rng"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    let us: u64 = out
        .lines()
        .iter()
        .find_map(|l| {
            l.strip_prefix("rng: 40 requests of 4096 bytes in ")?
                .strip_suffix(" us")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no timing line:\n{}", out.stdout));
    assert!(
        us >= 800_000,
        "40 requests at 20/s (20 in the bucket) took only {us} us"
    );
}

#[test]
fn a_bad_entropy_flag_is_one_line() {
    let out = run_with_entropy(&["--entropy", "colour=3"], "console=ttyS0 checks=rng");
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr.contains("unknown key 'colour'"),
        "{}",
        out.stderr
    );
}

/// Through the API: `PUT /entropy` before boot (a bad body refused in one line), shown by
/// `GET /vm/config`, refused after boot, counted in the metrics.
#[test]
fn put_entropy_sets_up_the_device_and_metrics_count_it() {
    let vm = Running::start("rng-api", &[]);
    let (status, answer) = vm.call(
        "PUT",
        "/entropy",
        Some(r#"{"rate_limiter": {"ops": {"size": 0, "refill_time": 0}}, "colour": 1}"#),
    );
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("unknown field"), "{answer}");
    let (status, answer) = vm.call(
        "PUT",
        "/entropy",
        Some(r#"{"rate_limiter": {"bandwidth": {"size": 1000000, "refill_time": 1000}}}"#),
    );
    assert_eq!(status, 204, "{answer}");
    let boot = format!(
        r#"{{"kernel_image_path": {}, "boot_args": "console=ttyS0 checks=rng,ctrlaltdel"}}"#,
        serde_json::to_string(test_guest().to_str().unwrap()).unwrap()
    );
    assert_eq!(vm.call("PUT", "/boot-source", Some(&boot)).0, 204);
    let metrics = std::env::temp_dir().join(format!("skiff-rng-metrics-{}", std::process::id()));
    let _ = std::fs::remove_file(&metrics);
    let body = format!(
        r#"{{"metrics_path": {}}}"#,
        serde_json::to_string(metrics.to_str().unwrap()).unwrap()
    );
    assert_eq!(vm.call("PUT", "/metrics", Some(&body)).0, 204);
    assert_eq!(
        vm.call(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#)
        )
        .0,
        204
    );
    vm.wait_for("PASS rng", LIMIT);
    let (_, config) = vm.call("GET", "/vm/config", None);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        config["entropy"],
        serde_json::json!({"rate_limiter": {
            "bandwidth": {"size": 1000000, "one_time_burst": null, "refill_time": 1000},
            "ops": null}}),
        "{config}"
    );
    let (status, answer) = vm.call("PUT", "/entropy", Some("{}"));
    assert_eq!(status, 400, "after boot: {answer}");
    assert_eq!(
        vm.call(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "FlushMetrics"}"#)
        )
        .0,
        204
    );
    let doc = common::metrics_total(&metrics);
    assert!(
        doc["entropy"]["entropy_bytes"].as_u64().unwrap() >= 8192,
        "{doc}"
    );
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
    let _ = std::fs::remove_file(&metrics);
}
