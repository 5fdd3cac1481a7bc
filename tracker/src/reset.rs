//! Puts selected paths of a runtime back to what its lower layers hold.
//!
//! The kernel documents changes to the layers of a mounted overlay as undefined
//! behaviour, so the upper dir is only edited once no overlay superblock can be using
//! it: the overlay is unmounted *without* `MNT_DETACH` (the kernel refuses while any
//! process holds it, and the refusal names nobody, so we find the holders ourselves),
//! every mount namespace is checked for another mount of that superblock or another
//! overlay on the same upper dir, and open files on detached overlays are looked for.
//! Only then are the targets removed from the upper dir, through `openat2` with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` so that nothing planted in the upper dir can
//! lead outside it, the environment's masks at and below them are put back (spfs's
//! whiteouts for what its layers delete), and the overlay is mounted again with the
//! same options.
//!
//! When the kernel refuses the unmount because the overlay is busy, the targets are
//! put back by writing through the mount instead (see [`crate::restore`]), which is
//! legal while it is mounted.
//!
//! Targets come from the changelog (net entries matching spfs's gitignore-style
//! patterns), so finding them never walks the upper dir.

use crate::TrackerError;
use crate::masks::Masks;
use crate::mountinfo::{self, MountEntry};
use crate::restore::{self, Layers, Progress};
use crate::sys;
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::{Gid, Uid, UnlinkatFlags};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashSet};
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use store::{Change, FileType, NetKind, Query, Store};

/// spfs's reset patterns (gitignore lines: `file.*`, `dir1/`, `/file`, `*`), matched
/// against changed paths and their parent dirs.
pub struct Patterns {
    matcher: Gitignore,
    /// Literal leading dirs shared by every pattern, when all are anchored: the
    /// changelog is then read only below them.
    prefixes: Vec<Vec<u8>>,
}

impl Patterns {
    /// `mount` is stripped from patterns that start with it (`/spfs/x` is `/x`).
    pub fn new(patterns: &[String], mount: &Path) -> Result<Patterns, TrackerError> {
        let mut builder = GitignoreBuilder::new("/");
        let mut prefixes = Vec::new();
        let mut all_anchored = !patterns.is_empty();
        let mount = mount.to_string_lossy();
        for raw in patterns {
            let pattern = match raw.strip_prefix(mount.as_ref()) {
                // The mount point itself (`/spfs`, `/spfs/`) names everything in it.
                Some(rest) if rest.trim_matches('/').is_empty() => "/*",
                Some(rest) if rest.starts_with('/') => rest,
                _ => raw.as_str(),
            };
            if pattern.trim().is_empty() {
                return Err(TrackerError::Reset(format!("empty reset pattern {raw:?}")));
            }
            // `/` or `//` (an empty variable in `/$DIR/`) names no path: refuse it rather
            // than guess between nothing and everything.
            if pattern.trim().trim_matches('/').is_empty() {
                return Err(TrackerError::Reset(format!(
                    "reset pattern {raw:?} names no path (`*` or --all resets everything)"
                )));
            }
            builder
                .add_line(None, pattern)
                .map_err(|e| TrackerError::Reset(format!("bad reset pattern {raw:?}: {e}")))?;
            match literal_prefix(pattern) {
                Some(p) => prefixes.push(p),
                None => all_anchored = false,
            }
        }
        let matcher = builder
            .build()
            .map_err(|e| TrackerError::Reset(format!("bad reset patterns: {e}")))?;
        Ok(Patterns {
            matcher,
            prefixes: if all_anchored { prefixes } else { Vec::new() },
        })
    }

    /// Whether `rel` (a dir when `is_dir`), or a dir above it, matches. The root
    /// itself is never matched: `*/` names the dirs in it, not it.
    pub fn matches(&self, rel: &[u8], is_dir: bool) -> bool {
        let matched = |path: &[u8], is_dir| {
            let mut abs = Vec::with_capacity(path.len() + 1);
            abs.push(b'/');
            abs.extend_from_slice(path);
            self.matcher
                .matched(Path::new(OsStr::from_bytes(&abs)), is_dir)
                .is_ignore()
        };
        let parents = rel
            .iter()
            .enumerate()
            .filter(|&(_, &b)| b == b'/')
            .map(|(i, _)| &rel[..i]);
        parents
            .into_iter()
            .any(|p| !p.is_empty() && matched(p, true))
            || matched(rel, is_dir)
    }
}

/// The leading components of an anchored pattern that contain no glob syntax.
fn literal_prefix(pattern: &str) -> Option<Vec<u8>> {
    let anchored = pattern.starts_with('/') || pattern.trim_end_matches('/').contains('/');
    if !anchored || pattern.starts_with('!') {
        return None;
    }
    let mut literal = Vec::new();
    for c in pattern.trim_matches('/').split('/') {
        if c.is_empty() || c.contains(['*', '?', '[', '\\']) {
            break;
        }
        literal.push(c);
    }
    (!literal.is_empty()).then(|| literal.join("/").into_bytes())
}

/// What a reset will put back: the top-most changed paths matching the patterns, and
/// the environment's masks at and below them, which the reset must leave (or put back)
/// in place.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetPlan {
    /// The top-most changed paths to put back, in path order.
    pub targets: Vec<Change>,
    /// The changed paths below a target: removing a target from the upper dir takes
    /// them with it, putting it back through the mount does them one by one.
    pub covered: Vec<Change>,
    /// The environment's masks at or below a target.
    pub masks: Masks,
    /// Lower paths hidden below a removed or replaced dir that is not a target
    /// (`rm -rf d; mkdir d; reset d/x`): put back from the lower layers, the dir
    /// staying as it is. Kind `Removed`, the type of the lower entry.
    pub hidden: Vec<Change>,
}

/// What a reset plan needs of the lower layers.
pub trait LowerLookup {
    /// Whether the lower layers hold a dir at `rel` (a removed dir is a whiteout in
    /// the upper dir, and `/etc/` still names it).
    fn is_dir(&self, rel: &[u8]) -> bool;
    /// What the lower layers hold below the dir `rel`: each path with whether it is
    /// a dir.
    fn tree(&self, rel: &[u8]) -> Vec<(Vec<u8>, bool)>;
}

impl LowerLookup for crate::classify::Classifier {
    fn is_dir(&self, rel: &[u8]) -> bool {
        self.original(rel).is_ok_and(|o| o.is_dir)
    }

    fn tree(&self, rel: &[u8]) -> Vec<(Vec<u8>, bool)> {
        self.lower_tree(rel)
            .map(|t| t.into_iter().map(|(p, _, is_dir)| (p, is_dir)).collect())
            .unwrap_or_default()
    }
}

/// The changes a reset with `patterns` would put back, from the changelog (never a
/// walk of the upper dir). A path that is one of the environment's `masks` and is
/// `Removed` (its whiteout is intact) is not a target: there is nothing to put back.
/// Fails when the changelog cannot be read.
/// Lower paths hidden by a removed or replaced dir that match are planned too
/// (`ResetPlan::hidden`).
pub fn plan(
    store: &Store,
    patterns: &Patterns,
    masks: &Masks,
    lower: &dyn LowerLookup,
) -> Result<ResetPlan, TrackerError> {
    let query = Query {
        prefixes: patterns.prefixes.clone(),
        ..Query::default()
    };
    let changes = store.query(&query)?.changes;
    // Dirs that hide what the lower layers hold below them: among the changes, and
    // above the literal prefixes the changelog was read below (`d` for `d/x`).
    // A dir replaced by a file or symlink is not one: putting something back below
    // it would take that away.
    let hides = |kind: Option<NetKind>, file_type: FileType, path: &[u8]| {
        matches!(
            (kind, file_type),
            (Some(NetKind::Removed), _) | (Some(NetKind::Replaced), FileType::Dir)
        ) && lower.is_dir(path)
    };
    let mut hiding: BTreeSet<Vec<u8>> = changes
        .iter()
        .filter(|c| hides(c.kind, c.file_type, &c.path))
        .map(|c| c.path.clone())
        .collect();
    for prefix in &patterns.prefixes {
        for (i, _) in prefix.iter().enumerate().filter(|&(_, &b)| b == b'/') {
            let dir = &prefix[..i];
            if let Some(entry) = store.net_entry(dir)?
                && hides(Some(entry.kind), entry.file_type, dir)
            {
                hiding.insert(dir.to_vec());
            }
        }
    }
    let mut targets: Vec<Change> = changes
        .into_iter()
        .filter(|c| {
            let is_dir = c.file_type == FileType::Dir
                || (c.kind == Some(NetKind::Removed) && lower.is_dir(&c.path));
            patterns.matches(&c.path, is_dir)
        })
        .filter(|c| !(masks.contains(&c.path) && c.kind == Some(NetKind::Removed)))
        .collect();
    // Removing a dir removes what is below it: keep only the top-most targets.
    targets.sort_by(|a, b| a.path.cmp(&b.path));
    let mut kept: Vec<Change> = Vec::with_capacity(targets.len());
    let mut covered = Vec::new();
    // The top-most target that is a prefix of the next paths: in byte order, a dir's
    // subtree is not contiguous (`d-x` sorts between `d` and `d/x`), so keep a stack.
    let mut open: Vec<usize> = Vec::new();
    for t in targets {
        // Every path that starts with a target's bytes sorts in one run after it.
        while open
            .last()
            .is_some_and(|&i| !t.path.starts_with(&kept[i].path))
        {
            open.pop();
        }
        let below = |k: &Change| t.path.get(k.path.len()) == Some(&b'/');
        if open.iter().any(|&i| below(&kept[i])) {
            covered.push(t);
        } else {
            open.push(kept.len());
            kept.push(t);
        }
    }
    let is_below =
        |path: &[u8], dir: &[u8]| path.starts_with(dir) && path.get(dir.len()) == Some(&b'/');
    let changed: BTreeSet<&[u8]> = kept
        .iter()
        .chain(&covered)
        .map(|c| c.path.as_slice())
        .collect();
    // Something new that is not a dir, between the hiding dir and a hidden path,
    // would have to go to put the path back: not what a reset of that path asks.
    let blocked = |path: &[u8], dir: &[u8]| -> Result<bool, TrackerError> {
        for (i, _) in path
            .iter()
            .enumerate()
            .filter(|&(i, &b)| b == b'/' && i > dir.len())
        {
            if store
                .net_entry(&path[..i])?
                .is_some_and(|e| e.file_type != FileType::Dir)
            {
                return Ok(true);
            }
        }
        Ok(false)
    };
    let mut hidden = Vec::new();
    for dir in &hiding {
        // A dir that is itself a target (or below one) comes back whole.
        if kept
            .iter()
            .any(|k| k.path == *dir || is_below(dir, &k.path))
        {
            continue;
        }
        for (path, is_dir) in lower.tree(dir) {
            if changed.contains(path.as_slice())
                || masks.hides(&path)
                || !patterns.matches(&path, is_dir)
                || hidden.iter().any(|h: &Change| is_below(&path, &h.path))
                || blocked(&path, dir)?
            {
                continue;
            }
            hidden.push(Change {
                path,
                kind: Some(NetKind::Removed),
                before: None,
                file_type: if is_dir {
                    FileType::Dir
                } else {
                    FileType::File
                },
                origin: None,
                seq: 0,
            });
        }
    }
    let mut under = BTreeSet::new();
    for t in kept.iter().chain(&hidden) {
        under.extend(masks.under(&t.path).cloned());
    }
    Ok(ResetPlan {
        targets: kept,
        covered,
        masks: Masks::new(under),
        hidden,
    })
}

/// Where the overlay is and how it was mounted, read from this namespace's mountinfo.
#[derive(Debug, Clone)]
pub struct MountSpec {
    pub mount_point: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
    /// The lower dirs, top-most first.
    pub lowers: Vec<PathBuf>,
    flags: MsFlags,
    data: String,
    /// `st_dev` of the overlay's superblock (its dirs; its other files report the
    /// device of their layer, so open files are matched by `mount_id`).
    dev: u64,
    /// The id of the overlay's mount in the caller's namespace.
    mount_id: u64,
    /// `(st_dev, st_ino)` of the upper dir.
    upper_id: (u64, u64),
}

impl MountSpec {
    /// The overlay at `mount_point` in the caller's mount namespace. Fails when
    /// nothing or no writable overlay is mounted there, or its upper dir cannot be
    /// reached.
    pub fn current(mount_point: &Path) -> Result<MountSpec, TrackerError> {
        let text = std::fs::read("/proc/thread-self/mountinfo").map_err(TrackerError::io(
            "cannot read",
            "/proc/thread-self/mountinfo",
        ))?;
        let entries = mountinfo::parse(&text);
        let entry = mountinfo::find_mount(&entries, mount_point).ok_or_else(|| {
            TrackerError::Reset(format!("nothing is mounted at {}", mount_point.display()))
        })?;
        let layers = entry.overlay_layers().ok_or_else(|| {
            TrackerError::Reset(format!(
                "{} is not a writable overlay",
                mount_point.display()
            ))
        })?;
        let dev = std::fs::metadata(mount_point)
            .map_err(TrackerError::io("cannot stat", mount_point))?
            .dev();
        let upper = std::fs::metadata(&layers.upper)
            .map_err(TrackerError::io("cannot stat", &layers.upper))?;
        Ok(MountSpec {
            mount_point: mount_point.to_path_buf(),
            upper: layers.upper,
            work: layers.work,
            lowers: layers.lowers,
            flags: mount_flags(entry),
            data: mount_data(entry)?,
            dev,
            mount_id: entry.id,
            upper_id: (upper.dev(), upper.ino()),
        })
    }

    fn mount(&self) -> Result<(), TrackerError> {
        nix::mount::mount(
            Some("overlay"),
            &self.mount_point,
            Some("overlay"),
            self.flags,
            Some(self.data.as_str()),
        )
        .map_err(|e| {
            TrackerError::Reset(format!(
                "the overlay could not be mounted again at {} ({e}); to restore it: mount -t overlay overlay -o '{}' {}",
                self.mount_point.display(),
                self.data,
                self.mount_point.display()
            ))
        })
    }
}

fn mount_flags(entry: &MountEntry) -> MsFlags {
    let mut flags = MsFlags::empty();
    for o in &entry.mount_options {
        flags |= match o.as_str() {
            "ro" => MsFlags::MS_RDONLY,
            "nosuid" => MsFlags::MS_NOSUID,
            "nodev" => MsFlags::MS_NODEV,
            "noexec" => MsFlags::MS_NOEXEC,
            "noatime" => MsFlags::MS_NOATIME,
            "nodiratime" => MsFlags::MS_NODIRATIME,
            "strictatime" => MsFlags::MS_STRICTATIME,
            "sync" => MsFlags::MS_SYNCHRONOUS,
            _ => MsFlags::empty(),
        };
    }
    flags
}

/// The overlay's own options as mountinfo shows them (`rw`/`ro` is a mount flag).
fn mount_data(entry: &MountEntry) -> Result<String, TrackerError> {
    let mut parts = Vec::new();
    for (k, v) in &entry.super_options {
        if k == "rw" || k == "ro" {
            continue;
        }
        match v {
            None => parts.push(k.clone()),
            Some(v) => {
                if v.contains(&b',') {
                    return Err(TrackerError::Reset(format!(
                        "overlay option {k} holds a ',': it cannot be given back to mount(2)"
                    )));
                }
                parts.push(format!("{k}={}", String::from_utf8_lossy(v)));
            }
        }
    }
    Ok(parts.join(","))
}

/// A process that keeps an overlay busy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub command: String,
}

/// Processes with a root or cwd (of any thread) on filesystem `dev`, a file open
/// through mount `mount_id`, or a mapping on `dev`.
pub fn holders(dev: u64, mount_id: u64) -> Vec<Holder> {
    let mut out = Vec::new();
    for pid in sys::pids() {
        let base = PathBuf::from(format!("/proc/{pid}"));
        let on_dev = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.dev() == dev);
        let mut holds = tasks(pid)
            .iter()
            .any(|t| on_dev(&t.join("cwd")) || on_dev(&t.join("root")));
        if !holds {
            holds = open_mounts(pid).iter().any(|(_, id)| *id == mount_id);
        }
        if !holds {
            holds = maps_devs(pid).contains(&dev);
        }
        if holds {
            let command = std::fs::read_to_string(base.join("comm")).unwrap_or_default();
            out.push(Holder {
                pid,
                command: command.trim().to_string(),
            });
        }
    }
    out
}

/// `/proc/<pid>/task/<tid>` of each thread of `pid`: a thread may have a mount
/// namespace, root and cwd of its own (`unshare(CLONE_NEWNS)` acts on one thread, and
/// `/proc/<pid>/` shows the main thread's).
fn tasks(pid: u32) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|it| it.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// The open files of `pid` (`/proc/<pid>/fd/<n>`) and the id of the mount each was
/// opened through (`mnt_id` in fdinfo). Devices do not tell: an overlay reports its
/// layers' devices for its files, not its own.
fn open_mounts(pid: u32) -> Vec<(PathBuf, u64)> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    fds.filter_map(Result::ok)
        .filter_map(|e| {
            let info = std::fs::read_to_string(e.path()).ok()?;
            let id = info
                .lines()
                .find_map(|l| l.strip_prefix("mnt_id:"))?
                .trim()
                .parse()
                .ok()?;
            Some((
                PathBuf::from(format!("/proc/{pid}/fd")).join(e.file_name()),
                id,
            ))
        })
        .collect()
}

/// Devices of the files a process has mapped (`/proc/<pid>/maps` spells them hex).
fn maps_devs(pid: u32) -> HashSet<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let dev = l.split_whitespace().nth(3)?;
            let (ma, mi) = dev.split_once(':')?;
            let (ma, mi) = (
                u32::from_str_radix(ma, 16).ok()?,
                u32::from_str_radix(mi, 16).ok()?,
            );
            (ma != 0 || mi != 0).then(|| libc::makedev(ma, mi))
        })
        .collect()
}

/// Another mount of the overlay's superblock than ours, in any mount namespace.
fn mounted_elsewhere(spec: &MountSpec) -> Option<String> {
    namespaces().seen.into_iter().find_map(|(pid, _, mounts)| {
        mounts
            .iter()
            .find(|e| {
                e.fs_type == "overlay"
                    && libc::makedev(e.dev.0, e.dev.1) == spec.dev
                    && e.id != spec.mount_id
            })
            .map(|e| {
                format!(
                    "the overlay is also mounted at {} (mount namespace of pid {pid})",
                    e.mount_point.display()
                )
            })
    })
}

/// After our unmount: anything that shows an overlay superblock may still use the
/// upper dir. `None` when nothing does.
fn still_in_use(spec: &MountSpec) -> Option<String> {
    // Mount ids are unique across namespaces: one that no namespace shows is detached.
    let mut mounted_ids = HashSet::new();
    let namespaces = namespaces();
    if let Some(why) = namespaces.unreadable {
        return Some(format!("{why}: it might use the upper dir"));
    }
    for (pid, task, mounts) in namespaces.seen {
        for e in mounts {
            mounted_ids.insert(e.id);
            // Our superblock's device number is free once it is gone, and the next
            // filesystem mounted anywhere may get it: only an overlay on our upper
            // dir (the same inode, whatever path that namespace names it by), or
            // one with our number whose upper dir is out of reach, counts.
            let Some(layers) = e.overlay_layers() else {
                continue;
            };
            let upper = task
                .join("root")
                .join(layers.upper.strip_prefix("/").unwrap_or(&layers.upper));
            let upper = std::fs::metadata(upper).map(|m| (m.dev(), m.ino()));
            let same_dev = libc::makedev(e.dev.0, e.dev.1) == spec.dev;
            let same_upper = upper.as_ref().is_ok_and(|id| *id == spec.upper_id);
            if same_dev && (same_upper || upper.is_err()) {
                return Some(format!(
                    "the overlay is still mounted at {} in the mount namespace of pid {pid}",
                    e.mount_point.display()
                ));
            }
            if same_upper {
                return Some(format!(
                    "another overlay on the same upper dir is mounted at {} (namespace of pid {pid})",
                    e.mount_point.display()
                ));
            }
        }
    }
    // Open files on an overlay that no namespace shows any more (detached lazily):
    // it might use this upper dir.
    let mut fresh_ids: Option<HashSet<u64>> = None;
    for pid in sys::pids() {
        for (fd, id) in open_mounts(pid) {
            if mounted_ids.contains(&id) || !is_overlay(&fd) {
                continue;
            }
            // Mounted since the scan above, maybe: look again once.
            let fresh = fresh_ids.get_or_insert_with(all_mount_ids);
            if !fresh.contains(&id) {
                return Some(format!(
                    "pid {pid} has a file open on a detached overlay, which may use this upper dir"
                ));
            }
        }
    }
    None
}

/// The ids of the mounts of every mount namespace in use.
fn all_mount_ids() -> HashSet<u64> {
    namespaces()
        .seen
        .into_iter()
        .flat_map(|(_, _, mounts)| mounts.into_iter().map(|e| e.id))
        .collect()
}

/// Each mount namespace in use, once, read through any of its tasks.
fn namespaces() -> Namespaces {
    let mut seen_ns = HashSet::new();
    let mut unreadable: std::collections::HashMap<u64, String> = Default::default();
    let mut out = Namespaces::default();
    for pid in sys::pids() {
        for task in tasks(pid) {
            let Ok(ns) = std::fs::metadata(task.join("ns/mnt")).map(|m| m.ino()) else {
                continue;
            };
            if seen_ns.contains(&ns) {
                continue;
            }
            match std::fs::read(task.join("mountinfo")) {
                Ok(text) => {
                    seen_ns.insert(ns);
                    unreadable.remove(&ns);
                    out.seen.push((pid, task, mountinfo::parse(&text)));
                }
                // Refused (not just a task that ended meanwhile): what that namespace
                // mounts cannot be known.
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    unreadable.entry(ns).or_insert_with(|| {
                        format!("the mount table of pid {pid} cannot be read ({e})")
                    });
                }
                // The task ended meanwhile: another of its namespace may be read.
                Err(_) => {}
            }
        }
    }
    // Unreadable through every task of its namespace.
    out.unreadable = unreadable.into_values().next();
    out
}

/// The mount namespaces in use, as `namespaces` finds them.
#[derive(Default)]
struct Namespaces {
    /// Each namespace once: a process in it, the thread's `/proc` dir that shows it,
    /// and its mounts.
    seen: Vec<(u32, PathBuf, Vec<MountEntry>)>,
    /// Why some namespace's mounts could not be read: it might use the upper dir.
    unreadable: Option<String>,
}

fn is_overlay(p: &Path) -> bool {
    nix::sys::statfs::statfs(p)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::OVERLAYFS_SUPER_MAGIC)
}

/// What a reset did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The overlay was unmounted, `removed` entries went from the upper dir, the
    /// masks at or below the targets were put back, and it was mounted again.
    Done { removed: usize },
    /// The upper dir could not be edited (`why`), so the targets were put back by
    /// writing through the mount; `restored` changed paths were put back.
    ThroughMount { why: Busy, restored: usize },
}

/// Why a reset went through the mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Busy {
    /// The kernel refused the unmount: these processes hold the overlay at
    /// `mount_point` (cwd, root, open files, mappings; empty when none was found,
    /// such as a filesystem mounted below it).
    Held {
        mount_point: PathBuf,
        holders: Vec<Holder>,
    },
    /// The unmount went through, but something else may use the upper dir (another
    /// namespace's mount of the overlay, a lazily detached one with open files).
    UsedElsewhere(String),
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Busy::Held {
                mount_point,
                holders,
            } if holders.is_empty() => write!(
                f,
                "{} is busy (held by no process found: a mount below it?)",
                mount_point.display()
            ),
            Busy::Held {
                mount_point,
                holders,
            } => {
                let who: Vec<String> = holders
                    .iter()
                    .map(|h| format!("pid {} ({})", h.pid, h.command))
                    .collect();
                write!(
                    f,
                    "{} is busy (held by {})",
                    mount_point.display(),
                    who.join(", ")
                )
            }
            Busy::UsedElsewhere(why) => f.write_str(why),
        }
    }
}

/// Puts the targets of `plan` back to what the lower layers hold on the overlay at
/// `spec.mount_point`. Must run in the runtime's mount namespace, outside the mount
/// (its cwd and root elsewhere).
///
/// When the overlay can be unmounted (without `MNT_DETACH`), removes the targets from
/// the upper dir, puts back the environment's masks at or below them, and mounts it
/// again: [`Outcome::Done`]. When the kernel refuses because it is busy, writes the
/// lower layers' state through the mount instead ([`restore::through_mount`];
/// `progress` hears of long refills): [`Outcome::ThroughMount`].
///
/// Fails (nothing changed) when another mount namespace still mounts the overlay or
/// another overlay uses its upper dir; fails naming the path when an edit fails, with
/// the overlay mounted again either way (or the error says how to mount it).
pub fn execute(
    spec: &MountSpec,
    plan: &ResetPlan,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Outcome, TrackerError> {
    let layers = Layers {
        mount_point: &spec.mount_point,
        upper: &spec.upper,
        lowers: &spec.lowers,
    };
    let through_mount = |why: Busy, progress: &mut dyn FnMut(Progress<'_>)| {
        let changes: Vec<Change> = plan.targets.iter().chain(&plan.covered).cloned().collect();
        let restored =
            restore::through_mount(layers, &changes, &plan.hidden, &plan.masks, progress)?;
        Ok(Outcome::ThroughMount { why, restored })
    };
    // The same overlay mounted elsewhere too (another namespace's copy of the mount, a
    // bind mount): unmounting ours would leave it alive, and mounting again would put
    // a second overlay on the same upper dir. Going through the mount is legal.
    if let Some(why) = mounted_elsewhere(spec) {
        return through_mount(Busy::UsedElsewhere(why), progress);
    }
    if let Err(e) = nix::mount::umount2(&spec.mount_point, MntFlags::empty()) {
        if e == Errno::EBUSY {
            let why = Busy::Held {
                mount_point: spec.mount_point.clone(),
                holders: holders(spec.dev, spec.mount_id),
            };
            return through_mount(why, progress);
        }
        return Err(TrackerError::Reset(format!(
            "cannot unmount {}: {e}",
            spec.mount_point.display()
        )));
    }
    let targets: Vec<Vec<u8>> = plan.targets.iter().map(|c| c.path.clone()).collect();
    let edited = match still_in_use(spec) {
        Some(why) => Err(TrackerError::Reset(format!(
            "{why}; the upper dir was not changed"
        ))),
        None => remove_all(&spec.upper, &targets).and_then(|removed| {
            put_masks_back(&spec.upper, &spec.lowers, &plan.masks).map(|()| removed)
        }),
    };
    let removed = match (edited, spec.mount()) {
        (Ok(removed), Ok(())) => removed,
        (Err(e), Ok(())) | (Ok(_), Err(e)) => return Err(e),
        // Both: the edit's reason, and how to get the overlay back.
        (Err(edit), Err(mount)) => {
            return Err(TrackerError::Reset(format!(
                "{}; and {}",
                edit.to_string().trim_start_matches("reset: "),
                mount.to_string().trim_start_matches("reset: ")
            )));
        }
    };
    // What a removed or replaced dir hides is written back through the mount: a new
    // overlay superblock is in place, and the dir stays as it is.
    if !plan.hidden.is_empty() {
        restore::through_mount(layers, &[], &plan.hidden, &plan.masks, progress)?;
    }
    Ok(Outcome::Done { removed })
}

/// Writes a whiteout (char device 0/0, mode 0, owned by root, as spfs writes them) at
/// each of `masks` below `upper`, where there is none, creating missing parent dirs
/// with the mode and owner of the top-most lower layer that has them as dirs. Only
/// for an upper dir no overlay uses.
fn put_masks_back(upper: &Path, lowers: &[PathBuf], masks: &Masks) -> Result<(), TrackerError> {
    if masks.is_empty() {
        return Ok(());
    }
    let root: OwnedFd = std::fs::File::open(upper)
        .map_err(TrackerError::io("cannot open upper dir", upper))?
        .into();
    let mut lower_roots = Vec::with_capacity(lowers.len());
    for l in lowers {
        let fd: OwnedFd = std::fs::File::open(l)
            .map_err(TrackerError::io("cannot open lower dir", l))?
            .into();
        lower_roots.push(fd);
    }
    let fail = |rel: &[u8], what: &str, e: Errno| {
        TrackerError::Reset(format!(
            "cannot put the environment's mask {} back in the upper dir ({what}): {e}",
            String::from_utf8_lossy(rel)
        ))
    };
    for mask in masks.iter() {
        let comps: Vec<&[u8]> = mask.split(|&b| b == b'/').collect();
        if comps
            .iter()
            .any(|c| c.is_empty() || *c == b"." || *c == b"..")
        {
            return Err(fail(mask, "check", Errno::EINVAL));
        }
        let Some((name, dirs)) = comps.split_last() else {
            continue;
        };
        let mut dir = root
            .try_clone()
            .map_err(|_| fail(mask, "dup", Errno::EBADF))?;
        let mut prefix: Vec<u8> = Vec::new();
        for c in dirs {
            if !prefix.is_empty() {
                prefix.push(b'/');
            }
            prefix.extend_from_slice(c);
            dir = match open_beneath(&dir, c, true) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => make_dir_like_lower(&dir, c, &prefix, &lower_roots)
                    .map_err(|e| fail(mask, "create its parent dir", e))?,
                Err(e) => return Err(fail(mask, "open its parent dir", e)),
            };
        }
        let name = OsStr::from_bytes(name);
        match nix::sys::stat::fstatat(&dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(s)
                if (s.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFCHR.bits()
                    && s.st_rdev == 0 =>
            {
                continue;
            }
            Ok(_) => {
                remove_entry(&dir, name).map_err(|e| fail(mask, "remove what is there", e))?;
            }
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(fail(mask, "stat", e)),
        }
        nix::sys::stat::mknodat(&dir, name, SFlag::S_IFCHR, Mode::empty(), 0)
            .map_err(|e| fail(mask, "mknod", e))?;
        nix::unistd::fchownat(
            &dir,
            name,
            Some(Uid::from_raw(0)),
            Some(Gid::from_raw(0)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| fail(mask, "chown", e))?;
    }
    Ok(())
}

/// Creates dir `name` in `parent` (at `rel` in the upper dir) with the mode and owner
/// of the top-most lower layer holding `rel` as a dir (else 0755, root), and opens it.
fn make_dir_like_lower(
    parent: &OwnedFd,
    name: &[u8],
    rel: &[u8],
    lower_roots: &[OwnedFd],
) -> nix::Result<OwnedFd> {
    let like = lower_roots.iter().find_map(|l| {
        let fd = open_beneath(l, rel, true).ok()?;
        nix::sys::stat::fstat(&fd).ok()
    });
    let (mode, uid, gid) = like.map_or((0o755, 0, 0), |s| (s.st_mode & 0o7777, s.st_uid, s.st_gid));
    let name = OsStr::from_bytes(name);
    nix::sys::stat::mkdirat(parent, name, Mode::from_bits_truncate(0o700))?;
    let dir = open_beneath(parent, name.as_bytes(), true)?;
    nix::unistd::fchown(&dir, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))?;
    nix::sys::stat::fchmod(&dir, Mode::from_bits_truncate(mode))?;
    Ok(dir)
}

/// Removes each target below `upper`, never following a symlink or leaving `upper`.
fn remove_all(upper: &Path, targets: &[Vec<u8>]) -> Result<usize, TrackerError> {
    let root: OwnedFd = std::fs::File::open(upper)
        .map_err(TrackerError::io("cannot open upper dir", upper))?
        .into();
    let mut removed = 0;
    let unique: BTreeSet<&Vec<u8>> = targets.iter().collect();
    for rel in unique {
        crate::restore::check_rel(rel).map_err(|why| {
            TrackerError::Reset(format!(
                "refusing to remove {:?}: {why}",
                String::from_utf8_lossy(rel)
            ))
        })?;
        let (parent, name) = match rel.iter().rposition(|&b| b == b'/') {
            Some(i) => (&rel[..i], &rel[i + 1..]),
            None => (&b""[..], &rel[..]),
        };
        let parent_fd = match open_beneath(&root, parent, true) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::ENOENT) => continue,
            Err(e) => return Err(reset_io(rel, e)),
        };
        removed +=
            remove_entry(&parent_fd, OsStr::from_bytes(name)).map_err(|e| reset_io(rel, e))?;
    }
    Ok(removed)
}

fn reset_io(rel: &[u8], e: nix::errno::Errno) -> TrackerError {
    TrackerError::Reset(format!(
        "cannot remove {} from the upper dir: {e}",
        String::from_utf8_lossy(rel)
    ))
}

/// Opens `rel` below `root`, refusing symlinks and `..` escapes anywhere on the way.
fn open_beneath(root: &OwnedFd, rel: &[u8], dir: bool) -> nix::Result<OwnedFd> {
    let path: &OsStr = if rel.is_empty() {
        OsStr::new(".")
    } else {
        OsStr::from_bytes(rel)
    };
    let mut flags = OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
    flags |= if dir {
        OFlag::O_DIRECTORY | OFlag::O_RDONLY
    } else {
        OFlag::O_PATH
    };
    let how = OpenHow::new().flags(flags).resolve(
        ResolveFlag::RESOLVE_BENEATH
            | ResolveFlag::RESOLVE_NO_SYMLINKS
            | ResolveFlag::RESOLVE_NO_MAGICLINKS,
    );
    openat2(root, path, how)
}

/// Removes one entry of `parent`, recursively when it is a dir; returns how many
/// entries went.
fn remove_entry(parent: &OwnedFd, name: &OsStr) -> nix::Result<usize> {
    match nix::unistd::unlinkat(parent, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) => return Ok(1),
        Err(nix::errno::Errno::ENOENT) => return Ok(0),
        Err(nix::errno::Errno::EISDIR) => {}
        Err(e) => return Err(e),
    }
    let dir = open_beneath(parent, name.as_bytes(), true)?;
    let mut removed = 0;
    let names: Vec<Vec<u8>> = {
        let mut d = nix::dir::Dir::from_fd(dir.try_clone().map_err(|_| nix::errno::Errno::EBADF)?)?;
        d.iter()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_bytes().to_vec())
            .filter(|n| n != b"." && n != b"..")
            .collect()
    };
    for child in names {
        removed += remove_entry(&dir, OsStr::from_bytes(&child))?;
    }
    nix::unistd::unlinkat(parent, name, UnlinkatFlags::RemoveDir)?;
    Ok(removed + 1)
}

/// A reset as the `reset` command does it, over a tracker's control socket: asks the
/// tracker for the plan, enters the runtime's mount namespace (this must be the only
/// thread of the process then: `setns` acts on the calling thread, and the rest of the
/// reset must run in it), tells the tracker that what this process does from now on
/// is a reset, puts the paths back (`execute`), and ends that. `None` when nothing
/// matches. The tracker's mount point (for display) is in the plan's runtime info.
pub fn request(
    client: &mut crate::control::Client,
    patterns: &[String],
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Option<(crate::control::RuntimeInfo, ResetPlan, Outcome)>, TrackerError> {
    use crate::control::{Request, Response};
    let unexpected = |what: &str| TrackerError::Protocol(format!("the tracker gave no {what}"));
    let runtime = match client.call(&Request::Runtime)? {
        Response::Runtime(r) => r,
        _ => return Err(unexpected("runtime information")),
    };
    let plan = match client.call(&Request::ResetPlan(patterns.to_vec()))? {
        Response::ResetPlan(plan) => plan,
        _ => return Err(unexpected("reset plan")),
    };
    if plan.targets.is_empty() && plan.hidden.is_empty() {
        return Ok(None);
    }
    enter(&runtime)?;
    let spec = MountSpec::current(&runtime.mount_point)?;
    let me = std::process::id();
    client.call(&Request::ResetBegin(me))?;
    let outcome = execute(&spec, &plan, progress);
    // What the reset did matters more than whether the tracker heard it ended.
    let ended = client.call(&Request::ResetEnd(me));
    let outcome = outcome?;
    if let Err(e) = ended {
        tracing::warn!(error = %e, "the tracker did not confirm the end of the reset");
    }
    Ok(Some((runtime, plan, outcome)))
}

/// Joins the runtime's mount namespace (when not already in it) and leaves any dir
/// of the overlay, so this process does not keep it busy.
fn enter(runtime: &crate::control::RuntimeInfo) -> Result<(), TrackerError> {
    if sys::own_mount_ns() == Some(runtime.mount_ns) {
        return std::env::set_current_dir("/").map_err(TrackerError::io("cannot change to", "/"));
    }
    sys::join_mount_ns(runtime.pid, Some(runtime.mount_ns)).map_err(|e| {
        TrackerError::Reset(format!(
            "cannot enter the runtime's mount namespace through pid {}: {e}",
            runtime.pid
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restore::tests::{MASKS, change, view, with_fx};
    use std::os::unix::fs::FileTypeExt;

    /// Lower layers that hold no dir anywhere.
    struct NoLower;

    impl super::LowerLookup for NoLower {
        fn is_dir(&self, _: &[u8]) -> bool {
            false
        }

        fn tree(&self, _: &[u8]) -> Vec<(Vec<u8>, bool)> {
            Vec::new()
        }
    }

    fn paths(changes: &[Change]) -> Vec<String> {
        changes
            .iter()
            .map(|c| String::from_utf8_lossy(&c.path).into_owned())
            .collect()
    }

    /// Intact masks are no targets; the plan carries the masks at and below its
    /// targets, and every change below a target (`d-x` sorts between `d` and `d/x`).
    #[test]
    fn plan_skips_intact_masks_and_carries_those_below_targets() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let store = Store::open(tmp.path()).expect("store");
        let net = [
            ("d", NetKind::Replaced, FileType::Dir),
            ("d-x", NetKind::Added, FileType::File),
            ("d/new", NetKind::Added, FileType::File),
            ("d/sub", NetKind::Added, FileType::Dir),
            ("d/sub/z", NetKind::Added, FileType::File),
            ("etc/a", NetKind::Modified, FileType::File),
            ("etc/b", NetKind::Removed, FileType::Whiteout),
            ("m", NetKind::Modified, FileType::File),
        ];
        store
            .rebuild(
                net.iter()
                    .map(|(p, k, t)| (p.as_bytes().to_vec(), *k, *t))
                    .collect(),
                "test",
            )
            .expect("rebuild");
        let masks = Masks::new(
            ["d/y", "etc/b", "m", "z"]
                .iter()
                .map(|p| p.as_bytes().to_vec()),
        );
        let plan_of = |pattern: &str| {
            let patterns = Patterns::new(&[pattern.into()], Path::new("/spfs")).expect("patterns");
            plan(&store, &patterns, &masks, &NoLower).expect("plan")
        };
        let all = plan_of("*");
        assert_eq!(paths(&all.targets), ["d", "d-x", "etc/a", "m"]);
        assert_eq!(paths(&all.covered), ["d/new", "d/sub", "d/sub/z"]);
        assert_eq!(
            all.masks,
            Masks::new([b"d/y".to_vec(), b"m".to_vec()]),
            "masks at or below the targets"
        );
        // The example of spfs: `reset /etc/` puts etc/a back, etc/b stays masked.
        let etc = plan_of("/spfs/etc/");
        assert_eq!(paths(&etc.targets), ["etc/a"]);
        assert!(etc.covered.is_empty() && etc.masks.is_empty());
    }

    /// With the overlay unmounted, removing the targets from the upper dir and putting
    /// the masks back gives the mount exactly what it showed before the changes, with
    /// spfs's whiteouts in the upper dir (a dir above one made like the lower's).
    #[test]
    fn the_unmount_path_puts_the_masks_back() {
        with_fx(0, |fx| {
            let before = view(&fx.mnt);
            let net_before = fx.net();
            change(&fx.mnt, false);
            let masks = Masks::new(MASKS.iter().map(|p| p.as_bytes().to_vec()));
            let plan = fx.plan(&["*"], &masks);
            assert_eq!(plan.masks, Masks::new([b"d/y".to_vec(), b"m".to_vec()]));
            let spec = fx.spec();
            // Not `execute`: in a test process another thread's fork may hold a copy of
            // a descriptor on the mount for a moment (EBUSY), which would send it
            // through the mount instead. The steps of its unmount path, then:
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while let Err(e) = nix::mount::umount2(&fx.mnt, MntFlags::empty()) {
                assert!(
                    e == Errno::EBUSY && std::time::Instant::now() < deadline,
                    "umount: {e}"
                );
                std::thread::yield_now();
            }
            assert_eq!(still_in_use(&spec), None);
            let targets: Vec<Vec<u8>> = plan.targets.iter().map(|c| c.path.clone()).collect();
            let removed = remove_all(&spec.upper, &targets);
            let put = put_masks_back(&spec.upper, &spec.lowers, &plan.masks);
            spec.mount().expect("mount again");
            assert!(removed.expect("remove the targets") > 0);
            put.expect("put the masks back");

            assert_eq!(view(&fx.mnt), before);
            assert_eq!(fx.net(), net_before, "only the masks are changes again");
            for m in MASKS {
                let s = std::fs::symlink_metadata(fx.upper.join(m)).expect("a whiteout");
                assert!(
                    s.file_type().is_char_device()
                        && s.rdev() == 0
                        && s.mode() & 0o7777 == 0
                        && s.uid() == 0,
                    "{m}: {s:?}"
                );
            }
            // d was removed with the target and made again like the top-most lower d.
            let d = std::fs::symlink_metadata(fx.upper.join("d")).expect("d");
            assert_eq!(d.mode() & 0o7777, 0o711);
            assert_eq!(
                xattr::get(fx.upper.join("d"), "trusted.overlay.opaque").expect("xattr"),
                None
            );
        });
    }
}

#[cfg(test)]
mod pattern_tests {
    use super::Patterns;
    use std::path::Path;

    /// The paths each case is asked about (`/` marks a dir) and, per pattern, which of
    /// them it resets: gitignore lines, as spfs's reset takes them, anchored at /spfs.
    const PATHS: [&str; 9] = [
        "top",
        "etc/",
        "etc/a",
        "d/etc/",
        "d/etc/x",
        "a/b.txt",
        "q/a/b.txt",
        "d/x",
        "x",
    ];
    const CASES: &[(&str, &str)] = &[
        ("*", "111111111"),
        ("/spfs", "111111111"),
        ("/spfs/", "111111111"),
        ("*/", "011111110"),
        ("/*/", "011111110"),
        ("etc/", "011110000"),
        ("/etc/", "011000000"),
        ("/spfs/etc/", "011000000"),
        ("etc", "011110000"),
        ("a/*.txt", "000001000"),
        ("**/x", "000010011"),
        ("*.txt", "000001100"),
    ];

    #[test]
    fn patterns_match_like_gitignore_lines_below_the_mount() {
        for (pattern, want) in CASES {
            let p = Patterns::new(&[pattern.to_string()], Path::new("/spfs")).expect("valid");
            let got: String = PATHS
                .iter()
                .map(|path| {
                    let (rel, dir) = match path.strip_suffix('/') {
                        Some(d) => (d, true),
                        None => (*path, false),
                    };
                    if p.matches(rel.as_bytes(), dir) {
                        '1'
                    } else {
                        '0'
                    }
                })
                .collect();
            assert_eq!(&got, want, "pattern {pattern:?} over {PATHS:?}");
        }
    }

    #[test]
    fn patterns_that_name_no_path_are_refused() {
        for pattern in ["/", "//", "", "  ", "///"] {
            assert!(
                Patterns::new(&[pattern.to_string()], Path::new("/spfs")).is_err(),
                "{pattern:?}"
            );
        }
    }
}
