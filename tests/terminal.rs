//! The console on a terminal: raw mode while the VM runs (keys go to the guest unprocessed),
//! canonical mode restored when it ends, whether the guest powers off or a signal stops it.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{pty, test_guest};

fn canonical(tty: &File) -> bool {
    // SAFETY: termios is plain data; tcgetattr fills it for a valid terminal fd.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is an open pty slave.
    assert_eq!(unsafe { libc::tcgetattr(tty.as_raw_fd(), &mut t) }, 0);
    t.c_lflag & libc::ICANON != 0 && t.c_lflag & libc::ECHO != 0
}

fn start(slave: &File, checks: &str) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .args([
            "run",
            "--kernel",
            test_guest().to_str().unwrap(),
            "--cmdline",
            checks,
        ])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

fn wait_for(rx: &std::sync::mpsc::Receiver<String>, what: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            if line.contains(what) {
                return true;
            }
        }
    }
    false
}

#[test]
fn raw_while_running_and_restored_after_guest_exit() {
    let (mut master, slave) = pty();
    assert!(canonical(&slave));
    let (mut child, rx) = start(&slave, "checks=serial");
    assert!(wait_for(&rx, "serial: ready for input"));
    assert!(
        !canonical(&slave),
        "terminal not in raw mode while the VM runs"
    );
    // In raw mode a carriage return reaches the guest as is and ends its line.
    master.write_all(b"typed-on-a-tty\r").unwrap();
    assert!(wait_for(&rx, "serial: echo 'typed-on-a-tty'"));
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert!(
        canonical(&slave),
        "terminal not restored after the guest ended"
    );
}

#[test]
fn restored_after_sigterm() {
    let (_master, slave) = pty();
    let (child, rx) = start(&slave, "checks=serial");
    assert!(wait_for(&rx, "serial: ready for input"));
    assert!(!canonical(&slave));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) };
    let status = child.wait_with_output().unwrap().status;
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    assert!(canonical(&slave), "terminal not restored after SIGTERM");
}
