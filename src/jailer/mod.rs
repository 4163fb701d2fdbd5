//! The jailer: confines one VMM process and execs it, with the command line and behaviour of
//! Firecracker's `jailer` (its docs/jailer.md), so tools that start Firecracker through its
//! jailer start Skiff the same way. The `skiff-jailer` binary is a thin front to [`run`].
//!
//! The steps, in order (each one a call in [`run`]):
//! 1. close every inherited descriptor but the standard streams;
//! 2. check every input, before anything is made: the id, the exec file, the chroot base,
//!    the network namespace, the cgroup hierarchies and controllers;
//! 3. make the cgroup `<hierarchy>/<parent-cgroup>/<id>`, write the `--cgroup` settings and
//!    move in;
//! 4. make the jail root `<chroot-base-dir>/<exec-file name>/<id>/root` and copy the exec
//!    file into it (a copy, not a link: jailed VMMs share no page of their binary);
//! 5. join the network namespace, set the resource limits;
//! 6. enter a new mount namespace whose root is the jail (`pivot_root`), and make `/dev/kvm`,
//!    `/dev/net/tun`, `/dev/urandom` and `/run` there for the jailed user;
//! 7. daemonize and/or start a new PID namespace if asked, write `/<exec-file name>.pid`;
//! 8. drop to the uid and gid and exec `/<exec-file name> --id <id> --start-time-us ...
//!    --start-time-cpu-us ... --parent-cpu-time-us ... <arguments after -->`, with an empty
//!    environment.
//!
//! The kernel, disks and any file the VMM is told to open are the user's to place in the jail
//! root, before or after the jailer runs, as with Firecracker.

mod cgroup;
mod chroot;
mod process;

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use cgroup::{parent_cgroup_path, CgroupError, CgroupSetting, CgroupVersion};
pub use chroot::ChrootError;
pub use process::{monotonic_us, netns_path, ProcessError, ResourceLimit};

use cgroup::CgroupPlan;

/// Where jails are made unless `--chroot-base-dir` says otherwise.
pub const DEFAULT_CHROOT_BASE: &str = "/srv/jailer";
/// The longest id Firecracker accepts.
const MAX_ID_LEN: usize = 64;
/// The copied exec file: anyone may run it, only root may change it, so a jailed VMM cannot
/// rewrite the binary a later run of the same jail will exec.
const EXEC_MODE: u32 = 0o755;

/// Errors of the jailer; each one says what failed and, through its causes, why.
#[derive(Debug, thiserror::Error)]
pub enum JailerError {
    /// The id is not 1 to 64 ASCII letters, digits and '-'.
    #[error("{0}")]
    InvalidId(String),
    /// The exec file cannot be found.
    #[error("--exec-file {}", .0.display())]
    ExecFile(PathBuf, #[source] io::Error),
    /// The exec file is a directory or a special file.
    #[error("--exec-file {}: not a regular file", .0.display())]
    ExecNotAFile(PathBuf),
    /// The exec file's name is not UTF-8 (it names the jail's directory and PID file).
    #[error("--exec-file {}: the file name must be UTF-8", .0.display())]
    ExecName(PathBuf),
    /// The chroot base directory cannot be found.
    #[error("--chroot-base-dir {}", .0.display())]
    ChrootBase(PathBuf, #[source] io::Error),
    /// The chroot base is not a directory.
    #[error("--chroot-base-dir {}: not a directory", .0.display())]
    ChrootBaseNotADir(PathBuf),
    /// The jail directory cannot be made.
    #[error("cannot create the jail root {}", .0.display())]
    MakeRoot(PathBuf, #[source] io::Error),
    /// The exec file cannot be copied into the jail.
    #[error("cannot copy {} to {}", from.display(), to.display())]
    CopyExec {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    /// /dev/null cannot be opened for --daemonize.
    #[error("cannot open /dev/null")]
    DevNull(#[source] io::Error),
    /// A cgroup step failed.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// A file-system step of the jail failed.
    #[error(transparent)]
    Chroot(#[from] ChrootError),
    /// A process step failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
}

/// A VM id as Firecracker takes it: 1 to 64 ASCII letters, digits and '-'. It names the jail
/// directory and the cgroup, so nothing else may be in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceId(String);

impl InstanceId {
    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for InstanceId {
    type Err = JailerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > MAX_ID_LEN {
            return Err(JailerError::InvalidId(format!(
                "an id is 1 to {MAX_ID_LEN} characters long, not {}",
                s.len()
            )));
        }
        if let Some((at, c)) = s
            .char_indices()
            .find(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '-'))
        {
            return Err(JailerError::InvalidId(format!(
                "{c:?} (at byte {at}) is not allowed: an id holds ASCII letters, digits and '-'"
            )));
        }
        Ok(Self(s.to_owned()))
    }
}

/// What to jail and how: the jailer's command line, parsed.
#[derive(Clone, Debug)]
pub struct JailConfig {
    /// Names the jail and the cgroup; passed on as `--id`.
    pub id: InstanceId,
    /// The VMM binary, copied into the jail.
    pub exec_file: PathBuf,
    /// The user the VMM runs as.
    pub uid: u32,
    /// The group the VMM runs as.
    pub gid: u32,
    /// Where jails are made ([`DEFAULT_CHROOT_BASE`] by default).
    pub chroot_base_dir: PathBuf,
    /// A network namespace to join: a name under /var/run/netns, or a path.
    pub netns: Option<String>,
    /// Which cgroup interface the settings are for.
    pub cgroup_version: CgroupVersion,
    /// `--cgroup FILE=VALUE` settings.
    pub cgroups: Vec<CgroupSetting>,
    /// Where the VM's cgroup goes, below each hierarchy's root (default: the exec file's name).
    pub parent_cgroup: Option<PathBuf>,
    /// `--resource-limit` settings.
    pub resource_limits: Vec<ResourceLimit>,
    /// Start a new session with the standard streams on /dev/null.
    pub daemonize: bool,
    /// Exec the VMM as PID 1 of a new PID namespace.
    pub new_pid_ns: bool,
    /// Arguments for the VMM, after the ones the jailer passes.
    pub exec_args: Vec<OsString>,
}

/// The jail root for a VMM binary named `exec_name` and the VM `id`:
/// `<chroot_base_dir>/<exec_name>/<id>/root`.
pub fn jail_root(chroot_base_dir: &Path, exec_name: &str, id: &InstanceId) -> PathBuf {
    chroot_base_dir
        .join(exec_name)
        .join(id.as_str())
        .join("root")
}

/// Everything [`run`] needs, found and checked before it makes anything.
struct Plan {
    exec_file: PathBuf,
    exec_name: String,
    root: PathBuf,
    netns: Option<(File, PathBuf)>,
    cgroups: CgroupPlan,
    interpreter: Option<PathBuf>,
    pvm_host: bool,
    /// The host's /dev/userfaultfd minor number, when it has the device.
    userfaultfd_minor: Option<u32>,
}

impl Plan {
    fn check(config: &JailConfig) -> Result<Self, JailerError> {
        let exec_file = fs::canonicalize(&config.exec_file)
            .map_err(|e| JailerError::ExecFile(config.exec_file.clone(), e))?;
        if !exec_file.is_file() {
            return Err(JailerError::ExecNotAFile(exec_file));
        }
        let exec_name = exec_file
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| JailerError::ExecName(exec_file.clone()))?
            .to_owned();
        let base = fs::canonicalize(&config.chroot_base_dir)
            .map_err(|e| JailerError::ChrootBase(config.chroot_base_dir.clone(), e))?;
        if !base.is_dir() {
            return Err(JailerError::ChrootBaseNotADir(base));
        }
        let netns = match &config.netns {
            Some(arg) => {
                let path = netns_path(arg);
                Some((process::open_netns(&path)?, path))
            }
            None => None,
        };
        let parent = config
            .parent_cgroup
            .clone()
            .unwrap_or_else(|| PathBuf::from(&exec_name));
        let parent = parent_cgroup_path(&parent.to_string_lossy())?;
        let cgroups = CgroupPlan::new(
            config.cgroup_version,
            &config.cgroups,
            &parent,
            config.id.as_str(),
        )?;
        Ok(Self {
            interpreter: process::interpreter(&exec_file)?,
            root: jail_root(&base, &exec_name, &config.id),
            exec_file,
            exec_name,
            netns,
            cgroups,
            pvm_host: chroot::host_is_pvm(),
            userfaultfd_minor: chroot::userfaultfd_minor(),
        })
    }

    /// Makes the jail root and puts a fresh copy of the exec file in it.
    fn make_root(&self) -> Result<(), JailerError> {
        // The three levels below the base (<exec>/<id>/root) are made one at a time and must be
        // real directories: a link planted there (in a base directory others can write to)
        // would make the jail some other tree, the host's root included, which the jailer then
        // hands to the jailed user.
        let mut levels: Vec<&Path> = self.root.ancestors().take(3).collect();
        levels.reverse();
        if let Some(parent) = levels.first().and_then(|l| l.parent()) {
            fs::create_dir_all(parent).map_err(|e| JailerError::MakeRoot(parent.to_owned(), e))?;
        }
        for level in levels {
            let fail = |e| JailerError::MakeRoot(level.to_owned(), e);
            match fs::symlink_metadata(level) {
                Ok(meta) if meta.file_type().is_dir() => {}
                Ok(_) => {
                    return Err(fail(io::Error::other(
                        "a symbolic link or other non-directory is in the jail's path",
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(level).map_err(fail)?;
                }
                Err(e) => return Err(fail(e)),
            }
        }
        let to = self.root.join(&self.exec_name);
        let copy_err = |source| JailerError::CopyExec {
            from: self.exec_file.clone(),
            to: to.clone(),
            source,
        };
        // Whatever a previous run of this jail left there (the jailed user owns the jail
        // root, so it may be anything, a link included) is replaced, never written through.
        match fs::remove_file(&to) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(copy_err(e)),
            _ => {}
        }
        let mut from = File::open(&self.exec_file).map_err(copy_err)?;
        let mut dest = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&to)
            .map_err(copy_err)?;
        io::copy(&mut from, &mut dest).map_err(copy_err)?;
        // Set after creation, so the umask cannot take the execute bits away.
        dest.set_permissions(fs::Permissions::from_mode(EXEC_MODE))
            .map_err(copy_err)
    }
}

/// Jails this process as `config` says and execs the VMM in the jail.
///
/// In the process that execs, this returns only on failure. With `daemonize` or `new_pid_ns`
/// the process splits: then the process that called it gets Ok once the VMM has been exec'd
/// (or the error of the process that failed to exec it), and processes in between exit.
///
/// # Safety
///
/// The process must be single-threaded (it forks) and must not use any descriptor above 2
/// afterwards: every one is closed, whoever owns it. `skiff-jailer` calls it first thing.
pub unsafe fn run(config: &JailConfig) -> Result<(), JailerError> {
    let start_us = process::monotonic_us();
    process::close_inherited_fds()?;
    let plan = Plan::check(config)?;
    plan.cgroups.apply()?;
    plan.make_root()?;
    if let Some((file, path)) = &plan.netns {
        process::join_netns(file, path)?;
    }
    process::set_resource_limits(&config.resource_limits)?;
    let dev_null = match config.daemonize {
        true => Some(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map_err(JailerError::DevNull)?,
        ),
        false => None,
    };
    chroot::enter(&plan.root)?;
    chroot::populate(
        config.uid,
        config.gid,
        plan.pvm_host,
        plan.userfaultfd_minor,
    )?;
    if let Some(interp) = plan.interpreter.as_ref().filter(|i| !i.exists()) {
        return Err(ProcessError::NoInterpreter {
            exec: plan.exec_file.clone(),
            interp: interp.clone(),
        }
        .into());
    }
    hand_over(config, &plan, dev_null.as_ref(), start_us)
}

/// What a process that does not exec does once its part is done.
enum Next {
    /// Wait for the exec's outcome and answer for it (the process the caller started).
    Wait,
    /// Exit with status 0 (a process in between).
    Exit,
}

/// Step 7 and 8: split as asked, write the PID file, drop privileges and exec.
fn hand_over(
    config: &JailConfig,
    plan: &Plan,
    dev_null: Option<&File>,
    start_us: u64,
) -> Result<(), JailerError> {
    let split = config.daemonize || config.new_pid_ns;
    let (handover, mut reporter) = match split {
        true => {
            let (h, r) = process::handover_pipe()?;
            (Some(h), Some(r))
        }
        false => (None, None),
    };
    let exec_path = Path::new("/").join(&plan.exec_name);
    let pid_file = PathBuf::from(format!("/{}.pid", plan.exec_name));
    // CPU time of the jailer's processes that ended before the one that execs.
    let mut parent_cpu_us = 0;
    let mut original = true;
    let mut steps = || -> Result<Next, JailerError> {
        if let Some(dev_null) = dev_null {
            parent_cpu_us += process::cpu_time_us();
            if process::fork()?.is_some() {
                return Ok(Next::Wait);
            }
            original = false;
            process::new_session()?;
            if process::fork()?.is_some() {
                return Ok(Next::Exit);
            }
            process::redirect_stdio(dev_null)?;
        }
        if config.new_pid_ns {
            // A child of a session leader would lose its terminal when the leader exits;
            // it leads a session of its own instead.
            let leader = !config.daemonize && process::is_session_leader();
            process::unshare_pid_ns()?;
            parent_cpu_us += process::cpu_time_us();
            match process::fork()? {
                Some(child) => {
                    if let Err(e) = write_pid_file(&pid_file, child) {
                        process::kill(child);
                        return Err(e);
                    }
                    return Ok(if original { Next::Wait } else { Next::Exit });
                }
                None if leader => process::new_session()?,
                None => {}
            }
            original = false;
        } else {
            write_pid_file(&pid_file, std::process::id())?;
        }
        process::drop_privileges(config.uid, config.gid)?;
        let mut args: Vec<OsString> = vec![
            "--id".into(),
            config.id.as_str().into(),
            "--start-time-us".into(),
            start_us.to_string().into(),
            "--start-time-cpu-us".into(),
            process::cpu_time_us().to_string().into(),
            "--parent-cpu-time-us".into(),
            parent_cpu_us.to_string().into(),
        ];
        args.extend(config.exec_args.iter().cloned());
        Err(process::exec(&exec_path, &args).into())
    };
    let outcome = steps();
    match (outcome, handover) {
        (Ok(Next::Wait), Some(handover)) => {
            // Only the processes that go on may hold the write end, or this would wait for
            // itself.
            drop(reporter);
            Ok(handover.wait()?)
        }
        (Ok(_), _) => std::process::exit(0),
        (Err(e), _) if !original => {
            // The waiting process prints the error; this one's stderr may be /dev/null, or
            // the same terminal, where a second copy would only repeat it.
            if let Some(reporter) = reporter.as_mut() {
                reporter.report(&crate::error_chain(&e));
            }
            std::process::exit(1)
        }
        (Err(e), _) => Err(e),
    }
}

/// Writes the VMM's PID (as the host sees it) to `path`, replacing any older file there.
fn write_pid_file(path: &Path, pid: impl fmt::Display) -> Result<(), JailerError> {
    let err = |e| ProcessError::PidFile(path.to_owned(), e);
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(err(e).into()),
        _ => {}
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(err)?;
    io::Write::write_all(&mut file, pid.to_string().as_bytes()).map_err(|e| err(e).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_ascii_letters_digits_and_dashes() {
        let id: InstanceId = "551e7604-e35c-42b3-b825-416853441234".parse().unwrap();
        assert_eq!(id.as_str(), "551e7604-e35c-42b3-b825-416853441234");
        assert!("a".repeat(64).parse::<InstanceId>().is_ok());
        let too_long = "a".repeat(65).parse::<InstanceId>().unwrap_err();
        assert!(too_long.to_string().contains("not 65"), "{too_long}");
        for bad in ["", "a_b", "a/b", "..", "a b", "é"] {
            assert!(bad.parse::<InstanceId>().is_err(), "{bad:?}");
        }
        let err = "vm_1".parse::<InstanceId>().unwrap_err().to_string();
        assert!(err.contains("'_' (at byte 2)"), "{err}");
    }

    #[test]
    fn the_jail_root_is_base_name_id_root() {
        let id: InstanceId = "vm1".parse().unwrap();
        assert_eq!(
            jail_root(Path::new("/srv/jailer"), "skiff", &id),
            Path::new("/srv/jailer/skiff/vm1/root")
        );
    }
}
