//! One vsock connection between a guest socket and a host Unix stream (virtio 1.2, 5.10.6):
//! its handshake, shutdown and reset, the credit each side gives the other, and the guest's
//! data waiting for a host program that reads slowly.
//!
//! Credit (virtio 1.2, 5.10.6.3): each packet carries its sender's receive buffer size
//! (`buf_alloc`) and the bytes it has taken out of it so far (`fwd_cnt`); a sender may have at
//! most `buf_alloc - (sent - fwd_cnt)` bytes in flight. Skiff offers [`CONN_BUF_SIZE`] and
//! counts as forwarded what the host stream has taken, so a host program that does not read
//! stops the guest's sends without Skiff holding more than that per connection. The other way,
//! Skiff reads from the host stream only as much as the guest's credit allows; with none left
//! it stops reading (the host writer waits in the kernel's socket buffer) and asks once.

use std::collections::VecDeque;
use std::io;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::packet::{op, Header, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND};
use super::uds;
use super::CONN_BUF_SIZE;

/// How long the guest has to answer a host-initiated REQUEST, and to answer (with RST) a
/// SHUTDOWN after the host closed, as Firecracker.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the host may go without reading while a closed guest socket's last data waits.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the handshake is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The host connected and asked for a guest port; the guest has not answered.
    LocalInit,
    /// The guest asked; Skiff has connected to the host listener and owes a RESPONSE.
    PeerInit,
    /// Both ends are connected.
    Established,
    /// Over: only an RST remains to be sent, then the connection is gone.
    Closing,
}

/// Packets a connection owes the guest, most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Owed {
    Rst = 1,
    Response = 2,
    Request = 4,
    Shutdown = 8,
    /// Data may be waiting in the host stream.
    Rw = 16,
    CreditRequest = 32,
    CreditUpdate = 64,
}

/// What the guest sent that the connection cannot take now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocked;

/// What a connection has for the guest: an operation, its SHUTDOWN flags and how many data
/// bytes of the caller's buffer it filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outgoing {
    /// The operation.
    pub op: u16,
    /// SHUTDOWN flags.
    pub flags: u32,
    /// Data bytes (RW only).
    pub len: usize,
}

/// Why a connection ended, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides were done.
    Orderly,
    /// An error, a timeout or a protocol breach.
    Killed,
}

/// One connection; see the module documentation.
#[derive(Debug)]
pub struct Connection {
    /// The host stream; gone once the connection is closing.
    stream: Option<UnixStream>,
    /// Its descriptor number (still known once it is closed).
    fd: RawFd,
    /// Skiff's (the host side's) port.
    local_port: u32,
    state: State,
    owed: u8,
    /// The guest's data the host stream has not taken yet (at most [`CONN_BUF_SIZE`]).
    tx_buf: VecDeque<u8>,
    /// Bytes of the guest's data the host stream took.
    fwd_cnt: Wrapping<u32>,
    /// Bytes of the guest's data accepted (taken or buffered).
    tx_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_told: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// SHUTDOWN flags the guest sent.
    guest_shut: u32,
    /// SHUTDOWN flags Skiff sent.
    host_shut: u32,
    /// The host stream's write side was shut after the guest said it sends no more.
    wrote_eof: bool,
    /// Reading the host stream gave its end.
    host_eof: bool,
    /// The host closed its end altogether (EPOLLHUP).
    host_hup: bool,
    /// A CREDIT_REQUEST went out and no packet answered it yet.
    credit_asked: bool,
    /// When the connection is killed unless something happens first.
    expiry: Option<Instant>,
    /// How it ended, once it has.
    end: Option<End>,
    /// The events registered for its stream (None: not registered).
    pub watched: Option<EventSet>,
    /// Whether it is in the muxer's queue of connections with packets for the guest.
    pub queued: bool,
}

impl Connection {
    fn with_state(stream: UnixStream, local_port: u32, state: State) -> Self {
        Self {
            fd: stream.as_raw_fd(),
            stream: Some(stream),
            local_port,
            state,
            owed: 0,
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            guest_shut: 0,
            host_shut: 0,
            wrote_eof: false,
            host_eof: false,
            host_hup: false,
            credit_asked: false,
            expiry: None,
            end: None,
            watched: None,
            queued: false,
        }
    }

    /// A connection the host asked for (`CONNECT <port>`), given host port `local_port`: a
    /// REQUEST is owed.
    pub fn new_local(stream: UnixStream, local_port: u32) -> Self {
        let mut c = Self::with_state(stream, local_port, State::LocalInit);
        c.owe(Owed::Request);
        c
    }

    /// A connection the guest asked for with `request`, its host stream connected: a
    /// RESPONSE is owed.
    pub fn new_peer(stream: UnixStream, request: &Header) -> Self {
        let mut c = Self::with_state(stream, request.dst_port, State::PeerInit);
        c.peer_buf_alloc = request.buf_alloc;
        c.peer_fwd_cnt = Wrapping(request.fwd_cnt);
        c.owe(Owed::Response);
        c
    }

    fn owe(&mut self, what: Owed) {
        self.owed |= what as u8;
    }

    fn take(&mut self, what: Owed) -> bool {
        let had = self.owed & what as u8 != 0;
        self.owed &= !(what as u8);
        had
    }

    fn owes(&self, what: Owed) -> bool {
        self.owed & what as u8 != 0
    }

    /// The handshake's state.
    #[cfg(test)]
    pub fn state(&self) -> State {
        self.state
    }

    /// The host stream's descriptor number, open or not.
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// The host stream, while it is open.
    pub fn stream(&self) -> Option<&UnixStream> {
        self.stream.as_ref()
    }

    /// Whether it has a packet (or may have data) for the guest.
    pub fn has_pending_rx(&self) -> bool {
        self.owed != 0
    }

    /// When it must be killed, if nothing happens first.
    pub fn expiry(&self) -> Option<Instant> {
        self.expiry
    }

    /// How it ended, once its last packet went to the guest (or the guest reset it).
    pub fn end(&self) -> Option<End> {
        self.end
    }

    /// Bytes of the guest's data waiting for the host.
    #[cfg(test)]
    pub fn buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// The guest's credit: data it can take now.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        // A guest claiming to have forwarded more than it was sent gets no more than its
        // buffer size either.
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Tears the connection down: the host stream closes now, an RST goes to the guest and
    /// whatever of the guest's data was still waiting is dropped.
    pub fn kill(&mut self) {
        self.close_with_rst(End::Killed);
    }

    fn close_with_rst(&mut self, end: End) {
        self.stream = None;
        self.tx_buf = VecDeque::new();
        self.state = State::Closing;
        self.owed = Owed::Rst as u8;
        self.expiry = None;
        self.end.get_or_insert(end);
    }

    /// The guest reset the connection: nothing more is sent either way.
    pub fn reset_by_guest(&mut self) {
        self.stream = None;
        self.owed = 0;
        self.state = State::Closing;
        self.end.get_or_insert(End::Orderly);
    }

    /// The events its stream should be watched for; None: not watched at all. An empty set
    /// still reports the host closing its end (EPOLLHUP), which is only wanted until seen.
    pub fn wanted_events(&self) -> Option<EventSet> {
        if self.stream.is_none() || self.host_hup {
            return None;
        }
        let mut events = EventSet::empty();
        if !self.tx_buf.is_empty() {
            events |= EventSet::OUT;
        }
        if self.may_read() && !self.owes(Owed::Rw) && self.peer_credit() > 0 {
            events |= EventSet::IN;
        }
        Some(events)
    }

    /// Whether data may flow from the host to the guest.
    fn may_read(&self) -> bool {
        self.state == State::Established && self.guest_shut & SHUTDOWN_RCV == 0 && !self.host_eof
    }

    /// Its stream is ready for what `events` say.
    pub fn notify(&mut self, events: EventSet) {
        if self.state == State::Closing {
            return;
        }
        if events.contains(EventSet::ERROR) {
            self.kill();
            return;
        }
        if events.contains(EventSet::HANG_UP) {
            self.host_hup = true;
            match self.state {
                State::LocalInit | State::PeerInit => {
                    self.kill();
                    return;
                }
                _ if self.may_read() => self.owe(Owed::Rw),
                _ => self.host_closed(),
            }
        }
        if events.contains(EventSet::IN) && self.may_read() {
            self.owe(Owed::Rw);
        }
        if events.contains(EventSet::OUT) {
            self.flush();
        }
    }

    /// The host will send nothing more: the guest is told so (and, when the host closed its
    /// end altogether, that it can send nothing more either, and has a while to reset).
    fn host_closed(&mut self) {
        let flags = if self.host_hup {
            SHUTDOWN_BOTH
        } else {
            SHUTDOWN_SEND
        };
        if self.host_shut | flags != self.host_shut {
            self.host_shut |= flags;
            self.owe(Owed::Shutdown);
        }
        if self.host_shut == SHUTDOWN_BOTH && self.expiry.is_none() {
            self.expiry = Some(Instant::now() + HANDSHAKE_TIMEOUT);
        }
    }

    /// Writes what the host stream takes of the waiting data.
    fn flush(&mut self) {
        let Some(stream) = &self.stream else { return };
        let mut flushed = 0usize;
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match uds::send(stream, front) {
                Ok(0) => break,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    flushed += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.kill();
                    return;
                }
            }
        }
        if flushed == 0 {
            return;
        }
        self.fwd_cnt += Wrapping(u32::try_from(flushed).unwrap_or(u32::MAX));
        if self.tx_buf.is_empty() {
            self.tx_buf.shrink_to(0);
        }
        if self.expiry.is_some() && self.guest_shut == SHUTDOWN_BOTH {
            // Still draining a closed guest socket's data: the host is reading.
            self.expiry = Some(Instant::now() + DRAIN_TIMEOUT);
        }
        self.after_guest_data_moved();
    }

    /// After the host took some of the guest's data: the guest may need more credit, and a
    /// guest that is done sending gets its end of stream passed on once all is written.
    fn after_guest_data_moved(&mut self) {
        if self.tx_buf.is_empty() && self.guest_shut & SHUTDOWN_SEND != 0 && !self.wrote_eof {
            if let Some(s) = &self.stream {
                let _ = s.shutdown(std::net::Shutdown::Write);
            }
            self.wrote_eof = true;
        }
        if self.tx_buf.is_empty() && self.guest_shut == SHUTDOWN_BOTH {
            self.close_with_rst(End::Orderly);
            return;
        }
        if (self.fwd_cnt - self.fwd_cnt_told).0 >= CONN_BUF_SIZE / 2 {
            self.owe(Owed::CreditUpdate);
        }
    }

    /// A packet from the guest for this connection (not RST or a new REQUEST: the muxer
    /// deals with those). Data that does not fit the connection's buffer (a guest sending
    /// beyond its credit while the host does not read) is refused and stays with the guest.
    pub fn send_pkt(&mut self, hdr: &Header, data: &[u8]) -> Result<(), Blocked> {
        if self.state == State::Closing {
            return Ok(());
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        self.credit_asked = false;
        match (self.state, hdr.op) {
            (State::LocalInit, op::RESPONSE) => {
                self.state = State::Established;
                self.expiry = None;
                self.acknowledge_host();
            }
            (State::Established, op::RW) => return self.take_guest_data(data),
            (State::Established, op::SHUTDOWN) => self.guest_shutdown(hdr.flags),
            (State::Established | State::PeerInit, op::CREDIT_UPDATE) => {}
            (State::Established | State::PeerInit, op::CREDIT_REQUEST) => {
                self.owe(Owed::CreditUpdate);
            }
            // A handshake out of turn, data before it, an unknown operation.
            _ => self.kill(),
        }
        Ok(())
    }

    /// Tells the host program which port its connection got, as Firecracker does.
    fn acknowledge_host(&mut self) {
        let Some(stream) = &self.stream else { return };
        let line = format!("OK {}\n", self.local_port);
        // A fresh stream takes a dozen bytes; one that does not is broken.
        if !matches!(uds::send(stream, line.as_bytes()), Ok(n) if n == line.len()) {
            self.kill();
        }
    }

    fn take_guest_data(&mut self, data: &[u8]) -> Result<(), Blocked> {
        if self.guest_shut & SHUTDOWN_SEND != 0 {
            self.kill();
            return Ok(());
        }
        if data.is_empty() {
            return Ok(());
        }
        let room = CONN_BUF_SIZE as usize - self.tx_buf.len();
        if !self.tx_buf.is_empty() {
            if data.len() > room {
                return Err(Blocked);
            }
            self.tx_buf.extend(data);
        } else {
            let Some(stream) = &self.stream else {
                return Ok(());
            };
            let written = match uds::send(stream, data) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(_) => {
                    self.kill();
                    return Ok(());
                }
            };
            let rest = &data[written..];
            if rest.len() > room {
                // Only a packet over the buffer size can get here, and packets are smaller.
                self.kill();
                return Ok(());
            }
            self.tx_buf.extend(rest);
            self.fwd_cnt += Wrapping(u32::try_from(written).unwrap_or(u32::MAX));
        }
        self.tx_cnt += Wrapping(u32::try_from(data.len()).unwrap_or(u32::MAX));
        self.after_guest_data_moved();
        Ok(())
    }

    fn guest_shutdown(&mut self, flags: u32) {
        self.guest_shut |= flags & SHUTDOWN_BOTH;
        if self.guest_shut & SHUTDOWN_RCV != 0 {
            self.take(Owed::Rw);
        }
        if self.guest_shut == SHUTDOWN_BOTH && !self.tx_buf.is_empty() {
            self.expiry = Some(Instant::now() + DRAIN_TIMEOUT);
        }
        self.after_guest_data_moved();
    }

    /// Kills the connection if its time ran out by `now`.
    pub fn check_expiry(&mut self, now: Instant) {
        if self.expiry.is_some_and(|t| t <= now) {
            self.kill();
        }
    }

    /// The next packet for the guest, if any: RW data is read from the host stream into
    /// `data` (as much as fits it and the guest's credit). Fills in the operation, flags and
    /// length; the caller adds addresses and [`Connection::credit`].
    pub fn recv_pkt(&mut self, data: &mut [u8]) -> Option<Outgoing> {
        let control = |op, flags| Outgoing { op, flags, len: 0 };
        if self.take(Owed::Rst) {
            self.stream = None;
            self.end.get_or_insert(End::Killed);
            return Some(control(op::RST, 0));
        }
        if self.take(Owed::Response) {
            self.state = State::Established;
            return Some(control(op::RESPONSE, 0));
        }
        if self.take(Owed::Request) {
            self.expiry = Some(Instant::now() + HANDSHAKE_TIMEOUT);
            return Some(control(op::REQUEST, 0));
        }
        if self.take(Owed::Shutdown) {
            return Some(control(op::SHUTDOWN, self.host_shut));
        }
        if self.owes(Owed::Rw) {
            if let Some(pkt) = self.read_host(data) {
                return Some(pkt);
            }
        }
        if self.take(Owed::CreditRequest) {
            return Some(control(op::CREDIT_REQUEST, 0));
        }
        if self.take(Owed::CreditUpdate) {
            return Some(control(op::CREDIT_UPDATE, 0));
        }
        None
    }

    /// Reads host data for a RW packet, or finds the end of the host's stream.
    fn read_host(&mut self, data: &mut [u8]) -> Option<Outgoing> {
        if !self.may_read() {
            self.take(Owed::Rw);
            return None;
        }
        let credit = self.peer_credit() as usize;
        if credit == 0 {
            // Stop reading until the guest gives credit; ask for it once.
            self.take(Owed::Rw);
            if !self.credit_asked {
                self.credit_asked = true;
                self.owe(Owed::CreditRequest);
            }
            return None;
        }
        let max = data.len().min(credit);
        let stream = self.stream.as_ref()?;
        match uds::read(stream, &mut data[..max]) {
            Ok(0) => {
                self.take(Owed::Rw);
                self.host_eof = true;
                self.host_closed();
                self.take(Owed::Shutdown).then_some(Outgoing {
                    op: op::SHUTDOWN,
                    flags: self.host_shut,
                    len: 0,
                })
            }
            Ok(n) => {
                self.rx_cnt += Wrapping(u32::try_from(n).unwrap_or(u32::MAX));
                Some(Outgoing {
                    op: op::RW,
                    flags: 0,
                    len: n,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.take(Owed::Rw);
                None
            }
            Err(_) => {
                self.kill();
                self.take(Owed::Rst);
                self.stream = None;
                Some(Outgoing {
                    op: op::RST,
                    flags: 0,
                    len: 0,
                })
            }
        }
    }

    /// The credit fields of a packet about to go to the guest (`buf_alloc`, `fwd_cnt`), now
    /// told.
    pub fn credit(&mut self) -> (u32, u32) {
        self.fwd_cnt_told = self.fwd_cnt;
        (CONN_BUF_SIZE, self.fwd_cnt.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (a, b)
    }

    fn guest(op: u16) -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1000,
            dst_port: 53,
            len: 0,
            type_: super::super::packet::TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 0,
        }
    }

    /// Everything the connection has for the guest now.
    fn drain(c: &mut Connection) -> Vec<(u16, usize)> {
        let mut buf = vec![0u8; 65536];
        let mut out = Vec::new();
        while let Some(p) = c.recv_pkt(&mut buf) {
            c.credit();
            out.push((p.op, p.len));
        }
        out
    }

    #[test]
    fn host_initiated_handshake_acknowledges_the_host_and_times_out_unanswered() {
        let (ours, mut host) = pair();
        let mut c = Connection::new_local(ours, 1 << 30);
        assert_eq!(drain(&mut c), [(op::REQUEST, 0)]);
        assert!(c.expiry().is_some());
        assert_eq!(
            c.wanted_events(),
            Some(EventSet::empty()),
            "no reads before RESPONSE"
        );
        c.send_pkt(&guest(op::RESPONSE), &[]).unwrap();
        assert_eq!(c.state(), State::Established);
        let mut line = [0u8; 14];
        host.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"OK 1073741824\n");
        assert_eq!(c.wanted_events(), Some(EventSet::IN));

        let (ours, _host) = pair();
        let mut late = Connection::new_local(ours, 5);
        drain(&mut late);
        late.check_expiry(Instant::now() + HANDSHAKE_TIMEOUT);
        assert_eq!(drain(&mut late), [(op::RST, 0)]);
        assert_eq!(late.end(), Some(End::Killed));
    }

    /// Host data goes to the guest only as far as its credit reaches; with none left the
    /// stream is no longer read (the host's writes wait in the kernel) and credit is asked
    /// for once; an update from the guest lets reading resume.
    #[test]
    fn host_data_waits_for_the_guests_credit() {
        let (ours, mut host) = pair();
        let mut c = Connection::new_peer(ours, &guest(op::REQUEST));
        assert_eq!(drain(&mut c), [(op::RESPONSE, 0)]);
        host.write_all(&[7u8; 10000]).unwrap();
        c.notify(EventSet::IN);
        assert_eq!(
            c.wanted_events(),
            Some(EventSet::empty()),
            "Rw owed: not watched"
        );
        assert_eq!(drain(&mut c), [(op::RW, 4096), (op::CREDIT_REQUEST, 0)]);
        assert_eq!(
            c.wanted_events(),
            Some(EventSet::empty()),
            "no credit: not watched"
        );
        let mut update = guest(op::CREDIT_UPDATE);
        update.fwd_cnt = 4096;
        c.send_pkt(&update, &[]).unwrap();
        assert_eq!(c.wanted_events(), Some(EventSet::IN));
        c.notify(EventSet::IN);
        assert_eq!(drain(&mut c), [(op::RW, 4096), (op::CREDIT_REQUEST, 0)]);
    }

    /// A host that does not read: the guest's data waits in the connection's buffer, a
    /// packet beyond it is refused (not dropped), and writability flushes it, returning
    /// credit to the guest.
    #[test]
    fn guest_data_waits_for_a_slow_host_and_is_never_dropped() {
        let (ours, mut host) = pair();
        let mut c = Connection::new_peer(ours, &guest(op::REQUEST));
        drain(&mut c);
        let chunk = vec![1u8; 60000];
        let mut sent = 0usize;
        let refused = loop {
            let mut rw = guest(op::RW);
            rw.len = 60000;
            match c.send_pkt(&rw, &chunk) {
                Ok(()) => sent += chunk.len(),
                Err(Blocked) => break true,
            }
            assert!(sent < 64 << 20, "the socket never filled");
        };
        assert!(refused);
        assert!(c.buffered() > 0 && c.buffered() <= CONN_BUF_SIZE as usize);
        assert!(c.wanted_events().unwrap().contains(EventSet::OUT));
        let mut got = vec![0u8; sent];
        let reader = std::thread::spawn(move || {
            host.read_exact(&mut got).unwrap();
            got
        });
        while c.buffered() > 0 {
            c.notify(EventSet::OUT);
            std::thread::yield_now();
        }
        let got = reader.join().unwrap();
        assert!(got.iter().all(|&b| b == 1));
        assert!(drain(&mut c).contains(&(op::CREDIT_UPDATE, 0)));
    }

    /// The guest's orderly close: its end of stream reaches the host after the last byte,
    /// and an RST ends the connection; the host's half-close becomes a SHUTDOWN(SEND) and
    /// its full close a SHUTDOWN of both directions.
    #[test]
    fn shutdowns_pass_end_of_stream_on_both_ways() {
        let (ours, mut host) = pair();
        let mut c = Connection::new_peer(ours, &guest(op::REQUEST));
        drain(&mut c);
        let mut rw = guest(op::RW);
        rw.len = 3;
        c.send_pkt(&rw, b"abc").unwrap();
        let mut shut = guest(op::SHUTDOWN);
        shut.flags = SHUTDOWN_BOTH;
        c.send_pkt(&shut, &[]).unwrap();
        let mut all = Vec::new();
        host.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"abc");
        assert_eq!(drain(&mut c), [(op::RST, 0)]);
        assert_eq!(c.end(), Some(End::Orderly));

        let (ours, host) = pair();
        let mut c = Connection::new_peer(ours, &guest(op::REQUEST));
        drain(&mut c);
        host.shutdown(std::net::Shutdown::Write).unwrap();
        c.notify(EventSet::IN);
        let mut buf = [0u8; 16];
        assert_eq!(
            c.recv_pkt(&mut buf),
            Some(Outgoing {
                op: op::SHUTDOWN,
                flags: SHUTDOWN_SEND,
                len: 0
            })
        );
        drop(host);
        c.notify(EventSet::HANG_UP);
        assert_eq!(
            c.recv_pkt(&mut buf),
            Some(Outgoing {
                op: op::SHUTDOWN,
                flags: SHUTDOWN_BOTH,
                len: 0
            })
        );
        assert_eq!(c.wanted_events(), None);
        assert!(c.expiry().is_some(), "the guest has a while to reset");
    }

    /// Out-of-turn packets kill the connection with an RST.
    #[test]
    fn packets_out_of_turn_reset_the_connection() {
        for op in [op::RW, op::REQUEST, 99] {
            let (ours, _host) = pair();
            let mut c = Connection::new_local(ours, 9);
            drain(&mut c);
            c.send_pkt(&guest(op), &[]).unwrap();
            assert_eq!(drain(&mut c), [(op::RST, 0)], "op {op}");
        }
    }
}
