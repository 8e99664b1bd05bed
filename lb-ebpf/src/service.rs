//! Service lookup: (VIP, port, protocol), then (VIP, 0, protocol) for all-ports services.

use lb_common::{ServiceKey, ServiceValue};

use crate::{
    maps::{CONFIG, SERVICES},
    parse::Packet,
};

#[inline(always)]
pub fn lookup(pkt: &Packet, dport: u16) -> Option<ServiceValue> {
    let mut key = ServiceKey {
        addr: pkt.dst,
        port: dport,
        proto: pkt.proto,
        family: pkt.family,
    };
    if let Some(svc) = SERVICES.get_ptr(&key) {
        // SAFETY: a hash map value; the control plane replaces services whole.
        return Some(unsafe { *svc });
    }
    if dport == 0 || !CONFIG.get(0).is_some_and(|c| c.all_ports_services != 0) {
        return None;
    }
    key.port = 0;
    SERVICES.get_ptr(&key).map(|svc| unsafe { *svc })
}
