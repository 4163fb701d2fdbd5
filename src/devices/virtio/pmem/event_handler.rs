//! The pmem device on the event thread: see [`process_single_queue_event`].

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::device::Pmem;
use crate::devices::virtio::{
    process_single_queue_event, watch_activation, SingleQueueDevice, VirtioBase,
};
use crate::rate_limiter::RateLimiter;

impl SingleQueueDevice for Pmem {
    fn virtio_base(&self) -> &VirtioBase {
        &self.base
    }

    fn limiter(&mut self) -> &mut RateLimiter {
        &mut self.rate_limiter
    }

    fn process_queue(&mut self) {
        Pmem::process_queue(self);
    }
}

impl MutEventSubscriber for Pmem {
    fn init(&mut self, ops: &mut EventOps) {
        watch_activation(&self.base, ops, "virtio-pmem");
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        process_single_queue_event(self, events, ops);
    }
}
