//! Parser of the records a fanotify group in FID mode hands to `read(2)`.
//!
//! Neither fanotify-rs nor nix decode the info records that follow each event's
//! metadata in FID mode, so this is ours. It works on a plain byte slice: every length
//! the kernel reports is checked against what is actually there, so a short read or a
//! malformed record yields a typed error, never a panic or an out-of-bounds read.

use thiserror::Error;

/// `struct fanotify_event_metadata` is 24 bytes in version 3.
pub const METADATA_LEN: usize = 24;
/// The only metadata version this parser understands (`FANOTIFY_METADATA_VERSION`).
pub const METADATA_VERSION: u8 = 3;

const INFO_HEADER_LEN: usize = 4;
/// `__kernel_fsid_t`.
const FSID_LEN: usize = 8;
/// `struct file_handle` without its payload: `handle_bytes` and `handle_type`.
const HANDLE_HEADER_LEN: usize = 8;
/// Largest handle the kernel produces (`MAX_HANDLE_SZ`).
pub const MAX_HANDLE_BYTES: usize = 128;

const INFO_FID: u8 = 1;
const INFO_DFID_NAME: u8 = 2;
const INFO_DFID: u8 = 3;
const INFO_OLD_DFID_NAME: u8 = 10;
const INFO_NEW_DFID_NAME: u8 = 12;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("fanotify record truncated: {needed} bytes needed, {available} available")]
    Truncated { needed: usize, available: usize },
    #[error("fanotify metadata version {0} is not supported (expected {METADATA_VERSION})")]
    Version(u8),
    #[error(
        "fanotify record has inconsistent lengths (event {event_len}, metadata {metadata_len})"
    )]
    BadLength {
        event_len: usize,
        metadata_len: usize,
    },
    #[error("fanotify info record of type {info_type} is malformed: {why}")]
    BadInfo { info_type: u8, why: &'static str },
}

/// An opaque file handle as `name_to_handle_at(2)` would return it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HandleRef<'a> {
    pub handle_type: i32,
    pub bytes: &'a [u8],
}

impl HandleRef<'_> {
    pub fn to_owned(self) -> Handle {
        Handle {
            handle_type: self.handle_type,
            bytes: self.bytes.to_vec(),
        }
    }
}

/// An owned file handle, usable as a cache key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Handle {
    pub handle_type: i32,
    pub bytes: Vec<u8>,
}

impl Handle {
    pub fn as_ref(&self) -> HandleRef<'_> {
        HandleRef {
            handle_type: self.handle_type,
            bytes: &self.bytes,
        }
    }
}

/// A directory handle plus the name of an entry in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirEntryRef<'a> {
    pub fsid: [u8; FSID_LEN],
    pub dir: HandleRef<'a>,
    /// `.` when the event is about the directory itself.
    pub name: &'a [u8],
}

/// One decoded event. Info records this tracker does not use are skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event<'a> {
    pub mask: u64,
    pub pid: i32,
    pub fd: i32,
    /// The object the event is about (`FAN_EVENT_INFO_TYPE_FID`).
    pub object: Option<HandleRef<'a>>,
    /// Parent dir and name (`DFID_NAME`), or the dir alone (`DFID`, name empty).
    pub entry: Option<DirEntryRef<'a>>,
    /// For `FAN_RENAME`: where the entry was.
    pub old: Option<DirEntryRef<'a>>,
    /// For `FAN_RENAME`: where the entry went.
    pub new: Option<DirEntryRef<'a>>,
}

/// An event decoded from a buffer, kept as positions in it: the reader decodes each
/// buffer once, and the watcher views the events again without parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventSpans {
    pub mask: u64,
    pub pid: i32,
    pub fd: i32,
    object: Option<HandleSpan>,
    entry: Option<EntrySpan>,
    old: Option<EntrySpan>,
    new: Option<EntrySpan>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HandleSpan {
    handle_type: i32,
    at: u32,
    len: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EntrySpan {
    fsid: [u8; FSID_LEN],
    dir: HandleSpan,
    name_at: u32,
    name_len: u32,
}

/// Where `part` lies in `buf`; `part` must be a subslice of it.
fn span_of(buf: &[u8], part: &[u8]) -> (u32, u32) {
    if part.is_empty() {
        // An empty name need not point into the buffer.
        return (0, 0);
    }
    let at = (part.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize);
    debug_assert!(at + part.len() <= buf.len(), "a subslice of the buffer");
    // Read buffers are far below 4 GiB.
    (at as u32, part.len() as u32)
}

impl EventSpans {
    /// `event`, decoded from `buf`, as positions in `buf`.
    pub fn of(event: &Event<'_>, buf: &[u8]) -> EventSpans {
        let handle = |h: HandleRef<'_>| {
            let (at, len) = span_of(buf, h.bytes);
            HandleSpan {
                handle_type: h.handle_type,
                at,
                len,
            }
        };
        let entry = |e: DirEntryRef<'_>| {
            let (name_at, name_len) = span_of(buf, e.name);
            EntrySpan {
                fsid: e.fsid,
                dir: handle(e.dir),
                name_at,
                name_len,
            }
        };
        EventSpans {
            mask: event.mask,
            pid: event.pid,
            fd: event.fd,
            object: event.object.map(handle),
            entry: event.entry.map(entry),
            old: event.old.map(entry),
            new: event.new.map(entry),
        }
    }

    /// The event again, from the buffer it was decoded from.
    pub fn view<'a>(&self, buf: &'a [u8]) -> Event<'a> {
        let slice = |at: u32, len: u32| &buf[at as usize..at as usize + len as usize];
        let handle = |h: HandleSpan| HandleRef {
            handle_type: h.handle_type,
            bytes: slice(h.at, h.len),
        };
        let entry = |e: EntrySpan| DirEntryRef {
            fsid: e.fsid,
            dir: handle(e.dir),
            name: slice(e.name_at, e.name_len),
        };
        Event {
            mask: self.mask,
            pid: self.pid,
            fd: self.fd,
            object: self.object.map(handle),
            entry: self.entry.map(entry),
            old: self.old.map(entry),
            new: self.new.map(entry),
        }
    }
}

/// Iterates over the events in a buffer filled by one `read(2)` of a fanotify fd.
pub struct Events<'a> {
    buf: &'a [u8],
}

pub fn events(buf: &[u8]) -> Events<'_> {
    Events { buf }
}

impl<'a> Iterator for Events<'a> {
    type Item = Result<Event<'a>, ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        match parse_event(self.buf) {
            Ok((event, len)) => {
                self.buf = &self.buf[len..];
                Some(Ok(event))
            }
            Err(e) => {
                // Lengths can no longer be trusted: stop rather than guess.
                self.buf = &[];
                Some(Err(e))
            }
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, ParseError> {
    field::<2>(b, at).map(u16::from_ne_bytes)
}
fn u32_at(b: &[u8], at: usize) -> Result<u32, ParseError> {
    field::<4>(b, at).map(u32::from_ne_bytes)
}
fn i32_at(b: &[u8], at: usize) -> Result<i32, ParseError> {
    field::<4>(b, at).map(i32::from_ne_bytes)
}
fn u64_at(b: &[u8], at: usize) -> Result<u64, ParseError> {
    field::<8>(b, at).map(u64::from_ne_bytes)
}

fn field<const N: usize>(b: &[u8], at: usize) -> Result<[u8; N], ParseError> {
    let end = at.checked_add(N).ok_or(ParseError::Truncated {
        needed: usize::MAX,
        available: b.len(),
    })?;
    b.get(at..end)
        .and_then(|s| s.try_into().ok())
        .ok_or(ParseError::Truncated {
            needed: end,
            available: b.len(),
        })
}

/// Parses the event at the start of `buf`; returns it and its length.
pub fn parse_event(buf: &[u8]) -> Result<(Event<'_>, usize), ParseError> {
    if buf.len() < METADATA_LEN {
        return Err(ParseError::Truncated {
            needed: METADATA_LEN,
            available: buf.len(),
        });
    }
    let event_len = u32_at(buf, 0)? as usize;
    let vers = buf[4];
    let metadata_len = u16_at(buf, 6)? as usize;
    if vers != METADATA_VERSION {
        return Err(ParseError::Version(vers));
    }
    if metadata_len < METADATA_LEN || event_len < metadata_len {
        return Err(ParseError::BadLength {
            event_len,
            metadata_len,
        });
    }
    if event_len > buf.len() {
        return Err(ParseError::Truncated {
            needed: event_len,
            available: buf.len(),
        });
    }
    let mut event = Event {
        mask: u64_at(buf, 8)?,
        fd: i32_at(buf, 16)?,
        pid: i32_at(buf, 20)?,
        ..Event::default()
    };
    let mut rest = &buf[metadata_len..event_len];
    while !rest.is_empty() {
        let info_type = *rest.first().ok_or(ParseError::Truncated {
            needed: 1,
            available: 0,
        })?;
        let len = u16_at(rest, 2)? as usize;
        if len < INFO_HEADER_LEN || len > rest.len() {
            return Err(ParseError::BadInfo {
                info_type,
                why: "length outside the event",
            });
        }
        let info = &rest[..len];
        match info_type {
            INFO_FID => event.object = Some(parse_fid(info, info_type, false)?.dir),
            INFO_DFID => event.entry = Some(parse_fid(info, info_type, false)?),
            INFO_DFID_NAME => event.entry = Some(parse_fid(info, info_type, true)?),
            INFO_OLD_DFID_NAME => event.old = Some(parse_fid(info, info_type, true)?),
            INFO_NEW_DFID_NAME => event.new = Some(parse_fid(info, info_type, true)?),
            _ => {}
        }
        rest = &rest[len..];
    }
    Ok((event, event_len))
}

/// Parses `struct fanotify_event_info_fid` (header, fsid, file_handle, optional name).
fn parse_fid(info: &[u8], info_type: u8, with_name: bool) -> Result<DirEntryRef<'_>, ParseError> {
    let bad = |why| ParseError::BadInfo { info_type, why };
    let handle_at = INFO_HEADER_LEN + FSID_LEN;
    let payload_at = handle_at + HANDLE_HEADER_LEN;
    if info.len() < payload_at {
        return Err(bad("too short for a file handle"));
    }
    let fsid = field::<FSID_LEN>(info, INFO_HEADER_LEN)?;
    let handle_bytes = u32_at(info, handle_at)? as usize;
    let handle_type = i32_at(info, handle_at + 4)?;
    if handle_bytes > MAX_HANDLE_BYTES {
        return Err(bad("file handle larger than MAX_HANDLE_SZ"));
    }
    let name_at = payload_at + handle_bytes;
    let bytes = info
        .get(payload_at..name_at)
        .ok_or(bad("file handle runs past the record"))?;
    let name = if with_name {
        let tail = &info[name_at..];
        let nul = tail
            .iter()
            .position(|&b| b == 0)
            .ok_or(bad("name is not NUL-terminated"))?;
        if nul == 0 {
            return Err(bad("empty name"));
        }
        &tail[..nul]
    } else {
        &[][..]
    };
    Ok(DirEntryRef {
        fsid,
        dir: HandleRef { handle_type, bytes },
        name,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Builds one info record the way the kernel lays it out (padded to 4 bytes).
    pub(crate) fn info(info_type: u8, handle: &[u8], name: Option<&[u8]>) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&[7u8; FSID_LEN]);
        body.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
        body.extend_from_slice(&1i32.to_ne_bytes());
        body.extend_from_slice(handle);
        if let Some(name) = name {
            body.extend_from_slice(name);
            body.push(0);
        }
        let mut len = INFO_HEADER_LEN + body.len();
        len = len.div_ceil(4) * 4;
        let mut out = vec![info_type, 0];
        out.extend_from_slice(&(len as u16).to_ne_bytes());
        out.extend_from_slice(&body);
        out.resize(len, 0);
        out
    }

    pub(crate) fn event(mask: u64, pid: i32, infos: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = infos.concat();
        let len = METADATA_LEN + body.len();
        let mut out = Vec::new();
        out.extend_from_slice(&(len as u32).to_ne_bytes());
        out.push(METADATA_VERSION);
        out.push(0);
        out.extend_from_slice(&(METADATA_LEN as u16).to_ne_bytes());
        out.extend_from_slice(&mask.to_ne_bytes());
        out.extend_from_slice(&(-1i32).to_ne_bytes());
        out.extend_from_slice(&pid.to_ne_bytes());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn decodes_dfid_name_and_fid() {
        let buf = [
            event(
                0x100,
                42,
                &[
                    info(INFO_DFID_NAME, b"dirhandle", Some(b"file")),
                    info(INFO_FID, b"obj", None),
                ],
            ),
            event(
                0x1000_0000,
                7,
                &[
                    info(INFO_OLD_DFID_NAME, b"d1", Some(b"a")),
                    info(INFO_NEW_DFID_NAME, b"d2", Some(b"b\nc")),
                ],
            ),
        ]
        .concat();
        let events: Vec<_> = events(&buf)
            .collect::<Result<_, _>>()
            .expect("well-formed buffer");
        assert_eq!(events.len(), 2);
        let e = &events[0];
        assert_eq!((e.mask, e.pid, e.fd), (0x100, 42, -1));
        let entry = e.entry.expect("dfid_name present");
        assert_eq!(
            (entry.dir.bytes, entry.name),
            (&b"dirhandle"[..], &b"file"[..])
        );
        assert_eq!(e.object.expect("fid present").bytes, b"obj");
        let r = &events[1];
        assert_eq!(r.old.expect("old").name, b"a");
        assert_eq!(r.new.expect("new").name, b"b\nc");
        assert_eq!(r.new.expect("new").dir.bytes, b"d2");
    }

    #[test]
    fn rejects_truncation_and_bad_lengths() {
        let good = event(2, 1, &[info(INFO_DFID_NAME, b"h", Some(b"n"))]);
        for cut in 0..good.len() {
            let r = parse_event(&good[..cut]);
            assert!(r.is_err(), "cut at {cut} must fail");
        }
        let mut bad_version = good.clone();
        bad_version[4] = 2;
        assert_eq!(
            parse_event(&bad_version).unwrap_err(),
            ParseError::Version(2)
        );
        let mut no_nul = event(2, 1, &[info(INFO_DFID_NAME, b"hh", Some(b"nam"))]);
        // Overwrite the name, its NUL and the padding.
        let name_at = METADATA_LEN + INFO_HEADER_LEN + FSID_LEN + HANDLE_HEADER_LEN + 2;
        no_nul[name_at..].fill(b'x');
        assert!(matches!(
            parse_event(&no_nul),
            Err(ParseError::BadInfo { .. })
        ));
        let mut huge_handle = good.clone();
        huge_handle[METADATA_LEN + 12..METADATA_LEN + 16].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(matches!(
            parse_event(&huge_handle),
            Err(ParseError::BadInfo { .. })
        ));
    }

    #[test]
    fn an_error_ends_iteration() {
        let mut buf = event(2, 1, &[]);
        buf.extend_from_slice(&[0xff; 10]);
        let all: Vec<_> = events(&buf).collect();
        assert_eq!(all.len(), 2);
        assert!(all[0].is_ok() && all[1].is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]
        #[test]
        fn random_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..512)) {
            for e in events(&buf) {
                let _ = e;
            }
        }

        #[test]
        fn mutated_valid_records_never_panic(
            flips in proptest::collection::vec((0usize..200, any::<u8>()), 0..8),
            name in proptest::collection::vec(1u8..=255, 1..40),
        ) {
            let mut buf = [
                event(0x100, 3, &[info(INFO_DFID_NAME, b"0123456789ab", Some(&name)), info(INFO_FID, b"xyz", None)]),
                event(0x1000_0000, 4, &[info(INFO_OLD_DFID_NAME, b"a", Some(b"x")), info(INFO_NEW_DFID_NAME, b"b", Some(b"y"))]),
            ].concat();
            for (at, byte) in flips {
                if let Some(b) = buf.get_mut(at) { *b = byte; }
            }
            for e in events(&buf) {
                if let Ok(e) = e
                    && let Some(entry) = e.entry { prop_assert!(!entry.name.contains(&0)); }
            }
        }

        /// Decoded once, viewed again: the same event.
        #[test]
        fn spans_view_the_decoded_event(
            name in proptest::collection::vec(1u8..=255, 1..40),
            handle in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            let buf = [
                event(0x100, 3, &[info(INFO_DFID_NAME, &handle, Some(&name)), info(INFO_FID, b"xyz", None)]),
                event(0x1000_0000, 4, &[info(INFO_OLD_DFID_NAME, b"a", Some(b"x")), info(INFO_NEW_DFID_NAME, &handle, Some(&name))]),
                event(0x4, 5, &[info(INFO_DFID, &handle, None)]),
            ].concat();
            for e in events(&buf) {
                let e = e.expect("a valid record");
                prop_assert_eq!(EventSpans::of(&e, &buf).view(&buf), e);
            }
        }
    }
}
