//! What the operator configures: services and their reals. This is what `xlb save` prints,
//! `xlb restore` takes and the state file holds. Parsing and validation live here, so every
//! entry point (CLI, API, state file) refuses bad input with the same one-line messages.

use std::{fmt, net::IpAddr, str::FromStr};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::{health::CheckConfig, maglev};

pub const DEFAULT_WEIGHT: u32 = 100;
pub const MAX_WEIGHT: u32 = 65535;
/// Reals in one service. A Maglev table spreads flows within about 1 % when it has 100 slots
/// per real (the default 65,537-slot table stays within about 2 % at this limit, and the
/// largest, 1,048,573, within 0.1 %); every checked real is a probe each interval; and 64
/// full services still fit the data path's 65,536 backends ([`lb_common::MAX_BACKENDS`]).
pub const MAX_REALS_PER_SERVICE: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => lb_common::PROTO_TCP,
            Proto::Udp => lb_common::PROTO_UDP,
        }
    }
}

/// A virtual service, written `ADDR:PORT/PROTO` (`198.18.0.100:80/tcp`, `[fd00::100]:443/tcp`).
/// Port 0 means every port of the VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceAddr {
    pub vip: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for ServiceAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        match self.vip {
            IpAddr::V4(a) => write!(f, "{a}:{}/{proto}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{proto}", self.port),
        }
    }
}

impl FromStr for ServiceAddr {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (addr, proto) = s.rsplit_once('/').ok_or_else(|| {
            anyhow::anyhow!("service '{s}': expected ADDR:PORT/PROTO, e.g. 198.18.0.100:80/tcp")
        })?;
        let proto = match proto {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            other => bail!("service '{s}': protocol '{other}' is not tcp or udp"),
        };
        let sock: std::net::SocketAddr = addr.parse().map_err(|_| {
            anyhow::anyhow!(
                "service '{s}': '{addr}' is not ADDR:PORT (IPv6 goes in brackets: [fd00::1]:80)"
            )
        })?;
        Ok(ServiceAddr {
            vip: sock.ip(),
            port: sock.port(),
            proto,
        })
    }
}

impl Serialize for ServiceAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ServiceAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Direct routing: rewrite the destination MAC (reals on the director's L2 segment).
    #[default]
    Dr,
    /// IP-in-IP tunnelling to the real.
    Tun,
    /// Destination NAT (LVS NAT): the destination becomes the real's address and port; the
    /// reals route their replies through the director, which rewrites them back.
    Nat,
    /// Full NAT: NAT, and the source becomes one of the service's `--snat` addresses and a port
    /// the director allocates, so replies come back to it wherever the reals are.
    Fullnat,
}

impl Mode {
    /// NAT or full NAT: the director rewrites addresses and carries the replies.
    pub fn is_nat(self) -> bool {
        matches!(self, Mode::Nat | Mode::Fullnat)
    }
}

/// `--tunnel-src-prefix`: outer source addresses taken per flow from a prefix, so receivers and
/// routers that hash only outer addresses (IPIP) see distinct flows. ADDR/LEN, with 1 to 16
/// host bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelPrefix {
    /// The prefix's first address (host bits zero).
    pub addr: IpAddr,
    pub len: u8,
}

/// The most host bits a tunnel source prefix may have: the flow hash's low 16 bits fill them.
pub const MAX_TUNNEL_HOST_BITS: u8 = 16;

impl TunnelPrefix {
    /// How many low bits of the address each flow chooses.
    pub fn host_bits(&self) -> u8 {
        let width = if self.addr.is_ipv4() { 32 } else { 128 };
        width - self.len
    }
}

impl fmt::Display for TunnelPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for TunnelPrefix {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| anyhow::anyhow!("tunnel source prefix '{s}': expected ADDR/LEN"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| anyhow::anyhow!("tunnel source prefix '{s}': '{addr}' is no address"))?;
        let width: u8 = if addr.is_ipv4() { 32 } else { 128 };
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= width)
            .ok_or_else(|| anyhow::anyhow!("tunnel source prefix '{s}': bad length '{len}'"))?;
        let prefix = TunnelPrefix { addr, len };
        let bits = prefix.host_bits();
        if !(1..=MAX_TUNNEL_HOST_BITS).contains(&bits) {
            bail!(
                "tunnel source prefix '{s}': {bits} host bits; 1 to {MAX_TUNNEL_HOST_BITS} \
                 (IPv4 /16 to /31, IPv6 /112 to /127)"
            );
        }
        let host_mask = (1u128 << bits) - 1;
        let host = match addr {
            IpAddr::V4(a) => u32::from(a) as u128 & host_mask,
            IpAddr::V6(a) => u128::from(a) & host_mask,
        };
        if host != 0 {
            bail!("tunnel source prefix '{s}': host bits set (the prefix's first address, please)");
        }
        Ok(prefix)
    }
}

impl Serialize for TunnelPrefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TunnelPrefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How a TUN service wraps packets for its reals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Encap {
    /// Bare IP-in-IP (IPIP, IP6IP6, 4in6): every packet has the same outer addresses.
    #[default]
    Ipip,
    /// GUE: IP-in-UDP with a source port per flow, which NICs and ECMP routers hash.
    Gue,
}

impl Encap {
    fn is_default(&self) -> bool {
        *self == Encap::Ipip
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
pub enum HashKind {
    /// Source and destination address, ports and protocol.
    #[default]
    #[serde(rename = "5tuple")]
    #[value(name = "5tuple")]
    FiveTuple,
    /// The client address only: all of a client's connections go to one real.
    #[serde(rename = "src-ip")]
    #[value(name = "src-ip")]
    SrcIp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RealConfig {
    pub addr: IpAddr,
    /// NAT only: the port the real serves the service on (`xlb real add SERVICE ADDR:PORT`);
    /// 0: the service's port (each port itself for an all-ports service).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub port: u16,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Drained by the operator: no new flows, tracked ones go on. Kept across restarts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
    /// Overrides the service's health check for this real.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckConfig>,
}

fn is_zero(port: &u16) -> bool {
    *port == 0
}

impl RealConfig {
    /// The check that applies to this real in `svc`: its own, else the service's; None when
    /// it is not checked (no check, or kind `none`).
    pub fn effective_check<'a>(&'a self, svc: &'a ServiceConfig) -> Option<&'a CheckConfig> {
        self.check
            .as_ref()
            .or(svc.check.as_ref())
            .filter(|c| c.kind != crate::health::CheckKind::None)
    }

    /// The port the real is sent to and checked on: its own, else the service's.
    pub fn dest_port(&self, service_port: u16) -> u16 {
        if self.port != 0 {
            self.port
        } else {
            service_port
        }
    }

    /// `ADDR`, or `ADDR:PORT` with a mapped port (IPv6 in brackets).
    pub fn endpoint(&self) -> String {
        endpoint(self.addr, self.port)
    }

    pub fn new(addr: IpAddr, weight: u32) -> Self {
        Self {
            addr,
            port: 0,
            weight,
            draining: false,
            check: None,
        }
    }

    /// Checks what does not depend on the service but its port: the address, the weight, the
    /// real's own health check.
    pub fn validate(&self, service_port: u16) -> Result<()> {
        if let Some(c) = &self.check {
            c.validate(service_port)
                .map_err(|e| anyhow::anyhow!("real {}: {e:#}", self.addr))?;
        }
        if self.weight > MAX_WEIGHT {
            bail!(
                "real {}: weight {} is out of range 0..={MAX_WEIGHT}",
                self.addr,
                self.weight
            );
        }
        let unusable = match self.addr {
            a if a.is_unspecified() => Some("the unspecified address"),
            a if a.is_loopback() => Some("a loopback address"),
            a if a.is_multicast() => Some("a multicast address"),
            IpAddr::V4(a) if a.is_broadcast() => Some("the broadcast address"),
            _ => None,
        };
        if let Some(what) = unusable {
            bail!("real {}: {what} cannot be a real server", self.addr);
        }
        Ok(())
    }
}

/// How a service's reals share new flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Weights {
    /// As configured.
    #[default]
    Static,
    /// Each real's weight follows its health-check latency against the service's fastest real,
    /// between a quarter of its configured weight and all of it.
    Adaptive,
}

/// What happens to a real's tracked flows when its checks take it down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnDown {
    /// They move to a live real on their next packet (they cannot succeed where they are).
    #[default]
    Move,
    /// They stay, as IPVS keeps them (only new flows avoid the real).
    Keep,
}

fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

fn default_ring_size() -> u32 {
    maglev::DEFAULT_SIZE
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub service: ServiceAddr,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default = "default_ring_size")]
    pub ring_size: u32,
    #[serde(default)]
    pub hash: HashKind,
    #[serde(default)]
    pub reals: Vec<RealConfig>,
    /// TUN only: the outer source address of encapsulated packets. None: the director's
    /// default for the VIP's family (an address of its interface).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_src: Option<IpAddr>,
    /// TUN only, instead of `tunnel_src`: an outer source per flow from this prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_src_prefix: Option<TunnelPrefix>,
    /// TUN only: bare IP-in-IP or GUE.
    #[serde(default, skip_serializing_if = "Encap::is_default")]
    pub encap: Encap,
    /// GUE only: the outer UDP destination port (None: `DEFAULT_GUE_PORT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gue_port: Option<u16>,
    #[serde(default)]
    pub on_down: OnDown,
    /// Where new flows go while no real is up (keepalived's sorry server). None: dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<IpAddr>,
    /// How its reals are health-checked. None: they are never checked (always up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckConfig>,
    #[serde(default)]
    pub weights: Weights,
    /// Full NAT only: the source addresses requests leave with (at most
    /// `lb_common::MAX_SNAT_ADDRS`, of the VIP's family; the director's own, dedicated ones).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snat: Vec<IpAddr>,
}

impl ServiceConfig {
    pub fn new(service: ServiceAddr) -> Self {
        Self {
            service,
            mode: Mode::Dr,
            ring_size: maglev::DEFAULT_SIZE,
            hash: HashKind::FiveTuple,
            reals: Vec::new(),
            tunnel_src: None,
            tunnel_src_prefix: None,
            encap: Encap::Ipip,
            gue_port: None,
            on_down: OnDown::Move,
            fallback: None,
            snat: Vec::new(),
            check: None,
            weights: Weights::Static,
        }
    }

    /// Checks the service itself (not its reals).
    pub fn validate(&self) -> Result<()> {
        let s = &self.service;
        if s.vip.is_unspecified() || s.vip.is_multicast() {
            bail!("service {s}: {} cannot be a VIP", s.vip);
        }
        if let Some(src) = self.tunnel_src {
            if self.mode != Mode::Tun {
                bail!("service {s}: a tunnel source needs --mode tun");
            }
            if src.is_ipv4() && s.vip.is_ipv6() {
                bail!(
                    "service {s}: tunnel source {src}: an IPv6 service cannot be tunnelled over \
                     IPv4 (only IPv4 over IPv6, 4in6)"
                );
            }
            if src.is_unspecified() || src.is_multicast() {
                bail!("service {s}: {src} cannot be a tunnel source");
            }
        }
        if let Some(prefix) = self.tunnel_src_prefix {
            if self.tunnel_src.is_some() {
                bail!("service {s}: give --tunnel-src or --tunnel-src-prefix, not both");
            }
            if self.mode != Mode::Tun {
                bail!("service {s}: a tunnel source prefix needs --mode tun");
            }
            if prefix.addr.is_ipv4() && s.vip.is_ipv6() {
                bail!(
                    "service {s}: tunnel source prefix {prefix}: an IPv6 service cannot be \
                     tunnelled over IPv4"
                );
            }
            if prefix.addr.is_multicast() || prefix.addr.is_loopback() {
                bail!("service {s}: {prefix} cannot be a tunnel source prefix");
            }
        }
        if self.mode == Mode::Fullnat && self.snat.is_empty() {
            bail!("service {s}: --mode fullnat needs --snat ADDR[,ADDR...]");
        }
        if !self.snat.is_empty() && self.mode != Mode::Fullnat {
            bail!("service {s}: --snat needs --mode fullnat");
        }
        if self.snat.len() > lb_common::MAX_SNAT_ADDRS {
            bail!(
                "service {s}: {} SNAT addresses exceed the limit of {}",
                self.snat.len(),
                lb_common::MAX_SNAT_ADDRS
            );
        }
        for (i, a) in self.snat.iter().enumerate() {
            if a.is_ipv4() != s.vip.is_ipv4() {
                bail!("service {s}: SNAT address {a} is not of the VIP's family");
            }
            if a.is_unspecified() || a.is_multicast() || a.is_loopback() {
                bail!("service {s}: {a} cannot be a SNAT address");
            }
            if self.snat[..i].contains(a) {
                bail!("service {s}: SNAT address {a} is listed twice");
            }
            if *a == s.vip {
                bail!("service {s}: a SNAT address cannot be a VIP");
            }
        }
        if self.encap == Encap::Gue && self.mode != Mode::Tun {
            bail!("service {s}: --encap gue needs --mode tun");
        }
        if let Some(port) = self.gue_port {
            if self.encap != Encap::Gue {
                bail!("service {s}: a GUE port needs --encap gue");
            }
            if port == 0 {
                bail!("service {s}: GUE port 0 is not a port");
            }
        }
        if !(2..=maglev::MAX_SIZE).contains(&self.ring_size) || !maglev::is_prime(self.ring_size) {
            bail!(
                "service {s}: ring size {} must be a prime between 2 and {}",
                self.ring_size,
                maglev::MAX_SIZE
            );
        }
        if self.reals.len() > MAX_REALS_PER_SERVICE {
            bail!(
                "service {s}: {} reals exceed the limit of {MAX_REALS_PER_SERVICE} per service",
                self.reals.len()
            );
        }
        for (i, r) in self.reals.iter().enumerate() {
            validate_real(self, r)?;
            if self.reals[..i].iter().any(|o| o.addr == r.addr) {
                bail!("service {s}: real {} is listed twice", r.addr);
            }
        }
        if self.weights == Weights::Adaptive && self.check.is_none() {
            bail!("service {s}: adaptive weights follow health-check latency; add a --check");
        }
        if let Some(c) = &self.check {
            c.validate(s.port)
                .map_err(|e| anyhow::anyhow!("service {s}: {e:#}"))?;
        }
        if let Some(f) = self.fallback {
            validate_real(self, &RealConfig::new(f, 0))
                .map_err(|e| anyhow::anyhow!("service {s}: fallback {e:#}"))?;
            if self.reals.iter().any(|r| r.addr == f) {
                bail!("service {s}: fallback {f} is also one of its reals");
            }
        }
        Ok(())
    }
}

/// A real as written on the command line and shown: `ADDR`, or `ADDR:PORT` with a mapped port.
pub fn endpoint(addr: IpAddr, port: u16) -> String {
    match (port, addr) {
        (0, a) => a.to_string(),
        (p, IpAddr::V4(a)) => format!("{a}:{p}"),
        (p, IpAddr::V6(a)) => format!("[{a}]:{p}"),
    }
}

/// `xlb real add`'s REAL: `ADDR` or `ADDR:PORT` (`[ADDR]:PORT` for IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RealEndpoint {
    pub addr: IpAddr,
    pub port: u16,
}

impl FromStr for RealEndpoint {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        if let Ok(addr) = s.parse::<IpAddr>() {
            return Ok(RealEndpoint { addr, port: 0 });
        }
        let sock: std::net::SocketAddr = s.parse().map_err(|_| {
            anyhow::anyhow!("real '{s}': expected ADDR or ADDR:PORT ([fd00::1]:8080 for IPv6)")
        })?;
        if sock.port() == 0 {
            bail!("real '{s}': port 0 is not a port (leave the port out to keep the service's)");
        }
        Ok(RealEndpoint {
            addr: sock.ip(),
            port: sock.port(),
        })
    }
}

pub fn validate_real(svc: &ServiceConfig, real: &RealConfig) -> Result<()> {
    let s = &svc.service;
    real.validate(s.port)?;
    if real.port != 0 {
        if !svc.mode.is_nat() {
            bail!(
                "real {}: a port needs a NAT service (--mode nat|fullnat); DR and TUN reals \
                 serve the service's own port",
                real.endpoint()
            );
        }
        if s.port == 0 {
            bail!(
                "real {}: service {s} has every port, each mapped to itself; a real cannot map \
                 them to one",
                real.endpoint()
            );
        }
    }
    if real.addr == s.vip {
        bail!(
            "real {}: the service's own VIP cannot be its real",
            real.addr
        );
    }
    match svc.mode {
        Mode::Dr | Mode::Nat | Mode::Fullnat if real.addr.is_ipv4() != s.vip.is_ipv4() => bail!(
            "real {}: address family differs from service {s} ({} needs both in one family)",
            real.addr,
            if svc.mode == Mode::Dr { "DR" } else { "NAT" }
        ),
        Mode::Tun if real.addr.is_ipv4() != svc.tunnel_v4() => bail!(
            "real {}: service {s} tunnels over {}, so its reals must be {} (an IPv4 service \
             reaches IPv6 reals, 4in6, with an IPv6 --tunnel-src)",
            real.addr,
            if svc.tunnel_v4() { "IPv4" } else { "IPv6" },
            if svc.tunnel_v4() { "IPv4" } else { "IPv6" },
        ),
        _ => Ok(()),
    }
}

impl ServiceConfig {
    /// TUN: whether the outer header is IPv4: the tunnel source's (or prefix's) family, else
    /// the VIP's.
    pub fn tunnel_v4(&self) -> bool {
        self.tunnel_src
            .or(self.tunnel_src_prefix.map(|p| p.addr))
            .unwrap_or(self.service.vip)
            .is_ipv4()
    }

    /// GUE's destination port, the default filled in.
    pub fn effective_gue_port(&self) -> u16 {
        self.gue_port.unwrap_or(lb_common::DEFAULT_GUE_PORT)
    }
}

/// The whole configuration of a director.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
}

impl Config {
    pub fn validate(&self) -> Result<()> {
        for (i, svc) in self.services.iter().enumerate() {
            svc.validate()?;
            if self.services[..i].iter().any(|o| o.service == svc.service) {
                bail!("service {} is listed twice", svc.service);
            }
        }
        if self.services.len() > lb_common::MAX_SERVICES as usize {
            bail!(
                "{} services exceed the limit of {}",
                self.services.len(),
                lb_common::MAX_SERVICES
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_real_port_needs_a_nat_service_with_a_port() {
        let svc: ServiceAddr = "198.18.0.100:80/tcp".parse().unwrap();
        let real = RealConfig {
            port: 8080,
            ..RealConfig::new("198.18.0.11".parse().unwrap(), 100)
        };
        let mut cfg = ServiceConfig::new(svc);
        for mode in [Mode::Dr, Mode::Tun] {
            cfg.mode = mode;
            let err = validate_real(&cfg, &real).unwrap_err().to_string();
            assert!(err.contains("needs a NAT service"), "{err}");
            assert_eq!(err.lines().count(), 1);
        }
        cfg.mode = Mode::Nat;
        validate_real(&cfg, &real).unwrap();
        let all_ports = ServiceConfig {
            mode: Mode::Nat,
            ..ServiceConfig::new("198.18.0.100:0/tcp".parse().unwrap())
        };
        let err = validate_real(&all_ports, &real).unwrap_err().to_string();
        assert!(err.contains("mapped to itself"), "{err}");
        let v6 = RealConfig::new("fd00::11".parse().unwrap(), 100);
        let err = validate_real(&cfg, &v6).unwrap_err().to_string();
        assert!(err.contains("NAT needs both in one family"), "{err}");
    }

    #[test]
    fn real_endpoints_parse_with_and_without_a_port() {
        let p = |s: &str| s.parse::<RealEndpoint>();
        assert_eq!(p("198.18.0.11").unwrap().port, 0);
        let e = p("198.18.0.11:8080").unwrap();
        assert_eq!((e.addr.to_string(), e.port), ("198.18.0.11".into(), 8080));
        assert_eq!(p("[fd00::11]:8080").unwrap().port, 8080);
        assert_eq!(p("fd00::11").unwrap().port, 0);
        assert!(p("198.18.0.11:0").is_err());
        assert!(p("nonsense").is_err());
        assert_eq!(endpoint(e.addr, 8080), "198.18.0.11:8080");
        assert_eq!(endpoint("fd00::11".parse().unwrap(), 80), "[fd00::11]:80");
    }

    #[test]
    fn service_addresses_round_trip() {
        for s in [
            "198.18.0.100:80/tcp",
            "[fd00::100]:443/tcp",
            "198.18.0.100:0/udp",
        ] {
            let parsed: ServiceAddr = s.parse().unwrap();
            assert_eq!(parsed.to_string(), s);
        }
    }

    #[test]
    fn bad_service_addresses_are_refused() {
        for s in [
            "198.18.0.100:80",
            "198.18.0.100/tcp",
            "198.18.0.100:80/icmp",
            "fd00::1:80/tcp",
            "198.18.0.300:80/tcp",
            "198.18.0.100:70000/tcp",
        ] {
            assert!(s.parse::<ServiceAddr>().is_err(), "{s} was accepted");
        }
    }

    #[test]
    fn config_json_round_trips() {
        let mut svc = ServiceConfig::new("198.18.0.100:80/tcp".parse().unwrap());
        svc.reals
            .push(RealConfig::new("198.18.0.11".parse().unwrap(), 5));
        let config = Config {
            services: vec![svc],
        };
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(serde_json::from_str::<Config>(&json).unwrap(), config);
    }

    #[test]
    fn invalid_configs_are_refused() {
        let mut svc = ServiceConfig::new("198.18.0.100:80/tcp".parse().unwrap());
        svc.ring_size = 65536;
        assert!(svc.validate().is_err());
        svc.ring_size = 65537;
        svc.reals
            .push(RealConfig::new("fd00::1".parse().unwrap(), 1));
        assert!(svc.validate().is_err());
        svc.reals[0].addr = "198.18.0.11".parse().unwrap();
        svc.reals[0].weight = 70000;
        assert!(svc.validate().is_err());
        svc.reals[0].weight = 1;
        svc.reals.push(svc.reals[0].clone());
        assert!(svc.validate().is_err());
    }

    fn error(svc: &ServiceConfig) -> String {
        format!("{:#}", svc.validate().unwrap_err())
    }

    #[test]
    fn tun_services_are_accepted_with_reals_of_their_family() {
        for (service, real, src) in [
            ("198.18.0.100:80/tcp", "10.1.0.11", "198.18.0.2"),
            ("[fd00:18::100]:443/tcp", "fd00:1::11", "fd00:18::2"),
        ] {
            let mut svc = ServiceConfig::new(service.parse().unwrap());
            svc.mode = Mode::Tun;
            svc.reals.push(RealConfig::new(real.parse().unwrap(), 1));
            svc.validate().unwrap();
            svc.tunnel_src = Some(src.parse().unwrap());
            svc.validate().unwrap();
        }
    }

    #[test]
    fn tun_refuses_reals_of_the_other_family_with_its_own_message() {
        let mut svc = ServiceConfig::new("198.18.0.100:80/tcp".parse().unwrap());
        svc.reals
            .push(RealConfig::new("fd00::11".parse().unwrap(), 1));
        assert!(error(&svc).contains("DR needs both in one family"));
        svc.mode = Mode::Tun;
        let msg = error(&svc);
        assert!(
            msg.contains("tunnels over IPv4, so its reals must be IPv4")
                && msg.contains("with an IPv6 --tunnel-src"),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
        // With an IPv6 tunnel source the IPv4 service reaches them (4in6).
        svc.tunnel_src = Some("fd00::2".parse().unwrap());
        svc.validate().unwrap();
        let mut svc6 = ServiceConfig::new("[fd00::100]:80/tcp".parse().unwrap());
        svc6.mode = Mode::Tun;
        svc6.reals
            .push(RealConfig::new("10.0.0.1".parse().unwrap(), 1));
        assert!(error(&svc6).contains("tunnels over IPv6"));
    }

    #[test]
    fn tunnel_source_is_checked() {
        let mut svc = ServiceConfig::new("198.18.0.100:80/tcp".parse().unwrap());
        svc.tunnel_src = Some("198.18.0.2".parse().unwrap());
        assert!(error(&svc).contains("needs --mode tun"));
        svc.mode = Mode::Tun;
        svc.validate().unwrap();
        for bad in ["0.0.0.0", "224.0.0.1"] {
            svc.tunnel_src = Some(bad.parse().unwrap());
            assert!(svc.validate().is_err(), "{bad} was accepted");
        }
        assert!(error(&svc).contains("cannot be a tunnel source"));
        let mut svc6 = ServiceConfig::new("[fd00::100]:80/tcp".parse().unwrap());
        svc6.mode = Mode::Tun;
        for bad in ["198.18.0.2", "::", "ff02::1"] {
            svc6.tunnel_src = Some(bad.parse().unwrap());
            assert!(svc6.validate().is_err(), "{bad} was accepted");
        }
        svc6.tunnel_src = Some("198.18.0.2".parse().unwrap());
        assert!(error(&svc6).contains("cannot be tunnelled over IPv4"));
    }

    #[test]
    fn tunnel_source_is_saved_only_when_set() {
        let mut svc = ServiceConfig::new("198.18.0.100:80/tcp".parse().unwrap());
        svc.mode = Mode::Tun;
        let json = serde_json::to_string(&svc).unwrap();
        assert!(!json.contains("tunnel_src"), "{json}");
        assert_eq!(serde_json::from_str::<ServiceConfig>(&json).unwrap(), svc);
        svc.tunnel_src = Some("198.18.0.2".parse().unwrap());
        let json = serde_json::to_string(&svc).unwrap();
        assert!(json.contains(r#""tunnel_src":"198.18.0.2""#), "{json}");
        assert_eq!(serde_json::from_str::<ServiceConfig>(&json).unwrap(), svc);
    }
}
