//! What the agent does first as PID 1: the root the kernel mounted read-only gets a tmpfs
//! overlay (so every clone of a sandbox writes into its own memory and the shared image never
//! changes), then the usual mounts, the host name and the loopback interface.
//!
//! Each step that fails is said on the console and skipped: a guest whose kernel lacks
//! overlayfs, or whose root is writable already, still gets a working agent.

use std::ffi::CString;
use std::io;

fn c(s: &str) -> CString {
    CString::new(s).expect("no NUL in a built-in string")
}

fn mount(
    src: &str,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let (src, target, data) = (c(src), c(target), c(data));
    let fstype = fstype.map(c);
    // SAFETY: every pointer is a NUL-terminated string alive for the call (or null for no
    // file system type, as MS_MOVE takes).
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |f| f.as_ptr()),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn warn(step: &str, e: &io::Error) {
    eprintln!("skiff-agent: {step}: {e} (going on without it)");
}

/// Moves the root onto a tmpfs overlay above the read-only one; returns whether it did.
fn overlay_root() -> io::Result<()> {
    mount(
        "tmpfs",
        "/run",
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    )?;
    for d in [
        "/run/overlay/upper",
        "/run/overlay/work",
        "/run/overlay/root",
    ] {
        std::fs::create_dir_all(d)?;
    }
    mount(
        "overlay",
        "/run/overlay/root",
        Some("overlay"),
        0,
        "lowerdir=/,upperdir=/run/overlay/upper,workdir=/run/overlay/work",
    )?;
    // The kernel's devtmpfs (mounted on the old root's /dev) moves along; a fresh one where
    // the kernel mounted none.
    if mount("/dev", "/run/overlay/root/dev", None, libc::MS_MOVE, "").is_err() {
        mount("devtmpfs", "/run/overlay/root/dev", Some("devtmpfs"), 0, "")?;
    }
    std::env::set_current_dir("/run/overlay/root")?;
    let dot = c(".");
    // SAFETY: chroot with a NUL-terminated path; the process is single-threaded here.
    if unsafe { libc::chroot(dot.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    std::env::set_current_dir("/")
}

pub fn setup() {
    if let Err(e) = overlay_root() {
        warn("overlay root", &e);
    }
    let mounts: [(&str, &str, &str, libc::c_ulong, &str); 6] = [
        (
            "proc",
            "/proc",
            "proc",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "",
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "",
        ),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "mode=0620,ptmxmode=0666",
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777",
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777",
        ),
    ];
    for (src, target, fstype, flags, data) in mounts {
        let _ = std::fs::create_dir_all(target);
        match mount(src, target, Some(fstype), flags, data) {
            Ok(()) => {}
            // devtmpfs is usually there already (moved or mounted by the kernel).
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => warn(&format!("mount {target}"), &e),
        }
    }
    let name = b"sandbox";
    // SAFETY: sethostname with a buffer and its length.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } < 0 {
        warn("host name", &io::Error::last_os_error());
    }
    if let Err(e) = loopback_up() {
        warn("loopback", &e);
    }
}

fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket(2), checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; zeroes are a valid start.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    req.ifr_name[0] = b'l' as libc::c_char;
    req.ifr_name[1] = b'o' as libc::c_char;
    // SAFETY: SIOCGIFFLAGS / SIOCSIFFLAGS read and write the ifreq we own; fd is ours.
    let rc = unsafe {
        let mut rc = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req);
        if rc == 0 {
            req.ifr_ifru.ifru_flags |= libc::c_short::try_from(libc::IFF_UP).expect("a small flag");
            rc = libc::ioctl(fd, libc::SIOCSIFFLAGS, &req);
        }
        rc
    };
    let err = io::Error::last_os_error();
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    if rc < 0 {
        return Err(err);
    }
    Ok(())
}
