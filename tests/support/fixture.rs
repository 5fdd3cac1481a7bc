//! An overlay mounted the way spfs mounts a runtime, on scratch tmpfs mounts.

use super::ops::{cpath, make_whiteout, set_times, set_xattr};
use super::rng::SplitMix;
use super::truth::{Truth, truth};
use nix::mount::{MntFlags, MsFlags, mount, umount, umount2};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, lchown, symlink};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    File {
        path: Vec<u8>,
        content: Vec<u8>,
        mode: u32,
    },
    Dir {
        path: Vec<u8>,
        mode: u32,
    },
    Symlink {
        path: Vec<u8>,
        target: Vec<u8>,
    },
    Fifo {
        path: Vec<u8>,
    },
    Whiteout {
        path: Vec<u8>,
    },
    Opaque {
        path: Vec<u8>,
    },
    Xattr {
        path: Vec<u8>,
        name: String,
        value: Vec<u8>,
    },
    Owner {
        path: Vec<u8>,
        uid: u32,
        gid: u32,
    },
    Mtime {
        path: Vec<u8>,
        sec: i64,
        nsec: i64,
    },
}

/// What the lower layers hold: a builder of one or more layers, top-most first.
///
/// The builder methods add to the last layer begun (the bottom-most so far);
/// [`LowerSpec::layer_below`] begins a new layer beneath the others. Paths are
/// relative byte strings (`"a/b"` or `b"a/\xff"`); missing parent dirs are created
/// with mode 0755. Entries are written in the order given, except that `mtime`s are
/// set last (so adding files to a dir does not undo a dir's mtime).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LowerSpec {
    layers: Vec<Vec<Entry>>,
}

impl Default for LowerSpec {
    fn default() -> Self {
        Self::new()
    }
}

fn bytes(p: impl AsRef<[u8]>) -> Vec<u8> {
    let p = p.as_ref();
    assert!(
        !p.is_empty() && p[0] != b'/' && !p.contains(&0),
        "spec path must be relative, non-empty, without NUL: {:?}",
        String::from_utf8_lossy(p)
    );
    p.to_vec()
}

impl LowerSpec {
    /// One empty layer.
    pub fn new() -> Self {
        Self {
            layers: vec![Vec::new()],
        }
    }

    /// One layer holding a deterministic tree of `n_files` regular files (0 to 4 KiB,
    /// modes 0644 or 0755) in nested dirs (about one dir per 20 files, depth up to 5),
    /// plus a relative symlink for about every 50th file. The same `(n_files, seed)`
    /// always gives the same tree. Names: dirs `dNNN`, files `fNNNNN.{txt,bin,sh}`,
    /// symlinks `lNNNNN`.
    pub fn generated(n_files: usize, seed: u64) -> Self {
        let mut rng = SplitMix(seed);
        let mut spec = Self::new();
        // (path, depth)
        let mut dirs: Vec<(Vec<u8>, usize)> = vec![(Vec::new(), 0)];
        let n_dirs = (n_files / 20).max(1);
        for i in 0..n_dirs {
            let (parent, depth) = loop {
                let d = &dirs[rng.below(dirs.len())];
                if d.1 < 5 {
                    break d.clone();
                }
            };
            let mut path = parent;
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend(format!("d{i:03}").bytes());
            spec = spec.dir(&path);
            dirs.push((path, depth + 1));
        }
        for i in 0..n_files {
            let dir = dirs[rng.below(dirs.len())].0.clone();
            let ext = ["txt", "bin", "sh"][rng.below(3)];
            let mut path = dir.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend(format!("f{i:05}.{ext}").bytes());
            let size = match rng.below(10) {
                0 => 0,
                1..=6 => rng.below(512),
                _ => rng.below(4096),
            };
            let fill = rng.next();
            let content: Vec<u8> = (0..size)
                .map(|k| (fill.rotate_left((k % 64) as u32) as u8) ^ (k as u8))
                .collect();
            let mode = if ext == "sh" { 0o755 } else { 0o644 };
            spec = spec.file(&path, content, mode);
            if i % 50 == 25 {
                let mut link = dir.clone();
                if !link.is_empty() {
                    link.push(b'/');
                }
                link.extend(format!("l{i:05}").bytes());
                spec = spec.symlink(link, format!("f{i:05}.{ext}"));
            }
        }
        spec
    }

    fn push(mut self, e: Entry) -> Self {
        self.layers.last_mut().expect("a layer").push(e);
        self
    }

    /// Begins a new layer beneath the layers so far; later builder calls add to it.
    pub fn layer_below(mut self) -> Self {
        self.layers.push(Vec::new());
        self
    }

    /// A regular file with `content` and permission bits `mode` (e.g. 0o644).
    pub fn file(self, path: impl AsRef<[u8]>, content: impl AsRef<[u8]>, mode: u32) -> Self {
        let e = Entry::File {
            path: bytes(path),
            content: content.as_ref().to_vec(),
            mode,
        };
        self.push(e)
    }

    /// A dir with mode 0755.
    pub fn dir(self, path: impl AsRef<[u8]>) -> Self {
        self.dir_mode(path, 0o755)
    }

    /// A dir with the given permission bits.
    pub fn dir_mode(self, path: impl AsRef<[u8]>, mode: u32) -> Self {
        self.push(Entry::Dir {
            path: bytes(path),
            mode,
        })
    }

    pub fn symlink(self, path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        let e = Entry::Symlink {
            path: bytes(path),
            target: target.as_ref().to_vec(),
        };
        self.push(e)
    }

    /// A fifo, mode 0644.
    pub fn fifo(self, path: impl AsRef<[u8]>) -> Self {
        self.push(Entry::Fifo { path: bytes(path) })
    }

    /// A whiteout in this layer: hides `path` of the layers below.
    pub fn whiteout(self, path: impl AsRef<[u8]>) -> Self {
        self.push(Entry::Whiteout { path: bytes(path) })
    }

    /// Makes the dir `path` of this layer opaque (creating it if needed): hides what
    /// the layers below hold under it.
    pub fn opaque(self, path: impl AsRef<[u8]>) -> Self {
        self.push(Entry::Opaque { path: bytes(path) })
    }

    /// Sets an extended attribute on an entry written before (not following symlinks).
    pub fn xattr(self, path: impl AsRef<[u8]>, name: &str, value: impl AsRef<[u8]>) -> Self {
        let e = Entry::Xattr {
            path: bytes(path),
            name: name.to_owned(),
            value: value.as_ref().to_vec(),
        };
        self.push(e)
    }

    /// Sets the owner of an entry written before (not following symlinks).
    pub fn owner(self, path: impl AsRef<[u8]>, uid: u32, gid: u32) -> Self {
        self.push(Entry::Owner {
            path: bytes(path),
            uid,
            gid,
        })
    }

    /// Sets the mtime (and atime) of an entry written before; applied after all
    /// other entries of the layer.
    pub fn mtime(self, path: impl AsRef<[u8]>, sec: i64, nsec: i64) -> Self {
        self.push(Entry::Mtime {
            path: bytes(path),
            sec,
            nsec,
        })
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// The paths of the regular files of all layers, sorted, without duplicates
    /// (ignores whiteouts: a file of a lower layer hidden by a higher one is listed).
    pub fn files(&self) -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = self
            .layers
            .iter()
            .flatten()
            .filter_map(|e| match e {
                Entry::File { path, .. } => Some(path.clone()),
                _ => None,
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The paths of the dirs of all layers (explicit and implied parents), sorted.
    pub fn dirs(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for e in self.layers.iter().flatten() {
            let (path, is_dir) = match e {
                Entry::File { path, .. }
                | Entry::Symlink { path, .. }
                | Entry::Fifo { path }
                | Entry::Whiteout { path } => (path, false),
                Entry::Dir { path, .. } | Entry::Opaque { path } => (path, true),
                _ => continue,
            };
            for (i, b) in path.iter().enumerate() {
                if *b == b'/' {
                    out.push(path[..i].to_vec());
                }
            }
            if is_dir {
                out.push(path.clone());
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Writes layer `i` (0 = top-most) into the existing dir `root`.
    pub fn write_layer(&self, i: usize, root: &Path) {
        let at = |p: &[u8]| root.join(OsStr::from_bytes(p));
        let parent = |p: &Path| {
            let dir = p.parent().expect("parent");
            fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir -p {}: {e}", dir.display()));
        };
        let mut mtimes = Vec::new();
        for e in &self.layers[i] {
            match e {
                Entry::File {
                    path,
                    content,
                    mode,
                } => {
                    let p = at(path);
                    parent(&p);
                    fs::write(&p, content).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
                    fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).expect("chmod");
                }
                Entry::Dir { path, mode } => {
                    let p = at(path);
                    fs::create_dir_all(&p)
                        .unwrap_or_else(|e| panic!("mkdir -p {}: {e}", p.display()));
                    fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).expect("chmod");
                }
                Entry::Symlink { path, target } => {
                    let p = at(path);
                    parent(&p);
                    symlink(OsStr::from_bytes(target), &p)
                        .unwrap_or_else(|e| panic!("symlink {}: {e}", p.display()));
                }
                Entry::Fifo { path } => {
                    let p = at(path);
                    parent(&p);
                    let c = cpath(&p);
                    // SAFETY: valid NUL-terminated path.
                    let r = unsafe { libc::mkfifo(c.as_ptr(), 0o644) };
                    assert_eq!(
                        r,
                        0,
                        "mkfifo {}: {}",
                        p.display(),
                        std::io::Error::last_os_error()
                    );
                }
                Entry::Whiteout { path } => {
                    let p = at(path);
                    parent(&p);
                    make_whiteout(&p).unwrap_or_else(|e| panic!("whiteout {}: {e}", p.display()));
                }
                Entry::Opaque { path } => {
                    let p = at(path);
                    fs::create_dir_all(&p)
                        .unwrap_or_else(|e| panic!("mkdir -p {}: {e}", p.display()));
                    set_xattr(&p, "trusted.overlay.opaque", b"y")
                        .unwrap_or_else(|e| panic!("opaque {}: {e}", p.display()));
                }
                Entry::Xattr { path, name, value } => {
                    let p = at(path);
                    set_xattr(&p, name, value)
                        .unwrap_or_else(|e| panic!("setxattr {name} {}: {e}", p.display()));
                }
                Entry::Owner { path, uid, gid } => {
                    let p = at(path);
                    lchown(&p, Some(*uid), Some(*gid))
                        .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
                }
                Entry::Mtime { path, sec, nsec } => mtimes.push((at(path), *sec, *nsec)),
            }
        }
        for (p, sec, nsec) in mtimes {
            set_times(&p, (sec, nsec), (sec, nsec))
                .unwrap_or_else(|e| panic!("utimensat {}: {e}", p.display()));
        }
    }
}

/// Scratch tmpfs mounts and an overlay over them, shaped like an spfs runtime:
///
/// ```text
/// <scratch>/lower/        tmpfs (read-only once written): layers 0, 1, ... (0 top-most)
/// <scratch>/runtime/      tmpfs, like /tmp/spfs-runtime: upper/ work/ lower/ sync/
/// <scratch>/mnt           overlay lowerdir=<lower/0>:<lower/1>..:<runtime/lower>,
///                         upperdir=..,workdir=..,index=off,metacopy=off,redirect_dir=follow
///                         (made by `tracker::setup::Overlay`, as `spfs-changes run` does)
/// ```
///
/// `sync/` is for the tracker's state (cookies): same filesystem as upper, outside
/// upper and work. Build it inside [`super::in_private_mount_ns`] (checked): the
/// mounts then vanish with the namespace. Drop detaches whatever is still mounted.
pub struct Fixture {
    scratch: tempfile::TempDir,
    lower_root: PathBuf,
    runtime: PathBuf,
    sync: PathBuf,
    mnt: PathBuf,
    /// Set once the overlay is made.
    overlay: Option<tracker::setup::Overlay>,
    mounted: bool,
}

fn ns_id(path: &str) -> PathBuf {
    fs::read_link(path).unwrap_or_else(|e| panic!("readlink {path}: {e}"))
}

/// Mounts a tmpfs at `at`, with `options` (none: the defaults).
pub fn mount_tmpfs(at: &Path, options: Option<&str>) {
    mount(Some("tmpfs"), at, Some("tmpfs"), MsFlags::empty(), options)
        .unwrap_or_else(|e| panic!("mount tmpfs at {}: {e}", at.display()));
}

/// Runs `op` again while it fails with `EBUSY`, for up to 2 s.
///
/// In a test process a file this thread has just closed may still be open for a
/// moment: another test thread's `fork` (for `Command`) copies the whole fd table, and
/// the child keeps the copy until its `exec`. An `umount` or a read-only remount made
/// in that window fails with `EBUSY` though nothing of this test uses the mount.
/// (nextest's one process per test avoids this.)
pub fn retry_busy<T>(mut op: impl FnMut() -> nix::Result<T>) -> nix::Result<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match op() {
            Err(nix::errno::Errno::EBUSY) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            r => return r,
        }
    }
}

fn mkdir(p: &Path) {
    fs::create_dir(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
}

impl Fixture {
    /// Mounts the scratch tmpfs mounts, writes the lower layers and mounts the overlay.
    pub fn new(lower: &LowerSpec) -> Fixture {
        assert_ne!(
            ns_id("/proc/thread-self/ns/mnt"),
            ns_id("/proc/self/ns/mnt"),
            "Fixture::new must run inside support::in_private_mount_ns (mounts would leak)"
        );
        let scratch = tempfile::Builder::new()
            .prefix("spfs-changes-test.")
            .tempdir_in("/tmp")
            .expect("scratch dir");
        let base = scratch.path().to_path_buf();
        let lower_root = base.join("lower");
        let runtime = base.join("runtime");
        let mnt = base.join("mnt");
        for d in [&lower_root, &runtime, &mnt] {
            mkdir(d);
        }
        let mut fixture = Fixture {
            scratch,
            sync: runtime.join("sync"),
            lower_root,
            runtime,
            mnt,
            overlay: None,
            mounted: false,
        };
        let mut lowers = Vec::new();
        // From here on, Drop undoes the mounts if anything below panics.
        mount_tmpfs(&fixture.lower_root, Some("mode=0755"));
        for i in 0..lower.n_layers() {
            let l = fixture.lower_root.join(i.to_string());
            mkdir(&l);
            fs::set_permissions(&l, fs::Permissions::from_mode(0o755)).expect("chmod");
            lower.write_layer(i, &l);
            lowers.push(l);
        }
        retry_busy(|| {
            mount(
                None::<&str>,
                &fixture.lower_root,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
        })
        .expect("remount the lower tmpfs read-only");
        let overlay = tracker::setup::Overlay::create(&fixture.runtime, &fixture.mnt, &lowers)
            .unwrap_or_else(|e| panic!("make the runtime: {e}"));
        fixture.overlay = Some(overlay);
        fixture.mounted = true;
        mkdir(&fixture.sync);
        fixture
    }

    /// The overlay mount point (like `/spfs`).
    pub fn mnt(&self) -> &Path {
        &self.mnt
    }
    pub fn upper(&self) -> &Path {
        &self.overlay().upper
    }
    pub fn work(&self) -> &Path {
        &self.overlay().work
    }
    /// The tracker's cookie/state dir: on the runtime tmpfs, outside upper and work.
    pub fn sync_dir(&self) -> &Path {
        &self.sync
    }
    /// The lower layer dirs, top-most first.
    pub fn lowers(&self) -> &[PathBuf] {
        &self.overlay().lowers
    }
    /// The runtime tmpfs (like `/tmp/spfs-runtime`).
    pub fn runtime_dir(&self) -> &Path {
        &self.runtime
    }
    /// The scratch dir holding `lower/`, `runtime/` and `mnt` (free for other files).
    pub fn scratch(&self) -> &Path {
        self.scratch.path()
    }
    pub fn is_mounted(&self) -> bool {
        self.mounted
    }

    fn overlay(&self) -> &tracker::setup::Overlay {
        self.overlay
            .as_ref()
            .expect("Fixture::new makes the overlay before returning")
    }

    /// Mounts the overlay (a new superblock) at `mnt()`.
    pub fn mount(&mut self) {
        assert!(!self.mounted, "overlay already mounted");
        self.overlay()
            .mount()
            .unwrap_or_else(|e| panic!("mount overlay: {e}"));
        self.mounted = true;
    }

    /// Plain `umount` of the overlay (no `MNT_DETACH`), one attempt: fails with
    /// `EBUSY` while anything uses it.
    pub fn try_unmount(&mut self) -> nix::Result<()> {
        assert!(self.mounted, "overlay not mounted");
        umount(&self.mnt)?;
        self.mounted = false;
        Ok(())
    }

    /// Plain `umount` of the overlay; panics when it still fails after retrying
    /// `EBUSY` for up to 2 s (see [`retry_busy`] for why a retry is needed in a test
    /// process).
    pub fn unmount(&mut self) {
        assert!(self.mounted, "overlay not mounted");
        retry_busy(|| umount(&self.mnt))
            .unwrap_or_else(|e| panic!("umount {}: {e}", self.mnt.display()));
        self.mounted = false;
    }

    /// Unmounts the overlay and mounts a new one with the same options, as spfs does at
    /// every edit, commit and reset.
    pub fn remount(&mut self) {
        self.unmount();
        self.mount();
    }

    /// [`truth`] of this fixture's upper dir against its lower layers.
    pub fn truth(&self) -> Truth {
        truth(self.upper(), self.lowers())
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Errors ignored: in the normal case the namespace disappears anyway, and the
        // scratch dirs are removed once they are plain empty dirs again.
        if self.mounted {
            let _ = umount2(&self.mnt, MntFlags::MNT_DETACH);
        }
        let _ = umount2(&self.runtime, MntFlags::MNT_DETACH);
        let _ = umount2(&self.lower_root, MntFlags::MNT_DETACH);
    }
}
