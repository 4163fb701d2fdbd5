//! Memory hot-plug (virtio-mem) driven by the test guest's `mem` check and the API: the host
//! PATCHes the requested size, the guest plugs blocks to follow, writes every page of them and
//! reads them back, and `GET /hotplug/memory` shows what it plugged; the process's RSS grows
//! with the memory the guest touched and falls when the guest unplugs it. Bad configurations
//! and sizes are refused in one line.

mod common;

use std::time::{Duration, Instant};

use common::api::{fault, Running};
use common::{test_guest, Transport};

const LIMIT: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

/// The resident set of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"));
    kib * 1024
}

/// `GET /hotplug/memory`.
fn status(vm: &Running) -> serde_json::Value {
    let (code, body) = vm.call("GET", "/hotplug/memory", None);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn patch(vm: &Running, mib: u64) -> (u16, String) {
    let body = format!(r#"{{"requested_size_mib": {mib}}}"#);
    vm.call("PATCH", "/hotplug/memory", Some(&body))
}

/// Waits until `GET /hotplug/memory` shows `plugged` MiB plugged.
fn wait_plugged(vm: &Running, plugged: u64) {
    let start = Instant::now();
    while status(vm)["plugged_size_mib"] != plugged {
        assert!(
            start.elapsed() < LIMIT,
            "plugged_size_mib never reached {plugged}: {}\n{}",
            status(vm),
            vm.console()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Boots the test guest's `checks` with 1 GiB of hot-plug memory configured through the API.
fn boot(name: &str, checks: &str) -> Running {
    boot_on(Transport::Mmio, name, checks)
}

fn boot_on(transport: Transport, name: &str, checks: &str) -> Running {
    let vm = Running::start(name, transport.flags());
    let config = r#"{"total_size_mib": 1024, "slot_size_mib": 128, "block_size_mib": 2}"#;
    let (code, answer) = vm.call("PUT", "/hotplug/memory", Some(config));
    assert_eq!(code, 204, "{answer}");
    let source = format!(
        r#"{{"kernel_image_path": {}, "boot_args": "console=ttyS0 checks={checks}"}}"#,
        serde_json::to_string(test_guest().to_str().unwrap()).unwrap()
    );
    assert_eq!(vm.call("PUT", "/boot-source", Some(&source)).0, 204);
    let machine = r#"{"vcpu_count": 1, "mem_size_mib": 64}"#;
    assert_eq!(vm.call("PUT", "/machine-config", Some(machine)).0, 204);
    let (code, answer) = vm.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(code, 204, "{answer}");
    vm
}

/// The whole round: the guest follows the requested size up (256 MiB plugged and touched:
/// RSS grows by about that) and down (64 MiB, then everything: RSS falls back), and
/// `GET /hotplug/memory` follows the guest.
#[test]
fn the_guest_follows_the_requested_size_and_unplugged_memory_goes_back_to_the_host() {
    let vm = boot("mem-follow", "mem,ctrlaltdel");
    vm.wait_for("mem: waiting for the host to request memory", LIMIT);
    assert_eq!(
        status(&vm),
        serde_json::json!({"total_size_mib": 1024, "slot_size_mib": 128, "block_size_mib": 2,
                           "plugged_size_mib": 0, "requested_size_mib": 0})
    );
    let pid = vm.child.id();
    let before = rss(pid);
    for (bad, why) in [
        (3, "multiple of block_size_mib"),
        (2048, "at most total_size_mib"),
    ] {
        let (code, answer) = patch(&vm, bad);
        assert_eq!(code, 400, "{answer}");
        assert!(fault(&answer).contains(why), "{answer}");
    }
    assert_eq!(patch(&vm, 256).0, 204);
    vm.wait_for("mem: wrote and read back 256 MiB", LIMIT);
    wait_plugged(&vm, 256);
    assert_eq!(status(&vm)["requested_size_mib"], 256);
    let plugged = rss(pid);
    assert!(
        plugged >= before + 200 * MIB,
        "RSS went from {} to only {} MiB with 256 MiB plugged and touched",
        before / MIB,
        plugged / MIB
    );

    assert_eq!(patch(&vm, 64).0, 204);
    vm.wait_for("mem: unplugged to 64 MiB", LIMIT);
    vm.wait_for("PASS mem", LIMIT);
    wait_plugged(&vm, 0);
    let unplugged = rss(pid);
    assert!(
        unplugged + 200 * MIB <= plugged,
        "RSS went from {} MiB only down to {} MiB after the guest unplugged 256 MiB",
        plugged / MIB,
        unplugged / MIB
    );
    let (_, config) = vm.call("GET", "/vm/config", None);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        config["memory-hotplug"],
        serde_json::json!({"total_size_mib": 1024, "slot_size_mib": 128, "block_size_mib": 2}),
        "{config}"
    );
    let cad = r#"{"action_type": "SendCtrlAltDel"}"#;
    assert_eq!(vm.call("PUT", "/actions", Some(cad)).0, 204);
    vm.wait_for("PASS ctrlaltdel", LIMIT);
    assert!(!vm.console().contains("FAIL"), "{}", vm.console());
}

/// A guest touching an unplugged block gets none of its memory, even in a KVM slot kept for a
/// plugged neighbour: 256 MiB plugged and written, 192 unplugged (so that the first 128 MiB
/// slot stays present, half plugged), a request whose response would land in an unplugged
/// block goes unanswered without harm to Skiff or the device, and the guest's write and read
/// of that block give it nothing (the host's pages are PROT_NONE, which KVM cannot map): on
/// hardware KVM the VM stops with one line naming the address; where KVM emulates the access
/// (KVM PVM emulates all of the test guest's code) it reaches Skiff as MMIO and reads all-ones.
/// The RSS shows the unplugged memory back with the host, and the write took none of it.
#[test]
fn a_guest_touching_an_unplugged_block_reads_nothing() {
    for transport in Transport::BOTH {
        touching_unplugged_on(transport);
    }
}

fn touching_unplugged_on(transport: Transport) {
    let mut vm = boot_on(
        transport,
        &format!("mem-touch-{transport:?}"),
        "mem,ctrlaltdel mem_touch_unplugged=1",
    );
    vm.wait_for("mem: waiting for the host to request memory", LIMIT);
    assert_eq!(patch(&vm, 256).0, 204);
    vm.wait_for("mem: wrote and read back 256 MiB", LIMIT);
    let plugged = rss(vm.child.id());
    assert_eq!(patch(&vm, 64).0, 204);
    vm.wait_for("mem: unplugged to 64 MiB", LIMIT);
    vm.wait_for(
        "mem: a response into unplugged memory went unanswered",
        LIMIT,
    );
    let touching = vm.wait_for("mem: touching the unplugged block at ", LIMIT);
    let addr = touching.rsplit(' ').next().unwrap().trim().to_owned();
    let emulated = vm
        .try_wait_for("PASS mem", Duration::from_secs(30))
        .is_some();
    let unplugged = rss(vm.child.id());
    assert!(
        unplugged + 150 * MIB <= plugged,
        "RSS went from {} MiB only down to {} MiB after 192 MiB were unplugged",
        plugged / MIB,
        unplugged / MIB
    );
    if emulated {
        let cad = r#"{"action_type": "SendCtrlAltDel"}"#;
        assert_eq!(vm.call("PUT", "/actions", Some(cad)).0, 204);
        vm.wait_for("PASS ctrlaltdel", LIMIT);
    }
    let code = vm.wait(LIMIT);
    let (console, stderr) = (vm.console(), vm.stderr());
    assert!(!console.contains("FAIL"), "{console}");
    if emulated {
        assert!(
            console.contains("mem: read ffffffffffffffff from an unplugged block"),
            "{console}"
        );
        assert_eq!(code, Some(0), "{stderr}");
    } else {
        assert!(!console.contains("from an unplugged block"), "{console}");
        assert!(
            code.is_some_and(|c| c != 0),
            "{code:?}\n{console}\n{stderr}"
        );
        let error = stderr
            .lines()
            .find(|l| l.starts_with("skiff: error:"))
            .unwrap_or_else(|| panic!("no error line:\n{stderr}"));
        assert!(
            error.contains(&format!("at 0x{addr}, which are not memory it may use")),
            "{error}"
        );
    }
    common::log_figure(&format!(
        "virtio-mem: a guest touching the unplugged block at 0x{addr}: {}",
        if emulated {
            "KVM emulated the access as MMIO, which read all-ones"
        } else {
            "the VM stopped with a memory fault"
        }
    ));
}

/// Configurations Firecracker refuses are refused in one line; the endpoints keep their
/// pre-boot and post-boot rules.
#[test]
fn bad_configurations_and_out_of_order_requests_are_refused() {
    let vm = Running::start("mem-bad", &[]);
    for (body, why) in [
        (
            r#"{"total_size_mib": 1024, "block_size_mib": 3}"#,
            "power of two",
        ),
        (
            r#"{"total_size_mib": 1024, "block_size_mib": 1}"#,
            "at least 2 MiB",
        ),
        (
            r#"{"total_size_mib": 1024, "slot_size_mib": 64}"#,
            "at least 128 MiB",
        ),
        (r#"{"total_size_mib": 1000}"#, "multiple of it"),
        (r#"{"total_size_mib": 64}"#, "at least slot_size_mib"),
        (
            r#"{"total_size_mib": 1024, "colour": 1}"#,
            "unknown field `colour`",
        ),
        (
            r#"{"slot_size_mib": 128}"#,
            "missing field `total_size_mib`",
        ),
    ] {
        let (code, answer) = vm.call("PUT", "/hotplug/memory", Some(body));
        assert_eq!(code, 400, "{body}: {answer}");
        let message = fault(&answer);
        assert!(message.contains(why), "{body}: {message}");
        assert!(!message.contains('\n'), "{message:?}");
    }
    for (method, body) in [
        ("GET", None),
        ("PATCH", Some(r#"{"requested_size_mib": 2}"#)),
    ] {
        let (code, answer) = vm.call(method, "/hotplug/memory", body);
        assert_eq!(code, 400, "{method} before boot: {answer}");
        assert!(fault(&answer).contains("before starting"), "{answer}");
    }
    let (code, _) = vm.call("PUT", "/hotplug/memory", Some(r#"{"total_size_mib": 128}"#));
    assert_eq!(code, 204);
}

/// A VM without a hot-plug device answers GET and PATCH with one line saying so.
#[test]
fn a_vm_without_hot_plug_memory_says_so() {
    let vm = Running::start("mem-none", &[]);
    let source = format!(
        r#"{{"kernel_image_path": {}, "boot_args": "console=ttyS0 checks=ctrlaltdel"}}"#,
        serde_json::to_string(test_guest().to_str().unwrap()).unwrap()
    );
    assert_eq!(vm.call("PUT", "/boot-source", Some(&source)).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(vm.call("PUT", "/actions", Some(start)).0, 204);
    for (method, body) in [
        ("GET", None),
        ("PATCH", Some(r#"{"requested_size_mib": 2}"#)),
    ] {
        let (code, answer) = vm.call(method, "/hotplug/memory", body);
        assert_eq!(code, 400, "{answer}");
        assert!(
            fault(&answer).contains("memory hot-plug device does not exist"),
            "{answer}"
        );
    }
    let (code, _) = vm.call("PUT", "/hotplug/memory", Some(r#"{"total_size_mib": 128}"#));
    assert_eq!(code, 400, "PUT after boot");
    let cad = r#"{"action_type": "SendCtrlAltDel"}"#;
    assert_eq!(vm.call("PUT", "/actions", Some(cad)).0, 204);
    vm.wait_for("PASS ctrlaltdel", LIMIT);
}
