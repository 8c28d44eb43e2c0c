//! Watching the CNI conf dir, cheaply.
//!
//! The kubelet asks for `Status` every few seconds, and a CNI config typically appears a
//! while after berthd starts (a DaemonSet installs it). Instead of inotify we take a
//! fingerprint of the directory on each call (names, sizes, mtimes of the candidate files:
//! one `readdir` and a few `stat`s) and re-parse only when it changed.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::cni::{NetConfList, config_files, load_first};
use super::error::NetworkError;

type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;
/// The outcome of the last load (errors kept as their message, to be cloneable).
type Loaded = Result<Arc<NetConfList>, String>;

/// The current network config of a conf dir, re-read when the directory changes.
pub struct ConfWatcher {
    dir: PathBuf,
    cached: Mutex<Option<(Fingerprint, Loaded)>>,
}

impl ConfWatcher {
    /// Watches `dir` (which need not exist yet).
    pub fn new(dir: &Path) -> Self {
        ConfWatcher { dir: dir.to_path_buf(), cached: Mutex::new(None) }
    }

    fn fingerprint(&self) -> Fingerprint {
        config_files(&self.dir)
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let meta = std::fs::metadata(&p).ok();
                let len = meta.as_ref().map_or(0, |m| m.len());
                let mtime = meta.and_then(|m| m.modified().ok());
                (p, len, mtime)
            })
            .collect()
    }

    /// The config to use now.
    pub fn current(&self) -> Result<Arc<NetConfList>, NetworkError> {
        let fp = self.fingerprint();
        // A poisoned lock only means a panic elsewhere while it was held; the cache is
        // always either empty or consistent, so keep using it.
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((old, result)) = cached.as_ref()
            && *old == fp
        {
            return result
                .clone()
                .map_err(|reason| NetworkError::NoCniConfig { dir: self.dir.clone(), reason });
        }
        let result = load_first(&self.dir).map(Arc::new);
        let stored = match &result {
            Ok(c) => Ok(c.clone()),
            Err(NetworkError::NoCniConfig { reason, .. }) => Err(reason.clone()),
            Err(e) => Err(e.to_string()),
        };
        *cached = Some((fp, stored));
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_up_new_and_changed_files() {
        let dir = tempfile::tempdir().unwrap();
        let w = ConfWatcher::new(&dir.path().join("net.d"));
        assert!(w.current().is_err());
        std::fs::create_dir(dir.path().join("net.d")).unwrap();
        assert!(w.current().is_err());
        let f = dir.path().join("net.d/10-a.conf");
        std::fs::write(&f, r#"{"cniVersion":"1.0.0","name":"a","type":"bridge"}"#).unwrap();
        assert_eq!(w.current().unwrap().name, "a");
        // Same size, so only the name in the content differs: the size check alone would
        // miss it if the mtime were equal, so write a different length.
        std::fs::write(&f, r#"{"cniVersion":"1.0.0","name":"bb","type":"bridge"}"#).unwrap();
        assert_eq!(w.current().unwrap().name, "bb");
        std::fs::remove_file(&f).unwrap();
        assert!(w.current().is_err());
    }
}
