//! `spfs-changes reset` end to end, as root on the real kernel. Each test makes a
//! runtime with `spfs-changes run` (its own private mount namespace, tmpfs runtime dir,
//! overlay over a host lower layer, tracker) in per-test temp dirs, so tests run in
//! parallel. A shell script inside the runtime makes changes, resets, and calls a
//! checker (this binary, started again with `RESET_TEST_HOOK`) that records, inside
//! the namespace, the ground truth of a walk of the upper dir, what the mount shows
//! and the upper dir's inodes, sizes, mtimes and bytes. The test then compares.

mod common;
mod reset_support;
#[path = "../../tests/support/mod.rs"]
mod support;

use common::{assert_one_line_error, cmd, file_type, net_kind, output, quote, s, text};
use reset_support::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use store::{Action, LogRecord, NetKind, Token};
use support::{LowerSpec, need_root};
use tracker::control::{Client, Request, Response};

/// Not a test: the checker that scripts start inside a runtime (see
/// `reset_support::hook`). Without `RESET_TEST_HOOK` it does nothing.
#[test]
fn reset_test_hook() {
    hook();
}

/// A reset step of a script: its name, script lines to run (and snapshot as
/// `pre.NAME`) before it, its arguments (`$M...` is the mount prefix, expanded by the
/// script), and what it must put back (path relative to the mount, and the kind
/// `reset` must say it was; none: `nothing to reset`).
struct Case {
    name: &'static str,
    setup: &'static str,
    args: Vec<String>,
    targets: &'static [(&'static str, &'static str)],
}

fn case(
    name: &'static str,
    args: &[&str],
    targets: &'static [(&'static str, &'static str)],
) -> Case {
    Case {
        name,
        setup: "",
        args: args.iter().map(|a| a.to_string()).collect(),
        targets,
    }
}

/// The script lines running `cases` one after the other.
fn steps(cases: &[Case]) -> String {
    let mut out = String::new();
    for c in cases {
        if !c.setup.is_empty() {
            out.push_str(&format!("{}\nsnap pre.{}\n", c.setup, c.name));
        }
        let args: Vec<String> = c
            .args
            .iter()
            .map(|a| match a.strip_prefix("$M") {
                Some(rest) => format!("\"$M\"{}", quote(rest)),
                None => quote(a),
            })
            .collect();
        out.push_str(&format!("step {} {}\n", c.name, args.join(" ")));
    }
    out
}

/// The arguments of `case` as the script passed them.
fn expanded(rt: &Runtime, case: &Case) -> Vec<String> {
    case.args
        .iter()
        .map(|a| match a.strip_prefix("$M") {
            Some(rest) => format!("{}{rest}", s(&rt.mnt)),
            None => a.clone(),
        })
        .collect()
}

/// Upper entries that a reset elsewhere must leave alone: everything but a dir's
/// mtime and size (removing a child changes those).
fn stable(tree: &Tree) -> Tree {
    tree.iter()
        .map(|(k, v)| {
            let mut v = v.clone();
            if v["type"] == "dir" {
                for f in ["mtime", "mtime_nsec", "size"] {
                    v[f] = serde_json::Value::Null;
                }
            }
            (k.clone(), v)
        })
        .collect()
}

/// Checks a reset that had nothing to do: `nothing to reset`, exit 0, and nothing
/// changed anywhere (not even a dir's mtime in the upper dir).
fn check_nothing(rt: &Runtime, prev: &Snap, step: &Step, case: &Case) {
    let ctx = format!("step {} (reset {:?})", step.name, case.args);
    assert_succeeded(step, &ctx);
    assert_eq!(
        step.out,
        format!(
            "nothing to reset: no change matches {}\n",
            expanded(rt, case).join(" ")
        ),
        "{ctx}: output"
    );
    assert!(step.since.is_empty(), "{ctx}: since: {:?}", step.since);
    assert_eq!(step.snap.net, prev.net, "{ctx}: net state");
    assert_net_is_truth(&step.snap, &ctx);
    assert_eq!(step.snap.upper, prev.upper, "{ctx}: upper dir");
    assert_eq!(step.snap.mount, prev.mount, "{ctx}: mount");
}

/// Checks one successful reset step against the snapshot before it: the output, the
/// since-answer (each put-back path has no kind now and its old kind as `before`), the
/// net state (the old one minus the targets, and the ground truth), what the mount
/// shows (the lower layer at the targets, unchanged elsewhere), and the upper dir
/// (targets gone, everything else byte- and inode-identical).
fn check_step(rt: &Runtime, prev: &Snap, step: &Step, case: &Case) {
    if case.targets.is_empty() {
        return check_nothing(rt, prev, step, case);
    }
    let ctx = format!("step {} (reset {:?})", step.name, case.args);
    assert_succeeded(step, &ctx);
    let want_out: Vec<String> = case
        .targets
        .iter()
        .map(|(p, was)| rt.reset_line(p, was))
        .collect();
    assert_eq!(
        step.out.lines().collect::<Vec<_>>(),
        want_out,
        "{ctx}: output"
    );
    let roots: Vec<&str> = case.targets.iter().map(|(p, _)| *p).collect();
    assert_were_changes(prev, case.targets, &ctx);

    // The reset is in the log: every path that was a change below the targets is
    // reported since the token as no change now, with its old kind; nothing else.
    let want_since: KindChanges = subtree(&prev.net, &roots)
        .into_iter()
        .map(|(p, (k, _))| (p, (None, Some(k))))
        .collect();
    let got_since: KindChanges = step
        .since
        .iter()
        .map(|(p, (k, b, _))| (p.clone(), (*k, *b)))
        .collect();
    assert_eq!(got_since, want_since, "{ctx}: changes --since the token");

    assert_net_is_truth(&step.snap, &ctx);
    assert_eq!(
        step.snap.net,
        without(&prev.net, &roots),
        "{ctx}: the net state must lose exactly the targets"
    );

    assert_mount_put_back(rt, prev, step, &roots, &ctx);
    assert!(
        subtree(&step.snap.upper, &roots).is_empty(),
        "{ctx}: targets left in the upper dir: {:?}",
        keys(&subtree(&step.snap.upper, &roots))
    );
    // With no targets left in it, the upper dir is the same without them.
    assert_upper_unchanged_elsewhere(prev, step, &roots, &ctx);
}

/// The step's reset exited 0 and said nothing on stderr.
fn assert_succeeded(step: &Step, ctx: &str) {
    assert_eq!(step.rc, 0, "{ctx}: exit code; stderr: {}", step.err);
    assert_eq!(step.err, "", "{ctx}: stderr");
}

/// Each of `targets` (path, the kind the reset names) was a change of that kind
/// before the step.
fn assert_were_changes(prev: &Snap, targets: &[(&str, &str)], ctx: &str) {
    for (p, was) in targets {
        assert_eq!(
            prev.net.get(*p).map(|(k, _)| *k),
            Some(net_kind(was)),
            "{ctx}: {p} was not a {was} change before"
        );
    }
}

/// After the step, the mount shows the lower layer at `roots` and, elsewhere, what it
/// showed before.
fn assert_mount_put_back(rt: &Runtime, prev: &Snap, step: &Step, roots: &[&str], ctx: &str) {
    let lower = rt.lower_view();
    let mount = view(&step.snap.mount);
    assert_eq!(
        subtree(&mount, roots),
        subtree(&lower, roots),
        "{ctx}: the mount must show the lower layer at the targets"
    );
    assert_eq!(
        without(&mount, roots),
        without(&view(&prev.mount), roots),
        "{ctx}: the mount must be unchanged elsewhere"
    );
}

/// Outside `roots`, the upper dir is as before the step (but for dirs' mtimes and
/// sizes, see [`stable`]).
fn assert_upper_unchanged_elsewhere(prev: &Snap, step: &Step, roots: &[&str], ctx: &str) {
    assert_eq!(
        stable(&without(&step.snap.upper, roots)),
        stable(&without(&prev.upper, roots)),
        "{ctx}: the upper dir must be unchanged but for the targets"
    );
}

/// Takes the step of `case` from the script's files and checks it against the
/// snapshot before it (see [`check_step`]).
fn checked_step(rt: &Runtime, prev: &Snap, case: &Case) -> Step {
    let step = rt.step(case.name);
    check_step(rt, prev, &step, case);
    step
}

/// Path -> (kind now, kind before), from a since-answer.
type KindChanges = BTreeMap<String, (Option<NetKind>, Option<NetKind>)>;

/// Asserts `ok` of the records of `path` in the kept changelog between `step`'s
/// tokens (before and after its reset), saying that `path` must be logged as a reset;
/// returns the two tokens.
fn assert_logged(
    store: &store::Store,
    step: &Step,
    path: &str,
    ok: impl FnOnce(&[LogRecord]) -> bool,
) -> (Token, Token) {
    let from: Token = step.token.parse().expect("a token");
    let to: Token = step.end_token.parse().expect("a token");
    let records = store.history(path.as_bytes()).expect("history");
    let during: Vec<LogRecord> = records
        .iter()
        .filter(|r| r.seq > from.seq && r.seq <= to.seq)
        .cloned()
        .collect();
    let brief: Vec<(u64, Action, Option<u32>)> = records
        .iter()
        .map(|r| (r.seq, r.action, r.origin.as_ref().map(|o| o.pid)))
        .collect();
    assert!(
        ok(&during),
        "step {}: {path} must be logged as a reset between {from} and {to}: (seq, action, pid) {brief:?}",
        step.name
    );
    (from, to)
}

/// A record of the reset: a `Reset` with the process that did it.
fn by_the_reset(r: &LogRecord) -> bool {
    r.action == Action::Reset && r.origin.is_some()
}

/// Every record of `path` in the kept changelog between `step`'s tokens (before and
/// after its reset) is a reset by the resetting process, and there is one, also below
/// a dir the reset removed.
fn assert_logged_as_reset(store: &store::Store, step: &Step, path: &str) {
    let (from, to) = assert_logged(store, step, path, |during| {
        !during.is_empty() && during.iter().all(by_the_reset)
    });
    assert_eq!(from.instance, to.instance, "step {}: a gap", step.name);
}

/// As [`assert_logged_as_reset`], for a path that was a whiteout put back through
/// the mount: overlayfs creates over a whiteout by renaming a new file from its work
/// dir, which the tracker records as a `Reclassified` with no process (see the
/// report of this change); every other record must be the reset's.
fn assert_logged_as_reset_over_whiteout(store: &store::Store, step: &Step, path: &str) {
    assert_logged(store, step, path, |during| {
        during.iter().any(by_the_reset)
            && during.iter().all(|r| {
                by_the_reset(r) || (r.action == Action::Reclassified && r.origin.is_none())
            })
    });
}

/// `(kind, type)` from `"kind type"`, as the CLI names them.
fn n(s: &str) -> (NetKind, store::FileType) {
    let (k, t) = s.split_once(' ').expect("`kind type`");
    (net_kind(k), file_type(t))
}

fn net(entries: &[(&str, &str)]) -> Net {
    entries
        .iter()
        .map(|(p, kt)| (p.to_string(), n(kt)))
        .collect()
}

/// Makes `changes` in a runtime over `lower`, checks that they gave `before`, runs
/// `cases` checking each, then checks that tracking goes on (`after.txt` added,
/// `keep.txt` modified after the last step) and that each reset is in the log.
fn run_cases(lower: &LowerSpec, changes: &str, before: Net, cases: &[Case]) {
    let started = Instant::now();
    let rt = Runtime::new(lower);
    let script = format!(
        "{changes}\nsnap s0\n{}\necho after > \"$M/after.txt\" && echo more >> \"$M/keep.txt\"\nsnap end\n",
        steps(cases)
    );
    let run = rt.run(&script);

    let s0 = rt.snap("s0");
    assert_eq!(s0.truth, before, "the changes made are not as intended");
    assert_net_is_truth(&s0, "before any reset");
    let mut prev = s0;
    let mut done = Vec::new();
    for case in cases {
        if !case.setup.is_empty() {
            prev = rt.snap(&format!("pre.{}", case.name));
            assert_net_is_truth(&prev, &format!("before step {}", case.name));
        }
        let step = checked_step(&rt, &prev, case);
        prev = step.snap.clone();
        done.push(step);
    }

    // Tracking goes on after the resets (the overlay was mounted again).
    let end = rt.snap("end");
    assert_net_is_truth(&end, "after the resets");
    let mut want = prev.net.clone();
    want.insert("after.txt".into(), n("added file"));
    want.insert("keep.txt".into(), n("modified file"));
    assert_eq!(end.net, want, "changes made after the resets");
    let printed = text(&run.stdout);
    let m = s(&rt.mnt);
    assert!(
        printed.contains(&format!("+{m}/after.txt\n"))
            && printed.contains(&format!("~{m}/keep.txt [content, size {{5=>10}}]\n")),
        "run's final listing: {printed}"
    );

    // Each reset is in the log as a reset.
    let store = rt.store();
    for step in &done {
        for p in step.since.keys().filter(|p| step.since[*p].0.is_none()) {
            assert_logged_as_reset(&store, step, p);
        }
    }
    eprintln!("{} steps in {:?}", cases.len(), started.elapsed());
}

/// A lower layer with `keep.txt`, for a test to add to ([`run_cases`] changes it).
fn keep_lower() -> LowerSpec {
    LowerSpec::new().file("keep.txt", "keep\n", 0o644)
}

/// [`keep_lower`] and `f.txt` ("orig\n").
fn keep_f_lower() -> LowerSpec {
    keep_lower().file("f.txt", "orig\n", 0o644)
}

/// Lower files and dirs to change in every way.
fn kinds_lower() -> LowerSpec {
    keep_lower()
        .file("mod.txt", "old\n", 0o644)
        .file("del.txt", "bye\n", 0o644)
        .file("opq/a", "a\n", 0o644)
        .file("opq/sub/c", "c\n", 0o600)
        .file("ren.txt", "ren\n", 0o644)
        .file("meta.txt", "meta\n", 0o644)
        .file("own.txt", "own\n", 0o640)
        .file("sub/x", "x\n", 0o644)
}

#[test]
fn reset_puts_each_kind_of_change_back() {
    if !need_root() {
        return;
    }
    let changes = r#"
        echo more >> "$M/mod.txt"
        rm "$M/del.txt"
        rm -rf "$M/opq" && mkdir "$M/opq" && echo n > "$M/opq/new"
        echo new > "$M/new.txt"
        mkdir -p "$M/newdir/deep" && echo f > "$M/newdir/f" && echo g > "$M/newdir/deep/g"
        mv "$M/ren.txt" "$M/ren2.txt"
        chmod 600 "$M/meta.txt"
        chown 1000:1000 "$M/own.txt"
        echo y >> "$M/sub/x"
    "#;
    let before = net(&[
        ("del.txt", "removed whiteout"),
        ("meta.txt", "metadata file"),
        ("mod.txt", "modified file"),
        ("new.txt", "added file"),
        ("newdir", "added dir"),
        ("newdir/deep", "added dir"),
        ("newdir/deep/g", "added file"),
        ("newdir/f", "added file"),
        ("opq", "replaced dir"),
        ("opq/new", "added file"),
        ("own.txt", "metadata file"),
        ("ren.txt", "removed whiteout"),
        ("ren2.txt", "added file"),
        ("sub/x", "modified file"),
    ]);
    let cases = [
        case("modified", &["/mod.txt"], &[("mod.txt", "modified")]),
        // With the mount prefix, as `/spfs/del.txt` would be.
        case("removed", &["$M/del.txt"], &[("del.txt", "removed")]),
        case("opaque", &["opq/"], &[("opq", "replaced")]),
        case("added-file", &["new.txt"], &[("new.txt", "added")]),
        case("added-tree", &["/newdir"], &[("newdir", "added")]),
        case(
            "renamed",
            &["ren.txt", "/ren2.txt"],
            &[("ren.txt", "removed"), ("ren2.txt", "added")],
        ),
        case(
            "metadata",
            &["/meta.txt", "own.txt"],
            &[("meta.txt", "metadata"), ("own.txt", "metadata")],
        ),
        case("in-subdir", &["$M/sub/x"], &[("sub/x", "modified")]),
    ];
    run_cases(&kinds_lower(), changes, before, &cases);
}

#[test]
fn reset_pattern_forms() {
    if !need_root() {
        return;
    }
    let lower = keep_lower()
        .file("conf", "0\n", 0o644)
        .file("conf.yaml", "1\n", 0o644)
        .file("sub/conf.json", "2\n", 0o644)
        .file("sub/deep/conf.ini", "3\n", 0o644)
        .file("sub/other.cfg", "4\n", 0o644)
        .file("other.txt", "5\n", 0o644)
        .file("dd/a", "6\n", 0o644)
        .file("dd/b", "7\n", 0o644)
        .file("ee/dd/c", "8\n", 0o644);
    let changes = r#"
        for f in conf conf.yaml sub/conf.json sub/deep/conf.ini sub/other.cfg other.txt dd/a ee/dd/c; do
            echo changed >> "$M/$f" || fail "change $f"
        done
        echo n > "$M/dd/new"
    "#;
    let before = net(&[
        ("conf", "modified file"),
        ("conf.yaml", "modified file"),
        ("dd/a", "modified file"),
        ("dd/new", "added file"),
        ("ee/dd/c", "modified file"),
        ("other.txt", "modified file"),
        ("sub/conf.json", "modified file"),
        ("sub/deep/conf.ini", "modified file"),
        ("sub/other.cfg", "modified file"),
    ]);
    let cases = [
        case("no-match", &["/no-such", "*.none"], &[]),
        // Anchored: `/conf.json` is at the top only, and `sub/conf.json` is not it.
        case("anchored-miss", &["/conf.json"], &[]),
        // `f.*` matches at any depth, and not `conf` itself.
        case(
            "glob",
            &["conf.*"],
            &[
                ("conf.yaml", "modified"),
                ("sub/conf.json", "modified"),
                ("sub/deep/conf.ini", "modified"),
            ],
        ),
        // `d/` matches the dir `dd` at any depth: what changed below it.
        case(
            "dir",
            &["dd/"],
            &[
                ("dd/a", "modified"),
                ("dd/new", "added"),
                ("ee/dd/c", "modified"),
            ],
        ),
        Case {
            setup: r#"echo t > "$M/top""#,
            // `*/` names the dirs and what is below them, never a file at the top.
            ..case("dirs-only", &["*/"], &[("sub/other.cfg", "modified")])
        },
        case(
            "star",
            &["*"],
            &[
                ("conf", "modified"),
                ("other.txt", "modified"),
                ("top", "added"),
            ],
        ),
        Case {
            setup: r#"echo z >> "$M/other.txt" && mkdir "$M/q" && echo q > "$M/q/q" && rm "$M/dd/b""#,
            ..case(
                "all",
                &["--all"],
                &[
                    ("dd/b", "removed"),
                    ("other.txt", "modified"),
                    ("q", "added"),
                ],
            )
        },
        Case {
            setup: r#"echo again >> "$M/conf""#,
            // The mount itself, as `/spfs` would be: everything.
            ..case("mount", &["$M"], &[("conf", "modified")])
        },
        Case {
            setup: r#"rm -rf "$M/dd""#,
            // A removed dir is a whiteout in the upper dir; `/dd/` still names it.
            ..case("removed-dir", &["/dd/"], &[("dd", "removed")])
        },
    ];
    run_cases(&lower, changes, before, &cases);
}

#[test]
fn reset_argument_errors_are_clear() {
    if !need_root() {
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let reset = |args: &[&str]| cmd(&[&["reset"], args, &["--state", s(tmp.path())]].concat());
    // No pattern and no --all: a usage error, before anything is touched.
    let out = output(reset(&[]));
    assert_ne!(out.status.code(), Some(0));
    let err = text(&out.stderr);
    assert!(
        err.contains("required") && err.contains("PATTERNS"),
        "no pattern: {err}"
    );
    let out = output(reset(&["--all", "x"]));
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("cannot be used with"),
        "--all with a pattern: {}",
        text(&out.stderr)
    );
    // No tracker: one clear line, exit 1.
    assert_one_line_error(&output(reset(&["x"])), "no tracker");
    // Not root: it asks the runtime's tracker to reset for it, and there is none.
    use std::os::unix::process::CommandExt;
    let out = output(reset(&["x"]).uid(65534).gid(65534));
    assert_one_line_error(&out, "no changelog");
}

/// Runs `body`, then `cleanup` also when `body` panicked (the panic goes on
/// afterwards); returns what `cleanup` returns.
fn with_cleanup<T>(body: impl FnOnce() + std::panic::UnwindSafe, cleanup: impl FnOnce() -> T) -> T {
    let result = std::panic::catch_unwind(body);
    let t = cleanup();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    t
}

/// The pids in a `... held by pid N (comm), pid M (comm)` message.
fn held_by(err: &str) -> Vec<(u32, String)> {
    let Some((_, list)) = err.split_once("held by ") else {
        return Vec::new();
    };
    list.trim()
        .split(", ")
        .filter_map(|h| {
            let h = h.strip_prefix("pid ")?;
            let (pid, comm) = h.split_once(' ')?;
            Some((pid.parse().ok()?, comm.trim_matches(['(', ')']).to_string()))
        })
        .collect()
}

/// Checks a reset that went through the mount because it was busy: exit 0, one line
/// per target saying so (the first naming the holders, which must include
/// `holders`), the mount showing the lower layer at the targets and nothing else
/// changed there, the upper dir unchanged but for the targets, and the net state
/// without the targets, except that dirs in `refilled` (put back with `mkdir` through
/// the mount, so opaque in the upper dir) stay `replaced` with what they hold `added`.
/// Each target that is no change any more is in the since-answer as a reset of its
/// old kind. Returns the holders named.
fn check_busy_step(
    rt: &Runtime,
    prev: &Snap,
    step: &Step,
    targets: &[(&str, &str)],
    refilled: &[&str],
    holders: &[(u32, &str)],
) -> Vec<(u32, String)> {
    let ctx = format!("busy step {}", step.name);
    assert_succeeded(step, &ctx);
    let lines: Vec<&str> = step.out.lines().collect();
    assert_eq!(lines.len(), targets.len(), "{ctx}: output {lines:?}");
    let first_suffix = format!(" through the mount: {} is busy (held by ", s(&rt.mnt));
    for (i, ((p, was), line)) in targets.iter().zip(&lines).enumerate() {
        let head = rt.reset_line(p, was);
        let rest = line
            .strip_prefix(&head)
            .unwrap_or_else(|| panic!("{ctx}: line {line:?} is not about {p}"));
        if i == 0 {
            assert!(
                rest.starts_with(&first_suffix) && rest.ends_with(')'),
                "{ctx}: first line {line:?}"
            );
        } else {
            assert_eq!(rest, " through the mount", "{ctx}: line {line:?}");
        }
    }
    assert_were_changes(prev, targets, &ctx);
    let named = held_by(lines[0]);
    for (pid, comm) in holders {
        assert!(
            named.contains(&(*pid, comm.to_string())),
            "{ctx}: holder {pid} ({comm}) is not named: {}",
            lines[0]
        );
    }

    let roots: Vec<&str> = targets.iter().map(|(p, _)| *p).collect();
    assert_mount_put_back(rt, prev, step, &roots, &ctx);
    assert_upper_unchanged_elsewhere(prev, step, &roots, &ctx);

    assert_net_is_truth(&step.snap, &ctx);
    let lower = rt.lower_view();
    let mut want = without(&prev.net, &roots);
    for d in refilled {
        want.insert(d.to_string(), n("replaced dir"));
        for (p, v) in subtree(&lower, &[d]) {
            if p != *d {
                let ty = if v["type"] == "dir" { "dir" } else { "file" };
                want.insert(p, n(&format!("added {ty}")));
            }
        }
    }
    assert_eq!(step.snap.net, want, "{ctx}: the net state after the reset");
    for (p, was) in targets.iter().filter(|(p, _)| !refilled.contains(p)) {
        assert_eq!(
            step.since.get(*p).map(|(k, b, _)| (*k, *b)),
            Some((None, Some(net_kind(was)))),
            "{ctx}: {p} in the since-answer"
        );
    }
    named
}

/// Waits (polling, up to 10 s) in a script until `$1` holds: shell lines for scripts.
const WAIT_FOR: &str = r#"
wait_for() {
    n=0
    until eval "$1"; do
        n=$((n+1)); [ $n -lt 500 ] || fail "timed out waiting for: $1"; sleep 0.02
    done
}
"#;

/// A process with its cwd in the mount and another holding a file of it open: the
/// reset goes through the mount, names both, and the holder's open file reads the
/// bytes put back (it is the same copied-up file). Once they are gone, a reset
/// unmounts again.
#[test]
fn a_busy_mount_is_reset_through_the_mount_and_its_holders_named() {
    if !need_root() {
        return;
    }
    let started = Instant::now();
    let lower = keep_f_lower().file("dir/a", "a\n", 0o644);
    let rt = Runtime::new(&lower);
    let script = format!(
        r#"{WAIT_FOR}
        echo changed >> "$M/f.txt"
        echo n > "$M/dir/new"
        rm "$M/keep.txt"
        snap before
        ( cd "$M/dir" && exec sleep 20 ) &
        cwd_pid=$!
        (
            exec 3< "$M/f.txt"
            : > "$T/fd.ready"
            wait_for '[ -e "$T/go" ]'
            cat <&3 > "$T/holder.read"
        ) &
        fd_pid=$!
        trap 'kill $cwd_pid $fd_pid 2>/dev/null' EXIT
        wait_for '[ -e "$T/fd.ready" ] && [ "$(readlink /proc/$cwd_pid/cwd)" = "$M/dir" ]'
        echo "$cwd_pid $fd_pid" > "$T/holders"
        step busy '*'
        : > "$T/go"
        wait $fd_pid
        kill $cwd_pid
        wait $cwd_pid
        # Both are reaped: their pids may be another process's from now on.
        trap - EXIT
        echo again >> "$M/f.txt"
        snap pre.free
        step free '*'
    "#
    );
    rt.run(&script);
    let holders = rt.read("holders");
    let (cwd_pid, fd_pid) = holders
        .trim()
        .split_once(' ')
        .map(|(a, b)| (a.parse::<u32>().unwrap(), b.parse::<u32>().unwrap()))
        .expect("holder pids");

    let before = rt.snap("before");
    assert_net_is_truth(&before, "before");
    assert_eq!(
        before.truth,
        net(&[
            ("dir/new", "added file"),
            ("f.txt", "modified file"),
            ("keep.txt", "removed whiteout"),
        ])
    );
    let busy = rt.step("busy");
    let named = check_busy_step(
        &rt,
        &before,
        &busy,
        &[
            ("dir/new", "added"),
            ("f.txt", "modified"),
            ("keep.txt", "removed"),
        ],
        &[],
        &[(cwd_pid, "sleep")],
    );
    assert!(
        named.iter().any(|(p, _)| *p == fd_pid),
        "the process holding a file open ({fd_pid}) is not named: {named:?}"
    );
    // Owner, mode and mtime are the lower's too: nothing is a change any more.
    assert!(busy.snap.net.is_empty(), "{:?}", busy.snap.net);
    assert_eq!(
        rt.read("holder.read"),
        "orig\n",
        "the holder's open file reads other bytes"
    );
    let store = rt.store();
    for p in ["dir/new", "f.txt"] {
        assert_logged_as_reset(&store, &busy, p);
    }
    assert_logged_as_reset_over_whiteout(&store, &busy, "keep.txt");

    // Once they are gone, a reset unmounts again.
    let pre_free = rt.snap("pre.free");
    let free = checked_step(
        &rt,
        &pre_free,
        &case("free", &["*"], &[("f.txt", "modified")]),
    );
    assert!(free.snap.truth.is_empty());
    eprintln!("took {:?}", started.elapsed());
}

/// A reset while one process holds the mount (see [`BusyCase::run`]).
struct BusyCase<'a> {
    lower: LowerSpec,
    /// Script lines making the changes, and what they must give.
    changes: &'a str,
    truth: Net,
    /// A shell command started in the background to hold the mount, and a shell
    /// condition on its pid (`$pid`) that is true once it does.
    holder: &'a str,
    held: &'a str,
    /// The step's arguments (as script words), what it must put back, the dirs it
    /// refills, and the holder's `comm`, which it must name (see [`check_busy_step`]).
    pattern: &'a str,
    targets: &'a [(&'a str, &'a str)],
    refilled: &'a [&'a str],
    comm: &'a str,
    /// Script lines after the step (`$pid` is still the holder's).
    after: &'a str,
}

impl BusyCase<'_> {
    /// Makes the changes in a runtime over `lower` (snapshot `before`), starts the
    /// holder, waits until it holds the mount, runs step `busy`, then `after`. Checks
    /// the changes and the step; returns the runtime, the snapshot before and the step.
    fn run(&self) -> (Runtime, Snap, Step) {
        let rt = Runtime::new(&self.lower);
        let (changes, holder, held, pattern, after) = (
            self.changes,
            self.holder,
            self.held,
            self.pattern,
            self.after,
        );
        rt.run(&format!(
            r#"{WAIT_FOR}
            {changes}
            snap before
            {holder} &
            pid=$!
            trap 'kill $pid 2>/dev/null' EXIT
            wait_for '{held}'
            echo $pid > "$T/pid"
            step busy {pattern}
            {after}
            "#
        ));
        let pid: u32 = rt.read("pid").trim().parse().expect("pid");
        let before = rt.snap("before");
        assert_eq!(before.truth, self.truth);
        let busy = rt.step("busy");
        check_busy_step(
            &rt,
            &before,
            &busy,
            self.targets,
            self.refilled,
            &[(pid, self.comm)],
        );
        (rt, before, busy)
    }
}

/// A program running from the mount cannot be rewritten (`ETXTBSY`): a new copy is
/// renamed over it, and the running program goes on.
#[test]
fn a_running_program_is_put_back_by_a_rename() {
    if !need_root() {
        return;
    }
    let started = Instant::now();
    let sleep = std::fs::read("/bin/sleep").expect("read /bin/sleep");
    let (rt, before, busy) = BusyCase {
        lower: keep_lower().file("bin/prog", &sleep, 0o755),
        changes: r#"printf 'trailing bytes' >> "$M/bin/prog""#,
        truth: net(&[("bin/prog", "modified file")]),
        holder: r#""$M/bin/prog" 20"#,
        held: r#"[ "$(readlink /proc/$pid/exe)" = "$M/bin/prog" ]"#,
        pattern: "/bin/prog",
        targets: &[("bin/prog", "modified")],
        refilled: &[],
        comm: "prog",
        after: r#"
            kill -0 $pid || fail "the program stopped"
            [ "$(readlink /proc/$pid/exe)" = "$M/bin/prog (deleted)" ] || fail "exe: $(readlink /proc/$pid/exe)"
        "#,
    }
    .run();
    assert!(busy.snap.net.is_empty(), "{:?}", busy.snap.net);
    assert_ne!(
        busy.snap.upper["bin/prog"]["ino"], before.upper["bin/prog"]["ino"],
        "a new file, renamed over the running one"
    );
    assert_eq!(
        keys(&subtree(&busy.snap.upper, &["bin"])),
        ["bin".to_string(), "bin/prog".to_string()].into(),
        "no temp file left"
    );
    let store = rt.store();
    assert_logged_as_reset(&store, &busy, "bin/prog");
    eprintln!("took {:?}", started.elapsed());
}

/// Held by a `sleep` with a file of the mount on a redirected fd: a replaced dir and
/// a removed dir are refilled, a removed file comes back, an added file goes, a
/// metadata change is undone, a symlink replaced by a file is a symlink again.
#[test]
fn a_busy_reset_refills_dirs_and_puts_files_back() {
    if !need_root() {
        return;
    }
    let started = Instant::now();
    let (rt, _, busy) = BusyCase {
        lower: kinds_lower()
            .file("rmd/a", "ra\n", 0o600)
            .file("rmd/deep/b", "rb\n", 0o644)
            .dir_mode("rmd/deep", 0o750)
            .owner("rmd/deep/b", 1000, 1001)
            .mtime("rmd/deep/b", 1_000_000_000, 5)
            .symlink("lnk", "keep.txt")
            .fifo("fifo"),
        changes: r#"
            rm "$M/del.txt"
            rm -rf "$M/opq" && mkdir "$M/opq" && echo n > "$M/opq/new" && mkdir "$M/opq/sub"
            rm -rf "$M/rmd"
            echo new > "$M/new.txt"
            chmod 600 "$M/meta.txt"
            chown 1000:1000 "$M/own.txt"
            rm "$M/lnk" && echo file > "$M/lnk"
            rm "$M/fifo"
        "#,
        truth: net(&[
            ("del.txt", "removed whiteout"),
            ("fifo", "removed whiteout"),
            ("lnk", "replaced file"),
            ("meta.txt", "metadata file"),
            ("new.txt", "added file"),
            ("opq", "replaced dir"),
            ("opq/new", "added file"),
            ("opq/sub", "added dir"),
            ("own.txt", "metadata file"),
            ("rmd", "removed whiteout"),
        ]),
        holder: r#"( exec sleep 20 3< "$M/keep.txt" )"#,
        held: r#"[ "$(readlink /proc/$pid/fd/3)" = "$M/keep.txt" ]"#,
        pattern: "'*'",
        targets: &[
            ("del.txt", "removed"),
            ("fifo", "removed"),
            ("lnk", "replaced"),
            ("meta.txt", "metadata"),
            ("new.txt", "added"),
            ("opq", "replaced"),
            ("own.txt", "metadata"),
            ("rmd", "removed"),
        ],
        refilled: &["opq", "rmd"],
        comm: "sleep",
        after: "",
    }
    .run();
    assert_eq!(view(&busy.snap.mount), rt.lower_view());
    let store = rt.store();
    for p in ["lnk", "meta.txt", "new.txt", "own.txt"] {
        assert_logged_as_reset(&store, &busy, p);
    }
    for p in ["del.txt", "fifo"] {
        assert_logged_as_reset_over_whiteout(&store, &busy, p);
    }
    eprintln!("took {:?}", started.elapsed());
}

#[test]
fn symlinks_planted_in_the_upper_dir_are_not_followed() {
    if !need_root() {
        return;
    }
    let started = Instant::now();
    let lower = keep_lower()
        .file("dir/x", "lower x\n", 0o644)
        .file("dir2/x", "lower x2\n", 0o644);
    let rt = Runtime::new(&lower);
    let outside = rt.dir().join("outside");
    std::fs::create_dir(&outside).expect("mkdir");
    std::fs::write(outside.join("victim"), "victim\n").expect("write");
    std::fs::write(outside.join("x"), "outside x\n").expect("write");
    let outside2 = rt.dir().join("outside2");
    std::fs::create_dir(&outside2).expect("mkdir");
    std::fs::write(outside2.join("x"), "outside2 x\n").expect("write");
    let script = r#"
        echo t > "$M/trigger"
        # Added symlinks (the lower has neither name), to a dir and to a file outside.
        ln -s "$T/outside" "$UPPER/evil"
        ln -s "$T/outside/victim" "$UPPER/evil2"
        # A symlink over a lower dir (replaced), pointing where a file of the same
        # name as the lower's child waits.
        ln -s "$T/outside" "$UPPER/dir"
        # A copied-up dir whose change is known, then swapped atomically with a
        # symlink: should the tracker still list dir2/x, a reset must not follow dir2.
        echo more >> "$M/dir2/x"
        ln -s "$T/outside2" "$UPPER/lnk"
        hook exchange "$UPPER/dir2" "$UPPER/lnk"
        # The mount may show stale dirs after edits under it: mount it again (by a
        # reset of something else) so that what it shows is the upper dir's.
        step remount /trigger
        snap s0
        step dir-only 'evil/'
        step nested '/dir2/x'
        step links /evil evil2 /dir
        step rest '*'
    "#;
    rt.run(script);
    let victims = |ctx: &str| {
        assert_eq!(
            std::fs::read_to_string(outside.join("victim"))
                .ok()
                .as_deref(),
            Some("victim\n"),
            "{ctx}: the victim outside the upper dir was touched"
        );
        assert_eq!(
            std::fs::read_to_string(outside.join("x")).ok().as_deref(),
            Some("outside x\n"),
            "{ctx}"
        );
        assert_eq!(
            std::fs::read_to_string(outside2.join("x")).ok().as_deref(),
            Some("outside2 x\n"),
            "{ctx}"
        );
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 2, "{ctx}");
        assert_eq!(std::fs::read_dir(&outside2).unwrap().count(), 1, "{ctx}");
    };
    victims("after the run");

    let remount = rt.step("remount");
    assert_eq!(
        (remount.rc, remount.out.as_str()),
        (
            0,
            format!("{}\n", rt.reset_line("trigger", "added")).as_str()
        ),
        "{}",
        remount.err
    );
    let s0 = rt.snap("s0");
    assert_net_is_truth(&s0, "with planted symlinks");
    assert_eq!(
        s0.truth,
        net(&[
            ("dir", "replaced symlink"),
            ("dir2", "replaced symlink"),
            ("evil", "added symlink"),
            ("evil2", "added symlink"),
            ("lnk", "added dir"),
            ("lnk/x", "added file"),
        ])
    );
    // `evil/` names dirs only: a symlink is not one.
    let dir_only = checked_step(&rt, &s0, &case("dir-only", &["evil/"], &[]));
    // The tracker does not list dir2/x (dir2 is a symlink now): nothing to do.
    let nested = checked_step(&rt, &dir_only.snap, &case("nested", &["/dir2/x"], &[]));
    let links = checked_step(
        &rt,
        &nested.snap,
        &case(
            "links",
            &["/evil", "evil2", "/dir"],
            &[("dir", "replaced"), ("evil", "added"), ("evil2", "added")],
        ),
    );
    let rest = checked_step(
        &rt,
        &links.snap,
        &case("rest", &["*"], &[("dir2", "replaced"), ("lnk", "added")]),
    );
    assert_eq!(view(&rest.snap.mount), rt.lower_view());
    victims("after the resets");
    eprintln!("took {:?}", started.elapsed());
}

#[test]
fn reset_from_outside_enters_the_runtime() {
    if !need_root() {
        return;
    }
    let started = Instant::now();
    let lower = keep_f_lower().file("gone", "gone\n", 0o644);
    let rt = Runtime::new(&lower);
    let script = r#"
        echo changed >> "$M/f.txt"
        echo new > "$M/added"
        rm "$M/gone"
        snap before
        : > "$T/ready"
        n=0
        until [ -e "$T/done" ]; do
            n=$((n+1)); [ $n -lt 400 ] || fail "the test never said done"; sleep 0.05
        done
        snap after
        echo later > "$M/later"
        snap end
    "#;
    let mut child = rt
        .command(script)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn run");
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !rt.dir().join("ready").exists() {
        if Instant::now() > deadline || child.try_wait().expect("try_wait").is_some() {
            let _ = std::fs::write(rt.dir().join("done"), "");
            let out = child.wait_with_output().expect("wait");
            panic!(
                "the runtime did not get ready: {}\n{}",
                text(&out.stdout),
                text(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let own_ns = std::fs::metadata("/proc/thread-self/ns/mnt").unwrap();
    let rt_ns = std::fs::metadata(format!("/proc/{pid}/ns/mnt")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_ne!(own_ns.ino(), rt_ns.ino(), "the test must be outside");
    let in_rt = |rel: &str| format!("/proc/{pid}/root{}/{rel}", s(&rt.mnt));
    assert_eq!(
        std::fs::read_to_string(in_rt("f.txt")).ok().as_deref(),
        Some("orig\nchanged\n")
    );
    let token = {
        let mut c = Client::connect(&rt.state.join("control.sock")).expect("connect");
        match c.call(&Request::Sync).expect("sync") {
            Response::Token(t) => t,
            other => panic!("{other:?}"),
        }
    };

    // By --state, from outside the runtime's namespace.
    let out = cmd(&["reset", "--state", s(&rt.state), "/f.txt", "added"])
        .output()
        .expect("spawn reset");
    let body = || {
        assert!(
            out.status.success(),
            "reset from outside: {}",
            text(&out.stderr)
        );
        assert_eq!(
            text(&out.stdout).lines().collect::<Vec<_>>(),
            [
                rt.reset_line("added", "added"),
                rt.reset_line("f.txt", "modified")
            ]
        );
        // By socket from the environment, with the mount prefix.
        let out = cmd(&["reset", &format!("{}/gone", s(&rt.mnt))])
            .env("SPFS_CHANGES_SOCKET", rt.state.join("control.sock"))
            .output()
            .expect("spawn reset");
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), rt.reset_line("gone", "removed") + "\n");

        // Read through the mount inside the namespace.
        assert_eq!(
            std::fs::read_to_string(in_rt("f.txt")).ok().as_deref(),
            Some("orig\n")
        );
        assert_eq!(
            std::fs::read_to_string(in_rt("gone")).ok().as_deref(),
            Some("gone\n")
        );
        assert!(!std::path::Path::new(&in_rt("added")).exists());
        assert!(
            std::path::Path::new(&in_rt("keep.txt")).exists(),
            "the overlay is mounted again"
        );

        // The tracker logged each as a reset, and its net state is empty.
        let mut c = Client::connect(&rt.state.join("control.sock")).expect("connect");
        for p in ["f.txt", "added", "gone"] {
            let Response::History(records) = c
                .call(&Request::History(p.as_bytes().to_vec()))
                .expect("history")
            else {
                panic!("not a history");
            };
            let after: Vec<Action> = records
                .iter()
                .filter(|r| r.seq > token.seq)
                .map(|r| r.action)
                .collect();
            assert!(
                !after.is_empty() && after.iter().all(|a| *a == Action::Reset),
                "{p}: {after:?}"
            );
        }
        let Response::Changes(set) = c
            .call(&Request::Changes(store::Query::default()))
            .expect("changes")
        else {
            panic!("not changes");
        };
        assert!(set.changes.is_empty(), "{:?}", set.changes);
    };
    let out = with_cleanup(body, || {
        std::fs::write(rt.dir().join("done"), "").expect("done");
        child.wait_with_output().expect("wait for run")
    });
    assert!(out.status.success(), "run: {}", text(&out.stderr));
    let before = rt.snap("before");
    assert_net_is_truth(&before, "before");
    assert_eq!(before.net.len(), 3);
    let after = rt.snap("after");
    assert_net_is_truth(&after, "after the resets from outside");
    assert!(after.net.is_empty(), "{:?}", after.net);
    assert_eq!(view(&after.mount), rt.lower_view());
    // Tracking goes on.
    let end = rt.snap("end");
    assert_eq!(end.net, net(&[("later", "added file")]));
    assert_eq!(
        text(&out.stdout),
        format!("+{}/later\n", s(&rt.mnt)),
        "run's final listing"
    );
    eprintln!("took {:?}", started.elapsed());
}

/// Another mount namespace that still mounts the overlay (here: a copy made by one
/// thread of a process whose main thread stays in the runtime, so `/proc/<pid>/`
/// shows the runtime's namespace): unmounting ours would leave that superblock alive
/// and mounting again would put a second overlay on the upper dir, so the reset goes
/// through the mount, which that copy shares.
#[test]
fn a_mount_in_a_threads_namespace_makes_the_reset_go_through_the_mount() {
    if !need_root() {
        return;
    }
    let started = Instant::now();
    let rt = Runtime::new(&keep_f_lower());
    let script = r#"
        echo changed >> "$M/f.txt"
        snap before
        RESET_TEST_HOOK=thread-ns RESET_TEST_ARG="$T/tns" \
            "$TEST_EXE" --exact "$HOOK_TEST" --nocapture --test-threads=1 >>"$T/hook.log" 2>&1 &
        hpid=$!
        n=0
        until [ -e "$T/tns.ready" ]; do
            n=$((n+1)); [ $n -lt 500 ] || fail "thread-ns helper did not start"; sleep 0.02
        done
        echo $hpid > "$T/tns.pid"
        step held /f.txt
        : > "$T/tns.done"
        wait $hpid
        echo changed again >> "$M/f.txt"
        snap again
        step free /f.txt
    "#;
    rt.run(script);
    let hpid: u32 = rt.read("tns.pid").trim().parse().expect("pid");
    let before = rt.snap("before");
    let held = rt.step("held");
    assert_eq!(held.rc, 0, "{}", held.err);
    let line = held.out.trim_end();
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(
        line.starts_with(&rt.reset_line("f.txt", "modified"))
            && line.contains(" through the mount: the overlay is also mounted at ")
            && line.contains(&format!("pid {hpid}")),
        "{line}"
    );
    assert_mount_put_back(&rt, &before, &held, &["f.txt"], "held");
    assert_net_is_truth(&held.snap, "after the reset through the mount");
    assert_eq!(held.snap.net, without(&before.net, &["f.txt"]));
    let again = rt.snap("again");
    checked_step(
        &rt,
        &again,
        &case("free", &["/f.txt"], &[("f.txt", "modified")]),
    );
    eprintln!("took {:?}", started.elapsed());
}

/// An unrelated overlay, mounted in a private namespace of one thread of some process
/// that holds a file open on it, is not this runtime's: the reset goes through.
#[test]
fn an_unrelated_overlay_held_in_a_threads_namespace_does_not_block() {
    if !need_root() {
        return;
    }
    let started = Instant::now();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        support::in_private_mount_ns(move || {
            let fx = support::Fixture::new(&LowerSpec::new().file("held", "h\n", 0o644));
            let f = std::fs::File::open(fx.mnt().join("held")).expect("open held");
            ready_tx.send(()).expect("ready");
            let _ = done_rx.recv_timeout(Duration::from_secs(30));
            drop(f);
        })
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the other overlay is up");
    let rt = Runtime::new(&keep_f_lower());
    let body = || {
        rt.run("echo changed >> \"$M/f.txt\"\nsnap before\nstep one /f.txt\n");
        let before = rt.snap("before");
        checked_step(
            &rt,
            &before,
            &case("one", &["/f.txt"], &[("f.txt", "modified")]),
        );
    };
    with_cleanup(body, || {
        let _ = done_tx.send(());
        holder.join().expect("holder thread");
    });
    eprintln!("took {:?}", started.elapsed());
}

/// The overlay's device number is free once the reset unmounted it, and the next
/// filesystem mounted anywhere may get it: a busy mounter elsewhere (here a thread of
/// this process mounting and unmounting a tmpfs in its own namespace) must not be
/// taken for the overlay still being mounted.
#[test]
fn a_mount_reusing_the_overlays_device_number_does_not_block() {
    if !need_root() {
        return;
    }
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mounts = Arc::new(AtomicU64::new(0));
    let churn = {
        let (stop, mounts) = (stop.clone(), mounts.clone());
        std::thread::spawn(move || {
            support::in_private_mount_ns(move || {
                let dir = tempfile::tempdir().expect("temp dir");
                let deadline = Instant::now() + Duration::from_secs(20);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    support::mount_tmpfs(dir.path(), None);
                    nix::mount::umount(dir.path()).expect("umount tmpfs");
                    mounts.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
    };
    let rt = Runtime::new(&keep_lower());
    let body = || {
        rt.run(
            r#"
            i=0
            bad=0
            while [ $i -lt 20 ]; do
                i=$((i+1))
                echo $i > "$M/f$i"
                spfs-changes reset "/f$i" > /dev/null 2>> "$T/errs" || bad=$((bad+1))
            done
            echo $bad > "$T/bad"
            snap end
            "#,
        );
    };
    with_cleanup(body, || {
        stop.store(true, Ordering::Relaxed);
        churn.join().expect("churn thread");
    });
    assert!(
        mounts.load(Ordering::Relaxed) > 0,
        "the churn never mounted"
    );
    assert_eq!(
        rt.read("bad").trim(),
        "0",
        "resets refused: {}",
        rt.read("errs")
    );
    let end = rt.snap("end");
    assert_net_is_truth(&end, "after 20 resets");
    assert!(end.net.is_empty(), "{:?}", end.net);
    eprintln!(
        "took {:?} ({} tmpfs mounts meanwhile)",
        started.elapsed(),
        mounts.load(Ordering::Relaxed)
    );
}

/// Mounting the overlay again makes the kernel drop a link of the shared whiteout
/// inode (in the work dir), a nameless link-count event on that inode. Logged on a
/// whiteout path of the upper dir (as happened before 1ea9c77), it made
/// `changes --since` list a removed path nothing touched, tagged `Reset` because the
/// reset's own process did the mount.
#[test]
fn a_reset_logs_nothing_on_untouched_whiteouts() {
    if !need_root() {
        return;
    }
    let lower = keep_lower()
        .file("mod.txt", "old\n", 0o644)
        .file("del.txt", "bye\n", 0o644);
    let rt = Runtime::new(&lower);
    rt.run("rm \"$M/del.txt\"\necho x >> \"$M/mod.txt\"\nstep one /mod.txt\n");
    let one = rt.step("one");
    assert_eq!(one.rc, 0, "{}", one.err);
    let store = rt.store();
    let from: Token = one.token.parse().expect("token");
    let touched: Vec<(u64, Action)> = store
        .history(b"del.txt")
        .expect("history")
        .iter()
        .filter(|r| r.seq > from.seq)
        .map(|r| (r.seq, r.action))
        .collect();
    assert_eq!(
        keys(&one.since).into_iter().collect::<Vec<_>>(),
        ["mod.txt"],
        "changes --since before the reset of /mod.txt: {:?}; del.txt logged after it: {touched:?}",
        one.since
    );
    assert!(touched.is_empty(), "del.txt logged: {touched:?}");
}

/// `rm -rf d; mkdir d; reset d/x` puts d/x back from the lower layer, through the
/// reset's safe path, and leaves the rest of the new d as it is; with every step in
/// one batch, and with a sync between steps.
#[test]
fn a_path_below_a_replaced_dir_is_put_back() {
    if !need_root() {
        return;
    }
    for one_batch in [true, false] {
        let rt = Runtime::new(&kinds_lower());
        let pause = if one_batch {
            ""
        } else {
            "spfs-changes mark pause >/dev/null"
        };
        let script = format!(
            r#"
            rm -rf "$M/opq"
            {pause}
            mkdir "$M/opq"
            {pause}
            echo n > "$M/opq/new"
            snap before
            step file /opq/a
            step nested /opq/sub/c
            rm -rf "$M/opq/sub" && echo mine > "$M/opq/sub"
            step blocked /opq/sub/c
            "#
        );
        let mut c = rt.command(&script);
        if one_batch {
            c.env(tracker::service::BATCH_AT_SYNCS_ENV, "1");
        }
        let out = c.output().expect("spawn run");
        assert!(out.status.success(), "{}", text(&out.stderr));
        let ctx = if one_batch {
            "one batch"
        } else {
            "a sync between steps"
        };
        let before = rt.snap("before");
        assert_eq!(
            before.net.get("opq").map(|(k, _)| *k),
            Some(net_kind("replaced")),
            "{ctx}"
        );
        let lower = rt.lower_view();
        let mut back = vec!["opq"];
        for (name, path) in [("file", "opq/a"), ("nested", "opq/sub/c")] {
            let step = rt.step(name);
            assert_eq!(step.rc, 0, "{ctx}: {}", step.err);
            assert_eq!(
                step.out.trim_end(),
                rt.reset_line(path, "hidden by a removed or replaced dir"),
                "{ctx}"
            );
            let mount = view(&step.snap.mount);
            assert_eq!(
                subtree(&mount, &[path]),
                subtree(&lower, &[path]),
                "{ctx}: {path} is back as the lower layer has it"
            );
            assert!(
                mount.contains_key("opq/new"),
                "{ctx}: the rest of opq stays"
            );
            assert_net_is_truth(&step.snap, ctx);
            back.push(path);
        }
        back.push("opq/sub");
        let last = view(&rt.step("nested").snap.mount);
        // A new file where a dir of the path was: putting the path back would take
        // the user's file away, so nothing is done.
        let blocked = rt.step("blocked");
        assert_eq!(
            (blocked.rc, blocked.out.trim_end()),
            (0, "nothing to reset: no change matches /opq/sub/c"),
            "{ctx}"
        );
        assert_eq!(
            view(&blocked.snap.mount)
                .get("opq/sub")
                .map(|v| v["type"].clone()),
            Some(serde_json::json!("file")),
            "{ctx}: the user's file stays"
        );
        let lower_opq = subtree(&lower, &["opq"]);
        let also_back: Vec<&String> = lower_opq
            .keys()
            .filter(|p| !back.contains(&p.as_str()) && last.contains_key(*p))
            .collect();
        assert!(
            also_back.is_empty(),
            "{ctx}: only what was asked for comes back: {also_back:?}"
        );
    }
}
