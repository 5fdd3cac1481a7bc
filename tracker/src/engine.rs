//! The watcher loop and the `Tracker` handle that owns it.

use crate::TrackerError;
use crate::classify::Classifier;
use crate::cookies::Cookies;
use crate::fid::Handle;
use crate::links::{LinkIndex, Live};
use crate::masks::Masks;
use crate::pathevent;
use crate::reader::{self, Backlog, Chunk};
use crate::resolve::Resolver;
use crate::runtime::{Runtime, runtime_path};
use crate::settle;
use crate::sys::{self, FanotifyGroup, MountGroup};
use crate::work::WorkSet;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use store::{Batch, ChangeSet, FileType, NetKind, NetUpdate, Origin, Query, Store, Token};

/// The directories of one overlay runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Where the overlay is mounted (for display: paths are kept relative to upper).
    pub mount: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
    /// Top-most first, as in `lowerdir=`.
    pub lowers: Vec<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub layout: Layout,
    /// Where the changelog lives; must not be inside the upper or work dir.
    pub state_dir: PathBuf,
    /// A dir on the upper dir's filesystem, outside upper and work, for sync cookies.
    pub sync_dir: PathBuf,
    /// The environment's masks at start (see `masks`); empty outside spfs.
    pub masks: Masks,
    /// The runtime the layout was read from: when given, the tracker follows its
    /// remounts (new lower layers, new masks) as part of every sync.
    pub runtime: Option<Runtime>,
}

impl Config {
    pub fn new(layout: Layout, state_dir: PathBuf, sync_dir: PathBuf) -> Self {
        Self {
            layout,
            state_dir,
            sync_dir,
            masks: Masks::default(),
            runtime: None,
        }
    }

    /// The layout of `runtime`, with its `masks`; the tracker then follows it across
    /// remounts.
    pub fn for_runtime(
        runtime: Runtime,
        masks: Masks,
        state_dir: PathBuf,
        sync_dir: PathBuf,
    ) -> Self {
        Self {
            layout: runtime.layout(),
            state_dir,
            sync_dir,
            masks,
            runtime: Some(runtime),
        }
    }
}

/// What `status` reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub token: Option<Token>,
    /// Whether a tracker is running (false when read from a kept changelog).
    pub live: bool,
    pub mount: PathBuf,
    pub upper: PathBuf,
    pub events: u64,
    pub batches: u64,
    pub records: u64,
    pub overflows: u64,
    pub rescans: u64,
    /// Changed paths that could not be inspected (their recorded state was kept).
    pub errors: u64,
    pub gaps: u64,
    pub net_paths: u64,
    pub db_bytes: u64,
    /// Time the last batch took to process, in microseconds.
    pub last_batch_us: u64,
    pub watch: String,
    pub degraded: Vec<String>,
}

#[derive(Default)]
struct Counters {
    events: AtomicU64,
    batches: AtomicU64,
    records: AtomicU64,
    overflows: AtomicU64,
    rescans: AtomicU64,
    errors: AtomicU64,
    last_batch_us: AtomicU64,
}

struct Shared {
    store: Arc<Store>,
    /// Shared with the reader thread.
    stop_flag: Arc<AtomicBool>,
    cookies: Cookies,
    /// Processes putting paths back (`reset`): what they do is logged as a reset.
    resetting: Mutex<HashSet<u32>>,
    /// Batches end only at sync cookies (see `Tracker::batch_at_syncs`).
    batch_at_syncs: AtomicBool,
    /// The layers as they are now: a remount changes them all at once.
    stack: Mutex<Stack>,
    counters: Counters,
}

/// What the overlay is made of now.
struct Stack {
    /// The lower layers, top-most first, as reachable from here.
    lowers: Vec<PathBuf>,
    /// The environment's masks (spfs's whiteouts for paths its layers delete).
    masks: Masks,
    /// The layers as the watcher classifies against them, held by descriptor (the
    /// paths may only have been reachable through a process that has exited since):
    /// other threads classify with clones of it.
    layers: Classifier,
}

/// A running tracker. Dropping it stops the watcher thread; `stop` also reports errors.
pub struct Tracker {
    shared: Arc<Shared>,
    config: Config,
    degraded: Vec<String>,
    threads: Vec<JoinHandle<()>>,
}

impl Tracker {
    /// Opens the changelog, installs the fanotify mark, rescans an upper dir that is
    /// not empty (recording a gap), starts the watcher and checks events arrive.
    pub fn start(config: Config) -> Result<Tracker, TrackerError> {
        let layout = &config.layout;
        for (what, dir) in [
            ("upper dir", &layout.upper),
            ("work dir", &layout.work),
            ("sync dir", &config.sync_dir),
        ] {
            std::fs::metadata(dir).map_err(TrackerError::io(what, dir))?;
        }
        for lower in &layout.lowers {
            std::fs::metadata(lower).map_err(TrackerError::io("lower dir", lower))?;
        }
        let mut degraded = check_placement(&config)?;
        std::fs::create_dir_all(&config.state_dir).map_err(TrackerError::io(
            "cannot create state dir",
            &config.state_dir,
        ))?;
        let mut start_reason =
            "tracker started over an existing upper dir or changelog".to_string();
        let store = match Store::open(&config.state_dir) {
            // Never answer from a damaged changelog: keep it for a look, start a new one
            // and rebuild the net state from the upper dir (a gap says so).
            Err(store::StoreError::Corrupt { what }) => {
                let aside =
                    store::set_aside_damaged(&config.state_dir).map_err(TrackerError::io(
                        "cannot set aside the damaged changelog in",
                        &config.state_dir,
                    ))?;
                tracing::error!(damage = %what, kept = %aside.display(), "the changelog is damaged: starting a new one from the upper dir");
                start_reason = format!(
                    "the changelog was damaged ({what}); kept at {}",
                    aside.display()
                );
                Store::open(&config.state_dir)?
            }
            other => other?,
        };
        let store = Arc::new(store);
        // Recording again: what was missed while stopped comes from the rescan below.
        store.set_ended(None)?;

        let group = FanotifyGroup::new().map_err(|e| match e.raw_os_error() {
            Some(libc::EPERM) => TrackerError::NotRoot,
            _ => TrackerError::KernelFeature {
                feature: "fanotify with FAN_REPORT_DFID_NAME_TARGET (Linux 5.17 or newer)",
                source: e,
            },
        })?;
        group
            .mark_filesystem(&layout.upper, sys::WATCH_MASK)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EPERM) => TrackerError::NotRoot,
                Some(libc::ENODEV) | Some(libc::EOPNOTSUPP) | Some(libc::EXDEV) => {
                    TrackerError::Unwatchable {
                        path: layout.upper.clone(),
                        why: format!("its filesystem cannot report file handles to fanotify ({e})"),
                    }
                }
                _ => TrackerError::KernelFeature {
                    feature: "fanotify filesystem marks with FAN_RENAME (Linux 5.17 or newer)",
                    source: e,
                },
            })?;
        let sync_handle = sys::handle_of(&config.sync_dir).map_err(TrackerError::io(
            "cannot get a file handle of",
            &config.sync_dir,
        ))?;
        let resolver = Resolver::new(&layout.upper, &config.sync_dir)
            .map_err(TrackerError::io("cannot resolve", &layout.upper))?;
        let classifier = Classifier::new(&layout.upper, &layout.lowers)
            .map_err(TrackerError::io("cannot open the layers of", &layout.upper))?;
        let layers = classifier
            .try_clone()
            .map_err(TrackerError::io("cannot open the layers of", &layout.upper))?;

        let shared = Arc::new(Shared {
            store,
            stop_flag: Arc::new(AtomicBool::new(false)),
            cookies: Cookies::new(&config.sync_dir)?,
            stack: Mutex::new(Stack {
                lowers: layout.lowers.clone(),
                masks: config.masks.clone(),
                layers,
            }),
            resetting: Mutex::new(HashSet::new()),
            batch_at_syncs: AtomicBool::new(false),
            counters: Counters::default(),
        });
        for (key, value) in [
            ("mount", layout.mount.as_os_str()),
            ("upper", layout.upper.as_os_str()),
            ("work", layout.work.as_os_str()),
        ] {
            shared
                .store
                .set_info(key, std::os::unix::ffi::OsStrExt::as_bytes(value))?;
        }
        let mounts = config.runtime.clone().map(|runtime| {
            let group = match runtime.mount_group() {
                Ok(g) => Some(g),
                Err(e) => {
                    degraded.push(format!(
                        "mount events of the runtime's namespace are not available ({e}; Linux 6.15+): remounts are noticed when a query syncs"
                    ));
                    None
                }
            };
            MountWatch { runtime, group }
        });
        let backlog = Arc::new(Backlog::default());
        let mut watcher = Watcher {
            mounts,
            links: RefCell::default(),
            backlog: backlog.clone(),
            resolver,
            classifier,
            shared: shared.clone(),
            sync_handle,
        };
        // The mark is in place: anything changing from here on is queued, so a rescan
        // now misses nothing.
        let existing = shared.store.token().seq > 0
            || std::fs::read_dir(&layout.upper)
                .map_err(TrackerError::io("cannot read", &layout.upper))?
                .next()
                .is_some();
        if existing {
            watcher.rescan(&start_reason)?;
        }
        let stop = shared.stop_flag.clone();
        let mut threads = Vec::new();
        // Short-lived writers are named by what they exec'd, read while they lived.
        let execs = match &config.runtime {
            Some(runtime) => match crate::execs::start(runtime.info().mount_ns, stop.clone()) {
                Ok((cache, thread)) => {
                    threads.push(thread);
                    Some(cache)
                }
                Err(e) => {
                    degraded.push(format!(
                        "the process events connector is not available ({e}): a writer gone before its event is read is named by pid only"
                    ));
                    None
                }
            },
            None => None,
        };
        let reader = std::thread::Builder::new()
            .name("spfs-changes-read".into())
            .spawn(move || reader::run(group, backlog, stop, execs))
            .map_err(TrackerError::io(
                "cannot start reader thread for",
                &layout.upper,
            ))?;
        let thread = std::thread::Builder::new()
            .name("spfs-changes-watch".into())
            .spawn(move || watcher.run())
            .map_err(TrackerError::io(
                "cannot start watcher thread for",
                &layout.upper,
            ))?;
        threads.extend([reader, thread]);
        let tracker = Tracker {
            shared,
            config,
            degraded,
            threads,
        };
        tracker.sync()?;
        Ok(tracker)
    }

    /// Its changelog (read it after a `sync` to see every change made before).
    pub fn store(&self) -> &Arc<Store> {
        &self.shared.store
    }

    /// What it was started with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The lower layers as of the last sync (top-most first, reachable from here):
    /// remounts change them.
    pub fn lowers(&self) -> Vec<PathBuf> {
        self.shared
            .stack
            .lock()
            .map(|s| s.lowers.clone())
            .unwrap_or_else(|_| self.config.layout.lowers.clone())
    }

    /// The environment's masks as last read (a copy: they change at remounts).
    pub fn masks(&self) -> Masks {
        self.shared
            .stack
            .lock()
            .map(|s| s.masks.clone())
            .unwrap_or_default()
    }

    /// Returns once every change completed before the call is in the changelog.
    ///
    /// Through a sync cookie (see `cookies`): a busy tracker (a storm's backlog, a
    /// rescan) is slow, not stuck, so it fails only when the watcher makes no progress
    /// for `cookies::SYNC_TIMEOUT`.
    pub fn sync(&self) -> Result<Token, TrackerError> {
        let batches = || self.shared.counters.batches.load(Ordering::Relaxed);
        self.shared.cookies.sync(batches)?;
        Ok(self.shared.store.token())
    }

    /// Answers a query with every change completed before the call.
    pub fn query(&self, q: &Query) -> Result<ChangeSet, TrackerError> {
        self.sync()?;
        Ok(self.shared.store.query(q)?)
    }

    /// Names the current position, after a sync so that it follows every change
    /// completed before the call, and records the state of every path that is a
    /// change then (its type, mode, size, owner and a digest of its content), so that
    /// `--since NAME` compares the state at the mark with now. O(changes), reading
    /// each changed file once.
    pub fn mark(&self, name: &str) -> Result<Token, TrackerError> {
        let store = &self.shared.store;
        let at = self.sync()?;
        let records = self.records_of_changes()?;
        // A change made while recording may or may not be in a record: such paths
        // get none, and `--since` says their state at the mark is unknown.
        let after = self.sync()?;
        let (at, records) = if after == at {
            (at, records)
        } else {
            let q = Query {
                since: Some(store::Since::Token(at)),
                ..Query::default()
            };
            let moved = store.query(&q)?;
            if moved.fresh.is_some() {
                // The history restarted meanwhile: a mark of the old one means nothing.
                (moved.token, Vec::new())
            } else {
                let moved: std::collections::HashSet<Vec<u8>> =
                    moved.changes.into_iter().map(|c| c.path).collect();
                let kept = records
                    .into_iter()
                    .filter(|(p, _)| !moved.contains(p))
                    .collect();
                (at, kept)
            }
        };
        store.mark_with(name, at, records)?;
        // A mark is asked for to be used later: it must outlive a crash right after.
        store.flush()?;
        Ok(at)
    }

    /// What the mount holds at each changed path (removed ones hold nothing).
    fn records_of_changes(&self) -> Result<store::MarkRecords, TrackerError> {
        let layers = self.layers()?;
        let masks = self.masks();
        let live = crate::diff::Live::new(&layers, &masks);
        let mut out = Vec::new();
        for (path, entry) in self.shared.store.net_under(b"")? {
            if entry.kind == store::NetKind::Removed {
                continue;
            }
            let record =
                crate::diff::Sides::after_record(&live, &path).map_err(TrackerError::io(
                    "cannot record the state at a mark of",
                    &self.config.layout.upper,
                ))?;
            out.push((path, store::codec::encode(&record)));
        }
        Ok(out)
    }

    /// What `spfs diff` would print for the changes `q` selects (see `diff`): each
    /// changed path compared as spfs compares it, with the dirs above and the entries
    /// below a removed dir, in spfs's order. Since a mark, the state at the mark is
    /// compared with now; since a token, paths already changed then have no details.
    pub fn diff(&self, q: &Query) -> Result<crate::diff::DiffSet, TrackerError> {
        let filter = store::Filter::new(&q.prefixes, &q.globs)?;
        let set = self.query(q)?;
        let layers = self.layers()?;
        let masks = self.masks();
        let live = crate::diff::Live::new(&layers, &masks);
        let scope = crate::diff::Scope {
            keep: &|p| filter.matches(p),
        };
        let failed = TrackerError::io(
            "cannot compare with the lower layers the changes of",
            &self.config.layout.upper,
        );
        if q.since.is_none() || set.fresh.is_some() {
            return crate::diff::diff(set, &live, &scope).map_err(failed);
        }
        let mark = match &q.since {
            Some(store::Since::Mark(name)) => Some(name.as_str()),
            _ => None,
        };
        let past = crate::diff::Changelog::new(&self.shared.store, &set, mark);
        let at = crate::diff::AtPoint {
            now: &live,
            past: &past,
        };
        crate::diff::diff(set, &at, &scope).map_err(failed)
    }

    /// Evaluates spk's validation rules over what changed since `request.since`,
    /// against the lower layers as they are now (after any remount the sync saw).
    pub fn validate(
        &self,
        request: &crate::validate::Request,
    ) -> Result<crate::validate::Report, TrackerError> {
        self.sync()?;
        let layers = self.layers()?;
        let names: Vec<String> = self.lowers().iter().map(|l| runtime_path(l)).collect();
        crate::validate::validate(&self.shared.store, &layers, &names, &self.masks(), request)
    }

    /// What `reset PATTERN...` would put back, from every change completed before
    /// the call (see `reset::plan`).
    pub fn reset_plan(&self, patterns: &[String]) -> Result<crate::reset::ResetPlan, TrackerError> {
        let patterns = crate::reset::Patterns::new(patterns, &self.config.layout.mount)?;
        self.sync()?;
        let layers = self.layers()?;
        crate::reset::plan(self.store(), &patterns, &self.masks(), &layers)
    }

    /// The layers as the watcher classifies against them now, for this thread.
    fn layers(&self) -> Result<Classifier, TrackerError> {
        self.shared
            .stack
            .lock()
            .map_err(|_| poisoned())?
            .layers
            .try_clone()
            .map_err(TrackerError::io(
                "cannot open the layers of",
                &self.config.layout.upper,
            ))
    }

    /// While `on`, the watcher gathers events and settles them only when a sync
    /// cookie arrives: everything done between two syncs is one batch. For tests and
    /// tools that must know how events were batched; off by default, where a batch is
    /// whatever the kernel queue held.
    pub fn batch_at_syncs(&self, on: bool) {
        self.shared.batch_at_syncs.store(on, Ordering::SeqCst);
    }

    /// Marks the changes process `pid` makes from now on as a reset.
    pub fn begin_reset(&self, pid: u32) -> Result<(), TrackerError> {
        self.shared
            .resetting
            .lock()
            .map_err(|_| poisoned())?
            .insert(pid);
        Ok(())
    }

    /// Forgets `begin_reset` at once (its client went away).
    pub fn abandon_reset(&self, pid: u32) {
        if let Ok(mut r) = self.shared.resetting.lock() {
            r.remove(&pid);
        }
    }

    /// Ends `begin_reset`, after every change the reset made is recorded.
    pub fn end_reset(&self, pid: u32) -> Result<Token, TrackerError> {
        let synced = self.sync();
        self.shared
            .resetting
            .lock()
            .map_err(|_| poisoned())?
            .remove(&pid);
        synced
    }

    /// Its counters and state (counts the net state: O(changes)). Fails when the
    /// changelog cannot be read.
    pub fn status(&self) -> Result<Status, TrackerError> {
        let c = &self.shared.counters;
        let stats = self.shared.store.stats()?;
        Ok(Status {
            token: Some(self.shared.store.token()),
            live: true,
            mount: self.config.layout.mount.clone(),
            upper: PathBuf::from(runtime_path(&self.config.layout.upper)),
            events: c.events.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            records: c.records.load(Ordering::Relaxed),
            overflows: c.overflows.load(Ordering::Relaxed),
            rescans: c.rescans.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            gaps: stats.gaps,
            net_paths: stats.net_paths,
            db_bytes: stats.db_bytes,
            last_batch_us: c.last_batch_us.load(Ordering::Relaxed),
            watch: "fanotify filesystem mark on the upper dir's filesystem (FID mode)".into(),
            degraded: self.degraded.clone(),
        })
    }

    /// Stops the watcher after it has processed what is queued, and flushes the db.
    pub fn stop(mut self) -> Result<(), TrackerError> {
        let synced = self.sync();
        self.halt();
        self.shared.store.flush()?;
        synced.map(|_| ())
    }

    fn halt(&mut self) {
        self.shared.stop_flag.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.halt();
        let _ = self.shared.store.flush();
    }
}

fn poisoned() -> TrackerError {
    TrackerError::Stopped("the watcher thread panicked".into())
}

/// Checks the dirs are placed so the tracker can work, and reports what degrades it.
fn check_placement(config: &Config) -> Result<Vec<String>, TrackerError> {
    use std::os::unix::fs::MetadataExt;
    let dev = |p: &Path, what| {
        std::fs::metadata(p)
            .map(|m| m.dev())
            .map_err(TrackerError::io(what, p))
    };
    let upper_dev = dev(&config.layout.upper, "upper dir")?;
    if dev(&config.sync_dir, "sync dir")? != upper_dev {
        return Err(TrackerError::Unwatchable {
            path: config.sync_dir.clone(),
            why: "the sync dir must be on the upper dir's filesystem".into(),
        });
    }
    let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let state = canon(&config.state_dir);
    for inside in [&config.layout.upper, &config.layout.work] {
        if state.starts_with(canon(inside)) {
            return Err(TrackerError::Unwatchable {
                path: config.state_dir.clone(),
                why: format!("the state dir must not be inside {}", inside.display()),
            });
        }
    }
    let mut degraded = Vec::new();
    if let Some(parent) = config.layout.upper.parent()
        && dev(parent, "parent of the upper dir")? == upper_dev
        && parent
            .parent()
            .is_some_and(|gp| dev(gp, "filesystem root").ok() == Some(upper_dev))
    {
        // Named as the runtime names it, not through /proc/<pid>/root.
        degraded.push(format!(
            "the upper dir shares its filesystem with other data; events from all of it are read and filtered (mount a dedicated tmpfs at {})",
            runtime_path(parent)
        ));
    }
    Ok(degraded)
}

/// The runtime whose remounts the watcher follows, and the group that reports them.
struct MountWatch {
    runtime: Runtime,
    /// `None` on kernels without mount events: mountinfo is then read at each sync.
    group: Option<MountGroup>,
}

/// The watcher thread's state.
struct Watcher {
    mounts: Option<MountWatch>,
    /// The names of upper inodes (hard links).
    links: RefCell<LinkIndex>,
    backlog: Arc<Backlog>,
    resolver: Resolver,
    classifier: Classifier,
    shared: Arc<Shared>,
    sync_handle: Handle,
}

impl Watcher {
    fn run(mut self) {
        let mut gathered: Vec<Chunk> = Vec::new();
        let result = loop {
            if self.shared.stop_flag.load(Ordering::SeqCst) {
                break Ok(());
            }
            if let Err(e) = self.follow_mounts(false) {
                break Err(e.to_string());
            }
            let chunks = match self.backlog.take_batch(Duration::from_millis(100)) {
                Ok(c) => c,
                Err(why) => break Err(why),
            };
            let at_syncs = self.shared.batch_at_syncs.load(Ordering::SeqCst);
            if chunks.is_empty() && (at_syncs || gathered.is_empty()) {
                continue;
            }
            let has_cookie = at_syncs && chunks.iter().any(|c| self.holds_cookie(c));
            gathered.extend(chunks);
            if at_syncs && !has_cookie {
                continue;
            }
            if let Err(e) = self.process(std::mem::take(&mut gathered)) {
                break Err(e.to_string());
            }
        };
        if let Err(why) = result {
            tracing::error!(%why, "watcher stopped");
            self.shared.cookies.abort_all(why);
        }
    }

    /// Follows a remount of the runtime's overlay: when it now has other lower
    /// layers (spfs commit, edit, reset, spk builds), classifies against them, with
    /// the masks spfs wrote for the new stack. Looks when the mount group reported
    /// something, and always when `at_sync` (a sync cookie is to be answered).
    fn follow_mounts(&mut self, at_sync: bool) -> Result<(), TrackerError> {
        let Some(m) = &mut self.mounts else {
            return Ok(());
        };
        let look = match &m.group {
            // A read error cannot say nothing changed. At a sync, look whatever the
            // group said: a remount whose event was read while mountinfo could not
            // show it (mid-remount, or read through a process that just exited) must
            // still be part of what the sync guarantees.
            Some(group) => group.drain().unwrap_or(true) || at_sync,
            None => at_sync,
        };
        if !look {
            return Ok(());
        }
        // The new layers are reached through a process of the runtime, which may exit
        // right then (spfs's own helpers join the namespace for a moment): look again
        // through another.
        let mut attempts = 0;
        let (lowers, classifier) = loop {
            let Some((lowers, remounted)) = m.runtime.new_layers() else {
                return Ok(());
            };
            match self.classifier.relayered(&lowers) {
                Ok(c) => {
                    m.runtime.accept(remounted);
                    break (lowers, c);
                }
                Err(e) if crate::classify::went_away(&e) && attempts < 10 => {
                    attempts += 1;
                    tracing::debug!(error = %e, "the new lower layers went out of reach; looking again");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    return Err(TrackerError::io(
                        "cannot open the new lower layers of",
                        self.classifier.upper(),
                    )(e));
                }
            }
        };
        let masks = m.runtime.masks();
        self.classifier = classifier;
        let layers = self.classifier.try_clone().map_err(TrackerError::io(
            "cannot open the new lower layers of",
            self.classifier.upper(),
        ))?;
        if let Ok(mut stack) = self.shared.stack.lock() {
            stack.lowers.clone_from(&lowers);
            stack.layers = layers;
            match masks {
                Ok(masks) => stack.masks = masks,
                // Keep the old ones: spfs rewrites those at every mount, and a guess
                // could make a reset remove one.
                Err(e) => tracing::warn!(error = %e, "cannot read the masks of the new stack"),
            }
        }
        tracing::info!(
            layers = lowers.len(),
            "the overlay was mounted again over other lower layers"
        );
        self.reclassify_all()
    }

    /// Classifies every path of the upper dir again (after the lower layers changed)
    /// and writes what differs; the store logs each as `Reclassified`. No history was
    /// lost, so the instance stays and marks keep their meaning.
    fn reclassify_all(&mut self) -> Result<(), TrackerError> {
        self.resolver.invalidate();
        self.classifier.forget();
        let mut found = Vec::new();
        self.classify_io(|c| c.walk(b"", &mut found))?;
        let mut now: HashMap<Vec<u8>, (NetKind, FileType)> = found
            .into_iter()
            .map(|(path, kind, ft)| (path, (kind, ft)))
            .collect();
        let mut batch = Batch::default();
        for (path, entry) in self.shared.store.net_under(b"")? {
            match now.remove(&path) {
                Some(state) if state == (entry.kind, entry.file_type) => {}
                state => batch.net.push(NetUpdate { path, state }),
            }
        }
        batch
            .net
            .extend(now.into_iter().map(|(path, state)| NetUpdate {
                path,
                state: Some(state),
            }));
        if !batch.net.is_empty() {
            self.shared.store.apply(&batch)?;
        }
        Ok(())
    }

    /// Whether `chunk` holds the creation of a sync cookie.
    fn holds_cookie(&self, chunk: &Chunk) -> bool {
        chunk.events.iter().any(|spans| {
            pathevent::cookie(&spans.view(&chunk.bytes), self.sync_handle.as_ref()).is_some()
        })
    }

    /// One batch: decoded events, resolved to path events, gathered into a work set,
    /// settled against the filesystem and written to the changelog at once.
    fn process(&mut self, chunks: Vec<Chunk>) -> Result<(), TrackerError> {
        let started = Instant::now();
        self.follow_mounts(false)?;
        let time_ns = now_ns();
        let mut work = WorkSet::default();
        let mut path_events = Vec::new();
        let mut count = 0u64;
        for chunk in &chunks {
            // A pid's command line is the one read with this chunk's events.
            let mut origin: Option<Origin> = None;
            for spans in &chunk.events {
                let event = spans.view(&chunk.bytes);
                count += 1;
                pathevent::resolve(
                    &event,
                    &mut self.resolver,
                    self.sync_handle.as_ref(),
                    &mut path_events,
                )
                .map_err(TrackerError::io(
                    "cannot resolve a handle under",
                    self.classifier.upper(),
                ))?;
                // The reader read every writer's command line along with its events;
                // a writer's events come in runs.
                if origin.as_ref().map_or(0, |o| o.pid as i32) != event.pid.max(0) {
                    origin = (event.pid > 0).then(|| Origin {
                        pid: event.pid as u32,
                        command: chunk.commands.get(&event.pid).cloned().unwrap_or_default(),
                    });
                }
                for e in path_events.drain(..) {
                    work.add(e, &origin, time_ns);
                }
            }
            if let Some(e) = &chunk.undecodable {
                // The rest of this read cannot be trusted: as good as an overflow.
                tracing::error!(error = %e, "undecodable fanotify record");
                work.lost = true;
            }
        }
        self.shared
            .counters
            .events
            .fetch_add(count, Ordering::Relaxed);
        self.apply(work)?;
        self.shared.counters.batches.fetch_add(1, Ordering::Relaxed);
        self.shared
            .counters
            .last_batch_us
            .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Settles a work set and writes it; answers its sync cookies.
    fn apply(&mut self, work: WorkSet) -> Result<(), TrackerError> {
        // Dirs cached by an earlier batch may have moved since.
        self.classifier.forget();
        let resetting = self
            .shared
            .resetting
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        let layers = Live::new(&self.classifier, &self.resolver, &self.links);
        let settled = settle::settle(&work, &layers, self.shared.store.as_ref(), &resetting)?;
        for (path, e) in &settled.errors {
            // Left as recorded rather than guessed; counted in status.
            self.inspect_failed(path, e);
        }
        let records = settled.batch.observations.len() as u64;
        if records > 0 || !settled.batch.net.is_empty() {
            self.shared.store.apply(&settled.batch)?;
        }
        self.shared
            .counters
            .records
            .fetch_add(records, Ordering::Relaxed);
        if work.lost {
            self.shared
                .counters
                .overflows
                .fetch_add(1, Ordering::Relaxed);
            // A cookie created while the queue was full was lost with the other
            // events; every cookie issued before the rescan starts follows only
            // changes the rescan sees.
            let issued = self.shared.cookies.issued();
            self.rescan("fanotify queue overflow: events were lost")?;
            self.shared.cookies.notice(issued);
        }
        if work.cookie > 0 {
            // A remount that ended before the sync began is part of what it
            // guarantees (its mount events are queued by then).
            self.follow_mounts(true)?;
            self.shared.cookies.notice(work.cookie);
        }
        Ok(())
    }

    /// Rebuilds the net state from a walk of the upper dir and starts a new instance.
    fn rescan(&mut self, reason: &str) -> Result<(), TrackerError> {
        self.resolver.invalidate();
        self.classifier.forget();
        let mut entries = Vec::new();
        self.classify_io(|c| c.walk(b"", &mut entries))?;
        let gap = self.shared.store.rebuild(entries, reason)?;
        self.shared.counters.rescans.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            reason,
            instance = gap.new_instance,
            "history gap; net state rebuilt from the upper dir"
        );
        Ok(())
    }

    fn inspect_failed(&self, path: &[u8], e: &io::Error) {
        self.shared.counters.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(path = %String::from_utf8_lossy(path), error = %e, "cannot inspect a changed path");
    }

    fn classify_io<T>(
        &self,
        f: impl FnOnce(&Classifier) -> io::Result<T>,
    ) -> Result<T, TrackerError> {
        f(&self.classifier).map_err(TrackerError::io("cannot inspect", self.classifier.upper()))
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
