//! Passive detection: the data path writes one `RefusalEvent` to the `REFUSALS` ring buffer for
//! each refusal it honours (a real's xlb_realserver program sent a SYN or datagram back: no
//! socket on that port). This task wakes on the buffer's fd (`on_readable`, epoll through
//! tokio's AsyncFd, as for the data path log), so the refusing real is taken down within a
//! scheduler wake-up of the first refusal, not a check window later. Polling the per-backend counters instead would
//! cost a walk of every backend's per-CPU slots each period and add up to a period of delay.

use std::sync::{Arc, Mutex};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use lb_common::RefusalEvent;

use super::Shared;
use crate::dataplane::ring_records;

pub fn watch(
    ring: RingBuf<MapData>,
    shared: Arc<Mutex<Shared>>,
) -> Result<tokio::task::JoinHandle<()>> {
    super::on_readable(ring, "the refusal buffer", move |ring| {
        let events = ring_records::<RefusalEvent>(ring);
        if events.is_empty() {
            return;
        }
        let mut s = shared.lock().unwrap();
        let Shared {
            checks, balancer, ..
        } = &mut *s;
        for e in events {
            checks.refused(balancer, e.backend_id, e.generation, e.refused_at_ns);
        }
        s.announce();
    })
}
