//! The syscall boundary: fanotify groups, file handles and `/proc` lookups.
//!
//! Every `unsafe` block of the tracker lives here, each with the reason it is sound.

use crate::fid::{Handle, HandleRef, MAX_HANDLE_BYTES};
use fanotify::low_level as fan;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Events the tracker listens to: everything that can change an entry of the upper
/// dir. Content reads and opens are left out: they change nothing.
pub const WATCH_MASK: u64 = fan::FAN_CREATE
    | fan::FAN_DELETE
    | libc::FAN_RENAME
    | fan::FAN_MODIFY
    | fan::FAN_CLOSE_WRITE
    | fan::FAN_ATTRIB
    | fan::FAN_ONDIR;

pub const FAN_Q_OVERFLOW: u64 = fan::FAN_Q_OVERFLOW;
pub const FAN_ONDIR: u64 = fan::FAN_ONDIR;
pub const FAN_CREATE: u64 = fan::FAN_CREATE;
pub const FAN_DELETE: u64 = fan::FAN_DELETE;
pub const FAN_RENAME: u64 = libc::FAN_RENAME;
pub const FAN_MODIFY: u64 = fan::FAN_MODIFY;
pub const FAN_CLOSE_WRITE: u64 = fan::FAN_CLOSE_WRITE;
pub const FAN_ATTRIB: u64 = fan::FAN_ATTRIB;

/// A fanotify notification group in FID mode: events name directories by file handle
/// and entries by name, and hold no open file descriptors.
pub struct FanotifyGroup {
    fd: OwnedFd,
}

impl FanotifyGroup {
    /// `FAN_REPORT_DFID_NAME_TARGET` needs Linux 5.17 (FAN_RENAME and target FIDs).
    pub fn new() -> io::Result<Self> {
        let flags = fan::FAN_CLASS_NOTIF
            | fan::FAN_CLOEXEC
            | fan::FAN_NONBLOCK
            | libc::FAN_REPORT_DFID_NAME_TARGET;
        let raw = fan::fanotify_init(flags, (libc::O_RDONLY | libc::O_LARGEFILE) as u32)?;
        // SAFETY: fanotify_init returned a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Self { fd })
    }

    /// Marks the whole filesystem holding `path`, so the mark outlives every overlay
    /// mount that uses it.
    pub fn mark_filesystem(&self, path: &Path, mask: u64) -> io::Result<()> {
        fan::fanotify_mark(
            self.fd.as_raw_fd(),
            fan::FAN_MARK_ADD | fan::FAN_MARK_FILESYSTEM,
            mask,
            fan::AT_FDCWD,
            path,
        )
    }

    /// Reads as many queued events as fit; `Ok(0)` when none are queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match nix::unistd::read(self.fd.as_fd(), buf) {
            Ok(n) => Ok(n),
            Err(nix::errno::Errno::EAGAIN) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until events are queued or `timeout` passes; true when readable.
    pub fn wait(&self, timeout: std::time::Duration) -> io::Result<bool> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(n) => Ok(n > 0),
            Err(nix::errno::Errno::EINTR) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// `FAN_REPORT_MNT` (Linux 6.15, include/uapi/linux/fanotify.h): the group reports
/// mounts attached to and detached from a mount namespace.
const FAN_REPORT_MNT: u32 = 0x0000_4000;
/// `FAN_MARK_MNTNS`: the mark's object is a mount namespace, given by an nsfs fd.
const FAN_MARK_MNTNS: u32 = 0x0000_0110;
/// A mount was attached to / detached from the marked namespace.
const FAN_MNT_ATTACH: u64 = 0x0100_0000;
const FAN_MNT_DETACH: u64 = 0x0200_0000;

/// A fanotify group that reports mounts attached to or detached from one mount
/// namespace (Linux 6.15+). The kernel refuses `FAN_REPORT_MNT` together with FID
/// reporting, so it is a group of its own beside the `FanotifyGroup`.
pub struct MountGroup {
    fd: OwnedFd,
}

impl MountGroup {
    /// Watches the mount namespace `ns` (an open `/proc/<pid>/ns/mnt`). Fails with
    /// EINVAL on kernels before 6.15.
    pub fn new(ns: BorrowedFd<'_>) -> io::Result<Self> {
        let flags = fan::FAN_CLASS_NOTIF | fan::FAN_CLOEXEC | fan::FAN_NONBLOCK | FAN_REPORT_MNT;
        let raw = fan::fanotify_init(flags, libc::O_RDONLY as u32)?;
        // SAFETY: fanotify_init returned a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: both descriptors are open for the duration of the call, and a null
        // path makes the kernel use `ns` itself as the mark's object.
        let rc = unsafe {
            libc::fanotify_mark(
                fd.as_raw_fd(),
                fan::FAN_MARK_ADD | FAN_MARK_MNTNS,
                FAN_MNT_ATTACH | FAN_MNT_DETACH,
                ns.as_raw_fd(),
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Reads and discards every queued mount event; true when there was any (or the
    /// queue overflowed): the namespace's mounts may have changed since the last call.
    pub fn drain(&self) -> io::Result<bool> {
        let mut buf = [0u8; 4096];
        let mut any = false;
        loop {
            match nix::unistd::read(self.fd.as_fd(), &mut buf) {
                Ok(0) => return Ok(any),
                Ok(_) => any = true,
                Err(nix::errno::Errno::EAGAIN) => return Ok(any),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The file handle of `path` (not following a final symlink), as fanotify reports it.
pub fn handle_of(path: &Path) -> io::Result<Handle> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut buf = HandleBuf::new();
    buf.set_capacity(MAX_HANDLE_BYTES);
    let mut mount_id: libc::c_int = 0;
    // SAFETY: c_path is NUL-terminated; buf is an aligned file_handle with room for
    // MAX_HANDLE_BYTES payload bytes, as handle_bytes tells the kernel; mount_id is a
    // valid out pointer.
    let rc = unsafe {
        libc::name_to_handle_at(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            buf.as_mut_ptr(),
            &mut mount_id,
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(buf.to_handle())
}

/// Opens the object behind a handle as an `O_PATH` descriptor. `mount_fd` is any
/// descriptor on the same filesystem; the result is reached through its mount.
pub fn open_by_handle(mount_fd: BorrowedFd<'_>, handle: HandleRef<'_>) -> io::Result<OwnedFd> {
    if handle.bytes.len() > MAX_HANDLE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "handle too large",
        ));
    }
    let mut buf = HandleBuf::new();
    buf.fill(handle);
    // SAFETY: buf is an aligned file_handle whose handle_bytes equals the payload
    // length written after it; the kernel only reads it. The returned descriptor, if
    // any, is new and owned by no one else.
    let raw = unsafe {
        libc::open_by_handle_at(
            mount_fd.as_raw_fd(),
            buf.as_mut_ptr(),
            libc::O_PATH | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh descriptor returned by open_by_handle_at.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// The path of an open descriptor as the kernel spells it for this thread's root, or
/// `None` when the object has no name any more (unlinked).
pub fn path_of(fd: BorrowedFd<'_>) -> io::Result<Option<PathBuf>> {
    let st = nix::sys::stat::fstat(fd)?;
    if st.st_nlink == 0 {
        return Ok(None);
    }
    std::fs::read_link(format!("/proc/thread-self/fd/{}", fd.as_raw_fd())).map(Some)
}

/// `struct file_handle` with room for the largest payload, aligned for the kernel.
#[repr(C, align(8))]
struct HandleBuf {
    handle_bytes: u32,
    handle_type: i32,
    payload: [u8; MAX_HANDLE_BYTES],
}

impl HandleBuf {
    fn new() -> Self {
        Self {
            handle_bytes: 0,
            handle_type: 0,
            payload: [0; MAX_HANDLE_BYTES],
        }
    }

    fn set_capacity(&mut self, n: usize) {
        self.handle_bytes = n.min(MAX_HANDLE_BYTES) as u32;
    }

    fn fill(&mut self, handle: HandleRef<'_>) {
        let n = handle.bytes.len().min(MAX_HANDLE_BYTES);
        self.handle_bytes = n as u32;
        self.handle_type = handle.handle_type;
        self.payload[..n].copy_from_slice(&handle.bytes[..n]);
    }

    fn to_handle(&self) -> Handle {
        let n = (self.handle_bytes as usize).min(MAX_HANDLE_BYTES);
        Handle {
            handle_type: self.handle_type,
            bytes: self.payload[..n].to_vec(),
        }
    }

    fn as_mut_ptr(&mut self) -> *mut libc::file_handle {
        (self as *mut Self).cast()
    }
}

/// Forks this process, which must have a single thread; `Ok(None)` in the child.
pub fn fork_single_threaded() -> io::Result<Option<u32>> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .map(str::trim);
    if threads != Some("1") {
        return Err(io::Error::other(format!(
            "cannot fork a process with {} threads",
            threads.unwrap_or("an unknown number of")
        )));
    }
    // SAFETY: the process has exactly one thread (checked above), so the child cannot
    // inherit a lock or allocator state held by another thread.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(Some(child.as_raw() as u32)),
        nix::unistd::ForkResult::Child => Ok(None),
    }
}

/// Waits up to `timeout` for one of `set` (blocked in every thread, so that none is
/// delivered to a handler) to be pending and takes it (sigtimedwait(2)): its number,
/// and whether a process sent it (`kill`, `sigqueue`: `si_code` <= 0) rather than the
/// kernel (a terminal's Ctrl-C or hangup, `si_code` SI_KERNEL).
pub fn take_signal(
    set: &nix::sys::signal::SigSet,
    timeout: std::time::Duration,
) -> io::Result<Option<(i32, bool)>> {
    let wait = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    let mut info = std::mem::MaybeUninit::<libc::siginfo_t>::zeroed();
    // SAFETY: `set` is a valid sigset, `info` a writable siginfo_t and `wait` a valid
    // timespec, all living across the call.
    let n = unsafe { libc::sigtimedwait(set.as_ref(), info.as_mut_ptr(), &wait) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: sigtimedwait returned a signal, so it filled `info`.
    let info = unsafe { info.assume_init() };
    Ok(Some((n, info.si_code <= 0)))
}

/// Moves the calling thread into a mount namespace of its own in which every mount is
/// private: what it mounts is seen nowhere else and goes away with it. (For a
/// thread, `unshare(CLONE_NEWNS)` also unshares its filesystem context.)
pub fn enter_private_mount_ns() -> io::Result<()> {
    use nix::mount::{MsFlags, mount};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )?;
    Ok(())
}

/// Every process id in /proc.
pub fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|it| {
            it.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The inode of a process's mount namespace: what tells namespaces apart.
pub fn mount_ns_of(pid: u32) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(format!("/proc/{pid}/ns/mnt"))?.ino())
}

/// The inode of the calling thread's mount namespace.
pub fn own_mount_ns() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/mnt")
        .ok()
        .map(|m| m.ino())
}

/// Moves this (single-threaded) process into the mount namespace of `pid` and to `/`
/// there, so it holds no dir of the namespace it left. With `expect`, refuses when
/// that namespace is not the one expected (the pid was reused).
pub fn join_mount_ns(pid: u32, expect: Option<u64>) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/mnt"))?;
    if let Some(expected) = expect
        && ns.metadata()?.ino() != expected
    {
        return Err(io::Error::other(format!(
            "pid {pid} is no longer in that mount namespace"
        )));
    }
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNS)?;
    std::env::set_current_dir("/")
}

/// The command line of a process, NULs turned into spaces, or empty when it is gone.
pub fn command_of(pid: u32) -> Vec<u8> {
    let mut cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    cmd.truncate(4096);
    while cmd.last() == Some(&0) {
        cmd.pop();
    }
    for b in &mut cmd {
        if *b == 0 {
            *b = b' ';
        }
    }
    cmd
}

/// `CN_IDX_PROC` / `CN_VAL_PROC` (linux/connector.h): the process events connector.
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
/// `PROC_CN_MCAST_LISTEN` (linux/cn_proc.h).
const PROC_CN_MCAST_LISTEN: u32 = 1;
/// `sizeof(struct nlmsghdr)` and `sizeof(struct cn_msg)`.
pub const NLMSG_HDR_LEN: usize = 16;
pub const CN_MSG_LEN: usize = 20;

/// A subscription to the kernel's process events connector (netlink
/// `NETLINK_CONNECTOR`, group `CN_IDX_PROC`): a message for every fork, exec and exit
/// on the host, as they happen (Documentation/driver-api/connector.rst). Needs
/// CAP_NET_ADMIN in the initial user namespace.
pub struct ProcConnector {
    fd: OwnedFd,
}

impl ProcConnector {
    /// Subscribes. Errors: EPERM without the capability, EPROTONOSUPPORT on a kernel
    /// built without `CONFIG_PROC_EVENTS`.
    pub fn open() -> io::Result<ProcConnector> {
        use nix::sys::socket::{NetlinkAddr, bind, send, setsockopt, sockopt};
        // SAFETY: socket(2) takes no pointers; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_CONNECTOR,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: socket returned a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Bursts of forks (a parallel build) must not overflow it: ENOBUFS loses
        // messages. Root may go past rmem_max.
        let want = 8 * 1024 * 1024;
        if setsockopt(&fd, sockopt::RcvBufForce, &want).is_err() {
            let _ = setsockopt(&fd, sockopt::RcvBuf, &want);
        }
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, CN_IDX_PROC))?;
        let mut msg = Vec::with_capacity(NLMSG_HDR_LEN + CN_MSG_LEN + 4);
        let len = (NLMSG_HDR_LEN + CN_MSG_LEN + 4) as u32;
        msg.extend_from_slice(&len.to_ne_bytes());
        msg.extend_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&std::process::id().to_ne_bytes());
        msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // ack
        msg.extend_from_slice(&4u16.to_ne_bytes()); // len
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
        send(fd.as_raw_fd(), &msg, nix::sys::socket::MsgFlags::empty())?;
        Ok(ProcConnector { fd })
    }

    /// Waits up to `timeout` for a message to read.
    pub fn wait(&self, timeout: std::time::Duration) -> io::Result<bool> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => Ok(false),
            Ok(_) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits up to `timeout` for messages and reads one datagram into `buf`: `Ok(0)`
    /// when none came. `ENOBUFS` means messages were lost.
    pub fn recv(&self, buf: &mut [u8], timeout: std::time::Duration) -> io::Result<usize> {
        if !self.wait(timeout)? {
            return Ok(0);
        }
        self.recv_now(buf)
    }

    /// Reads one queued datagram into `buf` without waiting: `Ok(0)` when none is
    /// queued. `ENOBUFS` means messages were lost.
    pub fn recv_now(&self, buf: &mut [u8]) -> io::Result<usize> {
        match nix::sys::socket::recv(
            self.fd.as_raw_fd(),
            buf,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(n) => Ok(n),
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_round_trip_resolves_to_the_same_path() {
        if !crate::test_support::need_root() {
            return;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let sub = dir.path().join("sub\ndir");
        std::fs::create_dir(&sub).expect("mkdir");
        let handle = match handle_of(&sub) {
            Ok(h) => h,
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                eprintln!(
                    "skipped: filesystem of {} has no file handles",
                    sub.display()
                );
                return;
            }
            Err(e) => panic!("name_to_handle_at: {e}"),
        };
        let root = std::fs::File::open(dir.path()).expect("open temp dir");
        let fd = open_by_handle(root.as_fd(), handle.as_ref()).expect("open_by_handle_at");
        let path = path_of(fd.as_fd())
            .expect("readlink")
            .expect("still linked");
        assert_eq!(path, sub.canonicalize().expect("canonical"));
        std::fs::remove_dir(&sub).expect("rmdir");
        // A removed dir has no path any more, whether the handle goes stale or not.
        match open_by_handle(root.as_fd(), handle.as_ref()) {
            Ok(fd) => assert_eq!(path_of(fd.as_fd()).expect("fstat"), None),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ESTALE)),
        }
    }

    #[test]
    fn command_of_self_is_this_test_binary() {
        let me = command_of(std::process::id());
        assert!(!me.is_empty());
        assert!(!me.contains(&0));
        assert!(command_of(u32::MAX).is_empty());
    }
}
