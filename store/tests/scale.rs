//! The model test at scale: thousands of paths with long shared prefixes and batches
//! of up to thousands of records, so that net buckets split, empty and move, and log
//! chunks fill up and are extended across batches. Same semantics as `model.rs`.

use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use store::*;

const DIRS: u32 = 12;
const FILES: u32 = 400;

fn path_of(n: u32) -> Vec<u8> {
    // Long shared prefixes, and names that sort around the '/' separator.
    let (d, f) = (n / FILES % DIRS, n % FILES);
    match f % 7 {
        0 => format!("lib/python3.11/site-packages/pkg{d}").into_bytes(),
        1 => format!("lib/python3.11/site-packages/pkg{d}-{f}.dist-info/RECORD").into_bytes(),
        _ => format!("lib/python3.11/site-packages/pkg{d}/sub{}/mod{f}.py", f % 5).into_bytes(),
    }
}

const KINDS: &[NetKind] = &[
    NetKind::Added,
    NetKind::Modified,
    NetKind::Metadata,
    NetKind::Removed,
    NetKind::Replaced,
];
const ACTIONS: &[Action] = &[
    Action::Created,
    Action::Written,
    Action::Attrib,
    Action::Deleted,
    Action::RenamedFrom,
    Action::RenamedTo,
];

#[derive(Debug, Clone)]
enum Op {
    /// A run of `len` paths from `first` (a storm), with every `step`-th one touched;
    /// `clear`: the run is deleted instead of created or changed.
    Storm {
        first: u32,
        len: u32,
        step: u32,
        clear: bool,
        observe: bool,
        kind: usize,
        pid: u32,
    },
    Mark,
    Rebuild {
        keep_every: u32,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let storm = (
        0..DIRS * FILES,
        1u32..3000,
        1u32..4,
        any::<bool>(),
        prop::bool::weighted(0.8),
        0..KINDS.len(),
        0u32..40,
    )
        .prop_map(|(first, len, step, clear, observe, kind, pid)| Op::Storm {
            first,
            len,
            step,
            clear,
            observe,
            kind,
            pid,
        });
    prop_oneof![
        10 => storm,
        2 => Just(Op::Mark),
        1 => (1u32..5).prop_map(|keep_every| Op::Rebuild { keep_every }),
        1 => Just(Op::Reopen),
    ]
}

fn origin(pid: u32) -> Option<Origin> {
    (!pid.is_multiple_of(10)).then(|| Origin {
        pid,
        command: format!(
            "/usr/bin/tool{} --arg {}",
            pid % 3,
            "x".repeat(pid as usize)
        )
        .into_bytes(),
    })
}

fn storm(
    first: u32,
    len: u32,
    step: u32,
    clear: bool,
    observe: bool,
    kind: usize,
    pid: u32,
) -> Batch {
    let mut b = Batch::default();
    let total = DIRS * FILES;
    for i in (0..len).step_by(step as usize) {
        let path = path_of((first + i) % total);
        let kind = KINDS[(kind + i as usize) % KINDS.len()];
        if observe || i % 3 == 0 {
            b.observations.push(Observation {
                action: ACTIONS[(i as usize + pid as usize) % ACTIONS.len()],
                path: path.clone(),
                file_type: if clear {
                    FileType::Unknown
                } else {
                    FileType::File
                },
                origin: origin(pid + i % 2),
                time_ns: u64::from(first) * 1_000_000 + u64::from(i),
            });
        }
        if i % 5 != 4 {
            b.net.push(NetUpdate {
                path,
                state: (!clear).then_some((kind, FileType::File)),
            });
        }
    }
    b
}

#[derive(Default)]
struct Model {
    net: BTreeMap<Vec<u8>, NetEntry>,
    records: Vec<LogRecord>,
    last_seq: u64,
}

impl Model {
    fn apply(&mut self, observations: &[Observation], net: &[NetUpdate]) {
        let old = self.net.clone();
        let mut seq = self.last_seq;
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
                file_type: o.file_type,
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

    fn since(&self, seq: u64, prefix: &[u8]) -> Vec<Change> {
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

    fn full(&self, prefix: &[u8]) -> Vec<Change> {
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
}

fn zero_reclassified_times(records: &mut [LogRecord]) {
    for r in records {
        if r.action == Action::Reclassified {
            r.time_ns = 0;
        }
    }
}

fn check(store: &Store, model: &Model, tokens: &[Token], probe: u32) -> Result<(), TestCaseError> {
    let now = store.token();
    prop_assert_eq!(now.seq, model.last_seq);
    let full = store.query(&Query::default()).unwrap();
    let want: Vec<Change> = model
        .net
        .iter()
        .map(|(path, e)| Change {
            path: path.clone(),
            kind: Some(e.kind),
            before: None,
            file_type: e.file_type,
            origin: e.origin.clone(),
            seq: e.seq,
        })
        .collect();
    prop_assert_eq!(full.changes.len(), want.len());
    prop_assert!(full.changes == want, "full net state differs");
    for prefix in [
        &b"lib/python3.11/site-packages/pkg1"[..],
        b"lib/python3.11/site-packages/pkg3/sub2",
    ] {
        let q = Query {
            prefixes: vec![prefix.to_vec()],
            ..Query::default()
        };
        let got = store.query(&q).unwrap().changes;
        prop_assert!(
            got == model.full(prefix),
            "prefix {:?} differs",
            prefix.escape_ascii().to_string()
        );
    }
    for t in tokens.iter().filter(|t| t.instance == now.instance) {
        let cs = store
            .query(&Query {
                since: Some(Since::Token(*t)),
                ..Query::default()
            })
            .unwrap();
        prop_assert_eq!(cs.fresh, None);
        prop_assert!(cs.changes == model.since(t.seq, b""), "since {} differs", t);
    }
    let under = store
        .net_under(b"lib/python3.11/site-packages/pkg2")
        .unwrap();
    let want_under: Vec<(Vec<u8>, NetEntry)> = model
        .net
        .iter()
        .filter(|(p, _)| p.starts_with(b"lib/python3.11/site-packages/pkg2/"))
        .map(|(p, e)| (p.clone(), e.clone()))
        .collect();
    prop_assert!(under == want_under, "net_under differs");
    prop_assert_eq!(store.stats().unwrap().net_paths, model.net.len() as u64);
    for n in (probe..DIRS * FILES).step_by(97) {
        let p = path_of(n);
        let mut hist = store.history(&p).unwrap();
        zero_reclassified_times(&mut hist);
        let want: Vec<LogRecord> = model
            .records
            .iter()
            .filter(|r| r.path == p)
            .cloned()
            .collect();
        prop_assert!(hist == want, "history of {} differs", p.escape_ascii());
        prop_assert_eq!(store.net_entry(&p).unwrap(), model.net.get(&p).cloned());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model_at_scale(ops in proptest::collection::vec(op(), 1..16)) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Some(Store::open(dir.path()).unwrap());
        let mut model = Model::default();
        let mut tokens = vec![store.as_ref().unwrap().token()];
        for (step, op) in ops.into_iter().enumerate() {
            let s = store.as_ref().unwrap();
            match op {
                Op::Storm { first, len, step, clear, observe, kind, pid } => {
                    let b = storm(first, len, step, clear, observe, kind, pid);
                    let t = s.apply(&b).unwrap();
                    model.apply(&b.observations, &b.net);
                    prop_assert_eq!(t.seq, model.last_seq);
                }
                Op::Mark => {
                    s.mark("m").unwrap();
                }
                Op::Rebuild { keep_every } => {
                    let before = s.token();
                    // Keep some entries, change some kinds, add a run of new ones.
                    let mut entries: Vec<(Vec<u8>, NetKind, FileType)> = model
                        .net
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| !(*i as u32).is_multiple_of(keep_every))
                        .map(|(i, (p, e))| {
                            let kind = if i % 3 == 0 { NetKind::Metadata } else { e.kind };
                            (p.clone(), kind, e.file_type)
                        })
                        .collect();
                    entries.extend((0..300).map(|n| (path_of(n * 13 % (DIRS * FILES)), NetKind::Added, FileType::Dir)));
                    let gap = s.rebuild(entries.clone(), "test").unwrap();
                    let mut updates: Vec<NetUpdate> = model
                        .net
                        .keys()
                        .map(|p| NetUpdate { path: p.clone(), state: None })
                        .collect();
                    updates.extend(entries.into_iter().map(|(path, k, f)| NetUpdate {
                        path,
                        state: Some((k, f)),
                    }));
                    model.apply(&[], &updates);
                    tokens.push(Token { instance: gap.new_instance, seq: before.seq });
                }
                Op::Reopen => {
                    drop(store.take());
                    store = Some(Store::open(dir.path()).unwrap());
                }
            }
            let s = store.as_ref().unwrap();
            check(s, &model, &tokens, step as u32 % 97)?;
            tokens.push(s.token());
        }
    }
}
