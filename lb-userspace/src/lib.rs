//! xlb's control plane: the director (`xlb daemon` and the commands that talk to it) and the
//! real-server tool (`xlb realserver`), as one library that `xlb`, `tests/` and `xtask` use.
//!
//! Layers, each using only those below it:
//!
//! - `cli`: the command line; parses, sends a request, formats the answer.
//! - `daemon`: the director's process: wiring, the control socket, neighbour sync, health
//!   check tasks, metrics, BGP.
//! - `realserver`: preparing a real server, and its decapsulator.
//! - `control`: policy: which real gets which id and table slots, drain and failover, flows.
//! - `dataplane`: the kernel handle: loading and attaching the XDP object, its maps, pins.
//! - `api` (the control socket's requests and typed answers), `config` (what operators
//!   configure), `state` (the state file), `health` (checks, probes, rise/fall), `maglev`
//!   (the table, a contract between directors), `metrics` (Prometheus page building blocks),
//!   `netlink` (interfaces, routes, neighbours), `sync` (connection sync's wire format).
pub mod api;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod netlink;
pub mod realserver;
pub mod state;
pub mod sync;
