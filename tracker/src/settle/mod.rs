//! The fourth step of the watcher: one batch's work set settled into what the
//! changelog records, deciding every action once.
//!
//! Events are hints; the filesystem is the answer. Every path the batch touched (and
//! what lies below dirs that moved or went, and every other name of an upper inode
//! with several) is classified against the lower layers as it is *now*, so the net
//! state equals what a walk of the upper dir says whatever mix of copy-ups, whiteouts
//! and exchanges overlayfs used. The log keeps the events' order, with each action
//! corrected by what the path turned out to be: a "creation" that left a whiteout is a
//! deletion, one that copied up a lower file is a write, and a move in from the work
//! dir means whatever it put in place.
//!
//! `settle` is pure: the filesystem and the changelog come in through `Layers` and
//! `Recorded`, so its rules are specified by data-driven cases (`cases.rs`) that run
//! without root.

use crate::classify::Net;
use crate::fid::Handle;
use crate::work::{Logged, Step, WorkSet};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use store::{Action, Batch, FileType, NetEntry, NetKind, NetUpdate, Observation, StoreError};

#[cfg(test)]
mod cases;

/// The upper dir against the lower layers, as `settle` needs to see them.
pub trait Layers {
    /// The net state of `rel` now.
    fn classify(&self, rel: &[u8]) -> io::Result<Net>;
    /// Every changed path at and below the dir `rel`, with its net state.
    fn walk(&self, rel: &[u8], out: &mut Vec<(Vec<u8>, NetKind, FileType)>) -> io::Result<()>;
    /// The other names of the upper file at `rel` when it has several (hard links):
    /// a change to it is a change to each. Empty for dirs, whiteouts (overlayfs shares
    /// one inode between them), single names and absent paths.
    fn other_names(&self, rel: &[u8]) -> io::Result<Vec<Vec<u8>>>;
    /// A name the inode behind `object` has in the upper dir now, if it still has one.
    fn object_name(&self, object: &Handle) -> io::Result<Option<Vec<u8>>>;
}

/// What the changelog already holds.
pub trait Recorded {
    /// The recorded net state strictly below `dir`.
    fn net_under(&self, dir: &[u8]) -> Result<Vec<(Vec<u8>, NetEntry)>, StoreError>;
    /// The recorded net state of `path`.
    fn net_entry(&self, path: &[u8]) -> Result<Option<NetEntry>, StoreError>;
}

impl Recorded for store::Store {
    fn net_under(&self, dir: &[u8]) -> Result<Vec<(Vec<u8>, NetEntry)>, StoreError> {
        store::Store::net_under(self, dir)
    }

    fn net_entry(&self, path: &[u8]) -> Result<Option<NetEntry>, StoreError> {
        store::Store::net_entry(self, path)
    }
}

/// What a batch settles into.
#[derive(Debug, Default)]
pub struct Settled {
    /// The records and net updates to write, at once.
    pub batch: Batch,
    /// Paths that could not be inspected: their recorded state is left alone.
    pub errors: Vec<(Vec<u8>, io::Error)>,
}

/// Settles `work` against the filesystem (`layers`) and the changelog (`recorded`).
/// Changes made by a process in `resetting` are logged as `Reset`. Fails only when the
/// changelog cannot be read.
pub fn settle(
    work: &WorkSet,
    layers: &dyn Layers,
    recorded: &dyn Recorded,
    resetting: &HashSet<u32>,
) -> Result<Settled, StoreError> {
    let mut out = Settled::default();
    // Paths to look at besides those the events named: what was recorded below dirs
    // that moved or went, and what walks of dirs moved into place found.
    let mut extra: BTreeSet<Vec<u8>> = BTreeSet::new();
    for (dir, flags) in &work.paths {
        if flags.subtree {
            for (path, _) in recorded.net_under(dir)? {
                if !work.paths.contains_key(&path) {
                    extra.insert(path);
                }
            }
        }
    }
    // A walk classifies what it finds: those paths need no second look.
    let mut states: HashMap<Vec<u8>, Net> = HashMap::new();
    for (dir, flags) in &work.paths {
        if !flags.walk {
            continue;
        }
        let mut found = Vec::new();
        if let Err(e) = layers.walk(dir, &mut found) {
            out.errors.push((dir.clone(), e));
        }
        for (path, kind, file_type) in found {
            if !work.paths.contains_key(&path) {
                extra.insert(path.clone());
            }
            states.insert(path, Some((kind, file_type)));
        }
    }
    let classify = |path: &[u8], states: &mut HashMap<Vec<u8>, Net>, errors: &mut Vec<_>| {
        if let Some(known) = states.get(path) {
            return Some(*known);
        }
        match layers.classify(path) {
            Ok(state) => {
                states.insert(path.to_vec(), state);
                Some(state)
            }
            Err(e) => {
                errors.push((path.to_vec(), e));
                None
            }
        }
    };
    // In path order: the two sets are ordered, and disjoint.
    let mut dirty = Vec::with_capacity(work.paths.len() + extra.len());
    let (mut named_by_events, mut others) = (work.paths.keys().peekable(), extra.iter().peekable());
    while let Some(path) = match (named_by_events.peek(), others.peek()) {
        (Some(a), Some(b)) if b < a => others.next(),
        (Some(_), _) => named_by_events.next(),
        (None, _) => others.next(),
    } {
        dirty.push(path);
    }
    let net = &mut out.batch.net;
    for path in dirty {
        if let Some(state) = classify(path, &mut states, &mut out.errors) {
            net.push(NetUpdate {
                path: path.clone(),
                state,
            });
        }
    }
    // Every other name of a changed upper file changed with it.
    let mut links: HashMap<Vec<u8>, Vec<Vec<u8>>> = HashMap::new();
    let mut named = Vec::new();
    // Classifies the names (not yet looked at) that a change reached.
    let reached = |names: &[Vec<u8>],
                   states: &mut HashMap<Vec<u8>, Net>,
                   errors: &mut Vec<(Vec<u8>, io::Error)>,
                   named: &mut Vec<NetUpdate>| {
        for name in names {
            if !states.contains_key(name)
                && let Some(state) = classify(name, states, errors)
            {
                named.push(NetUpdate {
                    path: name.clone(),
                    state,
                });
            }
        }
    };
    for update in net.iter() {
        if matches!(update.state, Some((_, FileType::Dir | FileType::Whiteout))) {
            continue;
        }
        let names = match layers.other_names(&update.path) {
            Ok(names) if names.is_empty() => continue,
            Ok(names) => names,
            Err(e) => {
                out.errors.push((update.path.clone(), e));
                continue;
            }
        };
        reached(&names, &mut states, &mut out.errors, &mut named);
        links.insert(update.path.clone(), names);
    }
    // A change named by a name that is gone by now (overlayfs writes a hard-linked
    // file through the first of its names it looked up, which may have been removed
    // since): it is a change to the names the inode still has. A name renamed away
    // in this batch is not one: the rename says where its content went.
    let renamed_away: HashSet<&[u8]> = work
        .log
        .iter()
        .filter(|l| l.step == Step::Action(Action::RenamedFrom))
        .map(|l| l.path.as_slice())
        .collect();
    for logged in &work.log {
        let changes_content = matches!(
            logged.step,
            Step::Action(Action::Written | Action::Attrib) | Step::Absorbed(_)
        );
        let Some(object) = logged.object.as_ref().filter(|_| changes_content) else {
            continue;
        };
        if links.contains_key(&logged.path)
            || states.get(&logged.path).copied().flatten().is_some()
            || renamed_away.contains(logged.path.as_slice())
        {
            continue;
        }
        let alias = match layers.object_name(object) {
            Ok(Some(alias)) if alias != logged.path => alias,
            Ok(_) => continue,
            Err(e) => {
                out.errors.push((logged.path.clone(), e));
                continue;
            }
        };
        let mut names = vec![alias];
        // Classified first: that is how the layers learn it has other names.
        reached(&names, &mut states, &mut out.errors, &mut named);
        match layers.other_names(&names[0]) {
            Ok(others) => names.extend(others.into_iter().filter(|n| *n != logged.path)),
            Err(e) => out.errors.push((names[0].clone(), e)),
        }
        reached(&names[1..], &mut states, &mut out.errors, &mut named);
        links.insert(logged.path.clone(), names);
    }
    if !named.is_empty() {
        net.extend(named);
        net.sort_by(|a, b| a.path.cmp(&b.path));
    }

    let observations = &mut out.batch.observations;
    let (moved_in, overlay_own) = moves_in(work, &states, recorded)?;
    // The same change, logged for every other name of the file (hard links); by a
    // resetting process, a reset.
    // Where each path was last given its entry (created, renamed or moved to): a name
    // made after a change did not have it.
    let mut made_at: HashMap<&[u8], usize> = HashMap::new();
    for (i, l) in work.log.iter().enumerate() {
        if matches!(
            l.step,
            Step::Action(Action::Created | Action::RenamedTo) | Step::MovedIn
        ) {
            made_at.insert(&l.path, i);
        }
    }
    let to_other_names = |observations: &mut Vec<Observation>, i: usize, action| {
        let logged = &work.log[i];
        let action = match &logged.origin {
            Some(o) if resetting.contains(&o.pid) => Action::Reset,
            _ => action,
        };
        for name in links.get(&logged.path).into_iter().flatten() {
            if made_at.get(name.as_slice()).is_some_and(|&m| m > i) {
                continue;
            }
            let state = states.get(name).copied().flatten();
            let logged = Logged {
                path: name.clone(),
                ..logged.clone()
            };
            observations.push(observation(&logged, action, state));
        }
    };
    // Log order, with each rename's second half right after its first: the store
    // links a `RenamedFrom` to the `RenamedTo` that follows it.
    let mut order = Vec::with_capacity(work.log.len());
    let mut placed = vec![false; work.log.len()];
    for i in 0..work.log.len() {
        for j in std::iter::once(i).chain(work.log[i].renamed_to) {
            if !placed[j] {
                placed[j] = true;
                order.push(j);
            }
        }
    }
    for i in order {
        if overlay_own.contains(&i) {
            continue;
        }
        let logged = &work.log[i];
        // What the path shows now says nothing of an entry that left it since.
        let state = match work.is_current(logged) {
            true => states.get(&logged.path).copied().flatten(),
            false => None,
        };
        let action = match logged.step {
            Step::Absorbed(action) => {
                to_other_names(observations, i, action);
                continue;
            }
            Step::MovedIn => match moved_in.get(&i) {
                Some(action) => *action,
                // A copy-up: its content and attribute events say what changed.
                None => continue,
            },
            Step::Action(action) => corrected(action, state),
        };
        let resetting = logged
            .origin
            .as_ref()
            .is_some_and(|o| resetting.contains(&o.pid));
        let changes_content = matches!(action, Action::Written | Action::Attrib);
        let what = action;
        let action = if resetting { Action::Reset } else { action };
        // What left a path is not what is there now: what moved is what arrived at
        // the other end of the rename; what was deleted, the store knows
        // (`Observation::file_type`).
        let state = match logged.step {
            Step::Action(Action::Deleted) => None,
            Step::Action(Action::RenamedFrom) => logged
                .renamed_to
                .and_then(|j| states.get(&work.log[j].path).copied().flatten()),
            _ => state,
        };
        // Typed by what happened (a reset of a deleted symlink is no file).
        observations.push(Observation {
            action,
            ..observation(logged, what, state)
        });
        // What a reset removed along with a dir was reset too, by the same process.
        if resetting
            && logged.step == Step::Action(Action::Deleted)
            && logged.file_type == FileType::Dir
        {
            for (path, entry) in recorded.net_under(&logged.path)? {
                // Those with events of their own are logged by them.
                if work.paths.contains_key(&path) {
                    continue;
                }
                observations.push(Observation {
                    action: Action::Reset,
                    path,
                    file_type: entry.file_type,
                    origin: logged.origin.clone(),
                    time_ns: logged.time_ns,
                });
            }
        }
        if changes_content {
            to_other_names(observations, i, action);
        }
    }
    Ok(out)
}

/// What overlayfs did with each entry it moved in from its work dir, by index in the
/// log (a copy-up is absent: its content and attribute events say what changed), and
/// the steps not to log: the out halves of its exchanges, which are its own business,
/// and the writes and attribute changes that are part of making a new entry.
///
/// Overlayfs (fs/overlayfs/dir.c, copy_up.c) moves an entry in from its work dir to
/// copy a lower entry up, to put a whiteout where a lower entry is deleted, and to put
/// a new entry where a whiteout is (an exchange: the whiteout moves out; Linux 6.x
/// reports only the move in). What moved in says which: a whiteout is a deletion; an
/// entry is a copy-up when the path had no upper entry before it, else a creation.
/// The type of what moved in is taken when the event is read; when it was gone by
/// then, the moves at one path alternate between whiteout and entry and the last is
/// what the path shows now.
fn moves_in(
    work: &WorkSet,
    states: &HashMap<Vec<u8>, Net>,
    recorded: &dyn Recorded,
) -> Result<(HashMap<usize, Action>, HashSet<usize>), StoreError> {
    let log = &work.log;
    let is_out_half = |j: usize, path: &[u8]| {
        log.get(j).is_some_and(|l| {
            l.step == Step::Action(Action::RenamedFrom) && l.renamed_to.is_none() && l.path == path
        })
    };
    let mut overlay_own = HashSet::new();
    // Per path, the indices of its move-ins in log order; per move-in, the out half
    // of its exchange.
    let mut by_path: HashMap<&[u8], Vec<usize>> = HashMap::new();
    let mut out_half: HashMap<usize, usize> = HashMap::new();
    for (i, l) in log.iter().enumerate() {
        if l.step != Step::MovedIn {
            continue;
        }
        let partner = [i + 1, i.wrapping_sub(1)]
            .into_iter()
            .find(|&j| is_out_half(j, &l.path) && !overlay_own.contains(&j));
        if let Some(j) = partner {
            overlay_own.insert(j);
            out_half.insert(i, j);
        }
        by_path.entry(&l.path).or_default().push(i);
    }
    let mut out = HashMap::new();
    for (path, moves) in by_path {
        let state = states.get(path).copied().flatten();
        // Whether each move put a whiteout in place (`None`: unknown), last first.
        let mut whiteouts: Vec<Option<bool>> = Vec::with_capacity(moves.len());
        for (k, &i) in moves.iter().enumerate().rev() {
            let put = match (log[i].file_type, moves.get(k + 1)) {
                (FileType::Whiteout, _) => Some(true),
                (FileType::Unknown, None) if work.is_current(&log[i]) => {
                    Some(matches!(state, Some((NetKind::Removed, _))))
                }
                (FileType::Unknown, Some(&next))
                    if only_content_between(log, path, i, next, &overlay_own) =>
                {
                    whiteouts.last().copied().flatten().map(|w| !w)
                }
                (FileType::Unknown, _) => None,
                // The event named what moved in: an entry.
                _ => Some(false),
            };
            whiteouts.push(put);
        }
        whiteouts.reverse();
        for (k, &i) in moves.iter().enumerate() {
            // What the path held in the upper dir before this move; `None`: not known.
            let before = if k == 0 {
                let earlier = log[..i].iter().enumerate().any(|(j, l)| {
                    l.path == path && !overlay_own.contains(&j) && !is_content(l.step)
                });
                match earlier {
                    true => None,
                    false => Some(match recorded.net_entry(path)? {
                        Some(NetEntry {
                            kind: NetKind::Removed,
                            ..
                        }) => Upper::Whiteout,
                        Some(_) => Upper::Entry,
                        None => Upper::Nothing,
                    }),
                }
            } else if only_content_between(log, path, moves[k - 1], i, &overlay_own) {
                whiteouts[k - 1].map(|w| if w { Upper::Whiteout } else { Upper::Entry })
            } else {
                None
            };
            // The out half of an exchange says what left the path: a dir left when
            // an emptied dir took its place.
            let dir_left = out_half
                .get(&i)
                .is_some_and(|&j| log[j].file_type == FileType::Dir);
            let action = match (whiteouts[k], before) {
                (Some(true), _) => Action::Deleted,
                // Before removing a dir that holds whiteouts, overlayfs exchanges it
                // for an empty one (`ovl_clear_empty`): part of the removal.
                (Some(false), _) if dir_left && log[i].file_type == FileType::Dir => continue,
                (Some(false), Some(Upper::Whiteout)) => Action::Created,
                // The recorded state was read after the whiteout this replaced.
                (Some(false), Some(Upper::Entry)) => Action::Created,
                // An opaque dir made where a lower dir was removed.
                (Some(false), None)
                    if moves.len() == k + 1
                        && matches!(state, Some((NetKind::Replaced, FileType::Dir))) =>
                {
                    Action::Created
                }
                // A copy-up (no upper entry before it), or a move nothing tells about.
                _ => continue,
            };
            out.insert(i, action);
            if action == Action::Created {
                // The new entry's own writes and attribute changes (overlayfs sets up
                // a new dir's attributes before moving it in) are part of making it,
                // as for a creation in place.
                let part = |j: usize| log[j].path == path && log[j].origin == log[i].origin;
                let later = (i + 1..log.len()).filter(|&j| log[j].path == path);
                let earlier = (0..i).rev().filter(|&j| log[j].path == path);
                let parts: Vec<usize> = later
                    .take_while(|&j| is_content(log[j].step) || overlay_own.contains(&j))
                    .chain(earlier.take_while(|&j| is_content(log[j].step)))
                    .filter(|&j| part(j) && is_content(log[j].step))
                    .collect();
                overlay_own.extend(parts);
            }
        }
    }
    Ok((out, overlay_own))
}

/// What a path holds in the upper dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upper {
    Whiteout,
    Entry,
    Nothing,
}

fn is_content(step: Step) -> bool {
    matches!(
        step,
        Step::Action(Action::Written | Action::Attrib) | Step::Absorbed(_)
    )
}

/// True when, at `path`, the log between `from` and `to` holds nothing but the
/// halves of overlayfs' exchanges, writes and attribute changes.
fn only_content_between(
    log: &[Logged],
    path: &[u8],
    from: usize,
    to: usize,
    overlay_own: &HashSet<usize>,
) -> bool {
    (from + 1..to).all(|k| {
        let l = &log[k];
        l.path != path || overlay_own.contains(&k) || is_content(l.step)
    })
}

/// `action` as what the path turned out to be says it was.
fn corrected(action: Action, state: Net) -> Action {
    match (action, state) {
        // Overlayfs deletes a lower entry by putting a (shared) whiteout in its place.
        (Action::Created | Action::RenamedTo, Some((_, FileType::Whiteout))) => Action::Deleted,
        // A copy-up creates the upper file of a path the lower layers already hold: to
        // the user that path was written, not created.
        (Action::Created, Some((NetKind::Modified, _))) => Action::Written,
        (Action::Created, Some((NetKind::Metadata, _))) => Action::Attrib,
        (action, _) => action,
    }
}

fn observation(logged: &Logged, action: Action, state: Net) -> Observation {
    // The type the filesystem shows, else what the event said; a file by default,
    // unless it is gone (left unknown for the store to fill in).
    let file_type = match (logged.file_type, state) {
        (FileType::Unknown, Some((_, ft))) => ft,
        (FileType::Unknown, None) if !matches!(action, Action::Deleted | Action::RenamedFrom) => {
            FileType::File
        }
        (ft, _) => ft,
    };
    Observation {
        action,
        path: logged.path.clone(),
        file_type,
        origin: logged.origin.clone(),
        time_ns: logged.time_ns,
    }
}
