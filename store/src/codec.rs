//! The one place where records become bytes and back.
//!
//! Every value starts with a format-version byte so that a future layout change can be
//! recognised (and refused or migrated) instead of being misread as garbage.
//!
//! Small, rare records (meta, marks, gaps) are bincode (`encode` / `decode`). The
//! records that exist once per change have hand-written compact layouts, because they
//! are what the size of a changelog is made of:
//!
//! - path-map bucket (see `pathmap`): `[ver]` then sorted entries
//!   `[shared path prefix len][suffix len][suffix][value len][value]`, where a net
//!   entry's value is `[kind | file type << 3][origin id + 1 (0: none)][seq]` and a
//!   gone entry's (last seq of a path with records and no net entry) is `[seq]`;
//! - command (an interned `Origin`): `[ver][pid][command bytes to the end]`;
//! - log chunk: `[ver]` then consecutive records (the first has the chunk key's seq),
//!   each coded against the record before it in the chunk:
//!   `[action | link << 3 | before << 5][file type | origin mode << 4 | has prev << 6]`
//!   `[time delta (zigzag)][shared path prefix len][suffix len][suffix]`
//!   `[origin id if mode 2][seq - prev seq if has prev]`.
//!
//! Integers without a fixed width are LEB128 varints.

use crate::error::StoreError;
use crate::model::{Action, FileType, NetKind};
use bincode::config::{Configuration, standard};
use serde::{Serialize, de::DeserializeOwned};

/// Version of the on-disk record layout written by this build.
///
/// 1: bincode records, one log record per key, a by-path index tree.
/// 2: compact records, log chunks, interned commands, history chained through the
///    records (`prev`) instead of a by-path index.
pub const FORMAT_VERSION: u8 = 2;

/// Largest record `decode` accepts: a garbage length prefix must not make us allocate
/// gigabytes. Records hold a path (< 4 KiB) and a command line (< ARG_MAX, a few MiB).
const DECODE_LIMIT: usize = 64 << 20;

/// bincode 2's standard layout (varint integers, little endian).
fn config() -> Configuration {
    standard()
}

/// Encodes `v` behind the format-version byte.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    bincode::serde::encode_into_std_write(v, &mut out, config()).expect(
        "bincode only fails to encode sequences of unknown length or failing writers; \
         our records are plain derives and a Vec writer cannot fail",
    );
    out
}

/// Decodes a value written by `encode`, refusing other format versions, truncated
/// records and trailing bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    let rest = strip_version(bytes)?;
    let (value, used) =
        bincode::serde::decode_from_slice(rest, config().with_limit::<DECODE_LIMIT>()).map_err(
            |e| StoreError::Corrupt {
                what: format!("undecodable record: {e}"),
            },
        )?;
    if used != rest.len() {
        return Err(StoreError::Corrupt {
            what: format!("record has {} trailing bytes", rest.len() - used),
        });
    }
    Ok(value)
}

/// The bytes after the format-version byte, which must be ours.
fn strip_version(bytes: &[u8]) -> Result<&[u8], StoreError> {
    let (&version, rest) = bytes.split_first().ok_or_else(|| corrupt("empty record"))?;
    if version != FORMAT_VERSION {
        return Err(StoreError::Format {
            found: version,
            expected: FORMAT_VERSION,
        });
    }
    Ok(rest)
}

fn corrupt(what: impl Into<String>) -> StoreError {
    StoreError::Corrupt { what: what.into() }
}

/// Big-endian so that sled's byte order is numeric order.
pub fn u64_key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

/// Reads a key written by `u64_key`.
pub fn key_u64(key: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(key)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            what: format!("key of {} bytes where an 8-byte number belongs", key.len()),
        })
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Writes `path` front-coded against `prev`, the path written before it:
/// `[shared prefix len][suffix len][suffix]`; `path` becomes the new `prev`.
fn put_path(out: &mut Vec<u8>, prev: &mut Vec<u8>, path: &[u8]) {
    let shared = prev.iter().zip(path).take_while(|(a, b)| a == b).count();
    put_varint(out, shared as u64);
    put_varint(out, (path.len() - shared) as u64);
    out.extend_from_slice(&path[shared..]);
    prev.truncate(shared);
    prev.extend_from_slice(&path[shared..]);
}

/// A bounds-checked cursor over a record.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn byte(&mut self) -> Result<u8, StoreError> {
        let (&b, rest) = self
            .buf
            .split_first()
            .ok_or_else(|| corrupt("truncated record"))?;
        self.buf = rest;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, StoreError> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                break;
            }
            n |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(corrupt("varint overflows 64 bits"))
    }

    fn len(&mut self) -> Result<usize, StoreError> {
        usize::try_from(self.varint()?).map_err(|_| corrupt("length overflows"))
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if n > self.buf.len() {
            return Err(corrupt("truncated record"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn finish(&self) -> Result<(), StoreError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(corrupt(format!(
                "record has {} trailing bytes",
                self.buf.len()
            )))
        }
    }
}

const ACTIONS: [Action; 8] = [
    Action::Created,
    Action::Written,
    Action::Attrib,
    Action::Deleted,
    Action::RenamedFrom,
    Action::RenamedTo,
    Action::Reclassified,
    Action::Reset,
];
const FILE_TYPES: [FileType; 9] = [
    FileType::File,
    FileType::Dir,
    FileType::Symlink,
    FileType::Fifo,
    FileType::Socket,
    FileType::CharDevice,
    FileType::BlockDevice,
    FileType::Whiteout,
    FileType::Unknown,
];
const KINDS: [NetKind; 5] = [
    NetKind::Added,
    NetKind::Modified,
    NetKind::Metadata,
    NetKind::Removed,
    NetKind::Replaced,
];

fn action_code(a: Action) -> u8 {
    ACTIONS.iter().position(|x| *x == a).unwrap_or_default() as u8
}

fn file_type_code(f: FileType) -> u8 {
    FILE_TYPES.iter().position(|x| *x == f).unwrap_or_default() as u8
}

fn kind_code(k: NetKind) -> u8 {
    KINDS.iter().position(|x| *x == k).unwrap_or_default() as u8
}

fn action_of(code: u8) -> Result<Action, StoreError> {
    ACTIONS
        .get(usize::from(code))
        .copied()
        .ok_or_else(|| corrupt(format!("unknown action {code}")))
}

fn file_type_of(code: u8) -> Result<FileType, StoreError> {
    FILE_TYPES
        .get(usize::from(code))
        .copied()
        .ok_or_else(|| corrupt(format!("unknown file type {code}")))
}

fn kind_of(code: u8) -> Result<NetKind, StoreError> {
    KINDS
        .get(usize::from(code))
        .copied()
        .ok_or_else(|| corrupt(format!("unknown net kind {code}")))
}

/// A net entry as stored: the origin is a command id (see `Commands`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StoredNet {
    pub kind: NetKind,
    pub file_type: FileType,
    pub origin: Option<u64>,
    pub seq: u64,
}

/// Small records are encoded on the stack: sled keeps values of up to 22 bytes inline.
pub(crate) struct Small {
    buf: [u8; 32],
    len: usize,
}

impl Small {
    fn new() -> Small {
        Small {
            buf: [0; 32],
            len: 0,
        }
    }

    fn push(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    fn varint(&mut self, mut n: u64) {
        while n >= 0x80 {
            self.push(n as u8 | 0x80);
            n >>= 7;
        }
        self.push(n as u8);
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl AsRef<[u8]> for Small {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

/// A net entry inside a bucket (the bucket carries the version byte).
pub(crate) fn encode_net(e: &StoredNet) -> Small {
    let mut out = Small::new();
    out.push(kind_code(e.kind) | file_type_code(e.file_type) << 3);
    out.varint(e.origin.map_or(0, |id| id.saturating_add(1)));
    out.varint(e.seq);
    out
}

pub(crate) fn decode_net(bytes: &[u8]) -> Result<StoredNet, StoreError> {
    let mut r = Reader { buf: bytes };
    let b = r.byte()?;
    let kind = kind_of(b & 7)?;
    let file_type = file_type_of(b >> 3)?;
    let origin = r.varint()?.checked_sub(1);
    let seq = r.varint()?;
    r.finish()?;
    Ok(StoredNet {
        kind,
        file_type,
        origin,
        seq,
    })
}

/// A gone entry inside a bucket: the seq of the path's last record.
pub(crate) fn encode_gone(seq: u64) -> Small {
    let mut out = Small::new();
    out.varint(seq);
    out
}

pub(crate) fn decode_gone(bytes: &[u8]) -> Result<u64, StoreError> {
    let mut r = Reader { buf: bytes };
    let seq = r.varint()?;
    r.finish()?;
    Ok(seq)
}

/// Encodes a bucket of a path map: `[ver]` then, per entry in path order,
/// `[shared prefix len][suffix len][suffix][value len][value]`.
pub(crate) struct BucketWriter {
    bytes: Vec<u8>,
    path: Vec<u8>,
}

impl BucketWriter {
    pub fn new() -> BucketWriter {
        BucketWriter {
            bytes: vec![FORMAT_VERSION],
            path: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.len() == 1
    }

    pub fn push(&mut self, path: &[u8], value: &[u8]) {
        debug_assert!(self.is_empty() || self.path.as_slice() < path);
        put_path(&mut self.bytes, &mut self.path, path);
        put_varint(&mut self.bytes, value.len() as u64);
        self.bytes.extend_from_slice(value);
    }

    pub fn finish(self) -> Vec<u8> {
        self.bytes
    }
}

/// Decodes a bucket entry by entry; the current entry's path is `path()`.
pub(crate) struct BucketReader<'a> {
    r: Reader<'a>,
    path: Vec<u8>,
}

impl<'a> BucketReader<'a> {
    pub fn new(bytes: &'a [u8]) -> Result<BucketReader<'a>, StoreError> {
        Ok(BucketReader {
            r: Reader {
                buf: strip_version(bytes)?,
            },
            path: Vec::new(),
        })
    }

    pub fn path(&self) -> &[u8] {
        &self.path
    }

    /// The next entry's value, its path in `path()`.
    pub fn next(&mut self) -> Result<Option<&'a [u8]>, StoreError> {
        if self.r.is_empty() {
            return Ok(None);
        }
        let shared = self.r.len()?;
        let suffix = self.r.len()?;
        if shared > self.path.len() || (suffix == 0 && !self.path.is_empty()) {
            return Err(corrupt("bad path prefix in bucket"));
        }
        let suffix = self.r.bytes(suffix)?;
        if shared < self.path.len() && suffix.first() <= self.path.get(shared) {
            return Err(corrupt("bucket entries out of order"));
        }
        self.path.truncate(shared);
        self.path.extend_from_slice(suffix);
        if self.path.is_empty() {
            return Err(corrupt("empty path in bucket"));
        }
        let len = self.r.len()?;
        Ok(Some(self.r.bytes(len)?))
    }
}

pub(crate) fn encode_command(pid: u32, command: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(command.len() + 6);
    out.push(FORMAT_VERSION);
    put_varint(&mut out, u64::from(pid));
    out.extend_from_slice(command);
    out
}

pub(crate) fn decode_command(bytes: &[u8]) -> Result<(u32, Vec<u8>), StoreError> {
    let mut r = Reader {
        buf: strip_version(bytes)?,
    };
    let pid = u32::try_from(r.varint()?).map_err(|_| corrupt("pid overflows 32 bits"))?;
    Ok((pid, r.buf.to_vec()))
}

/// The other half of a rename, relative to a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Link {
    None,
    Next,
    Prev,
}

impl Link {
    pub fn seq(self, seq: u64) -> Option<u64> {
        match self {
            Link::None => None,
            Link::Next => seq.checked_add(1),
            Link::Prev => seq.checked_sub(1),
        }
    }
}

/// One log record as stored: the origin is a command id, `prev` the seq of the record
/// of the same path before this one (the per-path history is a chain through them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordHead {
    pub seq: u64,
    pub time_ns: u64,
    pub action: Action,
    pub file_type: FileType,
    pub origin: Option<u64>,
    pub link: Link,
    pub before: Option<NetKind>,
    pub prev: Option<u64>,
}

/// A chunk of a few KiB holds this many records at most, so that finding one record
/// (which decodes the chunk up to it) stays cheap.
pub(crate) const CHUNK_RECORDS: u64 = 256;
/// A chunk is closed once it holds this many bytes.
pub(crate) const CHUNK_BYTES: usize = 4096;
/// A later batch extends the last chunk only while it is smaller than this: each
/// extension rewrites the chunk whole, which a tiny batch should not pay much for.
const TAIL_EXTEND_BYTES: usize = 1024;

/// Builds one log chunk; a batch may extend the chunk the last batch left open.
#[derive(Debug, Clone)]
pub(crate) struct ChunkWriter {
    first_seq: u64,
    count: u64,
    bytes: Vec<u8>,
    path: Vec<u8>,
    time_ns: u64,
    origin: Option<u64>,
}

impl ChunkWriter {
    pub fn new(first_seq: u64) -> ChunkWriter {
        let mut bytes = Vec::with_capacity(CHUNK_BYTES + 256);
        bytes.push(FORMAT_VERSION);
        ChunkWriter {
            first_seq,
            count: 0,
            bytes,
            path: Vec::new(),
            time_ns: 0,
            origin: None,
        }
    }

    pub fn key(&self) -> [u8; 8] {
        u64_key(self.first_seq)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The seq the next record must have.
    pub fn next_seq(&self) -> u64 {
        self.first_seq + self.count
    }

    pub fn is_full(&self) -> bool {
        self.count >= CHUNK_RECORDS || self.bytes.len() >= CHUNK_BYTES
    }

    /// Whether the next batch should add to this chunk rather than start one.
    pub fn extendable(&self) -> bool {
        !self.is_full() && self.bytes.len() < TAIL_EXTEND_BYTES
    }

    pub fn push(&mut self, r: &RecordHead, path: &[u8]) {
        debug_assert_eq!(r.seq, self.next_seq());
        let out = &mut self.bytes;
        let before = r.before.map_or(0, |k| kind_code(k) + 1);
        let link = match r.link {
            Link::None => 0,
            Link::Next => 1,
            Link::Prev => 2,
        };
        out.push(action_code(r.action) | link << 3 | before << 5);
        let origin_mode = match r.origin {
            None => 0,
            Some(id) if self.origin == Some(id) => 1,
            Some(_) => 2,
        };
        out.push(file_type_code(r.file_type) | origin_mode << 4 | u8::from(r.prev.is_some()) << 6);
        let delta = r.time_ns.wrapping_sub(self.time_ns) as i64;
        put_varint(out, ((delta << 1) ^ (delta >> 63)) as u64);
        put_path(out, &mut self.path, path);
        if origin_mode == 2 {
            put_varint(out, r.origin.unwrap_or_default());
            self.origin = r.origin;
        }
        if let Some(prev) = r.prev {
            put_varint(out, r.seq - prev);
        }
        self.time_ns = r.time_ns;
        self.count += 1;
    }
}

/// Decodes a log chunk record by record; the current record's path is `path()`.
pub(crate) struct ChunkReader<'a> {
    r: Reader<'a>,
    next_seq: u64,
    path: Vec<u8>,
    time_ns: u64,
    origin: Option<u64>,
}

impl<'a> ChunkReader<'a> {
    pub fn new(first_seq: u64, bytes: &'a [u8]) -> Result<ChunkReader<'a>, StoreError> {
        let buf = strip_version(bytes)?;
        if buf.is_empty() {
            return Err(corrupt("empty log chunk"));
        }
        Ok(ChunkReader {
            r: Reader { buf },
            next_seq: first_seq,
            path: Vec::new(),
            time_ns: 0,
            origin: None,
        })
    }

    /// The path of the record `next` returned last.
    pub fn path(&self) -> &[u8] {
        &self.path
    }

    pub fn next(&mut self) -> Result<Option<RecordHead>, StoreError> {
        if self.r.is_empty() {
            return Ok(None);
        }
        let seq = self.next_seq;
        let r = &mut self.r;
        let b0 = r.byte()?;
        let b1 = r.byte()?;
        let action = action_of(b0 & 7)?;
        let link = match (b0 >> 3) & 3 {
            0 => Link::None,
            1 => Link::Next,
            2 if seq > 0 => Link::Prev,
            _ => return Err(corrupt("bad rename link")),
        };
        let before = match b0 >> 5 {
            0 => None,
            k => Some(kind_of(k - 1)?),
        };
        if b1 & 0x80 != 0 {
            return Err(corrupt("unknown record flags"));
        }
        let file_type = file_type_of(b1 & 15)?;
        let z = r.varint()?;
        let delta = ((z >> 1) as i64) ^ -((z & 1) as i64);
        let time_ns = self.time_ns.wrapping_add(delta as u64);
        let shared = r.len()?;
        let suffix = r.len()?;
        if shared > self.path.len() {
            return Err(corrupt("bad path prefix"));
        }
        let suffix = r.bytes(suffix)?;
        self.path.truncate(shared);
        self.path.extend_from_slice(suffix);
        if self.path.is_empty() {
            return Err(corrupt("empty path"));
        }
        let origin = match (b1 >> 4) & 3 {
            0 => None,
            1 => Some(self.origin.ok_or_else(|| corrupt("no origin to repeat"))?),
            2 => {
                self.origin = Some(r.varint()?);
                self.origin
            }
            _ => return Err(corrupt("bad origin mode")),
        };
        let prev = if b1 & 0x40 != 0 {
            let back = r.varint()?;
            if back == 0 || back > seq {
                return Err(corrupt("bad previous record"));
            }
            Some(seq - back)
        } else {
            None
        };
        self.time_ns = time_ns;
        self.next_seq += 1;
        Ok(Some(RecordHead {
            seq,
            time_ns,
            action,
            file_type,
            origin,
            link,
            before,
            prev,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Token;

    #[test]
    fn round_trip() {
        let t = Token {
            instance: 0xdead_beef,
            seq: 42,
        };
        let bytes = encode(&t);
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode::<Token>(&bytes).unwrap(), t);
    }

    #[test]
    fn refuses_other_versions_and_garbage() {
        let mut bytes = encode(&7u64);
        bytes[0] = 9;
        assert!(matches!(
            decode::<u64>(&bytes),
            Err(StoreError::Format {
                found: 9,
                expected: FORMAT_VERSION
            })
        ));
        assert!(matches!(
            decode::<u64>(&[]),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            decode::<u64>(&[FORMAT_VERSION]),
            Err(StoreError::Corrupt { .. })
        ));
        let mut long = encode(&7u64);
        long.push(0);
        assert!(matches!(
            decode::<u64>(&long),
            Err(StoreError::Corrupt { .. })
        ));
        // A huge claimed length must fail cleanly, not allocate.
        assert!(matches!(
            decode::<Vec<u8>>(&[
                FORMAT_VERSION,
                0xfd,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0x7f
            ]),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn keys_sort_numerically() {
        assert!(u64_key(255) < u64_key(256));
        assert_eq!(key_u64(&u64_key(1 << 40)).unwrap(), 1 << 40);
        assert!(matches!(key_u64(b"abc"), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn net_gone_buckets_and_commands_round_trip() {
        for e in [
            StoredNet {
                kind: NetKind::Replaced,
                file_type: FileType::Unknown,
                origin: None,
                seq: u64::MAX,
            },
            StoredNet {
                kind: NetKind::Added,
                file_type: FileType::File,
                origin: Some(u64::MAX - 1),
                seq: 0,
            },
        ] {
            assert_eq!(decode_net(encode_net(&e).as_slice()).unwrap(), e);
        }
        assert_eq!(decode_gone(encode_gone(300).as_slice()).unwrap(), 300);
        assert_eq!(
            decode_command(&encode_command(u32::MAX, b"a\0b")).unwrap(),
            (u32::MAX, b"a\0b".to_vec())
        );
        for bad in [&[][..], &[0xff, 0, 0], &[0, 0], &[0, 0, 0, 0]] {
            assert!(matches!(decode_net(bad), Err(StoreError::Corrupt { .. })));
        }
        let mut long = encode_gone(5).as_slice().to_vec();
        long.push(0);
        assert!(decode_gone(&long).is_err());
        // Eleven continuation bytes: more than 64 bits.
        let mut huge = vec![0xff; 10];
        huge.push(1);
        assert!(decode_gone(&huge).is_err());
        assert!(decode_command(&[FORMAT_VERSION, 0x80, 0x80, 0x80, 0x80, 0x10]).is_err());

        let entries: [(&[u8], &[u8]); 4] = [
            (b"a", b""),
            (b"a/b", b"xy"),
            (b"a/c", b"z"),
            (b"\xff\n", b""),
        ];
        let mut w = BucketWriter::new();
        assert!(w.is_empty());
        for (p, v) in entries {
            w.push(p, v);
        }
        let bytes = w.finish();
        let mut r = BucketReader::new(&bytes).unwrap();
        for (p, v) in entries {
            assert_eq!(r.next().unwrap(), Some(v));
            assert_eq!(r.path(), p);
        }
        assert_eq!(r.next().unwrap(), None);
        for n in 1..bytes.len() {
            let res = BucketReader::new(&bytes[..n]).and_then(|mut r| {
                let mut count = 0;
                while r.next()?.is_some() {
                    count += 1;
                }
                Ok(count)
            });
            assert!(!matches!(res, Ok(4)), "{n}");
        }
        // Out of order or repeated paths are refused.
        let mut bad = vec![FORMAT_VERSION];
        bad.extend([0, 1, b'b', 0, 0, 1, b'a', 0]);
        assert!(
            BucketReader::new(&bad)
                .and_then(|mut r| r.next().and_then(|_| r.next()))
                .is_err()
        );
        let mut dup = vec![FORMAT_VERSION];
        dup.extend([0, 1, b'b', 0, 1, 0, 0]);
        assert!(
            BucketReader::new(&dup)
                .and_then(|mut r| r.next().and_then(|_| r.next()))
                .is_err()
        );
    }

    #[test]
    fn chunks_round_trip() {
        let heads = [
            (
                RecordHead {
                    seq: 7,
                    time_ns: u64::MAX,
                    action: Action::RenamedFrom,
                    file_type: FileType::Whiteout,
                    origin: Some(3),
                    link: Link::Next,
                    before: Some(NetKind::Replaced),
                    prev: Some(1),
                },
                &b"a/b/c"[..],
            ),
            (
                RecordHead {
                    seq: 8,
                    time_ns: 0,
                    action: Action::RenamedTo,
                    file_type: FileType::File,
                    origin: Some(3),
                    link: Link::Prev,
                    before: None,
                    prev: None,
                },
                b"a/b",
            ),
            (
                RecordHead {
                    seq: 9,
                    time_ns: 1_700_000_000_000_000_000,
                    action: Action::Reset,
                    file_type: FileType::Unknown,
                    origin: None,
                    link: Link::None,
                    before: Some(NetKind::Added),
                    prev: Some(8),
                },
                b"a/b",
            ),
            (
                RecordHead {
                    seq: 10,
                    time_ns: 5,
                    action: Action::Created,
                    file_type: FileType::Dir,
                    origin: Some(u64::MAX),
                    link: Link::None,
                    before: None,
                    prev: None,
                },
                b"\xff\n",
            ),
        ];
        let mut w = ChunkWriter::new(7);
        for (h, p) in &heads {
            w.push(h, p);
        }
        assert_eq!(w.next_seq(), 11);
        let mut r = ChunkReader::new(7, w.bytes()).unwrap();
        for (h, p) in &heads {
            assert_eq!(r.next().unwrap().as_ref(), Some(h));
            assert_eq!(r.path(), *p);
        }
        assert_eq!(r.next().unwrap(), None);
        // Every truncation is an error, never a panic or a shorter chunk.
        let bytes = w.bytes();
        for n in 0..bytes.len() {
            let mut ok = 0;
            let res = ChunkReader::new(7, &bytes[..n]).and_then(|mut r| {
                while r.next()?.is_some() {
                    ok += 1;
                }
                Ok(())
            });
            assert!(res.is_err() || ok < heads.len(), "{n}");
        }
    }
}
