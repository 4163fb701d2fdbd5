//! Running a command: spawn it in a process group (a session, with a PTY) of its own, pump its output to the host and the
//! host's input to it, end it on timeout or when the host goes away, and report how it ended.
//!
//! Exit statuses come from one reaper thread, which also reaps orphans (the agent is PID 1 in a
//! sandbox). It peeks at an exited child with `WNOWAIT` and then takes the spawn lock, so a
//! child whose spawn is still being recorded (or whose exec failed and which the standard
//! library reaps itself) is never taken from under its owner.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use skiff_agent::{write_frame, AgentFrame, ExecRequest, ExitStatus, HostFrame, CHUNK};

/// How long output is still read after the command exited and its group was killed (a
/// descendant that left the group may hold the pipes open for ever).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

struct Reaper {
    /// Pid -> write end of the pipe its exit status goes to.
    waiting: Mutex<HashMap<i32, OwnedFd>>,
    spawned: Condvar,
}

fn reaper() -> &'static Reaper {
    static REAPER: OnceLock<Reaper> = OnceLock::new();
    REAPER.get_or_init(|| Reaper {
        waiting: Mutex::new(HashMap::new()),
        spawned: Condvar::new(),
    })
}

pub fn start_reaper() {
    std::thread::spawn(|| {
        let r = reaper();
        loop {
            // SAFETY: siginfo_t is plain data; waitid fills it.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid with a valid siginfo_t; WNOWAIT leaves the child a zombie.
            let rc =
                unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if rc < 0 {
                if io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
                    let guard = r.waiting.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = r.spawned.wait_timeout(guard, Duration::from_secs(1));
                }
                continue;
            }
            // SAFETY: waitid succeeded for an exited child, so si_pid is set.
            let pid = unsafe { info.si_pid() };
            let mut waiting = r.waiting.lock().unwrap_or_else(|e| e.into_inner());
            let mut status = 0;
            let owner = waiting.remove(&pid);
            let flags = if owner.is_some() { 0 } else { libc::WNOHANG };
            // SAFETY: waitpid for one pid with a valid status pointer.
            let reaped = unsafe { libc::waitpid(pid, &mut status, flags) } == pid;
            drop(waiting);
            if let (Some(fd), true) = (owner, reaped) {
                let bytes = status.to_ne_bytes();
                // SAFETY: writing 4 bytes from a local buffer to the pipe we own; a closed
                // reading end gives EPIPE (SIGPIPE is ignored in Rust programs).
                unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
            }
        }
    });
}

fn pipe() -> io::Result<(File, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nothing else.
    Ok(unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl flag changes on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

/// A pseudo-terminal pair, both ends close-on-exec (the child gets the slave as 0, 1 and 2).
fn openpty(rows: u16, cols: u16) -> io::Result<(File, OwnedFd)> {
    let (mut master, mut slave) = (0, 0);
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty fills two descriptors; the name pointer may be null; termios null
    // means defaults.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nothing else; FD_CLOEXEC on them.
    unsafe {
        libc::fcntl(master, libc::F_SETFD, libc::FD_CLOEXEC);
        libc::fcntl(slave, libc::F_SETFD, libc::FD_CLOEXEC);
        Ok((File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)))
    }
}

fn base_env() -> Vec<(String, String)> {
    [
        (
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ),
        ("HOME", "/root"),
        ("LANG", "C.UTF-8"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A spawned command: its pid (and process group), the ends of its output and input, and the
/// pipe its exit status arrives on.
struct Spawned {
    pid: i32,
    stdout: File,
    stderr: Option<File>,
    stdin: Option<File>,
    pty: bool,
    exit: File,
}

fn spawn(req: &ExecRequest) -> io::Result<Spawned> {
    let Some(program) = req.argv.first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty argv"));
    };
    let mut cmd = Command::new(program);
    cmd.args(&req.argv[1..]).env_clear();
    for (k, v) in base_env() {
        cmd.env(k, v);
    }
    if req.pty.is_some() {
        cmd.env("TERM", "xterm-256color");
    }
    for (k, v) in &req.env {
        cmd.env(k, v);
    }
    cmd.current_dir(req.cwd.as_deref().unwrap_or("/"));
    let mut master = None;
    if let Some(size) = req.pty {
        let (m, slave) = openpty(size.rows, size.cols)?;
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        master = Some(m);
    } else {
        cmd.stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    }
    let pty = master.is_some();
    if pty {
        // A session of its own, whose controlling terminal is the PTY.
        // SAFETY: the closure only makes async-signal-safe system calls (setsid, ioctl).
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    } else {
        // A process group of its own, for the kills. Without a pre_exec closure the standard
        // library can spawn with posix_spawn (vfork) rather than fork, which copies no page
        // tables: much cheaper where the guest kernel is emulated.
        cmd.process_group(0);
    }
    let (exit, exit_w) = pipe()?;
    let r = reaper();
    let mut waiting = r.waiting.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = cmd.spawn()?;
    let pid = i32::try_from(child.id()).expect("pids fit in i32");
    waiting.insert(pid, exit_w);
    r.spawned.notify_one();
    drop(waiting);
    // The Child is dropped without a wait: the reaper owns the exit status.
    let (stdout, stderr, stdin) = match master {
        Some(m) => {
            let input = m.try_clone()?;
            (m, None, Some(input))
        }
        None => (
            File::from(OwnedFd::from(child.stdout.take().expect("piped"))),
            Some(File::from(OwnedFd::from(
                child.stderr.take().expect("piped"),
            ))),
            child.stdin.take().map(|s| File::from(OwnedFd::from(s))),
        ),
    };
    if let Some(s) = &stdin {
        set_nonblocking(s.as_raw_fd());
    }
    Ok(Spawned {
        pid,
        stdout,
        stderr,
        stdin,
        pty,
        exit,
    })
}

fn kill_group(pid: i32, signal: i32) {
    // SAFETY: kill(2) on the command's process group (its pid: it made its own session).
    unsafe { libc::kill(-pid, signal) };
}

fn decode_status(raw: i32) -> ExitStatus {
    if libc::WIFSIGNALED(raw) {
        ExitStatus::Signal(libc::WTERMSIG(raw))
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(raw))
    }
}

/// Runs `req` for the host on `conn` and answers with its output and exit.
pub fn run(conn: &mut File, req: &ExecRequest) -> io::Result<()> {
    let mut s = match spawn(req) {
        Ok(s) => s,
        Err(e) => {
            let what = req.argv.first().map_or("", String::as_str);
            return write_frame(
                conn,
                &AgentFrame::Error(format!("cannot run {what:?}: {e}")),
            );
        }
    };
    let pid = s.pid;
    write_frame(
        conn,
        &AgentFrame::Started {
            pid: u32::try_from(pid).unwrap_or(0),
        },
    )?;
    let deadline = req
        .timeout_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let result = pump(conn, &mut s, deadline);
    // Whatever happened, nothing of the command outlives the request.
    kill_group(pid, libc::SIGKILL);
    let (status, timed_out) = result?;
    write_frame(conn, &AgentFrame::Exited { status, timed_out })
}

/// Moves bytes until the command has exited and its output ended (or the grace after exit
/// passed); returns how it ended.
fn pump(
    conn: &mut File,
    s: &mut Spawned,
    deadline: Option<Instant>,
) -> io::Result<(ExitStatus, bool)> {
    let mut stdin_buf: Vec<u8> = Vec::new();
    let mut stdin_eof = false;
    let mut out_open = true;
    let mut err_open = s.stderr.is_some();
    let mut status = None;
    let mut timed_out = false;
    let mut drain_until = None;
    let mut buf = vec![0u8; CHUNK];
    loop {
        if status.is_some()
            && (!out_open && !err_open || drain_until.is_some_and(|d| Instant::now() >= d))
        {
            break;
        }
        let now = Instant::now();
        if let Some(d) = deadline {
            if !timed_out && status.is_none() && now >= d {
                timed_out = true;
                kill_group(s.pid, libc::SIGKILL);
            }
        }
        let mut wake = drain_until;
        if !timed_out && status.is_none() {
            wake = deadline;
        }
        let timeout_ms = wake.map_or(-1, |w| {
            i32::try_from(w.saturating_duration_since(now).as_millis().min(60_000))
                .unwrap_or(60_000)
                + 1
        });
        // Poll set: 0 conn, 1 exit, 2 stdout, 3 stderr, 4 stdin (for writing).
        let fd_or_off = |open: bool, fd: RawFd| if open { fd } else { -1 };
        let stdin_fd = s.stdin.as_ref().map_or(-1, |f| f.as_raw_fd());
        let mut fds = [
            pfd(conn.as_raw_fd(), libc::POLLIN),
            pfd(
                fd_or_off(status.is_none(), s.exit.as_raw_fd()),
                libc::POLLIN,
            ),
            pfd(fd_or_off(out_open, s.stdout.as_raw_fd()), libc::POLLIN),
            pfd(
                fd_or_off(err_open, s.stderr.as_ref().map_or(-1, |f| f.as_raw_fd())),
                libc::POLLIN,
            ),
            pfd(
                fd_or_off(!stdin_buf.is_empty() && !s.pty, stdin_fd),
                libc::POLLOUT,
            ),
        ];
        // SAFETY: poll over a local array of pollfd; negative fds are ignored.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[0].revents != 0 {
            match skiff_agent::read_frame::<HostFrame>(conn) {
                Ok(Some(HostFrame::Stdin(bytes))) => stdin_buf.extend_from_slice(&bytes),
                Ok(Some(HostFrame::StdinEof)) => stdin_eof = true,
                Ok(Some(HostFrame::Signal(sig))) => kill_group(s.pid, sig),
                Ok(Some(HostFrame::Resize(size))) => {
                    if s.pty {
                        let ws = libc::winsize {
                            ws_row: size.rows,
                            ws_col: size.cols,
                            ws_xpixel: 0,
                            ws_ypixel: 0,
                        };
                        // SAFETY: TIOCSWINSZ on our PTY master with a valid winsize.
                        unsafe { libc::ioctl(s.stdout.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
                    }
                }
                Ok(Some(other)) => {
                    let _ = write_frame(
                        conn,
                        &AgentFrame::Error(format!("{other:?} during a command")),
                    );
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "unexpected frame",
                    ));
                }
                // The host went away (or broke the protocol): end the command.
                Ok(None) | Err(_) => {
                    kill_group(s.pid, libc::SIGKILL);
                    return Err(io::ErrorKind::BrokenPipe.into());
                }
            }
        }
        if fds[1].revents != 0 {
            let mut raw = [0u8; 4];
            if s.exit.read_exact(&mut raw).is_ok() {
                status = Some(decode_status(i32::from_ne_bytes(raw)));
                // What is left of the group goes too, so that its pipes close.
                kill_group(s.pid, libc::SIGKILL);
                drain_until = Some(Instant::now() + DRAIN_GRACE);
            }
        }
        for (i, is_out) in [(2, true), (3, false)] {
            if fds[i].revents == 0 {
                continue;
            }
            let file = if is_out {
                &mut s.stdout
            } else {
                s.stderr.as_mut().expect("polled")
            };
            match file.read(&mut buf) {
                Ok(0) => {}
                Ok(n) => {
                    let data = buf[..n].to_vec();
                    let frame = if is_out {
                        AgentFrame::Stdout(data)
                    } else {
                        AgentFrame::Stderr(data)
                    };
                    write_frame(conn, &frame)?;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The PTY master is non-blocking (it is also the command's input).
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                // EIO: the PTY's slave side has no more users.
                Err(_) => {}
            }
            if is_out {
                out_open = false;
            } else {
                err_open = false;
            }
        }
        if fds[4].revents != 0 {
            if let Some(stdin) = &mut s.stdin {
                match stdin.write(&stdin_buf) {
                    Ok(n) => {
                        stdin_buf.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // The command closed its input: drop what it will never read.
                    Err(_) => {
                        stdin_buf.clear();
                        s.stdin = None;
                    }
                }
            }
        }
        // A PTY's input goes through the master at once (the line discipline buffers it).
        if s.pty && !stdin_buf.is_empty() {
            if let Some(stdin) = &mut s.stdin {
                match stdin.write(&stdin_buf) {
                    Ok(n) => {
                        stdin_buf.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => stdin_buf.clear(),
                }
            }
        }
        if stdin_eof && stdin_buf.is_empty() && !s.pty {
            // Closing the pipe gives the command end of file.
            s.stdin = None;
        }
    }
    Ok((status.expect("loop ends after the exit"), timed_out))
}

fn pfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}
