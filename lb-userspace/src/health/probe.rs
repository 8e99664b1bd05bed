//! Probes: one attempt of a [`CheckConfig`] against one real, bounded by the check's timeout,
//! answering a [`ProbeResult`]. Kinds: `tcp` (a connect), `http` (one GET, judged by its
//! status), `udp` (a datagram that must be answered), `exec` (a shell command that must exit 0)
//! and `none` (always healthy).

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use tokio::time::timeout;

use super::check::{
    CheckConfig, CheckKind, DEFAULT_HTTP_PATH, DEFAULT_HTTP_STATUS, fmt_ms, parse_hex, to_hex,
};

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
mod probe_tests {
    use std::convert::Infallible;

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
    use crate::health::check::tests::{LO4, LO6, check, exec, http, udp};

    /// Slack allowed past a probe's timeout.
    const SLACK: Duration = Duration::from_millis(200);

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
}
