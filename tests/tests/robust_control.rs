//! Hostile control inputs against a running daemon, and its state file under faults: malformed
//! CLI invocations and raw API requests (one-line error, nothing changes, still serving), the
//! limits, corrupt or truncated state files, a state write that fails (disk full, read-only),
//! and a non-root user. Each test runs its own daemon in a network namespace it creates (no
//! lab, so no lab lock), on one end of a veth pair that carries no traffic.

use std::{
    io::{Read, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use serde_json::{Value, json};
use xlb::api::{MAX_REQUEST_BYTES, decode_request};
use xlb::config::MAX_REALS_PER_SERVICE;
use xlb_tests::lab::{KillOnDrop, text, wait_for, xlb_bin};

const SVC: &str = "198.18.0.100:80/tcp";
const SVC6: &str = "[fd00:18::100]:80/tcp";

/// A namespace with a veth pair, and a directory for the socket and state file; both removed
/// when dropped.
struct Sandbox {
    ns: String,
    dir: PathBuf,
}

impl Sandbox {
    fn new(tag: &str) -> Sandbox {
        assert!(
            xlb_bin().exists(),
            "build target/release/xlb first (scripts/test does)"
        );
        let ns = format!("xlb-rc-{tag}-{}", std::process::id());
        let dir = std::env::temp_dir().join(&ns);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let _ = Command::new("ip")
            .args(["netns", "del", &ns])
            .stderr(Stdio::null())
            .status();
        for args in [
            vec!["netns", "add", &ns],
            vec![
                "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
            ],
            vec!["-n", &ns, "link", "set", "eth0", "up"],
            vec!["-n", &ns, "link", "set", "eth1", "up"],
            vec!["-n", &ns, "addr", "add", "198.18.0.2/24", "dev", "eth0"],
        ] {
            let out = Command::new("ip").args(&args).output().unwrap();
            assert!(out.status.success(), "ip {args:?}: {}", text(&out));
        }
        Sandbox { ns, dir }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("xlb.sock")
    }

    fn state(&self) -> PathBuf {
        self.dir.join("state").join("state.json")
    }

    /// `xlb daemon` in the namespace, as a command not yet started; `prefix` runs it under
    /// another command (e.g. `unshare -m ...`). Entered with nsenter, which keeps the host's
    /// mounts: `ip netns exec` would give it a fresh /sys without the host's bpffs.
    fn daemon_command(&self, prefix: &[&str]) -> Command {
        let mut argv: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
        argv.extend([
            "nsenter".to_string(),
            format!("--net=/run/netns/{}", self.ns),
        ]);
        argv.push(xlb_bin().display().to_string());
        argv.extend([
            "--socket".to_string(),
            self.socket().display().to_string(),
            "daemon".to_string(),
            "--iface".to_string(),
            "eth0".to_string(),
            "--conn-capacity".to_string(),
            "4096".to_string(),
            "--state".to_string(),
            self.state().display().to_string(),
        ]);
        let mut c = Command::new(&argv[0]);
        c.args(&argv[1..]);
        c
    }

    /// Starts the daemon and waits until it answers.
    fn start(&self, prefix: &[&str]) -> KillOnDrop {
        let log = std::fs::File::create(self.dir.join("daemon.log")).unwrap();
        let child = self
            .daemon_command(prefix)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut daemon = KillOnDrop(child);
        wait_for("the daemon's socket", Duration::from_secs(20), || {
            if let Ok(Some(status)) = daemon.0.try_wait() {
                panic!(
                    "daemon exited ({status}): {}",
                    std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
                );
            }
            self.xlb(&["status"]).status.success()
        });
        daemon
    }

    /// CMD in the namespace's network only, as the daemon runs (see `daemon_command`).
    fn in_netns(&self, cmd: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .args(cmd)
            .output()
            .unwrap()
    }

    fn xlb(&self, args: &[&str]) -> Output {
        Command::new(xlb_bin())
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.xlb(args);
        assert!(out.status.success(), "xlb {args:?}: {}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    /// One raw request (bytes as given, then our write side shut); the answer line.
    fn raw(&self, request: &[u8]) -> String {
        let mut s = UnixStream::connect(self.socket()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut writer = s.try_clone().unwrap();
        let request = request.to_vec();
        // Written from another thread: the daemon may answer (and close) before reading all.
        let w = std::thread::spawn(move || {
            let _ = writer.write_all(&request);
            let _ = writer.shutdown(std::net::Shutdown::Write);
        });
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        w.join().unwrap();
        answer
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // A daemon's data path is pinned in the host's bpffs and outlives it: remove it first.
        let _ = self.in_netns(&[
            &xlb_bin().display().to_string(),
            "detach",
            "--iface",
            "eth0",
        ]);
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The error line of a failed CLI run, checked to be one line starting `xlb: `.
fn one_error_line(args: &[&str], out: &Output) -> String {
    assert!(
        !out.status.success(),
        "xlb {args:?} succeeded: {}",
        text(out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "xlb {args:?}: not one line: {err:?}");
    assert!(lines[0].starts_with("xlb: "), "xlb {args:?}: {err:?}");
    lines[0].to_string()
}

/// One refused answer of the daemon: ok false, a one-line error; the error.
fn refusal(answer: &str) -> String {
    assert!(
        answer.ends_with('\n') && answer.lines().count() == 1,
        "not one answer line: {answer:?}"
    );
    let v: Value = serde_json::from_str(answer).unwrap();
    assert_eq!(v["ok"], false, "{answer}");
    let e = v["error"].as_str().unwrap().to_string();
    assert!(!e.is_empty() && !e.chars().any(char::is_control), "{e:?}");
    e
}

fn write_file(dir: &Path, name: &str, contents: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p.display().to_string()
}

/// A configuration of `services` services, each with `reals` reals (small rings: fast).
fn big_config(services: usize, n_reals: usize) -> Value {
    let services: Vec<Value> = (0..services)
        .map(|i| {
            json!({
                "service": format!("198.18.{}.{}:80/tcp", 100 + i / 250, i % 250 + 1),
                "ring_size": 7,
                "reals": reals(n_reals),
            })
        })
        .collect();
    json!({ "services": services })
}

/// `n` distinct IPv4 reals (198.19.0.0/16).
fn reals(n: usize) -> Vec<Value> {
    (0..n)
        .map(|j| json!({"addr": format!("198.19.{}.{}", j / 250, j % 250 + 1), "weight": 1}))
        .collect()
}

#[test]
fn malformed_cli_and_api_inputs_change_nothing() {
    let sb = Sandbox::new("table");
    let _daemon = sb.start(&[]);
    sb.ok(&["service", "add", SVC, "--mode", "dr"]);
    sb.ok(&["real", "add", SVC, "198.18.0.11"]);
    sb.ok(&["real", "add", SVC, "198.18.0.12", "--weight", "50"]);
    sb.ok(&["service", "add", SVC6, "--check", "tcp"]);
    sb.ok(&["real", "add", SVC6, "fd00:18::11"]);
    let baseline = sb.ok(&["save"]);
    let state_before = std::fs::read(sb.state()).unwrap();

    let dir = &sb.dir;
    let garbage = write_file(dir, "garbage.json", b"this is not json\n");
    let truncated = {
        let full = baseline.as_bytes();
        write_file(dir, "truncated.json", &full[..full.len() / 2])
    };
    let twice = write_file(
        dir,
        "twice.json",
        json!({"services": [{"service": SVC}, {"service": SVC}]})
            .to_string()
            .as_bytes(),
    );
    let too_many_reals = write_file(
        dir,
        "too-many-reals.json",
        json!({"services": [{"service": SVC, "reals": reals(MAX_REALS_PER_SERVICE + 1)}]})
            .to_string()
            .as_bytes(),
    );
    let unknown_field = write_file(
        dir,
        "unknown-field.json",
        br#"{"services": [{"service": "198.18.0.100:80/tcp", "colour": "red"}]}"#,
    );
    let long_cmd = "x".repeat(4097);
    let cli_cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["service", "add", "198.18.0.100:80"],
            "expected ADDR:PORT/PROTO",
        ),
        (
            vec!["service", "add", "198.18.0.100:80/icmp"],
            "protocol 'icmp'",
        ),
        (
            vec!["service", "add", "198.18.0.300:80/tcp"],
            "is not ADDR:PORT",
        ),
        (
            vec!["service", "add", "198.18.0.100:70000/tcp"],
            "is not ADDR:PORT",
        ),
        (
            vec!["service", "add", "fd00::1:80/tcp"],
            "IPv6 goes in brackets",
        ),
        (vec!["service", "add", SVC], "already exists"),
        (vec!["service", "add", "0.0.0.0:80/tcp"], "cannot be a VIP"),
        (
            vec![
                "service",
                "add",
                "198.18.0.101:80/tcp",
                "--ring-size",
                "65536",
            ],
            "ring size 65536",
        ),
        (
            vec!["service", "add", "198.18.0.101:80/tcp", "--mode", "masq"],
            "'masq'",
        ),
        (
            vec!["service", "add", "198.18.0.101:80/tcp", "--mode", "fullnat"],
            "needs --snat",
        ),
        (
            vec![
                "service",
                "add",
                "198.18.0.101:80/tcp",
                "--snat",
                "198.18.0.50",
            ],
            "--snat needs --mode fullnat",
        ),
        (
            vec![
                "service",
                "add",
                "198.18.0.101:80/tcp",
                "--mode",
                "fullnat",
                "--snat",
                "198.18.0.100",
            ],
            "a SNAT address cannot be a VIP",
        ),
        (
            vec!["real", "add", "198.18.0.100:80/tcp", "198.18.0.13:8080"],
            "needs a NAT service",
        ),
        (
            vec!["real", "add", "198.18.0.100:80/tcp", "198.18.0.13:0"],
            "port 0 is not a port",
        ),
        (
            vec![
                "service",
                "add",
                "198.18.0.101:80/tcp",
                "--tunnel-src",
                "198.18.0.2",
            ],
            "needs --mode tun",
        ),
        (
            vec![
                "service",
                "add",
                "198.18.0.101:80/tcp",
                "--weights",
                "adaptive",
            ],
            "add a --check",
        ),
        (
            vec![
                "service",
                "add",
                "198.18.0.101:80/tcp",
                "--check",
                "http",
                "--check-path",
                "healthz",
            ],
            "--check-path",
        ),
        (
            vec!["service", "add", "198.18.0.101:80/tcp", "--check", "udp"],
            "needs --check-send",
        ),
        (
            vec![
                "service",
                "add",
                "198.18.0.101:80/tcp",
                "--check",
                "tcp",
                "--interval",
                "10ms",
            ],
            "interval",
        ),
        (
            vec![
                "service",
                "add",
                "198.18.0.101:80/tcp",
                "--check-port",
                "8080",
            ],
            "need --check",
        ),
        (
            vec!["service", "add", "198.18.0.101:0/tcp", "--check", "tcp"],
            "needs --check-port",
        ),
        (
            vec![
                "service",
                "add",
                "198.18.0.101:80/tcp",
                "--check",
                "exec",
                "--check-cmd",
                &long_cmd,
            ],
            "more than 4096",
        ),
        (
            vec![
                "service",
                "add",
                "198.18.0.101:80/tcp",
                "--fallback",
                "fd00::1",
            ],
            "fallback",
        ),
        (
            vec!["service", "remove", "198.18.0.102:80/tcp"],
            "does not exist",
        ),
        (vec!["service", "frobnicate"], "frobnicate"),
        (
            vec!["real", "add", SVC, "198.18.0.11"],
            "already in service",
        ),
        (vec!["real", "add", SVC, "fd00:18::12"], "address family"),
        (
            vec!["real", "add", SVC, "127.0.0.1"],
            "a loopback address cannot be a real server",
        ),
        (
            vec!["real", "add", SVC, "255.255.255.255"],
            "the broadcast address cannot be a real server",
        ),
        (
            vec!["real", "add", SVC, "224.0.0.1"],
            "a multicast address cannot be a real server",
        ),
        (
            vec!["real", "add", SVC, "0.0.0.0"],
            "the unspecified address cannot be a real server",
        ),
        (
            vec!["real", "add", SVC, "198.18.0.100"],
            "the service's own VIP cannot be its real",
        ),
        (
            vec!["real", "add", SVC, "198.18.0.13", "--weight", "70000"],
            "out of range",
        ),
        (
            vec!["real", "add", SVC, "198.18.0.13", "--weight", "-1"],
            "-1",
        ),
        (vec!["real", "add", SVC, "not-an-ip"], "'not-an-ip'"),
        (
            vec!["real", "add", "198.18.0.102:80/tcp", "198.18.0.13"],
            "does not exist",
        ),
        (
            vec!["real", "remove", SVC, "198.18.0.99"],
            "is not in service",
        ),
        (
            vec!["real", "weight", SVC, "198.18.0.11", "65536"],
            "out of range",
        ),
        (vec!["real", "weight", SVC, "198.18.0.11", "abc"], "'abc'"),
        (
            vec!["real", "drain", SVC, "198.18.0.99"],
            "is not in service",
        ),
        (
            vec!["real", "enable", "198.18.0.102:80/tcp", "198.18.0.11"],
            "does not exist",
        ),
        (
            vec!["real", "list", "198.18.0.102:80/tcp"],
            "does not exist",
        ),
        (
            vec![
                "real",
                "wait-drained",
                SVC,
                "198.18.0.99",
                "--timeout",
                "1s",
            ],
            "is not in service",
        ),
        (
            vec![
                "real",
                "wait-drained",
                SVC,
                "198.18.0.11",
                "--timeout",
                "soon",
            ],
            "'soon'",
        ),
        (
            vec!["restore", "/nonexistent/config.json"],
            "reading /nonexistent/config.json",
        ),
        (vec!["restore", &garbage], "is not a valid configuration"),
        (vec!["restore", &truncated], "EOF while parsing"),
        (vec!["restore", &twice], "listed twice"),
        (
            vec!["restore", &too_many_reals],
            "exceed the limit of 1024 per service",
        ),
        (vec!["restore", &unknown_field], "unknown field `colour`"),
        (vec!["stats", "--rate", "now"], "unexpected argument"),
        (vec![], "requires a subcommand"),
    ];
    let raw_cases: Vec<(Vec<u8>, &str)> = vec![
        (b"this is not json\n".to_vec(), "malformed request: expected ident at line 1 column 2"),
        (b"{}\n".to_vec(), "missing field `request`"),
        (br#"{"request":"reboot"}"#.to_vec(), "unknown variant `reboot`"),
        (b"{\"request\":\"status\",\"x\":1}\n".to_vec(), "unknown field `x`"),
        (
            format!(r#"{{"request":"real-weight","service":"{SVC}","addr":"198.18.0.11","weight":-5}}"#).into_bytes(),
            "invalid value: integer `-5`",
        ),
        (
            format!(r#"{{"request":"real-weight","service":"{SVC}","addr":"198.18.0.11","weight":70000}}"#).into_bytes(),
            "weight 70000 is out of range",
        ),
        (b"\xff\xfe\xfd\n".to_vec(), "not UTF-8"),
        (b"\0\0\0\n".to_vec(), "malformed request"),
        (b"\n".to_vec(), "empty request"),
        (b"{\"request\":\"service-add\",\"config\":{\"service\":\"198.18.0.1".to_vec(), "EOF while parsing"),
        (
            br#"{"request":"service-add","config":{"service":"198.18.0.101:80/tcp","ring_size":4}}"#.to_vec(),
            "ring size 4 must be a prime",
        ),
        (
            br#"{"request":"service-add","config":{"service":"[fd00:18::101]:80/tcp","mode":"tun","tunnel_src":"198.18.0.2"}}"#.to_vec(),
            "an IPv6 service cannot be tunnelled over IPv4",
        ),
        (
            br#"{"request":"service-add","config":{"service":"198.18.0.101:80/tcp","encap":"gue"}}"#.to_vec(),
            "--encap gue needs --mode tun",
        ),
        (
            br#"{"request":"service-add","config":{"service":"198.18.0.101:80/tcp","mode":"tun","tunnel_src_prefix":"198.18.0.0/8"}}"#.to_vec(),
            "24 host bits",
        ),
        (br#"{"request":"restore","config":{"services":{}}}"#.to_vec(), "invalid type: map"),
        (
            json!({"request": "restore", "config": big_config(lb_common::MAX_SERVICES as usize + 1, 0)}).to_string().into_bytes(),
            "4097 services exceed the limit of 4096",
        ),
        (format!("{}\n", "[".repeat(100_000)).into_bytes(), "expected variant identifier"),
        (
            br#"{"request":"real-add","service":"198.18.0.100:80/tcp","real":{"addr":"198.18.0.13","check":{"kind":"udp","send":"0g"}}}"#.to_vec(),
            "--check-send '0g' is not hex",
        ),
        (br#"{"request":"status"}{"request":"save"}"#.to_vec(), "trailing characters"),
        (b"{\"request\":\"status\"}\n{\"request\":\"save\"}\n".to_vec(), ""),
    ];

    let mut covered = 0;
    for (args, expected) in &cli_cases {
        let out = sb.xlb(args);
        let line = one_error_line(args, &out);
        assert!(
            line.contains(expected),
            "xlb {args:?}: {line:?} does not name {expected:?}"
        );
        assert_eq!(
            sb.ok(&["save"]),
            baseline,
            "xlb {args:?} changed the configuration"
        );
        covered += 1;
    }
    for (request, expected) in &raw_cases {
        let answer = sb.raw(request);
        let shown = String::from_utf8_lossy(&request[..request.len().min(80)]).to_string();
        if expected.is_empty() {
            // Two requests on one line-connection: the first is answered, the second ignored.
            let v: Value = serde_json::from_str(answer.lines().next().unwrap()).unwrap();
            assert_eq!(v["ok"], true, "{answer}");
            assert_eq!(answer.lines().count(), 1, "{answer}");
        } else {
            let e = refusal(&answer);
            assert!(
                e.contains(expected),
                "{shown:?}: {e:?} does not name {expected:?}"
            );
        }
        assert_eq!(
            sb.ok(&["save"]),
            baseline,
            "{shown:?} changed the configuration"
        );
        covered += 1;
    }

    // Oversized: the daemon answers and closes the connection, unread bytes and all.
    let mut huge = br#"{"request":"status","pad":""#.to_vec();
    huge.resize(MAX_REQUEST_BYTES + 4096, b' ');
    let e = refusal(&sb.raw(&huge));
    assert!(
        e.contains(&format!("request larger than {MAX_REQUEST_BYTES} bytes")),
        "{e}"
    );
    covered += 1;

    // A client that connects and says nothing is let go after 10 s, with an answer.
    let mut idle = UnixStream::connect(sb.socket()).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // Meanwhile the daemon serves others.
    sb.ok(&["status"]);
    let mut answer = String::new();
    idle.read_to_string(&mut answer).unwrap();
    assert!(refusal(&answer).contains("no complete request within 10 s"));
    covered += 1;

    // Random mutations of valid requests, those the decoder refuses: each answered so.
    let corpus: Vec<Vec<u8>> = [
        json!({"request": "real-add", "service": SVC, "real": {"addr": "198.18.0.13", "weight": 7}}),
        json!({"request": "service-add", "config": {"service": "198.18.0.105:80/tcp", "ring_size": 7, "check": {"kind": "tcp"}}}),
        json!({"request": "real-weight", "service": SVC, "addr": "198.18.0.11", "weight": 3}),
        json!({"request": "restore", "config": {"services": [{"service": SVC}]}}),
    ]
    .iter()
    .map(|v| serde_json::to_vec(v).unwrap())
    .collect();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut fuzzed = 0;
    while fuzzed < 300 {
        let mut bytes = corpus[next() as usize % corpus.len()].clone();
        for _ in 0..1 + next() % 3 {
            let at = next() as usize % bytes.len();
            match next() % 3 {
                0 => bytes[at] ^= (next() % 255 + 1) as u8,
                1 => {
                    bytes.remove(at);
                }
                _ => bytes.insert(at, next() as u8),
            }
        }
        bytes.push(b'\n');
        if decode_request(&bytes).is_ok() {
            continue; // still a valid request: it would change the configuration
        }
        refusal(&sb.raw(&bytes));
        fuzzed += 1;
    }
    assert_eq!(sb.ok(&["save"]), baseline);
    assert_eq!(
        std::fs::read(sb.state()).unwrap(),
        state_before,
        "the state file changed"
    );
    assert!(sb.ok(&["status"]).contains(SVC));
    println!(
        "{} CLI invocations, {} raw requests, oversized + idle, {fuzzed} fuzzed requests: all refused, nothing changed",
        cli_cases.len(),
        raw_cases.len()
    );
    assert!(covered >= 30);
}

#[test]
fn limits_on_services_and_reals_are_enforced() {
    let sb = Sandbox::new("limits");
    let _daemon = sb.start(&[]);
    let restore = |config: &Value| {
        let path = write_file(&sb.dir, "config.json", config.to_string().as_bytes());
        sb.xlb(&["restore", &path])
    };
    // Reals per service: the limit fits, one more does not, through restore or real add.
    let full = json!({"services": [{"service": SVC, "ring_size": 65537, "reals": reals(MAX_REALS_PER_SERVICE)}]});
    let out = restore(&full);
    assert!(out.status.success(), "{}", text(&out));
    let extra = "198.19.200.1";
    let args = ["real", "add", SVC, extra];
    let e = one_error_line(&args, &sb.xlb(&args));
    assert!(
        e.contains("already has 1024 reals, the limit per service"),
        "{e}"
    );
    let over = json!({"services": [{"service": SVC, "reals": reals(MAX_REALS_PER_SERVICE + 1)}]});
    let e = one_error_line(&["restore"], &restore(&over));
    assert!(
        e.contains("1025 reals exceed the limit of 1024 per service"),
        "{e}"
    );
    let saved: Value = serde_json::from_str(&sb.ok(&["save"])).unwrap();
    assert_eq!(
        saved["services"][0]["reals"].as_array().unwrap().len(),
        MAX_REALS_PER_SERVICE
    );

    // Services: 4096 fit, the 4097th does not.
    let start = std::time::Instant::now();
    let out = restore(&big_config(lb_common::MAX_SERVICES as usize, 0));
    assert!(out.status.success(), "{}", text(&out));
    println!("restoring 4096 services took {:?}", start.elapsed());
    let args = ["service", "add", "198.18.99.1:80/tcp", "--ring-size", "7"];
    let e = one_error_line(&args, &sb.xlb(&args));
    assert!(
        e.contains("no room for service 198.18.99.1:80/tcp (limit 4096)"),
        "{e}"
    );
    let e = one_error_line(
        &["restore"],
        &restore(&big_config(lb_common::MAX_SERVICES as usize + 1, 0)),
    );
    assert!(e.contains("4097 services exceed the limit of 4096"), "{e}");
    let saved: Value = serde_json::from_str(&sb.ok(&["save"])).unwrap();
    assert_eq!(saved["services"].as_array().unwrap().len(), 4096);
    // The largest configuration (no per-real checks) fits in one request with room to spare.
    let mut largest = big_config(64, MAX_REALS_PER_SERVICE);
    for (i, s) in largest["services"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .enumerate()
    {
        for (j, r) in s["reals"].as_array_mut().unwrap().iter_mut().enumerate() {
            r["addr"] = json!(format!("fd00:ffff:ffff:ffff:ffff:ffff:{i:04x}:{j:04x}"));
        }
        s["service"] = json!(format!(
            "[fd00:ffff:ffff:ffff:ffff:ffff:ffff:{i:04x}]:65535/tcp"
        ));
    }
    let size = json!({"request": "restore", "config": largest})
        .to_string()
        .len();
    // A valid configuration too large for one request is refused by the CLI before sending.
    let mut oversized = big_config(lb_common::MAX_SERVICES as usize, 0);
    for s in oversized["services"].as_array_mut().unwrap() {
        s["check"] = json!({"kind": "exec", "cmd": "x".repeat(xlb::health::MAX_CHECK_TEXT)});
    }
    let e = one_error_line(&["restore"], &restore(&oversized));
    assert!(
        e.contains(&format!(
            "is larger than the daemon takes ({MAX_REQUEST_BYTES})"
        )),
        "{e}"
    );
    assert_eq!(
        serde_json::from_str::<Value>(&sb.ok(&["save"])).unwrap()["services"]
            .as_array()
            .unwrap()
            .len(),
        4096
    );
    println!("64 x 1024 IPv6 reals: a {size}-byte restore request (limit {MAX_REQUEST_BYTES})");
    assert!(size * 2 < MAX_REQUEST_BYTES);
}

/// Runs `xlb daemon` on `state` as it is; it must refuse to start with one line naming the
/// file, and leave the file byte-identical.
fn refuses_state(sb: &Sandbox, contents: &[u8], expected: &str) -> String {
    std::fs::create_dir_all(sb.state().parent().unwrap()).unwrap();
    std::fs::write(sb.state(), contents).unwrap();
    let mtime = std::fs::metadata(sb.state()).unwrap().modified().unwrap();
    let out = sb.daemon_command(&[]).output().unwrap();
    assert!(
        !out.status.success(),
        "the daemon started on a bad state file"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("xlb: ")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains(&format!("state file {} is not valid", sb.state().display()))
            && lines[0].contains(expected),
        "{err}"
    );
    assert_eq!(
        std::fs::read(sb.state()).unwrap(),
        contents,
        "the state file changed"
    );
    assert_eq!(
        std::fs::metadata(sb.state()).unwrap().modified().unwrap(),
        mtime
    );
    assert!(!sb.socket().exists(), "the refused daemon left a socket");
    lines[0].to_string()
}

#[test]
fn a_corrupt_or_truncated_state_file_stops_the_daemon_untouched() {
    let sb = Sandbox::new("state");
    // A real state file, written by a daemon.
    let saved = {
        let _daemon = sb.start(&[]);
        sb.ok(&[
            "service",
            "add",
            SVC,
            "--check",
            "http",
            "--check-path",
            "/healthz",
        ]);
        sb.ok(&["real", "add", SVC, "198.18.0.11"]);
        sb.ok(&["real", "add", SVC, "198.18.0.12", "--weight", "7"]);
        std::fs::read(sb.state()).unwrap()
    };
    // Killed, the daemon left its socket behind; a refused start must not make one.
    std::fs::remove_file(sb.socket()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut lines = Vec::new();
    for cut in [1, saved.len() / 3, saved.len() / 2, saved.len() - 3] {
        lines.push(refuses_state(&sb, &saved[..cut], "EOF while parsing"));
    }
    lines.push(refuses_state(&sb, b"", "EOF while parsing"));
    lines.push(refuses_state(&sb, b"\x00\x01\x02garbage", "expected value"));
    let mut flipped = saved.clone();
    let at = flipped.iter().position(|&b| b == b'{').unwrap();
    flipped[at] = b'<';
    lines.push(refuses_state(&sb, &flipped, "expected value"));
    let text = String::from_utf8(saved.clone()).unwrap();
    lines.push(refuses_state(
        &sb,
        text.replace("65537", "65536").as_bytes(),
        "ring size 65536",
    ));
    lines.push(refuses_state(
        &sb,
        text.replace("198.18.0.12", "198.18.0.11").as_bytes(),
        "listed twice",
    ));
    lines.push(refuses_state(
        &sb,
        text.replace("\"weight\"", "\"wieght\"").as_bytes(),
        "unknown field `wieght`",
    ));
    for l in &lines {
        println!("{l}");
    }
    // The intact file still starts the daemon with its configuration.
    std::fs::write(sb.state(), &saved).unwrap();
    let _daemon = sb.start(&[]);
    let now: Value = serde_json::from_str(&sb.ok(&["save"])).unwrap();
    let before: Value = serde_json::from_slice(&saved).unwrap();
    assert_eq!(now, before);
}

/// Runs `cmd` in the mount namespace of process `pid`.
fn in_mounts(pid: u32, cmd: &[&str]) -> Output {
    Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-m", "--"])
        .args(cmd)
        .output()
        .unwrap()
}

#[test]
fn a_failed_state_write_keeps_the_file_and_rolls_back() {
    let sb = Sandbox::new("diskfull");
    let state_dir = sb.state().parent().unwrap().display().to_string();
    std::fs::create_dir_all(&state_dir).unwrap();
    // The state directory is a 64 KiB tmpfs in a mount namespace of the daemon's own.
    let mount = format!("mount -t tmpfs -o size=64k xlb-rc-test {state_dir} && exec \"$0\" \"$@\"");
    let prefix = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        &mount,
    ];
    let daemon = sb.start(&prefix);
    let pid = daemon.0.id();
    let state = sb.state().display().to_string();
    let read_state = || {
        let out = in_mounts(pid, &["cat", &state]);
        assert!(out.status.success(), "{}", text(&out));
        out.stdout
    };
    sb.ok(&["service", "add", SVC]);
    sb.ok(&["real", "add", SVC, "198.18.0.11"]);
    sb.ok(&["service", "add", "198.18.0.101:80/tcp", "--ring-size", "7"]);
    let before_save = sb.ok(&["save"]);
    let before_file = read_state();
    assert_eq!(
        serde_json::from_slice::<Value>(&before_file).unwrap(),
        serde_json::from_str::<Value>(&before_save).unwrap()
    );
    // Fill the file system.
    let fill = format!("{state_dir}/fill");
    let out = in_mounts(pid, &["dd", "if=/dev/zero", &format!("of={fill}"), "bs=4k"]);
    assert!(
        text(&out).contains("No space left on device"),
        "{}",
        text(&out)
    );

    let replacement = write_file(
        &sb.dir,
        "replacement.json",
        json!({"services": [{"service": "198.18.0.103:80/tcp", "ring_size": 7}]})
            .to_string()
            .as_bytes(),
    );
    let changes: Vec<Vec<&str>> = vec![
        vec!["restore", &replacement],
        vec!["real", "add", SVC, "198.18.0.12"],
        vec!["real", "remove", SVC, "198.18.0.11"],
        vec!["real", "weight", SVC, "198.18.0.11", "5"],
        vec!["real", "drain", SVC, "198.18.0.11"],
        vec!["service", "remove", "198.18.0.101:80/tcp"],
        vec!["service", "add", "198.18.0.102:80/tcp"],
    ];
    for args in &changes {
        let e = one_error_line(args, &sb.xlb(args));
        assert!(
            e.contains("change refused and rolled back")
                && e.contains(&format!("writing {state}"))
                && e.contains("No space left on device"),
            "xlb {args:?}: {e}"
        );
        assert_eq!(
            sb.ok(&["save"]),
            before_save,
            "xlb {args:?} changed the running configuration"
        );
        assert_eq!(
            read_state(),
            before_file,
            "xlb {args:?} changed the state file"
        );
        println!("disk full: xlb {}: {e}", args.join(" "));
    }
    // Room again: the same change goes through and is saved.
    assert!(in_mounts(pid, &["rm", &fill]).status.success());
    sb.ok(&["real", "add", SVC, "198.18.0.12"]);
    let after = sb.ok(&["save"]);
    assert!(after.contains("198.18.0.12"));
    assert_eq!(
        serde_json::from_slice::<Value>(&read_state()).unwrap(),
        serde_json::from_str::<Value>(&after).unwrap()
    );

    // Read-only: the same refusal.
    let out = in_mounts(pid, &["mount", "-o", "remount,ro", &state_dir]);
    assert!(out.status.success(), "{}", text(&out));
    let file = read_state();
    let changes: Vec<Vec<&str>> = vec![
        vec!["restore", &replacement],
        vec!["real", "add", SVC, "198.18.0.13"],
        vec!["real", "remove", SVC, "198.18.0.12"],
        vec!["real", "weight", SVC, "198.18.0.12", "5"],
        vec!["real", "drain", SVC, "198.18.0.12"],
        vec!["service", "remove", "198.18.0.101:80/tcp"],
        vec!["service", "add", "198.18.0.102:80/tcp"],
    ];
    for args in &changes {
        let e = one_error_line(args, &sb.xlb(args));
        assert!(
            e.contains("change refused and rolled back") && e.contains("Read-only file system"),
            "xlb {args:?}: {e}"
        );
        assert_eq!(sb.ok(&["save"]), after);
        assert_eq!(read_state(), file);
        println!("read-only: xlb {}: {e}", args.join(" "));
    }
    assert!(sb.ok(&["status"]).contains(SVC));
}

/// A throwaway system user, deleted when dropped (test failures included).
struct TempUser(String);

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.0).status();
    }
}

#[test]
fn the_control_socket_refuses_a_non_root_user() {
    let sb = Sandbox::new("user");
    let _daemon = sb.start(&[]);
    sb.ok(&["service", "add", SVC]);
    let before = sb.ok(&["save"]);
    let name = format!("xlbrc{}", std::process::id());
    let out = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            &name,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "useradd: {}", text(&out));
    let user = TempUser(name);
    let uid = String::from_utf8(
        Command::new("id")
            .args(["-u", &user.0])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    // A copy of the binary the user may run.
    let bin = sb.dir.join("xlb");
    std::fs::copy(xlb_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_user = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid", &uid, "--regid", &uid, "--clear-groups", "--"])
            .arg(&bin)
            .arg("--socket")
            .arg(sb.socket())
            .args(args)
            .output()
            .unwrap()
    };
    let socket = sb.socket().display().to_string();
    // The socket is root's (mode 0600): the kernel refuses the connection.
    for args in [
        &["status"][..],
        &["service", "add", "198.18.0.101:80/tcp"],
        &["save"],
    ] {
        let e = one_error_line(args, &as_user(args));
        assert_eq!(
            e,
            format!("xlb: permission denied on {socket}: only root may control xlb")
        );
    }
    // Even if someone opens the socket's mode, the daemon checks who is calling.
    std::fs::set_permissions(sb.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    for args in [&["status"][..], &["service", "add", "198.18.0.101:80/tcp"]] {
        let e = one_error_line(args, &as_user(args));
        assert_eq!(
            e,
            format!("xlb: permission denied: uid {uid} may not control xlb")
        );
    }
    assert_eq!(sb.ok(&["save"]), before);
}

/// Well-formed requests drawn at random (services and reals that exist or not, of either
/// family, any weight): each is either refused with the configuration and the state file
/// unchanged, or applied with the state file equal to the new configuration.
#[test]
fn random_well_formed_requests_change_all_or_nothing() {
    let sb = Sandbox::new("allornothing");
    let _daemon = sb.start(&[]);
    sb.ok(&["service", "add", SVC]);
    sb.ok(&["real", "add", SVC, "198.18.0.11"]);
    let save = || -> Value {
        let v: Value = serde_json::from_str(&sb.raw(b"{\"request\":\"save\"}\n")).unwrap();
        assert_eq!(v["ok"], true);
        v["data"].clone()
    };
    let file = || -> Value { serde_json::from_slice(&std::fs::read(sb.state()).unwrap()).unwrap() };
    let services = [SVC, SVC6, "198.18.0.101:80/tcp", "198.18.0.101:0/udp"];
    let addrs = [
        "198.18.0.11",
        "198.18.0.12",
        "198.18.0.13",
        "fd00:18::11",
        "fd00:18::12",
    ];
    let weights = [0u32, 1, 100, 65535];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |n: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n as u64) as usize
    };
    let (mut accepted, mut refused) = (0, 0);
    let mut kinds: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for _ in 0..400 {
        let service = services[next(services.len())];
        let addr = addrs[next(addrs.len())];
        let weight = weights[next(weights.len())];
        let request = match next(16) {
            0..=2 => {
                json!({"request": "service-add", "config": {"service": service, "ring_size": 7}})
            }
            3 => json!({"request": "service-remove", "service": service}),
            4..=7 => {
                json!({"request": "real-add", "service": service, "real": {"addr": addr, "weight": weight}})
            }
            8 => json!({"request": "real-remove", "service": service, "addr": addr}),
            9 | 10 => {
                json!({"request": "real-weight", "service": service, "addr": addr, "weight": weight})
            }
            11 | 12 => json!({"request": "real-drain", "service": service, "addr": addr}),
            13 | 14 => json!({"request": "real-enable", "service": service, "addr": addr}),
            _ => json!({"request": "restore", "config": {"services": [
                {"service": service, "ring_size": 7, "reals": [{"addr": addr, "weight": weight}]}
            ]}}),
        };
        let before = save();
        let before_file = std::fs::read(sb.state()).unwrap();
        let answer: Value = serde_json::from_str(&sb.raw(&line_of(&request))).unwrap();
        let kind = request["request"].as_str().unwrap().to_string();
        if answer["ok"] == true {
            accepted += 1;
            kinds.entry(kind).or_default().0 += 1;
            assert_eq!(file(), save(), "{request}: the state file does not match");
        } else {
            refused += 1;
            kinds.entry(kind).or_default().1 += 1;
            assert_eq!(
                save(),
                before,
                "{request} was refused but changed the configuration"
            );
            assert_eq!(std::fs::read(sb.state()).unwrap(), before_file);
        }
    }
    println!(
        "400 random well-formed requests: {accepted} applied, {refused} refused (per kind, applied/refused: {kinds:?})"
    );
    assert!(accepted > 40 && refused > 40);
}

fn line_of(v: &Value) -> Vec<u8> {
    let mut l = serde_json::to_vec(v).unwrap();
    l.push(b'\n');
    l
}

/// `ip netns exec` gives the daemon a mount namespace of its own, with a fresh /sys whose
/// bpffs, and the pins in it, would die with the daemon: it refuses with one line naming what to
/// run instead, and attaches nothing. `xlb detach` run that way refuses the same way.
#[test]
fn ip_netns_exec_is_refused_with_what_to_run_instead() {
    let sb = Sandbox::new("pins");
    let xlb = xlb_bin().display().to_string();
    let socket = sb.socket().display().to_string();
    let state = sb.state().display().to_string();
    let ip_netns_exec = |args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", &sb.ns, &xlb])
            .args(args)
            .output()
            .unwrap()
    };
    let daemon = ip_netns_exec(&[
        "--socket", &socket, "daemon", "--iface", "eth0", "--state", &state,
    ]);
    let line = one_error_line(&["daemon"], &daemon);
    assert!(line.contains("nsenter --net=/run/netns/NS"), "{line}");
    let link = text(&sb.in_netns(&["ip", "link", "show", "eth0"]));
    assert!(!link.contains(" xdp"), "attached anyway: {link}");
    let detach = ip_netns_exec(&["detach", "--iface", "eth0"]);
    let line = one_error_line(&["detach"], &detach);
    assert!(line.contains("nsenter --net=/run/netns/NS"), "{line}");
}
