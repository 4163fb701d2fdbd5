//! One interface's way to the service: which guest frames are the service's, what it makes of
//! them, and the frames it has for the guest.
//!
//! A frame is the service's when it is ARP asking about (or telling of) the service's address,
//! or IPv4 to that address, as Firecracker decides: it then never reaches the TAP, whatever it
//! holds. ARP requests get a reply from the service's MAC (06:01:23:45:67:01, Firecracker's);
//! TCP to port 80 goes to the [`TcpHandler`]; anything else is dropped and counted. What the
//! service sends back is written into the frame buffer the device hands it, Ethernet and IPv4
//! headers included, to the MAC the guest last wrote from. Each frame costs parsing its
//! headers, and at most answering one request.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Instant;

use super::tcp::{self, RecvEvent, TcpHandler};
use super::MmdsStore;
use crate::metrics::{add, inc, MmdsMetrics};

/// The service's MAC address (Firecracker's).
pub const MMDS_MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
/// The service's TCP port.
pub const MMDS_PORT: u16 = 80;

const ETH_HEADER_LEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
/// An Ethernet/IPv4 ARP packet (RFC 826).
const ARP_LEN: usize = 28;
const IPV4_HEADER_LEN: usize = 20;
const PROTOCOL_TCP: u8 = 6;
/// Frames shorter than this are padded (IEEE 802.3, without the FCS).
const ETH_MIN_FRAME: usize = 60;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn ipv4_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// The service as one network interface sees it.
#[derive(Debug)]
pub struct MmdsStack {
    ipv4: Ipv4Addr,
    /// The guest's MAC, from the last frame it sent the service.
    remote_mac: [u8; 6],
    /// An ARP reply owed: the asker's MAC and address (only the latest is kept).
    pending_arp: Option<([u8; 6], Ipv4Addr)>,
    tcp: TcpHandler,
    store: MmdsStore,
    metrics: Arc<MmdsMetrics>,
    ip_id: u16,
}

impl MmdsStack {
    /// The service at `ipv4` answering from `store`.
    pub fn new(ipv4: Ipv4Addr, store: MmdsStore) -> Self {
        let metrics = store.metrics();
        Self {
            ipv4,
            remote_mac: [0xff; 6],
            pending_arp: None,
            tcp: TcpHandler::new(ipv4, MMDS_PORT),
            store,
            metrics,
            ip_id: 0,
        }
    }

    /// The service's address.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    /// Whether `frame` (Ethernet, without the virtio-net header) is for the service.
    pub fn is_mmds_frame(&self, frame: &[u8]) -> bool {
        if frame.len() < ETH_HEADER_LEN {
            return false;
        }
        let target = self.ipv4.octets();
        match be16(frame, 12) {
            // The ARP packet's target protocol address.
            ETHERTYPE_ARP => {
                frame.get(ETH_HEADER_LEN + 24..ETH_HEADER_LEN + 28) == Some(&target[..])
            }
            // The IPv4 destination.
            ETHERTYPE_IPV4 => {
                frame.get(ETH_HEADER_LEN + 16..ETH_HEADER_LEN + 20) == Some(&target[..])
            }
            _ => false,
        }
    }

    /// Takes a frame [`MmdsStack::is_mmds_frame`] said is the service's.
    pub fn detour(&mut self, frame: &[u8]) {
        inc(&self.metrics.rx_accepted);
        if frame.len() < ETH_HEADER_LEN {
            inc(&self.metrics.rx_bad_eth);
            return;
        }
        let payload = &frame[ETH_HEADER_LEN..];
        let used = match be16(frame, 12) {
            ETHERTYPE_ARP => self.detour_arp(payload),
            ETHERTYPE_IPV4 => {
                let mut src = [0u8; 6];
                src.copy_from_slice(&frame[6..12]);
                self.detour_ipv4(src, payload)
            }
            _ => false,
        };
        if !used {
            inc(&self.metrics.rx_accepted_err);
        }
    }

    /// An ARP request for the service's address gets a reply; other ARP is dropped.
    fn detour_arp(&mut self, arp: &[u8]) -> bool {
        let Some(arp) = arp.get(..ARP_LEN) else {
            return false;
        };
        // Ethernet (1), IPv4 (0x0800), 6- and 4-byte addresses, request (1).
        let request = be16(arp, 0) == 1
            && be16(arp, 2) == ETHERTYPE_IPV4
            && arp[4] == 6
            && arp[5] == 4
            && be16(arp, 6) == 1;
        if !request || ipv4_at(arp, 24) != self.ipv4 {
            return false;
        }
        let mut sha = [0u8; 6];
        sha.copy_from_slice(&arp[8..14]);
        self.remote_mac = sha;
        self.pending_arp = Some((sha, ipv4_at(arp, 14)));
        true
    }

    /// IPv4 to the service: TCP goes to the handler; fragments and other protocols are
    /// dropped as unusual.
    fn detour_ipv4(&mut self, src_mac: [u8; 6], ip: &[u8]) -> bool {
        if ip.len() < IPV4_HEADER_LEN || ip[0] >> 4 != 4 {
            return false;
        }
        let header_len = usize::from(ip[0] & 0xf) * 4;
        let total = usize::from(be16(ip, 2));
        if header_len < IPV4_HEADER_LEN || total < header_len || total > ip.len() {
            return false;
        }
        let fragment = be16(ip, 6) & 0x3fff != 0;
        if ip[9] != PROTOCOL_TCP || fragment {
            inc(&self.metrics.rx_accepted_unusual);
            return true;
        }
        let segment = match tcp::parse_segment(&ip[header_len..total]) {
            Ok(s) => s,
            Err(e) => {
                crate::guest_log!(log::Level::Debug, "mmds: dropping a segment: {e}");
                return false;
            }
        };
        self.remote_mac = src_mac;
        let store = &self.store;
        let mut serve = |request: &[u8]| super::http::answer(&mut store.lock(), request).to_bytes();
        match self
            .tcp
            .receive(ipv4_at(ip, 12), &segment, Instant::now(), &mut serve)
        {
            Ok(event) => {
                inc(&self.metrics.rx_count);
                match event {
                    RecvEvent::NewConnection => inc(&self.metrics.connections_created),
                    RecvEvent::NewConnectionReplacing => {
                        inc(&self.metrics.connections_created);
                        inc(&self.metrics.connections_destroyed);
                    }
                    RecvEvent::EndpointDone => inc(&self.metrics.connections_destroyed),
                    RecvEvent::NewConnectionDropped | RecvEvent::UnexpectedSegment => {
                        inc(&self.metrics.rx_accepted_unusual);
                    }
                    RecvEvent::Nothing => {}
                }
                true
            }
            Err(e) => {
                crate::guest_log!(log::Level::Debug, "mmds: dropping a segment: {e}");
                false
            }
        }
    }

    /// Whether the service has a frame for the guest (or a timeout is due that may make one).
    pub fn has_output(&self) -> bool {
        self.pending_arp.is_some() || self.tcp.has_output(Instant::now())
    }

    /// Writes the service's next frame for the guest (Ethernet, without the virtio-net header)
    /// into `buf`; returns its length. ARP replies go first.
    pub fn write_next_frame(&mut self, buf: &mut [u8]) -> Option<usize> {
        let len = if let Some((mac, ip)) = self.pending_arp.take() {
            self.write_arp_reply(buf, mac, ip)
        } else {
            self.write_segment(buf)?
        };
        match len {
            Some(n) => {
                inc(&self.metrics.tx_count);
                inc(&self.metrics.tx_frames);
                add(&self.metrics.tx_bytes, n as u64);
            }
            None => inc(&self.metrics.tx_errors),
        }
        len
    }

    fn write_eth(&self, buf: &mut [u8], dst: [u8; 6], ethertype: u16) {
        buf[0..6].copy_from_slice(&dst);
        buf[6..12].copy_from_slice(&MMDS_MAC);
        buf[12..14].copy_from_slice(&ethertype.to_be_bytes());
    }

    fn write_arp_reply(&self, buf: &mut [u8], mac: [u8; 6], ip: Ipv4Addr) -> Option<usize> {
        let frame = buf.get_mut(..ETH_MIN_FRAME)?;
        self.write_eth(frame, mac, ETHERTYPE_ARP);
        let arp = &mut frame[ETH_HEADER_LEN..];
        arp[0..8].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
        arp[8..14].copy_from_slice(&MMDS_MAC);
        arp[14..18].copy_from_slice(&self.ipv4.octets());
        arp[18..24].copy_from_slice(&mac);
        arp[24..28].copy_from_slice(&ip.octets());
        arp[28..].fill(0);
        Some(ETH_MIN_FRAME)
    }

    /// The handler's next segment in an IPv4 packet; None when it has none (Some(None) when it
    /// could not be written).
    fn write_segment(&mut self, buf: &mut [u8]) -> Option<Option<usize>> {
        const AT: usize = ETH_HEADER_LEN + IPV4_HEADER_LEN;
        let Some(room) = buf.get_mut(AT..) else {
            return Some(None);
        };
        let (dst, seg_len) = self.tcp.write_next(room, Instant::now(), &self.metrics)?;
        let total = IPV4_HEADER_LEN + seg_len;
        let Ok(total16) = u16::try_from(total) else {
            return Some(None);
        };
        self.write_eth(buf, self.remote_mac, ETHERTYPE_IPV4);
        self.ip_id = self.ip_id.wrapping_add(1);
        let ip = &mut buf[ETH_HEADER_LEN..AT];
        ip[0] = 0x45;
        ip[1] = 0;
        ip[2..4].copy_from_slice(&total16.to_be_bytes());
        ip[4..6].copy_from_slice(&self.ip_id.to_be_bytes());
        ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // don't fragment
        ip[8] = 64;
        ip[9] = PROTOCOL_TCP;
        ip[10..12].fill(0);
        ip[12..16].copy_from_slice(&self.ipv4.octets());
        ip[16..20].copy_from_slice(&dst.octets());
        let sum = tcp::checksum(&[ip]);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        Some(Some(ETH_HEADER_LEN + total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmds::tcp::{ACK, FIN, SYN};
    use serde_json::json;
    use std::sync::atomic::Ordering;

    const GUEST_MAC: [u8; 6] = [6, 0, 0xac, 0x1e, 0, 2];
    const GUEST_IP: [u8; 4] = [172, 30, 0, 2];
    const MMDS_IP: [u8; 4] = [169, 254, 169, 254];

    fn stack() -> MmdsStack {
        let store = MmdsStore::default();
        store
            .put(json!({"latest": {"meta-data": {"ami-id": "ami-12345678"}}}))
            .unwrap();
        MmdsStack::new(Ipv4Addr::from(MMDS_IP), store)
    }

    fn arp_request(tpa: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&[8, 6, 0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&GUEST_IP);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&tpa);
        f
    }

    /// An Ethernet frame with an IPv4 packet holding `l4` of `protocol` to `dst`.
    fn ipv4_frame(dst: [u8; 4], protocol: u8, l4: &[u8]) -> Vec<u8> {
        let mut f = MMDS_MAC.to_vec();
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&[8, 0]);
        let total = u16::try_from(20 + l4.len()).unwrap();
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[0, 1, 0x40, 0, 64, protocol, 0, 0]);
        f.extend_from_slice(&GUEST_IP);
        f.extend_from_slice(&dst);
        f.extend_from_slice(l4);
        f
    }

    fn tcp_frame(port: u16, seq: u32, ack: u32, flags: u8, data: &[u8]) -> Vec<u8> {
        let mut t = port.to_be_bytes().to_vec();
        t.extend_from_slice(&80u16.to_be_bytes());
        t.extend_from_slice(&seq.to_be_bytes());
        t.extend_from_slice(&ack.to_be_bytes());
        t.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
        t.extend_from_slice(data);
        ipv4_frame(MMDS_IP, 6, &t)
    }

    fn next(s: &mut MmdsStack) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 2048];
        s.write_next_frame(&mut buf).map(|n| buf[..n].to_vec())
    }

    /// The TCP segment of a frame the stack wrote, with its checksums checked.
    fn segment_of(frame: &[u8]) -> (tcp::Segment<'static>, Vec<u8>) {
        assert_eq!(&frame[0..6], &GUEST_MAC);
        assert_eq!(&frame[6..12], &MMDS_MAC);
        let ip = &frame[14..];
        assert_eq!(tcp::checksum(&[&ip[..20]]), 0, "IPv4 header checksum");
        let total = usize::from(be16(ip, 2));
        let seg = &ip[20..total];
        let len = u16::try_from(seg.len()).unwrap().to_be_bytes();
        assert_eq!(
            tcp::checksum(&[&ip[12..20], &[0, 6], &len, seg]),
            0,
            "TCP checksum"
        );
        let s = tcp::parse_segment(seg).unwrap();
        let data = s.payload.to_vec();
        (tcp::Segment { payload: &[], ..s }, data)
    }

    #[test]
    fn frames_for_the_service_are_recognised() {
        let s = stack();
        assert!(s.is_mmds_frame(&arp_request(MMDS_IP)));
        assert!(!s.is_mmds_frame(&arp_request([172, 30, 0, 1])));
        assert!(s.is_mmds_frame(&ipv4_frame(MMDS_IP, 17, &[0; 8])));
        assert!(!s.is_mmds_frame(&ipv4_frame([172, 30, 0, 1], 6, &[0; 20])));
        for short in [0, 13, 14, 14 + 19, 14 + 27] {
            assert!(!s.is_mmds_frame(&arp_request(MMDS_IP)[..short]), "{short}");
        }
    }

    #[test]
    fn arp_requests_for_the_service_are_answered() {
        let mut s = stack();
        s.detour(&arp_request(MMDS_IP));
        let reply = next(&mut s).unwrap();
        assert_eq!(reply.len(), 60);
        assert_eq!(&reply[0..6], &GUEST_MAC);
        assert_eq!(&reply[12..14], &[8, 6]);
        let arp = &reply[14..42];
        assert_eq!(be16(arp, 6), 2, "a reply");
        assert_eq!(&arp[8..14], &MMDS_MAC);
        assert_eq!(&arp[14..18], &MMDS_IP);
        assert_eq!(&arp[18..24], &GUEST_MAC);
        assert_eq!(&arp[24..28], &GUEST_IP);
        assert!(next(&mut s).is_none());
        // A reply (not a request) naming the service is taken but not answered.
        let mut gratuitous = arp_request(MMDS_IP);
        gratuitous[21] = 2;
        s.detour(&gratuitous);
        assert!(next(&mut s).is_none());
    }

    /// A request through the stack from SYN to FIN, as a guest's TCP would send it.
    #[test]
    fn a_get_through_frames() {
        let mut s = stack();
        s.detour(&tcp_frame(4000, 10, 0, SYN, b""));
        let (synack, _) = segment_of(&next(&mut s).unwrap());
        assert_eq!(synack.flags, SYN | ACK);
        let iss1 = synack.seq.wrapping_add(1);
        let req = b"GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n";
        let req_len = u32::try_from(req.len()).unwrap();
        s.detour(&tcp_frame(4000, 11, iss1, ACK, req));
        let (seg, data) = segment_of(&next(&mut s).unwrap());
        assert_eq!(seg.ack, 11 + req_len);
        let text = String::from_utf8(data.clone()).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 \r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nami-12345678"), "{text}");
        let end = iss1.wrapping_add(u32::try_from(data.len()).unwrap());
        s.detour(&tcp_frame(4000, 11 + req_len, end, ACK | FIN, b""));
        let (fin, _) = segment_of(&next(&mut s).unwrap());
        assert_eq!(fin.flags, ACK | FIN);
        s.detour(&tcp_frame(
            4000,
            12 + req_len,
            end.wrapping_add(1),
            ACK,
            b"",
        ));
        assert!(next(&mut s).is_none());
        let m = s.store.metrics();
        assert_eq!(m.connections_created.load(Ordering::Relaxed), 1);
        assert_eq!(m.connections_destroyed.load(Ordering::Relaxed), 1);
        assert_eq!(m.rx_accepted.load(Ordering::Relaxed), 4);
        assert_eq!(m.tx_frames.load(Ordering::Relaxed), 3);
    }

    /// Broken frames of every kind are taken (never passed on), counted, and answered with at
    /// most a reset.
    #[test]
    fn hostile_frames_are_dropped_and_counted() {
        let mut s = stack();
        let mut frames = vec![
            ipv4_frame(MMDS_IP, 17, &[0; 8]),      // UDP
            ipv4_frame(MMDS_IP, 1, &[8, 0, 0, 0]), // ICMP echo
            ipv4_frame(MMDS_IP, 6, &[0; 10]),      // a TCP header cut short
        ];
        let mut frag = tcp_frame(1, 0, 0, SYN, b"");
        frag[14 + 6] = 0x20; // more fragments
        frames.push(frag);
        let mut long = tcp_frame(1, 0, 0, SYN, b"");
        long[14 + 2..14 + 4].copy_from_slice(&9000u16.to_be_bytes()); // longer than the frame
        frames.push(long);
        let mut ihl = tcp_frame(1, 0, 0, SYN, b"");
        ihl[14] = 0x4f; // a 60-byte header in a 40-byte packet
        frames.push(ihl);
        let mut offset = tcp_frame(1, 0, 0, SYN, b"");
        offset[14 + 20 + 12] = 0xf0; // a 60-byte TCP header in 20 bytes
        frames.push(offset);
        let mut port = tcp_frame(1, 0, 0, SYN, b"");
        port[14 + 20 + 3] = 81;
        frames.push(port);
        frames.push(arp_request(MMDS_IP)[..30].to_vec());
        for f in &frames {
            s.detour(f);
        }
        assert!(next(&mut s).is_none(), "nothing to answer");
        let m = s.store.metrics();
        assert_eq!(m.rx_accepted.load(Ordering::Relaxed), frames.len() as u64);
        assert_eq!(m.rx_accepted_unusual.load(Ordering::Relaxed), 3);
        assert_eq!(m.rx_accepted_err.load(Ordering::Relaxed), 6);
        // A stray ACK gets a reset.
        s.detour(&tcp_frame(2, 5, 5, ACK, b""));
        let (rst, _) = segment_of(&next(&mut s).unwrap());
        assert_eq!(rst.flags & tcp::RST, tcp::RST);
    }
}
