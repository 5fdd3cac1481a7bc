//! Model test: random operations applied to a `Store` and to a tiny in-memory model
//! of the documented semantics; every answer of the store must equal the model's.

use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use store::*;

const PATHS: &[&[u8]] = &[
    b"a",
    b"a/b",
    b"a/b/c",
    b"ab",
    b"b",
    b"c\n",
    b"\xff\xfe",
    b"\xff/x",
];
const KINDS: &[NetKind] = &[
    NetKind::Added,
    NetKind::Modified,
    NetKind::Metadata,
    NetKind::Removed,
    NetKind::Replaced,
];
const TYPES: &[FileType] = &[FileType::File, FileType::Dir, FileType::Whiteout];
const ACTIONS: &[Action] = &[
    Action::Created,
    Action::Written,
    Action::Attrib,
    Action::Deleted,
    Action::RenamedFrom,
    Action::RenamedTo,
    Action::Reset,
];
const MARKS: &[&str] = &["m0", "m1", "build-start"];

#[derive(Debug, Clone)]
enum Op {
    Apply(Batch),
    Mark(&'static str),
    Rebuild(Vec<(Vec<u8>, NetKind, FileType)>),
    Reopen,
}

fn path() -> impl Strategy<Value = Vec<u8>> {
    proptest::sample::select(PATHS).prop_map(<[u8]>::to_vec)
}

fn state() -> impl Strategy<Value = Option<(NetKind, FileType)>> {
    proptest::option::weighted(
        0.7,
        (
            proptest::sample::select(KINDS),
            proptest::sample::select(TYPES),
        ),
    )
}

fn observation() -> impl Strategy<Value = Observation> {
    (
        proptest::sample::select(ACTIONS),
        path(),
        proptest::sample::select(TYPES),
        proptest::option::of(0u32..4),
        0u64..1000,
    )
        .prop_map(|(action, path, file_type, pid, time_ns)| Observation {
            action,
            path,
            file_type,
            origin: pid.map(|pid| Origin {
                pid,
                command: vec![b'c', pid as u8],
            }),
            time_ns,
        })
}

fn op() -> impl Strategy<Value = Op> {
    let batch = (
        proptest::collection::vec(observation(), 0..5),
        proptest::collection::vec(
            (path(), state()).prop_map(|(path, state)| NetUpdate { path, state }),
            0..5,
        ),
    )
        .prop_map(|(observations, net)| Op::Apply(Batch { observations, net }));
    let rebuild = proptest::collection::vec(
        (
            path(),
            proptest::sample::select(KINDS),
            proptest::sample::select(TYPES),
        ),
        0..5,
    )
    .prop_map(Op::Rebuild);
    prop_oneof![
        8 => batch,
        2 => proptest::sample::select(MARKS).prop_map(Op::Mark),
        1 => rebuild,
        1 => Just(Op::Reopen),
    ]
}

/// The semantics, written as plainly as possible.
#[derive(Default)]
struct Model {
    net: BTreeMap<Vec<u8>, NetEntry>,
    records: Vec<LogRecord>,
    last_seq: u64,
    /// Which rebuild epoch each instance belongs to is implied by this list: tokens
    /// handed out, with the instance current when they were.
    tokens: Vec<Token>,
    marks: BTreeMap<String, Token>,
}

impl Model {
    fn apply(&mut self, observations: &[Observation], net: &[NetUpdate]) {
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

    fn full(&self) -> Vec<Change> {
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

    fn since(&self, seq: u64) -> Vec<Change> {
        let mut seen: BTreeMap<Vec<u8>, (Option<NetKind>, &LogRecord)> = BTreeMap::new();
        for r in self.records.iter().filter(|r| r.seq > seq) {
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
}

fn check(store: &Store, model: &Model) -> Result<(), TestCaseError> {
    let now = store.token();
    prop_assert_eq!(now.seq, model.last_seq);
    let full = store.query(&Query::default()).unwrap();
    prop_assert_eq!(full.token, now);
    prop_assert_eq!(full.fresh, None);
    prop_assert_eq!(&full.changes, &model.full());
    for t in &model.tokens {
        let cs = store
            .query(&Query {
                since: Some(Since::Token(*t)),
                ..Query::default()
            })
            .unwrap();
        prop_assert_eq!(cs.token, now);
        if t.instance == now.instance {
            prop_assert_eq!(cs.fresh, None, "token {}", t);
            prop_assert_eq!(&cs.changes, &model.since(t.seq), "since {}", t);
        } else {
            prop_assert_eq!(
                cs.fresh,
                Some(FreshReason::OtherInstance {
                    asked: t.instance,
                    current: now.instance
                })
            );
            prop_assert_eq!(&cs.changes, &full.changes);
        }
    }
    prop_assert_eq!(
        store.marks().unwrap(),
        model
            .marks
            .iter()
            .map(|(n, t)| (n.clone(), *t))
            .collect::<Vec<_>>()
    );
    for (name, t) in &model.marks {
        let by_mark = store
            .query(&Query {
                since: Some(parse_since(name)),
                ..Query::default()
            })
            .unwrap();
        let by_token = store
            .query(&Query {
                since: Some(parse_since(&t.to_string())),
                ..Query::default()
            })
            .unwrap();
        prop_assert_eq!(by_mark, by_token);
    }
    for p in PATHS {
        let mut hist = store.history(p).unwrap();
        for r in &mut hist {
            if r.action == Action::Reclassified {
                r.time_ns = 0;
            }
        }
        let want: Vec<LogRecord> = model
            .records
            .iter()
            .filter(|r| r.path == *p)
            .cloned()
            .collect();
        prop_assert_eq!(hist, want);
        prop_assert_eq!(store.net_entry(p).unwrap(), model.net.get(*p).cloned());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(ops in proptest::collection::vec(op(), 1..30)) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Some(Store::open(dir.path()).unwrap());
        let mut model = Model::default();
        model.tokens.push(store.as_ref().unwrap().token());
        for op in ops {
            let s = store.as_ref().unwrap();
            match op {
                Op::Apply(batch) => {
                    let t = s.apply(&batch).unwrap();
                    model.apply(&batch.observations, &batch.net);
                    prop_assert_eq!(t.seq, model.last_seq);
                }
                Op::Mark(name) => {
                    let t = s.mark(name).unwrap();
                    prop_assert_eq!(t, s.token());
                    model.marks.insert(name.to_string(), t);
                }
                Op::Rebuild(entries) => {
                    let before = s.token();
                    let gap = s.rebuild(entries.clone(), "test").unwrap();
                    prop_assert_eq!(gap.old_instance, before.instance);
                    prop_assert_ne!(gap.new_instance, before.instance);
                    prop_assert_eq!(gap.seq, before.seq + 1);
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
                    prop_assert_eq!(s.token().instance, gap.new_instance);
                    prop_assert_eq!(s.gaps().unwrap().pop(), Some(gap.clone()));
                    // The start of the new instance is a valid position too.
                    model.tokens.push(Token { instance: gap.new_instance, seq: before.seq });
                }
                Op::Reopen => {
                    // The old handle must go first: sled locks the db per process.
                    drop(store.take());
                    store = Some(Store::open(dir.path()).unwrap());
                }
            }
            let s = store.as_ref().unwrap();
            check(s, &model)?;
            model.tokens.push(s.token());
        }
    }
}
