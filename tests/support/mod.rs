//! Shared harness of the end-to-end tests: root check, private mount namespaces,
//! overlay fixtures shaped like an spfs runtime, shell and syscall helpers, and an
//! independent ground truth of what an upper dir says changed.
//!
//! Every test file uses it with `mod support;`; not every file uses every item.
#![allow(dead_code)]

pub mod fixture;
pub mod ops;
pub mod rng;
pub mod tracking;
pub mod truth;

// Re-exports: a given test file uses some of them only.
#[allow(unused_imports)]
pub use fixture::{Fixture, LowerSpec, mount_tmpfs, retry_busy};
#[allow(unused_imports)]
pub use ops::*;
#[allow(unused_imports)]
pub use rng::SplitMix;
#[allow(unused_imports)]
pub use truth::{Truth, describe_tree, expect, for_each_child, truth};

use std::path::Path;
use std::process::Command;

/// True when the test runs as root (euid 0). Otherwise prints `skipped: needs root`
/// and returns false, except under `CI=true`, where it panics: CI must run these
/// tests, not skip them.
///
/// Usage: `if !support::need_root() { return; }`
pub fn need_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("this test needs root (euid 0), and CI=true: in CI tests must run, not skip");
    }
    // Straight to fd 2: the test harness captures `eprintln!` of passing tests, and
    // a skip must be seen.
    let _ = std::io::Write::write_all(&mut std::io::stderr(), b"skipped: needs root\n");
    false
}

/// Runs `f` on a fresh thread that has its own mount namespace in which every mount
/// is private: mounts made inside are invisible to the rest of the machine and go away
/// when the thread (and every process started from it) is gone, also when `f` panics.
/// A panic inside is re-raised in the caller.
///
/// `unshare(CLONE_NEWNS)` acts on the calling thread only (it also unshares its
/// `CLONE_FS` state): threads spawned and child processes started from inside `f`
/// inherit the namespace, other threads of the test process do not. Note that
/// `/proc/self` names the process's main thread, which stays in the outer namespace:
/// inside, read `/proc/thread-self/...` (for instance `/proc/thread-self/mountinfo`),
/// and do not reach paths through `/proc/self/root` or `/proc/<getpid()>/root`.
pub fn in_private_mount_ns<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    let mut builder = std::thread::Builder::new();
    if let Some(name) = std::thread::current().name() {
        builder = builder.name(format!("{name} (private mount ns)"));
    }
    let handle = builder
        .spawn(move || {
            tracker::sys::enter_private_mount_ns().expect("a private mount namespace");
            f()
        })
        .expect("spawn the private mount namespace thread");
    match handle.join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Runs `sh -c script` in `dir`; panics with the script, exit status, stdout and
/// stderr when it fails. Returns stdout.
pub fn sh(dir: &Path, script: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run sh for {script:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        panic!(
            "sh -c {script:?} in {} failed: {}\n--- stdout\n{}\n--- stderr\n{}",
            dir.display(),
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stdout
}
