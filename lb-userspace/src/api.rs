//! The control API between the CLI and the daemon: one JSON request per line on a Unix
//! socket, one JSON response line back.

use std::{
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::Path,
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::config::{Config, RealConfig, ServiceAddr, ServiceConfig};

pub const DEFAULT_SOCKET: &str = "/run/xlb/xlb.sock";
/// Largest request the daemon reads; a longer line is refused.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    ServiceAdd {
        config: ServiceConfig,
    },
    ServiceRemove {
        service: ServiceAddr,
    },
    ServiceList,
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
    Status,
    Stats,
    Save,
    Restore {
        config: Config,
    },
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
            error: Some(format!("{e:#}")),
            data: serde_json::Value::Null,
        }
    }
}

/// Sends one request and waits for its answer.
pub fn call(socket: &Path, request: &Request) -> Result<Response> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the xlb daemon at {} (is it running?)",
            socket.display()
        )
    })?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    if answer.is_empty() {
        bail!("the daemon closed the connection without answering");
    }
    serde_json::from_str(&answer).context("the daemon's answer is not valid JSON")
}
