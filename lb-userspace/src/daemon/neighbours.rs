//! Neighbour sync: keeps each real's MAC in the data path equal to what the kernel's
//! neighbour table says of its next hop, and makes the kernel resolve next hops it lacks.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use super::Shared;
use crate::{
    config::Mode,
    netlink::{Neighbours, format_mac, trigger_resolution},
};

/// Finds each real's next hop (TUN: the kernel's route to it; DR: the real itself, which must
/// be on-link), reads the neighbour table, and reprograms reals whose MAC appeared, changed or
/// went. A next hop that leaves by another interface is unusable: xlb sends out of its own.
pub(super) async fn refresh(shared: &Arc<Mutex<Shared>>, neighbours: &Neighbours, ifindex: u32) {
    let table = match neighbours.resolved(ifindex).await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("reading the neighbour table: {e:#}");
            return;
        }
    };
    let reals = shared.lock().unwrap().balancer.reals_by_mode();
    // Route lookups are netlink round trips: done without holding the lock.
    let mut hops = HashMap::new();
    for (addr, mode) in reals {
        let hop = match mode {
            Mode::Dr => NextHop::Via(addr),
            Mode::Tun => match neighbours.next_hop(addr).await {
                Ok(Some((hop, oif))) if oif == ifindex => NextHop::Via(hop),
                Ok(Some(_)) => NextHop::OtherInterface,
                Ok(None) | Err(_) => NextHop::NoRoute,
            },
        };
        hops.insert(addr, hop);
    }
    let mut guard = shared.lock().unwrap();
    for (&addr, &hop) in &hops {
        if guard.next_hops.get(&addr) != Some(&hop) {
            match hop {
                NextHop::OtherInterface => tracing::warn!(
                    real = %addr,
                    "the route to this real leaves by another interface; not forwarding to it"
                ),
                NextHop::NoRoute => tracing::warn!(real = %addr, "no route to this real"),
                NextHop::Via(_) => {}
            }
        }
        let mac = match hop {
            NextHop::Via(h) => table.get(&h).copied(),
            _ => None,
        };
        match guard.balancer.set_mac(addr, mac) {
            Ok(true) => match mac {
                Some(m) => {
                    tracing::info!(real = %addr, next_hop = %hop, mac = %format_mac(&m), "next hop resolved")
                }
                None => tracing::warn!(real = %addr, "next hop unresolved; not forwarding to it"),
            },
            Ok(false) => {}
            Err(e) => {
                tracing::error!(real = %addr, "reprogramming after a neighbour change: {e:#}")
            }
        }
        if mac.is_none() && matches!(hop, NextHop::Via(_)) {
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
    Via(IpAddr),
    OtherInterface,
    NoRoute,
}

impl std::fmt::Display for NextHop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NextHop::Via(a) => write!(f, "{a}"),
            NextHop::OtherInterface => f.write_str("via another interface"),
            NextHop::NoRoute => f.write_str("no route"),
        }
    }
}
