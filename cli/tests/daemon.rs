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

use common::{alive, cmd, output, text, wait_for};
use spfs_support::{Stack, need_spfs, parse_json, spfs, tracker_state_dir};
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The daemon, stopped (SIGTERM) and reaped when dropped.
struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Daemon {
    /// Starts it and waits for it to say it watches.
    fn start() -> Daemon {
        let mut child = cmd(&["daemon"])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start the daemon");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("daemon: {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let d = Daemon { child, lines };
        d.expect_line("watching for spfs runtimes", Duration::from_secs(10));
        d
    }

    /// The next line holding `what`, within `timeout`.
    fn expect_line(&self, what: &str, timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(what) => return line,
                Ok(_) => {}
                Err(_) => panic!("the daemon did not say {what:?} within {timeout:?}"),
            }
        }
    }

    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let id = self.child.id();
        wait_for(Duration::from_secs(5), || !alive(id));
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

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
                    .is_some_and(|c| c.contains("echo first > /spfs/first")),
            "the first write is attributed to the first command: {created}"
        );

        // The tracker ended with the runtime; its changelog is kept.
        let state = tracker_state_dir(&name);
        assert!(
            wait_for(Duration::from_secs(5), || !state
                .join("tracker.pid")
                .exists()),
            "the tracker of {name} ended with it"
        );
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
