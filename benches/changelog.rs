//! Micro-benchmarks of the sled changelog (`store`), on a tmpfs-backed temp dir.
//!
//! Groups:
//! - `append`: `Store::apply` of batches of 1, 100 and 10,000 new files (one
//!   observation and one net update each); throughput in files.
//! - `net_query`: `query(&Query::default())`, the whole net state, at 1k, 100k and 1M
//!   net paths; throughput in returned changes.
//! - `since_mark`: `query` since a mark with 10 or 1000 changes after it, on the 100k
//!   and 1M dbs: the cost follows the changes since, not the size of the db.
//! - `prefix_query`: the net state under one package (100 paths) and under ten
//!   packages (1000 paths) of the 100k db.
//!
//! The query dbs are built once, outside the measurements, and only when a benchmark
//! that needs them runs (a filter that skips them skips the build).

use criterion::{BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput};
use std::cell::{Cell, OnceCell};
use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;
use store::{
    Action, Batch, FileType, NetKind, NetUpdate, Observation, Origin, Query, Since, Store,
};
use tempfile::TempDir;

/// Files per package dir in the generated paths.
const FILES_PER_PACKAGE: u64 = 100;
/// Observations + net updates per `apply` while building the query dbs.
const BUILD_BATCH: u64 = 50_000;
/// Changes applied per `apply` after the marks (a tracker batch of a few ms).
const CHANGE_BATCH: u64 = 10;
/// Marks set on every query db: name, changes applied after it (cumulative from the
/// first mark, so the first mark sees all of them).
const MARK_WIDE: &str = "build-start";
const MARK_NARROW: &str = "last-step";
const CHANGES_WIDE: u64 = 1000;
const CHANGES_NARROW: u64 = 10;

/// A store in its own temp dir; the store is dropped before the dir is removed.
struct Db {
    store: Store,
    _dir: TempDir,
}

fn scratch_root() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    }
}

fn new_db() -> Db {
    let dir = tempfile::Builder::new()
        .prefix("spfs-changes-bench-")
        .tempdir_in(scratch_root())
        .expect("create a temp dir for the changelog");
    let store = Store::open(&dir.path().join("db")).expect("open the changelog");
    Db { store, _dir: dir }
}

/// `lib/python3.11/site-packages/pkg{i}/mod{j}.py` for file number `n`.
fn path(n: u64) -> Vec<u8> {
    format!(
        "lib/python3.11/site-packages/pkg{}/mod{}.py",
        n / FILES_PER_PACKAGE,
        n % FILES_PER_PACKAGE
    )
    .into_bytes()
}

fn package_prefix(package: u64) -> Vec<u8> {
    format!("lib/python3.11/site-packages/pkg{package}").into_bytes()
}

fn origin() -> Option<Origin> {
    Some(Origin {
        pid: 4242,
        command: b"python3.11 -m pip install --no-deps --prefix /spfs".to_vec(),
    })
}

/// Files `first..first + count` created: an observation and a net update each.
fn created(first: u64, count: u64) -> Batch {
    let mut batch = Batch::default();
    for n in first..first + count {
        let path = path(n);
        batch.observations.push(Observation {
            action: Action::Created,
            path: path.clone(),
            file_type: FileType::File,
            origin: origin(),
            time_ns: 1_700_000_000_000_000_000 + n,
        });
        batch.net.push(NetUpdate {
            path,
            state: Some((NetKind::Added, FileType::File)),
        });
    }
    batch
}

/// Existing files rewritten (were added, now modified relative to the lower layers).
fn written(files: impl Iterator<Item = u64>) -> Batch {
    let mut batch = Batch::default();
    for n in files {
        let path = path(n);
        batch.observations.push(Observation {
            action: Action::Written,
            path: path.clone(),
            file_type: FileType::File,
            origin: origin(),
            time_ns: 1_800_000_000_000_000_000 + n,
        });
        batch.net.push(NetUpdate {
            path,
            state: Some((NetKind::Modified, FileType::File)),
        });
    }
    batch
}

/// A db with `size` net paths, then `MARK_WIDE`, `CHANGES_WIDE - CHANGES_NARROW`
/// rewrites, `MARK_NARROW`, `CHANGES_NARROW` more rewrites. The rewrites touch
/// distinct existing paths spread over the db, so the net path count stays `size`.
fn query_db(size: u64) -> Db {
    let db = new_db();
    let mut first = 0;
    while first < size {
        let count = BUILD_BATCH.min(size - first);
        db.store.apply(&created(first, count)).expect("apply");
        first += count;
    }
    // 7919 is prime, so `k * 7919 % size` are distinct for k < size.
    let changed = |k: u64| k * 7919 % size;
    let apply_changes = |range: std::ops::Range<u64>| {
        let mut k = range.start;
        while k < range.end {
            let end = (k + CHANGE_BATCH).min(range.end);
            db.store
                .apply(&written((k..end).map(changed)))
                .expect("apply");
            k = end;
        }
    };
    db.store.mark(MARK_WIDE).expect("mark");
    apply_changes(0..CHANGES_WIDE - CHANGES_NARROW);
    db.store.mark(MARK_NARROW).expect("mark");
    apply_changes(CHANGES_WIDE - CHANGES_NARROW..CHANGES_WIDE);
    check(&db.store, &Query::default(), size);
    db
}

/// Outside the measurements: a query answers what the db was built to hold.
fn check(store: &Store, query: &Query, expected: u64) {
    let set = store.query(query).expect("query");
    assert!(
        set.fresh.is_none(),
        "{query:?} answered with the full state"
    );
    assert_eq!(set.changes.len() as u64, expected, "{query:?}");
}

/// The query dbs, built on first use and kept for the later groups.
#[derive(Default)]
struct Dbs {
    k1: OnceCell<Db>,
    k100: OnceCell<Db>,
    m1: OnceCell<Db>,
}

impl Dbs {
    fn get(&self, size: u64) -> &Store {
        let cell = match size {
            1_000 => &self.k1,
            100_000 => &self.k100,
            1_000_000 => &self.m1,
            _ => unreachable!("no db of {size} paths"),
        };
        &cell.get_or_init(|| query_db(size)).store
    }
}

fn label(size: u64) -> String {
    match size {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("append");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    for size in [1u64, 100, 10_000] {
        if size >= 10_000 {
            group.sample_size(10);
            group.sampling_mode(SamplingMode::Flat);
        } else {
            group.sample_size(50);
            group.sampling_mode(SamplingMode::Auto);
        }
        group.throughput(Throughput::Elements(size));
        // Every iteration creates new files, as an install or untar does; the db is
        // created lazily so that a filtered-out size costs nothing.
        let db: OnceCell<Db> = OnceCell::new();
        let next = Cell::new(0u64);
        group.bench_function(BenchmarkId::from_parameter(size), |b| {
            let store = &db.get_or_init(new_db).store;
            b.iter_batched(
                || {
                    let first = next.get();
                    next.set(first + size);
                    created(first, size)
                },
                |batch| store.apply(&batch).expect("apply"),
                if size >= 10_000 {
                    BatchSize::PerIteration
                } else {
                    BatchSize::SmallInput
                },
            );
        });
    }
    group.finish();
}

fn net_query(c: &mut Criterion, dbs: &Dbs) {
    let mut group = c.benchmark_group("net_query");
    group.warm_up_time(Duration::from_secs(1));
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    for size in [1_000u64, 100_000, 1_000_000] {
        group.measurement_time(Duration::from_secs(if size >= 1_000_000 { 30 } else { 3 }));
        group.throughput(Throughput::Elements(size));
        group.bench_function(BenchmarkId::from_parameter(label(size)), |b| {
            let store = dbs.get(size);
            b.iter(|| store.query(&Query::default()).expect("query"));
        });
    }
    group.finish();
}

fn since_mark(c: &mut Criterion, dbs: &Dbs) {
    let mut group = c.benchmark_group("since_mark");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.sample_size(30);
    for size in [100_000u64, 1_000_000] {
        for (mark, changes) in [(MARK_NARROW, CHANGES_NARROW), (MARK_WIDE, CHANGES_WIDE)] {
            let query = Query {
                since: Some(Since::Mark(mark.to_owned())),
                ..Query::default()
            };
            group.throughput(Throughput::Elements(changes));
            let id = BenchmarkId::new(format!("{}_db", label(size)), changes);
            let mut checked = false;
            group.bench_function(id, |b| {
                let store = dbs.get(size);
                if !checked {
                    check(store, &query, changes);
                    checked = true;
                }
                b.iter(|| store.query(black_box(&query)).expect("query"));
            });
        }
    }
    group.finish();
}

fn prefix_query(c: &mut Criterion, dbs: &Dbs) {
    let mut group = c.benchmark_group("prefix_query");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.sample_size(30);
    let size = 100_000;
    for packages in [1u64, 10] {
        // Packages spread over the db; "pkg42" must not pick up "pkg420".
        let query = Query {
            prefixes: (0..packages).map(|p| package_prefix(42 + p * 97)).collect(),
            ..Query::default()
        };
        let expected = packages * FILES_PER_PACKAGE;
        group.throughput(Throughput::Elements(expected));
        let id = BenchmarkId::new(format!("{}_db", label(size)), expected);
        let mut checked = false;
        group.bench_function(id, |b| {
            let store = dbs.get(size);
            if !checked {
                check(store, &query, expected);
                checked = true;
            }
            b.iter(|| store.query(black_box(&query)).expect("query"));
        });
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let dbs = Dbs::default();
    append(&mut c);
    net_query(&mut c, &dbs);
    since_mark(&mut c, &dbs);
    prefix_query(&mut c, &dbs);
    drop(dbs);
    c.final_summary();
}
