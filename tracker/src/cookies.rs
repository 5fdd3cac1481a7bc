//! Sync cookies: the one owner of "everything before now is recorded".
//!
//! A waiter issues a cookie, a uniquely numbered file created and removed in the sync
//! dir, which lies on the watched filesystem. The kernel queues events in order, so
//! once the watcher has processed the cookie's creation, it has processed everything
//! queued before it. Three verbs, as watchman's `CookieSync`: `issue` (and wait),
//! `notice` (the watcher saw cookies up to n), `abort_all` (the watcher stopped).

use crate::TrackerError;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::Mode;
use nix::unistd::{UnlinkatFlags, unlinkat};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a waiter waits while the watcher makes no progress at all.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(10);

const PREFIX: &[u8] = b"cookie-";

#[derive(Default)]
struct State {
    /// Every cookie up to this one has been seen.
    reached: u64,
    failed: Option<String>,
}

/// The sync cookies of one tracker: written in its sync dir, noticed by its watcher.
pub struct Cookies {
    dir: OwnedFd,
    dir_path: PathBuf,
    issued: AtomicU64,
    state: Mutex<State>,
    seen: Condvar,
}

impl Cookies {
    /// Cookies written in the sync dir `path` (kept open: it may only be reachable
    /// through a runtime process's `/proc/<pid>/root`, which can go away).
    pub fn new(path: &Path) -> Result<Cookies, TrackerError> {
        let dir: OwnedFd = std::fs::File::open(path)
            .map_err(TrackerError::io("cannot open sync dir", path))?
            .into();
        Ok(Cookies {
            dir,
            dir_path: path.to_path_buf(),
            issued: AtomicU64::new(0),
            state: Mutex::new(State::default()),
            seen: Condvar::new(),
        })
    }

    /// The number of a cookie file's name, if it is one.
    pub fn number(name: &[u8]) -> Option<u64> {
        std::str::from_utf8(name.strip_prefix(PREFIX)?)
            .ok()?
            .parse()
            .ok()
    }

    /// Issues a cookie and waits until the watcher has seen it. `progress` counts the
    /// watcher's batches: a busy watcher (a storm's backlog, a rescan) is slow, not
    /// stuck, so the wait gives up only after `SYNC_TIMEOUT` without progress.
    pub fn sync(&self, progress: impl Fn() -> u64) -> Result<(), TrackerError> {
        let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let name = format!("cookie-{n}");
        let flags = OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
        let file = openat(
            &self.dir,
            name.as_str(),
            flags,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| TrackerError::Io {
            what: "cannot write sync cookie in",
            path: self.dir_path.clone(),
            source: e.into(),
        })?;
        drop(file);
        let _ = unlinkat(&self.dir, name.as_str(), UnlinkatFlags::NoRemoveDir);

        let mut last = progress();
        let mut deadline = Instant::now() + SYNC_TIMEOUT;
        let mut state = self.state.lock().map_err(|_| poisoned())?;
        loop {
            if let Some(why) = &state.failed {
                return Err(TrackerError::Stopped(why.clone()));
            }
            if state.reached >= n {
                return Ok(());
            }
            let now = Instant::now();
            if progress() != last {
                last = progress();
                deadline = now + SYNC_TIMEOUT;
            }
            if now >= deadline {
                return Err(TrackerError::SyncTimeout(SYNC_TIMEOUT));
            }
            let wait = (deadline - now).min(Duration::from_millis(200));
            state = self
                .seen
                .wait_timeout(state, wait)
                .map_err(|_| poisoned())?
                .0;
        }
    }

    /// The watcher has processed everything up to cookie `n`.
    pub fn notice(&self, n: u64) {
        if n == 0 {
            return;
        }
        if let Ok(mut s) = self.state.lock() {
            s.reached = s.reached.max(n);
        }
        self.seen.notify_all();
    }

    /// The last cookie issued. After a queue overflow, cookie events may be lost
    /// with the rest: a rescan that starts after this call sees every change made
    /// before any cookie up to the returned one, which it then answers (`notice`).
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::SeqCst)
    }

    /// The watcher stopped: every waiter, now and later, gets `why`.
    pub fn abort_all(&self, why: String) {
        if let Ok(mut s) = self.state.lock() {
            s.failed = Some(why);
        }
        self.seen.notify_all();
    }
}

fn poisoned() -> TrackerError {
    TrackerError::Stopped("the watcher thread panicked".into())
}

#[cfg(test)]
mod tests {
    use super::Cookies;

    #[test]
    fn cookie_names() {
        crate::test_support::table(
            &[
                (b"cookie-1", Some(1)),
                (b"cookie-18446744073709551615", Some(u64::MAX)),
                (b"cookie-", None),
                (b"cookie-x", None),
                (b"cookie1", None),
                (b"other", None),
            ],
            Cookies::number,
        );
    }
}
