//! The `Store`: sled trees, appending batches, rebuilds, marks and metadata.
//!
//! Trees:
//! - `meta`: one `Meta` record (instance, last seq, retained history).
//! - `log`: first seq (u64 BE) -> a chunk of consecutive records (see `codec`); seqs
//!   never restart, so a range scan from the chunk holding a token's seq yields
//!   exactly the records after it. Each record names the previous record of its path
//!   (`prev`), so a path's history is a chain back from its last record.
//! - `net`: path -> net entry, which holds the seq of the path's last record; a
//!   `PathMap`, i.e. buckets of neighbouring paths.
//! - `gone`: path -> seq of its last record, for paths with records and no net entry
//!   (a `PathMap` too). A path's last record is named by its net entry if it has one,
//!   else by its gone entry; a gone entry left behind when a path gets a net entry
//!   again is older than that entry, and never consulted.
//! - `commands`: id (u64 BE) -> `(pid, command line)`; records and net entries name
//!   their origin by id.
//! - `marks`: name -> `Token`; `gaps`: gap number (u64 BE) -> `Gap`; `info`: free-form.
//!
//! Writes plan a batch first (under the writer lock, so the trees cannot move
//! underneath, while readers go on), then apply one atomic sled batch per tree under
//! the state lock, so readers never see half a batch. The order (commands, log, net,
//! gone, and `meta` last) makes a crash in between harmless: everything refers only to
//! what was written before it, and seqs are never reused, because `open` finds records
//! beyond `meta`'s last seq, adopts them and starts a new instance (the net state may
//! lag behind them, and the tracker rescans on start anyway).

use crate::codec::{
    ChunkReader, ChunkWriter, Link, RecordHead, Small, StoredNet, decode, decode_gone, decode_net,
    encode, encode_gone, encode_net, key_u64, u64_key,
};
use crate::commands::{Commands, Interner, Resolver};
use crate::error::StoreError;
use crate::model::*;
use crate::pathmap::{PathMap, Writes};
use crate::token::check_mark_name;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const META_KEY: &[u8] = b"state";
/// In the `meta` tree: an `Ended`, while recording is stopped before the runtime ended.
const ENDED_KEY: &[u8] = b"ended";

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

/// What only the writer touches.
struct Writer {
    /// The chunk the last batch ended in, while it has room: the next batch extends
    /// it instead of starting a chunk of its own (tracker batches are often tiny).
    tail: Option<ChunkWriter>,
    next_command: u64,
    /// A commit failed half-way: `recover` before writing again.
    broken: bool,
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
    pub(crate) net: PathMap,
    pub(crate) gone: PathMap,
    pub(crate) commands: Commands,
    pub(crate) marks: sled::Tree,
    /// What the tracker recorded about paths at each mark: key `name \0 path`.
    pub(crate) mark_records: sled::Tree,
    pub(crate) gaps: sled::Tree,
    pub(crate) info: sled::Tree,
    /// Key of this store in `OPEN_DIRS`.
    registered: PathBuf,
    /// Cached `meta`; writers hold it exclusively while they write the trees, because
    /// sled readers could otherwise see half a batch.
    state: RwLock<Meta>,
    /// Serialises writers; taken before `state`.
    writer: Mutex<Writer>,
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
/// far beyond what a background process should hold. sled counts the cache in
/// serialized bytes and holds more than that in memory; with buckets and chunks, a
/// changelog of 1M changed paths is about 45 MiB in all, and this much keeps its hot
/// part (the recent log, the buckets being written) without slowing queries measurably.
const CACHE_BYTES: u64 = 32 * 1024 * 1024;

fn open_db(dir: &Path) -> Result<sled::Db, StoreError> {
    // The changelog names files, pids and command lines: its owner's alone (sled
    // creates its files with the process umask; a private dir keeps them private).
    let db_dir = dir.join(DB_DIR_NAME);
    if let Err(e) = std::fs::DirBuilder::new().mode(0o700).create(&db_dir)
        && e.kind() != std::io::ErrorKind::AlreadyExists
    {
        return Err(open_error(dir, e.into()));
    }
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

type NetState = Option<(NetKind, FileType)>;

/// What a batch knows and does about one path.
#[derive(Default)]
struct Slot {
    /// Net entry before the batch.
    old: Option<StoredNet>,
    /// Seq of the path's last record so far (before the batch: from `old` or `gone`).
    last: Option<u64>,
    /// The batch wrote a record for the path.
    recorded: bool,
    /// `Some(origin id)` when the path's last record is an observation of the batch.
    observed: Option<Option<u64>>,
    /// The net state changes: to this.
    changed: Option<NetState>,
}

impl Slot {
    fn looked_up(old: Option<StoredNet>, gone: Option<u64>) -> Slot {
        Slot {
            old,
            last: old.map(|e| e.seq).or(gone),
            ..Slot::default()
        }
    }
}

/// What one `apply` or `rebuild` will write.
struct Plan<'a> {
    commands: Writes,
    new_commands: Vec<(u64, Arc<Origin>)>,
    next_command: u64,
    log: Writes,
    /// The chunk the batch ends in.
    tail: Option<ChunkWriter>,
    /// Sorted by path; `None` removes.
    net: Vec<(&'a [u8], Option<Small>)>,
    /// Sorted by path.
    gone: Vec<(&'a [u8], Option<Small>)>,
    records: u64,
    last_seq: u64,
}

impl Store {
    /// Opens or creates the changelog in `dir` (the sled db is `dir/changelog.sled`).
    /// Damage is an error (`StoreError::Corrupt`), never a panic or a shorter history:
    /// a panic of sled's while reading the db is caught here, and a changelog shorter
    /// than when it was last flushed (sled's recovery drops everything after a damaged
    /// entry) is told by the seal kept beside it (`SEAL_NAME`).
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let store = guarded("opening", || Store::open_unguarded(dir))?;
        if let Some(sealed) = read_seal(dir) {
            let meta = *store.read_state();
            if meta.last_seq < sealed {
                return Err(StoreError::Corrupt {
                    what: format!(
                        "{} holds records up to {} but was flushed with {sealed}: it is damaged",
                        dir.join(DB_DIR_NAME).display(),
                        meta.last_seq
                    ),
                });
            }
        }
        Ok(store)
    }

    fn open_unguarded(dir: &Path) -> Result<Store, StoreError> {
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
            net: PathMap::open(tree("net")?, "net entry")?,
            gone: PathMap::open(tree("gone")?, "gone entry")?,
            commands: Commands::new(tree("commands")?),
            marks: tree("marks")?,
            mark_records: tree("mark_records")?,
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
            writer: Mutex::new(Writer {
                tail: None,
                next_command: 0,
                broken: false,
            }),
        };
        // From here on `Drop` marks the dir closed again, whatever happens next.
        open_dirs.insert(key, true);
        drop(open_dirs);
        let meta = match store.meta.get(META_KEY)? {
            Some(bytes) => decode::<Meta>(&bytes).map_err(|e| e.context("meta record"))?,
            None => {
                if store.log.first()?.is_some() || !store.net.is_empty() {
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
        store.adopt_orphans(&mut store.writer())?;
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

    fn writer(&self) -> MutexGuard<'_, Writer> {
        // A panic mid-write leaves the trees possibly ahead of `meta`: recover first.
        self.writer.lock().unwrap_or_else(|e| {
            let mut w = e.into_inner();
            w.broken = true;
            w
        })
    }

    /// A writer lock with the trees consistent with `meta`.
    fn ready_writer(&self) -> Result<MutexGuard<'_, Writer>, StoreError> {
        let mut writer = self.writer();
        if writer.broken {
            self.recover(&mut writer)?;
        }
        Ok(writer)
    }

    /// Current position: current instance and seq of the last record written.
    pub fn token(&self) -> Token {
        self.read_state().token()
    }

    /// Brings `meta` up to the log after an interrupted write: records beyond its last
    /// seq are adopted (everything written after them refers to them, so keeping them
    /// keeps the trees consistent) and a new instance begins, because the net state
    /// may lag behind them until the tracker's rescan.
    fn recover(&self, writer: &mut Writer) -> Result<(), StoreError> {
        writer.tail = None;
        // The in-memory bounds may have missed a bucket write.
        self.net.reload()?;
        self.gone.reload()?;
        self.adopt_orphans(writer)
    }

    /// The part of `recover` that `open` needs (the bounds are fresh there).
    fn adopt_orphans(&self, writer: &mut Writer) -> Result<(), StoreError> {
        writer.tail = None;
        writer.next_command = self.commands.next_id()?;
        let meta = *self.read_state();
        let last = self.log_last_seq()?;
        if last > meta.last_seq {
            let gap = Gap {
                seq: last + 1,
                time_ns: now_ns(),
                old_instance: meta.instance,
                new_instance: new_instance(meta.instance),
                reason: format!(
                    "recovered from an interrupted write ({} records beyond the last \
                     committed one)",
                    last - meta.last_seq
                ),
            };
            let new_meta = Meta {
                instance: gap.new_instance,
                last_seq: last,
                instance_start: last,
                gap_count: meta.gap_count + 1,
                ..meta
            };
            let mut state = self.write_state();
            self.gaps.insert(u64_key(meta.gap_count), encode(&gap))?;
            self.meta.insert(META_KEY, encode(&new_meta))?;
            *state = new_meta;
            tracing::warn!(
                old = %format_args!("{:016x}", gap.old_instance),
                new = %format_args!("{:016x}", gap.new_instance),
                "{}", gap.reason
            );
        }
        writer.broken = false;
        Ok(())
    }

    /// Seq of the last record in the log (0: none).
    fn log_last_seq(&self) -> Result<u64, StoreError> {
        let Some((key, bytes)) = self.log.last()? else {
            return Ok(0);
        };
        let first = key_u64(&key).map_err(|e| e.context("log"))?;
        let mut reader =
            ChunkReader::new(first, &bytes).map_err(|e| e.context(chunk_place(first)))?;
        let mut last = 0;
        while let Some(head) = reader.next().map_err(|e| e.context(chunk_place(first)))? {
            last = head.seq;
        }
        Ok(last)
    }

    /// Appends the observations and applies the net updates. Readers see all of a batch
    /// or none of it; a crash in the middle leaves what reached the log, adopted by the
    /// next `open` into a new instance (see the module docs).
    ///
    /// Records get consecutive seqs in observation order, then one `Reclassified`
    /// record per net change of a path the batch has no observation for (in path
    /// order), so that since-queries can never miss a change of the net state.
    pub fn apply(&self, batch: &Batch) -> Result<Token, StoreError> {
        for o in &batch.observations {
            check_path(&o.path)?;
        }
        for u in &batch.net {
            check_path(&u.path)?;
        }
        // Sorted by path; later updates of the same path win: they describe a later
        // state.
        let mut updates: Vec<(&[u8], NetState)> = batch
            .net
            .iter()
            .map(|u| (u.path.as_slice(), u.state))
            .collect();
        updates.sort_by(|a, b| a.0.cmp(b.0));
        updates.dedup_by(|later, earlier| {
            let same = later.0 == earlier.0;
            if same {
                earlier.1 = later.1;
            }
            same
        });

        let mut writer = self.ready_writer()?;
        let meta = *self.read_state();
        // What the trees say about each path, one bucket read for neighbours.
        let mut paths: Vec<&[u8]> = batch
            .observations
            .iter()
            .map(|o| o.path.as_slice())
            .chain(updates.iter().map(|u| u.0))
            .collect();
        paths.sort_unstable();
        paths.dedup();
        let mut old: Vec<Option<StoredNet>> = vec![None; paths.len()];
        self.net.get_sorted(&paths, |i, v| {
            old[i] = Some(decode_net(v)?);
            Ok(())
        })?;
        let mut gone: Vec<Option<u64>> = vec![None; paths.len()];
        if !self.gone.is_empty() {
            let absent: Vec<usize> = (0..paths.len()).filter(|&i| old[i].is_none()).collect();
            let absent_paths: Vec<&[u8]> = absent.iter().map(|&i| paths[i]).collect();
            self.gone.get_sorted(&absent_paths, |j, v| {
                gone[absent[j]] = Some(decode_gone(v)?);
                Ok(())
            })?;
        }
        let mut slots: HashMap<&[u8], Slot> = paths
            .iter()
            .zip(old.into_iter().zip(gone))
            .map(|(p, (old, gone))| (*p, Slot::looked_up(old, gone)))
            .collect();

        let plan = self.plan(
            &meta,
            &mut writer,
            &batch.observations,
            &updates,
            &mut slots,
        );
        if plan.records == 0 {
            writer.tail = plan.tail;
            return Ok(meta.token());
        }
        let new_meta = Meta {
            last_seq: plan.last_seq,
            ..meta
        };
        self.commit(&mut writer, plan, &new_meta, None)?;
        Ok(new_meta.token())
    }

    /// Rebuilds the net state after a loss of history and starts a new instance.
    ///
    /// `entries` is the complete net state (a rescan of the upper dir); every path not
    /// in it stops being a change. Differences are logged as `Reclassified` records of
    /// the new instance, so its tokens see them.
    pub fn rebuild(
        &self,
        mut entries: Vec<(Vec<u8>, NetKind, FileType)>,
        reason: &str,
    ) -> Result<Gap, StoreError> {
        for (path, _, _) in &entries {
            check_path(path)?;
        }
        // Sorted, the last of equal paths kept.
        entries.reverse();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries.dedup_by(|a, b| a.0 == b.0);

        let mut writer = self.ready_writer()?;
        let meta = *self.read_state();
        // Walk the net state and the entries side by side: only differences are kept.
        let mut removed: Vec<(Vec<u8>, StoredNet)> = Vec::new();
        let mut changed: Vec<(usize, Option<StoredNet>)> = Vec::new();
        let mut next = 0;
        self.net.scan(b"", |path, value| {
            let entry = decode_net(value)?;
            while next < entries.len() && entries[next].0.as_slice() < path {
                changed.push((next, None));
                next += 1;
            }
            match entries.get(next) {
                Some((p, kind, file_type)) if p.as_slice() == path => {
                    if (*kind, *file_type) != (entry.kind, entry.file_type) {
                        changed.push((next, Some(entry)));
                    }
                    next += 1;
                }
                _ => removed.push((path.to_vec(), entry)),
            }
            Ok(true)
        })?;
        changed.extend((next..entries.len()).map(|i| (i, None)));

        let mut gone: Vec<Option<u64>> = vec![None; changed.len()];
        if !self.gone.is_empty() {
            let absent: Vec<usize> = (0..changed.len())
                .filter(|&j| changed[j].1.is_none())
                .collect();
            let absent_paths: Vec<&[u8]> = absent
                .iter()
                .map(|&j| entries[changed[j].0].0.as_slice())
                .collect();
            self.gone.get_sorted(&absent_paths, |k, v| {
                gone[absent[k]] = Some(decode_gone(v)?);
                Ok(())
            })?;
        }
        let mut slots: HashMap<&[u8], Slot> = HashMap::with_capacity(removed.len() + changed.len());
        let mut updates: Vec<(&[u8], NetState)> = Vec::with_capacity(slots.capacity());
        for (path, entry) in &removed {
            slots.insert(path, Slot::looked_up(Some(*entry), None));
            updates.push((path, None));
        }
        for ((i, old), gone) in changed.iter().zip(gone) {
            let (path, kind, file_type) = &entries[*i];
            slots.insert(path, Slot::looked_up(*old, gone));
            updates.push((path, Some((*kind, *file_type))));
        }
        updates.sort_by(|a, b| a.0.cmp(b.0));

        let plan = self.plan(&meta, &mut writer, &[], &updates, &mut slots);
        let gap = Gap {
            seq: meta.last_seq + 1,
            time_ns: now_ns(),
            old_instance: meta.instance,
            new_instance: new_instance(meta.instance),
            reason: reason.to_owned(),
        };
        let new_meta = Meta {
            instance: gap.new_instance,
            last_seq: plan.last_seq,
            instance_start: meta.last_seq,
            gap_count: meta.gap_count + 1,
            ..meta
        };
        let records = plan.records;
        self.commit(&mut writer, plan, &new_meta, Some((meta.gap_count, &gap)))?;
        tracing::info!(
            old = %format_args!("{:016x}", gap.old_instance),
            new = %format_args!("{:016x}", gap.new_instance),
            reclassified = records,
            reason,
            "changelog rebuilt"
        );
        Ok(gap)
    }

    /// Works out the records and tree writes of a batch; reads nothing: `slots` holds
    /// what the batch needs to know of every path it names.
    fn plan<'a>(
        &self,
        meta: &Meta,
        writer: &mut Writer,
        observations: &'a [Observation],
        updates: &[(&'a [u8], NetState)],
        slots: &mut HashMap<&'a [u8], Slot>,
    ) -> Plan<'a> {
        let mut interner = Interner::new(&self.commands, writer.next_command);
        let mut log = Writes::default();
        let mut seq = meta.last_seq;
        let mut chunk = match writer.tail.take() {
            Some(tail) if tail.next_seq() == seq + 1 && tail.extendable() => tail,
            _ => ChunkWriter::new(seq + 1),
        };
        let mut records = 0;
        let mut push = |head: &RecordHead, path: &[u8]| {
            if chunk.is_full() {
                log.insert(&chunk.key(), chunk.bytes());
                chunk = ChunkWriter::new(head.seq);
            }
            chunk.push(head, path);
            records += 1;
        };

        let links = rename_links(observations);
        for (o, link) in observations.iter().zip(links) {
            seq += 1;
            let slot = slots
                .get_mut(o.path.as_slice())
                .expect("every observed path has a slot");
            let origin = o.origin.as_ref().map(|origin| interner.id(origin));
            // What left a path was what the net state held there, when the observer
            // could not say.
            let file_type = match (o.file_type, o.action, slot.old) {
                (
                    FileType::Unknown,
                    Action::Deleted | Action::RenamedFrom | Action::Reset,
                    Some(old),
                ) => old.file_type,
                (file_type, _, _) => file_type,
            };
            push(
                &RecordHead {
                    seq,
                    time_ns: o.time_ns,
                    action: o.action,
                    file_type,
                    origin,
                    link,
                    before: slot.old.map(|e| e.kind),
                    prev: slot.last,
                },
                &o.path,
            );
            slot.last = Some(seq);
            slot.recorded = true;
            slot.observed = Some(origin);
        }

        let now = now_ns();
        let mut net: Vec<(&'a [u8], Option<Small>)> = Vec::new();
        for &(path, new) in updates {
            let slot = slots.get_mut(path).expect("every updated path has a slot");
            let current = slot.old.map(|e| (e.kind, e.file_type));
            if new == current {
                continue;
            }
            slot.changed = Some(new);
            if slot.observed.is_none() {
                seq += 1;
                push(
                    &RecordHead {
                        seq,
                        time_ns: now,
                        action: Action::Reclassified,
                        file_type: new
                            .or(current)
                            .map_or(FileType::Unknown, |(_, file_type)| file_type),
                        origin: None,
                        link: Link::None,
                        before: current.map(|(kind, _)| kind),
                        prev: slot.last,
                    },
                    path,
                );
                slot.last = Some(seq);
                slot.recorded = true;
            }
            let entry = new.map(|(kind, file_type)| StoredNet {
                kind,
                file_type,
                origin: match slot.observed {
                    Some(origin) => origin,
                    None => slot.old.and_then(|e| e.origin),
                },
                seq: slot.last.unwrap_or(seq),
            });
            net.push((path, entry.as_ref().map(encode_net)));
        }
        // The last record went into `chunk`: write it when there was one.
        if records > 0 {
            log.insert(&chunk.key(), chunk.bytes());
        }

        let mut gone = Vec::new();
        let sorted = net.len();
        for (path, slot) in slots.iter() {
            if !slot.recorded {
                continue;
            }
            let last = slot.last.unwrap_or(seq);
            let exists = match slot.changed {
                Some(new) => new.is_some(),
                None => {
                    // Observed, net state unchanged: the entry names its last change.
                    if let (Some(old), Some(origin)) = (slot.old, slot.observed) {
                        let entry = StoredNet {
                            origin,
                            seq: last,
                            ..old
                        };
                        net.push((path, Some(encode_net(&entry))));
                    }
                    slot.old.is_some()
                }
            };
            if !exists {
                gone.push((*path, Some(encode_gone(last))));
            }
        }
        if net.len() > sorted {
            net.sort_unstable_by(|a, b| a.0.cmp(b.0));
        }
        gone.sort_unstable_by(|a, b| a.0.cmp(b.0));
        Plan {
            commands: std::mem::take(&mut interner.rows),
            next_command: interner.next_id(),
            new_commands: std::mem::take(&mut interner.new),
            log,
            tail: (!chunk.is_empty()).then_some(chunk),
            net,
            gone,
            records,
            last_seq: seq,
        }
    }

    /// Writes a plan, maybe a gap, and the new meta, one tree after the other in an
    /// order that leaves every prefix consistent (see the module docs), while readers
    /// wait.
    fn commit(
        &self,
        writer: &mut Writer,
        plan: Plan<'_>,
        meta: &Meta,
        gap: Option<(u64, &Gap)>,
    ) -> Result<(), StoreError> {
        // Reads of the buckets to rewrite: before readers are held off.
        let (net, gone) = match (self.net.plan(&plan.net), self.gone.plan(&plan.gone)) {
            (Ok(net), Ok(gone)) => (net, gone),
            (Err(e), _) | (_, Err(e)) => {
                writer.tail = None;
                return Err(e);
            }
        };
        let mut state = self.write_state();
        let written = (|| {
            plan.commands.apply(&self.commands.tree)?;
            plan.log.apply(&self.log)?;
            self.net.apply(net)?;
            self.gone.apply(gone)?;
            if let Some((n, gap)) = gap {
                self.gaps.insert(u64_key(n), encode(gap))?;
            }
            self.meta.insert(META_KEY, encode(meta))?;
            Ok::<(), StoreError>(())
        })();
        if let Err(e) = written {
            writer.broken = true;
            return Err(e);
        }
        self.commands.remember(plan.new_commands);
        writer.tail = plan.tail;
        writer.next_command = plan.next_command;
        *state = *meta;
        Ok(())
    }

    pub(crate) fn stored_net(&self, path: &[u8]) -> Result<Option<StoredNet>, StoreError> {
        self.net.get(path, decode_net)
    }

    pub(crate) fn net_entry_with(
        resolver: &mut Resolver<'_>,
        e: StoredNet,
    ) -> Result<NetEntry, StoreError> {
        Ok(NetEntry {
            kind: e.kind,
            file_type: e.file_type,
            origin: resolver.origin(e.origin)?,
            seq: e.seq,
        })
    }

    pub fn net_entry(&self, path: &[u8]) -> Result<Option<NetEntry>, StoreError> {
        let _state = self.read_state();
        let Some(e) = self.stored_net(path)? else {
            return Ok(None);
        };
        Store::net_entry_with(&mut Resolver::new(&self.commands), e).map(Some)
    }

    /// Net entries strictly below `dir`, sorted (an empty `dir` is the root).
    pub fn net_under(&self, dir: &[u8]) -> Result<Vec<(Vec<u8>, NetEntry)>, StoreError> {
        let mut prefix = dir.to_vec();
        if !prefix.is_empty() {
            prefix.push(b'/');
        }
        let _state = self.read_state();
        let mut resolver = Resolver::new(&self.commands);
        let mut out = Vec::new();
        self.net.scan(&prefix, |path, value| {
            if !path.starts_with(&prefix) {
                return Ok(false);
            }
            let entry = Store::net_entry_with(&mut resolver, decode_net(value)?)?;
            out.push((path.to_vec(), entry));
            Ok(true)
        })?;
        Ok(out)
    }

    /// Every record of one path, in seq order.
    pub fn history(&self, path: &[u8]) -> Result<Vec<LogRecord>, StoreError> {
        let _state = self.read_state();
        let mut next = match self.stored_net(path)? {
            Some(e) => Some(e.seq),
            None => self.gone.get(path, decode_gone)?,
        };
        let mut resolver = Resolver::new(&self.commands);
        let mut chunk: Option<(u64, sled::IVec)> = None;
        let mut out = Vec::new();
        while let Some(seq) = next {
            // A record missing from the log was truncated, and so is what precedes it.
            let Some(head) = self.find_record(seq, path, &mut chunk)? else {
                break;
            };
            out.push(LogRecord {
                seq,
                time_ns: head.time_ns,
                action: head.action,
                path: path.to_vec(),
                file_type: head.file_type,
                origin: resolver.origin(head.origin)?,
                link: head.link.seq(seq),
                before: head.before,
            });
            next = head.prev;
        }
        out.reverse();
        Ok(out)
    }

    /// The record `seq`, which must be of `path`; `chunk` keeps the last chunk read.
    fn find_record(
        &self,
        seq: u64,
        path: &[u8],
        chunk: &mut Option<(u64, sled::IVec)>,
    ) -> Result<Option<RecordHead>, StoreError> {
        let held = matches!(chunk, Some((first, _)) if *first <= seq);
        if !held {
            *chunk = match self.log.get_lt(u64_key(seq.saturating_add(1)))? {
                Some((key, bytes)) => Some((key_u64(&key).map_err(|e| e.context("log"))?, bytes)),
                None => None,
            };
        }
        let Some((first, bytes)) = chunk.as_ref() else {
            return Ok(None);
        };
        let place = || chunk_place(*first);
        let mut reader = ChunkReader::new(*first, bytes).map_err(|e| e.context(place()))?;
        while let Some(head) = reader.next().map_err(|e| e.context(place()))? {
            if head.seq == seq {
                if reader.path() != path {
                    return Err(StoreError::Corrupt {
                        what: format!(
                            "history of \"{}\" leads to log record {seq} of \"{}\"",
                            path.escape_ascii(),
                            reader.path().escape_ascii()
                        ),
                    });
                }
                return Ok(Some(head));
            }
        }
        Ok(None)
    }

    /// Names the current position; re-marking a name moves it (and drops what was
    /// recorded at its old position).
    pub fn mark(&self, name: &str) -> Result<Token, StoreError> {
        check_mark_name(name)?;
        // The read lock keeps a concurrent `apply` from moving the token between
        // reading and writing it.
        let state = self.read_state();
        let token = state.token();
        self.mark_at(name, token, Vec::new())?;
        Ok(token)
    }

    /// Names `token` (a position of this history, from [`Store::token`]) and keeps
    /// `records` with it: per path, bytes the caller recorded about the path at that
    /// position (the store does not read them). Replaces an earlier mark of the name
    /// and its records.
    ///
    /// Errors: [`StoreError::BadMarkName`]; [`StoreError::Corrupt`] for a token that
    /// is not a position of this history.
    pub fn mark_with(
        &self,
        name: &str,
        token: Token,
        records: MarkRecords,
    ) -> Result<(), StoreError> {
        check_mark_name(name)?;
        let state = *self.read_state();
        if token.instance != state.instance || token.seq > state.last_seq {
            return Err(StoreError::Corrupt {
                what: format!(
                    "mark {name:?} at {token}, which is not a position of {}",
                    state.token()
                ),
            });
        }
        self.mark_at(name, token, records)
    }

    /// Without a mark, its records mean nothing: the old mark goes first, the new
    /// one last, so a crash between leaves no mark rather than a mark with the
    /// records of another position.
    fn mark_at(&self, name: &str, token: Token, records: MarkRecords) -> Result<(), StoreError> {
        self.marks.remove(name.as_bytes())?;
        let prefix = mark_record_key(name, b"");
        let mut batch = sled::Batch::default();
        for key in self.mark_records.scan_prefix(&prefix).keys() {
            batch.remove(key?);
        }
        for (path, value) in records {
            batch.insert(mark_record_key(name, &path), value);
        }
        self.mark_records.apply_batch(batch)?;
        self.marks.insert(name.as_bytes(), encode(&token))?;
        Ok(())
    }

    /// What was recorded about `path` at mark `name` (see [`Store::mark_with`]).
    pub fn mark_record(&self, name: &str, path: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .mark_records
            .get(mark_record_key(name, path))?
            .map(|v| v.to_vec()))
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
            net_paths: self.net.len()?,
            marks: self.marks.len() as u64,
            gaps: self.gaps.len() as u64,
            db_bytes: self.db.size_on_disk()?,
        })
    }

    /// Makes everything written so far durable (sled otherwise flushes on a timer).
    pub fn flush(&self) -> Result<(), StoreError> {
        let meta = *self.read_state();
        self.db.flush()?;
        write_seal(&self.dir, meta.last_seq);
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

    /// Records that recording stopped while the runtime went on (`None`: it records
    /// again, or stopped with its runtime), flushed at once. Every answer carries it
    /// (`ChangeSet::ended`) until a tracker starts again.
    pub fn set_ended(&self, ended: Option<&Ended>) -> Result<(), StoreError> {
        match ended {
            Some(e) => self.meta.insert(ENDED_KEY, encode(e))?,
            None => self.meta.remove(ENDED_KEY)?,
        };
        self.flush()
    }

    /// See `set_ended`.
    pub fn ended(&self) -> Result<Option<Ended>, StoreError> {
        self.meta
            .get(ENDED_KEY)?
            .map(|b| decode::<Ended>(&b).map_err(|e| e.context("end record")))
            .transpose()
    }
}

/// What a caller records about paths at a mark: `(path, bytes)`.
pub type MarkRecords = Vec<(Vec<u8>, Vec<u8>)>;

/// Mark names hold no NUL (see `check_mark_name`), so `name \0` prefixes exactly the
/// records of one mark.
fn mark_record_key(name: &str, path: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 1 + path.len());
    key.extend_from_slice(name.as_bytes());
    key.push(0);
    key.extend_from_slice(path);
    key
}

/// The other half's direction for each observation: a `RenamedFrom` directly
/// followed by a `RenamedTo` are the two halves of one rename.
fn rename_links(observations: &[Observation]) -> Vec<Link> {
    let mut links = vec![Link::None; observations.len()];
    let mut i = 0;
    while i + 1 < observations.len() {
        if observations[i].action == Action::RenamedFrom
            && observations[i + 1].action == Action::RenamedTo
        {
            links[i] = Link::Next;
            links[i + 1] = Link::Prev;
            i += 2;
        } else {
            i += 1;
        }
    }
    links
}

pub(crate) fn chunk_place(first: u64) -> String {
    format!("log records from {first}")
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
    if matches!(
        source,
        sled::Error::Corruption { .. } | sled::Error::ReportableBug(_)
    ) {
        return StoreError::Corrupt {
            what: format!(
                "{}: {}",
                dir.join(DB_DIR_NAME).display(),
                source.to_string().replace(" backtrace ()", "")
            ),
        };
    }
    StoreError::Open {
        path: dir.to_owned(),
        source,
    }
}

/// Renames a damaged changelog in `dir` aside (`changelog.sled.damaged-<unix
/// seconds>`, with its seal), so that a new one can start there; returns where it went.
pub fn set_aside_damaged(dir: &Path) -> std::io::Result<PathBuf> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = dir.join(format!("{DB_DIR_NAME}.damaged-{secs}"));
    std::fs::rename(dir.join(DB_DIR_NAME), &aside)?;
    if let Err(e) = std::fs::rename(dir.join(SEAL_NAME), aside.join(SEAL_NAME))
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return Err(e);
    }
    Ok(aside)
}

/// A file beside the db (`<state>/changelog.seal`) holding the last seq the db held
/// when it was last flushed: a db found shorter than that is damaged.
pub const SEAL_NAME: &str = "changelog.seal";

fn read_seal(dir: &Path) -> Option<u64> {
    std::fs::read_to_string(dir.join(SEAL_NAME))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Written after the db's flush, replaced atomically; a failure only loses the check.
fn write_seal(dir: &Path, last_seq: u64) {
    let tmp = dir.join(format!("{SEAL_NAME}.new"));
    let written = (|| {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        // Private like the db itself.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format!("{last_seq}\n").as_bytes())?;
        std::fs::rename(&tmp, dir.join(SEAL_NAME))
    })();
    if let Err(e) = written {
        tracing::warn!(error = %e, dir = %dir.display(), "cannot write the changelog's seal");
    }
}

/// Runs `f`, turning a panic inside it (sled's, on a damaged db) into
/// `StoreError::Corrupt`, with the panic's own report kept off the terminal.
pub(crate) fn guarded<T>(
    doing: &str,
    f: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    result.unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into());
        Err(StoreError::Corrupt {
            what: format!("sled failed while {doing} it ({why}): it is damaged"),
        })
    })
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
