//! xlb's control plane: configuration, policy (balancer), the data-plane handle, Maglev tables.
pub mod balancer;
pub mod config;
pub mod dataplane;
pub mod maglev;
