//! Measures the changelog at scale: builds N changed paths (default 1M) in batches of
//! 10k (one `Created` observation and one net update each, all by the same process
//! with a ~100-byte command line), then prints apply throughput, db size (sled's
//! `size_on_disk` and `du`), bytes per path, query times and peak RSS.
//!
//! `cargo run --release -p spfs-changes-store --example measure -- [PATHS] [BATCH] [DIR]`
//! (DIR defaults to /dev/shm). Times are wall clock and, in brackets, CPU time of the
//! calling thread (sled's background threads not included), which is what to compare
//! on a busy machine.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Instant;
use store::{
    Action, Batch, FileType, NetKind, NetUpdate, Observation, Origin, Query, Since, Store,
};

fn path(n: u64) -> Vec<u8> {
    format!(
        "lib/python3.11/site-packages/pkg{}/mod{}.py",
        n / 100,
        n % 100
    )
    .into_bytes()
}

fn origin() -> Option<Origin> {
    Some(Origin {
        pid: 4242,
        command: b"/usr/bin/python3.11 -m pip install --no-deps --no-build-isolation --prefix /spfs some-package==1.2.3"
            .to_vec(),
    })
}

fn batch(first: u64, count: u64, action: Action, kind: NetKind) -> Batch {
    let mut b = Batch::default();
    for n in first..first + count {
        let p = path(n);
        b.observations.push(Observation {
            action,
            path: p.clone(),
            file_type: FileType::File,
            origin: origin(),
            time_ns: 1_700_000_000_000_000_000 + n,
        });
        b.net.push(NetUpdate {
            path: p,
            state: Some((kind, FileType::File)),
        });
    }
    b
}

fn du(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let md = e.metadata().unwrap();
        total += md.blocks() * 512;
        if md.is_dir() {
            total += du(&e.path());
        }
    }
    total
}

fn vm(field: &str) -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .map(|l| l[field.len()..].trim().to_owned())
        .unwrap_or_default()
}

/// CPU time of the calling thread.
fn thread_cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let ns: u64 = s
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    ns as f64 / 1e9
}

/// Wall and CPU seconds of `f`.
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64, f64) {
    let (t, c) = (Instant::now(), thread_cpu());
    let out = f();
    (out, t.elapsed().as_secs_f64(), thread_cpu() - c)
}

fn ms(label: &str, wall: f64, cpu: f64) {
    println!(
        "{label:<26}{:>9.2} ms  [{:.2} ms CPU]",
        wall * 1e3,
        cpu * 1e3
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let total: u64 = args.get(1).map_or(1_000_000, |a| a.parse().unwrap());
    let per_batch: u64 = args.get(2).map_or(10_000, |a| a.parse().unwrap());
    let tmp = tempfile::Builder::new()
        .prefix("spfs-changes-measure-")
        .tempdir_in(args.get(3).map_or("/dev/shm", String::as_str))
        .unwrap();
    let dir = tmp.path().join("state");
    let store = Store::open(&dir).unwrap();

    // Batches are built outside the timed region.
    let (mut wall, mut cpu, mut worst) = (0.0, 0.0, 0.0f64);
    let mut first = 0;
    while first < total {
        let count = per_batch.min(total - first);
        let b = batch(first, count, Action::Created, NetKind::Added);
        let (_, w, c) = timed(|| store.apply(&b).unwrap());
        (wall, cpu, worst) = (wall + w, cpu + c, worst.max(w));
        first += count;
    }
    let (_, flush, _) = timed(|| store.flush().unwrap());
    println!("paths                     {total} (batches of {per_batch})");
    println!(
        "apply (new paths)         {:.0} paths/s [{:.0} paths/CPU-s], worst batch {:.0} ms, flush {:.0} ms",
        total as f64 / wall,
        total as f64 / cpu,
        worst * 1e3,
        flush * 1e3
    );
    println!("VmHWM after build         {}", vm("VmHWM:"));

    // Rewrites of existing paths: the net entries change, the path count does not.
    let rewrites = total.min(100_000);
    let (mut wall, mut cpu) = (0.0, 0.0);
    let mut k = 0;
    while k < rewrites {
        let count = per_batch.min(rewrites - k);
        let b = batch(k, count, Action::Written, NetKind::Modified);
        let (_, w, c) = timed(|| store.apply(&b).unwrap());
        (wall, cpu) = (wall + w, cpu + c);
        k += count;
    }
    println!(
        "apply (rewrites)          {:.0} paths/s [{:.0} paths/CPU-s] ({rewrites} paths)",
        rewrites as f64 / wall,
        rewrites as f64 / cpu,
    );
    let mark = store.mark("measure").unwrap();
    store
        .apply(&batch(total / 2, 1000, Action::Written, NetKind::Modified))
        .unwrap();
    store.flush().unwrap();

    let stats = store.stats().unwrap();
    let du_bytes = du(&dir);
    println!("log records               {}", stats.log_records);
    for (label, bytes) in [("size_on_disk", stats.db_bytes), ("du", du_bytes)] {
        println!(
            "{label:<26}{:.1} MiB, {:.0} B/path",
            bytes as f64 / (1 << 20) as f64,
            bytes as f64 / total as f64
        );
    }

    let since = Query {
        since: Some(Since::Token(mark)),
        ..Query::default()
    };
    for _ in 0..2 {
        let (cs, w, c) = timed(|| store.query(&since).unwrap());
        assert_eq!(cs.changes.len(), 1000);
        ms("since query (1000)", w, c);
    }
    for _ in 0..2 {
        let (cs, w, c) = timed(|| store.query(&Query::default()).unwrap());
        assert_eq!(cs.changes.len() as u64, total);
        ms("net-state query", w, c);
    }
    // sled pays for evicting what the full scan pulled in on the next reads.
    for _ in 0..2 {
        let (cs, w, c) = timed(|| store.query(&since).unwrap());
        assert_eq!(cs.changes.len(), 1000);
        ms("since after net-state", w, c);
    }
    let prefix = Query {
        prefixes: vec![b"lib/python3.11/site-packages/pkg77".to_vec()],
        ..Query::default()
    };
    for _ in 0..2 {
        let (cs, w, c) = timed(|| store.query(&prefix).unwrap());
        assert_eq!(cs.changes.len(), 100);
        ms("prefix query (100)", w, c);
    }
    let (h, w, c) = timed(|| store.history(&path(total / 2)).unwrap());
    assert_eq!(h.len(), if total / 2 < rewrites { 3 } else { 2 });
    ms("history", w, c);
    println!("VmHWM at end              {}", vm("VmHWM:"));
    println!("VmRSS at end              {}", vm("VmRSS:"));
    drop(store);
    let (store, w, c) = timed(|| Store::open(&dir).unwrap());
    ms("reopen", w, c);
    drop(store);
}
