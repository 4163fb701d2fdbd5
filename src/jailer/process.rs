//! The jailer's own process: what it inherits (descriptors), what it joins (a network
//! namespace), its limits, how it splits when asked to daemonize or to start a new PID
//! namespace, and the final drop of privileges and exec.
//!
//! When the process splits, the process that was started waits on a close-on-exec pipe that
//! every descendant holds: the last one closes it by exec'ing the VMM, or writes its error
//! into it. So the jailer's exit status, and its error line, say whether the VMM started,
//! even when the process that execs has its standard streams on /dev/null.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// RLIMIT_NOFILE when no `--resource-limit no-file=` is given (Firecracker's default).
const DEFAULT_NO_FILE: u64 = 2048;
/// ioctl NS_GET_NSTYPE: `_IO(0xb7, 0x3)` from linux/nsfs.h.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
/// Longest ELF interpreter path read (PATH_MAX).
const MAX_INTERP: u64 = 4096;

/// Errors of the process steps.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// A `--resource-limit` is not `fsize=N` or `no-file=N`.
    #[error("{0}")]
    Limit(&'static str),
    /// close_range failed.
    #[error("cannot close inherited file descriptors")]
    CloseFds(#[source] io::Error),
    /// The network namespace cannot be opened.
    #[error("--netns {}: cannot open it", .0.display())]
    OpenNetns(PathBuf, #[source] io::Error),
    /// The file is not a network namespace.
    #[error("--netns {}: not a network namespace{}", .0.display(), .1)]
    NotNetns(PathBuf, &'static str),
    /// setns failed.
    #[error("cannot join network namespace {}", .0.display())]
    JoinNetns(PathBuf, #[source] io::Error),
    /// setrlimit failed.
    #[error("cannot set resource limit {0}={1}")]
    SetLimit(&'static str, u64, #[source] io::Error),
    /// The exec file cannot be read for its ELF interpreter.
    #[error("cannot read {}", .0.display())]
    ReadExec(PathBuf, #[source] io::Error),
    /// A dynamically linked exec file without its loader in the jail.
    #[error(
        "the exec file needs {} to run, which is not in the jail: copy the loader and the \
         libraries `ldd {}` lists into the jail root at the same paths, or use a statically \
         linked build", interp.display(), exec.display()
    )]
    NoInterpreter { exec: PathBuf, interp: PathBuf },
    /// A system call of the given name failed.
    #[error("{0} failed")]
    Syscall(&'static str, #[source] io::Error),
    /// The PID file cannot be written.
    #[error("cannot write the PID file {} in the jail", .0.display())]
    PidFile(PathBuf, #[source] io::Error),
    /// execve failed.
    #[error("cannot exec {} in the jail", .0.display())]
    Exec(PathBuf, #[source] io::Error),
    /// An argument has a NUL byte.
    #[error("argument {0:?} has a NUL byte")]
    Nul(OsString),
    /// A later process of the jailer failed; its error, as it reported it.
    #[error("{0}")]
    Descendant(String),
}

/// One `--resource-limit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResourceLimit {
    /// `fsize=N`: the largest file, in bytes, the process may write (RLIMIT_FSIZE).
    FileSize(u64),
    /// `no-file=N`: one more than the highest descriptor number it may open (RLIMIT_NOFILE).
    NoFile(u64),
}

impl FromStr for ResourceLimit {
    type Err = ProcessError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, value) = s
            .split_once('=')
            .ok_or(ProcessError::Limit("must be fsize=N or no-file=N"))?;
        let value = value
            .parse()
            .map_err(|_| ProcessError::Limit("the limit must be a whole number"))?;
        match name {
            "fsize" => Ok(Self::FileSize(value)),
            "no-file" => Ok(Self::NoFile(value)),
            _ => Err(ProcessError::Limit(
                "unknown resource: the jailer limits fsize and no-file",
            )),
        }
    }
}

fn check(ret: libc::c_int, what: &'static str) -> Result<libc::c_int, ProcessError> {
    if ret < 0 {
        Err(ProcessError::Syscall(what, io::Error::last_os_error()))
    } else {
        Ok(ret)
    }
}

/// Closes every descriptor above stderr, so nothing the caller left open reaches the jail.
pub fn close_inherited_fds() -> Result<(), ProcessError> {
    // SAFETY: close_range takes three integers. The descriptors it closes belong to no Rust
    // object yet: this runs before the jailer opens anything.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, 3, libc::c_uint::MAX, 0) };
    if ret < 0 {
        return Err(ProcessError::CloseFds(io::Error::last_os_error()));
    }
    Ok(())
}

/// `--netns NAME` means `/var/run/netns/NAME` (where `ip netns add` puts it); a value with a
/// '/' is the path of a namespace file, as Firecracker takes it.
pub fn netns_path(arg: &str) -> PathBuf {
    if arg.contains('/') {
        PathBuf::from(arg)
    } else {
        Path::new("/var/run/netns").join(arg)
    }
}

/// Opens a network namespace file and checks that it is one.
pub fn open_netns(path: &Path) -> Result<File, ProcessError> {
    let file = File::open(path).map_err(|e| ProcessError::OpenNetns(path.to_owned(), e))?;
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the descriptor, which `file`
    // owns.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
    match kind {
        libc::CLONE_NEWNET => Ok(file),
        k if k < 0 => Err(ProcessError::NotNetns(
            path.to_owned(),
            " (not a namespace file at all)",
        )),
        _ => Err(ProcessError::NotNetns(
            path.to_owned(),
            " (a namespace of another kind)",
        )),
    }
}

/// Moves the process into the network namespace `file` (from [`open_netns`]).
pub fn join_netns(file: &File, path: &Path) -> Result<(), ProcessError> {
    // SAFETY: setns takes a descriptor, owned by `file`, and a flag.
    let ret = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if ret < 0 {
        return Err(ProcessError::JoinNetns(
            path.to_owned(),
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Sets the limits (soft and hard); RLIMIT_NOFILE is always set, by default to 2048.
pub fn set_resource_limits(limits: &[ResourceLimit]) -> Result<(), ProcessError> {
    let mut no_file = DEFAULT_NO_FILE;
    let mut fsize = None;
    for limit in limits {
        match *limit {
            ResourceLimit::FileSize(n) => fsize = Some(n),
            ResourceLimit::NoFile(n) => no_file = n,
        }
    }
    let set = |resource, name, value| {
        let limit = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: setrlimit reads one rlimit through the pointer, which points at `limit`.
        let ret = unsafe { libc::setrlimit(resource, &limit) };
        if ret < 0 {
            return Err(ProcessError::SetLimit(
                name,
                value,
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    };
    if let Some(n) = fsize {
        set(libc::RLIMIT_FSIZE, "fsize", n)?;
    }
    set(libc::RLIMIT_NOFILE, "no-file", no_file)
}

/// The program that runs an exec file for the kernel: the ELF interpreter (`PT_INTERP`) of a
/// dynamically linked ELF file, the `#!` program of a script; None for a static ELF file.
pub fn interpreter(path: &Path) -> Result<Option<PathBuf>, ProcessError> {
    let err = |e| ProcessError::ReadExec(path.to_owned(), e);
    let mut file = File::open(path).map_err(err)?;
    let mut head = [0u8; 64];
    let got = read_up_to(&mut file, &mut head).map_err(err)?;
    let head = &head[..got];
    if let Some(script) = head.strip_prefix(b"#!") {
        let line = script.split(|&b| b == b'\n').next().unwrap_or_default();
        let program = line
            .split(|b| b.is_ascii_whitespace())
            .find(|w| !w.is_empty());
        return Ok(program.map(|p| PathBuf::from(OsStr::from_bytes(p))));
    }
    // Only 64-bit little-endian ELF (the host's); anything else is left to execve to judge.
    if got < 64 || &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return Ok(None);
    }
    let u16_at = |at: usize| u16::from_le_bytes([head[at], head[at + 1]]);
    let mut u64_bytes = [0u8; 8];
    u64_bytes.copy_from_slice(&head[0x20..0x28]);
    let phoff = u64::from_le_bytes(u64_bytes);
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    if phentsize != 56 {
        return Ok(None);
    }
    let mut table = vec![0u8; usize::from(phnum) * 56];
    file.seek(SeekFrom::Start(phoff)).map_err(err)?;
    file.read_exact(&mut table).map_err(err)?;
    for entry in table.chunks_exact(56) {
        let field = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&entry[at..at + 8]);
            u64::from_le_bytes(b)
        };
        const PT_INTERP: u32 = 3;
        if u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]) != PT_INTERP {
            continue;
        }
        let (offset, size) = (field(8), field(32).min(MAX_INTERP));
        let mut name = Vec::new();
        file.seek(SeekFrom::Start(offset)).map_err(err)?;
        (&mut file).take(size).read_to_end(&mut name).map_err(err)?;
        let name = name.split(|&b| b == 0).next().unwrap_or_default();
        return Ok(Some(PathBuf::from(OsStr::from_bytes(name))));
    }
    Ok(None)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// CPU time this process has used, in microseconds.
pub fn cpu_time_us() -> u64 {
    clock_us(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// CLOCK_MONOTONIC, in microseconds.
pub fn monotonic_us() -> u64 {
    clock_us(libc::CLOCK_MONOTONIC)
}

fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the pointer, which points at `ts`.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs * 1_000_000 + nanos / 1000
}

/// The read end of the handover pipe, kept by the process that was started.
pub struct Handover(File);

impl Handover {
    /// Waits until every other holder of the pipe has exec'd or ended; Ok when none wrote an
    /// error.
    pub fn wait(mut self) -> Result<(), ProcessError> {
        let mut message = String::new();
        // A read error leaves the message as far as it came; an empty one means success.
        let _ = self.0.read_to_string(&mut message);
        if message.is_empty() {
            Ok(())
        } else {
            Err(ProcessError::Descendant(message))
        }
    }
}

/// The write end of the handover pipe, held by the processes that go on towards the exec.
pub struct Reporter(File);

impl Reporter {
    /// Sends one error line to the waiting process.
    pub fn report(&mut self, line: &str) {
        let _ = self.0.write_all(line.as_bytes());
    }
}

/// Makes the handover pipe (both ends close-on-exec, so the exec closes the write end).
pub fn handover_pipe() -> Result<(Handover, Reporter), ProcessError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array, which has room for them.
    let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    check(ret, "pipe2")?;
    // SAFETY: both descriptors were just made by pipe2 and belong to nothing else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((Handover(File::from(read)), Reporter(File::from(write))))
}

/// fork(2): Some(child's PID) in the parent, None in the child.
pub fn fork() -> Result<Option<libc::pid_t>, ProcessError> {
    // SAFETY: the jailer never starts a thread, so no lock can be held by a thread that the
    // child would lack; each process goes on with its own copy of every Rust object.
    let pid = check(unsafe { libc::fork() }, "fork")?;
    Ok((pid != 0).then_some(pid))
}

/// Kills a child that must not go on (SIGKILL).
pub fn kill(pid: libc::pid_t) {
    // SAFETY: kill takes a PID and a signal number.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// setsid(2): a new session and process group, without a controlling terminal.
pub fn new_session() -> Result<(), ProcessError> {
    // SAFETY: setsid takes no arguments.
    check(unsafe { libc::setsid() }, "setsid").map(drop)
}

/// Whether this process leads its session (its controlling terminal hangs up when it ends).
pub fn is_session_leader() -> bool {
    // SAFETY: getsid and getpid take a PID or nothing.
    unsafe { libc::getsid(0) == libc::getpid() }
}

/// Points stdin, stdout and stderr at `file`.
pub fn redirect_stdio(file: &File) -> Result<(), ProcessError> {
    for fd in 0..3 {
        // SAFETY: dup2 takes two descriptors: `file`'s, open while it lives, and a standard
        // stream's number, which no Rust object owns.
        check(unsafe { libc::dup2(file.as_raw_fd(), fd) }, "dup2")?;
    }
    Ok(())
}

/// Makes the next child of this process the first (PID 1) of a new PID namespace.
pub fn unshare_pid_ns() -> Result<(), ProcessError> {
    // SAFETY: unshare takes flags only.
    check(
        unsafe { libc::unshare(libc::CLONE_NEWPID) },
        "unshare(CLONE_NEWPID)",
    )
    .map(drop)
}

/// Becomes `uid`:`gid` with no supplementary groups, for good: real, effective and saved IDs
/// all change, and with them go root's capabilities.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), ProcessError> {
    // Groups first: once the user ID is not root, they can no longer be changed.
    // SAFETY: setgroups with a count of 0 reads nothing through the null pointer.
    check(unsafe { libc::setgroups(0, std::ptr::null()) }, "setgroups")?;
    // SAFETY: setresgid and setresuid take IDs only.
    check(unsafe { libc::setresgid(gid, gid, gid) }, "setresgid")?;
    // SAFETY: as above.
    check(unsafe { libc::setresuid(uid, uid, uid) }, "setresuid").map(drop)
}

/// Replaces the process with `path`, run with `args` (after argv[0], which is `path`) and an
/// empty environment, so nothing of the caller's environment reaches the jail. Returns only
/// on failure.
pub fn exec(path: &Path, args: &[OsString]) -> ProcessError {
    let c = |s: &OsStr| CString::new(s.as_bytes()).map_err(|_| ProcessError::Nul(s.to_owned()));
    let argv: Result<Vec<CString>, ProcessError> = std::iter::once(path.as_os_str())
        .chain(args.iter().map(OsString::as_os_str))
        .map(c)
        .collect();
    let argv = match argv {
        Ok(argv) => argv,
        Err(e) => return e,
    };
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: argv[0] is the path; both arrays are null-terminated arrays of pointers to
    // NUL-terminated strings, and `argv` (which owns the strings) outlives the call.
    unsafe { libc::execve(argv_ptrs[0], argv_ptrs.as_ptr(), envp.as_ptr()) };
    ProcessError::Exec(path.to_owned(), io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_limits_parse() {
        assert_eq!(
            "fsize=1000".parse::<ResourceLimit>().unwrap(),
            ResourceLimit::FileSize(1000)
        );
        assert_eq!(
            "no-file=64".parse::<ResourceLimit>().unwrap(),
            ResourceLimit::NoFile(64)
        );
        for bad in ["fsize", "fsize=-1", "fsize=1k", "nproc=5", "=5"] {
            assert!(bad.parse::<ResourceLimit>().is_err(), "{bad}");
        }
    }

    #[test]
    fn netns_names_and_paths() {
        assert_eq!(netns_path("vm1"), Path::new("/var/run/netns/vm1"));
        assert_eq!(netns_path("/proc/1/ns/net"), Path::new("/proc/1/ns/net"));
        assert_eq!(netns_path("./ns"), Path::new("./ns"));
    }

    #[test]
    fn interpreters_of_elf_files_and_scripts() {
        let dir = std::env::temp_dir().join(format!("skiff-interp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("script");
        std::fs::write(&script, "#!/bin/sh -e\necho hi\n").unwrap();
        assert_eq!(
            interpreter(&script).unwrap(),
            Some(PathBuf::from("/bin/sh"))
        );
        let text = dir.join("text");
        std::fs::write(&text, "hello").unwrap();
        assert_eq!(interpreter(&text).unwrap(), None);
        // This test binary is an ELF file, dynamically linked unless built with crt-static.
        let me = interpreter(&std::env::current_exe().unwrap()).unwrap();
        if cfg!(target_feature = "crt-static") {
            assert_eq!(me, None);
        } else {
            let interp = me.expect("an interpreter");
            assert!(interp.to_string_lossy().contains("ld-linux"), "{interp:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
