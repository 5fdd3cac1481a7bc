//! Acceptance: at least 1000 random file operations over a generated lower tree of a
//! few thousand files, for several fixed seeds; after every sync the tracker's net
//! state equals the upper-walk truth.
//!
//! The operations are made with direct syscalls through the overlay mount (a shell per
//! operation would be far too slow). An operation that fails (renaming a lower dir
//! gives `EXDEV` under `redirect_dir=follow`, `rmdir` of a full dir, a path that is
//! gone, ...) is taken as having done nothing: the upper-walk truth decides.

mod support;

use std::collections::VecDeque;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{PermissionsExt, lchown, symlink};
use std::path::{Path, PathBuf};
use support::tracking::{assert_tracks_truth, start, tracked};
use support::{Fixture, LowerSpec, SplitMix, in_private_mount_ns, need_root};
use tracker::Tracker;

/// Files in the generated lower tree.
const LOWER_FILES: usize = 3000;
/// Random operations per seed.
const OPS: usize = 2000;
/// Operations between two checks against the truth.
const CHECK_EVERY: usize = 50;
/// Operations kept for the failure message.
const HISTORY: usize = 20;

/// What the test believes the merged tree holds (relative paths, `""` is the root).
/// Refreshed from a walk of the mount after the operations that move or remove
/// whole subtrees, and at every check.
#[derive(Default)]
struct Pools {
    /// Everything but dirs: regular files, symlinks, and whatever else shows up.
    files: Vec<String>,
    dirs: Vec<String>,
}

impl Pools {
    fn walk(mnt: &Path) -> Pools {
        let mut pools = Pools {
            files: Vec::new(),
            dirs: vec![String::new()],
        };
        let mut stack = vec![String::new()];
        while let Some(rel) = stack.pop() {
            let Ok(entries) = fs::read_dir(at(mnt, &rel)) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let child = join(&rel, &name);
                match entry.file_type() {
                    Ok(t) if t.is_dir() => {
                        pools.dirs.push(child.clone());
                        stack.push(child);
                    }
                    Ok(_) => pools.files.push(child),
                    Err(_) => {}
                }
            }
        }
        // read_dir order is not stable across runs: sort so a seed replays exactly.
        pools.files.sort();
        pools.dirs.sort();
        pools
    }

    fn forget_file(&mut self, rel: &str) {
        if let Some(i) = self.files.iter().position(|f| f == rel) {
            self.files.swap_remove(i);
        }
    }

    fn add_file(&mut self, rel: String) {
        if !self.files.contains(&rel) {
            self.files.push(rel);
        }
    }

    fn forget_dir(&mut self, rel: &str) {
        if let Some(i) = self.dirs.iter().position(|d| d == rel) {
            self.dirs.swap_remove(i);
        }
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

fn at(mnt: &Path, rel: &str) -> PathBuf {
    if rel.is_empty() {
        mnt.to_path_buf()
    } else {
        mnt.join(rel)
    }
}

fn show(r: &io::Result<()>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => format!("failed: {e}"),
    }
}

/// One randomized run: the state the operations need.
struct Run<'a> {
    mnt: &'a Path,
    rng: SplitMix,
    pools: Pools,
    /// Counter for new names; they start with `n` (lower names start with d, f or l).
    next_name: usize,
    /// Paths and names of user xattrs set (so that removing one mostly finds one).
    with_xattr: Vec<(String, &'static str)>,
}

impl Run<'_> {
    fn p(&self, rel: &str) -> PathBuf {
        at(self.mnt, rel)
    }

    fn new_name(&mut self, dir: &str) -> String {
        self.next_name += 1;
        join(dir, &format!("n{}", self.next_name))
    }

    fn any_dir(&mut self) -> String {
        self.rng.pick(&self.pools.dirs).cloned().unwrap_or_default()
    }

    /// A dir other than the root.
    fn some_dir(&mut self) -> Option<String> {
        let non_root: Vec<&String> = self.pools.dirs.iter().filter(|d| !d.is_empty()).collect();
        self.rng.pick(&non_root).map(|d| (*d).clone())
    }

    /// A dir the test made itself (upper-only, renamable) when there is one and the
    /// dice say so, else any dir but the root.
    fn renamable_dir(&mut self) -> Option<String> {
        let own = if self.rng.chance(80) {
            self.own_dir()
        } else {
            None
        };
        own.or_else(|| self.some_dir())
    }

    /// A dir other than the root with at most 40 entries below it (so that `rm -rf`
    /// does not empty the whole tree within a few hundred operations).
    fn small_dir(&mut self) -> Option<String> {
        for _ in 0..8 {
            let dir = self.some_dir()?;
            let prefix = format!("{dir}/");
            let below = self
                .pools
                .files
                .iter()
                .chain(&self.pools.dirs)
                .filter(|p| p.starts_with(&prefix))
                .count();
            if below <= 40 {
                return Some(dir);
            }
        }
        None
    }

    /// A dir the test made itself (its name starts with `n`), if any.
    fn own_dir(&mut self) -> Option<String> {
        let own: Vec<&String> = self
            .pools
            .dirs
            .iter()
            .filter(|d| d.rsplit('/').next().is_some_and(|n| n.starts_with('n')))
            .collect();
        self.rng.pick(&own).map(|d| (*d).clone())
    }

    fn file(&mut self) -> Option<String> {
        self.rng.pick(&self.pools.files).cloned()
    }

    fn refresh(&mut self) {
        self.pools = Pools::walk(self.mnt);
    }

    /// Performs one random operation; returns what it did and how it went.
    fn step(&mut self) -> String {
        let choice = self.rng.below(100);
        match choice {
            0..=7 => {
                let dir = self.any_dir();
                let rel = self.new_name(&dir);
                let data = self.rng.bytes(2048);
                let r = fs::write(self.p(&rel), &data);
                if r.is_ok() {
                    self.pools.add_file(rel.clone());
                }
                format!("create {rel} ({} bytes): {}", data.len(), show(&r))
            }
            8..=13 => {
                let Some(rel) = self.file() else {
                    return "overwrite: no file".into();
                };
                let data = self.rng.bytes(2048);
                let r = fs::write(self.p(&rel), &data);
                format!("overwrite {rel} ({} bytes): {}", data.len(), show(&r))
            }
            14..=18 => {
                let Some(rel) = self.file() else {
                    return "append: no file".into();
                };
                let data = self.rng.bytes(512);
                let r = OpenOptions::new()
                    .append(true)
                    .open(self.p(&rel))
                    .and_then(|mut f| f.write_all(&data));
                format!("append {rel} ({} bytes): {}", data.len(), show(&r))
            }
            19..=22 => {
                let Some(rel) = self.file() else {
                    return "truncate: no file".into();
                };
                let len = self.rng.below(1024) as u64;
                let r = OpenOptions::new()
                    .write(true)
                    .open(self.p(&rel))
                    .and_then(|f| f.set_len(len));
                format!("truncate {rel} to {len}: {}", show(&r))
            }
            23..=28 => {
                // chmod, on a file most of the time, sometimes on a dir; a small set
                // of modes so that putting the lower mode back happens too.
                let rel = if self.rng.chance(80) {
                    self.file()
                } else {
                    self.some_dir()
                };
                let Some(rel) = rel else {
                    return "chmod: nothing".into();
                };
                let mode = [0o644, 0o755, 0o600, 0o700][self.rng.below(4)];
                let r = fs::set_permissions(self.p(&rel), fs::Permissions::from_mode(mode));
                format!("chmod {mode:o} {rel}: {}", show(&r))
            }
            29..=32 => {
                let rel = if self.rng.chance(80) {
                    self.file()
                } else {
                    self.some_dir()
                };
                let Some(rel) = rel else {
                    return "chown: nothing".into();
                };
                let uid = [0, 0, 1000, 4321][self.rng.below(4)];
                let gid = [0, 0, 100, 1234][self.rng.below(4)];
                let r = lchown(self.p(&rel), Some(uid), Some(gid));
                format!("chown -h {uid}:{gid} {rel}: {}", show(&r))
            }
            33..=36 => {
                let rel = if self.rng.chance(85) {
                    self.file()
                } else {
                    self.some_dir()
                };
                let Some(rel) = rel else {
                    return "utime: nothing".into();
                };
                let sec = 1_000_000_000 + self.rng.below(100_000_000) as i64;
                let nsec = self.rng.below(1_000_000_000) as i64;
                let r = support::set_times(&self.p(&rel), (sec, nsec), (sec, nsec));
                format!("utime -h {sec}.{nsec:09} {rel}: {}", show(&r))
            }
            37..=40 => {
                let rel = if self.rng.chance(80) {
                    self.file()
                } else {
                    self.some_dir()
                };
                let Some(rel) = rel else {
                    return "setxattr: nothing".into();
                };
                let name = ["user.a", "user.b"][self.rng.below(2)];
                let value = ["x", "y"][self.rng.below(2)];
                let r = support::set_xattr(&self.p(&rel), name, value.as_bytes());
                if r.is_ok() {
                    self.with_xattr.push((rel.clone(), name));
                }
                format!("setxattr -h {name}={value} {rel}: {}", show(&r))
            }
            41..=43 => {
                let (rel, name) = match self.rng.pick(&self.with_xattr).cloned() {
                    Some(set) if self.rng.chance(80) => (Some(set.0), set.1),
                    _ if self.rng.chance(80) => (self.file(), "user.a"),
                    _ => (self.some_dir(), "user.b"),
                };
                let Some(rel) = rel else {
                    return "removexattr: nothing".into();
                };
                let r = support::remove_xattr(&self.p(&rel), name);
                format!("removexattr -h {name} {rel}: {}", show(&r))
            }
            44..=55 => {
                // rename a file: same dir, other dir, or over an existing file
                let Some(from) = self.file() else {
                    return "rename: no file".into();
                };
                let (how, to) = match self.rng.below(3) {
                    0 => {
                        let dir = from.rsplit_once('/').map_or("", |(d, _)| d).to_owned();
                        ("same dir", self.new_name(&dir))
                    }
                    1 => {
                        let dir = self.any_dir();
                        ("other dir", self.new_name(&dir))
                    }
                    _ => match self.file() {
                        Some(to) => ("over existing", to),
                        None => return "rename: no target".into(),
                    },
                };
                let r = fs::rename(self.p(&from), self.p(&to));
                if r.is_ok() && from != to {
                    self.pools.forget_file(&from);
                    self.pools.add_file(to.clone());
                }
                format!("rename ({how}) {from} -> {to}: {}", show(&r))
            }
            56..=60 => {
                let Some(from) = self.renamable_dir() else {
                    return "rename dir: no dir".into();
                };
                let dir = self.any_dir();
                let to = self.new_name(&dir);
                let r = fs::rename(self.p(&from), self.p(&to));
                if r.is_ok() {
                    self.refresh();
                }
                format!("rename dir {from} -> {to}: {}", show(&r))
            }
            61..=63 => {
                let Some(from) = self.file() else {
                    return "link: no file".into();
                };
                let dir = self.any_dir();
                let to = self.new_name(&dir);
                let r = fs::hard_link(self.p(&from), self.p(&to));
                if r.is_ok() {
                    self.pools.add_file(to.clone());
                }
                format!("ln {from} {to}: {}", show(&r))
            }
            64..=66 => {
                let dir = self.any_dir();
                let to = self.new_name(&dir);
                let target = match self.file() {
                    Some(f) if self.rng.chance(70) => f.rsplit('/').next().unwrap_or("x").into(),
                    _ => "dangling".to_string(),
                };
                let r = symlink(&target, self.p(&to));
                if r.is_ok() {
                    self.pools.add_file(to.clone());
                }
                format!("ln -s {target} {to}: {}", show(&r))
            }
            67..=72 => {
                let dir = self.any_dir();
                let rel = self.new_name(&dir);
                let r = fs::create_dir(self.p(&rel));
                if r.is_ok() {
                    self.pools.dirs.push(rel.clone());
                }
                format!("mkdir {rel}: {}", show(&r))
            }
            73..=75 => {
                // Mostly a dir of the test's own (often empty), else any dir.
                let rel = if self.rng.chance(70) {
                    self.own_dir()
                } else {
                    None
                };
                let Some(rel) = rel.or_else(|| self.some_dir()) else {
                    return "rmdir: no dir".into();
                };
                let r = fs::remove_dir(self.p(&rel));
                if r.is_ok() {
                    self.pools.forget_dir(&rel);
                }
                format!("rmdir {rel}: {}", show(&r))
            }
            76..=83 => {
                let Some(rel) = self.file() else {
                    return "unlink: no file".into();
                };
                let r = fs::remove_file(self.p(&rel));
                if r.is_ok() {
                    self.pools.forget_file(&rel);
                }
                format!("rm {rel}: {}", show(&r))
            }
            84..=85 => {
                let Some(rel) = self.small_dir() else {
                    return "rm -rf: no small dir".into();
                };
                let r = fs::remove_dir_all(self.p(&rel));
                self.refresh();
                format!("rm -rf {rel}: {}", show(&r))
            }
            86..=87 => {
                let Some(rel) = self.small_dir() else {
                    return "rm -rf then mkdir: no small dir".into();
                };
                let r = fs::remove_dir_all(self.p(&rel)).and_then(|()| {
                    fs::create_dir(self.p(&rel))?;
                    if self.rng.chance(50) {
                        fs::write(self.p(&join(&rel, "f-again")), b"again\n")?;
                    }
                    Ok(())
                });
                self.refresh();
                format!("rm -rf then mkdir {rel} (maybe with a file): {}", show(&r))
            }
            88..=92 => {
                let Some(rel) = self.file() else {
                    return "mmap write: no file".into();
                };
                let len = fs::symlink_metadata(self.p(&rel))
                    .map_or(0, |m| if m.is_file() { m.len() as usize } else { 0 });
                if len == 0 {
                    return format!("mmap write {rel}: not a non-empty file, skipped");
                }
                let n = 1 + self.rng.below(len.min(64));
                let offset = self.rng.below(len - n + 1);
                let data: Vec<u8> = (0..n).map(|_| self.rng.next() as u8).collect();
                let r = support::mmap_write(&self.p(&rel), offset, &data);
                format!("mmap write {n} bytes at {offset} of {rel}: {}", show(&r))
            }
            _ => {
                let dir = self.any_dir();
                let rel = self.new_name(&dir);
                let data = self.rng.bytes(256);
                let r = fs::write(self.p(&rel), &data).and_then(|()| fs::remove_file(self.p(&rel)));
                format!("create then delete {rel}: {}", show(&r))
            }
        }
    }
}

/// Asserts the tracker's net state equals the upper-walk truth; on a difference the
/// message starts with the paths that differ (the full sets follow).
fn check(fx: &Fixture, t: &Tracker, context: &str) {
    let got = tracked(t);
    let want = fx.truth();
    if got == want {
        return;
    }
    let mut diff = Vec::new();
    for path in got
        .keys()
        .chain(want.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let (g, w) = (got.get(path), want.get(path));
        if g != w {
            diff.push(format!(
                "{}: tracker {g:?}, truth {w:?}",
                String::from_utf8_lossy(path).escape_debug()
            ));
        }
    }
    let context = format!("{context}\npaths that differ:\n  {}\n", diff.join("\n  "));
    assert_tracks_truth(fx, t, &context);
    panic!("{context}(the difference was gone on a second look, right after a sync)");
}

/// The kind of operation a description speaks of (for the summary line).
fn kind_of(what: &str) -> &str {
    const KINDS: [&str; 25] = [
        "create then delete",
        "create",
        "overwrite",
        "append",
        "truncate",
        "chmod",
        "chown",
        "utime",
        "setxattr",
        "removexattr",
        "rename (same dir)",
        "rename (other dir)",
        "rename (over existing)",
        "rename dir",
        "ln -s",
        "ln",
        "mkdir",
        "rmdir",
        "rm -rf then mkdir",
        "rm -rf",
        "rm",
        "mmap write",
        "rename",
        "link",
        "unlink",
    ];
    KINDS
        .iter()
        .find(|k| what.starts_with(*k))
        .copied()
        .unwrap_or(what)
}

fn run(seed: u64) {
    if !need_root() {
        return;
    }
    in_private_mount_ns(move || {
        let started = std::time::Instant::now();
        let fx = Fixture::new(&LowerSpec::generated(LOWER_FILES, seed));
        let t = start(&fx);
        let mut run = Run {
            mnt: fx.mnt(),
            rng: SplitMix(seed ^ 0x5eed_0f0a_05e5),
            pools: Pools::walk(fx.mnt()),
            next_name: 0,
            with_xattr: Vec::new(),
        };
        assert!(
            run.pools.files.len() >= LOWER_FILES,
            "the generated lower tree is visible through the mount"
        );
        let mut recent: VecDeque<String> = VecDeque::with_capacity(HISTORY);
        let (mut ok, mut failed) = (0usize, 0usize);
        // Per kind of operation: (succeeded, failed), for the summary line.
        let mut kinds: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
        for i in 1..=OPS {
            let what = run.step();
            let count = kinds.entry(kind_of(&what).to_owned()).or_default();
            if what.ends_with(": ok") {
                ok += 1;
                count.0 += 1;
            } else {
                failed += 1;
                count.1 += 1;
            }
            if recent.len() == HISTORY {
                recent.pop_front();
            }
            recent.push_back(format!("#{i} {what}"));
            if i % CHECK_EVERY == 0 || i == OPS {
                let last: Vec<&str> = recent.iter().map(String::as_str).collect();
                check(
                    &fx,
                    &t,
                    &format!(
                        "seed {seed} after op {i}: {what}\nlast operations:\n  {}",
                        last.join("\n  ")
                    ),
                );
                run.refresh();
            }
        }
        // Most operations must really have done something, or the test proves little.
        assert!(
            ok >= OPS / 2,
            "seed {seed}: only {ok} of {OPS} operations succeeded ({failed} failed)"
        );
        let status = t.status().expect("status");
        assert_eq!(
            status.overflows, 0,
            "seed {seed}: unexpected queue overflow (its rescan would make the checks after it \
             say little; was max_queued_events lowered by another test as this tracker started?)"
        );
        eprintln!(
            "seed {seed}: {OPS} ops ({ok} ok, {failed} failed), {} paths left in the mount, {} net paths, {} events, {:.1?}; ok/failed per kind: {kinds:?}",
            run.pools.files.len() + run.pools.dirs.len(),
            status.net_paths,
            status.events,
            started.elapsed()
        );
        t.stop().expect("tracker stops cleanly");
    });
}

#[test]
fn seed_1() {
    run(1);
}

#[test]
fn seed_2() {
    run(0xdead_beef);
}

#[test]
fn seed_3() {
    run(20_250_704);
}

#[test]
fn seed_4() {
    run(0x0123_4567_89ab_cdef);
}
