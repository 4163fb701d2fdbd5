//! The Unix socket calls the event thread makes for vsock, each non-blocking: a host program
//! that stops reading, or a listener whose backlog is full, can delay a connection but never
//! the thread. The event thread's seccomp filter allows exactly these: accept4, socket
//! (AF_UNIX), connect, read, sendto, shutdown, close.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Accepts one connection from `listener`, non-blocking and close-on-exec.
pub fn accept(listener: &UnixListener) -> io::Result<UnixStream> {
    // SAFETY: accept4 with null address pointers writes nothing to memory; the result is
    // checked before use.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket just returned by accept4 and owned by nobody else.
    Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Connects to the listener at `path` without waiting: a listener whose backlog is full is
/// refused (EAGAIN) rather than waited for.
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeros is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or(1);
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: socket takes no pointers; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket just created and owned by nobody else; it closes on every path.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call, and `len` is within it.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            std::ptr::from_ref(&addr).cast(),
            libc::socklen_t::try_from(len).unwrap_or(0),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(sock))
}

/// Reads what `stream` holds into `buf`; 0 is the end of the stream.
pub fn read(stream: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of its length for the whole call.
        let n = unsafe { libc::read(stream.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match usize::try_from(n) {
            Ok(n) => return Ok(n),
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Writes what of `buf` the socket takes now, without SIGPIPE for a closed peer (EPIPE
/// instead).
pub fn send(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for reads of its length for the whole call.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        match usize::try_from(n) {
            Ok(n) => return Ok(n),
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn connect_accept_and_move_bytes_without_blocking() {
        let dir = std::env::temp_dir().join(format!("skiff-uds-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("l");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        assert_eq!(
            accept(&listener).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let mut host = UnixStream::connect(&path).unwrap();
        let ours = accept(&listener).unwrap();
        host.write_all(b"abc").unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(read(&ours, &mut buf).unwrap(), 3);
        assert_eq!(
            read(&ours, &mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert_eq!(send(&ours, b"xyz").unwrap(), 3);
        host.read_exact(&mut buf[..3]).unwrap();
        assert_eq!(&buf[..3], b"xyz");
        drop(host);
        assert_eq!(read(&ours, &mut buf).unwrap(), 0);
        assert_eq!(
            send(&ours, b"x").unwrap_err().kind(),
            io::ErrorKind::BrokenPipe
        );

        let out = connect(&path).unwrap();
        let theirs = accept(&listener).unwrap();
        assert_eq!(send(&out, b"hi").unwrap(), 2);
        assert_eq!(read(&theirs, &mut buf).unwrap(), 2);
        assert!(connect(&dir.join("nobody")).is_err());
        let long = dir.join("x".repeat(200));
        assert_eq!(
            connect(&long).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
