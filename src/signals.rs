//! Termination signals (SIGTERM, SIGINT, SIGHUP, SIGQUIT) turned into an eventfd write, so that
//! Skiff ends cleanly (terminal restored, threads joined, API socket removed) instead of dying
//! mid-write.
//!
//! The handler writes to one descriptor number that this module owns and never closes: it is
//! pointed at the current listener's eventfd with dup3(2), which swaps what the number refers
//! to atomically. Each listener is kept as a duplicate this module owns, so the eventfd stays
//! alive whatever its caller closes, and a listener that goes away (a `Vm` dropped after a
//! failed start) hands the number back to the previous one, or to a sink: a late signal can
//! never write into a file that reused a closed descriptor number.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use vmm_sys_util::eventfd::EventFd;

use crate::vmm::VmmError;

/// The descriptor the handler writes; -1 until the first listener.
static HANDLER_FD: AtomicI32 = AtomicI32::new(-1);
/// The last termination signal received (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);
/// Listeners, newest last (the newest gets the signals): the caller's descriptor number, which
/// names the listener while the caller keeps it open, and this module's own duplicate.
static LISTENERS: Mutex<Vec<(RawFd, EventFd)>> = Mutex::new(Vec::new());
/// Where signals go while nobody listens.
static SINK: OnceLock<EventFd> = OnceLock::new();

extern "C" fn handle_termination(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    RECEIVED.store(num, Ordering::SeqCst);
    let fd = HANDLER_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is a valid 8-byte buffer; `fd` is this
        // module's descriptor, never closed, and always refers to an eventfd.
        unsafe { libc::write(fd, std::ptr::addr_of!(one).cast(), 8) };
    }
}

/// Points the handler's descriptor at the eventfd `target`, which the caller keeps open.
fn point_handler_at(target: RawFd) -> std::io::Result<()> {
    let fd = HANDLER_FD.load(Ordering::SeqCst);
    if fd < 0 {
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor the caller keeps open returns a new one,
        // which this module then owns.
        let new = unsafe { libc::fcntl(target, libc::F_DUPFD_CLOEXEC, 0) };
        if new < 0 {
            return Err(std::io::Error::last_os_error());
        }
        HANDLER_FD.store(new, Ordering::SeqCst);
    } else {
        // SAFETY: `fd` is this module's own descriptor and `target` one the caller keeps open;
        // dup3 makes `fd` refer to `target`'s eventfd in one step, so the handler never sees a
        // closed or foreign number.
        if unsafe { libc::dup3(target, fd, libc::O_CLOEXEC) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Makes SIGTERM, SIGINT, SIGHUP and SIGQUIT write `evt` (and be remembered, see
/// [`termination_signal`]) instead of killing the process, until [`stop_forwarding_to`] is
/// called for it (the previous listener then gets them again).
pub fn forward_termination_signals(evt: &EventFd) -> Result<(), VmmError> {
    let io = VmmError::EventThread;
    if SINK.get().is_none() {
        let sink = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(io)?;
        let _ = SINK.set(sink);
    }
    let own = evt.try_clone().map_err(io)?;
    let mut listeners = LISTENERS.lock().unwrap_or_else(PoisonError::into_inner);
    point_handler_at(own.as_raw_fd()).map_err(io)?;
    listeners.retain(|(fd, _)| *fd != evt.as_raw_fd());
    listeners.push((evt.as_raw_fd(), own));
    drop(listeners);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT] {
        vmm_sys_util::signal::register_signal_handler(sig, handle_termination)
            .map_err(|e| io(std::io::Error::from_raw_os_error(e.errno())))?;
    }
    Ok(())
}

/// `evt` is about to close: signals go back to the previous listener, or to the sink.
pub(crate) fn stop_forwarding_to(evt: &EventFd) {
    let mut listeners = LISTENERS.lock().unwrap_or_else(PoisonError::into_inner);
    if listeners
        .last()
        .is_some_and(|(fd, _)| *fd == evt.as_raw_fd())
    {
        // Dropped (closed) only after the handler points elsewhere.
        let _gone = listeners.pop();
        let next = listeners
            .last()
            .map(|(_, own)| own.as_raw_fd())
            .or_else(|| SINK.get().map(AsRawFd::as_raw_fd));
        if let Some(next) = next {
            if let Err(e) = point_handler_at(next) {
                log::error!("cannot redirect termination signals: {e}");
            }
        }
    } else {
        listeners.retain(|(fd, _)| *fd != evt.as_raw_fd());
    }
}

/// The termination signal received, if any.
pub fn termination_signal() -> Option<i32> {
    Some(RECEIVED.load(Ordering::SeqCst)).filter(|&s| s != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A listener that went away (its eventfd closed, its number reused by a file) gets no
    /// more writes: the previous listener does. Before, the handler kept the closed number and
    /// wrote 8 bytes into whatever file got it next.
    #[test]
    fn a_closed_listener_never_receives_a_signal() {
        let first = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let first_seen = first.try_clone().unwrap();
        forward_termination_signals(&first).unwrap();
        let second = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        forward_termination_signals(&second).unwrap();
        // The first listener's owner closes its descriptor without saying so (main's wake
        // eventfd is dropped before the VM), and the number may be reused before the second
        // listener goes away.
        let first_fd = first.as_raw_fd();
        drop(first);
        stop_forwarding_to(&second);
        drop(second);
        let path = std::env::temp_dir().join(format!("skiff-signals-{}", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        // SAFETY: raise(3) on this process; the handler above is installed.
        assert_eq!(unsafe { libc::raise(libc::SIGHUP) }, 0);
        let mut written = Vec::new();
        file.read_to_end(&mut written).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(written.is_empty(), "a signal wrote into a file");
        assert_eq!(
            first_seen.read().unwrap(),
            1,
            "the previous listener got it"
        );
        assert_eq!(termination_signal(), Some(libc::SIGHUP));
        LISTENERS.lock().unwrap().retain(|(fd, _)| *fd != first_fd);
        RECEIVED.store(0, Ordering::SeqCst);
    }
}
