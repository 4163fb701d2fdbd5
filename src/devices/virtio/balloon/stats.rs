//! The balloon's statistics (virtio 1.2, 5.5.6.3): the tag/value pairs the guest writes into
//! its statistics buffer, kept by tag (a tag the guest leaves out keeps its last value) and
//! shown under Firecracker's names.

use serde_json::{json, Map, Value};

use super::PAGES_PER_MIB;

/// Firecracker's name for each tag, in tag order (Linux's `include/uapi/linux/virtio_balloon.h`:
/// `VIRTIO_BALLOON_S_SWAP_IN` is 0 ... `VIRTIO_BALLOON_S_DIRECT_RECLAIM` is 15).
const NAMES: [&str; 16] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
    "oom_kill",
    "alloc_stall",
    "async_scan",
    "direct_scan",
    "async_reclaim",
    "direct_reclaim",
];

/// Bytes of one statistic: a little-endian u16 tag and u64 value, packed.
pub const STAT_SIZE: usize = 10;

/// The latest value the guest gave for each tag it knows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonStats {
    values: [Option<u64>; NAMES.len()],
}

impl BalloonStats {
    /// Takes the packed statistics in `bytes` (a trailing partial one is ignored); returns
    /// how many had a tag this device does not know, which are dropped.
    pub fn update_from(&mut self, bytes: &[u8]) -> u64 {
        let mut unknown = 0;
        for stat in bytes.chunks_exact(STAT_SIZE) {
            let tag = u16::from_le_bytes([stat[0], stat[1]]);
            let mut value = [0u8; 8];
            value.copy_from_slice(&stat[2..]);
            match self.values.get_mut(usize::from(tag)) {
                Some(slot) => *slot = Some(u64::from_le_bytes(value)),
                None => unknown += 1,
            }
        }
        unknown
    }

    /// `GET /balloon/statistics`: the balloon's target and actual size, in pages and MiB,
    /// and every statistic the guest has given.
    pub fn to_json(&self, target_pages: u32, actual_pages: u32) -> Value {
        let mut map = Map::new();
        map.insert("target_pages".into(), json!(target_pages));
        map.insert("actual_pages".into(), json!(actual_pages));
        map.insert("target_mib".into(), json!(target_pages / PAGES_PER_MIB));
        map.insert("actual_mib".into(), json!(actual_pages / PAGES_PER_MIB));
        for (name, value) in NAMES.iter().zip(&self.values) {
            if let Some(v) = value {
                map.insert((*name).into(), json!(v));
            }
        }
        Value::Object(map)
    }

    /// The values as (tag, value) pairs, for a snapshot.
    pub fn saved(&self) -> Vec<(u16, u64)> {
        (0u16..)
            .zip(&self.values)
            .filter_map(|(tag, v)| v.map(|v| (tag, v)))
            .collect()
    }

    /// Values as [`BalloonStats::saved`] gave them; unknown tags are dropped.
    pub fn from_saved(saved: &[(u16, u64)]) -> Self {
        let mut stats = Self::default();
        for &(tag, value) in saved {
            if let Some(slot) = stats.values.get_mut(usize::from(tag)) {
                *slot = Some(value);
            }
        }
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(tag: u16, value: u64) -> Vec<u8> {
        let mut b = tag.to_le_bytes().to_vec();
        b.extend_from_slice(&value.to_le_bytes());
        b
    }

    #[test]
    fn tags_become_firecracker_names_and_missing_ones_keep_their_value() {
        let mut s = BalloonStats::default();
        let mut bytes = [stat(0, 1), stat(4, 4096), stat(15, 9), stat(16, 7)].concat();
        bytes.push(0xff); // a partial record
        assert_eq!(s.update_from(&bytes), 1, "tag 16 is unknown");
        assert_eq!(s.update_from(&stat(4, 8192)), 0);
        let v = s.to_json(512, 256);
        assert_eq!(v["target_mib"], 2);
        assert_eq!(v["actual_pages"], 256);
        assert_eq!(v["actual_mib"], 1);
        assert_eq!(v["swap_in"], 1);
        assert_eq!(v["free_memory"], 8192);
        assert_eq!(v["direct_reclaim"], 9);
        assert!(v.get("swap_out").is_none(), "never given: left out");
        assert_eq!(BalloonStats::from_saved(&s.saved()), s);
    }
}
