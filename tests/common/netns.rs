//! A throw-away network namespace with a TAP in it, for network tests: made with `ip`, removed
//! (with everything in it) when dropped.

use std::ffi::OsStr;
use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};

/// A network namespace holding one TAP with the host's address on it.
pub struct NetNs {
    name: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (package iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {} (network tests need root for namespaces and TAP devices)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl NetNs {
    /// An empty namespace `skiff-<tag>-<pid>` with loopback up.
    pub fn new(tag: &str) -> Self {
        let name = format!("skiff-{tag}-{}", std::process::id());
        // A namespace left by a killed earlier run of this test.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// A namespace with the TAP `tap` up and `host_cidr` (such as 172.30.0.1/24) on it.
    pub fn with_tap(tag: &str, tap: &str, host_cidr: &str) -> Self {
        let ns = Self::new(tag);
        ip(&["-n", &ns.name, "tuntap", "add", "dev", tap, "mode", "tap"]);
        ns.add_address(tap, host_cidr);
        ip(&["-n", &ns.name, "link", "set", tap, "up"]);
        ns
    }

    /// Puts `cidr` on the interface `dev`.
    pub fn add_address(&self, dev: &str, cidr: &str) {
        ip(&["-n", &self.name, "addr", "add", cidr, "dev", dev]);
    }

    /// `ip link show dev` inside the namespace, if the interface exists.
    pub fn link(&self, dev: &str) -> Option<String> {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-o", "link", "show", dev])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `program args` to be run inside the namespace.
    pub fn command<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]).args(args);
        cmd
    }

    /// Runs `f` on a thread that entered the namespace: sockets it makes belong there, and
    /// stay there when used from other threads.
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).expect("open the namespace");
            // SAFETY: setns takes a descriptor and a flag; it changes only this thread's
            // network namespace, and the thread ends when `f` returns.
            let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(ret, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread")
    }

    /// A UDP socket bound to `addr` inside the namespace, with 16 MiB of receive buffer so a
    /// guest's burst is not dropped before the test reads it.
    pub fn udp_socket(&self, addr: SocketAddr) -> UdpSocket {
        let sock = self.run_in(move || UdpSocket::bind(addr).expect("bind in the namespace"));
        let size: libc::c_int = 16 << 20;
        // SAFETY: setsockopt reads an int through the pointer, which points at `size` for the
        // duration of the call; the descriptor is the socket's own.
        let ret = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                std::ptr::addr_of!(size).cast(),
                libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap(),
            )
        };
        assert_eq!(
            ret,
            0,
            "SO_RCVBUFFORCE: {}",
            std::io::Error::last_os_error()
        );
        sock
    }

    /// A DHCP server (dnsmasq) on `dev` that gives `ip` to `mac`, logging to its stderr; it
    /// stops when the guard is dropped.
    pub fn dhcp_server(&self, dev: &str, mac: &str, ip: &str) -> ChildGuard {
        let child = self
            .command(
                "dnsmasq",
                &[
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                    "--port=0",
                    "--bind-interfaces",
                    &format!("--interface={dev}"),
                    &format!("--dhcp-range={ip},{ip},255.255.255.0,1h"),
                    &format!("--dhcp-host={mac},{ip}"),
                    "--dhcp-leasefile=/dev/null",
                    "--pid-file",
                    "--user=root",
                    "--log-dhcp",
                    "--log-facility=-",
                ],
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dnsmasq (package dnsmasq-base)");
        ChildGuard(Some(child))
    }
}

/// A helper process, killed when dropped.
pub struct ChildGuard(Option<Child>);

impl ChildGuard {
    /// Stops the process and returns what it wrote to stderr.
    pub fn stop(mut self) -> String {
        let mut child = self.0.take().expect("running");
        let _ = child.kill();
        let out = child.wait_with_output().expect("wait");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
