//! Sorted maps from paths to small values, stored as buckets of neighbouring paths.
//!
//! sled keeps every item in its own slot of 16-item leaves, with per-item costs in
//! memory, on disk and per insert that dwarf a net entry of a few bytes. So a map keeps
//! runs of neighbouring paths (prefix-compressed, see `codec`) in one sled value of up
//! to `BUCKET_BYTES`, keyed by a lower bound: the entry for a path, if any, is in the
//! bucket with the greatest bound at or below it. The bounds are also kept in memory
//! (a few bytes per hundred paths), so a lookup is one sled read, and a batch reads
//! and rewrites each bucket it touches once, however many of its paths change.
//! Buckets that outgrow the limit are split evenly; emptied ones are removed; small
//! ones are not merged (they cost sled one item each, as a single entry did before).

use crate::codec::{BucketReader, BucketWriter};
use crate::error::StoreError;
use std::borrow::Cow;
use std::collections::BTreeSet;
use std::ops::Bound;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A bucket is split once its encoding outgrows this (some 60 paths). Smaller buckets
/// cost a tiny batch less to rewrite, larger ones cost sled fewer items; measured,
/// 1 to 2 KiB is where both are low.
const BUCKET_BYTES: usize = 1024;

/// The writes of one batch to one tree.
#[derive(Default)]
pub(crate) struct Writes {
    ops: Vec<(sled::IVec, Option<sled::IVec>)>,
}

impl Writes {
    pub fn insert(&mut self, key: &[u8], value: &[u8]) {
        self.ops.push((key.into(), Some(value.into())));
    }

    pub fn remove(&mut self, key: &[u8]) {
        self.ops.push((key.into(), None));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Applies the writes atomically. A single write goes in as is: a sled batch
    /// seals and writes out sled's current io buffer to make its recovery atomic,
    /// which costs a tiny tracker batch more than all the rest.
    pub fn apply(self, tree: &sled::Tree) -> Result<(), StoreError> {
        let mut ops = self.ops;
        match ops.len() {
            0 => {}
            1 => match ops.pop() {
                Some((key, Some(value))) => {
                    tree.insert(key, value)?;
                }
                Some((key, None)) => {
                    tree.remove(key)?;
                }
                None => {}
            },
            _ => {
                let mut batch = sled::Batch::default();
                for (key, value) in ops {
                    match value {
                        Some(value) => batch.insert(key, value),
                        None => batch.remove(key),
                    }
                }
                tree.apply_batch(batch)?;
            }
        }
        Ok(())
    }
}

/// What `PathMap::plan` worked out: bucket writes and the bounds they add and remove.
#[derive(Default)]
pub(crate) struct MapWrites {
    writes: Writes,
    added: Vec<Vec<u8>>,
    removed: Vec<Vec<u8>>,
}

pub(crate) struct PathMap {
    pub(crate) tree: sled::Tree,
    /// The keys of `tree`.
    bounds: RwLock<BTreeSet<Vec<u8>>>,
    /// What its entries are called in errors ("net entry").
    what: &'static str,
}

type Bounds = BTreeSet<Vec<u8>>;

/// The bound of the bucket that holds `path` if anything does.
fn bound_of<'b>(bounds: &'b Bounds, path: &[u8]) -> Option<&'b [u8]> {
    bounds
        .range::<[u8], _>((Bound::Unbounded, Bound::Included(path)))
        .next_back()
        .map(Vec::as_slice)
}

/// The first bound after `bound` (after none: the first).
fn bound_after<'b>(bounds: &'b Bounds, bound: Option<&[u8]>) -> Option<&'b [u8]> {
    match bound {
        Some(b) => bounds
            .range::<[u8], _>((Bound::Excluded(b), Bound::Unbounded))
            .next(),
        None => bounds.first(),
    }
    .map(Vec::as_slice)
}

fn below(path: &[u8], next: Option<&[u8]>) -> bool {
    next.is_none_or(|n| path < n)
}

impl PathMap {
    pub fn open(tree: sled::Tree, what: &'static str) -> Result<PathMap, StoreError> {
        let map = PathMap {
            tree,
            bounds: RwLock::new(BTreeSet::new()),
            what,
        };
        map.reload()?;
        Ok(map)
    }

    /// Reads the bounds from the tree again (after a failed write).
    pub fn reload(&self) -> Result<(), StoreError> {
        let bounds = self
            .tree
            .iter()
            .keys()
            .map(|k| Ok(k?.to_vec()))
            .collect::<Result<Bounds, StoreError>>()?;
        *self.bounds_mut() = bounds;
        Ok(())
    }

    fn bounds(&self) -> RwLockReadGuard<'_, Bounds> {
        // Only replaced whole or edited between complete steps.
        self.bounds.read().unwrap_or_else(|e| e.into_inner())
    }

    fn bounds_mut(&self) -> RwLockWriteGuard<'_, Bounds> {
        self.bounds.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_empty(&self) -> bool {
        self.bounds().is_empty()
    }

    fn place(&self, path: &[u8]) -> String {
        format!("{} \"{}\"", self.what, path.escape_ascii())
    }

    fn bucket_place(&self, bound: &[u8]) -> String {
        format!("{} bucket \"{}\"", self.what, bound.escape_ascii())
    }

    /// Decodes a value, naming the entry on failure.
    fn decoded<T>(
        &self,
        path: &[u8],
        value: &[u8],
        decode: impl FnOnce(&[u8]) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        decode(value).map_err(|e| e.context(self.place(path)))
    }

    /// The value of one path.
    pub fn get<T>(
        &self,
        path: &[u8],
        decode: impl FnOnce(&[u8]) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        let bound = {
            let bounds = self.bounds();
            match bound_of(&bounds, path) {
                Some(b) => b.to_vec(),
                None => return Ok(None),
            }
        };
        let Some(bytes) = self.tree.get(&bound)? else {
            return Ok(None);
        };
        let place = || self.bucket_place(&bound);
        let mut reader = BucketReader::new(&bytes).map_err(|e| e.context(place()))?;
        while let Some(value) = reader.next().map_err(|e| e.context(place()))? {
            match reader.path().cmp(path) {
                std::cmp::Ordering::Less => continue,
                std::cmp::Ordering::Equal => return self.decoded(path, value, decode).map(Some),
                std::cmp::Ordering::Greater => break,
            }
        }
        Ok(None)
    }

    /// Looks up paths given sorted and distinct, reading each bucket once:
    /// `found(i, value)` for each `paths[i]` present.
    pub fn get_sorted<P: AsRef<[u8]>>(
        &self,
        paths: &[P],
        mut found: impl FnMut(usize, &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let bounds = self.bounds();
        let mut i = 0;
        while i < paths.len() {
            let bound = bound_of(&bounds, paths[i].as_ref());
            let next = bound_after(&bounds, bound);
            let end = i + paths[i..].partition_point(|p| below(p.as_ref(), next));
            let Some(bound) = bound else {
                i = end;
                continue;
            };
            if let Some(bytes) = self.tree.get(bound)? {
                let place = || self.bucket_place(bound);
                let mut reader = BucketReader::new(&bytes).map_err(|e| e.context(place()))?;
                let mut value = reader.next().map_err(|e| e.context(place()))?;
                for (j, path) in paths.iter().enumerate().take(end).skip(i) {
                    let path = path.as_ref();
                    while let Some(v) = value {
                        match reader.path().cmp(path) {
                            std::cmp::Ordering::Less => {
                                value = reader.next().map_err(|e| e.context(place()))?;
                            }
                            std::cmp::Ordering::Equal => {
                                found(j, v).map_err(|e| e.context(self.place(path)))?;
                                break;
                            }
                            std::cmp::Ordering::Greater => break,
                        }
                    }
                }
            }
            i = end;
        }
        Ok(())
    }

    /// Calls `each(path, value)` for the entries at or after `start`, in order, until
    /// it returns `false`.
    pub fn scan(
        &self,
        start: &[u8],
        mut each: impl FnMut(&[u8], &[u8]) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let from = bound_of(&self.bounds(), start).map_or_else(Vec::new, <[u8]>::to_vec);
        for item in self.tree.range(from..) {
            let (bound, bytes) = item?;
            let place = || self.bucket_place(&bound);
            let mut reader = BucketReader::new(&bytes).map_err(|e| e.context(place()))?;
            while let Some(value) = reader.next().map_err(|e| e.context(place()))? {
                let path = reader.path();
                if path < start {
                    continue;
                }
                if !each(path, value).map_err(|e| e.context(self.place(path)))? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Number of entries (reads every bucket).
    pub fn len(&self) -> Result<u64, StoreError> {
        let mut n = 0;
        self.scan(b"", |_, _| {
            n += 1;
            Ok(true)
        })?;
        Ok(n)
    }

    /// Works out the bucket writes that set (`Some`) or remove (`None`) the entries of
    /// `changes`, given sorted by path and distinct. Reads only.
    pub fn plan<V: AsRef<[u8]>>(
        &self,
        changes: &[(&[u8], Option<V>)],
    ) -> Result<MapWrites, StoreError> {
        let bounds = self.bounds();
        let mut out = MapWrites::default();
        let mut i = 0;
        while i < changes.len() {
            let bound = bound_of(&bounds, changes[i].0);
            let next = bound_after(&bounds, bound);
            let end = i + changes[i..].partition_point(|c| below(c.0, next));
            let existing = match bound {
                Some(b) => self.tree.get(b)?,
                None => None,
            };
            // The bucket's entries with the changes merged in, in path order.
            let mut merged: Vec<(Cow<'_, [u8]>, &[u8])> = Vec::new();
            let mut changes = changes[i..end].iter().peekable();
            if let (Some(bound), Some(bytes)) = (bound, &existing) {
                let place = || self.bucket_place(bound);
                let mut reader = BucketReader::new(bytes).map_err(|e| e.context(place()))?;
                merged.reserve(BUCKET_BYTES / 16 + end - i);
                while let Some(value) = reader.next().map_err(|e| e.context(place()))? {
                    let path = reader.path();
                    let mut replaced = false;
                    while let Some((p, v)) = changes.next_if(|c| c.0 <= path) {
                        replaced |= *p == path;
                        if let Some(v) = v {
                            merged.push((Cow::Borrowed(*p), v.as_ref()));
                        }
                    }
                    if !replaced {
                        merged.push((Cow::Owned(path.to_vec()), value));
                    }
                }
            }
            for (p, v) in changes {
                if let Some(v) = v {
                    merged.push((Cow::Borrowed(*p), v.as_ref()));
                }
            }
            self.rebucket(bound, &merged, &mut out);
            i = end;
        }
        Ok(out)
    }

    /// Writes `entries` (sorted) as the buckets replacing the one at `bound`: evenly
    /// filled, the first keeping `bound`, each other keyed by its first path.
    fn rebucket(
        &self,
        bound: Option<&[u8]>,
        entries: &[(Cow<'_, [u8]>, &[u8])],
        out: &mut MapWrites,
    ) {
        if entries.is_empty() {
            if let Some(b) = bound {
                out.writes.remove(b);
                out.removed.push(b.to_vec());
            }
            return;
        }
        let mut all = BucketWriter::new();
        for (p, v) in entries {
            all.push(p, v);
        }
        let buckets = all.len().div_ceil(BUCKET_BYTES);
        if buckets <= 1 {
            let key = bound.unwrap_or(&entries[0].0);
            out.writes.insert(key, &all.finish());
            if bound.is_none() {
                out.added.push(key.to_vec());
            }
            return;
        }
        let target = all.len().div_ceil(buckets);
        let mut left = buckets;
        let mut key: Option<&[u8]> = bound;
        let mut w = BucketWriter::new();
        for (p, v) in entries {
            if w.len() >= target && left > 1 {
                self.put_bucket(
                    key,
                    bound,
                    std::mem::replace(&mut w, BucketWriter::new()),
                    out,
                );
                left -= 1;
                key = None;
            }
            if w.is_empty() && key.is_none() {
                key = Some(p);
            }
            w.push(p, v);
        }
        self.put_bucket(key, bound, w, out);
    }

    fn put_bucket(
        &self,
        key: Option<&[u8]>,
        bound: Option<&[u8]>,
        w: BucketWriter,
        out: &mut MapWrites,
    ) {
        let key = key.expect("a bucket with entries has a key");
        out.writes.insert(key, &w.finish());
        if Some(key) != bound {
            out.added.push(key.to_vec());
        }
    }

    /// Applies planned writes; readers must be held off until it returns.
    pub fn apply(&self, w: MapWrites) -> Result<(), StoreError> {
        if w.writes.is_empty() {
            return Ok(());
        }
        w.writes.apply(&self.tree)?;
        let mut bounds = self.bounds_mut();
        for b in w.removed {
            bounds.remove(&b);
        }
        bounds.extend(w.added);
        Ok(())
    }
}
