//! How the CLI shows the daemon's answers: one line per service or real for people, or the
//! answer itself as JSON (`--json`), which is exactly what the daemon sent.

use anyhow::Result;
use serde::Serialize;

use crate::{
    api::{StatsReport, StatusReport},
    config::{Config, RealConfig},
};

/// The word a value is written with on the command line (and in JSON): `dr`, `5tuple`.
fn word<T: clap::ValueEnum>(value: T) -> String {
    value
        .to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_owned())
}

/// Pretty-printed JSON of an answer.
pub fn json<T: Serialize>(answer: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(answer)?);
    Ok(())
}

/// `service list`.
pub fn services(config: &Config, as_json: bool) -> Result<()> {
    if as_json {
        return json(config);
    }
    for s in &config.services {
        println!(
            "{} mode {} hash {} ring {} reals {}",
            s.service,
            word(s.mode),
            word(s.hash),
            s.ring_size,
            s.reals.len()
        );
    }
    Ok(())
}

/// `real list`.
pub fn reals(reals: &[RealConfig], as_json: bool) -> Result<()> {
    if as_json {
        return json(&reals);
    }
    for r in reals {
        println!("{} weight {}", r.endpoint(), r.weight);
    }
    Ok(())
}

/// `status`.
pub fn status(status: &StatusReport, as_json: bool) -> Result<()> {
    if as_json {
        return json(status);
    }
    for i in &status.interfaces {
        println!("interface {} (XDP {})", i.name, i.attach_mode);
    }
    // Which interface a real is reached through matters only when there are several.
    let two_arm = status.interfaces.len() > 1;
    for s in &status.services {
        println!(
            "{} mode {} hash {} ring {}",
            s.service,
            word(s.mode),
            word(s.hash),
            s.ring_size
        );
        for r in &s.reals {
            let addr = crate::config::endpoint(r.addr, r.port);
            // A TUN real's MAC is its next hop's; say which hop when it is not the real.
            let mut via = match &r.next_hop {
                Some(hop) if *hop != r.addr.to_string() => format!(" via {hop}"),
                _ => String::new(),
            };
            if let (true, Some(iface)) = (two_arm, &r.iface) {
                via.push_str(&format!(" on {iface}"));
            }
            let check = match &r.check {
                Some(c) => match &c.last {
                    Some(last) => format!(
                        " check {} {} ({:.1} ms)",
                        c.kind.name(),
                        last.detail,
                        last.latency_ms
                    ),
                    None => String::new(),
                },
                None => String::new(),
            };
            let weight = if r.effective_weight != r.weight {
                format!("{}/{}", r.weight, r.effective_weight)
            } else {
                r.weight.to_string()
            };
            let refusals = match r.refusals {
                0 => String::new(),
                n => format!(" refusals {n}"),
            };
            println!(
                "  -> {:<28} weight {:<7} mac {:<17} {:<10} active flows {}{refusals}{via}{check}",
                addr,
                weight,
                r.mac.as_deref().unwrap_or("-"),
                r.state.name(),
                r.active_flows
            );
        }
    }
    Ok(())
}

/// `stats`; `rate` when the figures are per second.
pub fn stats(report: &StatsReport, as_json: bool, rate: bool) -> Result<()> {
    if as_json {
        return json(report);
    }
    let unit = if rate { "/s" } else { "" };
    for s in &report.services {
        let c = s.counters;
        println!(
            "{} packets{unit} {} bytes{unit} {} new flows{unit} {}",
            s.service, c.packets, c.bytes, c.new_flows
        );
        for r in &s.reals {
            let c = r.counters;
            println!(
                "  -> {:<28} packets{unit} {} bytes{unit} {} new flows{unit} {}",
                r.addr.to_string(),
                c.packets,
                c.bytes,
                c.new_flows
            );
        }
    }
    Ok(())
}
