//! The harness against the real kernel: each operation made through an overlay mounted
//! like an spfs runtime, and what `support::truth` makes of the upper dir afterwards.
//! Needs root; each test runs in its own private mount namespace.

mod support;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use store::FileType::{self, *};
use store::NetKind::{self, *};
use support::{Fixture, LowerSpec, Truth, describe_tree, expect, in_private_mount_ns, sh};

/// The lower tree most cases start from.
fn base() -> LowerSpec {
    LowerSpec::new()
        .file("f", "lower f\n", 0o644)
        .file("g", "lower g, longer\n", 0o644)
        .file("d/a", "lower d/a\n", 0o644)
        .file("d/b", "lower d/b\n", 0o644)
        .file("d/sub/c", "lower d/sub/c\n", 0o644)
        .dir("e")
        .file("xf", "has an xattr\n", 0o644)
        .xattr("xf", "user.keep", "1")
        .symlink("lnk", "f")
        .fifo("p")
        .mtime("f", 1_000_000_000, 123_456_789)
}

/// Runs `op` (given the fixture) in a private namespace over `base()` and checks the
/// truth; prints the upper dir so `--nocapture` shows what the kernel made.
fn case(
    name: &str,
    op: impl FnOnce(&mut Fixture) + Send + 'static,
    want: Vec<(&'static str, NetKind, FileType)>,
) {
    if !support::need_root() {
        return;
    }
    let name = name.to_owned();
    in_private_mount_ns(move || {
        let mut fx = Fixture::new(&base());
        op(&mut fx);
        let got = fx.truth();
        let listing = describe_tree(fx.upper());
        eprintln!("[{name}] upper:\n{listing}");
        assert_eq!(
            show(&got),
            show(&expect(want)),
            "[{name}] upper dir:\n{listing}"
        );
    });
}

/// A truth map with readable keys, for assertion messages.
fn show(t: &Truth) -> Vec<(String, NetKind, FileType)> {
    t.iter()
        .map(|(p, (k, f))| (String::from_utf8_lossy(p).into_owned(), *k, *f))
        .collect()
}

fn script(s: &'static str) -> impl FnOnce(&mut Fixture) + Send + 'static {
    move |fx: &mut Fixture| {
        sh(fx.mnt(), s);
    }
}

#[test]
fn fresh_mount_has_no_changes() {
    case("fresh", |_| {}, vec![]);
}

#[test]
fn create_file() {
    case("create", script("echo new > n"), vec![("n", Added, File)]);
}

#[test]
fn create_in_lower_dir_leaves_copied_up_parents_out() {
    case(
        "create deep",
        script("echo new > d/sub/n"),
        vec![("d/sub/n", Added, File)],
    );
}

#[test]
fn overwrite_file() {
    case(
        "overwrite",
        script("echo changed > f"),
        vec![("f", Modified, File)],
    );
}

#[test]
fn overwrite_with_same_bytes_is_metadata() {
    // Same content, but the write sets a new mtime.
    case(
        "same bytes",
        script("printf 'lower f\\n' > f"),
        vec![("f", Metadata, File)],
    );
}

#[test]
fn append_file() {
    case(
        "append",
        script("echo more >> d/sub/c"),
        vec![("d/sub/c", Modified, File)],
    );
}

#[test]
fn truncate_file() {
    case(
        "truncate",
        script("truncate -s 0 f && truncate -s 3 g"),
        vec![("f", Modified, File), ("g", Modified, File)],
    );
}

#[test]
fn open_for_write_without_writing_is_no_change() {
    // Opening for writing copies the file up; with nothing written nothing differs.
    case("copy-up only", script(": >> f && : >> d/a"), vec![]);
}

#[test]
fn chmod_file_and_dir() {
    case(
        "chmod",
        script("chmod 600 f && chmod 700 d"),
        vec![("d", Metadata, Dir), ("f", Metadata, File)],
    );
}

#[test]
fn chown_file_dir_symlink() {
    case(
        "chown",
        script("chown 1000:1000 f && chown 1000 e && chown -h 1000:1000 lnk"),
        vec![
            ("e", Metadata, Dir),
            ("f", Metadata, File),
            ("lnk", Metadata, Symlink),
        ],
    );
}

#[test]
fn chmod_back_to_lower_mode_is_no_change() {
    case("chmod back", script("chmod 600 f && chmod 644 f"), vec![]);
}

#[test]
fn setxattr_and_removexattr() {
    case(
        "xattrs",
        |fx| {
            let m = fx.mnt();
            support::set_xattr(&m.join("f"), "user.new", b"v").unwrap();
            support::set_xattr(&m.join("d"), "user.dir", b"v").unwrap();
            support::remove_xattr(&m.join("xf"), "user.keep").unwrap();
        },
        vec![
            ("d", Metadata, Dir),
            ("f", Metadata, File),
            ("xf", Metadata, File),
        ],
    );
}

#[test]
fn setxattr_to_the_lower_value_is_no_change() {
    case(
        "xattr same",
        |fx| support::set_xattr(&fx.mnt().join("xf"), "user.keep", b"1").unwrap(),
        vec![],
    );
}

#[test]
fn utime() {
    case(
        "touch -d",
        script("touch -d '2001-02-03 04:05:06' f g"),
        vec![("f", Metadata, File), ("g", Metadata, File)],
    );
}

#[test]
fn utime_to_the_lower_time_is_no_change() {
    case(
        "touch to lower time",
        |fx| support::set_times(&fx.mnt().join("f"), (5, 0), (1_000_000_000, 123_456_789)).unwrap(),
        vec![],
    );
}

#[test]
fn rename_lower_file_same_dir() {
    case(
        "mv f f2",
        script("mv f f2"),
        vec![("f", Removed, Whiteout), ("f2", Added, File)],
    );
}

#[test]
fn rename_lower_file_other_dir() {
    case(
        "mv f d/f",
        script("mv f d/sub/f"),
        vec![("d/sub/f", Added, File), ("f", Removed, Whiteout)],
    );
}

#[test]
fn rename_lower_file_over_lower_file() {
    case(
        "mv f g",
        script("mv f g"),
        vec![("f", Removed, Whiteout), ("g", Modified, File)],
    );
}

#[test]
fn rename_upper_only_dir() {
    case(
        "mv upper dir",
        script("mkdir n && echo x > n/x && mkdir n/y && mv n d/m"),
        vec![
            ("d/m", Added, Dir),
            ("d/m/x", Added, File),
            ("d/m/y", Added, Dir),
        ],
    );
}

#[test]
fn rename_lower_dir_is_exdev_and_mv_copies() {
    case(
        "mv lower dir",
        |fx| {
            // redirect_dir=follow: the kernel does not create redirects, so rename(2)
            // of a dir that has lower content fails with EXDEV...
            let err = std::fs::rename(fx.mnt().join("d"), fx.mnt().join("d2")).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EXDEV), "{err}");
            // ...and mv falls back to copy and delete.
            sh(fx.mnt(), "mv d d2");
        },
        vec![
            ("d", Removed, Whiteout),
            ("d2", Added, Dir),
            ("d2/a", Added, File),
            ("d2/b", Added, File),
            ("d2/sub", Added, Dir),
            ("d2/sub/c", Added, File),
        ],
    );
}

#[test]
fn hardlink_lower_file() {
    // The source is copied up unchanged (only its link count differs).
    case("ln", script("ln f d/h"), vec![("d/h", Added, File)]);
}

#[test]
fn symlink_create_and_retarget() {
    case(
        "symlinks",
        script("ln -s f s && ln -sfn g lnk"),
        vec![("lnk", Modified, Symlink), ("s", Added, Symlink)],
    );
}

#[test]
fn mkdir_new() {
    case(
        "mkdir",
        script("mkdir n && mkdir -p d/sub/x/y"),
        vec![
            ("d/sub/x", Added, Dir),
            ("d/sub/x/y", Added, Dir),
            ("n", Added, Dir),
        ],
    );
}

#[test]
fn rmdir_lower_dir() {
    case("rmdir", script("rmdir e"), vec![("e", Removed, Whiteout)]);
}

#[test]
fn unlink_lower_entries() {
    case(
        "rm",
        script("rm f lnk p d/sub/c"),
        vec![
            ("d/sub/c", Removed, Whiteout),
            ("f", Removed, Whiteout),
            ("lnk", Removed, Whiteout),
            ("p", Removed, Whiteout),
        ],
    );
}

#[test]
fn rm_rf_lower_dir() {
    case("rm -rf", script("rm -rf d"), vec![("d", Removed, Whiteout)]);
}

#[test]
fn rm_rf_lower_dir_then_mkdir() {
    case(
        "rm -rf; mkdir",
        script("rm -rf d && mkdir d && echo x > d/a"),
        vec![("d", Replaced, Dir), ("d/a", Added, File)],
    );
}

#[test]
fn replace_file_by_dir_and_dir_by_file() {
    case(
        "type changes",
        script("rm f && mkdir f && rm -rf d && echo x > d && rm lnk && echo y > lnk"),
        vec![
            ("d", Replaced, File),
            ("f", Replaced, Dir),
            ("lnk", Replaced, File),
        ],
    );
}

#[test]
fn delete_then_recreate_same_bytes_is_metadata() {
    // The new file sits where the whiteout was; same type and bytes, new mtime.
    case(
        "rm; recreate",
        script("rm f && printf 'lower f\\n' > f"),
        vec![("f", Metadata, File)],
    );
}

#[test]
fn write_through_mmap() {
    case(
        "mmap",
        |fx| support::mmap_write(&fx.mnt().join("d/a"), 2, b"MMAP").unwrap(),
        vec![("d/a", Modified, File)],
    );
}

#[test]
fn add_then_delete() {
    case(
        "add, delete",
        script("echo x > n && rm n && mkdir -p m/k && rm -r m && echo y > d/t && rm d/t"),
        vec![],
    );
}

#[test]
fn special_files() {
    case(
        "special",
        |fx| {
            sh(fx.mnt(), "mkfifo q && mknod cdev c 1 3 && mknod bdev b 7 0");
            let sock = std::os::unix::net::UnixListener::bind(fx.mnt().join("sock")).unwrap();
            drop(sock);
        },
        vec![
            ("bdev", Added, BlockDevice),
            ("cdev", Added, CharDevice),
            ("q", Added, Fifo),
            ("sock", Added, Socket),
        ],
    );
}

#[test]
fn non_utf8_names() {
    if !support::need_root() {
        return;
    }
    in_private_mount_ns(|| {
        let fx = Fixture::new(
            &LowerSpec::new()
                .file(b"caf\xe9", "x", 0o644)
                .dir(b"dir\xff"),
        );
        let m = fx.mnt();
        std::fs::write(m.join(OsStr::from_bytes(b"dir\xff/n\xfe\nl")), "y").unwrap();
        std::fs::remove_file(m.join(OsStr::from_bytes(b"caf\xe9"))).unwrap();
        let want = expect([
            (&b"caf\xe9"[..], Removed, Whiteout),
            (&b"dir\xff/n\xfe\nl"[..], Added, File),
        ]);
        assert_eq!(fx.truth(), want, "{}", describe_tree(fx.upper()));
    });
}

#[test]
fn several_lower_layers() {
    if !support::need_root() {
        return;
    }
    in_private_mount_ns(|| {
        let spec = LowerSpec::new()
            .file("top", "top\n", 0o644)
            .whiteout("gone")
            .opaque("o")
            .file("o/1", "top o/1\n", 0o644)
            .file("shadow", "top shadow\n", 0o644)
            .layer_below()
            .file("gone", "bottom gone\n", 0o644)
            .file("bottom", "bottom\n", 0o644)
            .file("o/2", "bottom o/2\n", 0o644)
            .file("shadow", "bottom shadow\n", 0o644)
            .file("dir/x", "bottom dir/x\n", 0o644);
        let fx = Fixture::new(&spec);
        assert_eq!(
            fx.lowers().len(),
            3,
            "two layers, then the runtime's empty lower dir"
        );
        let m = fx.mnt();
        // What the overlay shows: the whiteout and the opaque dir of the top layer hide
        // the bottom layer's entries.
        assert!(!m.join("gone").exists());
        assert!(!m.join("o/2").exists());
        assert_eq!(
            std::fs::read_to_string(m.join("shadow")).unwrap(),
            "top shadow\n"
        );
        assert!(fx.truth().is_empty());
        sh(
            m,
            "echo new > gone && echo new > o/2 && rm o/1 bottom && echo y > dir/y && chmod 600 shadow && chmod 600 top",
        );
        let want = expect([
            ("bottom", Removed, Whiteout),
            ("dir/y", Added, File),
            ("gone", Added, File),
            ("o/1", Removed, Whiteout),
            ("o/2", Added, File),
            ("shadow", Metadata, File),
            ("top", Metadata, File),
        ]);
        let listing = describe_tree(fx.upper());
        eprintln!("[several layers] upper:\n{listing}");
        assert_eq!(show(&fx.truth()), show(&want), "{listing}");
    });
}

#[test]
fn generated_tree_is_deterministic_and_clean() {
    let a = LowerSpec::generated(3000, 7);
    assert_eq!(a, LowerSpec::generated(3000, 7));
    assert_ne!(a, LowerSpec::generated(3000, 8));
    assert_eq!(a.files().len(), 3000);
    assert!(
        a.dirs()
            .iter()
            .any(|d| d.iter().filter(|b| **b == b'/').count() >= 2),
        "nested dirs"
    );
    if !support::need_root() {
        return;
    }
    in_private_mount_ns(move || {
        let fx = Fixture::new(&a);
        assert!(fx.truth().is_empty());
        let files = a.files();
        let (f1, f2) = (&files[10], &files[2000]);
        let (p1, p2) = (
            fx.mnt().join(OsStr::from_bytes(f1)),
            fx.mnt().join(OsStr::from_bytes(f2)),
        );
        std::fs::write(&p1, "changed").unwrap();
        std::fs::remove_file(&p2).unwrap();
        let want = expect([
            (f1.clone(), Modified, File),
            (f2.clone(), Removed, Whiteout),
        ]);
        assert_eq!(fx.truth(), want);
    });
}

#[test]
fn remount_keeps_changes() {
    if !support::need_root() {
        return;
    }
    in_private_mount_ns(|| {
        let mut fx = Fixture::new(&base());
        sh(
            fx.mnt(),
            "echo changed > f && rm g && rm -rf d && mkdir d && echo n > n && chmod 600 xf",
        );
        let before = fx.truth();
        assert_eq!(before.len(), 5, "{}", describe_tree(fx.upper()));
        // (The overlay's anonymous st_dev is freed at umount and usually reused by the
        // next mount, so it cannot tell the mounts apart; the unique mount id can.)
        let id_before = support::mount_unique_id(fx.mnt()).unwrap();
        fx.remount();
        let id_after = support::mount_unique_id(fx.mnt()).unwrap();
        assert_ne!(id_before, id_after, "a remount makes a new mount");
        assert_eq!(fx.truth(), before);
        let m = fx.mnt();
        assert_eq!(std::fs::read_to_string(m.join("f")).unwrap(), "changed\n");
        assert!(!m.join("g").exists());
        assert!(!m.join("d/a").exists());
        // And the new mount takes further changes.
        sh(m, "echo more >> n && rm xf");
        let mut want = before;
        want.insert(b"xf".to_vec(), (Removed, Whiteout));
        assert_eq!(fx.truth(), want);
    });
}

#[test]
fn unmount_refuses_while_busy() {
    if !support::need_root() {
        return;
    }
    in_private_mount_ns(|| {
        let mut fx = Fixture::new(&base());
        let held = std::fs::File::open(fx.mnt().join("f")).unwrap();
        assert_eq!(fx.try_unmount(), Err(nix::errno::Errno::EBUSY));
        assert!(fx.is_mounted());
        drop(held);
        fx.remount();
    });
}

#[test]
fn fixture_mounts_like_spfs() {
    if !support::need_root() {
        return;
    }
    in_private_mount_ns(|| {
        let fx = Fixture::new(&base().layer_below().file("z", "z", 0o644));
        let info = support::thread_mountinfo();
        let (fstype, _, sopts) =
            support::mount_entry(&info, fx.mnt()).expect("overlay in mountinfo");
        assert_eq!(fstype, "overlay");
        let lowerdir: Vec<String> = fx
            .lowers()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        assert!(
            sopts.contains(&format!("lowerdir={}", lowerdir.join(":"))),
            "{sopts}"
        );
        assert!(
            sopts.contains(&format!("upperdir={}", fx.upper().display())),
            "{sopts}"
        );
        assert!(
            sopts.contains(&format!("workdir={}", fx.work().display())),
            "{sopts}"
        );
        let (rt_type, _, _) = support::mount_entry(&info, fx.runtime_dir()).expect("runtime tmpfs");
        assert_eq!(rt_type, "tmpfs");
        // upper, work and sync share the runtime tmpfs; sync is outside upper and work.
        let dev = |p: &Path| std::fs::metadata(p).unwrap().dev();
        assert_eq!(dev(fx.upper()), dev(fx.sync_dir()));
        assert_eq!(dev(fx.work()), dev(fx.sync_dir()));
        assert!(!fx.sync_dir().starts_with(fx.upper()) && !fx.sync_dir().starts_with(fx.work()));
        assert_eq!(fx.upper().parent(), Some(fx.runtime_dir()));
        // The lower layers are read-only once written.
        let err = std::fs::write(fx.lowers()[0].join("new"), "x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));
        assert_eq!(std::fs::read_to_string(fx.mnt().join("z")).unwrap(), "z");
    });
}

#[test]
fn mounts_are_private_to_the_namespace() {
    if !support::need_root() {
        return;
    }
    let outer_before =
        support::mount_points(&std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap());
    let scratch = tempfile::tempdir().unwrap();
    let point = scratch.path().join("m");
    std::fs::create_dir(&point).unwrap();
    let p = point.clone();
    let inner: Vec<PathBuf> = in_private_mount_ns(move || {
        support::mount_tmpfs(&p, None);
        std::fs::write(p.join("inside"), "x").unwrap();
        // A thread and a child process started from inside see the mount too.
        let q = p.clone();
        let seen_by_thread = std::thread::spawn(move || {
            support::mount_points(&support::thread_mountinfo()).contains(&q)
        })
        .join()
        .unwrap();
        assert!(seen_by_thread);
        sh(
            &p,
            "test -e inside && grep -q \" $(pwd) \" /proc/self/mountinfo",
        );
        support::mount_points(&support::thread_mountinfo())
    });
    assert!(inner.contains(&point), "mount visible inside");
    // /proc/self is the main thread, /proc/thread-self this test thread: neither sees it.
    for f in ["/proc/self/mountinfo", "/proc/thread-self/mountinfo"] {
        let outer = support::mount_points(&std::fs::read_to_string(f).unwrap());
        assert!(!outer.contains(&point), "{f} must not show the inner mount");
    }
    assert!(
        !point.join("inside").exists(),
        "the tmpfs is not there outside"
    );
    assert_eq!(std::fs::read_dir(&point).unwrap().count(), 0);
    let outer_after =
        support::mount_points(&std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap());
    assert_eq!(outer_before.len(), outer_after.len(), "no mount leaked");
}

#[test]
fn panics_inside_reach_the_caller_and_mounts_go() {
    if !support::need_root() {
        return;
    }
    let scratch: std::sync::Arc<std::sync::Mutex<Option<PathBuf>>> = Default::default();
    let s = scratch.clone();
    let r = std::panic::catch_unwind(move || {
        in_private_mount_ns(move || {
            let fx = Fixture::new(&base());
            *s.lock().unwrap() = Some(fx.scratch().to_path_buf());
            panic!("boom inside");
        })
    });
    let payload = r.unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom inside"));
    let dir = scratch.lock().unwrap().clone().unwrap();
    assert!(
        !dir.exists(),
        "scratch dir removed after the panic: {}",
        dir.display()
    );
}

#[test]
fn truth_rules_on_plain_dirs() {
    // No overlay: an upper dir written directly (as spfs itself does at times).
    if !support::need_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (lower, upper) = (tmp.path().join("lower"), tmp.path().join("upper"));
    std::fs::create_dir(&lower).unwrap();
    std::fs::create_dir(&upper).unwrap();
    LowerSpec::new()
        .file("f", "f", 0o644)
        .file("d/x", "x", 0o644)
        .dir("o")
        .file("o/y", "y", 0o644)
        .symlink("s", "f")
        .file("t", "t", 0o644)
        .write_layer(0, &lower);
    LowerSpec::new()
        .whiteout("nolower") // a whiteout with nothing below: no change
        .whiteout("f")
        .dir("d") // copied-up parent
        .file("d/new", "n", 0o644)
        .opaque("o")
        .file("o/y", "y", 0o644) // under an opaque dir: added even though lower has it
        .symlink("s", "t")
        .dir("t") // dir over file, not opaque
        .file("t/u", "u", 0o644)
        .write_layer(0, &upper);
    // The upper copy of d must look like the lower one for "no change".
    std::fs::set_permissions(
        upper.join("d"),
        std::fs::metadata(lower.join("d")).unwrap().permissions(),
    )
    .unwrap();
    let want = expect([
        ("d/new", Added, File),
        ("f", Removed, Whiteout),
        ("o", Replaced, Dir),
        ("o/y", Added, File),
        ("s", Modified, Symlink),
        ("t", Replaced, Dir),
        ("t/u", Added, File),
    ]);
    assert_eq!(show(&support::truth(&upper, &[lower])), show(&want));
}
