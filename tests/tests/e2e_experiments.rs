//! The labs' experiments (`scripts/lab LAB experiment NAME --quick`), end to end: each writes
//! an events.csv with the expected columns and rows, a timeline.png that is a real PNG of
//! some size, and a summary.txt whose figures the rows give again (recomputed here).
//!
//! One sequential test: it owns the DR lab, then the TUN lab, then the ECMP lab (fixed
//! namespace names). Each lab is brought up here once and its experiments run in it in turn
//! (each puts back what it changed).

use std::{collections::BTreeMap, path::Path, process::Command};

use xlb_tests::lab::{Lab, repo, text};

/// One line of events.csv.
#[derive(Debug)]
struct Row {
    time: f64,
    kind: String,
    flow: String,
    real: String,
    latency_ms: Option<f64>,
    outcome: String,
    detail: String,
}

impl Row {
    fn request(&self) -> bool {
        self.kind == "request" || self.kind == "keepalive"
    }
    fn end(&self) -> f64 {
        self.time + self.latency_ms.unwrap_or(0.0) / 1000.0
    }
}

struct Output {
    rows: Vec<Row>,
    summary: BTreeMap<String, String>,
    summary_text: String,
}

impl Output {
    fn get(&self, key: &str) -> &str {
        self.summary
            .get(key)
            .unwrap_or_else(|| panic!("no {key:?} in the summary:\n{}", self.summary_text))
    }

    /// The first number in the summary line `key`.
    fn number(&self, key: &str) -> f64 {
        first_number(self.get(key))
    }

    fn event(&self, prefix: &str) -> f64 {
        self.rows
            .iter()
            .find(|r| r.kind == "event" && r.detail.starts_with(prefix))
            .unwrap_or_else(|| panic!("no event {prefix:?}"))
            .time
    }

    fn requests(&self) -> impl Iterator<Item = &Row> {
        self.rows.iter().filter(|r| r.request())
    }
}

fn first_number(s: &str) -> f64 {
    s.split(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no number in {s:?}"))
}

fn experiment(lab: &str, name: &str) -> Output {
    let out_dir = repo().join(format!("target/lab/test-{lab}-{name}"));
    let _ = std::fs::remove_dir_all(&out_dir);
    let out = Command::new(repo().join("scripts/lab"))
        .args([lab, "experiment", name, "--quick", "--out"])
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{lab} {name}: {}", text(&out));
    println!(
        "--- {lab} {name} ---\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    check_png(&out_dir.join("timeline.png"), (1200, 760));
    let csv = std::fs::read_to_string(out_dir.join("events.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("time_s,kind,flow,real,latency_ms,outcome,detail")
    );
    let mut rows = Vec::new();
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 7, "{line}");
        let row = Row {
            time: f[0].parse().unwrap(),
            kind: f[1].into(),
            flow: f[2].into(),
            real: f[3].into(),
            latency_ms: (!f[4].is_empty()).then(|| f[4].parse().unwrap()),
            outcome: f[5].into(),
            detail: f[6].into(),
        };
        match row.kind.as_str() {
            "request" | "keepalive" => {
                assert!(["ok", "failed"].contains(&row.outcome.as_str()), "{line}");
                assert!(row.latency_ms.is_some() && !row.flow.is_empty(), "{line}");
                assert!(row.outcome == "failed" || !row.real.is_empty(), "{line}");
            }
            "event" => assert!(!row.detail.is_empty() && row.outcome.is_empty(), "{line}"),
            k => panic!("unknown kind {k} in {line}"),
        }
        rows.push(row);
    }
    assert!(
        rows.windows(2).all(|w| w[0].time <= w[1].time),
        "rows in time order"
    );
    let summary_text = std::fs::read_to_string(out_dir.join("summary.txt")).unwrap();
    let summary = summary_text
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let o = Output {
        rows,
        summary,
        summary_text,
    };
    common_figures_agree(&o);
    o
}

/// A PNG signature, an IHDR of the expected size, and more than a blank image's bytes.
fn check_png(path: &Path, (w, h): (u32, u32)) {
    let png = std::fs::read(path).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
    assert_eq!(&png[12..16], b"IHDR");
    let be = |i: usize| u32::from_be_bytes(png[i..i + 4].try_into().unwrap());
    assert_eq!((be(16), be(20)), (w, h), "{}", path.display());
    assert!(
        png.len() > 20_000,
        "{}: {} bytes",
        path.display(),
        png.len()
    );
    assert_eq!(&png[png.len() - 8..png.len() - 4], b"IEND");
}

/// The lines every summary has, recomputed from the rows.
fn common_figures_agree(o: &Output) {
    let requests: Vec<&Row> = o.requests().collect();
    assert!(requests.len() >= 100, "{} requests", requests.len());
    assert_eq!(o.number("requests") as usize, requests.len());
    let failed: Vec<&&Row> = requests.iter().filter(|r| r.outcome == "failed").collect();
    assert_eq!(o.number("failed") as usize, failed.len());
    let window = o.get("failure window");
    if failed.is_empty() {
        assert_eq!(window, "none");
    } else {
        let from = failed.iter().map(|r| r.time).fold(f64::MAX, f64::min);
        let to = failed.iter().map(|r| r.end()).fold(f64::MIN, f64::max);
        assert_eq!(
            window,
            format!("{from:.3} s to {to:.3} s ({:.3} s)", to - from)
        );
    }
    let mut answers: BTreeMap<&str, usize> = BTreeMap::new();
    for r in requests.iter().filter(|r| r.outcome == "ok") {
        *answers.entry(&r.real).or_default() += 1;
    }
    for part in o.get("answers per real").split(", ") {
        let (real, n) = part.split_once(' ').unwrap();
        assert_eq!(
            answers.get(real).copied().unwrap_or(0),
            n.parse::<usize>().unwrap(),
            "answers from {real}"
        );
    }
    assert_eq!(
        answers.values().sum::<usize>(),
        requests.len() - failed.len(),
        "every answer is from a real of the summary"
    );
}

/// Flows of `kind` answered before and after `t`: (moved to another real, how many).
fn moved(o: &Output, kind: &str, t: f64) -> (usize, usize) {
    let mut before = BTreeMap::new();
    let mut after = BTreeMap::new();
    for r in o.requests().filter(|r| r.kind == kind && r.outcome == "ok") {
        if r.time < t {
            before.insert(&r.flow, &r.real);
        } else {
            after.entry(&r.flow).or_insert(&r.real);
        }
    }
    let common: Vec<_> = before.keys().filter(|f| after.contains_key(*f)).collect();
    let n = common.iter().filter(|f| before[**f] != after[**f]).count();
    (n, common.len())
}

fn spread(lab: &str) {
    let o = experiment(lab, "spread");
    // Equal weights in the labs: each real near a third of the answers.
    for real in ["r1", "r2", "r3"] {
        let share = o.number(&format!("share {real}"));
        let answered = o.requests().filter(|r| r.outcome == "ok").count();
        let own = o
            .requests()
            .filter(|r| r.outcome == "ok" && r.real == real)
            .count();
        assert!(
            (share - 100.0 * own as f64 / answered as f64).abs() < 0.051,
            "share {real}: {share}"
        );
        assert!((15.0..52.0).contains(&share), "share {real}: {share}");
    }
}

fn failover(lab: &str) {
    let o = experiment(lab, "failover");
    let kill = o.event("kill -9 the HTTP server on r1");
    let back = o.event("HTTP server on r1 started again");
    let failed = |r: &&Row| r.outcome == "failed" && r.end() >= kill;
    let sent_after = o
        .requests()
        .filter(failed)
        .filter(|r| r.time >= kill)
        .count();
    let in_flight = o
        .requests()
        .filter(failed)
        .filter(|r| r.time < kill)
        .count();
    assert_eq!(o.number("failed, sent after the kill") as usize, sent_after);
    assert_eq!(
        o.number("failed, in flight at the kill") as usize,
        in_flight
    );
    // Refusals: the dead server's SYNs go to another real, none fails. (A request in flight on
    // its connection at the kill may: nothing can answer it.)
    assert_eq!(sent_after, 0, "{}", o.summary_text);
    let new_to_r1 = o
        .requests()
        .filter(|r| r.kind == "request" && r.outcome == "ok" && r.real == "r1")
        .filter(|r| r.time > kill + 0.05 && r.end() < back)
        .count();
    assert_eq!(new_to_r1, 0, "r1 answered after its server was killed");
    assert!(
        o.rows.iter().any(|r| r.detail == "daemon: r1 down"),
        "{}",
        o.summary_text
    );
}

fn drain(lab: &str) {
    let o = experiment(lab, "drain");
    // The experiment drains the real holding the most long-lived connections.
    let t_drain = o.event("xlb real drain ");
    let victim = o
        .rows
        .iter()
        .find(|r| r.detail.starts_with("xlb real drain "))
        .unwrap()
        .detail
        .rsplit(' ')
        .next()
        .unwrap()
        .to_string();
    let t_enable = o.event(&format!("xlb real enable {victim}"));
    let new_while = o
        .requests()
        .filter(|r| r.kind == "request" && r.outcome == "ok" && r.real == victim)
        .filter(|r| r.time > t_drain && r.time < t_enable)
        .count();
    assert_eq!(
        o.number(&format!(
            "new connections to {victim} between drain and enable"
        )) as usize,
        new_while
    );
    assert_eq!(new_while, 0);
    let held = o
        .requests()
        .filter(|r| r.kind == "keepalive" && r.outcome == "ok" && r.real == victim)
        .filter(|r| r.time > t_drain)
        .count();
    assert_eq!(
        o.number(&format!(
            "answers on long-lived connections to {victim} after the drain"
        )) as usize,
        held
    );
    assert!(
        held > 0,
        "no long-lived connection on {victim} went on after the drain"
    );
    // wait-drained returns once the last of them has closed (2 s after its FIN).
    let last = o
        .requests()
        .filter(|r| r.kind == "keepalive" && r.real == victim)
        .map(|r| r.end())
        .fold(0.0, f64::max);
    assert!(
        o.event("xlb real wait-drained") > last,
        "wait-drained before the last answer"
    );
    assert_eq!(o.number("long-lived connections broken"), 0.0);
}

fn reweight(lab: &str) {
    let o = experiment(lab, "reweight");
    let t = o.event("xlb real weight r1 2");
    let (tracked_moved, tracked) = moved(&o, "keepalive", t);
    let (new_moved, common) = moved(&o, "request", t);
    assert_eq!(
        o.get("tracked flows moved"),
        format!("{tracked_moved} of {tracked} (broken: 0)")
    );
    assert_eq!(tracked_moved, 0);
    assert!(
        o.get("new flows moved")
            .starts_with(&format!("{new_moved} of {common} "))
    );
    // Doubling one of three equal weights moves about a sixth of the slots (Maglev): the new
    // flows follow the table.
    let ideal = o.number("maglev ideal");
    let measured = 100.0 * new_moved as f64 / common as f64;
    assert!(common >= 100, "{common} flows in both phases");
    assert!(
        (measured - ideal).abs() < 8.0,
        "moved {measured} % vs ideal {ideal} %"
    );
}

fn restart(lab: &str) {
    let o = experiment(lab, "restart");
    let kill = o.event("kill -9 the xlb daemon");
    let back = o.event("xlb daemon started again");
    let dead: Vec<&Row> = o
        .requests()
        .filter(|r| r.time >= kill && r.end() < back)
        .collect();
    let answered = dead.iter().filter(|r| r.outcome == "ok").count();
    assert_eq!(
        o.get("while the daemon was dead"),
        format!("{answered} answered, {} failed", dead.len() - answered)
    );
    assert!(
        answered > 50,
        "the pinned data path forwards without its daemon"
    );
    assert_eq!(dead.len(), answered);
    assert!(
        o.rows
            .iter()
            .any(|r| r.detail == "daemon: control socket answers again" && r.time > back)
    );
}

fn director_loss() {
    let o = experiment("ecmp", "director-loss");
    let dark = o.event("d1 dark");
    let routed = o
        .rows
        .iter()
        .find(|r| r.detail.starts_with("router: 1 next hop") && r.time >= dark)
        .expect("the router routes over d2 alone")
        .time;
    assert_eq!(
        o.get("router routes around d1"),
        format!("{:.3} s after it went dark", routed - dark)
    );
    let retried = o
        .requests()
        .filter(|r| r.kind == "request" && r.outcome == "ok")
        .filter(|r| r.latency_ms.unwrap() > 500.0)
        .count();
    assert_eq!(
        o.number("new connections answered after more than 500 ms (a SYN sent again)") as usize,
        retried
    );
    let kept: Vec<&Row> = o.requests().filter(|r| r.kind == "keepalive").collect();
    let broken = kept.iter().filter(|r| r.outcome == "failed").count();
    let (moved_n, conns) = moved(&o, "keepalive", dark);
    assert!(
        o.get("long-lived connections")
            .starts_with(&format!("{conns}, stalled "))
    );
    assert!(
        o.get("long-lived connections")
            .ends_with(&format!("moved to another real {moved_n}, broken {broken}"))
    );
    // The surviving director takes over the flows it has never seen, on their reals.
    assert_eq!((moved_n, broken), (0, 0), "{}", o.summary_text);
}

#[test]
fn experiments_write_their_rows_chart_and_summary() {
    // Refused in one line, before any lab is touched.
    let out = Command::new(repo().join("scripts/lab"))
        .args(["dr", "experiment", "director-loss", "--quick"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("runs in lab ecmp"),
        "{}",
        text(&out)
    );

    {
        let _lab = Lab::new("dr").up();
        spread("dr");
        failover("dr");
        drain("dr");
        reweight("dr");
        restart("dr");
    }
    {
        let _lab = Lab::new("tun").up();
        spread("tun");
        failover("tun");
        drain("tun");
        reweight("tun");
        restart("tun");
    }
    {
        let _lab = Lab::new("ecmp").up();
        director_loss();
    }
}
