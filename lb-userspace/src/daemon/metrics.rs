//! Prometheus metrics: `xlb daemon --metrics ADDR:PORT` serves `GET /metrics` in the text
//! exposition format. Every scrape reads the kernel's counters afresh, so the figures are
//! exactly what `xlb stats` and `xlb status` show; only the page's series (names and labels)
//! are kept from one scrape to the next (`metrics::Page`).

use std::{convert::Infallible, fmt::Write, net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use lb_common::{Counters, Global};
use tokio::net::TcpListener;

use super::{checks::Checks, sync::SyncStats};
use crate::{
    control::{Balancer, Flows},
    dataplane::ebpf_object_digest,
    health::Health,
    metrics::Page,
};

/// Binds the metrics address; done before the program is attached so a bad address changes
/// nothing.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))
}

/// Serves scrapes until the task is dropped. `render` produces the page.
pub async fn serve<F>(listener: TcpListener, render: Arc<F>)
where
    F: Fn() -> Result<String> + Send + Sync + 'static,
{
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("metrics: accept: {e}");
                continue;
            }
        };
        let render = render.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let render = render.clone();
                async move { Ok::<_, Infallible>(answer(&req, render.as_ref())) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}

fn answer<B>(req: &Request<B>, render: &dyn Fn() -> Result<String>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    };
    if req.method() != hyper::Method::GET || req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "xlb serves /metrics only\n".into());
    }
    match render() {
        Ok(text) => reply(StatusCode::OK, text),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the counters: {e:#}\n"),
        ),
    }
}

/// What a scrape reads besides the balancer.
pub struct Scrape<'a> {
    /// The attached interfaces: (name, ifindex, XDP mode).
    pub ifaces: &'a [(&'a str, u32, &'a str)],
    /// One walk of the connection table (see `control::Flows`).
    pub flows: &'a Flows,
    pub checks: &'a Checks,
    /// Connection sync's counters, while it is on.
    pub sync: Option<&'a SyncStats>,
}

/// The metrics page for the balancer's current state. Names follow Prometheus conventions:
/// `xlb_` prefix, counters end in `_total`, base units, labels `service` and `real`; the sum of
/// one metric over its labels always means something (hence drops apart from forwards).
/// `page` holds the last scrape's series, reused.
pub fn render(page: &mut Page, b: &mut Balancer, scrape: &Scrape) -> Result<String> {
    let mut svc_packets = page.counter(
        "xlb_service_packets_total",
        "Packets for the service, forwarded or dropped.",
    );
    let mut svc_bytes = page.counter(
        "xlb_service_bytes_total",
        "Bytes of the service's packets (frames as received).",
    );
    let mut svc_flows = page.counter(
        "xlb_service_new_flows_total",
        "Flows scheduled through the service's Maglev table.",
    );
    let mut real_packets = page.counter("xlb_real_packets_total", "Packets forwarded to the real.");
    let mut real_bytes = page.counter(
        "xlb_real_bytes_total",
        "Bytes forwarded to the real (frames as received).",
    );
    let mut real_flows = page.counter("xlb_real_new_flows_total", "New flows given to the real.");
    let mut real_refusals = page.counter(
        "xlb_real_refusals_total",
        "Connections the real refused (no socket on the port: its xlb_realserver program sent \
         the SYN or datagram back), each re-scheduled to another real or dropped.",
    );
    let mut real_weight = page.gauge("xlb_real_weight", "The real's configured weight.");
    let mut real_effective_weight = page.gauge(
        "xlb_real_effective_weight",
        "The weight the Maglev table uses (differs from xlb_real_weight under adaptive weights).",
    );
    let mut real_in_table = page.gauge(
        "xlb_real_in_table",
        "1 if the real receives new flows (in the Maglev table).",
    );
    let mut real_state = page.gauge(
        "xlb_real_state",
        "1, labelled with the real's current state: up, down, checking (no verdict yet), \
         draining, unresolved (next-hop MAC unknown), fallback (the sorry server).",
    );
    let mut real_up = page.gauge(
        "xlb_real_up",
        "1 if the real passes its health checks (or has none).",
    );
    let mut real_draining = page.gauge("xlb_real_draining", "1 if the operator drained the real.");
    let mut real_resolved = page.gauge(
        "xlb_real_resolved",
        "1 if the real's next-hop MAC is known.",
    );
    let mut real_active = page.gauge(
        "xlb_real_active_flows",
        "Tracked flows of the real that sent a packet recently (60 s, 2 s once closing).",
    );
    let mut check_latency = page.gauge(
        "xlb_real_check_latency_seconds",
        "How long the real's last health check took.",
    );
    let mut refusal_down_delay = page.gauge(
        "xlb_real_refusal_down_seconds",
        "How long after the data path honoured its refusal the real was last taken down.",
    );
    let mut passed = page.counter(
        "xlb_passed_packets_total",
        "Frames handed to the kernel untouched (not for a service, or not parseable).",
    );
    let mut forwarded = page.counter(
        "xlb_forwarded_packets_total",
        "Packets forwarded to a real.",
    );
    let mut dropped = page.counter(
        "xlb_dropped_packets_total",
        "Packets for a service dropped, by reason: no_backend (no usable real), malformed \
         (cannot be scheduled), too_big (IPv4 without DF too big to tunnel).",
    );
    let mut untracked_fragments = page.counter(
        "xlb_untracked_fragments_total",
        "Later fragments whose first fragment was not seen, passed to the kernel.",
    );
    let mut icmp_too_big = page.counter(
        "xlb_icmp_too_big_sent_total",
        "ICMP fragmentation-needed / ICMPv6 packet-too-big replies sent for TUN packets too \
         big to encapsulate.",
    );
    let mut icmp_errors_forwarded = page.counter(
        "xlb_icmp_errors_forwarded_total",
        "ICMP errors to a VIP (unreachable, too big, time exceeded) forwarded to the real of the \
         flow they quote, and errors about NAT flows translated and sent on.",
    );
    let mut syn_retries_moved = page.counter(
        "xlb_syn_retries_moved_total",
        "Retransmitted SYNs of flows whose real never answered, moved to another real.",
    );
    let mut echo_replies = page.counter(
        "xlb_echo_replies_total",
        "ICMP echo requests to a VIP answered by the data path.",
    );
    let mut nat_replies = page.counter(
        "xlb_nat_replies_total",
        "Replies of NAT flows from their real, translated back to the VIP and sent on.",
    );
    let mut refusals_rescheduled = page.counter(
        "xlb_refusals_rescheduled_total",
        "Refusals (a real sent a SYN or datagram back: no socket on that port) re-scheduled to \
         another real.",
    );
    let mut conn_misses = page.counter(
        "xlb_conntrack_misses_total",
        "Packets other than TCP SYNs that found no connection-table entry and were \
         scheduled through Maglev (new UDP flows, TCP flows the table lost or evicted).",
    );
    let mut conn_stale = page.counter(
        "xlb_conntrack_stale_total",
        "Tracked flows whose real went away or changed, scheduled again.",
    );
    let mut conn_entries = page.gauge(
        "xlb_conntrack_entries",
        "Flows in the connection table (active or not, until their entry is taken).",
    );
    let mut conn_capacity = page.gauge(
        "xlb_conntrack_capacity",
        "Flows the connection table is sized for (one bucket of 3 entries per flow).",
    );
    let mut attach = page.gauge(
        "xlb_xdp_attach_info",
        "The interfaces the balancer is attached to and their XDP mode (native or generic).",
    );
    let mut real_iface = page.gauge(
        "xlb_real_interface_info",
        "The attached interface the real is reached through (absent while unresolved).",
    );
    let mut sync_entries_sent = page.counter(
        "xlb_sync_entries_sent_total",
        "Connection sync: flow entries sent to peer directors (new flows and refreshes, once \
         per peer).",
    );
    let mut sync_batches_sent = page.counter(
        "xlb_sync_batches_sent_total",
        "Connection sync: datagrams sent to peer directors.",
    );
    let mut sync_send_errors = page.counter(
        "xlb_sync_send_errors_total",
        "Connection sync: datagrams the kernel would not send (buffer full, no route).",
    );
    let mut sync_batches_received = page.counter(
        "xlb_sync_batches_received_total",
        "Connection sync: datagrams taken from peers (from a peer, MAC right, sequence fresh).",
    );
    let mut sync_entries_received = page.counter(
        "xlb_sync_entries_received_total",
        "Connection sync: flow entries in the datagrams taken.",
    );
    let mut sync_entries_installed = page.counter(
        "xlb_sync_entries_installed_total",
        "Connection sync: flow entries written into the connection table.",
    );
    let mut sync_refused = page.counter(
        "xlb_sync_refused_total",
        "Connection sync: datagrams refused whole, by reason: not_peer (source is no \
         --sync-peer), bad_mac, replay (sequence not fresh), malformed; and entries refused, \
         reason unknown (a service or real this director does not have), and NAT flows \
         installed without their reply translation, reason nat_skipped (another NAT mode here, \
         the client's route leaves by an interface xlb is not on, or the reply tuple is \
         another flow's).",
    );
    let mut sync_events_lost = page.counter(
        "xlb_sync_events_lost_total",
        "Connection sync: new flows the data path could not report (its buffer full); sent \
         with the next refresh instead, if still active.",
    );
    let mut build = page.gauge(
        "xlb_build_info",
        "The xlb version and a digest of its embedded eBPF object.",
    );

    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    let services: Vec<_> = b
        .services()
        .map(|svc| {
            (
                svc,
                b.service_id(&svc).unwrap_or_default(),
                b.real_status(&svc),
            )
        })
        .collect();
    // The counters of the ids in use only: ids are given out from the lowest free one.
    let ids_below = |ids: &mut dyn Iterator<Item = u32>| ids.max().map_or(0, |id| id + 1);
    let service_counters = b
        .dataplane()
        .service_counters(ids_below(&mut services.iter().map(|s| s.1)))?;
    let backend_counters = b.dataplane().backend_counters(ids_below(
        &mut services
            .iter()
            .flat_map(|s| s.2.iter().map(|r| r.backend_id)),
    ))?;
    let counters = |all: &[Counters], id: u32| all.get(id as usize).copied().unwrap_or_default();
    // Label values written into two buffers kept for the scrape, not a String per real.
    let (mut name, mut addr) = (String::new(), String::new());
    for (svc, id, reals) in services {
        name.clear();
        write!(name, "{svc}")?;
        let service = ("service", name.as_str());
        let c = counters(&service_counters, id);
        svc_packets.add(&[service], c.packets as f64);
        svc_bytes.add(&[service], c.bytes as f64);
        svc_flows.add(&[service], c.new_flows as f64);
        for r in reals {
            addr.clear();
            write!(addr, "{}", r.addr)?;
            let labels = [("real", addr.as_str()), service];
            let c = counters(&backend_counters, r.backend_id);
            real_packets.add(&labels, c.packets as f64);
            real_bytes.add(&labels, c.bytes as f64);
            real_flows.add(&labels, c.new_flows as f64);
            real_refusals.add(&labels, c.refusals as f64);
            real_weight.add(&labels, r.weight.into());
            real_effective_weight.add(&labels, r.effective_weight.into());
            real_in_table.add(&labels, flag(r.in_table));
            real_state.add(&[labels[0], labels[1], ("state", r.state().name())], 1.0);
            real_up.add(&labels, flag(r.health == Health::Up));
            real_draining.add(&labels, flag(r.draining));
            real_resolved.add(&labels, flag(r.mac.is_some()));
            let iface = scrape.ifaces.iter().find(|i| Some(i.1) == r.ifindex);
            if let Some((name, _, _)) = iface {
                real_iface.add(&[labels[0], labels[1], ("iface", name)], 1.0);
            }
            let active = scrape.flows.active.get(&r.backend_id).copied().unwrap_or(0);
            real_active.add(&labels, active as f64);
            if let Some(latency) = scrape.checks.last_latency(&svc, r.addr) {
                check_latency.add(&labels, latency);
            }
            if let Some(delay) = scrape.checks.refusal_down_delay(&svc, r.addr) {
                refusal_down_delay.add(&labels, delay);
            }
        }
    }
    for g in Global::ALL {
        let value = b.dataplane().global_counter(g)? as f64;
        match g {
            Global::Passed => passed.add(&[], value),
            Global::Forwarded => forwarded.add(&[], value),
            Global::DropNoBackend => dropped.add(&[("reason", "no_backend")], value),
            Global::DropMalformed => dropped.add(&[("reason", "malformed")], value),
            Global::DropTooBig => dropped.add(&[("reason", "too_big")], value),
            Global::FragUntracked => untracked_fragments.add(&[], value),
            Global::IcmpTooBigSent => icmp_too_big.add(&[], value),
            Global::IcmpErrorForwarded => icmp_errors_forwarded.add(&[], value),
            Global::RefusalRescheduled => refusals_rescheduled.add(&[], value),
            Global::SynRetriesMoved => syn_retries_moved.add(&[], value),
            Global::EchoReplied => echo_replies.add(&[], value),
            Global::NatReplied => nat_replies.add(&[], value),
            Global::DropRefusalBounced => dropped.add(&[("reason", "refusal_bounced")], value),
            Global::DropRefusalForged => dropped.add(&[("reason", "refusal_forged")], value),
            Global::DropSnatExhausted => dropped.add(&[("reason", "snat_exhausted")], value),
            Global::ConnMiss => conn_misses.add(&[], value),
            Global::ConnStale => conn_stale.add(&[], value),
            Global::SyncEventsLost => {
                if scrape.sync.is_some() {
                    sync_events_lost.add(&[], value)
                }
            }
        }
    }
    if let Some(s) = scrape.sync {
        let get =
            |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed) as f64;
        sync_entries_sent.add(&[], get(&s.entries_sent));
        sync_batches_sent.add(&[], get(&s.batches_sent));
        sync_send_errors.add(&[], get(&s.send_errors));
        sync_batches_received.add(&[], get(&s.batches_received));
        sync_entries_received.add(&[], get(&s.entries_received));
        sync_entries_installed.add(&[], get(&s.entries_installed));
        for (why, count) in crate::sync::Refusal::ALL.iter().zip(&s.refused) {
            sync_refused.add(&[("reason", why.name())], get(count));
        }
        sync_refused.add(&[("reason", "unknown")], get(&s.entries_unknown));
        sync_refused.add(&[("reason", "nat_skipped")], get(&s.nat_skipped));
    }
    conn_entries.add(&[], scrape.flows.entries as f64);
    conn_capacity.add(&[], b.dataplane().conn_capacity()?.into());
    for (name, _, mode) in scrape.ifaces {
        attach.add(&[("iface", name), ("mode", mode)], 1.0);
    }
    build.add(
        &[
            ("ebpf_object", &ebpf_object_digest()),
            ("version", env!("CARGO_PKG_VERSION")),
        ],
        1.0,
    );

    page.encode([
        svc_packets,
        svc_bytes,
        svc_flows,
        real_packets,
        real_bytes,
        real_flows,
        real_refusals,
        real_weight,
        real_effective_weight,
        real_in_table,
        real_state,
        real_up,
        real_draining,
        real_resolved,
        real_iface,
        real_active,
        check_latency,
        refusal_down_delay,
        passed,
        forwarded,
        dropped,
        untracked_fragments,
        icmp_too_big,
        icmp_errors_forwarded,
        refusals_rescheduled,
        syn_retries_moved,
        echo_replies,
        nat_replies,
        conn_misses,
        conn_stale,
        conn_entries,
        conn_capacity,
        sync_entries_sent,
        sync_batches_sent,
        sync_send_errors,
        sync_batches_received,
        sync_entries_received,
        sync_entries_installed,
        sync_refused,
        sync_events_lost,
        attach,
        build,
    ])
}
