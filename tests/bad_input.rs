//! Bad input from the command line or the files it names: each case ends with exit status 1
//! and exactly one clear `skiff: error:` line, never a panic or a hang.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{run_skiff, test_guest};

/// Runs skiff and returns its single error line.
fn error_of(args: &[&str]) -> String {
    let out = run_skiff(args, Duration::from_secs(30), None);
    assert_eq!(
        out.code,
        Some(1),
        "args {args:?}: stdout {} stderr {}",
        out.stdout,
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    let errors = out.error_lines();
    assert_eq!(errors.len(), 1, "want one error line, got:\n{}", out.stderr);
    assert_eq!(
        out.stderr.lines().count(),
        1,
        "want nothing but the error line:\n{}",
        out.stderr
    );
    errors[0].to_owned()
}

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn guest() -> String {
    test_guest().to_str().unwrap().to_owned()
}

#[test]
fn missing_kernel() {
    let e = error_of(&["run", "--kernel", "/nonexistent/vmlinux"]);
    assert!(
        e.contains("cannot read kernel /nonexistent/vmlinux") && e.contains("No such file"),
        "{e}"
    );
}

#[test]
fn kernel_that_is_a_directory() {
    let e = error_of(&["run", "--kernel", "/"]);
    assert!(
        e.contains("cannot read kernel /") && e.contains("not a regular file"),
        "{e}"
    );
}

#[test]
fn file_that_is_not_a_kernel() {
    let p = temp_file("not-a-kernel.bin", &[0x5a; 8192]);
    let e = error_of(&["run", "--kernel", p.to_str().unwrap()]);
    assert!(e.contains("is not a kernel Skiff can boot"), "{e}");
}

#[test]
fn truncated_elf_kernel() {
    let mut bytes = std::fs::read(test_guest()).unwrap();
    bytes.truncate(200);
    let p = temp_file("truncated.elf", &bytes);
    let e = error_of(&["run", "--kernel", p.to_str().unwrap()]);
    assert!(e.contains("cannot load kernel"), "{e}");
}

#[test]
fn initrd_that_does_not_fit() {
    let p = temp_file("big-initrd.img", &vec![0u8; 12 << 20]);
    let e = error_of(&[
        "run",
        "--kernel",
        &guest(),
        "--memory",
        "8",
        "--initrd",
        p.to_str().unwrap(),
    ]);
    assert!(e.contains("does not fit in guest memory"), "{e}");
}

#[test]
fn missing_initrd() {
    let e = error_of(&[
        "run",
        "--kernel",
        &guest(),
        "--initrd",
        "/nonexistent/initrd",
    ]);
    assert!(e.contains("cannot read initrd /nonexistent/initrd"), "{e}");
}

#[test]
fn zero_vcpus() {
    let e = error_of(&["run", "--kernel", &guest(), "--vcpus", "0"]);
    assert!(
        e.contains("--vcpus 0") && e.contains("between 1 and"),
        "{e}"
    );
}

#[test]
fn too_many_vcpus() {
    let e = error_of(&["run", "--kernel", &guest(), "--vcpus", "100000"]);
    assert!(e.contains("--vcpus 100000"), "{e}");
}

#[test]
fn zero_memory() {
    let e = error_of(&["run", "--kernel", &guest(), "--memory", "0"]);
    assert!(e.contains("at least 1 MiB"), "{e}");
}

#[test]
fn memory_beyond_what_the_host_can_map() {
    for mib in ["1099511627776", "18446744073709551615"] {
        let e = error_of(&["run", "--kernel", &guest(), "--memory", mib]);
        assert!(e.contains("does not fit below the host's"), "{e}");
    }
}

#[test]
fn memory_the_host_cannot_back() {
    // Within the address width but beyond a KVM memory slot or the process's address space.
    let e = error_of(&["run", "--kernel", &guest(), "--memory", "60000000"]);
    assert!(e.contains("memory"), "{e}");
}

#[test]
fn command_line_too_long() {
    let long = "x".repeat(3000);
    let e = error_of(&["run", "--kernel", &guest(), "--cmdline", &long]);
    assert!(e.contains("invalid kernel command line"), "{e}");
}

#[test]
fn kvm_device_missing() {
    let e = error_of(&[
        "run",
        "--kernel",
        &guest(),
        "--kvm-device",
        "/nonexistent/kvm",
    ]);
    assert!(e.contains("cannot open KVM device /nonexistent/kvm"), "{e}");
}

#[test]
fn kvm_device_that_is_not_kvm() {
    let e = error_of(&["run", "--kernel", &guest(), "--kvm-device", "/dev/null"]);
    assert!(e.contains("/dev/null is not a KVM device"), "{e}");
}

#[test]
fn help_explains_every_flag() {
    let out = run_skiff(&["run", "--help"], Duration::from_secs(10), None);
    assert_eq!(out.code, Some(0));
    for flag in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--vcpus",
        "--memory",
        "--kvm-device",
        "--disk",
        "--net",
        "--log-level",
    ] {
        assert!(
            out.stdout.contains(flag),
            "{flag} missing from help:\n{}",
            out.stdout
        );
    }
}

#[test]
fn disk_problems() {
    let e = error_of(&[
        "run",
        "--kernel",
        &guest(),
        "--disk",
        "path=/nonexistent/disk.img",
    ]);
    assert!(
        e.contains("cannot open disk image /nonexistent/disk.img"),
        "{e}"
    );
    let e = error_of(&["run", "--kernel", &guest(), "--disk", "path=/tmp"]);
    assert!(e.to_lowercase().contains("is a directory"), "{e}");
    let empty = temp_file("empty-disk.img", &[]);
    let e = error_of(&[
        "run",
        "--kernel",
        &guest(),
        "--disk",
        &format!("path={}", empty.display()),
    ]);
    assert!(e.contains("smaller than one 512-byte sector"), "{e}");
}

/// Makes a named pipe at a fresh path under the test's temporary directory.
fn fifo(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_file(&p);
    let status = std::process::Command::new("mkfifo")
        .arg(&p)
        .status()
        .unwrap();
    assert!(status.success(), "mkfifo {}", p.display());
    p
}

#[test]
fn disk_that_is_not_a_file_or_block_device() {
    // A read-only FIFO used to block Skiff in open() until a writer came, i.e. forever; a
    // character device used to be taken for an empty image. Both are refused at once now.
    let pipe = fifo("disk.fifo");
    for spec in [
        format!("path={},readonly=on", pipe.display()),
        format!("path={}", pipe.display()),
        "path=/dev/null,readonly=on".to_owned(),
    ] {
        let out = run_skiff(
            &["run", "--kernel", &guest(), "--disk", &spec],
            Duration::from_secs(10),
            None,
        );
        assert_eq!(
            out.code,
            Some(1),
            "--disk {spec} did not end: {}",
            out.stderr
        );
        assert!(
            out.elapsed < Duration::from_secs(5),
            "--disk {spec} took {:?}",
            out.elapsed
        );
        let errors = out.error_lines();
        assert_eq!(errors.len(), 1, "{}", out.stderr);
        let path = spec.trim_start_matches("path=").split(',').next().unwrap();
        assert!(
            errors[0].contains(&format!(
                "disk image {path} is not a regular file or block device"
            )),
            "{}",
            errors[0]
        );
    }
}

/// Runs `skiff run` with `flag spec` and checks clap refuses it (status 2) saying `want`.
fn assert_spec_refused(flag: &str, spec: &str, want: &str) {
    let out = run_skiff(
        &["run", "--kernel", &guest(), flag, spec],
        Duration::from_secs(10),
        None,
    );
    assert_eq!(out.code, Some(2), "{flag} {spec}: {}", out.stderr);
    assert!(out.stderr.contains(want), "{flag} {spec}: {}", out.stderr);
    assert!(!out.stderr.contains("panicked"));
}

#[test]
fn disk_spec_errors() {
    for (spec, want) in [
        ("readonly=on", "missing path"),
        ("path=/x,colour=red", "unknown key"),
        ("path=/x,readonly=perhaps", "on or off"),
    ] {
        assert_spec_refused("--disk", spec, want);
    }
}

#[test]
fn tap_problems() {
    // `lo` exists and is not a TAP; a name the kernel could never take; a name too long.
    let e = error_of(&["run", "--kernel", &guest(), "--net", "tap=lo"]);
    assert!(
        e.contains("cannot attach to TAP lo") && e.contains("not a TAP"),
        "{e}"
    );
    let e = error_of(&["run", "--kernel", &guest(), "--net", "tap=../x"]);
    assert!(e.contains("invalid TAP name '../x'"), "{e}");
    let e = error_of(&[
        "run",
        "--kernel",
        &guest(),
        "--net",
        "tap=a-very-long-tap-name",
    ]);
    assert!(e.contains("must be 1 to 15 bytes"), "{e}");
}

#[test]
fn net_spec_errors() {
    for (spec, want) in [
        ("mac=06:00:00:00:00:01", "missing tap"),
        ("tap=t0,speed=10", "unknown key"),
        ("tap=t0,mac=06:00:00:00:01", "not an address like"),
        ("tap=t0,mac=06:00:00:00:00:0g", "not an address like"),
    ] {
        assert_spec_refused("--net", spec, want);
    }
}

#[test]
fn firecracker_flags_do_not_mix_with_run() {
    let out = run_skiff(
        &["--api-sock", "/tmp/never.sock", "run", "--kernel", &guest()],
        Duration::from_secs(10),
        None,
    );
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("--api-sock belongs to the Firecracker-style start"),
        "{}",
        out.stderr
    );
}

/// A kernel or initrd that is a FIFO used to block Skiff in open() until a writer came (and,
/// through the API, InstanceStart and every request after it); both are refused at once, and
/// before guest memory is set up, so a huge memory size does not delay the error either.
#[test]
fn kernel_or_initrd_that_is_not_a_regular_file() {
    let pipe = fifo("kernel.fifo");
    let pipe = pipe.to_string_lossy().into_owned();
    let guest = guest();
    for (args, want) in [
        (
            vec!["run", "--kernel", pipe.as_str()],
            format!("cannot read kernel {pipe}: not a regular file"),
        ),
        (
            vec!["run", "--kernel", guest.as_str(), "--initrd", pipe.as_str()],
            format!("cannot read initrd {pipe}: not a regular file"),
        ),
        (
            vec!["run", "--kernel", "/nonexistent", "--memory", "4000000"],
            "cannot read kernel /nonexistent".to_owned(),
        ),
    ] {
        let out = run_skiff(&args, Duration::from_secs(30), None);
        assert_eq!(out.code, Some(1), "{args:?}: {}", out.stderr);
        assert!(
            out.elapsed < Duration::from_secs(5),
            "{args:?} took {:?}",
            out.elapsed
        );
        let errors = out.error_lines();
        assert_eq!(errors.len(), 1, "{}", out.stderr);
        assert!(errors[0].contains(&want), "{}", errors[0]);
    }
}
