//! Passive detection: the data path writes one `RefusalEvent` to the `REFUSALS` ring buffer for
//! each refusal it honours (a real's xlb_realserver program sent a SYN or datagram back: no
//! socket on that port). This task wakes on the buffer's fd (epoll through tokio's AsyncFd, as
//! the data path log does), so the refusing real is taken down within a scheduler wake-up of
//! the first refusal, not a check window later. Polling the per-backend counters instead would
//! cost a walk of every backend's per-CPU slots each period and add up to a period of delay.

use std::sync::{Arc, Mutex};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use lb_common::RefusalEvent;
use tokio::io::unix::AsyncFd;

use super::Shared;

pub fn watch(
    ring: RingBuf<MapData>,
    shared: Arc<Mutex<Shared>>,
) -> Result<tokio::task::JoinHandle<()>> {
    // SAFETY: the ring buffer owns its map's fd, which stays open and the same until the
    // AsyncFd (which owns the ring buffer) is dropped.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("watching the refusal buffer: {e}"))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = ring.readable_mut().await else {
                return;
            };
            let mut events = Vec::new();
            {
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if item.len() >= std::mem::size_of::<RefusalEvent>() {
                        // SAFETY: the data path writes whole RefusalEvents; read unaligned.
                        events.push(unsafe {
                            (item.as_ptr() as *const RefusalEvent).read_unaligned()
                        });
                    }
                }
            }
            guard.clear_ready();
            if events.is_empty() {
                continue;
            }
            let mut s = shared.lock().unwrap();
            let Shared {
                checks, balancer, ..
            } = &mut *s;
            for e in events {
                checks.refused(balancer, e.backend_id, e.generation);
            }
            s.announce();
        }
    }))
}
