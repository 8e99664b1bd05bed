//! The control API between the CLI and the daemon: one JSON request per line on a Unix
//! socket, one JSON response line back. The answers are typed here ([`StatusReport`],
//! [`StatsReport`]) and used by both sides, so `--json` output is exactly what the daemon sent.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::Path,
};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    config::{Config, HashKind, MAX_WEIGHT, Mode, RealConfig, ServiceAddr, ServiceConfig, Weights},
    health::{CheckKind, Health},
};

pub const DEFAULT_SOCKET: &str = "/run/xlb/xlb.sock";
/// Largest request line the daemon reads, newline included; a longer one is answered with an
/// error and the connection closed. The largest valid configuration (4096 services, 65,536
/// IPv6 reals) is about 6 MiB as a `restore` request, so this leaves room for per-real checks.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;
/// Longest error message sent back: errors may quote the request, which may be huge.
pub const MAX_ERROR_CHARS: usize = 512;

#[derive(Clone, Debug, Serialize, Deserialize)]
// Requests without fields are empty struct variants: serde ignores unknown fields next to
// the tag of a unit variant, even with deny_unknown_fields.
#[serde(tag = "request", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    ServiceAdd {
        config: ServiceConfig,
    },
    ServiceRemove {
        service: ServiceAddr,
    },
    ServiceList {},
    RealAdd {
        service: ServiceAddr,
        real: RealConfig,
    },
    RealRemove {
        service: ServiceAddr,
        addr: IpAddr,
    },
    RealWeight {
        service: ServiceAddr,
        addr: IpAddr,
        weight: u32,
    },
    RealList {
        service: ServiceAddr,
    },
    /// No new flows for the real; tracked ones go on.
    RealDrain {
        service: ServiceAddr,
        addr: IpAddr,
    },
    /// Undoes a drain.
    RealEnable {
        service: ServiceAddr,
        addr: IpAddr,
    },
    Status {},
    Stats {},
    Save {},
    Restore {
        config: Config,
    },
}

impl Request {
    /// What can be checked without the daemon's state: whole configurations, a real's own
    /// settings, a weight. The daemon checks the rest (does the service exist, ...).
    pub fn validate(&self) -> Result<()> {
        match self {
            Request::ServiceAdd { config } => config.validate(),
            Request::Restore { config } => config.validate(),
            Request::RealAdd { service, real } => real.validate(service.port),
            Request::RealWeight { addr, weight, .. } if *weight > MAX_WEIGHT => {
                bail!("real {addr}: weight {weight} is out of range 0..={MAX_WEIGHT}")
            }
            _ => Ok(()),
        }
    }
}

/// Decodes one request line (as read, newline included or not): a pure function, so every
/// way a request can be malformed is testable without a daemon. The error is one line.
pub fn decode_request(line: &[u8]) -> Result<Request> {
    if line.len() > MAX_REQUEST_BYTES {
        bail!("request larger than {MAX_REQUEST_BYTES} bytes");
    }
    let text =
        std::str::from_utf8(line).map_err(|e| anyhow!("malformed request: not UTF-8 ({e})"))?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    if text.contains('\n') {
        bail!("malformed request: one JSON object per line, and this line holds more");
    }
    if text.trim().is_empty() {
        bail!("empty request: expected one JSON object per line");
    }
    let request: Request =
        serde_json::from_str(text).map_err(|e| anyhow!("malformed request: {e}"))?;
    request.validate()?;
    Ok(request)
}

/// `message` made fit for one line of a terminal: control characters escaped, cut at
/// [`MAX_ERROR_CHARS`].
pub fn one_line(message: &str) -> String {
    let mut out = String::new();
    for (i, c) in message.chars().enumerate() {
        if i == MAX_ERROR_CHARS {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Self {
        Self {
            ok: true,
            error: None,
            data,
        }
    }

    pub fn error(e: &anyhow::Error) -> Self {
        Self {
            ok: false,
            error: Some(one_line(&format!("{e:#}"))),
            data: serde_json::Value::Null,
        }
    }
}

/// `status`: the attached interfaces and what the daemon knows of every real.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReport {
    /// In `--iface` order.
    pub interfaces: Vec<InterfaceReport>,
    pub services: Vec<ServiceReport>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InterfaceReport {
    pub name: String,
    pub ifindex: u32,
    /// `native` or `generic`.
    pub attach_mode: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceReport {
    pub service: ServiceAddr,
    pub mode: Mode,
    pub hash: HashKind,
    pub ring_size: u32,
    pub weights: Weights,
    pub reals: Vec<RealReport>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RealReport {
    pub addr: IpAddr,
    /// NAT: the port the real is sent to; 0 (left out): the service's.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub port: u16,
    /// As configured.
    pub weight: u32,
    /// As used in the Maglev table (adaptive weights lower it).
    pub effective_weight: u32,
    /// The next hop's MAC, `None` while unresolved.
    pub mac: Option<String>,
    /// The real itself (DR), the router towards it (TUN), or why there is none.
    pub next_hop: Option<String>,
    /// The attached interface the real is reached through, while resolved.
    pub iface: Option<String>,
    pub state: RealState,
    pub health: Health,
    pub draining: bool,
    /// The service's fallback (used only while no real is eligible).
    pub fallback: bool,
    /// The real's check, `None` if it is not checked.
    pub check: Option<CheckReport>,
    /// In the Maglev table: receives new flows.
    pub in_table: bool,
    /// Flows that sent a packet recently (see `control::ACTIVE_FLOW_IDLE_S`).
    pub active_flows: u64,
    /// Connections (SYNs, datagrams) the real refused since it got its backend id: no socket
    /// on the port; each was re-scheduled to another real (or dropped when none was left).
    #[serde(default)]
    pub refusals: u64,
}

fn is_zero(port: &u16) -> bool {
    *port == 0
}

/// One word for a real's state, most pressing first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RealState {
    /// No MAC for its next hop: not forwarded to.
    Unresolved,
    /// No new flows; tracked ones finish.
    Draining,
    Down,
    /// Checked, no answer yet.
    Checking,
    /// Up, and serving as the service's fallback.
    Fallback,
    Up,
}

impl RealState {
    pub fn name(self) -> &'static str {
        match self {
            RealState::Unresolved => "unresolved",
            RealState::Draining => "draining",
            RealState::Down => "down",
            RealState::Checking => "checking",
            RealState::Fallback => "fallback",
            RealState::Up => "up",
        }
    }
}

/// A real's check and its last result (none before the first).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckReport {
    pub kind: CheckKind,
    #[serde(default, flatten, skip_serializing_if = "Option::is_none")]
    pub last: Option<CheckResult>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckResult {
    pub ok: bool,
    /// One line: `HTTP 200`, `connect: connection refused`, ...
    pub detail: String,
    pub latency_ms: f64,
    /// How long ago it was taken.
    pub age_s: f64,
}

/// `stats`: the data path's counters, summed over CPUs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatsReport {
    pub services: Vec<ServiceStats>,
    /// The data path's global counters by name (`lb_common::Global::name`).
    pub global: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceStats {
    pub service: ServiceAddr,
    #[serde(flatten)]
    pub counters: Counts,
    pub reals: Vec<RealStats>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RealStats {
    pub addr: IpAddr,
    #[serde(flatten)]
    pub counters: Counts,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

impl Counts {
    fn since(self, earlier: Counts) -> Counts {
        Counts {
            packets: self.packets.saturating_sub(earlier.packets),
            bytes: self.bytes.saturating_sub(earlier.bytes),
            new_flows: self.new_flows.saturating_sub(earlier.new_flows),
        }
    }
}

impl StatsReport {
    /// What was counted between `earlier` and this report (for `stats --rate`). Services and
    /// reals are matched by address; one new since `earlier` counts from zero.
    pub fn since(&self, earlier: &StatsReport) -> StatsReport {
        let services = self
            .services
            .iter()
            .map(|s| {
                let before = earlier.services.iter().find(|e| e.service == s.service);
                let reals = s
                    .reals
                    .iter()
                    .map(|r| {
                        let before = before
                            .and_then(|b| b.reals.iter().find(|e| e.addr == r.addr))
                            .map_or_else(Counts::default, |e| e.counters);
                        RealStats {
                            addr: r.addr,
                            counters: r.counters.since(before),
                        }
                    })
                    .collect();
                ServiceStats {
                    service: s.service,
                    counters: s
                        .counters
                        .since(before.map_or_else(Counts::default, |b| b.counters)),
                    reals,
                }
            })
            .collect();
        let global = self
            .global
            .iter()
            .map(|(name, n)| {
                let before = earlier.global.get(name).copied().unwrap_or(0);
                (name.clone(), n.saturating_sub(before))
            })
            .collect();
        StatsReport { services, global }
    }
}

/// Sends one request and returns the daemon's answer decoded as `T`, or its refusal as the
/// error.
pub fn ask<T: DeserializeOwned>(socket: &Path, request: &Request) -> Result<T> {
    let response = call(socket, request)?;
    if !response.ok {
        bail!(
            "{}",
            response.error.unwrap_or_else(|| "request refused".into())
        );
    }
    serde_json::from_value(response.data).context("the daemon's answer is not what was asked")
}

/// Sends one request and waits for its answer.
pub fn call(socket: &Path, request: &Request) -> Result<Response> {
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    if line.len() > MAX_REQUEST_BYTES {
        bail!(
            "request of {} bytes is larger than the daemon takes ({MAX_REQUEST_BYTES})",
            line.len()
        );
    }
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => anyhow!(
            "permission denied on {}: only root may control xlb",
            socket.display()
        ),
        _ => anyhow!(
            "cannot reach the xlb daemon at {} (is it running?): {e}",
            socket.display()
        ),
    })?;
    // The daemon may answer (a refusal) and close before reading everything: its answer
    // then says more than our write error.
    let written = stream.write_all(line.as_bytes());
    let mut answer = String::new();
    let read = BufReader::new(stream).read_line(&mut answer);
    if answer.is_empty() {
        written?;
        read?;
        bail!("the daemon closed the connection without answering");
    }
    serde_json::from_str(&answer).context("the daemon's answer is not valid JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_and_trailing_text_are_refused() {
        for bad in [
            r#"{"request":"status","x":1}"#,
            r#"{"request":"save","x":null}"#,
            r#"{"request":"status"}{"request":"save"}"#,
        ] {
            assert!(decode_request(bad.as_bytes()).is_err(), "{bad} accepted");
        }
    }
}
