//! Boots the real Linux guest built by resources/linux/build.sh and checks what its kernel
//! and user space do: CPUs and memory seen, init's marker, a command's output and exit code, a
//! root disk written and read back on the host, the network (DHCP, ping, a TCP download), the
//! API boot with Ctrl-Alt-Del handled by init, and the demo's interactive shell. The same
//! checks run on hardware KVM and on KVM PVM hosts, where the pvm flavour's kernel patch lets
//! user space run (resources/linux/patches).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::netns::NetNs;
use common::{as_strs, log_figure, root, run_args, run_command, run_skiff, skiff_bin};
use skiff::config;

/// A boot to power-off takes 60-100 s under PVM emulation (the network test about 200 s);
/// leave room for a loaded CI machine.
const LIMIT: Duration = Duration::from_secs(480);

fn pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The built guest: $SKIFF_LINUX_DIR, else whatever resources/linux/build.sh produces (cached).
fn linux_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("SKIFF_LINUX_DIR") {
            return PathBuf::from(d);
        }
        let out = Command::new(root().join("resources/linux/build.sh"))
            .arg("auto")
            .output()
            .expect("run resources/linux/build.sh");
        assert!(
            out.status.success(),
            "building the Linux guest failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(
            stdout
                .lines()
                .last()
                .expect("build.sh prints the output directory"),
        )
    })
}

fn skip() -> bool {
    if std::env::var_os("SKIFF_SKIP_LINUX").is_some() {
        common::log_figure(
            "Linux guest tests skipped: SKIFF_SKIP_LINUX is set (tools/test.sh --quick)",
        );
        return true;
    }
    false
}

/// "Memory: 101752K/130680K available (...)": the second figure, in KiB.
fn memory_seen_kib(console: &str) -> Option<u64> {
    let line = console
        .lines()
        .find(|l| l.contains("] Memory: ") && l.contains("K available"))?;
    let total = line
        .split("] Memory: ")
        .nth(1)?
        .split('/')
        .nth(1)?
        .split('K')
        .next()?;
    total.parse().ok()
}

/// The address of the guest kernel's system-call entry (`nm` on vmlinux; no KASLR).
fn syscall_entry() -> String {
    let out = Command::new("nm")
        .arg(linux_dir().join("vmlinux"))
        .output()
        .expect("run nm (binutils)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_suffix(" T entry_SYSCALL_64"))
        .map(|a| format!("0x{a}"))
        .expect("no entry_SYSCALL_64 in vmlinux")
}

/// Boots `image` (vmlinux: PVH entry; bzImage: 64-bit boot protocol) from the built guest.
/// Init runs: glibc's view of AVX; a jump to the kernel's system-call entry from user mode,
/// which must fault (the pvm flavour's patch takes only a half-executed SYSCALL for one);
/// output; then an exit status init must report.
fn boot_linux(image: &str, vcpus: u32, mem_mib: u64) {
    let dir = linux_dir();
    let kernel = dir.join(image);
    let initrd = dir.join("initramfs.cpio");
    let hello = format!(
        "sh -c \"skiff-guest avx; skiff-guest forge-syscall {}; echo hello-from-linux-user-space; exit 7\"",
        syscall_entry()
    );
    // On a PVM host Skiff itself adds the kernel parameters that host needs.
    let cmdline = format!("{} -- {hello}", config::DEFAULT_CMDLINE);
    let args = run_args(&kernel, Some(&initrd), &cmdline, vcpus, mem_mib);
    let out = run_skiff(&as_strs(&args), LIMIT, None);
    let console = &out.stdout;
    let ctx = || format!("console:\n{console}\nstderr:\n{}", out.stderr);
    assert!(
        out.code.is_some(),
        "Linux did not finish within {LIMIT:?}\n{}",
        ctx()
    );
    assert!(
        console.contains("Linux version 6.1"),
        "no kernel banner\n{}",
        ctx()
    );
    assert_host_model(console);
    let cpus = if vcpus == 1 {
        "1 CPU".to_owned()
    } else {
        format!("{vcpus} CPUs")
    };
    assert!(
        console.contains(&format!("smp: Brought up 1 node, {cpus}")),
        "kernel did not bring up {cpus}\n{}",
        ctx()
    );
    let seen = memory_seen_kib(console).unwrap_or_else(|| panic!("no memory line\n{}", ctx()));
    let configured = mem_mib * 1024;
    assert!(
        seen <= configured && seen + 2048 >= configured,
        "kernel sees {seen} KiB for {configured} KiB configured\n{}",
        ctx()
    );
    let lines = out.lines();
    // Whole lines: the kernel echoes its command line, which holds the command's text too.
    for want in [
        "SKIFF-INIT-OK",
        "forged syscall: refused (SIGSEGV)",
        "hello-from-linux-user-space",
        "SKIFF-EXIT-CODE=7",
    ] {
        assert!(lines.contains(&want), "no line {want:?}\n{}", ctx());
    }
    assert!(
        console.contains("reboot: Restarting system"),
        "init did not end the VM\n{}",
        ctx()
    );
    assert_eq!(out.code, Some(0), "exit status\n{}", ctx());
    assert_avx_only_where_the_kernel_saves_it(&lines);
    log_figure(&format!(
        "Linux {image}, {vcpus} vCPU(s), {mem_mib} MiB, {}: init at {:?} s guest time, process start to power-off {:.1} s",
        host_kind(),
        guest_time_of(console, "Run /init as init process"),
        out.elapsed.as_secs_f64()
    ));
}

/// glibc in the guest uses AVX only where the guest kernel manages AVX state: on a PVM host the
/// kernel runs without XSAVE while user mode sees the host's AVX, and Skiff's GLIBC_TUNABLES
/// keep glibc off it (`skiff-guest avx`: "avx: cpuid=C kernel=K glibc=G").
fn assert_avx_only_where_the_kernel_saves_it(lines: &[&str]) {
    for name in ["avx", "avx2"] {
        let line = lines
            .iter()
            .find(|l| l.starts_with(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} line from skiff-guest: {lines:?}"));
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|v| v.parse::<u8>().ok())
                .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        };
        assert!(
            field("glibc=") <= field("kernel="),
            "glibc uses {name} that the guest kernel does not save: {line:?}"
        );
    }
}

/// How the figures name this host.
fn host_kind() -> &'static str {
    if pvm_host() {
        "KVM PVM host"
    } else {
        "hardware KVM"
    }
}

/// The kernel's timestamp, in seconds, of the first console line that contains `what`.
fn guest_time_of(console: &str, what: &str) -> Option<f64> {
    console.lines().find(|l| l.contains(what)).and_then(|l| {
        l.trim_start_matches('[')
            .split(']')
            .next()?
            .trim()
            .parse::<f64>()
            .ok()
    })
}

#[test]
fn linux_one_vcpu_128_mib() {
    if !skip() {
        boot_linux("vmlinux", 1, 128);
    }
}

#[test]
fn linux_bzimage_one_vcpu_128_mib() {
    if !skip() {
        boot_linux("bzImage", 1, 128);
    }
}

#[test]
fn linux_two_vcpus_256_mib() {
    if !skip() {
        boot_linux("vmlinux", 2, 256);
    }
}

/// The guest kernel's CPU line names the host's model (/proc/cpuinfo): KVM's brand string, or
/// the host's own where KVM leaves it empty (KVM PVM does).
fn assert_host_model(console: &str) {
    let info = std::fs::read_to_string("/proc/cpuinfo").expect("read /proc/cpuinfo");
    let model = info
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, name)| name.trim())
        .expect("no model name in /proc/cpuinfo");
    assert!(
        console.contains(&format!("{model} (family: ")),
        "guest CPU model is not the host's {model:?}\n{console}"
    );
}

/// "Mount count" and "Last mount time" from the image's superblock, read with dumpe2fs.
fn superblock_mounts(image: &Path) -> (u32, String) {
    let out = Command::new("dumpe2fs")
        .arg("-h")
        .arg(image)
        .output()
        .expect("run dumpe2fs (e2fsprogs)");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    (
        field("Mount count:").parse().unwrap_or(u32::MAX),
        field("Last mount time:"),
    )
}

/// What init runs from the root disk: write a file there, saying whether that worked.
const ROOT_WRITE: &str = "sh -c \"echo from-the-guest >/written-by-init && sync && echo root-written || echo root-is-read-only\"";

/// Boots vmlinux with a copy of the root image as /dev/vda, init running [`ROOT_WRITE`], and
/// returns the image, the console and the superblock's mount fields before and after.
fn boot_root_disk(name: &str, read_only: bool) -> (PathBuf, String, (u32, String), (u32, String)) {
    boot_root_disk_on(name, read_only, "sync")
}

/// [`boot_root_disk`] with the disk on `engine` (`sync` or `async`).
fn boot_root_disk_on(
    name: &str,
    read_only: bool,
    engine: &str,
) -> (PathBuf, String, (u32, String), (u32, String)) {
    let dir = linux_dir();
    let image = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::copy(dir.join("rootfs.ext4"), &image).unwrap();
    let before = superblock_mounts(&image);
    let cmdline = format!("{} -- {ROOT_WRITE}", config::DEFAULT_CMDLINE);
    let args = run_args(&dir.join("vmlinux"), None, &cmdline, 1, 128);
    let mut args = as_strs(&args);
    let disk = format!(
        "path={},root=on,engine={engine}{}",
        image.display(),
        if read_only { ",readonly=on" } else { "" }
    );
    args.extend(["--disk", &disk]);
    let out = run_skiff(&args, LIMIT, None);
    let ctx = || format!("console:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert_eq!(out.code, Some(0), "Linux did not power off\n{}", ctx());
    assert!(out.lines().contains(&"SKIFF-INIT-OK"), "{}", ctx());
    assert!(out.lines().contains(&"SKIFF-EXIT-CODE=0"), "{}", ctx());
    let after = superblock_mounts(&image);
    (image, out.stdout, before, after)
}

/// Linux's own virtio-blk driver (a queue of 256, many requests at once, interrupts by
/// EVENT_IDX) mounts, writes and syncs its root on the io_uring engine.
#[test]
fn linux_root_filesystem_on_an_async_disk() {
    if skip() {
        return;
    }
    let (image, console, before, after) = boot_root_disk_on("root-async.ext4", false, "async");
    assert!(console.lines().any(|l| l == "root-written"), "{console}");
    assert_eq!(after.0, before.0 + 1, "mount count {before:?} -> {after:?}");
    assert_eq!(
        debugfs(&image, "cat /written-by-init", false),
        "from-the-guest\n"
    );
}

#[test]
fn linux_root_filesystem_on_virtio_blk() {
    if skip() {
        return;
    }
    let (image, console, before, after) = boot_root_disk("root-rw.ext4", false);
    assert!(
        console.contains("virtio_blk virtio0: [vda] 131072 512-byte logical blocks"),
        "{console}"
    );
    assert!(
        console.contains("EXT4-fs (vda): mounted filesystem"),
        "{console}"
    );
    assert!(
        console.contains("VFS: Mounted root (ext4 filesystem) on device 254:0."),
        "{console}"
    );
    assert!(
        console.contains("Run /sbin/init as init process"),
        "{console}"
    );
    assert!(console.lines().any(|l| l == "root-written"), "{console}");
    // The kernel's mount and init's file reached the image.
    assert_eq!(after.0, before.0 + 1, "mount count {before:?} -> {after:?}");
    assert_ne!(after.1, before.1, "last mount time unchanged");
    assert_eq!(
        debugfs(&image, "cat /written-by-init", false),
        "from-the-guest\n"
    );
}

#[test]
fn linux_read_only_root_mounts_read_only() {
    if skip() {
        return;
    }
    let (image, console, before, after) = boot_root_disk("root-ro.ext4", true);
    assert!(
        console.contains("VFS: Mounted root (ext4 filesystem) readonly on device 254:0."),
        "{console}"
    );
    assert!(
        console.lines().any(|l| l == "root-is-read-only"),
        "{console}"
    );
    assert_eq!(after, before, "a read-only root changed the superblock");
    assert!(
        debugfs(&image, "stat /written-by-init", false).is_empty(),
        "a file appeared on the read-only root"
    );
}

/// What init runs from the root disk in the network test: print the virtio features the driver
/// took, reach the host, fetch a file over TCP and print its checksum, leave a file on the root
/// disk.
const NET_SCRIPT: &str = "set -e
mount -t sysfs sysfs /sys 2>/dev/null || true
echo virtio-features=$(cat /sys/class/net/eth0/device/features)
ping -c 3 -W 5 172.30.0.1
wget -q -O - http://172.30.0.1:8080/blob | sha256sum
echo skiff-was-here > /marker
sync
";
const GUEST_MAC: &str = "06:00:ac:1e:00:02";
const BLOB_LEN: usize = 8 << 20;

/// A copy of the guest's root image named `name`, with `script` written to `/SCRIPT_NAME`.
fn root_image_with_script(name: &str, script_name: &str, script: &str) -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let image = tmp.join(name);
    std::fs::copy(linux_dir().join("rootfs.ext4"), &image).unwrap();
    let path = tmp.join(script_name);
    std::fs::write(&path, script).unwrap();
    debugfs(
        &image,
        &format!("write {} {script_name}", path.display()),
        true,
    );
    image
}

fn debugfs(image: &Path, request: &str, write: bool) -> String {
    let mut cmd = Command::new("debugfs");
    if write {
        cmd.arg("-w");
    }
    let out = cmd
        .args(["-R", request])
        .arg(image)
        .output()
        .expect("run debugfs (e2fsprogs)");
    assert!(out.status.success(), "debugfs {request}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Serves `blob` once over HTTP/1.0 on 172.30.0.1:8080 inside `ns`.
fn serve_blob(ns: &NetNs, blob: Vec<u8>) {
    use std::io::{Read, Write};
    let listener = ns.run_in(|| std::net::TcpListener::bind("172.30.0.1:8080").unwrap());
    std::thread::spawn(move || {
        let Ok((mut conn, _)) = listener.accept() else {
            return;
        };
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
            request.push(byte[0]);
        }
        let head = format!(
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
            blob.len()
        );
        let _ = conn.write_all(head.as_bytes());
        let _ = conn.write_all(&blob);
    });
}

#[test]
fn linux_network_by_dhcp_on_virtio_net() {
    if skip() {
        return;
    }
    let dir = linux_dir();
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let image = root_image_with_script("root-net.ext4", "nettest.sh", NET_SCRIPT);

    let ns = NetNs::with_tap("linux-net", "tap0", "172.30.0.1/24");
    let dhcp = ns.dhcp_server("tap0", GUEST_MAC, "172.30.0.2");
    let blob: Vec<u8> = (0..BLOB_LEN)
        .map(|i| (i ^ (i >> 9) ^ (i >> 17)).to_le_bytes()[0])
        .collect();
    let blob_path = tmp.join("net-blob");
    std::fs::write(&blob_path, &blob).unwrap();
    let sha = Command::new("sha256sum").arg(&blob_path).output().unwrap();
    let sha = String::from_utf8_lossy(&sha.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    serve_blob(&ns, blob);

    let cmdline = format!("{} ip=dhcp -- /bin/sh /nettest.sh", config::DEFAULT_CMDLINE);
    let args = run_args(&dir.join("vmlinux"), None, &cmdline, 1, 128);
    let mut args = as_strs(&args);
    let disk = format!("path={},root=on", image.display());
    let net = format!("tap=tap0,mac={GUEST_MAC}");
    args.extend(["--disk", &disk, "--net", &net]);
    let out = run_command(ns.command(skiff_bin(), &args), LIMIT, None, None);
    let dhcp_log = dhcp.stop();
    let console = &out.stdout;
    let ctx = || {
        format!(
            "console:\n{console}\nstderr:\n{}\ndnsmasq:\n{dhcp_log}",
            out.stderr
        )
    };
    assert!(
        console.contains("IP-Config: Got DHCP answer from 172.30.0.1, my address is 172.30.0.2"),
        "no DHCP answer\n{}",
        ctx()
    );
    assert!(
        console.contains(&format!(
            "device=eth0, hwaddr={GUEST_MAC}, ipaddr=172.30.0.2, mask=255.255.255.0"
        )),
        "interface not configured\n{}",
        ctx()
    );
    assert!(
        dhcp_log.contains(&format!("DHCPACK(tap0) 172.30.0.2 {GUEST_MAC}")),
        "dnsmasq did not hand out the address\n{}",
        ctx()
    );
    // Linux's driver takes VIRTIO_NET_F_MRG_RXBUF (bit 15) when offered: the transfer below
    // then arrives spread over its page-sized receive buffers.
    let features = (console.lines())
        .find_map(|l| l.trim().strip_prefix("virtio-features="))
        .unwrap_or_else(|| panic!("no feature bits printed\n{}", ctx()));
    assert_eq!(features.as_bytes().get(15), Some(&b'1'), "{}", ctx());
    assert!(
        console.contains("3 packets transmitted, 3 packets received"),
        "ping\n{}",
        ctx()
    );
    assert!(
        console.contains(&format!("{sha}  -")),
        "the {BLOB_LEN}-byte file arrived damaged or not at all\n{}",
        ctx()
    );
    assert!(console.contains("SKIFF-EXIT-CODE=0"), "{}", ctx());
    assert_eq!(out.code, Some(0), "{}", ctx());
    assert_eq!(debugfs(&image, "cat /marker", false), "skiff-was-here\n");
    log_figure(&format!(
        "Linux ip=dhcp, ping, {BLOB_LEN}-byte TCP transfer and root-disk write, {}: {:.1} s",
        host_kind(),
        out.elapsed.as_secs_f64()
    ));
}

#[test]
fn linux_booted_through_the_api_ends_on_ctrl_alt_del_through_init() {
    if skip() {
        return;
    }
    use common::api::Running;
    let dir = linux_dir();
    let mut vm = Running::start("linux-api", &[]);
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "initrd_path": "{}", "boot_args": "{} -- sleep 600"}}"#,
        dir.join("vmlinux").display(),
        dir.join("initramfs.cpio").display(),
        config::DEFAULT_CMDLINE
    );
    assert_eq!(vm.call("PUT", "/boot-source", Some(&boot)).0, 204);
    let machine = r#"{"vcpu_count": 1, "mem_size_mib": 128}"#;
    assert_eq!(vm.call("PUT", "/machine-config", Some(machine)).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(vm.call("PUT", "/actions", Some(start)).0, 204);
    // Init has told the kernel to hand Ctrl-Alt-Del to it (as SIGINT) before its marker; the
    // keyboard has long finished its own set-up commands by then (it would take scancodes
    // arriving during them for their answers).
    vm.wait_for("input: AT Raw Set 2 keyboard", LIMIT);
    vm.wait_for("SKIFF-INIT-OK", LIMIT);
    let cad = r#"{"action_type": "SendCtrlAltDel"}"#;
    let (status, body) = vm.call("PUT", "/actions", Some(cad));
    assert_eq!(status, 204, "{body}");
    // The kernel's keyboard handler signals init, whose trap syncs and restarts the machine
    // through the i8042, long before the command's 600 s are up.
    let limit = Duration::from_secs(120);
    vm.wait_for("SKIFF-CTRL-ALT-DEL", limit);
    vm.wait_for("reboot: Restarting system", limit);
    assert_eq!(vm.wait(limit), Some(0), "{}", vm.stderr());
    let console = vm.console();
    assert!(!console.contains("Kernel panic"), "{console}");
    assert!(!console.contains("SKIFF-EXIT-CODE"), "{console}");
}

/// What a pseudo-terminal's master has read so far, filled by a reader thread.
struct Screen(std::sync::Arc<std::sync::Mutex<String>>);

impl Screen {
    fn new(mut master: std::fs::File) -> Self {
        use std::io::Read;
        let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = text.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Reading ends with EIO once every holder of the slave side has closed it.
            while let Ok(n @ 1..) = master.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self(text)
    }

    /// Waits until `what` appears after byte `from`; returns the offset just past it.
    fn wait_for(&self, what: &str, from: usize, limit: Duration) -> usize {
        let deadline = std::time::Instant::now() + limit;
        loop {
            {
                let text = self.0.lock().unwrap();
                if let Some(at) = text.get(from..).and_then(|t| t.find(what)) {
                    return from + at + what.len();
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{what:?} did not appear on the terminal within {limit:?}:\n{text}"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The README's demo, tools/demo.sh, on a pseudo-terminal as a person uses it: Ctrl-C ends a
/// command the guest's busybox shell runs, a typed command prints its result, and `reboot -f`
/// typed there ends Skiff with status 0.
#[test]
fn linux_demo_shell_on_a_terminal() {
    use std::io::Write;
    if skip() {
        return;
    }
    let (mut master, slave) = common::pty();
    let mut demo = Command::new(root().join("tools/demo.sh"));
    demo.env("SKIFF", skiff_bin())
        .env("SKIFF_LINUX_DIR", linux_dir())
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave);
    // The script execs skiff: killing the child (on a failed check too) ends the VM.
    let mut child = common::KillOnDrop(demo.spawn().expect("run tools/demo.sh"));
    // Only the child holds the slave side now, so the reader sees EIO when it ends.
    drop(demo);
    let screen = Screen::new(master.try_clone().unwrap());
    let booted = screen.wait_for("SKIFF-INIT-OK", 0, LIMIT);
    let prompt = screen.wait_for("# ", booted, Duration::from_secs(120));
    // Ctrl-C ends what the shell runs: the prompt comes back long before the sleep would.
    master.write_all(b"sleep 600\r").unwrap();
    let typed = screen.wait_for("sleep 600", prompt, Duration::from_secs(60));
    // Give the shell a moment to start it (fork and exec take about a second under PVM).
    std::thread::sleep(Duration::from_secs(5));
    master.write_all(b"\x03").unwrap();
    let interrupted = screen.wait_for("# ", typed, Duration::from_secs(120));
    // The typed line echoes as typed; only the shell's answer holds the product.
    master.write_all(b"echo $((6*7))-from-the-shell\r").unwrap();
    let answered = screen.wait_for("42-from-the-shell", interrupted, Duration::from_secs(120));
    master.write_all(b"reboot -f\r").unwrap();
    screen.wait_for(
        "reboot: Restarting system",
        answered,
        Duration::from_secs(120),
    );
    assert_eq!(
        child.wait_for(Duration::from_secs(60)),
        Some(0),
        "skiff did not exit with status 0 after the guest restarted"
    );
}

/// vsock with Linux's own driver (virtio_transport: EVENT_IDX, its credit rules, 4 KiB
/// receive buffers): the guest connects to host port 53 and sends 1 MiB of the pattern to the
/// listener at `<uds_path>_53`, then its socket on port 52 echoes 1 MiB a host program sends
/// after `CONNECT 52`, both compared byte for byte; the guest's command ends with status 0.
#[test]
fn linux_vsock_both_ways_with_the_kernels_driver() {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    if skip() {
        return;
    }
    let dir = linux_dir();
    let socks = std::env::temp_dir().join(format!("skv-linux-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&socks);
    std::fs::create_dir_all(&socks).unwrap();
    let uds = socks.join("v.sock");
    let listener = UnixListener::bind(socks.join("v.sock_53")).unwrap();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        all
    });
    let mut cmd = Command::new(skiff_bin());
    cmd.args(["--log-level", "info", "run", "--memory", "128", "--kernel"])
        .arg(dir.join("vmlinux"))
        .arg("--initrd")
        .arg(dir.join("initramfs.cpio"))
        .arg("--cmdline")
        .arg(format!(
            "{} -- sh -c \"skiff-guest vsock-send 53 1048576 && skiff-guest vsock-echo 52\"",
            config::DEFAULT_CMDLINE
        ))
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", uds.display()));
    let mut vm = common::api::Running::spawn(cmd, socks.join("none"));
    vm.wait_for("vsock-echo: listening on port 52", LIMIT);
    let got = reader.join().unwrap();
    assert_eq!(got.len(), 1 << 20);
    let pattern = |i: usize| ((i as u64).wrapping_mul(31) ^ (i as u64 >> 9)).to_le_bytes()[0];
    assert!(
        (0..got.len()).all(|i| got[i] == pattern(i)),
        "the guest's bytes differ"
    );

    let mut s = UnixStream::connect(&uds).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s.write_all(b"CONNECT 52\n").unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "closed before OK: {line:?}");
        line.push(byte[0]);
    }
    assert!(line.starts_with(b"OK "), "{line:?}");
    let sent: Vec<u8> = (0..1usize << 20)
        .map(|i| (i as u64 * 7 + i as u64 / 4099).to_le_bytes()[0])
        .collect();
    let mut writer = s.try_clone().unwrap();
    let data = sent.clone();
    let sender = std::thread::spawn(move || {
        writer.write_all(&data).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let started = std::time::Instant::now();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    sender.join().unwrap();
    log_figure(&format!(
        "Linux guest vsock echo of 1 MiB: {:?}",
        started.elapsed()
    ));
    assert!(back == sent, "{} bytes came back", back.len());
    vm.wait_for("vsock-echo: 1048576 bytes echoed", LIMIT);
    vm.wait_for("SKIFF-EXIT-CODE=0", LIMIT);
    assert_eq!(vm.wait(LIMIT), Some(0), "{}", vm.stderr());
    let _ = std::fs::remove_dir_all(&socks);
}

/// What init runs in the snapshot test: a tmpfs at /dev/shm holding a random marker and a
/// line naming it and the kernel's clocksource, then, about once a second, a counter, the
/// marker read back from that file and the guest's wall clock (`$EPOCHREALTIME`: the shell's
/// own clock_gettime, to the microsecond, which saves a fork of `date` per line under PVM).
/// Single quotes only inside: the kernel's command-line parser ends the argument at a double
/// quote.
const SNAP_SCRIPT: &str = "sh -c \"mkdir -p /dev/shm && mount -t tmpfs shm /dev/shm && \
     echo marker-$RANDOM$RANDOM >/dev/shm/m && read m </dev/shm/m && \
     read cs </sys/devices/system/clocksource/clocksource0/current_clocksource && \
     echo tmpfs-marker $m clocksource $cs && i=0 && while :; do read m </dev/shm/m; \
     echo count $i $m $EPOCHREALTIME; i=$((i+1)); sleep 1; done\"";
/// The clocksource the snapshot test's guest keeps time with. Left to itself the kernel
/// prefers the TSC where CPUID calls it invariant (kvm-clock then lowers its own rating), and
/// what a restore does to the TSC is the host's business: KVM puts the saved value back, so
/// the clock lags whatever the VMM asks, while KVM PVM gives the guest the host's TSC, so it
/// never lags. The kvm-clock is what KVM_SET_CLOCK, and so `clock_realtime`, sets.
const SNAP_CLOCKSOURCE: &str = "kvm-clock";
const SNAP_VCPUS: u32 = 2;
const SNAP_MEM_MIB: u64 = 128;
/// When the first restore (without `clock_realtime`) comes, after the snapshot.
const FIRST_RESTORE_AFTER: Duration = Duration::from_secs(5);
/// When the second restore (with `clock_realtime`) comes: past the guest kernel's RCU stall
/// timeout (CONFIG_RCU_CPU_STALL_TIMEOUT, 21 s by default), as any restore a while after its
/// snapshot is. Moved on by that much at once, a guest that was not told it had been stopped
/// (KVM_KVMCLOCK_CTRL, which the guest sees in its pvclock page) reports an RCU stall.
const SECOND_RESTORE_AFTER: Duration = Duration::from_secs(30);
/// How far the guest's wall clock may be from the host's.
const CLOCK_SLACK: f64 = 5.0;
/// How far a restored guest's clock may be from where it should be: the host's time less
/// whatever the guest was behind before the snapshot, less the time down when
/// `clock_realtime` is off. The lines reach the test a few milliseconds after the guest read
/// its clock, and the snapshot and load requests take a few tenths of a second.
const CLOCK_TOLERANCE: f64 = 1.0;
/// What a restored guest's kernel must not say: RCU stalls, lockups, clocksource watchdog
/// verdicts, oopses, warnings, stack dumps.
const RESTORE_COMPLAINTS: &[&str] = &[
    "rcu:",
    "stall",
    "lockup",
    "LOCKUP",
    "watchdog",
    "clocksource",
    "Call Trace",
    "BUG",
    "WARNING",
    "Oops",
    "panic",
    "NMI",
];

/// A `count N MARKER EPOCH` line of [`SNAP_SCRIPT`], and when the test read it.
#[derive(Debug)]
struct Count {
    n: u64,
    marker: String,
    guest_epoch: f64,
    host_epoch: f64,
}

impl Count {
    fn parse(line: &str) -> Option<Self> {
        let mut words = line
            .trim_end_matches('\r')
            .strip_prefix("count ")?
            .split(' ');
        let count = Self {
            n: words.next()?.parse().ok()?,
            marker: words.next()?.to_owned(),
            guest_epoch: words.next()?.parse().ok()?,
            host_epoch: host_epoch(),
        };
        words.next().is_none().then_some(count)
    }

    /// The guest's wall clock less the host's, in seconds.
    fn clock_offset(&self) -> f64 {
        self.guest_epoch - self.host_epoch
    }
}

fn host_epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The next console line that starts with `prefix` (the kernel echoes its command line, which
/// holds the script's words in the middle of a line).
fn line_starting(vm: &common::api::Running, prefix: &str, limit: Duration, what: &str) -> String {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match vm.try_wait_for(prefix, left) {
            Some(line) if line.starts_with(prefix) => return line,
            Some(_) => {}
            None => panic!(
                "no line starting {prefix:?} within {limit:?} {what}\nconsole:\n{}\nstderr:\n{}",
                vm.console(),
                vm.stderr()
            ),
        }
    }
}

/// The next count line.
fn next_count(vm: &common::api::Running, limit: Duration, what: &str) -> Count {
    let line = line_starting(vm, "count ", limit, what);
    Count::parse(&line).unwrap_or_else(|| panic!("not a count line {what}: {line:?}"))
}

/// Sends a request that must answer 204.
fn api_204(vm: &common::api::Running, method: &str, path: &str, body: &str) {
    let (status, answer) = vm.call(method, path, Some(body));
    assert_eq!(
        status,
        204,
        "{method} {path} {body}: {answer}\nconsole:\n{}\nstderr:\n{}",
        vm.console(),
        vm.stderr()
    );
}

/// Processes whose command line names one of `socks`: Skiffs of this test still running.
fn processes_naming(socks: &[PathBuf]) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if socks.iter().any(|s| cmdline.contains(s.to_str().unwrap())) {
            found.push(format!("{pid}: {cmdline}"));
        }
    }
    found
}

/// The lines of a restored guest's console in which its kernel complains: any of
/// [`RESTORE_COMPLAINTS`], or a timer interrupt that took a second or more (the clock jumped
/// under it).
fn restore_complaints(console: &str) -> Vec<&str> {
    console
        .lines()
        .filter(|l| {
            let slow_timer = l
                .split("hrtimer: interrupt took ")
                .nth(1)
                .and_then(|rest| rest.split(' ').next()?.parse::<u64>().ok())
                .is_some_and(|ns| ns >= 1_000_000_000);
            slow_timer || RESTORE_COMPLAINTS.iter().any(|c| l.contains(c))
        })
        .collect()
}

/// A new Skiff process that loads the snapshot with `resume_vm` and `clock_realtime`;
/// returns it, the host time it was started at, how long the load request took and the host
/// time it answered at.
fn restore_linux(
    name: &str,
    state: &Path,
    mem: &Path,
    clock_realtime: bool,
) -> (common::api::Running, f64, Duration, f64) {
    let started = host_epoch();
    let vm = common::api::Running::start(name, &[]);
    let body = serde_json::json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true,
        "clock_realtime": clock_realtime,
    })
    .to_string();
    let loading = std::time::Instant::now();
    api_204(&vm, "PUT", "/snapshot/load", &body);
    (vm, started, loading.elapsed(), host_epoch())
}

/// Checks a restored guest's first lines: the counter carries on from `last` with the same
/// tmpfs marker, the next count comes about a second later, and the guest did not boot
/// again. Returns the first count after the restore.
fn carries_on(vm: &common::api::Running, last: &Count, what: &str) -> Count {
    let first = next_count(vm, Duration::from_secs(60), what);
    assert_eq!(
        first.n,
        last.n + 1,
        "{what}: the counter should continue at {} from the shell's memory (0 is a new boot)\n\
         console:\n{}",
        last.n + 1,
        vm.console()
    );
    assert_eq!(
        first.marker,
        last.marker,
        "{what}: the file in the guest's tmpfs changed\nconsole:\n{}",
        vm.console()
    );
    let second = next_count(vm, Duration::from_secs(30), what);
    assert_eq!(
        (second.n, &second.marker),
        (first.n + 1, &last.marker),
        "{what}\nconsole:\n{}",
        vm.console()
    );
    assert!(
        (0.5..=1.0 + CLOCK_SLACK).contains(&(second.guest_epoch - first.guest_epoch)),
        "{what}: the guest's clock went from {:.3} to {:.3} between two counts a second apart\n\
         console:\n{}",
        first.guest_epoch,
        second.guest_epoch,
        vm.console()
    );
    let console = vm.console();
    for boot in ["Linux version", "SKIFF-INIT-OK", "tmpfs-marker"] {
        assert!(
            !console.contains(boot),
            "{what}: the guest booted again ({boot:?})\nconsole:\n{console}"
        );
    }
    first
}

/// Sleeps until `at` (no time if it is past).
fn sleep_until(at: std::time::Instant) {
    std::thread::sleep(at.saturating_duration_since(std::time::Instant::now()));
}

/// Firecracker's snapshots on the real Linux guest (2 vCPUs, kvm-clock: see
/// [`SNAP_CLOCKSOURCE`]). Booted through the API, its shell keeps a counter in memory and a
/// marker in a tmpfs; paused just after a count, saved as a Full snapshot and killed, it is
/// loaded twice from the same files in new processes (Skiff maps the memory file privately,
/// so the first restore leaves it as it was). Each time the counter continues from the last
/// value + 1 with the same marker and no new boot. Restored [`FIRST_RESTORE_AFTER`] the
/// snapshot without `clock_realtime`, the guest's wall clock continues from the snapshot,
/// behind by the time down; restored [`SECOND_RESTORE_AFTER`] it with `clock_realtime`, the
/// clock is moved on by that time and is as close to the host's as before the snapshot, and
/// the kernel takes the jump without an RCU stall or any other complaint. That restore ends
/// on Ctrl-Alt-Del through init, and no Skiff of the test is left running.
#[test]
fn linux_snapshot_restored_in_a_new_process_carries_on() {
    if skip() {
        return;
    }
    use common::api::Running;
    use std::time::Instant;
    let dir = linux_dir();
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("linux-snapshot");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let (state, mem) = (work.join("linux.snap"), work.join("linux.mem"));
    let names = ["linux-snap", "linux-snap-lag", "linux-snap-realtime"];

    let mut vm = Running::start(names[0], &[]);
    let boot = serde_json::json!({
        "kernel_image_path": dir.join("vmlinux"),
        "initrd_path": dir.join("initramfs.cpio"),
        "boot_args": format!(
            "{} clocksource={SNAP_CLOCKSOURCE} -- {SNAP_SCRIPT}",
            config::DEFAULT_CMDLINE
        ),
    })
    .to_string();
    api_204(&vm, "PUT", "/boot-source", &boot);
    let machine = format!(r#"{{"vcpu_count": {SNAP_VCPUS}, "mem_size_mib": {SNAP_MEM_MIB}}}"#);
    api_204(&vm, "PUT", "/machine-config", &machine);
    let started = Instant::now();
    api_204(
        &vm,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    let marker_line = line_starting(&vm, "tmpfs-marker marker-", LIMIT, "after boot");
    let words: Vec<&str> = marker_line.split_whitespace().collect();
    let marker = words[1].to_owned();
    assert_eq!(
        words.get(2..4),
        Some(&["clocksource", SNAP_CLOCKSOURCE][..]),
        "the guest keeps time with another clocksource\nconsole:\n{}",
        vm.console()
    );
    let mut last = next_count(&vm, LIMIT, "after boot");
    let boot_time = started.elapsed();
    assert_eq!((last.n, &last.marker), (0, &marker), "{}", vm.console());
    while last.n < 3 {
        let count = next_count(&vm, Duration::from_secs(30), "before the snapshot");
        assert_eq!(
            (count.n, &count.marker),
            (last.n + 1, &marker),
            "{}",
            vm.console()
        );
        last = count;
    }
    let offset_before = last.clock_offset();
    assert!(
        offset_before.abs() <= CLOCK_SLACK,
        "before any snapshot the guest's clock is {offset_before:.3} s off the host's (kvmclock \
         gives the guest the host's wall clock at boot)\nconsole:\n{}",
        vm.console()
    );

    // Paused just after a count: the guest is in its `sleep 1`, with no line half printed.
    api_204(&vm, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    for line in vm.lines_within(Duration::from_millis(500)) {
        if let Some(count) = Count::parse(&line) {
            assert_eq!(count.n, last.n + 1, "{}", vm.console());
            last = count;
        }
    }
    let create = serde_json::json!({
        "snapshot_type": "Full",
        "snapshot_path": state,
        "mem_file_path": mem,
    })
    .to_string();
    let creating = Instant::now();
    api_204(&vm, "PUT", "/snapshot/create", &create);
    let create_time = creating.elapsed();
    let (created, created_epoch) = (Instant::now(), host_epoch());
    assert_eq!(
        std::fs::metadata(&mem).unwrap().len(),
        SNAP_MEM_MIB << 20,
        "memory file size"
    );
    let _ = vm.child.kill();
    let _ = vm.child.wait();

    // Without clock_realtime the guest's clock resumes where it was saved.
    sleep_until(created + FIRST_RESTORE_AFTER);
    let (mut lag_vm, lag_started, lag_load, lag_loaded_epoch) =
        restore_linux(names[1], &state, &mem, false);
    let lag_first = carries_on(&lag_vm, &last, "after a restore without clock_realtime");
    let lag_to_first = lag_first.host_epoch - lag_loaded_epoch;
    let lag_restore = lag_first.host_epoch - lag_started;
    let lag_down = lag_loaded_epoch - created_epoch;
    let lag_offset = lag_first.clock_offset();
    assert!(
        (lag_offset - (offset_before - lag_down)).abs() <= CLOCK_TOLERANCE,
        "without clock_realtime the guest's clock should have lost the {lag_down:.3} s between \
         snapshot and load: {offset_before:.3} s off the host's before, {lag_offset:.3} s \
         after\nconsole:\n{}",
        lag_vm.console()
    );
    let _ = lag_vm.child.kill();
    let _ = lag_vm.child.wait();
    let lag_console = lag_vm.console();

    // With clock_realtime it is moved on by the time the VM was down.
    sleep_until(created + SECOND_RESTORE_AFTER);
    let (mut vm, rt_started, rt_load, rt_loaded_epoch) =
        restore_linux(names[2], &state, &mem, true);
    let first = carries_on(&vm, &last, "after a restore with clock_realtime");
    let rt_to_first = first.host_epoch - rt_loaded_epoch;
    let rt_restore = first.host_epoch - rt_started;
    let rt_down = rt_loaded_epoch - created_epoch;
    let offset = first.clock_offset();
    assert!(
        (offset - offset_before).abs() <= CLOCK_TOLERANCE && offset.abs() <= CLOCK_SLACK,
        "with clock_realtime the guest's clock should be moved on by the {rt_down:.3} s \
         between snapshot and load: {offset_before:.3} s off the host's before, {offset:.3} s \
         after\nconsole:\n{}",
        vm.console()
    );
    // A few more seconds for the kernel's stall checks, which run on its timer ticks.
    while next_count(&vm, Duration::from_secs(30), "after the restore").n < first.n + 5 {}
    api_204(
        &vm,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    let limit = Duration::from_secs(120);
    vm.wait_for("SKIFF-CTRL-ALT-DEL", limit);
    vm.wait_for("reboot: Restarting system", limit);
    assert_eq!(vm.wait(limit), Some(0), "{}", vm.stderr());
    let console = vm.console();
    let socks = names.map(Running::fresh_sock);
    let left = processes_naming(&socks);
    assert!(left.is_empty(), "still running: {left:?}");

    log_figure(&format!(
        "Linux snapshot, {SNAP_VCPUS} vCPUs, {SNAP_MEM_MIB} MiB, {}: InstanceStart to first \
         count {:.1} s; Full snapshot {:.2} s; restore without clock_realtime {lag_down:.1} s \
         after it: load {:.2} s, new process to first count {lag_restore:.1} s (load to first \
         count {lag_to_first:.1} s), guest clock {lag_offset:+.3} s; with clock_realtime \
         {rt_down:.1} s after: load {:.2} s, new process to first count {rt_restore:.1} s \
         (load to first count {rt_to_first:.1} s), guest clock {offset:+.3} s; guest clock \
         before the snapshot {offset_before:+.3} s",
        host_kind(),
        boot_time.as_secs_f64(),
        create_time.as_secs_f64(),
        lag_load.as_secs_f64(),
        rt_load.as_secs_f64(),
    ));
    for (what, text) in [("without", &lag_console), ("with", &console)] {
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && Count::parse(l).is_none())
        {
            log_figure(&format!(
                "restored {what} clock_realtime, the guest said: {}",
                line.trim_end_matches('\r')
            ));
        }
        let complaints = restore_complaints(text);
        assert!(
            complaints.is_empty(),
            "restored {what} clock_realtime, the guest's kernel complained:\n{}\nconsole:\n{text}",
            complaints.join("\n")
        );
    }
}

/// What the device test's guest runs, from the ext4 filesystem on its pmem device (the
/// command line copies it to the initramfs's /tmp first, so that /mnt can be unmounted).
/// Each part prints what it saw on lines the host test reads; the parts that wait for the
/// host (balloon, hot-plug) poll /proc/meminfo's MemTotal, with shell builtins (no fork), for
/// at most two minutes.
const DEVICES_SCRIPT: &str = r#"meminfo() { { read -r _ total _; read -r _ free _; read -r _ avail _; } </proc/meminfo; }
# Waits until MemTotal is `$1` $2 kB (the balloon and the hot-plug driver change it in steps).
memtotal_becomes() {
	i=0
	while meminfo; [ $i -lt 240 ] && ! [ "$total" "$1" "$2" ]; do sleep 0.5; i=$((i+1)); done
}
read -r current </sys/class/misc/hw_random/rng_current
echo "rng: rng_current $current"
set -- $(od -An -v -tx1 -N 32 /dev/hwrng)
echo "rng: $# bytes from /dev/hwrng: $*"

while read -r dev at fs opts _; do
	[ "$dev" = /dev/pmem0 ] && echo "pmem: mounted $dev on $at type $fs ($opts)"
done </proc/mounts
echo "pmem-wrote-this-$RANDOM$RANDOM" >/mnt/from-the-guest
sync
read -r line </mnt/from-the-guest
echo "pmem: wrote $line to /mnt/from-the-guest and synced"
umount /mnt && echo "pmem: unmounted"

meminfo
echo "balloon: MemTotal $total kB MemFree $free kB MemAvailable $avail kB"
skiff-guest hold 64 8
t0=$total
echo "balloon: waiting for the host to inflate the balloon"
memtotal_becomes -le $((t0 - 16384))
meminfo
echo "balloon: MemTotal $t0 kB -> $total kB, MemAvailable $avail kB"

t1=$total
echo "hotplug: waiting for the host to plug memory"
memtotal_becomes -ge $((t1 + 122880))
meminfo
echo "hotplug: MemTotal $t1 kB -> $total kB"
for b in /sys/devices/system/memory/memory*; do
	read -r state <$b/state
	[ "${b##*memory}" -ge 32 ] && echo "hotplug: ${b##*/} $state"
done

ip link set eth0 up
ip addr add 169.254.0.2/16 dev eth0
url=http://169.254.169.254/latest/meta-data/greeting
echo "mmds: GET without a token: $(wget -O- $url 2>&1 | tail -n 1)"
token=$(printf 'PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n' | nc 169.254.169.254 80 | tail -n 1)
echo "mmds: PUT /latest/api/token gave a token of ${#token} characters"
echo "mmds: GET with the token: $(wget -q -O- --header "X-metadata-token: $token" $url)"
echo "mmds: GET with a made-up token: $(wget -O- --header 'X-metadata-token: made-up' $url 2>&1 | tail -n 1)"
"#;

/// The value the device test puts in MMDS, at /latest/meta-data/greeting.
const MMDS_GREETING: &str = "hello-from-the-mmds-store";

/// `GET /balloon/statistics`.
fn balloon_stats(vm: &common::api::Running) -> serde_json::Value {
    let (status, body) = vm.call("GET", "/balloon/statistics", None);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The resident set of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"))
}

/// A number the guest printed after `key` on the line that starts with `prefix`.
fn number_after(line: &str, key: &str) -> u64 {
    line.split(key)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {key:?} in {line:?}"))
}

/// The Linux drivers of the devices the test guest checks on its own: one guest booted
/// through the API with virtio-rng, a balloon, a pmem device, virtio-mem and MMDS on a
/// virtio-net interface, its script ([`DEVICES_SCRIPT`]) on the pmem device's ext4.
/// - entropy: the kernel picks virtio_rng as its hwrng and /dev/hwrng gives bytes;
/// - pmem: the filesystem is mounted (DAX off: the kernel has no FS_DAX), a file written and
///   synced in the guest is in the backing file afterwards (debugfs);
/// - balloon: the statistics, read on the host, show the guest's free memory fall by the
///   64 MiB it holds; inflated by 16 MiB (the emulated kernel of a PVM
///   host takes about 3 s a MiB), the guest's MemTotal falls by that much,
///   `actual_mib` follows and Skiff's RSS falls;
/// - virtio-mem: 128 MiB requested with `PATCH /hotplug/memory`, the guest's driver plugs it,
///   the kernel onlines it (memhp_default_state=online), MemTotal grows by it and
///   `GET /hotplug/memory` shows it plugged;
/// - MMDS V2: busybox wget without a token gets 401, a token from `PUT /latest/api/token`
///   (busybox nc) opens the store, a made-up token gets 401.
#[test]
fn linux_drivers_of_entropy_balloon_pmem_memory_hotplug_and_mmds() {
    use common::api::Running;
    if skip() {
        return;
    }
    let dir = linux_dir();
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let files = tmp.join("linux-devices");
    let _ = std::fs::remove_dir_all(&files);
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("devices.sh"), DEVICES_SCRIPT).unwrap();
    let pmem = tmp.join("linux-devices-pmem.ext4");
    let _ = std::fs::remove_file(&pmem);
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "skiff-pmem", "-d"])
        .arg(&files)
        .arg(&pmem)
        .arg("32M")
        .output()
        .expect("run mkfs.ext4 (e2fsprogs)");
    assert!(mkfs.status.success(), "mkfs.ext4: {mkfs:?}");

    let ns = NetNs::with_tap("linux-devices", "tap0", "172.30.0.1/24");
    let name = "linux-devices";
    let sock = Running::fresh_sock(name);
    let mut vm = Running::spawn(
        ns.command(skiff_bin(), &["--api-sock", sock.to_str().unwrap()]),
        sock,
    );
    vm.wait_for_socket();
    let started = std::time::Instant::now();
    let cmdline = format!(
        "{} memhp_default_state=online -- sh -c \"mount -t ext4 /dev/pmem0 /mnt && \
         cp /mnt/devices.sh /tmp/ && exec sh /tmp/devices.sh\"",
        config::DEFAULT_CMDLINE
    );
    let boot = serde_json::json!({
        "kernel_image_path": dir.join("vmlinux"),
        "initrd_path": dir.join("initramfs.cpio"),
        "boot_args": cmdline,
    });
    let pmem_body = serde_json::json!({"id": "pmem0", "path_on_host": pmem});
    let store = serde_json::json!({"latest": {"meta-data": {"greeting": MMDS_GREETING}}});
    for (method, path, body) in [
        ("PUT", "/boot-source", boot.to_string()),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 256}"#.to_owned(),
        ),
        ("PUT", "/entropy", "{}".to_owned()),
        (
            "PUT",
            "/balloon",
            r#"{"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1}"#
                .to_owned(),
        ),
        ("PUT", "/pmem/pmem0", pmem_body.to_string()),
        (
            "PUT",
            "/hotplug/memory",
            r#"{"total_size_mib": 256, "slot_size_mib": 128, "block_size_mib": 2}"#.to_owned(),
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            format!(
                r#"{{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "{GUEST_MAC}"}}"#
            ),
        ),
        (
            "PUT",
            "/mmds/config",
            r#"{"version": "V2", "network_interfaces": ["eth0"]}"#.to_owned(),
        ),
        ("PUT", "/mmds", store.to_string()),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#.to_owned(),
        ),
    ] {
        api_204(&vm, method, path, &body);
    }
    let ctx = |vm: &Running| format!("console:\n{}\nstderr:\n{}", vm.console(), vm.stderr());

    let current = line_starting(&vm, "rng: rng_current ", LIMIT, "after boot");
    assert_eq!(current, "rng: rng_current virtio_rng.0", "{}", ctx(&vm));
    let bytes = line_starting(&vm, "rng: ", LIMIT, "reading /dev/hwrng");
    let hex: Vec<&str> = bytes
        .split(": ")
        .nth(2)
        .unwrap_or_default()
        .split(' ')
        .collect();
    assert!(
        bytes.starts_with("rng: 32 bytes from /dev/hwrng: ")
            && hex.len() == 32
            && hex.iter().any(|b| *b != hex[0]),
        "{bytes:?}\n{}",
        ctx(&vm)
    );

    let mounted = line_starting(&vm, "pmem: mounted ", LIMIT, "mounting pmem");
    assert!(
        mounted.starts_with("pmem: mounted /dev/pmem0 on /mnt type ext4 (rw")
            && !mounted.contains("dax"),
        "{mounted:?}\n{}",
        ctx(&vm)
    );
    let wrote = line_starting(&vm, "pmem: wrote ", LIMIT, "writing to pmem");
    let written = wrote.split_whitespace().nth(2).unwrap().to_owned();
    line_starting(&vm, "pmem: unmounted", LIMIT, "unmounting pmem");

    let before = line_starting(&vm, "balloon: MemTotal ", LIMIT, "before the balloon");
    let mem_free = number_after(&before, "MemFree ");
    let idle = balloon_stats(&vm);
    line_starting(&vm, "hold: 64 MiB touched", LIMIT, "holding memory");
    // The statistics come every second; the guest holds the memory for 8.
    let deadline = std::time::Instant::now() + Duration::from_secs(6);
    let mut holding = balloon_stats(&vm);
    while holding["free_memory"].as_u64() > idle["free_memory"].as_u64().map(|f| f - (48 << 20))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(250));
        holding = balloon_stats(&vm);
    }
    let free = |s: &serde_json::Value| s["free_memory"].as_u64().unwrap_or(0) >> 10;
    assert!(
        free(&holding) + (48 << 10) <= free(&idle),
        "the statistics' free_memory went from {} to only {} KiB while the guest held 64 MiB\n\
         {idle}\n{holding}\n{}",
        free(&idle),
        free(&holding),
        ctx(&vm)
    );
    assert_eq!(
        holding["total_memory"].as_u64().map(|t| t >> 10),
        Some(number_after(&before, "MemTotal ")),
        "{holding}"
    );
    line_starting(&vm, "balloon: waiting", LIMIT, "before inflating");
    let pid = vm.child.id();
    let rss_before = rss_kib(pid);
    api_204(&vm, "PATCH", "/balloon", r#"{"amount_mib": 16}"#);
    let inflated = line_starting(&vm, "balloon: MemTotal ", LIMIT, "inflating");
    let (t0, t1) = (
        number_after(&inflated, "MemTotal "),
        number_after(&inflated, "-> "),
    );
    assert!(
        t0 - t1 >= 16 << 10,
        "MemTotal went from {t0} to {t1} kB with a 16 MiB balloon\n{}",
        ctx(&vm)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut stats = balloon_stats(&vm);
    while stats["actual_mib"] != 16 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        stats = balloon_stats(&vm);
    }
    assert_eq!(stats["actual_mib"], 16, "{stats}");
    // The guest gives up pages it freed a moment ago (those it held), which the host had.
    let rss_after = rss_kib(pid);
    assert!(
        rss_after + (8 << 10) <= rss_before,
        "Skiff's RSS went from {rss_before} only to {rss_after} KiB with a 16 MiB balloon"
    );

    line_starting(&vm, "hotplug: waiting", LIMIT, "before plugging");
    api_204(
        &vm,
        "PATCH",
        "/hotplug/memory",
        r#"{"requested_size_mib": 128}"#,
    );
    let grown = line_starting(&vm, "hotplug: MemTotal ", LIMIT, "plugging");
    let (h0, h1) = (
        number_after(&grown, "MemTotal "),
        number_after(&grown, "-> "),
    );
    assert!(
        h1 >= h0 + (120 << 10),
        "MemTotal went from {h0} to {h1} kB with 128 MiB plugged\n{}",
        ctx(&vm)
    );
    let (status, plugged) = vm.call("GET", "/hotplug/memory", None);
    assert_eq!(status, 200, "{plugged}");
    let plugged: serde_json::Value = serde_json::from_str(&plugged).unwrap();
    assert_eq!(
        (&plugged["plugged_size_mib"], &plugged["requested_size_mib"]),
        (&128.into(), &128.into()),
        "{plugged}"
    );

    let refused = line_starting(&vm, "mmds: GET without a token: ", LIMIT, "MMDS");
    assert!(
        refused.contains("HTTP/1.1 401"),
        "{refused:?}\n{}",
        ctx(&vm)
    );
    let token = line_starting(&vm, "mmds: PUT ", LIMIT, "MMDS token");
    assert!(
        number_after(&token, "a token of ") > 0,
        "{token:?}\n{}",
        ctx(&vm)
    );
    let answered = line_starting(&vm, "mmds: GET with the token: ", LIMIT, "MMDS");
    assert!(
        answered.contains(MMDS_GREETING),
        "{answered:?}\n{}",
        ctx(&vm)
    );
    let made_up = line_starting(&vm, "mmds: GET with a made-up token: ", LIMIT, "MMDS");
    assert!(
        made_up.contains("HTTP/1.1 401"),
        "{made_up:?}\n{}",
        ctx(&vm)
    );

    vm.wait_for("SKIFF-EXIT-CODE=0", LIMIT);
    assert_eq!(vm.wait(LIMIT), Some(0), "{}", vm.stderr());
    let elapsed = started.elapsed();
    assert_eq!(
        debugfs(&pmem, "cat /from-the-guest", false),
        format!("{written}\n"),
        "the file the guest wrote on /dev/pmem0 is not in the backing file"
    );
    let console = vm.console();
    let lines: Vec<&str> = console.lines().map(|l| l.trim_end_matches('\r')).collect();
    for line in lines.iter().filter(|l| {
        [
            "rng: ",
            "pmem: ",
            "balloon: ",
            "hold: ",
            "hotplug: ",
            "mmds: ",
        ]
        .iter()
        .any(|p| l.starts_with(p))
            || l.contains("] virtio_mem ")
            || l.contains("] EXT4-fs (pmem0)")
    }) {
        log_figure(&format!("Linux devices, the guest said: {line}"));
    }
    log_figure(&format!(
        "Linux devices, host side: balloon statistics free_memory {} KiB idle, {} KiB while the \
         guest held 64 MiB (MemFree {mem_free} kB before); Skiff's RSS {rss_before} KiB before \
         inflating 16 MiB, {rss_after} KiB after; GET /hotplug/memory {plugged}",
        free(&idle),
        free(&holding),
    ));
    log_figure(&format!(
        "Linux devices (entropy, pmem, balloon, virtio-mem, MMDS), {}: InstanceStart to \
         power-off {:.1} s",
        host_kind(),
        elapsed.as_secs_f64()
    ));
}

/// What init runs from the root disk in the virtio-pci test: show the PCI functions and their
/// driver, the MSI-X interrupts, read and write the second disk, read the entropy device,
/// reach the host over the network and send bytes over vsock.
const PCI_SCRIPT: &str = "set -e
echo pci-ids $(cat /sys/bus/pci/devices/*/vendor /sys/bus/pci/devices/*/device | tr '\\n' ' ')
echo virtio-pci-bound $(ls /sys/bus/pci/drivers/virtio-pci | grep -c 0000:)
grep PCI-MSI /proc/interrupts | sed 's/^ */msi-line /'
head -c 4096 /dev/vdb | sha256sum | sed 's/^/vdb-read /'
printf skiff-pci-wrote-this | dd of=/dev/vdb bs=4096 seek=1 conv=sync,notrunc 2>/dev/null
sync
echo rng $(cat /sys/class/misc/hw_random/rng_current) $(head -c 64 /dev/hwrng | wc -c)
ping -c 3 -W 5 172.30.0.1
skiff-guest vsock-send 53 65536
";

/// `--enable-pci`: Linux finds every virtio device as a virtio-pci function (vendor 0x1af4,
/// device 0x1040 + type) through the conf1 ports, drives it with MSI-X vectors (PCI-MSI lines
/// in /proc/interrupts, one per queue and one for configuration changes, delivered to both
/// vCPUs), and the devices do
/// their work over that transport: the root disk mounts, a second disk is read (checksum
/// compared with the host's) and written (bytes checked in the file), the entropy device
/// gives bytes, ping crosses the network, and vsock carries 64 KiB to a host listener.
#[test]
fn linux_devices_on_virtio_pci_with_msix() {
    use std::io::Read;
    use std::os::unix::net::UnixListener;
    if skip() {
        return;
    }
    let dir = linux_dir();
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let image = root_image_with_script("root-pci.ext4", "pcitest.sh", PCI_SCRIPT);
    let data = tmp.join("pci-data.img");
    let bytes: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
        .collect();
    std::fs::write(&data, &bytes).unwrap();
    let head = tmp.join("pci-data-head");
    std::fs::write(&head, &bytes[..4096]).unwrap();
    let sha = Command::new("sha256sum").arg(&head).output().unwrap();
    let sha = String::from_utf8_lossy(&sha.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();

    let socks = std::env::temp_dir().join(format!("skv-pci-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&socks);
    std::fs::create_dir_all(&socks).unwrap();
    let uds = socks.join("v.sock");
    let listener = UnixListener::bind(socks.join("v.sock_53")).unwrap();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        all
    });

    let ns = NetNs::with_tap("linux-pci", "tap0", "172.30.0.1/24");
    let cmdline = format!(
        "{} ip=172.30.0.2::172.30.0.1:255.255.255.0::eth0:off -- /bin/sh /pcitest.sh",
        config::DEFAULT_CMDLINE
    );
    // Two vCPUs: Linux spreads the MSI-X vectors over both, so messages go to each LAPIC.
    let args = run_args(&dir.join("vmlinux"), None, &cmdline, 2, 128);
    let mut args = as_strs(&args);
    let root = format!("path={},root=on", image.display());
    let second = format!("path={}", data.display());
    let net = format!("tap=tap0,mac={GUEST_MAC}");
    let vsock = format!("cid=3,uds={}", uds.display());
    args.extend([
        "--enable-pci",
        "--disk",
        &root,
        "--disk",
        &second,
        "--net",
        &net,
        "--entropy",
        "--vsock",
        &vsock,
    ]);
    let out = run_command(ns.command(skiff_bin(), &args), LIMIT, None, None);
    let console = &out.stdout;
    let ctx = || format!("console:\n{console}\nstderr:\n{}", out.stderr);
    let line = |prefix: &str| {
        (console.lines())
            .find_map(|l| l.trim().strip_prefix(prefix).map(str::to_owned))
            .unwrap_or_else(|| panic!("no '{prefix}' line\n{}", ctx()))
    };
    assert_eq!(out.code, Some(0), "{}", ctx());
    assert!(console.contains("SKIFF-EXIT-CODE=0"), "{}", ctx());
    assert!(
        console.contains("PCI: Using configuration type 1 for base access"),
        "{}",
        ctx()
    );
    // The host bridge, then two disks (0x1042), the network (0x1041), entropy (0x1044) and
    // vsock (0x1053), all from virtio's vendor.
    let ids = line("pci-ids ");
    for id in ["0x1b36", "0x1af4", "0x1042", "0x1041", "0x1044", "0x1053"] {
        assert!(ids.contains(id), "{id} missing from {ids}\n{}", ctx());
    }
    assert_eq!(line("virtio-pci-bound "), "5", "{}", ctx());
    let msi: Vec<&str> = (console.lines())
        .filter(|l| l.trim().starts_with("msi-line "))
        .collect();
    // One vector per queue plus one for configuration changes: 2 + 2 + 3 + 2 + 4.
    assert_eq!(msi.len(), 13, "{msi:#?}\n{}", ctx());
    assert!(msi.iter().any(|l| l.contains("virtio0-req.0")), "{msi:#?}");
    assert!(msi.iter().any(|l| l.contains("-input.0")), "{msi:#?}");
    // "msi-line N: CPU0 CPU1 PCI-MSI ...": some vector delivered to each vCPU's LAPIC.
    let counts = |cpu: usize| -> u64 {
        (msi.iter())
            .filter_map(|l| l.split_whitespace().nth(2 + cpu)?.parse::<u64>().ok())
            .sum()
    };
    assert!(counts(0) > 0 && counts(1) > 0, "{msi:#?}");
    assert_eq!(line("vdb-read "), format!("{sha}  -"), "{}", ctx());
    let written = std::fs::read(&data).unwrap();
    assert_eq!(&written[4096..4096 + 20], b"skiff-pci-wrote-this");
    assert!(written[4096 + 20..8192].iter().all(|&b| b == 0));
    assert_eq!(
        &written[8192..],
        &bytes[8192..],
        "bytes beyond the write changed"
    );
    assert_eq!(line("rng "), "virtio_rng.0 64", "{}", ctx());
    assert!(
        console.contains("3 packets transmitted, 3 packets received"),
        "ping\n{}",
        ctx()
    );
    let got = reader.join().unwrap();
    let pattern = |i: usize| ((i as u64).wrapping_mul(31) ^ (i as u64 >> 9)).to_le_bytes()[0];
    assert_eq!(got.len(), 65536);
    assert!(
        (0..got.len()).all(|i| got[i] == pattern(i)),
        "vsock bytes differ"
    );
    assert_eq!(debugfs(&image, "cat /pcitest.sh", false), PCI_SCRIPT);
    log_figure(&format!(
        "Linux on virtio-pci (2 vCPUs, 2 disks, net, entropy, vsock), {}: {:.1} s",
        host_kind(),
        out.elapsed.as_secs_f64()
    ));
    let _ = std::fs::remove_dir_all(&socks);
}
