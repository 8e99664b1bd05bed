//! Announcing the VIPs this director can serve over BGP, through BIRD.
//!
//! The daemon keeps a BIRD include file defining two static protocols, `xlb_vips4` and
//! `xlb_vips6`, with one `route VIP/32 blackhole;` (`/128` for IPv6) per VIP that has at least
//! one real in a Maglev table, and asks BIRD to re-read its configuration whenever that set
//! changes. BIRD's BGP sessions export those routes (`export where proto = "xlb_vips4"`), so
//! the router stops sending a VIP to this director as soon as the director cannot serve it.
//!
//! BIRD is reloaded over its control socket (the protocol `birdc` speaks: a line per command,
//! replies as numbered lines, `doc/reply_codes` in BIRD's sources), not by running `birdc`:
//! the reply's code says whether the new configuration was accepted (0xxx) or refused (8xxx
//! run-time, 9xxx parse errors), which `birdc`'s exit status does not, and no binary has to
//! be found on the daemon's PATH.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
    sync::watch,
    task::JoinHandle,
};

use crate::{control::Balancer, state::write_atomically};

/// Debian's (and BIRD's default) control socket.
pub const DEFAULT_BIRD_SOCKET: &str = "/run/bird/bird.ctl";
/// The static protocols the include file defines; the operator's export filters name them.
pub const PROTO_V4: &str = "xlb_vips4";
pub const PROTO_V6: &str = "xlb_vips6";
/// How long one reload may take before it counts as failed.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How soon a failed reload (BIRD not running, configuration refused) is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How long a clean stop waits after withdrawing: BIRD sends the withdrawal and the routers
/// converge (tens of milliseconds in the lab), so removing the data path right after the stop
/// (`xlb detach`) loses no packet.
pub const WITHDRAW_GRACE: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct BgpOptions {
    /// The include file the daemon writes (BIRD's configuration includes it).
    pub include: PathBuf,
    /// BIRD's control socket.
    pub bird_socket: PathBuf,
}

/// The VIPs worth announcing: those with at least one real of a service in the service's
/// Maglev table. A fallback (sorry server) does not count: with every real down here, another
/// director that still reaches its reals should get the traffic.
pub fn servable_vips(b: &Balancer) -> BTreeSet<IpAddr> {
    b.config()
        .services
        .iter()
        .filter(|svc| {
            b.real_status(&svc.service)
                .iter()
                .any(|r| r.in_table && !r.fallback)
        })
        .map(|svc| svc.service.vip)
        .collect()
}

/// The include file for a set of VIPs. Both protocols are always defined (empty when no VIP
/// of their family is servable), so the operator's filters never name a missing protocol.
pub fn render(vips: &BTreeSet<IpAddr>) -> String {
    let mut out = String::from(
        "# Written by xlb daemon --bgp-config: the VIPs this director can serve.\n\
         # Do not edit; export these routes to BGP with: where proto = \"xlb_vips4\"\n",
    );
    for (proto, channel, v4) in [(PROTO_V4, "ipv4", true), (PROTO_V6, "ipv6", false)] {
        let _ = writeln!(out, "protocol static {proto} {{\n  {channel};");
        for vip in vips.iter().filter(|v| v.is_ipv4() == v4) {
            let len = if v4 { 32 } else { 128 };
            let _ = writeln!(out, "  route {vip}/{len} blackhole;");
        }
        out.push_str("}\n");
    }
    out
}

/// The daemon's side: it publishes the servable VIPs after every change to the balancer; a
/// task writes the file and reloads BIRD, outside the daemon's lock, once per distinct set.
pub struct Announcer {
    opts: BgpOptions,
    tx: watch::Sender<BTreeSet<IpAddr>>,
    task: JoinHandle<()>,
}

impl Announcer {
    /// Writes the file for `b`'s current VIPs at once (so BIRD can start on it) and starts
    /// the task that keeps it, and BIRD, current. Fails if the file cannot be written.
    pub fn start(opts: BgpOptions, b: &Balancer) -> Result<Self> {
        let vips = servable_vips(b);
        write_if_changed(&opts.include, &render(&vips))?;
        let (tx, rx) = watch::channel(vips);
        let task = tokio::spawn(keep_current(opts.clone(), rx));
        Ok(Self { opts, tx, task })
    }

    /// Recomputes the servable VIPs; wakes the task only if the set changed.
    pub fn update(&self, b: &Balancer) {
        let vips = servable_vips(b);
        self.tx.send_if_modified(|current| {
            if *current == vips {
                return false;
            }
            *current = vips;
            true
        });
    }

    /// The clean stop: nothing is announced any more, then WITHDRAW_GRACE passes. An operator
    /// stopping the daemon wants the traffic on the other directors, even though the pinned
    /// data path keeps forwarding after the daemon exits.
    pub async fn withdraw_all(self) {
        self.task.abort();
        let _ = self.task.await;
        let empty = BTreeSet::new();
        if let Err(e) = write_if_changed(&self.opts.include, &render(&empty)) {
            tracing::error!("withdrawing every VIP: {e:#}");
            return;
        }
        match reload(&self.opts.bird_socket).await {
            Ok(reply) => {
                tracing::info!(%reply, grace = ?WITHDRAW_GRACE, "every VIP withdrawn from BGP");
                tokio::time::sleep(WITHDRAW_GRACE).await;
            }
            Err(e) => tracing::error!("withdrawing every VIP: reloading BIRD: {e:#}"),
        }
    }
}

/// Rewrites the file when the set changes and reloads BIRD; retries a failed reload every
/// second until it succeeds or the set changes again. The first round always reloads: BIRD
/// may have been started on an older file.
async fn keep_current(opts: BgpOptions, mut rx: watch::Receiver<BTreeSet<IpAddr>>) {
    // Failures are logged as a warning once per streak (BIRD may start after the daemon).
    let mut failing = false;
    loop {
        let vips = rx.borrow_and_update().clone();
        let file = render(&vips);
        let list = vips
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(" ");
        let result = match write_if_changed(&opts.include, &file) {
            Ok(_) => reload(&opts.bird_socket).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(reply) => {
                failing = false;
                tracing::info!(announced = %list, %reply, "BGP announcements updated");
                if rx.changed().await.is_err() {
                    return;
                }
            }
            Err(e) => {
                if failing {
                    tracing::debug!(announced = %list, "BGP announcements not applied yet: {e:#}");
                } else {
                    tracing::warn!(
                        announced = %list,
                        "BGP announcements not applied yet (retrying every second): {e:#}"
                    );
                }
                failing = true;
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(RETRY_AFTER) => {}
                }
            }
        }
    }
}

/// Writes `contents` atomically unless the file already holds exactly that. Returns whether
/// it wrote.
fn write_if_changed(path: &Path, contents: &str) -> Result<bool> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == contents) {
        return Ok(false);
    }
    write_atomically(path, contents.as_bytes())?;
    Ok(true)
}

/// Asks BIRD to re-read its configuration; the reply's text on success.
pub async fn reload(socket: &Path) -> Result<String> {
    tokio::time::timeout(RELOAD_TIMEOUT, command(socket, "configure"))
        .await
        .with_context(|| format!("BIRD did not answer within {RELOAD_TIMEOUT:?}"))?
}

/// Sends one command on BIRD's control socket and returns its reply's text, or an error
/// with BIRD's own message when the reply's code says it failed.
async fn command(socket: &Path, cmd: &str) -> Result<String> {
    let stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to BIRD's control socket {}", socket.display()))?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let (code, text) = read_reply(&mut lines).await?;
    if code != 1 {
        bail!("unexpected greeting from BIRD: {code:04} {text}");
    }
    write.write_all(format!("{cmd}\n").as_bytes()).await?;
    let (code, text) = read_reply(&mut lines).await?;
    // 0xxx: done (0003 reconfigured, 0004 in progress, 0005 queued, ...), except 0006:
    // "reconfiguration ignored, shutting down". 8xxx/9xxx: errors.
    if code >= 1000 || code == 6 {
        bail!("BIRD refused `{cmd}`: {code:04} {text}");
    }
    Ok(text)
}

/// Reads one reply: lines `NNNN-text` (more follow), ` text` (continuation), `+text`
/// (spontaneous, ignored), ending with `NNNN text`. Returns the final code and all the text.
async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut tokio::io::Lines<R>,
) -> Result<(u32, String)> {
    let mut text = Vec::new();
    loop {
        let Some(line) = lines.next_line().await? else {
            bail!("BIRD closed its control socket mid-reply");
        };
        if line.starts_with('+') {
            continue;
        }
        if let Some(rest) = line.strip_prefix(' ') {
            text.push(rest.to_string());
            continue;
        }
        let (code, sep, rest) = match (line.get(..4), line.get(4..5), line.get(5..)) {
            (Some(c), Some(s), rest) => (c, s, rest.unwrap_or("")),
            _ => bail!("malformed reply line from BIRD: {line:?}"),
        };
        let code: u32 = code
            .parse()
            .with_context(|| format!("malformed reply line from BIRD: {line:?}"))?;
        text.push(rest.to_string());
        match sep {
            "-" => {}
            " " => return Ok((code, text.join("; "))),
            _ => bail!("malformed reply line from BIRD: {line:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_each_family_in_its_own_protocol() {
        let vips: BTreeSet<IpAddr> = ["198.18.13.1", "fd00:18::13:1", "198.18.13.2"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let file = render(&vips);
        let v4 = file.split("protocol static xlb_vips6").next().unwrap();
        assert!(v4.contains("route 198.18.13.1/32 blackhole;"), "{file}");
        assert!(v4.contains("route 198.18.13.2/32 blackhole;"), "{file}");
        assert!(!v4.contains("fd00"), "{file}");
        let v6 = file.split("protocol static xlb_vips6").nth(1).unwrap();
        assert!(v6.contains("route fd00:18::13:1/128 blackhole;"), "{file}");
        let empty = render(&BTreeSet::new());
        assert!(
            empty.contains("protocol static xlb_vips4 {\n  ipv4;\n}"),
            "{empty}"
        );
        assert!(!empty.contains("blackhole"), "{empty}");
    }

    /// A fake BIRD on a Unix socket answering `configure` with `reply`.
    async fn fake_bird(reply: &'static str) -> (PathBuf, JoinHandle<String>) {
        let dir = std::env::temp_dir().join(format!(
            "xlb-bgp-test-{}-{}",
            std::process::id(),
            reply.len()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bird.ctl");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            write.write_all(b"0001 BIRD 2.0.12 ready.\n").await.unwrap();
            let mut lines = BufReader::new(read).lines();
            let cmd = lines.next_line().await.unwrap().unwrap();
            write.write_all(reply.as_bytes()).await.unwrap();
            cmd
        });
        (path, task)
    }

    #[tokio::test]
    async fn reload_accepts_success_codes_and_reports_birds_errors() {
        let (sock, bird) =
            fake_bird("0002-Reading configuration from /etc/bird.conf\n0003 Reconfigured\n").await;
        let reply = reload(&sock).await.unwrap();
        assert_eq!(bird.await.unwrap(), "configure");
        assert!(reply.contains("Reconfigured"), "{reply}");

        let (sock, _bird) = fake_bird(
            "0002-Reading configuration from /etc/bird.conf\n8002 /etc/bird.conf:4:1 syntax error\n",
        )
        .await;
        let err = reload(&sock).await.unwrap_err();
        assert!(format!("{err:#}").contains("8002"), "{err:#}");
        assert!(format!("{err:#}").contains("syntax error"), "{err:#}");

        let missing = std::env::temp_dir().join("xlb-bgp-test-no-such-socket");
        let err = reload(&missing).await.unwrap_err();
        assert!(format!("{err:#}").contains("control socket"), "{err:#}");
    }
}
