//! Faults injected for real, as root on the real kernel: signals to a running tracker
//! and to `run`, damaged and full state, a reused state key, other users. Each test
//! checks what survives and what the user is told against a walk of the upper dir.

mod common;
#[path = "../../tests/support/mod.rs"]
mod support;
mod track_support;

use common::{cmd, ok, output, s, text};
use std::path::Path;
use std::time::Duration;
use support::{LowerSpec, need_root};
use track_support::*;

fn temp() -> tempfile::TempDir {
    temp_dir("faults")
}

/// A runtime over `lower()` in `root`, tracked with its changelog in `root/state`: the
/// runtime, the state dir, the guard of its trackers and the tracker's pid.
fn tracked_runtime(root: &Path) -> (FakeRuntime, std::path::PathBuf, Trackers, u32) {
    let rt = FakeRuntime::start(root, &lower());
    let state = root.join("state");
    let mut trackers = Trackers::new(&state);
    let tracker = trackers.track_runtime(&rt);
    (rt, state, trackers, tracker)
}

/// `spfs-changes stop --state STATE`, then waits for the tracker to be gone.
fn stop_and_wait(state: &Path, tracker: u32) {
    ok(cmd(&["stop", "--state", s(state)]));
    assert!(
        wait_gone(tracker, Duration::from_secs(20)).is_some(),
        "the tracker did not stop"
    );
}

fn lower() -> LowerSpec {
    LowerSpec::new()
        .file("keep.txt", "keep\n", 0o644)
        .file("log.txt", "0\n", 0o644)
        .dir("sub")
}

/// A storm of creates, appends to a lower file, renames and removes, started in the
/// background inside the runtime. Each step touches only its own names, so what a
/// finished step leaves stays: `$T/progress` holds the number of steps finished, and
/// `$T/storm.done` appears at the end.
const STORM: &str = "( i=0; while [ $i -lt 1500 ]; do echo $i > \"$M/sub/f$i\"; echo $i >> \"$M/log.txt\"; \
     if [ $((i % 5)) -eq 4 ]; then echo $i > \"$M/sub/t$i\"; mv \"$M/sub/t$i\" \"$M/sub/g$i\"; \
     echo $i > \"$M/sub/r$i\"; rm \"$M/sub/r$i\"; fi; \
     i=$((i+1)); echo $i > \"$T/progress.new\"; mv \"$T/progress.new\" \"$T/progress\"; done; \
     touch \"$T/storm.done\" ) >/dev/null 2>&1 &";

/// Where two net states differ, briefly (a storm's states are long).
fn differences(got: &support::Truth, truth: &support::Truth) -> String {
    let mut lines: Vec<String> = truth
        .iter()
        .filter(|(p, e)| got.get(*p) != Some(e))
        .map(|(p, e)| {
            format!(
                "  truth has {}={e:?}, kept {:?}",
                String::from_utf8_lossy(p),
                got.get(p)
            )
        })
        .chain(
            got.iter()
                .filter(|(p, _)| !truth.contains_key(*p))
                .map(|(p, e)| {
                    format!(
                        "  kept has {}={e:?}, truth nothing",
                        String::from_utf8_lossy(p)
                    )
                }),
        )
        .collect();
    let n = lines.len();
    lines.truncate(10);
    format!(
        "{n} paths differ ({} kept, {} in truth):\n{}",
        got.len(),
        truth.len(),
        lines.join("\n")
    )
}

#[test]
fn sigterm_during_a_write_storm_keeps_every_change_made_before_it_and_says_where_it_ends() {
    if !need_root() {
        return;
    }
    // The signal lands at a different point of the storm each round.
    for (round, delay_ms) in [0u64, 15, 40, 90, 200].into_iter().enumerate() {
        let tmp = temp();
        let (mut rt, state, mut trackers, tracker) = tracked_runtime(tmp.path());
        rt.run(STORM);
        std::thread::sleep(Duration::from_millis(delay_ms));
        // Every step counted here was done before the signal.
        let done_before: u32 = std::fs::read_to_string(tmp.path().join("progress"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(tracker as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM to the tracker");
        assert!(
            wait_gone(tracker, Duration::from_secs(20)).is_some(),
            "round {round}: the tracker did not stop on SIGTERM"
        );
        assert!(
            common::wait_for(Duration::from_secs(60), || tmp
                .path()
                .join("storm.done")
                .exists()),
            "round {round}: the storm did not finish"
        );
        let truth = rt.truth();
        let doc = changes_json(&state, None);
        let got = net_state_of(&doc);
        for i in 0..done_before {
            let mut made = vec![format!("sub/f{i}")];
            if i % 5 == 4 {
                made.push(format!("sub/g{i}"));
            }
            for path in made {
                assert_eq!(
                    got.get(path.as_bytes()),
                    truth.get(path.as_bytes()),
                    "round {round} ({delay_ms} ms, {done_before} steps before SIGTERM): {path} was made before the signal; the kept changelog says otherwise\n{}",
                    differences(&got, &truth)
                );
            }
        }
        if got != truth {
            let ended = doc["ended"].as_str().unwrap_or_else(|| {
                panic!(
                    "round {round} ({delay_ms} ms): the kept changelog differs from the upper dir and does not say it ended early\n{}",
                    differences(&got, &truth)
                )
            });
            assert!(
                ended.contains("SIGTERM"),
                "the note names the signal: {ended}"
            );
            let note = text(&output(cmd(&["changes", "--state", s(&state)])).stderr);
            assert!(
                note.contains("stopped on SIGTERM") && note.lines().count() == 1,
                "the text answer says it on one line: {note:?}"
            );
        }
        // A tracker started on the runtime again rescans: the whole truth, and no note.
        trackers.track_runtime(&rt);
        let doc = changes_json(&state, None);
        assert!(doc["ended"].is_null(), "a live tracker's answer: {doc}");
        assert_net_is_truth(&rt, &state, &format!("round {round}: restarted"));
        rt.end();
    }
}

#[test]
fn run_passes_sigterm_to_its_command_and_still_prints_what_it_changed() {
    if !need_root() {
        return;
    }
    let tmp = temp();
    let state = tmp.path().join("state");
    let script = "trap 'echo late > /spfs/after-term; exit 7' TERM; echo a > /spfs/before; \
                  touch \"$READY\"; while :; do sleep 0.05; done";
    let child = cmd(&["run", "--state", s(&state), "--runtime-dir"])
        .arg(tmp.path().join("rt"))
        .args(["--", "sh", "-c", script])
        .env("READY", tmp.path().join("ready"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn run");
    assert!(
        common::wait_for(Duration::from_secs(20), || tmp
            .path()
            .join("ready")
            .exists()),
        "the command did not start"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM to run");
    let out = child.wait_with_output().expect("run's output");
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(7),
        "run exits as its command did\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        stdout.contains("+/spfs/before") && stdout.contains("+/spfs/after-term"),
        "the summary lists what the command did, also in its SIGTERM handler:\n{stdout}\nstderr: {stderr}"
    );
    assert!(
        stderr.contains("passed SIGTERM on to the command"),
        "says it: {stderr}"
    );
    assert!(
        !state.join("control.sock").exists(),
        "the socket is removed when run ends"
    );
    let kept = ok(cmd(&["changes", "--state", s(&state)]));
    assert!(
        kept.contains("/spfs/after-term"),
        "the kept changelog holds it too: {kept}"
    );
}

/// Reads `path` as user nobody: `Ok` when it could (a dir listed, a file read).
fn read_as_nobody(path: &Path) -> bool {
    let what = if path.is_dir() { "ls" } else { "cat" };
    std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", what])
        .arg(path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run setpriv (util-linux)")
        .success()
}

/// Every path at and below `dir` but sockets.
fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    out.push(dir.to_path_buf());
    for entry in std::fs::read_dir(dir).expect("read state dir").flatten() {
        let kind = entry.file_type().expect("file type");
        if kind.is_dir() {
            walk(&entry.path(), out);
        } else if !std::os::unix::fs::FileTypeExt::is_socket(&kind) {
            out.push(entry.path());
        }
    }
}

#[test]
fn no_other_user_reads_a_state_dir_and_no_runtime_inherits_another_ones_changelog() {
    if !need_root() {
        return;
    }
    let tmp = temp();
    let first = tmp.path().join("first");
    std::fs::create_dir(&first).expect("mkdir");
    let mut rt = FakeRuntime::start(&first, &lower());
    // The same state dir for two runtimes, one after the other: what a reused mount
    // namespace inode (the default key `mntns-<inode>`) does.
    let state = tmp.path().join("state");
    let mut trackers = Trackers::new(&state);
    let tracker = trackers.track_runtime(&rt);
    rt.run("echo one > \"$M/first.txt\"");
    ok(cmd(&["mark", "first-mark", "--state", s(&state)]));
    let mut paths = Vec::new();
    walk(&state, &mut paths);
    assert!(
        paths.len() > 5,
        "the state dir holds a changelog: {paths:?}"
    );
    for p in &paths[1..] {
        assert!(
            !read_as_nobody(p),
            "another user can read {} (live tracker)",
            p.display()
        );
    }
    assert!(
        !read_as_nobody(&state),
        "another user can list the state dir"
    );
    stop_and_wait(&state, tracker);
    rt.end();

    let second = tmp.path().join("second");
    std::fs::create_dir(&second).expect("mkdir");
    let mut rt2 = FakeRuntime::start(&second, &lower());
    trackers.track_runtime(&rt2);
    rt2.run("echo two > \"$M/second.txt\"");
    let doc = changes_json(&state, None);
    let got = net_state_of(&doc);
    assert!(
        !got.contains_key(b"first.txt".as_slice()),
        "the second runtime sees the first one's change: {doc}"
    );
    assert_net_is_truth(&rt2, &state, "the second runtime");
    let history = ok(cmd(&["history", "first.txt", "--state", s(&state)]));
    assert!(history.is_empty(), "the first runtime's history: {history}");
    let mark = output(cmd(&[
        "changes",
        "--since",
        "first-mark",
        "--state",
        s(&state),
    ]));
    assert!(
        !mark.status.success(),
        "the first runtime's mark is not this one's"
    );
    let aside: Vec<_> = std::fs::read_dir(&state)
        .expect("read state dir")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("changelog.sled.earlier-")
        })
        .collect();
    assert_eq!(
        aside.len(),
        1,
        "the first changelog is kept aside, not deleted"
    );
    let mut paths = Vec::new();
    walk(&state, &mut paths);
    for p in &paths[1..] {
        assert!(!read_as_nobody(p), "another user can read {}", p.display());
    }
    rt2.end();
}

/// CPU time (user + system) of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = stat.rsplit_once(')').expect("stat fields").1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

#[test]
fn a_tracker_out_of_descriptors_waits_instead_of_spinning_and_recovers() {
    if !need_root() {
        return;
    }
    let tmp = temp();
    let (mut rt, state, trackers, tracker) = tracked_runtime(tmp.path());
    let open = std::fs::read_dir(format!("/proc/{tracker}/fd"))
        .expect("the tracker's descriptors")
        .count();
    let limit = format!("--nofile={}", open + 8);
    ok(std::process::Command::new("prlimit").args(["--pid", &tracker.to_string(), &limit]));
    // Held connections use up what is left; more wait in the listen queue.
    let held: Vec<_> = (0..60)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(trackers.socket()).ok())
        .collect();
    assert!(held.len() > 20, "connections made: {}", held.len());
    let log = state.join("tracker.log");
    let ticks = cpu_ticks(tracker);
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_ticks(tracker) - ticks;
    assert!(
        spent < 50,
        "the tracker spun for {spent} ticks in 2 s while out of descriptors"
    );
    let logged = std::fs::metadata(&log).map_or(0, |m| m.len());
    assert!(logged < 64 * 1024, "the log grew to {logged} bytes");
    drop(held);
    rt.run("echo after > \"$M/after.txt\"");
    assert_net_is_truth(&rt, &state, "once the connections are closed");
    rt.end();
}

#[test]
fn a_second_tracker_with_another_state_dir_names_the_first_instead_of_starting() {
    if !need_root() {
        return;
    }
    let tmp = temp();
    let (mut rt, state, _trackers, first) = tracked_runtime(tmp.path());
    let other = tmp.path().join("other-state");
    let _other_guard = Trackers::new(&other);
    let second = track_output(&rt, &other);
    common::assert_one_line_error(&second, &format!("already tracked by tracker pid {first}"));
    assert!(
        text(&second.stderr).contains(s(&state)),
        "names the first one's state dir: {}",
        text(&second.stderr)
    );
    rt.run("echo x > \"$M/x.txt\"");
    assert_net_is_truth(&rt, &state, "the first tracker goes on");
    rt.end();
}

#[test]
fn a_damaged_changelog_gives_the_right_answer_or_a_one_line_error_never_less() {
    if !need_root() {
        return;
    }
    let tmp = temp();
    let (mut rt, state, mut trackers, tracker) = tracked_runtime(tmp.path());
    rt.run("for i in $(seq 1 400); do echo $i > \"$M/sub/f$i\"; done; rm \"$M/keep.txt\"");
    stop_and_wait(&state, tracker);
    let whole = net_state_of(&changes_json(&state, None));
    assert_eq!(whole, rt.truth(), "the changelog before any damage");
    let db = state.join("changelog.sled/db");
    // sled's segments are mostly unused space: damage where something was written.
    let bytes = std::fs::read(&db).expect("the db file");
    let size = bytes
        .iter()
        .rposition(|&b| b != 0)
        .map_or(1, |p| p as u64 + 1);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos() as u64;
    eprintln!("damage seed {seed}");
    let mut rng = seed | 1;
    let mut next = move || {
        // xorshift: enough to spread offsets over the file.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut right, mut refused) = (0, 0);
    for trial in 0..40 {
        let copy = tmp.path().join(format!("trial-{trial}"));
        ok(std::process::Command::new("cp").args(["-a", s(&state), s(&copy)]));
        let offset = next() % size;
        let mut garbage = [0u8; 32];
        for b in &mut garbage {
            *b = next() as u8;
        }
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(copy.join("changelog.sled/db"))
                .expect("open the copy's db");
            f.seek(SeekFrom::Start(offset)).expect("seek");
            f.write_all(&garbage).expect("damage");
        }
        let out = output(cmd(&["changes", "--state", s(&copy), "--json"]));
        let ctx = format!("seed {seed} trial {trial}: 32 bytes at {offset} of {size} used");
        if out.status.success() {
            let doc: serde_json::Value =
                serde_json::from_slice(&out.stdout).expect("changes --json is JSON");
            assert_eq!(
                net_state_of(&doc),
                whole,
                "{ctx}: a damaged changelog answered as if whole\n{}",
                differences(&net_state_of(&doc), &whole)
            );
            right += 1;
        } else {
            assert_ne!(
                out.status.code(),
                Some(101),
                "{ctx}: a panic: {}",
                text(&out.stderr)
            );
            common::assert_one_line_error(&out, "changelog");
            refused += 1;
        }
        std::fs::remove_dir_all(&copy).expect("remove the copy");
    }
    eprintln!("{right} right answers, {refused} one-line errors");

    // A tracker started over a damaged changelog keeps it aside and starts again from
    // the upper dir.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&db)
            .expect("open the db");
        f.seek(SeekFrom::Start(size / 2)).expect("seek");
        f.write_all(&vec![0x5a; 4096]).expect("damage");
    }
    trackers.track_runtime(&rt);
    assert_net_is_truth(&rt, &state, "a tracker started over a damaged changelog");
    rt.end();
}
