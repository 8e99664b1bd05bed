//! Health checks: what a check is (`check`), one attempt of it (`probe`), and the rise/fall
//! hysteresis that turns results into a real's health (`tracker`). Nothing here knows the
//! balancer: the daemon runs a check task per real and applies what the tracker decides.

mod check;
mod probe;
mod tracker;

pub use check::*;
pub use probe::{ProbeEnv, ProbeResult, probe};
pub use tracker::{Health, Tracker};
