//! Fixtures of the `reset` acceptance tests: a runtime made by `spfs-changes run` in
//! per-test temp dirs, driven by a shell script, and a checker that the script runs
//! *inside* the runtime's mount namespace (where the upper dir is visible) by starting
//! this very test binary again with `RESET_TEST_HOOK` set.
//!
//! The checker (`hook dump NAME` in a script) writes one JSON document: the ground
//! truth of a walk of the upper dir (`support::truth`), a listing of the mount (what
//! users see: types, modes, owners, bytes) and a listing of the upper dir (inode,
//! size, mtime and bytes of every entry). Next to it the script saves what the tracker
//! says (`changes --json`).

use crate::common::{cmd, file_type, net_kind, s, text};
use crate::support::{self, LowerSpec};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use store::{FileType, NetKind};

/// The name of the `#[test]` that is the checker when `RESET_TEST_HOOK` is set.
pub const HOOK_TEST: &str = "reset_test_hook";

/// Net state: path (relative to the mount) -> (kind, type).
pub type Net = BTreeMap<String, (NetKind, FileType)>;
/// What a `changes --json` document says of each path (relative to the mount): kind
/// (none: no change now), kind before (in a since-answer), type.
pub type Changes = BTreeMap<String, (Option<NetKind>, Option<NetKind>, FileType)>;
/// A listing of a tree: relative path -> entry (see [`entry`]).
pub type Tree = BTreeMap<String, Value>;

/// What one `hook dump` (plus `changes --json`) saw inside the runtime.
#[derive(Debug, Clone)]
pub struct Snap {
    /// The ground truth from a walk of the upper dir.
    pub truth: Net,
    /// The tracker's net state (`changes --json`).
    pub net: Net,
    /// Every entry seen through the mount.
    pub mount: Tree,
    /// Every entry of the upper dir, with inode numbers and mtimes.
    pub upper: Tree,
}

/// One `step NAME PATTERN...` of a script: a reset between a token and a snapshot.
#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    pub out: String,
    pub err: String,
    pub rc: i32,
    /// `changes --since <token taken just before the reset> --json`.
    pub since: Changes,
    /// The token taken before the reset.
    pub token: String,
    /// The token of the since-answer, taken after the reset.
    pub end_token: String,
    pub snap: Snap,
}

/// A runtime of `spfs-changes run` in its own temp dir: `lower/` (on the host), `mnt`
/// (the overlay, inside the runtime's namespace only), `rt` (its tmpfs), `state`.
pub struct Runtime {
    tmp: tempfile::TempDir,
    pub lower: PathBuf,
    pub mnt: PathBuf,
    pub rt: PathBuf,
    pub state: PathBuf,
}

/// Shell functions every script starts with (after `cd /`, so that the script's shell
/// never holds the mount):
/// - `fail MSG`: exit 90 with a message;
/// - `hook MODE ARG [ARG2]`: run the checker inside the namespace;
/// - `snap NAME`: checker dump plus `changes --json`;
/// - `step NAME PATTERN...`: token, reset, since-answer, snapshot.
const PREAMBLE: &str = r#"
set -u
cd /
fail() { echo "script: $*" >&2; exit 90; }
hook() {
    RESET_TEST_HOOK="$1" RESET_TEST_ARG="$2" RESET_TEST_ARG2="${3:-}" \
        "$TEST_EXE" --exact "$HOOK_TEST" --nocapture --test-threads=1 >>"$T/hook.log" 2>&1 \
        || fail "hook $* failed, see $T/hook.log"
}
snap() {
    hook dump "$T/snap.$1.json"
    spfs-changes changes --json > "$T/net.$1.json" || fail "changes --json for $1"
}
step() {
    name=$1
    shift
    tok=$(spfs-changes mark "m.$name") || fail "mark for $name"
    echo "$tok" > "$T/token.$name"
    spfs-changes reset "$@" > "$T/out.$name" 2> "$T/err.$name"
    echo $? > "$T/rc.$name"
    spfs-changes changes --since "$tok" --json > "$T/since.$name.json" || fail "since for $name"
    snap "$name"
}
"#;

impl Runtime {
    /// Temp dirs and a lower layer written from `spec`.
    pub fn new(spec: &LowerSpec) -> Runtime {
        let tmp = tempfile::Builder::new()
            .prefix("spfs-changes-reset.")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let lower = tmp.path().join("lower");
        std::fs::create_dir(&lower).expect("mkdir lower");
        spec.write_layer(0, &lower);
        Runtime {
            lower,
            mnt: tmp.path().join("mnt"),
            rt: tmp.path().join("rt"),
            state: tmp.path().join("state"),
            tmp,
        }
    }

    /// The test's own scratch dir (`$T` in scripts): on the host, visible everywhere.
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// The upper dir, as the runtime's namespace names it.
    pub fn upper(&self) -> PathBuf {
        self.rt.join("upper")
    }

    /// The changelog the tracker kept in the state dir.
    pub fn store(&self) -> store::Store {
        store::Store::open(&self.state).expect("the kept changelog")
    }

    /// `spfs-changes run ... -- sh -c PREAMBLE+script`, with `$T`, `$M`, `$RT`,
    /// `$UPPER`, `$LOWER` set for the script.
    pub fn command(&self, script: &str) -> Command {
        let mut c = cmd(&[
            "run",
            "--state",
            s(&self.state),
            "--lower",
            s(&self.lower),
            "--mount",
            s(&self.mnt),
            "--runtime-dir",
            s(&self.rt),
            "--",
            "sh",
            "-c",
            &format!("{PREAMBLE}\n{script}\nexit 0\n"),
        ]);
        let lowers = format!("{}:{}", s(&self.lower), s(&self.rt.join("lower")));
        c.env("T", self.dir())
            .env("M", &self.mnt)
            .env("RT", &self.rt)
            .env("UPPER", self.upper())
            .env("LOWER", &self.lower)
            .env("RESET_TEST_LOWERS", lowers)
            .env("RESET_TEST_MOUNT", &self.mnt)
            .env("RESET_TEST_UPPER", self.upper())
            .env("HOOK_TEST", HOOK_TEST)
            .env(
                "TEST_EXE",
                std::env::current_exe().expect("the test binary's path"),
            );
        c
    }

    /// Runs `script` in a fresh runtime; panics with everything known unless it
    /// succeeded. Returns `run`'s output (its stdout lists the final changes).
    pub fn run(&self, script: &str) -> Output {
        let out = self
            .command(script)
            .output()
            .expect("spawn spfs-changes run");
        assert!(
            out.status.success(),
            "run failed ({}):\n--- stdout\n{}\n--- stderr\n{}\n--- hook.log\n{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr),
            self.read_or_empty("hook.log")
        );
        out
    }

    pub fn read(&self, name: &str) -> String {
        let p = self.dir().join(name);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
    }

    fn read_or_empty(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir().join(name)).unwrap_or_default()
    }

    fn json(&self, name: &str) -> Value {
        serde_json::from_str(&self.read(name))
            .unwrap_or_else(|e| panic!("{name} is not JSON: {e}: {}", self.read(name)))
    }

    /// The `changes --json` document `name` as a net state relative to the mount.
    pub fn net(&self, name: &str) -> Net {
        let doc = self.json(name);
        assert!(doc["fresh"].is_null(), "{name} is a fresh answer: {doc}");
        changes(&doc, &self.mnt)
            .into_iter()
            .map(|(p, (kind, before, ty))| {
                assert!(before.is_none(), "{name}: no since, yet {p} has a before");
                let kind = kind.unwrap_or_else(|| panic!("{name}: {p} has no kind"));
                (p, (kind, ty))
            })
            .collect()
    }

    pub fn snap(&self, name: &str) -> Snap {
        let doc = self.json(&format!("snap.{name}.json"));
        let tree = |v: &Value| -> Tree {
            v.as_object()
                .expect("tree object")
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let truth = doc["truth"]
            .as_object()
            .expect("truth object")
            .iter()
            .map(|(k, v)| {
                let kt = serde_json::from_value(v.clone())
                    .unwrap_or_else(|e| panic!("truth of {k}: {e}: {v}"));
                (k.clone(), kt)
            })
            .collect();
        Snap {
            truth,
            net: self.net(&format!("net.{name}.json")),
            mount: tree(&doc["mount"]),
            upper: tree(&doc["upper"]),
        }
    }

    pub fn step(&self, name: &str) -> Step {
        let since_doc = self.json(&format!("since.{name}.json"));
        assert!(
            since_doc["fresh"].is_null(),
            "step {name}: the since answer is fresh: {since_doc}"
        );
        Step {
            name: name.to_string(),
            out: self.read(&format!("out.{name}")),
            err: self.read(&format!("err.{name}")),
            rc: self
                .read(&format!("rc.{name}"))
                .trim()
                .parse()
                .expect("exit code"),
            since: changes(&since_doc, &self.mnt),
            token: self.read(&format!("token.{name}")).trim().to_string(),
            end_token: since_doc["token"].as_str().expect("token").to_string(),
            snap: self.snap(name),
        }
    }

    /// A listing of the lower layer as users would see it through an unchanged mount.
    pub fn lower_view(&self) -> Tree {
        view(&tree(&self.lower, false))
    }

    /// A line of `reset`'s output for `rel`.
    pub fn reset_line(&self, rel: &str, was: &str) -> String {
        format!("reset {}/{rel} (was {was})", s(&self.mnt))
    }
}

/// The `changes` of a `changes --json` document, below `mount`.
pub fn changes(doc: &Value, mount: &Path) -> Changes {
    let prefix = format!("{}/", s(mount));
    doc["changes"]
        .as_array()
        .unwrap_or_else(|| panic!("no changes array in {doc}"))
        .iter()
        .map(|c| {
            let path = c["path"].as_str().expect("path");
            let rel = path
                .strip_prefix(&prefix)
                .unwrap_or_else(|| panic!("{path} is not below {prefix}"));
            let kind = |v: &Value| v.as_str().map(net_kind);
            (
                rel.to_string(),
                (
                    kind(&c["kind"]),
                    kind(&c["before"]),
                    file_type(c["type"].as_str().expect("type")),
                ),
            )
        })
        .collect()
}

/// `rel` itself and every path below it.
pub fn in_subtree(path: &str, rel: &str) -> bool {
    path == rel || path.strip_prefix(rel).is_some_and(|r| r.starts_with('/'))
}

/// The entries of `map` at or below one of `roots`.
pub fn subtree<V: Clone>(map: &BTreeMap<String, V>, roots: &[&str]) -> BTreeMap<String, V> {
    map.iter()
        .filter(|(k, _)| roots.iter().any(|r| in_subtree(k, r)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// `map` without the entries at or below one of `roots`.
pub fn without<V: Clone>(map: &BTreeMap<String, V>, roots: &[&str]) -> BTreeMap<String, V> {
    map.iter()
        .filter(|(k, _)| !roots.iter().any(|r| in_subtree(k, r)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

pub fn keys<V>(map: &BTreeMap<String, V>) -> BTreeSet<String> {
    map.keys().cloned().collect()
}

/// What users see of an entry: type, mode, owner, bytes (and mtime and size of
/// non-dirs); no inode numbers and no dir mtimes, which a mount legitimately changes.
pub fn view(tree: &Tree) -> Tree {
    tree.iter()
        .map(|(k, v)| {
            let mut o = serde_json::Map::new();
            for field in ["type", "mode", "uid", "gid", "content"] {
                o.insert(field.into(), v[field].clone());
            }
            if v["type"] != "dir" {
                for field in ["size", "mtime", "mtime_nsec"] {
                    o.insert(field.into(), v[field].clone());
                }
            }
            (k.clone(), Value::Object(o))
        })
        .collect()
}

/// Asserts that the tracker's net state is the ground truth.
pub fn assert_net_is_truth(snap: &Snap, context: &str) {
    assert_eq!(
        snap.net, snap.truth,
        "{context}: the tracker's net state (left) is not what a walk of the upper dir says (right)"
    );
}

/// A listing of every entry below `root`, not following symlinks: type, mode, owner,
/// inode, size, mtime, bytes (files), target (symlinks), rdev (devices), and for dirs
/// whether they are opaque (when `xattrs`). An entry that cannot be read is listed
/// with its error (an overlay whose upper dir was edited under it may show that).
pub fn tree(root: &Path, xattrs: bool) -> Tree {
    fn go(root: &Path, rel: &mut Vec<u8>, xattrs: bool, out: &mut Tree) {
        let listed =
            support::for_each_child(root, rel, |rel, p| match std::fs::symlink_metadata(p) {
                Ok(m) => {
                    let mut v = entry(p, &m);
                    if xattrs && m.is_dir() {
                        let opaque = support::get_xattr(p, "trusted.overlay.opaque")
                            .ok()
                            .flatten()
                            .is_some_and(|v| v == b"y");
                        v["opaque"] = json!(opaque);
                    }
                    out.insert(text(rel), v);
                    if m.is_dir() {
                        go(root, rel, xattrs, out);
                    }
                }
                Err(e) => {
                    out.insert(text(rel), json!({ "error": e.to_string() }));
                }
            });
        if let Err(e) = listed {
            out.insert(format!("{}/<error>", text(rel)), json!(e.to_string()));
        }
    }
    let mut out = Tree::new();
    go(root, &mut Vec::new(), xattrs, &mut out);
    out
}

fn entry(p: &Path, m: &std::fs::Metadata) -> Value {
    let ft = m.file_type();
    let (ty, content) = if ft.is_file() {
        match std::fs::read(p) {
            Ok(bytes) => ("file", json!(text(&bytes))),
            Err(e) => ("file", json!(format!("<error: {e}>"))),
        }
    } else if ft.is_dir() {
        ("dir", Value::Null)
    } else if ft.is_symlink() {
        match std::fs::read_link(p) {
            Ok(t) => ("symlink", json!(text(t.as_os_str().as_bytes()))),
            Err(e) => ("symlink", json!(format!("<error: {e}>"))),
        }
    } else if ft.is_char_device() && m.rdev() == 0 {
        ("whiteout", Value::Null)
    } else {
        let kind = if ft.is_fifo() {
            "fifo"
        } else if ft.is_socket() {
            "socket"
        } else {
            "device"
        };
        (
            kind,
            json!(format!(
                "{}:{}",
                libc::major(m.rdev()),
                libc::minor(m.rdev())
            )),
        )
    };
    json!({
        "type": ty,
        "mode": m.mode() & 0o7777,
        "uid": m.uid(),
        "gid": m.gid(),
        "ino": m.ino(),
        "size": m.size(),
        "mtime": m.mtime(),
        "mtime_nsec": m.mtime_nsec(),
        "content": content,
    })
}

/// The checker, run inside the runtime by a script's `hook MODE ARG [ARG2]`:
/// - `dump OUT`: writes the truth, the mount listing and the upper listing to OUT;
/// - `exchange A B`: swaps two paths atomically (`renameat2(RENAME_EXCHANGE)`);
/// - `thread-ns BASE`: a thread of this process moves to a mount namespace of its
///   own (a copy of the runtime's, so it mounts the same overlay superblock) while
///   the process's main thread stays where it is; creates `BASE.ready`, then waits
///   for `BASE.done`. Holds no file, dir or mapping on the overlay.
///
/// Does nothing when `RESET_TEST_HOOK` is unset (an ordinary test run).
pub fn hook() {
    let Ok(mode) = std::env::var("RESET_TEST_HOOK") else {
        return;
    };
    let env = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is unset"));
    let arg = PathBuf::from(env("RESET_TEST_ARG"));
    match mode.as_str() {
        "dump" => {
            let upper = PathBuf::from(env("RESET_TEST_UPPER"));
            let mount = PathBuf::from(env("RESET_TEST_MOUNT"));
            let lowers: Vec<PathBuf> = env("RESET_TEST_LOWERS")
                .split(':')
                .map(PathBuf::from)
                .collect();
            let truth: serde_json::Map<String, Value> = support::truth(&upper, &lowers)
                .into_iter()
                .map(|(p, kt)| (text(&p), json!(kt)))
                .collect();
            let doc = json!({
                "truth": truth,
                "mount": tree(&mount, false),
                "upper": tree(&upper, true),
            });
            let body = serde_json::to_vec_pretty(&doc).expect("JSON");
            std::fs::write(&arg, body).unwrap_or_else(|e| panic!("write {}: {e}", arg.display()));
        }
        "exchange" => {
            let other = PathBuf::from(env("RESET_TEST_ARG2"));
            nix::fcntl::renameat2(
                nix::fcntl::AT_FDCWD,
                &arg,
                nix::fcntl::AT_FDCWD,
                &other,
                nix::fcntl::RenameFlags::RENAME_EXCHANGE,
            )
            .unwrap_or_else(|e| {
                panic!(
                    "renameat2({}, {}, RENAME_EXCHANGE): {e}",
                    arg.display(),
                    other.display()
                )
            });
        }
        "thread-ns" => {
            let base = arg.into_os_string();
            let with = |ext: &str| {
                let mut p = base.clone();
                p.push(ext);
                PathBuf::from(p)
            };
            let (ready, done) = (with(".ready"), with(".done"));
            std::thread::spawn(move || {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
                    .expect("unshare(CLONE_NEWNS)");
                std::fs::write(&ready, b"").expect("write the ready file");
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
                while !done.exists() && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            })
            .join()
            .expect("the namespace thread");
        }
        other => panic!("unknown RESET_TEST_HOOK mode {other:?}"),
    }
}
