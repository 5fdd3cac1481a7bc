//! Acceptance: each kind of file operation made through a real overlay is tracked,
//! and the tracker's net state equals a walk of the upper dir.

mod support;

use std::path::Path;
use store::{Action, FileType::*, NetKind::*};
use support::tracking::{assert_tracks_truth, start};
use support::{Fixture, LowerSpec, expect, in_private_mount_ns, need_root, sh};

fn lower() -> LowerSpec {
    LowerSpec::new()
        .file("f", "lower f\n", 0o644)
        .file("g", "lower g\n", 0o644)
        .file("d/x", "x\n", 0o644)
        .file("d/y", "y\n", 0o644)
        .file("d/sub/z", "z\n", 0o644)
        .dir("e")
        .symlink("l", "f")
        .file("xa", "has an xattr\n", 0o644)
        .xattr("xa", "user.k", "v")
}

/// Runs `op` on a fresh tracked overlay and checks the tracker against the walk of
/// the upper dir and against the expected net state.
fn check(op: impl FnOnce(&Path) + Send + 'static, want: support::Truth) {
    check_with(op, want, true)
}

fn check_with(op: impl FnOnce(&Path) + Send + 'static, want: support::Truth, walk_truth: bool) {
    if !need_root() {
        return;
    }
    in_private_mount_ns(move || {
        let fx = Fixture::new(&lower());
        let t = start(&fx);
        op(fx.mnt());
        let got = if walk_truth {
            assert_tracks_truth(&fx, &t, "after the operation")
        } else {
            support::tracking::tracked(&t)
        };
        assert_eq!(got, want, "net state is not the expected one");
        t.stop().expect("tracker stops cleanly");
    });
}

macro_rules! op_test {
    ($name:ident, $script:expr, [$(($path:expr, $kind:expr, $ft:expr)),* $(,)?]) => {
        #[test]
        fn $name() {
            check(|mnt| { sh(mnt, $script); }, expect::<&str>([$(($path, $kind, $ft)),*]));
        }
    };
}

op_test!(create, "echo new > n", [("n", Added, File)]);
op_test!(overwrite, "echo changed > f", [("f", Modified, File)]);
op_test!(append, "echo more >> f", [("f", Modified, File)]);
op_test!(truncate, "truncate -s 2 f", [("f", Modified, File)]);
op_test!(chmod, "chmod 600 f", [("f", Metadata, File)]);
op_test!(chown, "chown 1234:4321 f", [("f", Metadata, File)]);
op_test!(
    utime,
    "touch -d '2001-02-03 04:05:06' f",
    [("f", Metadata, File)]
);
op_test!(
    rename_same_dir,
    "mv f f2",
    [("f", Removed, Whiteout), ("f2", Added, File)]
);
op_test!(
    rename_other_dir,
    "mv f d/sub/f",
    [("f", Removed, Whiteout), ("d/sub/f", Added, File)]
);
op_test!(
    rename_over_existing,
    "mv f g",
    [("f", Removed, Whiteout), ("g", Modified, File)]
);
op_test!(
    rename_upper_only_dir,
    "mkdir -p n1/n2 && echo a > n1/n2/a && echo b > n1/b && mv n1 d/n3",
    [
        ("d/n3", Added, Dir),
        ("d/n3/n2", Added, Dir),
        ("d/n3/n2/a", Added, File),
        ("d/n3/b", Added, File)
    ]
);
op_test!(hardlink, "ln f d/h", [("d/h", Added, File)]);
op_test!(symlink, "ln -s f s", [("s", Added, Symlink)]);
op_test!(retarget_symlink, "ln -sfn g l", [("l", Modified, Symlink)]);
op_test!(
    mkdir,
    "mkdir -p m/n",
    [("m", Added, Dir), ("m/n", Added, Dir)]
);
op_test!(rmdir, "rmdir e", [("e", Removed, Whiteout)]);
op_test!(unlink_lower_file, "rm f", [("f", Removed, Whiteout)]);
op_test!(rm_rf_lower_dir, "rm -rf d", [("d", Removed, Whiteout)]);
op_test!(
    rm_rf_then_mkdir,
    "rm -rf d && mkdir d",
    [("d", Replaced, Dir)]
);
op_test!(
    rm_rf_then_mkdir_with_content,
    "rm -rf d && mkdir d && echo n > d/x",
    [("d", Replaced, Dir), ("d/x", Added, File)]
);
op_test!(
    file_replaced_by_dir,
    "rm f && mkdir f",
    [("f", Replaced, Dir)]
);
op_test!(
    add_then_delete,
    "echo t > tmp && rm tmp && echo u > d/sub/tmp && rm d/sub/tmp",
    []
);
op_test!(
    mkdir_then_rm_rf,
    "mkdir -p t1/t2 && echo a > t1/t2/a && rm -rf t1",
    []
);
op_test!(fifo, "mkfifo p", [("p", Added, Fifo)]);
op_test!(
    newline_in_name,
    "echo a > \"$(printf 'new\\nline')\"",
    [("new\nline", Added, File)]
);

#[test]
fn odd_names_are_kept_byte_exact() {
    // The non-UTF-8 name cannot be written as &str: check it separately.
    check(
        |mnt| {
            sh(mnt, "echo b > \"$(printf 'bad\\377byte')\"");
        },
        expect([(&b"bad\xffbyte"[..], Added, File)]),
    );
}

#[test]
fn xattr_set() {
    check(
        |mnt| support::set_xattr(&mnt.join("f"), "user.note", b"hello").expect("setxattr"),
        expect([("f", Metadata, File)]),
    );
}

#[test]
fn xattr_remove() {
    check(
        |mnt| support::remove_xattr(&mnt.join("xa"), "user.k").expect("removexattr"),
        expect([("xa", Metadata, File)]),
    );
}

#[test]
fn write_through_mmap() {
    check(
        |mnt| support::mmap_write(&mnt.join("f"), 0, b"MMAP").expect("mmap write"),
        expect([("f", Modified, File)]),
    );
}

#[test]
fn long_path_near_path_max() {
    // A 4095-byte path relative to the mount: longer than PATH_MAX once the upper
    // dir is prefixed, so the tracker must not rely on whole-path syscalls.
    let component = "c".repeat(200);
    let depth = 20; // 20 dirs of 200 bytes: 4019 bytes with the slashes
    let dirs: Vec<String> = (1..=depth)
        .map(|i| vec![component.clone(); i].join("/"))
        .collect();
    let name = "n".repeat(4095 - dirs[depth - 1].len() - 1);
    let rel = format!("{}/{name}", dirs[depth - 1]);
    assert_eq!(rel.len(), 4095);
    let mut want: Vec<(String, store::NetKind, store::FileType)> =
        dirs.iter().map(|d| (d.clone(), Added, Dir)).collect();
    want.push((rel, Added, File));
    // The test's upper-walk truth uses whole paths, which cannot reach this deep;
    // the expected state is exact here.
    check_with(
        move |mnt| {
            use nix::fcntl::{OFlag, openat};
            use nix::sys::stat::{Mode, mkdirat};
            let mut dir = std::fs::File::open(mnt).expect("open mount").into();
            for _ in 0..depth {
                mkdirat(&dir, component.as_str(), Mode::from_bits_truncate(0o755))
                    .expect("mkdirat");
                dir = openat(
                    &dir,
                    component.as_str(),
                    OFlag::O_DIRECTORY | OFlag::O_RDONLY,
                    Mode::empty(),
                )
                .expect("openat dir");
            }
            let fd = openat(
                &dir,
                name.as_str(),
                OFlag::O_CREAT | OFlag::O_WRONLY,
                Mode::from_bits_truncate(0o644),
            )
            .expect("create");
            nix::unistd::write(&fd, b"deep\n").expect("write");
        },
        expect(want),
        false,
    );
}

#[test]
fn writer_pid_and_command_are_recorded() {
    if !need_root() {
        return;
    }
    in_private_mount_ns(|| {
        let fx = Fixture::new(&lower());
        let t = start(&fx);
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("echo changed > f; sleep 0.5")
            .current_dir(fx.mnt())
            .spawn()
            .expect("spawn sh");
        let pid = child.id();
        std::thread::sleep(std::time::Duration::from_millis(200));
        t.sync().expect("sync");
        child.wait().expect("wait");
        let history = t.store().history(b"f").expect("history");
        let written = history
            .iter()
            .find(|r| r.action == Action::Written)
            .unwrap_or_else(|| panic!("no Written record for f in {history:?}"));
        let origin = written.origin.as_ref().expect("origin recorded");
        assert_eq!(origin.pid, pid);
        let command = String::from_utf8_lossy(&origin.command);
        assert!(
            command.contains("echo changed > f"),
            "command was {command:?}"
        );
        assert_tracks_truth(&fx, &t, "after the write");
    });
}

#[test]
fn remount_keeps_tracking() {
    if !need_root() {
        return;
    }
    in_private_mount_ns(|| {
        let mut fx = Fixture::new(&lower());
        let t = start(&fx);
        sh(fx.mnt(), "echo one > a && rm g");
        assert_tracks_truth(&fx, &t, "before the remount");
        fx.remount();
        sh(fx.mnt(), "echo two > b && chmod 700 f && rm a");
        let got = assert_tracks_truth(&fx, &t, "after the remount");
        assert_eq!(
            got,
            expect([
                ("b", Added, File),
                ("f", Metadata, File),
                ("g", Removed, Whiteout)
            ])
        );
    });
}
