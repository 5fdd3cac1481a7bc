//! Turns the directory handles fanotify reports into paths relative to the upper dir.
//!
//! A handle is opened with `open_by_handle_at` and its path read back through
//! `/proc/thread-self/fd`; that path is compared with the upper dir's own path read the
//! same way, so the answer does not depend on which mount namespace the tracker runs
//! in. Results are cached per handle; a dir rename or removal clears the cache, since
//! it changes the path of everything below.

use crate::fid::{Handle, HandleRef};
use crate::sys;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use store::FileType;

/// Where a directory lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// In the upper dir, at this relative path (empty: the upper dir itself).
    Upper(Vec<u8>),
    /// The tracker's own sync dir.
    Sync,
    /// Anywhere else on the filesystem (overlayfs' work dir, unrelated dirs).
    Outside,
}

/// Past this many cached dirs the cache starts over, bounding memory.
const CACHE_LIMIT: usize = 256 * 1024;

pub struct Resolver {
    mount_fd: OwnedFd,
    upper: Vec<u8>,
    sync: Vec<u8>,
    cache: HashMap<Handle, Place>,
}

impl Resolver {
    pub fn new(upper: &Path, sync_dir: &Path) -> io::Result<Self> {
        let mount_fd: OwnedFd = std::fs::File::open(upper)?.into();
        let upper_path = sys::path_of(mount_fd.as_fd())?.ok_or_else(|| gone(upper))?;
        let sync_fd: OwnedFd = std::fs::File::open(sync_dir)?.into();
        let sync_path = sys::path_of(sync_fd.as_fd())?.ok_or_else(|| gone(sync_dir))?;
        Ok(Self {
            mount_fd,
            upper: upper_path.as_os_str().as_bytes().to_vec(),
            sync: sync_path.as_os_str().as_bytes().to_vec(),
            cache: HashMap::new(),
        })
    }

    /// Where the dir behind `handle` is; `None` when it no longer exists.
    pub fn dir(&mut self, handle: HandleRef<'_>) -> io::Result<Option<Place>> {
        let key = handle.to_owned();
        if let Some(place) = self.cache.get(&key) {
            return Ok(Some(place.clone()));
        }
        let place = self.lookup(handle)?;
        if let Some(place) = &place {
            self.remember(key, place.clone());
        }
        Ok(place)
    }

    /// Where any object (file or dir) is, without caching: a file can be renamed
    /// without an event that would invalidate the cache.
    pub fn object(&self, handle: HandleRef<'_>) -> io::Result<Option<Place>> {
        self.lookup(handle)
    }

    /// The type of the object behind `handle` (a whiteout is a 0/0 char device);
    /// `None` when it no longer exists.
    pub fn object_type(&self, handle: HandleRef<'_>) -> io::Result<Option<FileType>> {
        let fd = match sys::open_by_handle(self.mount_fd.as_fd(), handle) {
            Ok(fd) => fd,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ESTALE) | Some(libc::ENOENT)) => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        Ok(Some(crate::classify::file_type(&nix::sys::stat::fstat(
            fd.as_fd(),
        )?)))
    }

    fn lookup(&self, handle: HandleRef<'_>) -> io::Result<Option<Place>> {
        let fd = match sys::open_by_handle(self.mount_fd.as_fd(), handle) {
            Ok(fd) => fd,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ESTALE) | Some(libc::ENOENT)) => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        match sys::path_of(fd.as_fd()) {
            Ok(Some(path)) => Ok(Some(self.place_of(path.as_os_str().as_bytes()))),
            Ok(None) => Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ENAMETOOLONG) => self.climb(fd),
            Err(e) => Err(e),
        }
    }

    /// Finds a dir's path below the upper dir by walking `..` up to it and looking each
    /// name up in its parent: for paths longer than the kernel will spell out.
    fn climb(&self, fd: OwnedFd) -> io::Result<Option<Place>> {
        use nix::fcntl::{OFlag, openat};
        use nix::sys::stat::{Mode, fstat};
        let upper = fstat(self.mount_fd.as_fd())?;
        let mut names: Vec<Vec<u8>> = Vec::new();
        let mut current = fd;
        loop {
            let here = fstat(current.as_fd())?;
            if (here.st_dev, here.st_ino) == (upper.st_dev, upper.st_ino) {
                names.reverse();
                return Ok(Some(Place::Upper(names.join(&b'/'))));
            }
            let parent = openat(
                current.as_fd(),
                "..",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
            let above = fstat(parent.as_fd())?;
            if (above.st_dev, above.st_ino) == (here.st_dev, here.st_ino) {
                // Reached the filesystem root without meeting the upper dir.
                return Ok(Some(Place::Outside));
            }
            let mut dir = nix::dir::Dir::from_fd(parent.try_clone()?)?;
            let name = dir
                .iter()
                .filter_map(Result::ok)
                .find(|e| {
                    e.ino() == here.st_ino && !matches!(e.file_name().to_bytes(), b"." | b"..")
                })
                .map(|e| e.file_name().to_bytes().to_vec());
            let Some(name) = name else {
                return Ok(None);
            };
            names.push(name);
            current = parent;
        }
    }

    /// Records where a dir is, when an event already told us (a created dir).
    pub fn remember(&mut self, handle: Handle, place: Place) {
        if self.cache.len() >= CACHE_LIMIT {
            self.cache.clear();
        }
        self.cache.insert(handle, place);
    }

    /// Drops every cached path: a dir moved or went away.
    pub fn invalidate(&mut self) {
        self.cache.clear();
    }

    fn place_of(&self, path: &[u8]) -> Place {
        if let Some(rel) = strip_dir(path, &self.upper) {
            Place::Upper(rel.to_vec())
        } else if path == self.sync.as_slice() {
            Place::Sync
        } else {
            Place::Outside
        }
    }
}

/// `path` relative to `dir` when it is `dir` or below it.
fn strip_dir<'a>(path: &'a [u8], dir: &[u8]) -> Option<&'a [u8]> {
    let rest = path.strip_prefix(dir)?;
    if rest.is_empty() {
        Some(rest)
    } else {
        rest.strip_prefix(b"/")
    }
}

fn gone(p: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} was removed", p.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_dir_is_component_wise() {
        assert_eq!(strip_dir(b"/r/upper", b"/r/upper"), Some(&b""[..]));
        assert_eq!(strip_dir(b"/r/upper/a/b", b"/r/upper"), Some(&b"a/b"[..]));
        assert_eq!(strip_dir(b"/r/upper2/a", b"/r/upper"), None);
        assert_eq!(strip_dir(b"/r/work/x", b"/r/upper"), None);
    }
}
