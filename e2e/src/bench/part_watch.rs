//! When did a part become visible on a replica? A thread of its own reads inotify events
//! of the replica's `parts/` directory and stamps every name as it arrives, so the stamp
//! is the rename's moment (give or take one wake-up), not the moment a busy async runtime
//! got round to looking: waking a task that waits for a blocking waiter cost 5-15 ms of
//! scheduling on a loaded 2-core machine, more than the replication being measured.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use rtable_protocol::PartName;

#[derive(Default)]
struct Seen {
    /// Every part directory name that appeared, with when it was first seen.
    names: HashMap<String, Instant>,
}

pub struct PartWatch {
    seen: Arc<(Mutex<Seen>, Condvar)>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PartWatch {
    /// Starts watching `parts_dir`; parts renamed into it from now on are stamped.
    pub fn start(parts_dir: &Path) -> anyhow::Result<PartWatch> {
        let inotify = Inotify::watch(parts_dir)
            .with_context(|| format!("watching {} with inotify", parts_dir.display()))?;
        let seen: Arc<(Mutex<Seen>, Condvar)> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let seen = seen.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("part-watch".to_string())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let names = inotify.next_names(Duration::from_millis(100));
                        if names.is_empty() {
                            continue;
                        }
                        let at = Instant::now();
                        let (lock, ready) = &*seen;
                        let mut seen = lock.lock().unwrap_or_else(PoisonError::into_inner);
                        for name in names {
                            seen.names.entry(name).or_insert(at);
                        }
                        ready.notify_all();
                    }
                })
                .context("starting the part watcher thread")?
        };
        Ok(PartWatch {
            seen,
            stop,
            thread: Some(thread),
        })
    }

    /// When `part`, or a merged part covering it, appeared: waits up to `timeout`.
    pub fn appeared(&self, part: &str, timeout: Duration) -> anyhow::Result<Instant> {
        let wanted = PartName::parse(part).map_err(|e| anyhow::anyhow!("part name {part}: {e}"))?;
        let deadline = Instant::now() + timeout;
        let (lock, ready) = &*self.seen;
        let mut seen = lock.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let first = seen
                .names
                .iter()
                .filter(|(name, _)| {
                    PartName::parse(name).is_ok_and(|p| p == wanted || p.contains(&wanted))
                })
                .map(|(_, at)| *at)
                .min();
            if let Some(at) = first {
                return Ok(at);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            anyhow::ensure!(
                !left.is_zero(),
                "part {part} did not appear within {}s",
                timeout.as_secs()
            );
            seen = ready
                .wait_timeout(seen, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for PartWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An inotify descriptor watching one directory for names moved or created in it.
pub struct Inotify {
    fd: libc::c_int,
}

impl Inotify {
    pub fn watch(dir: &Path) -> anyhow::Result<Inotify> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
        // SAFETY: plain syscalls on a descriptor this struct owns and closes on drop.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        anyhow::ensure!(
            fd >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        let inotify = Inotify { fd };
        // SAFETY: `path` is a valid C string for the duration of the call.
        let wd = unsafe {
            libc::inotify_add_watch(fd, path.as_ptr(), libc::IN_MOVED_TO | libc::IN_CREATE)
        };
        anyhow::ensure!(
            wd >= 0,
            "inotify_add_watch: {}",
            std::io::Error::last_os_error()
        );
        Ok(inotify)
    }

    /// Waits for at least one event (or `limit`), then drains whatever is queued.
    pub fn wait(&self, limit: Duration) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.poll(limit) >= 0,
            "poll: {}",
            std::io::Error::last_os_error()
        );
        let mut buf = [0u8; 4096];
        // SAFETY: reads into a buffer of the given length; non-blocking.
        while unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
        Ok(())
    }

    fn poll(&self, limit: Duration) -> libc::c_int {
        let mut pfd = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = limit.as_millis().clamp(1, libc::c_int::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, ms) }
    }

    /// The names of the events that arrive within `limit` (empty when none did).
    fn next_names(&self, limit: Duration) -> Vec<String> {
        if self.poll(limit) <= 0 {
            return Vec::new();
        }
        let mut names = Vec::new();
        // Aligned for `inotify_event`, and room for many events with names.
        let mut buf = vec![0u64; 8192];
        loop {
            let len = buf.len() * 8;
            // SAFETY: reads at most `len` bytes into the buffer; non-blocking.
            let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), len) };
            if n <= 0 {
                return names;
            }
            // SAFETY: the kernel wrote `n` bytes of whole events into the buffer.
            let bytes =
                unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n as usize) };
            let header = std::mem::size_of::<libc::inotify_event>();
            let mut at = 0;
            while at + header <= bytes.len() {
                // The event's `len` field follows wd, mask and cookie (3 x 4 bytes).
                let name_len = u32::from_ne_bytes([
                    bytes[at + 12],
                    bytes[at + 13],
                    bytes[at + 14],
                    bytes[at + 15],
                ]) as usize;
                let start = at + header;
                let end = (start + name_len).min(bytes.len());
                let name = &bytes[start..end];
                let name = name.split(|b| *b == 0).next().unwrap_or_default();
                if let Ok(name) = std::str::from_utf8(name)
                    && !name.is_empty()
                {
                    names.push(name.to_string());
                }
                at = start + name_len;
            }
        }
    }
}

impl Drop for Inotify {
    fn drop(&mut self) {
        // SAFETY: the descriptor is owned and closed once.
        unsafe { libc::close(self.fd) };
    }
}
