//! Boots the test guest (resources/testguest) and checks every report it prints: memory map,
//! SMP start-up through the MP table and INIT/SIPI, LAPIC timer interrupt, serial echo and
//! boot-progress timestamps.

mod common;

use std::time::Duration;

use std::path::Path;

use common::{
    as_strs, first_progress_ms, log_figure, run_args, run_skiff, test_guest, test_guest_linux64,
};

const LIMIT: Duration = Duration::from_secs(60);

/// Boots with `vcpus` and `mem` MiB, all checks on, and asserts every one passes.
fn boot_and_check(vcpus: u32, mem: u64) {
    boot_guest_and_check(test_guest(), "pvh", vcpus, mem);
}

fn boot_guest_and_check(guest: &Path, protocol: &str, vcpus: u32, mem: u64) {
    let cmdline = format!("checks=e820,smp,timer,progress,serial mem={mem} cpus={vcpus}");
    let args = run_args(guest, None, &cmdline, vcpus, mem);
    let out = run_skiff(
        &as_strs(&args),
        LIMIT,
        Some(("serial: ready for input", "hello-from-host\n")),
    );
    let lines = out.lines();
    assert!(
        out.stdout
            .contains(&format!("skiff-testguest: {protocol} boot")),
        "{}",
        out.stdout
    );
    for check in ["e820", "smp", "timer", "progress", "serial"] {
        let pass = format!("PASS {check}");
        assert!(
            lines.contains(&pass.as_str()),
            "{check} did not pass:\n{}\n{}",
            out.stdout,
            out.stderr
        );
    }
    assert!(
        lines.contains(&"serial: echo 'hello-from-host'"),
        "{}",
        out.stdout
    );
    assert!(lines.contains(&"DONE passed=5 failed=0"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains(&format!("smp: {vcpus} of {vcpus} cpus up")),
        "{}",
        out.stdout
    );
    assert_eq!(out.code, Some(0), "exit status; stderr:\n{}", out.stderr);
    for code in ["0x01", "0x10", "0x13", "0xff"] {
        assert!(
            out.stderr.contains(&format!("boot progress {code} at")),
            "no progress {code}:\n{}",
            out.stderr
        );
    }
    let first = first_progress_ms(&out.stderr).expect("a boot-progress time");
    log_figure(&format!(
        "test guest ({protocol}), {vcpus} vCPU(s), {mem} MiB: first guest instruction (progress 0x01) {first:.2} ms after process start; whole run {:.1} ms",
        out.elapsed.as_secs_f64() * 1000.0
    ));
}

#[test]
fn one_vcpu() {
    boot_and_check(1, 128);
}

#[test]
fn two_vcpus() {
    boot_and_check(2, 256);
}

#[test]
fn four_vcpus() {
    boot_and_check(4, 128);
}

#[test]
fn linux_64bit_boot_protocol() {
    boot_guest_and_check(test_guest_linux64(), "linux64", 2, 512);
}

#[test]
fn memory_above_the_32bit_hole() {
    boot_and_check(1, 4096);
}

#[test]
fn triple_fault_ends_the_vm_cleanly() {
    let guest = test_guest().to_str().unwrap().to_owned();
    let out = run_skiff(
        &["run", "--kernel", &guest, "--cmdline", "crash=triple-fault"],
        LIMIT,
        None,
    );
    assert!(out.stdout.contains("crash: triple fault"), "{}", out.stdout);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}

#[test]
fn emulation_failure_names_rip_and_ends_the_vm() {
    let guest = test_guest().to_str().unwrap().to_owned();
    let out = run_skiff(
        &["run", "--kernel", &guest, "--cmdline", "crash=mmio-exec"],
        LIMIT,
        None,
    );
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let errors = out.error_lines();
    assert_eq!(errors.len(), 1, "{}", out.stderr);
    assert!(errors[0].contains("RIP 0xc0000000"), "{}", errors[0]);
}

#[test]
fn sigterm_stops_the_vm_and_reports_it() {
    let guest = test_guest().to_str().unwrap().to_owned();
    // The serial check waits for input that never comes; SIGTERM must end the run cleanly.
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_skiff"))
        .args(["run", "--kernel", &guest, "--cmdline", "checks=serial"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stopped by signal 15"));
}

/// `--smt`: two threads per core in the CPUID topology the guest reads (one without), both
/// vCPUs up; an odd count above 1 is refused in one line, as Firecracker refuses it.
#[test]
fn smt_gives_two_threads_per_core() {
    for (smt, want) in [
        (true, "smp: 2 thread(s) per core"),
        (false, "smp: 1 thread(s) per core"),
    ] {
        let mut args = run_args(test_guest(), None, "checks=smp cpus=2", 2, 128);
        if smt {
            args.push("--smt".into());
        }
        let out = run_skiff(&as_strs(&args), LIMIT, None);
        assert!(out.lines().contains(&want), "{}", out.stdout);
        assert!(out.lines().contains(&"PASS smp"), "{}", out.stdout);
    }
    let mut args = run_args(test_guest(), None, "checks=smp cpus=3", 3, 128);
    args.push("--smt".into());
    let out = run_skiff(&as_strs(&args), LIMIT, None);
    assert_ne!(out.code, Some(0));
    assert_eq!(out.error_lines().len(), 1, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("only be 1 or an even number when SMT is enabled"),
        "{}",
        out.stderr
    );
}

/// The test guest's ring 3 (what its benchmark loops run in): port I/O through the TSS's I/O
/// bitmap (its serial lines come from ring 3), MMIO to the in-kernel LAPIC and to an address no
/// device claims (all-ones from Skiff), LAPIC timer interrupts taken in ring 3 and returned
/// to it, and the way back to ring 0 with the function's result.
#[test]
fn ring3_does_port_io_mmio_and_takes_interrupts() {
    let args = run_args(test_guest(), None, "checks=ring3", 1, 128);
    let out = run_skiff(&as_strs(&args), LIMIT, None);
    let lines = out.lines();
    for want in [
        "ring3: running in ring 3",
        "ring3: lapic version 50014, unclaimed mmio ffffffff",
        "ring3: timer interrupts taken in ring 3: enough, still in ring 3",
        "ring3: back in ring 0, ring 3 returned 5001403",
        "PASS ring3",
        "DONE passed=1 failed=0",
    ] {
        assert!(lines.contains(&want), "no '{want}':\n{}", out.stdout);
    }
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}

/// A fault in ring 3 (a read of unmapped memory, a privileged instruction) is named with its
/// ring and ends the guest with a failure, never a hang.
#[test]
fn ring3_fault_is_reported_and_ends_the_guest() {
    for (how, want) in [
        ("pf", "FAIL exception: vector 14 error 4 at rip "),
        ("gp", "FAIL exception: vector 13 error 0 at rip "),
    ] {
        let cmdline = format!("checks=ring3 ring3_fault={how}");
        let args = run_args(test_guest(), None, &cmdline, 1, 128);
        let out = run_skiff(&as_strs(&args), LIMIT, None);
        let lines = out.lines();
        let fault = lines
            .iter()
            .find(|l| l.starts_with(want))
            .unwrap_or_else(|| panic!("no '{want}':\n{}", out.stdout));
        assert!(fault.contains(" in ring 3"), "{fault}");
        if how == "pf" {
            assert!(fault.ends_with("(address 8000000000)"), "{fault}");
        }
        assert!(lines.contains(&"DONE passed=0 failed=1"), "{}", out.stdout);
        assert!(!lines.contains(&"PASS ring3"), "{}", out.stdout);
    }
}

/// The benchmark loops (here the exit loops) run in ring 3 unless `bench_ring=0`, with the same
/// rows either way; the instruction-rate rows time ring 0 and ring 3.
#[test]
fn benchmark_loops_run_in_ring3_unless_asked() {
    for (ring, param) in [(3, ""), (0, " bench_ring=0")] {
        let cmdline =
            format!("checks=exits,insns exits=200 insns_ring0=1000 insns_ring3=100000{param}");
        let args = run_args(test_guest(), None, &cmdline, 1, 128);
        let out = run_skiff(&as_strs(&args), LIMIT, None);
        let lines = out.lines();
        let ran = format!("bench: exits in ring {ring}");
        for want in [ran.as_str(), "PASS exits", "PASS insns"] {
            assert!(lines.contains(&want), "no '{want}':\n{}", out.stdout);
        }
        for row in [
            "BENCH exit port-write ops=200 bytes=0 us=",
            "BENCH exit mmio-write ops=200 bytes=0 us=",
            "BENCH cpu insns-ring0 ops=1000 bytes=0 us=",
            "BENCH cpu insns-ring3 ops=100000 bytes=0 us=",
        ] {
            assert!(
                lines.iter().any(|l| l.starts_with(row)),
                "no '{row}':\n{}",
                out.stdout
            );
        }
    }
}
