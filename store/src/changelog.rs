//! The `Store`: sled trees, appending batches, rebuilds, marks and metadata.
//!
//! Trees:
//! - `meta`: one `Meta` record (instance, last seq, retained history).
//! - `log`: seq (u64 BE) -> `LogRecord`; seqs never restart, so a range scan from a
//!   token's seq yields exactly the records after it.
//! - `by_path`: path + NUL + seq (u64 BE) -> empty; per-path history without a scan
//!   of the whole log.
//! - `net`: path -> `NetEntry`.
//! - `marks`: name -> `Token`; `gaps`: gap number (u64 BE) -> `Gap`; `info`: free-form.
//!
//! Writes compute a plan first (under the writer lock, so the trees cannot move
//! underneath), then commit it in one multi-tree transaction: a crash leaves either
//! the whole batch or none of it.

use crate::codec::{decode, encode, key_u64, u64_key};
use crate::error::StoreError;
use crate::model::*;
use crate::token::check_mark_name;
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::TransactionError;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hasher};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const META_KEY: &[u8] = b"state";

/// Where the history stands; persisted as one record so it changes atomically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub instance: u64,
    /// Seq of the last record written (0: none yet).
    pub last_seq: u64,
    /// Seq of the oldest record still in the log (nothing truncates yet).
    pub oldest_seq: u64,
    /// `last_seq` when the current instance began: its tokens never name earlier seqs.
    pub instance_start: u64,
    /// Number of gaps recorded (the key of the next one).
    pub gap_count: u64,
}

impl Meta {
    pub fn token(&self) -> Token {
        Token {
            instance: self.instance,
            seq: self.last_seq,
        }
    }

    /// The oldest position a since-query of this instance can be answered from.
    pub fn oldest_position(&self) -> u64 {
        self.instance_start.max(self.oldest_seq.saturating_sub(1))
    }
}

/// The changelog of one runtime.
///
/// Safe to share between threads: writers are serialised by an internal lock and
/// readers see whole batches only.
pub struct Store {
    dir: PathBuf,
    db: sled::Db,
    pub(crate) meta: sled::Tree,
    pub(crate) log: sled::Tree,
    pub(crate) by_path: sled::Tree,
    pub(crate) net: sled::Tree,
    pub(crate) marks: sled::Tree,
    pub(crate) gaps: sled::Tree,
    pub(crate) info: sled::Tree,
    /// Key of this store in `OPEN_DIRS`.
    registered: PathBuf,
    /// Cached `meta`; the lock also orders writers against readers, because sled
    /// readers outside a transaction could otherwise see half a batch.
    state: RwLock<Meta>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("state", &*self.read_state())
            .finish_non_exhaustive()
    }
}

/// Changelog dirs this process has opened: `true` while a `Store` is alive, `false`
/// once dropped. sled's file lock cannot tell a second handle in this process from a
/// handle that is still closing (its background threads hold the file a moment after
/// the drop), so this map does: the first is refused at once, the second waited for.
static OPEN_DIRS: Mutex<BTreeMap<PathBuf, bool>> = Mutex::new(BTreeMap::new());

impl Drop for Store {
    fn drop(&mut self) {
        let mut open_dirs = OPEN_DIRS.lock().unwrap_or_else(|e| e.into_inner());
        open_dirs.insert(self.registered.clone(), false);
    }
}

/// The sled database inside a state dir.
pub const DB_DIR_NAME: &str = "changelog.sled";

/// sled's page cache; its default (1 GiB) would let a tracker of a large runtime grow
/// far beyond what a background process should hold.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;

fn open_db(dir: &Path) -> Result<sled::Db, StoreError> {
    sled::Config::new()
        .path(dir.join(DB_DIR_NAME))
        .cache_capacity(CACHE_BYTES)
        .open()
        .map_err(|e| open_error(dir, e))
}

/// Opens a db this process closed before, giving the closing handle's background
/// threads up to about a second to let go of the lock.
fn open_db_after_close(dir: &Path) -> Result<sled::Db, StoreError> {
    let mut wait = Duration::from_millis(1);
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match open_db(dir) {
            Err(StoreError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// What one `apply` or `rebuild` will write.
#[derive(Default)]
struct Plan {
    records: Vec<LogRecord>,
    net_put: Vec<(Vec<u8>, NetEntry)>,
    net_del: Vec<Vec<u8>>,
    last_seq: u64,
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.records.is_empty() && self.net_put.is_empty() && self.net_del.is_empty()
    }
}

/// The last record a batch writes for one path.
struct Last<'a> {
    seq: u64,
    /// `Some(origin)` when that record is an observation.
    observed: Option<Option<&'a Origin>>,
}

type NetState = Option<(NetKind, FileType)>;

impl Store {
    /// Opens or creates the changelog in `dir` (the sled db is `dir/changelog.sled`).
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let open_err = |source: sled::Error| open_error(dir, source);
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.into()))?;
        let key = dir.canonicalize().map_err(|e| open_err(e.into()))?;
        let mut open_dirs = OPEN_DIRS.lock().unwrap_or_else(|e| e.into_inner());
        let db = match open_dirs.get(&key) {
            Some(true) => {
                return Err(StoreError::Locked {
                    path: dir.to_owned(),
                });
            }
            Some(false) => open_db_after_close(dir),
            None => open_db(dir),
        }?;
        // Until the `Store` exists, a failure below drops `db`: a later open must then
        // wait for it like for any closed handle.
        open_dirs.insert(key.clone(), false);
        let tree = |name: &str| db.open_tree(name).map_err(open_err);
        let store = Store {
            meta: tree("meta")?,
            log: tree("log")?,
            by_path: tree("by_path")?,
            net: tree("net")?,
            marks: tree("marks")?,
            gaps: tree("gaps")?,
            info: tree("info")?,
            dir: dir.to_owned(),
            registered: key.clone(),
            db,
            state: RwLock::new(Meta {
                instance: 0,
                last_seq: 0,
                oldest_seq: 1,
                instance_start: 0,
                gap_count: 0,
            }),
        };
        // From here on `Drop` marks the dir closed again, whatever happens next.
        open_dirs.insert(key, true);
        drop(open_dirs);
        let meta = match store.meta.get(META_KEY)? {
            Some(bytes) => decode::<Meta>(&bytes).map_err(|e| e.context("meta record"))?,
            None => {
                if store.log.first()?.is_some() || store.net.first()?.is_some() {
                    return Err(StoreError::Corrupt {
                        what: "meta record missing from a changelog that holds records".into(),
                    });
                }
                let meta = Meta {
                    instance: new_instance(0),
                    last_seq: 0,
                    oldest_seq: 1,
                    instance_start: 0,
                    gap_count: 0,
                };
                store.meta.insert(META_KEY, encode(&meta))?;
                store.db.flush()?;
                tracing::debug!(instance = %format_args!("{:016x}", meta.instance), "created changelog");
                meta
            }
        };
        *store.write_state() = meta;
        Ok(store)
    }

    /// The directory the changelog lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn read_state(&self) -> RwLockReadGuard<'_, Meta> {
        // A panic while holding the lock cannot leave `Meta` torn (it is replaced
        // whole after a commit), so a poisoned lock is still good.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, Meta> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Current position: current instance and seq of the last record written.
    pub fn token(&self) -> Token {
        self.read_state().token()
    }

    /// Appends the observations, applies the net updates, all or nothing.
    ///
    /// Records get consecutive seqs in observation order, then one `Reclassified`
    /// record per net change of a path the batch has no observation for (in path
    /// order), so that since-queries can never miss a change of the net state.
    pub fn apply(&self, batch: &Batch) -> Result<Token, StoreError> {
        for o in &batch.observations {
            check_path(&o.path)?;
        }
        let mut updates: BTreeMap<Vec<u8>, NetState> = BTreeMap::new();
        for u in &batch.net {
            check_path(&u.path)?;
            // Later updates of the same path win: they describe a later state.
            updates.insert(u.path.clone(), u.state);
        }
        let mut state = self.write_state();
        let plan = self.plan(&state, &batch.observations, &updates)?;
        if plan.is_empty() {
            return Ok(state.token());
        }
        let meta = Meta {
            last_seq: plan.last_seq,
            ..*state
        };
        self.commit(&plan, &meta, None)?;
        *state = meta;
        Ok(meta.token())
    }

    /// Rebuilds the net state after a loss of history and starts a new instance.
    ///
    /// `entries` is the complete net state (a rescan of the upper dir); every path not
    /// in it stops being a change. Differences are logged as `Reclassified` records of
    /// the new instance, so its tokens see them.
    pub fn rebuild(
        &self,
        entries: Vec<(Vec<u8>, NetKind, FileType)>,
        reason: &str,
    ) -> Result<Gap, StoreError> {
        let mut updates: BTreeMap<Vec<u8>, NetState> = BTreeMap::new();
        for (path, _, _) in &entries {
            check_path(path)?;
        }
        let mut state = self.write_state();
        for item in self.net.iter() {
            let (path, _) = item?;
            updates.insert(path.to_vec(), None);
        }
        for (path, kind, file_type) in entries {
            updates.insert(path, Some((kind, file_type)));
        }
        let plan = self.plan(&state, &[], &updates)?;
        let gap = Gap {
            seq: state.last_seq + 1,
            time_ns: now_ns(),
            old_instance: state.instance,
            new_instance: new_instance(state.instance),
            reason: reason.to_owned(),
        };
        let meta = Meta {
            instance: gap.new_instance,
            last_seq: plan.last_seq,
            instance_start: state.last_seq,
            gap_count: state.gap_count + 1,
            ..*state
        };
        self.commit(&plan, &meta, Some((state.gap_count, &gap)))?;
        *state = meta;
        tracing::info!(
            old = %format_args!("{:016x}", gap.old_instance),
            new = %format_args!("{:016x}", gap.new_instance),
            reclassified = plan.records.len(),
            reason,
            "changelog rebuilt"
        );
        Ok(gap)
    }

    /// Works out the records and net writes of a batch; reads only.
    fn plan(
        &self,
        meta: &Meta,
        observations: &[Observation],
        updates: &BTreeMap<Vec<u8>, NetState>,
    ) -> Result<Plan, StoreError> {
        // Net state of every touched path before the batch.
        let mut old: BTreeMap<&[u8], Option<NetEntry>> = BTreeMap::new();
        let touched = observations
            .iter()
            .map(|o| o.path.as_slice())
            .chain(updates.keys().map(Vec::as_slice));
        for path in touched {
            if !old.contains_key(path) {
                old.insert(path, self.net_entry(path)?);
            }
        }
        let old_entry = |path: &[u8]| old.get(path).and_then(Option::as_ref);

        let links = rename_links(observations, meta.last_seq);
        let mut plan = Plan::default();
        let mut seq = meta.last_seq;
        let mut last: BTreeMap<&[u8], Last<'_>> = BTreeMap::new();
        for (o, link) in observations.iter().zip(links) {
            seq += 1;
            plan.records.push(LogRecord {
                seq,
                time_ns: o.time_ns,
                action: o.action,
                path: o.path.clone(),
                file_type: o.file_type,
                origin: o.origin.clone(),
                link,
                before: old_entry(&o.path).map(|e| e.kind),
            });
            last.insert(
                &o.path,
                Last {
                    seq,
                    observed: Some(o.origin.as_ref()),
                },
            );
        }

        let now = now_ns();
        let mut changed: BTreeSet<&[u8]> = BTreeSet::new();
        for (path, new) in updates {
            let current = old_entry(path).map(|e| (e.kind, e.file_type));
            if *new == current {
                continue;
            }
            changed.insert(path);
            if !last.contains_key(path.as_slice()) {
                seq += 1;
                plan.records.push(LogRecord {
                    seq,
                    time_ns: now,
                    action: Action::Reclassified,
                    path: path.clone(),
                    file_type: new
                        .or(current)
                        .map_or(FileType::Unknown, |(_, file_type)| file_type),
                    origin: None,
                    link: None,
                    before: current.map(|(kind, _)| kind),
                });
                last.insert(
                    path,
                    Last {
                        seq,
                        observed: None,
                    },
                );
            }
            let Some(last) = last.get(path.as_slice()) else {
                continue; // inserted just above or by an observation
            };
            match new {
                Some((kind, file_type)) => {
                    let origin = match last.observed {
                        Some(origin) => origin.cloned(),
                        None => old_entry(path).and_then(|e| e.origin.clone()),
                    };
                    plan.net_put.push((
                        path.clone(),
                        NetEntry {
                            kind: *kind,
                            file_type: *file_type,
                            origin,
                            seq: last.seq,
                        },
                    ));
                }
                None => plan.net_del.push(path.clone()),
            }
        }
        // Observed paths whose net state stays: the entry still names its last change.
        for (path, last) in &last {
            if changed.contains(path) {
                continue;
            }
            if let (Some(entry), Some(origin)) = (old_entry(path), last.observed) {
                plan.net_put.push((
                    path.to_vec(),
                    NetEntry {
                        origin: origin.cloned(),
                        seq: last.seq,
                        ..entry.clone()
                    },
                ));
            }
        }
        plan.last_seq = seq;
        Ok(plan)
    }

    /// Writes a plan, the new meta and maybe a gap in one transaction.
    fn commit(&self, plan: &Plan, meta: &Meta, gap: Option<(u64, &Gap)>) -> Result<(), StoreError> {
        // Encode outside the transaction: its closure may run more than once.
        let mut log = sled::Batch::default();
        let mut by_path = sled::Batch::default();
        for r in &plan.records {
            log.insert(&u64_key(r.seq), encode(r));
            by_path.insert(path_seq_key(&r.path, r.seq), &[][..]);
        }
        let mut net = sled::Batch::default();
        for (path, entry) in &plan.net_put {
            net.insert(path.as_slice(), encode(entry));
        }
        for path in &plan.net_del {
            net.remove(path.as_slice());
        }
        let meta_bytes = encode(meta);
        let gap_row = gap.map(|(n, g)| (u64_key(n), encode(g)));
        (&self.meta, &self.log, &self.by_path, &self.net, &self.gaps)
            .transaction(|(meta_t, log_t, by_path_t, net_t, gaps_t)| {
                log_t.apply_batch(&log)?;
                by_path_t.apply_batch(&by_path)?;
                net_t.apply_batch(&net)?;
                if let Some((key, bytes)) = &gap_row {
                    gaps_t.insert(&key[..], bytes.as_slice())?;
                }
                meta_t.insert(META_KEY, meta_bytes.as_slice())?;
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Abort(()) => StoreError::Transaction("aborted".into()),
                TransactionError::Storage(e) => StoreError::Transaction(e.to_string()),
            })
    }

    pub fn net_entry(&self, path: &[u8]) -> Result<Option<NetEntry>, StoreError> {
        self.net
            .get(path)?
            .map(|bytes| decode(&bytes).map_err(|e| e.context(net_place(path))))
            .transpose()
    }

    /// Net entries strictly below `dir`, sorted (an empty `dir` is the root).
    pub fn net_under(&self, dir: &[u8]) -> Result<Vec<(Vec<u8>, NetEntry)>, StoreError> {
        let mut prefix = dir.to_vec();
        if !prefix.is_empty() {
            prefix.push(b'/');
        }
        let _state = self.read_state();
        self.net
            .scan_prefix(&prefix)
            .map(|item| {
                let (path, bytes) = item?;
                let entry = decode(&bytes).map_err(|e| e.context(net_place(&path)))?;
                Ok((path.to_vec(), entry))
            })
            .collect()
    }

    /// Every record of one path, in seq order.
    pub fn history(&self, path: &[u8]) -> Result<Vec<LogRecord>, StoreError> {
        let mut prefix = path.to_vec();
        prefix.push(0);
        let _state = self.read_state();
        let mut out = Vec::new();
        for item in self.by_path.scan_prefix(&prefix) {
            let (key, _) = item?;
            let seq = key_u64(&key[prefix.len()..]).map_err(|e| e.context("by-path index"))?;
            // A record missing from the log was truncated; its index entry is stale.
            if let Some(record) = self.log_record(seq)? {
                out.push(record);
            }
        }
        Ok(out)
    }

    pub(crate) fn log_record(&self, seq: u64) -> Result<Option<LogRecord>, StoreError> {
        self.log
            .get(u64_key(seq))?
            .map(|bytes| decode(&bytes).map_err(|e| e.context(format_args!("log record {seq}"))))
            .transpose()
    }

    /// Names the current position; re-marking a name moves it.
    pub fn mark(&self, name: &str) -> Result<Token, StoreError> {
        check_mark_name(name)?;
        // The read lock keeps a concurrent `apply` from moving the token between
        // reading and writing it.
        let state = self.read_state();
        let token = state.token();
        self.marks.insert(name.as_bytes(), encode(&token))?;
        Ok(token)
    }

    pub(crate) fn mark_token(&self, name: &str) -> Result<Option<Token>, StoreError> {
        self.marks
            .get(name.as_bytes())?
            .map(|bytes| decode(&bytes).map_err(|e| e.context(format_args!("mark {name:?}"))))
            .transpose()
    }

    /// All marks, sorted by name.
    pub fn marks(&self) -> Result<Vec<(String, Token)>, StoreError> {
        self.marks
            .iter()
            .map(|item| {
                let (key, bytes) = item?;
                let name = String::from_utf8(key.to_vec()).map_err(|_| StoreError::Corrupt {
                    what: format!("mark name \"{}\" is not UTF-8", key.escape_ascii()),
                })?;
                let token = decode(&bytes).map_err(|e| e.context(format_args!("mark {name:?}")))?;
                Ok((name, token))
            })
            .collect()
    }

    /// All gaps, oldest first.
    pub fn gaps(&self) -> Result<Vec<Gap>, StoreError> {
        self.gaps
            .iter()
            .map(|item| {
                let (key, bytes) = item?;
                decode(&bytes).map_err(|e| e.context(format_args!("gap {:?}", key_u64(&key).ok())))
            })
            .collect()
    }

    /// Counters for `status`. The net, mark and gap counts walk their trees (sled
    /// keeps no counts); the log count follows from the seqs because the log is
    /// contiguous.
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let state = *self.read_state();
        Ok(StoreStats {
            instance: state.instance,
            next_seq: state.last_seq + 1,
            log_records: (state.last_seq + 1).saturating_sub(state.oldest_seq),
            net_paths: self.net.len() as u64,
            marks: self.marks.len() as u64,
            gaps: self.gaps.len() as u64,
            db_bytes: self.db.size_on_disk()?,
        })
    }

    /// Makes everything written so far durable (sled otherwise flushes on a timer).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Free-form metadata the tracker keeps about the runtime (upper dir, lowers, ...).
    pub fn set_info(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.info.insert(key.as_bytes(), value)?;
        Ok(())
    }

    pub fn info(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.info.get(key.as_bytes())?.map(|v| v.to_vec()))
    }
}

/// Seqs of the other half for each observation: a `RenamedFrom` directly followed by
/// a `RenamedTo` are the two halves of one rename.
fn rename_links(observations: &[Observation], last_seq: u64) -> Vec<Option<u64>> {
    let mut links = vec![None; observations.len()];
    let mut i = 0;
    while i + 1 < observations.len() {
        if observations[i].action == Action::RenamedFrom
            && observations[i + 1].action == Action::RenamedTo
        {
            let from = last_seq + 1 + i as u64;
            links[i] = Some(from + 1);
            links[i + 1] = Some(from);
            i += 2;
        } else {
            i += 1;
        }
    }
    links
}

pub(crate) fn path_seq_key(path: &[u8], seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(path.len() + 9);
    key.extend_from_slice(path);
    key.push(0);
    key.extend_from_slice(&u64_key(seq));
    key
}

pub(crate) fn net_place(path: &[u8]) -> String {
    format!("net entry \"{}\"", path.escape_ascii())
}

fn check_path(path: &[u8]) -> Result<(), StoreError> {
    let why = if path.is_empty() {
        "empty path"
    } else if path.contains(&0) {
        "path contains NUL"
    } else {
        return Ok(());
    };
    Err(StoreError::BadPath {
        path: path.to_vec(),
        why,
    })
}

/// sled reports a held lock as an io error with this text (fs2's try_lock_exclusive).
fn open_error(dir: &Path, source: sled::Error) -> StoreError {
    if let sled::Error::Io(e) = &source
        && (e.kind() == std::io::ErrorKind::WouldBlock
            || e.to_string().contains("could not acquire lock"))
    {
        return StoreError::Locked {
            path: dir.to_owned(),
        };
    }
    StoreError::Open {
        path: dir.to_owned(),
        source,
    }
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .is_ok()
    {
        return u64::from_ne_bytes(buf);
    }
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ns());
    h.write_u32(std::process::id());
    h.finish()
}

/// A random instance other than `old` (and other than 0, which reads like "unset").
fn new_instance(old: u64) -> u64 {
    loop {
        let n = random_u64();
        if n != 0 && n != old {
            return n;
        }
    }
}
