//! `skiff-jailer` run for real, as root: the test guest booted through it as an unprivileged
//! user, in its own cgroup and a fresh network namespace, and checked from the host while it
//! runs (root, user, groups, cgroup, namespaces, mounts, descriptors, environment, limits,
//! device nodes); a jailed Skiff refused a file outside its jail; a daemonized start in a new
//! PID namespace driven through the API socket in the jail; cgroup v1 settings; bad input,
//! each ending with one error line and nothing left behind.

mod common;

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::api::Running;
use common::netns::NetNs;
use common::{log_figure, run_command, skiff_bin, test_guest};

const JAILER: &str = env!("CARGO_BIN_EXE_skiff-jailer");
/// The unprivileged user and group the jailed Skiff runs as.
const UID: u32 = 12345;
const GID: u32 = 12346;
const LIMIT: Duration = Duration::from_secs(60);
/// The test guest's mode that prints ticks until Ctrl-Alt-Del.
const CTRLALTDEL: &str = "console=ttyS0 checks=ctrlaltdel";

fn need_root() {
    // SAFETY: geteuid takes no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the jailer tests run as root (mknod, pivot_root, cgroups, setuid)"
    );
}

/// A chroot base directory for one test, removed with every jail in it when dropped.
struct Base(PathBuf);

impl Base {
    fn new(tag: &str) -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("jailer-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }

    /// The jail root of `id` for the skiff binary.
    fn root(&self, id: &str) -> PathBuf {
        self.0.join("skiff").join(id).join("root")
    }

    /// Makes the jail root of `id` as a user would before running the jailer: the test guest
    /// at /guest.elf, and what a dynamically linked Skiff needs to start (its loader and the
    /// libraries `ldd` lists, at the same paths).
    fn prepare(&self, id: &str) -> PathBuf {
        let root = self.root(id);
        fs::create_dir_all(&root).unwrap();
        fs::copy(test_guest(), root.join("guest.elf")).unwrap();
        for lib in libraries(Path::new(skiff_bin())) {
            let to = root.join(lib.strip_prefix("/").unwrap());
            fs::create_dir_all(to.parent().unwrap()).unwrap();
            fs::copy(&lib, &to).unwrap();
        }
        root
    }

    /// Everything in the base: the jails made.
    fn entries(&self) -> Vec<String> {
        fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }
}

impl Drop for Base {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The loader and libraries `ldd` lists for `exe` (none for a static binary).
fn libraries(exe: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(exe).output().expect("run ldd");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
            let path = line.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// The cgroup v2 hierarchy's root, if one is mounted.
fn cgroup2_root() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    })
}

/// The mount point of the cgroup v1 hierarchy holding `controller`, if one is mounted.
fn cgroup1_mount(controller: &str) -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let has = f.get(2) == Some(&"cgroup") && f[3].split(',').any(|o| o == controller);
        has.then(|| PathBuf::from(f[1]))
    })
}

/// Cgroup directories a test's jail made (parent first), removed when dropped; and
/// controllers the jailer enabled in the v2 root for the test, disabled again.
#[derive(Default)]
struct Cgroups {
    dirs: Vec<PathBuf>,
    enabled_in_root: Option<(PathBuf, String)>,
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for dir in self.dirs.iter().rev() {
            // A cgroup whose last process just ended can be busy for a moment.
            let deadline = Instant::now() + Duration::from_secs(5);
            while dir.exists() && fs::remove_dir(dir).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some((root, controller)) = &self.enabled_in_root {
            let _ = fs::write(
                root.join("cgroup.subtree_control"),
                format!("-{controller}"),
            );
        }
    }
}

/// A v2 controller setting this host can take (the controllers may all be bound to v1
/// hierarchies, as on hybrid hosts), with the value written.
fn v2_controller_setting(root: &Path) -> Option<(String, String, String)> {
    let offered = fs::read_to_string(root.join("cgroup.controllers")).unwrap();
    let offered: Vec<&str> = offered.split_whitespace().collect();
    let hugetlb = || {
        let size = fs::read_dir("/sys/kernel/mm/hugepages")
            .ok()?
            .find_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                let kb: u64 = name
                    .strip_prefix("hugepages-")?
                    .strip_suffix("kB")?
                    .parse()
                    .ok()?;
                Some(match kb {
                    kb if kb >= 1 << 20 => format!("{}GB", kb >> 20),
                    kb if kb >= 1 << 10 => format!("{}MB", kb >> 10),
                    kb => format!("{kb}KB"),
                })
            })?;
        Some(format!("hugetlb.{size}.max"))
    };
    let (controller, file, value) = if offered.contains(&"memory") {
        ("memory", "memory.max".to_owned(), "536870912")
    } else if offered.contains(&"pids") {
        ("pids", "pids.max".to_owned(), "200")
    } else if offered.contains(&"cpu") {
        ("cpu", "cpu.weight".to_owned(), "50")
    } else if offered.contains(&"hugetlb") {
        ("hugetlb", hugetlb()?, "0")
    } else {
        return None;
    };
    Some((controller.to_owned(), file, value.to_owned()))
}

/// `skiff-jailer` for the VM `id` in `base`, with extra jailer arguments and Skiff's.
fn jailer(base: &Base, id: &str, jailer_args: &[&str], skiff_args: &[&str]) -> Command {
    let mut cmd = Command::new(JAILER);
    cmd.args(["--id", id, "--exec-file", skiff_bin()])
        .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
        .args(["--chroot-base-dir", base.path()])
        .args(jailer_args)
        .arg("--")
        .args(skiff_args);
    cmd
}

/// One field of /proc/PID/status, such as "Uid".
fn status_field(pid: u32, name: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// Whether the process has ended (a zombie counts: this host's init may be slow to reap).
fn ended(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// A process that is not this test's child, killed when dropped if it still runs.
struct KillPid(u32);

impl Drop for KillPid {
    fn drop(&mut self) {
        if !ended(self.0) {
            // SAFETY: kill takes a PID and a signal number.
            unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ended(self.0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The jail's VM config; with `tap`, a network interface on that (existing) TAP.
fn write_vm_config(root: &Path, tap: Option<&str>) {
    let nets = tap.map_or(String::new(), |tap| {
        format!(r#", "network-interfaces": [{{"iface_id": "eth0", "host_dev_name": "{tap}"}}]"#)
    });
    let config = format!(
        r#"{{"boot-source": {{"kernel_image_path": "/guest.elf", "boot_args": "{CTRLALTDEL}"}},
            "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}}{nets}}}"#
    );
    fs::write(root.join("vm.json"), config).unwrap();
}

fn wait_for_path(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn boots_jailed_as_an_unprivileged_user_in_its_cgroup_and_network_namespace() {
    need_root();
    let Some(cg_root) = cgroup2_root() else {
        eprintln!("SKIPPED: no cgroup v2 hierarchy is mounted on this host (no cgroup2 in /proc/self/mounts)");
        return;
    };
    let id = format!("boot-{}", std::process::id());
    let parent = format!("skiff-jailer-test-{}", std::process::id());
    let base = Base::new("boot");
    let root = base.prepare(&id);
    // A TAP the jailed user owns, made and brought up by the operator: the jailed Skiff,
    // without CAP_NET_ADMIN or /sys, must attach to it as it is.
    write_vm_config(&root, Some("tap0"));
    let ns = NetNs::new("jail");
    let uid = UID.to_string();
    for args in [
        vec![
            "-n",
            ns.name(),
            "tuntap",
            "add",
            "dev",
            "tap0",
            "mode",
            "tap",
            "user",
            &uid,
        ],
        vec!["-n", ns.name(), "link", "set", "tap0", "up"],
    ] {
        let out = std::process::Command::new("ip")
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    }

    // Settings: a core v2 file every cgroup has, and one controller's file if the host
    // offers any controller to v2 (enabled by the jailer down the path).
    let mut cgroups = Cgroups::default();
    let leaf = cg_root.join(&parent).join(&id);
    cgroups.dirs = vec![cg_root.join(&parent), leaf.clone()];
    let mut settings = vec![("cgroup.max.descendants".to_owned(), "0".to_owned())];
    match v2_controller_setting(&cg_root) {
        Some((controller, file, value)) => {
            let root_enabled = fs::read_to_string(cg_root.join("cgroup.subtree_control")).unwrap();
            if !root_enabled.split_whitespace().any(|c| c == controller) {
                cgroups.enabled_in_root = Some((cg_root.clone(), controller));
            }
            settings.push((file, value));
        }
        None => eprintln!(
            "note: the cgroup v2 hierarchy at {} offers no controller; only core files are set",
            cg_root.display()
        ),
    }
    let mut jailer_args = vec![
        "--cgroup-version".to_owned(),
        "2".to_owned(),
        "--parent-cgroup".to_owned(),
        parent.clone(),
        "--netns".to_owned(),
        ns.name().to_owned(),
        "--resource-limit".to_owned(),
        "no-file=1000".to_owned(),
        "--resource-limit".to_owned(),
        "fsize=100000000".to_owned(),
    ];
    for (file, value) in &settings {
        jailer_args.extend(["--cgroup".to_owned(), format!("{file}={value}")]);
    }
    let jailer_args: Vec<&str> = jailer_args.iter().map(String::as_str).collect();
    let mut cmd = jailer(
        &base,
        &id,
        &jailer_args,
        &[
            "--log-level",
            "info",
            "--api-sock",
            "/run/api.sock",
            "--config-file",
            "/vm.json",
        ],
    );
    // What the caller has open and in its environment must not reach the jail.
    let marker = base.0.join("inherited-marker");
    fs::write(&marker, "").unwrap();
    let inherited = fs::File::open(&marker).unwrap();
    let inherited_fd = inherited.as_raw_fd();
    cmd.env("SKIFF_JAILER_TEST_SECRET", "leaked");
    // SAFETY: the hook runs in the child between fork and exec and calls only fcntl, which
    // is async-signal-safe, on a descriptor the child inherited.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(inherited_fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let mut vm = Running::spawn(cmd, root.join("run/api.sock"));
    drop(inherited);
    vm.wait_for("tick 1", LIMIT);
    log_figure(&format!(
        "jailer start to the guest's second tick: {:.0} ms",
        started.elapsed().as_secs_f64() * 1000.0
    ));
    if let Some(line) = vm
        .stderr()
        .lines()
        .find(|l| l.contains("started by a jailer"))
    {
        log_figure(&format!("jailed skiff says: {line}"));
    }
    let pid = vm.child.id();

    // The jailer exec'd Skiff in place (no --daemonize, no --new-pid-ns).
    let pid_file = fs::read_to_string(root.join("skiff.pid")).unwrap();
    assert_eq!(pid_file.trim(), pid.to_string());
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert_eq!(argv[..3], ["/skiff", "--id", id.as_str()], "{argv:?}");
    assert!(argv.iter().any(|a| a == "--start-time-us"), "{argv:?}");
    assert_eq!(
        argv[argv.len() - 6..],
        [
            "--log-level",
            "info",
            "--api-sock",
            "/run/api.sock",
            "--config-file",
            "/vm.json"
        ]
    );

    // Its root is the jail: the same directory, and the only mount it can see.
    let seen = fs::metadata(format!("/proc/{pid}/root")).unwrap();
    let jail = fs::metadata(&root).unwrap();
    assert_eq!((seen.dev(), seen.ino()), (jail.dev(), jail.ino()));
    let mounts = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let mounts: Vec<&str> = mounts.lines().collect();
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    let fields: Vec<&str> = mounts[0].split(' ').collect();
    assert_eq!(fields[4], "/", "{mounts:?}");
    assert!(
        fields[3].ends_with(&format!("/skiff/{id}/root")),
        "{mounts:?}"
    );
    let ns_of = |pid: &str, kind: &str| fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap();
    assert_ne!(ns_of(&pid.to_string(), "mnt"), ns_of("self", "mnt"));

    // The user and group, with no supplementary groups and no capabilities left.
    assert_eq!(
        status_field(pid, "Uid"),
        format!("{UID}\t{UID}\t{UID}\t{UID}")
    );
    assert_eq!(
        status_field(pid, "Gid"),
        format!("{GID}\t{GID}\t{GID}\t{GID}")
    );
    assert_eq!(status_field(pid, "Groups"), "");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");

    // The cgroup, with the settings written.
    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cgroup.lines().any(|l| l == format!("0::/{parent}/{id}")),
        "{cgroup}"
    );
    for (file, value) in &settings {
        assert_eq!(fs::read_to_string(leaf.join(file)).unwrap().trim(), value);
    }

    // The network namespace.
    let ns_file = fs::metadata(format!("/run/netns/{}", ns.name())).unwrap();
    assert_eq!(
        ns_of(&pid.to_string(), "net"),
        PathBuf::from(format!("net:[{}]", ns_file.ino()))
    );

    // Nothing inherited: descriptors, environment; and the limits.
    for fd in fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let target = fs::read_link(fd.unwrap().path()).unwrap_or_default();
        assert_ne!(target, marker, "an inherited descriptor reached the jail");
    }
    assert_eq!(fs::read(format!("/proc/{pid}/environ")).unwrap(), b"");
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |name: &str| -> Vec<String> {
        let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
        line[name.len()..]
            .split_whitespace()
            .take(2)
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(limit("Max open files"), ["1000", "1000"]);
    assert_eq!(limit("Max file size"), ["100000000", "100000000"]);

    // The jail's device nodes and directories belong to the jailed user alone; the host's
    // /dev/userfaultfd (a misc device with a dynamic minor) is mirrored where it has one.
    let mut nodes = vec![
        ("dev/kvm", 10, 232),
        ("dev/net/tun", 10, 200),
        ("dev/urandom", 1, 9),
    ];
    if let Ok(meta) = fs::metadata("/dev/userfaultfd") {
        let rdev = meta.rdev();
        nodes.push(("dev/userfaultfd", libc::major(rdev), libc::minor(rdev)));
    }
    for (node, major, minor) in nodes {
        let meta = fs::metadata(root.join(node)).unwrap();
        assert!(meta.file_type().is_char_device(), "{node}");
        assert_eq!(meta.rdev(), libc::makedev(major, minor), "{node}");
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o777),
            (UID, GID, 0o600),
            "{node}"
        );
    }
    for dir in ["", "dev", "run"] {
        let meta = fs::metadata(root.join(dir)).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (UID, 0o700), "/{dir}");
    }
    let exe = fs::metadata(root.join("skiff")).unwrap();
    assert_eq!(
        (exe.uid(), exe.nlink(), exe.permissions().mode() & 0o777),
        (0, 1, 0o755)
    );

    // The API socket Skiff made inside the jail answers from the host, with the id the jailer
    // passed; Ctrl-Alt-Del through it ends the guest cleanly.
    let (status, body) = vm.call("GET", "/", None);
    assert_eq!(status, 200);
    assert!(body.contains(&format!(r#""id":"{id}""#)), "{body}");
    assert!(body.contains(r#""state":"Running""#), "{body}");
    let action = r#"{"action_type": "SendCtrlAltDel"}"#;
    assert_eq!(vm.call("PUT", "/actions", Some(action)).0, 204);
    vm.wait_for("PASS ctrlaltdel", LIMIT);
    assert_eq!(vm.wait(LIMIT), Some(0), "{}", vm.stderr());
    assert!(!root.join("run/api.sock").exists());
}

#[test]
fn a_jailed_skiff_cannot_open_a_file_outside_its_jail() {
    need_root();
    let id = format!("outside-{}", std::process::id());
    let base = Base::new("outside");
    let root = base.prepare(&id);
    // The host path of a kernel that boots (it is the one copied into the jail).
    let outside = test_guest().to_str().unwrap();
    assert!(Path::new(outside).is_file());
    // A link in the jail to the host path resolves inside the jail too.
    std::os::unix::fs::symlink(outside, root.join("link.elf")).unwrap();
    for path in [
        outside.to_owned(),
        format!("/../../..{outside}"),
        "/link.elf".to_owned(),
    ] {
        let cmd = jailer(
            &base,
            &id,
            &[],
            &["run", "--kernel", &path, "--cmdline", CTRLALTDEL],
        );
        let out = run_command(cmd, LIMIT, None, None);
        assert_eq!(out.code, Some(1), "{path}: {}", out.stderr);
        assert_eq!(
            out.error_lines(),
            [format!(
                "skiff: error: cannot read kernel {path}: No such file or directory (os error 2)"
            )],
            "{}",
            out.stderr
        );
    }
    // The same kernel placed in the jail boots: only the path made the difference.
    let cmd = jailer(
        &base,
        &id,
        &[],
        &[
            "run",
            "--kernel",
            "/guest.elf",
            "--cmdline",
            &format!("{CTRLALTDEL} ticks_max=2"),
        ],
    );
    let out = run_command(cmd, LIMIT, None, Some("tick 1"));
    assert!(
        out.stdout.contains("tick 1"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    assert!(root.join("skiff").exists());
}

#[test]
fn daemonized_into_a_new_pid_namespace_and_driven_through_the_api() {
    need_root();
    let id = format!("daemon-{}", std::process::id());
    let base = Base::new("daemon");
    let root = base.prepare(&id);
    write_vm_config(&root, None);
    let cmd = jailer(
        &base,
        &id,
        &["--daemonize", "--new-pid-ns"],
        &["--api-sock", "/run/api.sock", "--config-file", "/vm.json"],
    );
    // The jailer returns once Skiff is exec'd, with status 0 and nothing printed.
    let out = run_command(cmd, LIMIT, None, None);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stderr, "");
    let pid: u32 = fs::read_to_string(root.join("skiff.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _guard = KillPid(pid);
    assert!(!ended(pid), "the jailed skiff is not running");

    // PID 1 of its own namespace, out of the caller's session and without a controlling
    // terminal, its streams on /dev/null.
    assert_eq!(status_field(pid, "NSpid"), format!("{pid}\t1"));
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // SAFETY: getsid takes a PID (0: this process) and only reads.
    let my_session = unsafe { libc::getsid(0) };
    assert_ne!(after_name[3], my_session.to_string(), "session: {stat}");
    assert_eq!(after_name[4], "0", "controlling terminal: {stat}");
    for fd in 0..3 {
        assert_eq!(
            fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap(),
            Path::new("/dev/null")
        );
    }
    assert_eq!(
        status_field(pid, "Uid"),
        format!("{UID}\t{UID}\t{UID}\t{UID}")
    );

    let sock = root.join("run/api.sock");
    wait_for_path(&sock);
    let (status, body) = common::api::call(&sock, "GET", "/", None);
    assert_eq!(status, 200);
    assert!(
        body.contains(r#""state":"Running""#) && body.contains(&id),
        "{body}"
    );
    let action = r#"{"action_type": "SendCtrlAltDel"}"#;
    assert_eq!(
        common::api::call(&sock, "PUT", "/actions", Some(action)).0,
        204
    );
    let deadline = Instant::now() + LIMIT;
    while !ended(pid) {
        assert!(
            Instant::now() < deadline,
            "skiff did not end after Ctrl-Alt-Del"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!sock.exists(), "the socket is removed at exit");
}

#[test]
fn cgroup_v1_settings_reach_each_controllers_hierarchy() {
    need_root();
    let (Some(cpu), Some(cpuset)) = (cgroup1_mount("cpu"), cgroup1_mount("cpuset")) else {
        eprintln!("SKIPPED: no cgroup v1 hierarchy with the cpu and cpuset controllers is mounted");
        return;
    };
    let id = format!("v1-{}", std::process::id());
    let parent = format!("skiff-jailer-test-{}", std::process::id());
    let base = Base::new("v1");
    base.prepare(&id);
    let _cgroups = Cgroups {
        dirs: vec![
            cpu.join(&parent),
            cpu.join(&parent).join(&id),
            cpuset.join(&parent),
            cpuset.join(&parent).join(&id),
        ],
        enabled_in_root: None,
    };
    let cmd = jailer(
        &base,
        &id,
        &[
            "--cgroup-version",
            "1",
            "--parent-cgroup",
            &parent,
            "--cgroup",
            "cpu.shares=512",
            "--cgroup",
            "cpuset.cpus=0",
        ],
        &["run", "--kernel", "/guest.elf", "--cmdline", CTRLALTDEL],
    );
    let mut vm = Running::spawn(cmd, PathBuf::new());
    vm.wait_for("tick 1", LIMIT);
    let pid = vm.child.id();
    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for controller in ["cpu", "cpuset"] {
        assert!(
            cgroup.lines().any(|l| {
                let mut f = l.splitn(3, ':').skip(1);
                let (list, path) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
                list.split(',').any(|c| c == controller) && path == format!("/{parent}/{id}")
            }),
            "{controller}: {cgroup}"
        );
    }
    let read = |dir: &Path, file: &str| {
        fs::read_to_string(dir.join(&parent).join(&id).join(file)).unwrap()
    };
    assert_eq!(read(&cpu, "cpu.shares").trim(), "512");
    assert_eq!(read(&cpuset, "cpuset.cpus").trim(), "0");
    // The kernel leaves a new cpuset's memory nodes empty; the jailer copied its parent's.
    assert_eq!(
        read(&cpuset, "cpuset.mems"),
        fs::read_to_string(cpuset.join("cpuset.mems")).unwrap()
    );
    // SAFETY: kill takes a PID and a signal number; the PID is this test's running child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    assert_eq!(vm.wait(LIMIT), Some(128 + libc::SIGTERM));
}

/// Runs the jailer and returns its one error line, checking it failed cleanly.
fn jailer_error(cmd: Command) -> String {
    let what = format!("{cmd:?}");
    let out = run_command(cmd, LIMIT, None, None);
    assert!(matches!(out.code, Some(1 | 2)), "{what}: {out:?}");
    assert!(!out.stderr.contains("panicked"), "{what}: {}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: want one line:\n{}", out.stderr);
    assert!(
        lines[0].starts_with("skiff-jailer: error: "),
        "{}",
        lines[0]
    );
    lines[0].to_owned()
}

#[test]
fn bad_input_fails_with_one_line_and_leaves_nothing_behind() {
    need_root();
    let base = Base::new("bad");
    let id = "bad-input";
    let parent = format!("skiff-jailer-bad-{}", std::process::id());
    let with = |args: &[&str]| {
        let mut cmd = Command::new(JAILER);
        cmd.args(args);
        cmd
    };
    let ok_id = ["--id", id];
    let skiff = ["--exec-file", skiff_bin()];
    let user = ["--uid", "12345", "--gid", "12345"];
    let chroot = ["--chroot-base-dir", base.path()];
    let long_id = "a".repeat(65);
    let mut cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--id", "vm_1"], "'_' (at byte 2) is not allowed"),
        (
            vec!["--id", &long_id],
            "an id is 1 to 64 characters long, not 65",
        ),
        (vec!["--id", ""], "an id is 1 to 64 characters long, not 0"),
        (
            vec!["--exec-file", "/nonexistent/skiff"],
            "--exec-file /nonexistent/skiff: No such file or directory",
        ),
        (
            vec!["--exec-file", "/tmp"],
            "--exec-file /tmp: not a regular file",
        ),
        (
            vec!["--uid", "nobody"],
            "invalid value 'nobody' for '--uid <UID>'",
        ),
        (
            vec!["--gid", "1.5"],
            "invalid value '1.5' for '--gid <GID>'",
        ),
        (
            vec!["--chroot-base-dir", "/nonexistent"],
            "--chroot-base-dir /nonexistent: No such file",
        ),
        (
            vec!["--netns", "skiff-no-such-ns"],
            "--netns /var/run/netns/skiff-no-such-ns: cannot open it",
        ),
        (
            vec!["--netns", "/proc/self/ns/uts"],
            "not a network namespace (a namespace of another kind)",
        ),
        (
            vec!["--netns", "/etc/hostname"],
            "not a network namespace (not a namespace file at all)",
        ),
        (vec!["--cgroup", "memory"], "must be FILE=VALUE"),
        (
            vec!["--cgroup", "../cpu.weight=1"],
            "must be a cgroup file name",
        ),
        (
            vec!["--cgroup", "nosuch.knob=1"],
            "no cgroup v1 hierarchy with the nosuch controller",
        ),
        (
            vec!["--cgroup-version", "3"],
            "'3' is not a cgroup version (1 or 2)",
        ),
        (
            vec!["--parent-cgroup", "../escape"],
            "--parent-cgroup ../escape: must be a relative path",
        ),
        (vec!["--resource-limit", "nproc=5"], "unknown resource"),
        (
            vec!["--resource-limit", "no-file=many"],
            "the limit must be a whole number",
        ),
        (
            vec!["--no-such-flag"],
            "unexpected argument '--no-such-flag'",
        ),
    ];
    let cg_root = cgroup2_root();
    let v2 = ["--cgroup-version", "2", "--parent-cgroup", &parent];
    if cg_root.is_some() {
        cases.push((
            [&v2[..], &["--cgroup", "nosuch.knob=1"]].concat(),
            "--cgroup nosuch.knob: the cgroup v2 hierarchy at",
        ));
        cases.push((
            [&v2[..], &["--cgroup", "cgroup.nosuch=1"]].concat(),
            "--cgroup cgroup.nosuch: no such file in cgroup",
        ));
        cases.push((
            [&v2[..], &["--cgroup", "cgroup.max.descendants=many"]].concat(),
            "cannot write 'many' to",
        ));
    }
    for (args, want) in &cases {
        // clap refuses a flag given twice, so a default is added only for flags the case
        // leaves out.
        let given = |flag: &str| args.contains(&flag);
        let mut full: Vec<&str> = args.clone();
        for defaults in [&ok_id[..], &skiff[..], &user[..], &chroot[..]] {
            for pair in defaults.chunks(2) {
                if !given(pair[0]) {
                    full.extend(pair);
                }
            }
        }
        let line = jailer_error(with(&full));
        assert!(line.contains(want), "{full:?}: want {want:?} in {line:?}");
    }
    // Nothing was made: no jail, no cgroup (the v2 cases made one, then removed it).
    assert_eq!(base.entries(), Vec::<String>::new());
    if let Some(cg_root) = cg_root {
        let _cleanup = Cgroups {
            dirs: vec![cg_root.join(&parent)],
            enabled_in_root: None,
        };
        assert!(!cg_root.join(&parent).join(id).exists());
    }
}

#[test]
fn a_dynamically_linked_skiff_without_its_loader_in_the_jail_is_refused() {
    need_root();
    let loader = libraries(Path::new(skiff_bin()))
        .into_iter()
        .find(|l| l.to_string_lossy().contains("ld-linux"));
    let Some(loader) = loader else {
        eprintln!("SKIPPED: this skiff is statically linked; it needs no loader in the jail");
        return;
    };
    let base = Base::new("noloader");
    let cmd = jailer(&base, "noloader", &[], &["run", "--kernel", "/guest.elf"]);
    let line = jailer_error(cmd);
    assert!(
        line.contains(&format!(
            "the exec file needs {} to run, which is not in the jail",
            loader.display()
        )),
        "{line}"
    );
}

/// A link planted in the jail's path (in a base directory others could write to) is refused:
/// followed, it would make the jail another tree, the host's root included, and the jailer
/// would hand that tree to the jailed user.
#[test]
fn a_link_in_the_jail_path_is_refused() {
    need_root();
    let base = Base::new("link");
    let elsewhere = base.0.join("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    fs::create_dir_all(base.0.join("skiff")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, base.0.join("skiff").join("planted")).unwrap();
    let out = jailer(&base, "planted", &[], &[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("a symbolic link or other non-directory is in the jail's path"),
        "{stderr}"
    );
    assert!(
        fs::read_dir(&elsewhere).unwrap().next().is_none(),
        "the jailer wrote through the link"
    );
}
