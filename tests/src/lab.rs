//! What the end-to-end tests share: the lab (`scripts/lab NAME up`, torn down on drop) and
//! its names and addresses (`Topology`, read from the file `up` writes), the `xlb` binary
//! pointed at the lab daemon's socket, commands inside namespaces, and HTTP requests from the
//! lab's client.

use std::{
    collections::BTreeMap,
    io::BufRead,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use serde::Deserialize;

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

/// A file's SHA-256 (coreutils' sha256sum), in hex: what the lab's HTTP server answers for an
/// upload's body.
pub fn sha256(file: impl AsRef<std::path::Path>) -> String {
    let file = file.as_ref().to_string_lossy().into_owned();
    let out = sh("sha256sum", &[&file]);
    assert!(out.status.success(), "{}", text(&out));
    text(&out).split_whitespace().next().unwrap().to_string()
}

/// Where `scripts/lab` keeps each lab's state dir (its STATE_ROOT): the one fact needed to
/// find a lab's topology.json.
const STATE_ROOT: &str = "/run/xlb-lab";

/// A lab's names and addresses, as `scripts/lab NAME up` writes them to
/// STATE_DIR/topology.json (the schema is described there, at `write_topology`; an `Option`
/// field is a key some labs leave out). Hosts are named as in the script (client, dir, rt,
/// d1, r1, ...); each `ifaces` key is an interface name in the host's namespace.
#[derive(Clone, Debug, Deserialize)]
pub struct Topology {
    pub version: u32,
    pub lab: String,
    pub state_dir: String,
    /// Every namespace of the lab starts with it.
    pub ns_prefix: String,
    /// Switch key (as in `Iface::switch`) to the namespace holding its bridge.
    pub switches: BTreeMap<String, String>,
    pub hosts: BTreeMap<String, Host>,
    pub client: String,
    pub router: Option<String>,
    pub directors: Vec<String>,
    pub reals: Vec<String>,
    /// Reals running an HTTP server but in no service: for a test to add (ha).
    #[serde(default)]
    pub spares: Vec<String>,
    /// The services `up` configures, each with every real.
    pub services: BTreeMap<String, Service>,
    /// The xlb daemon of each director, by director.
    pub daemons: BTreeMap<String, Daemon>,
    /// The HTTP servers the lab runs on the reals, by process name.
    pub servers: BTreeMap<String, Server>,
    /// The configuration one director saved and the others restored (ecmp).
    pub saved_config: Option<String>,
    pub bgp: Option<Bgp>,
    /// The directors' VRRP (keepalived) pair (ha).
    pub vrrp: Option<Vrrp>,
}

impl Topology {
    /// Reads and checks a topology.json.
    pub fn load(path: &Path) -> Result<Topology> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Topology::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Parses and checks the text of a topology.json: every host it names exists, every
    /// switch an interface names too.
    pub fn parse(text: &str) -> Result<Topology> {
        let topo: Topology = serde_json::from_str(text)?;
        ensure!(
            topo.version == 1,
            "topology version {}, this code reads 1",
            topo.version
        );
        for host in std::iter::once(&topo.client)
            .chain(&topo.router)
            .chain(&topo.directors)
            .chain(&topo.reals)
            .chain(&topo.spares)
            .chain(topo.daemons.keys())
            .chain(topo.servers.values().map(|s| &s.host))
        {
            ensure!(
                topo.hosts.contains_key(host),
                "host {host} is not among the hosts"
            );
        }
        for (name, host) in &topo.hosts {
            ensure!(!host.ifaces.is_empty(), "host {name} has no interface");
            for sw in host.ifaces.values().filter_map(|i| i.switch.as_ref()) {
                ensure!(
                    topo.switches.contains_key(sw),
                    "{name} is on switch {sw}, which is not among the switches"
                );
            }
        }
        Ok(topo)
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .get(name)
            .unwrap_or_else(|| panic!("lab {} has no host {name}", self.lab))
    }

    /// The network namespace of `host` (client, dir, r1, ...).
    pub fn ns(&self, host: &str) -> &str {
        &self.host(host).ns
    }

    /// `host`'s IPv4 address (on its main interface).
    pub fn ipv4(&self, host: &str) -> &str {
        &self.host(host).main().ipv4
    }

    /// `host`'s IPv6 address (on its main interface); panics in a lab without IPv6.
    pub fn ipv6(&self, host: &str) -> &str {
        self.host(host)
            .main()
            .ipv6
            .as_deref()
            .unwrap_or_else(|| panic!("{host} of lab {} has no IPv6 address", self.lab))
    }

    /// The reals' IPv4 addresses, in the order of `reals`.
    pub fn real_ipv4s(&self) -> Vec<&str> {
        self.reals.iter().map(|r| self.ipv4(r)).collect()
    }

    /// (name, IPv4 address) of each real, in the order of `reals`.
    pub fn reals_with_ipv4(&self) -> Vec<(&str, &str)> {
        self.reals
            .iter()
            .map(|r| (r.as_str(), self.ipv4(r)))
            .collect()
    }

    /// The real whose main interface has address `addr`.
    pub fn real_by_addr(&self, addr: &str) -> Option<&str> {
        self.reals
            .iter()
            .find(|r| {
                let main = self.host(r).main();
                main.ipv4 == addr || main.ipv6.as_deref() == Some(addr)
            })
            .map(String::as_str)
    }

    /// The only director of a lab with one (dr, tun).
    pub fn director(&self) -> &str {
        assert_eq!(
            self.directors.len(),
            1,
            "lab {} has several directors",
            self.lab
        );
        &self.directors[0]
    }

    pub fn router(&self) -> &str {
        self.router
            .as_deref()
            .unwrap_or_else(|| panic!("lab {} has no router", self.lab))
    }

    pub fn service(&self, name: &str) -> &Service {
        self.services
            .get(name)
            .unwrap_or_else(|| panic!("lab {} has no service {name}", self.lab))
    }

    pub fn daemon(&self, director: &str) -> &Daemon {
        self.daemons
            .get(director)
            .unwrap_or_else(|| panic!("lab {} has no daemon on {director}", self.lab))
    }

    /// The CLI talking to `director`'s daemon.
    pub fn xlb(&self, director: &str) -> Xlb {
        Xlb {
            socket: self.daemon(director).socket.clone(),
        }
    }

    /// The lab's HTTP server on `host` listening on `port`.
    pub fn server_on(&self, host: &str, port: u16) -> &Server {
        self.servers
            .values()
            .find(|s| s.host == host && s.port == port)
            .unwrap_or_else(|| panic!("lab {} has no server on {host}:{port}", self.lab))
    }

    /// The switch namespace and port name that `host`'s interface `iface` is plugged into.
    pub fn switch_port(&self, host: &str, iface: &str) -> (&str, &str) {
        let i = self
            .host(host)
            .ifaces
            .get(iface)
            .unwrap_or_else(|| panic!("{host} of lab {} has no {iface}", self.lab));
        match (&i.switch, &i.port) {
            (Some(sw), Some(port)) => (&self.switches[sw], port),
            _ => panic!("{host}'s {iface} in lab {} is on no switch", self.lab),
        }
    }

    /// The name of `host`'s interface on the segment (switch) of `other`'s main interface:
    /// e.g. the router's interface towards the reals.
    pub fn iface_towards(&self, host: &str, other: &str) -> &str {
        let switch = &self.host(other).main().switch;
        self.host(host)
            .ifaces
            .iter()
            .find(|(_, i)| switch.is_some() && i.switch == *switch)
            .map(|(name, _)| name.as_str())
            .unwrap_or_else(|| panic!("{host} of lab {} shares no segment with {other}", self.lab))
    }

    /// A file in the lab's state dir.
    pub fn state_file(&self, name: &str) -> String {
        format!("{}/{name}", self.state_dir)
    }
}

/// One interface of a host, named by its key in `Host::ifaces`.
#[derive(Clone, Debug, Deserialize)]
pub struct Iface {
    pub mac: String,
    pub ipv4: String,
    pub ipv6: Option<String>,
    /// The MTU the lab sets (none: the veth default).
    pub mtu: Option<u32>,
    /// The switch (a `Topology::switches` key) this interface's veth peer is a port of, and
    /// that port's name; none for a direct link.
    pub switch: Option<String>,
    pub port: Option<String>,
}

/// One host of the lab: a network namespace and its interfaces.
#[derive(Clone, Debug, Deserialize)]
pub struct Host {
    pub ns: String,
    /// The state file of `xlb realserver setup` on this real (TUN labs).
    pub realserver_state: Option<String>,
    pub ifaces: BTreeMap<String, Iface>,
}

impl Host {
    /// The interface that carries the host's own address: the first by name (eth0).
    pub fn main(&self) -> &Iface {
        self.ifaces
            .values()
            .next()
            .expect("a host with no interface")
    }

    /// The name of `main`'s interface.
    pub fn main_name(&self) -> &str {
        self.ifaces.keys().next().expect("a host with no interface")
    }
}

/// A service `up` configures, with every real of the lab behind it.
#[derive(Clone, Debug, Deserialize)]
pub struct Service {
    pub vip4: String,
    pub vip6: Option<String>,
    pub port: u16,
    pub proto: String,
    pub mode: String,
    /// The port its health checks probe (only where `up` configures checks).
    pub check_port: Option<u16>,
    /// NAT: the port the reals serve it on.
    pub real_port: Option<u16>,
    /// Full NAT: the address the reals see requests come from.
    pub snat: Option<String>,
    /// TUN: ipip or gue (`scripts/lab tun up --encap`).
    pub encap: Option<String>,
    /// TUN: the family IPv4 requests are tunnelled in, ipv4 or ipv6 (`--4in6`).
    pub tunnel4: Option<String>,
}

impl Service {
    /// As the CLI writes it: VIP4:PORT/PROTO.
    pub fn addr4(&self) -> String {
        format!("{}:{}/{}", self.vip4, self.port, self.proto)
    }

    /// As the CLI writes it: [VIP6]:PORT/PROTO.
    pub fn addr6(&self) -> String {
        format!("[{}]:{}/{}", self.vip6(), self.port, self.proto)
    }

    pub fn vip6(&self) -> &str {
        self.vip6.as_deref().expect("a service with no IPv6 VIP")
    }

    /// http://VIP4/ (the port only when it is not 80).
    pub fn url4(&self) -> String {
        http_url(&self.vip4, self.port)
    }

    /// http://[VIP6]/ (the port only when it is not 80).
    pub fn url6(&self) -> String {
        http_url(&format!("[{}]", self.vip6()), self.port)
    }
}

/// http://HOST/ or http://HOST:PORT/ (the port only when it is not 80).
pub fn http_url(host: &str, port: u16) -> String {
    match port {
        80 => format!("http://{host}/"),
        _ => format!("http://{host}:{port}/"),
    }
}

/// An xlb daemon as `up` starts it on a director (its files in the state dir).
#[derive(Clone, Debug, Deserialize)]
pub struct Daemon {
    /// The interface its XDP program is attached to (its first `--iface`: it names the pins).
    pub iface: String,
    /// Every `--iface`, where there are several (a two-arm director).
    #[serde(default)]
    pub ifaces: Vec<String>,
    /// Its control socket, for the CLI's `--socket`.
    pub socket: String,
    /// Its `--state` file.
    pub state: String,
    #[serde(flatten)]
    pub spawned: Spawned,
    /// Its Prometheus endpoint (ADDR:PORT), on the director's own loopback.
    pub metrics: String,
    /// `--bgp-config` and `--bird-socket`, where the daemon announces its VIPs (ecmp).
    pub bgp_config: Option<String>,
    pub bird_socket: Option<String>,
}

impl Daemon {
    /// Its /metrics URL (to fetch from inside the director's namespace).
    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.metrics)
    }
}

/// One of the lab's HTTP servers on a real (scripts/lab-http-server.py).
#[derive(Clone, Debug, Deserialize)]
pub struct Server {
    pub host: String,
    pub port: u16,
    #[serde(flatten)]
    pub spawned: Spawned,
}

/// What scripts/lab's `spawn` keeps of a process it started: its output and its pid, in the
/// state dir.
#[derive(Clone, Debug, Deserialize)]
pub struct Spawned {
    pub log: String,
    pub pid_file: String,
}

/// The BGP side of a lab whose directors announce their VIPs (ecmp).
#[derive(Clone, Debug, Deserialize)]
pub struct Bgp {
    pub router_as: u32,
    pub director_as: u32,
    /// Each BIRD instance, by the host it runs on.
    pub birds: BTreeMap<String, Bird>,
}

/// One BIRD instance: its configuration and control socket.
#[derive(Clone, Debug, Deserialize)]
pub struct Bird {
    pub config: String,
    pub socket: String,
    #[serde(flatten)]
    pub spawned: Spawned,
}

/// A VRRP pair of directors (keepalived), holding one VIP.
#[derive(Clone, Debug, Deserialize)]
pub struct Vrrp {
    pub vip: String,
    /// Each director's keepalived, by director.
    pub keepalived: BTreeMap<String, Keepalived>,
}

/// One keepalived instance: its configuration (from packaging/keepalived) and priority.
#[derive(Clone, Debug, Deserialize)]
pub struct Keepalived {
    pub config: String,
    pub priority: u32,
    #[serde(flatten)]
    pub spawned: Spawned,
}

/// One of `scripts/lab`'s labs, by name (`dr`, `tun`, `ecmp`).
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
        self.launch(env, &[])
    }

    /// [`Lab::up`] with options after `up` (e.g. `tun up --encap gue`).
    pub fn up_options(self, options: &[&str]) -> Running {
        self.launch(&[], options)
    }

    fn launch(self, env: &[(&str, &str)], options: &[&str]) -> Running {
        assert!(
            xlb_bin().exists(),
            "build target/release/xlb first (scripts/test does)"
        );
        let out = Command::new(repo().join("scripts/lab"))
            .args([self.name, "up"])
            .args(options)
            .envs(env.iter().copied())
            .output()
            .expect("running scripts/lab");
        assert!(
            out.status.success(),
            "lab {} up failed: {}",
            self.name,
            text(&out)
        );
        let running = Running(self);
        self.topology();
        running
    }

    /// Starts the lab's daemon again with `args` (its log in the state dir as NAME.log, its
    /// state file the lab's); once it answers, it is the lab's daemon (the lab stops it by
    /// pid). Returns its log so far.
    pub fn restart(&self, args: &[&str], name: &str) -> String {
        let topo = self.topology();
        let daemon = topo.daemon(topo.director());
        let log = topo.state_file(&format!("{name}.log"));
        let mut all = args.to_vec();
        all.extend(["--state", &daemon.state]);
        let child = KillOnDrop(
            self.daemon_command(&all)
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        );
        wait_for("the restarted daemon", Duration::from_secs(10), || {
            self.xlb().run(&["status"]).status.success()
        });
        std::fs::write(&daemon.spawned.pid_file, child.0.id().to_string()).unwrap();
        std::mem::forget(child);
        std::fs::read_to_string(&log).unwrap()
    }

    /// What a failure message needs: the lab's status and the end of its daemon's log.
    pub fn diagnostics(&self) -> String {
        let topo = self.topology();
        self.status_and_logs([&topo.daemon(topo.director()).spawned.log])
    }

    /// The lab's status and the last 10 lines of each of `logs`.
    pub fn status_and_logs<'a>(&self, logs: impl IntoIterator<Item = &'a String>) -> String {
        let status = sh(
            repo().join("scripts/lab").to_str().unwrap(),
            &[self.name, "status"],
        );
        let mut out = format!(
            "--- scripts/lab {} status ---\n{}",
            self.name,
            text(&status)
        );
        for log in logs {
            let body = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = body.lines().rev().take(10).collect();
            let name = Path::new(log).file_name().unwrap().to_string_lossy();
            out += &format!("--- {name} (end) ---\n");
            for line in tail.into_iter().rev() {
                out += line;
                out.push('\n');
            }
        }
        out
    }

    /// Captures up to `count` packets matching `filter` on the router's real-facing interface
    /// while `traffic` runs, and returns tcpdump's lines. Not on a real's own eth0: its XDP
    /// decapsulator runs before any capture tap, so a capture there sees inner packets only.
    /// Bounded: tcpdump runs under `timeout 5`.
    pub fn capture_real_segment(
        &self,
        filter: &str,
        count: usize,
        traffic: impl FnOnce(),
    ) -> Vec<String> {
        let count = count.to_string();
        let topo = self.topology();
        let router = topo.router();
        let iface = topo.iface_towards(router, &topo.reals[0]);
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                topo.ns(router),
                "timeout",
                "5",
                "tcpdump",
                "-l",
                "-n",
            ])
            .args(["-i", iface, "-c", &count, filter])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running tcpdump (scripts/setup installs it)");
        // tcpdump says "listening on IFACE" on stderr once the capture is attached.
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut said = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if line.contains("listening on") => break,
                Ok(line) => said.push(line),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("tcpdump did not start capturing: {said:?}");
                }
            }
        }
        traffic();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The lab's only director's `/metrics` page, fetched in its namespace.
    pub fn metrics_page(&self) -> String {
        self.metrics_page_of(self.topology().director())
    }

    /// Director `dir`'s `/metrics` page, fetched in its namespace.
    pub fn metrics_page_of(&self, dir: &str) -> String {
        let topo = self.topology();
        let url = topo.daemon(dir).metrics_url();
        let args = [
            "netns",
            "exec",
            topo.ns(dir),
            "curl",
            "-s",
            "--max-time",
            "5",
            &url,
        ];
        text(&sh("ip", &args))
    }

    /// Where `up` writes the lab's topology.
    pub fn topology_path(&self) -> PathBuf {
        Path::new(STATE_ROOT).join(self.name).join("topology.json")
    }

    /// The lab's names and addresses; panics when the lab is not up.
    pub fn topology(&self) -> Topology {
        Topology::load(&self.topology_path())
            .unwrap_or_else(|e| panic!("lab {} (is it up?): {e:#}", self.name))
    }

    /// The lab's state directory (sockets, pid files, logs).
    pub fn state(&self) -> String {
        self.topology().state_dir
    }

    /// The CLI talking to this lab's daemon (the lab's only director's).
    pub fn xlb(&self) -> Xlb {
        let topo = self.topology();
        topo.xlb(topo.director())
    }

    /// `xlb daemon ARGS` on this lab's socket in the director's network namespace only, as
    /// scripts/lab starts it: the host's bpffs stays visible, so its pins outlive it.
    pub fn daemon_command(&self, args: &[&str]) -> Command {
        let topo = self.topology();
        let dir = topo.director();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", topo.ns(dir)))
            .arg(xlb_bin())
            .args(["--socket", &topo.daemon(dir).socket, "daemon"])
            .args(args);
        cmd
    }

    /// A command in the director's network namespace only (see `daemon_command`).
    pub fn in_dir_netns(&self, cmd: &[&str]) -> Output {
        let topo = self.topology();
        let mut full = vec![format!("--net=/run/netns/{}", topo.ns(topo.director()))];
        full.extend(cmd.iter().map(|s| s.to_string()));
        let full: Vec<&str> = full.iter().map(|s| s.as_str()).collect();
        sh("nsenter", &full)
    }

    /// Sends SIGNAL (`TERM`, `KILL`) to the lab's daemon, by its pid file; returns once it is
    /// gone (or a zombie).
    pub fn kill_daemon(&self, signal: &str) {
        let topo = self.topology();
        let pid = std::fs::read_to_string(&topo.daemon(topo.director()).spawned.pid_file).unwrap();
        let pid = pid.trim().to_string();
        assert!(sh("kill", &[&format!("-{signal}"), &pid]).status.success());
        wait_for("the daemon to exit", Duration::from_secs(10), || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)
        });
    }

    /// The lab's namespace for `host` (client, dir, r1, ...).
    pub fn ns(&self, host: &str) -> String {
        self.topology().ns(host).to_string()
    }

    /// One HTTP request from the lab's client on a new connection: the body, or None.
    pub fn curl(&self, max_time: &str, args: &[&str]) -> Option<String> {
        self.curl_from(&self.topology().client, max_time, args)
    }

    /// `curl` from the lab's host `host`.
    pub fn curl_from(&self, host: &str, max_time: &str, args: &[&str]) -> Option<String> {
        let ns = self.topology().ns(host).to_string();
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

/// A long-lived connection silent for longer than this (it asks every 50 ms) was cut off.
pub const STALL: Duration = Duration::from_millis(150);

/// One answer on a long-lived connection, stamped when the test read it.
pub struct Answer {
    pub at: Instant,
    pub real: String,
}

/// Long-lived HTTP/1.1 connections from the client (scripts/lab-http-keepalive.py, a request
/// every 50 ms, never reconnecting, waiting up to 10 s for each answer so TCP can retransmit
/// while routes converge); every answer is timestamped as it arrives.
pub struct Connections {
    pub children: Vec<KillOnDrop>,
    /// Each connection's client port (once it answered).
    pub ports: Vec<String>,
    pub answers: Vec<Vec<Answer>>,
    /// Lines other than answers ("error: ..."), as "connection I: LINE".
    pub errors: Vec<String>,
    rx: mpsc::Receiver<(usize, Instant, String)>,
}

impl Connections {
    /// `n` connections from namespace `ns` to `vip`:`port`, each for at most `seconds`; returns
    /// once each answered 3 times.
    pub fn open(ns: &str, vip: &str, port: u16, n: usize, seconds: u32) -> Connections {
        let (tx, rx) = mpsc::channel();
        let mut children = Vec::new();
        let port = port.to_string();
        for i in 0..n {
            let tx = tx.clone();
            let seconds = seconds.to_string();
            children.push(keepalive(
                ns,
                &[vip, &port, "--interval", "0.05", "--timeout", "10"]
                    .into_iter()
                    .chain(["--max-seconds", &seconds])
                    .collect::<Vec<_>>(),
                move |line| tx.send((i, Instant::now(), line)).is_ok(),
            ));
        }
        let mut c = Connections {
            children,
            ports: vec![String::new(); n],
            answers: (0..n).map(|_| Vec::new()).collect(),
            errors: Vec::new(),
            rx,
        };
        wait_for(
            "every long-lived connection to answer 3 times",
            Duration::from_secs(30),
            || {
                c.collect();
                c.answers.iter().all(|a| a.len() >= 3)
            },
        );
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        c
    }

    /// Takes in what arrived so far.
    pub fn collect(&mut self) {
        while let Ok((i, at, line)) = self.rx.try_recv() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.len() == 3 && words[0] != "error:" {
                self.ports[i] = words[0].to_string();
                self.answers[i].push(Answer {
                    at,
                    real: words[1].to_string(),
                });
            } else {
                self.errors.push(format!("connection {i}: {line}"));
            }
        }
    }

    /// Collects for `d`.
    pub fn run_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
            self.collect();
        }
    }

    /// Connections that answered after `t`, always from the real they started on, with the
    /// client still running: the survivors.
    pub fn survivors_after(&mut self, t: Instant) -> Vec<usize> {
        self.collect();
        let mut alive = Vec::new();
        for (i, answers) in self.answers.iter().enumerate() {
            let Some(first) = answers.first() else {
                continue;
            };
            let same_real = answers.iter().all(|a| a.real == first.real);
            let answered = answers.iter().any(|a| a.at > t);
            let running = self.children[i].0.try_wait().unwrap().is_none();
            if same_real && answered && running {
                alive.push(i);
            }
        }
        alive
    }

    /// Connections that stalled after `t` (no answer for longer than STALL while asking every
    /// 50 ms): those whose director was lost. With each, when it answered again, as time since
    /// `t`. (Asking the router with `ip route get ... sport ... dport` does not tell: over veth
    /// the client socket's own flow hash reaches the router, which uses it for ECMP.)
    pub fn stalled_after(&self, t: Instant) -> Vec<(usize, Duration)> {
        let mut out = Vec::new();
        for (i, answers) in self.answers.iter().enumerate() {
            let longest = answers
                .windows(2)
                .filter(|w| w[1].at > t)
                .max_by_key(|w| w[1].at - w[0].at);
            if let Some(w) = longest.filter(|w| w[1].at - w[0].at > STALL) {
                out.push((i, w[1].at - t));
            }
        }
        out
    }
}

/// A process of the test's own, killed (and reaped) when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// SIGKILL to `pid`, returning once it is gone (a zombie or reaped). Its sockets close as it
/// exits, a few ms after the signal: until then its listener still accepts connections that
/// then die with it, so a test counts a request sent before this returns as in flight at the
/// kill.
pub fn kill_9(pid: i32) -> Result<()> {
    // SAFETY: a plain kill(2).
    ensure!(
        unsafe { libc::kill(pid, libc::SIGKILL) } == 0,
        "kill -9 {pid}: {}",
        std::io::Error::last_os_error()
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The state follows the command name's closing parenthesis.
            Ok(stat)
                if !stat
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z') =>
            {
                std::thread::sleep(Duration::from_millis(1))
            }
            _ => return Ok(()),
        }
    }
    anyhow::bail!("process {pid} still there 2 s after SIGKILL")
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

/// The new flows a service took, from `xlb --json stats` (0 for a service it does not list).
pub fn service_new_flows(stats: &serde_json::Value, service: &str) -> u64 {
    stats["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == service)
        .map(|s| s["new_flows"].as_u64().unwrap())
        .unwrap_or(0)
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

/// Bounded continuous load: one request at a time on new connections from the lab's client,
/// for at most 60 s or 2,000 requests, until stopped; counts requests and failures.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<(usize, usize)>,
}

impl Load {
    pub fn start(lab: Lab, url: String) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let start = Instant::now();
            let (mut done, mut failed) = (0, 0);
            while !flag.load(std::sync::atomic::Ordering::Relaxed)
                && done < 2000
                && start.elapsed() < Duration::from_secs(60)
            {
                done += 1;
                if lab.get(&url).is_none() {
                    failed += 1;
                }
            }
            (done, failed)
        });
        Load { stop, handle }
    }

    /// Stops the load: (requests, failed requests).
    pub fn stop(self) -> (usize, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// `n` bytes from xorshift64*, seeded by `round` and the clock: different on every run.
pub fn random_bytes(n: usize, round: u64) -> Vec<u8> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut x = (nanos ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every lab's topology, as `scripts/lab LAB topology` prints what `up` writes, loads here
    /// and holds what the tests rely on. Needs no root and brings nothing up.
    #[test]
    fn every_lab_topology_loads() {
        let script = repo().join("scripts/lab");
        let usage = text(&sh(script.to_str().unwrap(), &["help"]));
        let labs = usage
            .split_once("(labs: ")
            .and_then(|(_, rest)| rest.split_once(')'))
            .map(|(labs, _)| labs.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_else(|| panic!("no lab list in: {usage}"));
        assert!(labs.len() >= 3, "{labs:?}");
        for lab in labs {
            let out = sh(script.to_str().unwrap(), &[lab, "topology"]);
            assert!(out.status.success(), "{lab}: {}", text(&out));
            let topo = Topology::parse(&String::from_utf8_lossy(&out.stdout))
                .unwrap_or_else(|e| panic!("{lab}: {e:#}"));
            assert_eq!(topo.lab, lab);
            // Where the tests look for it.
            assert_eq!(
                Path::new(&topo.state_dir).join("topology.json"),
                Lab::new(lab.to_string().leak()).topology_path()
            );
            for host in topo.hosts.values() {
                assert!(host.ns.starts_with(&topo.ns_prefix), "{lab}: {host:?}");
            }
            assert!(!topo.reals.is_empty() && !topo.directors.is_empty());
            for d in &topo.directors {
                topo.daemon(d);
            }
            // The HTTP servers' (a NAT lab's UDP service is their UDP echo, on the same host).
            for service in topo.services.values().filter(|s| s.proto == "tcp") {
                for r in &topo.reals {
                    topo.server_on(r, service.real_port.unwrap_or(service.port));
                    if let Some(port) = service.check_port {
                        topo.server_on(r, port);
                    }
                }
            }
        }
    }
}
