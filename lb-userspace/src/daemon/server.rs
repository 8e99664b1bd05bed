//! The control socket: one JSON request per connection, from root or the daemon's own user;
//! each request is applied as a transaction (validated, applied, saved, or rolled back).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Result, bail};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

use super::Shared;
use crate::{
    api::{
        Counts, InterfaceReport, MAX_REQUEST_BYTES, RealReport, RealStats, Request, Response,
        ServiceReport, ServiceStats, StatsReport, StatusReport, decode_request,
    },
    control::active_flows,
    netlink::trigger_resolution,
    state,
};

/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn serve(stream: UnixStream, shared: Arc<Mutex<Shared>>) -> Result<()> {
    let cred = stream.peer_cred()?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let (read, mut write) = stream.into_split();
    if cred.uid() != 0 && cred.uid() != me {
        let e = anyhow::anyhow!("permission denied: uid {} may not control xlb", cred.uid());
        write_response(&mut write, &Response::error(&e)).await?;
        return Ok(());
    }
    let mut reader = BufReader::new(read).take(MAX_REQUEST_BYTES as u64 + 1);
    let mut line = Vec::new();
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    let response = match read {
        Err(_) => Response::error(&anyhow::anyhow!(
            "no complete request within {} s",
            REQUEST_TIMEOUT.as_secs()
        )),
        Ok(read) => {
            read?;
            match decode_request(&line) {
                Ok(req) => {
                    let what = request_name(&req);
                    let mut guard = shared.lock().unwrap();
                    match handle(&mut guard, req) {
                        Ok(data) => Response::ok(data),
                        Err(e) => {
                            tracing::warn!(request = what, "refused: {e:#}");
                            Response::error(&e)
                        }
                    }
                }
                Err(e) => Response::error(&e),
            }
        }
    };
    // One request per connection.
    write_response(&mut write, &response).await?;
    if !line.ends_with(b"\n") {
        // An oversized or unfinished request: its client may still be sending, and closing on
        // unread data would reset the connection, which can discard our answer before the
        // client reads it. Read on for a bounded while (a lingering close), then close.
        write.shutdown().await?;
        let mut rest = reader
            .into_inner()
            .into_inner()
            .take(MAX_REQUEST_BYTES as u64);
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::io::copy(&mut rest, &mut tokio::io::sink()),
        )
        .await;
    }
    Ok(())
}

async fn write_response(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> Result<()> {
    let mut out = serde_json::to_vec(response)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}

/// The request's name as on the wire, for the log.
fn request_name(req: &Request) -> &'static str {
    match req {
        Request::ServiceAdd { .. } => "service-add",
        Request::ServiceRemove { .. } => "service-remove",
        Request::ServiceList {} => "service-list",
        Request::RealAdd { .. } => "real-add",
        Request::RealRemove { .. } => "real-remove",
        Request::RealWeight { .. } => "real-weight",
        Request::RealList { .. } => "real-list",
        Request::RealDrain { .. } => "real-drain",
        Request::RealEnable { .. } => "real-enable",
        Request::Status {} => "status",
        Request::Stats {} => "stats",
        Request::Save {} => "save",
        Request::Restore { .. } => "restore",
    }
}

/// Applies one request. Mutations are validated before anything changes and saved after; a
/// change that cannot be saved (disk full, read-only) is rolled back, so the running
/// configuration always matches the state file: bad circumstances change nothing either.
fn handle(s: &mut Shared, req: Request) -> Result<serde_json::Value> {
    let before = match req {
        Request::ServiceList {}
        | Request::Save {}
        | Request::RealList { .. }
        | Request::Status {}
        | Request::Stats {} => None,
        _ => Some(s.balancer.config()),
    };
    let data = apply(s, req)?;
    let Some(before) = before else {
        return Ok(data);
    };
    s.checks.reconcile(&s.balancer);
    if let Err(e) = state::save(&s.state, &s.balancer.config()) {
        match s.balancer.replace(&before) {
            Ok(()) => tracing::warn!("change rolled back: {e:#}"),
            Err(back) => tracing::error!("rolling back a change that was not saved: {back:#}"),
        }
        s.checks.reconcile(&s.balancer);
        s.announce();
        return Err(e.context("change refused and rolled back"));
    }
    s.announce();
    s.resolve_now.notify_one();
    Ok(data)
}

fn apply(s: &mut Shared, req: Request) -> Result<serde_json::Value> {
    let b = &mut s.balancer;
    match req {
        Request::ServiceAdd { config } => {
            b.add_service(config.clone())?;
            tracing::info!(service = %config.service, "service added");
        }
        Request::ServiceRemove { service } => {
            b.remove_service(&service)?;
            tracing::info!(%service, "service removed");
        }
        Request::RealAdd { service, real } => {
            let addr = real.addr;
            b.add_real(&service, real)?;
            trigger_resolution(addr);
            tracing::info!(%service, real = %addr, "real added");
        }
        Request::RealRemove { service, addr } => {
            b.remove_real(&service, addr)?;
            tracing::info!(%service, real = %addr, "real removed");
        }
        Request::RealWeight {
            service,
            addr,
            weight,
        } => {
            b.set_weight(&service, addr, weight)?;
            tracing::info!(%service, real = %addr, weight, "weight changed");
        }
        Request::RealDrain { service, addr } => {
            b.set_draining(&service, addr, true)?;
            tracing::info!(%service, real = %addr, "real draining");
        }
        Request::RealEnable { service, addr } => {
            b.set_draining(&service, addr, false)?;
            tracing::info!(%service, real = %addr, "real enabled");
        }
        Request::Restore { config } => {
            b.replace(&config)?;
            for addr in b.reals_by_mode().into_keys() {
                trigger_resolution(addr);
            }
            tracing::info!(services = config.services.len(), "configuration restored");
        }
        Request::ServiceList {} | Request::Save {} => {
            return Ok(serde_json::to_value(b.config())?);
        }
        Request::RealList { service } => {
            let config = b.config();
            let Some(svc) = config.services.iter().find(|c| c.service == service) else {
                bail!("service {service} does not exist");
            };
            return Ok(serde_json::to_value(&svc.reals)?);
        }
        Request::Status {} => return Ok(serde_json::to_value(status(s)?)?),
        Request::Stats {} => return Ok(serde_json::to_value(stats(s)?)?),
    }
    Ok(serde_json::Value::Null)
}

fn status(s: &mut Shared) -> Result<StatusReport> {
    let flows = active_flows(&mut s.balancer)?;
    let counters = s.balancer.dataplane().all_backend_counters()?;
    let refusals = |id: u32| counters.get(id as usize).map_or(0, |c| c.refusals);
    let services = s
        .balancer
        .config()
        .services
        .into_iter()
        .map(|svc| {
            let reals = s
                .balancer
                .real_status(&svc.service)
                .into_iter()
                .map(|r| RealReport {
                    addr: r.addr,
                    port: r.port,
                    weight: r.weight,
                    effective_weight: r.effective_weight,
                    next_hop: s.next_hops.get(&r.addr).map(|h| h.to_string()),
                    iface: r.ifindex.and_then(|i| s.iface_name(i)).map(String::from),
                    state: r.state(),
                    health: r.health,
                    draining: r.draining,
                    fallback: r.fallback,
                    check: s.checks.last(&svc.service, r.addr),
                    in_table: r.in_table,
                    active_flows: flows.active.get(&r.backend_id).copied().unwrap_or(0),
                    refusals: refusals(r.backend_id),
                    mac: r.mac,
                })
                .collect();
            ServiceReport {
                service: svc.service,
                mode: svc.mode,
                hash: svc.hash,
                ring_size: svc.ring_size,
                weights: svc.weights,
                reals,
            }
        })
        .collect();
    Ok(StatusReport {
        interfaces: s
            .ifaces
            .iter()
            .map(|i| InterfaceReport {
                name: i.name.clone(),
                ifindex: i.index,
                attach_mode: i.mode.into(),
            })
            .collect(),
        services,
    })
}

fn stats(s: &mut Shared) -> Result<StatsReport> {
    let b = &mut s.balancer;
    let counts = |c: lb_common::Counters| Counts {
        packets: c.packets,
        bytes: c.bytes,
        new_flows: c.new_flows,
    };
    let (service_counters, backend_counters) = (
        b.dataplane().all_service_counters()?,
        b.dataplane().all_backend_counters()?,
    );
    let counter =
        |all: &[lb_common::Counters], id: u32| all.get(id as usize).copied().unwrap_or_default();
    let mut services = Vec::new();
    for svc in b.config().services {
        let id = b.service_id(&svc.service).unwrap_or_default();
        let mut reals = Vec::new();
        for r in &svc.reals {
            let Some(backend) = b.real_backend_id(&svc.service, r.addr) else {
                continue;
            };
            reals.push(RealStats {
                addr: r.addr,
                counters: counts(counter(&backend_counters, backend)),
            });
        }
        services.push(ServiceStats {
            service: svc.service,
            counters: counts(counter(&service_counters, id)),
            reals,
        });
    }
    let mut global = BTreeMap::new();
    for g in lb_common::Global::ALL {
        global.insert(g.name().into(), b.dataplane().global_counter(g)?);
    }
    Ok(StatsReport { services, global })
}
