//! What every test file of the `spfs-changes` binary needs: the binary, commands that
//! run it, their output, the names the CLI prints for kinds and types, and the
//! processes and mount namespaces of runtimes and trackers.
//!
//! Each test file includes it with `mod common;` (each is its own crate); not every
//! file uses every item.
#![allow(dead_code)]

use std::borrow::BorrowMut;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use store::{FileType, NetKind};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_spfs-changes"))
}

/// Takes out of `c`'s environment whatever would choose a tracker or runtime for it
/// (`SPFS_CHANGES_SOCKET`, `SPFS_CHANGES_STATE`, `SPFS_RUNTIME`) or make a test binary
/// act as the reset tests' checker (`RESET_TEST_HOOK`).
pub fn no_ambient_target(c: &mut Command) -> &mut Command {
    c.env_remove("SPFS_CHANGES_SOCKET")
        .env_remove("SPFS_CHANGES_STATE")
        .env_remove("SPFS_RUNTIME")
        .env_remove("RESET_TEST_HOOK")
}

/// `spfs-changes ARGS` with the binary's dir first on PATH, so scripts inside `run`
/// can call it, and no ambient target.
pub fn cmd(args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(args);
    let dir = bin().parent().expect("binary has a dir").to_path_buf();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![dir];
    dirs.extend(std::env::split_paths(&path));
    c.env("PATH", std::env::join_paths(dirs).expect("joinable PATH"));
    no_ambient_target(&mut c);
    c
}

/// Runs a command to its end.
pub fn output(mut c: impl BorrowMut<Command>) -> Output {
    c.borrow_mut().output().expect("spawn spfs-changes")
}

/// Runs a command to its end (with no stdin); panics with its output unless it
/// succeeded. Returns its stdout.
pub fn ok(mut c: impl BorrowMut<Command>) -> String {
    let c = c.borrow_mut();
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run {c:?}: {e}"));
    assert!(
        out.status.success(),
        "{c:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// Single-quotes `arg` for sh.
pub fn quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', "'\\''"))
}

/// A failing command: exit 1, exactly one line on stderr naming the problem, no panic.
pub fn assert_one_line_error(out: &Output, needle: &str) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(err.lines().count(), 1, "one line expected: {err:?}");
    assert!(
        err.contains(needle),
        "error {err:?} does not mention {needle:?}"
    );
}

/// The kind a `kind` (or `before`) field of the CLI's JSON names.
pub fn net_kind(name: &str) -> NetKind {
    match name {
        "added" => NetKind::Added,
        "modified" => NetKind::Modified,
        "metadata" => NetKind::Metadata,
        "removed" => NetKind::Removed,
        "replaced" => NetKind::Replaced,
        other => panic!("unknown kind {other:?}"),
    }
}

/// The file type a `type` field of the CLI's JSON names.
pub fn file_type(name: &str) -> FileType {
    match name {
        "file" => FileType::File,
        "dir" => FileType::Dir,
        "symlink" => FileType::Symlink,
        "fifo" => FileType::Fifo,
        "socket" => FileType::Socket,
        "char-device" => FileType::CharDevice,
        "block-device" => FileType::BlockDevice,
        "whiteout" => FileType::Whiteout,
        "unknown" => FileType::Unknown,
        other => panic!("unknown type {other:?}"),
    }
}

/// Sends SIGKILL to `pid`.
pub fn sigkill(pid: u32) -> nix::Result<()> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::SIGKILL,
    )
}

/// The inode of a process's mount namespace (`None`: no such process).
pub fn mount_ns(pid: u32) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/mnt"))
        .ok()
        .map(|m| m.ino())
}

/// True while `pid` runs (a zombie does not: PID 1 here may not reap orphans).
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, None | Some('Z') | Some('X'))
}

/// Polls `cond` every 20 ms for up to `limit`.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Live processes in mount namespace `ns`.
pub fn processes_in(ns: u64) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| mount_ns(pid) == Some(ns) && alive(pid))
        .collect()
}
