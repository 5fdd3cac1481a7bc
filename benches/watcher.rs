//! Micro-benchmarks of the tracker's per-event pieces.
//!
//! Groups:
//! - `fid_parse`: `fid::events` over one read buffer of 1000 FID-mode events (DFID_NAME
//!   and FID records, names of many lengths, some FAN_RENAME with OLD/NEW records);
//!   throughput in events.
//! - `resolve`: `Resolver::dir` over the handles of 1000 dirs (nested 3 deep on a tmpfs
//!   below `/dev/shm`), with the handle cache warm and cold; throughput in dirs. Needs
//!   root (`open_by_handle_at` wants CAP_DAC_READ_SEARCH): skipped otherwise.
//! - `classify`: `Classifier::classify` of a modified file (16 KiB, same size, last
//!   byte differs, so the contents are compared in full), an added file and a
//!   metadata-only change (same bytes, other mode), against three hand-made lower
//!   layers.

use criterion::{BenchmarkId, Criterion, Throughput};
use std::fs;
use std::hint::black_box;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use store::{FileType, NetKind};
use tempfile::TempDir;
use tracker::classify::Classifier;
use tracker::fid::{self, Handle, METADATA_LEN, METADATA_VERSION};
use tracker::resolve::{Place, Resolver};
use tracker::sys;

fn scratch_dir() -> TempDir {
    let shm = Path::new("/dev/shm");
    let root = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    tempfile::Builder::new()
        .prefix("spfs-changes-bench-")
        .tempdir_in(root)
        .expect("create a temp dir")
}

// ---------------------------------------------------------------------------------
// FID record parsing

/// Info record types (`FAN_EVENT_INFO_TYPE_*`).
const INFO_FID: u8 = 1;
const INFO_DFID_NAME: u8 = 2;
const INFO_OLD_DFID_NAME: u8 = 10;
const INFO_NEW_DFID_NAME: u8 = 12;
/// A tmpfs file handle: 12 bytes of type 1 (as `name_to_handle_at` reports on 6.x).
const HANDLE_TYPE: i32 = 1;
const HANDLE_LEN: usize = 12;
const EVENTS: usize = 1000;

/// One info record as the kernel lays it out: header, fsid, `struct file_handle`,
/// optional NUL-terminated name, padded to 4 bytes.
fn info_record(out: &mut Vec<u8>, info_type: u8, handle: &[u8], name: Option<&[u8]>) {
    let start = out.len();
    out.extend_from_slice(&[info_type, 0, 0, 0]);
    out.extend_from_slice(&0x2a2a_0001_u64.to_ne_bytes()); // fsid
    out.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
    out.extend_from_slice(&HANDLE_TYPE.to_ne_bytes());
    out.extend_from_slice(handle);
    if let Some(name) = name {
        out.extend_from_slice(name);
        out.push(0);
    }
    let len = (out.len() - start).div_ceil(4) * 4;
    out.resize(start + len, 0);
    out[start + 2..start + 4].copy_from_slice(&(len as u16).to_ne_bytes());
}

/// One event: `struct fanotify_event_metadata` (fd -1 in FID mode) plus its records.
fn event(out: &mut Vec<u8>, mask: u64, pid: i32, records: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&0u32.to_ne_bytes()); // event_len, patched below
    out.push(METADATA_VERSION);
    out.push(0);
    out.extend_from_slice(&(METADATA_LEN as u16).to_ne_bytes());
    out.extend_from_slice(&mask.to_ne_bytes());
    out.extend_from_slice(&(-1i32).to_ne_bytes());
    out.extend_from_slice(&pid.to_ne_bytes());
    records(out);
    let len = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

/// A distinct, tmpfs-like handle: inode number, generation, padding.
fn handle(ino: u32) -> [u8; HANDLE_LEN] {
    let mut h = [0u8; HANDLE_LEN];
    h[..4].copy_from_slice(&(ino.wrapping_mul(2_654_435_761)).to_ne_bytes());
    h[4..8].copy_from_slice(&(ino ^ 0x5bd1_e995).to_ne_bytes());
    h
}

/// A buffer of `EVENTS` events, as one read of an untar / pip install storm would
/// fill it: creates, writes, close-writes, attribs and deletes of files and dirs,
/// and every 25th event a copy-up style FAN_RENAME (OLD + NEW + FID records).
fn event_buffer() -> Vec<u8> {
    let long_name = "x".repeat(120);
    let names: [&[u8]; 8] = [
        b"a",
        b"mod7.py",
        b"__init__.py",
        b"#4a1f",
        b"__init__.cpython-311.pyc",
        b"_multiarray_umath.cpython-311-x86_64-linux-gnu.so",
        b"LICENSE",
        long_name.as_bytes(),
    ];
    let masks = [
        libc::FAN_CREATE,
        libc::FAN_MODIFY,
        libc::FAN_CLOSE_WRITE,
        libc::FAN_ATTRIB,
        libc::FAN_CREATE | libc::FAN_ONDIR,
        libc::FAN_MODIFY | libc::FAN_CLOSE_WRITE,
        libc::FAN_DELETE,
    ];
    let mut buf = Vec::new();
    for i in 0..EVENTS {
        let dir = handle(1000 + (i / 40) as u32);
        let object = handle(100_000 + i as u32);
        let name = names[i % names.len()];
        let pid = 3000 + (i % 4) as i32;
        if i % 25 == 24 {
            let work = handle(7);
            event(&mut buf, libc::FAN_RENAME, pid, |out| {
                info_record(out, INFO_OLD_DFID_NAME, &work, Some(b"#4a1f"));
                info_record(out, INFO_NEW_DFID_NAME, &dir, Some(name));
                info_record(out, INFO_FID, &object, None);
            });
        } else {
            event(&mut buf, masks[i % masks.len()], pid, |out| {
                info_record(out, INFO_DFID_NAME, &dir, Some(name));
                info_record(out, INFO_FID, &object, None);
            });
        }
    }
    buf
}

/// What a consumer reads of each event, so that nothing is optimised away.
fn consume(buf: &[u8]) -> (usize, u64) {
    let mut count = 0;
    let mut acc = 0u64;
    for event in fid::events(buf) {
        let event = event.expect("well-formed buffer");
        count += 1;
        acc = acc.wrapping_add(event.mask ^ event.pid as u64);
        for entry in [event.entry, event.old, event.new].into_iter().flatten() {
            acc = acc.wrapping_add(entry.name.len() as u64 + entry.dir.bytes.len() as u64);
        }
        if let Some(object) = event.object {
            acc = acc.wrapping_add(object.bytes[0] as u64);
        }
    }
    (count, acc)
}

fn fid_parse(c: &mut Criterion) {
    let buf = event_buffer();
    let (count, _) = consume(&buf);
    assert_eq!(count, EVENTS);
    let renames = fid::events(&buf)
        .filter(|e| e.as_ref().is_ok_and(|e| e.old.is_some() && e.new.is_some()))
        .count();
    assert_eq!(renames, EVENTS / 25);

    let mut group = c.benchmark_group("fid_parse");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.bench_function(
        BenchmarkId::new("events", format!("{EVENTS}ev_{}B", buf.len())),
        |b| b.iter(|| consume(black_box(&buf))),
    );
    group.finish();
}

// ---------------------------------------------------------------------------------
// Path resolution

const FANOUT: usize = 10;

/// An upper dir holding `lib/python3.11/site-packages/pkg{a}/sub{b}/dir{c}` for a, b,
/// c < 10 (1000 leaf dirs), and a sync dir next to it. Returns the leaf dirs' handles
/// and their paths relative to the upper dir.
fn resolve_tree(root: &Path) -> std::io::Result<Vec<(Handle, Vec<u8>)>> {
    let upper = root.join("upper");
    fs::create_dir_all(root.join("sync"))?;
    let mut leaves = Vec::new();
    for a in 0..FANOUT {
        for b in 0..FANOUT {
            for c in 0..FANOUT {
                let rel = format!("lib/python3.11/site-packages/pkg{a}/sub{b}/dir{c}");
                let dir = upper.join(&rel);
                fs::create_dir_all(&dir)?;
                leaves.push((sys::handle_of(&dir)?, rel.into_bytes()));
            }
        }
    }
    Ok(leaves)
}

fn pass(resolver: &mut Resolver, handles: &[(Handle, Vec<u8>)]) -> usize {
    let mut found = 0;
    for (handle, _) in handles {
        if let Some(place) = resolver.dir(handle.as_ref()).expect("resolve") {
            black_box(place);
            found += 1;
        }
    }
    found
}

fn resolve(c: &mut Criterion) {
    if !nix::unistd::geteuid().is_root() {
        println!("resolve: skipped: needs root");
        return;
    }
    let scratch = scratch_dir();
    let handles = match resolve_tree(scratch.path()) {
        Ok(h) => h,
        Err(e) => {
            println!(
                "resolve: skipped: no file handles on {:?}: {e}",
                scratch.path()
            );
            return;
        }
    };
    let upper = scratch.path().join("upper");
    let sync = scratch.path().join("sync");
    let mut resolver = Resolver::new(&upper, &sync).expect("resolver");
    for (handle, rel) in &handles {
        let place = resolver.dir(handle.as_ref()).expect("resolve");
        assert_eq!(place, Some(Place::Upper(rel.clone())));
    }
    let n = handles.len();

    let mut group = c.benchmark_group("resolve");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function(BenchmarkId::new("warm", format!("{n}dirs")), |b| {
        // The first pass above filled the cache; every lookup is a hit.
        b.iter(|| assert_eq!(pass(&mut resolver, &handles), n));
    });
    group.bench_function(BenchmarkId::new("cold", format!("{n}dirs")), |b| {
        // Each pass starts from an empty cache (the clear is not timed): every
        // lookup is open_by_handle_at + fstat + readlink of /proc/thread-self/fd.
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                resolver.invalidate();
                let start = Instant::now();
                let found = pass(&mut resolver, &handles);
                total += start.elapsed();
                assert_eq!(found, n);
            }
            total
        });
    });
    group.finish();
}

// ---------------------------------------------------------------------------------
// Classification

const SITE: &str = "lib/python3.11/site-packages";
const FILE_LEN: usize = 16 * 1024;

struct ClassifyTree {
    _scratch: TempDir,
    upper: PathBuf,
    lowers: Vec<PathBuf>,
}

fn write(path: &Path, bytes: &[u8], mode: u32) {
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    fs::write(path, bytes).expect("write");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Three lower layers (the package lives in the bottom one, the upper ones hold other
/// packages under the same site-packages dir) and an upper dir with the copied-up
/// package dir holding `modified.py`, `metadata.py` and `added.py`.
fn classify_tree() -> ClassifyTree {
    let scratch = scratch_dir();
    let upper = scratch.path().join("upper");
    let lowers: Vec<PathBuf> = (0..3)
        .map(|i| scratch.path().join(format!("lower{i}")))
        .collect();
    let content: Vec<u8> = (0..FILE_LEN).map(|i| (i * 31 % 251) as u8).collect();
    for (i, lower) in lowers.iter().enumerate().take(2) {
        let other = lower.join(SITE).join(format!("other{i}"));
        write(&other.join("__init__.py"), b"", 0o644);
    }
    let pkg = lowers[2].join(SITE).join("pkg");
    write(&pkg.join("modified.py"), &content, 0o644);
    write(&pkg.join("metadata.py"), &content, 0o644);

    let pkg = upper.join(SITE).join("pkg");
    let mut changed = content.clone();
    *changed.last_mut().expect("non-empty") ^= 0xff;
    write(&pkg.join("modified.py"), &changed, 0o644);
    write(&pkg.join("metadata.py"), &content, 0o755);
    write(&pkg.join("added.py"), &content, 0o644);
    ClassifyTree {
        _scratch: scratch,
        upper,
        lowers,
    }
}

fn classify(c: &mut Criterion) {
    let tree = classify_tree();
    let classifier = Classifier::new(&tree.upper, &tree.lowers).expect("classifier");
    let cases = [
        ("modified_same_size_16KiB", "modified.py", NetKind::Modified),
        ("added", "added.py", NetKind::Added),
        ("metadata_mode_16KiB", "metadata.py", NetKind::Metadata),
    ];

    let mut group = c.benchmark_group("classify");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    for (id, name, kind) in cases {
        let rel = format!("{SITE}/pkg/{name}").into_bytes();
        let net = classifier.classify(&rel).expect("classify");
        assert_eq!(net, Some((kind, FileType::File)), "{name}");
        group.bench_function(id, |b| {
            b.iter(|| classifier.classify(black_box(&rel)).expect("classify"))
        });
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    fid_parse(&mut c);
    resolve(&mut c);
    classify(&mut c);
    c.final_summary();
}
