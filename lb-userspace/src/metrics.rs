//! Prometheus metrics: `xlb daemon --metrics ADDR:PORT` serves `GET /metrics` in the text
//! exposition format. Every scrape reads the kernel's counters afresh; nothing is cached, so
//! the figures are exactly what `xlb stats` and `xlb status` show.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use lb_common::Global;
use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;

use crate::{
    balancer::{Balancer, RealStatus},
    checks::Checks,
    daemon::Flows,
    health::Health,
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

const NO_LABELS: &[&str] = &[];

/// What a scrape reads besides the balancer.
pub struct Scrape<'a> {
    pub iface: &'a str,
    pub attach_mode: &'a str,
    /// One walk of the connection table (see `daemon::Flows`).
    pub flows: &'a Flows,
    pub checks: &'a Checks,
}

/// The metrics page for the balancer's current state. Names follow Prometheus conventions:
/// `xlb_` prefix, counters end in `_total`, base units, labels `service` and `real`; the sum of
/// one metric over its labels always means something (hence drops apart from forwards).
pub fn render(b: &mut Balancer, scrape: &Scrape) -> Result<String> {
    let registry = Registry::new();
    let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec> {
        let c = IntCounterVec::new(Opts::new(name, help), labels)?;
        registry.register(Box::new(c.clone()))?;
        Ok(c)
    };
    let gauge = |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec> {
        let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
        registry.register(Box::new(g.clone()))?;
        Ok(g)
    };
    let svc_labels = &["service"];
    let real_labels = &["service", "real"];
    let svc_packets = counter(
        "xlb_service_packets_total",
        "Packets for the service, forwarded or dropped.",
        svc_labels,
    )?;
    let svc_bytes = counter(
        "xlb_service_bytes_total",
        "Bytes of the service's packets (frames as received).",
        svc_labels,
    )?;
    let svc_flows = counter(
        "xlb_service_new_flows_total",
        "Flows scheduled through the service's Maglev table.",
        svc_labels,
    )?;
    let real_packets = counter(
        "xlb_real_packets_total",
        "Packets forwarded to the real.",
        real_labels,
    )?;
    let real_bytes = counter(
        "xlb_real_bytes_total",
        "Bytes forwarded to the real (frames as received).",
        real_labels,
    )?;
    let real_flows = counter(
        "xlb_real_new_flows_total",
        "New flows given to the real.",
        real_labels,
    )?;
    let real_weight = gauge(
        "xlb_real_weight",
        "The real's configured weight.",
        real_labels,
    )?;
    let real_effective_weight = gauge(
        "xlb_real_effective_weight",
        "The weight the Maglev table uses (differs from xlb_real_weight under adaptive weights).",
        real_labels,
    )?;
    let real_in_table = gauge(
        "xlb_real_in_table",
        "1 if the real receives new flows (in the Maglev table).",
        real_labels,
    )?;
    let real_state = gauge(
        "xlb_real_state",
        "1 for the real's current state, 0 for the others: up, down, checking (no verdict \
         yet), draining, unresolved (next-hop MAC unknown), fallback (the sorry server).",
        &["service", "real", "state"],
    )?;
    let real_up = gauge(
        "xlb_real_up",
        "1 if the real passes its health checks (or has none).",
        real_labels,
    )?;
    let real_draining = gauge(
        "xlb_real_draining",
        "1 if the operator drained the real.",
        real_labels,
    )?;
    let real_resolved = gauge(
        "xlb_real_resolved",
        "1 if the real's next-hop MAC is known.",
        real_labels,
    )?;
    let real_active = gauge(
        "xlb_real_active_flows",
        "Tracked flows of the real that sent a packet recently (60 s, 2 s once closing).",
        real_labels,
    )?;
    let check_latency = {
        let g = GaugeVec::new(
            Opts::new(
                "xlb_real_check_latency_seconds",
                "How long the real's last health check took.",
            ),
            real_labels,
        )?;
        registry.register(Box::new(g.clone()))?;
        g
    };
    let passed = counter(
        "xlb_passed_packets_total",
        "Frames handed to the kernel untouched (not for a service, or not parseable).",
        NO_LABELS,
    )?;
    let forwarded = counter(
        "xlb_forwarded_packets_total",
        "Packets forwarded to a real.",
        NO_LABELS,
    )?;
    let dropped = counter(
        "xlb_dropped_packets_total",
        "Packets for a service dropped, by reason: no_backend (no usable real), malformed \
         (cannot be scheduled), too_big (IPv4 without DF too big to tunnel).",
        &["reason"],
    )?;
    let untracked_fragments = counter(
        "xlb_untracked_fragments_total",
        "Later fragments whose first fragment was not seen, passed to the kernel.",
        NO_LABELS,
    )?;
    let icmp_too_big = counter(
        "xlb_icmp_too_big_sent_total",
        "ICMP fragmentation-needed / ICMPv6 packet-too-big replies sent for TUN packets too \
         big to encapsulate.",
        NO_LABELS,
    )?;
    let conn_misses = counter(
        "xlb_conntrack_misses_total",
        "Packets other than TCP SYNs that found no connection-table entry and were \
         scheduled through Maglev (new UDP flows, TCP flows the table lost or evicted).",
        NO_LABELS,
    )?;
    let conn_stale = counter(
        "xlb_conntrack_stale_total",
        "Tracked flows whose real went away or changed, scheduled again.",
        NO_LABELS,
    )?;
    let conn_entries = gauge(
        "xlb_conntrack_entries",
        "Flows in the connection table (active or not, until evicted).",
        NO_LABELS,
    )?;
    let conn_capacity = gauge(
        "xlb_conntrack_capacity",
        "Flows the connection table holds before evicting the least recently used.",
        NO_LABELS,
    )?;
    let attach = gauge(
        "xlb_xdp_attach_info",
        "The interface the balancer is attached to and its XDP mode (native or generic).",
        &["iface", "mode"],
    )?;
    let build = gauge(
        "xlb_build_info",
        "The xlb version and a digest of its embedded eBPF object.",
        &["version", "ebpf_object"],
    )?;

    for svc in b.config().services {
        let name = svc.service.to_string();
        let id = b.service_id(&svc.service).unwrap_or_default();
        let c = b.dataplane().service_counters(id)?;
        svc_packets.with_label_values(&[&name]).inc_by(c.packets);
        svc_bytes.with_label_values(&[&name]).inc_by(c.bytes);
        svc_flows.with_label_values(&[&name]).inc_by(c.new_flows);
        for r in b.real_status(&svc.service) {
            let addr = r.addr.to_string();
            let labels = [name.as_str(), addr.as_str()];
            let c = b.dataplane().backend_counters(r.backend_id)?;
            real_packets.with_label_values(&labels).inc_by(c.packets);
            real_bytes.with_label_values(&labels).inc_by(c.bytes);
            real_flows.with_label_values(&labels).inc_by(c.new_flows);
            real_weight.with_label_values(&labels).set(r.weight.into());
            real_effective_weight
                .with_label_values(&labels)
                .set(r.effective_weight.into());
            real_in_table
                .with_label_values(&labels)
                .set(r.in_table.into());
            let current = r.state();
            for state in RealStatus::STATES {
                real_state
                    .with_label_values(&[name.as_str(), addr.as_str(), state])
                    .set((state == current).into());
            }
            real_up
                .with_label_values(&labels)
                .set((r.health == Health::Up).into());
            real_draining
                .with_label_values(&labels)
                .set(r.draining.into());
            real_resolved
                .with_label_values(&labels)
                .set(r.mac.is_some().into());
            let active = scrape.flows.active.get(&r.backend_id).copied().unwrap_or(0);
            real_active
                .with_label_values(&labels)
                .set(active.try_into().unwrap_or(i64::MAX));
            if let Some(latency) = scrape.checks.last_latency(&svc.service, r.addr) {
                check_latency.with_label_values(&labels).set(latency);
            }
        }
    }
    for g in Global::ALL {
        let value = b.dataplane().global_counter(g)?;
        match g {
            Global::Passed => passed.with_label_values(NO_LABELS),
            Global::Forwarded => forwarded.with_label_values(NO_LABELS),
            Global::DropNoBackend => dropped.with_label_values(&["no_backend"]),
            Global::DropMalformed => dropped.with_label_values(&["malformed"]),
            Global::DropTooBig => dropped.with_label_values(&["too_big"]),
            Global::FragUntracked => untracked_fragments.with_label_values(NO_LABELS),
            Global::IcmpTooBigSent => icmp_too_big.with_label_values(NO_LABELS),
            Global::ConnMiss => conn_misses.with_label_values(NO_LABELS),
            Global::ConnStale => conn_stale.with_label_values(NO_LABELS),
        }
        .inc_by(value);
    }
    conn_entries
        .with_label_values(NO_LABELS)
        .set(scrape.flows.entries.try_into().unwrap_or(i64::MAX));
    conn_capacity
        .with_label_values(NO_LABELS)
        .set(b.dataplane().conn_capacity()?.into());
    attach
        .with_label_values(&[scrape.iface, scrape.attach_mode])
        .set(1);
    build
        .with_label_values(&[env!("CARGO_PKG_VERSION"), &ebpf_object_digest()])
        .set(1);

    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    Ok(String::from_utf8(out)?)
}

/// A short digest of the embedded eBPF object (FNV-1a, 64 bits): tells which data path a
/// binary carries, so an upgrade that changes the program shows in `xlb_build_info`.
pub fn ebpf_object_digest() -> String {
    static DIGEST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DIGEST
        .get_or_init(|| {
            let hash = crate::dataplane::EBPF_OBJECT
                .iter()
                .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
                    (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
                });
            format!("{hash:016x}")
        })
        .clone()
}
