//! A NAT flow's state as connection sync reads it on one director and installs it on another:
//! the one place userspace writes the reply table (`NAT_REPLIES`) and the full-NAT sources
//! (`FULLNAT_FLOWS`) the way lb-ebpf's nat.rs records a flow; and the IPv4 reply cache
//! (`NAT_REPLY_CACHE`, lb-ebpf's reply_cache.rs) as the control plane sees it.

use anyhow::Result;
use aya::maps::{Array, HashMap, MapError};
use lb_common::{
    FAMILY_V4, NatKey, NatReply, NatReplyBody, NatReplyWay, SnatEndpoint, nat_reply_cache_way,
};

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
        self.cache_replies(&[(key, reply)])?;
        if let Some(snat) = snat {
            let mut flows: HashMap<_, NatKey, SnatEndpoint> =
                HashMap::try_from(self.map_mut("FULLNAT_FLOWS")?)?;
            flows.insert(f.flow, snat, 0)?;
        }
        Ok(true)
    }
}

/// Whether `way` holds a copy of `key`'s (IPv4) reply entry: the data path's own test.
fn way_holds(way: &NatReplyWay, key: &NatKey) -> bool {
    let four = |a: &[u8; 16]| [a[0], a[1], a[2], a[3]];
    way.body.is_for(
        &four(&key.src),
        &four(&key.dst),
        key.sport,
        key.dport,
        key.proto,
    )
}

impl Dataplane {
    /// The ways (index, content) of an IPv4 tuple's bucket in the reply cache, as read now
    /// (None for IPv6, which is not cached).
    pub fn cached_ways(&self, key: &NatKey) -> Result<Option<[(u32, NatReplyWay); 2]>> {
        if key.family != FAMILY_V4 {
            return Ok(None);
        }
        let cache: Array<_, NatReplyWay> = Array::try_from(self.map("NAT_REPLY_CACHE")?)?;
        let first = nat_reply_cache_way(key.hashes());
        Ok(Some([
            (first, cache.get(&first, 0)?),
            (first + 1, cache.get(&(first + 1), 0)?),
        ]))
    }

    /// When a reply last found `key`'s translation in the reply cache: the cache's copy's
    /// `last_seen_s` (replies found there do not refresh the reply table's). None without a
    /// whole copy.
    pub fn cached_reply_seen(&self, key: &NatKey) -> Result<Option<u32>> {
        Ok(self.cached_ways(key)?.and_then(|ways| {
            ways.iter()
                .find(|(_, w)| way_holds(w, key) && w.seal == w.body.seal())
                .map(|(_, w)| w.last_seen_s)
        }))
    }

    /// Copies reply entries just written into the reply cache (IPv4 ones), as the data path
    /// does when it records a flow: into the way holding the tuple, else into its bucket's way
    /// seen least recently. A copy the data path writes into the same way meanwhile is torn,
    /// and its seal refuses it.
    pub fn cache_replies(&mut self, entries: &[(NatKey, NatReply)]) -> Result<()> {
        for (key, reply) in entries {
            let Some([(a, way_a), (b, way_b)]) = self.cached_ways(key)? else {
                continue;
            };
            let i = if way_holds(&way_a, key) {
                a
            } else if way_holds(&way_b, key) || way_b.last_seen_s < way_a.last_seen_s {
                b
            } else {
                a
            };
            let body = NatReplyBody::of(key, reply);
            let way = NatReplyWay {
                seal: body.seal(),
                last_seen_s: reply.last_seen_s,
                body,
                _pad: [0; 12],
            };
            self.set_cached_way(i, way)?;
        }
        Ok(())
    }

    /// Writes way `i` of the reply cache whole (tests write torn ways with it).
    pub fn set_cached_way(&mut self, i: u32, way: NatReplyWay) -> Result<()> {
        let mut cache: Array<_, NatReplyWay> = Array::try_from(self.map_mut("NAT_REPLY_CACHE")?)?;
        cache.set(i, way, 0)?;
        Ok(())
    }

    /// Removes the reply cache's copies of these tuples' entries: called after their reply
    /// entries were deleted, so that no reply is translated with a copy the reply table no
    /// longer holds.
    pub fn forget_cached_replies(&mut self, keys: &[NatKey]) -> Result<()> {
        for key in keys {
            let Some(ways) = self.cached_ways(key)? else {
                continue;
            };
            for (i, way) in ways {
                if way_holds(&way, key) {
                    // A whole way of zeros: a copy the data path writes meanwhile is torn, and
                    // its seal refuses it.
                    self.set_cached_way(i, NatReplyWay::default())?;
                }
            }
        }
        Ok(())
    }
}
