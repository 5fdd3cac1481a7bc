//! The model test at scale: thousands of paths with long shared prefixes and batches
//! of up to thousands of records, so that net buckets split, empty and move, and log
//! chunks fill up and are extended across batches. Same semantics as `model.rs`.

mod common;

use common::{ACTIONS, KINDS, Model, history};
use proptest::prelude::*;
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

/// The actions a storm cycles through: all but `Reset`.
const STORM_ACTIONS: &[Action] = match ACTIONS.split_last() {
    Some((Action::Reset, rest)) => rest,
    _ => panic!("ACTIONS ends with Reset"),
};

/// A run of `len` paths from `first`, with every `step`-th one touched; `clear`: the
/// run is deleted instead of created or changed.
#[derive(Debug, Clone)]
struct Storm {
    first: u32,
    len: u32,
    step: u32,
    clear: bool,
    observe: bool,
    kind: usize,
    pid: u32,
}

#[derive(Debug, Clone)]
enum Op {
    Storm(Storm),
    Mark,
    Rebuild { keep_every: u32 },
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
        .prop_map(|(first, len, step, clear, observe, kind, pid)| {
            Op::Storm(Storm {
                first,
                len,
                step,
                clear,
                observe,
                kind,
                pid,
            })
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

impl Storm {
    fn batch(&self) -> Batch {
        let mut b = Batch::default();
        let total = DIRS * FILES;
        for i in (0..self.len).step_by(self.step as usize) {
            let path = path_of((self.first + i) % total);
            let kind = KINDS[(self.kind + i as usize) % KINDS.len()];
            if self.observe || i % 3 == 0 {
                b.observations.push(Observation {
                    action: STORM_ACTIONS[(i as usize + self.pid as usize) % STORM_ACTIONS.len()],
                    path: path.clone(),
                    file_type: if self.clear {
                        FileType::Unknown
                    } else {
                        FileType::File
                    },
                    origin: origin(self.pid + i % 2),
                    time_ns: u64::from(self.first) * 1_000_000 + u64::from(i),
                });
            }
            if i % 5 != 4 {
                b.net.push(NetUpdate {
                    path,
                    state: (!self.clear).then_some((kind, FileType::File)),
                });
            }
        }
        b
    }
}

fn check(store: &Store, model: &Model, probe: u32) -> Result<(), TestCaseError> {
    let now = store.token();
    prop_assert_eq!(now.seq, model.last_seq);
    let full = store.query(&Query::default()).unwrap();
    let want = model.full();
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
            got == model.full_under(prefix),
            "prefix {:?} differs",
            prefix.escape_ascii().to_string()
        );
    }
    for t in model.tokens.iter().filter(|t| t.instance == now.instance) {
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
        prop_assert!(
            history(store, &p) == model.history(&p),
            "history of {} differs",
            p.escape_ascii()
        );
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
        model.tokens.push(store.as_ref().unwrap().token());
        for (step, op) in ops.into_iter().enumerate() {
            let s = store.as_ref().unwrap();
            match op {
                Op::Storm(storm) => {
                    let b = storm.batch();
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
                    model.rebuild(entries);
                    model.tokens.push(Token { instance: gap.new_instance, seq: before.seq });
                }
                Op::Reopen => {
                    drop(store.take());
                    store = Some(Store::open(dir.path()).unwrap());
                }
            }
            let s = store.as_ref().unwrap();
            check(s, &model, step as u32 % 97)?;
            model.tokens.push(s.token());
        }
    }
}
