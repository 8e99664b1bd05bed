//! Runs every real's health check as its own tokio task, so checks run concurrently, never
//! hold the control API, and one slow real delays nobody. Each result goes through the real's
//! rise/fall tracker; a change of health is applied to the balancer at once (no reload).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::SystemTime,
};

use tokio::{sync::mpsc, task::JoinHandle};

use crate::{
    api::{CheckReport, CheckResult},
    config::ServiceAddr,
    control::Balancer,
    health::{self, CheckConfig, Health, ProbeEnv, ProbeResult, Tracker},
};

/// One probe's outcome, from the task of `(service, real)` number `task`.
pub struct Report {
    service: ServiceAddr,
    real: IpAddr,
    task: u64,
    result: ProbeResult,
    at: SystemTime,
}

struct Running {
    task: u64,
    check: CheckConfig,
    handle: JoinHandle<()>,
    tracker: Tracker,
    last: Option<(ProbeResult, SystemTime)>,
    /// Smoothed latency of successful checks, seconds (for adaptive weights).
    latency: Option<f64>,
    /// Refusals since the real was last taken down by them (or since its check started).
    refusals: u32,
    /// How long after the data path honoured a refusal the real was last taken down by one
    /// (the balancer's maps updated), seconds.
    refusal_down_delay: Option<f64>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// The checks of every checked real.
pub struct Checks {
    running: HashMap<(ServiceAddr, IpAddr), Running>,
    next_task: u64,
    reports: mpsc::Sender<Report>,
    /// Refusals that take a checked real down (`xlb daemon --refusals-down`; 0: never).
    refusals_down: u32,
}

impl Checks {
    /// Results arrive on the returned receiver; feed each to [`Checks::apply`].
    pub fn new(refusals_down: u32) -> (Self, mpsc::Receiver<Report>) {
        let (tx, rx) = mpsc::channel(1024);
        (
            Self {
                running: HashMap::new(),
                next_task: 0,
                reports: tx,
                refusals_down,
            },
            rx,
        )
    }

    /// Starts, restarts or stops tasks so that exactly the checked reals of the configuration
    /// are checked, each with its current check. A real whose check changed starts over.
    pub fn reconcile(&mut self, b: &Balancer) {
        let mut wanted = HashMap::new();
        for svc in b.config().services {
            for real in &svc.reals {
                if let Some(check) = real.effective_check(&svc) {
                    let mut check = check.clone();
                    // A NAT real is checked on the port it is sent to.
                    if check.port.is_none() && real.port != 0 {
                        check.port = Some(real.port);
                    }
                    wanted.insert((svc.service, real.addr), check);
                }
            }
        }
        self.running
            .retain(|key, r| wanted.get(key).is_some_and(|c| *c == r.check));
        for (key, check) in wanted {
            if self.running.contains_key(&key) {
                continue;
            }
            self.next_task += 1;
            let (service, real) = key;
            let target = check.target(real, service.port);
            let handle = tokio::spawn(run(
                service,
                real,
                self.next_task,
                check.clone(),
                target,
                self.reports.clone(),
            ));
            self.running.insert(
                key,
                Running {
                    task: self.next_task,
                    // A real a restarted daemon inherited `up` keeps its hysteresis.
                    tracker: Tracker::resume(
                        check.rise,
                        check.fall,
                        b.health(&service, real).unwrap_or(Health::Unknown),
                    ),
                    check,
                    handle,
                    last: None,
                    latency: None,
                    refusals: 0,
                    refusal_down_delay: None,
                },
            );
        }
    }

    /// Records a probe result and applies a change of health to the balancer.
    pub fn apply(&mut self, b: &mut Balancer, report: Report) {
        let Some(r) = self.running.get_mut(&(report.service, report.real)) else {
            return;
        };
        // A report from a task since replaced: its check is not this one.
        if r.task != report.task {
            return;
        }
        r.tracker.record(report.result.ok);
        if report.result.ok {
            let sample = report.result.latency.as_secs_f64();
            r.latency = Some(match r.latency {
                Some(l) => l + LATENCY_SMOOTHING * (sample - l),
                None => sample,
            });
        }
        r.last = Some((report.result.clone(), report.at));
        let health = r.tracker.health();
        if health == Health::Unknown {
            return;
        }
        // Applied on every report, not only on a change of the tracker: a real the balancer
        // re-created (its service re-added by a restore) starts unknown there while its
        // unchanged check keeps running.
        let detail = &report.result.detail;
        match b.set_health(&report.service, report.real, health) {
            Ok(false) => {}
            Ok(true) if health == Health::Up => {
                tracing::info!(service = %report.service, real = %report.real, %detail, "real up")
            }
            Ok(true) => {
                tracing::warn!(service = %report.service, real = %report.real, %detail, "real down")
            }
            Err(e) => tracing::error!(real = %report.real, "applying a health change: {e:#}"),
        }
    }

    /// The data path honoured a refusal from backend `id` (of `generation`): its real's server
    /// has no socket for the service's port. After `refusals_down` of them a checked real goes
    /// down at once; its check brings it back after `rise` successes. An unchecked real stays:
    /// nothing would bring it back (its refusals are still re-scheduled, one by one).
    pub fn refused(&mut self, b: &mut Balancer, id: u32, generation: u32, refused_at_ns: u64) {
        if self.refusals_down == 0 {
            return;
        }
        let Some((service, real)) = b.real_of_backend(id, generation) else {
            return;
        };
        let Some(r) = self.running.get_mut(&(service, real)) else {
            return;
        };
        if r.tracker.health() == Health::Down {
            return;
        }
        r.refusals += 1;
        if r.refusals < self.refusals_down {
            return;
        }
        r.refusals = 0;
        r.tracker.force_down();
        let refusals = self.refusals_down;
        match b.set_health(&service, real, Health::Down) {
            Ok(true) => {
                let delay = monotonic_ns().saturating_sub(refused_at_ns) as f64 / 1e9;
                r.refusal_down_delay = Some(delay);
                tracing::warn!(
                    %service, %real, refusals, after_ms = format!("{:.2}", delay * 1e3),
                    "real down: it refused connections (no socket on the port)"
                )
            }
            Ok(false) => {}
            Err(e) => tracing::error!(%real, "applying a refusal: {e:#}"),
        }
    }

    /// Recomputes the effective weights of adaptive services from their reals' smoothed check
    /// latencies. Called at most once a second; a real's weight moves only when the target
    /// differs by more than a tenth of its configured weight, so it does not flap.
    pub fn adapt_weights(&self, b: &mut Balancer) {
        for service in b.adaptive_services() {
            let reals: Vec<(IpAddr, u32, u32, f64)> = b
                .real_status(&service)
                .into_iter()
                .filter(|r| !r.fallback && r.health == Health::Up)
                .filter_map(|r| {
                    let latency = self.running.get(&(service, r.addr))?.latency?;
                    Some((r.addr, r.weight, r.effective_weight, latency))
                })
                .collect();
            let Some(fastest) = reals.iter().map(|r| r.3).min_by(f64::total_cmp) else {
                continue;
            };
            for (addr, weight, current, latency) in reals {
                let target = adaptive_weight(weight, latency, fastest);
                if target.abs_diff(current) * 10 > weight
                    && let Err(e) = b.set_effective_weight(&service, addr, target)
                {
                    tracing::error!(real = %addr, "adapting a weight: {e:#}");
                }
            }
        }
    }

    /// How long the real's last check took, seconds (for metrics); None if never checked.
    /// How long after a refusal the real was last taken down by one, seconds.
    pub fn refusal_down_delay(&self, service: &ServiceAddr, real: IpAddr) -> Option<f64> {
        self.running.get(&(*service, real))?.refusal_down_delay
    }

    pub fn last_latency(&self, service: &ServiceAddr, real: IpAddr) -> Option<f64> {
        let (result, _) = self.running.get(&(*service, real))?.last.as_ref()?;
        Some(result.latency.as_secs_f64())
    }

    /// The last check of a real, for `status`.
    pub fn last(&self, service: &ServiceAddr, real: IpAddr) -> Option<CheckReport> {
        let r = self.running.get(&(*service, real))?;
        Some(CheckReport {
            kind: r.check.kind,
            last: r.last.as_ref().map(|(result, at)| CheckResult {
                ok: result.ok,
                detail: result.detail.clone(),
                latency_ms: result.latency.as_secs_f64() * 1000.0,
                age_s: at.elapsed().unwrap_or_default().as_secs_f64(),
            }),
        })
    }
}

/// One real's check loop: probes at once, then every interval (start to start).
async fn run(
    service: ServiceAddr,
    real: IpAddr,
    task: u64,
    check: CheckConfig,
    target: SocketAddr,
    reports: mpsc::Sender<Report>,
) {
    let env = ProbeEnv {
        service: service.to_string(),
    };
    let mut tick = tokio::time::interval(check.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = health::probe(&check, target, &env).await;
        let report = Report {
            service,
            real,
            task,
            result,
            at: SystemTime::now(),
        };
        if reports.send(report).await.is_err() {
            return;
        }
    }
}

/// Weight of a new latency sample in the smoothed latency (an exponential moving average).
const LATENCY_SMOOTHING: f64 = 0.3;
/// Added to every latency before comparing: differences well under a millisecond are noise,
/// not a slower machine.
const LATENCY_FLOOR_S: f64 = 0.005;

/// The weight adaptive weighting gives a real: its configured weight scaled by how much faster
/// the service's fastest real answers its checks, bounded to [weight / 4, weight].
pub fn adaptive_weight(weight: u32, latency: f64, fastest: f64) -> u32 {
    let ratio = (fastest + LATENCY_FLOOR_S) / (latency + LATENCY_FLOOR_S);
    let scaled = (weight as f64 * ratio).round() as u32;
    scaled.clamp(weight.div_ceil(4), weight)
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`, which stamps refusals (and sync
/// events).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::adaptive_weight;

    #[test]
    fn adaptive_weights_follow_latency_within_bounds() {
        // The fastest real keeps its weight; sub-millisecond differences change nothing.
        assert_eq!(adaptive_weight(100, 0.001, 0.001), 100);
        assert_eq!(adaptive_weight(100, 0.0015, 0.001), 92);
        // Twice as slow (beyond the floor): about half; far slower: a quarter, never less.
        assert_eq!(adaptive_weight(100, 0.015, 0.005), 50);
        assert_eq!(adaptive_weight(100, 0.3, 0.001), 25);
        assert_eq!(adaptive_weight(1, 0.3, 0.001), 1);
        assert_eq!(adaptive_weight(0, 0.3, 0.001), 0);
    }
}
