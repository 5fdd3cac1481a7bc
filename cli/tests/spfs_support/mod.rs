//! Harness of the real-spfs tests (`spfs_real.rs`): real `spfs` runtimes (spfs 0.44,
//! installed by `install-real-spfs.sh --modinfo-shim`), tagged layers made per test,
//! a runtime kept alive and driven script by script from the test, and the two
//! references the tracker's answer is checked against:
//!
//! - **the upper-walk truth** ([`SpfsRuntime::truth`]): a walk of the runtime's upper dir
//!   against the lower layers the kernel mounted (read from the runtime's mountinfo),
//!   reached from outside through `/proc/<pid>/root`; the tracker's net state
//!   (`changes --json`) must equal it exactly (kind and type of every path);
//! - **`spfs diff`**, in spfs's own model, after the normalisation described at
//!   [`spfs_model_of`]: the same set of `(sign, path)` lines.
//!
//! Every test makes its own layers (tags below `spfs-changes-tests/<test>-<pid>-<time>-<n>/`,
//! so tests run in parallel) and its own runtimes; a runtime ends (its processes killed,
//! its tracker gone, its tracker state removed) when its [`SpfsRuntime`] is dropped,
//! also when the test fails.
#![allow(dead_code)]

use crate::common::{
    alive, bin, cmd, mount_ns, no_ambient_target, ok, processes_in, quote, sigkill, text, wait_for,
};
use crate::support::truth::{is_whiteout, lower_entry, lstat_opt};
use crate::support::{SplitMix, Truth, describe_tree, tracking::show};
use std::collections::BTreeSet;
use std::fs::{self, Metadata};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use store::{FileType, NetKind};

/// Where the tracker keeps the changelog of the spfs runtime named `name` when it is
/// started with no `--state` (README: `/var/lib/spfs-changes/runtimes/spfs-<name>`).
pub fn tracker_state_dir(name: &str) -> PathBuf {
    PathBuf::from(format!("/var/lib/spfs-changes/runtimes/spfs-{name}"))
}

/// The stand-in `modinfo` the installer puts there (`--modinfo-shim`); with it spfs
/// mounts with `lowerdir+=` per layer.
pub const MODINFO: &str = "/usr/sbin/modinfo";

// ---------------------------------------------------------------------------------
// Skip or run

/// True when real spfs can be used: root, and `spfs` and `spfs-enter` on PATH.
/// Otherwise prints `skipped: needs root` or `skipped: needs spfs` and returns false,
/// except under `CI=true`, where it panics: CI must run these tests, not skip them.
///
/// Usage: `if !need_spfs() { return; }`
pub fn need_spfs() -> bool {
    let missing = if !nix::unistd::geteuid().is_root() {
        Some("root")
    } else if on_path("spfs").is_none() || on_path("spfs-enter").is_none() {
        Some("spfs")
    } else {
        None
    };
    let Some(what) = missing else {
        return true;
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "this test needs {what} (root, and spfs and spfs-enter on PATH: \
             bash install-real-spfs.sh --modinfo-shim, as .ci/run does), and CI=true: \
             in CI tests must run, not skip"
        );
    }
    // Straight to fd 2: the test harness captures `eprintln!` of passing tests, and
    // a skip must be seen.
    let _ = io::stderr().write_all(format!("skipped: needs {what}\n").as_bytes());
    false
}

/// True when real spk can be used as well: [`need_spfs`], and `spk` on PATH
/// (`install-real-spfs.sh --with-spk`). Prints `skipped: needs spk` otherwise, and
/// panics under `CI=true`.
pub fn need_spk() -> bool {
    if !need_spfs() {
        return false;
    }
    if on_path("spk").is_some() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "this test needs spk on PATH (bash install-real-spfs.sh --modinfo-shim --with-spk, \
             as .ci/run does), and CI=true: in CI tests must run, not skip"
        );
    }
    let _ = io::stderr().write_all(b"skipped: needs spk\n");
    false
}

/// The first executable `name` on PATH.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// A name no other test (or run) uses: `<test>-<pid>-<time>-<n>`.
pub fn unique(test: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!(
        "{test}-{}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

// ---------------------------------------------------------------------------------
// The host daemon

/// One daemon at a time: two would both attach to each runtime.
static ONE_DAEMON: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The daemon, stopped (SIGTERM) and reaped when dropped.
pub struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
    _one: std::sync::MutexGuard<'static, ()>,
}

impl Daemon {
    /// Starts it and waits for it to say it watches.
    pub fn start() -> Daemon {
        let one = ONE_DAEMON.lock().unwrap_or_else(|e| e.into_inner());
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
        let d = Daemon {
            child,
            lines,
            _one: one,
        };
        d.expect_line("watching for spfs runtimes", Duration::from_secs(10));
        d
    }

    /// The next line holding `what`, within `timeout`.
    pub fn expect_line(&self, what: &str, timeout: Duration) -> String {
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

    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
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

// ---------------------------------------------------------------------------------
// spfs commands and layers

/// `spfs ARGS` with the test binary's dir first on PATH (so `spfs changes` inside a
/// runtime runs this build's `spfs-changes`), none of the test's own runtime or tracker
/// in its environment, and no colour in spfs's output.
pub fn spfs(args: &[&str]) -> Command {
    let mut c = Command::new("spfs");
    c.args(args);
    test_env(&mut c);
    c
}

/// The environment of the spfs (and spk) commands of the tests: see [`spfs`].
pub fn test_env(c: &mut Command) {
    let dir = bin().parent().expect("binary has a dir").to_path_buf();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![dir];
    dirs.extend(std::env::split_paths(&path));
    c.env("PATH", std::env::join_paths(dirs).expect("joinable PATH"));
    no_ambient_target(c);
    c.env_remove("SPFS_KEEP_RUNTIME")
        .env_remove("SPFS_LOG_FILE")
        .env("NO_COLOR", "1");
}

/// Makes a layer: runs `script` (`set -e`, cwd `/spfs`) in a new editable runtime over
/// `on` (`-`: an empty one) and commits what it changed as a layer tagged `tag`.
pub fn commit_layer(on: &str, script: &str, tag: &str) {
    let full = format!(
        "set -e\ncd /spfs\n{script}\nspfs commit layer -t {}\n",
        quote(tag)
    );
    ok(spfs(&["run", "--edit", on, "--", "sh", "-c", &full]));
}

/// The files of the base layer of [`Stack`] (spfs paths below `/spfs`).
pub const BASE_SCRIPT: &str = r#"
mkdir -p etc/sub d/sub keep mod bin
echo a > etc/a; echo b > etc/b; echo c > etc/c
echo x > etc/sub/x; echo y > etc/sub/y
echo dx > d/x; echo dy > d/sub/y
for i in 1 2 3 4 5; do echo "k$i" > "keep/k$i"; done
for i in 1 2 3; do echo "m$i" > "mod/m$i"; done
chmod 0755 mod/m3
ln -s etc/a link
cp "$(command -v sleep)" bin/sleeper
"#;

/// The top layer of [`Stack`]: deletes a file, a dir and another file of the base
/// (masks), changes one and adds one.
pub const TOP_SCRIPT: &str = r#"
rm etc/b keep/k5
rm -r d
echo 'm1 from top' > mod/m1
echo t > etc/t
"#;

/// The paths the top layer of [`Stack`] masks.
pub const MASKS: [&str; 3] = ["d", "etc/b", "keep/k5"];

/// Two tagged layers: `base` ([`BASE_SCRIPT`]) and `top` over it ([`TOP_SCRIPT`]),
/// which deletes [`MASKS`]: runtimes of `base+top` have masks (whiteouts spfs writes
/// into the upper dir at every mount).
pub struct Stack {
    pub base: String,
    pub top: String,
}

impl Stack {
    /// Makes the two layers, tagged `spfs-changes-tests/<unique(test)>/{base,top}`.
    pub fn new(test: &str) -> Stack {
        let prefix = format!("spfs-changes-tests/{}", unique(test));
        let stack = Stack {
            base: format!("{prefix}/base"),
            top: format!("{prefix}/top"),
        };
        commit_layer("-", BASE_SCRIPT, &stack.base);
        commit_layer(&stack.base, TOP_SCRIPT, &stack.top);
        stack
    }

    /// `base+top`, the reference to run.
    pub fn reference(&self) -> String {
        format!("{}+{}", self.base, self.top)
    }

    /// A runtime editing `base+top`, tracked from inside (`spfs changes track`).
    pub fn tracked_runtime(&self) -> SpfsRuntime {
        let mut rt = SpfsRuntime::start(&["--edit", &self.reference()]);
        rt.track_inside();
        rt
    }
}

// ---------------------------------------------------------------------------------
// Processes

fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

// ---------------------------------------------------------------------------------
// Mountinfo

/// How spfs gave the overlay its lower layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LowerForm {
    /// `lowerdir+=L` once per layer (spfs does this when `modinfo overlay` answers).
    Append,
    /// One `lowerdir=a:b:c` (when it does not).
    Colon,
}

/// The overlay at `/spfs` as a mountinfo line shows it (parsed here, independently of
/// the tracker's parser).
#[derive(Debug, Clone)]
pub struct OverlayMount {
    pub line: String,
    pub form: LowerForm,
    /// Lower dirs, top-most first, as the runtime's namespace names them.
    pub lowers: Vec<String>,
    pub upper: String,
    pub work: String,
}

/// Undoes the kernel's `\ooo` octal escapes of a mountinfo field. The kernel escapes
/// every backslash, so each one starts an escape: the text between two of them is an
/// escape's three digits and then plain text. (Not the tracker's byte scan, on
/// purpose: this parser is the tests' own reference.)
fn unescape_mountinfo(field: &str) -> String {
    let mut parts = field.split('\\');
    let mut out = parts.next().unwrap_or_default().as_bytes().to_vec();
    for part in parts {
        let digits = part
            .get(..3)
            .filter(|d| d.bytes().all(|c| c.is_ascii_digit()));
        match digits.and_then(|d| u8::from_str_radix(d, 8).ok()) {
            Some(byte) => {
                out.push(byte);
                out.extend_from_slice(&part.as_bytes()[3..]);
            }
            None => {
                out.push(b'\\');
                out.extend_from_slice(part.as_bytes());
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The last overlay mounted at `/spfs` in a mountinfo text, if any.
pub fn spfs_overlay(mountinfo: &str) -> Option<OverlayMount> {
    mountinfo.lines().rev().find_map(parse_spfs_line)
}

fn parse_spfs_line(line: &str) -> Option<OverlayMount> {
    let (left, right) = line.split_once(" - ")?;
    if left.split(' ').nth(4).map(unescape_mountinfo).as_deref() != Some("/spfs") {
        return None;
    }
    let mut right = right.split(' ');
    if right.next()? != "overlay" {
        return None;
    }
    let options = right.nth(1)?;
    let (mut appended, mut colon, mut upper, mut work) = (Vec::new(), None, None, None);
    for opt in options.split(',') {
        if let Some(v) = opt.strip_prefix("lowerdir+=") {
            appended.push(unescape_mountinfo(v));
        } else if let Some(v) = opt.strip_prefix("lowerdir=") {
            colon = Some(unescape_mountinfo(v));
        } else if let Some(v) = opt.strip_prefix("upperdir=") {
            upper = Some(unescape_mountinfo(v));
        } else if let Some(v) = opt.strip_prefix("workdir=") {
            work = Some(unescape_mountinfo(v));
        }
    }
    let (form, lowers) = match (appended.is_empty(), colon) {
        (false, None) => (LowerForm::Append, appended),
        (true, Some(c)) => (LowerForm::Colon, c.split(':').map(str::to_string).collect()),
        _ => panic!("an overlay at /spfs with no or both lower forms: {line}"),
    };
    Some(OverlayMount {
        line: line.to_string(),
        form,
        lowers,
        upper: upper.unwrap_or_default(),
        work: work.unwrap_or_default(),
    })
}

// ---------------------------------------------------------------------------------
// A live runtime

/// The runtime's shell: says `ready <pid> <runtime name>`, then runs each script file
/// whose path it reads from stdin (stdout and stderr to `<file>.out`, `<file>.err`) and
/// answers `rc N`. It ends when stdin closes: dropping the [`SpfsRuntime`] ends it.
const LOOP: &str = r#"
cd /
echo "ready $$ $SPFS_RUNTIME"
while IFS= read -r script; do
  sh "$script" </dev/null >"$script.out" 2>"$script.err"
  echo "rc $?"
done
"#;

/// What a script run inside printed, and how it ended.
#[derive(Debug)]
pub struct Ran {
    pub rc: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A real spfs runtime (`spfs run ARGS -- sh -c LOOP`), alive until dropped, driven
/// from the test: [`SpfsRuntime::exec`] runs a script inside (any length; with `$T`,
/// a scratch dir of the test on the host, and PATH starting with the test binary's
/// dir, so `spfs changes` is this build), and its upper dir and mounts are read from
/// outside through `/proc/<pid>/root`. The runtime lives as long as its shell: the
/// shell blocks reading its stdin, a pipe from the test.
pub struct SpfsRuntime {
    child: Child,
    stdin: Option<ChildStdin>,
    replies: BufReader<ChildStdout>,
    /// The runtime's shell (in the runtime's mount namespace).
    pub pid: u32,
    /// `SPFS_RUNTIME`, the runtime's name.
    pub name: String,
    pub ns: u64,
    /// The whiteouts spfs wrote into the upper dir when it mounted it (the masks of
    /// the stack), relative to `/spfs`.
    pub masks: BTreeSet<String>,
    scratch: tempfile::TempDir,
    scripts: u32,
    /// Keep the tracker's state dir when dropped (a durable runtime runs again).
    pub keep_tracker_state: bool,
}

impl SpfsRuntime {
    /// `spfs run RUN_ARGS -- sh -c LOOP` (for instance `["--edit", "a+b"]`).
    pub fn start(run_args: &[&str]) -> SpfsRuntime {
        let scratch = scratch_dir();
        SpfsRuntime::launch(scratch, &[], run_args)
    }

    /// As [`SpfsRuntime::start`], but spfs runs in a private mount namespace where a
    /// script that fails is bind-mounted over `/usr/sbin/modinfo`: spfs then thinks
    /// `lowerdir+=` is not supported and mounts with `lowerdir=a:b:c`.
    pub fn start_without_modinfo(run_args: &[&str]) -> SpfsRuntime {
        assert!(
            Path::new(MODINFO).exists(),
            "{MODINFO} is missing: install spfs with install-real-spfs.sh --modinfo-shim"
        );
        let scratch = scratch_dir();
        let failing = scratch.path().join("modinfo-fails");
        fs::write(
            &failing,
            "#!/bin/sh\necho 'modinfo: not here' >&2\nexit 1\n",
        )
        .expect("write the failing modinfo");
        fs::set_permissions(&failing, fs::Permissions::from_mode(0o755))
            .expect("chmod the failing modinfo");
        let failing = failing.to_str().expect("UTF-8 scratch path").to_string();
        let wrapper = [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount --bind \"$0\" /usr/sbin/modinfo && exec \"$@\"",
            &failing,
            "spfs",
        ];
        SpfsRuntime::launch(scratch, &wrapper, run_args)
    }

    fn launch(scratch: tempfile::TempDir, wrapper: &[&str], run_args: &[&str]) -> SpfsRuntime {
        let mut c = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args);
                c
            }
            None => Command::new("spfs"),
        };
        c.arg("run")
            .args(run_args)
            .args(["--", "sh", "-c", LOOP])
            .env("T", scratch.path());
        test_env(&mut c);
        let err = scratch.path().join("runtime.err");
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&err).expect("create runtime.err"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {c:?}: {e}"));
        let stdin = child.stdin.take();
        let mut replies = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut before = String::new();
        let ready = loop {
            let mut line = String::new();
            let n = replies
                .read_line(&mut line)
                .expect("read the runtime's stdout");
            if n == 0 {
                let _ = child.wait();
                panic!(
                    "the runtime did not come up ({c:?}):\n--- stdout\n{before}\n--- stderr\n{}",
                    text(&fs::read(&err).unwrap_or_default())
                );
            }
            if let Some(rest) = line.trim().strip_prefix("ready ") {
                break rest.to_string();
            }
            before.push_str(&line);
        };
        let (pid, name) = ready
            .split_once(' ')
            .and_then(|(p, n)| Some((p.parse::<u32>().ok()?, n.to_string())))
            .unwrap_or_else(|| panic!("bad ready line {ready:?}"));
        assert!(!name.is_empty(), "no SPFS_RUNTIME in the runtime");
        let ns = mount_ns(pid).expect("the runtime's namespace");
        let mut rt = SpfsRuntime {
            child,
            stdin,
            replies,
            pid,
            name,
            ns,
            masks: BTreeSet::new(),
            scratch,
            scripts: 0,
            keep_tracker_state: false,
        };
        rt.masks = whiteouts(&rt.upper());
        rt
    }

    /// The test's scratch dir (`$T` inside).
    pub fn scratch(&self) -> &Path {
        self.scratch.path()
    }

    /// Runs `script` with `sh` inside the runtime (cwd `/`).
    pub fn exec(&mut self, script: &str) -> Ran {
        self.scripts += 1;
        let file = self
            .scratch
            .path()
            .join(format!("script-{}.sh", self.scripts));
        fs::write(&file, script).expect("write a script for the runtime");
        let stdin = self.stdin.as_mut().expect("the runtime was ended");
        let line = file.to_str().expect("UTF-8 scratch path");
        writeln!(stdin, "{line}").expect("send a script to the runtime");
        stdin.flush().expect("flush the runtime's stdin");
        let mut reply = String::new();
        self.replies
            .read_line(&mut reply)
            .expect("read the runtime's reply");
        let rc = reply
            .trim()
            .strip_prefix("rc ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "the runtime's shell answered {reply:?} to {script:?}; its stderr:\n{}",
                    text(&fs::read(self.scratch.path().join("runtime.err")).unwrap_or_default())
                )
            });
        let read = |ext: &str| text(&fs::read(format!("{line}.{ext}")).unwrap_or_default());
        Ran {
            rc,
            stdout: read("out"),
            stderr: read("err"),
        }
    }

    /// Runs `script` inside; panics with its output unless it exits 0. Returns stdout.
    pub fn run(&mut self, script: &str) -> String {
        let ran = self.exec(script);
        assert_eq!(
            ran.rc, 0,
            "inside the runtime, {script:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            ran.rc, ran.stdout, ran.stderr
        );
        ran.stdout
    }

    /// `/proc/<pid>/root`: the runtime's `/` from outside.
    pub fn root(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid))
    }

    /// A path of the runtime's namespace, as the test reaches it.
    pub fn reach(&self, p: impl AsRef<Path>) -> PathBuf {
        let p = p.as_ref();
        self.root().join(p.strip_prefix("/").unwrap_or(p))
    }

    /// The overlay at `/spfs` now, from the runtime's mountinfo.
    pub fn overlay(&self) -> OverlayMount {
        let info = fs::read_to_string(format!("/proc/{}/mountinfo", self.pid))
            .expect("read the runtime's mountinfo");
        spfs_overlay(&info).unwrap_or_else(|| panic!("no overlay at /spfs in:\n{info}"))
    }

    pub fn upper(&self) -> PathBuf {
        self.reach(self.overlay().upper)
    }

    /// The lower dirs of the overlay now, top-most first, reached from outside.
    pub fn lowers(&self) -> Vec<PathBuf> {
        self.overlay()
            .lowers
            .iter()
            .map(|l| self.reach(l))
            .collect()
    }

    /// The merged view, `/spfs`, reached from outside.
    pub fn merged(&self) -> PathBuf {
        self.reach("/spfs")
    }

    /// The ground truth: a walk of the upper dir against the lower layers mounted now
    /// (`tests/support/truth.rs`).
    pub fn truth(&self) -> Truth {
        crate::support::truth(&self.upper(), &self.lowers())
    }

    /// The upper dir, entry by entry (for failure messages).
    pub fn describe_upper(&self) -> String {
        describe_tree(&self.upper())
    }

    /// What spfs sees below the mount: the lower layers mounted now, the masks of the
    /// stack, and the merged view.
    pub fn stack_view(&self) -> StackView {
        StackView {
            lowers: self.lowers(),
            masks: self.masks.clone(),
            merged: self.merged(),
        }
    }

    /// `spfs changes changes --json` inside, parsed.
    pub fn changes(&mut self) -> serde_json::Value {
        parse_json(
            &self.run("spfs changes changes --json"),
            "spfs changes changes --json",
        )
    }

    /// `spfs diff` inside: its stdout.
    pub fn spfs_diff(&mut self) -> String {
        self.run("spfs diff")
    }

    /// `spfs changes track` inside; asserts it reports a tracker of `/spfs` and returns
    /// its pid.
    pub fn track_inside(&mut self) -> u32 {
        let printed = self.run("spfs changes track");
        tracker_pid(&printed)
    }

    /// Where the tracker keeps this runtime's changelog by default.
    pub fn tracker_state(&self) -> PathBuf {
        tracker_state_dir(&self.name)
    }

    /// Asserts the tracker's net state in `doc` (a `changes --json` answer) equals the
    /// upper-walk truth; returns it.
    pub fn assert_net_is_truth(&self, doc: &serde_json::Value, context: &str) -> Truth {
        let got = net_state(doc);
        let want = self.truth();
        assert!(
            got == want,
            "{context}: the tracker's net state differs from the upper-walk truth\n  \
             only in tracker: {}\n  only in truth:   {}\n  tracker: {}\n  truth:   {}\n\
             overlay: {}\nupper dir:\n{}",
            show(&minus(&got, &want)),
            show(&minus(&want, &got)),
            show(&got),
            show(&want),
            self.overlay().line,
            self.describe_upper()
        );
        got
    }

    /// Asserts the tracker's net state (a fresh `spfs changes changes --json` from
    /// inside) equals the upper-walk truth; returns it.
    pub fn assert_changes_are_truth(&mut self, context: &str) -> Truth {
        let doc = self.changes();
        self.assert_net_is_truth(&doc, context)
    }

    /// Runs `command` inside (its stdout to stderr) and, in the same script at once
    /// after it, `spfs changes changes --json`; asserts that answer's net state equals
    /// the upper-walk truth; returns it.
    pub fn assert_truth_right_after(&mut self, command: &str, context: &str) -> Truth {
        let out = self.run(&format!("{command} >&2 && spfs changes changes --json"));
        let doc = parse_json(&out, &format!("changes --json right after {command}"));
        self.assert_net_is_truth(&doc, context)
    }

    /// Asserts `doc` (a `changes --json` answer) says what `diff` (`spfs diff`'s
    /// stdout) says, in spfs's model (see [`spfs_model_of`]).
    pub fn assert_matches_spfs_diff(&self, doc: &serde_json::Value, diff: &str, context: &str) {
        let view = self.stack_view();
        let ours = spfs_model_of(doc, &view);
        let theirs = parse_spfs_diff(diff);
        assert!(
            ours == theirs,
            "{context}: the tracker's changes, in spfs's model, differ from `spfs diff`\n  \
             only in ours: {:?}\n  only in spfs diff: {:?}\n--- spfs diff\n{diff}\n\
             --- changes (sign, path)\n{:?}\n--- masks {:?}\n--- upper dir\n{}",
            ours.difference(&theirs).collect::<Vec<_>>(),
            theirs.difference(&ours).collect::<Vec<_>>(),
            signs_of(doc),
            self.masks,
            self.describe_upper()
        );
    }

    /// `spfs changes`, `spfs diff` and `spfs changes --all` inside, one after the
    /// other with nothing between them: their stdouts.
    pub fn listings(&mut self) -> Listings {
        let out = self.run(
            "spfs changes; echo '@@ spfs diff'; spfs diff 2>/dev/null; echo '@@ --all'; spfs changes --all",
        );
        let (ours, rest) = out
            .split_once("@@ spfs diff\n")
            .unwrap_or_else(|| panic!("the three listings, got:\n{out}"));
        let (spfs, all) = rest
            .split_once("@@ --all\n")
            .unwrap_or_else(|| panic!("the three listings, got:\n{out}"));
        Listings {
            ours: ours.to_string(),
            spfs: spfs.to_string(),
            all: all.to_string(),
        }
    }

    /// Asserts `spfs changes` prints exactly what `spfs diff` prints, byte for byte,
    /// and that `--all` prints the same lines in the same order with only touched
    /// paths between them.
    pub fn assert_prints_as_spfs_diff(&mut self, context: &str) {
        let l = self.listings();
        assert!(
            l.ours == l.spfs,
            "{context}: `spfs changes` differs from `spfs diff`\n{}\n--- masks {:?}\n--- upper dir\n{}",
            line_diff(&l.spfs, &l.ours),
            self.masks,
            self.describe_upper()
        );
        let extra = touched_lines(&l.ours, &l.all)
            .unwrap_or_else(|why| panic!("{context}: `spfs changes --all`: {why}\n{}", l.all));
        for line in extra {
            let details = line.split_once(" [").map(|(_, d)| d).unwrap_or("");
            assert!(
                line.trim_start().starts_with('~')
                    && details
                        .trim_end_matches(']')
                        .split(", ")
                        .all(|d| d == "touched"
                            || d == "mtime"
                            || d == "xattrs"
                            || d.starts_with("owner {")),
                "{context}: `--all` added a line that is not a touched path: {line}"
            );
        }
    }

    /// Both checks on a fresh `spfs changes changes --json` and `spfs diff` from
    /// inside, and the text listings byte for byte; returns the JSON answer.
    pub fn assert_consistent(&mut self, context: &str) -> serde_json::Value {
        let doc = self.changes();
        self.assert_net_is_truth(&doc, context);
        let diff = self.spfs_diff();
        self.assert_matches_spfs_diff(&doc, &diff, context);
        self.assert_prints_as_spfs_diff(context);
        // Shown with --nocapture or when the test fails.
        eprintln!(
            "{context}: {} changes, {} spfs diff lines agree",
            changes_of(&doc).len(),
            parse_spfs_diff(&diff).len()
        );
        doc
    }

    /// Ends the runtime: closes the shell's stdin, kills what is left in its namespace
    /// (but spfs-monitor, which then cleans up), waits for its tracker to exit and
    /// removes the tracker's state (unless `keep_tracker_state`).
    pub fn end(&mut self) {
        if self.stdin.is_none() {
            return;
        }
        drop(self.stdin.take());
        // The shell exits on EOF once the script it runs (if any) is done; what scripts
        // left running in the background (sleeps of the busy tests) is killed by pid.
        let _ = wait_for(Duration::from_secs(5), || !alive(self.pid));
        for pid in processes_in(self.ns) {
            if comm(pid) != "spfs-monitor" {
                let _ = sigkill(pid);
            }
        }
        let _ = self.child.wait();
        let state = self.tracker_state();
        let tracker = fs::read_to_string(state.join("tracker.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        if let Some(pid) = tracker {
            // It exits within 2 s once no process is left in the runtime's namespace.
            if !wait_for(Duration::from_secs(5), || !alive(pid)) {
                let _ = crate::common::cmd(&["stop", "--state", state.to_str().unwrap_or("")])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                if !wait_for(Duration::from_secs(3), || !alive(pid))
                    && text(&fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
                        .contains("spfs-changes")
                {
                    let _ = sigkill(pid);
                }
            }
        }
        if !self.keep_tracker_state {
            let _ = fs::remove_dir_all(&state);
        }
    }
}

impl Drop for SpfsRuntime {
    fn drop(&mut self) {
        self.end();
    }
}

/// The stdouts of `spfs changes`, `spfs diff` and `spfs changes --all`.
pub struct Listings {
    pub ours: String,
    pub spfs: String,
    pub all: String,
}

/// The lines of `b` and `a` that differ, each marked (`-` only in `a`, `+` only in
/// `b`), with their line numbers.
pub fn line_diff(a: &str, b: &str) -> String {
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let mut out = String::new();
    for i in 0..la.len().max(lb.len()) {
        let (x, y) = (la.get(i), lb.get(i));
        if x != y {
            out.push_str(&format!(
                "line {}: spfs diff {:?}\n        spfs changes {:?}\n",
                i + 1,
                x,
                y
            ));
        }
    }
    if out.is_empty() && a != b {
        out.push_str("(the same lines; the bytes differ at the end)");
    }
    out
}

/// The lines `all` holds beyond `base`, when `base`'s lines are all in it in the same
/// order.
fn touched_lines<'a>(base: &str, all: &'a str) -> Result<Vec<&'a str>, String> {
    let mut wanted = base.lines().peekable();
    let mut extra = Vec::new();
    for line in all.lines() {
        if wanted.peek() == Some(&line) {
            wanted.next();
        } else {
            extra.push(line);
        }
    }
    match wanted.next() {
        None => Ok(extra),
        Some(missing) => Err(format!("lacks, or misplaces, {missing:?}")),
    }
}

fn scratch_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("spfs-changes-spfs-real.")
        .tempdir_in("/tmp")
        .expect("a scratch dir in /tmp")
}

/// The pid in `tracking ... (tracker pid N, socket S)`.
pub fn tracker_pid(printed: &str) -> u32 {
    assert!(
        printed.starts_with("tracking /spfs "),
        "`track` printed {printed:?}"
    );
    printed
        .split_once("(tracker pid ")
        .and_then(|(_, rest)| rest.split_once(','))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no tracker pid in {printed:?}"))
}

/// A durable runtime's name: [`DurableRuntime::remove`] (or the drop, also when the
/// test fails) removes it from the repository (`spfs runtime remove --remove-durable
/// NAME`) and deletes its tracker state.
pub struct DurableRuntime {
    pub name: String,
    removed: bool,
}

impl DurableRuntime {
    pub fn new(test: &str) -> DurableRuntime {
        DurableRuntime {
            name: unique(test),
            removed: false,
        }
    }

    /// Removes the runtime; true when spfs no longer lists it.
    pub fn remove(&mut self) -> bool {
        self.removed = true;
        let quiet = |c: &mut Command| {
            c.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let remove = ["runtime", "remove", "--remove-durable"];
        if !quiet(spfs(&remove).arg(&self.name)) {
            quiet(spfs(&remove).args(["--force", &self.name]));
        }
        let _ = fs::remove_dir_all(tracker_state_dir(&self.name));
        let listed = spfs(&["runtime", "list"])
            .stdin(Stdio::null())
            .output()
            .map(|o| text(&o.stdout))
            .unwrap_or_default();
        !listed
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&self.name))
    }
}

impl Drop for DurableRuntime {
    fn drop(&mut self) {
        if !self.removed {
            self.remove();
        }
    }
}

// ---------------------------------------------------------------------------------
// Answers of the tracker

pub fn parse_json(out: &str, what: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{what} printed no JSON ({e}):\n{out}"))
}

fn rel_of(c: &serde_json::Value, mount: &str) -> String {
    let path = c["path"]
        .as_str()
        .unwrap_or_else(|| panic!("a change without a path: {c}"));
    let prefix = format!("{}/", mount.trim_end_matches('/'));
    path.strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{path} is not below {prefix}"))
        .to_string()
}

/// `(relative path, kind, type)` of each change in a `changes --json` answer.
pub fn changes_of(doc: &serde_json::Value) -> Vec<(String, NetKind, FileType)> {
    let mount = doc["mount"].as_str().expect("mount in changes --json");
    doc["changes"]
        .as_array()
        .unwrap_or_else(|| panic!("no changes array in {doc}"))
        .iter()
        .map(|c| {
            let kind = c["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("net state entry without a kind: {c}"));
            let ty = c["type"].as_str().unwrap_or_else(|| panic!("no type: {c}"));
            (
                rel_of(c, mount),
                crate::common::net_kind(kind),
                crate::common::file_type(ty),
            )
        })
        .collect()
}

/// The net state a `changes --json` answer holds, in the shape of `Truth`.
pub fn net_state(doc: &serde_json::Value) -> Truth {
    changes_of(doc)
        .into_iter()
        .map(|(p, k, t)| (p.into_bytes(), (k, t)))
        .collect()
}

fn minus(a: &Truth, b: &Truth) -> Truth {
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

/// A change as `spfs diff` prints it: sign (`+`, `-`, `~`) and path below `/spfs`.
pub type Line = (char, String);

/// `changes --json` as signs: added `+`, removed `-`, modified, metadata and replaced
/// `~` (no normalisation).
pub fn signs_of(doc: &serde_json::Value) -> BTreeSet<Line> {
    changes_of(doc)
        .into_iter()
        .map(|(p, k, _)| (sign(k), p))
        .collect()
}

fn sign(k: NetKind) -> char {
    match k {
        NetKind::Added => '+',
        NetKind::Removed => '-',
        _ => '~',
    }
}

/// The lines of `spfs diff`'s stdout as `(sign, path)`, but the detail-less `~` lines:
/// spfs prints `~/spfs/dir` for every dir below which something changed (its entries
/// differ), which is no change of the dir itself. A `~` line with details
/// (`[mode ...]`, `[content ...]`) is kept: those are the dir's (or file's) own.
pub fn parse_spfs_diff(out: &str) -> BTreeSet<Line> {
    let mut lines = BTreeSet::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let mut chars = line.chars();
        let sign = chars.next().expect("non-empty line");
        let rest = chars.as_str();
        assert!(
            matches!(sign, '+' | '-' | '~') && rest.starts_with("/spfs"),
            "not a spfs diff line: {line:?} in:\n{out}"
        );
        let (path, detail) = match rest.split_once(" [") {
            Some((p, _)) => (p, true),
            None => (rest, false),
        };
        let rel = path.trim_start_matches("/spfs").trim_start_matches('/');
        if sign == '~' && !detail {
            continue;
        }
        lines.insert((sign, rel.to_string()));
    }
    lines
}

/// True when a line of `diff` (`spfs diff`'s stdout; any sign, with details or
/// without) is about `/spfs/<rel>`.
pub fn diff_mentions(diff: &str, rel: &str) -> bool {
    let path = format!("/spfs/{rel}");
    diff.lines()
        .any(|l| l.get(1..).and_then(|l| l.split(" [").next()) == Some(path.as_str()))
}

// ---------------------------------------------------------------------------------
// spfs's model

/// What spfs's runtime manifest holds at a path.
#[derive(Debug)]
pub enum Stacked {
    /// Nothing: in no layer, or below a mask.
    Absent,
    /// A mask: a later layer deleted it (spfs prints `-` for it while it is absent from
    /// `/spfs`, `~` once something is there again).
    Mask,
    /// This entry of a lower layer.
    Entry(PathBuf, Metadata),
}

/// The stack as spfs sees it (layers with masks) and the merged view, to put the
/// tracker's answer in spfs's model.
pub struct StackView {
    pub lowers: Vec<PathBuf>,
    pub masks: BTreeSet<String>,
    pub merged: PathBuf,
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

/// The whiteouts below `dir` (relative paths), not descending into opaque dirs' lower
/// side (they are the masks spfs wrote when it mounted a fresh upper dir).
pub fn whiteouts(dir: &Path) -> BTreeSet<String> {
    fn go(dir: &Path, rel: &str, out: &mut BTreeSet<String>) {
        let Ok(entries) = fs::read_dir(dir.join(rel)) else {
            return;
        };
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            let r = join(rel, &name);
            match lstat_opt(&dir.join(&r)) {
                Some(m) if is_whiteout(&m) => {
                    out.insert(r);
                }
                Some(m) if m.is_dir() => go(dir, &r, out),
                _ => {}
            }
        }
    }
    let mut out = BTreeSet::new();
    go(dir, "", &mut out);
    out
}

impl StackView {
    /// What the runtime's manifest holds at `rel`: a mask, absent below a mask, else
    /// the top-most lower layer's entry (a whiteout, or a non-dir or opaque dir above
    /// it in a layer, hides the layers below, as overlayfs does).
    pub fn entry(&self, rel: &str) -> Stacked {
        if self.masks.contains(rel) {
            return Stacked::Mask;
        }
        let comps: Vec<&str> = rel.split('/').collect();
        for i in 1..comps.len() {
            if self.masks.contains(&comps[..i].join("/")) {
                return Stacked::Absent;
            }
        }
        match lower_entry(&self.lowers, rel.as_bytes()) {
            Some((p, m)) => Stacked::Entry(p, m),
            None => Stacked::Absent,
        }
    }

    /// Names the stack may hold below the dir `rel`: entries of any lower layer there,
    /// and masks directly below it (check each with [`StackView::entry`]).
    fn child_names(&self, rel: &str) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for layer in &self.lowers {
            let dir = if rel.is_empty() {
                layer.clone()
            } else {
                layer.join(rel)
            };
            if let Ok(entries) = fs::read_dir(&dir) {
                names.extend(
                    entries
                        .filter_map(Result::ok)
                        .map(|e| e.file_name().to_string_lossy().into_owned()),
                );
            }
        }
        for m in &self.masks {
            if let Some((parent, name)) = m.rsplit_once('/').or(Some(("", m.as_str())))
                && parent == rel
            {
                names.insert(name.to_string());
            }
        }
        names
    }

    fn merged_meta(&self, rel: &str) -> Option<Metadata> {
        lstat_opt(&self.merged.join(rel))
    }

    /// True when spfs sees a difference between the stack's `stacked` entry at `rel`
    /// and what `/spfs` holds there: kind, mode (all bits), bytes of files, targets of
    /// symlinks. Not owners or times: spfs's manifests hold neither.
    fn differs(&self, rel: &str, stacked: &Stacked) -> bool {
        let Some(now) = self.merged_meta(rel) else {
            return true;
        };
        let (lower_path, before) = match stacked {
            Stacked::Entry(p, m) => (p, m),
            _ => return true,
        };
        let merged_path = self.merged.join(rel);
        if before.file_type() != now.file_type() {
            return true;
        }
        let mode_differs = before.mode() & 0o7777 != now.mode() & 0o7777;
        let ft = now.file_type();
        if ft.is_dir() {
            mode_differs
        } else if ft.is_symlink() {
            fs::read_link(lower_path).ok() != fs::read_link(&merged_path).ok()
        } else if ft.is_file() {
            mode_differs
                || before.size() != now.size()
                || fs::read(lower_path).ok() != fs::read(&merged_path).ok()
        } else {
            mode_differs || before.rdev() != now.rdev()
        }
    }

    /// Adds `-q` for every path below the dir `rel` that the stack holds and `/spfs`
    /// no longer does (and `~q`-free recursion into what is still a dir on both sides).
    fn expand_gone(&self, rel: &str, out: &mut BTreeSet<Line>) {
        for name in self.child_names(rel) {
            let q = join(rel, &name);
            let stacked = self.entry(&q);
            let gone = self.merged_meta(&q).is_none();
            match &stacked {
                Stacked::Absent => {}
                Stacked::Mask => {
                    if gone {
                        out.insert(('-', q));
                    }
                }
                Stacked::Entry(_, m) => {
                    if gone {
                        out.insert(('-', q.clone()));
                    }
                    if m.is_dir() {
                        self.expand_gone(&q, out);
                    }
                }
            }
        }
    }
}

/// The tracker's answer `doc` (`changes --json`) in spfs's model, as `(sign, path)`,
/// to compare with [`parse_spfs_diff`] of `spfs diff`.
///
/// The two models differ in three ways, and this normalisation bridges them:
///
/// 1. **Dirs gone or replaced.** `changes` prints a removed dir as one `-dir` line and a
///    replaced dir (opaque, or another type now) as one `~dir` line with what is in it
///    now as added; spfs diff lists every entry of the stack below such a dir as `-`
///    (masks below it too). So each removed or replaced path is expanded with `-q`
///    for every `q` the stack (lower layers and masks) holds below it and `/spfs` no
///    longer does ([`StackView::expand_gone`]).
/// 2. **Detail-less dir lines.** spfs diff prints `~/spfs/dir` for every dir below
///    which something changed; `changes` does not (the dir itself did not change).
///    Those lines are dropped from spfs's side ([`parse_spfs_diff`]); a dir's own
///    change (`~/spfs/dir [mode ...]`) stays on both sides.
/// 3. **What spfs can see.** spfs compares with the runtime's manifest (layers with
///    masks), by kind, mode and content only. So a `metadata` change (owner, mtime,
///    xattrs) is `~` only when the mode differs; a path `changes` calls added or
///    replaced that the stack holds (below a replaced dir) is `~` only where spfs sees
///    a difference, else nothing; a path below a mask is `+` (spfs: absent), and a
///    masked path that holds something again is `~` (spfs: mask => entry).
///
/// `modified` stays `~` and `removed` stays `-`, whatever the filesystem says: the
/// path sets are the tracker's, the filesystem only decides what spfs can see.
pub fn spfs_model_of(doc: &serde_json::Value, view: &StackView) -> BTreeSet<Line> {
    let mut out = BTreeSet::new();
    for (rel, kind, _) in changes_of(doc) {
        if kind == NetKind::Removed {
            out.insert(('-', rel.clone()));
            if matches!(view.entry(&rel), Stacked::Entry(_, ref m) if m.is_dir()) {
                view.expand_gone(&rel, &mut out);
            }
            continue;
        }
        let stacked = view.entry(&rel);
        match &stacked {
            Stacked::Absent => {
                out.insert(('+', rel.clone()));
            }
            Stacked::Mask => {
                out.insert(('~', rel.clone()));
            }
            Stacked::Entry(_, m) => {
                if kind == NetKind::Modified || view.differs(&rel, &stacked) {
                    out.insert(('~', rel.clone()));
                }
                if m.is_dir() && matches!(kind, NetKind::Replaced | NetKind::Added) {
                    view.expand_gone(&rel, &mut out);
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// Random operations

/// Picks one of `items`, which is never empty here.
fn pick<'a>(rng: &mut SplitMix, items: &[&'a str]) -> &'a str {
    rng.pick(items).expect("a non-empty list")
}

/// Dirs the random operations work in (below `/spfs`): of the base layer, masked by
/// the top layer (`d`, `d/sub`), and new ones.
const DIRS: [&str; 9] = [
    "etc", "etc/sub", "d", "d/sub", "keep", "mod", "new", "new/deep", "bin",
];
/// Names in those dirs: many exist in the layers (`a`, `b`, `c`, `x`, `y`, `k1`, ...).
const NAMES: [&str; 12] = [
    "a", "b", "c", "t", "x", "y", "k1", "k2", "k5", "m1", "m3", "n",
];
/// Masked paths of [`Stack`] and paths below them, to recreate.
const MASKED: [&str; 5] = ["etc/b", "keep/k5", "d/x", "d/sub/y", "d"];

/// `ops` random shell operations over [`Stack`]'s tree, one a line, each allowed to
/// fail (a path may not exist): creates, overwrites, appends, chmods, chowns, touches,
/// rm, rm -rf of dirs, mkdir, renames of files and dirs, symlinks, a dir replaced by a
/// file and a file by a dir, masked paths recreated. Runs with cwd `/spfs`.
pub fn random_ops(rng: &mut SplitMix, ops: usize) -> String {
    let mut script = String::from("cd /spfs || exit 1\n");
    for i in 0..ops {
        let file = |rng: &mut SplitMix| {
            if rng.below(10) == 0 {
                pick(rng, &NAMES).to_string()
            } else {
                format!("{}/{}", pick(rng, &DIRS), pick(rng, &NAMES))
            }
        };
        let p = file(rng);
        let d = pick(rng, &DIRS);
        let line = match rng.below(18) {
            0 | 1 => format!("echo 'w{i}' > {p}"),
            2 => format!("printf 'o{i}' > {p}"),
            3 | 4 => format!("echo 'a{i}' >> {p}"),
            5 => format!(
                "chmod {} {p}",
                pick(rng, &["600", "644", "640", "755", "700"])
            ),
            6 => format!("rm -f {p}"),
            7 => format!("rm -rf {d}"),
            8 => format!("mkdir -p {d}"),
            9 => format!("mv -f {p} {}", file(rng)),
            10 => format!("mv -T {d} {}", pick(rng, &DIRS)),
            11 => format!(
                "ln -sfn {} {p}",
                pick(rng, &["etc/a", "../etc/c", "x", "/spfs/mod"])
            ),
            12 => format!("rm -rf {d} && echo 'f{i}' > {d}"),
            13 => format!("rm -f {p} && mkdir {p} && echo 'i{i}' > {p}/i"),
            14 => {
                let m = pick(rng, &MASKED);
                if m == "d" {
                    format!("mkdir -p d/sub && echo 'z{i}' > d/sub/z")
                } else {
                    format!("mkdir -p $(dirname {m}) && echo 'again{i}' > {m}")
                }
            }
            15 => format!("touch -d @{} {p}", 1_000_000_000 + i),
            16 => format!("chown {} {p}", pick(rng, &["1:1", "0:0", "2:0"])),
            _ => format!("c=$(cat {p}) && printf '%s\\n' \"$c\" > {p}"),
        };
        script.push_str(&line);
        script.push_str(" 2>/dev/null\n");
    }
    script.push_str("exit 0\n");
    script
}

/// Keeps a failing seed's script: when dropped during a panic, writes it to
/// `/tmp/spfs-real-seed-<seed>.sh` and says so on stderr.
pub struct SeedReport {
    pub seed: u64,
    pub script: String,
}

impl Drop for SeedReport {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let path = format!("/tmp/spfs-real-seed-{}.sh", self.seed);
            let _ = fs::write(&path, &self.script);
            let _ = io::stderr().write_all(
                format!(
                    "random operations failed with seed {} (script: {path})\n",
                    self.seed
                )
                .as_bytes(),
            );
        }
    }
}
