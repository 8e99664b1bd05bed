//! What the end-to-end tests share: the lab (`scripts/lab NAME up`, torn down on drop), the
//! `xlb` binary pointed at the lab daemon's socket, commands inside namespaces, and HTTP
//! requests from the lab's client.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    time::{Duration, Instant},
};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The release binary `scripts/test` builds (the labs run it too).
pub fn xlb_bin() -> PathBuf {
    repo().join("target/release/xlb")
}

pub fn sh(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"))
}

/// stdout and stderr of a command, as text.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One of `scripts/lab`'s labs, by name (`dr`, `tun`).
#[derive(Clone, Copy)]
pub struct Lab {
    name: &'static str,
}

/// A lab brought up by [`Lab::up`], brought down when dropped.
pub struct Running(Lab);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = sh(
            repo().join("scripts/lab").to_str().unwrap(),
            &[self.0.name, "down"],
        );
    }
}

impl Lab {
    pub const fn new(name: &'static str) -> Lab {
        Lab { name }
    }

    pub fn up(self) -> Running {
        self.up_with(&[])
    }

    /// [`Lab::up`] with environment variables for `scripts/lab` (e.g. `XLB_LAB_CONN_CAPACITY`).
    pub fn up_with(self, env: &[(&str, &str)]) -> Running {
        assert!(
            xlb_bin().exists(),
            "build target/release/xlb first (scripts/test does)"
        );
        let out = Command::new(repo().join("scripts/lab"))
            .args([self.name, "up"])
            .envs(env.iter().copied())
            .output()
            .expect("running scripts/lab");
        assert!(
            out.status.success(),
            "lab {} up failed: {}",
            self.name,
            text(&out)
        );
        Running(self)
    }

    /// The lab's state directory (sockets, pid files, logs).
    pub fn state(&self) -> String {
        format!("/run/xlb-lab/{}", self.name)
    }

    /// The CLI talking to this lab's daemon.
    pub fn xlb(&self) -> Xlb {
        Xlb {
            socket: format!("{}/xlb.sock", self.state()),
        }
    }

    /// `xlb daemon ARGS` on this lab's socket in the director's network namespace only, as
    /// scripts/lab starts it: the host's bpffs stays visible, so its pins outlive it.
    pub fn daemon_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns("dir")))
            .arg(xlb_bin())
            .args(["--socket", &self.xlb().socket, "daemon"])
            .args(args);
        cmd
    }

    /// A command in the director's network namespace only (see `daemon_command`).
    pub fn in_dir_netns(&self, cmd: &[&str]) -> Output {
        let mut full = vec![format!("--net=/run/netns/{}", self.ns("dir"))];
        full.extend(cmd.iter().map(|s| s.to_string()));
        let full: Vec<&str> = full.iter().map(|s| s.as_str()).collect();
        sh("nsenter", &full)
    }

    /// The lab's namespace for `host` (client, dir, r1, ...).
    pub fn ns(&self, host: &str) -> String {
        format!("xlb-{}-{host}", self.name)
    }

    /// One HTTP request from the lab's client on a new connection: the body, or None.
    pub fn curl(&self, max_time: &str, args: &[&str]) -> Option<String> {
        let ns = self.ns("client");
        let mut full = vec![
            "netns",
            "exec",
            &ns,
            "curl",
            "-s",
            "-g",
            "--noproxy",
            "*",
            "--max-time",
            max_time,
        ];
        full.extend_from_slice(args);
        let out = sh("ip", &full);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    pub fn get(&self, url: &str) -> Option<String> {
        self.curl("2", &[url])
    }

    /// `n` GETs to `url` from the client, each on a new connection: answers per real name
    /// (the lab servers answer "NAME CLIENT-IP"), failures, client addresses seen. Panics
    /// when the first 10 all fail, with `diagnostics`, rather than wait for each of the rest.
    pub fn spread(
        &self,
        url: &str,
        n: usize,
        diagnostics: impl Fn() -> String,
    ) -> (BTreeMap<String, usize>, usize, Vec<String>) {
        let mut per_real = BTreeMap::new();
        let mut failed = 0;
        let mut clients = Vec::new();
        for i in 0..n {
            match self.get(url) {
                Some(body) => {
                    let mut words = body.split_whitespace();
                    let name = words.next().unwrap_or("").to_string();
                    let client = words.next().unwrap_or("").to_string();
                    *per_real.entry(name).or_insert(0) += 1;
                    if !clients.contains(&client) {
                        clients.push(client);
                    }
                }
                None => failed += 1,
            }
            if i + 1 == 10 && failed == 10 {
                panic!(
                    "the first 10 requests to {url} all failed\n{}",
                    diagnostics()
                );
            }
        }
        (per_real, failed, clients)
    }
}

/// The `xlb` CLI aimed at one daemon's socket.
pub struct Xlb {
    pub socket: String,
}

impl Xlb {
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(xlb_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs a command that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "xlb {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// One long-lived HTTP/1.1 connection (scripts/lab-http-keepalive.py VIP PORT ARGS) from
/// namespace `ns`. Each line it prints goes to `forward` as it arrives, from a thread of its
/// own, until `forward` returns false or the script ends.
pub fn keepalive(
    ns: &str,
    args: &[&str],
    mut forward: impl FnMut(String) -> bool + Send + 'static,
) -> KillOnDrop {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "python3"])
        .arg(repo().join("scripts/lab-http-keepalive.py"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !forward(line) {
                break;
            }
        }
    });
    KillOnDrop(child)
}

/// A process of the test's own, killed (and reaped) when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// The value of one sample line of a Prometheus text page.
pub fn metric(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Runs `promtool check metrics` (Debian package prometheus) on a page; panics with what it
/// reports if it finds any problem.
pub fn promtool_check(page: &str) {
    use std::io::Write;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/setup installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success() && text(&checked).trim().is_empty(),
        "promtool check metrics: {}\n{page}",
        text(&checked)
    );
}

/// Every real answered, each between 20 % and 47 % of `total` requests.
pub fn assert_spread(per_real: &BTreeMap<String, usize>, reals: usize, total: usize) {
    assert_eq!(per_real.len(), reals, "{per_real:?}");
    for (real, n) in per_real {
        let share = *n as f64 / total as f64;
        assert!(
            (0.20..=0.47).contains(&share),
            "{real} got {share:.3} of requests: {per_real:?}"
        );
    }
}
