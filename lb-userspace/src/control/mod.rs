//! Policy: what the operator's configuration and the reals' health mean for the data path.
//! `balancer` turns them into map contents (ids, backend entries, Maglev tables) and rewrites
//! them in place; `flows` reads the connection table back (active flows per real) and expires
//! NAT reply entries.

mod balancer;
mod flows;

pub use balancer::{Balancer, Link, MIN_MTU, RealStatus, addr_bytes, addr_of, service_key};
pub use flows::{
    ACTIVE_FLOW_IDLE_S, CLOSING_FLOW_IDLE_S, Flows, NAT_CLOSING_IDLE_S, NAT_TCP_IDLE_S,
    NAT_UDP_IDLE_S, active_flows, expire_nat_replies, is_active, now_coarse_s,
};
