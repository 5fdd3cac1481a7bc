//! End-to-end benchmark of spfs-changes against the baselines, with the goals.
//!
//! `cargo bench --bench e2e` (full matrix) or `cargo bench --bench e2e -- --quick`
//! (small matrix). Needs root: it builds its own environments on tmpfs + overlayfs in a
//! private mount namespace and runs the real `spfs-changes` binary (built here with
//! `cargo build --release`) as the tracker (`track --foreground`, a separate process)
//! and as the client (`changes`, `reset`, `validate`, fresh processes).
//!
//! Alternatives are interleaved (A B A B ..., order flipped every round) and medians
//! reported; ratios are medians of per-round ratios of alternatives measured side by
//! side. Prints a table to stdout and writes `target/e2e-bench.csv`.
//!
//! `-- --only changes,writer,throughput,reset,validate` runs some sections only.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use tracker::Status;
use tracker::control::{Client, Request, Response};

static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Progress on stderr, with the time since start.
macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!(
            "[e2e {:7.1}s] {}",
            START.get_or_init(Instant::now).elapsed().as_secs_f64(),
            format_args!($($arg)*)
        )
    };
}

fn main() {
    START.get_or_init(Instant::now);
    if !nix::unistd::geteuid().is_root() {
        eprintln!("e2e: skipped: needs root (mounts tmpfs and overlayfs, uses fanotify)");
        return;
    }
    // On the main thread, before any other thread exists: every thread and child
    // started later inherits the private namespace, and /proc/<our pid>/root (which
    // the tracker uses to reach the runtime) shows it. Nothing mounted here is seen
    // outside, and all of it goes away with the process.
    tracker::sys::enter_private_mount_ns().expect("a private mount namespace");

    let opts = Opts::parse();
    let started = Instant::now();
    let (bin, target) = build_binary();
    let mut b = Bench::new(opts, bin, target);
    print_machine();

    if b.wants("changes") {
        section_changes(&mut b);
    }
    if b.wants("writer") {
        section_writer(&mut b);
    }
    if b.wants("throughput") {
        section_throughput(&mut b);
    }
    if b.wants("reset") {
        section_reset(&mut b);
    }
    if b.wants("validate") {
        section_validate(&mut b);
    }
    b.report(started.elapsed());
}

// ---------------------------------------------------------------------------------
// Options, machine, build

struct Opts {
    quick: bool,
    only: Option<Vec<String>>,
}

impl Opts {
    fn parse() -> Opts {
        let mut opts = Opts {
            quick: false,
            only: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--quick" => opts.quick = true,
                "--only" => {
                    let v = args.next().expect("--only needs a list of sections");
                    opts.only = Some(v.split(',').map(str::to_string).collect());
                }
                // cargo bench passes --bench; criterion-style filters are ignored.
                _ => {}
            }
        }
        opts
    }
}

fn machine() -> (String, String, String) {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    (nproc.to_string(), cpu, kernel)
}

/// The commit of the product measured, with `+changes` when its sources differ from it.
fn product_version() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(head) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown".into();
    };
    let dirty = git(&[
        "status",
        "--porcelain",
        "--",
        "store",
        "tracker",
        "cli",
        "Cargo.lock",
    ])
    .is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{head}+changes")
    } else {
        head
    }
}

fn print_machine() {
    let (nproc, cpu, kernel) = machine();
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .flatten()
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024 / 1024);
    let queue = fs::read_to_string("/proc/sys/fs/fanotify/max_queued_events")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    progress!(
        "machine: nproc {nproc}, CPU {cpu}, kernel {kernel}, {mem} GiB, fanotify max_queued_events {queue}"
    );
}

/// Builds `spfs-changes` (release) and returns it with the target dir.
fn build_binary() -> (PathBuf, PathBuf) {
    let exe = std::env::current_exe().expect("current_exe");
    // target/release/deps/e2e-<hash> -> target/release
    let release = exe
        .parent()
        .and_then(Path::parent)
        .expect("bench executable lives in <target>/<profile>/deps")
        .to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    progress!("building spfs-changes (cargo build --release -p spfs-changes)");
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "spfs-changes",
            "--bin",
            "spfs-changes",
        ])
        .stdin(Stdio::null())
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build of spfs-changes failed");
    let bin = release.join("spfs-changes");
    assert!(bin.exists(), "{} missing after build", bin.display());
    let target = release.parent().unwrap_or(&release).to_path_buf();
    (bin, target)
}

// ---------------------------------------------------------------------------------
// Results

struct Row {
    section: &'static str,
    case: String,
    metric: String,
    value: f64,
    unit: &'static str,
    samples: Vec<f64>,
    goal: Option<(String, bool)>,
}

fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

fn fmt_value(v: f64, unit: &str) -> String {
    if v.is_nan() {
        return "-".into();
    }
    let integer = v == v.trunc() && unit != "ms" && unit != "x" && unit != "MiB";
    let num = if integer || v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else if v.abs() >= 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    };
    match unit {
        "" => num,
        "x" => format!("{num}x"),
        u => format!("{num} {u}"),
    }
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

// ---------------------------------------------------------------------------------
// The bench: work dirs, lowers, runtimes

struct Bench {
    opts: Opts,
    bin: PathBuf,
    target: PathBuf,
    /// A tmpfs (mounted in our namespace only) holding lowers, runtimes, mounts.
    work: PathBuf,
    mounts: Vec<PathBuf>,
    lowers: BTreeMap<usize, PathBuf>,
    tarball: Option<PathBuf>,
    sources: Option<PathBuf>,
    seq: usize,
    rows: Vec<Row>,
    /// The product's commit, read when the binary was built.
    version: String,
    // Dropped after `Drop::drop` has unmounted what is in them.
    _work_dir: tempfile::TempDir,
    /// Tracker state dirs: on the real filesystem, since the tracker leaves our mount
    /// namespace (as it does in an spfs runtime) and must still find its db.
    state_root: tempfile::TempDir,
}

impl Bench {
    fn new(opts: Opts, bin: PathBuf, target: PathBuf) -> Bench {
        let work_dir = tempfile::Builder::new()
            .prefix("spfs-changes-e2e-")
            .tempdir()
            .expect("temp dir");
        let state_root = tempfile::Builder::new()
            .prefix("e2e-bench-state-")
            .tempdir_in(&target)
            .expect("state dir under target/");
        let work = work_dir.path().to_path_buf();
        mount_tmpfs(&work, MsFlags::empty());
        Bench {
            opts,
            bin,
            target,
            mounts: vec![work.clone()],
            work,
            lowers: BTreeMap::new(),
            tarball: None,
            sources: None,
            seq: 0,
            rows: Vec::new(),
            version: product_version(),
            _work_dir: work_dir,
            state_root,
        }
    }

    fn wants(&self, section: &str) -> bool {
        self.opts
            .only
            .as_ref()
            .is_none_or(|o| o.iter().any(|s| s == section))
    }

    fn rounds(&self, full: usize, quick: usize) -> usize {
        if self.opts.quick { quick } else { full }
    }

    fn next_id(&mut self, name: &str) -> String {
        self.seq += 1;
        format!("{name}-{}", self.seq)
    }

    /// A row whose value is the median of `samples`; returns the median.
    fn med(
        &mut self,
        sec: &'static str,
        case: &str,
        metric: &str,
        unit: &'static str,
        samples: &[f64],
    ) -> f64 {
        let value = median(samples);
        self.push(sec, case, metric, value, unit, samples);
        value
    }

    /// A row with a single value.
    fn val(&mut self, sec: &'static str, case: &str, metric: &str, value: f64, unit: &'static str) {
        self.push(sec, case, metric, value, unit, &[]);
    }

    fn push(
        &mut self,
        sec: &'static str,
        case: &str,
        metric: &str,
        value: f64,
        unit: &'static str,
        samples: &[f64],
    ) {
        self.rows.push(Row {
            section: sec,
            case: case.to_string(),
            metric: metric.to_string(),
            value,
            unit,
            samples: samples.to_vec(),
            goal: None,
        });
    }

    /// Attaches a goal to the last row.
    fn goal(&mut self, text: impl Into<String>, pass: bool) {
        if let Some(r) = self.rows.last_mut() {
            r.goal = Some((text.into(), pass));
        }
    }

    /// A generated lower layer of `n` files (100 B to 4 KiB, 1000 per dir) on a tmpfs
    /// of its own, built once and shared by every runtime that uses it.
    fn lower(&mut self, n: usize) -> PathBuf {
        if let Some(p) = self.lowers.get(&n) {
            return p.clone();
        }
        let dir = self.work.join(format!("lower-{}", human(n)));
        fs::create_dir(&dir).expect("lower dir");
        mount_tmpfs(&dir, MsFlags::empty());
        self.mounts.push(dir.clone());
        let t = Instant::now();
        build_tree(&dir, n);
        progress!(
            "built lower of {} files in {:.1} s",
            human(n),
            t.elapsed().as_secs_f64()
        );
        self.lowers.insert(n, dir.clone());
        dir
    }

    /// Frees a lower no later section uses (the 1M one takes about 5 GiB of tmpfs).
    fn drop_lower(&mut self, n: usize) {
        if let Some(dir) = self.lowers.remove(&n) {
            unmount(&dir);
            let _ = fs::remove_dir(&dir);
            self.mounts.retain(|m| m != &dir);
        }
    }

    /// A tarball of /usr/include (made once, kept on tmpfs).
    fn tarball(&mut self) -> PathBuf {
        if let Some(t) = &self.tarball {
            return t.clone();
        }
        let tar = self.work.join("usr-include.tar");
        let ok = Command::new("tar")
            .arg("-cf")
            .arg(&tar)
            .args(["-C", "/usr", "include"])
            .status()
            .expect("tar")
            .success();
        assert!(ok, "cannot make a tarball of /usr/include");
        let files = Command::new("tar")
            .arg("-tf")
            .arg(&tar)
            .output()
            .map(|o| o.stdout.iter().filter(|&&c| c == b'\n').count())
            .unwrap_or(0);
        let size = fs::metadata(&tar).map_or(0, |m| m.len());
        progress!(
            "tarball of /usr/include: {files} entries, {} MB",
            size / 1_000_000
        );
        self.tarball = Some(tar.clone());
        tar
    }

    /// A lower layer with generated C sources for the compile workload.
    fn sources(&mut self) -> PathBuf {
        if let Some(s) = &self.sources {
            return s.clone();
        }
        let layer = self.work.join("src-layer");
        let inc = layer.join("src/include");
        fs::create_dir_all(&inc).expect("src layer");
        let mut h = String::from("#ifndef COMMON_H\n#define COMMON_H\n");
        for i in 0..64 {
            h.push_str(&format!(
                "static inline int common_{i}(int x) {{ return (x * {}) ^ (x >> {}); }}\n",
                2 * i + 1,
                i % 13 + 1
            ));
        }
        h.push_str("#endif\n");
        fs::write(inc.join("common.h"), h).expect("header");
        for m in 0..COMPILE_UNITS {
            let mut c = String::from(
                "#include <stdio.h>\n#include <stdlib.h>\n#include <string.h>\n#include <math.h>\n#include \"common.h\"\n",
            );
            c.push_str(&format!("static int table_{m}[256];\n"));
            for f in 0..12 {
                c.push_str(&format!(
                    "int unit{m}_fn{f}(int n, const char *s) {{\n  int acc = {f};\n  for (int i = 0; i < n; i++) {{\n    acc += table_{m}[(i + {f}) & 255] * common_{}(i) + (int)strlen(s);\n    if (acc % 7 == {}) acc ^= (int)sqrt((double)(i + 1));\n    else acc -= abs(i - n) / (i + 1);\n  }}\n  char buf[64]; snprintf(buf, sizeof buf, \"%d-%s\", acc, s);\n  return acc + (int)buf[0];\n}}\n",
                    f % 64,
                    f % 7
                ));
            }
            fs::write(layer.join(format!("src/unit{m:02}.c")), c).expect("source");
        }
        self.sources = Some(layer.clone());
        layer
    }

    fn report(&mut self, took: Duration) {
        let (nproc, cpu, kernel) = machine();
        let mode = if self.opts.quick { "quick" } else { "full" };
        println!();
        println!(
            "spfs-changes end-to-end benchmark ({mode} matrix, {:.0} s), product {}, on {nproc} cores, {cpu}, Linux {kernel}",
            took.as_secs_f64(),
            self.version
        );
        println!();
        let w_case = self
            .rows
            .iter()
            .map(|r| r.case.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let w_metric = self
            .rows
            .iter()
            .map(|r| r.metric.len())
            .max()
            .unwrap_or(6)
            .max(6);
        let w_goal = self
            .rows
            .iter()
            .map(|r| r.goal.as_ref().map_or(0, |g| g.0.len()))
            .max()
            .unwrap_or(4)
            .max(4);
        println!(
            "| {:<10} | {:<w_case$} | {:<w_metric$} | {:>14} | {:<w_goal$} | {:<6} |",
            "section", "case", "metric", "value", "goal", "status"
        );
        println!(
            "|{}|{}|{}|{}|{}|{}|",
            "-".repeat(12),
            "-".repeat(w_case + 2),
            "-".repeat(w_metric + 2),
            "-".repeat(16),
            "-".repeat(w_goal + 2),
            "-".repeat(8)
        );
        for r in &self.rows {
            let (goal, status) = match &r.goal {
                Some((g, pass)) => (g.as_str(), if *pass { "PASS" } else { "MISS" }),
                None => ("", ""),
            };
            println!(
                "| {:<10} | {:<w_case$} | {:<w_metric$} | {:>14} | {:<w_goal$} | {:<6} |",
                r.section,
                r.case,
                r.metric,
                fmt_value(r.value, r.unit),
                goal,
                status
            );
        }
        let goals: Vec<&Row> = self.rows.iter().filter(|r| r.goal.is_some()).collect();
        let passed = goals
            .iter()
            .filter(|r| r.goal.as_ref().is_some_and(|g| g.1))
            .count();
        println!();
        println!("goals: {passed} of {} met", goals.len());

        let csv = self.target.join("e2e-bench.csv");
        let mut out = String::from(
            "section,case,metric,value,unit,n,min,max,goal,status,samples,mode,product,nproc,cpu,kernel\n",
        );
        for r in &self.rows {
            let (goal, status) = match &r.goal {
                Some((g, pass)) => (g.clone(), if *pass { "PASS" } else { "MISS" }),
                None => (String::new(), ""),
            };
            let min = r.samples.iter().copied().fold(f64::NAN, f64::min);
            let max = r.samples.iter().copied().fold(f64::NAN, f64::max);
            let samples: Vec<String> = r.samples.iter().map(|s| format!("{s:.6}")).collect();
            out.push_str(&format!(
                "{},{},{},{:.6},{},{},{:.6},{:.6},{},{},{},{mode},{},{nproc},{},{kernel}\n",
                csv_field(r.section),
                csv_field(&r.case),
                csv_field(&r.metric),
                r.value,
                r.unit,
                r.samples.len(),
                min,
                max,
                csv_field(&goal),
                status,
                csv_field(&samples.join(";")),
                self.version,
                csv_field(&cpu),
            ));
        }
        fs::write(&csv, out).expect("write csv");
        println!("CSV: {}", csv.display());
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            unmount(m);
        }
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn mount_tmpfs(dir: &Path, flags: MsFlags) {
    mount(Some("tmpfs"), dir, Some("tmpfs"), flags, Some("mode=0755"))
        .unwrap_or_else(|e| panic!("mount tmpfs at {}: {e}", dir.display()));
}

fn unmount(p: &Path) {
    for _ in 0..50 {
        match umount2(p, MntFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => return,
            Err(nix::errno::Errno::EBUSY) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => {
                progress!("umount {}: {e}", p.display());
                return;
            }
        }
    }
    let _ = umount2(p, MntFlags::MNT_DETACH);
}

const CONTENT: usize = 8192;

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Path (relative) of generated file `i`: 1000 files per dir.
fn file_rel(i: usize) -> String {
    format!("pkg{:04}/file{:03}.dat", i / 1000, i % 1000)
}

fn build_tree(root: &Path, n: usize) {
    let content: Vec<u8> = (0..CONTENT as u64).map(|i| mix(i) as u8).collect();
    let dirs = n.div_ceil(1000);
    std::thread::scope(|s| {
        for t in 0..2 {
            let content = &content;
            s.spawn(move || {
                for d in (t..dirs).step_by(2) {
                    let dir = root.join(format!("pkg{d:04}"));
                    fs::create_dir(&dir).expect("lower subdir");
                    for i in d * 1000..((d + 1) * 1000).min(n) {
                        let h = mix(i as u64 ^ 0x5eed);
                        let size = 100 + (h % 3997) as usize;
                        let off = ((h >> 32) % 4096) as usize;
                        fs::write(root.join(file_rel(i)), &content[off..off + size])
                            .expect("lower file");
                    }
                }
            });
        }
    });
}

/// A runtime shaped like spfs's: a tmpfs with upper/, work/ and an empty lower/, and
/// an overlay over the given lowers with spfs's options.
struct Runtime {
    id: String,
    /// The overlay's mount options (for a bare remount).
    options: String,
    root: PathBuf,
    upper: PathBuf,
    mount: PathBuf,
    tracker: Option<TrackerProc>,
}

impl Runtime {
    fn new(b: &mut Bench, name: &str, lowers: &[PathBuf]) -> Runtime {
        let id = b.next_id(name);
        let root = b.work.join(format!("rt-{id}"));
        let mnt = b.work.join(format!("mnt-{id}"));
        let overlay = tracker::setup::Overlay::create(&root, &mnt, lowers)
            .unwrap_or_else(|e| panic!("make runtime {id}: {e}"));
        let (options, upper) = (overlay.options, overlay.upper);
        Runtime {
            id,
            options,
            root,
            upper,
            mount: mnt,
            tracker: None,
        }
    }

    /// Starts `spfs-changes track --foreground` on this runtime (a separate process,
    /// which leaves our mount namespace as it would leave an spfs runtime's), pinned
    /// to `cpu` when given, and waits until it answers on its socket.
    fn start_tracker(&mut self, b: &Bench, cpu: Option<usize>) -> &TrackerProc {
        let state = b.state_root.path().join(&self.id);
        let log = b.state_root.path().join(format!("{}.log", self.id));
        let mut cmd = Command::new(&b.bin);
        cmd.args(["track", "--foreground", "--mount"])
            .arg(&self.mount)
            .arg("--state")
            .arg(&state)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("tracker log"));
        if let Some(cpu) = cpu {
            // SAFETY: only sched_setaffinity (async-signal-safe) between fork and exec.
            unsafe {
                cmd.pre_exec(move || pin_to(0, cpu));
            }
        }
        let child = cmd.spawn().expect("start spfs-changes track");
        let mut t = TrackerProc {
            pid: child.id(),
            child: Some(child),
            socket: state.join("control.sock"),
            state,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(c) = t.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!(
                    "tracker exited at start ({st}): {}",
                    fs::read_to_string(&t.log).unwrap_or_default()
                );
            }
            if t.socket.exists()
                && let Ok(mut c) = Client::connect(&t.socket)
                && matches!(c.call(&Request::Status), Ok(Response::Status(_)))
            {
                break;
            }
            assert!(Instant::now() < deadline, "tracker did not come up");
            std::thread::sleep(Duration::from_millis(5));
        }
        self.tracker = Some(t);
        self.tracker.as_ref().expect("just set")
    }

    /// Unmounts and mounts the overlay again, as `reset` does around its edit; returns
    /// the time taken (ms).
    fn remount(&self) -> f64 {
        let t = Instant::now();
        umount2(&self.mount, MntFlags::empty()).expect("umount overlay");
        mount(
            Some("overlay"),
            &self.mount,
            Some("overlay"),
            MsFlags::empty(),
            Some(self.options.as_str()),
        )
        .expect("mount overlay again");
        ms(t.elapsed())
    }

    fn tracker(&self) -> &TrackerProc {
        self.tracker.as_ref().expect("tracker running")
    }

    fn stop_tracker(&mut self) {
        if let Some(t) = self.tracker.take() {
            t.stop();
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop_tracker();
        unmount(&self.mount);
        unmount(&self.root);
        let _ = fs::remove_dir(&self.mount);
        let _ = fs::remove_dir(&self.root);
    }
}

/// A tracker process.
struct TrackerProc {
    child: Option<Child>,
    pid: u32,
    state: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl TrackerProc {
    fn call(&self, req: &Request) -> Response {
        Client::connect(&self.socket)
            .and_then(|mut c| c.call(req))
            .unwrap_or_else(|e| {
                panic!(
                    "tracker call {req:?}: {e}; log: {}",
                    fs::read_to_string(&self.log).unwrap_or_default()
                )
            })
    }

    fn status(&self) -> Status {
        match self.call(&Request::Status) {
            Response::Status(s) => *s,
            other => panic!("status: unexpected {other:?}"),
        }
    }

    /// Waits until everything done so far is recorded (retries the tracker's own
    /// 10 s sync timeout while it works through a backlog or a rescan).
    fn sync(&self) {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            match Client::connect(&self.socket).and_then(|mut c| c.call(&Request::Sync)) {
                Ok(Response::Token(_)) => return,
                Ok(other) => panic!("sync: unexpected {other:?}"),
                Err(e) if Instant::now() < deadline => {
                    progress!("sync: {e}; retrying");
                }
                Err(e) => panic!("sync: {e}"),
            }
        }
    }

    /// User + system CPU seconds of the whole tracker process so far.
    fn cpu_secs(&self) -> f64 {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return f64::NAN;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // SAFETY: sysconf has no preconditions.
        ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }

    /// A `VmHWM`/`VmRSS` line of /proc/<pid>/status, in KiB.
    fn mem_kib(&self, key: &str) -> u64 {
        fs::read_to_string(format!("/proc/{}/status", self.pid))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Asks the tracker to stop (it flushes its db) and waits for it to exit.
    fn stop(mut self) {
        let _ = Client::connect(&self.socket).and_then(|mut c| c.call(&Request::Stop));
        let deadline = Instant::now() + Duration::from_secs(120);
        if let Some(mut child) = self.child.take() {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => return,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    _ => {
                        progress!("tracker {} did not stop; killing it", self.pid);
                        let _ = child.kill();
                        let _ = child.wait();
                        return;
                    }
                }
            }
        }
    }
}

impl Drop for TrackerProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Pins thread `tid` (0: the calling thread) to one CPU.
fn pin_to(tid: libc::pid_t, cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays in bounds for
    // cpu < CPU_SETSIZE, and sched_setaffinity reads exactly size_of::<cpu_set_t>().
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Runs `f` on a new thread pinned to `cpu` (the caller's affinity is left alone).
fn on_cpu<T: Send>(cpu: Option<usize>, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Some(cpu) = cpu {
                pin_to(0, cpu).expect("sched_setaffinity");
            }
            f()
        })
        .join()
        .expect("pinned worker panicked")
    })
}

/// CPU seconds (user + system) used by this process and its reaped children so far.
fn cpu_used() -> f64 {
    let secs = |who| {
        // SAFETY: getrusage fills the zeroed struct it is given.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(who, &mut ru) };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(ru.ru_utime) + tv(ru.ru_stime)
    };
    secs(libc::RUSAGE_SELF) + secs(libc::RUSAGE_CHILDREN)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn run_cli(b: &Bench, args: &[&std::ffi::OsStr]) -> (f64, std::process::Output) {
    let t = Instant::now();
    let out = Command::new(&b.bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run spfs-changes");
    (ms(t.elapsed()), out)
}

// ---------------------------------------------------------------------------------
// Baselines

/// What `spfs diff` does: walk every entry of the merged mount (lstat) and hash every
/// file's bytes (BLAKE3: faster than spfs's SHA-256, so the baseline is conservative).
fn walk_hash(root: &Path) -> usize {
    let mut stack = vec![root.to_path_buf()];
    let mut buf = vec![0u8; 64 * 1024];
    let mut entries = 0;
    let mut acc = [0u8; 32];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).expect("read_dir") {
            let e = e.expect("dir entry");
            let m = e.metadata().expect("lstat");
            entries += 1;
            let ft = m.file_type();
            let digest = if ft.is_dir() {
                stack.push(e.path());
                continue;
            } else if ft.is_file() {
                let mut h = blake3::Hasher::new();
                let mut f = File::open(e.path()).expect("open");
                loop {
                    let n = f.read(&mut buf).expect("read");
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
                h.finalize()
            } else if ft.is_symlink() {
                blake3::hash(
                    fs::read_link(e.path())
                        .expect("readlink")
                        .as_os_str()
                        .as_bytes(),
                )
            } else {
                continue;
            };
            for (a, d) in acc.iter_mut().zip(digest.as_bytes()) {
                *a ^= d;
            }
        }
    }
    std::hint::black_box(acc);
    entries
}

/// What `spfs reset` and spk's validation start with: a walk of the upper dir (lstat
/// of every entry, to tell whiteouts), no hashing.
fn walk_upper(root: &Path) -> usize {
    let mut stack = vec![root.to_path_buf()];
    let mut entries = 0;
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).expect("read_dir") {
            let e = e.expect("dir entry");
            let m = e.metadata().expect("lstat");
            entries += 1;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    entries
}

// ---------------------------------------------------------------------------------
// Workloads

/// K changes spread over a lower of `n` files, made through the overlay: appends
/// (copy-up), new files, deletions (whiteouts), chmods (metadata copy-up), in turn.
fn make_changes(mount: &Path, n: usize, k: usize, salt: &str) {
    let stride = (n / k).max(1);
    for i in 0..k {
        let idx = (i * stride + stride / 2) % n;
        let p = mount.join(file_rel(idx));
        match i % 4 {
            0 => {
                let mut f = fs::OpenOptions::new()
                    .append(true)
                    .open(&p)
                    .expect("append");
                f.write_all(format!("changed {salt}\n").as_bytes())
                    .expect("append write");
            }
            1 => fs::write(
                mount.join(format!("pkg{:04}/new-{salt}-{i}.txt", idx / 1000)),
                b"new file\n",
            )
            .expect("new file"),
            2 => fs::remove_file(&p).expect("delete"),
            _ => fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).expect("chmod"),
        }
    }
}

/// `files` small files in dirs of 1000 under `dir` (created); `bytes` of content each.
fn create_files(dir: &Path, files: usize, bytes: usize) {
    let content = vec![b'x'; bytes];
    for d in 0..files.div_ceil(1000) {
        let sub = dir.join(format!("d{d:04}"));
        fs::create_dir_all(&sub).expect("storm dir");
        for f in 0..(files - d * 1000).min(1000) {
            let mut file = File::create(sub.join(format!("f{f:03}"))).expect("create");
            if bytes > 0 {
                file.write_all(&content).expect("write");
            }
        }
    }
}

const STORM_FILES: usize = 100_000;
const COMPILE_UNITS: usize = 32;

/// 100k tiny files created, then deleted.
fn storm(mount: &Path) {
    let dir = mount.join("storm");
    create_files(&dir, STORM_FILES, 2);
    fs::remove_dir_all(&dir).expect("storm cleanup");
}

fn untar(mount: &Path, tarball: &Path) {
    let ok = Command::new("tar")
        .arg("-xf")
        .arg(tarball)
        .arg("-C")
        .arg(mount)
        .status()
        .expect("tar")
        .success();
    assert!(ok, "untar failed");
}

/// `gcc -O2 -MD -c` of the generated units (sources read from the lower layer, .o and
/// .d written into the mount), two jobs at a time like `make -j2`, then `ar`.
fn compile(mount: &Path) {
    let build = mount.join("build");
    fs::create_dir_all(&build).expect("build dir");
    std::thread::scope(|s| {
        for job in 0..2 {
            let build = &build;
            s.spawn(move || {
                for m in (job..COMPILE_UNITS).step_by(2) {
                    let ok = Command::new("gcc")
                        .args(["-O2", "-MD", "-c"])
                        .arg(mount.join(format!("src/unit{m:02}.c")))
                        .arg("-I")
                        .arg(mount.join("src/include"))
                        .arg("-o")
                        .arg(build.join(format!("unit{m:02}.o")))
                        .status()
                        .expect("gcc")
                        .success();
                    assert!(ok, "gcc failed");
                }
            });
        }
    });
    let mut ar = Command::new("ar");
    ar.arg("rcs").arg(build.join("libunits.a"));
    for m in 0..COMPILE_UNITS {
        ar.arg(build.join(format!("unit{m:02}.o")));
    }
    assert!(ar.status().expect("ar").success(), "ar failed");
}

// ---------------------------------------------------------------------------------
// 1. What changed after K changes in an N-file environment

struct ChangesEnv {
    n: usize,
    k: usize,
    rt: Runtime,
    /// Every `changes` run, and per round the median of that round's runs.
    a: Vec<f64>,
    a_round: Vec<f64>,
    hash: Vec<f64>,
    upper: Vec<f64>,
    lines: usize,
    merged_entries: usize,
    upper_entries: usize,
}

fn changes_cli(b: &Bench, state: &Path) -> (f64, usize) {
    let (t, out) = run_cli(
        b,
        &["changes".as_ref(), "--state".as_ref(), state.as_os_str()],
    );
    assert!(
        out.status.success(),
        "changes failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (t, out.stdout.iter().filter(|&&c| c == b'\n').count())
}

fn section_changes(b: &mut Bench) {
    let sec = "changes";
    let ns: Vec<usize> = if b.opts.quick {
        vec![10_000, 100_000]
    } else {
        vec![10_000, 100_000, 1_000_000]
    };
    let ks: Vec<usize> = if b.opts.quick {
        vec![10]
    } else {
        vec![10, 1000]
    };
    let rounds = b.rounds(5, 3);
    let reps = 3;
    let mut envs = Vec::new();
    for &n in &ns {
        let lower = b.lower(n);
        for &k in &ks {
            let name = format!("changes-{}-{k}", human(n));
            let mut rt = Runtime::new(b, &name, std::slice::from_ref(&lower));
            rt.start_tracker(b, None);
            make_changes(&rt.mount, n, k, "a");
            rt.tracker().sync();
            envs.push(ChangesEnv {
                n,
                k,
                rt,
                a: vec![],
                a_round: vec![],
                hash: vec![],
                upper: vec![],
                lines: 0,
                merged_entries: 0,
                upper_entries: 0,
            });
        }
    }
    // Where the time of one `changes` goes, at N=100k K=10.
    let probe = envs
        .iter()
        .position(|e| e.n == 100_000 && e.k == 10)
        .unwrap_or(0);
    let (mut startup, mut rtt_status, mut rtt_sync, mut rtt_changes) =
        (vec![], vec![], vec![], vec![]);

    // Warm up (page and dentry caches, first overlay lookups), not recorded.
    for e in &envs {
        changes_cli(b, &e.rt.tracker().state);
        walk_hash(&e.rt.mount);
        walk_upper(&e.rt.upper);
    }
    for round in 0..rounds {
        progress!("changes: round {}/{rounds}", round + 1);
        let mut order: Vec<usize> = (0..envs.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let e = &mut envs[i];
            let mut alts = [0, 1, 2];
            alts.rotate_left(round % 3);
            for alt in alts {
                match alt {
                    0 => {
                        let mut this = Vec::new();
                        for _ in 0..reps {
                            let (t, lines) = changes_cli(b, &e.rt.tracker().state);
                            e.lines = lines;
                            this.push(t);
                        }
                        e.a.extend(&this);
                        e.a_round.push(median(&this));
                    }
                    1 => {
                        let t = Instant::now();
                        e.merged_entries = walk_hash(&e.rt.mount);
                        e.hash.push(ms(t.elapsed()));
                    }
                    _ => {
                        let t = Instant::now();
                        e.upper_entries = walk_upper(&e.rt.upper);
                        e.upper.push(ms(t.elapsed()));
                    }
                }
            }
            if i == probe {
                let (t, out) = run_cli(b, &["--version".as_ref()]);
                assert!(out.status.success());
                startup.push(t);
                let mut c = Client::connect(&e.rt.tracker().socket).expect("connect");
                for (req, into) in [
                    (Request::Status, &mut rtt_status),
                    (Request::Sync, &mut rtt_sync),
                    (Request::Changes(store::Query::default()), &mut rtt_changes),
                ] {
                    let t = Instant::now();
                    c.call(&req).expect("tracker call");
                    into.push(ms(t.elapsed()));
                }
            }
        }
    }
    for e in &envs {
        let case = format!("N={} K={}", human(e.n), e.k);
        let goals = e.n == 100_000 && e.k == 10;
        let a = b.med(
            sec,
            &case,
            "spfs-changes changes (fresh process)",
            "ms",
            &e.a,
        );
        if goals {
            b.goal("<= 10 ms", a <= 10.0);
        }
        b.med(
            sec,
            &case,
            "full walk + hash of merged mount",
            "ms",
            &e.hash,
        );
        b.med(sec, &case, "walk of upper dir (no hash)", "ms", &e.upper);
        let s = b.med(
            sec,
            &case,
            "speedup vs walk + hash",
            "x",
            &ratios(&e.hash, &e.a_round),
        );
        if goals {
            b.goal(">= 300x", s >= 300.0);
        }
        b.med(
            sec,
            &case,
            "speedup vs upper walk",
            "x",
            &ratios(&e.upper, &e.a_round),
        );
        b.val(sec, &case, "lines printed by changes", e.lines as f64, "");
        b.val(
            sec,
            &case,
            "entries in upper dir",
            e.upper_entries as f64,
            "",
        );
        b.val(
            sec,
            &case,
            "entries in merged mount",
            e.merged_entries as f64,
            "",
        );
    }
    // Scaling with N at K=10, from the same rounds.
    let small = envs.iter().find(|e| e.n == ns[0] && e.k == 10);
    let big = envs.iter().find(|e| Some(&e.n) == ns.last() && e.k == 10);
    if let (Some(s), Some(l)) = (small, big) {
        let case = format!("K=10, N={} vs N={}", human(l.n), human(s.n));
        let (r, big_n) = (ratios(&l.a_round, &s.a_round), l.n);
        let v = b.med(sec, &case, "changes time ratio", "x", &r);
        if big_n == 1_000_000 {
            b.goal("<= 1.5x", v <= 1.5);
        } else {
            b.goal("<= 1.5x (1M; quick: 100k)", v <= 1.5);
        }
    }
    let case = "N=100k K=10, one changes";
    b.med(
        sec,
        case,
        "process start (spfs-changes --version)",
        "ms",
        &startup,
    );
    b.med(sec, case, "status round trip (socket)", "ms", &rtt_status);
    b.med(sec, case, "sync round trip (cookie)", "ms", &rtt_sync);
    b.med(
        sec,
        case,
        "changes round trip (sync + query)",
        "ms",
        &rtt_changes,
    );
    // The same query against the kept db once the tracker is gone.
    let mut kept = vec![];
    if let Some(e) = envs.get_mut(probe) {
        e.rt.stop_tracker();
        let state = b.state_root.path().join(&e.rt.id);
        for _ in 0..rounds * reps {
            kept.push(changes_cli(b, &state).0);
        }
    }
    b.med(
        sec,
        case,
        "changes on the kept db (no tracker)",
        "ms",
        &kept,
    );
    drop(envs);
    if let Some(&big) = ns.last() {
        b.drop_lower(big);
    }
}

// ---------------------------------------------------------------------------------
// 2. Writer overhead, tracker on vs off

#[derive(Clone, Copy, PartialEq)]
enum Work {
    Untar,
    Storm,
    Compile,
}

fn section_writer(b: &mut Bench) {
    let sec = "writer";
    let lower = b.lower(10_000);
    let tarball = b.tarball();
    let sources = b.sources();
    for work in [Work::Untar, Work::Storm, Work::Compile] {
        let (name, runs, goal) = match work {
            Work::Untar => ("untar /usr/include", b.rounds(7, 3), Some(1.15)),
            Work::Storm => ("storm 100k create+delete", b.rounds(5, 2), None),
            Work::Compile => ("compile 32 C units (gcc -j2)", b.rounds(9, 3), Some(1.02)),
        };
        let lowers = match work {
            Work::Compile => vec![sources.clone(), lower.clone()],
            _ => vec![lower.clone()],
        };
        let (mut off, mut on, mut catchup, mut cpu) = (vec![], vec![], vec![], vec![]);
        let (mut off_cpu, mut on_cpu) = (vec![], vec![]);
        let (mut overflows, mut events, mut rescans, mut hwm) = (vec![], vec![], vec![], vec![]);
        // One unrecorded run each way first (tar, gcc and page caches).
        for tracked in [false, true] {
            let mut rt = Runtime::new(b, "writer-warmup", &lowers);
            if tracked {
                rt.start_tracker(b, None);
            }
            run_work(work, &rt.mount, &tarball);
        }
        for i in 0..runs {
            progress!("writer: {name}: run {}/{runs}", i + 1);
            let order = if i % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for tracked in order {
                let mut rt = Runtime::new(b, "writer", &lowers);
                let cpu0 = if tracked {
                    rt.start_tracker(b, None).cpu_secs()
                } else {
                    0.0
                };
                let (t, c) = (Instant::now(), cpu_used());
                run_work(work, &rt.mount, &tarball);
                let wall = ms(t.elapsed());
                let writer_cpu = (cpu_used() - c) * 1000.0;
                if !tracked {
                    off.push(wall);
                    off_cpu.push(writer_cpu);
                    continue;
                }
                on.push(wall);
                on_cpu.push(writer_cpu);
                let tr = rt.tracker();
                let t = Instant::now();
                tr.sync();
                catchup.push(ms(t.elapsed()));
                cpu.push((tr.cpu_secs() - cpu0) * 1000.0);
                let st = tr.status();
                overflows.push(st.overflows as f64);
                events.push(st.events as f64);
                rescans.push(st.rescans as f64);
                hwm.push(tr.mem_kib("VmHWM:") as f64 / 1024.0);
            }
        }
        b.med(sec, name, "wall, tracker off", "ms", &off);
        b.med(sec, name, "wall, tracker on", "ms", &on);
        let ratio = b.med(sec, name, "ratio on/off", "x", &ratios(&on, &off));
        if let Some(g) = goal {
            b.goal(format!("<= {g}x"), ratio <= g);
        }
        let fastest = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        b.val(
            sec,
            name,
            "ratio of the fastest runs",
            fastest(&on) / fastest(&off),
            "x",
        );
        b.med(sec, name, "writer CPU, tracker off", "ms", &off_cpu);
        b.med(sec, name, "writer CPU, tracker on", "ms", &on_cpu);
        // On a machine whose cores are all busy (a parallel build), every CPU-second
        // the tracker uses, and every one its events add to the writer, is lost.
        let total_on: Vec<f64> = on_cpu.iter().zip(&cpu).map(|(w, t)| w + t).collect();
        let r = ratios(&total_on, &off_cpu);
        b.med(sec, name, "CPU ratio (writer + tracker) on/off", "x", &r);
        b.med(
            sec,
            name,
            "tracker catch-up after the writer",
            "ms",
            &catchup,
        );
        b.med(sec, name, "tracker CPU time (until synced)", "ms", &cpu);
        b.med(sec, name, "fanotify events", "", &events);
        let per_event: Vec<f64> = cpu
            .iter()
            .zip(&events)
            .map(|(c, e)| c * 1000.0 / e)
            .collect();
        b.med(sec, name, "tracker CPU per event", "us", &per_event);
        let worst = overflows.iter().copied().fold(0.0, f64::max);
        b.push(
            sec,
            name,
            "queue overflows (worst run)",
            worst,
            "",
            &overflows,
        );
        if work == Work::Storm {
            b.goal("0", worst == 0.0);
        }
        let worst = rescans.iter().copied().fold(0.0, f64::max);
        b.push(sec, name, "rescans (worst run)", worst, "", &rescans);
        b.med(sec, name, "tracker peak RSS (VmHWM)", "MiB", &hwm);
    }
}

fn run_work(work: Work, mount: &Path, tarball: &Path) {
    match work {
        Work::Untar => untar(mount, tarball),
        Work::Storm => storm(mount),
        Work::Compile => compile(mount),
    }
}

// ---------------------------------------------------------------------------------
// 3. Sustained events per second on one core, peak RSS, db bytes per path

fn section_throughput(b: &mut Bench) {
    let sec = "throughput";
    let lower = b.lower(10_000);
    let runs = b.rounds(3, 1);
    let files = if b.opts.quick { 50_000 } else { 100_000 };
    // (label, tracker CPU, writer CPU)
    let variants = [
        ("tracker + writer on one core", Some(0), Some(0)),
        ("tracker alone on a core", Some(0), Some(1)),
    ];
    let mut res = vec![[vec![], vec![], vec![], vec![]]; variants.len()];
    for i in 0..runs {
        let mut order: Vec<usize> = (0..variants.len()).collect();
        if i % 2 == 1 {
            order.reverse();
        }
        for v in order {
            let (label, tracker_cpu, writer_cpu) = variants[v];
            progress!("throughput: {label}: run {}/{runs}", i + 1);
            let mut rt = Runtime::new(b, "events", std::slice::from_ref(&lower));
            rt.start_tracker(b, tracker_cpu);
            let tr = rt.tracker();
            let (cpu0, ev0) = (tr.cpu_secs(), tr.status().events);
            let t = Instant::now();
            let dir = rt.mount.join("burst");
            on_cpu(writer_cpu, || create_files(&dir, files, 16));
            let write = t.elapsed().as_secs_f64();
            tr.sync();
            let wall = t.elapsed().as_secs_f64();
            let st = tr.status();
            let ev = (st.events - ev0) as f64;
            res[v][0].push(ev / wall);
            res[v][1].push(ev / (tr.cpu_secs() - cpu0));
            res[v][2].push(st.overflows as f64);
            res[v][3].push(write * 1000.0);
        }
    }
    for (v, (label, _, _)) in variants.iter().enumerate() {
        let case = format!("{} new files, {label}", human(files));
        b.med(
            sec,
            &case,
            "events/s, wall until synced",
            "ev/s",
            &res[v][0],
        );
        b.med(
            sec,
            &case,
            "events per tracker CPU-second",
            "ev/s",
            &res[v][1],
        );
        b.med(sec, &case, "writer time", "ms", &res[v][3]);
        b.med(sec, &case, "queue overflows", "", &res[v][2]);
    }

    // Peak RSS and db size with M changed paths.
    let m = if b.opts.quick { 100_000 } else { 1_000_000 };
    progress!("throughput: {} changed paths", human(m));
    let mut rt = Runtime::new(b, "rss", &[lower]);
    rt.start_tracker(b, None);
    let tr = rt.tracker();
    let hwm0 = tr.mem_kib("VmHWM:") as f64 / 1024.0;
    let (cpu0, t) = (tr.cpu_secs(), Instant::now());
    create_files(&rt.mount.join("many"), m, 0);
    let write = t.elapsed().as_secs_f64();
    let rss_writer_done = tr.mem_kib("VmRSS:") as f64 / 1024.0;
    tr.sync();
    let wall = t.elapsed().as_secs_f64();
    let cpu = tr.cpu_secs() - cpu0;
    let t = Instant::now();
    let st = tr.status();
    let status_ms = ms(t.elapsed());
    let token = st.token.map(|t| t.to_string()).unwrap_or_default();
    let (since_ms, since_out) = run_cli(
        b,
        &[
            "changes".as_ref(),
            "--since".as_ref(),
            token.as_ref(),
            "--state".as_ref(),
            tr.state.as_os_str(),
        ],
    );
    assert!(since_out.status.success(), "changes --since failed");
    let hwm = tr.mem_kib("VmHWM:") as f64 / 1024.0;
    let rss = tr.mem_kib("VmRSS:") as f64 / 1024.0;
    let state = tr.state.clone();
    rt.stop_tracker();
    let du = |flag: &str| -> f64 {
        Command::new("du")
            .arg(flag)
            .arg(&state)
            .output()
            .ok()
            .and_then(|o| {
                let out = String::from_utf8_lossy(&o.stdout).into_owned();
                out.split_whitespace().next().and_then(|v| v.parse().ok())
            })
            .unwrap_or(f64::NAN)
    };
    let (du_b, du_k) = (du("-sb"), du("-sk"));
    drop(rt);
    let case = format!("{} changed paths", human(m));
    let net = st.net_paths as f64;
    b.val(sec, &case, "net paths recorded", net, "");
    b.val(
        sec,
        &case,
        "writer time (create files)",
        write * 1000.0,
        "ms",
    );
    b.val(
        sec,
        &case,
        "events/s, wall until synced",
        st.events as f64 / wall,
        "ev/s",
    );
    b.val(
        sec,
        &case,
        "events per tracker CPU-second",
        st.events as f64 / cpu,
        "ev/s",
    );
    b.val(sec, &case, "queue overflows", st.overflows as f64, "");
    b.val(sec, &case, "rescans", st.rescans as f64, "");
    b.val(sec, &case, "tracker VmHWM after start", hwm0, "MiB");
    b.val(
        sec,
        &case,
        "tracker RSS when the writer is done",
        rss_writer_done,
        "MiB",
    );
    b.val(sec, &case, "tracker peak RSS (VmHWM)", hwm, "MiB");
    if m == 1_000_000 {
        b.goal("<= 256 MiB", hwm <= 256.0);
    } else {
        b.goal("<= 256 MiB (1M; quick: 100k)", hwm <= 256.0);
    }
    b.val(sec, &case, "tracker RSS once synced (VmRSS)", rss, "MiB");
    b.val(
        sec,
        &case,
        "db size (status db_bytes)",
        st.db_bytes as f64 / 1048576.0,
        "MiB",
    );
    let per = st.db_bytes as f64 / net;
    b.val(sec, &case, "db bytes per changed path (status)", per, "B");
    b.goal("<= 200 B", per <= 200.0);
    b.val(
        sec,
        &case,
        "state dir per changed path (du -sb)",
        du_b / net,
        "B",
    );
    b.val(
        sec,
        &case,
        "state dir per changed path (du -sk)",
        du_k * 1024.0 / net,
        "B",
    );
    b.val(
        sec,
        &case,
        "status call (counts the net tree)",
        status_ms,
        "ms",
    );
    b.val(
        sec,
        &case,
        "changes --since <now> (empty answer)",
        since_ms,
        "ms",
    );
}

// ---------------------------------------------------------------------------------
// 4. Reset cost vs size of the upper dir

fn section_reset(b: &mut Bench) {
    let sec = "reset";
    let lower = b.lower(10_000);
    let rounds = b.rounds(7, 3);
    let sizes = [1_000, 100_000];
    let mut rts = Vec::new();
    for &e in &sizes {
        let mut rt = Runtime::new(
            b,
            &format!("reset-{}", human(e)),
            std::slice::from_ref(&lower),
        );
        rt.start_tracker(b, None);
        create_files(&rt.mount.join("fill"), e, 4);
        rt.tracker().sync();
        rts.push(rt);
    }
    // 10 lower files, one per dir: each round modifies them (copy-up), reset puts them
    // back (removes the copy-ups).
    let targets: Vec<String> = (0..10).map(|i| file_rel(i * 1000 + 7)).collect();
    let mut times = vec![vec![]; sizes.len()];
    let (mut floor, mut status) = (times.clone(), times.clone());
    let mut entries = vec![0; sizes.len()];
    for round in 0..rounds {
        progress!("reset: round {}/{rounds}", round + 1);
        let order: Vec<usize> = if round % 2 == 0 {
            vec![0, 1]
        } else {
            vec![1, 0]
        };
        for i in order {
            let rt = &rts[i];
            for t in &targets {
                let mut f = fs::OpenOptions::new()
                    .append(true)
                    .open(rt.mount.join(t))
                    .expect("modify target");
                f.write_all(b"changed\n").expect("write");
            }
            rt.tracker().sync();
            entries[i] = walk_upper(&rt.upper);
            let mut args: Vec<std::ffi::OsString> = vec!["reset".into(), "--socket".into()];
            args.push(rt.tracker().socket.clone().into());
            args.extend(targets.iter().map(|t| format!("/{t}").into()));
            let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
            let (t, out) = run_cli(b, &refs);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "reset failed: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let done = stdout.lines().filter(|l| l.starts_with("reset ")).count();
            assert_eq!(done, targets.len(), "reset did not put back every target");
            times[i].push(t);
            // What part of it the kernel's unmount + mount and the status call are.
            floor[i].push(rt.remount());
            let t = Instant::now();
            rt.tracker().status();
            status[i].push(ms(t.elapsed()));
        }
    }
    for (i, &e) in sizes.iter().enumerate() {
        let case = format!("10 paths, upper of {} entries", human(e));
        b.med(
            sec,
            &case,
            "spfs-changes reset (fresh process)",
            "ms",
            &times[i],
        );
        b.med(
            sec,
            &case,
            "bare unmount + mount of the overlay",
            "ms",
            &floor[i],
        );
        b.med(sec, &case, "status round trip (socket)", "ms", &status[i]);
        b.val(
            sec,
            &case,
            "entries in upper dir before reset",
            entries[i] as f64,
            "",
        );
    }
    let r = ratios(&times[1], &times[0]);
    b.med(sec, "upper 100k vs upper 1k", "reset time ratio", "x", &r);
}

// ---------------------------------------------------------------------------------
// 5. Validate cost vs size of the environment

fn section_validate(b: &mut Bench) {
    let sec = "validate";
    let rounds = b.rounds(5, 3);
    let reps = 3;
    let sizes = [1_000, 100_000];
    let mut rts = Vec::new();
    for &n in &sizes {
        let lower = b.lower(n);
        let mut rt = Runtime::new(b, &format!("validate-{}", human(n)), &[lower]);
        rt.start_tracker(b, None);
        rt.tracker().call(&Request::Mark("build-start".into()));
        // A build: 60 new files, and 40 changes to files of the environment.
        create_files(&rt.mount.join("build-out"), 60, 64);
        make_changes(&rt.mount, n, 40, "build");
        rt.tracker().sync();
        rts.push(rt);
    }
    let mut times = vec![vec![]; sizes.len()];
    let mut lines = vec![0usize; sizes.len()];
    for round in 0..rounds {
        progress!("validate: round {}/{rounds}", round + 1);
        let order: Vec<usize> = if round % 2 == 0 {
            vec![0, 1]
        } else {
            vec![1, 0]
        };
        for i in order {
            let socket = rts[i].tracker().socket.clone();
            for _ in 0..reps {
                let (t, out) = run_cli(
                    b,
                    &[
                        "validate".as_ref(),
                        "--since".as_ref(),
                        "build-start".as_ref(),
                        "--socket".as_ref(),
                        socket.as_os_str(),
                    ],
                );
                // 0: clean, 1: violations (this build alters existing files), 2: error.
                assert!(
                    matches!(out.status.code(), Some(0 | 1)),
                    "validate could not validate: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                lines[i] = String::from_utf8_lossy(&out.stdout).lines().count();
                times[i].push(t);
            }
        }
    }
    for (i, &n) in sizes.iter().enumerate() {
        let case = format!("100 changes, {}-file env", human(n));
        b.med(
            sec,
            &case,
            "spfs-changes validate --since (fresh process)",
            "ms",
            &times[i],
        );
        b.val(sec, &case, "report lines", lines[i] as f64, "");
    }
    let r = ratios(&times[1], &times[0]);
    b.med(sec, "env 100k vs env 1k", "validate time ratio", "x", &r);
}
