//! Starting a tracker on a fixture and comparing what it says with the truth.

use super::fixture::Fixture;
use super::truth::{Truth, describe_tree};
use std::path::PathBuf;
use store::Query;
use tracker::{Config, Layout, Tracker};

/// The tracker configuration for a fixture, with its state outside the runtime.
pub fn config(fx: &Fixture) -> Config {
    let layout = Layout {
        mount: fx.mnt().to_path_buf(),
        upper: fx.upper().to_path_buf(),
        work: fx.work().to_path_buf(),
        lowers: fx.lowers().to_vec(),
    };
    Config::new(layout, state_dir(fx), fx.sync_dir().to_path_buf())
}

pub fn state_dir(fx: &Fixture) -> PathBuf {
    fx.scratch().join("state")
}

pub fn start(fx: &Fixture) -> Tracker {
    Tracker::start(config(fx)).unwrap_or_else(|e| panic!("tracker start: {e}"))
}

/// The tracker's net state after a sync, in the shape of `Truth`.
pub fn tracked(t: &Tracker) -> Truth {
    let set = t
        .query(&Query::default())
        .unwrap_or_else(|e| panic!("query: {e}"));
    set.changes
        .into_iter()
        .map(|c| {
            (
                c.path,
                (
                    c.kind.expect("a net-state answer always has a kind"),
                    c.file_type,
                ),
            )
        })
        .collect()
}

/// Asserts the tracker's net state equals a walk of the upper dir; returns it.
pub fn assert_tracks_truth(fx: &Fixture, t: &Tracker, context: &str) -> Truth {
    let got = tracked(t);
    let want = fx.truth();
    if got != want {
        panic!(
            "{context}: tracker net state differs from the upper-walk truth\n  tracker: {}\n  truth:   {}\nupper dir:\n{}",
            show(&got),
            show(&want),
            describe_tree(fx.upper())
        );
    }
    got
}

pub fn show(t: &Truth) -> String {
    let items: Vec<String> = t
        .iter()
        .map(|(p, (k, ft))| format!("{}={k:?}/{ft:?}", String::from_utf8_lossy(p).escape_debug()))
        .collect();
    format!("{{{}}}", items.join(", "))
}

/// The actions the log holds for `path`, oldest first, after a sync.
pub fn actions(t: &Tracker, path: &str) -> Vec<store::Action> {
    t.sync().unwrap_or_else(|e| panic!("sync: {e}"));
    t.store()
        .history(path.as_bytes())
        .unwrap_or_else(|e| panic!("history: {e}"))
        .into_iter()
        .map(|r| r.action)
        .collect()
}
