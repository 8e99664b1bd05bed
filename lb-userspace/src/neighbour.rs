//! Neighbour resolution over rtnetlink: the MACs of DR reals and of the attached interface.
//! The kernel's own neighbour table is the source of truth; we only read it and, for a real it
//! does not know yet, make the kernel resolve it.

use std::{collections::HashMap, net::IpAddr};

use anyhow::{Context, Result, bail};
use futures_util::TryStreamExt;
use rtnetlink::{
    Handle,
    packet_route::{
        link::LinkAttribute,
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
    },
};

use crate::balancer::Mac;

pub struct Neighbours {
    handle: Handle,
}

impl Neighbours {
    /// Opens a netlink connection driven by a background task of the current tokio runtime.
    pub fn new() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// The interface's index and MAC; an unknown interface is an error naming it.
    pub async fn interface(&self, name: &str) -> Result<(u32, Mac)> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        let link = match links.try_next().await {
            Ok(Some(link)) => link,
            _ => bail!("interface {name} does not exist"),
        };
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
        Ok((link.header.index, mac))
    }

    /// Usable (resolved) neighbours on one interface: address -> MAC.
    pub async fn resolved(&self, ifindex: u32) -> Result<HashMap<IpAddr, Mac>> {
        let mut out = HashMap::new();
        let mut stream = self.handle.neighbours().get().execute();
        while let Some(msg) = stream.try_next().await.context("dumping neighbours")? {
            if msg.header.ifindex != ifindex {
                continue;
            }
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
                out.insert(a, m);
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
