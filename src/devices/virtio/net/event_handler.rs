//! The network device on the event thread: activation registers the queue events, the TAP and
//! the rate limiters' timers; TAP readiness drives receive, the TX queue event drives transmit,
//! the RX queue event resumes receive after the guest ran out of buffers, and the end of a
//! throttle resumes whichever direction it held back. Frames the guest sent the metadata
//! service make it answer: receive runs after transmit whenever it has something.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::warn;
use vmm_sys_util::epoll::EventSet;

use super::device::{Net, RX_QUEUE, TX_QUEUE};

impl Net {
    /// Receives what it can, then watches the TAP only while there is somewhere to put a frame:
    /// a guest without receive buffers leaves frames queued in the kernel (back-pressure) rather
    /// than having them dropped, and the event loop never spins on a readable TAP.
    fn receive_and_watch(&mut self, ops: &mut EventOps) {
        let watch = self.process_rx();
        if watch == self.tap_watched {
            return;
        }
        let events = Events::new(self.tap(), EventSet::IN);
        let result = if watch {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match result {
            Ok(()) => self.tap_watched = watch,
            Err(e) => warn!("virtio-net: cannot change the TAP's event registration: {e}"),
        }
    }

    /// Transmits, then receives when the metadata service has answers for the guest.
    fn transmit(&mut self, ops: &mut EventOps) {
        self.process_tx();
        if self.mmds_has_output() {
            self.receive_and_watch(ops);
        }
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.base.activate_evt, EventSet::IN)) {
            warn!("virtio-net: cannot watch the activation event: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.base.activate_evt.as_raw_fd() {
            let _ = self.base.activate_evt.read();
            // Registering again after a reset and re-activation fails harmlessly.
            let _ = ops.add(Events::new(&self.base.queue_events[RX_QUEUE], EventSet::IN));
            let _ = ops.add(Events::new(&self.base.queue_events[TX_QUEUE], EventSet::IN));
            // Watched even without limits: a PATCH may add them.
            let _ = ops.add(Events::new(&self.rx_rate_limiter, EventSet::IN));
            let _ = ops.add(Events::new(&self.tx_rate_limiter, EventSet::IN));
            self.process_tx();
            self.receive_and_watch(ops);
        } else if fd == self.base.queue_events[TX_QUEUE].as_raw_fd() {
            let _ = self.base.queue_events[TX_QUEUE].read();
            self.transmit(ops);
        } else if fd == self.base.queue_events[RX_QUEUE].as_raw_fd() {
            let _ = self.base.queue_events[RX_QUEUE].read();
            self.receive_and_watch(ops);
        } else if fd == self.tap().as_raw_fd() {
            self.receive_and_watch(ops);
        } else if fd == self.tx_rate_limiter.as_raw_fd() {
            if self.tx_rate_limiter.event_handler() {
                self.transmit(ops);
            }
        } else if fd == self.rx_rate_limiter.as_raw_fd() && self.rx_rate_limiter.event_handler() {
            self.receive_and_watch(ops);
        }
    }
}
