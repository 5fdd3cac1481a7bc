//! Fixtures of the `track` acceptance tests: a runtime shaped like spfs's, living in a
//! private mount namespace of its own process, driven line by line from the test; a
//! guard that stops every tracker a test started; and readers of the CLI's answers.

// Each test crate uses a part of these.
#![allow(dead_code)]

use crate::common::{
    alive, bin, cmd, file_type, mount_ns, net_kind, no_ambient_target, ok, processes_in, s,
    sigkill, text, wait_for,
};
use crate::support::{LowerSpec, Truth, tracking::show};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// A temp dir under /tmp (the runtimes' tmpfs and overlay mount there), named for the
/// test file.
pub fn temp_dir(file: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("spfs-changes-{file}."))
        .tempdir_in("/tmp")
        .expect("temp dir")
}

pub fn own_mount_ns() -> u64 {
    std::fs::metadata("/proc/thread-self/ns/mnt")
        .expect("own mount namespace")
        .ino()
}

/// Waits up to `limit` for `pid` to end; returns how long it took, or `None`.
pub fn wait_gone(pid: u32, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while alive(pid) {
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(start.elapsed())
}

/// Script of the runtime process: mounts its tmpfs and overlay, says `ready`, then
/// runs each line read from stdin with `sh -c` (output to `$OUT`) and answers `rc N`.
const RUNTIME_SCRIPT: &str = r#"
set -e
mount -t tmpfs -o noexec,mode=0755 spfs-test-runtime "$RT"
mkdir "$RT/upper" "$RT/work" "$RT/lower"
mount -t overlay overlay -o "$OPTS" "$M"
set +e
cd /
echo ready
while IFS= read -r line; do
  sh -c "$line" </dev/null >"$OUT" 2>&1
  echo "rc $?"
done
"#;

/// A runtime shaped like spfs's: a process in its own private mount namespace with a
/// tmpfs at `<root>/rt` holding `upper/`, `work/` and `lower/`, and an overlay at
/// `<root>/mnt` over host lower layers and `<root>/rt/lower`. Neither mount is visible
/// outside. Commands run inside through [`FakeRuntime::run`], with `$M` (the mount),
/// `$RT`, `$T` (the test's temp dir) and `$BIN` (spfs-changes) set.
pub struct FakeRuntime {
    child: Child,
    stdin: Option<ChildStdin>,
    replies: BufReader<ChildStdout>,
    pub pid: u32,
    pub ns: u64,
    pub rt: PathBuf,
    pub mnt: PathBuf,
    /// Host lower layers of the current overlay, top-most first (`<rt>/lower` follows).
    pub lowers: Vec<PathBuf>,
    out: PathBuf,
}

impl FakeRuntime {
    /// Writes `spec` as one host lower layer at `<root>/lower` and starts the runtime.
    pub fn start(root: &Path, spec: &LowerSpec) -> FakeRuntime {
        let lower = root.join("lower");
        std::fs::create_dir(&lower).expect("mkdir lower");
        spec.write_layer(0, &lower);
        let rt = root.join("rt");
        let mnt = root.join("mnt");
        for d in [&rt, &mnt] {
            std::fs::create_dir(d).expect("mkdir");
        }
        let out = root.join("cmd.out");
        let err = root.join("runtime.err");
        let lowers = vec![lower];
        let mut unshare = Command::new("unshare");
        let mut child = no_ambient_target(&mut unshare)
            .args(["-m", "--propagation", "private", "sh", "-c", RUNTIME_SCRIPT])
            .env("RT", &rt)
            .env("M", &mnt)
            .env("T", root)
            .env("OUT", &out)
            .env("BIN", bin())
            .env("OPTS", overlay_options(&rt, &lowers))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&err).expect("create runtime.err"))
            .spawn()
            .expect("spawn unshare (util-linux)");
        let stdin = child.stdin.take();
        let mut replies = BufReader::new(child.stdout.take().expect("stdout"));
        let pid = child.id();
        let mut line = String::new();
        replies.read_line(&mut line).expect("read runtime's ready");
        let mut runtime = FakeRuntime {
            child,
            stdin,
            replies,
            pid,
            ns: 0,
            rt,
            mnt,
            lowers,
            out,
        };
        assert_eq!(
            line.trim(),
            "ready",
            "the runtime did not come up: {}",
            text(&std::fs::read(&err).unwrap_or_default())
        );
        runtime.ns = mount_ns(pid).expect("runtime's namespace");
        assert_ne!(
            runtime.ns,
            own_mount_ns(),
            "the runtime has its own namespace"
        );
        runtime
    }

    /// Runs `line` with `sh -c` inside the runtime; returns its exit code and output.
    pub fn exec(&mut self, line: &str) -> (i32, String) {
        assert!(!line.contains('\n'), "one line per command: {line:?}");
        let stdin = self.stdin.as_mut().expect("the runtime was ended");
        writeln!(stdin, "{line}").expect("send a command to the runtime");
        stdin.flush().expect("flush");
        let mut reply = String::new();
        self.replies.read_line(&mut reply).expect("read reply");
        let rc = reply
            .trim()
            .strip_prefix("rc ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("the runtime shell answered {reply:?} to {line:?}"));
        let out = std::fs::read(&self.out).unwrap_or_default();
        (rc, text(&out))
    }

    /// Runs `line` inside; panics with its output unless it exits 0.
    pub fn run(&mut self, line: &str) -> String {
        let (rc, out) = self.exec(line);
        assert_eq!(rc, 0, "inside the runtime, {line:?} failed:\n{out}");
        out
    }

    /// Mounts a new overlay over `host_lowers` on the same upper/work, after a plain
    /// (not lazy) unmount, as `spfs edit`/`commit`/`reset` do.
    pub fn remount(&mut self, host_lowers: Vec<PathBuf>) {
        let opts = overlay_options(&self.rt, &host_lowers);
        self.run(&format!(
            "umount \"$M\" && mount -t overlay overlay -o '{opts}' \"$M\""
        ));
        self.lowers = host_lowers;
    }

    /// The id mountinfo gives the overlay at `$M` now, in the runtime's namespace.
    pub fn mount_id(&self) -> u64 {
        let info = std::fs::read_to_string(format!("/proc/{}/mountinfo", self.pid))
            .expect("the runtime's mountinfo");
        let mnt = self.mnt.to_str().expect("utf-8 mount point");
        info.lines()
            .filter(|l| l.split(' ').nth(4) == Some(mnt))
            .filter_map(|l| l.split(' ').next()?.parse().ok())
            .next_back()
            .expect("the overlay in mountinfo")
    }

    /// A path of the runtime's namespace, as this process reaches it.
    pub fn reach(&self, p: &Path) -> PathBuf {
        Path::new(&format!("/proc/{}/root", self.pid)).join(p.strip_prefix("/").unwrap_or(p))
    }

    pub fn upper(&self) -> PathBuf {
        self.rt.join("upper")
    }

    /// The ground truth: a walk of the upper dir against the layers, through
    /// `/proc/<runtime pid>/root`.
    pub fn truth(&self) -> Truth {
        let mut lowers: Vec<PathBuf> = self.lowers.iter().map(|l| self.reach(l)).collect();
        lowers.push(self.reach(&self.rt.join("lower")));
        crate::support::truth(&self.reach(&self.upper()), &lowers)
    }

    /// Ends the runtime as spfs-monitor sees it end: its shell exits and every process
    /// left in its namespace is killed. Afterwards no process is in the namespace.
    pub fn end(&mut self) {
        drop(self.stdin.take());
        for pid in processes_in(self.ns) {
            if pid != self.pid {
                let _ = sigkill(pid);
            }
        }
        let _ = self.child.wait();
        assert!(
            wait_for(Duration::from_secs(5), || processes_in(self.ns).is_empty()),
            "processes left in the runtime's namespace: {:?}",
            processes_in(self.ns)
        );
    }
}

impl Drop for FakeRuntime {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            drop(self.stdin.take());
            for pid in processes_in(self.ns) {
                let _ = sigkill(pid);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The overlay options spfs uses, over `host_lowers` then `<rt>/lower`.
pub fn overlay_options(rt: &Path, host_lowers: &[PathBuf]) -> String {
    let mut lowers = host_lowers.to_vec();
    lowers.push(rt.join("lower"));
    tracker::setup::options(&lowers, &rt.join("upper"), &rt.join("work"))
        .unwrap_or_else(|e| panic!("overlay options: {e}"))
}

/// Stops, at the end of a test (also a failed one), every tracker the test started:
/// `spfs-changes stop --state`, then SIGKILL to whatever still runs.
pub struct Trackers {
    pub state: PathBuf,
    pids: Vec<u32>,
}

impl Trackers {
    pub fn new(state: &Path) -> Trackers {
        Trackers {
            state: state.to_path_buf(),
            pids: Vec::new(),
        }
    }

    /// `spfs-changes track ARGS --state <state>` from this (outer) namespace; asserts
    /// it reports a started tracker and returns its pid.
    pub fn track(&mut self, args: &[&str]) -> u32 {
        let mut c = cmd(&["track"]);
        c.args(args).args(["--state", s(&self.state)]);
        let out = ok(c);
        self.adopt_from(&out)
    }

    /// `track --pid <the runtime's pid> --mount <its mount>`, as spfs-monitor starts
    /// one (see [`Trackers::track`]).
    pub fn track_runtime(&mut self, rt: &FakeRuntime) -> u32 {
        self.track(&["--pid", &rt.pid.to_string(), "--mount", s(&rt.mnt)])
    }

    /// Takes the pid out of `tracking ... (tracker pid N, socket S)` and guards it.
    pub fn adopt_from(&mut self, printed: &str) -> u32 {
        let pid = tracker_pid(printed);
        self.pids.push(pid);
        pid
    }

    pub fn socket(&self) -> PathBuf {
        self.state.join("control.sock")
    }
}

/// `track --pid <the runtime's pid> --mount <its mount> --state <state>`, whatever it
/// answers (a tracker started this way is not guarded: see [`Trackers`]).
pub fn track_output(rt: &FakeRuntime, state: &Path) -> std::process::Output {
    crate::common::output(cmd(&[
        "track",
        "--pid",
        &rt.pid.to_string(),
        "--mount",
        s(&rt.mnt),
        "--state",
        s(state),
    ]))
}

/// The pid in `tracking ... (tracker pid N, socket S)`.
pub fn tracker_pid(printed: &str) -> u32 {
    assert_eq!(printed.lines().count(), 1, "one line expected: {printed:?}");
    assert!(printed.starts_with("tracking "), "printed {printed:?}");
    printed
        .split_once("(tracker pid ")
        .and_then(|(_, rest)| rest.split_once(','))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no tracker pid in {printed:?}"))
}

impl Drop for Trackers {
    fn drop(&mut self) {
        let _ = cmd(&["stop", "--state", s(&self.state)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Ok(p) = std::fs::read_to_string(self.state.join("tracker.pid"))
            && let Ok(pid) = p.trim().parse()
        {
            self.pids.push(pid);
        }
        for &pid in &self.pids {
            if wait_gone(pid, Duration::from_secs(3)).is_some() {
                continue;
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("spfs-changes") {
                let _ = sigkill(pid);
            }
        }
    }
}

/// The net state a `changes --json` document holds, in the shape of `Truth`, plus
/// the document.
pub fn net_state_of(doc: &serde_json::Value) -> Truth {
    let mount = doc["mount"].as_str().expect("mount in changes --json");
    let prefix = format!("{}/", mount.trim_end_matches('/'));
    doc["changes"]
        .as_array()
        .expect("changes array")
        .iter()
        .map(|c| {
            let full: Vec<u8> = match c.get("path_bytes") {
                Some(b) => serde_json::from_value(b.clone()).expect("path_bytes"),
                None => c["path"].as_str().expect("path").as_bytes().to_vec(),
            };
            let rel = full
                .strip_prefix(prefix.as_bytes())
                .unwrap_or_else(|| panic!("{} is not below {prefix}", text(&full)))
                .to_vec();
            let kind = c["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("net state entry without a kind: {c}"));
            let ft = file_type(c["type"].as_str().expect("type"));
            (rel, (net_kind(kind), ft))
        })
        .collect()
}

/// `changes --state <state> --json [--since S]` from outside, parsed.
pub fn changes_json(state: &Path, since: Option<&str>) -> serde_json::Value {
    let mut c = cmd(&["changes", "--state", s(state), "--json"]);
    if let Some(since) = since {
        c.args(["--since", since]);
    }
    serde_json::from_str(&ok(c)).expect("changes --json is JSON")
}

/// `changes --state <state>` (spfs diff style), lines sorted.
pub fn changes_lines(state: &Path) -> Vec<String> {
    let mut lines: Vec<String> = ok(cmd(&["changes", "--state", s(state)]))
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

/// Asserts the tracker's net state (as `changes --json` prints it) equals the truth.
pub fn assert_net_is_truth(rt: &FakeRuntime, state: &Path, context: &str) -> Truth {
    let got = net_state_of(&changes_json(state, None));
    let want = rt.truth();
    assert!(
        got == want,
        "{context}: tracker net state differs from the upper-walk truth\n  tracker: {}\n  truth:   {}\nupper dir:\n{}",
        show(&got),
        show(&want),
        crate::support::describe_tree(&rt.reach(&rt.upper()))
    );
    got
}

/// Sorted `spfs diff` lines for `(prefix, path)` pairs below `mnt`.
pub fn diff_lines(mnt: &Path, entries: &[&str]) -> Vec<String> {
    let m = s(mnt);
    let mut lines: Vec<String> = entries
        .iter()
        .map(|e| {
            let (sign, rest) = e.split_at(1);
            format!("{sign}{m}/{rest}")
        })
        .collect();
    lines.sort();
    lines
}
