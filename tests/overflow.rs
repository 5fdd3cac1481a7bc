//! Acceptance: when the fanotify queue overflows, the tracker flags a gap, changes the
//! instance, answers a token of the old instance with the full net state flagged
//! fresh, and its net state still equals the upper-walk truth (and keeps doing so).
//!
//! The queue limit (`/proc/sys/fs/fanotify/max_queued_events`) is read once, when a
//! fanotify group is created: the test lowers it for just the `Tracker::start` call
//! (which creates the group) and puts it back right after, or when anything panics.

mod support;

use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;
use store::{FreshReason, Query, Since};
use support::tracking::{assert_tracks_truth, start};
use support::{Fixture, LowerSpec, in_private_mount_ns, need_root};

const MAX_QUEUED: &str = "/proc/sys/fs/fanotify/max_queued_events";
/// The queue limit the tracker's group gets.
const SMALL_QUEUE: u64 = 64;
/// The kernel's default, put back if a value left behind by a killed run is found.
const DEFAULT_QUEUE: u64 = 16384;
/// Serialises the tests (of any process) that change the limit, so that one never
/// saves another's lowered value as "the old value".
const LOCK: &str = "/tmp/spfs-changes-overflow-test.lock";

/// Holds the queue limit lowered; dropping it (also while unwinding) restores it.
struct QueueLimit {
    old: u64,
    _lock: fs::File,
}

impl QueueLimit {
    fn lower_to(value: u64) -> QueueLimit {
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK)
            .unwrap_or_else(|e| panic!("open {LOCK}: {e}"));
        // SAFETY: flock on a descriptor we own; released when the file is closed.
        let r = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(r, 0, "flock {LOCK}: {}", std::io::Error::last_os_error());
        let mut old = read_limit();
        if old <= value {
            // Only a run killed while holding the limit low leaves such a value.
            eprintln!("{MAX_QUEUED} was {old}: left behind by a killed run? using {DEFAULT_QUEUE}");
            old = DEFAULT_QUEUE;
        }
        let guard = QueueLimit { old, _lock: lock };
        write_limit(value);
        guard
    }
}

impl QueueLimit {
    /// Restores the old limit now and checks it took, still holding the lock.
    fn restore(self) {
        write_limit(self.old);
        assert_eq!(read_limit(), self.old, "{MAX_QUEUED} is restored");
        // Drop writes the same value again and releases the lock.
    }
}

impl Drop for QueueLimit {
    fn drop(&mut self) {
        // Never panic here (this may run while unwinding): report instead.
        if let Err(e) = fs::write(MAX_QUEUED, format!("{}\n", self.old)) {
            eprintln!("cannot restore {MAX_QUEUED} to {}: {e}", self.old);
        }
    }
}

fn read_limit() -> u64 {
    let text = fs::read_to_string(MAX_QUEUED).unwrap_or_else(|e| panic!("read {MAX_QUEUED}: {e}"));
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{MAX_QUEUED} holds {text:?}: {e}"))
}

fn write_limit(value: u64) {
    fs::write(MAX_QUEUED, format!("{value}\n"))
        .unwrap_or_else(|e| panic!("write {value} to {MAX_QUEUED}: {e}"));
}

/// Creates, writes and chmods `per_thread` files in each of `threads` new dirs of
/// `mnt`, all threads at once: several events per file, far faster than a tracker
/// with a tiny queue can drain them.
fn storm(mnt: &Path, threads: usize, per_thread: usize) {
    let dirs: Vec<PathBuf> = (0..threads)
        .map(|i| {
            let d = mnt.join(format!("storm{i}"));
            fs::create_dir(&d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
            d
        })
        .collect();
    std::thread::scope(|s| {
        for dir in &dirs {
            s.spawn(move || {
                for k in 0..per_thread {
                    let p = dir.join(format!("f{k:05}"));
                    let mut f = fs::File::create(&p)
                        .unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
                    f.write_all(b"storm\n")
                        .unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
                }
            });
        }
    });
}

#[test]
fn queue_overflow_is_a_flagged_gap_and_net_state_stays_true() {
    if !need_root() {
        return;
    }
    in_private_mount_ns(|| {
        let fx = Fixture::new(&LowerSpec::generated(300, 11));
        // The tracker's group is created with the small limit; the limit is put back
        // as soon as it has started (or when start panics).
        let low = QueueLimit::lower_to(SMALL_QUEUE);
        let t = start(&fx);
        low.restore();

        // Some history before the flood, and a token of it.
        let files = LowerSpec::generated(300, 11).files();
        let name = |p: &Vec<u8>| String::from_utf8(p.clone()).expect("generated names are ASCII");
        fs::write(
            fx.mnt().join(name(&files[0])),
            b"changed before the flood\n",
        )
        .expect("overwrite");
        fs::remove_file(fx.mnt().join(name(&files[1]))).expect("rm");
        fs::write(fx.mnt().join("before"), b"new\n").expect("create");
        assert_tracks_truth(&fx, &t, "before the flood");
        let before = t.sync().expect("sync before the flood");
        let status = t.status().expect("status");
        assert_eq!(status.overflows, 0, "no overflow before the flood");
        assert_eq!(status.token, Some(before));

        let started = Instant::now();
        storm(fx.mnt(), 4, 2500);
        let flood_took = started.elapsed();
        // A flood can overflow the queue more than once, and a sync returns as soon
        // as a rescan covers it: sync until no further overflow arrives.
        let mut after = t
            .sync()
            .unwrap_or_else(|e| panic!("sync after the flood: {e}"));
        loop {
            let seen = t.status().expect("status").overflows;
            let next = t
                .sync()
                .unwrap_or_else(|e| panic!("sync after the flood: {e}"));
            if t.status().expect("status").overflows == seen && next.instance == after.instance {
                break;
            }
            after = next;
        }
        let status = t.status().expect("status");
        eprintln!("flood of 10000 files took {flood_took:?}; status after it: {status:?}");
        assert!(
            status.overflows >= 1,
            "the queue of {SMALL_QUEUE} events overflowed: {status:?}"
        );
        assert!(status.rescans >= 1, "an overflow rescans: {status:?}");
        assert_ne!(
            after.instance, before.instance,
            "the instance changes on overflow"
        );

        let gaps = t.store().gaps().expect("gaps");
        let gap = gaps
            .iter()
            .find(|g| g.reason.contains("overflow"))
            .unwrap_or_else(|| panic!("a gap naming the overflow is recorded: {gaps:?}"));
        assert_eq!(
            gap.old_instance, before.instance,
            "the gap starts at the old instance: {gaps:?}"
        );
        assert!(status.gaps >= 1, "status counts the gap: {status:?}");

        let truth = assert_tracks_truth(&fx, &t, "after the flood");
        assert!(
            truth.len() > 10_000,
            "the flooded files are in the net state ({} paths)",
            truth.len()
        );
        let answer = t
            .query(&Query {
                since: Some(Since::Token(before)),
                ..Query::default()
            })
            .expect("query since the old token");
        assert_eq!(
            answer.fresh,
            Some(FreshReason::OtherInstance {
                asked: before.instance,
                current: answer.token.instance,
            }),
            "a token of the old instance is answered fresh"
        );
        assert_eq!(answer.token.instance, after.instance);
        let full = t.query(&Query::default()).expect("full query");
        assert_eq!(
            answer.changes, full.changes,
            "the fresh answer is the full net state"
        );
        let answered: support::Truth = answer
            .changes
            .iter()
            .map(|c| (c.path.clone(), (c.kind.expect("net kind"), c.file_type)))
            .collect();
        assert_eq!(answered, truth, "the fresh answer equals the truth");

        // Tracking goes on after the gap: events again, not rescans. The group keeps
        // its small queue, so these are a few changes only (far fewer than 64 events).
        let rescans = status.rescans;
        let mark = t.sync().expect("sync");
        for k in 0..3 {
            fs::remove_file(fx.mnt().join(format!("storm0/f{k:05}"))).expect("rm storm0/..");
        }
        fs::rename(fx.mnt().join("storm1"), fx.mnt().join("renamed")).expect("mv storm1");
        fs::write(fx.mnt().join(name(&files[2])), b"changed after the flood\n").expect("overwrite");
        fs::remove_file(fx.mnt().join("before")).expect("rm before");
        let got = assert_tracks_truth(&fx, &t, "after more changes past the overflow");
        assert!(
            !got.contains_key(&b"storm0/f00000"[..]),
            "storm0/f00000 is gone"
        );
        assert!(
            got.contains_key(&b"renamed/f02499"[..]),
            "storm1 moved to renamed"
        );
        let since = t
            .query(&Query {
                since: Some(Since::Token(mark)),
                ..Query::default()
            })
            .expect("query since a token of the new instance");
        let status = t.status().expect("status");
        assert_eq!(
            status.rescans, rescans,
            "no further rescan for these few changes: {status:?}"
        );
        assert_eq!(
            since.fresh, None,
            "a token of the current instance is honoured"
        );
        let has = |p: &[u8]| since.changes.iter().any(|c| c.path == p);
        for p in [
            &b"storm0/f00000"[..],
            b"storm1",
            b"storm1/f00000",
            b"renamed",
            b"renamed/f00000",
            b"before",
        ] {
            assert!(
                has(p),
                "{} is in the changes since {mark}",
                String::from_utf8_lossy(p)
            );
        }
        assert!(has(files[2].as_slice()));
        t.stop().expect("tracker stops cleanly");
    });
}
