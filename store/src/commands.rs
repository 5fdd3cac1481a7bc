//! Interned origins: log records and net entries name the process that made a change
//! by a small id; the `commands` tree maps ids to `(pid, command line)`.
//!
//! A tracker sees few distinct processes and many changes each, so this keeps the
//! command line (often hundreds of bytes) out of every record. Ids come from a counter;
//! the same origin may get more than one id (after the in-memory cache was dropped or
//! the store reopened), which costs a row, never correctness.

use crate::codec::{decode_command, encode_command, key_u64, u64_key};
use crate::error::StoreError;
use crate::model::Origin;
use crate::pathmap::Writes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Bytes of command lines the cache holds before it starts over: command lines can be
/// long (a linker's), and a tracker must stay small.
const CACHE_BYTES: usize = 4 << 20;
/// Per-entry bookkeeping, roughly (two map slots, the `Arc`, the `Origin`).
const ENTRY_OVERHEAD: usize = 96;

#[derive(Default)]
struct Cache {
    by_id: HashMap<u64, Arc<Origin>>,
    by_origin: HashMap<Arc<Origin>, u64>,
    bytes: usize,
}

impl Cache {
    fn insert(&mut self, id: u64, origin: Arc<Origin>) {
        let cost = origin.command.len() + ENTRY_OVERHEAD;
        if self.bytes + cost > CACHE_BYTES {
            *self = Cache::default();
        }
        self.bytes += cost;
        self.by_origin.entry(origin.clone()).or_insert(id);
        self.by_id.insert(id, origin);
    }
}

pub(crate) struct Commands {
    pub(crate) tree: sled::Tree,
    cache: Mutex<Cache>,
}

impl Commands {
    pub fn new(tree: sled::Tree) -> Commands {
        Commands {
            tree,
            cache: Mutex::new(Cache::default()),
        }
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        // The cache is only ever replaced whole or extended: still good after a panic.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The id the next new command gets.
    pub fn next_id(&self) -> Result<u64, StoreError> {
        Ok(match self.tree.last()? {
            Some((key, _)) => key_u64(&key).map_err(|e| e.context("command id"))? + 1,
            None => 0,
        })
    }

    /// The origin of an id, from the cache or the tree.
    pub fn get(&self, id: u64) -> Result<Arc<Origin>, StoreError> {
        if let Some(o) = self.cache().by_id.get(&id) {
            return Ok(o.clone());
        }
        let bytes = self
            .tree
            .get(u64_key(id))?
            .ok_or_else(|| StoreError::Corrupt {
                what: format!("command {id} is missing"),
            })?;
        let (pid, command) =
            decode_command(&bytes).map_err(|e| e.context(format_args!("command {id}")))?;
        let origin = Arc::new(Origin { pid, command });
        self.cache().insert(id, origin.clone());
        Ok(origin)
    }

    /// Makes committed ids known to the cache.
    pub fn remember(&self, new: Vec<(u64, Arc<Origin>)>) {
        let mut cache = self.cache();
        for (id, origin) in new {
            cache.insert(id, origin);
        }
    }
}

/// Assigns ids to the origins of one batch. New ids become rows of `rows`, to be
/// written before anything refers to them, and reach the cache only once committed.
pub(crate) struct Interner<'c, 'a> {
    commands: &'c Commands,
    next_id: u64,
    last: Option<(&'a Origin, u64)>,
    pending: HashMap<&'a Origin, u64>,
    pub rows: Writes,
    pub new: Vec<(u64, Arc<Origin>)>,
}

impl<'c, 'a> Interner<'c, 'a> {
    pub fn new(commands: &'c Commands, next_id: u64) -> Interner<'c, 'a> {
        Interner {
            commands,
            next_id,
            last: None,
            pending: HashMap::new(),
            rows: Writes::default(),
            new: Vec::new(),
        }
    }

    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    pub fn id(&mut self, origin: &'a Origin) -> u64 {
        if let Some((o, id)) = self.last
            && (std::ptr::eq(o, origin) || o == origin)
        {
            return id;
        }
        let id = match self.pending.get(origin) {
            Some(&id) => id,
            None => {
                let cached = self.commands.cache().by_origin.get(origin).copied();
                let id = match cached {
                    Some(id) => id,
                    None => {
                        let id = self.next_id;
                        self.next_id += 1;
                        self.rows
                            .insert(&u64_key(id), &encode_command(origin.pid, &origin.command));
                        self.new.push((id, Arc::new(origin.clone())));
                        id
                    }
                };
                self.pending.insert(origin, id);
                id
            }
        };
        self.last = Some((origin, id));
        id
    }
}

/// Resolves ids while answering one query, without taking the shared cache's lock
/// for every record.
pub(crate) struct Resolver<'c> {
    commands: &'c Commands,
    memo: HashMap<u64, Arc<Origin>>,
    memo_bytes: usize,
}

impl<'c> Resolver<'c> {
    pub fn new(commands: &'c Commands) -> Resolver<'c> {
        Resolver {
            commands,
            memo: HashMap::new(),
            memo_bytes: 0,
        }
    }

    pub fn origin(&mut self, id: Option<u64>) -> Result<Option<Origin>, StoreError> {
        let Some(id) = id else {
            return Ok(None);
        };
        if let Some(o) = self.memo.get(&id) {
            return Ok(Some(Origin::clone(o)));
        }
        let o = self.commands.get(id)?;
        let cost = o.command.len() + ENTRY_OVERHEAD;
        if self.memo_bytes + cost > CACHE_BYTES {
            self.memo.clear();
            self.memo_bytes = 0;
        }
        self.memo_bytes += cost;
        self.memo.insert(id, o.clone());
        Ok(Some(Origin::clone(&o)))
    }
}
