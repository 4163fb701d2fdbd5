//! The block device on the event thread: activation registers the queue event and the rate
//! limiter's timer; queue events drain the queue, and so does the end of a throttle.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::warn;
use vmm_sys_util::epoll::EventSet;

use super::device::Block;

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.base.activate_evt, EventSet::IN)) {
            warn!("virtio-blk: cannot watch the activation event: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.base.activate_evt.as_raw_fd() {
            let _ = self.base.activate_evt.read();
            // Registering again after a reset and re-activation fails harmlessly.
            let _ = ops.add(Events::new(self.queue_event(), EventSet::IN));
            // Watched even without limits: a PATCH may add them.
            let _ = ops.add(Events::new(&self.rate_limiter, EventSet::IN));
            // Requests queued before activation was seen.
            self.process_queue();
        } else if fd == self.queue_event().as_raw_fd() {
            let _ = self.queue_event().read();
            self.process_queue();
        } else if fd == self.rate_limiter.as_raw_fd() && self.rate_limiter.event_handler() {
            self.process_queue();
        }
    }
}
