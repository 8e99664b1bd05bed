//! Prometheus metrics: `xlb daemon --metrics ADDR:PORT` serves `GET /metrics` in the text
//! exposition format. Every scrape reads the kernel's counters afresh; nothing is cached, so
//! the figures are exactly what `xlb stats` and `xlb status` show.

use std::{collections::HashMap, convert::Infallible, net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;

use crate::balancer::Balancer;

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

/// The metrics page for the balancer's current state. `active_flows` maps backend ids to
/// flows seen recently (see `daemon::ACTIVE_FLOW_IDLE_S`).
pub fn render(b: &mut Balancer, active_flows: &HashMap<u32, u64>) -> Result<String> {
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
        "Packets forwarded or dropped for the service.",
        svc_labels,
    )?;
    let svc_bytes = counter(
        "xlb_service_bytes_total",
        "Bytes of the service's packets (as received).",
        svc_labels,
    )?;
    let svc_flows = counter(
        "xlb_service_new_flows_total",
        "Flows scheduled through the Maglev table.",
        svc_labels,
    )?;
    let real_packets = counter(
        "xlb_real_packets_total",
        "Packets forwarded to the real.",
        real_labels,
    )?;
    let real_bytes = counter(
        "xlb_real_bytes_total",
        "Bytes forwarded to the real.",
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
    let real_in_table = gauge(
        "xlb_real_in_table",
        "1 if the real receives new flows (weight above 0 and MAC resolved).",
        real_labels,
    )?;
    let real_effective_weight = gauge(
        "xlb_real_effective_weight",
        "The weight the Maglev table uses (differs from xlb_real_weight under adaptive weights).",
        real_labels,
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
        "Tracked flows of the real that sent a packet recently.",
        real_labels,
    )?;
    let events = counter(
        "xlb_datapath_events_total",
        "What the XDP program counted: packets passed, forwarded and dropped (by reason), \
         connection-table misses and stale entries.",
        &["event"],
    )?;

    for svc in b.config().services {
        let name = svc.service.to_string();
        let id = b.service_id(&svc.service).unwrap_or_default();
        let c = b.dataplane().service_counters(id)?;
        svc_packets.with_label_values(&[&name]).inc_by(c.packets);
        svc_bytes.with_label_values(&[&name]).inc_by(c.bytes);
        svc_flows.with_label_values(&[&name]).inc_by(c.new_flows);
        for r in b.real_status(&svc.service) {
            let labels = [name.as_str(), &r.addr.to_string()];
            let c = b.dataplane().backend_counters(r.backend_id)?;
            real_packets.with_label_values(&labels).inc_by(c.packets);
            real_bytes.with_label_values(&labels).inc_by(c.bytes);
            real_flows.with_label_values(&labels).inc_by(c.new_flows);
            real_weight.with_label_values(&labels).set(r.weight.into());
            real_in_table
                .with_label_values(&labels)
                .set(r.in_table.into());
            real_effective_weight
                .with_label_values(&labels)
                .set(r.effective_weight.into());
            real_up
                .with_label_values(&labels)
                .set((r.health == crate::health::Health::Up).into());
            real_draining
                .with_label_values(&labels)
                .set(r.draining.into());
            real_resolved
                .with_label_values(&labels)
                .set(r.mac.is_some().into());
            let active = active_flows.get(&r.backend_id).copied().unwrap_or(0);
            real_active
                .with_label_values(&labels)
                .set(active.try_into().unwrap_or(i64::MAX));
        }
    }
    for g in lb_common::Global::ALL {
        let value = b.dataplane().global_counter(g)?;
        events.with_label_values(&[g.name()]).inc_by(value);
    }

    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    Ok(String::from_utf8(out)?)
}
