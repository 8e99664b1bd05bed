//! The decapsulator's counters on a real server, in the Prometheus text format.

use anyhow::Result;

use super::decap::Attached;
use crate::metrics::Page;

/// A real server's decapsulator counters (`xlb realserver metrics`).
pub fn render_decap(iface: &str, d: &Attached) -> Result<String> {
    let mut page = Page::default();
    let mut packets = page.counter(
        "xlb_decap_packets_total",
        "Tunnelled packets the decapsulator saw, by result: decapsulated (passed on without \
         the outer header), refused (inner destination not a local VIP), malformed, fragment \
         (the last three passed untouched).",
    );
    for (which, n) in &d.counters {
        packets.add(&[("iface", iface), ("result", which.name())], *n as f64);
    }
    let mut vips = page.gauge(
        "xlb_decap_vips",
        "VIPs the decapsulator accepts tunnelled packets for.",
    );
    vips.add(&[("iface", iface)], d.vips.len() as f64);
    page.encode([packets, vips])
}
