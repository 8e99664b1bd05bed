//! The ECMP lab (scripts/lab ecmp): two directors behind a BIRD router, TUN to three reals.
//! What its end-to-end tests share (e2e_ecmp, e2e_sync): the directors, the router's routes,
//! the kernel's Maglev tables, long-lived connections from the client and when they stalled.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use aya::maps::MapData;
use lb_common::{Backend, FAMILY_V4, ServiceKey, ServiceValue};
use serde_json::Value;
use xlb::control::service_key;

pub use crate::lab::{Connections, service_new_flows};
use crate::lab::{Lab, Topology, Xlb, sh, text};

pub const LAB: Lab = Lab::new("ecmp");
/// Long-lived connections held across a director's loss.
pub const CONNECTIONS: usize = 24;
/// Short connections, each from a new client port, for the spread over the directors.
pub const SPREAD_REQUESTS: usize = 200;

/// (name, address) of a director.
pub type Director<'a> = (&'a str, &'a str);

/// The lab's two directors, (name, address) each.
pub fn directors(topo: &Topology) -> (Director<'_>, Director<'_>) {
    let [d1, d2] = &topo.directors[..] else {
        panic!("the ecmp lab has two directors: {:?}", topo.directors)
    };
    ((d1, topo.ipv4(d1)), (d2, topo.ipv4(d2)))
}

pub fn director(d: Director) -> Xlb {
    LAB.topology().xlb(d.0)
}

pub fn url(vip: &str) -> String {
    format!("http://{vip}/")
}

/// The router's next hops for `vip` (its kernel's FIB, as `ip -j route` reports it), sorted.
pub fn router_hops(vip: &str) -> Vec<String> {
    let topo = LAB.topology();
    let out = sh(
        "ip",
        &[
            "-j",
            "-n",
            topo.ns(topo.router()),
            "route",
            "show",
            &format!("{vip}/32"),
        ],
    );
    assert!(out.status.success(), "ip route: {}", text(&out));
    let routes: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut hops = Vec::new();
    for route in routes.as_array().unwrap() {
        if let Some(gw) = route["gateway"].as_str() {
            hops.push(gw.to_string());
        }
        for nh in route["nexthops"].as_array().into_iter().flatten() {
            hops.push(nh["gateway"].as_str().unwrap().to_string());
        }
    }
    hops.sort();
    hops
}

/// Waits (polling every 10 ms) until the router routes `vip` over exactly `want`; returns
/// how long that took.
pub fn wait_hops(vip: &str, want: &[&str], timeout: Duration) -> Duration {
    let start = Instant::now();
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    loop {
        let hops = router_hops(vip);
        if hops == want {
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            panic!(
                "after {timeout:?} the router routes {vip} via {hops:?}, not {want:?}\n{}",
                diagnostics()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The map `name` of the XDP program attached to director `d`'s interface (its id as netlink
/// reports it): the kernel's own state, not what the daemon says.
pub fn kernel_map(d: Director, name: &str) -> aya::maps::Map {
    let topo = LAB.topology();
    let out = sh(
        "ip",
        &[
            "-j",
            "-d",
            "-n",
            topo.ns(d.0),
            "link",
            "show",
            "dev",
            &topo.daemon(d.0).iface,
        ],
    );
    assert!(out.status.success(), "ip link: {}", text(&out));
    let link: Value = serde_json::from_slice(&out.stdout).unwrap();
    let prog_id = link[0]["xdp"]["prog"]["id"].as_u64().unwrap_or_else(|| {
        panic!(
            "no XDP program on {}'s {}: {link}",
            d.0,
            topo.daemon(d.0).iface
        )
    }) as u32;
    let prog = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == prog_id)
        .expect("the attached program among the loaded ones");
    let id = prog
        .map_ids()
        .unwrap()
        .unwrap()
        .into_iter()
        .find(|&id| aya::maps::MapInfo::from_id(id).unwrap().name() == name.as_bytes())
        .unwrap_or_else(|| panic!("no map {name} in {}'s program", d.0));
    aya::maps::Map::from_map_data(MapData::from_id(id).unwrap()).unwrap()
}

/// The Maglev table the kernel uses for `service` on director `d`, slot by slot as real
/// addresses: SERVICES gives the service's id, MAGLEV its table (an inner array: `[size, 0]`,
/// then the slots' backend ids), BACKENDS each backend's address.
pub fn kernel_table(d: Director, service: &str) -> Vec<IpAddr> {
    let services: aya::maps::HashMap<_, ServiceKey, ServiceValue> =
        aya::maps::HashMap::try_from(kernel_map(d, "SERVICES")).unwrap();
    let key = service_key(&service.parse().unwrap());
    let id = services.get(&key, 0).unwrap().id;
    let outer: aya::maps::ArrayOfMaps<_, MapData> =
        aya::maps::ArrayOfMaps::try_from(kernel_map(d, "MAGLEV")).unwrap();
    let inner = aya::maps::Map::from_map_data(outer.get(&id, 0).unwrap()).unwrap();
    let inner: aya::maps::Array<_, [u32; 2]> = aya::maps::Array::try_from(inner).unwrap();
    let slots: Vec<u32> = (0..inner.len())
        .flat_map(|i| inner.get(&i, 0).unwrap())
        .collect();
    let size = slots[0] as usize;
    let backends: aya::maps::Array<_, Backend> =
        aya::maps::Array::try_from(kernel_map(d, "BACKENDS")).unwrap();
    let mut addr_of = std::collections::HashMap::new();
    slots[2..2 + size]
        .iter()
        .map(|&bid| {
            *addr_of.entry(bid).or_insert_with(|| {
                let b = backends.get(&bid, 0).unwrap();
                match b.family {
                    FAMILY_V4 => IpAddr::from(<[u8; 4]>::try_from(&b.addr[..4]).unwrap()),
                    _ => IpAddr::from(b.addr),
                }
            })
        })
        .collect()
}

/// Whether director `d`'s connection table holds the flow `key` (whole), read from the kernel.
pub fn kernel_has_conn(d: Director, key: &lb_common::ConnKey) -> bool {
    let conns: aya::maps::Array<_, lb_common::ConnBucket> =
        aya::maps::Array::try_from(kernel_map(d, "CONNS")).unwrap();
    let hashes = key.hashes();
    let bucket = conns.get(&(hashes[1] & (conns.len() - 1)), 0).unwrap();
    bucket.entries.iter().any(|e| e.holds(hashes))
}

pub fn stats(d: Director) -> Value {
    serde_json::from_str(&director(d).ok(&["--json", "stats"])).unwrap()
}

pub fn diagnostics() -> String {
    let topo = LAB.topology();
    let bgp = topo.bgp.as_ref().unwrap();
    let logs = topo
        .directors
        .iter()
        .map(|d| &topo.daemon(d).spawned.log)
        .chain([&bgp.birds[topo.router()].spawned.log]);
    LAB.status_and_logs(logs)
}

/// CONNECTIONS-style long-lived connections (`n`) from the client to the web service's port
/// on `vip`, for `seconds`.
pub fn open_connections(vip: &str, n: usize, seconds: u32) -> Connections {
    let topo = LAB.topology();
    Connections::open(
        topo.ns(&topo.client),
        vip,
        topo.service("web").port,
        n,
        seconds,
    )
}

pub fn ms(d: Duration) -> u128 {
    d.as_millis()
}

pub fn median_of(d: &[Duration]) -> Duration {
    let mut sorted = d.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

/// Takes a director's switch port down or up: down, the director is dark (as after a crash
/// or a power loss), its processes still running but cut off.
pub fn link(d: Director, state: &str) {
    let topo = LAB.topology();
    let (switch, port) = topo.switch_port(d.0, &topo.daemon(d.0).iface);
    let out = sh("ip", &["-n", switch, "link", "set", port, state]);
    assert!(out.status.success(), "{}", text(&out));
}
