//! `spfs-changes daemon` with real spfs runtimes (`spfs run`), as root: every runtime
//! made while it runs is tracked with nothing for its user to do, and the writes of
//! the runtime's first command are recorded with their writer.
//!
//! A test binary of its own: the daemon attaches to every spfs runtime on the host,
//! and cargo runs test binaries one after the other, so the other real-spfs tests
//! (which start their trackers themselves) never run beside it.

mod common;
mod spfs_support;
#[path = "../../tests/support/mod.rs"]
mod support;

use common::{cmd, output, text, wait_for};
use spfs_support::{Daemon, Stack, need_spfs, parse_json, spfs, tracker_state_dir};
use std::process::Stdio;
use std::time::Duration;

/// Runtimes made with `spfs run` while the daemon runs are tracked from their first
/// process on: the first write of the runtime's first command is recorded with that
/// command's pid and command line, and `spfs changes` inside needs no set-up. The
/// daemon says how long after its exec each first process was held; SIGTERM stops
/// it, and the trackers end with their runtimes.
#[test]
fn the_daemon_tracks_each_new_runtime_from_its_first_write() {
    if !need_spfs() {
        return;
    }
    let stack = Stack::new("daemon");
    let mut daemon = Daemon::start();
    let scratch = tempfile::tempdir().expect("scratch dir");
    let mut windows = Vec::new();
    for round in 0..5 {
        let name_file = scratch.path().join(format!("name-{round}"));
        let listing = scratch.path().join(format!("listing-{round}"));
        let script = format!(
            "echo first > /spfs/first && echo $SPFS_RUNTIME > {} && spfs changes > {}",
            name_file.display(),
            listing.display()
        );
        let out = output(spfs(&[
            "run",
            "--edit",
            &stack.reference(),
            "--",
            "sh",
            "-c",
            &script,
        ]));
        assert!(out.status.success(), "spfs run: {}", text(&out.stderr));
        let name = std::fs::read_to_string(&name_file)
            .expect("the runtime's name")
            .trim()
            .to_string();
        let said = daemon.expect_line(&format!("runtime {name}"), Duration::from_secs(10));
        assert!(said.contains("tracking /spfs"), "{said}");
        let held_us: u64 = said
            .split("held ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("the daemon held the first process: {said}"));
        windows.push(held_us);

        // Inside, `spfs changes` answered with no set-up and no note about a late start.
        let listed = std::fs::read_to_string(&listing).expect("spfs changes inside");
        assert!(listed.contains("+/spfs/first\n"), "{listed}");

        // The first write has its writer: the runtime's first command.
        let history = parse_json_lines(&common::ok(cmd(&[
            "history",
            "/spfs/first",
            "--json",
            "--runtime",
            &name,
        ])));
        let created = history
            .iter()
            .find(|r| r["action"] == "created")
            .unwrap_or_else(|| panic!("a created record: {history:?}"));
        assert!(
            created["pid"].as_u64().is_some()
                && created["command"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("sh -c echo first > /spfs/first")),
            "the first write is attributed to the first command (not to spfs's startup \
             script, which execs it): {created}"
        );

        // The tracker ended with the runtime; its changelog is kept.
        let state = tracker_ended(&name, Duration::from_secs(5));
        let listed = parse_json(&common::ok(cmd(&["list", "--json"])), "list --json");
        let entry = listed
            .as_array()
            .and_then(|a| a.iter().find(|e| e["name"] == name.as_str()))
            .unwrap_or_else(|| panic!("{name} in list: {listed}"));
        assert_eq!(entry["live"], false, "{entry}");
        let _ = std::fs::remove_dir_all(&state);
    }
    eprintln!("first processes held {windows:?} us after their exec");
    let status = daemon.terminate().expect("the daemon stops on SIGTERM");
    assert!(status.success(), "{status:?}");
}

fn parse_json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The spfs tools installed for users who are not root, as spfs's own `make install`
/// does it: copies with file capabilities (spk's Makefile.linux `setcap`), in a dir
/// every user can reach, with this build's `spfs-changes` beside them.
struct UserSpfs {
    dir: tempfile::TempDir,
}

impl UserSpfs {
    fn install() -> UserSpfs {
        let dir = tempfile::Builder::new()
            .prefix("spfs-changes-user-spfs.")
            .tempdir_in("/tmp")
            .expect("a dir for the spfs tools");
        let installed = spfs_support::on_path("spfs").expect("spfs on PATH");
        let from = installed.parent().expect("spfs's dir");
        let caps: [(&str, &str); 6] = [
            ("spfs-clean", "cap_dac_override,cap_fowner+ep"),
            ("spfs-monitor", "cap_net_admin+ep"),
            ("spfs-render", "cap_chown,cap_fowner+ep"),
            ("spfs-join", "cap_sys_chroot,cap_sys_admin+ep"),
            (
                "spfs-enter",
                "cap_dac_override,cap_setuid,cap_chown,cap_mknod,cap_sys_admin,cap_fowner+ep",
            ),
            ("spfs-fuse", "cap_sys_admin+ep"),
        ];
        for name in [
            "spfs",
            "spfs-clean",
            "spfs-monitor",
            "spfs-render",
            "spfs-join",
            "spfs-enter",
            "spfs-fuse",
        ] {
            let src = from.join(name);
            if src.exists() {
                std::fs::copy(&src, dir.path().join(name)).expect("copy an spfs tool");
            }
        }
        std::fs::copy(common::bin(), dir.path().join("spfs-changes")).expect("copy spfs-changes");
        for (name, cap) in caps {
            let path = dir.path().join(name);
            if path.exists() {
                let out = output(std::process::Command::new("setcap").arg(cap).arg(&path));
                assert!(
                    out.status.success(),
                    "setcap {cap} {} (libcap2-bin): {}",
                    path.display(),
                    text(&out.stderr)
                );
            }
        }
        let open = std::os::unix::fs::PermissionsExt::from_mode(0o755);
        std::fs::set_permissions(dir.path(), open).expect("open the tools' dir");
        UserSpfs { dir }
    }

    /// `ARGS` as user `uid` (no supplementary groups), with these tools first on PATH
    /// and `home` as HOME.
    fn as_user(&self, uid: u32, home: &std::path::Path, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new("setpriv");
        c.args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "--",
        ])
        .args(args);
        common::no_ambient_target(&mut c);
        c.env("HOME", home)
            .env(
                "PATH",
                format!("{}:/usr/bin:/bin", self.dir.path().display()),
            )
            .env("NO_COLOR", "1");
        c
    }
}

/// A user who is not root, with the daemon running: in their own runtime and from
/// their host shell, `spfs changes` (and `--since` a mark), `validate`, `reset` and
/// `list` work with nothing set up; another user sees none of it.
#[test]
fn a_user_who_is_not_root_uses_everything_through_the_daemon() {
    if !need_spfs() {
        return;
    }
    if spfs_support::on_path("setcap").is_none() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI must have setcap"
        );
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"skipped: needs setcap (libcap2-bin)\n",
        );
        return;
    }
    let tools = UserSpfs::install();
    let stack = Stack::new("daemon_user");
    let daemon = Daemon::start();
    let (user, other) = (4242u32, 4343u32);
    let home = tempfile::Builder::new()
        .prefix("spfs-changes-user-home.")
        .tempdir_in("/tmp")
        .expect("a home");
    std::fs::set_permissions(
        home.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("open the home");
    let h = home.path().display().to_string();
    // Inside: writes, a mark, more writes, the queries, a reset; then it waits for the
    // host-side checks (a file `go`) before it ends.
    let script = format!(
        r#"set -e
echo $SPFS_RUNTIME > {h}/name
echo more >> /spfs/etc/a
echo new > /spfs/etc/new
spfs changes > {h}/first
spfs changes mark build-start > /dev/null
echo later > /spfs/later
spfs changes --since build-start > {h}/since
spfs changes validate --since build-start > {h}/validate 2>&1 || echo "exit $?" >> {h}/validate
spfs changes reset /etc/new > {h}/reset 2>&1
spfs changes > {h}/after
spfs changes list --json > {h}/list
touch {h}/inside-done
while [ ! -e {h}/go ]; do sleep 0.05; done
"#
    );
    // However the test ends, the runtime's script is let go.
    let _release = Release(home.path().join("go"));
    let mut runtime = tools
        .as_user(
            user,
            home.path(),
            &[
                "spfs",
                "run",
                "--edit",
                &stack.reference(),
                "--",
                "sh",
                "-c",
                &script,
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spfs run as the user");
    let done = home.path().join("inside-done");
    if !wait_for(Duration::from_secs(30), || done.exists()) {
        let _ = runtime.kill();
        let out = runtime.wait_with_output().expect("the runtime's output");
        panic!("the runtime's script did not finish: {}", text(&out.stderr));
    }
    let read = |f: &str| std::fs::read_to_string(home.path().join(f)).unwrap_or_default();
    let name = read("name").trim().to_string();
    daemon.expect_line(&format!("runtime {name}"), Duration::from_secs(10));
    assert_eq!(
        read("first"),
        // The stack's masks (etc/b, keep/k5, d) are removals, as spfs diff lists them.
        "~/spfs/etc\n~/spfs/etc/a [content, size {2=>7}]\n-/spfs/etc/b\n+/spfs/etc/new\n\
         ~/spfs/keep\n-/spfs/keep/k5\n-/spfs/d\n",
        "spfs changes inside"
    );
    assert_eq!(read("since"), "+/spfs/later\n", "--since a mark");
    assert!(
        read("validate").contains("valid"),
        "validate: {}",
        read("validate")
    );
    assert!(
        read("reset").contains("reset /spfs/etc/new (was added)"),
        "reset: {}",
        read("reset")
    );
    assert!(
        !read("after").contains("/spfs/etc/new"),
        "after the reset: {}",
        read("after")
    );
    assert!(
        read("list").contains(&name),
        "list inside: {}",
        read("list")
    );

    // From the user's host shell, by name: the same answer as inside now.
    let host = common::ok(tools.as_user(
        user,
        home.path(),
        &["spfs-changes", "changes", "--runtime", &name],
    ));
    assert_eq!(host, read("after"), "from the host shell");
    let listed = common::ok(tools.as_user(user, home.path(), &["spfs-changes", "list"]));
    assert!(listed.contains(&name), "{listed}");

    // Another user: refused, and not listed.
    let refused = output(tools.as_user(
        other,
        home.path(),
        &["spfs-changes", "changes", "--runtime", &name],
    ));
    assert!(!refused.status.success());
    let err = text(&refused.stderr);
    assert!(
        err.contains(&format!("uid {other} may not use this tracker")) && err.lines().count() == 1,
        "{err}"
    );
    let theirs = common::ok(tools.as_user(other, home.path(), &["spfs-changes", "list"]));
    assert!(!theirs.contains(&name), "{theirs}");

    std::fs::write(home.path().join("go"), b"").expect("release the runtime");
    let status = runtime.wait().expect("the runtime ends");
    let mut stderr = String::new();
    if let Some(mut e) = runtime.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    assert!(status.success(), "spfs run as the user: {stderr}");

    // The runtime has ended: its kept changelog is the user's to read, by name.
    let state = tracker_ended(&name, Duration::from_secs(10));
    let kept = output(tools.as_user(
        user,
        home.path(),
        &["spfs-changes", "history", "/spfs/later", "--runtime", &name],
    ));
    assert!(
        kept.status.success() && text(&kept.stdout).contains("created"),
        "the owner reads the ended runtime's changelog: {}{}",
        text(&kept.stdout),
        text(&kept.stderr)
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&state)
            .expect("the kept state dir")
            .permissions(),
    );
    assert_eq!(
        mode & 0o077,
        0,
        "only its owner reads the kept changelog: {mode:o}"
    );
    let _ = std::fs::remove_dir_all(state);
}

/// Asserts the tracker of runtime `name` ends within `timeout` (its pid file goes
/// last); returns its state dir, which is kept.
fn tracker_ended(name: &str, timeout: Duration) -> std::path::PathBuf {
    let state = tracker_state_dir(name);
    assert!(
        wait_for(timeout, || !state.join("tracker.pid").exists()),
        "the tracker of {name} ended with it"
    );
    state
}

/// Creates its file when dropped: what a runtime's script waits for to end.
struct Release(std::path::PathBuf);

impl Drop for Release {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, b"");
    }
}
