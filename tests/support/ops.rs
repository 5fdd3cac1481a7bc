//! File operations that have no (installed) shell command, as plain syscalls, and
//! mount-table helpers.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub(crate) fn cpath(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL")
}

fn cname(name: &str) -> CString {
    CString::new(name).expect("xattr name without NUL")
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `lsetxattr(path, name, value, 0)` (does not follow a final symlink).
pub fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let (p, n) = (cpath(path), cname(name));
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    check(unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
}

/// `lremovexattr(path, name)`.
pub fn remove_xattr(path: &Path, name: &str) -> io::Result<()> {
    let (p, n) = (cpath(path), cname(name));
    // SAFETY: valid NUL-terminated strings.
    check(unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) })
}

/// `lgetxattr(path, name)`: `Ok(None)` when the attribute is not set.
pub fn get_xattr(path: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    let (p, n) = (cpath(path), cname(name));
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: buf is valid for buf.len() bytes.
        let r =
            unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r >= 0 {
            buf.truncate(r as usize);
            return Ok(Some(buf));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENODATA) => return Ok(None),
            Some(libc::ERANGE) => buf.resize(buf.len() * 4, 0),
            _ => return Err(e),
        }
    }
}

/// `llistxattr(path)`: every attribute name the caller may see (an unsupported
/// filesystem gives an empty list).
pub fn list_xattrs(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    let p = cpath(path);
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: buf is valid for buf.len() bytes.
        let r = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r >= 0 {
            buf.truncate(r as usize);
            return Ok(buf
                .split(|b| *b == 0)
                .filter(|n| !n.is_empty())
                .map(<[u8]>::to_vec)
                .collect());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) => buf.resize(buf.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            _ => return Err(e),
        }
    }
}

/// Overwrites `data` at `offset` of an existing file through a shared writable
/// mapping (`mmap`, `memcpy`, `msync`, `munmap`): no `write(2)` is made. The file must
/// already be at least `offset + data.len()` bytes long (a mapping cannot grow it).
pub fn mmap_write(path: &Path, offset: usize, data: &[u8]) -> io::Result<()> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let len = file.metadata()?.len() as usize;
    if data.is_empty() {
        return Ok(());
    }
    if offset + data.len() > len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "mmap_write past the end of {} ({len} bytes)",
                path.display()
            ),
        ));
    }
    // SAFETY: a fresh shared mapping of `len` bytes of an open file; we write only
    // inside it and unmap it before returning.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        std::ptr::copy_nonoverlapping(data.as_ptr(), addr.cast::<u8>().add(offset), data.len());
        let synced = check(libc::msync(addr, len, libc::MS_SYNC));
        let unmapped = check(libc::munmap(addr, len));
        synced.and(unmapped)
    }
}

/// Creates an overlayfs whiteout (a 0/0 char device) at `path`: for writing lower
/// layers, or an upper dir while no overlay uses it.
pub fn make_whiteout(path: &Path) -> io::Result<()> {
    let p = cpath(path);
    // SAFETY: valid NUL-terminated path.
    check(unsafe { libc::mknod(p.as_ptr(), libc::S_IFCHR, libc::makedev(0, 0)) })
}

/// `mknod(path, S_IFCHR|S_IFBLK|S_IFIFO.. | perm, makedev(major, minor))`.
pub fn make_node(
    path: &Path,
    kind_and_mode: libc::mode_t,
    major: u32,
    minor: u32,
) -> io::Result<()> {
    let p = cpath(path);
    // SAFETY: valid NUL-terminated path.
    check(unsafe { libc::mknod(p.as_ptr(), kind_and_mode, libc::makedev(major, minor)) })
}

/// Sets atime and mtime (seconds, nanoseconds) without following a final symlink.
pub fn set_times(path: &Path, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
    let p = cpath(path);
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    // SAFETY: valid path and an array of two timespecs.
    check(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            p.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

/// The mount table of the calling thread's mount namespace
/// (`/proc/thread-self/mountinfo`; `/proc/self` would be the main thread's).
pub fn thread_mountinfo() -> String {
    std::fs::read_to_string("/proc/thread-self/mountinfo")
        .expect("read /proc/thread-self/mountinfo")
}

/// The mount points listed in a mountinfo text (octal escapes undone).
pub fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    tracker::mountinfo::parse(mountinfo.as_bytes())
        .into_iter()
        .map(|e| e.mount_point)
        .collect()
}

/// The mount options and filesystem type of the mount at `point` in a mountinfo text
/// (the last one when several are stacked): `(fstype, mount options, super options)`.
pub fn mount_entry(mountinfo: &str, point: &Path) -> Option<(String, String, String)> {
    let entries = tracker::mountinfo::parse(mountinfo.as_bytes());
    let e = tracker::mountinfo::find_mount(&entries, point)?;
    let super_options: Vec<String> = e
        .super_options
        .iter()
        .map(|(k, v)| match v {
            Some(v) => format!("{k}={}", String::from_utf8_lossy(v)),
            None => k.clone(),
        })
        .collect();
    Some((
        e.fs_type.clone(),
        e.mount_options.join(","),
        super_options.join(","),
    ))
}

/// The 64-bit unique id (never reused) of the mount `path` is on, from
/// `statx(STATX_MNT_ID_UNIQUE)`; tells a new mount from an old one where the
/// anonymous st_dev of an overlay and the short mount id may be reused.
pub fn mount_unique_id(path: &Path) -> io::Result<u64> {
    let p = cpath(path);
    // SAFETY: statx fills the zeroed struct; all-zero is a valid `statx`.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    check(unsafe {
        libc::statx(
            libc::AT_FDCWD,
            p.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_MNT_ID_UNIQUE,
            &mut stx,
        )
    })?;
    if stx.stx_mask & libc::STATX_MNT_ID_UNIQUE == 0 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "no STATX_MNT_ID_UNIQUE",
        ));
    }
    Ok(stx.stx_mnt_id)
}
