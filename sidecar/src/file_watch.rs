//! Notices when mounted files change. A Kubernetes Secret volume is updated by swapping a
//! symlink (`..data`), so neither the path nor always the mtime says much: the contents
//! are compared. The files are small (certificates, keys, the users file).

use std::path::PathBuf;
use std::time::Duration;

/// The last seen contents of a set of files.
pub struct Watched {
    paths: Vec<PathBuf>,
    seen: Vec<Option<Vec<u8>>>,
}

impl Watched {
    /// Remembers the files as they are now.
    pub fn new(paths: Vec<PathBuf>) -> Watched {
        let seen = paths.iter().map(|p| std::fs::read(p).ok()).collect();
        Watched { paths, seen }
    }

    /// Whether any file's contents (or presence) differ from the last call.
    pub fn changed(&mut self) -> bool {
        let now: Vec<Option<Vec<u8>>> = self.paths.iter().map(|p| std::fs::read(p).ok()).collect();
        if now == self.seen {
            return false;
        }
        self.seen = now;
        true
    }
}

/// Calls `reload` every time the files change, checking every `period`, forever.
/// `reload` logs its own failure and keeps what it had: a half-written Secret update must
/// not take a working certificate or users list away.
pub async fn on_change(paths: Vec<PathBuf>, period: Duration, mut reload: impl FnMut() + Send) {
    let mut watched = Watched::new(paths);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if watched.changed() {
            reload();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewrite_with_new_contents_is_a_change_and_the_same_contents_are_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("tls.crt");
        std::fs::write(&file, "a").expect("write");
        let mut w = Watched::new(vec![file.clone()]);
        assert!(!w.changed());
        std::fs::write(&file, "a").expect("write");
        assert!(!w.changed());
        std::fs::write(&file, "b").expect("write");
        assert!(w.changed());
        assert!(!w.changed());
        std::fs::remove_file(&file).expect("remove");
        assert!(w.changed());
    }
}
