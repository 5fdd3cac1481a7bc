//! Acceptance: a change to an upper inode is a change to every name it has (hard
//! links), and a file made with O_TMPFILE keeps being followed once it is linked into
//! place. Each repro runs with every step in one batch and with a sync between steps;
//! the tracker is checked against a walk of the upper dir after each.

mod support;

use nix::fcntl::{AtFlags, OFlag, open};
use nix::sys::stat::{Mode, futimens};
use nix::sys::time::TimeSpec;
use nix::unistd::{linkat, write};
use std::os::fd::AsFd;
use std::path::Path;
use store::{Action, FileType::*, NetKind::*, Query};
use support::tracking::{actions, assert_tracks_truth, start};
use support::{Fixture, LowerSpec, in_private_mount_ns, need_root, sh};
use tracker::Tracker;

fn lower() -> LowerSpec {
    LowerSpec::new()
        .file("f", "lower f\n", 0o644)
        .file("h", "lower h\n", 0o644)
        .file("d/a", "a\n", 0o644)
        .mtime("h", 1_000_000_000, 0)
}

/// Runs `steps` on a fresh tracked overlay: all in one batch (the tracker settles
/// only at syncs, and none comes between them), or with a sync after each. Calls
/// `check` after the last one.
fn both_ways(steps: fn(&Path, &Tracker, &dyn Fn()), check: fn(&Fixture, &Tracker, &str)) {
    if !need_root() {
        return;
    }
    for one_batch in [true, false] {
        in_private_mount_ns(move || {
            let fx = Fixture::new(&lower());
            let t = start(&fx);
            t.batch_at_syncs(one_batch);
            let pause = || {
                if !one_batch {
                    t.sync().expect("sync");
                }
            };
            steps(fx.mnt(), &t, &pause);
            let ctx = if one_batch {
                "every step in one batch"
            } else {
                "a sync between steps"
            };
            check(&fx, &t, ctx);
            t.stop().expect("tracker stops cleanly");
        });
    }
}

/// The net state of `path` as the tracker has it.
fn kind_of(t: &Tracker, path: &str) -> Option<(store::NetKind, store::FileType)> {
    t.query(&Query::default())
        .expect("query")
        .changes
        .into_iter()
        .find(|c| c.path == path.as_bytes())
        .and_then(|c| c.kind.map(|k| (k, c.file_type)))
}

#[test]
fn a_chmod_through_a_hard_link_changes_the_lower_file_too() {
    both_ways(
        |mnt, _, pause| {
            sh(mnt, "ln f f2");
            pause();
            sh(mnt, "chmod 600 f2");
        },
        |fx, t, ctx| {
            assert_tracks_truth(fx, t, ctx);
            assert_eq!(kind_of(t, "f"), Some((Metadata, File)), "{ctx}");
            assert_eq!(kind_of(t, "f2"), Some((Added, File)), "{ctx}");
            assert!(
                actions(t, "f").contains(&Action::Attrib),
                "{ctx}: the chmod is logged for f: {:?}",
                actions(t, "f")
            );
            // Written through the other name in a later batch.
            sh(fx.mnt(), "echo more >> f2");
            assert_tracks_truth(fx, t, ctx);
            assert_eq!(kind_of(t, "f"), Some((Modified, File)), "{ctx}");
            assert!(actions(t, "f").contains(&Action::Written), "{ctx}");
            // And validation sees the altered lower file.
            let report = t
                .validate(&tracker::validate::Request::default())
                .expect("validate");
            assert!(
                report.violations.iter().any(|v| v.path == b"f"),
                "{ctx}: {:?}",
                report.violations
            );
        },
    );
}

/// O_TMPFILE in the mount, written, linked over the removed lower file `h`, then
/// written further through the same descriptor.
fn tmpfile_over_h(mnt: &Path, pause: &dyn Fn()) -> std::os::fd::OwnedFd {
    sh(mnt, "rm h");
    pause();
    let fd = open(
        mnt,
        OFlag::O_TMPFILE | OFlag::O_RDWR,
        Mode::from_bits_truncate(0o644),
    )
    .expect("O_TMPFILE in the mount");
    write(&fd, b"lower h\n").expect("write");
    pause();
    linkat(
        fd.as_fd(),
        "",
        nix::fcntl::AT_FDCWD,
        &mnt.join("h"),
        AtFlags::AT_EMPTY_PATH,
    )
    .expect("linkat");
    pause();
    write(&fd, b"and more\n").expect("write through the descriptor");
    fd
}

#[test]
fn an_o_tmpfile_file_linked_into_place_is_followed() {
    both_ways(
        |mnt, _, pause| {
            drop(tmpfile_over_h(mnt, pause));
        },
        |fx, t, ctx| {
            assert_tracks_truth(fx, t, ctx);
            assert_eq!(kind_of(t, "h"), Some((Modified, File)), "{ctx}");
        },
    );
}

#[test]
fn an_o_tmpfile_file_put_back_to_the_lower_bytes_is_no_change() {
    both_ways(
        |mnt, _, pause| {
            let fd = tmpfile_over_h(mnt, pause);
            pause();
            // The lower bytes, mode and mtime back, through the same descriptor.
            nix::unistd::ftruncate(&fd, 0).expect("truncate");
            nix::sys::uio::pwrite(&fd, b"lower h\n", 0).expect("write");
            let mtime = TimeSpec::new(1_000_000_000, 0);
            futimens(&fd, &mtime, &mtime).expect("times");
        },
        |fx, t, ctx| {
            let net = assert_tracks_truth(fx, t, ctx);
            assert_eq!(
                net.get(b"h".as_slice()).map(|(k, _)| *k),
                support::truth(fx.upper(), fx.lowers())
                    .get(b"h".as_slice())
                    .map(|(k, _)| *k),
                "{ctx}"
            );
            assert_ne!(kind_of(t, "h").map(|(k, _)| k), Some(Modified), "{ctx}");
        },
    );
}

/// Runs `steps` on a fresh tracked overlay, each a batch of its own (the tracker
/// settles only at the sync after each), then calls `check`.
fn in_batches(steps: &[&str], check: fn(&Fixture, &Tracker)) {
    if !need_root() {
        return;
    }
    let steps: Vec<String> = steps.iter().map(|s| s.to_string()).collect();
    in_private_mount_ns(move || {
        let fx = Fixture::new(&lower());
        let t = start(&fx);
        t.batch_at_syncs(true);
        for step in &steps {
            sh(fx.mnt(), step);
            t.sync().expect("sync");
        }
        check(&fx, &t);
        t.stop().expect("tracker stops cleanly");
    });
}

#[test]
fn a_chmod_through_a_link_removed_in_the_same_batch_still_changes_the_file() {
    in_batches(
        &[
            "ln f n2",
            // Cold caches, then `n2` looked up first: overlayfs takes it as the
            // file's upper name, and the chmod's events name it.
            "echo 2 > /proc/sys/vm/drop_caches; ls -l n2 f >/dev/null; chmod 600 n2; rm n2",
        ],
        |fx, t| {
            assert_tracks_truth(fx, t, "chmod and rm in one batch");
            assert_eq!(kind_of(t, "f"), Some((Metadata, File)));
        },
    );
}

/// Overlayfs writes a hard-linked file through the first of its names it looked up:
/// once that name is removed, the write events name it, and the file changed all the
/// same under its other names.
#[test]
fn a_write_named_by_a_removed_link_still_changes_the_file() {
    in_batches(
        &[
            "ln d/a y",
            "ln d/a d/f",
            // Cold caches, then `y` looked up first: overlayfs takes it as the
            // file's upper name.
            "echo 2 > /proc/sys/vm/drop_caches; ls -l y d/f >/dev/null; rm y",
            "echo more >> d/f",
        ],
        |fx, t| {
            assert_tracks_truth(fx, t, "a write named by a removed link");
            assert_eq!(kind_of(t, "d/a"), Some((Modified, File)));
            assert!(actions(t, "d/a").contains(&Action::Written));
        },
    );
}
