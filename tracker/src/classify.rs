//! Classifies a path of the upper dir against the lower layers.
//!
//! Events only say *that* a path may have changed; what it is now relative to the
//! lower layers is read from the filesystem. Doing it this way makes the net state
//! equal what a walk of the upper dir says, whatever order or mix of events led there
//! (copy-ups, whiteouts, rename-exchanges inside overlayfs, direct writes by spfs).

use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use store::{FileType, NetKind};

/// The xattr overlayfs sets on a dir that hides the lower dirs below it.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// Overlayfs' private xattrs are bookkeeping, not user metadata.
const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";

pub type Net = Option<(NetKind, FileType)>;

/// Where the lower layers stand for a path.
enum Lower {
    /// An upper ancestor (opaque dir, whiteout, non-dir) hides the lower layers.
    Hidden,
    Absent,
    Present(PathBuf, Metadata),
}

pub struct Classifier {
    upper: PathBuf,
    /// Top-most first, as in overlayfs' `lowerdir=`.
    lowers: Vec<PathBuf>,
}

impl Classifier {
    pub fn new(upper: PathBuf, lowers: Vec<PathBuf>) -> Self {
        Self { upper, lowers }
    }

    pub fn upper(&self) -> &Path {
        &self.upper
    }

    /// The net state of `rel` (relative to the upper dir).
    pub fn classify(&self, rel: &[u8]) -> io::Result<Net> {
        let rel = Path::new(std::ffi::OsStr::from_bytes(rel));
        let mut hidden = false;
        let mut dir = self.upper.clone();
        let mut components = rel.components().peekable();
        while let Some(c) = components.next() {
            if components.peek().is_none() {
                break;
            }
            dir.push(c);
            let meta = match fs::symlink_metadata(&dir) {
                Ok(m) => m,
                Err(e) if is_gone(&e) => return Ok(None),
                Err(e) => return Err(e),
            };
            if !meta.is_dir() {
                // An ancestor that is not a dir: the path does not exist in the upper dir.
                return Ok(None);
            }
            if !hidden && is_opaque(&dir) {
                hidden = true;
            }
        }
        let path = self.upper.join(rel);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if is_gone(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let lower = if hidden { Lower::Hidden } else { self.lower(rel)? };
        compare(&path, &meta, &lower)
    }

    /// Every changed path at and below `rel` (a dir, or the upper dir itself when
    /// empty), depth first. Used for rescans and for dirs that move into place.
    pub fn walk(&self, rel: &[u8], out: &mut Vec<(Vec<u8>, NetKind, FileType)>) -> io::Result<()> {
        let mut stack = vec![rel.to_vec()];
        while let Some(dir_rel) = stack.pop() {
            if !dir_rel.is_empty() {
                if let Some((kind, ft)) = self.classify(&dir_rel)? {
                    out.push((dir_rel.clone(), kind, ft));
                }
            }
            let dir = self.upper.join(std::ffi::OsStr::from_bytes(&dir_rel));
            let meta = match fs::symlink_metadata(&dir) {
                Ok(m) => m,
                Err(e) if is_gone(&e) => continue,
                Err(e) => return Err(e),
            };
            if !meta.is_dir() {
                continue;
            }
            let entries = match fs::read_dir(&dir) {
                Ok(it) => it,
                Err(e) if is_gone(&e) => continue,
                Err(e) => return Err(e),
            };
            for entry in entries {
                let entry = match entry {
                    Ok(e) => e,
                    Err(e) if is_gone(&e) => continue,
                    Err(e) => return Err(e),
                };
                let child = join_rel(&dir_rel, entry.file_name().as_bytes());
                match entry.file_type() {
                    Ok(t) if t.is_dir() => stack.push(child),
                    Ok(_) => {
                        if let Some((kind, ft)) = self.classify(&child)? {
                            out.push((child, kind, ft));
                        }
                    }
                    Err(e) if is_gone(&e) => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    fn lower(&self, rel: &Path) -> io::Result<Lower> {
        for layer in &self.lowers {
            let p = layer.join(rel);
            match fs::symlink_metadata(&p) {
                Ok(m) if is_whiteout(&m) => return Ok(Lower::Absent),
                Ok(m) => return Ok(Lower::Present(p, m)),
                Err(e) if is_gone(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(Lower::Absent)
    }
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

fn is_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ESTALE))
}

fn is_whiteout(m: &Metadata) -> bool {
    m.file_type().is_char_device() && m.rdev() == 0
}

fn is_opaque(dir: &Path) -> bool {
    matches!(xattr::get(dir, OPAQUE_XATTR), Ok(Some(v)) if v == b"y")
}

pub fn file_type(m: &Metadata) -> FileType {
    let t = m.file_type();
    if t.is_dir() {
        FileType::Dir
    } else if t.is_file() {
        FileType::File
    } else if t.is_symlink() {
        FileType::Symlink
    } else if is_whiteout(m) {
        FileType::Whiteout
    } else if t.is_char_device() {
        FileType::CharDevice
    } else if t.is_block_device() {
        FileType::BlockDevice
    } else if t.is_fifo() {
        FileType::Fifo
    } else if t.is_socket() {
        FileType::Socket
    } else {
        FileType::Unknown
    }
}

fn compare(path: &Path, meta: &Metadata, lower: &Lower) -> io::Result<Net> {
    let ft = file_type(meta);
    let (lower_path, lower_meta) = match lower {
        Lower::Present(p, m) => (p, m),
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
    if ft == FileType::Dir && is_opaque(path) {
        return Ok(Some((NetKind::Replaced, ft)));
    }
    if ft != file_type(lower_meta) {
        return Ok(Some((NetKind::Replaced, ft)));
    }
    let content_differs = match ft {
        FileType::Dir => false,
        FileType::File => {
            meta.len() != lower_meta.len() || !same_bytes(path, lower_path)?
        }
        FileType::Symlink => fs::read_link(path)? != fs::read_link(lower_path)?,
        _ => meta.rdev() != lower_meta.rdev(),
    };
    if content_differs {
        return Ok(Some((NetKind::Modified, ft)));
    }
    let owner_differs = meta.uid() != lower_meta.uid() || meta.gid() != lower_meta.gid();
    let meta_differs = match ft {
        FileType::Symlink => owner_differs,
        FileType::Dir => {
            owner_differs || meta.mode() != lower_meta.mode() || xattrs_differ(path, lower_path)?
        }
        _ => {
            owner_differs
                || meta.mode() != lower_meta.mode()
                || meta.mtime() != lower_meta.mtime()
                || meta.mtime_nsec() != lower_meta.mtime_nsec()
                || xattrs_differ(path, lower_path)?
        }
    };
    Ok(meta_differs.then_some((NetKind::Metadata, ft)))
}

fn same_bytes(a: &Path, b: &Path) -> io::Result<bool> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    let mut ba = vec![0u8; 64 * 1024];
    let mut bb = vec![0u8; 64 * 1024];
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

fn user_xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Option<Vec<u8>>)>> {
    let mut out = Vec::new();
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(out),
        Err(e) => return Err(e),
    };
    for name in names {
        let bytes = name.as_bytes();
        if bytes.starts_with(OVERLAY_XATTR_PREFIX) {
            continue;
        }
        out.push((bytes.to_vec(), xattr::get(path, &name)?));
    }
    out.sort();
    Ok(out)
}

fn xattrs_differ(a: &Path, b: &Path) -> io::Result<bool> {
    Ok(user_xattrs(a)? != user_xattrs(b)?)
}
