//! The vsock device on the event thread: activation registers the three queue events, the
//! host side's socket events and its deadline timer, sends a restored guest its transport
//! reset and takes what was queued before; every event then moves packets both ways, each
//! direction bounded per wake-up.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::{Vsock, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::watch_activation;
use crate::metrics::inc;

impl Vsock {
    /// After anything moved: the guest gets what it is owed, and a held-back transmit packet
    /// is tried again.
    fn move_packets(&mut self) {
        self.process_rx();
        self.resume_tx();
        self.process_rx();
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        watch_activation(&self.base, ops, "virtio-vsock");
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let queue = |i: usize| self.base.queue_events[i].as_raw_fd();
        if fd == self.base.activate_evt.as_raw_fd() {
            let _ = self.base.activate_evt.read();
            // Registering again after a reset and re-activation fails harmlessly.
            for evt in &self.base.queue_events {
                let _ = ops.add(Events::new(evt, EventSet::IN));
            }
            let _ = ops.add(Events::new_raw(self.muxer.epoll_fd(), EventSet::IN));
            let _ = ops.add(Events::new_raw(self.muxer.timer_fd(), EventSet::IN));
            if self.reset_pending() {
                self.send_transport_reset();
            }
            self.process_tx();
            self.move_packets();
        } else if fd == queue(TX_QUEUE) {
            let _ = self.base.queue_events[TX_QUEUE].read();
            inc(&self.metrics().tx_queue_event_count);
            self.process_tx();
            self.move_packets();
        } else if fd == queue(RX_QUEUE) {
            let _ = self.base.queue_events[RX_QUEUE].read();
            inc(&self.metrics().rx_queue_event_count);
            self.move_packets();
        } else if fd == queue(EVENT_QUEUE) {
            let _ = self.base.queue_events[EVENT_QUEUE].read();
            self.process_event_queue();
            self.move_packets();
        } else if fd == self.muxer.epoll_fd() {
            self.muxer.process_events();
            self.move_packets();
        } else if fd == self.muxer.timer_fd() {
            self.muxer.sweep();
            self.move_packets();
        }
    }
}
