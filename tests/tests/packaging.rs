//! What ships besides the binary: shell completions generated from the CLI definitions, and
//! the systemd unit (checked by `systemd-analyze verify`).

use std::process::Command;

use xlb_tests::lab::{repo, text, xlb_bin};

fn completions(shell: &str) -> String {
    let out = Command::new(xlb_bin())
        .args(["completions", shell])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn completions_cover_every_subcommand_and_parse() {
    let bash = completions("bash");
    for word in [
        "daemon",
        "service",
        "real",
        "status",
        "stats",
        "save",
        "restore",
        "realserver",
        "completions",
        "wait-drained",
        "--log-level",
        "--datapath-log",
    ] {
        assert!(bash.contains(word), "bash completion lacks {word}");
    }
    // The script parses, and sourcing it registers a completion for xlb.
    let check = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -e; source /dev/stdin <<'XLB_EOF'\n{bash}\nXLB_EOF\ncomplete -p xlb"
        ))
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    assert!(text(&check).contains("xlb"), "{}", text(&check));
    assert!(completions("zsh").contains("#compdef xlb"));
    assert!(completions("fish").contains("complete -c xlb"));
    let bad = Command::new(xlb_bin())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert_eq!(
        String::from_utf8_lossy(&bad.stderr).trim().lines().count(),
        1
    );
}

#[test]
fn systemd_unit_verifies() {
    // The unit as shipped, but starting the binary just built (verify checks it exists).
    let unit = std::fs::read_to_string(repo().join("packaging/systemd/xlb.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/xlb "));
    let dir = std::env::temp_dir().join(format!("xlb-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("xlb.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/xlb", xlb_bin().to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        out.status.success() && text(&out).trim().is_empty(),
        "systemd-analyze verify: {}",
        text(&out)
    );
    // The environment file sets every variable the unit uses.
    let env = std::fs::read_to_string(repo().join("packaging/systemd/xlb.env")).unwrap();
    for var in [
        "XLB_IFACE",
        "XLB_XDP_MODE",
        "XLB_METRICS",
        "XLB_DAEMON_ARGS",
    ] {
        assert!(unit.contains(var), "unit lacks {var}");
        assert!(
            env.lines().any(|l| l.starts_with(&format!("{var}="))),
            "xlb.env lacks {var}"
        );
    }
}

/// keepalived's own parser accepts the VRRP pair's sample (`keepalived --config-test`, Debian
/// package keepalived) once its track script points at the binary just built, and rejects it
/// while the script cannot be found: the director gives up mastership when `xlb status` fails.
#[test]
fn keepalived_sample_passes_keepalived_config_test() {
    let sample =
        std::fs::read_to_string(repo().join("packaging/keepalived/keepalived.conf")).unwrap();
    let script = "\"/usr/local/bin/xlb --socket /run/xlb/xlb.sock status\"";
    assert!(
        sample.contains(script),
        "the track script is not `xlb status`"
    );
    for must in [
        "track_script",
        "nopreempt",
        "state BACKUP",
        "virtual_ipaddress",
    ] {
        assert!(sample.contains(must), "the sample lacks {must}");
    }
    let dir = std::env::temp_dir().join(format!("xlb-keepalived-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let check = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        Command::new("keepalived")
            .args(["--config-test", "--use-file"])
            .arg(&path)
            .output()
            .expect("keepalived (Debian package keepalived; scripts/setup installs it)")
    };
    let good = check(
        "keepalived.conf",
        &sample.replace("/usr/local/bin/xlb", xlb_bin().to_str().unwrap()),
    );
    let missing = check(
        "missing.conf",
        &sample.replace("/usr/local/bin/xlb", "/nonexistent/xlb"),
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        good.status.success() && text(&good).trim().is_empty(),
        "keepalived --config-test: {}",
        text(&good)
    );
    assert!(!missing.status.success(), "{}", text(&missing));
}
