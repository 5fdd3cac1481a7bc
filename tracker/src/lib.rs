//! The tracker: watches the filesystem holding an overlay's upper dir with fanotify and
//! keeps the changelog (`store`) equal to what changed in that upper dir.
//!
//! It knows nothing of terminals: callers get typed answers and errors.

pub mod classify;
pub mod control;
pub mod cookies;
pub mod daemon;
pub mod diff;
mod engine;
mod error;
pub mod execs;
pub mod fid;
mod links;
pub mod masks;
pub mod mountinfo;
pub mod pathevent;
pub mod procevents;
mod reader;
pub mod reset;
pub mod resolve;
pub mod restore;
pub mod runtime;
pub mod service;
pub mod settle;
pub mod setup;
pub mod sys;
pub mod validate;
pub mod work;

pub use engine::{Config, Layout, Status, Tracker};
pub use error::TrackerError;

#[cfg(test)]
mod test_support {
    /// Checks `f` on each row of a table of byte-string inputs and expected answers,
    /// naming the input of a failing row.
    pub fn table<T: PartialEq + std::fmt::Debug>(rows: &[(&[u8], T)], f: impl Fn(&[u8]) -> T) {
        for (input, want) in rows {
            assert_eq!(&f(input), want, "{}", String::from_utf8_lossy(input));
        }
    }

    /// True as root. Otherwise says `skipped: needs root` where the test harness does
    /// not swallow it (straight to fd 2), or fails under CI=true, where tests must run.
    pub fn need_root() -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI must run this test as root"
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr(), b"skipped: needs root\n");
        false
    }
}
