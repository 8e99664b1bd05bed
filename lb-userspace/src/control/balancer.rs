//! Policy: turns the operator's configuration into map contents. Allocates service and
//! backend ids, builds Maglev tables, and rewrites them in place when reals change.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context, Result, bail};
use lb_common::{
    BACKEND_F_FORWARD, Backend, Config as KernelConfig, FAMILY_V4, FAMILY_V6, MAX_BACKENDS,
    MAX_SERVICES, SERVICE_F_FULLNAT, SERVICE_F_GUE, SERVICE_F_HASH_SRC_IP, SERVICE_F_NAT,
    SERVICE_F_OUTER_V6, SERVICE_F_TUN, ServiceKey, ServiceValue,
};

use crate::{
    api,
    config::{
        Config, Encap, HashKind, Mode, OnDown, RealConfig, ServiceAddr, ServiceConfig, Weights,
        validate_real,
    },
    dataplane::{Dataplane, Inherited},
    health::Health,
    maglev,
    netlink::{Mac, format_mac},
};

/// Hands out ids. A freed id goes to the back of the queue, so it is reused as late as
/// possible, and every reuse bumps its generation (flows tracked for the old holder notice).
struct IdPool {
    next: u32,
    limit: u32,
    free: VecDeque<u32>,
    generations: HashMap<u32, u32>,
}

impl IdPool {
    fn new(limit: u32) -> Self {
        Self {
            next: 0,
            limit,
            free: VecDeque::new(),
            generations: HashMap::new(),
        }
    }

    fn alloc(&mut self) -> Option<(u32, u32)> {
        let id = if self.next < self.limit {
            self.next += 1;
            self.next - 1
        } else {
            self.free.pop_front()?
        };
        let generation = self.generations.entry(id).or_insert(0);
        *generation = generation.wrapping_add(1);
        Some((id, *generation))
    }

    /// Takes `id` out of circulation with the generation it already has (a previous daemon
    /// gave it out; flows tracked for it carry that generation).
    fn reserve(&mut self, id: u32, generation: u32) {
        if id >= self.limit {
            return;
        }
        while self.next <= id {
            if self.next != id {
                self.free.push_back(self.next);
            }
            self.next += 1;
        }
        self.free.retain(|&f| f != id);
        self.generations.insert(id, generation);
    }

    fn release(&mut self, id: u32) {
        self.free.push_back(id);
    }

    /// How many ids can still be handed out.
    fn available(&self) -> usize {
        (self.limit - self.next) as usize + self.free.len()
    }
}

struct RealState {
    /// NAT: the real's port (0: the service's).
    port: u16,
    weight: u32,
    /// The weight the table uses: `weight`, or what adaptive weighting made of it.
    effective_weight: u32,
    backend_id: u32,
    generation: u32,
    /// As the health checks report it (`Up` for a real without checks).
    health: Health,
    /// Drained by the operator: out of the table, its tracked flows go on.
    draining: bool,
    /// Its own health check, overriding the service's.
    check: Option<crate::health::CheckConfig>,
}

impl RealState {
    /// Whether new flows may be given to it (its MAC aside).
    fn eligible(&self) -> bool {
        self.effective_weight > 0 && self.health == Health::Up && !self.draining
    }
}

struct ServiceState {
    config: ServiceConfig,
    id: u32,
    reals: BTreeMap<IpAddr, RealState>,
    /// The fallback real, in the table only while no real is eligible.
    fallback: Option<(IpAddr, RealState)>,
}

impl ServiceState {
    fn real(&self, addr: IpAddr) -> Option<&RealState> {
        self.reals.get(&addr).or(match &self.fallback {
            Some((a, r)) if *a == addr => Some(r),
            _ => None,
        })
    }

    fn has(&self, addr: IpAddr) -> bool {
        self.real(addr).is_some()
    }

    /// Every real's address, the fallback's included.
    fn addrs(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.reals
            .keys()
            .chain(self.fallback.iter().map(|(a, _)| a))
            .copied()
    }
}

/// How a real is reached on the wire: out of the attached interface `ifindex` (the one the
/// kernel routes it through), to `mac` (the real's own for DR, its next hop's for TUN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub mac: Mac,
}

/// What `status` shows of one real.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RealStatus {
    pub addr: IpAddr,
    /// NAT: the real's port (0: the service's).
    pub port: u16,
    pub weight: u32,
    pub effective_weight: u32,
    pub backend_id: u32,
    pub mac: Option<String>,
    /// The attached interface the real is reached through (its ifindex), while resolved.
    pub ifindex: Option<u32>,
    pub health: Health,
    pub draining: bool,
    /// The service's fallback (used only while no real is eligible).
    pub fallback: bool,
    /// In the Maglev table: receives new flows.
    pub in_table: bool,
}

/// What a previous daemon's pinned maps held, claimed while the state file is re-applied so
/// services and reals keep their ids and generations (their tracked flows stay valid), their
/// MACs and their places in the tables.
#[derive(Default)]
struct Inheritance {
    services: HashMap<ServiceKey, u32>,
    reals: HashMap<(u32, IpAddr), InheritedReal>,
}

struct InheritedReal {
    id: u32,
    generation: u32,
    /// In its service's table: it was eligible, so a checked real resumes `up`.
    in_table: bool,
}

impl RealStatus {
    /// One word for the real's state, most pressing first.
    pub fn state(&self) -> api::RealState {
        if self.mac.is_none() {
            api::RealState::Unresolved
        } else if self.draining {
            api::RealState::Draining
        } else {
            match self.health {
                Health::Down => api::RealState::Down,
                Health::Unknown => api::RealState::Checking,
                Health::Up if self.fallback => api::RealState::Fallback,
                Health::Up => api::RealState::Up,
            }
        }
    }
}

pub struct Balancer {
    dp: Dataplane,
    inheritance: Inheritance,
    services: BTreeMap<ServiceAddr, ServiceState>,
    service_ids: IdPool,
    backend_ids: IdPool,
    /// How each real is reached, while known (see [`Link`]).
    links: HashMap<IpAddr, Link>,
    /// The attached interfaces' MACs, by ifindex: the source of frames leaving by each.
    ifaces: BTreeMap<u32, Mac>,
    /// Egress MTU the kernel checks TUN packets against (0: no check).
    mtu: u32,
    /// Outer source of TUN services that name none (addresses of the interface).
    tunnel_v4: Option<Ipv4Addr>,
    tunnel_v6: Option<Ipv6Addr>,
    /// The data path logs its rare events (`xlb daemon --datapath-log`).
    datapath_log: bool,
    vip_echo: bool,
    /// Connection sync is on: the data path reports new flows (`CONFIG_F_SYNC`).
    sync: bool,
}

/// The smallest MTU `set_mtu` accepts: every IPv4 host takes 576-byte datagrams (RFC 791), and
/// above it a packet too big to tunnel is always long enough to be quoted in the ICMP reply.
pub const MIN_MTU: u32 = 576;

/// An address as the maps hold it (IPv4 in the first four bytes) and its family.
pub fn addr_bytes(addr: IpAddr) -> ([u8; 16], u8) {
    let mut out = [0u8; 16];
    match addr {
        IpAddr::V4(a) => {
            out[..4].copy_from_slice(&a.octets());
            (out, FAMILY_V4)
        }
        IpAddr::V6(a) => (a.octets(), FAMILY_V6),
    }
}

/// The `VIPS` key of a VIP.
fn vip_key(vip: IpAddr) -> lb_common::VipKey {
    let (addr, family) = addr_bytes(vip);
    lb_common::VipKey {
        addr,
        family,
        _pad: [0; 3],
    }
}

/// A backend entry's address (None for an unused entry).
fn backend_addr(b: &Backend) -> Option<IpAddr> {
    addr_of(&b.addr, b.family)
}

/// The address of `addr_bytes`'s output (None for an unknown family).
pub fn addr_of(bytes: &[u8; 16], family: u8) -> Option<IpAddr> {
    match family {
        FAMILY_V4 => Some(IpAddr::from(<[u8; 4]>::try_from(&bytes[..4]).ok()?)),
        FAMILY_V6 => Some(IpAddr::from(*bytes)),
        _ => None,
    }
}

pub fn service_key(s: &ServiceAddr) -> ServiceKey {
    let (addr, family) = addr_bytes(s.vip);
    ServiceKey {
        addr,
        port: s.port.to_be(),
        proto: s.proto.number(),
        family,
    }
}

impl Balancer {
    pub fn new(dp: Dataplane) -> Self {
        Self {
            dp,
            inheritance: Inheritance::default(),
            services: BTreeMap::new(),
            service_ids: IdPool::new(MAX_SERVICES),
            backend_ids: IdPool::new(MAX_BACKENDS),
            links: HashMap::new(),
            ifaces: BTreeMap::new(),
            mtu: 0,
            tunnel_v4: None,
            tunnel_v6: None,
            datapath_log: false,
            vip_echo: true,
            sync: false,
        }
    }

    /// Takes over what a previous daemon left in the pinned maps (see [`Inherited`]). Call
    /// before `replace` applies the state file, then [`Balancer::finish_inheriting`].
    pub fn inherit(&mut self, prior: Inherited) {
        for (key, value) in prior.services {
            self.service_ids.reserve(value.id, 1);
            self.inheritance.services.insert(key, value.id);
        }
        for (id, b) in prior.backends {
            let Some(addr) = backend_addr(&b) else {
                continue;
            };
            self.backend_ids.reserve(id, b.generation);
            // Known a moment ago; the neighbour refresh corrects it if it changed.
            if b.flags & BACKEND_F_FORWARD != 0 {
                self.links.insert(
                    addr,
                    Link {
                        ifindex: b.ifindex,
                        mac: b.mac,
                    },
                );
            }
            let in_table = prior
                .members
                .get(&b.service_id)
                .is_some_and(|m| m.contains(&id));
            self.inheritance.reals.insert(
                (b.service_id, addr),
                InheritedReal {
                    id,
                    generation: b.generation,
                    in_table,
                },
            );
        }
    }

    /// Removes from the maps what the previous daemon had and the state file does not, and
    /// frees those ids.
    pub fn finish_inheriting(&mut self) -> Result<()> {
        let inheritance = std::mem::take(&mut self.inheritance);
        for (key, id) in inheritance.services {
            self.dp.remove_service(&key)?;
            self.dp.clear_maglev(id)?;
            self.service_ids.release(id);
        }
        for real in inheritance.reals.into_values() {
            self.dp.set_backend(real.id, Backend::default())?;
            self.backend_ids.release(real.id);
        }
        self.write_kernel_config()
    }

    /// Turns the data path's debug events on or off (see `CONFIG_F_DATAPATH_LOG`).
    /// Whether the data path answers pings to VIPs (on by default).
    pub fn set_vip_echo(&mut self, on: bool) -> Result<()> {
        self.vip_echo = on;
        self.write_kernel_config()
    }

    /// Turns the data path's reports of new flows on or off (connection sync, `CONFIG_F_SYNC`).
    pub fn set_sync(&mut self, on: bool) -> Result<()> {
        self.sync = on;
        self.write_kernel_config()
    }

    pub fn set_datapath_log(&mut self, on: bool) -> Result<()> {
        self.datapath_log = on;
        self.write_kernel_config()
    }

    pub fn dataplane(&mut self) -> &mut Dataplane {
        &mut self.dp
    }

    /// The interfaces the data path is attached to, (ifindex, MAC) each: frames are taken only
    /// when sent to the MAC of the one they arrive on, and leave a real's interface from its
    /// MAC. Reals reached through an interface no longer listed stop being forwarded to.
    pub fn set_interfaces(&mut self, ifaces: &[(u32, Mac)]) -> Result<()> {
        let ifindexes: Vec<u32> = ifaces.iter().map(|(i, _)| *i).collect();
        self.dp.set_redirect_ports(&ifindexes)?;
        self.ifaces = ifaces.iter().copied().collect();
        self.write_kernel_config()?;
        let services: Vec<ServiceAddr> = self.services.keys().copied().collect();
        for s in services {
            let reals: Vec<IpAddr> = self.services[&s].addrs().collect();
            for addr in reals {
                self.write_backend(&s, addr)?;
            }
            self.publish_table(&s)?;
        }
        Ok(())
    }

    /// The egress interface's MTU: TUN packets that would exceed it once encapsulated get an
    /// ICMP "too big" (or are dropped). 0 turns the check off.
    pub fn set_mtu(&mut self, mtu: u32) -> Result<()> {
        if mtu != 0 && !(MIN_MTU..=65535).contains(&mtu) {
            bail!("MTU {mtu} is out of range {MIN_MTU}..=65535 (0 turns the check off)");
        }
        self.mtu = mtu;
        self.write_kernel_config()
    }

    /// Outer source addresses for TUN services added later without a `tunnel_src` of their
    /// own (the daemon passes addresses of its interface).
    pub fn set_default_tunnel_sources(&mut self, v4: Option<Ipv4Addr>, v6: Option<Ipv6Addr>) {
        self.tunnel_v4 = v4;
        self.tunnel_v6 = v6;
    }

    /// The service's own tunnel source, else the default of its family.
    /// The outer source of a TUN service's packets (zero for DR and NAT).
    fn tunnel_src(&self, config: &ServiceConfig) -> Result<[u8; 16]> {
        if config.mode != Mode::Tun {
            return Ok([0; 16]);
        }
        let src = match (config.tunnel_src, config.service.vip) {
            (Some(src), _) => Some(src),
            (None, _) if config.tunnel_src_prefix.is_some() => {
                config.tunnel_src_prefix.map(|p| p.addr)
            }
            (None, IpAddr::V4(_)) => self.tunnel_v4.map(IpAddr::V4),
            (None, IpAddr::V6(_)) => self.tunnel_v6.map(IpAddr::V6),
        };
        let Some(src) = src else {
            let family = if config.service.vip.is_ipv4() {
                "IPv4"
            } else {
                "IPv6"
            };
            bail!(
                "service {}: no {family} address to use as tunnel source on the interface; \
                 pass --tunnel-src",
                config.service
            );
        };
        Ok(addr_bytes(src).0)
    }

    fn write_kernel_config(&mut self) -> Result<()> {
        let all_ports_services = self.services.keys().filter(|s| s.port == 0).count() as u32;
        self.dp.set_config(KernelConfig {
            flags: if self.datapath_log {
                lb_common::CONFIG_F_DATAPATH_LOG
            } else {
                0
            } | if self.vip_echo {
                lb_common::CONFIG_F_VIP_ECHO
            } else {
                0
            } | if self.services.values().any(|s| s.config.mode.is_nat()) {
                lb_common::CONFIG_F_NAT
            } else {
                0
            } | if self.sync {
                lb_common::CONFIG_F_SYNC
            } else {
                0
            },
            _pad: [0; 3],
            all_ports_services,
            mtu: self.mtu,
            ifaces: std::array::from_fn(|i| match self.ifaces.iter().nth(i) {
                Some((&ifindex, &mac)) => lb_common::Iface {
                    ifindex,
                    mac,
                    _pad: [0; 2],
                },
                None => lb_common::Iface::default(),
            }),
        })
    }

    /// The configuration as the operator sees it (what `xlb save` prints).
    pub fn config(&self) -> Config {
        Config {
            services: self
                .services
                .values()
                .map(|s| {
                    let mut c = s.config.clone();
                    c.reals = s
                        .reals
                        .iter()
                        .map(|(addr, r)| RealConfig {
                            port: r.port,
                            draining: r.draining,
                            check: r.check.clone(),
                            ..RealConfig::new(*addr, r.weight)
                        })
                        .collect();
                    c
                })
                .collect(),
        }
    }

    /// The services, in the order `config` lists them (without copying the configuration).
    pub fn services(&self) -> impl Iterator<Item = ServiceAddr> + '_ {
        self.services.keys().copied()
    }

    /// The services whose weights follow check latency (read once a second: no config copy).
    pub fn adaptive_services(&self) -> Vec<ServiceAddr> {
        self.services
            .iter()
            .filter(|(_, st)| st.config.weights == Weights::Adaptive)
            .map(|(s, _)| *s)
            .collect()
    }

    pub fn service_id(&self, s: &ServiceAddr) -> Option<u32> {
        self.services.get(s).map(|st| st.id)
    }

    /// The (service, real) a backend id and generation name, if it still does (a refusal
    /// reported for an id since given to another real is not that real's).
    pub fn real_of_backend(&self, id: u32, generation: u32) -> Option<(ServiceAddr, IpAddr)> {
        self.synced_real(id, generation)
            .map(|(svc, addr, _)| (svc, addr))
    }

    /// Connection sync: the (service, real address, real's NAT port) a backend id and
    /// generation name here, as a peer director knows them (ids are local to a director). The
    /// generation's low 16 bits, as a connection-table entry keeps it (`ConnValue::generation`).
    pub fn synced_real(&self, id: u32, generation: u32) -> Option<(ServiceAddr, IpAddr, u16)> {
        self.services.iter().find_map(|(svc, st)| {
            st.reals
                .iter()
                .chain(st.fallback.iter().map(|(a, r)| (a, r)))
                .find(|(_, r)| r.backend_id == id && r.generation as u16 == generation as u16)
                .map(|(addr, r)| (*svc, *addr, r.port))
        })
    }

    /// Connection sync: this director's backend id and generation for a peer's (service, real
    /// address, real's NAT port), if it has that real with that port.
    pub fn synced_backend(&self, s: &ServiceAddr, real: IpAddr, port: u16) -> Option<(u32, u32)> {
        self.services
            .get(s)?
            .real(real)
            .filter(|r| r.port == port)
            .map(|r| (r.backend_id, r.generation))
    }

    /// A service's forwarding mode, if this director has the service.
    pub fn service_mode(&self, s: &ServiceAddr) -> Option<Mode> {
        self.services.get(s).map(|st| st.config.mode)
    }

    /// The MAC of an interface the data path is attached to.
    pub fn interface_mac(&self, ifindex: u32) -> Option<Mac> {
        self.ifaces.get(&ifindex).copied()
    }

    pub fn real_backend_id(&self, s: &ServiceAddr, real: IpAddr) -> Option<u32> {
        self.services.get(s)?.reals.get(&real).map(|r| r.backend_id)
    }

    /// Every real address the balancer needs a MAC for, with how it is reached: TUN reals need
    /// their next hop's MAC, DR reals their own. A real in both kinds of service counts as TUN
    /// (on-link, its next hop is itself).
    pub fn reals_by_mode(&self) -> BTreeMap<IpAddr, Mode> {
        let mut out = BTreeMap::new();
        for s in self.services.values() {
            let fallback = s.fallback.as_ref().map(|(a, _)| a);
            for addr in s.reals.keys().chain(fallback) {
                let mode = out.entry(*addr).or_insert(s.config.mode);
                if s.config.mode == Mode::Tun {
                    *mode = Mode::Tun;
                }
            }
        }
        out
    }

    /// How the real is reached, while known and its interface attached: what it is
    /// forwarded by.
    pub fn link_of(&self, addr: IpAddr) -> Option<Link> {
        self.links
            .get(&addr)
            .copied()
            .filter(|l| self.ifaces.contains_key(&l.ifindex))
    }

    /// A real's health as the balancer holds it (its checks' tracker resumes from it).
    pub fn health(&self, s: &ServiceAddr, addr: IpAddr) -> Option<Health> {
        Some(self.services.get(s)?.real(addr)?.health)
    }

    pub fn real_status(&self, s: &ServiceAddr) -> Vec<RealStatus> {
        let Some(st) = self.services.get(s) else {
            return Vec::new();
        };
        let table = self.table_members(st);
        let reals = st.reals.iter().map(|(a, r)| (a, r, false));
        let fallback = st.fallback.iter().map(|(a, r)| (a, r, true));
        reals
            .chain(fallback)
            .map(|(addr, r, fallback)| RealStatus {
                addr: *addr,
                port: r.port,
                weight: r.weight,
                effective_weight: r.effective_weight,
                backend_id: r.backend_id,
                mac: self.link_of(*addr).map(|l| format_mac(&l.mac)),
                ifindex: self.link_of(*addr).map(|l| l.ifindex),
                health: r.health,
                draining: r.draining,
                fallback,
                in_table: table.iter().any(|m| m.id == r.backend_id),
            })
            .collect()
    }

    pub fn add_service(&mut self, config: ServiceConfig) -> Result<()> {
        config.validate()?;
        if self.services.contains_key(&config.service) {
            bail!("service {} already exists", config.service);
        }
        // A SNAT address is never a VIP: the data path looks for NAT replies only among the
        // frames no service claims.
        for (other, st) in &self.services {
            if config.snat.contains(&other.vip) || st.config.snat.contains(&config.service.vip) {
                bail!(
                    "service {}: a SNAT address cannot be a VIP (service {other})",
                    config.service
                );
            }
        }
        // Checked before anything is allocated: a TUN service needs a tunnel source.
        let tunnel_src = self.tunnel_src(&config)?;
        if self.backend_ids.available() < config.reals.len() + config.fallback.is_some() as usize {
            bail!(
                "service {}: no room for {} more reals (limit {MAX_BACKENDS} in all)",
                config.service,
                config.reals.len()
            );
        }
        let inherited = self
            .inheritance
            .services
            .remove(&service_key(&config.service));
        let id = match inherited {
            Some(id) => id,
            None => {
                self.service_ids
                    .alloc()
                    .with_context(|| {
                        format!(
                            "no room for service {} (limit {MAX_SERVICES})",
                            config.service
                        )
                    })?
                    .0
            }
        };
        self.services.insert(
            config.service,
            ServiceState {
                config: ServiceConfig {
                    reals: Vec::new(),
                    ..config.clone()
                },
                id,
                reals: BTreeMap::new(),
                fallback: None,
            },
        );
        // A step the kernel refuses undoes the whole service, so nothing is left half-added.
        if let Err(e) = self.program_new_service(&config, tunnel_src, inherited.is_none()) {
            if let Err(undo) = self.remove_service(&config.service) {
                tracing::error!(service = %config.service, "undoing a failed add: {undo:#}");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Writes a service's reals, table and entry. `fresh`: its id may have served another
    /// service, so its counters start over (an inherited service keeps counting).
    fn program_new_service(
        &mut self,
        config: &ServiceConfig,
        tunnel_src: [u8; 16],
        fresh: bool,
    ) -> Result<()> {
        let s = &config.service;
        let id = self.services[s].id;
        if fresh {
            self.dp.reset_service_counters(id)?;
        }
        for real in &config.reals {
            let state = self.new_real(config, real)?;
            self.services
                .get_mut(s)
                .expect("inserted by add_service")
                .reals
                .insert(real.addr, state);
            self.write_backend(s, real.addr)?;
        }
        if let Some(addr) = config.fallback {
            // A sorry server is not health-checked (as in keepalived).
            let state = self.new_real(
                &ServiceConfig {
                    check: None,
                    ..ServiceConfig::new(*s)
                },
                &RealConfig::new(addr, 0),
            )?;
            self.services
                .get_mut(s)
                .expect("inserted by add_service")
                .fallback = Some((addr, state));
            self.write_backend(s, addr)?;
        }
        // The table goes in before the service entry, so no packet meets a service without one.
        self.publish_table(s)?;
        let mut flags = match config.hash {
            HashKind::FiveTuple => 0,
            HashKind::SrcIp => SERVICE_F_HASH_SRC_IP,
        };
        if config.mode.is_nat() {
            flags |= SERVICE_F_NAT;
        }
        if config.mode == Mode::Fullnat {
            flags |= SERVICE_F_FULLNAT;
        }
        // Its SNAT addresses are in place before the service entry that makes them used.
        self.dp.set_snat(
            id,
            &config
                .snat
                .iter()
                .map(|a| addr_bytes(*a).0)
                .collect::<Vec<_>>(),
        )?;
        if config.mode == Mode::Tun {
            flags |= SERVICE_F_TUN;
            if !config.tunnel_v4() {
                flags |= SERVICE_F_OUTER_V6;
            }
        }
        let gue_port = if config.encap == Encap::Gue {
            flags |= SERVICE_F_GUE;
            config.effective_gue_port().to_be()
        } else {
            0
        };
        // The all-ports count goes first too, so the new service is found from its first packet.
        self.write_kernel_config()?;
        self.dp.set_vip(vip_key(s.vip), true)?;
        self.dp.set_service(
            service_key(s),
            ServiceValue {
                id,
                flags,
                tunnel_src,
                gue_port,
                tunnel_src_host_bits: config.tunnel_src_prefix.map_or(0, |p| p.host_bits()),
                _pad: 0,
            },
        )
    }

    pub fn remove_service(&mut self, s: &ServiceAddr) -> Result<()> {
        let Some(state) = self.services.get(s) else {
            bail!("service {s} does not exist");
        };
        let id = state.id;
        let backends: Vec<u32> = state
            .reals
            .values()
            .chain(state.fallback.as_ref().map(|(_, r)| r))
            .map(|r| r.backend_id)
            .collect();
        self.dp.remove_service(&service_key(s))?;
        self.dp.clear_maglev(id)?;
        for b in backends {
            self.dp.set_backend(b, Backend::default())?;
            self.backend_ids.release(b);
        }
        self.services.remove(s);
        self.service_ids.release(id);
        if !self.services.keys().any(|o| o.vip == s.vip) {
            self.dp.set_vip(vip_key(s.vip), false)?;
        }
        self.write_kernel_config()
    }

    pub fn add_real(&mut self, s: &ServiceAddr, real: RealConfig) -> Result<()> {
        let state = self
            .services
            .get_mut(s)
            .with_context(|| format!("service {s} does not exist"))?;
        validate_real(&state.config, &real)?;
        if state.reals.contains_key(&real.addr) {
            bail!("real {} is already in service {s}", real.addr);
        }
        if state.reals.len() >= crate::config::MAX_REALS_PER_SERVICE {
            bail!(
                "service {s} already has {} reals, the limit per service",
                state.reals.len()
            );
        }
        if state.config.fallback == Some(real.addr) {
            bail!("real {} is service {s}'s fallback", real.addr);
        }
        let addr = real.addr;
        let svc_config = state.config.clone();
        let state_real = self.new_real(&svc_config, &real)?;
        self.services
            .get_mut(s)
            .expect("checked above")
            .reals
            .insert(addr, state_real);
        self.write_backend(s, addr)?;
        self.publish_table(s)
    }

    pub fn remove_real(&mut self, s: &ServiceAddr, addr: IpAddr) -> Result<()> {
        let state = self
            .services
            .get_mut(s)
            .with_context(|| format!("service {s} does not exist"))?;
        let Some(real) = state.reals.remove(&addr) else {
            bail!("real {addr} is not in service {s}");
        };
        // Out of the table first; then the backend entry goes, so its tracked flows re-schedule.
        self.publish_table(s)?;
        self.dp.set_backend(real.backend_id, Backend::default())?;
        self.backend_ids.release(real.backend_id);
        Ok(())
    }

    /// One real of one service, for a change; an unknown service or real is an error naming it.
    fn real_mut(&mut self, s: &ServiceAddr, addr: IpAddr) -> Result<&mut RealState> {
        self.services
            .get_mut(s)
            .with_context(|| format!("service {s} does not exist"))?
            .reals
            .get_mut(&addr)
            .with_context(|| format!("real {addr} is not in service {s}"))
    }

    pub fn set_weight(&mut self, s: &ServiceAddr, addr: IpAddr, weight: u32) -> Result<()> {
        if let Some(state) = self.services.get(s) {
            validate_real(&state.config, &RealConfig::new(addr, weight))?;
        }
        let real = self.real_mut(s, addr)?;
        real.weight = weight;
        // Adaptive weighting scales the new weight from its next recomputation on.
        real.effective_weight = weight;
        self.publish_table(s)
    }

    /// Records how a real is reached (or that it is not) and reprograms every service using
    /// it. Returns whether anything changed.
    pub fn set_link(&mut self, addr: IpAddr, link: Option<Link>) -> Result<bool> {
        let old = self.links.get(&addr).copied();
        if old == link {
            return Ok(false);
        }
        match link {
            Some(l) => self.links.insert(addr, l),
            None => self.links.remove(&addr),
        };
        let affected: Vec<ServiceAddr> = self
            .services
            .iter()
            .filter(|(_, st)| st.has(addr))
            .map(|(s, _)| *s)
            .collect();
        for s in affected {
            self.write_backend(&s, addr)?;
            self.publish_table(&s)?;
        }
        Ok(true)
    }

    /// Replaces the whole configuration, all or nothing: validated first, then applied; if the
    /// kernel refuses a step, the previous configuration is put back. Services that did not
    /// change keep their ids, tables and tracked flows.
    pub fn replace(&mut self, config: &Config) -> Result<()> {
        config.validate()?;
        let previous = self.config();
        let Err(e) = self.apply_in_bulk(config) else {
            return Ok(());
        };
        // The previous configuration fitted before, so going back only frees resources.
        if let Err(back) = self.apply_in_bulk(&previous) {
            tracing::error!(
                "restoring the previous configuration after a failed replace: {back:#}"
            );
        }
        Err(e)
    }

    /// `apply`, with new services' tables and entries written together at the end (one RCU
    /// grace period for all the tables: see `Dataplane::defer_publishing`).
    fn apply_in_bulk(&mut self, config: &Config) -> Result<()> {
        self.dp.defer_publishing();
        let applied = self.apply(config);
        // Written even after an error: the queue matches the balancer's state, which the
        // caller then rolls back.
        let published = self.dp.publish_deferred();
        applied.and(published)
    }

    fn apply(&mut self, config: &Config) -> Result<()> {
        let wanted: BTreeMap<ServiceAddr, &ServiceConfig> =
            config.services.iter().map(|s| (s.service, s)).collect();
        let current = self.config();
        for old in &current.services {
            match wanted.get(&old.service) {
                Some(new) if same_service_settings(old, new) => {}
                _ => self.remove_service(&old.service)?,
            }
        }
        for new in &config.services {
            let Some(st) = self.services.get(&new.service) else {
                self.add_service(new.clone())?;
                continue;
            };
            // A real whose own check or port changed starts over (health unknown) as a new real.
            let have: Vec<(IpAddr, u32, bool)> = st
                .reals
                .iter()
                .filter(|(a, r)| {
                    new.reals
                        .iter()
                        .any(|n| n.addr == **a && n.port == r.port && n.check == r.check)
                })
                .map(|(a, r)| (*a, r.weight, r.draining))
                .collect();
            let gone: Vec<IpAddr> = st
                .reals
                .keys()
                .filter(|a| !have.iter().any(|(h, _, _)| h == *a))
                .copied()
                .collect();
            for addr in gone {
                self.remove_real(&new.service, addr)?;
            }
            for r in &new.reals {
                let Some((_, weight, draining)) = have.iter().find(|(a, _, _)| *a == r.addr) else {
                    self.add_real(&new.service, r.clone())?;
                    continue;
                };
                if *weight != r.weight {
                    self.set_weight(&new.service, r.addr, r.weight)?;
                }
                if *draining != r.draining {
                    self.set_draining(&new.service, r.addr, r.draining)?;
                }
            }
        }
        Ok(())
    }

    /// A fresh backend id for a real, its counters zeroed (the id may have served another). A
    /// checked real starts `Unknown`: no new flows until its first check answers.
    /// An inherited real keeps its id, generation and counters, and resumes `up` if it was in
    /// the table.
    fn new_real(&mut self, svc: &ServiceConfig, real: &RealConfig) -> Result<RealState> {
        let service_id = self.services[&svc.service].id;
        let checked = real.effective_check(svc).is_some();
        let (backend_id, generation, health) =
            match self.inheritance.reals.remove(&(service_id, real.addr)) {
                Some(r) => (
                    r.id,
                    r.generation,
                    if checked && !r.in_table {
                        Health::Unknown
                    } else {
                        Health::Up
                    },
                ),
                None => {
                    let (id, generation) = self.backend_ids.alloc().with_context(|| {
                        format!("no room for another real (limit {MAX_BACKENDS})")
                    })?;
                    if let Err(e) = self.dp.reset_backend_counters(id) {
                        self.backend_ids.release(id);
                        return Err(e);
                    }
                    let health = if checked { Health::Unknown } else { Health::Up };
                    (id, generation, health)
                }
            };
        Ok(RealState {
            port: real.port,
            weight: real.weight,
            effective_weight: real.weight,
            backend_id,
            generation,
            health,
            draining: real.draining,
            check: real.check.clone(),
        })
    }

    fn write_backend(&mut self, s: &ServiceAddr, addr: IpAddr) -> Result<()> {
        let state = &self.services[s];
        let real = state.real(addr).expect("a real of the service");
        let (bytes, family) = addr_bytes(addr);
        let link = self.link_of(addr);
        // Never forward to an unknown MAC. A real that is down loses its tracked flows too
        // (they re-schedule on their next packet) unless the service keeps them (IPVS-like).
        let failed_over = real.health == Health::Down && state.config.on_down == OnDown::Move;
        let backend = Backend {
            addr: bytes,
            mac: link.map(|l| l.mac).unwrap_or_default(),
            src_mac: link
                .and_then(|l| self.ifaces.get(&l.ifindex).copied())
                .unwrap_or_default(),
            family,
            flags: if link.is_some() && !failed_over {
                BACKEND_F_FORWARD
            } else {
                0
            },
            port: real.port.to_be(),
            ifindex: link.map(|l| l.ifindex).unwrap_or_default(),
            service_id: state.id,
            generation: real.generation,
        };
        self.dp.set_backend(real.backend_id, backend)
    }

    /// The Maglev members of a service: its eligible reals with known MACs, or else its
    /// fallback (if its MAC is known).
    fn table_members(&self, state: &ServiceState) -> Vec<maglev::Member> {
        let member = |addr: &IpAddr, r: &RealState, weight: u32| maglev::Member {
            addr: *addr,
            weight,
            id: r.backend_id,
        };
        let members: Vec<maglev::Member> = state
            .reals
            .iter()
            .filter(|(addr, r)| r.eligible() && self.link_of(**addr).is_some())
            .map(|(addr, r)| member(addr, r, r.effective_weight))
            .collect();
        if !members.is_empty() {
            return members;
        }
        state
            .fallback
            .iter()
            .filter(|(addr, _)| self.link_of(*addr).is_some())
            .map(|(addr, r)| member(addr, r, 1))
            .collect()
    }

    /// Rebuilds the service's Maglev table from its reals and publishes it atomically.
    fn publish_table(&mut self, s: &ServiceAddr) -> Result<()> {
        let state = &self.services[s];
        let table = maglev::build_table(&self.table_members(state), state.config.ring_size);
        self.dp.set_maglev(state.id, &table)
    }

    /// Records what a real's health checks concluded; reprograms the service if that changes
    /// anything. Returns whether it changed.
    pub fn set_health(&mut self, s: &ServiceAddr, addr: IpAddr, health: Health) -> Result<bool> {
        let real = self.real_mut(s, addr)?;
        if real.health == health {
            return Ok(false);
        }
        real.health = health;
        // Going down: out of the table first, then its flows are let go. Coming up: forwarding
        // first, so no new flow meets a backend it may not forward to.
        if health == Health::Up {
            self.write_backend(s, addr)?;
            self.publish_table(s)?;
        } else {
            self.publish_table(s)?;
            self.write_backend(s, addr)?;
        }
        Ok(true)
    }

    /// Sets the weight the table uses for a real (adaptive weighting); republishes if it
    /// changed.
    pub fn set_effective_weight(&mut self, s: &ServiceAddr, addr: IpAddr, w: u32) -> Result<()> {
        let real = self.real_mut(s, addr)?;
        if real.effective_weight == w {
            return Ok(());
        }
        real.effective_weight = w;
        self.publish_table(s)
    }

    /// Drains a real (no new flows; tracked flows go on) or enables it again.
    pub fn set_draining(&mut self, s: &ServiceAddr, addr: IpAddr, draining: bool) -> Result<()> {
        self.real_mut(s, addr)?.draining = draining;
        self.publish_table(s)
    }
}

fn same_service_settings(a: &ServiceConfig, b: &ServiceConfig) -> bool {
    a.check == b.check
        && a.weights == b.weights
        && a.on_down == b.on_down
        && a.fallback == b.fallback
        && a.mode == b.mode
        && a.ring_size == b.ring_size
        && a.hash == b.hash
        && a.tunnel_src == b.tunnel_src
        && a.tunnel_src_prefix == b.tunnel_src_prefix
        && a.encap == b.encap
        && a.gue_port == b.gue_port
        && a.snat == b.snat
}

#[cfg(test)]
mod tests {
    use super::IdPool;

    #[test]
    fn reserved_ids_keep_their_generation_and_are_not_handed_out() {
        let mut pool = IdPool::new(8);
        pool.reserve(3, 7);
        pool.reserve(1, 2);
        let handed: Vec<(u32, u32)> = (0..6).map(|_| pool.alloc().unwrap()).collect();
        assert_eq!(
            handed,
            vec![(4, 1), (5, 1), (6, 1), (7, 1), (0, 1), (2, 1)],
            "fresh ids first, then the gaps below the reserved ones"
        );
        assert_eq!(pool.alloc(), None);
        // A reserved id that is released comes back with its generation bumped.
        pool.release(3);
        assert_eq!(pool.alloc(), Some((3, 8)));
    }
}
