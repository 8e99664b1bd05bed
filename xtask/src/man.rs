//! `cargo xtask man`: man pages generated from the CLI's clap definitions, so they never
//! drift from `xlb --help`: `xlb.1` and one page per subcommand (`xlb-service-add.1`, ...).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Writes the pages into `dir` and returns their paths.
pub fn write(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = xlb::cli::command();
    cmd.build();
    let mut written = Vec::new();
    page(&cmd, "xlb", dir, &mut written)?;
    Ok(written)
}

fn page(cmd: &clap::Command, name: &str, dir: &Path, written: &mut Vec<PathBuf>) -> Result<()> {
    if cmd.is_hide_set() {
        return Ok(());
    }
    let cmd = cmd.clone().name(name.to_string());
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut out)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        page(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    #[test]
    fn every_page_renders_without_warnings() {
        let dir = std::env::temp_dir().join(format!("xlb-man-{}", std::process::id()));
        let pages = super::write(&dir).unwrap();
        let names: Vec<String> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for expected in [
            "xlb.1",
            "xlb-daemon.1",
            "xlb-service-add.1",
            "xlb-real-wait-drained.1",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} missing: {names:?}"
            );
        }
        assert!(
            !names.iter().any(|n| n.contains("xdp-pass")),
            "hidden command has a page"
        );
        for page in &pages {
            // groff with every warning on: a page that does not parse cleanly says so.
            let out = Command::new("groff")
                .args(["-man", "-Tutf8", "-ww", "-z"])
                .arg(page)
                .output()
                .expect("groff (Debian package groff-base)");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && stderr.trim().is_empty(),
                "{}: {stderr}",
                page.display()
            );
        }
        let daemon = Command::new("man")
            .arg("-l")
            .arg(dir.join("xlb-daemon.1"))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .output()
            .expect("man (Debian package man-db)");
        let text = String::from_utf8_lossy(&daemon.stdout);
        assert!(
            daemon.status.success(),
            "{}",
            String::from_utf8_lossy(&daemon.stderr)
        );
        for word in [
            "--iface",
            "--metrics",
            "--log-level",
            "--datapath-log",
            "--xdp-mode",
        ] {
            assert!(text.contains(word), "xlb-daemon(1) lacks {word}:\n{text}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
