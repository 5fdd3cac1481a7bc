//! The reference model that `model.rs` and `scale.rs` check a `Store` against: the
//! documented semantics, written as plainly as possible, with the tables and helpers
//! both tests use. Each test keeps its own operations, strategies and scale.

// Each test crate includes this module and uses only part of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use store::*;

pub const KINDS: &[NetKind] = &[
    NetKind::Added,
    NetKind::Modified,
    NetKind::Metadata,
    NetKind::Removed,
    NetKind::Replaced,
];
/// Every action an observation may carry (`Reclassified` is the store's own), `Reset`
/// last.
pub const ACTIONS: &[Action] = &[
    Action::Created,
    Action::Written,
    Action::Attrib,
    Action::Deleted,
    Action::RenamedFrom,
    Action::RenamedTo,
    Action::Reset,
];

/// The semantics, written as plainly as possible.
#[derive(Default)]
pub struct Model {
    pub net: BTreeMap<Vec<u8>, NetEntry>,
    pub records: Vec<LogRecord>,
    pub last_seq: u64,
    /// Which rebuild epoch each instance belongs to is implied by this list: tokens
    /// handed out, with the instance current when they were.
    pub tokens: Vec<Token>,
    pub marks: BTreeMap<String, Token>,
}

impl Model {
    pub fn apply(&mut self, observations: &[Observation], net: &[NetUpdate]) {
        let old = self.net.clone();
        let mut seq = self.last_seq;
        // path -> (seq of its last record, origin of its last observation if any)
        let mut last: BTreeMap<Vec<u8>, (u64, Option<Option<Origin>>)> = BTreeMap::new();
        let mut linked_prev = false;
        for (i, o) in observations.iter().enumerate() {
            seq += 1;
            let mut link = None;
            if linked_prev {
                link = Some(seq - 1);
                linked_prev = false;
            } else if o.action == Action::RenamedFrom
                && observations.get(i + 1).map(|n| n.action) == Some(Action::RenamedTo)
            {
                link = Some(seq + 1);
                linked_prev = true;
            }
            self.records.push(LogRecord {
                seq,
                time_ns: o.time_ns,
                action: o.action,
                path: o.path.clone(),
                // A deletion or rename of unknown type is of what the net state held.
                file_type: match (o.file_type, o.action, old.get(&o.path)) {
                    (
                        FileType::Unknown,
                        Action::Deleted | Action::RenamedFrom | Action::Reset,
                        Some(e),
                    ) => e.file_type,
                    (file_type, _, _) => file_type,
                },
                origin: o.origin.clone(),
                link,
                before: old.get(&o.path).map(|e| e.kind),
            });
            last.insert(o.path.clone(), (seq, Some(o.origin.clone())));
        }
        let mut updates = BTreeMap::new();
        for u in net {
            updates.insert(u.path.clone(), u.state);
        }
        let mut changed = BTreeSet::new();
        for (path, new) in &updates {
            let cur = old.get(path).map(|e| (e.kind, e.file_type));
            if *new == cur {
                continue;
            }
            changed.insert(path.clone());
            if !last.contains_key(path) {
                seq += 1;
                self.records.push(LogRecord {
                    seq,
                    time_ns: 0,
                    action: Action::Reclassified,
                    path: path.clone(),
                    file_type: new.or(cur).unwrap().1,
                    origin: None,
                    link: None,
                    before: cur.map(|c| c.0),
                });
                last.insert(path.clone(), (seq, None));
            }
            let (lseq, observed) = last[path].clone();
            match new {
                Some((kind, file_type)) => {
                    let origin = match observed {
                        Some(o) => o,
                        None => old.get(path).and_then(|e| e.origin.clone()),
                    };
                    self.net.insert(
                        path.clone(),
                        NetEntry {
                            kind: *kind,
                            file_type: *file_type,
                            origin,
                            seq: lseq,
                        },
                    );
                }
                None => {
                    self.net.remove(path);
                }
            }
        }
        for (path, (lseq, observed)) in last {
            if changed.contains(&path) {
                continue;
            }
            if let (Some(e), Some(origin)) = (self.net.get_mut(&path), observed) {
                e.seq = lseq;
                e.origin = origin;
            }
        }
        self.last_seq = seq;
    }

    /// A rebuild: every path's net state is replaced by `entries`, as one batch
    /// without observations.
    pub fn rebuild(&mut self, entries: Vec<(Vec<u8>, NetKind, FileType)>) {
        let mut updates: Vec<NetUpdate> = self
            .net
            .keys()
            .map(|p| NetUpdate {
                path: p.clone(),
                state: None,
            })
            .collect();
        updates.extend(entries.into_iter().map(|(path, k, f)| NetUpdate {
            path,
            state: Some((k, f)),
        }));
        self.apply(&[], &updates);
    }

    /// The answer to a query without `since` nor prefixes: the whole net state.
    pub fn full(&self) -> Vec<Change> {
        self.net
            .iter()
            .map(|(path, e)| Change {
                path: path.clone(),
                kind: Some(e.kind),
                before: None,
                file_type: e.file_type,
                origin: e.origin.clone(),
                seq: e.seq,
            })
            .collect()
    }

    /// The answer to a query for the paths under `prefix` (all of them if it is empty).
    pub fn full_under(&self, prefix: &[u8]) -> Vec<Change> {
        self.since(0, prefix)
            .into_iter()
            .filter(|c| c.kind.is_some())
            .map(|mut c| {
                let e = &self.net[&c.path];
                c.before = None;
                c.seq = e.seq;
                c
            })
            .collect()
    }

    /// The answer to a query since `seq` of the current instance, for the paths under
    /// `prefix` (all of them if it is empty).
    pub fn since(&self, seq: u64, prefix: &[u8]) -> Vec<Change> {
        let under = |p: &[u8]| {
            p.strip_prefix(prefix)
                .is_some_and(|r| prefix.is_empty() || r.is_empty() || r[0] == b'/')
        };
        let mut seen: BTreeMap<Vec<u8>, (Option<NetKind>, &LogRecord)> = BTreeMap::new();
        for r in self
            .records
            .iter()
            .filter(|r| r.seq > seq && under(&r.path))
        {
            seen.entry(r.path.clone())
                .and_modify(|s| s.1 = r)
                .or_insert((r.before, r));
        }
        seen.into_iter()
            .filter_map(|(path, (before, last))| {
                let e = self.net.get(&path);
                if e.is_none() && before.is_none() {
                    return None;
                }
                Some(Change {
                    kind: e.map(|e| e.kind),
                    before,
                    file_type: e.map_or(last.file_type, |e| e.file_type),
                    origin: e.map_or(last.origin.clone(), |e| e.origin.clone()),
                    seq: last.seq,
                    path,
                })
            })
            .collect()
    }

    /// The records of `path`, oldest first.
    pub fn history(&self, path: &[u8]) -> Vec<LogRecord> {
        self.records
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }
}

/// The store's history of `path`, with the times of `Reclassified` records (which the
/// store takes from its clock) zeroed as the model has them.
pub fn history(store: &Store, path: &[u8]) -> Vec<LogRecord> {
    let mut records = store.history(path).unwrap();
    for r in &mut records {
        if r.action == Action::Reclassified {
            r.time_ns = 0;
        }
    }
    records
}
