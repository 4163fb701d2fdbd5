//! The state file: header, payload and checksum (see the module documentation of
//! [`crate::snapshot`]).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::{MicrovmState, SnapshotError};

/// The state file format this Skiff writes and reads.
pub const SNAPSHOT_VERSION: u32 = 2;

const MAGIC: &[u8; 8] = b"SKIFFSNP";
/// Magic, version, payload length.
const HEADER_LEN: usize = 8 + 4 + 8;
const CRC_LEN: usize = 4;
/// The largest payload read: far above what 32 vCPUs and every device take (about 10 KiB a
/// vCPU), low enough that a forged length cannot make Skiff allocate without bound.
const MAX_PAYLOAD: usize = 16 << 20;

/// CRC-32 (IEEE 802.3, reflected, as zlib computes it).
fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            #[allow(clippy::cast_possible_truncation)] // i < 256
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !bytes.iter().fold(!0u32, |c, &b| {
        TABLE[usize::from(c.to_le_bytes()[0] ^ b)] ^ (c >> 8)
    })
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_fixed_int_encoding()
        .with_limit::<MAX_PAYLOAD>()
}

/// Writes `state` to `path` (created or replaced).
pub fn write_state(path: &Path, state: &MicrovmState) -> Result<(), SnapshotError> {
    let payload =
        bincode::serde::encode_to_vec(state, bincode_config()).map_err(SnapshotError::Encode)?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len() + CRC_LEN);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&payload);
    let crc = crc32(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    let write_err = |e| SnapshotError::Write(path.to_owned(), e);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_CLOEXEC)
        .mode(0o600)
        .open(path)
        .map_err(write_err)?;
    file.write_all(&bytes).map_err(write_err)
}

/// Opens a file given by a client without blocking (a FIFO would otherwise wait for a writer
/// for ever) and requires a regular file.
fn open_regular(path: &Path) -> Result<File, SnapshotError> {
    let read_err = |e| SnapshotError::Read(path.to_owned(), e);
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(read_err)?;
    if !file.metadata().map_err(read_err)?.is_file() {
        return Err(read_err(std::io::Error::other("not a regular file")));
    }
    Ok(file)
}

/// Checks the header of `bytes` (the start of a state file): returns the payload length.
fn parse_header(path: &Path, bytes: &[u8]) -> Result<u64, SnapshotError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::NotASnapshot(path.to_owned()));
    }
    let truncated = || SnapshotError::Truncated {
        path: path.to_owned(),
        len: bytes.len() as u64,
        expected: HEADER_LEN as u64,
    };
    let version = bytes.get(8..12).ok_or_else(truncated)?;
    let version = u32::from_le_bytes(version.try_into().map_err(|_| truncated())?);
    if version != SNAPSHOT_VERSION {
        return Err(SnapshotError::Version {
            path: path.to_owned(),
            found: version,
        });
    }
    let len = bytes.get(12..HEADER_LEN).ok_or_else(truncated)?;
    Ok(u64::from_le_bytes(len.try_into().map_err(|_| truncated())?))
}

/// Parses a whole state file's bytes.
pub fn parse_state(path: &Path, bytes: &[u8]) -> Result<MicrovmState, SnapshotError> {
    let payload_len = parse_header(path, bytes)?;
    let expected = payload_len.saturating_add((HEADER_LEN + CRC_LEN) as u64);
    if payload_len > MAX_PAYLOAD as u64 || bytes.len() as u64 != expected {
        if (bytes.len() as u64) < expected {
            return Err(SnapshotError::Truncated {
                path: path.to_owned(),
                len: bytes.len() as u64,
                expected,
            });
        }
        return Err(SnapshotError::Checksum(path.to_owned()));
    }
    let (body, crc) = bytes.split_at(bytes.len() - CRC_LEN);
    let crc = u32::from_le_bytes(
        crc.try_into()
            .map_err(|_| SnapshotError::Checksum(path.to_owned()))?,
    );
    if crc32(body) != crc {
        return Err(SnapshotError::Checksum(path.to_owned()));
    }
    let (state, used) = bincode::serde::decode_from_slice(&body[HEADER_LEN..], bincode_config())
        .map_err(|e| SnapshotError::Decode(path.to_owned(), e))?;
    if used != body.len() - HEADER_LEN {
        return Err(SnapshotError::Invalid("bytes left over after the state"));
    }
    Ok(state)
}

/// Reads and checks the state file at `path`: header, length, checksum, then the state.
pub fn read_state(path: &Path) -> Result<MicrovmState, SnapshotError> {
    let file = open_regular(path)?;
    let mut bytes = Vec::new();
    // One byte past the largest valid file, so a longer one shows as such.
    let cap = (MAX_PAYLOAD + HEADER_LEN + CRC_LEN + 1) as u64;
    file.take(cap)
        .read_to_end(&mut bytes)
        .map_err(|e| SnapshotError::Read(path.to_owned(), e))?;
    parse_state(path, &bytes)
}

/// The format version of the state file at `path` (`--describe-snapshot`).
pub fn describe_snapshot(path: &Path) -> Result<u32, SnapshotError> {
    let mut header = Vec::new();
    open_regular(path)?
        .take(HEADER_LEN as u64)
        .read_to_end(&mut header)
        .map_err(|e| SnapshotError::Read(path.to_owned(), e))?;
    match parse_header(path, &header) {
        Ok(_) => Ok(SNAPSHOT_VERSION),
        Err(SnapshotError::Version { found, .. }) => Ok(found),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every optional part of the devices' state set, through the state file's encoding and
    /// back: a field the encoder leaves out (as the API's JSON form does for unset limits)
    /// would make every such snapshot unreadable.
    #[test]
    fn device_state_with_everything_set_survives_the_encoding() {
        use crate::config::{RateLimiterConfig, TokenBucketConfig};
        use crate::device_manager::{DevicesState, VirtioSlotState};
        use crate::devices::legacy::i8042::I8042State;
        use crate::devices::legacy::serial::SerialState;
        use crate::devices::virtio::balloon::{BalloonState, HintingState};
        use crate::devices::virtio::block::BlockState;
        use crate::devices::virtio::mem::VirtioMemState;
        use crate::devices::virtio::mmio::MmioTransportState;
        use crate::devices::virtio::net::NetState;
        use crate::devices::virtio::pmem::PmemState;
        use crate::devices::virtio::rng::RngState;
        use crate::devices::virtio::vsock::VsockState;
        use crate::devices::virtio::{QueueSnapshot, VirtioState};

        let bucket = TokenBucketConfig {
            size: 7,
            one_time_burst: Some(9),
            refill_time: 11,
        };
        let limiter = Some(RateLimiterConfig {
            bandwidth: Some(bucket),
            ops: None,
        });
        let queue = QueueSnapshot {
            max_size: 256,
            next_avail: 3,
            next_used: 2,
            event_idx_enabled: true,
            size: 128,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
        };
        let virtio = VirtioState {
            avail_features: 1 << 32,
            acked_features: 1 << 32,
            interrupt_status: 1,
            needs_reset: true,
            config: vec![1, 2, 3],
            config_generation: 4,
            queues: vec![queue],
        };
        let transport = MmioTransportState {
            status: 15,
            device_features_sel: 1,
            driver_features_sel: 1,
            driver_features: 1 << 32,
            queue_sel: 0,
            queues: vec![queue],
            bad_queue_size: true,
        };
        let slot = |device| VirtioSlotState {
            id: "x".into(),
            slot: 0,
            transport: transport.clone(),
            device,
        };
        let state = DevicesState {
            serial: SerialState {
                baud_divisor_low: 1,
                baud_divisor_high: 0,
                interrupt_enable: 1,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 5,
                in_buffer: vec![b'a'],
            },
            i8042: I8042State {
                status: 1,
                control: 2,
                outp: 3,
                pending_cmd: Some(0x60),
                pending: vec![0xfa],
            },
            blocks: vec![slot(BlockState {
                path: "disk.img".into(),
                read_only: true,
                nsectors: 8,
                rate_limiter: limiter,
                cache_type: crate::config::CacheType::Writeback,
                io_engine: crate::config::IoEngine::Async,
                virtio: virtio.clone(),
            })],
            nets: vec![VirtioSlotState {
                id: "n".into(),
                slot: 1,
                transport: transport.clone(),
                device: NetState {
                    tap: "tap0".into(),
                    mac: Some([6, 0, 0, 0, 0, 1]),
                    rx_rate_limiter: limiter,
                    tx_rate_limiter: None,
                    virtio: virtio.clone(),
                },
            }],
            entropy: vec![VirtioSlotState {
                id: "entropy".into(),
                slot: 2,
                transport: transport.clone(),
                device: RngState {
                    rate_limiter: limiter,
                    virtio: virtio.clone(),
                },
            }],
            vsock: vec![VirtioSlotState {
                id: "vsock".into(),
                slot: 3,
                transport: transport.clone(),
                device: VsockState {
                    guest_cid: 3,
                    uds_path: "v.sock".into(),
                    virtio: virtio.clone(),
                },
            }],
            balloon: vec![VirtioSlotState {
                id: "balloon".into(),
                slot: 4,
                transport: transport.clone(),
                device: BalloonState {
                    target_pages: 512,
                    actual_pages: 256,
                    deflate_on_oom: true,
                    stats_polling_interval_s: 1,
                    free_page_hinting: true,
                    free_page_reporting: true,
                    stats_desc_index: Some(3),
                    stats: vec![(0, 1), (15, u64::MAX)],
                    hinting: HintingState {
                        host_cmd: 2,
                        last_cmd_id: 2,
                        guest_cmd: Some(2),
                        acknowledge_on_stop: true,
                    },
                    virtio: virtio.clone(),
                },
            }],
            pmem: vec![VirtioSlotState {
                id: "pmem0".into(),
                slot: 5,
                transport: transport.clone(),
                device: PmemState {
                    path: "pmem.img".into(),
                    read_only: true,
                    root_device: true,
                    start: 1 << 32,
                    size: 2 << 20,
                    slot: 8,
                    rate_limiter: limiter,
                    virtio: virtio.clone(),
                },
            }],
            memory_hotplug: vec![VirtioSlotState {
                id: "memory-hotplug".into(),
                slot: 6,
                transport,
                device: VirtioMemState {
                    addr: 5 << 30,
                    region_size: 1 << 30,
                    block_size: 2 << 20,
                    slot_size: 128 << 20,
                    usable_region_size: 256 << 20,
                    requested_size: 200 << 20,
                    plugged: vec![u64::MAX, 1, 0, 0, 0, 0, 0, 0],
                    virtio,
                },
            }],
            mmds: Some(crate::mmds::MmdsState {
                version: crate::mmds::MmdsVersion::V2,
                ipv4_address: [169, 254, 170, 2],
                network_interfaces: vec!["n".into()],
                imds_compat: true,
            }),
            pci: Some(vec![crate::devices::virtio::pci::VirtioPciState {
                slot: 0,
                header: (0..=255).collect(),
                bar: [0xe800_0000, 0],
                device_features_sel: 1,
                driver_features_sel: 1,
                queue_sel: 0,
                msix: crate::devices::pci::msix::MsixState {
                    entries: vec![crate::devices::pci::msix::MsixEntryState {
                        address: 0xfee0_0000,
                        data: 0x42,
                        masked: true,
                        pending: true,
                    }],
                    enabled: true,
                    function_masked: false,
                    queue_vectors: vec![1, 0xffff],
                    config_vector: 0,
                },
            }]),
        };
        let bytes = bincode::serde::encode_to_vec(&state, bincode_config()).unwrap();
        let (back, used): (DevicesState, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode_config()).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(back, state);
    }

    /// The fuzz target's seeds are state files this Skiff reads: a seed that no longer
    /// decodes (the format changed under it) would leave the fuzzer at the checksum.
    #[test]
    fn the_fuzz_seeds_are_readable_state_files() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/snapshot_state");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            if let Err(e) = parse_state(&path, &bytes) {
                panic!("{}: {}", path.display(), crate::error_chain(&e));
            }
            seen += 1;
        }
        assert!(seen >= 4, "{seen} seeds");
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    fn header(version: u32, len: u64) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
        b
    }

    #[test]
    fn bad_files_get_the_error_that_names_their_fault() {
        let p = Path::new("s");
        assert!(matches!(
            parse_state(p, b"ELF\x7f...."),
            Err(SnapshotError::NotASnapshot(_))
        ));
        assert!(matches!(
            parse_state(p, b"SKIFF"),
            Err(SnapshotError::NotASnapshot(_))
        ));
        assert!(matches!(
            parse_state(p, &header(7, 0)),
            Err(SnapshotError::Version { found: 7, .. })
        ));
        assert!(matches!(
            parse_state(p, &MAGIC[..]),
            Err(SnapshotError::Truncated { .. })
        ));
        assert!(matches!(
            parse_state(p, &header(SNAPSHOT_VERSION, 100)),
            Err(SnapshotError::Truncated { .. })
        ));
        assert!(matches!(
            parse_state(p, &header(SNAPSHOT_VERSION, u64::MAX)),
            Err(SnapshotError::Truncated { .. })
        ));
        let mut b = header(SNAPSHOT_VERSION, 1);
        b.extend_from_slice(&[0, 1, 2, 3, 4]);
        assert!(matches!(
            parse_state(p, &b),
            Err(SnapshotError::Checksum(_))
        ));
        // A valid checksum over a payload that is not a state.
        let mut b = header(SNAPSHOT_VERSION, 3);
        b.extend_from_slice(&[1, 2, 3]);
        let crc = crc32(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        assert!(matches!(parse_state(p, &b), Err(SnapshotError::Decode(..))));
    }
}
