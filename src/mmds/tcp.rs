//! The service's TCP (RFC 9293, as little of it as an HTTP exchange with one guest needs), in
//! the spirit of Firecracker's dumbo: passive opens on one port, one request answered at a time
//! per connection, the connection closed after the guest's FIN.
//!
//! - At most [`MAX_CONNECTIONS`] connections: a SYN past that takes the place of one idle for
//!   [`EVICTION_AFTER`], or is refused with a reset. At most [`MAX_PENDING_RESETS`] resets wait
//!   to be sent; more are dropped.
//! - Each connection buffers at most [`RCV_BUF`] bytes of request (the window it offers); a
//!   request that does not end (blank line) within them resets the connection.
//! - Segments go out as the guest's window and MSS allow. Nothing is lost on the way to the
//!   guest unless the guest drops it, so retransmission is the plain go-back-N that such a drop
//!   needs: after three duplicate ACKs, when the guest sends again what was acknowledged, or
//!   when the retransmission timeout has passed at the next time the device looks for frames
//!   (there is no timer: the guest's own traffic and notifications drive the service).
//!   [`RTO_MAX_TRIES`] timeouts in a row reset the connection.
//! - Checksums of incoming segments are not checked (the guest may have left them to checksum
//!   offload, and the link cannot corrupt them); outgoing ones are complete.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::metrics::{inc, MmdsMetrics};

/// FIN.
pub const FIN: u8 = 0x01;
/// SYN.
pub const SYN: u8 = 0x02;
/// RST.
pub const RST: u8 = 0x04;
/// PSH.
pub const PSH: u8 = 0x08;
/// ACK.
pub const ACK: u8 = 0x10;

/// A TCP header without options.
pub const TCP_HEADER_LEN: usize = 20;
/// Connections kept at once (Firecracker's number).
pub const MAX_CONNECTIONS: usize = 30;
/// Resets waiting to be sent (Firecracker's number).
pub const MAX_PENDING_RESETS: usize = 100;
/// Request bytes buffered per connection: the largest request, and the window offered.
pub const RCV_BUF: usize = 2500;
/// A connection silent this long may give its place to a new one.
pub const EVICTION_AFTER: Duration = Duration::from_secs(10);
/// First retransmission timeout; it doubles with each try.
pub const RTO_INITIAL: Duration = Duration::from_millis(500);
/// Timeouts in a row before the connection is reset.
pub const RTO_MAX_TRIES: u32 = 8;

/// MSS when the SYN names none (RFC 9293, 3.7.1).
const MSS_DEFAULT: u16 = 536;
/// Bounds on the guest's MSS: an Ethernet MTU's worth at most, and not so little that an
/// answer takes a frame per few bytes.
const MSS_MAX: u16 = 1460;
const MSS_MIN: u16 = 64;

/// Why a segment was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TcpError {
    /// Shorter than its header, or a data offset outside the segment.
    #[error("malformed TCP header")]
    BadHeader,
    /// An option runs past the header.
    #[error("malformed TCP option")]
    BadOption,
    /// Not the service's port.
    #[error("TCP port {0} is not the service's")]
    InvalidPort(u16),
}

/// A parsed segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment<'a> {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number.
    pub ack: u32,
    /// Flags (FIN, SYN, RST, PSH, ACK; the others ignored).
    pub flags: u8,
    /// Window.
    pub window: u16,
    /// The MSS option, if present.
    pub mss: Option<u16>,
    /// The data.
    pub payload: &'a [u8],
}

impl Segment<'_> {
    /// Sequence space the segment takes: its data, SYN and FIN.
    fn seq_len(&self) -> u32 {
        let len = u32::try_from(self.payload.len()).unwrap_or(u32::MAX);
        len.wrapping_add(u32::from(self.flags & SYN != 0))
            .wrapping_add(u32::from(self.flags & FIN != 0))
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses a segment (RFC 9293, 3.1), checking every length.
pub fn parse_segment(bytes: &[u8]) -> Result<Segment<'_>, TcpError> {
    if bytes.len() < TCP_HEADER_LEN {
        return Err(TcpError::BadHeader);
    }
    let header_len = usize::from(bytes[12] >> 4) * 4;
    if header_len < TCP_HEADER_LEN || header_len > bytes.len() {
        return Err(TcpError::BadHeader);
    }
    let mut mss = None;
    let mut at = TCP_HEADER_LEN;
    while at < header_len {
        match bytes[at] {
            0 => break,
            1 => at += 1,
            kind => {
                let len = usize::from(*bytes.get(at + 1).ok_or(TcpError::BadOption)?);
                if len < 2 || at + len > header_len {
                    return Err(TcpError::BadOption);
                }
                if kind == 2 && len == 4 {
                    mss = Some(be16(bytes, at + 2));
                }
                at += len;
            }
        }
    }
    Ok(Segment {
        src_port: be16(bytes, 0),
        dst_port: be16(bytes, 2),
        seq: be32(bytes, 4),
        ack: be32(bytes, 8),
        flags: bytes[13] & 0x1f,
        window: be16(bytes, 14),
        mss,
        payload: &bytes[header_len..],
    })
}

/// The Internet checksum (RFC 1071) of `parts` in sequence, folded and complemented.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u64;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &b in *part {
            match odd.take() {
                Some(hi) => sum += u64::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u64::from(u16::from_be_bytes([hi, 0]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // Folded to 16 bits above.
    !(u16::try_from(sum).unwrap_or(u16::MAX))
}

/// An outgoing segment.
#[derive(Debug, Clone, Copy)]
struct Out<'a> {
    remote_ip: Ipv4Addr,
    remote_port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    mss: Option<u16>,
    payload: &'a [u8],
}

/// Writes `out` from `local` into `buf` with its checksum; returns its length, or None when
/// `buf` is too small.
fn write_segment(buf: &mut [u8], local: (Ipv4Addr, u16), out: &Out<'_>) -> Option<usize> {
    let header_len = TCP_HEADER_LEN + if out.mss.is_some() { 4 } else { 0 };
    let len = header_len + out.payload.len();
    let seg = buf.get_mut(..len)?;
    seg[0..2].copy_from_slice(&local.1.to_be_bytes());
    seg[2..4].copy_from_slice(&out.remote_port.to_be_bytes());
    seg[4..8].copy_from_slice(&out.seq.to_be_bytes());
    seg[8..12].copy_from_slice(&out.ack.to_be_bytes());
    // The data offset in 32-bit words: 5 or 6.
    seg[12] = u8::try_from(header_len / 4).unwrap_or(5) << 4;
    seg[13] = out.flags;
    seg[14..16].copy_from_slice(&out.window.to_be_bytes());
    seg[16..20].fill(0);
    if let Some(mss) = out.mss {
        seg[20] = 2;
        seg[21] = 4;
        seg[22..24].copy_from_slice(&mss.to_be_bytes());
    }
    seg[header_len..].copy_from_slice(out.payload);
    let tcp_len = u16::try_from(len).ok()?.to_be_bytes();
    let pseudo = [
        &local.0.octets()[..],
        &out.remote_ip.octets(),
        &[0, 6],
        &tcp_len,
    ];
    let sum = checksum(&[pseudo[0], pseudo[1], pseudo[2], pseudo[3], seg]);
    seg[16..18].copy_from_slice(&sum.to_be_bytes());
    Some(len)
}

/// `a` before `b` in sequence space.
fn lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 1 << 31
}

/// `a` at or before `b` in sequence space.
fn le(a: u32, b: u32) -> bool {
    a == b || lt(a, b)
}

/// Where the first complete request in `buf` ends, as Firecracker finds it: after the first
/// line feed followed by a line feed or by a carriage return and line feed.
fn request_end(buf: &[u8]) -> Option<usize> {
    (0..buf.len().saturating_sub(1)).find_map(|i| {
        if buf[i] != b'\n' {
            None
        } else if buf[i + 1] == b'\n' {
            Some(i + 2)
        } else if buf.get(i + 1..i + 3) == Some(b"\r\n") {
            Some(i + 3)
        } else {
            None
        }
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// SYN received, SYN-ACK sent (or to send).
    SynReceived,
    /// The handshake is done.
    Established,
}

/// What a segment did to its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Still open.
    Open,
    /// Closed by both sides, or reset by the guest: forget it.
    Done,
    /// Reset here: forget it and send the guest this reset.
    Reset(Reset),
}

/// A reset to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reset {
    remote_ip: Ipv4Addr,
    remote_port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
}

impl Reset {
    /// The reset answering `seg` from `remote_ip` (RFC 9293, 3.10.7.1).
    fn answering(remote_ip: Ipv4Addr, seg: &Segment<'_>) -> Self {
        let (seq, ack, flags) = if seg.flags & ACK != 0 {
            (seg.ack, 0, RST)
        } else {
            (0, seg.seq.wrapping_add(seg.seq_len()), RST | ACK)
        };
        Self {
            remote_ip,
            remote_port: seg.src_port,
            seq,
            ack,
            flags,
        }
    }
}

/// One connection's state.
#[derive(Debug)]
struct Connection {
    remote_ip: Ipv4Addr,
    remote_port: u16,
    state: State,
    iss: u32,
    /// Oldest unacknowledged sequence number.
    snd_una: u32,
    /// Next sequence number to send (moved back to `snd_una` to retransmit).
    snd_nxt: u32,
    /// One past the highest sequence number sent.
    snd_max: u32,
    /// The guest's window, from `snd_una`.
    snd_wnd: u32,
    mss: u16,
    rcv_nxt: u32,
    /// Request bytes received and not yet answered.
    recv: Vec<u8>,
    /// The answer being sent, kept until acknowledged; `resp_seq` is its first byte's number.
    response: Vec<u8>,
    resp_seq: u32,
    fin_received: bool,
    /// The sequence number of this side's FIN, once the connection closes.
    fin_seq: Option<u32>,
    ack_pending: bool,
    last_recv: Instant,
    rto: Option<Instant>,
    rto_tries: u32,
    dup_acks: u32,
}

impl Connection {
    fn new(remote_ip: Ipv4Addr, syn: &Segment<'_>, iss: u32, now: Instant) -> Self {
        Self {
            remote_ip,
            remote_port: syn.src_port,
            state: State::SynReceived,
            iss,
            snd_una: iss,
            snd_nxt: iss,
            snd_max: iss,
            snd_wnd: u32::from(syn.window),
            mss: syn.mss.unwrap_or(MSS_DEFAULT).clamp(MSS_MIN, MSS_MAX),
            rcv_nxt: syn.seq.wrapping_add(1),
            recv: Vec::new(),
            response: Vec::new(),
            resp_seq: iss.wrapping_add(1),
            fin_received: false,
            fin_seq: None,
            ack_pending: false,
            last_recv: now,
            rto: None,
            rto_tries: 0,
            dup_acks: 0,
        }
    }

    fn window(&self) -> u16 {
        u16::try_from(RCV_BUF.saturating_sub(self.recv.len())).unwrap_or(u16::MAX)
    }

    fn reset(&self) -> Reset {
        Reset {
            remote_ip: self.remote_ip,
            remote_port: self.remote_port,
            seq: self.snd_max,
            ack: self.rcv_nxt,
            flags: RST | ACK,
        }
    }

    fn resp_end(&self) -> u32 {
        let len = u32::try_from(self.response.len()).unwrap_or(u32::MAX);
        self.resp_seq.wrapping_add(len)
    }

    /// Takes a segment of this connection; `serve` answers a complete request.
    fn receive(
        &mut self,
        seg: &Segment<'_>,
        now: Instant,
        serve: &mut dyn FnMut(&[u8]) -> Vec<u8>,
    ) -> Outcome {
        self.last_recv = now;
        if seg.flags & RST != 0 {
            // Only a reset inside the window counts (RFC 9293, 3.10.7.4).
            let in_window = seg.seq.wrapping_sub(self.rcv_nxt) <= u32::from(self.window());
            return if in_window {
                Outcome::Done
            } else {
                Outcome::Open
            };
        }
        if seg.flags & SYN != 0 {
            if self.state == State::SynReceived && seg.seq.wrapping_add(1) == self.rcv_nxt {
                // The guest did not get the SYN-ACK: send it again.
                self.snd_nxt = self.iss;
            } else {
                self.ack_pending = true;
            }
            return Outcome::Open;
        }
        if seg.flags & ACK == 0 {
            return Outcome::Open;
        }
        if self.state == State::SynReceived {
            if seg.ack != self.iss.wrapping_add(1) {
                return Outcome::Reset(Reset::answering(self.remote_ip, seg));
            }
            self.state = State::Established;
        }
        self.take_ack(seg, now);
        self.take_data(seg);
        self.serve_and_close(serve)
    }

    fn take_ack(&mut self, seg: &Segment<'_>, now: Instant) {
        if lt(self.snd_una, seg.ack) && le(seg.ack, self.snd_max) {
            self.snd_una = seg.ack;
            self.dup_acks = 0;
            self.rto_tries = 0;
            if lt(self.snd_nxt, self.snd_una) {
                self.snd_nxt = self.snd_una;
            }
            self.rto = (self.snd_una != self.snd_max).then(|| now + RTO_INITIAL);
            if !self.response.is_empty() && le(self.resp_end(), self.snd_una) {
                self.resp_seq = self.resp_end();
                self.response.clear();
            }
        } else if lt(self.snd_max, seg.ack) {
            // It acknowledges what was never sent.
            self.ack_pending = true;
            return;
        } else if seg.ack == self.snd_una
            && seg.payload.is_empty()
            && seg.flags & FIN == 0
            && self.snd_una != self.snd_max
            && u32::from(seg.window) == self.snd_wnd
        {
            self.dup_acks += 1;
            if self.dup_acks == 3 {
                self.snd_nxt = self.snd_una;
            }
        }
        if le(self.snd_una, seg.ack) {
            self.snd_wnd = u32::from(seg.window);
        }
    }

    fn take_data(&mut self, seg: &Segment<'_>) {
        let mut data = seg.payload;
        let mut seq = seg.seq;
        if !data.is_empty() {
            if lt(seq, self.rcv_nxt) {
                let old = self.rcv_nxt.wrapping_sub(seq) as usize;
                data = data.get(old..).unwrap_or(&[]);
                seq = self.rcv_nxt;
                if data.is_empty() && self.snd_una != self.snd_max {
                    // The guest sends again what was acknowledged: what was sent since is lost.
                    self.snd_nxt = self.snd_una;
                }
            }
            if seq == self.rcv_nxt && !self.fin_received {
                let take = data.len().min(RCV_BUF - self.recv.len());
                self.recv.extend_from_slice(&data[..take]);
                // At most RCV_BUF.
                self.rcv_nxt = self.rcv_nxt.wrapping_add(u32::try_from(take).unwrap_or(0));
            }
            self.ack_pending = true;
        }
        if seg.flags & FIN != 0 {
            let len = u32::try_from(seg.payload.len()).unwrap_or(u32::MAX);
            if !self.fin_received && seg.seq.wrapping_add(len) == self.rcv_nxt {
                self.fin_received = true;
                self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
            }
            self.ack_pending = true;
        }
    }

    /// Answers the next request once the last answer is acknowledged; closes after the guest's
    /// FIN once nothing is left to answer.
    fn serve_and_close(&mut self, serve: &mut dyn FnMut(&[u8]) -> Vec<u8>) -> Outcome {
        if self.response.is_empty() && self.fin_seq.is_none() {
            if let Some(end) = request_end(&self.recv) {
                self.response = serve(&self.recv[..end]);
                self.recv.drain(..end);
                self.resp_seq = self.snd_max;
            } else if self.recv.len() >= RCV_BUF {
                return Outcome::Reset(self.reset());
            }
        }
        if self.fin_received && self.response.is_empty() && self.fin_seq.is_none() {
            self.fin_seq = Some(self.snd_max);
        }
        match self.fin_seq {
            Some(fin) if self.snd_una == fin.wrapping_add(1) => Outcome::Done,
            _ => Outcome::Open,
        }
    }

    /// Whether the retransmission timeout has passed; if so, goes back to `snd_una`. False
    /// when the tries are used up.
    fn check_timeout(&mut self, now: Instant) -> bool {
        match self.rto {
            Some(deadline) if now >= deadline => {
                if self.rto_tries >= RTO_MAX_TRIES {
                    return false;
                }
                self.rto_tries += 1;
                self.snd_nxt = self.snd_una;
                self.rto = Some(now + RTO_INITIAL * (1 << self.rto_tries.min(6)));
                true
            }
            _ => true,
        }
    }

    /// Whether this connection has a segment to send now (timeouts aside).
    fn wants_to_send(&self, now: Instant) -> bool {
        if self.rto.is_some_and(|d| now >= d) || self.ack_pending {
            return true;
        }
        if self.state == State::SynReceived {
            return self.snd_nxt == self.iss;
        }
        let wnd_end = self.snd_una.wrapping_add(self.snd_wnd);
        (lt(self.snd_nxt, self.resp_end()) && lt(self.snd_nxt, wnd_end))
            || self.fin_seq == Some(self.snd_nxt)
    }

    /// The next segment to send, if any; moves `snd_nxt` past it.
    fn next_segment(&mut self, now: Instant) -> Option<Out<'_>> {
        let mut out = Out {
            remote_ip: self.remote_ip,
            remote_port: self.remote_port,
            seq: self.snd_nxt,
            ack: self.rcv_nxt,
            flags: ACK,
            window: self.window(),
            mss: None,
            payload: &[],
        };
        let sent = |c: &mut Self, len: u32| {
            c.snd_nxt = c.snd_nxt.wrapping_add(len);
            if lt(c.snd_max, c.snd_nxt) {
                c.snd_max = c.snd_nxt;
            }
            c.rto = c.rto.or(Some(now + RTO_INITIAL));
            c.ack_pending = false;
        };
        if self.state == State::SynReceived {
            // A SYN-ACK, also in answer to anything but the handshake's ACK.
            if self.snd_nxt != self.iss && !self.ack_pending {
                return None;
            }
            out.seq = self.iss;
            out.flags = SYN | ACK;
            out.mss = Some(MSS_MAX);
            self.snd_nxt = self.iss;
            sent(self, 1);
            return Some(out);
        }
        let wnd_end = self.snd_una.wrapping_add(self.snd_wnd);
        if lt(self.snd_nxt, self.resp_end()) && lt(self.snd_nxt, wnd_end) {
            let usable = wnd_end.wrapping_sub(self.snd_nxt);
            let left = self.resp_end().wrapping_sub(self.snd_nxt);
            let len = usable.min(left).min(u32::from(self.mss));
            let off = self.snd_nxt.wrapping_sub(self.resp_seq) as usize;
            if len == left {
                out.flags |= PSH;
            }
            sent(self, len);
            out.payload = &self.response[off..off + len as usize];
            return Some(out);
        }
        if self.fin_seq == Some(self.snd_nxt) {
            out.flags |= FIN;
            sent(self, 1);
            return Some(out);
        }
        if self.ack_pending {
            self.ack_pending = false;
            return Some(out);
        }
        None
    }
}

/// What happened to a segment, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvEvent {
    /// A new connection.
    NewConnection,
    /// A new connection in the place of an idle one.
    NewConnectionReplacing,
    /// A SYN refused: the table is full of busy connections.
    NewConnectionDropped,
    /// A connection ended.
    EndpointDone,
    /// A segment for no connection (answered with a reset).
    UnexpectedSegment,
    /// Anything else.
    Nothing,
}

/// The connections of one service address and port.
#[derive(Debug)]
pub struct TcpHandler {
    local_ip: Ipv4Addr,
    local_port: u16,
    conns: Vec<Connection>,
    resets: VecDeque<Reset>,
    /// Where the next look for a segment to send starts, so no connection starves the others.
    next: usize,
    isn: u32,
}

impl TcpHandler {
    /// A handler for `local_ip`:`local_port`.
    pub fn new(local_ip: Ipv4Addr, local_port: u16) -> Self {
        let mut seed = [0u8; 4];
        // A guessable first number costs nothing here (the guest is the only peer); random
        // when the host allows.
        let _ = crate::devices::virtio::rng::host_random(&mut seed);
        Self {
            local_ip,
            local_port,
            conns: Vec::with_capacity(MAX_CONNECTIONS),
            resets: VecDeque::new(),
            next: 0,
            isn: u32::from_le_bytes(seed),
        }
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn push_reset(&mut self, reset: Reset) {
        if self.resets.len() < MAX_PENDING_RESETS {
            self.resets.push_back(reset);
        }
    }

    /// Takes `seg` from `remote_ip`; `serve` answers each complete request.
    pub fn receive(
        &mut self,
        remote_ip: Ipv4Addr,
        seg: &Segment<'_>,
        now: Instant,
        serve: &mut dyn FnMut(&[u8]) -> Vec<u8>,
    ) -> Result<RecvEvent, TcpError> {
        if seg.dst_port != self.local_port {
            return Err(TcpError::InvalidPort(seg.dst_port));
        }
        let found = (self.conns.iter())
            .position(|c| c.remote_ip == remote_ip && c.remote_port == seg.src_port);
        if let Some(i) = found {
            return Ok(match self.conns[i].receive(seg, now, serve) {
                Outcome::Open => RecvEvent::Nothing,
                Outcome::Done => {
                    self.conns.swap_remove(i);
                    RecvEvent::EndpointDone
                }
                Outcome::Reset(reset) => {
                    self.conns.swap_remove(i);
                    self.push_reset(reset);
                    RecvEvent::EndpointDone
                }
            });
        }
        if seg.flags & (SYN | ACK | RST | FIN) != SYN {
            if seg.flags & RST == 0 {
                self.push_reset(Reset::answering(remote_ip, seg));
            }
            return Ok(RecvEvent::UnexpectedSegment);
        }
        let mut event = RecvEvent::NewConnection;
        if self.conns.len() >= MAX_CONNECTIONS {
            let idle = (self.conns.iter())
                .position(|c| now.saturating_duration_since(c.last_recv) > EVICTION_AFTER);
            let Some(i) = idle else {
                self.push_reset(Reset::answering(remote_ip, seg));
                return Ok(RecvEvent::NewConnectionDropped);
            };
            let evicted = self.conns.swap_remove(i);
            self.push_reset(evicted.reset());
            event = RecvEvent::NewConnectionReplacing;
        }
        self.isn = self.isn.wrapping_add(0x9e37_79b9);
        self.conns
            .push(Connection::new(remote_ip, seg, self.isn, now));
        Ok(event)
    }

    /// Whether a segment is ready to go (or a timeout is due, which may make one).
    pub fn has_output(&self, now: Instant) -> bool {
        !self.resets.is_empty() || self.conns.iter().any(|c| c.wants_to_send(now))
    }

    /// Writes the next segment into `buf`; returns the guest's address and the segment's
    /// length. Resets go first, then the connections in turn.
    pub fn write_next(
        &mut self,
        buf: &mut [u8],
        now: Instant,
        metrics: &MmdsMetrics,
    ) -> Option<(Ipv4Addr, usize)> {
        let local = (self.local_ip, self.local_port);
        if let Some(r) = self.resets.pop_front() {
            let out = Out {
                remote_ip: r.remote_ip,
                remote_port: r.remote_port,
                seq: r.seq,
                ack: r.ack,
                flags: r.flags,
                window: 0,
                mss: None,
                payload: &[],
            };
            return write_segment(buf, local, &out).map(|n| (r.remote_ip, n));
        }
        let count = self.conns.len();
        for k in 0..count {
            let i = (self.next + k) % count;
            let conn = &mut self.conns[i];
            if !conn.check_timeout(now) {
                // Timeouts used up: the guest is gone or stuck; reset.
                let reset = conn.reset();
                self.conns.swap_remove(i);
                inc(&metrics.connections_destroyed);
                self.push_reset(reset);
                return self.write_next(buf, now, metrics);
            }
            // A segment that does not fit the buffer waits; the buffer holds an MTU's worth.
            let room = buf.len().saturating_sub(TCP_HEADER_LEN + 4);
            if conn.mss as usize > room {
                conn.mss = u16::try_from(room).unwrap_or(MSS_MIN).max(1);
            }
            if let Some(out) = conn.next_segment(now) {
                self.next = i + 1;
                return write_segment(buf, local, &out).map(|n| (out.remote_ip, n));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const MMDS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

    fn seg(port: u16, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Segment<'_> {
        Segment {
            src_port: port,
            dst_port: 80,
            seq,
            ack,
            flags,
            window: 65535,
            mss: (flags & SYN != 0).then_some(1460),
            payload,
        }
    }

    fn echo(req: &[u8]) -> Vec<u8> {
        let mut r = b"ANSWER:".to_vec();
        r.extend_from_slice(req);
        r
    }

    /// Writes every segment the handler has; returns them parsed (owned payloads).
    fn drain(h: &mut TcpHandler, now: Instant) -> Vec<(Segment<'static>, Vec<u8>)> {
        let m = MmdsMetrics::default();
        let mut got = Vec::new();
        let mut buf = [0u8; 1600];
        while let Some((ip, n)) = h.write_next(&mut buf, now, &m) {
            assert_eq!(ip, GUEST);
            let pseudo = [
                &MMDS.octets()[..],
                &GUEST.octets(),
                &[0, 6],
                &u16::try_from(n).unwrap().to_be_bytes(),
            ];
            assert_eq!(
                checksum(&[pseudo[0], pseudo[1], pseudo[2], pseudo[3], &buf[..n]]),
                0,
                "checksum"
            );
            let s = parse_segment(&buf[..n]).unwrap();
            let payload = s.payload.to_vec();
            got.push((Segment { payload: &[], ..s }, payload));
            assert!(got.len() < 1000, "endless output");
        }
        got
    }

    /// A whole exchange: handshake, a request in two segments, the answer, FIN both ways.
    #[test]
    fn handshake_request_answer_close() {
        let mut h = TcpHandler::new(MMDS, 80);
        let now = Instant::now();
        let mut serve = echo;
        assert_eq!(
            h.receive(GUEST, &seg(1000, 100, 0, SYN, b""), now, &mut serve),
            Ok(RecvEvent::NewConnection)
        );
        let out = drain(&mut h, now);
        assert_eq!(out.len(), 1);
        let synack = out[0].0;
        assert_eq!(
            (synack.flags, synack.ack, synack.mss),
            (SYN | ACK, 101, Some(1460))
        );
        let iss = synack.seq;
        let s1 = iss.wrapping_add(1);
        h.receive(
            GUEST,
            &seg(1000, 101, s1, ACK, b"GET / HTTP/1.1\r\n"),
            now,
            &mut serve,
        )
        .unwrap();
        let out = drain(&mut h, now);
        assert_eq!((out.len(), out[0].0.ack), (1, 117), "a pure ACK");
        h.receive(
            GUEST,
            &seg(1000, 117, s1, ACK | PSH, b"\r\n"),
            now,
            &mut serve,
        )
        .unwrap();
        let out = drain(&mut h, now);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].1, b"ANSWER:GET / HTTP/1.1\r\n\r\n");
        assert_eq!(
            (out[0].0.seq, out[0].0.ack, out[0].0.flags),
            (s1, 119, ACK | PSH)
        );
        let acked = s1.wrapping_add(u32::try_from(out[0].1.len()).unwrap());
        // The guest acknowledges and closes; the service closes too.
        h.receive(
            GUEST,
            &seg(1000, 119, acked, ACK | FIN, b""),
            now,
            &mut serve,
        )
        .unwrap();
        let out = drain(&mut h, now);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].0.flags, out[0].0.seq, out[0].0.ack),
            (ACK | FIN, acked, 120)
        );
        assert_eq!(
            h.receive(
                GUEST,
                &seg(1000, 120, acked.wrapping_add(1), ACK, b""),
                now,
                &mut serve
            ),
            Ok(RecvEvent::EndpointDone)
        );
        assert_eq!(h.connections(), 0);
        assert!(!h.has_output(now));
    }

    fn open(h: &mut TcpHandler, port: u16, now: Instant) -> u32 {
        h.receive(GUEST, &seg(port, 0, 0, SYN, b""), now, &mut echo)
            .unwrap();
        let iss = drain(h, now).last().unwrap().0.seq;
        h.receive(
            GUEST,
            &seg(port, 1, iss.wrapping_add(1), ACK, b""),
            now,
            &mut echo,
        )
        .unwrap();
        iss.wrapping_add(1)
    }

    /// A long answer goes out in MSS-sized pieces within the guest's window, and is sent again
    /// from the first unacknowledged byte on three duplicate ACKs and on a timeout.
    #[test]
    fn windows_mss_and_retransmission() {
        let mut h = TcpHandler::new(MMDS, 80);
        let now = Instant::now();
        let s1 = open(&mut h, 7, now);
        let big = |_: &[u8]| vec![b'x'; 5000];
        let mut serve = big;
        let mut req = seg(7, 1, s1, ACK, b"GET / HTTP/1.1\r\n\r\n");
        req.window = 3000;
        h.receive(GUEST, &req, now, &mut serve).unwrap();
        let out = drain(&mut h, now);
        let lens: Vec<usize> = out.iter().map(|s| s.1.len()).collect();
        assert_eq!(lens, [1460, 1460, 80], "within the 3000-byte window");
        // Three duplicate ACKs: back to the first unacknowledged byte.
        for _ in 0..3 {
            let mut dup = seg(7, 19, s1, ACK, b"");
            dup.window = 3000;
            h.receive(GUEST, &dup, now, &mut serve).unwrap();
        }
        let out = drain(&mut h, now);
        assert_eq!(out[0].0.seq, s1);
        // Everything acknowledged so far opens the window for the rest.
        let mut ack = seg(7, 19, s1.wrapping_add(3000), ACK, b"");
        ack.window = 8000;
        h.receive(GUEST, &ack, now, &mut serve).unwrap();
        let out = drain(&mut h, now);
        assert_eq!(out.iter().map(|s| s.1.len()).sum::<usize>(), 2000);
        // Nothing acknowledged: the timeout sends it again, at the next look after it.
        assert!(drain(&mut h, now).is_empty());
        let later = now + RTO_INITIAL + Duration::from_millis(1);
        assert!(h.has_output(later));
        let out = drain(&mut h, later);
        assert_eq!(out[0].0.seq, s1.wrapping_add(3000));
        assert_eq!(out.iter().map(|s| s.1.len()).sum::<usize>(), 2000);
    }

    /// A guest that never acknowledges is reset after the tries run out.
    #[test]
    fn timeouts_run_out_into_a_reset() {
        let mut h = TcpHandler::new(MMDS, 80);
        let mut now = Instant::now();
        h.receive(GUEST, &seg(9, 0, 0, SYN, b""), now, &mut echo)
            .unwrap();
        let mut resets = 0;
        for _ in 0..=RTO_MAX_TRIES + 1 {
            now += Duration::from_secs(120);
            resets += drain(&mut h, now)
                .iter()
                .filter(|s| s.0.flags & RST != 0)
                .count();
        }
        assert_eq!((resets, h.connections()), (1, 0));
    }

    /// Requests that never end, segments out of place, and more connections than allowed: the
    /// tables stay bounded and every answer is a reset or nothing.
    #[test]
    fn hostile_segments_stay_bounded() {
        let mut h = TcpHandler::new(MMDS, 80);
        let now = Instant::now();
        // A request longer than the buffer resets its connection.
        let s1 = open(&mut h, 1, now);
        let junk = [b'a'; 1400];
        h.receive(GUEST, &seg(1, 1, s1, ACK, &junk), now, &mut echo)
            .unwrap();
        assert_eq!(
            h.receive(GUEST, &seg(1, 1401, s1, ACK, &junk), now, &mut echo),
            Ok(RecvEvent::EndpointDone)
        );
        assert!(drain(&mut h, now).iter().any(|s| s.0.flags & RST != 0));
        // Out-of-window data is not taken; a stray ACK gets a reset, a stray RST nothing.
        assert_eq!(
            h.receive(GUEST, &seg(2, 5, 5, ACK, b"x"), now, &mut echo),
            Ok(RecvEvent::UnexpectedSegment)
        );
        h.receive(GUEST, &seg(3, 5, 5, RST, b""), now, &mut echo)
            .unwrap();
        assert_eq!(drain(&mut h, now).len(), 1);
        // A port that is not the service's.
        let mut other = seg(4, 0, 0, SYN, b"");
        other.dst_port = 81;
        assert_eq!(
            h.receive(GUEST, &other, now, &mut echo),
            Err(TcpError::InvalidPort(81))
        );
        // A flood of SYNs: MAX_CONNECTIONS taken, the rest refused with resets (bounded).
        for port in 0..1000u16 {
            h.receive(GUEST, &seg(1000 + port, 0, 0, SYN, b""), now, &mut echo)
                .unwrap();
        }
        assert_eq!(h.connections(), MAX_CONNECTIONS);
        assert!(h.resets.len() <= MAX_PENDING_RESETS);
        // Once they idle past the threshold, a new SYN takes one's place.
        let later = now + EVICTION_AFTER + Duration::from_secs(1);
        assert_eq!(
            h.receive(GUEST, &seg(5000, 0, 0, SYN, b""), later, &mut echo),
            Ok(RecvEvent::NewConnectionReplacing)
        );
        assert_eq!(h.connections(), MAX_CONNECTIONS);
    }

    #[test]
    fn segments_and_options_are_checked() {
        let mut b = [0u8; 28];
        b[12] = 7 << 4; // 28-byte header
        b[13] = SYN;
        b[20..24].copy_from_slice(&[1, 2, 4, 0x05]); // NOP, MSS 0x05b4
        b[24] = 0xb4;
        b[25] = 0;
        assert_eq!(parse_segment(&b).unwrap().mss, Some(0x05b4));
        for (at, v) in [(22, 0u8), (22, 9), (12, 0x40), (12, 0xf0)] {
            let mut bad = b;
            bad[at] = v;
            assert!(parse_segment(&bad).is_err(), "byte {at} = {v}");
        }
        assert!(parse_segment(&b[..19]).is_err());
        assert_eq!(request_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"), Some(24));
        assert_eq!(request_end(b"GET /\n\nrest"), Some(7));
        assert_eq!(request_end(b"GET / HTTP/1.1\r\n"), None);
        assert_eq!(request_end(b""), None);
        assert!(lt(u32::MAX, 0) && !lt(0, u32::MAX) && le(5, 5));
    }
}
