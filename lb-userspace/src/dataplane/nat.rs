//! A NAT flow's state as connection sync reads it on one director and installs it on another:
//! the one place userspace writes the reply table (`NAT_REPLIES`) and the full-NAT sources
//! (`FULLNAT_FLOWS`) the way lb-ebpf's nat.rs records a flow.

use anyhow::Result;
use aya::maps::{HashMap, MapError};
use lb_common::{NatKey, NatReply, SnatEndpoint};

use super::Dataplane;
use crate::netlink::Mac;

/// A NAT flow by its ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatFlow {
    /// The client's tuple (client to VIP; ports in network byte order): the connection
    /// table's key, and `FULLNAT_FLOWS`'.
    pub flow: NatKey,
    /// The real the requests go to, and its port (network byte order).
    pub real: [u8; 16],
    pub real_port: u16,
}

impl NatFlow {
    /// The tuple its real's replies carry: to the client (NAT) or to the SNAT endpoint.
    fn reply_key(&self, snat: Option<&SnatEndpoint>) -> NatKey {
        let (dst, dport) = match snat {
            Some(s) => (s.addr, s.port),
            None => (self.flow.src, self.flow.sport),
        };
        NatKey {
            src: self.real,
            dst,
            sport: self.real_port,
            dport,
            ..self.flow
        }
    }

    fn is_of(&self, reply: &NatReply) -> bool {
        reply.client == self.flow.src && reply.client_port == self.flow.sport
    }
}

/// How a flow's replies leave this director: out of `ifindex`, from `src_mac`, to `mac`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyPath {
    pub ifindex: u32,
    pub src_mac: Mac,
    pub mac: Mac,
}

fn found<V>(got: Result<V, MapError>) -> Result<Option<V>> {
    match got {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl Dataplane {
    /// What the data path holds of a NAT flow (`fullnat`: with its SNAT endpoint): the
    /// neighbour its replies go to and its SNAT endpoint. None when its entries are gone (or a
    /// later flow's).
    pub fn nat_state(
        &self,
        f: &NatFlow,
        fullnat: bool,
    ) -> Result<Option<(Mac, Option<SnatEndpoint>)>> {
        let snat = if fullnat {
            let flows: HashMap<_, NatKey, SnatEndpoint> =
                HashMap::try_from(self.map("FULLNAT_FLOWS")?)?;
            match found(flows.get(&f.flow, 0))? {
                Some(s) => Some(s),
                None => return Ok(None),
            }
        } else {
            None
        };
        let replies: HashMap<_, NatKey, NatReply> = HashMap::try_from(self.map("NAT_REPLIES")?)?;
        Ok(found(replies.get(&f.reply_key(snat.as_ref()), 0))?
            .filter(|r| f.is_of(r))
            .map(|r| (r.mac, snat)))
    }

    /// Records a NAT flow as the data path does when it schedules it: its reply entry (sent
    /// back along `path`), and for full NAT its SNAT endpoint, which the reply entry also
    /// keeps from being handed to another flow to the same real (the data path claims an
    /// endpoint by inserting its reply entry only where none is). Returns false, writing
    /// nothing, when that reply tuple is another client's flow here.
    pub fn install_nat_flow(
        &mut self,
        f: &NatFlow,
        snat: Option<SnatEndpoint>,
        path: ReplyPath,
        last_seen_s: u32,
        flags: u16,
    ) -> Result<bool> {
        let key = f.reply_key(snat.as_ref());
        let mut replies: HashMap<_, NatKey, NatReply> =
            HashMap::try_from(self.map_mut("NAT_REPLIES")?)?;
        if found(replies.get(&key, 0))?.is_some_and(|r| !f.is_of(&r)) {
            return Ok(false);
        }
        let reply = NatReply {
            vip: f.flow.dst,
            client: f.flow.src,
            vport: f.flow.dport,
            client_port: f.flow.sport,
            mac: path.mac,
            src_mac: path.src_mac,
            ifindex: path.ifindex,
            last_seen_s,
            flags,
            _pad: [0; 2],
        };
        replies.insert(key, reply, 0)?;
        if let Some(snat) = snat {
            let mut flows: HashMap<_, NatKey, SnatEndpoint> =
                HashMap::try_from(self.map_mut("FULLNAT_FLOWS")?)?;
            flows.insert(f.flow, snat, 0)?;
        }
        Ok(true)
    }
}
