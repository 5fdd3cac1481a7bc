//! The records and query types of the changelog.
//!
//! Paths are byte strings relative to the overlay's upper dir (`b"a/b"`, no leading
//! slash, never empty, never containing NUL): Linux paths are bytes, and a changelog
//! that cannot hold every name the kernel accepts would lose changes.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Net change of one path relative to the lower layers, as a walk of the upper dir
/// would classify it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum NetKind {
    /// Present in the upper dir, absent from the lower layers.
    Added,
    /// Same type as in the lower layers, different content (bytes, link target, rdev).
    Modified,
    /// Same type and content as in the lower layers; mode, owner, xattrs or mtime differ.
    Metadata,
    /// Hidden by a whiteout.
    Removed,
    /// An opaque dir over a lower dir, or a different file type than the lower entry.
    Replaced,
}

/// The type of the entry a record speaks of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileType {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
    /// An overlayfs whiteout (a 0/0 char device): the lower entry is deleted.
    Whiteout,
    /// The entry was gone before it could be inspected.
    Unknown,
}

/// What an observed event did to a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    Created,
    /// Content written (write, truncate, mmap then close).
    Written,
    /// Mode, owner, xattr, times or link count changed.
    Attrib,
    Deleted,
    /// First half of a rename; the next record (its `link`) is the `RenamedTo`.
    RenamedFrom,
    /// Second half of a rename; `link` names the `RenamedFrom` record.
    RenamedTo,
    /// The net state changed without an event naming this path (a rescan after a gap,
    /// or a parent dir renamed or removed).
    Reclassified,
    /// Put back to the lower layers by a reset.
    Reset,
}

/// The names the CLI and its JSON use for kinds, types and actions, one table each:
/// `name` and `from_name` read the same table.
macro_rules! names {
    ($ty:ident { $($variant:ident => $name:literal),* $(,)? }) => {
        impl $ty {
            /// Every value with its name.
            pub const NAMES: &'static [($ty, &'static str)] = &[$(($ty::$variant, $name)),*];

            /// The name of this value (`added`, `char-device`, `renamed-from`).
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),*
                }
            }

            /// The value a name stands for.
            pub fn from_name(name: &str) -> Option<$ty> {
                Self::NAMES.iter().find(|(_, n)| *n == name).map(|(v, _)| *v)
            }
        }
    };
}

names!(NetKind {
    Added => "added",
    Modified => "modified",
    Metadata => "metadata",
    Removed => "removed",
    Replaced => "replaced",
});

names!(FileType {
    File => "file",
    Dir => "dir",
    Symlink => "symlink",
    Fifo => "fifo",
    Socket => "socket",
    CharDevice => "char-device",
    BlockDevice => "block-device",
    Whiteout => "whiteout",
    Unknown => "unknown",
});

names!(Action {
    Created => "created",
    Written => "written",
    Attrib => "attrib",
    Deleted => "deleted",
    RenamedFrom => "renamed-from",
    RenamedTo => "renamed-to",
    Reclassified => "reclassified",
    Reset => "reset",
});

/// The process that made a change.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Origin {
    pub pid: u32,
    /// Command line as read from /proc when the event was processed (empty when the
    /// process was gone by then).
    pub command: Vec<u8>,
}

/// One change the tracker observed, before the store gives it a sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    pub action: Action,
    pub path: Vec<u8>,
    /// `Unknown` on a deletion, a reset or the first half of a rename: the record gets
    /// the type the net state held for the path.
    pub file_type: FileType,
    pub origin: Option<Origin>,
    /// Wall-clock time, nanoseconds since the Unix epoch.
    pub time_ns: u64,
}

/// One entry of the ordered log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    pub seq: u64,
    pub time_ns: u64,
    pub action: Action,
    pub path: Vec<u8>,
    pub file_type: FileType,
    pub origin: Option<Origin>,
    /// For the halves of a rename: the seq of the other half.
    pub link: Option<u64>,
    /// Net kind of the path just before the batch that holds this record.
    pub before: Option<NetKind>,
}

/// The net state of one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetEntry {
    pub kind: NetKind,
    pub file_type: FileType,
    /// The last process that changed this path, if known.
    pub origin: Option<Origin>,
    /// Seq of the last log record for this path.
    pub seq: u64,
}

/// A new net state for one path, computed by the tracker from the filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetUpdate {
    pub path: Vec<u8>,
    /// `None`: the path is no longer a change (removed from the upper dir, or equal to
    /// the lower layers again).
    pub state: Option<(NetKind, FileType)>,
}

/// Everything one tracker batch wants written, applied atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// In event order. A `RenamedFrom` directly followed by a `RenamedTo` are linked.
    pub observations: Vec<Observation>,
    pub net: Vec<NetUpdate>,
}

/// A position in the history of one changelog: `<instance>:<seq>`.
///
/// The instance changes whenever history may be incomplete (tracker restart, queue
/// overflow, rebuilt db), so a token from another instance cannot be trusted to
/// describe everything that happened since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Token {
    pub instance: u64,
    pub seq: u64,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}:{}", self.instance, self.seq)
    }
}

/// Where a "since" query starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Since {
    Mark(String),
    Token(Token),
}

/// A query for changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query {
    /// `None`: the whole net state.
    pub since: Option<Since>,
    /// Keep only these paths and what lies below them (relative, component-wise).
    pub prefixes: Vec<Vec<u8>>,
    /// Keep only paths matching one of these globs (globset syntax, relative paths).
    pub globs: Vec<String>,
}

/// One changed path in a query answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub path: Vec<u8>,
    /// Net kind now; `None` when the path was a change at the `since` point and is no
    /// longer one (deleted again, or reset).
    pub kind: Option<NetKind>,
    /// Net kind at the `since` point (always `None` for a query without `since`).
    pub before: Option<NetKind>,
    pub file_type: FileType,
    pub origin: Option<Origin>,
    /// Seq of the last log record for this path.
    pub seq: u64,
}

/// Why an answer is the full net state instead of the changes since a point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FreshReason {
    /// The token or mark belongs to another instance of the history.
    OtherInstance { asked: u64, current: u64 },
    /// The position is older than the retained log.
    Expired { asked: u64, oldest: u64 },
}

/// A query answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeSet {
    /// The current position: pass it as `since` to get what changes next.
    pub token: Token,
    /// Set when `since` could not be honoured and the full net state is returned.
    pub fresh: Option<FreshReason>,
    /// Set when the changelog stopped recording while its runtime went on (a kept
    /// changelog whose tracker was stopped or signalled): what changed after that is
    /// not in the answer.
    pub ended: Option<Ended>,
    /// Sorted by path.
    pub changes: Vec<Change>,
}

/// How a changelog stopped recording before its runtime ended (`Store::set_ended`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ended {
    /// When, in nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// What stopped it, in words ("SIGTERM", "a stop request").
    pub why: String,
}

/// A recorded loss of history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    /// The seq of the first record after the gap.
    pub seq: u64,
    pub time_ns: u64,
    pub old_instance: u64,
    pub new_instance: u64,
    pub reason: String,
}

/// Counters for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStats {
    pub instance: u64,
    pub next_seq: u64,
    pub log_records: u64,
    pub net_paths: u64,
    pub marks: u64,
    pub gaps: u64,
    pub db_bytes: u64,
}
