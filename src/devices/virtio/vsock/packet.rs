//! The vsock packet (virtio 1.2, 5.10.6): a 44-byte little-endian header, then `len` bytes of
//! data for a RW packet; and copying packets out of and into the guest's buffers, which may
//! split a packet anywhere.

use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::GuestBuf;
use crate::vstate::memory::GuestMemoryMmap;

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;

/// Packet operations (`op`).
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection refused or torn down.
    pub const RST: u16 = 3;
    /// The sender will receive and/or send no more (flags say which).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// The sender's buffer space (`buf_alloc`, `fwd_cnt`), unasked or answering a request.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Asks the receiver for a credit update.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// The only socket type Skiff carries (`type`): streams.
pub const TYPE_STREAM: u16 = 1;
/// SHUTDOWN flag: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both SHUTDOWN flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// `struct virtio_vsock_hdr`, decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Data bytes after the header.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// SHUTDOWN flags.
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has taken out of its receive buffer so far (wrapping).
    pub fwd_cnt: u32,
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from(le_u32(b, at)) | u64::from(le_u32(b, at + 4)) << 32
}

impl Header {
    /// Decodes the wire form.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        Self {
            src_cid: le_u64(b, 0),
            dst_cid: le_u64(b, 8),
            src_port: le_u32(b, 16),
            dst_port: le_u32(b, 20),
            len: le_u32(b, 24),
            type_: le_u16(b, 28),
            op: le_u16(b, 30),
            flags: le_u32(b, 32),
            buf_alloc: le_u32(b, 36),
            fwd_cnt: le_u32(b, 40),
        }
    }

    /// The wire form.
    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a transmitted chain holds no usable packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadPacket {
    /// Fewer than [`HDR_LEN`] readable bytes.
    ShortHeader,
    /// `len` larger than [`super::MAX_PKT_DATA`] or than the bytes the chain holds after the
    /// header.
    BadLength(u32),
    /// A buffer lies outside guest memory.
    Memory,
}

/// Copies `dst.len()` bytes from `bufs`, starting `skip` bytes in.
fn gather(
    mem: &GuestMemoryMmap,
    bufs: &[GuestBuf],
    mut skip: u64,
    dst: &mut [u8],
) -> Result<(), BadPacket> {
    let mut at = 0usize;
    for b in bufs {
        if at == dst.len() {
            break;
        }
        let len = u64::from(b.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = usize::try_from(len - skip)
            .unwrap_or(usize::MAX)
            .min(dst.len() - at);
        let addr = b.addr.checked_add(skip).ok_or(BadPacket::Memory)?;
        mem.read_slice(&mut dst[at..at + n], GuestAddress(addr))
            .map_err(|_| BadPacket::Memory)?;
        at += n;
        skip = 0;
    }
    if at == dst.len() {
        Ok(())
    } else {
        Err(BadPacket::ShortHeader)
    }
}

/// Reads the packet a transmit chain's readable buffers hold: its header, and its data into
/// `data` (resized to `len`). The header's `len` must fit both the chain and
/// [`super::MAX_PKT_DATA`]; nothing else about the header is checked here.
pub fn read_packet(
    mem: &GuestMemoryMmap,
    bufs: &[GuestBuf],
    data: &mut Vec<u8>,
) -> Result<Header, BadPacket> {
    let total: u64 = bufs.iter().map(|b| u64::from(b.len)).sum();
    if total < HDR_LEN as u64 {
        return Err(BadPacket::ShortHeader);
    }
    let mut raw = [0u8; HDR_LEN];
    gather(mem, bufs, 0, &mut raw)?;
    let hdr = Header::from_bytes(&raw);
    if hdr.len > super::MAX_PKT_DATA || u64::from(hdr.len) > total - HDR_LEN as u64 {
        return Err(BadPacket::BadLength(hdr.len));
    }
    data.resize(hdr.len as usize, 0);
    if hdr.len > 0 {
        gather(mem, bufs, HDR_LEN as u64, data).map_err(|e| match e {
            BadPacket::ShortHeader => BadPacket::BadLength(hdr.len),
            other => other,
        })?;
    }
    Ok(hdr)
}

/// Room for data in a receive chain's writable buffers after the header; None when they
/// cannot hold a header.
pub fn data_room(bufs: &[GuestBuf]) -> Option<u32> {
    let total: u64 = bufs.iter().map(|b| u64::from(b.len)).sum();
    let room = total.checked_sub(HDR_LEN as u64)?;
    Some(u32::try_from(room).unwrap_or(u32::MAX))
}

/// Writes `hdr` and then `data` into a receive chain's writable buffers; returns the bytes
/// written, or why it could not: a buffer outside guest memory, or buffers too small.
pub fn write_packet(
    mem: &GuestMemoryMmap,
    bufs: &[GuestBuf],
    hdr: &Header,
    data: &[u8],
) -> Result<u32, BadPacket> {
    let raw = hdr.to_bytes();
    let mut parts = [raw.as_slice(), data];
    let mut written = 0u32;
    let mut part = 0;
    for b in bufs {
        let mut addr = b.addr;
        let mut room = b.len as usize;
        while room > 0 && part < parts.len() {
            let src = parts[part];
            if src.is_empty() {
                part += 1;
                continue;
            }
            let n = src.len().min(room);
            mem.write_slice(&src[..n], GuestAddress(addr))
                .map_err(|_| BadPacket::Memory)?;
            parts[part] = &src[n..];
            addr = addr.checked_add(n as u64).ok_or(BadPacket::Memory)?;
            room -= n;
            written = written.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        }
    }
    if parts.iter().any(|p| !p.is_empty()) {
        return Err(BadPacket::ShortHeader);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        crate::vstate::memory::anonymous(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn sample() -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1024,
            dst_port: 53,
            len: 5,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trips_in_the_spec_layout() {
        let h = sample();
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[30..32], &op::RW.to_le_bytes());
        assert_eq!(&b[40..44], &7u32.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }

    /// A packet split anywhere across buffers reads back whole; lengths that the chain cannot
    /// hold, or larger than a packet may be, are refused.
    #[test]
    fn packets_split_anywhere_read_back_and_bad_lengths_are_refused() {
        let m = mem();
        let h = sample();
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(b"hello");
        m.write_slice(&bytes, GuestAddress(0x1000)).unwrap();
        let mut data = Vec::new();
        for cut in [1u64, 20, 43, 44, 46] {
            let cut32 = u32::try_from(cut).unwrap();
            let bufs = [
                GuestBuf {
                    addr: 0x1000,
                    len: cut32,
                },
                GuestBuf {
                    addr: 0x1000 + cut,
                    len: 49 - cut32,
                },
            ];
            assert_eq!(read_packet(&m, &bufs, &mut data), Ok(h), "cut at {cut}");
            assert_eq!(data, b"hello");
        }
        let short = [GuestBuf {
            addr: 0x1000,
            len: 48,
        }];
        assert_eq!(
            read_packet(&m, &short, &mut data),
            Err(BadPacket::BadLength(5))
        );
        let tiny = [GuestBuf {
            addr: 0x1000,
            len: 43,
        }];
        assert_eq!(
            read_packet(&m, &tiny, &mut data),
            Err(BadPacket::ShortHeader)
        );
        let huge = Header { len: u32::MAX, ..h };
        m.write_slice(&huge.to_bytes(), GuestAddress(0x2000))
            .unwrap();
        let bufs = [GuestBuf {
            addr: 0x2000,
            len: u32::MAX,
        }];
        assert_eq!(
            read_packet(&m, &bufs, &mut data),
            Err(BadPacket::BadLength(u32::MAX))
        );
        let outside = [GuestBuf {
            addr: 0xf_fff0,
            len: 100,
        }];
        assert_eq!(read_packet(&m, &outside, &mut data), Err(BadPacket::Memory));
    }

    #[test]
    fn written_packets_span_buffers_and_must_fit() {
        let m = mem();
        let h = sample();
        let bufs = [
            GuestBuf {
                addr: 0x3000,
                len: 10,
            },
            GuestBuf {
                addr: 0x4000,
                len: 100,
            },
        ];
        assert_eq!(data_room(&bufs), Some(66));
        assert_eq!(write_packet(&m, &bufs, &h, b"hello"), Ok(49));
        let mut back = [0u8; 10];
        m.read_slice(&mut back, GuestAddress(0x3000)).unwrap();
        assert_eq!(back, h.to_bytes()[..10]);
        let mut data = Vec::new();
        let whole = [
            GuestBuf {
                addr: 0x3000,
                len: 10,
            },
            GuestBuf {
                addr: 0x4000,
                len: 39,
            },
        ];
        assert_eq!(read_packet(&m, &whole, &mut data), Ok(h));
        assert_eq!(data, b"hello");
        let small = [GuestBuf {
            addr: 0x3000,
            len: 40,
        }];
        assert_eq!(data_room(&small), None);
        assert!(write_packet(&m, &small, &h, b"").is_err());
    }
}
