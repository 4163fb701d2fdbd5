//! Counters: plain atomics that the vCPU threads and devices bump (relaxed, no locks). The
//! metrics file (`PUT /metrics`) gets them in Firecracker's document ([`firecracker`]) at
//! boot, every 60 s, on FlushMetrics and at exit; [`crate::vmm::Vm::metrics`] gives all of
//! Skiff's counters, some of which that document has no name for.

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Map, Value};

pub mod firecracker;

/// Adds one to a counter.
#[inline]
pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to a counter.
#[inline]
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

macro_rules! counters {
    ($(#[$doc:meta])* $name:ident { $($(#[$fdoc:meta])* $field:ident),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Default)]
        pub struct $name {
            $($(#[$fdoc])* pub $field: AtomicU64,)*
        }

        impl $name {
            /// The counters as a JSON object.
            pub fn to_json(&self) -> Value {
                let mut map = Map::new();
                $(map.insert(stringify!($field).to_owned(), json!(self.$field.load(Ordering::Relaxed)));)*
                Value::Object(map)
            }
        }
    };
}

counters!(
    /// One vCPU's exits, by kind.
    VcpuMetrics {
        /// Port reads.
        exit_io_in,
        /// Port writes.
        exit_io_out,
        /// MMIO reads.
        exit_mmio_read,
        /// MMIO writes.
        exit_mmio_write,
        /// HLT with the irqchip in user space (never here) or a guest halting for good.
        exit_hlt,
        /// Shutdown, reset and system events.
        exit_system_event,
        /// KVM_RUN interrupted by a kick or signal.
        exit_interrupted,
        /// Failures: internal errors, failed entries, unexpected exits.
        failures,
    }
);

counters!(
    /// The serial console (COM1), under Firecracker's names.
    UartMetrics {
        /// Bytes the guest wrote to the console.
        write_count,
        /// Of those, bytes dropped by the console's rate limiter.
        rate_limiter_dropped_bytes,
    }
);

counters!(
    /// The entropy device, under Firecracker's names.
    EntropyMetrics {
        /// Queue drains.
        entropy_event_count,
        /// Random bytes given to the guest.
        entropy_bytes,
        /// Requests the host's getrandom could not fill.
        host_rng_fails,
        /// Requests held back by the rate limiter.
        entropy_rate_limiter_throttled,
        /// Requests too broken to fill (a readable buffer, memory outside the guest's).
        invalid_requests,
    }
);

counters!(
    /// The balloon, under Firecracker's names, and a few of Skiff's own after them.
    BalloonMetrics {
        /// Activations that failed (the driver set up another number of queues).
        activate_fails,
        /// Inflate queue drains.
        inflate_count,
        /// Statistics buffers taken from the guest.
        stats_updates_count,
        /// Statistics dropped: unknown tags, unreadable buffers.
        stats_update_fails,
        /// Deflate queue drains.
        deflate_count,
        /// A queue the driver broke, or a discard the host refused.
        event_fails,
        /// Ranges the guest reported free.
        free_page_report_count,
        /// Bytes of those given back to the host.
        free_page_report_freed,
        /// Reported ranges not given back (not whole pages of guest RAM, or refused).
        free_page_report_fails,
        /// Ranges the guest hinted during a run.
        free_page_hint_count,
        /// Bytes of those given back to the host.
        free_page_hint_freed,
        /// Hinted ranges not given back.
        free_page_hint_fails,
        /// Pages the guest inflated that were given back to the host.
        inflated_pages,
        /// Pages the guest took back (deflated).
        deflated_pages,
        /// Page frame numbers outside guest RAM, or past a chain's limit: ignored.
        invalid_pfns,
        /// Chains too broken to read.
        invalid_requests,
    }
);

counters!(
    /// One pmem device, under Firecracker's names where it has them.
    PmemMetrics {
        /// Queue drains.
        queue_event_count,
        /// fdatasyncs of the file (one per drain that holds flushes).
        flush_count,
        /// fdatasyncs that failed on the host; the guest got -1.
        host_flush_errors,
        /// Requests too broken to answer, and unknown request types.
        invalid_requests,
        /// Flushes put back on the queue by the rate limiter, to run when it allows.
        rate_limiter_throttled_events,
    }
);

counters!(
    /// The memory hot-plug device (virtio-mem), under Firecracker's names.
    MemoryHotplugMetrics {
        /// Queue drains.
        queue_event_count,
        /// PLUG requests.
        plug_count,
        /// Bytes plugged.
        plug_bytes,
        /// PLUG requests refused (NACK or ERROR).
        plug_fails,
        /// UNPLUG requests.
        unplug_count,
        /// Bytes unplugged.
        unplug_bytes,
        /// UNPLUG requests refused.
        unplug_fails,
        /// Unplugged ranges whose pages could not be given back to the host.
        unplug_discard_fails,
        /// UNPLUG_ALL requests.
        unplug_all_count,
        /// STATE requests.
        state_count,
        /// STATE requests refused.
        state_fails,
        /// Requests too broken to answer, and unknown request types.
        invalid_requests,
    }
);

counters!(
    /// The metadata service, under Firecracker's names (one set for every interface).
    MmdsMetrics {
        /// Guest frames taken by the service instead of the TAP.
        rx_accepted,
        /// Of those, frames the service could not use (malformed, another port, a broken
        /// segment).
        rx_accepted_err,
        /// Unusual events: non-TCP packets, resets, segments for no connection.
        rx_accepted_unusual,
        /// Frames too short to be Ethernet.
        rx_bad_eth,
        /// GETs with a token that is not valid.
        rx_invalid_token,
        /// GETs without a token.
        rx_no_token,
        /// Segments the TCP side took.
        rx_count,
        /// Bytes of the frames the service gave the guest.
        tx_bytes,
        /// Frames (ARP replies, segments) the service wrote.
        tx_count,
        /// Frames the service could not write.
        tx_errors,
        /// Frames the service gave the guest.
        tx_frames,
        /// TCP connections opened.
        connections_created,
        /// TCP connections closed, reset or evicted.
        connections_destroyed,
    }
);

counters!(
    /// One block device.
    BlockMetrics {
        /// Read requests.
        read_count,
        /// Bytes read into the guest.
        read_bytes,
        /// Write requests.
        write_count,
        /// Bytes written to the image.
        write_bytes,
        /// Flush requests.
        flush_count,
        /// GET_ID requests.
        get_id_count,
        /// Requests that failed (I/O error, out of range, read-only).
        io_errors,
        /// Chains too broken to answer, and unsupported request types.
        invalid_requests,
        /// Reads of the image that failed on the host (a truncated image, a failing disk).
        host_read_errors,
        /// Writes to the image that failed on the host (a full disk).
        host_write_errors,
        /// Flushes of the image that failed on the host.
        host_flush_errors,
        /// Requests put back on the queue by the rate limiter, to run when it allows.
        rate_limiter_throttled_events,
        /// Requests left on the queue because the Async engine's ring was full (taken again
        /// when requests complete).
        io_engine_throttled_events,
        /// `io_uring_enter` calls that submitted requests (Async engine): one per queue drain.
        io_engine_submits,
        /// Async requests finished while the device waited for its ring (a reset, snapshot,
        /// image swap or stop) rather than on the event thread.
        io_engine_waited,
    }
);

counters!(
    /// One network device.
    NetMetrics {
        /// Frames delivered to the guest.
        rx_frames,
        /// Bytes delivered to the guest, headers excluded.
        rx_bytes,
        /// Frames read from the TAP and dropped.
        rx_dropped,
        /// Frames sent to the TAP.
        tx_frames,
        /// Bytes sent to the TAP, headers excluded.
        tx_bytes,
        /// Guest frames dropped.
        tx_dropped,
        /// Times the RX rate limiter held a frame back.
        rx_rate_limiter_throttled,
        /// Guest frames put back on the TX queue by the rate limiter.
        tx_rate_limiter_throttled,
    }
);

counters!(
    /// The API server, Skiff's own counters.
    ApiServerMetrics {
        /// Requests answered.
        requests,
        /// Requests answered with an error status.
        errors,
        /// Connections past the cap, answered 503 and closed.
        connections_refused,
        /// Failed accepts (out of file descriptors, most likely); logged rate-limited.
        accept_failures,
    }
);

counters!(
    /// GET requests by route, under Firecracker's names.
    GetApiRequestsMetrics {
        instance_info_count,
        machine_cfg_count,
        mmds_count,
        vmm_version_count,
        hotplug_memory_count,
    }
);

counters!(
    /// PUT requests by route, under Firecracker's names: `_count` for each request,
    /// `_fails` for each refused before it reached the VMM (a body that does not parse).
    PutApiRequestsMetrics {
        actions_count,
        actions_fails,
        boot_source_count,
        boot_source_fails,
        drive_count,
        drive_fails,
        logger_count,
        logger_fails,
        machine_cfg_count,
        machine_cfg_fails,
        cpu_cfg_count,
        cpu_cfg_fails,
        metrics_count,
        metrics_fails,
        network_count,
        network_fails,
        mmds_count,
        mmds_fails,
        vsock_count,
        vsock_fails,
        pmem_count,
        pmem_fails,
        serial_count,
        serial_fails,
        hotplug_memory_count,
        hotplug_memory_fails,
    }
);

counters!(
    /// PATCH requests by route, under Firecracker's names, counted as PUT's are.
    PatchApiRequestsMetrics {
        drive_count,
        drive_fails,
        network_count,
        network_fails,
        machine_cfg_count,
        machine_cfg_fails,
        mmds_count,
        mmds_fails,
        hotplug_memory_count,
        hotplug_memory_fails,
        pmem_count,
        pmem_fails,
    }
);

counters!(
    /// Uses of deprecated API fields (`cpu_template` in `/machine-config`).
    DeprecatedApiMetrics {
        deprecated_http_api_calls,
    }
);

/// The API's counters: the server's own, and requests by method and route.
#[derive(Debug, Default)]
pub struct ApiMetrics {
    /// The server's own counters.
    pub server: ApiServerMetrics,
    /// GET requests.
    pub get: GetApiRequestsMetrics,
    /// PUT requests.
    pub put: PutApiRequestsMetrics,
    /// PATCH requests.
    pub patch: PatchApiRequestsMetrics,
    /// Deprecated fields used.
    pub deprecated: DeprecatedApiMetrics,
}

impl ApiMetrics {
    /// Counts a request for `method` and `path` under Firecracker's group and name for its
    /// route; `refused` when its body did not parse. Routes Firecracker does not count are
    /// not counted.
    pub fn count_request(&self, method: &str, path: &str, refused: bool) {
        let route = path.trim_start_matches('/').split('/').next().unwrap_or("");
        let (get, put, patch) = (&self.get, &self.put, &self.patch);
        let pair = match (method, route) {
            ("GET", "") => (&get.instance_info_count, None),
            ("GET", "machine-config") => (&get.machine_cfg_count, None),
            ("GET", "mmds") => (&get.mmds_count, None),
            ("GET", "version") => (&get.vmm_version_count, None),
            ("GET", "hotplug") => (&get.hotplug_memory_count, None),
            ("PUT", "actions") => (&put.actions_count, Some(&put.actions_fails)),
            ("PUT", "boot-source") => (&put.boot_source_count, Some(&put.boot_source_fails)),
            ("PUT", "drives") => (&put.drive_count, Some(&put.drive_fails)),
            ("PUT", "logger") => (&put.logger_count, Some(&put.logger_fails)),
            ("PUT", "machine-config") => (&put.machine_cfg_count, Some(&put.machine_cfg_fails)),
            ("PUT", "cpu-config") => (&put.cpu_cfg_count, Some(&put.cpu_cfg_fails)),
            ("PUT", "metrics") => (&put.metrics_count, Some(&put.metrics_fails)),
            ("PUT", "network-interfaces") => (&put.network_count, Some(&put.network_fails)),
            ("PUT", "mmds") => (&put.mmds_count, Some(&put.mmds_fails)),
            ("PUT", "vsock") => (&put.vsock_count, Some(&put.vsock_fails)),
            ("PUT", "pmem") => (&put.pmem_count, Some(&put.pmem_fails)),
            ("PUT", "serial") => (&put.serial_count, Some(&put.serial_fails)),
            ("PUT", "hotplug") => (&put.hotplug_memory_count, Some(&put.hotplug_memory_fails)),
            ("PATCH", "drives") => (&patch.drive_count, Some(&patch.drive_fails)),
            ("PATCH", "network-interfaces") => (&patch.network_count, Some(&patch.network_fails)),
            ("PATCH", "machine-config") => {
                (&patch.machine_cfg_count, Some(&patch.machine_cfg_fails))
            }
            ("PATCH", "mmds") => (&patch.mmds_count, Some(&patch.mmds_fails)),
            ("PATCH", "hotplug") => (
                &patch.hotplug_memory_count,
                Some(&patch.hotplug_memory_fails),
            ),
            ("PATCH", "pmem") => (&patch.pmem_count, Some(&patch.pmem_fails)),
            _ => return,
        };
        inc(pair.0);
        if let (true, Some(fails)) = (refused, pair.1) {
            inc(fails);
        }
    }
}

counters!(
    /// The vsock device, under Firecracker's names ("rx" is towards the guest, "tx" from it)
    /// and a few of Skiff's own.
    VsockMetrics {
        /// Notifications of the receive queue (the guest gave buffers).
        rx_queue_event_count,
        /// Notifications of the transmit queue.
        tx_queue_event_count,
        /// Packets delivered to the guest.
        rx_packets_count,
        /// Data bytes delivered to the guest.
        rx_bytes_count,
        /// Packets taken from the guest.
        tx_packets_count,
        /// Data bytes taken from the guest for the host.
        tx_bytes_count,
        /// Connections made, either side's.
        conns_added,
        /// Connections torn down by an error, a timeout or a protocol breach.
        conns_killed,
        /// Connections gone, however they ended.
        conns_removed,
        /// Connections refused: over the limits, a bad CONNECT line, the device not running.
        conns_refused,
        /// Guest packets dropped: a broken chain, a bad length, a wrong CID or socket type.
        tx_invalid_packets,
        /// Resets for stray guest packets dropped because too many were waiting.
        rx_rst_dropped,
        /// Receive chains too broken to fill.
        rx_invalid_chains,
        /// Socket event handling that failed.
        muxer_event_fails,
        /// Connections whose stream could not be watched.
        conn_event_fails,
        /// Transport resets that found no buffer in the event queue (sent when one comes).
        ev_queue_event_fails,
        /// Transport resets sent to the guest.
        transport_resets,
    }
);

/// Milliseconds since the Unix epoch.
pub fn utc_timestamp_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_dump_as_json() {
        let m = NetMetrics::default();
        inc(&m.rx_frames);
        add(&m.rx_bytes, 1500);
        let v = m.to_json();
        assert_eq!(v["rx_frames"], 1);
        assert_eq!(v["rx_bytes"], 1500);
        assert_eq!(v["tx_dropped"], 0);
    }
}
