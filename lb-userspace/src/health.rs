//! Health of a real as its checks report it: keepalived's rise/fall hysteresis.
//!
//! A real starts `Unknown` and is not given new flows until its first check answers (the first
//! check runs at once, so a healthy real joins within one round trip); the first result decides
//! directly. After that it takes `rise` consecutive successes to go up and `fall` consecutive
//! failures to go down, so one lost probe does not move flows and a flapping real is not
//! readmitted before it has been steady for `rise` checks.
//!
//! The checks themselves are [`probe`]s: one attempt of a [`CheckConfig`] against one real,
//! bounded by the check's timeout, answering a [`ProbeResult`]. A daemon task per real runs
//! one every interval and feeds `ok` to its [`Tracker`]. Kinds: `tcp` (a connect), `http` (one
//! GET, judged by its status), `udp` (a datagram that must be answered), `exec` (a shell
//! command that must exit 0) and `none` (always healthy).

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use tokio::time::timeout;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Unknown,
    Up,
    Down,
}

/// The hysteresis state of one real's checks.
#[derive(Clone, Debug)]
pub struct Tracker {
    rise: u32,
    fall: u32,
    health: Health,
    /// Consecutive results disagreeing with `health` so far.
    streak: u32,
}

impl Tracker {
    pub fn new(rise: u32, fall: u32) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            health: Health::Unknown,
            streak: 0,
        }
    }

    /// A tracker that starts from a known health (`Unknown` is a fresh start).
    pub fn resume(rise: u32, fall: u32, health: Health) -> Self {
        Self {
            health,
            ..Self::new(rise, fall)
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Records one check result; returns the new health if it changed.
    pub fn record(&mut self, ok: bool) -> Option<Health> {
        let (target, needed) = match (self.health, ok) {
            (Health::Unknown, true) => (Health::Up, 1),
            (Health::Unknown, false) => (Health::Down, 1),
            (Health::Up, true) | (Health::Down, false) => {
                self.streak = 0;
                return None;
            }
            (Health::Down, true) => (Health::Up, self.rise),
            (Health::Up, false) => (Health::Down, self.fall),
        };
        self.streak += 1;
        if self.streak < needed {
            return None;
        }
        self.streak = 0;
        self.health = target;
        Some(target)
    }
}

pub const DEFAULT_INTERVAL_MS: u64 = 1000;
pub const DEFAULT_TIMEOUT_MS: u64 = 1000;
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;
pub const MIN_INTERVAL_MS: u64 = 100;
pub const MAX_INTERVAL_MS: u64 = 3_600_000;
pub const MAX_RISE_FALL: u32 = 100;
/// Longest `--check-path` and `--check-cmd`, in bytes: generous for any real use, and it
/// bounds what a configuration (and so the state file and a `restore`) can hold per real.
pub const MAX_CHECK_TEXT: usize = 4096;
pub const DEFAULT_HTTP_PATH: &str = "/";
pub const DEFAULT_HTTP_STATUS: u16 = 200;
/// The largest UDP payload (IPv4: 65535 less the IP and UDP headers).
pub const MAX_UDP_PAYLOAD: usize = 65507;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connect, closed at once.
    #[default]
    Tcp,
    /// One HTTP/1.1 GET; healthy if the status is the one expected.
    Http,
    /// A datagram that must be answered (with a given prefix, if set).
    Udp,
    /// A shell command that must exit 0.
    Exec,
    /// No check: the real is always healthy.
    None,
}

impl CheckKind {
    pub fn name(self) -> &'static str {
        match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Http => "http",
            CheckKind::Udp => "udp",
            CheckKind::Exec => "exec",
            CheckKind::None => "none",
        }
    }
}

/// How a service's reals are checked. The options that only some kinds take are `None` when
/// not set (and then not saved).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckConfig {
    pub kind: CheckKind,
    /// The port to check. None: the service port (see [`CheckConfig::target`]); a port 0
    /// service must set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// http: the path (and query) to GET; default `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// http: the status that means healthy; default 200.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_status: Option<u16>,
    /// udp: the payload to send, in hex (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send: Option<String>,
    /// udp: hex bytes the reply must start with. None: any reply counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<String>,
    /// exec: the command, run by `sh -c` (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_rise")]
    pub rise: u32,
    #[serde(default = "default_fall")]
    pub fall: u32,
}

fn default_interval_ms() -> u64 {
    DEFAULT_INTERVAL_MS
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

fn default_rise() -> u32 {
    DEFAULT_RISE
}

fn default_fall() -> u32 {
    DEFAULT_FALL
}

impl Default for CheckConfig {
    /// A TCP connect to the service port every second.
    fn default() -> Self {
        Self::new(CheckKind::Tcp)
    }
}

impl CheckConfig {
    /// A check of `kind` with every option at its default.
    pub fn new(kind: CheckKind) -> Self {
        Self {
            kind,
            port: None,
            path: None,
            expect_status: None,
            send: None,
            expect: None,
            cmd: None,
            interval_ms: DEFAULT_INTERVAL_MS,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
        }
    }

    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// Where to probe a real of a service on `service_port`: the check port if set, else the
    /// service port.
    pub fn target(&self, real: IpAddr, service_port: u16) -> SocketAddr {
        SocketAddr::new(real, self.port.unwrap_or(service_port))
    }

    /// Checks the check for a service on `service_port`; errors are one line and name the
    /// option at fault by its command-line flag.
    pub fn validate(&self, service_port: u16) -> Result<()> {
        let kind = self.kind;
        let only = |set: bool, flag: &str, kinds: &[CheckKind]| -> Result<()> {
            if set && !kinds.contains(&kind) {
                let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
                bail!("check: {flag} only applies to {}", names.join(", "));
            }
            Ok(())
        };
        use CheckKind as K;
        only(
            self.port.is_some(),
            "--check-port",
            &[K::Tcp, K::Http, K::Udp, K::Exec],
        )?;
        only(self.path.is_some(), "--check-path", &[K::Http])?;
        only(self.expect_status.is_some(), "--expect-status", &[K::Http])?;
        only(self.send.is_some(), "--check-send", &[K::Udp])?;
        only(self.expect.is_some(), "--check-expect", &[K::Udp])?;
        only(self.cmd.is_some(), "--check-cmd", &[K::Exec])?;

        if kind != K::None {
            match self.port {
                Some(0) => bail!("check: --check-port 0 is not a port"),
                None if service_port == 0 => {
                    bail!("check: a port 0 service (every port) needs --check-port")
                }
                _ => {}
            }
        }
        for (flag, text) in [("--check-path", &self.path), ("--check-cmd", &self.cmd)] {
            if let Some(t) = text
                && t.len() > MAX_CHECK_TEXT
            {
                bail!(
                    "check: {flag} is {} bytes, more than {MAX_CHECK_TEXT}",
                    t.len()
                );
            }
        }
        if let Some(path) = &self.path
            && !valid_path(path)
        {
            bail!(
                "check: --check-path {} is not a path like /healthz",
                quote(path)
            );
        }
        if let Some(status) = self.expect_status
            && !(100..=599).contains(&status)
        {
            bail!("check: --expect-status {status} is not an HTTP status (100..=599)");
        }
        if kind == K::Udp {
            let Some(send) = &self.send else {
                bail!("check: udp needs --check-send HEX");
            };
            check_hex("--check-send", send)?;
        }
        if let Some(expect) = &self.expect {
            check_hex("--check-expect", expect)?;
        }
        if kind == K::Exec {
            match &self.cmd {
                None => bail!("check: exec needs --check-cmd CMD"),
                Some(cmd) if cmd.trim().is_empty() => bail!("check: --check-cmd is empty"),
                Some(cmd) if cmd.contains('\0') => {
                    bail!("check: --check-cmd contains a NUL character")
                }
                Some(_) => {}
            }
        }

        if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&self.interval_ms) {
            bail!(
                "check: interval must be 100ms..=1h (got {})",
                fmt_ms(self.interval_ms)
            );
        }
        if self.timeout_ms == 0 || self.timeout_ms > self.interval_ms {
            bail!(
                "check: timeout must be more than 0 and at most the interval (got {}, interval {})",
                fmt_ms(self.timeout_ms),
                fmt_ms(self.interval_ms)
            );
        }
        for (name, n) in [("rise", self.rise), ("fall", self.fall)] {
            if !(1..=MAX_RISE_FALL).contains(&n) {
                bail!("check: {name} must be 1..={MAX_RISE_FALL} (got {n})");
            }
        }
        Ok(())
    }
}

fn valid_path(path: &str) -> bool {
    path.starts_with('/')
        && path.parse::<hyper::Uri>().is_ok_and(|u| {
            u.scheme().is_none() && u.authority().is_none() && u.path_and_query().is_some()
        })
}

/// `s` quoted for a one-line message: control characters escaped, long strings cut.
fn quote(s: &str) -> String {
    const MAX: usize = 40;
    let mut out: String = s.chars().take(MAX).flat_map(char::escape_debug).collect();
    if s.chars().count() > MAX {
        out.push_str("...");
    }
    format!("'{out}'")
}

fn check_hex(flag: &str, s: &str) -> Result<()> {
    match parse_hex(s) {
        None => bail!(
            "check: {flag} {} is not hex (an even number of digits 0-9a-f, no separators)",
            quote(s)
        ),
        Some(b) if b.is_empty() => bail!("check: {flag} is empty"),
        Some(b) if b.len() > MAX_UDP_PAYLOAD => bail!(
            "check: {flag} is {} bytes, more than a datagram holds ({MAX_UDP_PAYLOAD})",
            b.len()
        ),
        Some(_) => Ok(()),
    }
}

/// Hex digits (either case, even count, no separators) as bytes; None if `s` is not that.
pub fn parse_hex(s: &str) -> Option<Vec<u8>> {
    let digits = s.as_bytes();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    digits
        .chunks_exact(2)
        .map(|p| Some((nibble(p[0])? << 4) | nibble(p[1])?))
        .collect()
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `1500ms`, `2s`.
fn fmt_ms(ms: u64) -> String {
    if ms >= 1000 && ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// What a probe of one real tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeResult {
    pub ok: bool,
    /// Wall time of the probe (zero for `none`).
    pub latency: Duration,
    /// One line: `connected`, `HTTP 200`, `connect: connection refused`,
    /// `HTTP 503 (expected 200)`, `timeout after 1s`, `exit status 3`...
    pub detail: String,
}

/// What a probe needs besides the check and the target.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbeEnv {
    /// The service, as written (`198.18.0.100:80/tcp`): exec checks get it as `XLB_SERVICE`.
    pub service: String,
}

/// Probes `target` (the real's address and the check port: [`CheckConfig::target`]) once, as
/// `check` says. Takes at most the check's timeout (plus the time to kill an exec check's
/// processes when it runs over), never panics, and only awaits: it does not block the thread.
/// A check that does not validate fails with what is wrong in `detail`.
pub async fn probe(check: &CheckConfig, target: SocketAddr, env: &ProbeEnv) -> ProbeResult {
    let start = Instant::now();
    let limit = check.timeout();
    let outcome = match check.kind {
        CheckKind::None => {
            return ProbeResult {
                ok: true,
                latency: Duration::ZERO,
                detail: "no check".into(),
            };
        }
        // Exec keeps its own deadline: on timeout it must kill its processes, not just stop.
        CheckKind::Exec => probe_exec(check, target, env, start + limit).await,
        kind => {
            let attempt = async {
                match kind {
                    CheckKind::Tcp => probe_tcp(target).await,
                    CheckKind::Http => probe_http(check, target).await,
                    _ => probe_udp(check, target).await,
                }
            };
            match timeout(limit, attempt).await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("timeout after {}", fmt_ms(check.timeout_ms))),
            }
        }
    };
    let (ok, detail) = match outcome {
        Ok(detail) => (true, detail),
        Err(detail) => (false, detail),
    };
    ProbeResult {
        ok,
        latency: start.elapsed(),
        detail,
    }
}

/// Success or failure, each with its one-line detail.
type Outcome = std::result::Result<String, String>;

/// An I/O error as `connection refused`, without std's ` (os error 111)` suffix.
fn io_detail(e: &std::io::Error) -> String {
    let text = e.to_string();
    let text = match e.raw_os_error() {
        Some(code) => text
            .strip_suffix(&format!(" (os error {code})"))
            .unwrap_or(&text)
            .to_string(),
        None => text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

async fn probe_tcp(target: SocketAddr) -> Outcome {
    match tokio::net::TcpStream::connect(target).await {
        Ok(stream) => {
            drop(stream);
            Ok("connected".into())
        }
        Err(e) => Err(format!("connect: {}", io_detail(&e))),
    }
}

/// A hyper error and its causes on one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.ends_with(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text.replace('\n', " ")
}

async fn probe_http(check: &CheckConfig, target: SocketAddr) -> Outcome {
    use http_body_util::Empty;
    use hyper::{Request, body::Bytes, header};
    use hyper_util::rt::TokioIo;

    let path = check.path.as_deref().unwrap_or(DEFAULT_HTTP_PATH);
    let expect = check.expect_status.unwrap_or(DEFAULT_HTTP_STATUS);
    let host = match target.ip() {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    let request = Request::get(path)
        .header(header::HOST, host)
        .header(header::CONNECTION, "close")
        .header(header::USER_AGENT, "xlb-health-check")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("http: bad request: {e}"))?;

    let stream = tokio::net::TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect: {}", io_detail(&e)))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("http: {}", error_chain(&e)))?;
    // The connection is driven here, not in a task of its own, so that it ends with the probe.
    let mut conn = std::pin::pin!(conn);
    let mut response = std::pin::pin!(sender.send_request(request));
    let response = tokio::select! {
        biased;
        r = &mut response => r,
        r = &mut conn => match r {
            // Closed after the whole exchange: the response is waiting for us, or the
            // server hung up without one.
            Ok(()) => response.await,
            Err(e) => return Err(format!("http: {}", error_chain(&e))),
        },
    }
    .map_err(|e| format!("http: {}", error_chain(&e)))?;
    // The body is not read: the status decides, and dropping the connection closes it.
    let status = response.status().as_u16();
    if status == expect {
        Ok(format!("HTTP {status}"))
    } else {
        Err(format!("HTTP {status} (expected {expect})"))
    }
}

async fn probe_udp(check: &CheckConfig, target: SocketAddr) -> Outcome {
    let Some(payload) = check.send.as_deref().and_then(parse_hex) else {
        return Err("udp: no valid --check-send payload".into());
    };
    let expect = match check.expect.as_deref().map(parse_hex) {
        None => Vec::new(),
        Some(Some(bytes)) => bytes,
        Some(None) => return Err("udp: --check-expect is not hex".into()),
    };
    let local: SocketAddr = match target {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let refused = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::ConnectionRefused {
            "udp: connection refused (ICMP port unreachable)".to_string()
        } else {
            format!("udp: {}", io_detail(&e))
        }
    };
    let socket = tokio::net::UdpSocket::bind(local).await.map_err(refused)?;
    socket.connect(target).await.map_err(refused)?;
    socket.send(&payload).await.map_err(refused)?;
    // A longer reply is cut to the buffer (only its start is compared).
    let mut buf = vec![0u8; expect.len().max(16)];
    let n = socket.recv(&mut buf).await.map_err(refused)?;
    let reply = &buf[..n];
    if reply.starts_with(&expect) {
        Ok(format!("reply {}", to_hex(reply)))
    } else {
        Err(format!(
            "reply {} does not start with {}",
            to_hex(reply),
            to_hex(&expect)
        ))
    }
}

/// Kills a process group when dropped, unless disarmed: an exec check's shell and everything
/// it started go together, also when the probe itself is dropped half-way.
struct GroupKill(Option<i32>);

impl GroupKill {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            // SAFETY: kill(2) has no memory effects. The group leader is our child and not
            // yet reaped, so its id (the group's) cannot have been reused.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}

impl Drop for GroupKill {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn probe_exec(
    check: &CheckConfig,
    target: SocketAddr,
    env: &ProbeEnv,
    deadline: Instant,
) -> Outcome {
    use std::{os::unix::process::ExitStatusExt, process::Stdio};

    let Some(cmd) = check.cmd.as_deref() else {
        return Err("exec: no --check-cmd".into());
    };
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("XLB_REAL", target.ip().to_string())
        .env("XLB_REAL_PORT", target.port().to_string())
        .env("XLB_SERVICE", &env.service)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own group, so a timeout kills what the shell started too.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("exec: cannot run sh: {}", io_detail(&e)))?;
    // Declared after `child`, so dropped before it: the group is killed while its leader is
    // still unreaped.
    let mut group = GroupKill(child.id().and_then(|id| i32::try_from(id).ok()));
    match tokio::time::timeout_at(deadline.into(), child.wait()).await {
        Ok(Ok(status)) => {
            // The shell is reaped: its id may be reused, so the group must not be signalled.
            group.0 = None;
            match (status.code(), status.signal()) {
                (Some(0), _) => Ok("exit status 0".into()),
                (Some(code), _) => Err(format!("exit status {code}")),
                (None, Some(sig)) => Err(format!("killed by signal {sig}")),
                (None, None) => Err(format!("exec: {status}")),
            }
        }
        Ok(Err(e)) => Err(format!("exec: wait: {}", io_detail(&e))),
        Err(_) => {
            group.kill();
            // Reap the shell; bounded in case it cannot die at once (uninterruptible sleep).
            let _ = timeout(Duration::from_millis(500), child.kill()).await;
            let ms = check.timeout_ms;
            Err(format!("timeout after {}", fmt_ms(ms)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(t: &mut Tracker, results: &str) -> Vec<Health> {
        results
            .chars()
            .map(|c| {
                t.record(c == '+');
                t.health()
            })
            .collect()
    }

    #[test]
    fn the_first_result_decides() {
        let mut up = Tracker::new(2, 3);
        assert_eq!(up.health(), Health::Unknown);
        assert_eq!(up.record(true), Some(Health::Up));
        let mut down = Tracker::new(2, 3);
        assert_eq!(down.record(false), Some(Health::Down));
    }

    #[test]
    fn fall_consecutive_failures_take_a_real_down() {
        let mut t = Tracker::new(2, 3);
        t.record(true);
        use Health::*;
        // Two failures, a success (resets the streak), then three failures.
        assert_eq!(feed(&mut t, "--+---"), [Up, Up, Up, Up, Up, Down]);
    }

    #[test]
    fn a_flapping_real_is_not_readmitted_before_rise_successes() {
        let mut t = Tracker::new(3, 1);
        t.record(false);
        use Health::*;
        assert_eq!(
            feed(&mut t, "++-++-+++"),
            [Down, Down, Down, Down, Down, Down, Down, Down, Up]
        );
    }

    #[test]
    fn rise_and_fall_of_zero_act_as_one() {
        let mut t = Tracker::new(0, 0);
        t.record(true);
        assert_eq!(t.record(false), Some(Health::Down));
        assert_eq!(t.record(true), Some(Health::Up));
    }
}

#[cfg(test)]
mod probe_tests {
    use std::{convert::Infallible, net::Ipv6Addr};

    use http_body_util::{Full, StreamBody};
    use hyper::{
        Request, Response,
        body::{Bytes, Frame},
        server::conn::http1,
        service::service_fn,
    };
    use hyper_util::rt::TokioIo;
    use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};

    use super::*;

    const LO4: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    const LO6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
    /// Slack allowed past a probe's timeout.
    const SLACK: Duration = Duration::from_millis(200);

    fn check(kind: CheckKind, timeout_ms: u64) -> CheckConfig {
        CheckConfig {
            timeout_ms,
            ..CheckConfig::new(kind)
        }
    }

    fn env() -> ProbeEnv {
        ProbeEnv {
            service: "198.18.0.100:80/tcp".into(),
        }
    }

    /// Runs a probe, checking that it keeps to its timeout.
    async fn run(check: &CheckConfig, target: SocketAddr) -> ProbeResult {
        let start = Instant::now();
        let r = probe(check, target, &env()).await;
        let elapsed = start.elapsed();
        assert!(
            elapsed < check.timeout() + SLACK,
            "{:?} probe of {target} took {elapsed:?}: {r:?}",
            check.kind
        );
        assert!(r.latency <= elapsed, "{r:?}");
        assert!(!r.detail.contains('\n'), "{r:?}");
        r
    }

    fn assert_fails(r: &ProbeResult, needle: &str) {
        assert!(!r.ok, "expected a failure with '{needle}': {r:?}");
        assert!(r.detail.contains(needle), "expected '{needle}': {r:?}");
    }

    /// A port nothing listens on (bound then closed).
    async fn closed_tcp_port(ip: IpAddr) -> SocketAddr {
        let l = TcpListener::bind((ip, 0)).await.unwrap();
        l.local_addr().unwrap()
    }

    // ---- tcp ----

    #[tokio::test]
    async fn tcp_listening_is_ok_on_both_families() {
        for ip in [LO4, LO6] {
            let l = TcpListener::bind((ip, 0)).await.unwrap();
            let r = run(&check(CheckKind::Tcp, 1000), l.local_addr().unwrap()).await;
            assert!(r.ok, "{r:?}");
            assert_eq!(r.detail, "connected");
        }
    }

    #[tokio::test]
    async fn tcp_closed_port_is_refused() {
        let r = run(&check(CheckKind::Tcp, 1000), closed_tcp_port(LO4).await).await;
        assert_fails(&r, "connect: connection refused");
    }

    /// A listener with backlog 0 whose queue is full drops further SYNs: connects hang.
    #[tokio::test]
    async fn tcp_unanswered_connect_times_out() {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind((LO4, 0).into()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut held = Vec::new();
        let mut hanging = false;
        for _ in 0..8 {
            match timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => held.push(s),
                Ok(Err(e)) => panic!("filling the backlog: {e}"),
                Err(_) => {
                    hanging = true;
                    break;
                }
            }
        }
        assert!(hanging, "the listener's queue never filled");
        let r = run(&check(CheckKind::Tcp, 300), addr).await;
        assert_fails(&r, "timeout after 300ms");
        assert!(r.latency >= Duration::from_millis(300), "{r:?}");
    }

    // ---- http ----

    /// Answers 200 on /healthz (if the request carries `Host: <its address>` and
    /// `Connection: close`), 503 on /bad, 200 with an endless body on /endless, else 404.
    async fn http_server(ip: IpAddr) -> SocketAddr {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let host = match ip {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        };
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let host = host.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let host = host.clone();
                        async move { Ok::<_, Infallible>(answer(&req, &host)) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr
    }

    type TestBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

    fn answer(req: &Request<hyper::body::Incoming>, host: &str) -> Response<TestBody> {
        use http_body_util::BodyExt;
        let full = |status: u16, text: &'static str| {
            Response::builder()
                .status(status)
                .body(Full::new(Bytes::from_static(text.as_bytes())).boxed())
                .unwrap()
        };
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        if header("host") != Some(host) || header("connection") != Some("close") {
            return full(400, "bad headers\n");
        }
        match req.uri().path() {
            "/healthz" => full(200, "ok\n"),
            "/bad" => full(503, "unavailable\n"),
            "/endless" => {
                let chunks = futures_util::stream::repeat_with(|| {
                    Ok(Frame::data(Bytes::from_static(&[b'x'; 4096])))
                });
                Response::new(StreamBody::new(chunks).boxed())
            }
            _ => full(404, "not found\n"),
        }
    }

    fn http(path: &str, timeout_ms: u64) -> CheckConfig {
        CheckConfig {
            path: Some(path.into()),
            ..check(CheckKind::Http, timeout_ms)
        }
    }

    #[tokio::test]
    async fn http_expected_status_is_ok_on_both_families() {
        for ip in [LO4, LO6] {
            let addr = http_server(ip).await;
            let r = run(&http("/healthz", 1000), addr).await;
            assert!(r.ok, "{r:?}");
            assert_eq!(r.detail, "HTTP 200");
        }
    }

    #[tokio::test]
    async fn http_default_path_is_the_root() {
        let addr = http_server(LO4).await;
        let r = run(&check(CheckKind::Http, 1000), addr).await;
        assert_fails(&r, "HTTP 404 (expected 200)");
    }

    #[tokio::test]
    async fn http_other_status_fails_unless_expected() {
        let addr = http_server(LO4).await;
        let r = run(&http("/bad", 1000), addr).await;
        assert_fails(&r, "HTTP 503");
        let expect_503 = CheckConfig {
            expect_status: Some(503),
            ..http("/bad", 1000)
        };
        let r = run(&expect_503, addr).await;
        assert!(r.ok, "{r:?}");
        let r = run(
            &CheckConfig {
                path: Some("/healthz".into()),
                ..expect_503
            },
            addr,
        )
        .await;
        assert_fails(&r, "HTTP 200 (expected 503)");
    }

    #[tokio::test]
    async fn http_does_not_wait_for_the_body() {
        let addr = http_server(LO4).await;
        let r = run(&http("/endless", 1000), addr).await;
        assert!(r.ok, "{r:?}");
        assert!(r.latency < Duration::from_millis(500), "{r:?}");
    }

    #[tokio::test]
    async fn http_closed_port_is_refused() {
        let r = run(&http("/healthz", 1000), closed_tcp_port(LO4).await).await;
        assert_fails(&r, "connect: connection refused");
    }

    #[tokio::test]
    async fn http_silent_server_times_out_and_the_connection_is_closed() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind((LO4, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { listener.accept().await.unwrap().0 });
        let r = run(&http("/healthz", 300), addr).await;
        assert_fails(&r, "timeout after 300ms");
        assert!(r.latency >= Duration::from_millis(300), "{r:?}");
        // The probe leaves nothing behind: the server sees the request, then the end.
        let mut conn = server.await.unwrap();
        let mut request = Vec::new();
        let read = timeout(Duration::from_millis(200), conn.read_to_end(&mut request)).await;
        assert!(read.is_ok(), "the probe's connection is still open");
        assert!(
            request.starts_with(b"GET /healthz HTTP/1.1\r\n"),
            "{request:?}"
        );
    }

    #[tokio::test]
    async fn http_server_hanging_up_fails() {
        let listener = TcpListener::bind((LO4, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
                drop(s);
            }
        });
        let r = run(&http("/healthz", 1000), addr).await;
        assert_fails(&r, "http: ");
    }

    // ---- udp ----

    fn udp(send: &str, expect: Option<&str>, timeout_ms: u64) -> CheckConfig {
        CheckConfig {
            send: Some(send.into()),
            expect: expect.map(Into::into),
            ..check(CheckKind::Udp, timeout_ms)
        }
    }

    /// Echoes every datagram back.
    async fn udp_echo(ip: IpAddr) -> SocketAddr {
        let socket = UdpSocket::bind((ip, 0)).await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            loop {
                let (n, from) = socket.recv_from(&mut buf).await.unwrap();
                socket.send_to(&buf[..n], from).await.unwrap();
            }
        });
        addr
    }

    #[tokio::test]
    async fn udp_echo_is_ok_on_both_families() {
        for ip in [LO4, LO6] {
            let addr = udp_echo(ip).await;
            let r = run(&udp("50494e47", None, 1000), addr).await;
            assert!(r.ok, "{r:?}");
            let r = run(&udp("50494E4721", Some("50494e47"), 1000), addr).await;
            assert!(r.ok, "{r:?}");
        }
    }

    #[tokio::test]
    async fn udp_reply_not_matching_fails() {
        let addr = udp_echo(LO4).await;
        let r = run(&udp("50494e47", Some("504f4e47"), 1000), addr).await;
        assert_fails(&r, "reply 50494e47 does not start with 504f4e47");
        // A reply shorter than what is expected does not match either.
        let r = run(&udp("50", Some("5049"), 1000), addr).await;
        assert_fails(&r, "does not start with");
    }

    #[tokio::test]
    async fn udp_no_listener_is_refused() {
        let socket = UdpSocket::bind((LO4, 0)).await.unwrap();
        let addr = socket.local_addr().unwrap();
        drop(socket);
        let r = run(&udp("00", None, 1000), addr).await;
        assert_fails(&r, "connection refused");
        assert!(r.latency < Duration::from_millis(500), "{r:?}");
    }

    #[tokio::test]
    async fn udp_silent_socket_times_out() {
        let socket = UdpSocket::bind((LO6, 0)).await.unwrap();
        let r = run(&udp("00", None, 300), socket.local_addr().unwrap()).await;
        assert_fails(&r, "timeout after 300ms");
        assert!(r.latency >= Duration::from_millis(300), "{r:?}");
        // It did arrive: the silence is the server's.
        let mut buf = [0u8; 4];
        assert_eq!(socket.try_recv(&mut buf).unwrap(), 1);
    }

    // ---- exec ----

    fn exec(cmd: &str, timeout_ms: u64) -> CheckConfig {
        CheckConfig {
            cmd: Some(cmd.into()),
            ..check(CheckKind::Exec, timeout_ms)
        }
    }

    fn target() -> SocketAddr {
        (LO4, 8080).into()
    }

    #[tokio::test]
    async fn exec_exit_status_decides() {
        let r = run(&exec("exit 0", 1000), target()).await;
        assert!(r.ok, "{r:?}");
        let r = run(&exec("exit 3", 1000), target()).await;
        assert_fails(&r, "exit status 3");
        let r = run(&exec("kill -TERM $$", 1000), target()).await;
        assert_fails(&r, "killed by signal 15");
    }

    #[tokio::test]
    async fn exec_gets_the_real_port_and_service() {
        let cmd = r#"test "$XLB_REAL" = 127.0.0.1 && test "$XLB_REAL_PORT" = 8080 &&
                     test "$XLB_SERVICE" = 198.18.0.100:80/tcp"#;
        let r = run(&exec(cmd, 1000), target()).await;
        assert!(r.ok, "{r:?}");
        let r = run(&exec(r#"test "$XLB_REAL" = ::1"#, 1000), (LO6, 53).into()).await;
        assert!(r.ok, "{r:?}");
        let r = run(&exec(r#"test "$XLB_REAL" = 10.0.0.1"#, 1000), target()).await;
        assert_fails(&r, "exit status 1");
    }

    #[tokio::test]
    async fn exec_output_is_discarded() {
        // Writes to closed pipes would kill the shell (SIGPIPE) and fail the check.
        let r = run(&exec("seq 100000; seq 100000 >&2; exit 0", 2000), target()).await;
        assert!(r.ok, "{r:?}");
    }

    /// A process is gone once it no longer exists or is a zombie its parent has not reaped yet.
    fn gone(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            // The state follows the command name, which is in parentheses.
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        }
    }

    #[tokio::test]
    async fn exec_timeout_kills_the_shell_and_its_children() {
        let pids = std::env::temp_dir().join(format!("xlb-health-{}.pids", std::process::id()));
        let cmd = format!(
            "sleep 5 & echo $$ $! > {path}.tmp && mv {path}.tmp {path}; wait",
            path = pids.display()
        );
        let r = run(&exec(&cmd, 300), target()).await;
        assert_fails(&r, "timeout after 300ms");
        assert!(r.latency >= Duration::from_millis(300), "{r:?}");
        let text = std::fs::read_to_string(&pids).unwrap();
        let _ = std::fs::remove_file(&pids);
        let pids: Vec<u32> = text
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(pids.len(), 2, "{text}");
        // The shell is reaped by the probe; the orphaned sleep by init, a moment later.
        let start = Instant::now();
        while !pids.iter().all(|&p| gone(p)) {
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "still running: {pids:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn exec_without_a_command_fails_without_panicking() {
        let r = run(&check(CheckKind::Exec, 1000), target()).await;
        assert_fails(&r, "exec: no --check-cmd");
        let r = run(&check(CheckKind::Udp, 1000), target()).await;
        assert_fails(&r, "udp: ");
    }

    // ---- none ----

    #[tokio::test]
    async fn none_is_always_healthy() {
        let r = probe(&CheckConfig::new(CheckKind::None), target(), &env()).await;
        assert!(r.ok);
        assert_eq!(r.latency, Duration::ZERO);
    }

    // ---- config ----

    #[test]
    fn json_defaults() {
        let c: CheckConfig = serde_json::from_str(r#"{"kind":"tcp"}"#).unwrap();
        assert_eq!(c, CheckConfig::default());
        assert_eq!(c.kind, CheckKind::Tcp);
        assert_eq!(
            (c.interval_ms, c.timeout_ms, c.rise, c.fall),
            (1000, 1000, 2, 3)
        );
        assert_eq!(
            (c.port, c.path.as_deref(), c.expect_status),
            (None, None, None)
        );
        c.validate(80).unwrap();
        assert!(serde_json::from_str::<CheckConfig>("{}").is_err());
        assert!(serde_json::from_str::<CheckConfig>(r#"{"kind":"icmp"}"#).is_err());
        assert!(serde_json::from_str::<CheckConfig>(r#"{"kind":"tcp","prot":1}"#).is_err());
    }

    #[test]
    fn json_round_trips_and_saves_only_what_is_set() {
        let c = CheckConfig {
            port: Some(8080),
            path: Some("/healthz?full=1".into()),
            expect_status: Some(204),
            interval_ms: 5000,
            timeout_ms: 2500,
            rise: 1,
            fall: 10,
            ..CheckConfig::new(CheckKind::Http)
        };
        c.validate(80).unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"http","port":8080,"path":"/healthz?full=1","expect_status":204,"interval_ms":5000,"timeout_ms":2500,"rise":1,"fall":10}"#
        );
        assert_eq!(serde_json::from_str::<CheckConfig>(&json).unwrap(), c);
        for c in [
            CheckConfig::new(CheckKind::None),
            udp("00ff", Some("AB"), 1000),
            exec("exit 0", 1000),
        ] {
            let json = serde_json::to_string(&c).unwrap();
            assert!(!json.contains("null"), "{json}");
            assert_eq!(serde_json::from_str::<CheckConfig>(&json).unwrap(), c);
        }
    }

    fn error(c: &CheckConfig, service_port: u16) -> String {
        let msg = format!("{:#}", c.validate(service_port).unwrap_err());
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.starts_with("check: "), "{msg}");
        msg
    }

    #[test]
    fn validation_errors_name_the_problem() {
        let tcp = CheckConfig::default();
        let cases: Vec<(CheckConfig, u16, &str)> = vec![
            (
                check(CheckKind::Udp, 1000),
                53,
                "check: udp needs --check-send HEX",
            ),
            (
                udp("zz", None, 1000),
                53,
                "check: --check-send 'zz' is not hex",
            ),
            (udp("abc", None, 1000), 53, "--check-send 'abc' is not hex"),
            (udp("ab cd", None, 1000), 53, "is not hex"),
            (udp("", None, 1000), 53, "check: --check-send is empty"),
            (
                udp("00", Some("0x01"), 1000),
                53,
                "check: --check-expect '0x01' is not hex",
            ),
            (
                check(CheckKind::Exec, 1000),
                80,
                "check: exec needs --check-cmd CMD",
            ),
            (exec("  ", 1000), 80, "check: --check-cmd is empty"),
            (
                CheckConfig {
                    path: Some("/x".into()),
                    ..tcp.clone()
                },
                80,
                "check: --check-path only applies to http",
            ),
            (
                CheckConfig {
                    expect_status: Some(200),
                    ..udp("00", None, 1000)
                },
                80,
                "check: --expect-status only applies to http",
            ),
            (
                CheckConfig {
                    send: Some("00".into()),
                    ..tcp.clone()
                },
                80,
                "check: --check-send only applies to udp",
            ),
            (
                CheckConfig {
                    expect: Some("00".into()),
                    ..tcp.clone()
                },
                80,
                "check: --check-expect only applies to udp",
            ),
            (
                CheckConfig {
                    cmd: Some("true".into()),
                    ..tcp.clone()
                },
                80,
                "check: --check-cmd only applies to exec",
            ),
            (
                CheckConfig {
                    port: Some(80),
                    ..CheckConfig::new(CheckKind::None)
                },
                80,
                "check: --check-port only applies to tcp, http, udp, exec",
            ),
            (
                tcp.clone(),
                0,
                "check: a port 0 service (every port) needs --check-port",
            ),
            (
                CheckConfig {
                    port: Some(0),
                    ..tcp.clone()
                },
                80,
                "check: --check-port 0 is not a port",
            ),
            (
                http("healthz", 1000),
                80,
                "check: --check-path 'healthz' is not a path like /healthz",
            ),
            (http("/a b", 1000), 80, "is not a path"),
            (http("/a\nb", 1000), 80, r"--check-path '/a\nb'"),
            (http("http://x/", 1000), 80, "is not a path"),
            (
                CheckConfig {
                    expect_status: Some(99),
                    ..http("/", 1000)
                },
                80,
                "check: --expect-status 99 is not an HTTP status (100..=599)",
            ),
            (
                CheckConfig {
                    interval_ms: 99,
                    timeout_ms: 50,
                    ..tcp.clone()
                },
                80,
                "check: interval must be 100ms..=1h (got 99ms)",
            ),
            (
                CheckConfig {
                    interval_ms: 3_600_001,
                    ..tcp.clone()
                },
                80,
                "check: interval must be 100ms..=1h",
            ),
            (
                CheckConfig {
                    timeout_ms: 0,
                    ..tcp.clone()
                },
                80,
                "check: timeout must be more than 0 and at most the interval (got 0ms, interval 1s)",
            ),
            (
                CheckConfig {
                    timeout_ms: 1001,
                    ..tcp.clone()
                },
                80,
                "check: timeout must be more than 0 and at most the interval (got 1001ms",
            ),
            (
                CheckConfig {
                    rise: 0,
                    ..tcp.clone()
                },
                80,
                "check: rise must be 1..=100 (got 0)",
            ),
            (
                CheckConfig {
                    fall: 101,
                    ..tcp.clone()
                },
                80,
                "check: fall must be 1..=100 (got 101)",
            ),
        ];
        for (c, port, want) in cases {
            let msg = error(&c, port);
            assert!(msg.contains(want), "{c:?}: got '{msg}', want '{want}'");
        }
    }

    #[test]
    fn valid_checks_are_accepted() {
        let ok = [
            (CheckConfig::default(), 80),
            (
                CheckConfig {
                    port: Some(8080),
                    ..CheckConfig::default()
                },
                0,
            ),
            (CheckConfig::new(CheckKind::None), 0),
            (http("/", 1000), 80),
            (udp("DEADbeef", Some("de"), 1000), 53),
            (exec("curl -fs http://$XLB_REAL:$XLB_REAL_PORT/", 1000), 80),
            (
                CheckConfig {
                    interval_ms: 100,
                    timeout_ms: 100,
                    rise: 100,
                    fall: 1,
                    ..CheckConfig::default()
                },
                80,
            ),
            (
                CheckConfig {
                    interval_ms: 3_600_000,
                    ..CheckConfig::default()
                },
                80,
            ),
        ];
        for (c, port) in ok {
            c.validate(port)
                .unwrap_or_else(|e| panic!("{c:?} on port {port}: {e:#}"));
        }
    }

    #[test]
    fn hex_parsing() {
        assert_eq!(parse_hex("00ffAb"), Some(vec![0, 0xff, 0xab]));
        assert_eq!(parse_hex(""), Some(vec![]));
        for bad in ["0", "0g", "0x00", "00 11", "00:11", "éé"] {
            assert_eq!(parse_hex(bad), None, "{bad}");
        }
        assert_eq!(to_hex(&[0, 0xff, 0x1a]), "00ff1a");
    }

    #[test]
    fn target_is_the_check_port_else_the_service_port() {
        let c = CheckConfig::default();
        assert_eq!(c.target(LO4, 80), SocketAddr::from((LO4, 80)));
        let c = CheckConfig {
            port: Some(8080),
            ..c
        };
        assert_eq!(c.target(LO6, 80), SocketAddr::from((LO6, 8080)));
    }
}
