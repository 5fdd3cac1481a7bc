//! The host service: a tracker for every spfs runtime, attached as its first process
//! starts, with nothing for the runtime's owner to do.
//!
//! spfs makes a runtime by unsharing a mount namespace, mounting the overlay at
//! `/spfs` and exec'ing the runtime's first program (spfs's startup script, which then
//! runs the user's command); spfs exports the runtime's name (`SPFS_RUNTIME`) to every
//! process of it (crates/spfs/src/runtime, env.rs, status_unix.rs). The daemon
//! listens to the kernel's process events connector: at each exec in a mount
//! namespace it has not seen, with an spfs name and an overlay at the mount point, it
//! stops that process (SIGSTOP), attaches a tracker, and lets it go on (SIGCONT). So
//! the tracker's fanotify mark is in place before the runtime's first program runs
//! further: the only writes that can be missed are those the process makes between
//! its exec and the stop (`Notice::Attached::held_after` measures that window),
//! and spfs's own (its masks' whiteouts, which a rescan finds anyway). Runtimes
//! already running when the daemon starts are attached late, with a rescan.

use crate::TrackerError;
use crate::mountinfo;
use crate::procevents::{self, ProcEvent};
use crate::sys::{self, ProcConnector};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where spfs mounts runtimes (`/spfs`).
    pub mount_point: PathBuf,
    /// Stop a new runtime's first process until its tracker watches (the default).
    /// Without it, the first writes may be recorded by the rescan only (no writer).
    pub hold: bool,
    /// How long the changelog of an ended runtime is kept (then its state dir under
    /// `service::RUNTIMES_DIR` is removed); `None` keeps them all.
    pub retention: Option<Duration>,
}

/// What the daemon did, as it happens.
#[derive(Debug, Clone)]
pub enum Notice {
    /// Subscribed and ready; `existing` runtimes were found running.
    Ready { existing: usize },
    /// A tracker serves runtime `name` (found through process `pid`).
    Attached {
        name: String,
        pid: u32,
        /// From the process's exec to its stop, when it was held: the window in which
        /// its writes could be missed.
        held_after: Option<Duration>,
        /// How long attaching took (the process was held that long).
        took: Duration,
        /// What the attach said (`tracking ...` or `already tracked ...`).
        said: String,
    },
    /// Attaching failed; the runtime goes on untracked.
    Failed {
        name: String,
        pid: u32,
        error: String,
    },
    /// The connector lost messages: runtimes started meanwhile are found at their
    /// next exec (a late attach).
    Dropped,
    /// The changelog of an ended runtime was removed, past the retention period.
    Expired { state: PathBuf },
}

/// Attaches a tracker to the runtime of a process (pid) and returns what it said
/// once the tracker watches, or why it could not. The `spfs-changes` binary runs
/// `spfs-changes track --pid PID` (a fresh process: the daemon's descriptors stay
/// its own).
pub type Attach<'a> = dyn FnMut(u32) -> Result<String, String> + 'a;

/// Runs until `stop` is set. Errors: not root (the connector and fanotify need it), a
/// kernel without the process events connector.
pub fn run(
    options: &Options,
    stop: &AtomicBool,
    attach: &mut Attach<'_>,
    notice: &mut dyn FnMut(Notice),
) -> Result<(), TrackerError> {
    let connector = ProcConnector::open().map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => TrackerError::NotRoot,
        _ => TrackerError::KernelFeature {
            feature: "the process events connector (CONFIG_PROC_EVENTS)",
            source: e,
        },
    })?;
    let host = crate::runtime::outside_process().map(|(_, ns)| ns);
    let mut daemon = Daemon {
        options,
        host,
        handled: HashMap::new(),
        last_sweep: Instant::now(),
        last_expiry: None,
    };
    let mut existing = 0;
    for pid in sys::pids() {
        if let Some(found) = daemon.candidate(pid)
            && daemon.is_runtime(&found)
        {
            existing += 1;
            daemon.attach(found, None, attach, notice);
        }
    }
    notice(Notice::Ready { existing });
    daemon.expire(notice);
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::SeqCst) {
        let n = match connector.recv(&mut buf, Duration::from_millis(250)) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                notice(Notice::Dropped);
                continue;
            }
            Err(e) => {
                return Err(TrackerError::Attach(format!(
                    "process events connector: {e}"
                )));
            }
        };
        for t in procevents::parse(&buf[..n]) {
            if let ProcEvent::Exec { pid } = t.event
                && let Some(found) = daemon.candidate(pid)
            {
                daemon.attach(found, Some(t.timestamp_ns), attach, notice);
            }
        }
        daemon.sweep();
        daemon.expire(notice);
    }
    Ok(())
}

/// A process that may be the first seen of a runtime with no tracker attached by
/// this daemon yet.
struct Found {
    pid: u32,
    ns: u64,
    name: String,
}

struct Daemon<'a> {
    options: &'a Options,
    host: Option<u64>,
    /// Namespaces attached (or failed), with a process of each and the runtime's
    /// name. The kernel reuses a namespace's inode number once it is gone, so a hit
    /// counts only while that process is still in it or the name is the same.
    handled: HashMap<u64, (u32, String)>,
    last_sweep: Instant,
    last_expiry: Option<Instant>,
}

/// Sends SIGCONT when dropped, whatever happened while the process was stopped.
struct Held(u32);

impl Drop for Held {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0 as i32),
            nix::sys::signal::Signal::SIGCONT,
        );
    }
}

impl Daemon<'_> {
    /// `pid`, if it is a process with an spfs name in a mount namespace not handled
    /// yet (whether an overlay is mounted there is `is_runtime`'s to say).
    fn candidate(&mut self, pid: u32) -> Option<Found> {
        let ns = sys::mount_ns_of(pid).ok()?;
        if Some(ns) == self.host {
            return None;
        }
        let known = self.handled.get(&ns).cloned();
        if let Some((witness, _)) = &known
            && sys::mount_ns_of(*witness).ok() == Some(ns)
        {
            return None;
        }
        let name = crate::runtime::spfs_runtime_name(pid)?;
        if let Some((_, known_name)) = known
            && known_name == name
        {
            // The same runtime, seen through another of its processes.
            self.handled.insert(ns, (pid, name));
            return None;
        }
        Some(Found { pid, ns, name })
    }

    /// Whether the candidate's namespace has an overlay at the mount point (spfs
    /// execs helpers in the new namespace before it mounts).
    fn is_runtime(&self, found: &Found) -> bool {
        let Ok(text) = std::fs::read(format!("/proc/{}/mountinfo", found.pid)) else {
            return false;
        };
        let entries = mountinfo::parse(&text);
        mountinfo::find_mount(&entries, &self.options.mount_point)
            .is_some_and(|m| m.fs_type == "overlay")
    }

    fn attach(
        &mut self,
        found: Found,
        exec_ns: Option<u64>,
        attach: &mut Attach<'_>,
        notice: &mut dyn FnMut(Notice),
    ) {
        let started = Instant::now();
        let mut held_after = None;
        let held = match exec_ns {
            Some(exec_ns) if self.options.hold => {
                let stopped = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(found.pid as i32),
                    nix::sys::signal::Signal::SIGSTOP,
                );
                held_after =
                    monotonic_ns().map(|now| Duration::from_nanos(now.saturating_sub(exec_ns)));
                stopped.ok().map(|_| Held(found.pid))
            }
            _ => None,
        };
        if !self.is_runtime(&found) {
            // Not (yet) a runtime: let it go, and look again at its next exec.
            return;
        }
        let result = attach(found.pid);
        drop(held);
        self.handled
            .insert(found.ns, (found.pid, found.name.clone()));
        notice(match result {
            Ok(said) => Notice::Attached {
                name: found.name,
                pid: found.pid,
                held_after,
                took: started.elapsed(),
                said,
            },
            Err(error) => Notice::Failed {
                name: found.name,
                pid: found.pid,
                error,
            },
        });
    }

    /// Forgets namespaces whose recorded process has gone (its runtime has most
    /// likely ended; if not, its next exec finds the tracker running).
    fn sweep(&mut self) {
        if self.last_sweep.elapsed() < Duration::from_secs(10) {
            return;
        }
        self.last_sweep = Instant::now();
        self.handled
            .retain(|ns, (pid, _)| sys::mount_ns_of(*pid).ok() == Some(*ns));
    }
}

/// How often kept changelogs are looked at for expiry.
const EXPIRY_CHECK: Duration = Duration::from_secs(3600);

impl Daemon<'_> {
    /// Removes the state dirs of ended runtimes (no tracker answers there) last
    /// changed longer ago than the retention period; at start, then hourly.
    fn expire(&mut self, notice: &mut dyn FnMut(Notice)) {
        let Some(retention) = self.options.retention else {
            return;
        };
        if self.last_expiry.is_some_and(|t| t.elapsed() < EXPIRY_CHECK) {
            return;
        }
        self.last_expiry = Some(Instant::now());
        for state in expired(
            std::path::Path::new(crate::service::RUNTIMES_DIR),
            retention,
        ) {
            match std::fs::remove_dir_all(&state) {
                Ok(()) => notice(Notice::Expired { state }),
                Err(e) => {
                    tracing::warn!(state = %state.display(), error = %e, "cannot remove an expired changelog")
                }
            }
        }
    }
}

/// The state dirs under `dir` whose runtime has ended (no tracker answers) and that
/// changed last (the dir or its changelog) longer ago than `retention`.
pub fn expired(dir: &std::path::Path, retention: Duration) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let now = std::time::SystemTime::now();
    let age = |p: &std::path::Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|state| state.is_dir())
        .filter(|state| {
            let youngest = [state.clone(), state.join(store::DB_DIR_NAME)]
                .iter()
                .filter_map(|p| age(p))
                .min();
            youngest.is_some_and(|a| a > retention)
        })
        .filter(|state| crate::service::running_tracker(state).is_none())
        .collect()
}

/// CLOCK_MONOTONIC now, in ns: the clock of the connector's timestamps.
fn monotonic_ns() -> Option<u64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
    Some(t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn age_by(path: &std::path::Path, by: Duration) {
        let when = std::time::SystemTime::now() - by;
        std::fs::File::open(path)
            .and_then(|f| f.set_modified(when))
            .expect("set mtime");
    }

    /// An ended runtime's changelog goes once neither its dir nor its changelog has
    /// changed for the retention period; younger ones stay.
    #[test]
    fn expiry_takes_ended_runtimes_past_retention_only() {
        let dir = tempfile::tempdir().expect("temp dir");
        let day = Duration::from_secs(24 * 3600);
        for (name, dir_age, db_age) in [("old", 30, 20), ("fresh-db", 30, 1), ("young", 2, 2)] {
            let state = dir.path().join(name);
            std::fs::create_dir_all(state.join(store::DB_DIR_NAME)).expect("mkdir");
            age_by(&state.join(store::DB_DIR_NAME), day * db_age);
            age_by(&state, day * dir_age);
        }
        std::fs::write(dir.path().join("a-file"), b"").expect("a stray file");
        let gone = expired(dir.path(), day * 14);
        assert_eq!(gone, vec![dir.path().join("old")]);
    }
}
