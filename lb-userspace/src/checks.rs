//! Runs every real's health check as its own tokio task, so checks run concurrently, never
//! hold the control API, and one slow real delays nobody. Each result goes through the real's
//! rise/fall tracker; a change of health is applied to the balancer at once (no reload).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::SystemTime,
};

use serde_json::json;
use tokio::{sync::mpsc, task::JoinHandle};

use crate::{
    balancer::Balancer,
    config::ServiceAddr,
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
}

impl Checks {
    /// Results arrive on the returned receiver; feed each to [`Checks::apply`].
    pub fn new() -> (Self, mpsc::Receiver<Report>) {
        let (tx, rx) = mpsc::channel(1024);
        (
            Self {
                running: HashMap::new(),
                next_task: 0,
                reports: tx,
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
                    wanted.insert((svc.service, real.addr), check.clone());
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
                    tracker: Tracker::new(check.rise, check.fall),
                    check,
                    handle,
                    last: None,
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
        let changed = r.tracker.record(report.result.ok);
        r.last = Some((report.result.clone(), report.at));
        let Some(health) = changed else { return };
        let detail = &report.result.detail;
        match b.set_health(&report.service, report.real, health) {
            Ok(_) if health == Health::Up => {
                tracing::info!(service = %report.service, real = %report.real, %detail, "real up")
            }
            Ok(_) => {
                tracing::warn!(service = %report.service, real = %report.real, %detail, "real down")
            }
            Err(e) => tracing::error!(real = %report.real, "applying a health change: {e:#}"),
        }
    }

    /// The last check of a real, for `status`.
    pub fn last(&self, service: &ServiceAddr, real: IpAddr) -> serde_json::Value {
        let Some(r) = self.running.get(&(*service, real)) else {
            return serde_json::Value::Null;
        };
        let mut v = json!({ "kind": r.check.kind.name() });
        if let Some((result, at)) = &r.last {
            let age = at.elapsed().unwrap_or_default();
            v["ok"] = result.ok.into();
            v["detail"] = result.detail.clone().into();
            v["latency_ms"] = (result.latency.as_secs_f64() * 1000.0).into();
            v["age_s"] = age.as_secs_f64().into();
        }
        v
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
