//! The `spfs-changes` binary end to end: `run` mounts a real runtime in its own
//! private mount namespace, so these tests need no namespace of their own, except the
//! one that occupies a mount point.

mod common;
#[path = "../../tests/support/mod.rs"]
mod support;

use common::{assert_one_line_error, cmd, ok, output, s, text};
use std::path::Path;
use support::{in_private_mount_ns, need_root};

#[test]
fn run_prints_changes_and_serves_changes_json_inside() {
    if !need_root() {
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let state = tmp.path().join("state");
    let json_out = tmp.path().join("inside.json");
    let script = format!(
        "echo hi > /spfs/a; mkdir /spfs/d; spfs-changes changes --json > {}",
        json_out.display()
    );
    let out = run_in_runtime(&state, &script);
    let printed = text(&out.stdout);
    assert_eq!(
        printed.lines().collect::<Vec<_>>(),
        ["+/spfs/d", "+/spfs/a"],
        "run printed {printed:?} (spfs diff's order: dirs first)"
    );

    let inside: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json_out).expect("changes --json wrote its answer"))
            .expect("valid JSON");
    let kinds: Vec<(String, String, String)> = inside["changes"]
        .as_array()
        .expect("changes array")
        .iter()
        .map(|c| {
            (
                c["path"].as_str().unwrap_or("").into(),
                c["kind"].as_str().unwrap_or("").into(),
                c["type"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("/spfs/d".into(), "added".into(), "dir".into()),
            ("/spfs/a".into(), "added".into(), "file".into())
        ]
    );
    assert!(inside["fresh"].is_null());

    // Afterwards, the kept changelog answers the same without a tracker.
    let kept = ok(cmd(&["changes", "--state", s(&state), "--jsonl"]));
    let lines: Vec<serde_json::Value> = kept
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 3, "two changes and a trailer: {lines:?}");
    assert_eq!(lines[0]["path"], "/spfs/d");
    assert_eq!(lines[1]["path"], "/spfs/a");
    assert!(lines[2]["token"].as_str().is_some_and(|t| t.contains(':')));
}

/// `spfs-changes run --state STATE -- sh -c SCRIPT`, which must succeed.
fn run_in_runtime(state: &std::path::Path, script: &str) -> std::process::Output {
    let out = output(cmd(&["run", "--state", s(state), "--", "sh", "-c", script]));
    assert!(out.status.success(), "run failed: {}", text(&out.stderr));
    out
}

/// `spfs changes` runs `spfs-changes` with no arguments: bare, it lists the changes,
/// taking the flags of `changes`; the subcommands stay.
#[test]
fn bare_spfs_changes_lists_the_changes() {
    if !need_root() {
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let state = tmp.path().join("state");
    let out = tmp.path().to_path_buf();
    let script = format!(
        "cd {out}; mkdir -p /spfs/lib; echo x > /spfs/lib/x; spfs-changes mark m >/dev/null; echo hi > /spfs/a; \
         spfs-changes > bare; spfs-changes changes > sub; spfs-changes --json --since m > since.json; \
         spfs-changes lib > prefix",
        out = s(&out)
    );
    let run = run_in_runtime(&state, &script);
    assert!(
        !text(&run.stderr).contains("error"),
        "{}",
        text(&run.stderr)
    );
    let read = |name: &str| std::fs::read_to_string(out.join(name)).expect(name);
    assert_eq!(read("bare"), read("sub"));
    assert_eq!(read("bare"), "+/spfs/lib\n+/spfs/lib/x\n+/spfs/a\n");
    assert_eq!(read("prefix"), "+/spfs/lib\n+/spfs/lib/x\n");
    let since: serde_json::Value = serde_json::from_str(&read("since.json")).expect("JSON");
    let paths: Vec<&str> = since["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .filter_map(|c| c["path"].as_str())
        .collect();
    assert_eq!(paths, ["/spfs/a"]);
    // A reader that went away (`spfs changes | head`) is no error: the pipe's read
    // end is closed before the listing is written.
    let (read_end, write_end) = nix::unistd::pipe().expect("a pipe");
    drop(read_end);
    let mut bare = cmd(&["--state", s(&state)]);
    bare.stdout(std::process::Stdio::from(write_end));
    let closed = output(bare);
    assert_eq!(closed.status.code(), Some(0), "{}", text(&closed.stderr));
    assert_eq!(text(&closed.stderr), "");
}

#[test]
fn marks_and_since_inside_a_run() {
    if !need_root() {
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let state = tmp.path().join("state");
    let lower = tmp.path().join("lower");
    std::fs::create_dir_all(lower.join("lib")).expect("mkdir");
    std::fs::write(lower.join("lib/old.so"), "old").expect("write");
    let mnt = tmp.path().join("mnt");
    let since_out = tmp.path().join("since.txt");
    let script = format!(
        "echo pre > $M/pre && spfs-changes mark build-start >/dev/null && echo new > $M/lib/new.so && rm $M/lib/old.so && printf 'x' > \"$M/$(printf 'odd\\nname')\" && spfs-changes changes --since build-start > {}",
        since_out.display()
    );
    let out = output(
        cmd(&[
            "run",
            "--state",
            s(&state),
            "--lower",
            s(&lower),
            "--mount",
            s(&mnt),
            "--runtime-dir",
            s(&tmp.path().join("rt")),
            "--",
            "sh",
            "-c",
            &script,
        ])
        .env("M", &mnt),
    );
    assert!(out.status.success(), "run failed: {}", text(&out.stderr));
    let m = mnt.display();
    let since = text(&std::fs::read(&since_out).expect("since output"));
    let mut got: Vec<&str> = since.lines().collect();
    got.sort();
    let mut want = [
        format!("+{m}/lib/new.so"),
        format!("+{m}/odd\\nname"),
        format!("-{m}/lib/old.so"),
        // lib's entries changed: spfs diff lists the dir too.
        format!("~{m}/lib"),
    ];
    want.sort();
    assert_eq!(got, want, "changes since the mark");
    let all = text(&out.stdout);
    assert!(
        all.contains(&format!("+{m}/pre")),
        "run's own listing has everything: {all}"
    );
    // A prefix filter on the kept changelog.
    let lib = output(cmd(&["changes", "--state", s(&state), &format!("{m}/lib")]));
    assert_eq!(
        text(&lib.stdout).lines().count(),
        2,
        "{}",
        text(&lib.stdout)
    );
}

#[test]
fn errors_are_one_clear_line() {
    if !need_root() {
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let missing = tmp.path().join("no-such-layer");
    let out = output(cmd(&["run", "--lower", s(&missing), "--", "true"]));
    assert_one_line_error(&out, "no-such-layer");

    let out = output(cmd(&["changes", "--state", s(&missing)]));
    assert_one_line_error(&out, "no changelog");

    // Not root.
    use std::os::unix::process::CommandExt;
    let out = output(cmd(&["run", "--", "true"]).uid(65534).gid(65534));
    assert_one_line_error(&out, "needs root");

    // A corrupt db.
    let corrupt = tmp.path().join("corrupt");
    let db = corrupt.join("changelog.sled");
    std::fs::create_dir_all(&db).expect("mkdir");
    std::fs::write(db.join("conf"), b"\xff\xfe garbage").expect("write");
    std::fs::write(db.join("db"), vec![0xa5u8; 4096]).expect("write");
    let out = output(cmd(&["changes", "--state", s(&corrupt)]));
    assert_one_line_error(&out, "changelog");
}

#[test]
fn a_locked_db_is_reported() {
    if !need_root() {
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let _held = store::Store::open(tmp.path()).expect("open a changelog");
    let out = output(cmd(&["changes", "--state", s(tmp.path())]));
    assert_one_line_error(&out, "in use");
}

#[test]
fn an_occupied_mount_point_is_refused() {
    if !need_root() {
        return;
    }
    in_private_mount_ns(|| {
        let tmp = tempfile::tempdir().expect("temp dir");
        let mnt = tmp.path().join("busy");
        std::fs::create_dir(&mnt).expect("mkdir");
        support::mount_tmpfs(&mnt, None);
        let out = output(cmd(&[
            "run",
            "--state",
            s(&tmp.path().join("state")),
            "--mount",
            s(&mnt),
            "--runtime-dir",
            s(&tmp.path().join("rt")),
            "--",
            "true",
        ]));
        assert_one_line_error(&out, "in use");
        assert!(Path::new(&mnt).exists());
    });
}
