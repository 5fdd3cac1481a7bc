//! Model test: random operations applied to a `Store` and to a tiny in-memory model
//! of the documented semantics; every answer of the store must equal the model's.

mod common;

use common::{ACTIONS, KINDS, Model, history};
use proptest::prelude::*;
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
const TYPES: &[FileType] = &[FileType::File, FileType::Dir, FileType::Whiteout];
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
            prop_assert_eq!(&cs.changes, &model.since(t.seq, b""), "since {}", t);
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
        prop_assert_eq!(history(store, p), model.history(p));
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
                    model.rebuild(entries);
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
