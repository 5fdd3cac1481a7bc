//! `spfs-changes track` end to end, as root on the real kernel: a runtime shaped like
//! spfs's (its own process in a private mount namespace, a tmpfs with upper/work/lower,
//! an overlay over host layers) is tracked from outside its namespace, through
//! `/proc/<pid>/root`, and what the tracker says is compared with a walk of the upper
//! dir.

mod common;
#[path = "../../tests/support/mod.rs"]
mod support;
mod track_support;

use common::{alive, assert_one_line_error, cmd, mount_ns, ok, output, s, sigkill, text, wait_for};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use store::{FileType, NetKind, Query};
use support::{LowerSpec, expect, need_root};
use track_support::*;
use tracker::control::{Client, MAX_REQUEST, Request, Response};

fn temp() -> tempfile::TempDir {
    temp_dir("track")
}

/// Lower files every test can change: keep, modify, delete, replace.
fn base_lower() -> LowerSpec {
    LowerSpec::new()
        .file("keep.txt", "keep\n", 0o644)
        .file("mod.txt", "old\n", 0o644)
        .file("del.txt", "bye\n", 0o644)
        .file("dir/a", "a\n", 0o644)
        .file("dir/b", "b\n", 0o644)
        .dir("sub")
}

/// A runtime over `spec` in `tmp`, its state dir (`tmp/state`) and the guard of the
/// trackers to keep their state there.
fn start_runtime(tmp: &Path, spec: &LowerSpec) -> (FakeRuntime, PathBuf, Trackers) {
    let rt = FakeRuntime::start(tmp, spec);
    let state = tmp.join("state");
    let trackers = Trackers::new(&state);
    (rt, state, trackers)
}

fn status_json(state: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(cmd(&["status", "--state", s(state), "--json"])))
        .expect("status --json is JSON")
}

#[test]
fn attach_by_pid_from_outside_reports_changes_made_inside() {
    if !need_root() {
        return;
    }
    let tmp = temp();
    let (mut rt, state, mut trackers) = start_runtime(tmp.path(), &base_lower());
    let host_mounts = std::fs::read_to_string("/proc/thread-self/mountinfo").expect("mountinfo");
    assert!(
        !host_mounts.contains(s(&rt.mnt)) && !host_mounts.contains(s(&rt.rt)),
        "the runtime's mounts leak into the host namespace"
    );
    assert_eq!(rt.run("cat \"$M/keep.txt\""), "keep\n");

    let pid = trackers.track_runtime(&rt);
    assert!(alive(pid));
    assert_eq!(
        mount_ns(pid),
        Some(own_mount_ns()),
        "started outside, the tracker stays outside"
    );

    // A second start finds the first.
    let again = track_output(&rt, &state);
    assert!(again.status.success(), "{}", text(&again.stderr));
    let printed = text(&again.stdout);
    assert!(
        printed.starts_with("already tracked: ") && printed.contains(&pid.to_string()),
        "second start printed {printed:?}"
    );

    rt.run(concat!(
        "echo new > \"$M/new.txt\" && echo more >> \"$M/mod.txt\" && rm \"$M/del.txt\"",
        " && mkdir \"$M/newdir\" && echo f > \"$M/newdir/f\" && chmod 0600 \"$M/keep.txt\"",
        " && rm -r \"$M/dir\" && mkdir \"$M/dir\""
    ));

    assert_eq!(
        changes_lines(&state),
        diff_lines(
            &rt.mnt,
            &[
                "~dir",
                "-dir/a",
                "-dir/b",
                "-del.txt",
                "~keep.txt [mode {100644=>100600}]",
                "~mod.txt [content, size {4=>9}]",
                "+new.txt",
                "+newdir",
                "+newdir/f",
            ]
        ),
        "changes --state from outside"
    );
    let net = assert_net_is_truth(&rt, &state, "after changes made inside");
    assert_eq!(
        net,
        expect([
            ("del.txt", NetKind::Removed, FileType::Whiteout),
            ("dir", NetKind::Replaced, FileType::Dir),
            ("keep.txt", NetKind::Metadata, FileType::File),
            ("mod.txt", NetKind::Modified, FileType::File),
            ("new.txt", NetKind::Added, FileType::File),
            ("newdir", NetKind::Added, FileType::Dir),
            ("newdir/f", NetKind::Added, FileType::File),
        ])
    );
    let status = status_json(&state);
    assert_eq!(status["live"], true, "{status}");
    assert_eq!(status["mount"], s(&rt.mnt));
    assert_eq!(status["net_paths"], 7, "{status}");
}

#[test]
fn attach_by_mount_from_inside_leaves_the_runtime_namespace() {
    if !need_root() {
        return;
    }
    let tmp = temp();
    let (mut rt, state, mut trackers) = start_runtime(tmp.path(), &base_lower());
    // Started from inside the runtime, with the mount as the runtime sees it.
    let printed = rt.run("\"$BIN\" track --mount \"$M\" --state \"$T/state\"");
    let pid = trackers.adopt_from(&printed);
    assert!(
        printed.contains(&format!("tracking {} ", s(&rt.mnt))),
        "{printed:?}"
    );
    assert!(alive(pid), "the tracker runs");
    let tracker_ns = mount_ns(pid).expect("tracker's namespace");
    assert_ne!(
        tracker_ns, rt.ns,
        "the tracker must leave the runtime's mount namespace (it would keep the runtime alive)"
    );

    rt.run("echo x > \"$M/made-inside\" && echo more >> \"$M/mod.txt\" && rm \"$M/del.txt\"");
    assert_eq!(
        changes_lines(&state),
        diff_lines(
            &rt.mnt,
            &[
                "-del.txt",
                "+made-inside",
                "~mod.txt [content, size {4=>9}]"
            ]
        ),
        "changes --state from outside"
    );
    assert_net_is_truth(&rt, &state, "tracked by mount from inside");
    // Inside, the same state dir answers too (the socket is on the host's filesystem).
    let inside = rt.run("\"$BIN\" changes --state \"$T/state\"");
    let mut inside: Vec<&str> = inside.lines().collect();
    inside.sort();
    assert_eq!(
        inside,
        diff_lines(
            &rt.mnt,
            &[
                "-del.txt",
                "+made-inside",
                "~mod.txt [content, size {4=>9}]"
            ]
        )
    );

    // Not being in the namespace, the tracker does not keep the runtime alive.
    rt.end();
    assert!(
        wait_gone(pid, Duration::from_secs(2)).is_some(),
        "the tracker outlived its runtime"
    );
}

#[test]
fn remounts_during_tracking_lose_nothing() {
    if !need_root() {
        return;
    }
    let tmp = temp();
    let (mut rt, state, mut trackers) = start_runtime(tmp.path(), &base_lower());
    let pid = trackers.track_runtime(&rt);

    rt.run("echo a > \"$M/a.txt\" && echo x >> \"$M/mod.txt\" && rm \"$M/del.txt\"");
    assert_net_is_truth(&rt, &state, "before the remount");

    // `spfs edit` style: a plain unmount (refused if busy) and a new overlay on the
    // same upper and work dirs.
    let lowers = rt.lowers.clone();
    rt.remount(lowers.clone());
    rt.run(concat!(
        "echo b > \"$M/b.txt\" && echo y >> \"$M/a.txt\" && rm \"$M/mod.txt\"",
        " && mkdir \"$M/d2\" && echo z > \"$M/keep.txt\""
    ));
    let net = assert_net_is_truth(&rt, &state, "after a remount on the same layers");
    assert_eq!(
        net,
        expect([
            ("a.txt", NetKind::Added, FileType::File),
            ("b.txt", NetKind::Added, FileType::File),
            ("d2", NetKind::Added, FileType::Dir),
            ("del.txt", NetKind::Removed, FileType::Whiteout),
            ("keep.txt", NetKind::Modified, FileType::File),
            ("mod.txt", NetKind::Removed, FileType::Whiteout),
        ])
    );

    // Twice more, the second time right after a change (nothing may fall between).
    rt.remount(lowers.clone());
    rt.run("echo c > \"$M/c.txt\"");
    rt.remount(lowers.clone());
    rt.run("rm \"$M/a.txt\" && mkdir \"$M/sub/inner\"");
    assert_net_is_truth(&rt, &state, "after three remounts");

    // `spfs commit` style: a new layer on top. A remount that ended before a query
    // is part of what the query's sync guarantees: the very next answer is
    // classified against the new layers, in the same instance (no history was lost).
    let instance_before = token_instance(&changes_json(&state, None));
    let layer2 = tmp.path().join("layer2");
    LowerSpec::new()
        .file("b.txt", "B from layer2\n", 0o644)
        .file("only-in-layer2", "x", 0o644)
        .write_layer(0, &layer2);
    let mut relayered = vec![layer2];
    relayered.extend(lowers);
    rt.remount(relayered);
    rt.run("echo after > \"$M/after-relayer\"");
    let want = rt.truth();
    assert_eq!(
        want.get(b"b.txt".as_slice()),
        Some(&(NetKind::Modified, FileType::File)),
        "the new layer makes b.txt a modification"
    );
    let after = changes_json(&state, None);
    assert_eq!(
        net_state_of(&after),
        want,
        "the first query after a remount with a new top layer"
    );
    assert_eq!(
        token_instance(&after),
        instance_before,
        "a remount is no gap in history"
    );
    assert!(alive(pid), "the tracker followed every remount");
    assert_eq!(status_json(&state)["live"], true);
}

/// The kernel hands out mount ids again once their mounts are freed (the lowest free
/// one; an overlay also takes ids for its private clones of the layers), so an
/// overlay mounted again over as many layers as before usually gets the id the old
/// one had. Here the stack alternates between two of two layers each, a top layer
/// with `new.txt` or one without: the first query after each remount is classified
/// against the layers mounted then, whatever id the overlay was given.
#[test]
fn a_remount_that_reuses_the_mount_id_is_followed() {
    if !need_root() {
        return;
    }
    let tmp = temp();
    let (mut rt, state, mut trackers) = start_runtime(tmp.path(), &base_lower());
    trackers.track_runtime(&rt);
    rt.run("echo x >> \"$M/keep.txt\" && echo n > \"$M/new.txt\"");
    let base = rt.lowers.clone();
    let stack = |name: &str, spec: LowerSpec| {
        let top = tmp.path().join(name);
        spec.write_layer(0, &top);
        let mut lowers = vec![top];
        lowers.extend(base.iter().cloned());
        lowers
    };
    let with_new = stack("with-new", LowerSpec::new().file("new.txt", "top\n", 0o644));
    let without = stack("without", LowerSpec::new().file("other.txt", "o\n", 0o644));

    let mut reused = 0;
    for n in 0..6 {
        let seen = rt.mount_id();
        let lowers = if n % 2 == 0 { &with_new } else { &without };
        // The pause lets the old overlay be freed, so that its ids can be handed out
        // again; what is checked does not depend on it.
        rt.run(&format!(
            "umount \"$M\" && sleep 0.2 && mount -t overlay overlay -o '{}' \"$M\"",
            overlay_options(&rt.rt, lowers)
        ));
        rt.lowers = lowers.clone();
        reused += usize::from(rt.mount_id() == seen);
        let net = assert_net_is_truth(&rt, &state, &format!("after remount {n}"));
        let new_txt = net.get(b"new.txt".as_slice()).map(|(kind, _)| *kind);
        let want = if n % 2 == 0 {
            NetKind::Modified
        } else {
            NetKind::Added
        };
        assert_eq!(
            new_txt,
            Some(want),
            "remount {n}: new.txt against its stack"
        );
    }
    assert!(
        reused > 0,
        "no remount got the mount id of the overlay before it: the case this test is for did not occur"
    );
}

/// The instance part of a `changes --json` answer's token.
fn token_instance(answer: &serde_json::Value) -> String {
    let token = answer["token"].as_str().expect("a token");
    token.split(':').next().expect("instance:seq").to_string()
}

#[test]
fn kill_9_mid_workload_then_restart_recovers_the_truth() {
    if !need_root() {
        return;
    }
    let tmp = temp();
    let mut spec = base_lower();
    for i in 0..50 {
        spec = spec.file(format!("l/f{i}"), format!("lower {i}\n"), 0o644);
    }
    let (mut rt, state, mut trackers) = start_runtime(tmp.path(), &spec);
    let first = trackers.track_runtime(&rt);

    rt.run("echo pre > \"$M/pre.txt\"");
    let before = changes_json(&state, None);
    let token = before["token"].as_str().expect("token").to_string();
    assert!(before["fresh"].is_null());

    // A writer that runs until told to stop: creates, appends, removes and renames in
    // new and lower paths.
    rt.run(concat!(
        "( mkdir -p \"$M/w\"; i=0; while [ ! -e \"$T/stop\" ]; do",
        " echo $i > \"$M/w/n$((i % 200))\";",
        " echo $i >> \"$M/l/f$((i % 50))\";",
        " if [ $((i % 7)) -eq 0 ]; then rm -f \"$M/l/f$(((i * 3) % 50))\"; fi;",
        " if [ $((i % 11)) -eq 0 ]; then mv \"$M/w/n$((i % 200))\" \"$M/w/m$((i % 13))\"; fi;",
        " if [ $((i % 17)) -eq 0 ]; then mkdir -p \"$M/w/d$((i % 5))\" && echo $i > \"$M/w/d$((i % 5))/x\"; fi;",
        " if [ $((i % 23)) -eq 0 ]; then rm -rf \"$M/w/d$((i % 5))\"; fi;",
        " i=$((i + 1)); done; touch \"$T/done\" ) >/dev/null 2>&1 &"
    ));
    let progress = rt.reach(&rt.upper().join("w/n20"));
    assert!(
        wait_for(Duration::from_secs(5), || progress.exists()),
        "the workload runs"
    );
    std::thread::sleep(Duration::from_millis(200));
    sigkill(first).expect("kill -9 the tracker");
    assert!(wait_gone(first, Duration::from_secs(2)).is_some());
    // The workload goes on with no tracker for a while.
    std::thread::sleep(Duration::from_millis(300));
    assert!(!tmp.path().join("done").exists(), "the workload still runs");

    let second = trackers.track_runtime(&rt);
    assert_ne!(first, second);
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(tmp.path().join("stop"), "").expect("stop the workload");
    assert!(
        wait_for(Duration::from_secs(10), || tmp.path().join("done").exists()),
        "the workload ends"
    );

    let net = assert_net_is_truth(&rt, &state, "after kill -9 and restart");
    assert!(net.len() > 20, "the workload changed things: {}", net.len());
    let since = changes_json(&state, Some(&token));
    assert!(
        !since["fresh"].is_null(),
        "a token of the killed tracker must be answered as fresh: {}",
        since["fresh"]
    );
    assert_eq!(
        net_state_of(&since),
        net,
        "a fresh answer holds the full net state"
    );
    let instance = |t: &str| t.split_once(':').expect("instance:seq").0.to_string();
    assert_ne!(
        instance(since["token"].as_str().expect("token")),
        instance(&token),
        "a restart changes the instance"
    );
    assert!(alive(second));
}

#[test]
fn socket_serves_concurrent_clients_rejects_bad_frames_and_other_uids() {
    if !need_root() {
        return;
    }
    let tmp = temp();
    let (mut rt, state, mut trackers) = start_runtime(tmp.path(), &base_lower());
    let pid = trackers.track_runtime(&rt);
    rt.run("echo 1 > \"$M/one\" && echo 2 >> \"$M/mod.txt\" && rm \"$M/del.txt\"");
    let want = expect([
        ("del.txt", NetKind::Removed, FileType::Whiteout),
        ("mod.txt", NetKind::Modified, FileType::File),
        ("one", NetKind::Added, FileType::File),
    ]);
    assert_eq!(rt.truth(), want);
    // `status` reads counters without a sync: one synced query first, so that every
    // answer below must show the same three paths.
    assert_eq!(net_state_of(&changes_json(&state, None)), want);

    let socket = trackers.socket();
    let start = Arc::new(Barrier::new(4));
    let mut threads = Vec::new();
    for client in 0..2 {
        let (socket, start, want) = (socket.clone(), start.clone(), want.clone());
        threads.push(std::thread::spawn(move || {
            let mut c = Client::connect(&socket).expect("connect");
            start.wait();
            for i in 0..60 {
                if (i + client) % 2 == 0 {
                    match c.call(&Request::Changes(Query::default())) {
                        Ok(Response::Changes(set)) => {
                            let got: support::Truth = set
                                .changes
                                .into_iter()
                                .map(|ch| (ch.path, (ch.kind.expect("kind"), ch.file_type)))
                                .collect();
                            assert_eq!(got, want, "client {client} call {i}");
                            assert!(set.fresh.is_none());
                        }
                        other => panic!("client {client} call {i}: {other:?}"),
                    }
                } else {
                    match c.call(&Request::Status) {
                        Ok(Response::Status(st)) => {
                            assert!(st.live);
                            assert_eq!(st.net_paths, 3, "client {client} call {i}");
                        }
                        other => panic!("client {client} call {i}: {other:?}"),
                    }
                }
            }
        }));
    }
    {
        let (socket, start) = (socket.clone(), start.clone());
        threads.push(std::thread::spawn(move || {
            let mut c = Client::connect(&socket).expect("connect");
            start.wait();
            // A valid length and version byte, then bytes that are no request.
            match c.send_raw(&[0, 0, 0, 5, 1, 0xff, 0xff, 0xff, 0xff]) {
                Ok(Response::Error(why)) => assert!(why.contains("malformed"), "{why}"),
                other => panic!("garbage payload: {other:?}"),
            }
            // Another protocol version.
            match c.send_raw(&[0, 0, 0, 3, 9, 0, 0]) {
                Ok(Response::Error(why)) => assert!(why.contains("version 9"), "{why}"),
                other => panic!("other version: {other:?}"),
            }
            match c.send_raw(&[0, 0, 0, 0]) {
                Ok(Response::Error(why)) => assert!(why.contains("empty"), "{why}"),
                other => panic!("empty frame: {other:?}"),
            }
            // The connection is still in step after bad frames of a valid length.
            assert!(matches!(c.call(&Request::Status), Ok(Response::Status(_))));
        }));
    }
    {
        let (socket, start) = (socket.clone(), start.clone());
        threads.push(std::thread::spawn(move || {
            let mut c = Client::connect(&socket).expect("connect");
            start.wait();
            let len = MAX_REQUEST + 1;
            let mut frame = (len as u32).to_be_bytes().to_vec();
            frame.push(1);
            frame.resize(4 + len, 0xab);
            match c.send_raw(&frame) {
                Ok(Response::Error(why)) => assert!(why.contains("exceeds"), "{why}"),
                other => panic!("oversized frame: {other:?}"),
            }
        }));
    }
    for t in threads {
        t.join().expect("client thread");
    }
    // Still up, on a fresh connection and from the CLI.
    let mut c = Client::connect(&socket).expect("connect after bad frames");
    assert!(matches!(c.call(&Request::Status), Ok(Response::Status(_))));
    assert!(alive(pid));
    assert_eq!(status_json(&state)["live"], true);

    // Another uid may connect (the socket is 0666) but is refused by credentials.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let mut c = cmd(&["status", "--socket", s(&socket)]);
    c.uid(65534).gid(65534);
    let out = output(c);
    assert_one_line_error(&out, "uid 65534 may not use this tracker");
    assert!(text(&out.stdout).is_empty());
    assert!(alive(pid), "a refused client does not hurt the tracker");
}

#[test]
fn teardown_ends_the_tracker_and_the_kept_db_still_answers() {
    if !need_root() {
        return;
    }
    let tmp = temp();
    let (mut rt, state, mut trackers) = start_runtime(tmp.path(), &base_lower());
    let pid = trackers.track_runtime(&rt);
    rt.run(
        "echo n > \"$M/n.txt\" && echo m >> \"$M/mod.txt\" && rm \"$M/del.txt\" && mkdir \"$M/d\"",
    );
    let live_lines = changes_lines(&state);
    let want = diff_lines(
        &rt.mnt,
        &[
            "+d",
            "-del.txt",
            "~mod.txt [content, size {4=>6}]",
            "+n.txt",
        ],
    );
    assert_eq!(live_lines, want);
    let live_net = assert_net_is_truth(&rt, &state, "before teardown");

    rt.end();
    let ended = Instant::now();
    let took = wait_gone(pid, Duration::from_secs(2));
    assert!(
        took.is_some(),
        "the tracker still runs {:?} after its runtime ended",
        ended.elapsed()
    );
    eprintln!("tracker ended {:?} after its runtime", ended.elapsed());
    assert!(!state.join("tracker.pid").exists(), "pid file removed");
    assert!(!trackers.socket().exists(), "socket removed");

    // No tracker: the kept changelog answers, without details (no layers to compare
    // with).
    let without_details: Vec<String> = want
        .iter()
        .map(|l| l.split(" [").next().unwrap_or(l).to_string())
        .collect();
    assert_eq!(changes_lines(&state), without_details, "kept changelog");
    assert_eq!(net_state_of(&changes_json(&state, None)), live_net);
    let status = status_json(&state);
    assert_eq!(status["live"], false, "{status}");
    assert_eq!(status["net_paths"], 4, "{status}");
}
