//! The control API between the CLI and the daemon: one JSON request per line on a Unix
//! socket, one JSON response line back.

use std::{
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::Path,
};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::config::{Config, MAX_WEIGHT, RealConfig, ServiceAddr, ServiceConfig};

pub const DEFAULT_SOCKET: &str = "/run/xlb/xlb.sock";
/// Largest request line the daemon reads, newline included; a longer one is answered with an
/// error and the connection closed. The largest valid configuration (4096 services, 65,536
/// IPv6 reals) is about 6 MiB as a `restore` request, so this leaves room for per-real checks.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;
/// Longest error message sent back: errors may quote the request, which may be huge.
pub const MAX_ERROR_CHARS: usize = 512;

#[derive(Clone, Debug, Serialize, Deserialize)]
// Requests without fields are empty struct variants: serde ignores unknown fields next to
// the tag of a unit variant, even with deny_unknown_fields.
#[serde(tag = "request", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    ServiceAdd {
        config: ServiceConfig,
    },
    ServiceRemove {
        service: ServiceAddr,
    },
    ServiceList {},
    RealAdd {
        service: ServiceAddr,
        real: RealConfig,
    },
    RealRemove {
        service: ServiceAddr,
        addr: IpAddr,
    },
    RealWeight {
        service: ServiceAddr,
        addr: IpAddr,
        weight: u32,
    },
    RealList {
        service: ServiceAddr,
    },
    /// No new flows for the real; tracked ones go on.
    RealDrain {
        service: ServiceAddr,
        addr: IpAddr,
    },
    /// Undoes a drain.
    RealEnable {
        service: ServiceAddr,
        addr: IpAddr,
    },
    Status {},
    Stats {},
    Save {},
    Restore {
        config: Config,
    },
}

impl Request {
    /// What can be checked without the daemon's state: whole configurations, a real's own
    /// settings, a weight. The daemon checks the rest (does the service exist, ...).
    pub fn validate(&self) -> Result<()> {
        match self {
            Request::ServiceAdd { config } => config.validate(),
            Request::Restore { config } => config.validate(),
            Request::RealAdd { service, real } => real.validate(service.port),
            Request::RealWeight { addr, weight, .. } if *weight > MAX_WEIGHT => {
                bail!("real {addr}: weight {weight} is out of range 0..={MAX_WEIGHT}")
            }
            _ => Ok(()),
        }
    }
}

/// Decodes one request line (as read, newline included or not): a pure function, so every
/// way a request can be malformed is testable without a daemon. The error is one line.
pub fn decode_request(line: &[u8]) -> Result<Request> {
    if line.len() > MAX_REQUEST_BYTES {
        bail!("request larger than {MAX_REQUEST_BYTES} bytes");
    }
    let text =
        std::str::from_utf8(line).map_err(|e| anyhow!("malformed request: not UTF-8 ({e})"))?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    if text.contains('\n') {
        bail!("malformed request: one JSON object per line, and this line holds more");
    }
    if text.trim().is_empty() {
        bail!("empty request: expected one JSON object per line");
    }
    let request: Request =
        serde_json::from_str(text).map_err(|e| anyhow!("malformed request: {e}"))?;
    request.validate()?;
    Ok(request)
}

/// `message` made fit for one line of a terminal: control characters escaped, cut at
/// [`MAX_ERROR_CHARS`].
pub fn one_line(message: &str) -> String {
    let mut out = String::new();
    for (i, c) in message.chars().enumerate() {
        if i == MAX_ERROR_CHARS {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Self {
        Self {
            ok: true,
            error: None,
            data,
        }
    }

    pub fn error(e: &anyhow::Error) -> Self {
        Self {
            ok: false,
            error: Some(one_line(&format!("{e:#}"))),
            data: serde_json::Value::Null,
        }
    }
}

/// Sends one request and waits for its answer.
pub fn call(socket: &Path, request: &Request) -> Result<Response> {
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    if line.len() > MAX_REQUEST_BYTES {
        bail!(
            "request of {} bytes is larger than the daemon takes ({MAX_REQUEST_BYTES})",
            line.len()
        );
    }
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => anyhow!(
            "permission denied on {}: only root may control xlb",
            socket.display()
        ),
        _ => anyhow!(
            "cannot reach the xlb daemon at {} (is it running?): {e}",
            socket.display()
        ),
    })?;
    // The daemon may answer (a refusal) and close before reading everything: its answer
    // then says more than our write error.
    let written = stream.write_all(line.as_bytes());
    let mut answer = String::new();
    let read = BufReader::new(stream).read_line(&mut answer);
    if answer.is_empty() {
        written?;
        read?;
        bail!("the daemon closed the connection without answering");
    }
    serde_json::from_str(&answer).context("the daemon's answer is not valid JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_and_trailing_text_are_refused() {
        for bad in [
            r#"{"request":"status","x":1}"#,
            r#"{"request":"save","x":null}"#,
            r#"{"request":"status"}{"request":"save"}"#,
        ] {
            assert!(decode_request(bad.as_bytes()).is_err(), "{bad} accepted");
        }
    }
}
