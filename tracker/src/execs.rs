//! Who each process of the runtime is, learnt when it starts: an exec cache fed by the
//! kernel's process events connector.
//!
//! fanotify names a writer by pid only, and many writers (`chmod`, `rm`, a compiler
//! step) are gone before their event is read, taking `/proc/PID/cmdline` with them.
//! Reading the command line at exec time, while the process surely lives, names them;
//! a fork without exec runs its parent's program and inherits its parent's entry.
//! A lookup first applies what the connector has queued: a process's exec is queued
//! before anything it writes after it, so the answer is never older than the event
//! asked about. Entries of exited processes stay for a grace period, and the cache is
//! bounded.

use crate::procevents::{self, ProcEvent};
use crate::sys::{self, ProcConnector};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an exited process's entry is kept: events it queued before exiting are
/// read well within this, unless the tracker is far behind (then `/proc` is asked,
/// and an empty command line is the worst outcome).
const GRACE: Duration = Duration::from_secs(30);
/// At most this many entries (about 4 MiB of command lines at the 256-byte average).
const MAX_ENTRIES: usize = 16 * 1024;

#[derive(Debug, Clone)]
struct Entry {
    command: Vec<u8>,
    parent: u32,
    exited: Option<Instant>,
}

/// Command lines and parents of the processes of one mount namespace.
pub struct ExecCache {
    entries: Mutex<HashMap<u32, Entry>>,
    /// The connector and a buffer to read it into; one reader at a time.
    feed: Mutex<Vec<u8>>,
    connector: ProcConnector,
    ns: u64,
    /// Connector messages the kernel dropped (ENOBUFS): the pids they spoke of are
    /// read from `/proc` instead.
    pub dropped: AtomicU64,
    /// Execs seen so far: a command line read before the last one may be stale.
    execs: AtomicU64,
}

impl ExecCache {
    /// The command line process `pid` had at its exec (or its parent's, after a fork),
    /// if the cache knows it, once what the connector has queued is applied.
    pub fn command(&self, pid: u32) -> Option<Vec<u8>> {
        self.caught_up();
        let entries = self.entries.lock().ok()?;
        entries.get(&pid).map(|e| e.command.clone())
    }

    /// How many execs it has applied, after applying what is queued: a command line
    /// read from `/proc` while this stays the same is still the process's.
    pub fn execs_seen(&self) -> u64 {
        self.caught_up();
        self.execs.load(Ordering::SeqCst)
    }

    /// Before an answer: what is queued is applied, or the answer is what is known.
    fn caught_up(&self) {
        if let Err(e) = self.catch_up() {
            tracing::debug!(error = %e, "reading the process events connector");
        }
    }

    /// Applies every message queued on the connector now.
    fn catch_up(&self) -> std::io::Result<()> {
        let Ok(mut buf) = self.feed.lock() else {
            return Ok(());
        };
        loop {
            match self.connector.recv_now(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    for t in procevents::parse(&buf[..n]) {
                        self.apply(t.event, self.ns);
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The parent of `pid` when it started, if known.
    pub fn parent(&self, pid: u32) -> Option<u32> {
        let entries = self.entries.lock().ok()?;
        entries.get(&pid).map(|e| e.parent)
    }

    /// How many processes it knows.
    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn apply(&self, event: ProcEvent, ns: u64) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        match event {
            ProcEvent::Exec { pid } => {
                self.execs.fetch_add(1, Ordering::SeqCst);
                if sys::mount_ns_of(pid).ok() == Some(ns) {
                    let command = sys::command_of(pid);
                    let parent = parent_of(pid).unwrap_or(0);
                    entries.insert(
                        pid,
                        Entry {
                            command,
                            parent,
                            exited: None,
                        },
                    );
                } else {
                    // The pid is now another program, outside the runtime.
                    entries.remove(&pid);
                }
            }
            ProcEvent::Fork { parent, child } => {
                let inherited = entries.get(&parent).map(|p| p.command.clone());
                match inherited {
                    Some(command) => {
                        entries.insert(
                            child,
                            Entry {
                                command,
                                parent,
                                exited: None,
                            },
                        );
                    }
                    // A process entering the runtime from outside (spfs-enter's first
                    // child) or a pid reused outside it.
                    None => {
                        if sys::mount_ns_of(child).ok() == Some(ns) {
                            entries.insert(
                                child,
                                Entry {
                                    command: sys::command_of(child),
                                    parent,
                                    exited: None,
                                },
                            );
                        } else {
                            entries.remove(&child);
                        }
                    }
                }
            }
            ProcEvent::Exit { pid } => {
                if let Some(e) = entries.get_mut(&pid) {
                    e.exited = Some(Instant::now());
                }
            }
        }
        if entries.len() > MAX_ENTRIES {
            prune(&mut entries);
        }
    }
}

/// Drops entries exited longer ago than `GRACE`; if still too many, the exited ones
/// oldest first, then any.
fn prune(entries: &mut HashMap<u32, Entry>) {
    let now = Instant::now();
    entries.retain(|_, e| e.exited.is_none_or(|t| now.duration_since(t) < GRACE));
    if entries.len() <= MAX_ENTRIES * 3 / 4 {
        return;
    }
    let mut exited: Vec<(Instant, u32)> = entries
        .iter()
        .filter_map(|(pid, e)| e.exited.map(|t| (t, *pid)))
        .collect();
    exited.sort();
    let excess = entries.len() - MAX_ENTRIES * 3 / 4;
    for (_, pid) in exited.into_iter().take(excess) {
        entries.remove(&pid);
    }
    let excess = entries.len().saturating_sub(MAX_ENTRIES * 3 / 4);
    let victims: Vec<u32> = entries.keys().take(excess).copied().collect();
    for pid in victims {
        entries.remove(&pid);
    }
}

/// The parent pid in `/proc/PID/stat` (field 4).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Subscribes to the process events connector and feeds a cache of the processes of
/// mount namespace `ns` until `stop` is set. Errors when the connector cannot be had
/// (not root in the initial namespaces, a kernel without it): callers then read
/// `/proc` alone.
pub fn start(ns: u64, stop: Arc<AtomicBool>) -> std::io::Result<(Arc<ExecCache>, JoinHandle<()>)> {
    let cache = Arc::new(ExecCache {
        entries: Mutex::new(HashMap::new()),
        feed: Mutex::new(vec![0u8; 64 * 1024]),
        connector: ProcConnector::open()?,
        ns,
        dropped: AtomicU64::new(0),
        execs: AtomicU64::new(0),
    });
    let feed = cache.clone();
    let thread = std::thread::Builder::new()
        .name("spfs-changes-execs".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let ready = feed.connector.wait(Duration::from_millis(200));
                if let Err(e) = ready.and_then(|_| feed.catch_up()) {
                    tracing::error!(error = %e, "process events connector failed; command lines are read from /proc from now on");
                    return;
                }
            }
        })?;
    Ok((cache, thread))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::need_root;

    /// A child of this process is known by its exec'd command line, and still is
    /// after it has exited (what the reader asks of writers gone before their events
    /// are read).
    #[test]
    fn names_a_process_that_is_gone() {
        if !need_root() {
            return;
        }
        let ns = sys::mount_ns_of(std::process::id()).expect("own namespace");
        let stop = Arc::new(AtomicBool::new(false));
        let (cache, thread) = start(ns, stop.clone()).expect("the connector (as root)");
        // It lives until its stdin closes: long enough for its exec to be seen.
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "read x || true", "one-shot"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let pid = child.id();
        let want: &[u8] = b"/bin/sh -c read x || true one-shot";
        let deadline = Instant::now() + Duration::from_secs(10);
        while cache.command(pid).as_deref() != Some(want) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(child.stdin.take());
        assert!(child.wait().expect("wait").success());
        assert!(std::fs::metadata(format!("/proc/{pid}")).is_err(), "reaped");
        assert_eq!(cache.command(pid).as_deref(), Some(want));
        assert_eq!(cache.parent(pid), Some(std::process::id()));
        stop.store(true, Ordering::SeqCst);
        thread.join().expect("the feed ends");
    }
}
