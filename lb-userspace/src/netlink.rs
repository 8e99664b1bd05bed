//! What xlb asks the kernel over rtnetlink: the attached interface (index, MAC, MTU,
//! addresses), the route to a real (its next hop), and the neighbour table (next hops' MACs).
//! The kernel's tables are the source of truth; we only read them and, for a next hop the
//! kernel does not know yet, make it resolve it.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context, Result, bail};
use futures_util::TryStreamExt;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        address::AddressAttribute,
        link::{
            BondMode, BondXmitHashPolicy, InfoBond, InfoData, InfoKind, LinkAttribute, LinkInfo,
            LinkMessage, LinkXdp, XdpAttached,
        },
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
        route::{RouteAddress, RouteAttribute},
    },
};

/// An Ethernet address.
pub type Mac = [u8; 6];

/// `aa:bb:cc:dd:ee:ff`, as `ip neigh` prints it.
pub fn format_mac(mac: &Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub struct Neighbours {
    handle: Handle,
}

/// An interface the balancer is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    pub mac: Mac,
    pub mtu: u32,
}

/// What kind of device an interface is, as far as attaching XDP to it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// A bond: its mode, whether it hashes transmits by VLAN and source MAC (which has no
    /// native XDP), and its members (index, name).
    Bond {
        mode: BondMode,
        vlan_srcmac: bool,
        members: Vec<(u32, String)>,
    },
    /// A VLAN device on `parent`.
    Vlan { parent: String },
    /// Anything else (a NIC, a veth): attached as it is.
    Other,
}

impl Neighbours {
    /// Opens a netlink connection driven by a background task of the current tokio runtime.
    pub fn new() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The XDP program attached to an interface: its id, and whether it runs in generic (skb)
    /// mode rather than in the driver.
    pub async fn xdp_program(&self, ifindex: u32) -> Result<Option<(u32, bool)>> {
        let mut links = self.handle.link().get().match_index(ifindex).execute();
        let Some(link) = links.try_next().await.context("reading the interface")? else {
            bail!("interface {ifindex} disappeared");
        };
        let mut id = None;
        let mut generic = false;
        for attr in &link.attributes {
            if let LinkAttribute::Xdp(xdp) = attr {
                for x in xdp {
                    match x {
                        LinkXdp::ProgId(p) if *p != 0 => id = Some(*p),
                        LinkXdp::Attached(XdpAttached::SocketBuffer) => generic = true,
                        _ => {}
                    }
                }
            }
        }
        Ok(id.map(|id| (id, generic)))
    }

    /// An interface's index (for interfaces without a MAC, such as lo).
    pub async fn interface_index(&self, name: &str) -> Result<u32> {
        Ok(self.link(name).await?.header.index)
    }

    async fn link(&self, name: &str) -> Result<LinkMessage> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link),
            _ => bail!("interface {name} does not exist"),
        }
    }

    /// The interface's index, MAC and MTU; an unknown interface is an error naming it.
    pub async fn interface(&self, name: &str) -> Result<Interface> {
        let link = self.link(name).await?;
        let mac = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(bytes) if bytes.len() == 6 => {
                    Some([bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5]])
                }
                _ => None,
            })
            .with_context(|| format!("interface {name} has no Ethernet address"))?;
        let mtu = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
            .unwrap_or(1500);
        Ok(Interface {
            index: link.header.index,
            mac,
            mtu,
        })
    }

    /// Whether `name` is a bond (with its members), a VLAN device or anything else.
    pub async fn link_kind(&self, name: &str) -> Result<LinkKind> {
        let link = self.link(name).await?;
        let infos = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => Some(infos),
            _ => None,
        });
        let kind = infos.and_then(|i| {
            i.iter().find_map(|i| match i {
                LinkInfo::Kind(kind) => Some(kind.clone()),
                _ => None,
            })
        });
        match kind {
            Some(InfoKind::Bond) => {
                let bond = infos.into_iter().flatten().find_map(|i| match i {
                    LinkInfo::Data(InfoData::Bond(bond)) => Some(bond),
                    _ => None,
                });
                let (mut mode, mut vlan_srcmac) = (BondMode::BalanceRr, false);
                for attr in bond.into_iter().flatten() {
                    match attr {
                        InfoBond::Mode(m) => mode = *m,
                        InfoBond::XmitHashPolicy(p) => {
                            vlan_srcmac = *p == BondXmitHashPolicy::VlanSrcMac
                        }
                        _ => {}
                    }
                }
                let members = self.members(link.header.index).await?;
                Ok(LinkKind::Bond {
                    mode,
                    vlan_srcmac,
                    members,
                })
            }
            Some(InfoKind::Vlan) => {
                let parent = link.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Link(index) => Some(*index),
                    _ => None,
                });
                let parent = match parent {
                    Some(index) => self.link_name(index).await?,
                    None => "its parent".to_string(),
                };
                Ok(LinkKind::Vlan { parent })
            }
            _ => Ok(LinkKind::Other),
        }
    }

    /// The interfaces enslaved to `master` (index, name).
    async fn members(&self, master: u32) -> Result<Vec<(u32, String)>> {
        let mut links = self.handle.link().get().execute();
        let mut members = Vec::new();
        while let Some(link) = links.try_next().await.context("dumping links")? {
            let mut controller = None;
            let mut name = None;
            for attr in &link.attributes {
                match attr {
                    LinkAttribute::Controller(c) => controller = Some(*c),
                    LinkAttribute::IfName(n) => name = Some(n.clone()),
                    _ => {}
                }
            }
            if controller == Some(master) {
                members.push((link.header.index, name.unwrap_or_default()));
            }
        }
        Ok(members)
    }

    async fn link_name(&self, index: u32) -> Result<String> {
        let mut links = self.handle.link().get().match_index(index).execute();
        let link = links
            .try_next()
            .await
            .ok()
            .flatten()
            .with_context(|| format!("no interface with index {index}"))?;
        Ok(link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            })
            .unwrap_or_else(|| format!("interface {index}")))
    }

    /// The interface's first IPv4 address and first global IPv6 address: the default tunnel
    /// sources (what LVS-TUN uses: the director's own address).
    pub async fn primary_addresses(
        &self,
        ifindex: u32,
    ) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>)> {
        let mut v4 = None;
        let mut v6 = None;
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(ifindex)
            .execute();
        while let Some(msg) = stream.try_next().await.context("dumping addresses")? {
            for attr in &msg.attributes {
                match attr {
                    AddressAttribute::Address(IpAddr::V4(a)) if v4.is_none() => v4 = Some(*a),
                    AddressAttribute::Address(IpAddr::V6(a))
                        if v6.is_none() && !a.is_unicast_link_local() =>
                    {
                        v6 = Some(*a)
                    }
                    _ => {}
                }
            }
        }
        Ok((v4, v6))
    }

    /// The kernel's route to `dst` (a FIB lookup, policy routing included): the next hop (the
    /// gateway, or `dst` itself when it is on-link) and the interface it leaves by.
    pub async fn next_hop(&self, dst: IpAddr) -> Result<Option<(IpAddr, u32)>> {
        let prefix = if dst.is_ipv4() { 32 } else { 128 };
        let msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst, prefix)
            .map_err(|e| anyhow::anyhow!("route lookup for {dst}: {e}"))?
            .build();
        let mut stream = self.handle.route().get(msg).execute();
        let route = match stream.try_next().await {
            Ok(Some(r)) => r,
            // No route (ENETUNREACH) is an answer, not a failure.
            Ok(None) | Err(_) => return Ok(None),
        };
        let mut gateway = None;
        let mut oif = None;
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(IpAddr::V4(*a)),
                RouteAttribute::Gateway(RouteAddress::Inet6(a)) => gateway = Some(IpAddr::V6(*a)),
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        Ok(oif.map(|oif| (gateway.unwrap_or(dst), oif)))
    }

    /// Usable (resolved) neighbours: (interface, address) -> MAC.
    pub async fn resolved(&self) -> Result<HashMap<(u32, IpAddr), Mac>> {
        let mut out = HashMap::new();
        let mut stream = self.handle.neighbours().get().execute();
        while let Some(msg) = stream.try_next().await.context("dumping neighbours")? {
            let usable = matches!(
                msg.header.state,
                NeighbourState::Reachable
                    | NeighbourState::Stale
                    | NeighbourState::Delay
                    | NeighbourState::Probe
                    | NeighbourState::Permanent
            );
            if !usable {
                continue;
            }
            let mut addr = None;
            let mut mac = None;
            for attr in &msg.attributes {
                match attr {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                        addr = Some(IpAddr::V4(*a))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                        addr = Some(IpAddr::V6(*a))
                    }
                    NeighbourAttribute::LinkLocalAddress(b) if b.len() == 6 => {
                        mac = Some([b[0], b[1], b[2], b[3], b[4], b[5]])
                    }
                    _ => {}
                }
            }
            if let (Some(a), Some(m)) = (addr, mac) {
                out.insert((msg.header.ifindex, a), m);
            }
        }
        Ok(out)
    }
}

/// Makes the kernel resolve `addr` (ARP or neighbour solicitation) by sending one empty UDP
/// datagram to the discard port: the kernel must resolve the next hop to send it.
pub fn trigger_resolution(addr: IpAddr) {
    let bind: IpAddr = if addr.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    if let Ok(sock) = std::net::UdpSocket::bind((bind, 0)) {
        let _ = sock.send_to(&[], (addr, 9));
    }
}
