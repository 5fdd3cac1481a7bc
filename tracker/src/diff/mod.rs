//! What `spfs diff` would print for a runtime, from the changelog and the layers.
//!
//! spfs compares two manifests (crates/spfs/src/tracking/diff.rs): the stack's merged
//! manifest (lower layers plus masks) and a walk of `/spfs`. An entry is its kind (dir,
//! blob, mask), mode, size and content digest (file bytes, symlink target), and two dir
//! entries are equal only when their modes and every entry below them are: so every
//! dir above a change is itself `~`, everything below a removed dir is `-`, and an
//! owner, a time or bytes rewritten unchanged are no change at all.
//!
//! The changelog nominates the paths (a path spfs could see as changed is always a
//! recorded change, below one, a mask, or a dir above one); this module asks the
//! filesystem what each side holds there and decides as spfs does. It is pure: the
//! filesystem is behind [`Sides`], so the rules are tested without root (`cases.txt`).

#[cfg(test)]
mod cases;

use crate::classify::{Classifier, Found, file_type};
use crate::masks::Masks;
use nix::sys::stat::FileStat;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use store::{Change, ChangeSet, FileType, FreshReason, NetKind, Token};

/// The kind of a manifest entry, as spfs's `EntryKind` (a symlink is a blob whose
/// content is its target).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeKind {
    Dir,
    File,
    Symlink,
    /// A path the environment's layers delete (spfs `EntryKind::Mask`).
    Mask,
    /// A fifo, socket or device: spfs cannot hold these (its walk fails on them).
    Special,
}

/// One side of a path: what spfs's manifest would hold, plus what its model leaves out
/// (owner, mtime) so `--all` and JSON can say what else changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub kind: NodeKind,
    /// `st_mode` with the type bits (`0o100644`, `0o40755`); for a mask, the mode of
    /// the whiteout spfs committed it from (`0o20000`).
    pub mode: u32,
    /// Bytes of a file, length of a symlink's target; 0 for dirs and masks (spfs's
    /// `Entry::size`).
    pub size: u64,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i128,
}

impl Node {
    /// spfs's mask entry. spfs commits a mask from an overlayfs whiteout and keeps its
    /// `lstat` mode (crates/spfs/src/tracking/manifest.rs `compute_node`): a char device
    /// with no permissions.
    pub const MASK: Node = Node {
        kind: NodeKind::Mask,
        mode: 0o20000,
        size: 0,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
    };

    fn is_dir(&self) -> bool {
        self.kind == NodeKind::Dir
    }

    /// Whether spfs gives this entry a content digest (dirs and masks have the null one).
    fn has_content(&self) -> bool {
        !matches!(self.kind, NodeKind::Dir | NodeKind::Mask)
    }
}

/// How a path differs, as spfs's `DiffMode` (`Touched`: equal in spfs's model, but the
/// changelog recorded a change there: owner, mtime, xattrs or bytes rewritten).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Sign {
    Added,
    Removed,
    Changed,
    Touched,
}

impl Sign {
    /// `+`, `-`, `~` as spfs prints them; `~` for touched too.
    pub fn symbol(self) -> char {
        match self {
            Sign::Added => '+',
            Sign::Removed => '-',
            Sign::Changed | Sign::Touched => '~',
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Sign::Added => "added",
            Sign::Removed => "removed",
            Sign::Changed => "changed",
            Sign::Touched => "touched",
        }
    }
}

/// One aspect in which the two sides of a path differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Field {
    /// In spfs's model: `st_mode` (type bits included).
    Mode,
    /// In spfs's model: the content digest (file bytes, symlink target).
    Content,
    /// In spfs's model: the size.
    Size,
    /// In spfs's model: a dir's entries (something below it differs).
    Entries,
    /// Outside spfs's model.
    Owner,
    /// Outside spfs's model.
    Mtime,
    /// Outside spfs's model: user xattrs.
    Xattrs,
}

impl Field {
    pub fn name(self) -> &'static str {
        match self {
            Field::Mode => "mode",
            Field::Content => "content",
            Field::Size => "size",
            Field::Entries => "entries",
            Field::Owner => "owner",
            Field::Mtime => "mtime",
            Field::Xattrs => "xattrs",
        }
    }
}

/// One line of the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffEntry {
    /// Relative to the mount, no leading slash.
    pub path: Vec<u8>,
    pub sign: Sign,
    /// The side compared against: the lower layers (with masks), or, for a path that
    /// was already a change at a `--since` point, `None` and `before_known` false.
    pub before: Option<Node>,
    pub after: Option<Node>,
    /// False when the state at the `since` point is not known (the path had already
    /// changed then): the sign comes from the recorded kinds and no details are given.
    pub before_known: bool,
    /// What differs, in this order; empty for a touched path that differs in nothing
    /// (bytes rewritten unchanged, a chmod and back).
    pub fields: Vec<Field>,
    /// The recorded change of this path, when it is one (dirs above a change and
    /// entries below a removed dir are not).
    pub change: Option<Change>,
}

impl DiffEntry {
    /// The details `spfs diff` prints for it (`[mode {100644=>100600}, content, size
    /// {2=>4}]`, crates/spfs/src/io.rs `format_diffs`), or, with `all`, what else
    /// changed for a touched path (`[owner {0:0=>1000:1000}, mtime]`, `[touched]`).
    pub fn details(&self, all: bool) -> String {
        let (Some(a), Some(b)) = (self.before, self.after) else {
            return String::new();
        };
        let mut abouts = Vec::new();
        for f in &self.fields {
            match f {
                Field::Mode => abouts.push(format!("mode {{{:06o}=>{:06o}}}", a.mode, b.mode)),
                Field::Content => abouts.push("content".to_string()),
                Field::Size => abouts.push(format!("size {{{}=>{}}}", a.size, b.size)),
                Field::Owner if all && self.sign == Sign::Touched => abouts.push(format!(
                    "owner {{{}:{}=>{}:{}}}",
                    a.uid, a.gid, b.uid, b.gid
                )),
                Field::Mtime | Field::Xattrs if all && self.sign == Sign::Touched => {
                    abouts.push(f.name().to_string())
                }
                _ => {}
            }
        }
        if self.sign == Sign::Touched && all && abouts.is_empty() {
            abouts.push("touched".to_string());
        }
        if abouts.is_empty() {
            String::new()
        } else {
            format!(" [{}]", abouts.join(", "))
        }
    }
}

/// An answer: the lines in spfs's order, touched paths included (printers leave them
/// out unless asked).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffSet {
    pub token: Token,
    pub fresh: Option<FreshReason>,
    /// See `ChangeSet::ended`.
    pub ended: Option<store::Ended>,
    pub entries: Vec<DiffEntry>,
}

/// What the two sides hold at one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair {
    pub before: Option<Node>,
    pub after: Option<Node>,
    /// Both have content and it differs (bytes, link target). Only meaningful then.
    pub content_differs: bool,
    /// False when the path existed at a `--since` point whose record of it is not
    /// kept (a token, not a mark): `before` is then `None` and means "unknown".
    pub before_known: bool,
}

/// The filesystem as the diff sees it.
pub trait Sides {
    /// The path in the stack's merged manifest (`before`: lower layers and masks) and
    /// in the runtime's merged view (`after`).
    fn pair(&self, rel: &[u8]) -> io::Result<Pair>;
    /// Whether the user xattrs of the two sides differ (asked only of paths equal in
    /// spfs's model).
    fn xattrs_differ(&self, rel: &[u8]) -> io::Result<bool>;
    /// Every path below dir `rel` on the before side, in any order.
    fn before_below(&self, rel: &[u8]) -> io::Result<Vec<Vec<u8>>>;
    /// Masks at and below `rel` (all of them when empty).
    fn masks(&self) -> Vec<Vec<u8>>;
    /// What the after side holds at `rel` as a mark records it (see [`Recorded`]).
    fn after_record(&self, rel: &[u8]) -> io::Result<Recorded>;
}

/// What a mark keeps about a path that was a change then, so that `--since MARK` can
/// compare the state at the mark with now as spfs compares two manifests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    /// `None`: absent from the mount then.
    pub node: Option<Node>,
    /// A symlink's target, the BLAKE3 digest of a file's bytes (32 bytes), a device's
    /// number; empty for dirs.
    pub content: Vec<u8>,
}

/// The changelog at a `--since` point: which paths were changes then, and what a mark
/// recorded about them.
pub trait Past {
    /// The net kind of `rel` at the point (`None`: equal to the lower layers then).
    fn kind_then(&self, rel: &[u8]) -> io::Result<Option<NetKind>>;
    /// What the mark recorded about `rel` (`None` for a token, or a path recorded
    /// while it changed under the mark).
    fn recorded(&self, rel: &[u8]) -> io::Result<Option<Recorded>>;
    /// Paths below dir `rel` that may have been changes at the point (a superset).
    fn changes_below(&self, rel: &[u8]) -> io::Result<Vec<Vec<u8>>>;
}

/// The changelog at a `--since` point: the store's net state, with the kinds then of
/// the paths changed since (an answer's `before`).
pub struct Changelog<'a> {
    store: &'a store::Store,
    then: std::collections::HashMap<Vec<u8>, Option<NetKind>>,
    mark: Option<&'a str>,
}

impl<'a> Changelog<'a> {
    /// For the answer `set` to a query since `mark` (`None` for a token).
    pub fn new(store: &'a store::Store, set: &ChangeSet, mark: Option<&'a str>) -> Self {
        Changelog {
            store,
            then: set
                .changes
                .iter()
                .map(|c| (c.path.clone(), c.before))
                .collect(),
            mark,
        }
    }
}

impl Past for Changelog<'_> {
    fn kind_then(&self, rel: &[u8]) -> io::Result<Option<NetKind>> {
        if let Some(kind) = self.then.get(rel) {
            return Ok(*kind);
        }
        // No record since: as it is now.
        let entry = self.store.net_entry(rel).map_err(io::Error::other)?;
        Ok(entry.map(|e| e.kind))
    }

    fn recorded(&self, rel: &[u8]) -> io::Result<Option<Recorded>> {
        let Some(mark) = self.mark else {
            return Ok(None);
        };
        match self
            .store
            .mark_record(mark, rel)
            .map_err(io::Error::other)?
        {
            Some(bytes) => store::codec::decode::<Recorded>(&bytes)
                .map(Some)
                .map_err(io::Error::other),
            None => Ok(None),
        }
    }

    fn changes_below(&self, rel: &[u8]) -> io::Result<Vec<Vec<u8>>> {
        let mut prefix = rel.to_vec();
        prefix.push(b'/');
        let mut out: Vec<Vec<u8>> = self
            .store
            .net_under(rel)
            .map_err(io::Error::other)?
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        out.extend(self.then.keys().filter(|p| p.starts_with(&prefix)).cloned());
        Ok(out)
    }
}

/// The mount at a `--since` point as the before side, now as the after side. A path
/// that was a change then is what the mark recorded; one below a dir that was added,
/// replaced or removed then was absent; any other is the lower layers' entry (a mask
/// is absent: the mount showed nothing there).
pub struct AtPoint<'a> {
    pub now: &'a dyn Sides,
    pub past: &'a dyn Past,
}

/// Where the before side of a path at a point comes from.
enum Then {
    /// The lower layers (nothing changed there or above it).
    Lower,
    Absent,
    Recorded(Recorded),
    /// A change then that the point keeps no record of.
    Unknown,
}

impl AtPoint<'_> {
    fn then(&self, rel: &[u8]) -> io::Result<Then> {
        match self.past.kind_then(rel)? {
            Some(NetKind::Removed) => return Ok(Then::Absent),
            Some(_) => {
                return Ok(match self.past.recorded(rel)? {
                    Some(r) => Then::Recorded(r),
                    None => Then::Unknown,
                });
            }
            None => {}
        }
        let mut dir = rel;
        while let Some(i) = dir.iter().rposition(|&b| b == b'/') {
            dir = &dir[..i];
            // Below these, everything that existed was itself a change.
            if matches!(
                self.past.kind_then(dir)?,
                Some(NetKind::Added | NetKind::Replaced | NetKind::Removed)
            ) {
                return Ok(Then::Absent);
            }
        }
        Ok(Then::Lower)
    }
}

impl Sides for AtPoint<'_> {
    fn pair(&self, rel: &[u8]) -> io::Result<Pair> {
        let now = self.now.pair(rel)?;
        let with_before = |before: Option<Node>, content_differs, before_known| Pair {
            before,
            after: now.after,
            content_differs,
            before_known,
        };
        Ok(match self.then(rel)? {
            Then::Lower if now.before.is_some_and(|b| b.kind == NodeKind::Mask) => {
                with_before(None, false, true)
            }
            Then::Lower => now,
            Then::Absent => with_before(None, false, true),
            Then::Unknown => with_before(None, false, false),
            Then::Recorded(r) => {
                let differs = match (r.node, now.after) {
                    (Some(a), Some(b)) if a.has_content() && b.has_content() => {
                        a.size != b.size || self.now.after_record(rel)?.content != r.content
                    }
                    _ => false,
                };
                with_before(r.node, differs, true)
            }
        })
    }

    fn xattrs_differ(&self, rel: &[u8]) -> io::Result<bool> {
        match self.then(rel)? {
            Then::Lower => self.now.xattrs_differ(rel),
            // A mark does not record xattrs.
            _ => Ok(false),
        }
    }

    fn before_below(&self, rel: &[u8]) -> io::Result<Vec<Vec<u8>>> {
        // Candidates: `pair` says which of them were there.
        let mut out = self.now.before_below(rel)?;
        out.extend(self.past.changes_below(rel)?);
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn masks(&self) -> Vec<Vec<u8>> {
        Vec::new()
    }

    fn after_record(&self, rel: &[u8]) -> io::Result<Recorded> {
        self.now.after_record(rel)
    }
}

/// How a query's answer is to be diffed.
pub struct Scope<'a> {
    /// Keeps the paths a query's prefixes and globs keep.
    pub keep: &'a dyn Fn(&[u8]) -> bool,
}

/// The diff of the changed paths in `set`, in spfs's order: against the lower layers
/// with [`Live`], since a point with [`AtPoint`].
pub fn diff(set: ChangeSet, sides: &dyn Sides, scope: &Scope<'_>) -> io::Result<DiffSet> {
    let mut entries: BTreeMap<Vec<u8>, DiffEntry> = BTreeMap::new();
    let mut derived: Vec<Vec<u8>> = Vec::new();
    for change in set.changes {
        let path = change.path.clone();
        let pair = sides.pair(&path)?;
        // A dir that is gone, or is another dir now (an opaque one), took what was
        // below it; a dir unknown at the point may have been one.
        let was_dir = pair.before.is_some_and(|b| b.is_dir()) || !pair.before_known;
        let gone = pair.after.is_none_or(|a| !a.is_dir())
            || matches!(change.kind, Some(NetKind::Removed | NetKind::Replaced));
        if was_dir && gone {
            derived.extend(sides.before_below(&path)?);
        }
        let entry = if pair.before_known {
            compare(sides, &path, pair, Some(change))?
        } else {
            Some(unknown_before(pair, change))
        };
        if let Some(e) = entry {
            entries.insert(path, e);
        }
    }
    derived.extend(sides.masks());
    for path in derived {
        if entries.contains_key(&path) || !(scope.keep)(&path) {
            continue;
        }
        let pair = sides.pair(&path)?;
        let entry = if pair.before_known {
            compare(sides, &path, pair, None)?
        } else {
            // Nothing recorded since the point: it is what it was then, unless it went
            // with the dir above.
            pair.after.is_none().then(|| DiffEntry {
                path: path.clone(),
                sign: Sign::Removed,
                before: None,
                after: None,
                before_known: false,
                fields: Vec::new(),
                change: None,
            })
        };
        if let Some(e) = entry
            && e.sign != Sign::Touched
        {
            entries.insert(path, e);
        }
    }
    add_parents(sides, &mut entries, scope)?;
    // A path with entries below it was a dir, also when its state then is unknown.
    let holds: Vec<bool> = entries
        .keys()
        .map(|p| {
            let mut below = p.clone();
            below.push(b'/');
            entries
                .range(below.clone()..)
                .next()
                .is_some_and(|(q, _)| q.starts_with(&below))
        })
        .collect();
    let mut entries: Vec<(DiffEntry, bool)> = entries.into_values().zip(holds).collect();
    entries.sort_by_cached_key(|(e, holds)| order_key(&e.path, *holds || is_tree(e)));
    let entries = entries.into_iter().map(|(e, _)| e).collect();
    Ok(DiffSet {
        token: set.token,
        fresh: set.fresh,
        ended: set.ended,
        entries,
    })
}

/// Every dir above a path that differs in spfs's model has different entries, so spfs
/// prints it as changed.
fn add_parents(
    sides: &dyn Sides,
    entries: &mut BTreeMap<Vec<u8>, DiffEntry>,
    scope: &Scope<'_>,
) -> io::Result<()> {
    let mut parents: Vec<Vec<u8>> = Vec::new();
    for e in entries.values().filter(|e| e.sign != Sign::Touched) {
        let mut p = e.path.as_slice();
        while let Some(i) = p.iter().rposition(|&b| b == b'/') {
            p = &p[..i];
            parents.push(p.to_vec());
        }
    }
    parents.sort();
    parents.dedup();
    for p in parents {
        if let Some(e) = entries.get_mut(&p) {
            if e.sign == Sign::Touched && e.before_known {
                e.sign = Sign::Changed;
                e.fields.retain(|f| in_spfs_model(*f));
                e.fields.push(Field::Entries);
                e.fields.sort();
            }
            continue;
        }
        if !(scope.keep)(&p) {
            continue;
        }
        let pair = sides.pair(&p)?;
        if !pair.before_known && pair.after.is_some_and(|b| b.is_dir()) {
            // A change at the point with no record since: a dir then as now.
            entries.insert(
                p.clone(),
                DiffEntry {
                    path: p,
                    sign: Sign::Changed,
                    before: None,
                    after: pair.after,
                    before_known: false,
                    fields: vec![Field::Entries],
                    change: None,
                },
            );
        } else if let (Some(a), Some(b)) = (pair.before, pair.after)
            && a.is_dir()
            && b.is_dir()
        {
            let mut fields = Vec::new();
            if a.mode != b.mode {
                fields.push(Field::Mode);
            }
            fields.push(Field::Entries);
            entries.insert(
                p.clone(),
                DiffEntry {
                    path: p,
                    sign: Sign::Changed,
                    before: Some(a),
                    after: Some(b),
                    before_known: true,
                    fields,
                    change: None,
                },
            );
        }
    }
    Ok(())
}

fn in_spfs_model(f: Field) -> bool {
    matches!(
        f,
        Field::Mode | Field::Content | Field::Size | Field::Entries
    )
}

impl Pair {
    /// Both sides hold an entry and spfs's model finds them equal (kind, mode, size,
    /// content): a path rewritten as it was, which spk calls touched.
    pub fn same_in_spfs_model(&self) -> bool {
        match (self.before, self.after) {
            (Some(a), Some(b)) => model_fields(a, b, self.content_differs).is_empty(),
            _ => false,
        }
    }
}

/// What spfs's `Entry` equality compares and finds different between `a` and `b`:
/// mode (with the type bits), content, size.
fn model_fields(a: Node, b: Node, content_differs: bool) -> Vec<Field> {
    let mut fields = Vec::new();
    if a.mode != b.mode {
        fields.push(Field::Mode);
    }
    let content = match (a.has_content(), b.has_content()) {
        (true, true) => content_differs,
        // A null digest against a real one.
        (true, false) | (false, true) => true,
        (false, false) => false,
    };
    if content {
        fields.push(Field::Content);
    }
    if a.size != b.size {
        fields.push(Field::Size);
    }
    fields
}

/// spfs's comparison of one path (crates/spfs/src/tracking/diff.rs `diff_path` and
/// `Entry`'s equality), with what its model leaves out for recorded changes. `None`:
/// no difference at all, and nothing recorded.
fn compare(
    sides: &dyn Sides,
    path: &[u8],
    pair: Pair,
    change: Option<Change>,
) -> io::Result<Option<DiffEntry>> {
    let entry = |sign, fields, change| DiffEntry {
        path: path.to_vec(),
        sign,
        before: pair.before,
        after: pair.after,
        before_known: true,
        fields,
        change,
    };
    let (a, b) = match (pair.before, pair.after) {
        // Absent on both sides (gone then and now): nothing to say.
        (None, None) => return Ok(None),
        // The after side is a walk of the mount: it never holds a mask.
        (Some(_), None) => return Ok(Some(entry(Sign::Removed, Vec::new(), change))),
        (None, Some(_)) => return Ok(Some(entry(Sign::Added, Vec::new(), change))),
        (Some(a), Some(b)) => (a, b),
    };
    let mut fields = model_fields(a, b, pair.content_differs);
    if !fields.is_empty() {
        return Ok(Some(entry(Sign::Changed, fields, change)));
    }
    // Equal in spfs's model; what else differs is worth a line only with a record.
    let Some(change) = change else {
        return Ok(None);
    };
    if a.uid != b.uid || a.gid != b.gid {
        fields.push(Field::Owner);
    }
    if a.mtime_ns != b.mtime_ns {
        fields.push(Field::Mtime);
    }
    if a.kind != NodeKind::Mask && sides.xattrs_differ(path)? {
        fields.push(Field::Xattrs);
    }
    Ok(Some(entry(Sign::Touched, fields, Some(change))))
}

/// A path that had already changed at a `--since` token: its state then is not kept,
/// so the sign says only whether it is still there and no details are given.
fn unknown_before(pair: Pair, change: Change) -> DiffEntry {
    DiffEntry {
        path: change.path.clone(),
        sign: if pair.after.is_some() {
            Sign::Changed
        } else {
            Sign::Removed
        },
        before: None,
        after: pair.after,
        before_known: false,
        fields: Vec::new(),
        change: Some(change),
    }
}

/// The sign a change has from its recorded kinds alone: at the `since` point (`None`:
/// equal to the lower layers) and now.
fn sign_of_kinds(before: Option<NetKind>, now: Option<NetKind>) -> Sign {
    match (before, now) {
        (_, Some(NetKind::Added)) if before != Some(NetKind::Added) => Sign::Added,
        (Some(NetKind::Added), None) => Sign::Removed,
        (Some(NetKind::Removed), None) => Sign::Added,
        (Some(NetKind::Removed), Some(k)) if k != NetKind::Removed => Sign::Added,
        (b, Some(NetKind::Removed)) if b != Some(NetKind::Removed) => Sign::Removed,
        _ => Sign::Changed,
    }
}

fn is_tree(e: &DiffEntry) -> bool {
    e.before.is_some_and(|n| n.is_dir()) || e.after.is_some_and(|n| n.is_dir())
}

/// spfs's order of manifest nodes (crates/spfs/src/tracking/manifest.rs, `Ord for
/// ManifestNode`): component by component, dirs before everything else, then names
/// byte-wise; a dir before what it holds. A path seen as a dir on either side sorts
/// as a dir (spfs keeps the first of its two nodes, and the dir's sorts first).
pub fn order_key(path: &[u8], is_tree: bool) -> Vec<(u8, Vec<u8>)> {
    let parts: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
    let last = parts.len() - 1;
    parts
        .into_iter()
        .enumerate()
        .map(|(i, name)| (u8::from(i == last && !is_tree), name.to_vec()))
        .collect()
}

/// The answer when no layers can be read (the runtime has ended): each recorded change
/// with its sign from the recorded kinds and no details.
pub fn recorded_only(set: ChangeSet) -> DiffSet {
    let entries = set
        .changes
        .into_iter()
        .map(|change| DiffEntry {
            path: change.path.clone(),
            sign: sign_of_kinds(change.before, change.kind),
            before: None,
            after: None,
            before_known: false,
            fields: Vec::new(),
            change: Some(change),
        })
        .collect();
    let mut set = DiffSet {
        token: set.token,
        fresh: set.fresh,
        ended: set.ended,
        entries,
    };
    set.entries.sort_by_cached_key(|e| {
        let dir = e
            .change
            .as_ref()
            .is_some_and(|c| c.file_type == store::FileType::Dir);
        order_key(&e.path, dir)
    });
    set
}

/// The layers and masks of a live runtime as the two sides of the diff.
pub struct Live<'a> {
    layers: &'a Classifier,
    masks: &'a Masks,
    /// Whether each dir path looked up is a dir of the overlay: changed paths come
    /// in bunches under the same dirs.
    merged_dirs: std::cell::RefCell<std::collections::HashMap<Vec<u8>, bool>>,
}

impl<'a> Live<'a> {
    pub fn new(layers: &'a Classifier, masks: &'a Masks) -> Self {
        Live {
            layers,
            masks,
            merged_dirs: Default::default(),
        }
    }

    /// The overlay's entry at `rel`.
    fn after(&self, rel: &[u8]) -> io::Result<Option<Found>> {
        match rel.iter().rposition(|&b| b == b'/') {
            Some(i) if !self.is_merged_dir(&rel[..i])? => Ok(None),
            _ => self.layers.merged_child(rel),
        }
    }

    fn is_merged_dir(&self, dir: &[u8]) -> io::Result<bool> {
        if let Some(known) = self.merged_dirs.borrow().get(dir) {
            return Ok(*known);
        }
        let is_dir = self
            .after(dir)?
            .is_some_and(|f| node_of(&f.stat).kind == NodeKind::Dir);
        self.merged_dirs.borrow_mut().insert(dir.to_vec(), is_dir);
        Ok(is_dir)
    }

    fn before(&self, rel: &[u8]) -> io::Result<Option<Found>> {
        if self.masks.hides(rel) {
            return Ok(None);
        }
        self.layers.lower_entry(rel)
    }

    /// Whether a dir above `rel` is masked (a mask itself is an entry; below it, none).
    fn below_mask(&self, rel: &[u8]) -> bool {
        match rel.iter().rposition(|&b| b == b'/') {
            Some(i) => self.masks.hides(&rel[..i]),
            None => false,
        }
    }
}

impl Sides for Live<'_> {
    fn pair(&self, rel: &[u8]) -> io::Result<Pair> {
        let after = self.after(rel)?;
        let (before, found) = if self.below_mask(rel) {
            (None, None)
        } else if self.masks.contains(rel) {
            (Some(Node::MASK), None)
        } else {
            let found = self.before(rel)?;
            (found.as_ref().map(|f| node_of(&f.stat)), found)
        };
        let content_differs = match (&found, &after) {
            (Some(a), Some(b))
                if node_of(&a.stat).has_content() && node_of(&b.stat).has_content() =>
            {
                a.content_differs(b)?
            }
            _ => false,
        };
        Ok(Pair {
            before,
            after: after.as_ref().map(|f| node_of(&f.stat)),
            content_differs,
            before_known: true,
        })
    }

    fn xattrs_differ(&self, rel: &[u8]) -> io::Result<bool> {
        match (self.before(rel)?, self.after(rel)?) {
            (Some(a), Some(b)) => a.xattrs_differ(&b),
            _ => Ok(false),
        }
    }

    fn before_below(&self, rel: &[u8]) -> io::Result<Vec<Vec<u8>>> {
        let mut out: Vec<Vec<u8>> = self
            .layers
            .lower_tree(rel)?
            .into_iter()
            .map(|(p, _, _)| p)
            .filter(|p| !self.below_mask(p))
            .collect();
        out.extend(
            self.masks
                .under(rel)
                .filter(|m| m.as_slice() != rel && !self.below_mask(m))
                .cloned(),
        );
        Ok(out)
    }

    fn masks(&self) -> Vec<Vec<u8>> {
        self.masks
            .iter()
            .filter(|m| !self.below_mask(m))
            .cloned()
            .collect()
    }

    fn after_record(&self, rel: &[u8]) -> io::Result<Recorded> {
        Ok(match self.after(rel)? {
            Some(found) => Recorded {
                node: Some(node_of(&found.stat)),
                content: found.content_digest()?,
            },
            None => Recorded {
                node: None,
                content: Vec::new(),
            },
        })
    }
}

/// spfs's view of one `lstat`.
pub fn node_of(s: &FileStat) -> Node {
    let kind = match file_type(s) {
        FileType::Dir => NodeKind::Dir,
        FileType::File => NodeKind::File,
        FileType::Symlink => NodeKind::Symlink,
        _ => NodeKind::Special,
    };
    Node {
        kind,
        mode: s.st_mode,
        size: if kind == NodeKind::Dir {
            0
        } else {
            s.st_size as u64
        },
        uid: s.st_uid,
        gid: s.st_gid,
        mtime_ns: i128::from(s.st_mtime) * 1_000_000_000 + i128::from(s.st_mtime_nsec),
    }
}
