//! The third step of the watcher: one batch's path events gathered into one work set,
//! as watchman keeps its pending collection: each path once, with flags saying what to
//! look at, and the log of what happened in event order.

use crate::fid::Handle;
use crate::pathevent::{Change, PathEvent};
use std::collections::{BTreeMap, HashSet};
use store::{Action, FileType, Origin};

/// What to look at for one path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags {
    /// Created in this batch (its writes and attribute changes are part of that).
    pub created: bool,
    /// A dir renamed or removed: every recorded path below it must be looked at.
    pub subtree: bool,
    /// A dir moved into place: what it holds must be walked.
    pub walk: bool,
    /// Bumped when the entry at the path goes (deleted, renamed away or over): what
    /// happens after is to another entry, not a repeat or part of a creation.
    entry: u32,
}

impl Flags {
    fn gone(&mut self) {
        self.created = false;
        self.entry += 1;
    }

    /// Which entry at the path this is (see `Logged::current`).
    pub fn entry(&self) -> u32 {
        self.entry
    }
}

/// What one event says happened, before the filesystem is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// An action as it will be logged, unless settling finds it means another.
    Action(Action),
    /// Moved in from outside the upper dir (overlayfs' work dir): a copy-up, a
    /// whiteout or an opaque dir; what it means depends on what it is now.
    MovedIn,
    /// A write or attribute change of a path created in this batch: part of its
    /// creation, not logged for it, but a change to its other names (hard links).
    Absorbed(Action),
}

/// One entry of the batch's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    /// What the event says happened.
    pub step: Step,
    /// The path, relative to the upper dir.
    pub path: Vec<u8>,
    /// `Dir` when the event said so; otherwise filled in when settling.
    pub file_type: FileType,
    /// The process that made the change, when the event named one.
    pub origin: Option<Origin>,
    /// When the batch was read, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// For the first half of a rename: the index of the second half in the log.
    pub renamed_to: Option<usize>,
    /// For a content or attribute change: the inode's handle (see `PathEvent`).
    pub object: Option<Handle>,
    /// Which entry at the path this speaks of (`Flags::entry`): when it is not the
    /// path's last, the path holds another entry at the end of the batch.
    pub entry: u32,
}

/// One batch of path events.
#[derive(Debug, Default)]
pub struct WorkSet {
    /// Every path the batch named, once, in path order, with what to look at.
    pub paths: BTreeMap<Vec<u8>, Flags>,
    /// What happened, in event order.
    pub log: Vec<Logged>,
    /// The highest sync cookie seen.
    pub cookie: u64,
    /// Events were lost (queue overflow, an undecodable record): rescan.
    pub lost: bool,
    /// (action, path, entry, pid) already logged: writes repeat (every write(2) is
    /// an event).
    seen: HashSet<(Action, Vec<u8>, u32, u32)>,
}

impl WorkSet {
    /// Whether `logged` speaks of the entry at its path at the end of the batch.
    pub fn is_current(&self, logged: &Logged) -> bool {
        self.paths
            .get(&logged.path)
            .is_none_or(|f| f.entry == logged.entry)
    }

    /// True when the batch named no path, no cookie and lost nothing.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty() && self.log.is_empty() && self.cookie == 0 && !self.lost
    }

    /// Adds one path event, made by `origin` at `time_ns` (cloned only when logged:
    /// most events repeat what is logged already).
    pub fn add(&mut self, event: PathEvent, origin: &Option<Origin>, time_ns: u64) {
        tracing::trace!(?event, pid = origin.as_ref().map(|o| o.pid), "path event");
        match event {
            PathEvent::Cookie(n) => self.cookie = self.cookie.max(n),
            PathEvent::Lost => self.lost = true,
            PathEvent::Change {
                change,
                path,
                dir,
                object,
            } => {
                let action = match change {
                    Change::Created => Action::Created,
                    Change::Deleted => Action::Deleted,
                    Change::Written => Action::Written,
                    Change::Attrib => Action::Attrib,
                };
                let flags = self.paths.entry(path.clone()).or_default();
                if dir && change == Change::Deleted {
                    flags.subtree = true;
                }
                let repeats = matches!(action, Action::Written | Action::Attrib);
                let absorbed = repeats && flags.created;
                match change {
                    Change::Created => flags.created = true,
                    Change::Deleted => flags.gone(),
                    Change::Written | Change::Attrib => {}
                }
                let (entry, pid) = (flags.entry, origin.as_ref().map_or(0, |o| o.pid));
                if repeats && !self.seen.insert((action, path.clone(), entry, pid)) {
                    return;
                }
                let step = if absorbed {
                    Step::Absorbed(action)
                } else {
                    Step::Action(action)
                };
                let i = self.push(step, path, dir, origin.clone(), time_ns);
                self.log[i].object = object;
            }
            PathEvent::Renamed {
                from,
                to,
                dir,
                moved_in,
            } => {
                // Overlayfs' exchange with its work dir reports the entry moving in
                // first, then the one it replaced moving out: the path keeps the entry
                // that moved in.
                let exchanged = to.is_none()
                    && from.as_ref().is_some_and(|from| {
                        self.log
                            .last()
                            .is_some_and(|l| l.step == Step::MovedIn && l.path == *from)
                    });
                let first = from.map(|from| {
                    let flags = self.paths.entry(from.clone()).or_default();
                    flags.subtree |= dir;
                    if !exchanged {
                        flags.gone();
                    }
                    self.push(
                        Step::Action(Action::RenamedFrom),
                        from,
                        dir,
                        origin.clone(),
                        time_ns,
                    )
                });
                if let Some(to) = to {
                    let flags = self.paths.entry(to.clone()).or_default();
                    flags.gone();
                    flags.subtree |= dir;
                    flags.walk |= dir;
                    let step = match first {
                        Some(_) => Step::Action(Action::RenamedTo),
                        None => Step::MovedIn,
                    };
                    let second = self.push(step, to, dir, origin.clone(), time_ns);
                    if let Some(first) = first {
                        self.log[first].renamed_to = Some(second);
                    }
                    if let Some(t) = moved_in {
                        self.log[second].file_type = t;
                    }
                }
            }
        }
    }

    fn push(
        &mut self,
        step: Step,
        path: Vec<u8>,
        dir: bool,
        origin: Option<Origin>,
        time_ns: u64,
    ) -> usize {
        let entry = self.paths.get(&path).map_or(0, |f| f.entry);
        self.log.push(Logged {
            step,
            path,
            file_type: if dir {
                FileType::Dir
            } else {
                FileType::Unknown
            },
            origin,
            time_ns,
            renamed_to: None,
            object: None,
            entry,
        });
        self.log.len() - 1
    }
}
