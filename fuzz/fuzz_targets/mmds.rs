//! The metadata service as a guest reaches it: frames for the service's address (any bytes
//! after a forced Ethernet type and destination, or TCP segments the harness builds from the
//! input so the fuzzer gets past the handshake) go through an `MmdsStack`, and HTTP requests
//! straight to its answering. Checked besides "no panic": the service's output after any one
//! input frame is bounded, every frame it writes is well-formed (its MAC, IPv4 and TCP
//! checksums that hold), and every HTTP answer is complete (status line, Content-Length that
//! matches its body).
//!
//! Input: a configuration byte (bit 0: V2; bit 1: IMDS compatibility), then records until the
//! input ends (at most 64), each a kind byte and its fields:
//! - kind % 4 == 0, a raw frame: u16 length and bytes; bit 2 of the kind makes it ARP (else
//!   IPv4), and the target or destination address is set to the service's;
//! - 1, a TCP segment: port (low 3 bits of a byte, from 1000), flags, sequence and
//!   acknowledgement numbers relative to the guest's (1000) and the service's initial
//!   numbers (the service's as its SYN-ACK gave it, so a fuzzed handshake can complete), window
//!   (u16), options (u8 length and bytes) and data (u16 length and bytes);
//! - 2, an HTTP request: u16 length and bytes, answered directly;
//! - 3, nothing (the output is drained after every record anyway).

#![no_main]

use std::collections::HashMap;
use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use skiff::mmds::stack::MMDS_MAC;
use skiff::mmds::tcp::{checksum, parse_segment, ACK, SYN};
use skiff::mmds::{http, MmdsStack, MmdsStore, MmdsVersion};
use skiff_fuzz::Input;

const MMDS_IP: [u8; 4] = [169, 254, 169, 254];
const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
const GUEST_MAC: [u8; 6] = [6, 0, 0, 0, 0, 2];
const GUEST_ISN: u32 = 1000;

fn ipv4_frame(l4: &[u8]) -> Vec<u8> {
    let mut f = MMDS_MAC.to_vec();
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[8, 0, 0x45, 0]);
    f.extend_from_slice(&u16::try_from(20 + l4.len()).unwrap_or(u16::MAX).to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0]);
    f.extend_from_slice(&GUEST_IP);
    f.extend_from_slice(&MMDS_IP);
    f.extend_from_slice(l4);
    f
}

/// Checks a frame the service wrote; returns (port, SYN-ACK's sequence number) for a SYN-ACK.
fn check_output(frame: &[u8]) -> Option<(u16, u32)> {
    assert!(frame.len() >= 42, "short frame {frame:?}");
    assert_eq!(&frame[6..12], &MMDS_MAC);
    match [frame[12], frame[13]] {
        [8, 6] => {
            assert_eq!(frame.len(), 60);
            None
        }
        [8, 0] => {
            let ip = &frame[14..];
            assert_eq!(checksum(&[&ip[..20]]), 0, "IPv4 header checksum");
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            assert_eq!(total, ip.len(), "IPv4 length");
            let seg = &ip[20..total];
            let len = u16::try_from(seg.len()).expect("segment length").to_be_bytes();
            assert_eq!(checksum(&[&ip[12..20], &[0, 6], &len, seg]), 0, "TCP checksum");
            let s = parse_segment(seg).expect("a segment the service wrote parses");
            (s.flags & (SYN | ACK) == SYN | ACK).then_some((s.dst_port, s.seq))
        }
        other => panic!("frame of type {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let cfg = input.u8();
    let store = MmdsStore::new(4096);
    let _ = store.put(serde_json::json!({
        "latest": {"meta-data": {"ami-id": "ami-12345678", "n": 1, "list": ["a"]}},
        "s": "text"
    }));
    let version = if cfg & 1 != 0 { MmdsVersion::V2 } else { MmdsVersion::V1 };
    store.configure(version, cfg & 2 != 0);
    let mut stack = MmdsStack::new(Ipv4Addr::from(MMDS_IP), store.clone());
    let mut server_isn: HashMap<u16, u32> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    for _ in 0..64 {
        if input.is_empty() {
            break;
        }
        let kind = input.u8();
        match kind % 4 {
            0 => {
                let len = usize::from(input.u16());
                let mut frame = input.bytes(len).to_vec();
                frame.resize(frame.len().max(42), 0);
                if kind & 4 != 0 {
                    frame[12..14].copy_from_slice(&[8, 6]);
                    frame[38..42].copy_from_slice(&MMDS_IP);
                } else {
                    frame[12..14].copy_from_slice(&[8, 0]);
                    frame[30..34].copy_from_slice(&MMDS_IP);
                }
                assert!(stack.is_mmds_frame(&frame));
                stack.detour(&frame);
            }
            1 => {
                let port = 1000 + u16::from(input.u8() & 7);
                let flags = input.u8();
                let seq = GUEST_ISN.wrapping_add(input.u32());
                let isn = server_isn.get(&port).copied().unwrap_or(0);
                let ack = isn.wrapping_add(input.u32());
                let window = input.u16();
                let options_len = usize::from(input.u8() & 0x3c);
                let mut options = input.bytes(options_len).to_vec();
                options.resize(options_len, 0);
                let data_len = usize::from(input.u16() & 0x0fff);
                let payload = input.bytes(data_len);
                let mut tcp = port.to_be_bytes().to_vec();
                tcp.extend_from_slice(&80u16.to_be_bytes());
                tcp.extend_from_slice(&seq.to_be_bytes());
                tcp.extend_from_slice(&ack.to_be_bytes());
                let offset = u8::try_from((20 + options_len) / 4).unwrap_or(15);
                tcp.extend_from_slice(&[offset << 4, flags]);
                tcp.extend_from_slice(&window.to_be_bytes());
                tcp.extend_from_slice(&[0, 0, 0, 0]);
                tcp.extend_from_slice(&options);
                tcp.extend_from_slice(payload);
                stack.detour(&ipv4_frame(&tcp));
            }
            2 => {
                let len = usize::from(input.u16() & 0x0fff);
                let request = input.bytes(len);
                let bytes = http::answer(&mut store.lock(), request).to_bytes();
                let text = String::from_utf8_lossy(&bytes);
                assert!(text.starts_with("HTTP/1."), "{text}");
                let (head, body) = text.split_once("\r\n\r\n").expect("a complete head");
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .and_then(|n| n.parse().ok())
                    .expect("Content-Length");
                assert_eq!(length, body.len(), "{text}");
            }
            _ => {}
        }
        // 30 connections' segments and 100 resets at most, however the guest behaves, plus
        // one ARP reply: the drain ends.
        let mut frames = 0;
        while let Some(n) = stack.write_next_frame(&mut buf) {
            if let Some((port, isn)) = check_output(&buf[..n]) {
                server_isn.insert(port, isn);
            }
            frames += 1;
            assert!(frames < 20_000, "the service's output does not end");
        }
    }
});
