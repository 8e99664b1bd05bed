//! Neighbour sync: keeps each real's link in the data path (the attached interface the kernel
//! routes it through, and its next hop's MAC) equal to what the kernel's routes and neighbour
//! table say, and makes the kernel resolve next hops it lacks.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use super::Shared;
use crate::{
    config::Mode,
    control::Link,
    netlink::{Neighbours, format_mac, trigger_resolution},
};

/// Finds each real's next hop and the interface to it from the kernel's route (TUN: the router
/// or the real; DR: the real itself, which must be on-link), reads the neighbour table, and
/// reprograms reals whose link appeared, changed or went. A next hop that leaves by an
/// interface the balancer is not attached to is unusable.
pub(super) async fn refresh(shared: &Arc<Mutex<Shared>>, neighbours: &Neighbours) {
    let table = match neighbours.resolved().await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("reading the neighbour table: {e:#}");
            return;
        }
    };
    let (reals, attached) = {
        let guard = shared.lock().unwrap();
        let attached: Vec<u32> = guard.ifaces.iter().map(|i| i.index).collect();
        (guard.balancer.reals_by_mode(), attached)
    };
    // Route lookups are netlink round trips: done without holding the lock.
    let mut hops = HashMap::new();
    for (addr, mode) in reals {
        let hop = match neighbours.next_hop(addr).await {
            Ok(Some((_, oif))) if !attached.contains(&oif) => NextHop::OtherInterface,
            Ok(Some((hop, _))) if mode == Mode::Dr && hop != addr => NextHop::NotOnLink,
            Ok(Some((hop, ifindex))) => NextHop::Via { hop, ifindex },
            Ok(None) | Err(_) => NextHop::NoRoute,
        };
        hops.insert(addr, hop);
    }
    let mut guard = shared.lock().unwrap();
    for (&addr, &hop) in &hops {
        if guard.next_hops.get(&addr) != Some(&hop) {
            match hop {
                NextHop::OtherInterface => tracing::warn!(
                    real = %addr,
                    "the route to this real leaves by an interface xlb is not attached to; not forwarding to it"
                ),
                NextHop::NotOnLink => tracing::warn!(
                    real = %addr,
                    "this DR real is not on-link on an attached interface (its route has a gateway); not forwarding to it"
                ),
                NextHop::NoRoute => tracing::warn!(real = %addr, "no route to this real"),
                NextHop::Via { .. } => {}
            }
        }
        let link = match hop {
            NextHop::Via { hop, ifindex } => {
                table.get(&(ifindex, hop)).map(|&mac| Link { ifindex, mac })
            }
            _ => None,
        };
        match guard.balancer.set_link(addr, link) {
            Ok(true) => match (link, hop) {
                (Some(l), NextHop::Via { hop, .. }) => {
                    let iface = guard.iface_name(l.ifindex);
                    tracing::info!(real = %addr, next_hop = %hop, mac = %format_mac(&l.mac), iface, "next hop resolved")
                }
                _ => tracing::warn!(real = %addr, "next hop unresolved; not forwarding to it"),
            },
            Ok(false) => {}
            Err(e) => {
                tracing::error!(real = %addr, "reprogramming after a neighbour change: {e:#}")
            }
        }
        if link.is_none() && matches!(hop, NextHop::Via { .. }) {
            // Sending towards the real makes the kernel resolve whatever its next hop is.
            trigger_resolution(addr);
        }
    }
    guard.next_hops = hops;
    guard.announce();
}

/// How a real is reached, as last looked up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NextHop {
    /// Through `hop` (the real itself when on-link), out of the attached interface `ifindex`.
    Via {
        hop: IpAddr,
        ifindex: u32,
    },
    OtherInterface,
    NotOnLink,
    NoRoute,
}

impl std::fmt::Display for NextHop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NextHop::Via { hop, .. } => write!(f, "{hop}"),
            NextHop::OtherInterface => f.write_str("via an interface xlb is not attached to"),
            NextHop::NotOnLink => f.write_str("not on-link (DR)"),
            NextHop::NoRoute => f.write_str("no route"),
        }
    }
}
