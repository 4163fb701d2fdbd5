//! The block device on the event thread: see [`process_single_queue_event`]; with the Async
//! engine, its ring's completion eventfd too.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::Block;
use crate::devices::virtio::{
    process_single_queue_event, watch_activation, SingleQueueDevice, VirtioBase,
};
use crate::rate_limiter::RateLimiter;

impl SingleQueueDevice for Block {
    fn virtio_base(&self) -> &VirtioBase {
        &self.base
    }

    fn limiter(&mut self) -> &mut RateLimiter {
        &mut self.rate_limiter
    }

    fn process_queue(&mut self) {
        Block::process_queue(self);
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        watch_activation(&self.base, ops, "virtio-blk");
        if let Some(evt) = self.completion_evt() {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                log::warn!("virtio-blk: cannot watch the io_uring completions: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let completions = self.completion_evt().map(AsRawFd::as_raw_fd);
        if completions == Some(events.fd()) {
            self.process_completions();
        } else {
            process_single_queue_event(self, events, ops);
        }
    }
}
