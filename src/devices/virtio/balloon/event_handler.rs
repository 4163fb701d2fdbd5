//! The balloon on the event thread: activation registers every queue's event and, with
//! statistics on, the statistics timer (armed here: the activation itself runs on a vCPU
//! thread); each queue event drains its queue, the timer hands the statistics buffer back.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::{Balloon, QueueRole};
use crate::devices::virtio::watch_activation;

impl MutEventSubscriber for Balloon {
    fn init(&mut self, ops: &mut EventOps) {
        watch_activation(&self.base, ops, "virtio-balloon");
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.base.activate_evt.as_raw_fd() {
            let _ = self.base.activate_evt.read();
            // Registering again after a reset and re-activation fails harmlessly.
            for evt in &self.base.queue_events {
                let _ = ops.add(Events::new(evt, EventSet::IN));
            }
            if self.stats_enabled() {
                let _ = ops.add(Events::new(&self.stats_timer, EventSet::IN));
                self.start_stats_timer();
            }
            self.process_all();
        } else if fd == self.stats_timer.as_raw_fd() {
            self.process_stats_timer();
        } else if let Some(index) =
            (self.base.queue_events.iter()).position(|e| e.as_raw_fd() == fd)
        {
            let _ = self.base.queue_events[index].read();
            match self.queue_role(index) {
                QueueRole::Inflate => self.process_inflate(),
                QueueRole::Deflate => self.process_deflate(),
                QueueRole::Stats => self.process_stats(),
                QueueRole::Hint => self.process_hinting(),
                QueueRole::Report => self.process_reporting(),
            }
        }
    }
}
