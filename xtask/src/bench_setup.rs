//! The balancer both data-path benches measure (`bench`: per-packet cost under
//! BPF_PROG_TEST_RUN, `bench_rate`: forwarding rate over a veth pair), its flows, and the CPU
//! pinning they share. Synthetic addresses, as in the packet tests: no lab is involved.

use anyhow::{Result, ensure};
use xlb::{
    config::{Encap, Mode, RealConfig, ServiceAddr, ServiceConfig},
    control::{Balancer, Link},
    dataplane::BALANCER_PROGRAM,
    netlink::Mac,
};
use xlb_tests::{ACK, Frame, SYN, XDP_TX, link, real_mac};

pub const CLIENT4: &str = "198.18.1.1";
pub const CLIENT6: &str = "fd00:18:1::1";
const SERVICE4: &str = "198.18.0.100:80/tcp";
const SERVICE6: &str = "[fd00:18::100]:80/tcp";
const REALS4: [&str; 3] = ["198.18.0.11", "198.18.0.12", "198.18.0.13"];
const REALS6: [&str; 3] = ["fd00:18::11", "fd00:18::12", "fd00:18::13"];
/// TUN services: same reals' count, behind one router; the director's MTU check is on.
const TUN_SERVICE4: &str = "198.18.0.101:80/tcp";
const TUN_SERVICE6: &str = "[fd00:18::101]:80/tcp";
pub const TUN_REALS4: [&str; 3] = ["10.1.0.11", "10.1.0.12", "10.1.0.13"];
pub const TUN_REALS6: [&str; 3] = ["fd00:1::11", "fd00:1::12", "fd00:1::13"];
pub const TUN_SRC4: &str = "198.18.0.2";
const TUN_SRC6: &str = "fd00:18::2";
/// GUE services (over IPv4, over IPv6) and an IPv4 service over the IPv6 reals (4in6).
const GUE_SERVICE4: &str = "198.18.0.102:80/tcp";
const GUE_SERVICE6: &str = "[fd00:18::102]:80/tcp";
const TUN4IN6_SERVICE: &str = "198.18.0.103:80/tcp";
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
/// The NAT director's services (`nat_balancer`).
pub const NAT_VIP4: &str = "198.18.0.110";
pub const FULLNAT_VIP4: &str = "198.18.0.111";
const NAT_SERVICE4: &str = "198.18.0.110:80/tcp";
const FULLNAT_SERVICE4: &str = "198.18.0.111:80/tcp";
/// Four SNAT addresses: room for the 100,000 full-NAT flows of bench_flows.rs (64,512 ports
/// per real and address) with few taken ports met on the way.
const SNAT4: [&str; 4] = ["198.18.0.50", "198.18.0.51", "198.18.0.52", "198.18.0.53"];
const NAT_REAL_PORT: u16 = 8080;
pub const MTU: u32 = 1500;

/// Pins this thread to CPU 1 (CPU 0 takes most interrupts) or CPU 0 on a single-CPU machine:
/// a test run executes on the caller's CPU, so a migration would show up in the samples.
pub fn pin_to_one_cpu() -> Result<usize> {
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let cpu = if online >= 2 { 1 } else { 0 };
    xlb::dataplane::pin_to_cpu(cpu)?;
    Ok(cpu)
}

/// The balancer the packet tests use, with one IPv4 and one IPv6 TCP service of 3 reals each
/// in DR mode, and the same in TUN mode (on other VIPs) with the MTU check on: IPIP, GUE, and
/// 4in6.
pub fn balancer_with_services() -> Result<Balancer> {
    services(xlb_tests::balancer())
}

/// As [`balancer_with_services`], with a connection table of `conn_capacity` flows.
pub fn balancer_with_capacity(conn_capacity: u32) -> Result<Balancer> {
    services(xlb_tests::balancer_with_capacity(conn_capacity))
}

fn services(mut b: Balancer) -> Result<Balancer> {
    b.set_default_tunnel_sources(Some(TUN_SRC4.parse()?), Some(TUN_SRC6.parse()?));
    b.set_mtu(MTU)?;
    for (service, reals, mode, encap, tunnel_src) in [
        (SERVICE4, &REALS4, Mode::Dr, Encap::Ipip, None),
        (SERVICE6, &REALS6, Mode::Dr, Encap::Ipip, None),
        (TUN_SERVICE4, &TUN_REALS4, Mode::Tun, Encap::Ipip, None),
        (TUN_SERVICE6, &TUN_REALS6, Mode::Tun, Encap::Ipip, None),
        (GUE_SERVICE4, &TUN_REALS4, Mode::Tun, Encap::Gue, None),
        (GUE_SERVICE6, &TUN_REALS6, Mode::Tun, Encap::Gue, None),
        (
            TUN4IN6_SERVICE,
            &TUN_REALS6,
            Mode::Tun,
            Encap::Ipip,
            Some(TUN_SRC6),
        ),
    ] {
        let addr: ServiceAddr = service.parse()?;
        let mut cfg = ServiceConfig::new(addr);
        cfg.mode = mode;
        cfg.encap = encap;
        cfg.tunnel_src = tunnel_src.map(str::parse).transpose()?;
        for real in reals {
            let addr = real.parse()?;
            let mac = match mode {
                Mode::Tun => ROUTER_MAC,
                Mode::Dr | Mode::Nat | Mode::Fullnat => real_mac(addr),
            };
            b.set_link(addr, Some(link(mac)))?;
            cfg.reals.push(RealConfig::new(addr, 100));
        }
        b.add_service(cfg)?;
    }
    Ok(b)
}

/// A NAT director's balancer (its own load: with a NAT service, every frame is first looked
/// up as a possible NAT reply, which a DR-only director never pays): a NAT service and a
/// full-NAT service over the DR reals, each real at port 8080.
pub fn nat_balancer() -> Result<Balancer> {
    nat_balancer_with_capacity(xlb_tests::BALANCER_CONN_CAPACITY)
}

/// As [`nat_balancer`], with a connection table of `conn_capacity` flows.
pub fn nat_balancer_with_capacity(conn_capacity: u32) -> Result<Balancer> {
    let mut b = xlb_tests::balancer_with_capacity(conn_capacity);
    for (service, mode) in [(NAT_SERVICE4, Mode::Nat), (FULLNAT_SERVICE4, Mode::Fullnat)] {
        let mut cfg = ServiceConfig::new(service.parse()?);
        cfg.mode = mode;
        if mode == Mode::Fullnat {
            cfg.snat = SNAT4.iter().map(|a| a.parse()).collect::<Result<_, _>>()?;
        }
        for real in REALS4 {
            let addr = real.parse()?;
            b.set_link(addr, Some(link(real_mac(addr))))?;
            cfg.reals.push(RealConfig {
                port: NAT_REAL_PORT,
                ..RealConfig::new(addr, 100)
            });
        }
        b.add_service(cfg)?;
    }
    Ok(b)
}

/// A NAT flow's request path and reply path, once established on `b`: the client's ACK, and
/// the real's answer to it as it reaches the director (what the SYN's rewrite says: the real,
/// and for full NAT the SNAT address and port).
/// `ingress`: the interface the flow's first packets arrive on (lo if None), where its
/// replies then leave.
pub fn establish_nat(
    b: &mut Balancer,
    vip: &str,
    sport: u16,
    ingress: Option<u32>,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let ack = establish_on(b, CLIENT4, vip, sport, ingress)?;
    let (_, sent) = b.dataplane().test_run_on(BALANCER_PROGRAM, &ack, ingress)?;
    Ok((ack, reply_to(&sent)))
}

/// The real's answer (an ACK) to a NAT request as the director sent it (`sent`: IPv4 without
/// options), as it reaches the director: from the real to the request's source, ports swapped.
pub fn reply_to(sent: &[u8]) -> Vec<u8> {
    // Addresses at 26..34, ports at 34..38.
    let addr =
        |at: usize| std::net::Ipv4Addr::new(sent[at], sent[at + 1], sent[at + 2], sent[at + 3]);
    let port = |at: usize| u16::from_be_bytes([sent[at], sent[at + 1]]);
    let (src, dst, sport, dport) = (addr(26), addr(30), port(34), port(36));
    let mut reply = Frame::tcp(&dst.to_string(), &src.to_string(), dport, sport, ACK).bytes();
    reply[6..12].copy_from_slice(&real_mac(dst.into()));
    reply
}

/// Points the balancer's maps at `ifaces` (ifindex, MAC) and reaches every real through
/// `ifindex`, except the IPv4 DR service's, reached through `dr4_ifindex`. Flows established
/// under BPF_PROG_TEST_RUN keep their reals.
pub fn move_reals(
    b: &mut Balancer,
    ifaces: &[(u32, Mac)],
    ifindex: u32,
    dr4_ifindex: u32,
) -> Result<()> {
    let reals = REALS4
        .iter()
        .chain(&REALS6)
        .chain(&TUN_REALS4)
        .chain(&TUN_REALS6);
    let mut links = Vec::new();
    for real in reals {
        let addr = real.parse()?;
        // The NAT director has the IPv4 DR reals only.
        let Some(link) = b.link_of(addr) else {
            continue;
        };
        let ifindex = if REALS4.contains(real) {
            dr4_ifindex
        } else {
            ifindex
        };
        links.push((addr, Link { ifindex, ..link }));
    }
    b.set_interfaces(ifaces)?;
    for (addr, link) in links {
        b.set_link(addr, Some(link))?;
    }
    Ok(())
}

/// Sends the SYN of a flow to port 80 and returns its ACK frame, after checking the SYN
/// recorded the flow (otherwise the ACK would measure the new-flow path).
pub fn establish(b: &mut Balancer, client: &str, vip: &str, sport: u16) -> Result<Vec<u8>> {
    establish_on(b, client, vip, sport, None)
}

/// `establish`, the SYN arriving on the interface `ingress` (lo if None).
pub fn establish_on(
    b: &mut Balancer,
    client: &str,
    vip: &str,
    sport: u16,
    ingress: Option<u32>,
) -> Result<Vec<u8>> {
    let key = xlb_tests::conn_key(&Frame::tcp(client, vip, sport, 80, SYN));
    ensure!(
        b.dataplane().conn(&key)?.is_none(),
        "{client}:{sport} -> {vip}:80 is tracked already"
    );
    let syn = Frame::tcp(client, vip, sport, 80, SYN).bytes();
    let (verdict, _) = b.dataplane().test_run_on(BALANCER_PROGRAM, &syn, ingress)?;
    ensure!(
        verdict == XDP_TX,
        "SYN {client}:{sport} -> {vip}:80: expected {}, got {}",
        verdict_name(XDP_TX),
        verdict_name(verdict)
    );
    ensure!(
        b.dataplane().conn(&key)?.is_some(),
        "SYN {client}:{sport} -> {vip}:80 did not record the flow"
    );
    Ok(Frame::tcp(client, vip, sport, 80, ACK).bytes())
}

pub fn verdict_name(v: u32) -> String {
    match v {
        0 => "XDP_ABORTED".into(),
        1 => "XDP_DROP".into(),
        2 => "XDP_PASS".into(),
        3 => "XDP_TX".into(),
        4 => "XDP_REDIRECT".into(),
        _ => format!("verdict {v}"),
    }
}
