//! xlb's control plane. Modules: `cli` (the command line), `api` (the control socket's
//! protocol), `daemon` (serves it), `config` (what operators configure), `balancer` (policy:
//! ids, Maglev tables), `bgp` (announcing servable VIPs through BIRD), `dataplane` (the XDP program and its maps), `decap` (a real server's
//! decapsulator for TUN), `health` (probes and their rise/fall hysteresis), `checks` (runs them per real), `maglev`,
//! `neighbour` (netlink: interfaces, routes, neighbours), `state` (the state file), `metrics`
//! (Prometheus), `realserver` (preparing a real server).
pub mod api;
pub mod balancer;
pub mod bgp;
pub mod checks;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod decap;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod neighbour;
pub mod pins;
pub mod realserver;
pub mod state;
