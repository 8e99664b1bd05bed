//! The experiments' rows (events.csv: one per request and one per event) and the figures
//! computed from them, for the driver (experiment.rs) and the charts (experiment_chart.rs).

use std::collections::BTreeMap;

/// The CSV's columns, in order.
pub const COLUMNS: &str = "time_s,kind,flow,real,latency_ms,outcome,detail";

/// One line of events.csv. `time` is seconds since the experiment's start (when its load
/// began), to the millisecond; a request's latency is to a tenth of a millisecond.
#[derive(Clone, Debug)]
pub struct Row {
    pub time: f64,
    pub kind: Kind,
    /// A request's flow: its client port (`request`) or connection (`keepalive`).
    pub flow: String,
    /// The real that answered (or, in DR, that refused), if known.
    pub real: String,
    pub latency_ms: Option<f64>,
    pub ok: bool,
    /// The error of a failed request; what happened, for an event.
    pub detail: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A GET on a new connection.
    Request,
    /// A GET on a long-lived connection.
    Keepalive,
    Event,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Request => "request",
            Kind::Keepalive => "keepalive",
            Kind::Event => "event",
        }
    }
}

impl Row {
    pub fn is_request(&self) -> bool {
        self.kind != Kind::Event
    }

    /// When its answer (or failure) came.
    pub fn end(&self) -> f64 {
        self.time + self.latency_ms.unwrap_or(0.0) / 1000.0
    }

    pub fn csv(&self) -> String {
        let outcome = match (self.kind, self.ok) {
            (Kind::Event, _) => "",
            (_, true) => "ok",
            (_, false) => "failed",
        };
        // The CSV has no quoting: the free text never holds a comma.
        format!(
            "{:.3},{},{},{},{},{},{}",
            self.time,
            self.kind.as_str(),
            self.flow,
            self.real,
            self.latency_ms
                .map(|l| format!("{l:.1}"))
                .unwrap_or_default(),
            outcome,
            self.detail.replace([',', '\n'], ";")
        )
    }
}

pub fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// Percentile `p` (0-100) of sorted values, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// From the first failed request's send to the last one's end, if any failed.
pub fn failure_window(rows: &[Row]) -> Option<(f64, f64)> {
    let failed: Vec<&Row> = rows.iter().filter(|r| r.is_request() && !r.ok).collect();
    let from = failed.iter().map(|r| r.time).min_by(f64::total_cmp)?;
    let to = failed.iter().map(|r| r.end()).max_by(f64::total_cmp)?;
    Some((from, to))
}

/// Flows of `kind` answered both before and after time `t`, and how many of them were
/// answered by another real after it than before.
pub fn moved_flows(rows: &[Row], kind: Kind, t: f64) -> (usize, usize) {
    let mut before: BTreeMap<&str, &str> = BTreeMap::new();
    let mut after: BTreeMap<&str, &str> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.kind == kind && r.ok) {
        let side = if r.time < t { &mut before } else { &mut after };
        // A connection's last answer before, its first after.
        if r.time < t || !side.contains_key(r.flow.as_str()) {
            side.insert(&r.flow, &r.real);
        }
    }
    let common: Vec<&&str> = before.keys().filter(|f| after.contains_key(*f)).collect();
    let moved = common.iter().filter(|f| before[**f] != after[**f]).count();
    (moved, common.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(time: f64, flow: &str, real: &str, ok: bool) -> Row {
        Row {
            time,
            kind: Kind::Request,
            flow: flow.into(),
            real: real.into(),
            latency_ms: Some(10.0),
            ok,
            detail: if ok {
                String::new()
            } else {
                "reset, by peer".into()
            },
        }
    }

    #[test]
    fn the_failure_window_runs_from_the_first_failed_send_to_the_last_failed_end() {
        let rows = [
            request(1.0, "1", "r1", true),
            request(2.0, "2", "", false),
            request(2.5, "3", "r2", true),
            request(3.0, "4", "", false),
        ];
        assert_eq!(failure_window(&rows), Some((2.0, 3.01)));
        assert_eq!(failure_window(&rows[..1]), None);
    }

    #[test]
    fn a_flow_moved_when_its_real_after_t_is_not_its_real_before() {
        let rows = [
            request(1.0, "20000", "r1", true),
            request(1.1, "20001", "r2", true),
            request(1.2, "20002", "r3", true),
            request(5.0, "20000", "r1", true),
            request(5.1, "20001", "r3", true),
            request(5.2, "20002", "r3", false), // failed after: not compared
        ];
        assert_eq!(moved_flows(&rows, Kind::Request, 4.0), (1, 2));
        assert_eq!(moved_flows(&rows, Kind::Keepalive, 4.0), (0, 0));
    }

    #[test]
    fn csv_rows_have_seven_fields_and_no_comma_in_free_text() {
        let line = request(1.25, "20000", "", false).csv();
        assert_eq!(line, "1.250,request,20000,,10.0,failed,reset; by peer");
        assert_eq!(line.split(',').count(), COLUMNS.split(',').count());
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), 2.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 99.0), 4.0);
    }
}
