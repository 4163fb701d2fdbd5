//! The jail's file system: a new mount namespace whose root is the jail directory, and inside
//! it the few directories and device nodes the VMM opens, owned by the jailed user.
//!
//! The root is switched with `pivot_root(2)`, not `chroot(2)` alone: after it the old root is
//! detached from the namespace, so no path, `..` or open directory leads back to the host's
//! files.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{lchown, DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Directories the VMM needs, made (or taken over) for the jailed user: `/` and `/run` for
/// the API socket and files the user places, `/dev` and `/dev/net` for the nodes below.
const DIRS: [&str; 4] = ["/", "/dev", "/dev/net", "/run"];
/// Only the jailed user may look into them (as Firecracker's jailer has it).
const DIR_MODE: u32 = 0o700;

/// A character device node made in the jail.
struct Node {
    path: &'static str,
    major: u32,
    minor: u32,
    /// Whether the jail is useless without it.
    required: bool,
}

/// Numbers from the kernel's Documentation/admin-guide/devices.txt.
const NODES: [Node; 3] = [
    Node {
        path: "/dev/kvm",
        major: 10,
        minor: 232,
        required: true,
    },
    // For TAP devices (virtio-net).
    Node {
        path: "/dev/net/tun",
        major: 10,
        minor: 200,
        required: true,
    },
    Node {
        path: "/dev/urandom",
        major: 1,
        minor: 9,
        required: false,
    },
];

/// Present when the host's KVM is the PVM flavour; Skiff looks for it to decide on PVM
/// workarounds, so the jail gets the same (empty) directory. Firecracker's jailer mirrors the
/// host's sysfs facts its VMM reads in the same way (CPU cache information on aarch64).
const PVM_MARKER: &str = "/sys/module/kvm_pvm";

/// Errors while building the jail's file system.
#[derive(Debug, thiserror::Error)]
pub enum ChrootError {
    /// unshare(CLONE_NEWNS) failed.
    #[error("cannot enter a new mount namespace")]
    Unshare(#[source] io::Error),
    /// Making the namespace's mounts private failed.
    #[error("cannot make the mounts of the new namespace private")]
    Private(#[source] io::Error),
    /// Bind-mounting the jail root onto itself failed.
    #[error("cannot bind-mount the jail root {} onto itself", .0.display())]
    Bind(PathBuf, #[source] io::Error),
    /// A directory could not be entered.
    #[error("cannot change directory to {}", .0.display())]
    Chdir(PathBuf, #[source] io::Error),
    /// pivot_root failed.
    #[error("cannot make {} the root (pivot_root)", .0.display())]
    PivotRoot(PathBuf, #[source] io::Error),
    /// Detaching the host's root failed.
    #[error("cannot detach the host's root from the jail")]
    DetachOldRoot(#[source] io::Error),
    /// A path inside the jail could not be made or set up.
    #[error("cannot set up {path} in the jail ({what})")]
    Setup {
        path: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// A path holds something other than a directory.
    #[error("{0} in the jail exists and is not a directory")]
    NotADirectory(&'static str),
    /// A path has a NUL byte.
    #[error("path {} has a NUL byte", .0.display())]
    Nul(PathBuf),
}

fn cstring(path: &Path) -> Result<CString, ChrootError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| ChrootError::Nul(path.to_owned()))
}

/// The result of a libc call that returns -1 and sets errno on failure.
fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Enters a new mount namespace whose root is `root` (an absolute, canonical path), with the
/// host's root detached, and makes `/` the working directory.
pub fn enter(root: &Path) -> Result<(), ChrootError> {
    let c_root = cstring(root)?;
    // SAFETY: unshare takes flags only; the jailer is single-threaded, as the namespace
    // change must cover the whole process.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS) }).map_err(ChrootError::Unshare)?;
    // Private: mounts and unmounts in the jail do not reach the host, nor the host's reach the
    // jail; pivot_root also refuses roots whose mounts are shared.
    // SAFETY: the path is a NUL-terminated literal; the null source, type and data pointers
    // are allowed for a propagation change.
    check(unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })
    .map_err(ChrootError::Private)?;
    // pivot_root needs the new root to be a mount point.
    // SAFETY: both paths point at `c_root`, NUL-terminated and alive across the call; the
    // null type and data pointers are allowed for a bind mount.
    check(unsafe {
        libc::mount(
            c_root.as_ptr(),
            c_root.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    })
    .map_err(|e| ChrootError::Bind(root.to_owned(), e))?;
    std::env::set_current_dir(root).map_err(|e| ChrootError::Chdir(root.to_owned(), e))?;
    // pivot_root(".", ".") stacks the old root on top of the new one at the same place
    // (pivot_root(2), NOTES); detaching "." then leaves the jail as the root, and no
    // directory has to be made in the jail for the old root.
    // SAFETY: pivot_root takes two NUL-terminated paths, both literals.
    let ret = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) };
    if ret < 0 {
        return Err(ChrootError::PivotRoot(
            root.to_owned(),
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: umount2 takes a NUL-terminated literal path and flags.
    check(unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) })
        .map_err(ChrootError::DetachOldRoot)?;
    std::env::set_current_dir("/").map_err(|e| ChrootError::Chdir("/".into(), e))
}

/// In the jail (after [`enter`]): makes the directories and device nodes the VMM needs,
/// owned by `uid`:`gid`. `pvm_host` says whether the host's KVM is the PVM flavour;
/// `userfaultfd_minor` is the host's /dev/userfaultfd, made in the jail too (as Firecracker's
/// jailer does) for snapshot loads with the Uffd backend where the userfaultfd system call is
/// restricted to privileged processes.
pub fn populate(
    uid: u32,
    gid: u32,
    pvm_host: bool,
    userfaultfd_minor: Option<u32>,
) -> Result<(), ChrootError> {
    let setup = |path: &str, what| {
        let path = path.to_owned();
        move |source| ChrootError::Setup { path, what, source }
    };
    for dir in DIRS {
        match fs::symlink_metadata(dir) {
            Ok(meta) if meta.is_dir() => {}
            // A link could lead elsewhere in the jail: take over nothing but directories.
            Ok(_) => return Err(ChrootError::NotADirectory(dir)),
            Err(_) => fs::DirBuilder::new()
                .mode(DIR_MODE)
                .create(dir)
                .map_err(setup(dir, "mkdir"))?,
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
            .map_err(setup(dir, "chmod"))?;
        lchown(dir, Some(uid), Some(gid)).map_err(setup(dir, "chown"))?;
    }
    for node in &NODES {
        match make_node(node, uid, gid) {
            Ok(()) => {}
            Err(e) if !node.required => log::warn!("{}", crate::error_chain(&e)),
            Err(e) => return Err(e),
        }
    }
    if let Some(minor) = userfaultfd_minor {
        let node = Node {
            path: "/dev/userfaultfd",
            major: MISC_MAJOR,
            minor,
            required: false,
        };
        if let Err(e) = make_node(&node, uid, gid) {
            log::warn!("{}", crate::error_chain(&e));
        }
    }
    if pvm_host {
        fs::create_dir_all(PVM_MARKER).map_err(setup(PVM_MARKER, "mkdir"))?;
    }
    Ok(())
}

/// The major number of misc devices (Documentation/admin-guide/devices.txt).
const MISC_MAJOR: u32 = 10;

/// The minor number of the host's /dev/userfaultfd (a misc device with a dynamic minor, from
/// Linux 6.1), from /proc/misc; read before [`enter`], as the jail has no /proc.
pub fn userfaultfd_minor() -> Option<u32> {
    parse_misc_minor(&fs::read_to_string("/proc/misc").ok()?, "userfaultfd")
}

/// The minor of `name` in /proc/misc's text (`minor name` lines).
fn parse_misc_minor(text: &str, name: &str) -> Option<u32> {
    text.lines().find_map(|line| {
        let (minor, device) = line.trim().split_once(' ')?;
        (device.trim() == name).then(|| minor.parse().ok())?
    })
}

/// Makes a fresh node (replacing whatever a previous run of the same jail left at its path)
/// that only `uid`:`gid` may open.
fn make_node(node: &Node, uid: u32, gid: u32) -> Result<(), ChrootError> {
    let path = Path::new(node.path);
    let setup = |what| {
        move |source| ChrootError::Setup {
            path: node.path.to_owned(),
            what,
            source,
        }
    };
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(setup("remove the old one")(e))
        }
        _ => {}
    }
    let c_path = cstring(path)?;
    // SAFETY: mknod takes a NUL-terminated path (alive across the call), a mode and a device
    // number.
    check(unsafe {
        libc::mknod(
            c_path.as_ptr(),
            libc::S_IFCHR | libc::S_IRUSR | libc::S_IWUSR,
            libc::makedev(node.major, node.minor),
        )
    })
    .map_err(setup("mknod"))?;
    lchown(path, Some(uid), Some(gid)).map_err(setup("chown"))
}

/// Whether the host's KVM is the PVM flavour (see [`PVM_MARKER`]); read before [`enter`].
pub fn host_is_pvm() -> bool {
    Path::new(PVM_MARKER).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misc_minors_are_read_by_name() {
        let text = "200 tun\n 57 vhost-net\n257 userfaultfd\n232 kvm\n";
        assert_eq!(parse_misc_minor(text, "userfaultfd"), Some(257));
        assert_eq!(parse_misc_minor(text, "kvm"), Some(232));
        assert_eq!(parse_misc_minor(text, "fuse"), None);
        assert_eq!(parse_misc_minor("x userfaultfd\n", "userfaultfd"), None);
    }
}
