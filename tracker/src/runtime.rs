//! Finds a runtime to attach to, and watches whether it is still alive.
//!
//! A runtime is an overlay mount, usually in a private mount namespace of its own
//! (spfs makes one per runtime). The tracker never joins that namespace: a process in
//! it would be counted by spfs-monitor and keep the runtime alive. It reaches the
//! runtime's files through `/proc/<pid>/root` of a process that is in it (the
//! "witness"), and only at start: afterwards it works from descriptors.

use crate::masks::Masks;
use crate::mountinfo::{self, MountEntry, OverlayLayers};
use crate::sys::{self, mount_ns_of, own_mount_ns};
use crate::{Layout, TrackerError};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Name of the tracker's sync dir, next to the upper dir on the runtime's filesystem.
pub const SYNC_DIR_NAME: &str = ".spfs-changes-sync";

/// How a runtime is reached from the tracker's own mount namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reach {
    /// The overlay is mounted in the tracker's own namespace.
    Here,
    /// The overlay lives in another mount namespace (identified by its inode); its
    /// files are reached through `/proc/<witness>/root`.
    Namespace { ns: u64, witness: u32 },
}

/// A remount seen by [`Runtime::new_layers`], not yet accepted.
#[derive(Debug)]
pub struct Remounted {
    layers: OverlayLayers,
}

#[derive(Debug, Clone)]
pub struct Runtime {
    reach: Reach,
    /// Where the overlay is mounted, in the runtime's namespace.
    pub mount_point: PathBuf,
    /// Layers as the runtime's namespace names them.
    pub layers: OverlayLayers,
    /// `st_dev` of the filesystem holding the upper dir.
    upper_dev: (u32, u32),
    /// Who may use the control socket besides root.
    pub owner_uid: u32,
    /// A stable name for the runtime's state dir.
    pub key: String,
    /// spfs's name for the runtime (`SPFS_RUNTIME` of its processes), if it is one.
    pub spfs_name: Option<String>,
}

impl Runtime {
    /// The runtime of process `pid`, with its overlay at `mount_point` (in that
    /// process's namespace).
    pub fn by_pid(pid: u32, mount_point: &Path) -> Result<Runtime, TrackerError> {
        let ns =
            mount_ns_of(pid).map_err(|e| TrackerError::Attach(format!("no process {pid}: {e}")))?;
        let reach = if Some(ns) == own_mount_ns() {
            Reach::Here
        } else {
            Reach::Namespace { ns, witness: pid }
        };
        Self::attach(reach, mount_point, Some(pid))
    }

    /// The overlay at `mount_point` in this process's own mount namespace, whatever
    /// namespace that is (`run` mounts its runtime in a private one of its own).
    pub fn here(mount_point: &Path) -> Result<Runtime, TrackerError> {
        Self::attach(Reach::Here, mount_point, None)
    }

    /// The overlay mounted at `mount_point` in the caller's namespace. When the caller
    /// is itself inside a private namespace (a runtime), that namespace is tracked
    /// from outside, with the caller's parent as first witness.
    pub fn by_mount(mount_point: &Path) -> Result<Runtime, TrackerError> {
        let own = own_mount_ns().ok_or_else(|| {
            TrackerError::Attach("cannot read this process's mount namespace".into())
        })?;
        let init = outside_process().map(|(_, ns)| ns);
        let reach = if init.is_none() || init == Some(own) {
            Reach::Here
        } else {
            // The parent as the first witness when it shares the namespace (`spfs
            // changes track` from a runtime's shell); else any process of it.
            let parent = std::os::unix::process::parent_id();
            let witness = match mount_ns_of(parent) {
                Ok(ns) if ns == own => parent,
                _ => find_process_in(own).ok_or_else(|| {
                    TrackerError::Attach("no process of this mount namespace found".into())
                })?,
            };
            Reach::Namespace { ns: own, witness }
        };
        let env_pid = match reach {
            Reach::Here => None,
            Reach::Namespace { witness, .. } => Some(witness),
        };
        Self::attach(reach, mount_point, env_pid)
    }

    fn attach(
        reach: Reach,
        mount_point: &Path,
        env_pid: Option<u32>,
    ) -> Result<Runtime, TrackerError> {
        let entries = read_mountinfo(&reach)?;
        let entry = mountinfo::find_mount(&entries, mount_point).ok_or_else(|| {
            TrackerError::Attach(format!("nothing is mounted at {}", mount_point.display()))
        })?;
        let layers = layers_of(entry, mount_point)?;
        let mut runtime = Runtime {
            reach,
            mount_point: mount_point.to_path_buf(),
            layers,
            upper_dev: (0, 0),
            owner_uid: 0,
            key: String::new(),
            spfs_name: env_pid.and_then(spfs_runtime_name),
        };
        let upper = runtime.reachable(&runtime.layers.upper);
        let meta = std::fs::metadata(&upper).map_err(TrackerError::io("upper dir", &upper))?;
        runtime.upper_dev = (libc::major(meta.dev()), libc::minor(meta.dev()));
        runtime.owner_uid = match env_pid {
            Some(pid) => real_uid_of(pid).unwrap_or(0),
            None => meta.uid(),
        };
        runtime.key = match (runtime.spfs_name.clone(), &runtime.reach) {
            (Some(name), _) => key_of_name(&name),
            (None, Reach::Namespace { ns, .. }) => format!("mntns-{ns}"),
            (None, Reach::Here) => format!("mount-{}", sanitize(&mount_point.to_string_lossy())),
        };
        Ok(runtime)
    }

    /// True when this process is inside the runtime's private mount namespace, which
    /// a long-lived tracker must leave.
    pub fn contains_self(&self) -> bool {
        match self.reach {
            Reach::Namespace { ns, .. } => own_mount_ns() == Some(ns),
            Reach::Here => false,
        }
    }

    /// What the control socket tells clients about this runtime.
    pub fn info(&self) -> crate::control::RuntimeInfo {
        let mount_ns = match self.reach {
            Reach::Namespace { ns, .. } => ns,
            Reach::Here => own_mount_ns().unwrap_or(0),
        };
        let pid = self.witness_pid();
        crate::control::RuntimeInfo {
            mount_point: self.mount_point.clone(),
            pid,
            mount_ns,
        }
    }

    /// A path of the runtime's namespace as this process can reach it.
    pub fn reachable(&self, p: &Path) -> PathBuf {
        match &self.reach {
            Reach::Here => p.to_path_buf(),
            Reach::Namespace { witness, .. } => {
                let rel = p.strip_prefix("/").unwrap_or(p);
                PathBuf::from(format!("/proc/{witness}/root")).join(rel)
            }
        }
    }

    /// The layout to give the tracker, reachable from this process.
    pub fn layout(&self) -> Layout {
        Layout {
            mount: self.mount_point.clone(),
            upper: self.reachable(&self.layers.upper),
            work: self.reachable(&self.layers.work),
            lowers: self
                .layers
                .lowers
                .iter()
                .map(|l| self.reachable(l))
                .collect(),
        }
    }

    /// The tracker's cookie dir: next to the upper dir, on its filesystem, outside
    /// upper and work. Created if missing.
    pub fn sync_dir(&self) -> Result<PathBuf, TrackerError> {
        let parent = self.layers.upper.parent().ok_or_else(|| {
            TrackerError::Attach(
                "the upper dir is a filesystem root: no room for a sync dir beside it".into(),
            )
        })?;
        let dir = self.reachable(&parent.join(SYNC_DIR_NAME));
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(TrackerError::io("cannot create sync dir", &dir)(e)),
        }
        Ok(dir)
    }

    /// False once no process is left in the runtime's namespace or its upper dir's
    /// filesystem is no longer mounted there. Follows the witness to another process
    /// of the namespace when it exits.
    pub fn alive(&mut self) -> bool {
        if !self.follow_witness() {
            return false;
        }
        match read_mountinfo(&self.reach) {
            Ok(entries) => entries.iter().any(|e| e.dev == self.upper_dev),
            // The witness left between the two reads; look again next time.
            Err(_) => true,
        }
    }

    /// The overlay as mounted now when it was mounted again over the same upper dir
    /// with other lower layers since the last [`Runtime::accept`]: its lower layers
    /// (reachable from here, top-most first) and what to accept once they are opened.
    /// `None` when it was not, or when nothing is mounted there right now (the middle
    /// of a remount: the attach that ends it is looked at then).
    ///
    /// The layers are compared, not the mount id: mountinfo's ids are reused as soon as
    /// a mount is freed (the kernel hands out the lowest free one), so a remount can
    /// show the id of the mount it replaced. spfs renders each layer at a path named by
    /// its digest, so the same paths mean the same files.
    pub fn new_layers(&mut self) -> Option<(Vec<PathBuf>, Remounted)> {
        // The process mountinfo is read through may exit right then (a build's
        // short-lived tools, spfs's helpers): read it through another.
        let mut entries = None;
        for _ in 0..3 {
            if !self.follow_witness() {
                return None;
            }
            if let Ok(e) = read_mountinfo(&self.reach) {
                entries = Some(e);
                break;
            }
        }
        let Some(entries) = entries else {
            tracing::debug!("no mountinfo to read: no process left in the runtime");
            return None;
        };
        let Some(entry) = mountinfo::find_mount(&entries, &self.mount_point) else {
            tracing::debug!(reach = ?self.reach, "nothing mounted at the mount point right now");
            return None;
        };
        let layers = entry.overlay_layers()?;
        if layers.upper != self.layers.upper {
            tracing::debug!(upper = ?layers.upper, "another overlay is mounted there");
            return None;
        }
        if layers.lowers == self.layers.lowers {
            tracing::trace!(mount_id = entry.id, "the overlay has the layers last seen");
            return None;
        }
        tracing::debug!(
            mount_id = entry.id,
            lowers = layers.lowers.len(),
            "the overlay was mounted again over other lower layers"
        );
        let lowers = layers.lowers.iter().map(|l| self.reachable(l)).collect();
        Some((lowers, Remounted { layers }))
    }

    /// Takes a remount's layers as the runtime's, once they could be opened (until
    /// then, the next look sees the remount again: the process its paths were reached
    /// through may have exited meanwhile).
    pub fn accept(&mut self, remounted: Remounted) {
        self.layers = remounted.layers;
    }

    /// Moves the witness to another process of the namespace when it has left;
    /// false when none is left.
    fn follow_witness(&mut self) -> bool {
        if let Reach::Namespace { ns, witness } = &mut self.reach
            && mount_ns_of(*witness).ok() != Some(*ns)
        {
            match find_process_in(*ns) {
                Some(pid) => *witness = pid,
                None => return false,
            }
        }
        true
    }

    /// A fanotify group reporting the mounts attached to and detached from the
    /// runtime's namespace, so a remount is seen at once (Linux 6.15+; the error
    /// otherwise, and the caller falls back to reading mountinfo at each sync).
    pub fn mount_group(&self) -> std::io::Result<sys::MountGroup> {
        let fd = std::fs::File::open(proc_dir(&self.reach).join("ns/mnt"))?;
        sys::MountGroup::new(std::os::fd::AsFd::as_fd(&fd))
    }

    /// What spfs says of this runtime now (`None` outside spfs): what tells it from
    /// any other that had or will have its state dir (spfs's runtime name and creation
    /// time: a rerun of a durable runtime keeps both, a new runtime given the same
    /// name does not), and the environment's masks. Errors when spfs cannot say:
    /// reset and validate must then not guess.
    pub fn spfs(&self) -> Result<Option<(String, Masks)>, TrackerError> {
        let Some(name) = &self.spfs_name else {
            return Ok(None);
        };
        let (record, masks) = crate::masks::spfs_runtime(self.witness_pid(), name)?;
        let identity = format!("spfs runtime {name} created {}", record.created);
        Ok(Some((identity, masks)))
    }

    /// What tells a runtime outside spfs from any other that had or will have its state
    /// dir (the kernel reuses mount namespace inodes, and `mntns-<inode>` keys state
    /// dirs): its upper dir's device, inode and birth time. A remount keeps the upper
    /// dir, so it keeps this too.
    pub fn upper_identity(&self) -> Result<String, TrackerError> {
        let upper = self.reachable(&self.layers.upper);
        let meta = std::fs::metadata(&upper).map_err(TrackerError::io("upper dir", &upper))?;
        let born = meta
            .created()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        Ok(format!(
            "upper dir {} (device {}:{}, inode {}, born {born})",
            self.layers.upper.display(),
            self.upper_dev.0,
            self.upper_dev.1,
            meta.ino()
        ))
    }

    /// A process of the runtime (this one when it is reached here).
    fn witness_pid(&self) -> u32 {
        match self.reach {
            Reach::Namespace { witness, .. } => witness,
            Reach::Here => std::process::id(),
        }
    }

    /// The environment's masks, read from spfs (empty when this is not an spfs
    /// runtime). Errors when spfs cannot say: reset and validate must then not guess.
    pub fn masks(&self) -> Result<Masks, TrackerError> {
        Ok(self.spfs()?.map(|(_, masks)| masks).unwrap_or_default())
    }
}

/// A path as the runtime names it: without the `/proc/<pid>/root` it is reached by.
pub(crate) fn runtime_path(p: &Path) -> String {
    let s = p.to_string_lossy();
    if let Some(rest) = s.strip_prefix("/proc/")
        && let Some((pid, tail)) = rest.split_once("/root")
        && pid.chars().all(|c| c.is_ascii_digit())
        && (tail.is_empty() || tail.starts_with('/'))
    {
        return if tail.is_empty() {
            "/".into()
        } else {
            tail.to_string()
        };
    }
    s.into_owned()
}

fn layers_of(entry: &MountEntry, mount_point: &Path) -> Result<OverlayLayers, TrackerError> {
    if entry.fs_type != "overlay" {
        return Err(TrackerError::Attach(format!(
            "{} is a {} mount, not an overlay",
            mount_point.display(),
            entry.fs_type
        )));
    }
    entry.overlay_layers().ok_or_else(|| {
        TrackerError::Attach(format!(
            "the overlay at {} has no upper dir (mounted read-only): nothing can change",
            mount_point.display()
        ))
    })
}

/// The `/proc` dir of a process in the runtime's namespace: this thread's when it is
/// here (`unshare` acts on one thread), else the witness's.
fn proc_dir(reach: &Reach) -> PathBuf {
    match reach {
        Reach::Here => PathBuf::from("/proc/thread-self"),
        Reach::Namespace { witness, .. } => PathBuf::from(format!("/proc/{witness}")),
    }
}

fn read_mountinfo(reach: &Reach) -> Result<Vec<MountEntry>, TrackerError> {
    let path = proc_dir(reach).join("mountinfo");
    let text = std::fs::read(&path).map_err(TrackerError::io("cannot read", &path))?;
    Ok(mountinfo::parse(&text))
}

/// Moves this (single-threaded) process out of the runtime's mount namespace it is
/// in, into PID 1's or, when that cannot be read, the nearest outside ancestor's, and
/// to `/`: a long-lived tracker must not be counted by spfs-monitor.
pub fn leave_runtime_ns() -> Result<(), TrackerError> {
    let (pid, _) = outside_process().ok_or_else(|| {
        TrackerError::Attach(
            "cannot leave the runtime's mount namespace: no process outside it found".into(),
        )
    })?;
    sys::join_mount_ns(pid, None).map_err(|e| {
        TrackerError::Attach(format!(
            "cannot leave the runtime's mount namespace for pid {pid}'s: {e}"
        ))
    })
}

/// A process to take the mount namespace of when leaving a runtime's, with that
/// namespace's inode: PID 1 when its namespace can be read, else (some sandboxes and
/// containers deny it even to root) the nearest ancestor in another mount namespace.
pub fn outside_process() -> Option<(u32, u64)> {
    if let Ok(ns) = mount_ns_of(1) {
        return Some((1, ns));
    }
    let own = own_mount_ns()?;
    let mut pid = std::os::unix::process::parent_id();
    while pid > 1 {
        match mount_ns_of(pid) {
            Ok(ns) if ns != own => return Some((pid, ns)),
            _ => pid = parent_of(pid)?,
        }
    }
    None
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Any process whose mount namespace is `ns`.
fn find_process_in(ns: u64) -> Option<u32> {
    sys::pids()
        .into_iter()
        .find(|&pid| mount_ns_of(pid).ok() == Some(ns))
}

/// The real uid of process `pid` (`Uid:` of /proc/PID/status): who started it. Not the
/// owner of /proc/PID, which is root for a process that exec'd a program with file
/// capabilities (spfs-enter, spfs-monitor), however unprivileged its user.
fn real_uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// spfs exports the runtime's name to every process in it.
pub(crate) fn spfs_runtime_name(pid: u32) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ
        .split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(b"SPFS_RUNTIME="))
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// A name usable as one path component.
fn sanitize(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    cleaned.trim_matches('_').chars().take(100).collect()
}

/// The state dir key of the spfs runtime named `name`.
pub fn key_of_name(name: &str) -> String {
    format!("spfs-{}", sanitize(name))
}

/// The state dir key of the runtime process `pid` is in, if it is in one (spfs's name
/// for it, else its private mount namespace).
pub fn key_of_pid(pid: u32) -> Option<String> {
    if let Some(name) = spfs_runtime_name(pid) {
        return Some(key_of_name(&name));
    }
    let ns = mount_ns_of(pid).ok()?;
    (outside_process().map(|(_, o)| o) != Some(ns)).then(|| format!("mntns-{ns}"))
}

/// A process of the spfs runtime named `name` (spfs exports `SPFS_RUNTIME` to each),
/// outside the host's mount namespace, if one can be read.
pub fn find_spfs_runtime(name: &str) -> Option<u32> {
    let host = outside_process().map(|(_, ns)| ns);
    sys::pids().into_iter().find(|&pid| {
        spfs_runtime_name(pid).as_deref() == Some(name) && mount_ns_of(pid).ok() != host
    })
}

/// The key a process inside a runtime computes for the runtime it is in, so a client
/// can find the tracker's state dir without being told.
pub fn key_of_current() -> Option<String> {
    if let Ok(name) = std::env::var("SPFS_RUNTIME")
        && !name.is_empty()
    {
        return Some(key_of_name(&name));
    }
    let own = own_mount_ns()?;
    (outside_process().map(|(_, ns)| ns) != Some(own)).then(|| format!("mntns-{own}"))
}
