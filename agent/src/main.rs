//! Skiff's sandbox guest agent: PID 1 of a sandbox guest (`init=/usr/sbin/skiff-agent`), or an
//! ordinary process in any guest. It listens on a vsock port (or, for tests on the host, a Unix
//! socket) and serves the requests of `skiff_agent`'s protocol, each connection on a thread.
//!
//! ```text
//! skiff-agent [--port N] [--unix PATH]
//! ```

mod exec;
mod init;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use skiff_agent::{
    read_frame, write_frame, AgentFrame, HostFrame, AGENT_PORT, CHUNK, PROTOCOL_VERSION,
};

fn main() {
    let pid1 = std::process::id() == 1;
    let mut port = AGENT_PORT;
    let mut unix = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--version" => {
                println!("skiff-agent {}", env!("CARGO_PKG_VERSION"));
                return;
            }
            "--port" => match args.next().and_then(|p| p.parse().ok()) {
                Some(p) => port = p,
                None => fail("--port needs a number"),
            },
            "--unix" => match args.next() {
                Some(p) => unix = Some(p),
                None => fail("--unix needs a path"),
            },
            // The kernel hands init the command line's words it does not know: ignore them.
            _ if pid1 => {}
            other => fail(&format!("unknown argument {other:?}")),
        }
    }
    if pid1 {
        init::setup();
    } else {
        // Orphaned descendants of commands come to the agent, whose reaper collects them, as
        // they would to PID 1.
        // SAFETY: prctl with an integer argument.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    }
    exec::start_reaper();
    let listener = match &unix {
        Some(path) => listen_unix(path),
        None => listen_vsock(port),
    };
    let listener = listener.unwrap_or_else(|e| fail(&format!("cannot listen: {e}")));
    match &unix {
        Some(path) => println!(
            "skiff-agent {}: listening on {path}",
            env!("CARGO_PKG_VERSION")
        ),
        None => println!(
            "skiff-agent {}: listening on vsock port {port}",
            env!("CARGO_PKG_VERSION")
        ),
    }
    loop {
        // SAFETY: accept4 on a listening socket we own; null address pointers are allowed.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                eprintln!("skiff-agent: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            continue;
        }
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        let conn = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        std::thread::spawn(move || serve(conn));
    }
}

/// Ends the agent with a message (as PID 1: the kernel panics and, with panic=1, restarts,
/// which ends the microVM rather than leaving it without an agent).
fn fail(msg: &str) -> ! {
    eprintln!("skiff-agent: {msg}");
    std::process::exit(2);
}

fn socket(domain: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bind_listen<T>(fd: OwnedFd, addr: &T) -> io::Result<OwnedFd> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<T>()).expect("small address");
    // SAFETY: `addr` is a valid socket address of `len` bytes for the socket's family.
    if unsafe { libc::bind(fd.as_raw_fd(), (addr as *const T).cast(), len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on a bound socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 64) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn listen_vsock(port: u32) -> io::Result<OwnedFd> {
    let fd = socket(libc::AF_VSOCK)?;
    // SAFETY: sockaddr_vm is plain data; all zeroes is a valid starting value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::sa_family_t::try_from(libc::AF_VSOCK).expect("a small constant");
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    bind_listen(fd, &addr)
}

fn listen_unix(path: &str) -> io::Result<OwnedFd> {
    let fd = socket(libc::AF_UNIX)?;
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid starting value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).expect("a small constant");
    if path.len() >= addr.sun_path.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "path too long"));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(path.bytes()) {
        *d = s as libc::c_char;
    }
    let _ = std::fs::remove_file(path);
    bind_listen(fd, &addr)
}

/// One connection: one request and what follows it.
fn serve(mut conn: File) {
    let result = match read_frame::<HostFrame>(&mut conn) {
        Ok(Some(HostFrame::Hello { version })) if version == PROTOCOL_VERSION => write_frame(
            &mut conn,
            &AgentFrame::Hello {
                version: PROTOCOL_VERSION,
                agent: format!("skiff-agent {}", env!("CARGO_PKG_VERSION")),
            },
        ),
        Ok(Some(HostFrame::Hello { version })) => refuse(
            &mut conn,
            &format!(
                "protocol version {version} is not served (this agent speaks {PROTOCOL_VERSION})"
            ),
        ),
        Ok(Some(HostFrame::Exec(req))) => exec::run(&mut conn, &req),
        Ok(Some(HostFrame::PutFile { path, mode })) => put_file(&mut conn, &path, mode),
        Ok(Some(HostFrame::GetFile { path })) => get_file(&mut conn, &path),
        Ok(Some(other)) => refuse(&mut conn, &format!("{other:?} cannot start a request")),
        Ok(None) => Ok(()),
        Err(e) => refuse(&mut conn, &e.to_string()),
    };
    if let Err(e) = result {
        // The host went away or broke the protocol; nothing more to tell it.
        if e.kind() != io::ErrorKind::BrokenPipe && e.kind() != io::ErrorKind::ConnectionReset {
            eprintln!("skiff-agent: connection: {e}");
        }
    }
}

fn refuse(conn: &mut File, why: &str) -> io::Result<()> {
    write_frame(conn, &AgentFrame::Error(why.to_string()))
}

fn put_file(conn: &mut File, path: &str, mode: u32) -> io::Result<()> {
    let open = || -> io::Result<File> {
        if let Some(parent) = Path::new(path).parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode & 0o7777)
            .open(path)
    };
    let mut file = open().map_err(|e| format!("cannot create {path}: {e}"));
    // Read every frame up to Eof even after a failure, so that the answer comes in order.
    loop {
        match read_frame::<HostFrame>(conn)? {
            Some(HostFrame::Data(bytes)) => {
                if let Ok(f) = &mut file {
                    if let Err(e) = f.write_all(&bytes) {
                        file = Err(format!("cannot write {path}: {e}"));
                    }
                }
            }
            Some(HostFrame::Eof) => break,
            Some(other) => return refuse(conn, &format!("{other:?} inside a file's data")),
            None => return Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }
    let done = file.and_then(|f| {
        f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
            .map_err(|e| format!("cannot set the mode of {path}: {e}"))
    });
    match done {
        Ok(()) => write_frame(conn, &AgentFrame::Done),
        Err(why) => refuse(conn, &why),
    }
}

fn get_file(conn: &mut File, path: &str) -> io::Result<()> {
    let mut file = match File::open(path) {
        Ok(f) if f.metadata().is_ok_and(|m| m.is_file()) => f,
        Ok(_) => return refuse(conn, &format!("{path} is not a regular file")),
        Err(e) => return refuse(conn, &format!("cannot open {path}: {e}")),
    };
    let mut buf = vec![0u8; CHUNK];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return write_frame(conn, &AgentFrame::Eof),
            Ok(n) => write_frame(conn, &AgentFrame::Data(buf[..n].to_vec()))?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return refuse(conn, &format!("cannot read {path}: {e}")),
        }
    }
}
