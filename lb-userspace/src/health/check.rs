//! A check's configuration: its kind, target port, timing, rise/fall and what it expects;
//! validated here so every entry point refuses a bad check with the same one-line message.

use std::{net::IpAddr, net::SocketAddr, time::Duration};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

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

pub(super) fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `1500ms`, `2s`.
pub(super) fn fmt_ms(ms: u64) -> String {
    if ms >= 1000 && ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    pub(crate) const LO4: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    pub(crate) const LO6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
    pub(crate) fn check(kind: CheckKind, timeout_ms: u64) -> CheckConfig {
        CheckConfig {
            timeout_ms,
            ..CheckConfig::new(kind)
        }
    }

    pub(crate) fn udp(send: &str, expect: Option<&str>, timeout_ms: u64) -> CheckConfig {
        CheckConfig {
            send: Some(send.into()),
            expect: expect.map(Into::into),
            ..check(CheckKind::Udp, timeout_ms)
        }
    }

    pub(crate) fn http(path: &str, timeout_ms: u64) -> CheckConfig {
        CheckConfig {
            path: Some(path.into()),
            ..check(CheckKind::Http, timeout_ms)
        }
    }

    pub(crate) fn exec(cmd: &str, timeout_ms: u64) -> CheckConfig {
        CheckConfig {
            cmd: Some(cmd.into()),
            ..check(CheckKind::Exec, timeout_ms)
        }
    }

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
