//! The memory device on the event thread: at activation its queue event is registered and
//! requests queued before are taken; a queue event drains the queue.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::VirtioMem;
use crate::devices::virtio::watch_activation;

impl MutEventSubscriber for VirtioMem {
    fn init(&mut self, ops: &mut EventOps) {
        watch_activation(&self.base, ops, "virtio-mem");
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.base.activate_evt.as_raw_fd() {
            let _ = self.base.activate_evt.read();
            // Registering again after a reset and re-activation fails harmlessly.
            let _ = ops.add(Events::new(&self.base.queue_events[0], EventSet::IN));
            self.process_queue();
        } else if fd == self.base.queue_events[0].as_raw_fd() {
            let _ = self.base.queue_events[0].read();
            self.process_queue();
        }
    }
}
