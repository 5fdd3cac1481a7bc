//! The ground truth of what changed, from a walk of the upper dir compared with the
//! lower layers. Independent of the tracker's code on purpose.

use super::ops::{get_xattr, list_xattrs};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use store::{FileType, NetKind};

/// Changed paths (relative to upper, as bytes) and their net kind and file type.
pub type Truth = BTreeMap<Vec<u8>, (NetKind, FileType)>;

/// Builds an expected [`Truth`] from `(path, kind, type)` triples.
pub fn expect<P: AsRef<[u8]>>(entries: impl IntoIterator<Item = (P, NetKind, FileType)>) -> Truth {
    entries
        .into_iter()
        .map(|(p, k, t)| (p.as_ref().to_vec(), (k, t)))
        .collect()
}

/// What changed in `upper` relative to `lowers` (top-most first), computed only by
/// walking `upper` and comparing each entry with the lower layers:
///
/// - lower(P) is absent when a proper ancestor of P in upper is an opaque dir (or a
///   whiteout or a non-dir); otherwise it is the entry of the top-most lower layer
///   that has P, where a whiteout means absent, and where a whiteout or a non-dir at a
///   proper ancestor of P in a layer hides P in that layer and all below, and an
///   opaque dir at a proper ancestor hides P in the layers below it.
/// - whiteout (0/0 char device): `(Removed, Whiteout)` if lower(P) exists, else no
///   change; not descended.
/// - dir with `trusted.overlay.opaque` = `y`: `(Replaced, Dir)` over a lower entry,
///   else `(Added, Dir)`; what is below it is compared as if lower were absent.
/// - lower(P) absent: `Added`; another type than lower(P): `Replaced`.
/// - dir over dir: `Metadata` if mode, uid, gid or xattrs (but `trusted.overlay.*`)
///   differ, else no change (a dir copied up as the parent of a change).
/// - regular file: `Modified` if size or bytes differ, else `Metadata` if mode, uid,
///   gid, mtime (s and ns) or xattrs differ, else no change.
/// - symlink: `Modified` if the target differs, else `Metadata` if uid/gid differ.
/// - fifo, socket, device: `Modified` if rdev differs, else `Metadata` as for files.
///
/// The upper dir must not change during the walk (an entry vanishing panics).
pub fn truth(upper: &Path, lowers: &[PathBuf]) -> Truth {
    let mut out = Truth::new();
    let mut rel = Vec::new();
    walk(upper, lowers, &mut rel, true, &mut out);
    out
}

fn join(base: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        base.to_path_buf()
    } else {
        base.join(OsStr::from_bytes(rel))
    }
}

/// Calls `visit(rel, path)` for each entry of the dir `rel` below `root` (`rel`
/// empty: `root` itself), in byte order of names, with `rel` extended by the entry's
/// name (the caller may go on into it) and `path` the entry's; `rel` is as it was
/// afterwards. Fails, calling nothing, when the dir cannot be read.
pub fn for_each_child(
    root: &Path,
    rel: &mut Vec<u8>,
    mut visit: impl FnMut(&mut Vec<u8>, &Path),
) -> io::Result<()> {
    let mut names: Vec<Vec<u8>> = fs::read_dir(join(root, rel))?
        .map(|e| e.map(|e| e.file_name().as_bytes().to_vec()))
        .collect::<io::Result<_>>()?;
    names.sort();
    for name in names {
        let len = rel.len();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(&name);
        let path = join(root, rel);
        visit(rel, &path);
        rel.truncate(len);
    }
    Ok(())
}

/// `lstat` of `p`; `None` when there is nothing there (also when a proper ancestor
/// is no dir).
pub fn lstat_opt(p: &Path) -> Option<Metadata> {
    match fs::symlink_metadata(p) {
        Ok(m) => Some(m),
        Err(e)
            if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) =>
        {
            None
        }
        Err(e) => panic!("lstat {}: {e}", p.display()),
    }
}

/// An overlayfs whiteout: a 0/0 char device.
pub fn is_whiteout(m: &Metadata) -> bool {
    m.file_type().is_char_device() && m.rdev() == 0
}

/// A dir marked opaque (`trusted.overlay.opaque` = `y`).
pub fn is_opaque(p: &Path) -> bool {
    get_xattr(p, "trusted.overlay.opaque")
        .unwrap_or_else(|e| panic!("getxattr trusted.overlay.opaque {}: {e}", p.display()))
        .is_some_and(|v| v == b"y")
}

fn file_type(m: &Metadata) -> FileType {
    let t = m.file_type();
    if t.is_file() {
        FileType::File
    } else if t.is_dir() {
        FileType::Dir
    } else if t.is_symlink() {
        FileType::Symlink
    } else if t.is_fifo() {
        FileType::Fifo
    } else if t.is_socket() {
        FileType::Socket
    } else if t.is_char_device() {
        if m.rdev() == 0 {
            FileType::Whiteout
        } else {
            FileType::CharDevice
        }
    } else if t.is_block_device() {
        FileType::BlockDevice
    } else {
        FileType::Unknown
    }
}

/// The entry the lower layers (top-most first) show at `rel` (absent: `None`): the
/// top-most layer's that has it, unless a whiteout there, or a whiteout or non-dir at a
/// proper ancestor in a layer, hides it, or an opaque dir at a proper ancestor hides it
/// in the layers below (see [`truth`]).
pub fn lower_entry(lowers: &[PathBuf], rel: &[u8]) -> Option<(PathBuf, Metadata)> {
    let comps: Vec<&[u8]> = rel.split(|b| *b == b'/').collect();
    let (last, ancestors) = comps.split_last().expect("non-empty path");
    'layers: for layer in lowers {
        let mut hides_below = false;
        let mut p = layer.clone();
        for comp in ancestors {
            p.push(OsStr::from_bytes(comp));
            match lstat_opt(&p) {
                None => continue 'layers,
                Some(m) if !m.is_dir() => return None,
                Some(_) => hides_below |= is_opaque(&p),
            }
        }
        p.push(OsStr::from_bytes(last));
        match lstat_opt(&p) {
            Some(m) if is_whiteout(&m) => return None,
            Some(m) => return Some((p, m)),
            None if hides_below => return None,
            None => {}
        }
    }
    None
}

fn xattrs(p: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let names = list_xattrs(p).unwrap_or_else(|e| panic!("listxattr {}: {e}", p.display()));
    names
        .into_iter()
        .filter(|n| !n.starts_with(b"trusted.overlay."))
        .filter_map(|n| {
            let name = String::from_utf8(n.clone()).expect("xattr name is UTF-8");
            let v = get_xattr(p, &name)
                .unwrap_or_else(|e| panic!("getxattr {name} {}: {e}", p.display()));
            v.map(|v| (n, v))
        })
        .collect()
}

fn owner_mode_differ(a: &Metadata, b: &Metadata) -> bool {
    a.mode() & 0o7777 != b.mode() & 0o7777 || a.uid() != b.uid() || a.gid() != b.gid()
}

fn mtime_differs(a: &Metadata, b: &Metadata) -> bool {
    a.mtime() != b.mtime() || a.mtime_nsec() != b.mtime_nsec()
}

fn same_bytes(a: &Path, b: &Path) -> bool {
    let open = |p: &Path| File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a), open(b));
    let (mut ba, mut bb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let na = read_full(&mut fa, &mut ba, a);
        let nb = read_full(&mut fb, &mut bb, b);
        if na != nb || ba[..na] != bb[..nb] {
            return false;
        }
        if na == 0 {
            return true;
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8], p: &Path) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read {}: {e}", p.display()),
        }
    }
    n
}

fn classify(
    up_path: &Path,
    up: &Metadata,
    opaque: bool,
    lower: Option<&(PathBuf, Metadata)>,
) -> Option<(NetKind, FileType)> {
    let ft = file_type(up);
    if ft == FileType::Whiteout {
        return lower.map(|_| (NetKind::Removed, FileType::Whiteout));
    }
    let Some((lo_path, lo)) = lower else {
        return Some((NetKind::Added, ft));
    };
    if opaque {
        return Some((NetKind::Replaced, FileType::Dir));
    }
    if file_type(lo) != ft {
        return Some((NetKind::Replaced, ft));
    }
    let xattrs_differ = || xattrs(up_path) != xattrs(lo_path);
    let kind = match ft {
        FileType::Dir => {
            (owner_mode_differ(up, lo) || xattrs_differ()).then_some(NetKind::Metadata)
        }
        FileType::File => {
            if up.size() != lo.size() || !same_bytes(up_path, lo_path) {
                Some(NetKind::Modified)
            } else {
                (owner_mode_differ(up, lo) || mtime_differs(up, lo) || xattrs_differ())
                    .then_some(NetKind::Metadata)
            }
        }
        FileType::Symlink => {
            let target = |p: &Path| {
                fs::read_link(p).unwrap_or_else(|e| panic!("readlink {}: {e}", p.display()))
            };
            if target(up_path) != target(lo_path) {
                Some(NetKind::Modified)
            } else {
                (up.uid() != lo.uid() || up.gid() != lo.gid()).then_some(NetKind::Metadata)
            }
        }
        _ => {
            if up.rdev() != lo.rdev() {
                Some(NetKind::Modified)
            } else {
                (owner_mode_differ(up, lo) || mtime_differs(up, lo) || xattrs_differ())
                    .then_some(NetKind::Metadata)
            }
        }
    };
    kind.map(|k| (k, ft))
}

fn walk(upper: &Path, lowers: &[PathBuf], rel: &mut Vec<u8>, lower_visible: bool, out: &mut Truth) {
    for_each_child(upper, rel, |rel, path| {
        let meta = fs::symlink_metadata(path).unwrap_or_else(|e| {
            panic!(
                "lstat {} (upper changed during the walk?): {e}",
                path.display()
            )
        });
        let lower = if lower_visible {
            lower_entry(lowers, rel)
        } else {
            None
        };
        let opaque = meta.is_dir() && is_opaque(path);
        if let Some(change) = classify(path, &meta, opaque, lower.as_ref()) {
            out.insert(rel.clone(), change);
        }
        if meta.is_dir() {
            let below_visible = !opaque && lower.as_ref().is_some_and(|(_, m)| m.is_dir());
            walk(upper, lowers, rel, below_visible, out);
        }
    })
    .unwrap_or_else(|e| panic!("read_dir {}: {e}", join(upper, rel).display()));
}

/// A listing of every entry below `root` (for failure messages and notes): path, type,
/// mode, uid:gid, size or rdev or target, and all xattrs (`trusted.overlay.*` too).
pub fn describe_tree(root: &Path) -> String {
    fn go(root: &Path, rel: &mut Vec<u8>, out: &mut String) {
        let listed = for_each_child(root, rel, |rel, p| {
            if let Some(m) = lstat_opt(p) {
                let extra = match file_type(&m) {
                    FileType::File => format!("size={}", m.size()),
                    FileType::Symlink => format!(
                        "-> {}",
                        fs::read_link(p)
                            .map(|t| t.display().to_string())
                            .unwrap_or_default()
                    ),
                    FileType::Dir => String::new(),
                    _ => format!("rdev={}:{}", libc::major(m.rdev()), libc::minor(m.rdev())),
                };
                let xa: Vec<String> = list_xattrs(p)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|n| {
                        let name = String::from_utf8_lossy(&n).into_owned();
                        let v = get_xattr(p, &name).ok().flatten().unwrap_or_default();
                        format!("{name}={:?}", String::from_utf8_lossy(&v))
                    })
                    .collect();
                out.push_str(&format!(
                    "  {} {:?} {:o} {}:{} nlink={} mtime={}.{:09} {extra} {}\n",
                    String::from_utf8_lossy(rel),
                    file_type(&m),
                    m.mode() & 0o7777,
                    m.uid(),
                    m.gid(),
                    m.nlink(),
                    m.mtime(),
                    m.mtime_nsec(),
                    xa.join(" ")
                ));
                if m.is_dir() {
                    go(root, rel, out);
                }
            }
        });
        if let Err(e) = listed {
            let dir = join(root, rel);
            out.push_str(&format!("  <read_dir {}: {e}>\n", dir.display()));
        }
    }
    let mut out = String::new();
    go(root, &mut Vec::new(), &mut out);
    out
}
