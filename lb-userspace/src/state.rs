//! The state file: the configuration as JSON, written atomically (temp file, fsync, rename,
//! fsync of the directory) after every accepted change, read once at start.

use std::{fs, io::Write, path::Path};

use anyhow::{Context, Result};

use crate::config::Config;

pub const DEFAULT_STATE: &str = "/var/lib/xlb/state.json";

/// Reads the state file; a missing file is an empty configuration. A file that cannot be
/// parsed is an error and is left exactly as it is: it is what the operator had.
pub fn load(path: &Path) -> Result<Config> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
        Err(e) => return Err(e).with_context(|| format!("reading state file {}", path.display())),
    };
    let config: Config = serde_json::from_str(&text)
        .with_context(|| format!("state file {} is not valid", path.display()))?;
    config
        .validate()
        .with_context(|| format!("state file {} is not valid", path.display()))?;
    Ok(config)
}

pub fn save(path: &Path, config: &Config) -> Result<()> {
    let mut text = serde_json::to_vec_pretty(config)?;
    text.push(b'\n');
    write_atomically(path, &text)
}

/// Replaces `path` with `contents` so that a crash leaves the old file or the new one, never a
/// mix: temp file, fsync, rename, fsync of the directory.
pub fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp_name);
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        anyhow::anyhow!("writing {}: {e}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_then_load_round_trips_and_corrupt_files_are_refused_untouched() {
        let dir = std::env::temp_dir().join(format!("xlb-state-test-{}", std::process::id()));
        let path = dir.join("state.json");
        assert_eq!(load(&path).unwrap(), Config::default());
        let mut config = Config::default();
        config.services.push(crate::config::ServiceConfig::new(
            "198.18.0.100:80/tcp".parse().unwrap(),
        ));
        save(&path, &config).unwrap();
        assert_eq!(load(&path).unwrap(), config);
        fs::write(&path, "{\"services\": [").unwrap();
        let err = load(&path).unwrap_err();
        assert!(format!("{err:#}").contains("is not valid"), "{err:#}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "{\"services\": [");
        fs::remove_dir_all(&dir).unwrap();
    }
}
