//! `spfs-changes` in real spfs runtimes (spfs 0.44: `spfs run`, `spfs-enter`,
//! spfs-monitor, rendered layers, masks), as root on the real kernel.
//!
//! Every test makes its own tagged layers (a `base` and a `top` that deletes
//! [`MASKS`] of it, so the stack has masks: whiteouts spfs writes into the upper dir at
//! every mount) and its own runtimes, driven script by script from the test. The
//! tracker's answer (`changes --json`) is checked against
//!
//! - the upper-walk truth: the runtime's upper dir walked against the lower layers the
//!   kernel mounted (exact kinds and types), and
//! - `spfs diff`, as `(sign, path)` after the normalisation documented at
//!   `spfs_support::spfs_model_of` (removed dirs expanded, spfs's detail-less dir
//!   lines dropped, owner/time-only changes invisible to spfs).
//!
//! The tests need `spfs` and `spfs-enter` on PATH (`install-real-spfs.sh
//! --modinfo-shim`, which `.ci/run` runs); without them they print `skipped: needs
//! spfs` (and fail under `CI=true`). Nothing waits a fixed time for the tracker: every
//! query is answered after the tracker's own sync.

mod common;
mod spfs_support;
#[path = "../../tests/support/mod.rs"]
mod support;

use common::{alive, wait_for};
use spfs_support::*;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::panic::{AssertUnwindSafe, catch_unwind};
use store::{FileType, NetKind};
use support::{SplitMix, expect};

/// Writes of every kind over `base+top`: a file of the base modified, files and dirs
/// added, a file and a dir removed, a dir replaced by a new one, a mode, an owner and a
/// time changed (spfs sees only the mode), a symlink retargeted, a masked path
/// recreated.
const WRITES: &str = r#"
set -e
cd /spfs
echo more >> etc/a
echo new > etc/new
mkdir -p newdir/deep && echo f > newdir/deep/f
rm keep/k1
rm -r etc/sub
rm -r mod && mkdir mod && echo 'm1 again' > mod/m1 && echo m9 > mod/m9
chmod 600 keep/k2
chown 1:1 keep/k3
touch -d @1000000000 keep/k4
ln -sfn etc/c link
echo again > etc/b
"#;

/// What [`WRITES`] leaves, against the rendered layers (the masks `d` and `keep/k5`
/// are removals spfs made when it mounted).
fn after_writes() -> support::Truth {
    expect([
        ("d", NetKind::Removed, FileType::Whiteout),
        ("etc/a", NetKind::Modified, FileType::File),
        ("etc/b", NetKind::Modified, FileType::File),
        ("etc/new", NetKind::Added, FileType::File),
        ("etc/sub", NetKind::Removed, FileType::Whiteout),
        ("keep/k1", NetKind::Removed, FileType::Whiteout),
        ("keep/k2", NetKind::Metadata, FileType::File),
        ("keep/k3", NetKind::Metadata, FileType::File),
        ("keep/k4", NetKind::Metadata, FileType::File),
        ("keep/k5", NetKind::Removed, FileType::Whiteout),
        ("link", NetKind::Modified, FileType::Symlink),
        ("mod", NetKind::Replaced, FileType::Dir),
        ("mod/m1", NetKind::Added, FileType::File),
        ("mod/m9", NetKind::Added, FileType::File),
        ("newdir", NetKind::Added, FileType::Dir),
        ("newdir/deep", NetKind::Added, FileType::Dir),
        ("newdir/deep/f", NetKind::Added, FileType::File),
    ])
}

/// `spfs changes track` inside, [`WRITES`], then `spfs changes changes --json` inside:
/// the upper-walk truth, the expected table and `spfs diff`.
fn track_inside_then_write(rt: &mut SpfsRuntime) {
    assert_eq!(
        rt.masks,
        MASKS.iter().map(|m| m.to_string()).collect(),
        "spfs wrote the stack's masks into the upper dir"
    );
    let tracker = rt.track_inside();
    assert!(alive(tracker), "the tracker runs");
    rt.run(WRITES);
    let doc = rt.assert_consistent("tracked from inside, after the writes");
    assert_eq!(net_state(&doc), after_writes(), "the writes' net state");
}

#[test]
fn attach_inside_with_spfs_changes_track() {
    if !need_spfs() {
        return;
    }
    let stack = Stack::new("attach_inside");
    let mut rt = SpfsRuntime::start(&["--edit", &stack.reference()]);
    track_inside_then_write(&mut rt);
    // `spfs changes` alone (spfs runs `spfs-changes` with no arguments) lists them.
    assert_eq!(rt.run("spfs changes"), rt.run("spfs changes changes"));
    // What spfs's model cannot see is printed with --all only: an owner and a time
    // changed.
    let l = rt.listings();
    for touched in [
        "~/spfs/keep/k3 [owner {0:0=>1:1}]",
        "~/spfs/keep/k4 [mtime]",
    ] {
        assert!(
            l.all.lines().any(|line| line == touched) && !l.ours.contains(touched),
            "{touched} with --all only:\n--- spfs changes\n{}\n--- --all\n{}",
            l.ours,
            l.all
        );
    }
    assert!(
        l.ours.contains("~/spfs/keep/k2 [mode {100644=>100600}]\n")
            && l.ours.contains("~/spfs/mod\n")
            && l.ours.contains("+/spfs/mod/m9\n")
            && l.ours
                .contains("~/spfs/etc/b [mode {020000=>100644}, content, size {0=>6}]\n"),
        "details as spfs diff gives them:\n{}",
        l.ours
    );
}

/// A query in a runtime no tracker watches starts one (a rescan of the upper dir),
/// says so once on stderr, and answers; the next query finds it running.
#[test]
fn a_query_with_no_tracker_starts_one() {
    if !need_spfs() {
        return;
    }
    let stack = Stack::new("auto_start");
    let mut rt = SpfsRuntime::start(&["--edit", &stack.reference()]);
    rt.run("echo new > /spfs/etc/new; rm /spfs/etc/a");
    let first = rt.exec("spfs changes");
    assert_eq!(first.rc, 0, "{}", first.stderr);
    assert!(
        first.stderr.contains("no tracker watched this runtime")
            && first.stderr.lines().count() == 1,
        "one line on stderr: {:?}",
        first.stderr
    );
    let second = rt.exec("spfs changes");
    assert_eq!((second.rc, second.stderr.as_str()), (0, ""));
    assert_eq!(first.stdout, second.stdout);
    assert!(first.stdout.contains("+/spfs/etc/new") && first.stdout.contains("-/spfs/etc/a"));
    rt.assert_changes_are_truth("after a query started the tracker");
}

#[test]
fn attach_from_outside_by_pid() {
    if !need_spfs() {
        return;
    }
    let stack = Stack::new("attach_by_pid");
    let mut rt = SpfsRuntime::start(&["--edit", &stack.reference()]);
    let printed = common::ok(common::cmd(&["track", "--pid", &rt.pid.to_string()]));
    let tracker = tracker_pid(&printed);
    assert!(alive(tracker), "the tracker runs");
    let state = rt.tracker_state();
    assert!(
        printed.contains(state.to_str().expect("UTF-8 state path")),
        "the tracker keeps the runtime's changelog at {} (named after SPFS_RUNTIME): {printed}",
        state.display()
    );

    rt.run(WRITES);
    // From outside, by the state dir; from inside, with no arguments.
    let outside = parse_json(
        &common::ok(common::cmd(&[
            "changes",
            "--json",
            "--state",
            state.to_str().expect("UTF-8 state path"),
        ])),
        "changes --json --state",
    );
    rt.assert_net_is_truth(&outside, "asked from outside");
    assert_eq!(net_state(&outside), after_writes());
    let inside = rt.changes();
    assert_eq!(
        net_state(&inside),
        net_state(&outside),
        "inside and outside answers"
    );
    let diff = rt.spfs_diff();
    rt.assert_matches_spfs_diff(&outside, &diff, "asked from outside");
}

/// From the host, `--runtime NAME` and `--pid PID` name a runtime for every command:
/// the first query starts its tracker (late, from a rescan), both then find the same
/// one, answer what `spfs diff` prints inside, and `list` shows it.
#[test]
fn name_a_runtime_from_the_host_by_name_or_pid() {
    if !need_spfs() {
        return;
    }
    let stack = Stack::new("by_name");
    let mut rt = SpfsRuntime::start(&["--edit", &stack.reference()]);
    rt.run(WRITES);
    let name = rt.name.clone();
    let pid = rt.pid.to_string();
    let first = common::output(common::cmd(&["changes", "--runtime", &name]));
    assert!(first.status.success(), "{}", common::text(&first.stderr));
    assert!(
        common::text(&first.stderr).contains("no tracker watched this runtime"),
        "says it started one: {}",
        common::text(&first.stderr)
    );
    let by_pid = common::ok(common::cmd(&["changes", "--pid", &pid]));
    let by_name = common::ok(common::cmd(&["changes", "--runtime", &name]));
    assert_eq!(common::text(&first.stdout), by_name);
    assert_eq!(by_pid, by_name, "--pid and --runtime name one runtime");
    let l = rt.listings();
    assert_eq!(
        by_name, l.spfs,
        "from the host, what spfs diff prints inside"
    );

    // Every command takes them: a mark from the host is seen inside.
    let token = common::ok(common::cmd(&["mark", "from-host", "--runtime", &name]));
    rt.run("echo later > /spfs/etc/later");
    let since = rt.run("spfs changes --since from-host");
    assert_eq!(
        since, "~/spfs/etc\n+/spfs/etc/later\n",
        "after mark {token}"
    );
    let history = common::ok(common::cmd(&["history", "/spfs/etc/later", "--pid", &pid]));
    assert!(history.contains("created"), "{history}");

    let listed = parse_json(&common::ok(common::cmd(&["list", "--json"])), "list --json");
    let entry = listed
        .as_array()
        .and_then(|a| a.iter().find(|e| e["name"] == name.as_str()))
        .unwrap_or_else(|| panic!("{name} in list: {listed}"));
    assert_eq!(entry["live"], true, "{entry}");
    assert_eq!(entry["mount"], "/spfs", "{entry}");
    assert!(entry["changed"].as_u64().is_some_and(|n| n > 10), "{entry}");
    assert_eq!(
        entry["state"],
        rt.tracker_state().to_str().expect("UTF-8"),
        "{entry}"
    );

    let unknown = common::output(common::cmd(&["changes", "--runtime", "no-such-runtime"]));
    assert_eq!(unknown.status.code(), Some(1));
    let err = common::text(&unknown.stderr);
    assert!(
        err.lines().count() == 1 && err.contains("no spfs runtime named no-such-runtime"),
        "{err}"
    );
}

/// Seeds of the random operations; each runs [`RANDOM_OPS`] operations in a runtime of
/// its own, checked halfway and at the end.
const SEEDS: [u64; 5] = [1, 2, 3, 0x5eed, 0xdead_beef];
const RANDOM_OPS: usize = 200;

#[test]
fn random_operations_over_a_stack_with_masks() {
    if !need_spfs() {
        return;
    }
    let stack = Stack::new("random_ops");
    for seed in SEEDS {
        let mut rng = SplitMix(seed);
        let halves = [
            random_ops(&mut rng, RANDOM_OPS / 2),
            random_ops(&mut rng, RANDOM_OPS / 2),
        ];
        let _report = SeedReport {
            seed,
            script: halves.join("\n"),
        };
        let mut rt = stack.tracked_runtime();
        for (i, ops) in halves.iter().enumerate() {
            rt.run(ops);
            rt.assert_consistent(&format!(
                "seed {seed}, after {} operations",
                (i + 1) * RANDOM_OPS / 2
            ));
        }
    }
}

/// Removing a lower file and making something in its place (overlayfs moves a whiteout
/// in, then exchanges it for the new entry), again and again, each time by another
/// process: every deletion and creation is in the path's history with its writer,
/// whichever batches the events fall into.
#[test]
fn every_removal_and_remaking_of_a_lower_path_is_in_its_history() {
    if !need_spfs() {
        return;
    }
    let stack = Stack::new("remake");
    let mut rt = stack.tracked_runtime();
    let rounds = [
        "perl -e 'unlink q(/spfs/etc/a) or die; symlink(q(t1), q(/spfs/etc/a)) or die'",
        "perl -e 'unlink q(/spfs/etc/a) or die; symlink(q(t2), q(/spfs/etc/a)) or die'",
        "perl -e 'unlink q(/spfs/etc/a) or die; symlink(q(t2), q(/spfs/etc/a)) or die'",
        "perl -e 'unlink q(/spfs/etc/a) or die; mkdir(q(/spfs/etc/a)) or die'",
        "perl -e 'rmdir q(/spfs/etc/a) or die; open(my $f, q(>), q(/spfs/etc/a)) or die'",
    ];
    rt.run(&rounds.join("\n"));
    let history = rt.run("spfs changes history /spfs/etc/a");
    let mut actions = Vec::new();
    let mut pids = Vec::new();
    for line in history.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let pid = words.iter().position(|w| *w == "pid").map(|i| words[i + 1]);
        // A writer gone before the connector's message of its exec is read has its
        // pid only; it is never named as another process.
        let command = pid.and_then(|p| line.split_once(&format!("pid {p} ")).map(|(_, c)| c));
        assert!(
            pid.is_some()
                && command.is_none_or(|c| c.trim().is_empty() || c.starts_with("perl -e")),
            "every change of etc/a has its writer: {line:?} in\n{history}"
        );
        actions.push(words[1].to_string());
        pids.push(pid.unwrap_or_default().to_string());
    }
    let want: Vec<&str> = ["deleted", "created"].repeat(rounds.len());
    assert_eq!(
        actions, want,
        "each round deleted etc/a and made it again, in order:\n{history}"
    );
    for (round, pair) in pids.chunks(2).enumerate() {
        assert!(
            pair[0] == pair[1] && pids.iter().filter(|p| **p == pair[0]).count() == 2,
            "round {round}'s deletion and creation are its own process's:\n{history}"
        );
    }
    rt.assert_consistent("after the rounds");
}

/// `spfs changes --since MARK` prints what `spfs diff` prints between the mount as it
/// was at the mark and now: the ground truth is a copy of `/spfs` taken at the mark,
/// committed with `spfs commit --path` and given to `spfs diff` as its base. Random
/// operations before the mark (so that many paths were changes then) and after it.
#[test]
fn since_a_mark_prints_what_spfs_diff_prints_against_the_mount_at_the_mark() {
    if !need_spfs() {
        return;
    }
    let stack = Stack::new("random_since");
    for seed in SEEDS {
        let mut rng = SplitMix(seed ^ 0x0051_41c3);
        let halves = [
            random_ops(&mut rng, RANDOM_OPS / 2),
            random_ops(&mut rng, RANDOM_OPS / 2),
        ];
        let _report = SeedReport {
            seed,
            script: halves.join("\n# mark\n"),
        };
        let mut rt = stack.tracked_runtime();
        rt.run(&halves[0]);
        let copy = rt.scratch().join("at-mark");
        let tag = unique("at-mark");
        rt.run(&format!(
            "spfs changes mark m && mkdir {copy} && cp -a /spfs/. {copy}/ && \
             spfs commit --path {copy} -t {tag} >&2",
            copy = copy.display()
        ));
        rt.run(&halves[1]);
        let out = rt.run(&format!(
            "spfs changes --since m; echo '@@ spfs diff'; spfs diff {tag} 2>/dev/null"
        ));
        let (ours, spfs) = out
            .split_once("@@ spfs diff\n")
            .unwrap_or_else(|| panic!("both listings, got:\n{out}"));
        assert!(
            ours == spfs,
            "seed {seed}: `spfs changes --since m` differs from `spfs diff` against the \
             mount at the mark\n{}",
            line_diff(spfs, ours)
        );
        eprintln!("seed {seed}: {} lines agree", ours.lines().count());
    }
}

/// How a test prepares `etc/` of `base+top` (where `etc/b` is masked) and resets it.
struct ResetCase {
    name: &'static str,
    setup: &'static str,
    reset: &'static str,
    /// Paths the reset must put back (none of them may show in `spfs diff` after).
    put_back: &'static [&'static str],
}

const RESET_CASES: [ResetCase; 5] = [
    ResetCase {
        name: "a dir pattern",
        setup: "echo more >> /spfs/etc/a",
        reset: "/etc/",
        put_back: &["etc/a"],
    },
    ResetCase {
        name: "everything by pattern",
        setup: "echo more >> /spfs/etc/a",
        reset: "'*'",
        put_back: &["etc/a"],
    },
    ResetCase {
        name: "--all",
        setup: "echo more >> /spfs/etc/a",
        reset: "--all",
        put_back: &["etc/a"],
    },
    ResetCase {
        name: "one path",
        setup: "echo more >> /spfs/etc/a",
        reset: "/etc/a",
        put_back: &["etc/a"],
    },
    ResetCase {
        name: "the masked path recreated, then reset",
        setup: "echo x > /spfs/etc/b",
        reset: "/etc/b",
        put_back: &[],
    },
];

fn reset_keeps_the_mask(stack: &Stack, case: &ResetCase) {
    let context = format!("reset {} ({})", case.reset, case.name);
    let mut rt = stack.tracked_runtime();
    rt.run(case.setup);
    rt.run(&format!("spfs changes reset {}", case.reset));

    let listed = rt.run("ls -a /spfs/etc");
    assert!(
        !listed.lines().any(|l| l == "b"),
        "{context}: the masked etc/b shows in /spfs/etc:\n{listed}"
    );
    let upper_b = rt.upper().join("etc/b");
    let m = std::fs::symlink_metadata(&upper_b)
        .unwrap_or_else(|e| panic!("{context}: the mask etc/b is gone from the upper dir: {e}"));
    assert!(
        m.file_type().is_char_device() && m.rdev() == 0,
        "{context}: the upper dir's etc/b is no whiteout any more:\n{}",
        rt.describe_upper()
    );
    let diff = rt.spfs_diff();
    assert!(
        diff.lines().any(|l| l == "-/spfs/etc/b"),
        "{context}: spfs diff does not list the mask:\n{diff}"
    );
    assert!(
        !diff.lines().any(|l| l.starts_with("~/spfs/etc/b")),
        "{context}: spfs diff sees something at the masked etc/b:\n{diff}"
    );
    for p in case.put_back {
        assert!(
            !diff_mentions(&diff, p),
            "{context}: {p} was not put back:\n{diff}"
        );
    }
    rt.assert_changes_are_truth(&context);

    // The environment's mask is no violation of spk's rules.
    rt.run("echo installed > /spfs/etc/installed");
    let validated = rt.exec("spfs changes validate");
    assert!(
        !validated.stdout.contains("etc/b") && !validated.stderr.contains("etc/b"),
        "{context}: validate reports the mask:\n{}{}",
        validated.stdout,
        validated.stderr
    );
    assert_eq!(
        validated.rc, 0,
        "{context}: validate (defaults) after a new file only:\n{}{}",
        validated.stdout, validated.stderr
    );
}

#[test]
fn masks_survive_every_form_of_reset() {
    if !need_spfs() {
        return;
    }
    let stack = Stack::new("masks_survive_reset");
    let failed: Vec<String> = RESET_CASES
        .iter()
        .filter_map(|case| {
            catch_unwind(AssertUnwindSafe(|| reset_keeps_the_mask(&stack, case)))
                .err()
                .map(|e| {
                    let why = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    format!("reset {} ({}): {why}", case.reset, case.name)
                })
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} reset forms failed:\n\n{}",
        failed.len(),
        RESET_CASES.len(),
        failed.join("\n\n")
    );
}

/// Paths [`CHANGE_FOR_COMMIT`] changes that the commit puts into a layer.
const COMMITTED: [&str; 4] = ["etc/a", "etc/new", "newdir", "newdir/f"];
const CHANGE_FOR_COMMIT: &str = r#"
set -e
echo more >> /spfs/etc/a
echo new > /spfs/etc/new
mkdir /spfs/newdir && echo f > /spfs/newdir/f
rm /spfs/keep/k1
chmod 600 /spfs/mod/m2
"#;

#[test]
fn spfs_commit_and_spfs_reset_are_seen_at_once() {
    if !need_spfs() {
        return;
    }
    let stack = Stack::new("commit_and_reset");

    // `spfs commit layer`: the runtime is remounted over one more layer, holding what
    // was committed; asked right after, nothing committed is added or modified.
    let mut rt = stack.tracked_runtime();
    rt.run(CHANGE_FOR_COMMIT);
    let layers = rt.overlay().lowers.len();
    let tag = format!("spfs-changes-tests/{}/committed", unique("commit"));
    let net = rt.assert_truth_right_after(
        &format!("spfs commit layer -t {}", common::quote(&tag)),
        "right after spfs commit (against the new layers)",
    );
    assert_eq!(
        rt.overlay().lowers.len(),
        layers + 1,
        "the commit remounted over the new layer: {}",
        rt.overlay().line
    );
    for p in COMMITTED {
        let kind = net.get(p.as_bytes()).map(|(k, _)| *k);
        assert!(
            !matches!(kind, Some(NetKind::Added | NetKind::Modified)),
            "{p} was committed, yet the tracker says {kind:?}"
        );
    }
    drop(rt);

    // `spfs reset PATH`: spfs deletes from the live upper dir and remounts.
    let mut rt = stack.tracked_runtime();
    rt.run("echo more >> /spfs/etc/a && echo n > /spfs/etc/new && rm /spfs/keep/k1");
    let net = rt.assert_truth_right_after(
        "spfs reset /spfs/etc/a",
        "right after spfs reset /spfs/etc/a",
    );
    assert!(
        !net.contains_key(b"etc/a".as_slice()),
        "spfs reset put etc/a back"
    );
    assert!(net.contains_key(b"etc/new".as_slice()));
}

#[test]
fn reset_while_the_mount_is_busy() {
    if !need_spfs() {
        return;
    }
    let stack = Stack::new("busy_reset");
    let mut rt = stack.tracked_runtime();
    rt.run("set -e; echo more >> /spfs/etc/a; echo more >> /spfs/etc/c; echo >> /spfs/bin/sleeper");
    // Three holders of the mount: a cwd, an open file, a running program of /spfs (the
    // modified copy in the upper dir).
    let pid = |out: String| -> u32 {
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("no pid: {out:?}"))
    };
    let cwd = pid(rt.run("(cd /spfs/etc && exec sleep 1000) >/dev/null 2>&1 & echo $!"));
    let open = pid(rt.run("(exec 3</spfs/etc/a; exec sleep 1000) >/dev/null 2>&1 & echo $!"));
    let prog = pid(rt.run("/spfs/bin/sleeper 1000 >/dev/null 2>&1 & echo $!"));
    let link = |p: String| std::fs::read_link(&p).map(|l| l.display().to_string());
    assert!(
        wait_for(std::time::Duration::from_secs(5), || {
            link(format!("/proc/{cwd}/cwd")).is_ok_and(|l| l == "/spfs/etc")
                && link(format!("/proc/{open}/fd/3")).is_ok_and(|l| l == "/spfs/etc/a")
                && link(format!("/proc/{prog}/exe")).is_ok_and(|l| l == "/spfs/bin/sleeper")
        }),
        "the holders hold /spfs"
    );

    let reset = rt.exec("spfs changes reset /etc/a /etc/c /bin/sleeper");
    let said = format!("{}{}", reset.stdout, reset.stderr);
    assert_eq!(reset.rc, 0, "reset of a busy mount failed:\n{said}");
    assert!(
        said.contains("through the mount"),
        "the reset does not say it put the paths back through the mount:\n{said}"
    );
    let diff = rt.spfs_diff();
    for p in ["etc/a", "etc/c", "bin/sleeper"] {
        assert!(!diff_mentions(&diff, p), "{p} was not put back:\n{diff}");
    }
    rt.assert_changes_are_truth("after the busy reset");
    for holder in [cwd, open, prog] {
        assert!(alive(holder), "holder {holder} survived the reset");
    }
}

const FIRST_RUN: &str =
    "set -e; echo one > /spfs/etc/one; echo more >> /spfs/etc/a; rm /spfs/keep/k1";
const SECOND_RUN: &str =
    "set -e; echo two > /spfs/etc/two; echo more >> /spfs/etc/c; rm /spfs/keep/k2";

#[test]
fn durable_runtime_run_twice() {
    if !need_spfs() {
        return;
    }
    let stack = Stack::new("durable");
    // Dropped last: removes the runtime from the repository, also on failure.
    let mut durable = DurableRuntime::new("durable");
    let name = durable.name.clone();
    let name = name.as_str();

    let mut first = SpfsRuntime::start(&[
        "--keep-runtime",
        "--runtime-name",
        name,
        "--edit",
        &stack.reference(),
    ]);
    first.keep_tracker_state = true;
    assert_eq!(first.name, name);
    let upper = first.overlay().upper;
    assert!(
        upper.contains("durable_edits"),
        "a durable runtime's upper dir is on disk: {upper}"
    );
    first.track_inside();
    first.run(FIRST_RUN);
    first.assert_changes_are_truth("first run");
    first.end();

    let mut second = SpfsRuntime::start(&["--rerun", name]);
    second.keep_tracker_state = true;
    assert_eq!(second.overlay().upper, upper, "the same upper dir again");
    second.track_inside();
    second.run(SECOND_RUN);
    let net = second.assert_changes_are_truth("second run");
    for p in ["etc/one", "etc/a", "keep/k1", "etc/two", "etc/c", "keep/k2"] {
        assert!(
            net.contains_key(p.as_bytes()),
            "{p} missing from the second run's answer"
        );
    }
    // The rerun continues the same runtime, so its changelog continues too: the
    // first run's creation of etc/one is still on record (a new changelog would only
    // know it from its rescan, as `reclassified`).
    let history = second.run("spfs changes history /spfs/etc/one");
    assert!(
        history.contains(" created ") && history.contains("/spfs/etc/one"),
        "the first run's history is kept by the rerun: {history}"
    );
    // The upper dir is on a filesystem shared with the host: status says so, naming
    // the dir as the runtime names it.
    let status: serde_json::Value =
        serde_json::from_str(&second.run("spfs changes status --json")).expect("status JSON");
    let degraded = status["degraded"].to_string();
    assert!(
        degraded.contains("shares its filesystem")
            && degraded.contains("durable_edits")
            && !degraded.contains("/proc/"),
        "{degraded}"
    );
    second.end();
    assert!(durable.remove(), "spfs runtime remove {name}");
}

#[test]
fn a_new_runtime_with_a_reused_name_starts_a_changelog_of_its_own() {
    if !need_spfs() {
        return;
    }
    let stack = Stack::new("reused_name");
    let name = unique("reused");
    let args = [
        "--runtime-name",
        name.as_str(),
        "--edit",
        &stack.reference(),
    ];
    let mut first = SpfsRuntime::start(&args);
    first.keep_tracker_state = true;
    first.track_inside();
    first.run("echo old > /spfs/etc/from-the-first; spfs changes mark first-mark");
    first.end();

    let mut second = SpfsRuntime::start(&args);
    second.keep_tracker_state = true;
    second.track_inside();
    second.run("echo new > /spfs/etc/from-the-second");
    let net = second.assert_changes_are_truth("the second runtime of that name");
    assert!(!net.contains_key(b"etc/from-the-first".as_slice()));
    let history = second.run("spfs changes history /spfs/etc/from-the-first");
    assert_eq!(history, "", "no history of another runtime");
    let since = second.run("spfs changes changes --since first-mark 2>&1 || true");
    assert!(
        since.contains("no mark named"),
        "the first runtime's marks are not this one's: {since}"
    );
    let state = second.tracker_state();
    second.end();
    let kept_aside = std::fs::read_dir(&state)
        .map(|d| {
            d.filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().contains(".earlier-"))
        })
        .unwrap_or(false);
    assert!(
        kept_aside,
        "the earlier changelog is set aside, not deleted"
    );
    let _ = std::fs::remove_dir_all(&state);
}

/// The two ways spfs hands the overlay its layers.
const MOUNT_FORMS: [(&str, LowerForm); 2] = [
    ("modinfo answers (the installed shim)", LowerForm::Append),
    ("modinfo fails", LowerForm::Colon),
];

#[test]
fn both_mount_forms() {
    if !need_spfs() {
        return;
    }
    let stack = Stack::new("mount_forms");
    for (name, form) in MOUNT_FORMS {
        let reference = stack.reference();
        let args = ["--edit", reference.as_str()];
        let mut rt = match form {
            LowerForm::Append => SpfsRuntime::start(&args),
            LowerForm::Colon => SpfsRuntime::start_without_modinfo(&args),
        };
        let overlay = rt.overlay();
        assert_eq!(overlay.form, form, "{name}: {}", overlay.line);
        let inside = rt.run("grep ' /spfs ' /proc/self/mountinfo");
        assert_eq!(
            spfs_overlay(&inside).map(|o| o.form),
            Some(form),
            "{name}: inside, {inside}"
        );

        track_inside_then_write(&mut rt);

        rt.run("spfs changes reset /etc/a /newdir/");
        assert_eq!(
            rt.overlay().form,
            form,
            "{name}: the reset mounted the overlay again in another form: {}",
            rt.overlay().line
        );
        let doc = rt.assert_consistent(&format!("{name}: after reset /etc/a /newdir/"));
        let net = net_state(&doc);
        for p in ["etc/a", "newdir", "newdir/deep", "newdir/deep/f"] {
            assert!(!net.contains_key(p.as_bytes()), "{name}: {p} was not reset");
        }
    }
}
