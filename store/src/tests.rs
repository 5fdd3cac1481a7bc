//! Unit tests of the public API against real sled databases in temp dirs.

use crate::codec::{FORMAT_VERSION, encode, u64_key};
use crate::*;
use std::path::Path;

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    (dir, store)
}

fn origin(pid: u32) -> Option<Origin> {
    Some(Origin {
        pid,
        command: format!("cmd{pid}").into_bytes(),
    })
}

fn obs(action: Action, path: &[u8], file_type: FileType, pid: u32) -> Observation {
    Observation {
        action,
        path: path.to_vec(),
        file_type,
        origin: origin(pid),
        time_ns: 1000 + u64::from(pid),
    }
}

fn set(path: &[u8], kind: NetKind, file_type: FileType) -> NetUpdate {
    NetUpdate {
        path: path.to_vec(),
        state: Some((kind, file_type)),
    }
}

fn clear(path: &[u8]) -> NetUpdate {
    NetUpdate {
        path: path.to_vec(),
        state: None,
    }
}

fn batch(observations: Vec<Observation>, net: Vec<NetUpdate>) -> Batch {
    Batch { observations, net }
}

fn since(t: Token) -> Query {
    Query {
        since: Some(Since::Token(t)),
        ..Query::default()
    }
}

fn paths(cs: &ChangeSet) -> Vec<&[u8]> {
    cs.changes.iter().map(|c| c.path.as_slice()).collect()
}

fn create(store: &Store, path: &[u8], pid: u32) -> Token {
    store
        .apply(&batch(
            vec![obs(Action::Created, path, FileType::File, pid)],
            vec![set(path, NetKind::Added, FileType::File)],
        ))
        .unwrap()
}

#[test]
fn fresh_store_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let t0 = store.token();
    assert_eq!(t0.seq, 0);
    assert_ne!(t0.instance, 0);
    assert!(store.gaps().unwrap().is_empty());
    let t1 = create(&store, b"a", 1);
    assert_eq!(
        t1,
        Token {
            instance: t0.instance,
            seq: 1
        }
    );
    store.flush().unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.token(), t1);
    assert_eq!(store.net_entry(b"a").unwrap().unwrap().kind, NetKind::Added);
    // Another fresh db gets another instance.
    let (_d2, other) = open();
    assert_ne!(other.token().instance, t0.instance);
}

#[test]
fn apply_appends_records_and_net_state() {
    let (_d, store) = open();
    let t0 = store.token();
    let t = store
        .apply(&batch(
            vec![
                obs(Action::Created, b"a", FileType::Dir, 1),
                obs(Action::Created, b"a/b", FileType::File, 2),
                obs(Action::Written, b"a/b", FileType::File, 3),
            ],
            vec![
                set(b"a", NetKind::Added, FileType::Dir),
                set(b"a/b", NetKind::Added, FileType::File),
            ],
        ))
        .unwrap();
    assert_eq!(t.seq, 3);
    assert_eq!(t.instance, t0.instance);
    assert_eq!(store.token(), t);
    let hist = store.history(b"a/b").unwrap();
    assert_eq!(hist.len(), 2);
    assert_eq!(hist[0].seq, 2);
    assert_eq!(hist[0].action, Action::Created);
    assert_eq!(hist[0].before, None);
    assert_eq!(hist[0].time_ns, 1002);
    assert_eq!(hist[1].seq, 3);
    assert_eq!(hist[1].origin, origin(3));
    assert_eq!(
        store.net_entry(b"a/b").unwrap(),
        Some(NetEntry {
            kind: NetKind::Added,
            file_type: FileType::File,
            origin: origin(3),
            seq: 3
        })
    );
    assert_eq!(store.history(b"a").unwrap().len(), 1);
    assert!(store.net_entry(b"nope").unwrap().is_none());

    // The next batch's records see the state before it in `before`.
    store
        .apply(&batch(
            vec![obs(Action::Deleted, b"a/b", FileType::File, 4)],
            vec![clear(b"a/b")],
        ))
        .unwrap();
    let hist = store.history(b"a/b").unwrap();
    assert_eq!(hist[2].before, Some(NetKind::Added));
    assert_eq!(hist[2].seq, 4);
    assert!(store.net_entry(b"a/b").unwrap().is_none());

    // An empty batch writes nothing.
    assert_eq!(store.apply(&Batch::default()).unwrap().seq, 4);
}

#[test]
fn renames_are_linked() {
    let (_d, store) = open();
    create(&store, b"x", 1);
    store
        .apply(&batch(
            vec![
                obs(Action::RenamedFrom, b"x", FileType::File, 2),
                obs(Action::RenamedTo, b"y", FileType::File, 2),
                // Not directly after a RenamedFrom: unlinked.
                obs(Action::RenamedTo, b"z", FileType::File, 2),
                obs(Action::RenamedFrom, b"y", FileType::File, 2),
            ],
            vec![clear(b"x"), set(b"y", NetKind::Added, FileType::File)],
        ))
        .unwrap();
    let x = store.history(b"x").unwrap();
    let y = store.history(b"y").unwrap();
    assert_eq!(x[1].seq, 2);
    assert_eq!(x[1].link, Some(3));
    assert_eq!(y[0].seq, 3);
    assert_eq!(y[0].link, Some(2));
    assert_eq!(y[1].seq, 5);
    assert_eq!(y[1].link, None);
    assert_eq!(store.history(b"z").unwrap()[0].link, None);
}

#[test]
fn reclassified_records() {
    let (_d, store) = open();
    create(&store, b"d", 1);
    create(&store, b"d/f", 2);
    // The parent's removal clears the child without an event naming it.
    let t = store
        .apply(&batch(
            vec![obs(Action::Deleted, b"d", FileType::Dir, 3)],
            vec![
                clear(b"d"),
                clear(b"d/f"),
                set(b"e", NetKind::Replaced, FileType::Dir),
                // Equal to the current state (absent): nothing.
                clear(b"never"),
            ],
        ))
        .unwrap();
    assert_eq!(t.seq, 5);
    let f = store.history(b"d/f").unwrap();
    assert_eq!(f.len(), 2);
    let r = &f[1];
    assert_eq!(r.action, Action::Reclassified);
    assert_eq!(r.seq, 4); // reclassified records follow the observations, by path
    assert_eq!(r.file_type, FileType::File); // the old entry's type when clearing
    assert_eq!(r.before, Some(NetKind::Added));
    assert_eq!(r.origin, None);
    let e = store.history(b"e").unwrap();
    assert_eq!(e[0].seq, 5);
    assert_eq!(e[0].file_type, FileType::Dir);
    assert_eq!(e[0].before, None);
    assert_eq!(
        store.net_entry(b"e").unwrap(),
        Some(NetEntry {
            kind: NetKind::Replaced,
            file_type: FileType::Dir,
            origin: None,
            seq: 5
        })
    );
    assert!(store.history(b"never").unwrap().is_empty());

    // An update equal to the current state changes nothing at all.
    let same = store
        .apply(&batch(
            vec![],
            vec![set(b"e", NetKind::Replaced, FileType::Dir)],
        ))
        .unwrap();
    assert_eq!(same, t);

    // A reclassification keeps the entry's origin: no process is known for it.
    create(&store, b"g", 7);
    store
        .apply(&batch(
            vec![],
            vec![set(b"g", NetKind::Replaced, FileType::Dir)],
        ))
        .unwrap();
    let g = store.net_entry(b"g").unwrap().unwrap();
    assert_eq!(g.origin, origin(7));
    assert_eq!(g.kind, NetKind::Replaced);
    assert_eq!(g.seq, store.token().seq);
}

#[test]
fn observations_without_net_update() {
    let (_d, store) = open();
    create(&store, b"a", 1);
    // An existing entry follows its last change ...
    let t = store
        .apply(&batch(
            vec![obs(Action::Attrib, b"a", FileType::File, 2)],
            vec![],
        ))
        .unwrap();
    let a = store.net_entry(b"a").unwrap().unwrap();
    assert_eq!(
        (a.kind, a.seq, a.origin),
        (NetKind::Added, t.seq, origin(2))
    );
    // ... also when the update equals the current state.
    let t = store
        .apply(&batch(
            vec![obs(Action::Written, b"a", FileType::File, 3)],
            vec![set(b"a", NetKind::Added, FileType::File)],
        ))
        .unwrap();
    let a = store.net_entry(b"a").unwrap().unwrap();
    assert_eq!((a.seq, a.origin), (t.seq, origin(3)));
    // A path without an entry stays without one, but is logged.
    store
        .apply(&batch(
            vec![obs(Action::Written, b"tmp", FileType::File, 4)],
            vec![],
        ))
        .unwrap();
    assert!(store.net_entry(b"tmp").unwrap().is_none());
    assert_eq!(store.history(b"tmp").unwrap().len(), 1);
}

#[test]
fn since_queries() {
    let (_d, store) = open();
    create(&store, b"keep", 1);
    store
        .apply(&batch(
            vec![obs(Action::Written, b"mod", FileType::File, 1)],
            vec![set(b"mod", NetKind::Modified, FileType::File)],
        ))
        .unwrap();
    let t = store.token();
    store
        .apply(&batch(
            vec![
                obs(Action::Created, b"tmp", FileType::File, 2),
                obs(Action::Created, b"new", FileType::File, 2),
                obs(Action::Deleted, b"mod", FileType::File, 3),
            ],
            vec![
                set(b"new", NetKind::Added, FileType::File),
                set(b"mod", NetKind::Removed, FileType::Whiteout),
                set(b"tmp", NetKind::Added, FileType::File),
            ],
        ))
        .unwrap();
    store
        .apply(&batch(
            vec![obs(Action::Deleted, b"tmp", FileType::File, 4)],
            vec![clear(b"tmp")],
        ))
        .unwrap();
    let cs = store.query(&since(t)).unwrap();
    assert_eq!(cs.token, store.token());
    assert_eq!(cs.fresh, None);
    // "tmp" came and went within the window.
    assert_eq!(paths(&cs), vec![&b"mod"[..], b"new"]);
    let m = &cs.changes[0];
    assert_eq!(m.before, Some(NetKind::Modified));
    assert_eq!(m.kind, Some(NetKind::Removed));
    assert_eq!(m.file_type, FileType::Whiteout);
    assert_eq!(m.origin, origin(3));
    assert_eq!(m.seq, 5);
    let n = &cs.changes[1];
    assert_eq!((n.before, n.kind, n.seq), (None, Some(NetKind::Added), 4));

    // A change undone: kind None, the last record's type and origin.
    let t2 = store.token();
    store
        .apply(&batch(
            vec![obs(Action::Reset, b"keep", FileType::File, 9)],
            vec![clear(b"keep")],
        ))
        .unwrap();
    let cs = store.query(&since(t2)).unwrap();
    assert_eq!(cs.changes.len(), 1);
    let k = &cs.changes[0];
    assert_eq!((k.kind, k.before), (None, Some(NetKind::Added)));
    assert_eq!((k.file_type, k.origin.clone()), (FileType::File, origin(9)));

    // The current position: nothing; a future seq of this instance: nothing either.
    let now = store.token();
    assert!(store.query(&since(now)).unwrap().changes.is_empty());
    let future = Token {
        seq: now.seq + 100,
        ..now
    };
    let cs = store.query(&since(future)).unwrap();
    assert!(cs.changes.is_empty());
    assert_eq!(cs.fresh, None);

    // From the very beginning: everything, as the net state sees it.
    let all = store.query(&since(Token { seq: 0, ..now })).unwrap();
    assert_eq!(paths(&all), vec![&b"mod"[..], b"new"]);
    assert_eq!(all.changes[0].before, None);
}

#[test]
fn full_net_state_and_filters() {
    let (_d, store) = open();
    for p in [&b"a"[..], b"a/x.pyc", b"a/y", b"a-b", b"ab", b"b/c/d.pyc"] {
        create(&store, p, 1);
    }
    let all = store.query(&Query::default()).unwrap();
    assert_eq!(all.fresh, None);
    assert_eq!(all.token, store.token());
    assert_eq!(
        paths(&all),
        vec![&b"a"[..], b"a-b", b"a/x.pyc", b"a/y", b"ab", b"b/c/d.pyc"]
    );
    assert!(
        all.changes
            .iter()
            .all(|c| c.before.is_none() && c.kind == Some(NetKind::Added))
    );

    let q = |prefixes: &[&[u8]], globs: &[&str], since: Option<Since>| {
        let cs = store
            .query(&Query {
                since,
                prefixes: prefixes.iter().map(|p| p.to_vec()).collect(),
                globs: globs.iter().map(|g| g.to_string()).collect(),
            })
            .unwrap();
        cs.changes.into_iter().map(|c| c.path).collect::<Vec<_>>()
    };
    let start = Some(Since::Token(Token {
        seq: 0,
        ..store.token()
    }));
    for s in [None, start] {
        assert_eq!(
            q(&[b"a"], &[], s.clone()),
            vec![b"a".to_vec(), b"a/x.pyc".to_vec(), b"a/y".to_vec()]
        );
        assert_eq!(
            q(&[b"a-b", b"a/"], &[], s.clone()),
            vec![
                b"a".to_vec(),
                b"a-b".to_vec(),
                b"a/x.pyc".to_vec(),
                b"a/y".to_vec()
            ]
        );
        assert_eq!(q(&[b"b/c"], &[], s.clone()), vec![b"b/c/d.pyc".to_vec()]);
        assert_eq!(q(&[b"b/c/d"], &[], s.clone()), Vec::<Vec<u8>>::new());
        assert_eq!(
            q(&[], &["*.pyc"], s.clone()),
            vec![b"a/x.pyc".to_vec(), b"b/c/d.pyc".to_vec()]
        );
        assert_eq!(
            q(&[b"a"], &["*.pyc", "ab"], s.clone()),
            vec![b"a/x.pyc".to_vec()]
        );
    }
    assert!(matches!(
        store.query(&Query {
            globs: vec!["{".into()],
            ..Query::default()
        }),
        Err(StoreError::BadGlob { .. })
    ));

    let under = store.net_under(b"a").unwrap();
    let under: Vec<_> = under.iter().map(|(p, _)| p.as_slice()).collect();
    assert_eq!(under, vec![&b"a/x.pyc"[..], b"a/y"]);
    assert_eq!(store.net_under(b"").unwrap().len(), 6);
    assert!(store.net_under(b"a/y").unwrap().is_empty());
}

#[test]
fn marks() {
    let (_d, store) = open();
    let m0 = store.mark("start").unwrap();
    assert_eq!(m0, store.token());
    create(&store, b"a", 1);
    let m1 = store.mark("mid").unwrap();
    create(&store, b"b", 1);
    assert_eq!(
        store.marks().unwrap(),
        vec![("mid".to_string(), m1), ("start".to_string(), m0)]
    );
    let q = |name: &str| Query {
        since: Some(Since::Mark(name.into())),
        ..Query::default()
    };
    assert_eq!(
        paths(&store.query(&q("start")).unwrap()),
        vec![&b"a"[..], b"b"]
    );
    assert_eq!(paths(&store.query(&q("mid")).unwrap()), vec![&b"b"[..]]);
    // Re-marking moves the name.
    assert_eq!(store.mark("start").unwrap(), store.token());
    assert!(store.query(&q("start")).unwrap().changes.is_empty());
    assert_eq!(store.marks().unwrap().len(), 2);
    assert!(matches!(store.query(&q("nope")), Err(StoreError::UnknownMark(n)) if n == "nope"));
    for bad in ["", "a b", "0123456789abcdef:3"] {
        assert!(matches!(store.mark(bad), Err(StoreError::BadMarkName(_))));
    }
    assert!(matches!(
        store.mark(&"m".repeat(257)),
        Err(StoreError::BadMarkName(_))
    ));
    store.mark(&"m".repeat(256)).unwrap();
    // A mark name goes through parse_since unharmed.
    assert_eq!(parse_since("mid"), Since::Mark("mid".into()));
}

#[test]
fn rebuild_changes_instance_and_answers_fresh() {
    let (_d, store) = open();
    create(&store, b"a", 1);
    create(&store, b"b", 1);
    store
        .apply(&batch(
            vec![obs(Action::Written, b"m", FileType::File, 1)],
            vec![set(b"m", NetKind::Modified, FileType::File)],
        ))
        .unwrap();
    let old = store.token();
    store.mark("before").unwrap();
    let gap = store
        .rebuild(
            vec![
                (b"a".to_vec(), NetKind::Added, FileType::File), // unchanged
                (b"m".to_vec(), NetKind::Metadata, FileType::File),
                (b"n".to_vec(), NetKind::Removed, FileType::Whiteout),
            ],
            "queue overflow",
        )
        .unwrap();
    assert_eq!(gap.seq, old.seq + 1);
    assert_eq!(gap.old_instance, old.instance);
    assert_ne!(gap.new_instance, old.instance);
    assert_eq!(gap.reason, "queue overflow");
    assert_eq!(store.gaps().unwrap(), vec![gap.clone()]);
    let now = store.token();
    assert_eq!(now.instance, gap.new_instance);
    assert_eq!(now.seq, old.seq + 3); // b cleared, m and n reclassified

    let all = store.query(&Query::default()).unwrap();
    let kinds: Vec<_> = all
        .changes
        .iter()
        .map(|c| (c.path.as_slice(), c.kind))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (&b"a"[..], Some(NetKind::Added)),
            (b"m", Some(NetKind::Metadata)),
            (b"n", Some(NetKind::Removed))
        ]
    );
    assert_eq!(store.history(b"b").unwrap()[1].action, Action::Reclassified);
    assert_eq!(
        store.history(b"m").unwrap()[1].before,
        Some(NetKind::Modified)
    );

    // Positions of the old instance get the full state, flagged.
    for q in [
        since(old),
        Query {
            since: Some(Since::Mark("before".into())),
            ..Query::default()
        },
    ] {
        let cs = store.query(&q).unwrap();
        assert_eq!(
            cs.fresh,
            Some(FreshReason::OtherInstance {
                asked: old.instance,
                current: now.instance
            })
        );
        assert_eq!(cs.changes, all.changes);
    }
    // From the start of the new instance: the differences the rescan found.
    let cs = store
        .query(&since(Token {
            instance: now.instance,
            seq: old.seq,
        }))
        .unwrap();
    assert_eq!(cs.fresh, None);
    let diff: Vec<_> = cs
        .changes
        .iter()
        .map(|c| (c.path.as_slice(), c.before, c.kind))
        .collect();
    assert_eq!(
        diff,
        vec![
            (&b"b"[..], Some(NetKind::Added), None),
            (b"m", Some(NetKind::Modified), Some(NetKind::Metadata)),
            (b"n", None, Some(NetKind::Removed))
        ]
    );
    // A seq from before the instance began cannot be trusted.
    let cs = store
        .query(&since(Token {
            instance: now.instance,
            seq: 1,
        }))
        .unwrap();
    assert_eq!(
        cs.fresh,
        Some(FreshReason::Expired {
            asked: 1,
            oldest: old.seq
        })
    );

    // A second rebuild with nothing to change still starts a new instance.
    let gap2 = store
        .rebuild(
            vec![
                (b"a".to_vec(), NetKind::Added, FileType::File),
                (b"m".to_vec(), NetKind::Metadata, FileType::File),
                (b"n".to_vec(), NetKind::Removed, FileType::Whiteout),
            ],
            "restart",
        )
        .unwrap();
    assert_eq!(
        store.token(),
        Token {
            instance: gap2.new_instance,
            seq: now.seq
        }
    );
    assert_eq!(store.gaps().unwrap(), vec![gap, gap2]);
}

#[test]
fn expired_positions_are_answered_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for i in 0..5u32 {
        create(&store, format!("f{i}").as_bytes(), i);
    }
    let token = store.token();
    // Pretend the log was truncated to start at seq 4.
    let meta = crate::changelog::Meta {
        instance: token.instance,
        last_seq: token.seq,
        oldest_seq: 4,
        instance_start: 0,
        gap_count: 0,
    };
    store.meta.insert(b"state", encode(&meta)).unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    let cs = store.query(&since(Token { seq: 2, ..token })).unwrap();
    assert_eq!(
        cs.fresh,
        Some(FreshReason::Expired {
            asked: 2,
            oldest: 3
        })
    );
    assert_eq!(cs.changes.len(), 5);
    let cs = store.query(&since(Token { seq: 3, ..token })).unwrap();
    assert_eq!(cs.fresh, None);
    assert_eq!(paths(&cs), vec![&b"f3"[..], b"f4"]);
    assert_eq!(store.stats().unwrap().log_records, 2);
}

#[test]
fn byte_exact_paths() {
    let (_d, store) = open();
    let long: Vec<u8> = (0..4095).map(|i| b'a' + (i % 26) as u8).collect();
    let weird: [&[u8]; 4] = [b"\xff\xfe/bin", b"line\nbreak", b"sp ace\t", &long];
    let t = store.token();
    for p in weird {
        create(&store, p, 1);
    }
    let cs = store.query(&since(t)).unwrap();
    let mut want: Vec<&[u8]> = weird.to_vec();
    want.sort();
    assert_eq!(paths(&cs), want);
    assert_eq!(paths(&store.query(&Query::default()).unwrap()), want);
    for p in weird {
        assert_eq!(store.history(p).unwrap()[0].path, p);
        assert!(store.net_entry(p).unwrap().is_some());
    }
    let q = Query {
        prefixes: vec![b"\xff\xfe".to_vec()],
        ..Query::default()
    };
    assert_eq!(paths(&store.query(&q).unwrap()), vec![&b"\xff\xfe/bin"[..]]);

    for bad in [&b""[..], b"a\0b"] {
        assert!(matches!(
            store.apply(&batch(
                vec![obs(Action::Created, bad, FileType::File, 1)],
                vec![]
            )),
            Err(StoreError::BadPath { .. })
        ));
        assert!(matches!(
            store.rebuild(vec![(bad.to_vec(), NetKind::Added, FileType::File)], "x"),
            Err(StoreError::BadPath { .. })
        ));
    }
    assert_eq!(store.token().instance, t.instance);
}

#[test]
fn history_is_per_path() {
    let (_d, store) = open();
    // Paths sharing a byte prefix must not leak into each other's history.
    for p in [&b"a"[..], b"a/b", b"a\x01", b"ab", b"a"] {
        create(&store, p, 1);
    }
    let seqs: Vec<u64> = store.history(b"a").unwrap().iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![1, 5]);
    assert_eq!(store.history(b"a/b").unwrap().len(), 1);
    assert!(store.history(b"zz").unwrap().is_empty());
}

#[test]
fn stats_flush_info() {
    let (_d, store) = open();
    create(&store, b"a", 1);
    create(&store, b"b", 1);
    store.mark("m").unwrap();
    store.flush().unwrap();
    let s = store.stats().unwrap();
    assert_eq!(s.instance, store.token().instance);
    assert_eq!(s.next_seq, 3);
    assert_eq!(s.log_records, 2);
    assert_eq!(s.net_paths, 2);
    assert_eq!(s.marks, 1);
    assert_eq!(s.gaps, 0);
    assert!(s.db_bytes > 0);

    assert_eq!(store.info("upper").unwrap(), None);
    store.set_info("upper", b"/tmp/spfs-runtime/upper").unwrap();
    assert_eq!(
        store.info("upper").unwrap().as_deref(),
        Some(&b"/tmp/spfs-runtime/upper"[..])
    );
    store.set_info("upper", b"\xff").unwrap();
    assert_eq!(store.info("upper").unwrap().as_deref(), Some(&b"\xff"[..]));
}

#[test]
fn corrupt_records_are_errors() {
    let (_d, store) = open();
    create(&store, b"a", 1);
    let t0 = Token {
        seq: 0,
        ..store.token()
    };
    // Garbage in the log.
    store
        .log
        .insert(u64_key(1), &[FORMAT_VERSION, 0xff, 0xff, 0xff][..])
        .unwrap();
    let err = store.query(&since(t0)).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("log record"), "{err}");
    assert!(matches!(
        store.history(b"a"),
        Err(StoreError::Corrupt { .. })
    ));
    // A record from a future format.
    store.log.insert(u64_key(1), &b"\x07abc"[..]).unwrap();
    assert!(matches!(
        store.query(&since(t0)),
        Err(StoreError::Format {
            found: 7,
            expected: FORMAT_VERSION
        })
    ));
    // Garbage in the net state.
    store.net.tree.insert(b"a", &b""[..]).unwrap();
    assert!(matches!(
        store.query(&Query::default()),
        Err(StoreError::Corrupt { .. })
    ));
    assert!(matches!(
        store.net_entry(b"a"),
        Err(StoreError::Corrupt { .. })
    ));
    assert!(matches!(
        store.apply(&batch(vec![], vec![clear(b"a")])),
        Err(StoreError::Corrupt { .. })
    ));
    // Garbage in marks and gaps.
    store.marks.insert(b"m", &[FORMAT_VERSION][..]).unwrap();
    assert!(matches!(store.marks(), Err(StoreError::Corrupt { .. })));
    store.gaps.insert(u64_key(0), &b"junk"[..]).unwrap();
    assert!(store.gaps().is_err());
}

#[test]
fn corrupt_meta_fails_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.meta.insert(b"state", &[FORMAT_VERSION][..]).unwrap();
    drop(store);
    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("meta"), "{err}");
}

#[test]
fn old_format_is_refused() {
    // A changelog written by a build with the version 1 layout (bincode records, one
    // per key) is refused with a clear error, not misread.
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path()).unwrap());
    // sled's threads let go of the lock a moment after the drop.
    let db = (0..100)
        .find_map(|_| {
            let db = sled::open(dir.path().join(DB_DIR_NAME)).ok();
            if db.is_none() {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            db
        })
        .expect("reopen the sled db");
    let meta = db.open_tree("meta").unwrap();
    meta.insert(b"state", &[1, 9, 3, 1, 0, 0][..]).unwrap();
    db.flush().unwrap();
    drop((meta, db));
    let err = Store::open(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Format {
                found: 1,
                expected: FORMAT_VERSION
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!("changelog record has format version 1, this build reads version {FORMAT_VERSION}")
    );
}

#[test]
fn second_open_in_process_is_locked() {
    let (dir, _store) = open();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "changelog {} is in use by another process (a running tracker?)",
            dir.path().display()
        )
    );
}

const LOCK_CHILD_ENV: &str = "SPFS_CHANGES_STORE_LOCK_CHILD";

/// Runs in a child process spawned by `second_process_is_locked`; a no-op otherwise.
#[test]
fn lock_child() {
    let Some(dir) = std::env::var_os(LOCK_CHILD_ENV) else {
        return;
    };
    match Store::open(Path::new(&dir)) {
        Err(StoreError::Locked { .. }) => println!("CHILD-SAW-LOCKED"),
        other => panic!("expected Locked, got {other:?}"),
    }
}

#[test]
fn second_process_is_locked() {
    let (dir, _store) = open();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "tests::lock_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(LOCK_CHILD_ENV, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("CHILD-SAW-LOCKED"), "{stdout}");
}

#[test]
fn readers_see_whole_batches() {
    let (_d, store) = open();
    let store = std::sync::Arc::new(store);
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || {
            for i in 0..200u32 {
                let p = format!("p{i}").into_bytes();
                store
                    .apply(&batch(
                        vec![
                            obs(Action::Created, &p, FileType::File, i),
                            obs(Action::Written, &p, FileType::File, i),
                        ],
                        vec![set(&p, NetKind::Added, FileType::File)],
                    ))
                    .unwrap();
            }
        })
    };
    let start = Token {
        seq: 0,
        ..store.token()
    };
    for _ in 0..50 {
        let cs = store.query(&since(start)).unwrap();
        // Two records per batch: a whole-batch view ends on an even seq, and every
        // path in it has its net entry.
        assert_eq!(cs.token.seq % 2, 0);
        assert_eq!(cs.changes.len() as u64, cs.token.seq / 2);
        assert!(cs.changes.iter().all(|c| c.kind == Some(NetKind::Added)));
    }
    writer.join().unwrap();
    assert_eq!(store.token().seq, 400);
}

#[test]
fn reopen_right_after_drop() {
    // sled's background threads keep the db file (and its lock) a moment after the
    // handle is dropped; `open` must wait for them instead of reporting Locked.
    let dir = tempfile::tempdir().unwrap();
    for i in 0..50u32 {
        let s = Store::open(dir.path()).unwrap();
        create(&s, format!("p{i}").as_bytes(), i);
        assert_eq!(s.token().seq, u64::from(i) + 1);
    }
}

#[test]
fn interrupted_write_is_adopted_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    create(&store, b"a", 1);
    let t1 = store.token();
    create(&store, b"b", 2);
    let t2 = store.token();
    // A crash after the trees but before `meta` took the second batch.
    let meta = crate::changelog::Meta {
        instance: t1.instance,
        last_seq: t1.seq,
        oldest_seq: 1,
        instance_start: 0,
        gap_count: 0,
    };
    store.meta.insert(b"state", encode(&meta)).unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    let now = store.token();
    // The records are kept (seqs are never handed out twice), in a new instance.
    assert_eq!(now.seq, t2.seq);
    assert_ne!(now.instance, t1.instance);
    let gaps = store.gaps().unwrap();
    assert_eq!(gaps.len(), 1);
    assert_eq!(
        (gaps[0].old_instance, gaps[0].new_instance, gaps[0].seq),
        (t1.instance, now.instance, t2.seq + 1)
    );
    assert_eq!(
        store.query(&since(t1)).unwrap().fresh,
        Some(FreshReason::OtherInstance {
            asked: t1.instance,
            current: now.instance
        })
    );
    assert_eq!(store.history(b"b").unwrap()[0].seq, t2.seq);
    let t3 = create(&store, b"c", 3);
    assert_eq!(t3.seq, t2.seq + 1);
    assert_eq!(paths(&store.query(&since(now)).unwrap()), vec![&b"c"[..]]);
    drop(store);
    // Nothing to adopt the second time.
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.token(), t3);
    assert_eq!(store.gaps().unwrap().len(), 1);
}

#[test]
fn origins_beyond_the_command_cache() {
    // More command-line bytes than the in-memory cache holds, over a reopen: every id
    // must still resolve to its own origin.
    let dir = tempfile::tempdir().unwrap();
    let origin = |i: u32| Origin {
        pid: i,
        command: [
            vec![b'a' + (i % 26) as u8; 100_000],
            i.to_le_bytes().to_vec(),
        ]
        .concat(),
    };
    let path = |i: u32| format!("d/f{i:03}").into_bytes();
    for round in 0..2 {
        let store = Store::open(dir.path()).unwrap();
        let mut b = Batch::default();
        for i in 0..60u32 {
            b.observations.push(Observation {
                action: Action::Written,
                path: path(i),
                file_type: FileType::File,
                // Each process writes twice, another one in between.
                origin: Some(origin(i / 2 + round * 30)),
                time_ns: u64::from(i),
            });
            b.net.push(set(&path(i), NetKind::Modified, FileType::File));
        }
        store.apply(&b).unwrap();
        for i in 0..60u32 {
            let want = Some(origin(i / 2 + round * 30));
            assert_eq!(store.net_entry(&path(i)).unwrap().unwrap().origin, want);
            let hist = store.history(&path(i)).unwrap();
            assert_eq!(hist.last().unwrap().origin, want);
        }
        let all = store.query(&Query::default()).unwrap();
        assert_eq!(all.changes.len(), 60);
        for (i, c) in all.changes.iter().enumerate() {
            assert_eq!(c.origin, Some(origin(i as u32 / 2 + round * 30)));
        }
    }
}

#[test]
fn long_batches_span_log_chunks() {
    let (_d, store) = open();
    let t0 = store.token();
    // Records of one path far apart, with thousands of others in between and after.
    let mut b = Batch::default();
    for i in 0..3000u32 {
        let p = if i % 1000 == 0 {
            b"x".to_vec()
        } else {
            format!("y/{i}").into_bytes()
        };
        b.observations
            .push(obs(Action::Written, &p, FileType::File, i));
    }
    let t = store.apply(&b).unwrap();
    assert_eq!(t.seq, 3000);
    let seqs: Vec<u64> = store.history(b"x").unwrap().iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![1, 1001, 2001]);
    // Small batches extend the last chunk; every position is a valid start.
    for i in 0..300u32 {
        create(&store, format!("z/{i}").as_bytes(), i);
    }
    for start in [0, 1, 255, 256, 257, 2999, 3000, 3150, 3299] {
        let cs = store.query(&since(Token { seq: start, ..t0 })).unwrap();
        let want = 300 - start.saturating_sub(3000) as usize;
        assert_eq!(cs.changes.len(), want, "since {start}");
    }
    assert_eq!(store.history(b"z/299").unwrap()[0].seq, 3300);
}

#[test]
fn a_deletion_reset_or_rename_of_unknown_type_gets_the_recorded_type() {
    let (_d, store) = open();
    store
        .apply(&batch(
            vec![obs(Action::Created, b"d", FileType::Dir, 1)],
            vec![set(b"d", NetKind::Added, FileType::Dir)],
        ))
        .unwrap();
    create(&store, b"f", 1);
    create(&store, b"g", 1);
    store
        .apply(&batch(
            vec![
                obs(Action::Deleted, b"d", FileType::Unknown, 2),
                obs(Action::RenamedFrom, b"f", FileType::Unknown, 2),
                obs(Action::Reset, b"g", FileType::Unknown, 2),
                obs(Action::Deleted, b"never-recorded", FileType::Unknown, 2),
            ],
            vec![clear(b"d"), clear(b"f"), clear(b"g")],
        ))
        .unwrap();
    let last = |path: &[u8]| store.history(path).unwrap().pop().unwrap().file_type;
    assert_eq!(last(b"d"), FileType::Dir);
    assert_eq!(last(b"f"), FileType::File);
    assert_eq!(last(b"g"), FileType::File);
    assert_eq!(last(b"never-recorded"), FileType::Unknown);
}
