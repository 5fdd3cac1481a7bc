//! Puts paths back to what the lower layers hold by writing *through* the mounted
//! overlay, for when the overlay cannot be unmounted (a process has its cwd, an open
//! file or a running program under it).
//!
//! Writing through the mount changes no layer behind overlayfs' back (overlayfs copies
//! up as it needs to), so it is always legal while the overlay is mounted. The price:
//! the upper dir keeps copies identical to the lower files instead of nothing, and a
//! dir that was replaced (opaque) or removed stays opaque in the upper dir, refilled
//! with copies of everything the lower layers hold below it.
//!
//! What is put back, for each path: its type, bytes (files), target (symlinks), device
//! number (devices), mode, owner, and access and modification times. Not put back:
//! extended attributes (a new copy has none, a copied-up one keeps what it has), and
//! hard links between put-back files (each gets a file of its own).
//!
//! The lower layers are read as overlayfs merges them: the top-most layer holding a
//! name wins, a whiteout or a non-dir hides the layers below it, and an opaque dir
//! hides the layers below it for what is under it. The environment's masks
//! ([`Masks`]) are paths that stay absent whatever the lower layers hold.
//!
//! Every walk goes from dir descriptors one name at a time, never following a symlink
//! (`O_NOFOLLOW`, `*at` calls, `AT_SYMLINK_NOFOLLOW`), so names may be any bytes and
//! paths longer than `PATH_MAX`.

use crate::TrackerError;
use crate::classify::{Classifier, join_rel};
use crate::masks::Masks;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2, readlinkat, renameat};
use nix::sys::stat::{
    FchmodatFlags, FileStat, Mode, SFlag, UtimensatFlags, fchmod, fchmodat, fstat, fstatat,
    futimens, mkdirat, mknodat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, symlinkat, unlinkat};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use store::{Change, NetKind};

/// The xattr overlayfs sets on a dir that hides the lower dirs below it.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// How often (in entries) a refill reports its progress.
const PROGRESS_EVERY: usize = 1000;

/// Progress of a long refill, for the caller to show.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// The dir being refilled, relative to the mount point (no leading `/`).
    pub path: &'a [u8],
    /// Entries put back in it so far.
    pub entries: usize,
}

/// Where the overlay is and what it is made of.
#[derive(Debug, Clone, Copy)]
pub struct Layers<'a> {
    /// Where the overlay is mounted (in the caller's mount namespace).
    pub mount_point: &'a Path,
    /// Its upper dir: only read, to know which upper dirs hide the lower layers.
    pub upper: &'a Path,
    /// Top-most first, as in overlayfs' `lowerdir=`.
    pub lowers: &'a [PathBuf],
}

/// Puts every path of `changes` (upper-relative changed paths: reset targets and the
/// changes below them, in any order) back to what the lower layers hold, writing
/// through the mounted overlay at `layers.mount_point`; paths that `masks` hides are
/// made absent. Calls `progress` every 1000 entries of a dir being
/// refilled. Returns how many of `changes` it put back (changes below a dir it
/// refilled or removed as a whole are counted with that dir).
///
/// Fails with [`TrackerError::Reset`] naming the path when a layer cannot be read or
/// the mount refuses a write; what was put back before stays put back.
///
/// `hidden` are lower paths that a removed or replaced dir hides: each is put back
/// from the lower layers (missing dirs above it made through the mount), whatever
/// the upper dir hides.
pub fn through_mount(
    layers: Layers<'_>,
    changes: &[Change],
    hidden: &[Change],
    masks: &Masks,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<usize, TrackerError> {
    let classifier = Classifier::new(layers.upper, layers.lowers).map_err(|e| {
        TrackerError::Reset(format!(
            "cannot open the layers of {}: {e}",
            layers.mount_point.display()
        ))
    })?;
    let hidden_paths: BTreeSet<&[u8]> = hidden.iter().map(|c| c.path.as_slice()).collect();
    let mut sorted: Vec<&Change> = changes.iter().chain(hidden).collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    sorted.dedup_by(|a, b| a.path == b.path);
    // Decided before anything is written: the classifier reads the upper dir (it
    // knows which upper dirs are opaque and hide the lower layers), and the writes
    // below change it.
    let mut decided = Vec::with_capacity(sorted.len());
    for c in sorted {
        if c.path.is_empty() {
            continue;
        }
        check_rel(&c.path).map_err(|why| {
            TrackerError::Reset(format!("refusing to put back {:?}: {why}", lossy(&c.path)))
        })?;
        let visible = !masks.hides(&c.path)
            && (hidden_paths.contains(c.path.as_slice())
                || classifier
                    .original(&c.path)
                    .map_err(|e| {
                        TrackerError::Reset(format!(
                            "cannot look up {} in the lower layers: {e}",
                            lossy(&c.path)
                        ))
                    })?
                    .layer
                    .is_some());
        decided.push((c, visible));
    }
    drop(classifier);

    let mount = open_root(layers.mount_point)?;
    let mut roots = Vec::with_capacity(layers.lowers.len());
    for (layer, p) in layers.lowers.iter().enumerate() {
        roots.push(LayerDir {
            fd: open_root(p)?,
            layer,
        });
    }
    let mut r = Restorer {
        mount_point: layers.mount_point,
        mount,
        lower_root: LowerDir { layers: roots },
        masks,
        progress,
        temp_seq: 0,
    };
    // Dirs whose whole subtree is back (refilled or removed): changes below are done.
    let mut complete: BTreeSet<Vec<u8>> = BTreeSet::new();
    // Dirs whose times are set last (deepest first), once nothing below them changes.
    let mut dir_times: Vec<(Vec<u8>, FileStat)> = Vec::new();
    let mut restored = 0;
    for (c, visible) in decided {
        if ancestors(&c.path).any(|a| complete.contains(a)) {
            continue;
        }
        let (whole, times) = r.restore_path(c, visible)?;
        if whole {
            complete.insert(c.path.clone());
        }
        if let Some(stat) = times {
            dir_times.push((c.path.clone(), stat));
        }
        restored += 1;
    }
    for (rel, stat) in dir_times.iter().rev() {
        let (parent_rel, name) = split(rel);
        let parent = r
            .mount_dir(parent_rel)
            .map_err(|e| r.fail(rel, "open", e))?;
        set_times(parent.as_fd(), name, stat).map_err(|e| r.fail(rel, "set times", e))?;
    }
    Ok(restored)
}

/// A path from the changelog must be plain names: no `.`, `..` or empty component.
pub(crate) fn check_rel(rel: &[u8]) -> Result<(), &'static str> {
    if rel
        .split(|&b| b == b'/')
        .any(|c| c.is_empty() || c == b"." || c == b"..")
    {
        return Err("not a plain relative path");
    }
    Ok(())
}

/// The proper ancestors of `rel`, nearest first.
fn ancestors(rel: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut end = rel.len();
    std::iter::from_fn(move || {
        let i = rel[..end].iter().rposition(|&b| b == b'/')?;
        end = i;
        Some(&rel[..i])
    })
}

/// `a/b/c` as (`a/b`, `c`).
fn split(rel: &[u8]) -> (&[u8], &OsStr) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], OsStr::from_bytes(&rel[i + 1..])),
        None => (&[], OsStr::from_bytes(rel)),
    }
}

fn lossy(rel: &[u8]) -> String {
    String::from_utf8_lossy(rel).into_owned()
}

fn open_root(p: &Path) -> Result<OwnedFd, TrackerError> {
    openat(
        nix::fcntl::AT_FDCWD,
        p,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| TrackerError::Reset(format!("cannot open {}: {e}", p.display())))
}

/// Opens the dir `name` of `parent` without following a symlink.
fn open_dir(parent: BorrowedFd<'_>, name: &OsStr) -> nix::Result<OwnedFd> {
    open_here(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Opens `name` of `parent` with `flags`, never following a symlink or crossing into
/// another mount (a filesystem mounted on a dir of the overlay is not the overlay's to
/// put back: EXDEV), and never leaving `parent`.
fn open_here(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    flags: OFlag,
    mode: Mode,
) -> nix::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_NOFOLLOW)
        .mode(mode)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
    openat2(parent, name, how)
}

fn lstat_at(parent: BorrowedFd<'_>, name: &OsStr) -> nix::Result<Option<FileStat>> {
    match fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(s) => Ok(Some(s)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn kind_of(s: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(s.st_mode & SFlag::S_IFMT.bits())
}

fn is_whiteout(s: &FileStat) -> bool {
    kind_of(s) == SFlag::S_IFCHR && s.st_rdev == 0
}

fn is_opaque(dir: BorrowedFd<'_>) -> bool {
    let Ok(fd) = dir.try_clone_to_owned() else {
        return false;
    };
    xattr::FileExt::get_xattr(&File::from(fd), OPAQUE_XATTR)
        .is_ok_and(|v| v.as_deref() == Some(b"y"))
}

/// The names in a dir, without `.` and `..`.
fn list(dir: BorrowedFd<'_>) -> nix::Result<Vec<Vec<u8>>> {
    let mut d = nix::dir::Dir::from_fd(dir.try_clone_to_owned().map_err(|_| Errno::EBADF)?)?;
    let mut names = Vec::new();
    for entry in d.iter() {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(name);
        }
    }
    Ok(names)
}

/// Removes `name` of `parent`, recursively when it is a dir; absent is fine.
fn remove(parent: BorrowedFd<'_>, name: &OsStr) -> nix::Result<()> {
    match unlinkat(parent, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::EISDIR) => {}
        Err(e) => return Err(e),
    }
    let dir = open_dir(parent, name)?;
    for child in list(dir.as_fd())? {
        remove(dir.as_fd(), OsStr::from_bytes(&child))?;
    }
    match unlinkat(parent, name, UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

fn times(s: &FileStat) -> (TimeSpec, TimeSpec) {
    (
        TimeSpec::new(s.st_atime, s.st_atime_nsec),
        TimeSpec::new(s.st_mtime, s.st_mtime_nsec),
    )
}

fn set_times(parent: BorrowedFd<'_>, name: &OsStr, s: &FileStat) -> nix::Result<()> {
    let (a, m) = times(s);
    utimensat(parent, name, &a, &m, UtimensatFlags::NoFollowSymlink)
}

fn owner(s: &FileStat) -> (Option<Uid>, Option<Gid>) {
    (Some(Uid::from_raw(s.st_uid)), Some(Gid::from_raw(s.st_gid)))
}

fn perm(s: &FileStat) -> Mode {
    Mode::from_bits_truncate(s.st_mode & 0o7777)
}

/// Sets owner, then mode (a chown clears set-id bits), of an entry that is not a
/// symlink, through an `O_PATH` descriptor so that a symlink swapped in meanwhile is
/// not followed.
fn set_owner_mode(parent: BorrowedFd<'_>, name: &OsStr, s: &FileStat) -> nix::Result<()> {
    let fd = open_here(
        parent,
        name,
        OFlag::O_PATH | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    if kind_of(&fstat(fd.as_fd())?) == SFlag::S_IFLNK {
        return Err(Errno::ELOOP);
    }
    let (uid, gid) = owner(s);
    fchownat(fd.as_fd(), "", uid, gid, AtFlags::AT_EMPTY_PATH)?;
    let proc = PathBuf::from(format!("/proc/thread-self/fd/{}", fd.as_raw_fd()));
    fchmodat(
        nix::fcntl::AT_FDCWD,
        &proc,
        perm(s),
        FchmodatFlags::FollowSymlink,
    )
}

/// One lower layer's dir at a merged dir path.
struct LayerDir {
    fd: OwnedFd,
    /// Index of the layer (top-most is 0).
    layer: usize,
}

/// A merged lower dir: the layers that contribute to it, top-most first, ending at an
/// opaque one.
struct LowerDir {
    layers: Vec<LayerDir>,
}

/// What the lower layers merge to at one name of a [`LowerDir`].
enum Child {
    Absent,
    /// A non-dir, in `LowerDir::layers[at]`.
    Leaf {
        at: usize,
        stat: FileStat,
    },
    /// A dir; `at` are the indexes (in `LowerDir::layers`) of the layers whose dirs
    /// merge, top-most first; `stat` is the top-most one's.
    Dir {
        at: Vec<usize>,
        stat: FileStat,
    },
}

impl LowerDir {
    /// Overlayfs' lookup of `name` in this merged dir.
    fn child(&self, name: &OsStr) -> nix::Result<Child> {
        let mut top: Option<FileStat> = None;
        let mut at = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let Some(s) = lstat_at(l.fd.as_fd(), name)? else {
                continue;
            };
            let is_dir = kind_of(&s) == SFlag::S_IFDIR;
            if top.is_none() {
                if is_whiteout(&s) {
                    return Ok(Child::Absent);
                }
                if !is_dir {
                    return Ok(Child::Leaf { at: i, stat: s });
                }
                top = Some(s);
            } else if !is_dir {
                // A whiteout or non-dir below a dir ends the merge there.
                break;
            }
            at.push(i);
            // An opaque dir hides the layers below it.
            if is_opaque(open_dir(l.fd.as_fd(), name)?.as_fd()) {
                break;
            }
        }
        Ok(match top {
            Some(stat) => Child::Dir { at, stat },
            None => Child::Absent,
        })
    }

    /// The merged children, by name.
    fn children(&self) -> nix::Result<BTreeMap<Vec<u8>, Child>> {
        let mut names = BTreeSet::new();
        for l in &self.layers {
            names.extend(list(l.fd.as_fd())?);
        }
        let mut out = BTreeMap::new();
        for name in names {
            let child = self.child(OsStr::from_bytes(&name))?;
            if !matches!(child, Child::Absent) {
                out.insert(name, child);
            }
        }
        Ok(out)
    }

    /// The merged dir of a [`Child::Dir`] of this one.
    fn open_child(&self, name: &OsStr, at: &[usize]) -> nix::Result<LowerDir> {
        let mut layers = Vec::with_capacity(at.len());
        for &i in at {
            let l = &self.layers[i];
            layers.push(LayerDir {
                fd: open_dir(l.fd.as_fd(), name)?,
                layer: l.layer,
            });
        }
        Ok(LowerDir { layers })
    }

    /// The layer fd holding the [`Child::Leaf`] at `at`.
    fn fd(&self, at: usize) -> BorrowedFd<'_> {
        self.layers[at].fd.as_fd()
    }
}

struct Restorer<'a> {
    mount_point: &'a Path,
    mount: OwnedFd,
    lower_root: LowerDir,
    masks: &'a Masks,
    progress: &'a mut dyn FnMut(Progress<'_>),
    temp_seq: u64,
}

impl Restorer<'_> {
    fn fail(&self, rel: &[u8], what: &str, e: Errno) -> TrackerError {
        let mut p = self.mount_point.as_os_str().as_bytes().to_vec();
        p.push(b'/');
        p.extend_from_slice(rel);
        TrackerError::Reset(format!(
            "cannot put {} back through the mount ({what}): {e}",
            String::from_utf8_lossy(&p)
        ))
    }

    /// The mount's dir at `rel`, one name at a time, never following a symlink.
    fn mount_dir(&self, rel: &[u8]) -> nix::Result<OwnedFd> {
        let mut fd = self.mount.try_clone().map_err(|_| Errno::EBADF)?;
        if rel.is_empty() {
            return Ok(fd);
        }
        for c in rel.split(|&b| b == b'/') {
            fd = open_dir(fd.as_fd(), OsStr::from_bytes(c))?;
        }
        Ok(fd)
    }

    /// The merged lower dir holding `rel` and what it holds at `rel`'s name.
    fn lower_at(&self, rel: &[u8]) -> nix::Result<Option<(LowerDir, Child)>> {
        let (parent_rel, name) = split(rel);
        let mut dir: Option<LowerDir> = None;
        if !parent_rel.is_empty() {
            for c in parent_rel.split(|&b| b == b'/') {
                let cur = dir.as_ref().unwrap_or(&self.lower_root);
                let c = OsStr::from_bytes(c);
                match cur.child(c)? {
                    Child::Dir { at, .. } => dir = Some(cur.open_child(c, &at)?),
                    _ => return Ok(None),
                }
            }
        }
        let dir = match dir {
            Some(d) => d,
            None => LowerDir {
                layers: self
                    .lower_root
                    .layers
                    .iter()
                    .map(|l| {
                        Ok(LayerDir {
                            fd: l.fd.try_clone().map_err(|_| Errno::EBADF)?,
                            layer: l.layer,
                        })
                    })
                    .collect::<nix::Result<_>>()?,
            },
        };
        let child = dir.child(name)?;
        Ok(Some((dir, child)))
    }

    /// Puts one changed path back. Returns whether its whole subtree is now back
    /// (nothing below it needs doing), and for a dir left in place, the lower's
    /// times to set on it at the end.
    fn restore_path(
        &mut self,
        c: &Change,
        visible: bool,
    ) -> Result<(bool, Option<FileStat>), TrackerError> {
        let rel = &c.path;
        let (parent_rel, name) = split(rel);
        let parent = match self.mount_dir(parent_rel) {
            Ok(fd) => fd,
            // Nothing there to remove.
            Err(Errno::ENOENT | Errno::ENOTDIR) if !visible => return Ok((true, None)),
            // A path a removed dir hid: its dirs come back first (opaque, through
            // the mount, so that nothing else of the lower dir comes with them).
            Err(Errno::ENOENT | Errno::ENOTDIR) => self.make_dirs(parent_rel)?,
            Err(e) => return Err(self.fail(rel, "open its dir", e)),
        };
        if !visible {
            remove(parent.as_fd(), name).map_err(|e| self.fail(rel, "remove", e))?;
            return Ok((true, None));
        }
        let Some((lower, child)) = self
            .lower_at(rel)
            .map_err(|e| self.fail(rel, "read the lower layers", e))?
        else {
            remove(parent.as_fd(), name).map_err(|e| self.fail(rel, "remove", e))?;
            return Ok((true, None));
        };
        // A dir whose change is only its own metadata keeps its content: the changes
        // below it, if any, are put back one by one.
        let refill = !matches!(c.kind, Some(NetKind::Metadata | NetKind::Modified));
        match &child {
            Child::Absent => {
                remove(parent.as_fd(), name).map_err(|e| self.fail(rel, "remove", e))?;
                Ok((true, None))
            }
            Child::Leaf { .. } => {
                self.put(parent.as_fd(), name, rel, &lower, &child, false)?;
                Ok((true, None))
            }
            Child::Dir { stat, .. } => {
                let whole = self.put(parent.as_fd(), name, rel, &lower, &child, refill)?;
                Ok((whole, (!whole).then_some(*stat)))
            }
        }
    }

    /// Makes each missing dir of `rel` in the mount, like the lower layers' dir (mode
    /// and owner); returns the mount's dir at `rel`.
    fn make_dirs(&mut self, rel: &[u8]) -> Result<OwnedFd, TrackerError> {
        let mut fd = self
            .mount
            .try_clone()
            .map_err(|_| self.fail(rel, "open", Errno::EBADF))?;
        let mut at = Vec::new();
        for c in rel.split(|&b| b == b'/') {
            at = join_rel(&at, c);
            let name = OsStr::from_bytes(c);
            match lstat_at(fd.as_fd(), name).map_err(|e| self.fail(&at, "stat", e))? {
                Some(s) if kind_of(&s) == SFlag::S_IFDIR => {}
                current => {
                    if current.is_some() {
                        remove(fd.as_fd(), name).map_err(|e| self.fail(&at, "remove", e))?;
                    }
                    let stat = match self
                        .lower_at(&at)
                        .map_err(|e| self.fail(&at, "read the lower layers", e))?
                    {
                        Some((_, Child::Dir { stat, .. })) => stat,
                        _ => return Err(self.fail(&at, "find its lower dir", Errno::ENOENT)),
                    };
                    mkdirat(fd.as_fd(), name, Mode::from_bits_truncate(0o700))
                        .map_err(|e| self.fail(&at, "mkdir", e))?;
                    set_owner_mode(fd.as_fd(), name, &stat)
                        .map_err(|e| self.fail(&at, "set owner and mode", e))?;
                }
            }
            fd = open_dir(fd.as_fd(), name).map_err(|e| self.fail(&at, "open", e))?;
        }
        Ok(fd)
    }

    /// Makes `name` of mount dir `parent` what `child` (of lower dir `lower`) is.
    /// A dir is refilled (made to hold exactly the lower's entries, recursively) when
    /// `refill` or when it had to be created; returns whether it was, or for a
    /// non-dir, true. A refilled dir's times are set; a dir that was not refilled
    /// gets its owner and mode only.
    fn put(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        rel: &[u8],
        lower: &LowerDir,
        child: &Child,
        refill: bool,
    ) -> Result<bool, TrackerError> {
        let current = lstat_at(parent, name).map_err(|e| self.fail(rel, "stat", e))?;
        match child {
            Child::Absent => {
                remove(parent, name).map_err(|e| self.fail(rel, "remove", e))?;
                Ok(true)
            }
            Child::Leaf { at, stat } => {
                let kind = kind_of(stat);
                if kind == SFlag::S_IFREG {
                    self.put_file(parent, name, rel, lower.fd(*at), stat, current.as_ref())?;
                    return Ok(true);
                }
                if current.is_some() {
                    remove(parent, name).map_err(|e| self.fail(rel, "remove", e))?;
                }
                if kind == SFlag::S_IFLNK {
                    let target = readlinkat(lower.fd(*at), name)
                        .map_err(|e| self.fail(rel, "read the lower symlink", e))?;
                    symlinkat(target.as_os_str(), parent, name)
                        .map_err(|e| self.fail(rel, "symlink", e))?;
                    let (uid, gid) = owner(stat);
                    fchownat(parent, name, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)
                        .map_err(|e| self.fail(rel, "chown", e))?;
                } else {
                    mknodat(parent, name, kind, perm(stat), stat.st_rdev)
                        .map_err(|e| self.fail(rel, "mknod", e))?;
                    set_owner_mode(parent, name, stat).map_err(|e| self.fail(rel, "chmod", e))?;
                }
                set_times(parent, name, stat).map_err(|e| self.fail(rel, "set times", e))?;
                Ok(true)
            }
            Child::Dir { at, stat } => {
                let mut created = false;
                match current {
                    Some(s) if kind_of(&s) == SFlag::S_IFDIR => {}
                    other => {
                        if other.is_some() {
                            remove(parent, name).map_err(|e| self.fail(rel, "remove", e))?;
                        }
                        mkdirat(parent, name, Mode::from_bits_truncate(0o700))
                            .map_err(|e| self.fail(rel, "mkdir", e))?;
                        created = true;
                    }
                }
                let dir = open_dir(parent, name).map_err(|e| self.fail(rel, "open", e))?;
                let (uid, gid) = owner(stat);
                fchown(dir.as_fd(), uid, gid).map_err(|e| self.fail(rel, "chown", e))?;
                fchmod(dir.as_fd(), perm(stat)).map_err(|e| self.fail(rel, "chmod", e))?;
                if !(refill || created) {
                    return Ok(false);
                }
                let below = lower
                    .open_child(name, at)
                    .map_err(|e| self.fail(rel, "open the lower dirs", e))?;
                let mut count = 0;
                self.refill(dir.as_fd(), rel, &below, rel, &mut count)?;
                set_times(parent, name, stat).map_err(|e| self.fail(rel, "set times", e))?;
                Ok(true)
            }
        }
    }

    /// Makes mount dir `dir` (at `rel`) hold exactly what lower dir `lower` holds,
    /// recursively; masked paths stay absent. `top` and `count` are for progress.
    fn refill(
        &mut self,
        dir: BorrowedFd<'_>,
        rel: &[u8],
        lower: &LowerDir,
        top: &[u8],
        count: &mut usize,
    ) -> Result<(), TrackerError> {
        let mut want = lower
            .children()
            .map_err(|e| self.fail(rel, "read the lower layers", e))?;
        want.retain(|name, _| !self.masks.hides(&join_rel(rel, name)));
        let have = list(dir).map_err(|e| self.fail(rel, "list", e))?;
        for name in have {
            if !want.contains_key(&name) {
                remove(dir, OsStr::from_bytes(&name))
                    .map_err(|e| self.fail(&join_rel(rel, &name), "remove", e))?;
            }
        }
        for (name, child) in &want {
            let child_rel = join_rel(rel, name);
            self.put(dir, OsStr::from_bytes(name), &child_rel, lower, child, true)?;
            *count += 1;
            if (*count).is_multiple_of(PROGRESS_EVERY) {
                (self.progress)(Progress {
                    path: top,
                    entries: *count,
                });
            }
        }
        Ok(())
    }

    /// Writes the lower file's bytes at `name` of `parent`, then its owner, mode and
    /// times. Rewrites in place (`O_TRUNC`), except when the file is a running program
    /// (`ETXTBSY`) or has other hard links (which must keep their bytes): then a new
    /// file is written beside it and renamed over it.
    fn put_file(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        rel: &[u8],
        lower_dir: BorrowedFd<'_>,
        stat: &FileStat,
        current: Option<&FileStat>,
    ) -> Result<(), TrackerError> {
        let src = openat(
            lower_dir,
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
            Mode::empty(),
        )
        .map_err(|e| self.fail(rel, "open the lower file", e))?;
        let mut in_place = true;
        match current {
            Some(s) if kind_of(s) != SFlag::S_IFREG => {
                remove(parent, name).map_err(|e| self.fail(rel, "remove", e))?;
            }
            Some(s) if s.st_nlink > 1 => in_place = false,
            _ => {}
        }
        let flags = OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        if in_place {
            match open_here(
                parent,
                name,
                flags | OFlag::O_CREAT | OFlag::O_TRUNC,
                Mode::from_bits_truncate(0o600),
            ) {
                Ok(dst) => return self.fill(rel, src, dst, stat),
                Err(Errno::ETXTBSY) => {}
                Err(e) => return Err(self.fail(rel, "open for writing", e)),
            }
        }
        self.temp_seq += 1;
        let mut temp = OsString::from(format!(
            ".spfs-changes-reset.{}.{}.",
            std::process::id(),
            self.temp_seq
        ))
        .into_vec();
        // Long names: keep the temp name within NAME_MAX.
        temp.extend(name.as_bytes().iter().take(100));
        let temp = OsStr::from_bytes(&temp);
        let dst = openat(
            parent,
            temp,
            flags | OFlag::O_CREAT | OFlag::O_EXCL,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| self.fail(rel, "create a new copy", e))?;
        let written = self.fill(rel, src, dst, stat).and_then(|()| {
            renameat(parent, temp, parent, name)
                .map_err(|e| self.fail(rel, "rename the new copy over it", e))
        });
        if written.is_err() {
            let _ = unlinkat(parent, temp, UnlinkatFlags::NoRemoveDir);
        }
        written
    }

    /// Copies `src` into `dst`, then sets `stat`'s owner, mode and times on it.
    fn fill(
        &self,
        rel: &[u8],
        src: OwnedFd,
        dst: OwnedFd,
        stat: &FileStat,
    ) -> Result<(), TrackerError> {
        let (mut src, mut dst) = (File::from(src), File::from(dst));
        std::io::copy(&mut src, &mut dst).map_err(|e| {
            self.fail(
                rel,
                "copy the lower bytes",
                Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            )
        })?;
        let (uid, gid) = owner(stat);
        fchown(dst.as_fd(), uid, gid).map_err(|e| self.fail(rel, "chown", e))?;
        fchmod(dst.as_fd(), perm(stat)).map_err(|e| self.fail(rel, "chmod", e))?;
        let (a, m) = times(stat);
        futimens(dst.as_fd(), &a, &m).map_err(|e| self.fail(rel, "set times", e))?;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! A real overlay in a private mount namespace: two lower layers (top-most first)
    //! and an upper dir on a tmpfs, mounted with spfs's options.

    use super::*;
    use crate::reset::{self, MountSpec, Outcome, Patterns};
    use std::collections::BTreeMap;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

    /// Runs `f` on a thread of its own in a private mount namespace; a panic in it is
    /// the caller's.
    pub(crate) fn in_private_ns<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
        let handle = std::thread::spawn(move || {
            crate::sys::enter_private_mount_ns().expect("a private mount namespace");
            f()
        });
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Runs `body` as root, in a private mount namespace, on a fresh [`Fx`] whose
    /// layers `layers` fills with `refill` files in its big dir; says `skipped: needs
    /// root` (fails under CI) otherwise.
    pub(crate) fn with_fx(refill: usize, body: impl FnOnce(Fx) + Send + 'static) {
        if !crate::test_support::need_root() {
            return;
        }
        in_private_ns(move || body(Fx::new(|l, u| layers(l, u, refill))));
    }

    pub(crate) struct Fx {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        pub lowers: Vec<PathBuf>,
        pub upper: PathBuf,
        pub mnt: PathBuf,
    }

    impl Fx {
        /// A tmpfs with lower layers `l0` (top-most) and `l1`, `upper`, `work` and `mnt`;
        /// `setup(lowers, upper)` fills the layers before the overlay is mounted.
        pub(crate) fn new(setup: impl FnOnce(&[PathBuf], &Path)) -> Fx {
            let tmp = tempfile::tempdir().expect("temp dir");
            let root = tmp.path().join("rt");
            std::fs::create_dir(&root).expect("mkdir rt");
            nix::mount::mount(
                Some("tmpfs"),
                &root,
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                Some("mode=0755"),
            )
            .expect("mount a tmpfs");
            let lowers = vec![root.join("l0"), root.join("l1")];
            let (upper, work, mnt) = (root.join("upper"), root.join("work"), root.join("mnt"));
            for d in lowers.iter().chain([&upper, &work, &mnt]) {
                std::fs::create_dir(d).expect("mkdir");
            }
            setup(&lowers, &upper);
            let options = crate::setup::options(&lowers, &upper, &work).expect("options");
            nix::mount::mount(
                Some("overlay"),
                &mnt,
                Some("overlay"),
                nix::mount::MsFlags::empty(),
                Some(options.as_str()),
            )
            .expect("mount the overlay");
            Fx {
                _tmp: tmp,
                root,
                lowers,
                upper,
                mnt,
            }
        }

        pub(crate) fn spec(&self) -> MountSpec {
            MountSpec::current(&self.mnt).expect("the overlay's mount spec")
        }

        /// The net state, from a walk of the upper dir.
        pub(crate) fn net(&self) -> Vec<(Vec<u8>, NetKind, store::FileType)> {
            let c = Classifier::new(&self.upper, &self.lowers).expect("layers");
            let mut out = Vec::new();
            c.walk(b"", &mut out).expect("walk the upper dir");
            out.sort_by(|a, b| a.0.cmp(&b.0));
            out
        }

        /// A changelog holding the net state, and the plan of a reset of `patterns`.
        pub(crate) fn plan(&self, patterns: &[&str], masks: &Masks) -> reset::ResetPlan {
            let state = self._tmp.path().join("state");
            let store = store::Store::open(&state).expect("a store");
            store.rebuild(self.net(), "test").expect("rebuild");
            let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
            let patterns = Patterns::new(&patterns, &self.mnt).expect("patterns");
            let layers = Classifier::new(&self.upper, &self.lowers).expect("layers");
            reset::plan(&store, &patterns, masks, &layers).expect("a plan")
        }
    }

    impl Drop for Fx {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
            let _ = nix::mount::umount2(&self.root, nix::mount::MntFlags::MNT_DETACH);
        }
    }

    pub(crate) fn write(p: &Path, content: &str, mode: u32) {
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).expect("mkdir -p");
        }
        std::fs::write(p, content).expect("write");
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    pub(crate) fn whiteout(p: &Path) {
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).expect("mkdir -p");
        }
        nix::sys::stat::mknod(p, SFlag::S_IFCHR, Mode::empty(), 0).expect("whiteout");
    }

    pub(crate) fn mtime(p: &Path, sec: i64) {
        let t = TimeSpec::new(sec, 123);
        utimensat(
            nix::fcntl::AT_FDCWD,
            p,
            &t,
            &t,
            UtimensatFlags::NoFollowSymlink,
        )
        .expect("set mtime");
    }

    /// What users see below `root`: per path, type, mode, owner, content (bytes,
    /// link target, device) and, for non-dirs, mtime.
    pub(crate) fn view(root: &Path) -> BTreeMap<String, String> {
        fn go(dir: &Path, rel: &str, out: &mut BTreeMap<String, String>) {
            for e in std::fs::read_dir(dir).expect("read_dir") {
                let e = e.expect("entry");
                let name = e.file_name().to_string_lossy().into_owned();
                let rel = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                let p = e.path();
                let m = std::fs::symlink_metadata(&p).expect("lstat");
                let ft = m.file_type();
                let content = if ft.is_file() {
                    String::from_utf8_lossy(&std::fs::read(&p).expect("read")).into_owned()
                } else if ft.is_symlink() {
                    std::fs::read_link(&p)
                        .expect("readlink")
                        .display()
                        .to_string()
                } else if ft.is_char_device() || ft.is_block_device() {
                    format!("dev {}", m.rdev())
                } else if ft.is_fifo() {
                    "fifo".into()
                } else {
                    String::new()
                };
                let time = if ft.is_dir() {
                    String::new()
                } else {
                    format!(" mtime {}.{}", m.mtime(), m.mtime_nsec())
                };
                out.insert(
                    rel.clone(),
                    format!(
                        "{:?} {:o} {}:{} {content:?}{time}",
                        ft,
                        m.mode(),
                        m.uid(),
                        m.gid()
                    ),
                );
                if ft.is_dir() {
                    go(&p, &rel, out);
                }
            }
        }
        let mut out = BTreeMap::new();
        go(root, "", &mut out);
        out
    }

    fn masks(paths: &[&str]) -> Masks {
        Masks::new(paths.iter().map(|p| p.as_bytes().to_vec()))
    }

    /// The lower layers of the tests: merged dirs across layers, an opaque dir and a
    /// whiteout in the top layer, owners, modes, mtimes, a symlink, a fifo, and spfs's
    /// masks (`etc/b`, `d/y`, `m`) written as whiteouts into the upper dir.
    pub(crate) fn layers(lowers: &[PathBuf], upper: &Path, big: usize) {
        let (l0, l1) = (&lowers[0], &lowers[1]);
        write(&l1.join("keep"), "keep\n", 0o644);
        write(&l1.join("f.txt"), "orig\n", 0o640);
        std::os::unix::fs::lchown(l1.join("f.txt"), Some(7), Some(8)).expect("chown");
        mtime(&l1.join("f.txt"), 978_307_200);
        write(&l1.join("etc/a"), "a\n", 0o644);
        write(&l1.join("etc/b"), "b\n", 0o644);
        write(&l0.join("etc/c"), "c from l0\n", 0o600);
        std::fs::set_permissions(l0.join("etc"), std::fs::Permissions::from_mode(0o750))
            .expect("chmod");
        std::os::unix::fs::lchown(l0.join("etc"), Some(5), Some(6)).expect("chown");
        for n in ["x", "y", "w", "sub/b"] {
            write(&l1.join("d").join(n), &format!("{n}\n"), 0o644);
        }
        write(&l0.join("d/sub/a"), "a\n", 0o644);
        xattr::set(l0.join("d/sub"), OPAQUE_XATTR, b"y").expect("opaque");
        whiteout(&l0.join("d/w"));
        std::fs::set_permissions(l0.join("d"), std::fs::Permissions::from_mode(0o711))
            .expect("chmod");
        write(&l1.join("m"), "m\n", 0o644);
        write(&l1.join("g"), "g\n", 0o644);
        std::os::unix::fs::symlink("f.txt", l1.join("lnk")).expect("symlink");
        std::os::unix::fs::lchown(l1.join("lnk"), Some(3), Some(4)).expect("chown");
        nix::unistd::mkfifo(&l1.join("fifo"), Mode::from_bits_truncate(0o620)).expect("fifo");
        for i in 0..big {
            write(&l1.join(format!("big/f{i:05}")), &format!("{i}\n"), 0o644);
        }
        // spfs's masks, as it writes them before the overlay is in use.
        std::fs::create_dir(upper.join("etc")).expect("mkdir");
        std::fs::set_permissions(upper.join("etc"), std::fs::Permissions::from_mode(0o750))
            .expect("chmod");
        std::os::unix::fs::lchown(upper.join("etc"), Some(5), Some(6)).expect("chown");
        whiteout(&upper.join("etc/b"));
        std::fs::create_dir(upper.join("d")).expect("mkdir");
        std::fs::set_permissions(upper.join("d"), std::fs::Permissions::from_mode(0o711))
            .expect("chmod");
        whiteout(&upper.join("d/y"));
        whiteout(&upper.join("m"));
    }

    pub(crate) const MASKS: &[&str] = &["etc/b", "d/y", "m"];

    /// A user's changes of every kind through the mount, over masks too (`m`).
    pub(crate) fn change(mnt: &Path, big: bool) {
        let append = |rel: &str| {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(mnt.join(rel))
                .expect("open for append");
            f.write_all(b"changed\n").expect("append");
        };
        append("f.txt");
        std::fs::set_permissions(mnt.join("f.txt"), std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
        append("etc/a");
        std::fs::remove_dir_all(mnt.join("d")).expect("rm -rf d");
        std::fs::create_dir(mnt.join("d")).expect("mkdir d");
        write(&mnt.join("d/new"), "new\n", 0o644);
        write(&mnt.join("d/sub/z"), "z\n", 0o644);
        write(&mnt.join("m"), "over the mask\n", 0o644);
        std::fs::remove_file(mnt.join("lnk")).expect("rm lnk");
        write(&mnt.join("lnk"), "not a link\n", 0o644);
        std::fs::remove_file(mnt.join("fifo")).expect("rm fifo");
        std::fs::remove_file(mnt.join("g")).expect("rm g");
        write(&mnt.join("new.txt"), "new\n", 0o644);
        if big {
            std::fs::remove_dir_all(mnt.join("big")).expect("rm -rf big");
            std::fs::create_dir(mnt.join("big")).expect("mkdir big");
            write(&mnt.join("big/new"), "new\n", 0o644);
        }
    }

    /// Busy (a file held open), every kind of change is put back through the mount:
    /// the mount shows what it showed before the changes (the lower layers as
    /// overlayfs merges them, with spfs's masks), and the upper dir keeps identical
    /// copies, so only the refilled (opaque) dirs are still changes.
    #[test]
    fn a_busy_reset_puts_everything_back_through_the_mount() {
        with_fx(1500, |fx| {
            let before = view(&fx.mnt);
            assert!(!before.contains_key("etc/b") && !before.contains_key("d/y"));
            assert!(before.contains_key("d/sub/a") && !before.contains_key("d/sub/b"));
            assert!(!before.contains_key("d/w") && before.contains_key("etc/c"));
            let net_before = fx.net();
            change(&fx.mnt, true);
            let masks = masks(MASKS);
            let plan = fx.plan(&["*"], &masks);
            let targets: Vec<&[u8]> = plan.targets.iter().map(|c| c.path.as_slice()).collect();
            assert_eq!(
                targets,
                [
                    &b"big"[..],
                    b"d",
                    b"etc/a",
                    b"f.txt",
                    b"fifo",
                    b"g",
                    b"lnk",
                    b"m",
                    b"new.txt"
                ],
                "etc/b, an intact mask, is no target"
            );
            assert_eq!(plan.masks, masks_of(&["d/y", "m"]));

            let held = std::fs::File::open(fx.mnt.join("keep")).expect("hold a file open");
            let mut seen = Vec::new();
            let outcome = reset::execute(&fx.spec(), &plan, &mut |p: Progress<'_>| {
                seen.push((p.path.to_vec(), p.entries));
            })
            .expect("a reset through the mount");
            let Outcome::ThroughMount {
                why: reset::Busy::Held { holders, .. },
                ..
            } = outcome
            else {
                panic!("not through the mount because it is held: {outcome:?}");
            };
            assert!(
                holders.iter().any(|h| h.pid == std::process::id()),
                "{holders:?}"
            );
            assert_eq!(seen, [(b"big".to_vec(), 1000)]);
            drop(held);

            let after = view(&fx.mnt);
            let diff: Vec<_> = before
                .iter()
                .filter(|(k, v)| after.get(*k) != Some(v))
                .map(|(k, v)| (k, v, after.get(k)))
                .chain(
                    after
                        .iter()
                        .filter(|(k, _)| !before.contains_key(*k))
                        .map(|(k, v)| (k, v, None)),
                )
                .collect();
            assert!(diff.is_empty(), "the mount differs from before: {diff:#?}");

            // What is left: the refilled dirs stay opaque in the upper dir (overlayfs
            // offers no way to clear that through the mount), so they and what they
            // hold are changes; the masks are whiteouts again; nothing else.
            let in_refilled = |p: &[u8]| {
                [&b"d"[..], b"big"]
                    .iter()
                    .any(|d| p == *d || (p.starts_with(d) && p.get(d.len()) == Some(&b'/')))
            };
            let rest: Vec<_> = fx
                .net()
                .into_iter()
                .filter(|(p, _, _)| !in_refilled(p))
                .collect();
            let want: Vec<_> = net_before
                .into_iter()
                .filter(|(p, _, _)| !in_refilled(p))
                .collect();
            assert_eq!(rest, want);
            assert_eq!(
                fx.net()
                    .into_iter()
                    .filter(|(p, _, _)| p.as_slice() == b"d")
                    .map(|(_, k, _)| k)
                    .collect::<Vec<_>>(),
                [NetKind::Replaced]
            );
        });
    }

    fn masks_of(paths: &[&str]) -> Masks {
        masks(paths)
    }

    /// Targets given one by one (as a pattern naming a path below an unchanged dir
    /// makes them), including a mask the user wrote over: it ends up absent.
    #[test]
    fn a_mask_written_over_is_made_absent_through_the_mount() {
        with_fx(0, |fx| {
            let before = view(&fx.mnt);
            change(&fx.mnt, false);
            let plan = fx.plan(&["/m", "/etc/"], &masks(MASKS));
            let targets: Vec<&[u8]> = plan.targets.iter().map(|c| c.path.as_slice()).collect();
            assert_eq!(targets, [&b"etc/a"[..], b"m"]);
            let changes: Vec<Change> = plan.targets.clone();
            let layers = Layers {
                mount_point: &fx.mnt,
                upper: &fx.upper,
                lowers: &fx.lowers,
            };
            let n =
                through_mount(layers, &changes, &[], &plan.masks, &mut |_| {}).expect("restore");
            assert_eq!(n, 2);
            let after = view(&fx.mnt);
            for p in ["etc/a", "etc/b", "etc/c", "m"] {
                assert_eq!(after.get(p), before.get(p), "{p}");
            }
            let m = std::fs::symlink_metadata(fx.upper.join("m")).expect("m in the upper dir");
            assert!(
                m.file_type().is_char_device() && m.rdev() == 0,
                "m is a whiteout"
            );
        });
    }
}
