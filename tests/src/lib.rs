//! Helpers shared by the packet tests: a frame builder (every header byte under the test's
//! control: VLAN tags, IPv4 options, fragments, IPv6 extension headers), an IP-in-IP
//! encapsulator written independently of the XDP program, and a balancer (or decapsulator)
//! loaded into the kernel for BPF_PROG_TEST_RUN.

pub mod ecmp;
pub mod lab;
pub mod wellformed;

use std::net::IpAddr;

use lb_common::flow_hash;
use xlb::{
    config::{RealConfig, ServiceAddr, ServiceConfig},
    control::{Balancer, Link},
    dataplane::{Dataplane, LoadOptions},
    maglev,
    netlink::Mac,
    realserver::Decapsulator,
};

pub const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0, 0x01];
pub const DIRECTOR_MAC: Mac = [0x02, 0, 0, 0, 0, 0x02];

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// The interface BPF_PROG_TEST_RUN runs a program on: lo, ifindex 1 in every namespace.
pub const TEST_IFINDEX: u32 = 1;

/// Sends `count` copies of `frame` out of interface `ifindex` (of this thread's network
/// namespace) through a packet socket: they arrive on a veth's peer as frames from the wire
/// would.
pub fn inject(ifindex: u32, frame: &[u8], count: u32) -> std::io::Result<()> {
    // SAFETY: plain socket calls on a socket this function owns and closes; `addr` outlives
    // the sendto calls.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        let mut result = Ok(());
        for _ in 0..count {
            let sent = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            if sent != frame.len() as isize {
                result = Err(std::io::Error::last_os_error());
                break;
            }
        }
        libc::close(fd);
        result
    }
}

/// A real reached out of the interface its frames come in on (XDP_TX), at `mac`.
pub fn link(mac: Mac) -> Link {
    Link {
        ifindex: TEST_IFINDEX,
        mac,
    }
}

/// A balancer on a freshly loaded program with a small connection table.
pub fn balancer() -> Balancer {
    balancer_with_capacity(BALANCER_CONN_CAPACITY)
}

/// The connection table's capacity in [`balancer`].
pub const BALANCER_CONN_CAPACITY: u32 = 4096;

/// As [`balancer`], with a connection table of `conn_capacity` flows.
pub fn balancer_with_capacity(conn_capacity: u32) -> Balancer {
    let dp = Dataplane::load(&LoadOptions {
        conn_capacity,
        ..LoadOptions::default()
    })
    .expect("load the XDP program (run as root after scripts/setup)");
    let mut b = Balancer::new(dp);
    b.set_interfaces(&[(TEST_IFINDEX, DIRECTOR_MAC)]).unwrap();
    b
}

/// Adds a DR service of `reals` (weight 100 each, each reached at its `real_mac`).
pub fn add_dr_service(b: &mut Balancer, service: &str, reals: &[&str]) -> ServiceAddr {
    let addr: ServiceAddr = service.parse().unwrap();
    add_service_with_reals(b, ServiceConfig::new(addr), reals, 0);
    addr
}

/// Adds service `cfg` (its mode, SNAT addresses and the like as the caller set them) with
/// `reals` at port `port` (0: the service's own; NAT modes only otherwise), weight 100 each,
/// each reached at its `real_mac`.
pub fn add_service_with_reals(b: &mut Balancer, mut cfg: ServiceConfig, reals: &[&str], port: u16) {
    for r in reals {
        b.set_link(ip(r), Some(link(real_mac(ip(r))))).unwrap();
        cfg.reals.push(RealConfig {
            port,
            ..RealConfig::new(ip(r), 100)
        });
    }
    b.add_service(cfg).unwrap();
}

/// A freshly loaded decapsulator with no VIPs.
pub fn decapsulator() -> Decapsulator {
    Decapsulator::load().expect("load the decapsulator (run as root after scripts/setup)")
}

/// A MAC for a real server, derived from its address so tests can tell reals apart by MAC.
pub fn real_mac(addr: IpAddr) -> Mac {
    let o = match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let n = o.len();
    [0x02, 0xaa, o[n - 4], o[n - 3], o[n - 2], o[n - 1]]
}

#[derive(Clone, Copy, Debug)]
pub enum L4 {
    Tcp {
        flags: u8,
    },
    Udp,
    /// ICMP (IPv4) or ICMPv6 (IPv6): type, code and the header's last four bytes (an error's
    /// MTU or unused field); the frame's payload is the message body (an error's quote).
    Icmp {
        icmp_type: u8,
        code: u8,
        rest: [u8; 4],
    },
}

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

/// A frame to build: addresses, ports and optional oddities.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub l4: L4,
    pub vlan: Option<u16>,
    /// An 802.1ad service tag before the 802.1Q tag (QinQ); needs `vlan`.
    pub outer_vlan: Option<u16>,
    /// IPv4 option bytes (a multiple of 4).
    pub ipv4_options: Vec<u8>,
    /// (identification, fragment offset in 8-byte units, more fragments).
    pub fragment: Option<(u32, u16, bool)>,
    /// IPv6 extension headers before the fragment header and L4, by next-header value
    /// (0 hop-by-hop, 43 routing, 60 destination options), each 8 bytes of padding.
    pub ipv6_ext: Vec<u8>,
    /// IPv4 ToS / IPv6 traffic class.
    pub tos: u8,
    /// IPv4 "don't fragment".
    pub df: bool,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn tcp(src: &str, dst: &str, sport: u16, dport: u16, flags: u8) -> Self {
        Self::new(src, dst, sport, dport, L4::Tcp { flags })
    }

    pub fn udp(src: &str, dst: &str, sport: u16, dport: u16) -> Self {
        Self::new(src, dst, sport, dport, L4::Udp)
    }

    /// An ICMP (IPv4) or ICMPv6 (IPv6) message with `body` after its 8-byte header.
    pub fn icmp(src: &str, dst: &str, icmp_type: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Self {
        let l4 = L4::Icmp {
            icmp_type,
            code,
            rest,
        };
        Self {
            payload: body.to_vec(),
            ..Self::new(src, dst, 0, 0, l4)
        }
    }

    fn new(src: &str, dst: &str, sport: u16, dport: u16, l4: L4) -> Self {
        Self {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            sport,
            dport,
            l4,
            vlan: None,
            outer_vlan: None,
            ipv4_options: Vec::new(),
            fragment: None,
            ipv6_ext: Vec::new(),
            tos: 0,
            df: false,
            payload: b"hello xlb".to_vec(),
        }
    }

    pub fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => 6,
            L4::Udp => 17,
            L4::Icmp { .. } if self.src.is_ipv4() => 1,
            L4::Icmp { .. } => 58,
        }
    }

    /// The L4 segment (header + payload) with a correct checksum.
    fn segment(&self) -> Vec<u8> {
        let mut seg = Vec::new();
        if let L4::Icmp {
            icmp_type,
            code,
            rest,
        } = self.l4
        {
            seg.extend_from_slice(&[icmp_type, code, 0, 0]);
            seg.extend_from_slice(&rest);
            seg.extend_from_slice(&self.payload);
            // ICMP sums the message alone; ICMPv6 adds the pseudo-header.
            let sum = match (self.src, self.dst) {
                (IpAddr::V4(_), _) => checksum(&seg),
                (src, dst) => icmpv6_checksum(src, dst, &seg),
            };
            seg[2..4].copy_from_slice(&sum.to_be_bytes());
            return seg;
        }
        seg.extend_from_slice(&self.sport.to_be_bytes());
        seg.extend_from_slice(&self.dport.to_be_bytes());
        match self.l4 {
            L4::Tcp { flags } => {
                seg.extend_from_slice(&1000u32.to_be_bytes());
                seg.extend_from_slice(&(if flags & ACK != 0 { 2000u32 } else { 0 }).to_be_bytes());
                seg.push(5 << 4);
                seg.push(flags);
                seg.extend_from_slice(&64240u16.to_be_bytes());
                seg.extend_from_slice(&[0, 0, 0, 0]);
            }
            L4::Udp => {
                seg.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                seg.extend_from_slice(&[0, 0]);
            }
            L4::Icmp { .. } => unreachable!("built above"),
        }
        seg.extend_from_slice(&self.payload);
        let mut pseudo = Vec::new();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                pseudo.extend_from_slice(&s.octets());
                pseudo.extend_from_slice(&d.octets());
                pseudo.extend_from_slice(&[0, self.proto()]);
                pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                pseudo.extend_from_slice(&s.octets());
                pseudo.extend_from_slice(&d.octets());
                pseudo.extend_from_slice(&(seg.len() as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, self.proto()]);
            }
            _ => panic!("mixed address families"),
        }
        pseudo.extend_from_slice(&seg);
        let mut sum = checksum(&pseudo);
        // A computed UDP checksum of 0 is sent as all ones: 0 means "none" (RFC 768).
        if sum == 0 && matches!(self.l4, L4::Udp) {
            sum = 0xffff;
        }
        let at = if matches!(self.l4, L4::Tcp { .. }) {
            16
        } else {
            6
        };
        seg[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        seg
    }

    /// The IP payload: the whole segment, or for a later fragment just payload bytes.
    fn ip_payload(&self) -> Vec<u8> {
        match self.fragment {
            Some((_, offset, _)) if offset > 0 => self.payload.clone(),
            _ => self.segment(),
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&DIRECTOR_MAC);
        f.extend_from_slice(&CLIENT_MAC);
        let ether_type: u16 = if self.src.is_ipv4() { 0x0800 } else { 0x86dd };
        if let Some(vid) = self.outer_vlan {
            f.extend_from_slice(&0x88a8u16.to_be_bytes());
            f.extend_from_slice(&vid.to_be_bytes());
        }
        if let Some(vid) = self.vlan {
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&vid.to_be_bytes());
        }
        f.extend_from_slice(&ether_type.to_be_bytes());
        let payload = self.ip_payload();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let ihl = 20 + self.ipv4_options.len();
                assert_eq!(ihl % 4, 0);
                let mut h = vec![0x40 | (ihl / 4) as u8, self.tos];
                h.extend_from_slice(&((ihl + payload.len()) as u16).to_be_bytes());
                let (id, offset, more) = self.fragment.unwrap_or((0x1234, 0, false));
                h.extend_from_slice(&(id as u16).to_be_bytes());
                let frag =
                    offset | if more { 0x2000 } else { 0 } | if self.df { 0x4000 } else { 0 };
                h.extend_from_slice(&frag.to_be_bytes());
                h.extend_from_slice(&[64, self.proto(), 0, 0]);
                h.extend_from_slice(&s.octets());
                h.extend_from_slice(&d.octets());
                h.extend_from_slice(&self.ipv4_options);
                let sum = checksum(&h);
                h[10..12].copy_from_slice(&sum.to_be_bytes());
                f.extend_from_slice(&h);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let frag_len = if self.fragment.is_some() { 8 } else { 0 };
                let ext_len = 8 * self.ipv6_ext.len() + frag_len;
                // The chain: extension headers, the fragment header, then L4.
                let mut chain = self.ipv6_ext.clone();
                if self.fragment.is_some() {
                    chain.push(44);
                }
                chain.push(self.proto());
                f.extend_from_slice(&[0x60 | self.tos >> 4, self.tos << 4, 0, 0]);
                f.extend_from_slice(&((payload.len() + ext_len) as u16).to_be_bytes());
                f.push(chain[0]);
                f.push(64);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                for (kind, next) in self.ipv6_ext.iter().zip(&chain[1..]) {
                    if *kind == 43 {
                        // Routing type 0 with no segments left: ignored by every node.
                        f.extend_from_slice(&[*next, 0, 0, 0, 0, 0, 0, 0]);
                    } else {
                        // Options: one PadN covering the six bytes.
                        f.extend_from_slice(&[*next, 0, 1, 4, 0, 0, 0, 0]);
                    }
                }
                if let Some((id, offset, more)) = self.fragment {
                    f.extend_from_slice(&[self.proto(), 0]);
                    f.extend_from_slice(&(offset << 3 | more as u16).to_be_bytes());
                    f.extend_from_slice(&id.to_be_bytes());
                }
            }
            _ => panic!("mixed address families"),
        }
        f.extend_from_slice(&payload);
        f
    }
}

/// The Internet checksum (RFC 1071).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += word as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The L2 header length of a frame (one VLAN tag at most, as the balancer parses).
pub fn l2_len(frame: &[u8]) -> usize {
    if frame[12..14] == [0x81, 0x00] || frame[12..14] == [0x88, 0xa8] {
        18
    } else {
        14
    }
}

/// An outer IP header as RFC 2003 (IPIP) and RFC 2473 (IP6IP6) describe it, built here
/// independently of the XDP program: the expected bytes of TUN tests, and the input of
/// decapsulator tests. `inner_len` is the inner datagram's length.
pub fn outer_header(
    src: IpAddr,
    dst: IpAddr,
    tos: u8,
    flow_label: u32,
    inner_len: usize,
) -> Vec<u8> {
    let proto = if src.is_ipv4() { 4 } else { 41 };
    ip_header(src, dst, tos, flow_label, proto, inner_len)
}

/// An outer IPv4 header (no options, DF, id 0, TTL 64, checksum) or IPv6 header (hop limit
/// 64) carrying `payload_len` bytes of protocol `proto`.
fn ip_header(
    src: IpAddr,
    dst: IpAddr,
    tos: u8,
    flow_label: u32,
    proto: u8,
    payload_len: usize,
) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = vec![0x45, tos];
            h.extend_from_slice(&((20 + payload_len) as u16).to_be_bytes());
            h.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            let sum = checksum(&h);
            h[10..12].copy_from_slice(&sum.to_be_bytes());
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut h = vec![
                0x60 | tos >> 4,
                tos << 4 | (flow_label >> 16) as u8 & 0x0f,
                (flow_label >> 8) as u8,
                flow_label as u8,
            ];
            h.extend_from_slice(&(payload_len as u16).to_be_bytes());
            h.extend_from_slice(&[proto, 64]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h
        }
        _ => panic!("mixed outer address families"),
    }
}

/// A tunnel's outer headers as the RFCs describe them, for any pair of families (IPIP, IP6IP6,
/// 4in6) and for GUE (RFC draft "direct IP encapsulation": UDP right before the inner packet)
/// when `gue` gives (source port, destination port). `inner` is the inner datagram, exactly
/// its header's length. The GUE UDP checksum is zero over IPv4; over IPv6 it is summed here
/// over every byte, independently of how the program gets it.
pub fn tunnel_header(
    src: IpAddr,
    dst: IpAddr,
    tos: u8,
    flow_label: u32,
    inner: &[u8],
    gue: Option<(u16, u16)>,
) -> Vec<u8> {
    let inner_proto = if inner[0] >> 4 == 4 { 4 } else { 41 };
    let udp_len = 8 + inner.len();
    let Some((sport, dport)) = gue else {
        return ip_header(src, dst, tos, flow_label, inner_proto, inner.len());
    };
    let mut udp = Vec::new();
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    if let (IpAddr::V6(s), IpAddr::V6(d)) = (src, dst) {
        let mut pseudo = s.octets().to_vec();
        pseudo.extend_from_slice(&d.octets());
        pseudo.extend_from_slice(&(udp_len as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 17]);
        pseudo.extend_from_slice(&udp);
        pseudo.extend_from_slice(inner);
        let sum = match checksum(&pseudo) {
            0 => 0xffff,
            s => s,
        };
        udp[6..8].copy_from_slice(&sum.to_be_bytes());
    }
    let mut h = ip_header(src, dst, tos, flow_label, 17, udp_len);
    h.extend_from_slice(&udp);
    h
}

/// The GUE source port the director derives from a flow hash: the ephemeral range.
pub fn gue_sport(hash: u32) -> u16 {
    0xc000 | (hash & 0x3fff) as u16
}

/// Sets a frame's EtherType (after its tag, if any).
pub fn set_ether_type(frame: &mut [u8], ether_type: u16) {
    let l2 = l2_len(frame);
    frame[l2 - 2..l2].copy_from_slice(&ether_type.to_be_bytes());
}

/// The inner datagram's length from its own header (IPv4 total length, IPv6 payload + 40).
pub fn ip_len(l3: &[u8]) -> usize {
    if l3[0] >> 4 == 4 {
        u16::from_be_bytes([l3[2], l3[3]]) as usize
    } else {
        40 + u16::from_be_bytes([l3[4], l3[5]]) as usize
    }
}

/// `frame` encapsulated: its L2 header with new MACs, an outer header, then its IP packet
/// (and any Ethernet padding) unchanged.
pub fn encapsulate(frame: &[u8], dst_mac: Mac, src_mac: Mac, outer: &[u8]) -> Vec<u8> {
    let l2 = l2_len(frame);
    let mut out = dst_mac.to_vec();
    out.extend_from_slice(&src_mac);
    out.extend_from_slice(&frame[12..l2]);
    out.extend_from_slice(outer);
    out.extend_from_slice(&frame[l2..]);
    out
}

/// The ICMPv6 checksum of `msg` (checksum field included) from `src` to `dst`: 0 when right.
pub fn icmpv6_checksum(src: IpAddr, dst: IpAddr, msg: &[u8]) -> u16 {
    let (IpAddr::V6(s), IpAddr::V6(d)) = (src, dst) else {
        panic!("ICMPv6 needs IPv6 addresses");
    };
    let mut pseudo = s.octets().to_vec();
    pseudo.extend_from_slice(&d.octets());
    pseudo.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(msg);
    checksum(&pseudo)
}

/// An ARP request (who has `target` tell `sender`).
pub fn arp_request(sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&sender);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f.resize(60, 0);
    f
}

fn words(addr: IpAddr) -> Vec<u32> {
    let mut b = [0u8; 16];
    match addr {
        IpAddr::V4(a) => b[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => b.copy_from_slice(&a.octets()),
    }
    (0..4)
        .map(|i| u32::from_ne_bytes(b[i * 4..i * 4 + 4].try_into().unwrap()))
        .collect()
}

/// The flow hash the kernel computes for a 5-tuple service (mirrors lb-ebpf's maglev.rs).
pub fn five_tuple_hash(f: &Frame, with_ports: bool) -> u32 {
    let (s, d) = (words(f.src), words(f.dst));
    let ports = if with_ports {
        (f.sport.to_be() as u32) << 16 | f.dport.to_be() as u32
    } else {
        0
    };
    let proto = f.proto() as u32;
    if f.src.is_ipv4() {
        flow_hash(&[s[0], d[0], ports, proto])
    } else {
        flow_hash(&[s[0], s[1], s[2], s[3], d[0], d[1], d[2], d[3], ports, proto])
    }
}

/// The hash whose bits a TUN service's outer headers carry (GUE source port, IPv6 flow label,
/// tunnel-source host bits): the low half of the connection table's hash of the 5-tuple,
/// ports left out for fragments (mirrors lb-ebpf's maglev.rs `outer_hash`).
pub fn outer_hash(f: &Frame, with_ports: bool) -> u32 {
    let mut key = conn_key(f);
    if !with_ports {
        (key.sport, key.dport) = (0, 0);
    }
    key.hashes()[0]
}

/// The frame's flow as the connection table keys it (`ConnKey::hashes`).
pub fn conn_key(f: &Frame) -> lb_common::ConnKey {
    let mut key = lb_common::ConnKey {
        sport: f.sport.to_be(),
        dport: f.dport.to_be(),
        proto: f.proto(),
        ..Default::default()
    };
    match (f.src, f.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            key.family = lb_common::FAMILY_V4;
            key.src[..4].copy_from_slice(&s.octets());
            key.dst[..4].copy_from_slice(&d.octets());
        }
        (s, d) => {
            key.family = lb_common::FAMILY_V6;
            key.src = match s {
                IpAddr::V6(a) => a.octets(),
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            };
            key.dst = match d {
                IpAddr::V6(a) => a.octets(),
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            };
        }
    }
    key
}

/// An address written in a test.
pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Reals of equal weight (100), as `predict` takes them.
pub fn equal_weight(reals: &[&str]) -> Vec<(IpAddr, u32)> {
    reals.iter().map(|r| (ip(r), 100)).collect()
}

/// The Maglev table the control plane builds for `reals` (address, weight); slots hold indexes
/// into `reals`.
fn table(reals: &[(IpAddr, u32)], ring: u32) -> Vec<u32> {
    let members: Vec<maglev::Member> = reals
        .iter()
        .enumerate()
        .map(|(i, (addr, weight))| maglev::Member {
            addr: *addr,
            weight: *weight,
            id: i as u32,
        })
        .collect();
    maglev::build_table(&members, ring)
}

/// The real a fresh flow lands on, predicted from the same Maglev table the control plane
/// builds: `reals` are (address, weight).
pub fn predict(reals: &[(IpAddr, u32)], ring: u32, hash: u32) -> IpAddr {
    let table = table(reals, ring);
    reals[table[(hash % ring) as usize] as usize].0
}

/// Where a flow refused by `not` is re-scheduled (mirrors lb-ebpf's `maglev::pick_other`):
/// the first real other than `not` in the Maglev table from the flow's own slot on, within
/// `REFUSAL_PROBES` slots, every real usable.
pub fn predict_other(reals: &[(IpAddr, u32)], ring: u32, hash: u32, not: IpAddr) -> Option<IpAddr> {
    let table = table(reals, ring);
    (0..lb_common::REFUSAL_PROBES)
        .map(|i| table[((hash % ring + i) % ring) as usize])
        .filter(|&id| id != lb_common::NO_BACKEND)
        .map(|id| reals[id as usize].0)
        .find(|&a| a != not)
}
