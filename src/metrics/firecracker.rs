//! Firecracker's metrics document, as 1.16.1 writes it: its groups (`block` and one
//! `block_<drive_id>` per drive, `net` and `net_<iface_id>`, `pmem` and `pmem_<id>`, `vcpu`,
//! `uart`, the `*_api_requests` groups, ...) with exactly its counter names, filled from
//! Skiff's counters. Counters Skiff does not keep read 0, and latency aggregates (`*_agg`) are
//! 0: the vCPU loop does not time its exits. Counters count since the line before, as
//! Firecracker's do; the few it stores (start-up times, latencies, signals, faults) do not.

use serde_json::{json, Map, Value};

/// Every group and its counters, in Firecracker's order; a name ending in `_agg` is a latency
/// aggregate (`min_us`, `max_us`, `sum_us`).
const GROUPS: &[(&str, &[&str])] = &[
    (
        "api_server",
        &["process_startup_time_us", "process_startup_time_cpu_us"],
    ),
    (
        "balloon",
        &[
            "activate_fails",
            "inflate_count",
            "stats_updates_count",
            "stats_update_fails",
            "deflate_count",
            "event_fails",
            "free_page_report_count",
            "free_page_report_freed",
            "free_page_report_fails",
            "free_page_hint_count",
            "free_page_hint_freed",
            "free_page_hint_fails",
        ],
    ),
    (
        "block",
        &[
            "activate_fails",
            "cfg_fails",
            "no_avail_buffer",
            "event_fails",
            "execute_fails",
            "invalid_reqs_count",
            "flush_count",
            "queue_event_count",
            "rate_limiter_event_count",
            "update_count",
            "update_fails",
            "read_bytes",
            "write_bytes",
            "read_count",
            "write_count",
            "read_agg",
            "write_agg",
            "rate_limiter_throttled_events",
            "io_engine_throttled_events",
            "remaining_reqs_count",
        ],
    ),
    ("deprecated_api", &["deprecated_http_api_calls"]),
    (
        "get_api_requests",
        &[
            "instance_info_count",
            "machine_cfg_count",
            "mmds_count",
            "vmm_version_count",
            "hotplug_memory_count",
        ],
    ),
    (
        "i8042",
        &[
            "error_count",
            "missed_read_count",
            "missed_write_count",
            "read_count",
            "reset_count",
            "write_count",
        ],
    ),
    (
        "uart",
        &[
            "error_count",
            "flush_count",
            "missed_read_count",
            "missed_write_count",
            "read_count",
            "write_count",
            "rate_limiter_dropped_bytes",
        ],
    ),
    (
        "latencies_us",
        &[
            "full_create_snapshot",
            "diff_create_snapshot",
            "load_snapshot",
            "pause_vm",
            "resume_vm",
            "vmm_full_create_snapshot",
            "vmm_diff_create_snapshot",
            "vmm_load_snapshot",
            "vmm_pause_vm",
            "vmm_resume_vm",
        ],
    ),
    (
        "logger",
        &[
            "missed_metrics_count",
            "metrics_fails",
            "missed_log_count",
            "rate_limited_log_count",
        ],
    ),
    (
        "mmds",
        &[
            "rx_accepted",
            "rx_accepted_err",
            "rx_accepted_unusual",
            "rx_bad_eth",
            "rx_invalid_token",
            "rx_no_token",
            "rx_count",
            "tx_bytes",
            "tx_count",
            "tx_errors",
            "tx_frames",
            "connections_created",
            "connections_destroyed",
        ],
    ),
    (
        "net",
        &[
            "activate_fails",
            "cfg_fails",
            "mac_address_updates",
            "no_rx_avail_buffer",
            "no_tx_avail_buffer",
            "event_fails",
            "rx_queue_event_count",
            "rx_event_rate_limiter_count",
            "rx_rate_limiter_throttled",
            "rx_tap_event_count",
            "rx_bytes_count",
            "rx_packets_count",
            "rx_fails",
            "rx_count",
            "tap_read_fails",
            "tap_write_fails",
            "tap_write_agg",
            "tx_bytes_count",
            "tx_malformed_frames",
            "tx_fails",
            "tx_count",
            "tx_packets_count",
            "tx_queue_event_count",
            "tx_rate_limiter_event_count",
            "tx_rate_limiter_throttled",
            "tx_spoofed_mac_count",
            "tx_remaining_reqs_count",
        ],
    ),
    (
        "patch_api_requests",
        &[
            "drive_count",
            "drive_fails",
            "network_count",
            "network_fails",
            "machine_cfg_count",
            "machine_cfg_fails",
            "mmds_count",
            "mmds_fails",
            "hotplug_memory_count",
            "hotplug_memory_fails",
            "pmem_count",
            "pmem_fails",
        ],
    ),
    (
        "put_api_requests",
        &[
            "actions_count",
            "actions_fails",
            "boot_source_count",
            "boot_source_fails",
            "drive_count",
            "drive_fails",
            "logger_count",
            "logger_fails",
            "machine_cfg_count",
            "machine_cfg_fails",
            "cpu_cfg_count",
            "cpu_cfg_fails",
            "metrics_count",
            "metrics_fails",
            "network_count",
            "network_fails",
            "mmds_count",
            "mmds_fails",
            "vsock_count",
            "vsock_fails",
            "pmem_count",
            "pmem_fails",
            "serial_count",
            "serial_fails",
            "hotplug_memory_count",
            "hotplug_memory_fails",
        ],
    ),
    ("seccomp", &["num_faults"]),
    (
        "vcpu",
        &[
            "exit_io_in",
            "exit_io_out",
            "exit_mmio_read",
            "exit_mmio_write",
            "failures",
            "kvmclock_ctrl_fails",
            "exit_io_in_agg",
            "exit_io_out_agg",
            "exit_mmio_read_agg",
            "exit_mmio_write_agg",
        ],
    ),
    ("vmm", &["panic_count"]),
    (
        "signals",
        &[
            "sigbus", "sigsegv", "sigxfsz", "sigxcpu", "sigpipe", "sighup", "sigill",
        ],
    ),
    (
        "vsock",
        &[
            "activate_fails",
            "cfg_fails",
            "rx_queue_event_fails",
            "tx_queue_event_fails",
            "ev_queue_event_fails",
            "muxer_event_fails",
            "conn_event_fails",
            "rx_queue_event_count",
            "tx_queue_event_count",
            "rx_bytes_count",
            "tx_bytes_count",
            "rx_packets_count",
            "tx_packets_count",
            "conns_added",
            "conns_killed",
            "conns_removed",
            "killq_resync",
            "tx_flush_fails",
            "tx_write_fails",
            "rx_read_fails",
        ],
    ),
    (
        "entropy",
        &[
            "activate_fails",
            "entropy_event_fails",
            "entropy_event_count",
            "entropy_bytes",
            "host_rng_fails",
            "entropy_rate_limiter_throttled",
            "rate_limiter_event_count",
        ],
    ),
    (
        "pmem",
        &[
            "activate_fails",
            "cfg_fails",
            "event_fails",
            "queue_event_count",
            "rate_limiter_throttled_events",
            "rate_limiter_event_count",
        ],
    ),
    ("interrupts", &["triggers", "config_updates"]),
    (
        "memory_hotplug",
        &[
            "activate_fails",
            "queue_event_fails",
            "queue_event_count",
            "plug_agg",
            "plug_count",
            "plug_bytes",
            "plug_fails",
            "unplug_agg",
            "unplug_count",
            "unplug_bytes",
            "unplug_fails",
            "unplug_discard_fails",
            "unplug_all_agg",
            "unplug_all_count",
            "unplug_all_fails",
            "state_agg",
            "state_count",
            "state_fails",
        ],
    ),
];

/// Firecracker's names for Skiff's counters where they differ, per group: (Firecracker's,
/// Skiff's).
const RENAMES: &[(&str, &[(&str, &str)])] = &[
    (
        "block",
        &[
            ("execute_fails", "io_errors"),
            ("invalid_reqs_count", "invalid_requests"),
        ],
    ),
    (
        "net",
        &[
            ("rx_bytes_count", "rx_bytes"),
            ("rx_packets_count", "rx_frames"),
            ("rx_fails", "rx_dropped"),
            ("tx_bytes_count", "tx_bytes"),
            ("tx_packets_count", "tx_frames"),
            ("tx_fails", "tx_dropped"),
        ],
    ),
    ("pmem", &[("event_fails", "invalid_requests")]),
];

fn counters_of(group: &str) -> &'static [&'static str] {
    GROUPS
        .iter()
        .find(|(name, _)| *name == group)
        .map_or(&[], |(_, counters)| *counters)
}

/// Group `group` of Firecracker's document, each counter taken from `skiff` (Skiff's counters
/// as JSON, or null) under its own name or the name [`RENAMES`] gives.
fn group(group: &str, skiff: &Value) -> Value {
    let renames = RENAMES
        .iter()
        .find(|(name, _)| *name == group)
        .map_or(&[][..], |(_, r)| *r);
    let mut map = Map::new();
    for &counter in counters_of(group) {
        let value = if counter.ends_with("_agg") {
            json!({ "min_us": 0, "max_us": 0, "sum_us": 0 })
        } else {
            let from = (renames.iter().find(|(fc, _)| *fc == counter)).map_or(counter, |r| r.1);
            json!(skiff.get(from).and_then(Value::as_u64).unwrap_or(0))
        };
        map.insert(counter.to_owned(), value);
    }
    Value::Object(map)
}

/// `a` plus `b`, number by number (objects of the same shape).
fn add(a: &mut Value, b: &Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in b {
                match a.get_mut(key) {
                    Some(mine) => add(mine, value),
                    None => {
                        a.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (a @ Value::Number(_), Value::Number(b)) => {
            *a = json!(a
                .as_u64()
                .unwrap_or(0)
                .saturating_add(b.as_u64().unwrap_or(0)));
        }
        _ => {}
    }
}

/// One group per device (`<kind>_<id>`) and their sum under `<kind>`, from Skiff's map of
/// the devices' counters by id.
fn per_device(doc: &mut Map<String, Value>, kind: &str, devices: &Value) {
    let mut total = group(kind, &Value::Null);
    for (id, counters) in devices.as_object().into_iter().flatten() {
        let one = group(kind, counters);
        add(&mut total, &one);
        doc.insert(format!("{kind}_{id}"), one);
    }
    doc.insert(kind.to_owned(), total);
}

/// Firecracker's whole document, counting from the start: `vm` is the VM's counters as
/// [`crate::vmm::Vm::metrics`] gives them (null before boot), `api` the API's.
pub fn document(vm: &Value, api: &super::ApiMetrics) -> Value {
    let mut doc = Map::new();
    doc.insert("utc_timestamp_ms".into(), json!(super::utc_timestamp_ms()));
    for (name, _) in GROUPS {
        doc.insert((*name).to_owned(), group(name, &Value::Null));
    }
    per_device(&mut doc, "block", &vm["block"]);
    per_device(&mut doc, "net", &vm["net"]);
    per_device(&mut doc, "pmem", &vm["pmem"]);
    let mut vcpus = json!({});
    for vcpu in vm["vcpu"].as_array().into_iter().flatten() {
        add(&mut vcpus, vcpu);
    }
    doc.insert("vcpu".into(), group("vcpu", &vcpus));
    for name in [
        "uart",
        "balloon",
        "vsock",
        "entropy",
        "memory_hotplug",
        "mmds",
    ] {
        doc.insert(name.into(), group(name, &vm[name]));
    }
    doc.insert("get_api_requests".into(), api.get.to_json());
    doc.insert("put_api_requests".into(), api.put.to_json());
    doc.insert("patch_api_requests".into(), api.patch.to_json());
    doc.insert("deprecated_api".into(), api.deprecated.to_json());
    Value::Object(doc)
}

/// Whether counter `name` of group `group` is one Firecracker stores (writes as it is)
/// rather than counts since the line before.
fn stored(group: &str, name: &str) -> bool {
    matches!(
        group,
        "api_server" | "latencies_us" | "seccomp" | "vmm" | "utc_timestamp_ms"
    ) || (group == "signals" && name != "sigpipe")
        || matches!(name, "min_us" | "max_us")
}

/// The line to write: `now` (a [`document`]) with each counted number less its value in
/// `before`, the document of the line before (null for the first line).
pub fn since(now: &Value, before: &Value) -> Value {
    fn walk(group: &str, now: &Value, before: &Value) -> Value {
        match now {
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(key, value)| {
                        let inner = if group.is_empty() {
                            key.as_str()
                        } else {
                            group
                        };
                        let old = before.get(key).unwrap_or(&Value::Null);
                        (key.clone(), walk_key(inner, key, value, old))
                    })
                    .collect(),
            ),
            other => other.clone(),
        }
    }
    fn walk_key(group: &str, key: &str, now: &Value, before: &Value) -> Value {
        match now {
            Value::Number(n) if !stored(group, key) => {
                json!(n
                    .as_u64()
                    .unwrap_or(0)
                    .saturating_sub(before.as_u64().unwrap_or(0)))
            }
            Value::Object(_) => walk(group, now, before),
            other => other.clone(),
        }
    }
    walk("", now, before)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Group and counter names, compared with a line Firecracker 1.16.1 wrote (with a drive
    /// `rootfs` and an interface `eth0`).
    #[test]
    fn names_are_firecrackers() {
        let theirs: Value =
            serde_json::from_str(include_str!("../../tests/firecracker/metrics.json")).unwrap();
        let vm = json!({
            "vcpu": [{"exit_io_out": 2}, {"exit_io_out": 3}],
            "block": {"rootfs": {"read_count": 4}},
            "net": {"eth0": {"rx_frames": 5}},
        });
        let ours = document(&vm, &super::super::ApiMetrics::default());
        fn shape(v: &Value) -> Value {
            match v {
                Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), shape(v))).collect(),
                _ => Value::Null,
            }
        }
        assert_eq!(shape(&ours), shape(&theirs));
        assert_eq!(ours["vcpu"]["exit_io_out"], 5);
        assert_eq!(ours["block"]["read_count"], 4);
        assert_eq!(ours["block_rootfs"]["read_count"], 4);
        assert_eq!(ours["net_eth0"]["rx_packets_count"], 5);
    }

    #[test]
    fn counted_numbers_are_since_the_line_before_and_stored_ones_as_they_are() {
        let before = json!({"vcpu": {"exit_io_in": 10, "exit_io_in_agg": {"max_us": 7, "sum_us": 5}},
                            "signals": {"sigbus": 1, "sigpipe": 2}, "block_new": null});
        let now = json!({"utc_timestamp_ms": 99,
                         "vcpu": {"exit_io_in": 15, "exit_io_in_agg": {"max_us": 7, "sum_us": 8}},
                         "signals": {"sigbus": 1, "sigpipe": 3}, "block_x": {"read_count": 4}});
        assert_eq!(
            since(&now, &before),
            json!({"utc_timestamp_ms": 99,
                   "vcpu": {"exit_io_in": 5, "exit_io_in_agg": {"max_us": 7, "sum_us": 3}},
                   "signals": {"sigbus": 1, "sigpipe": 1}, "block_x": {"read_count": 4}})
        );
    }
}
