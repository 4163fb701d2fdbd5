//! The host side of the vsock device, as Firecracker's Unix socket backend: the listener at
//! `uds_path` for host programs (`CONNECT <port>\n`, answered `OK <host port>\n` once the guest
//! accepts), connections to `<uds_path>_<port>` for guest sockets connecting to the host, the
//! connections by port, and the queue of what the guest receives next.
//!
//! Sockets are watched through an epoll descriptor of the muxer's own, which the event loop
//! watches: each wake-up handles at most [`EVENTS_PER_WAKE`] socket events, and whatever is
//! left is still ready at the next one. What the guest is owed waits in a queue with one entry
//! per connection (and at most [`MAX_PENDING_RST`] resets for packets that had no connection),
//! so neither side can make it grow without bound.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::Level;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{Blocked, Connection, End};
use super::packet::{op, Header, TYPE_STREAM};
use super::{uds, HOST_CID, MAX_CONNECTIONS, MAX_PENDING_HOST_CONNECTIONS};
use crate::guest_log;
use crate::metrics::{inc, VsockMetrics};

/// Socket events handled per wake-up.
pub const EVENTS_PER_WAKE: usize = 32;
/// Resets for packets without a connection waiting for the guest; while this many wait, the
/// guest's transmit queue is not read (it is answered as the guest takes them).
pub const MAX_PENDING_RST: usize = 256;
/// Host connections accepted per listener event.
const ACCEPTS_PER_EVENT: usize = 8;
/// Longest `CONNECT <port>\n` line, and how long a host program has to write it.
const MAX_CONNECT_LINE: usize = 32;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often connections with a deadline are looked at.
const SWEEP_PERIOD: Duration = Duration::from_millis(250);
/// Host ports given to host-initiated connections, round-robin in [2^30, 2^31), as Firecracker.
const LOCAL_PORT_BASE: u32 = 1 << 30;

/// A connection's key: (host port, guest port).
type Key = (u32, u32);

/// What an epoll registration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watch {
    Listener,
    /// An accepted host stream still to write its CONNECT line.
    Pending,
    Conn(Key),
}

/// Something the guest is to receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RxItem {
    /// Whatever this connection owes.
    Conn(Key),
    /// An RST from `src_port` to `dst_port`, answering a packet no connection takes.
    Rst { src_port: u32, dst_port: u32 },
}

/// A host stream that has not said which guest port it wants yet.
#[derive(Debug)]
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

/// What became of a packet from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxOutcome {
    /// Taken (or answered, or dropped as invalid).
    Done,
    /// Not now: the packet's connection has no room, or too many resets wait for the guest.
    /// The packet stays on the transmit queue.
    Blocked,
}

/// The vsock device's host side; see the module documentation.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    conns: HashMap<Key, Connection>,
    pending_hosts: HashMap<RawFd, PendingHost>,
    watches: HashMap<RawFd, Watch>,
    rxq: VecDeque<RxItem>,
    pending_rst: usize,
    last_local_port: u32,
    /// Whether the driver runs the device: host connections are refused until it does.
    pub active: bool,
    metrics: Arc<VsockMetrics>,
    events: Vec<EpollEvent>,
}

/// Errors while setting up the host side.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// The Unix socket cannot be created.
    #[error("cannot listen on the vsock socket {}", .0.display())]
    Bind(PathBuf, #[source] io::Error),
    /// An epoll or timer descriptor cannot be made.
    #[error("cannot set up the vsock device's event descriptors")]
    Setup(#[source] io::Error),
}

impl Muxer {
    /// Listens on `path` (which must not exist) for host programs, for a guest with CID
    /// `guest_cid`.
    pub fn new(
        guest_cid: u64,
        path: &Path,
        metrics: Arc<VsockMetrics>,
    ) -> Result<Self, MuxerError> {
        let listener =
            UnixListener::bind(path).map_err(|e| MuxerError::Bind(path.to_owned(), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| MuxerError::Bind(path.to_owned(), e))?;
        let epoll = Epoll::new().map_err(MuxerError::Setup)?;
        // SAFETY: timerfd_create takes no pointers; the result is checked before use.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
            )
        };
        if fd < 0 {
            return Err(MuxerError::Setup(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a timerfd just created and owned by nobody else.
        let timer = unsafe { <TimerFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let mut muxer = Self {
            guest_cid,
            path: path.to_owned(),
            listener,
            epoll,
            timer,
            timer_armed: false,
            conns: HashMap::new(),
            pending_hosts: HashMap::new(),
            watches: HashMap::new(),
            rxq: VecDeque::new(),
            pending_rst: 0,
            last_local_port: LOCAL_PORT_BASE - 1,
            active: false,
            metrics,
            events: vec![EpollEvent::default(); EVENTS_PER_WAKE],
        };
        let fd = muxer.listener.as_raw_fd();
        muxer
            .watch(fd, Watch::Listener, EventSet::IN)
            .map_err(MuxerError::Setup)?;
        Ok(muxer)
    }

    /// The socket host programs connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The descriptor the event loop watches for socket events.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// The descriptor the event loop watches for connection deadlines.
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn watch(&mut self, fd: RawFd, what: Watch, events: EventSet) -> io::Result<()> {
        let event = EpollEvent::new(events, u64::try_from(fd).unwrap_or(0));
        self.epoll.ctl(ControlOperation::Add, fd, event)?;
        self.watches.insert(fd, what);
        Ok(())
    }

    fn unwatch(&mut self, fd: RawFd) {
        if self.watches.remove(&fd).is_some() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    /// Drops every connection (the host streams close; closing takes them out of the epoll
    /// set, so this makes no other system call and may run on a vCPU thread at a device
    /// reset). The listener stays.
    pub fn reset(&mut self) {
        let n = self.conns.len() as u64;
        crate::metrics::add(&self.metrics.conns_removed, n);
        self.conns.clear();
        self.pending_hosts.clear();
        self.watches.retain(|_, w| *w == Watch::Listener);
        self.rxq.clear();
        self.pending_rst = 0;
        self.last_local_port = LOCAL_PORT_BASE - 1;
    }

    /// Whether the guest is owed anything.
    pub fn has_pending_rx(&self) -> bool {
        !self.rxq.is_empty()
    }

    /// Queues an RST answering a packet from `guest_port` to `host_port`; dropped (and
    /// counted) only when [`MAX_PENDING_RST`] already wait, which the transmit path avoids.
    fn enqueue_rst(&mut self, host_port: u32, guest_port: u32) {
        if self.pending_rst >= MAX_PENDING_RST {
            inc(&self.metrics.rx_rst_dropped);
            return;
        }
        self.pending_rst += 1;
        self.rxq.push_back(RxItem::Rst {
            src_port: host_port,
            dst_port: guest_port,
        });
    }

    /// A packet the guest sent (see [`TxOutcome`]). Packets with another source than the
    /// guest's CID or another destination than the host are dropped; anything else without
    /// a connection is answered with an RST, but for a REQUEST to a host listener that
    /// exists, which makes a connection.
    pub fn send_pkt(&mut self, hdr: &Header, data: &[u8]) -> TxOutcome {
        if self.pending_rst >= MAX_PENDING_RST {
            return TxOutcome::Blocked;
        }
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            guest_log!(
                Level::Debug,
                "vsock: dropping a packet from CID {} to CID {}",
                hdr.src_cid,
                hdr.dst_cid
            );
            inc(&self.metrics.tx_invalid_packets);
            return TxOutcome::Done;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.type_ != TYPE_STREAM {
            inc(&self.metrics.tx_invalid_packets);
            if hdr.op != op::RST {
                self.enqueue_rst(hdr.dst_port, hdr.src_port);
            }
            return TxOutcome::Done;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                op::REQUEST => self.connect_to_host(hdr),
                op::RST => {}
                _ => self.enqueue_rst(hdr.dst_port, hdr.src_port),
            }
            return TxOutcome::Done;
        };
        if hdr.op == op::RST {
            conn.reset_by_guest();
            self.update(key);
            return TxOutcome::Done;
        }
        if let Err(Blocked) = conn.send_pkt(hdr, data) {
            return TxOutcome::Blocked;
        }
        self.update(key);
        TxOutcome::Done
    }

    /// A guest REQUEST to host port P: connects to `<uds_path>_P`, or answers RST.
    fn connect_to_host(&mut self, request: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            inc(&self.metrics.conns_refused);
            self.enqueue_rst(request.dst_port, request.src_port);
            return;
        }
        let mut path = self.path.clone().into_os_string();
        path.push(format!("_{}", request.dst_port));
        match uds::connect(Path::new(&path)) {
            Ok(stream) => {
                let key = (request.dst_port, request.src_port);
                self.conns
                    .insert(key, Connection::new_peer(stream, request));
                inc(&self.metrics.conns_added);
                self.update(key);
            }
            Err(e) => {
                guest_log!(
                    Level::Debug,
                    "vsock: guest port {} cannot reach host port {}: {e}",
                    request.src_port,
                    request.dst_port
                );
                self.enqueue_rst(request.dst_port, request.src_port);
            }
        }
    }

    /// The next packet for the guest, with at most `data.len()` data bytes, round-robin
    /// between connections; None when nothing is owed after all (a host stream that was
    /// ready had nothing to read).
    pub fn recv_pkt(&mut self, data: &mut [u8]) -> Option<(Header, usize)> {
        for _ in 0..self.rxq.len() {
            let item = self.rxq.pop_front()?;
            let (src_port, dst_port, out, credit) = match item {
                RxItem::Rst { src_port, dst_port } => {
                    self.pending_rst -= 1;
                    let out = super::connection::Outgoing {
                        op: op::RST,
                        flags: 0,
                        len: 0,
                    };
                    (src_port, dst_port, Some(out), (0, 0))
                }
                RxItem::Conn(key) => {
                    let Some(conn) = self.conns.get_mut(&key) else {
                        continue;
                    };
                    conn.queued = false;
                    let out = conn.recv_pkt(data);
                    let credit = conn.credit();
                    self.update(key);
                    (key.0, key.1, out, credit)
                }
            };
            let Some(out) = out else { continue };
            let hdr = Header {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port,
                dst_port,
                len: u32::try_from(out.len).unwrap_or(0),
                type_: TYPE_STREAM,
                op: out.op,
                flags: out.flags,
                buf_alloc: credit.0,
                fwd_cnt: credit.1,
            };
            return Some((hdr, out.len));
        }
        None
    }

    /// Brings the muxer's view of a connection up to date after it changed: removed once
    /// over, queued when it owes the guest something, its stream watched for what it waits
    /// for, the deadline timer armed when it has one.
    fn update(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.end().is_some() && !conn.has_pending_rx() {
            let end = conn.end();
            if let Some(conn) = self.conns.remove(&key) {
                if conn.watched.is_some() {
                    self.unwatch(conn.fd());
                }
            }
            inc(&self.metrics.conns_removed);
            if end == Some(End::Killed) {
                inc(&self.metrics.conns_killed);
            }
            return;
        }
        if conn.has_pending_rx() && !conn.queued {
            conn.queued = true;
            self.rxq.push_back(RxItem::Conn(key));
        }
        if conn.stream().is_none() && conn.watched.is_some() {
            // The connection closed its stream, which left the epoll set with it.
            conn.watched = None;
            let fd = conn.fd();
            self.watches.remove(&fd);
            return;
        }
        let has_expiry = conn.expiry().is_some();
        let wanted = conn.wanted_events();
        let watched = conn.watched;
        let fd = conn.stream().map(AsRawFd::as_raw_fd);
        if let Some(fd) = fd {
            if wanted != watched {
                let result = match (watched, wanted) {
                    (None, Some(ev)) => self.watch(fd, Watch::Conn(key), ev),
                    (Some(_), Some(ev)) => {
                        let event = EpollEvent::new(ev, u64::try_from(fd).unwrap_or(0));
                        self.epoll.ctl(ControlOperation::Modify, fd, event)
                    }
                    (Some(_), None) => {
                        self.unwatch(fd);
                        Ok(())
                    }
                    (None, None) => Ok(()),
                };
                match (result, self.conns.get_mut(&key)) {
                    (Ok(()), Some(conn)) => conn.watched = wanted,
                    (Err(e), Some(conn)) => {
                        guest_log!(Level::Warn, "vsock: cannot watch a host stream: {e}");
                        inc(&self.metrics.conn_event_fails);
                        conn.kill();
                        conn.watched = None;
                        if !conn.queued {
                            conn.queued = true;
                            self.rxq.push_back(RxItem::Conn(key));
                        }
                    }
                    _ => {}
                }
            }
        }
        if has_expiry {
            self.arm_timer();
        }
    }

    fn arm_timer(&mut self) {
        if !self.timer_armed {
            self.timer_armed = self.timer.reset(SWEEP_PERIOD, None).is_ok();
        }
    }

    /// The deadline timer fired: kills connections past their deadline, drops host streams
    /// that did not say which port they want in time.
    pub fn sweep(&mut self) {
        let _ = self.timer.wait();
        self.timer_armed = false;
        let now = Instant::now();
        let late: Vec<RawFd> = (self.pending_hosts.iter())
            .filter(|(_, p)| now.duration_since(p.since) >= CONNECT_TIMEOUT)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in late {
            self.drop_pending_host(fd);
        }
        let due: Vec<Key> = (self.conns.iter())
            .filter(|(_, c)| c.expiry().is_some_and(|t| t <= now))
            .map(|(&k, _)| k)
            .collect();
        for key in due {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.check_expiry(now);
            }
            self.update(key);
        }
        if !self.pending_hosts.is_empty() || self.conns.values().any(|c| c.expiry().is_some()) {
            self.arm_timer();
        }
    }

    fn drop_pending_host(&mut self, fd: RawFd) {
        self.unwatch(fd);
        self.pending_hosts.remove(&fd);
    }

    /// Handles the socket events that are ready, at most [`EVENTS_PER_WAKE`].
    pub fn process_events(&mut self) {
        let mut events = std::mem::take(&mut self.events);
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                guest_log!(Level::Warn, "vsock: cannot read socket events: {e}");
                inc(&self.metrics.muxer_event_fails);
                0
            }
        };
        for ev in &events[..n] {
            let fd = RawFd::try_from(ev.data()).unwrap_or(-1);
            match self.watches.get(&fd).copied() {
                Some(Watch::Listener) => {
                    for _ in 0..ACCEPTS_PER_EVENT {
                        if !self.accept_host() {
                            break;
                        }
                    }
                }
                Some(Watch::Pending) => self.read_connect_line(fd),
                Some(Watch::Conn(key)) => {
                    if let Some(conn) = self.conns.get_mut(&key) {
                        conn.notify(ev.event_set());
                    }
                    self.update(key);
                }
                None => inc(&self.metrics.muxer_event_fails),
            }
        }
        self.events = events;
    }

    /// A host program connected: it is accepted and has [`CONNECT_TIMEOUT`] to say which
    /// guest port it wants; one over the limits is closed at once. False when there was
    /// none to accept.
    fn accept_host(&mut self) -> bool {
        let stream = match uds::accept(&self.listener) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) => {
                guest_log!(Level::Warn, "vsock: cannot accept a host connection: {e}");
                inc(&self.metrics.muxer_event_fails);
                return false;
            }
        };
        if !self.active
            || self.conns.len() >= MAX_CONNECTIONS
            || self.pending_hosts.len() >= MAX_PENDING_HOST_CONNECTIONS
        {
            inc(&self.metrics.conns_refused);
            return true;
        }
        let fd = stream.as_raw_fd();
        if self.watch(fd, Watch::Pending, EventSet::IN).is_err() {
            inc(&self.metrics.muxer_event_fails);
            return true;
        }
        self.pending_hosts.insert(
            fd,
            PendingHost {
                stream,
                line: Vec::new(),
                since: Instant::now(),
            },
        );
        self.arm_timer();
        true
    }

    /// Reads a pending host stream's CONNECT line a byte at a time, so that nothing after it
    /// (the first data for the guest) is taken; at most [`MAX_CONNECT_LINE`] bytes.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(pending) = self.pending_hosts.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        loop {
            match uds::read(&pending.stream, &mut byte) {
                Ok(1) if byte[0] == b'\n' => break,
                Ok(1) if pending.line.len() < MAX_CONNECT_LINE => pending.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // Too long, its end, or an error.
                _ => {
                    self.drop_pending_host(fd);
                    return;
                }
            }
        }
        let port = parse_connect(&pending.line);
        self.unwatch(fd);
        let Some(pending) = self.pending_hosts.remove(&fd) else {
            return;
        };
        let Some(peer_port) = port else {
            guest_log!(
                Level::Debug,
                "vsock: a host program sent a bad CONNECT line"
            );
            inc(&self.metrics.conns_refused);
            return;
        };
        if !self.active || self.conns.len() >= MAX_CONNECTIONS {
            inc(&self.metrics.conns_refused);
            return;
        }
        let local_port = self.allocate_local_port(peer_port);
        let key = (local_port, peer_port);
        self.conns
            .insert(key, Connection::new_local(pending.stream, local_port));
        inc(&self.metrics.conns_added);
        self.update(key);
    }

    /// The next free host port in [2^30, 2^31) for a connection to `peer_port`.
    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let next = self.last_local_port.wrapping_add(1);
            self.last_local_port = if next >= 1 << 31 {
                LOCAL_PORT_BASE
            } else {
                next
            };
            // At most MAX_CONNECTIONS ports are taken, so this ends.
            if !self.conns.contains_key(&(self.last_local_port, peer_port)) {
                return self.last_local_port;
            }
        }
    }
}

/// The port of a `CONNECT <port>` line (the word in any case, as Firecracker).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split_whitespace();
    let verb = words.next()?;
    let port = words.next()?.parse().ok()?;
    (verb.eq_ignore_ascii_case("connect") && words.next().is_none()).then_some(port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    use super::super::packet::{SHUTDOWN_BOTH, TYPE_STREAM};

    const CID: u64 = 3;

    struct Rig {
        dir: PathBuf,
        muxer: Muxer,
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn rig(name: &str) -> Rig {
        let dir = std::env::temp_dir().join(format!("skiff-vsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut muxer = Muxer::new(CID, &dir.join("v.sock"), Arc::default()).unwrap();
        muxer.active = true;
        Rig { dir, muxer }
    }

    fn pkt(op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    /// Runs the muxer's events until nothing changes, and returns what the guest gets.
    fn pump(m: &mut Muxer) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 4096];
        for _ in 0..50 {
            m.process_events();
            while let Some((h, n)) = m.recv_pkt(&mut buf) {
                out.push((h, buf[..n].to_vec()));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        out
    }

    #[test]
    fn connect_lines_are_parsed_as_firecracker_does() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"connect 4294967295\r"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"CONNECT 52 53"), None);
        assert_eq!(parse_connect(b"LISTEN 52"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(&[0xff, b' ', b'1']), None);
    }

    /// CONNECT 52 becomes a REQUEST from a port in [2^30, 2^31); the guest's RESPONSE gets
    /// the host `OK <port>`, then bytes flow both ways; bytes written right after the
    /// CONNECT line are not lost.
    #[test]
    fn a_host_connection_reaches_the_guest_port_it_names() {
        let mut r = rig("host");
        let mut host = UnixStream::connect(r.muxer.path()).unwrap();
        host.write_all(b"CONNECT 52\nearly").unwrap();
        let got = pump(&mut r.muxer);
        assert_eq!(got.len(), 1, "{got:?}");
        let req = got[0].0;
        assert_eq!((req.op, req.dst_port, req.dst_cid), (op::REQUEST, 52, CID));
        assert!(req.src_port >= 1 << 30 && req.src_port < 1 << 31);
        let mut resp = pkt(op::RESPONSE, 52, req.src_port);
        assert_eq!(r.muxer.send_pkt(&resp, &[]), TxOutcome::Done);
        let mut line = vec![0u8; format!("OK {}\n", req.src_port).len()];
        host.read_exact(&mut line).unwrap();
        assert_eq!(line, format!("OK {}\n", req.src_port).into_bytes());
        let got = pump(&mut r.muxer);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].0.op, got[0].1.as_slice()), (op::RW, &b"early"[..]));
        resp.op = op::RW;
        resp.len = 3;
        assert_eq!(
            r.muxer.send_pkt(&resp, b"pong"[..3].as_ref()),
            TxOutcome::Done
        );
        let mut back = [0u8; 3];
        host.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"pon");
        // The guest resets: the host sees the end of the stream.
        assert_eq!(
            r.muxer.send_pkt(&pkt(op::RST, 52, req.src_port), &[]),
            TxOutcome::Done
        );
        assert_eq!(host.read(&mut back).unwrap(), 0);
        assert_eq!(r.muxer.connections(), 0);
    }

    /// A guest REQUEST reaches `<uds_path>_<port>`; with nobody listening there it is
    /// answered RST, as are data for no connection and other socket types; packets from
    /// another CID or to another one are dropped.
    #[test]
    fn guest_requests_reach_host_listeners_and_strays_are_reset() {
        let mut r = rig("guest");
        let mut name = r.muxer.path().as_os_str().to_owned();
        name.push("_53");
        let listener = UnixListener::bind(&name).unwrap();
        assert_eq!(
            r.muxer.send_pkt(&pkt(op::REQUEST, 1000, 53), &[]),
            TxOutcome::Done
        );
        let (mut host, _) = listener.accept().unwrap();
        r.muxer.send_pkt(&pkt(op::REQUEST, 1001, 54), &[]);
        r.muxer.send_pkt(&pkt(op::RW, 1002, 55), &[]);
        let mut dgram = pkt(op::REQUEST, 1003, 53);
        dgram.type_ = 2;
        r.muxer.send_pkt(&dgram, &[]);
        let mut spoofed = pkt(op::REQUEST, 1004, 53);
        spoofed.src_cid = 9;
        r.muxer.send_pkt(&spoofed, &[]);
        let mut elsewhere = pkt(op::REQUEST, 1005, 53);
        elsewhere.dst_cid = 7;
        r.muxer.send_pkt(&elsewhere, &[]);
        let got: Vec<(u16, u32)> = pump(&mut r.muxer)
            .iter()
            .map(|(h, _)| (h.op, h.dst_port))
            .collect();
        assert_eq!(
            got,
            [
                (op::RESPONSE, 1000),
                (op::RST, 1001),
                (op::RST, 1002),
                (op::RST, 1003)
            ]
        );
        let mut data = pkt(op::RW, 1000, 53);
        data.len = 5;
        r.muxer.send_pkt(&data, b"hello");
        let mut shut = pkt(op::SHUTDOWN, 1000, 53);
        shut.flags = SHUTDOWN_BOTH;
        r.muxer.send_pkt(&shut, &[]);
        let mut all = Vec::new();
        host.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"hello");
        let got = pump(&mut r.muxer);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.op, op::RST);
        assert_eq!(r.muxer.connections(), 0);
    }

    /// With MAX_PENDING_RST resets waiting for a guest that takes none, its transmit queue
    /// is held (nothing dropped); taking them lets it go on.
    #[test]
    fn resets_the_guest_does_not_take_hold_its_transmit_queue() {
        let mut r = rig("rst");
        for i in 0..MAX_PENDING_RST {
            let port = u32::try_from(i).unwrap();
            assert_eq!(
                r.muxer.send_pkt(&pkt(op::RW, port, 9), &[]),
                TxOutcome::Done
            );
        }
        assert_eq!(
            r.muxer.send_pkt(&pkt(op::RW, 7777, 9), &[]),
            TxOutcome::Blocked
        );
        let mut buf = [0u8; 16];
        assert!(r.muxer.recv_pkt(&mut buf).is_some());
        assert_eq!(
            r.muxer.send_pkt(&pkt(op::RW, 7777, 9), &[]),
            TxOutcome::Done
        );
    }

    /// Raises this process's descriptor limit to `want` if the hard limit allows it.
    fn raise_fd_limit(want: u64) -> bool {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into `lim`, which is valid for the call.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_max < want {
            return false;
        }
        lim.rlim_cur = lim.rlim_cur.max(want);
        // SAFETY: setrlimit reads one valid rlimit.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 }
    }

    /// Past MAX_CONNECTIONS a guest REQUEST gets an RST and a host program's connection is
    /// closed at once, both counted; the connections made go on.
    #[test]
    fn connections_past_the_cap_are_refused() {
        if !raise_fd_limit(4096) {
            eprintln!("skipped: 1023 connections need about 2100 descriptors");
            return;
        }
        let mut r = rig("cap");
        let mut name = r.muxer.path().as_os_str().to_owned();
        name.push("_53");
        let listener = UnixListener::bind(&name).unwrap();
        listener.set_nonblocking(true).unwrap();
        let mut accepted = Vec::new();
        for i in 0..=MAX_CONNECTIONS {
            let port = 10_000 + u32::try_from(i).unwrap();
            assert_eq!(
                r.muxer.send_pkt(&pkt(op::REQUEST, port, 53), &[]),
                TxOutcome::Done
            );
            while let Ok((s, _)) = listener.accept() {
                accepted.push(s);
            }
        }
        assert_eq!(r.muxer.connections(), MAX_CONNECTIONS);
        assert_eq!(accepted.len(), MAX_CONNECTIONS);
        let mut buf = [0u8; 64];
        let mut answers = Vec::new();
        while let Some((h, _)) = r.muxer.recv_pkt(&mut buf) {
            answers.push((h.op, h.dst_port));
        }
        let last = 10_000 + u32::try_from(MAX_CONNECTIONS).unwrap();
        assert!(
            answers.contains(&(op::RST, last)),
            "no RST for the one too many"
        );
        assert_eq!(
            answers.iter().filter(|(o, _)| *o == op::RESPONSE).count(),
            MAX_CONNECTIONS
        );
        let mut host = UnixStream::connect(r.muxer.path()).unwrap();
        host.write_all(b"CONNECT 52\n").unwrap();
        pump(&mut r.muxer);
        let mut b = [0u8; 4];
        assert_eq!(host.read(&mut b).unwrap_or(0), 0, "closed at once");
        let refused = r
            .muxer
            .metrics
            .conns_refused
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(refused, 2);
    }

    /// Host programs that connect and never say CONNECT, or say something else, are
    /// closed; beyond MAX_PENDING_HOST_CONNECTIONS they are closed at once.
    #[test]
    fn host_streams_without_a_good_connect_line_are_closed() {
        let mut r = rig("lines");
        let mut bad = UnixStream::connect(r.muxer.path()).unwrap();
        bad.write_all(b"HELLO 52\n").unwrap();
        let mut long = UnixStream::connect(r.muxer.path()).unwrap();
        long.write_all(&[b'x'; 100]).unwrap();
        pump(&mut r.muxer);
        let mut b = [0u8; 4];
        assert_eq!(bad.read(&mut b).unwrap(), 0);
        assert_eq!(long.read(&mut b).unwrap_or(0), 0);
        let idle: Vec<UnixStream> = (0..MAX_PENDING_HOST_CONNECTIONS + 1)
            .map(|_| UnixStream::connect(r.muxer.path()).unwrap())
            .collect();
        pump(&mut r.muxer);
        assert_eq!(r.muxer.pending_hosts.len(), MAX_PENDING_HOST_CONNECTIONS);
        drop(idle);
    }
}
