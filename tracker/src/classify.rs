//! Classifies a path of the upper dir against the lower layers.
//!
//! Events only say *that* a path may have changed; what it is now relative to the
//! lower layers is read from the filesystem. Doing it this way makes the net state
//! equal what a walk of the upper dir says, whatever order or mix of events led there
//! (copy-ups, whiteouts, rename-exchanges inside overlayfs, direct writes by spfs).
//!
//! Lookups go one component at a time from directory descriptors, never following
//! symlinks: paths may be longer than PATH_MAX once the upper dir is prefixed, and a
//! symlink in the upper dir must not lead the tracker out of it.

use nix::dir::Dir;
use nix::fcntl::{AtFlags, OFlag, openat, readlinkat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstatat};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use store::{FileType, NetKind};
use xattr::FileExt;

/// The xattr overlayfs sets on a dir that hides the lower dirs below it.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// Overlayfs' private xattrs are bookkeeping, not user metadata.
const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";

pub type Net = Option<(NetKind, FileType)>;

/// An entry named by its parent dir and its name, with what `lstat` said of it.
struct Entry<'a> {
    parent: Arc<File>,
    name: &'a OsStr,
    stat: FileStat,
}

enum Lower<'a> {
    /// An upper ancestor (opaque dir) hides the lower layers.
    Hidden,
    Absent,
    /// Found in the lower layer with this index (top-most is 0).
    Present(usize, Entry<'a>),
}

/// Where a changed path's original lives, for reports such as spk's validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Original {
    /// Index of the lower layer (top-most is 0) that holds the path, if any does.
    pub layer: Option<usize>,
    /// The upper entry's type or mode differ from the original's (as spfs compares
    /// entries: owners are not part of them).
    pub mode_differs: bool,
    /// The original is a directory.
    pub is_dir: bool,
}

/// What `Classifier::each_upper_entry` calls for each entry: its path, and its inode
/// number unless it is a dir.
type EntryVisitor<'a> = dyn FnMut(&[u8], Option<u64>) -> io::Result<()> + 'a;

/// What `Classifier::upper_inode` says of an upper entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpperInode {
    pub ino: u64,
    /// Its link count (`st_nlink`).
    pub links: u64,
    /// A file that can have other names: not a dir, not a whiteout (overlayfs makes
    /// its whiteouts hard links of one shared inode).
    pub linkable: bool,
}

impl UpperInode {
    fn of(s: &FileStat) -> UpperInode {
        UpperInode {
            ino: s.st_ino,
            links: s.st_nlink,
            linkable: !is_type(s, SFlag::S_IFDIR) && !is_whiteout(s),
        }
    }
}

pub struct Classifier {
    upper_path: PathBuf,
    upper: Arc<File>,
    /// Top-most first, as in overlayfs' `lowerdir=`.
    lowers: Vec<Arc<File>>,
    /// Dirs looked up recently: changed paths come in bunches under the same dirs.
    dirs: RefCell<DirCache>,
}

/// A dir of the upper dir, and whether an opaque dir at or above it hides the lowers.
struct UpperDir {
    fd: Arc<File>,
    hidden: bool,
}

/// What each lower layer holds at one dir path.
enum LayerDir {
    Missing,
    /// A whiteout or a non-dir: hides this path in this layer and all below.
    Blocked,
    /// A dir; `opaque` when it or a dir above it in this layer is opaque, which hides
    /// the layers below for everything under it.
    Dir {
        fd: Arc<File>,
        opaque: bool,
    },
}

/// Past this many cached dirs the cache starts over: each holds descriptors.
const DIR_CACHE_LIMIT: usize = 128;

#[derive(Default)]
struct DirCache {
    upper: HashMap<Vec<u8>, Option<Arc<UpperDir>>>,
    lower: HashMap<Vec<u8>, Arc<Vec<LayerDir>>>,
}

impl Classifier {
    pub fn new(upper: &Path, lowers: &[PathBuf]) -> io::Result<Self> {
        Ok(Self {
            upper_path: upper.to_path_buf(),
            upper: Arc::new(File::open(upper)?),
            lowers: open_all(lowers)?,
            dirs: RefCell::default(),
        })
    }

    /// The same upper dir over other lower layers (after a remount that changed them).
    pub fn relayered(&self, lowers: &[PathBuf]) -> io::Result<Self> {
        Ok(Self {
            upper_path: self.upper_path.clone(),
            upper: Arc::new(dup(self.upper.as_fd())?),
            lowers: open_all(lowers)?,
            dirs: RefCell::default(),
        })
    }

    /// The same layers, opened anew from this classifier's descriptors (no paths are
    /// looked up again: the ones it was made from may be gone, such as a
    /// `/proc/<pid>/root` whose process exited), with an empty cache, for another
    /// thread to use.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            upper_path: self.upper_path.clone(),
            upper: Arc::new(reopen(self.upper.as_fd())?),
            lowers: self
                .lowers
                .iter()
                .map(|l| Ok(Arc::new(reopen(l.as_fd())?)))
                .collect::<io::Result<_>>()?,
            dirs: RefCell::default(),
        })
    }

    /// Drops every cached dir: call between batches, so that a dir renamed or removed
    /// since is looked up afresh.
    pub fn forget(&self) {
        *self.dirs.borrow_mut() = DirCache::default();
    }

    /// The upper dir at `rel` (a dir path), or `None` when it is not a dir there.
    fn upper_dir(&self, rel: &[u8]) -> io::Result<Option<Arc<UpperDir>>> {
        if rel.is_empty() {
            return Ok(Some(Arc::new(UpperDir {
                fd: self.upper.clone(),
                hidden: false,
            })));
        }
        if let Some(found) = self.dirs.borrow().upper.get(rel) {
            return Ok(found.clone());
        }
        let (parent_rel, name) = parent_and_name(rel);
        let found = match self.upper_dir(parent_rel)? {
            None => None,
            Some(parent) => open_dir(parent.fd.as_fd(), name)?.map(|fd| {
                let hidden = parent.hidden || is_opaque(&fd);
                Arc::new(UpperDir {
                    fd: Arc::new(fd),
                    hidden,
                })
            }),
        };
        let mut cache = self.dirs.borrow_mut();
        if cache.upper.len() >= DIR_CACHE_LIMIT {
            cache.upper.clear();
        }
        cache.upper.insert(rel.to_vec(), found.clone());
        Ok(found)
    }

    /// What each lower layer holds at dir path `rel`.
    fn lower_dir(&self, rel: &[u8]) -> io::Result<Arc<Vec<LayerDir>>> {
        if let Some(found) = self.dirs.borrow().lower.get(rel) {
            return Ok(found.clone());
        }
        let found: Vec<LayerDir> = if rel.is_empty() {
            self.lowers
                .iter()
                .map(|fd| LayerDir::Dir {
                    fd: fd.clone(),
                    opaque: false,
                })
                .collect()
        } else {
            let (parent_rel, name) = parent_and_name(rel);
            let parent = self.lower_dir(parent_rel)?;
            let mut layers = Vec::with_capacity(parent.len());
            for layer in parent.iter() {
                layers.push(match layer {
                    LayerDir::Missing => LayerDir::Missing,
                    LayerDir::Blocked => LayerDir::Blocked,
                    LayerDir::Dir { fd, opaque } => match lstat_at(fd.as_fd(), name)? {
                        None => LayerDir::Missing,
                        Some(s) if is_whiteout(&s) || !is_type(&s, SFlag::S_IFDIR) => {
                            LayerDir::Blocked
                        }
                        Some(_) => match open_dir(fd.as_fd(), name)? {
                            Some(sub) => {
                                let opaque = *opaque || is_opaque(&sub);
                                LayerDir::Dir {
                                    fd: Arc::new(sub),
                                    opaque,
                                }
                            }
                            None => LayerDir::Missing,
                        },
                    },
                });
            }
            layers
        };
        let found = Arc::new(found);
        let mut cache = self.dirs.borrow_mut();
        if cache.lower.len() >= DIR_CACHE_LIMIT {
            cache.lower.clear();
        }
        cache.lower.insert(rel.to_vec(), found.clone());
        Ok(found)
    }

    pub fn upper(&self) -> &Path {
        &self.upper_path
    }

    /// The net state of `rel` (relative to the upper dir).
    pub fn classify(&self, rel: &[u8]) -> io::Result<Net> {
        self.classify_inode(rel).map(|(net, _)| net)
    }

    /// The net state of `rel`, and its upper entry's inode when there is one.
    pub fn classify_inode(&self, rel: &[u8]) -> io::Result<(Net, Option<UpperInode>)> {
        if rel.is_empty() {
            return Ok((None, None));
        }
        let (dir_rel, name) = parent_and_name(rel);
        let Some(dir) = self.upper_dir(dir_rel)? else {
            return Ok((None, None));
        };
        let Some(stat) = lstat_at(dir.fd.as_fd(), name)? else {
            return Ok((None, None));
        };
        let inode = UpperInode::of(&stat);
        let upper = Entry {
            parent: dir.fd.clone(),
            name,
            stat,
        };
        let lower = if dir.hidden {
            Lower::Hidden
        } else {
            self.lower(dir_rel, name)?
        };
        Ok((compare(&upper, &lower)?, Some(inode)))
    }

    /// The upper dir's own entry at `rel` (`lstat`), if there is one: what hard links
    /// are found by (its inode number and link count).
    pub fn upper_inode(&self, rel: &[u8]) -> io::Result<Option<UpperInode>> {
        if rel.is_empty() {
            return Ok(None);
        }
        let (dir_rel, name) = parent_and_name(rel);
        let Some(dir) = self.upper_dir(dir_rel)? else {
            return Ok(None);
        };
        Ok(lstat_at(dir.fd.as_fd(), name)?.map(|s| UpperInode::of(&s)))
    }

    /// Every entry of the upper dir that is not a dir, with its inode number (one walk
    /// of the whole upper dir: for the names of hard-linked files).
    pub fn upper_inodes(&self) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        self.each_upper_entry(b"", &mut |path, ino| {
            if let Some(ino) = ino {
                out.push((ino, path.to_vec()));
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Visits every entry of the upper dir at and below the dir `rel`, dirs before
    /// what they hold: `f(path, None)` for a dir, `f(path, Some(inode))` for the rest.
    fn each_upper_entry(&self, rel: &[u8], f: &mut EntryVisitor<'_>) -> io::Result<()> {
        let mut stack = vec![rel.to_vec()];
        while let Some(dir_rel) = stack.pop() {
            f(&dir_rel, None)?;
            let Some(dir_entry) = self.upper_dir(&dir_rel)? else {
                continue;
            };
            let fd = dir_entry.fd.clone();
            let mut dir = match Dir::openat(
                fd.as_fd(),
                ".",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            ) {
                Ok(d) => d,
                Err(e) if went_away(&e.into()) => continue,
                Err(e) => return Err(e.into()),
            };
            for entry in dir.iter() {
                let entry = entry.map_err(io::Error::from)?;
                let name = entry.file_name().to_bytes();
                if name == b"." || name == b".." {
                    continue;
                }
                let child = join_rel(&dir_rel, name);
                let is_dir = match entry.file_type() {
                    Some(t) => t == nix::dir::Type::Directory,
                    None => lstat_at(fd.as_fd(), OsStr::from_bytes(name))?
                        .is_some_and(|s| is_type(&s, SFlag::S_IFDIR)),
                };
                if is_dir {
                    stack.push(child);
                } else {
                    f(&child, Some(entry.ino()))?;
                }
            }
        }
        Ok(())
    }

    /// The lower original of `rel`, as overlayfs would show it below the upper dir.
    pub fn original(&self, rel: &[u8]) -> io::Result<Original> {
        self.original_at(rel, true)
    }

    /// The lower original of `rel` path by path, as `spfs diff` and spk's validation
    /// compare the upper dir with the layers: what the lower layers hold at `rel` even
    /// where an opaque upper dir above it hides them from the overlay (a dir removed
    /// and made again).
    pub fn original_by_path(&self, rel: &[u8]) -> io::Result<Original> {
        self.original_at(rel, false)
    }

    fn original_at(&self, rel: &[u8], overlay: bool) -> io::Result<Original> {
        let none = Original {
            layer: None,
            mode_differs: false,
            is_dir: false,
        };
        if rel.is_empty() {
            return Ok(none);
        }
        let (dir_rel, name) = parent_and_name(rel);
        let dir = self.upper_dir(dir_rel)?;
        // Hidden by an opaque upper ancestor: the overlay shows no original.
        if overlay && dir.as_ref().is_some_and(|d| d.hidden) {
            return Ok(none);
        }
        let upper = match &dir {
            Some(d) => lstat_at(d.fd.as_fd(), name)?,
            None => None,
        };
        match self.lower(dir_rel, name)? {
            Lower::Present(index, lower) => Ok(Original {
                layer: Some(index),
                is_dir: is_type(&lower.stat, SFlag::S_IFDIR),
                mode_differs: upper
                    .is_some_and(|u| !is_whiteout(&u) && u.st_mode != lower.stat.st_mode),
            }),
            Lower::Absent | Lower::Hidden => Ok(none),
        }
    }

    /// The entry the lower layers show at `rel`, whatever the upper dir holds.
    pub fn lower_entry(&self, rel: &[u8]) -> io::Result<Option<Found>> {
        if rel.is_empty() {
            return Ok(None);
        }
        let (dir_rel, name) = parent_and_name(rel);
        Ok(match self.lower(dir_rel, name)? {
            Lower::Present(_, e) => Some(Found::of(e)),
            Lower::Absent | Lower::Hidden => None,
        })
    }

    /// The entry the overlay shows at `rel`, whose parent the caller knows to be a dir
    /// of the overlay (callers that look up many paths remember their dirs): the upper
    /// one unless there is none (a whiteout, or an opaque dir above, hides the lower
    /// one).
    pub fn merged_child(&self, rel: &[u8]) -> io::Result<Option<Found>> {
        let (dir_rel, name) = parent_and_name(rel);
        let upper = self.upper_dir(dir_rel)?;
        if let Some(dir) = &upper {
            if let Some(stat) = lstat_at(dir.fd.as_fd(), name)? {
                return Ok((!is_whiteout(&stat)).then(|| Found {
                    parent: dir.fd.clone(),
                    name: name.to_owned(),
                    stat,
                }));
            }
            if dir.hidden {
                return Ok(None);
            }
        }
        self.lower_entry(rel)
    }

    /// What the lower layers hold below dir `rel`, as overlayfs merges them: each path
    /// once, with the index of the top-most layer holding it and whether it is a dir.
    /// Used to name every original a removed or replaced dir took with it.
    pub fn lower_tree(&self, rel: &[u8]) -> io::Result<Vec<(Vec<u8>, usize, bool)>> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        // The same layer lookup as for one path: a whiteout or non-dir hides the
        // layers below, an opaque dir hides them for what is under it.
        for (index, layer) in self.lower_dir(rel)?.iter().enumerate() {
            match layer {
                LayerDir::Missing => continue,
                LayerDir::Blocked => break,
                LayerDir::Dir { fd, opaque } => {
                    collect_tree(dup(fd.as_fd())?, rel.to_vec(), index, &mut seen, &mut out)?;
                    if *opaque {
                        break;
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The names in lower layer `layer`'s own dir `rel` (not the merged view: what
    /// that one layer holds), each with whether it is a dir; empty when the layer has
    /// no dir there. Used to learn which spk package a layer installs.
    pub fn layer_listing(&self, layer: usize, rel: &[u8]) -> io::Result<Vec<(Vec<u8>, bool)>> {
        match self.layer_dir(layer, rel)? {
            Some(dir) => list_dir(&dir),
            None => Ok(Vec::new()),
        }
    }

    /// What lower layer `layer` itself holds at `rel` (not the merged view):
    /// `Some(is_dir)`, or `None` when nothing (a whiteout counts as an entry).
    pub fn layer_entry(&self, layer: usize, rel: &[u8]) -> io::Result<Option<bool>> {
        let (dir_rel, name) = parent_and_name(rel);
        let Some(dir) = self.layer_dir(layer, dir_rel)? else {
            return Ok(None);
        };
        Ok(lstat_at(dir.as_fd(), name)?.map(|s| is_type(&s, SFlag::S_IFDIR)))
    }

    /// Lower layer `layer`'s own dir `rel`, when it has one.
    fn layer_dir(&self, layer: usize, rel: &[u8]) -> io::Result<Option<File>> {
        let Some(top) = self.lowers.get(layer) else {
            return Ok(None);
        };
        let mut dir = dup(top.as_fd())?;
        for name in rel.split(|&b| b == b'/').filter(|n| !n.is_empty()) {
            match open_dir(dir.as_fd(), OsStr::from_bytes(name))? {
                Some(sub) => dir = sub,
                None => return Ok(None),
            }
        }
        Ok(Some(dir))
    }

    /// Every changed path at and below `rel` (a dir, or the upper dir itself when
    /// empty). Used for rescans and for dirs that move into place.
    pub fn walk(&self, rel: &[u8], out: &mut Vec<(Vec<u8>, NetKind, FileType)>) -> io::Result<()> {
        self.each_upper_entry(rel, &mut |path, _| {
            if path.is_empty() {
                return Ok(());
            }
            match self.classify(path) {
                Ok(Some((kind, ft))) => out.push((path.to_vec(), kind, ft)),
                Ok(None) => {}
                // Removed or renamed while walked (a build goes on meanwhile): its
                // events follow, and are settled then.
                Err(e) if went_away(&e) => {}
                Err(e) => return Err(e),
            }
            Ok(())
        })
    }

    /// The entry overlayfs would show from the lower layers at `dir_rel/name`.
    fn lower<'a>(&self, dir_rel: &[u8], name: &'a OsStr) -> io::Result<Lower<'a>> {
        let dir = self.lower_dir(dir_rel)?;
        for (index, layer) in dir.iter().enumerate() {
            match layer {
                LayerDir::Missing => continue,
                LayerDir::Blocked => return Ok(Lower::Absent),
                LayerDir::Dir { fd, opaque } => match lstat_at(fd.as_fd(), name)? {
                    Some(s) if is_whiteout(&s) => return Ok(Lower::Absent),
                    Some(stat) => {
                        return Ok(Lower::Present(
                            index,
                            Entry {
                                parent: fd.clone(),
                                name,
                                stat,
                            },
                        ));
                    }
                    None if *opaque => return Ok(Lower::Absent),
                    None => {}
                },
            }
        }
        Ok(Lower::Absent)
    }
}

/// An entry of one layer (or the upper dir): its dir, its name and what `lstat` said.
pub struct Found {
    parent: Arc<File>,
    name: std::ffi::OsString,
    pub stat: FileStat,
}

impl Found {
    fn of(e: Entry<'_>) -> Found {
        Found {
            parent: e.parent,
            name: e.name.to_owned(),
            stat: e.stat,
        }
    }

    fn entry(&self) -> Entry<'_> {
        Entry {
            parent: self.parent.clone(),
            name: &self.name,
            stat: self.stat,
        }
    }

    /// Whether the content of two entries differs as spfs's digests would: a file's
    /// bytes, a symlink's target (a file and a symlink compare bytes with target).
    pub fn content_differs(&self, other: &Found) -> io::Result<bool> {
        let (a, b) = (self.content_source()?, other.content_source()?);
        match (a, b) {
            (Content::Bytes(x), Content::Bytes(y)) => Ok(x != y),
            (Content::File, Content::File) => Ok(self.stat.st_size != other.stat.st_size
                || !same_bytes(&self.entry(), &other.entry())?),
            (Content::Bytes(x), Content::File) => Ok(!file_is(&other.entry(), &x)?),
            (Content::File, Content::Bytes(y)) => Ok(!file_is(&self.entry(), &y)?),
        }
    }

    /// What identifies the content: a symlink's target, the BLAKE3 digest of a file's
    /// bytes (32 bytes), a device's number; empty for a dir.
    pub fn content_digest(&self) -> io::Result<Vec<u8>> {
        if is_type(&self.stat, SFlag::S_IFDIR) {
            return Ok(Vec::new());
        }
        match self.content_source()? {
            Content::Bytes(b) => Ok(b),
            Content::File => {
                let mut hasher = blake3::Hasher::new();
                hasher.update_reader(open_file(&self.entry())?)?;
                Ok(hasher.finalize().as_bytes().to_vec())
            }
        }
    }

    fn content_source(&self) -> io::Result<Content> {
        if is_type(&self.stat, SFlag::S_IFLNK) {
            let target = readlinkat(self.parent.as_fd(), self.name.as_os_str())?;
            Ok(Content::Bytes(target.as_bytes().to_vec()))
        } else if is_type(&self.stat, SFlag::S_IFREG) {
            Ok(Content::File)
        } else {
            // Devices: their number is all they hold.
            Ok(Content::Bytes(self.stat.st_rdev.to_le_bytes().to_vec()))
        }
    }

    /// Whether the user xattrs (overlayfs' own left out) of two entries differ.
    pub fn xattrs_differ(&self, other: &Found) -> io::Result<bool> {
        xattrs_differ(&self.entry(), &other.entry())
    }
}

enum Content {
    Bytes(Vec<u8>),
    File,
}

/// Whether file `e` holds exactly `bytes`.
fn file_is(e: &Entry<'_>, bytes: &[u8]) -> io::Result<bool> {
    if e.stat.st_size as u64 != bytes.len() as u64 {
        return Ok(false);
    }
    let mut f = open_file(e)?;
    let mut buf = vec![0u8; bytes.len() + 1];
    let n = read_full(&mut f, &mut buf)?;
    Ok(buf[..n] == *bytes)
}

/// Opens each layer dir.
fn open_all(paths: &[PathBuf]) -> io::Result<Vec<Arc<File>>> {
    paths.iter().map(|p| Ok(Arc::new(File::open(p)?))).collect()
}

/// `a/b/c` as (`a/b`, `c`); a path without a slash has the empty dir.
fn parent_and_name(rel: &[u8]) -> (&[u8], &OsStr) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], OsStr::from_bytes(&rel[i + 1..])),
        None => (&[], OsStr::from_bytes(rel)),
    }
}

fn collect_tree(
    dir: File,
    rel: Vec<u8>,
    layer: usize,
    seen: &mut std::collections::HashSet<Vec<u8>>,
    out: &mut Vec<(Vec<u8>, usize, bool)>,
) -> io::Result<()> {
    for (name, _) in list_dir(&dir)? {
        let child = join_rel(&rel, &name);
        let Some(stat) = lstat_at(dir.as_fd(), OsStr::from_bytes(&name))? else {
            continue;
        };
        // A whiteout in an upper lower layer hides the path in the layers below.
        let first = seen.insert(child.clone());
        let is_dir = is_type(&stat, SFlag::S_IFDIR);
        if first && !is_whiteout(&stat) {
            out.push((child.clone(), layer, is_dir));
        }
        if is_dir
            && !is_whiteout(&stat)
            && let Some(sub) = open_dir(dir.as_fd(), OsStr::from_bytes(&name))?
        {
            collect_tree(sub, child, layer, seen, out)?;
        }
    }
    Ok(())
}

/// The names in a dir, with whether each is a dir (from the dir entry's type, or
/// `lstat` where the filesystem does not give it).
fn list_dir(dir: &File) -> io::Result<Vec<(Vec<u8>, bool)>> {
    let mut listing = Dir::openat(
        dir.as_fd(),
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut out = Vec::new();
    for entry in listing.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let is_dir = match entry.file_type() {
            Some(t) => t == nix::dir::Type::Directory,
            None => lstat_at(dir.as_fd(), OsStr::from_bytes(name))?
                .is_some_and(|s| is_type(&s, SFlag::S_IFDIR)),
        };
        out.push((name.to_vec(), is_dir));
    }
    Ok(out)
}

/// Joins a relative byte path and a name.
pub fn join_rel(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
    if !dir.is_empty() {
        p.extend_from_slice(dir);
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Whether an error says the path is not there (any more): removed, renamed, or a
/// dir on its way is.
pub fn went_away(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ESTALE)
    )
}

/// A new open file description of the dir `fd` (its own offset, unlike `dup`).
fn reopen(fd: BorrowedFd<'_>) -> io::Result<File> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    Ok(File::from(openat(fd, ".", flags, Mode::empty())?))
}

fn dup(fd: BorrowedFd<'_>) -> io::Result<File> {
    Ok(File::from(fd.try_clone_to_owned()?))
}

/// Opens a subdir without following symlinks; `None` when it is not (or no longer) a
/// dir. Opened for reading (not `O_PATH`) so its xattrs can be read through it.
fn open_dir(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<File>> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    match openat(parent, name, flags, Mode::empty()) {
        Ok(fd) => Ok(Some(File::from(fd))),
        Err(e) if went_away(&e.into()) || e == nix::errno::Errno::ELOOP => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn lstat_at(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<FileStat>> {
    match fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(s) => Ok(Some(s)),
        Err(e) if went_away(&e.into()) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn is_type(s: &FileStat, t: SFlag) -> bool {
    (s.st_mode & SFlag::S_IFMT.bits()) == t.bits()
}

fn is_whiteout(s: &FileStat) -> bool {
    is_type(s, SFlag::S_IFCHR) && s.st_rdev == 0
}

/// A path that reaches the object behind `fd` itself, whatever its real path's length.
fn proc_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/thread-self/fd/{}", fd.as_raw_fd()))
}

fn is_opaque(dir: &File) -> bool {
    matches!(dir.get_xattr(OPAQUE_XATTR), Ok(Some(v)) if v == b"y")
}

pub fn file_type(s: &FileStat) -> FileType {
    let t = s.st_mode & SFlag::S_IFMT.bits();
    match t {
        _ if t == SFlag::S_IFDIR.bits() => FileType::Dir,
        _ if t == SFlag::S_IFREG.bits() => FileType::File,
        _ if t == SFlag::S_IFLNK.bits() => FileType::Symlink,
        _ if is_whiteout(s) => FileType::Whiteout,
        _ if t == SFlag::S_IFCHR.bits() => FileType::CharDevice,
        _ if t == SFlag::S_IFBLK.bits() => FileType::BlockDevice,
        _ if t == SFlag::S_IFIFO.bits() => FileType::Fifo,
        _ if t == SFlag::S_IFSOCK.bits() => FileType::Socket,
        _ => FileType::Unknown,
    }
}

fn compare(upper: &Entry<'_>, lower: &Lower<'_>) -> io::Result<Net> {
    let ft = file_type(&upper.stat);
    let lower = match lower {
        Lower::Present(_, e) => e,
        Lower::Hidden | Lower::Absent => {
            return Ok(match ft {
                FileType::Whiteout => None,
                _ => Some((NetKind::Added, ft)),
            });
        }
    };
    if ft == FileType::Whiteout {
        return Ok(Some((NetKind::Removed, ft)));
    }
    if ft == FileType::Dir
        && let Some(fd) = open_dir(upper.parent.as_fd(), upper.name)?
        && is_opaque(&fd)
    {
        return Ok(Some((NetKind::Replaced, ft)));
    }
    if ft != file_type(&lower.stat) {
        return Ok(Some((NetKind::Replaced, ft)));
    }
    let (us, ls) = (&upper.stat, &lower.stat);
    let content_differs = match ft {
        FileType::Dir => false,
        FileType::File => us.st_size != ls.st_size || !same_bytes(upper, lower)?,
        FileType::Symlink => {
            readlinkat(upper.parent.as_fd(), upper.name)?
                != readlinkat(lower.parent.as_fd(), lower.name)?
        }
        _ => us.st_rdev != ls.st_rdev,
    };
    if content_differs {
        return Ok(Some((NetKind::Modified, ft)));
    }
    let owner_differs = us.st_uid != ls.st_uid || us.st_gid != ls.st_gid;
    let meta_differs = match ft {
        FileType::Symlink => owner_differs,
        FileType::Dir => owner_differs || us.st_mode != ls.st_mode || xattrs_differ(upper, lower)?,
        _ => {
            owner_differs
                || us.st_mode != ls.st_mode
                || us.st_mtime != ls.st_mtime
                || us.st_mtime_nsec != ls.st_mtime_nsec
                || xattrs_differ(upper, lower)?
        }
    };
    Ok(meta_differs.then_some((NetKind::Metadata, ft)))
}

fn open_file(e: &Entry<'_>) -> io::Result<File> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    Ok(File::from(openat(
        e.parent.as_fd(),
        e.name,
        flags,
        Mode::empty(),
    )?))
}

fn same_bytes(a: &Entry<'_>, b: &Entry<'_>) -> io::Result<bool> {
    let (mut fa, mut fb) = (open_file(a)?, open_file(b)?);
    // Sized for the file (most changed files are small): zeroing buffers costs.
    let size = usize::try_from(a.stat.st_size.max(0)).unwrap_or(usize::MAX);
    let len = size.saturating_add(1).clamp(1, 64 * 1024);
    let mut ba = vec![0u8; len];
    let mut bb = vec![0u8; len];
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

type Xattrs = Vec<(Vec<u8>, Option<Vec<u8>>)>;

fn user_xattrs(e: &Entry<'_>) -> io::Result<Xattrs> {
    let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = openat(e.parent.as_fd(), e.name, flags, Mode::empty())?;
    let path = proc_path(fd.as_fd());
    let mut out = Vec::new();
    let names = match xattr::list_deref(&path) {
        Ok(n) => n,
        Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(out),
        Err(err) => return Err(err),
    };
    for name in names {
        if name.as_bytes().starts_with(OVERLAY_XATTR_PREFIX) {
            continue;
        }
        let value = xattr::get_deref(&path, &name)?;
        out.push((name.as_bytes().to_vec(), value));
    }
    out.sort();
    Ok(out)
}

fn xattrs_differ(a: &Entry<'_>, b: &Entry<'_>) -> io::Result<bool> {
    Ok(user_xattrs(a)? != user_xattrs(b)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two lower layers; in the top one `d` is opaque and `w` a whiteout.
    #[test]
    fn lower_tree_stops_at_opaque_dirs_and_whiteouts() {
        if !crate::test_support::need_root() {
            return;
        }
        let root = tempfile::tempdir().expect("temp dir");
        let (upper, top, bottom) = (
            root.path().join("u"),
            root.path().join("t"),
            root.path().join("b"),
        );
        for d in [&upper, &top.join("d"), &bottom.join("d"), &bottom.join("w")] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        std::fs::write(top.join("d/a"), "a").expect("write");
        std::fs::write(bottom.join("d/b"), "b").expect("write");
        std::fs::write(bottom.join("w/x"), "x").expect("write");
        xattr::set(top.join("d"), OPAQUE_XATTR, b"y").expect("set the opaque xattr");
        nix::sys::stat::mknod(&top.join("w"), SFlag::S_IFCHR, Mode::empty(), 0).expect("whiteout");
        let c = Classifier::new(&upper, &[top, bottom.clone()]).expect("layers");
        assert_eq!(
            c.lower_tree(b"d").expect("d"),
            vec![(b"d/a".to_vec(), 0, false)]
        );
        assert!(c.lower_tree(b"w").expect("w").is_empty());
        // Without the top layer, both trees come from the bottom one.
        let c = Classifier::new(&upper, &[bottom]).expect("layers");
        assert_eq!(
            c.lower_tree(b"d").expect("d"),
            vec![(b"d/b".to_vec(), 0, false)]
        );
        assert_eq!(
            c.lower_tree(b"w").expect("w"),
            vec![(b"w/x".to_vec(), 0, false)]
        );
    }
}
