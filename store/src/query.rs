//! Answering queries: the whole net state, or what changed since a position.

use crate::changelog::{Meta, Store, net_place};
use crate::codec::{decode, key_u64, u64_key};
use crate::error::StoreError;
use crate::model::*;
use globset::{Glob, GlobSet, GlobSetBuilder};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

/// The path filter of a query.
struct Filter {
    /// Normalised (no leading or trailing `/`), and empty when everything matches.
    prefixes: Vec<Vec<u8>>,
    globs: Option<GlobSet>,
}

impl Filter {
    fn new(prefixes: &[Vec<u8>], globs: &[String]) -> Result<Filter, StoreError> {
        let mut norm: Vec<Vec<u8>> = prefixes.iter().map(|p| trim_slashes(p).to_vec()).collect();
        // The root prefix keeps everything.
        if norm.iter().any(Vec::is_empty) {
            norm.clear();
        }
        norm.sort();
        // Drop prefixes covered by another one, so prefix scans never repeat a path.
        let mut kept: Vec<Vec<u8>> = Vec::with_capacity(norm.len());
        for p in norm {
            if !kept.iter().any(|k| under(&p, k)) {
                kept.push(p);
            }
        }
        let globs = if globs.is_empty() {
            None
        } else {
            let mut builder = GlobSetBuilder::new();
            for g in globs {
                builder.add(Glob::new(g).map_err(|source| StoreError::BadGlob {
                    glob: g.clone(),
                    source,
                })?);
            }
            Some(builder.build().map_err(|source| StoreError::BadGlob {
                glob: globs.join(" "),
                source,
            })?)
        };
        Ok(Filter {
            prefixes: kept,
            globs,
        })
    }

    fn matches(&self, path: &[u8]) -> bool {
        (self.prefixes.is_empty() || self.prefixes.iter().any(|p| under(path, p)))
            && self
                .globs
                .as_ref()
                .is_none_or(|g| g.is_match(OsStr::from_bytes(path)))
    }
}

fn trim_slashes(mut p: &[u8]) -> &[u8] {
    while let [b'/', rest @ ..] = p {
        p = rest;
    }
    while let [rest @ .., b'/'] = p {
        p = rest;
    }
    p
}

/// `path` is `prefix` or lies below it, component-wise.
fn under(path: &[u8], prefix: &[u8]) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest[0] == b'/')
}

/// What the records after a position say about one path.
struct Seen {
    before: Option<NetKind>,
    last: LogRecord,
}

impl Store {
    /// Answers a query; see `Query`. A position that cannot be honoured (another
    /// instance, or older than the retained log) yields the full net state flagged
    /// `fresh`, never a silently shorter answer. A seq of the current instance beyond
    /// the last record has nothing after it: the answer is empty, not fresh.
    ///
    /// Since a position, each path with a record after it appears once: `before` is
    /// its net kind at the position, `kind` its net kind now; paths created and gone
    /// again within the window are left out.
    pub fn query(&self, q: &Query) -> Result<ChangeSet, StoreError> {
        let filter = Filter::new(&q.prefixes, &q.globs)?;
        let state = self.read_state();
        let token = state.token();
        let since = match &q.since {
            None => None,
            Some(Since::Token(t)) => Some(*t),
            Some(Since::Mark(name)) => Some(
                self.mark_token(name)?
                    .ok_or_else(|| StoreError::UnknownMark(name.clone()))?,
            ),
        };
        let Some(since) = since else {
            return Ok(ChangeSet {
                token,
                fresh: None,
                changes: self.full(&filter)?,
            });
        };
        if let Some(fresh) = fresh_reason(&state, since) {
            return Ok(ChangeSet {
                token,
                fresh: Some(fresh),
                changes: self.full(&filter)?,
            });
        }
        Ok(ChangeSet {
            token,
            fresh: None,
            changes: self.since(since.seq, &filter)?,
        })
    }

    /// The whole net state under the filter, in O(entries under the prefixes).
    fn full(&self, filter: &Filter) -> Result<Vec<Change>, StoreError> {
        let mut rows: Vec<sled::Result<(sled::IVec, sled::IVec)>> = Vec::new();
        let mut scans: Vec<sled::Iter> = Vec::new();
        if filter.prefixes.is_empty() {
            scans.push(self.net.iter());
        }
        for p in &filter.prefixes {
            // The prefix itself, then what lies below it: a plain byte-prefix scan
            // would also walk "a-b" for "a", and overlap the scan of "a-b".
            if let Some(bytes) = self.net.get(p)? {
                rows.push(Ok((sled::IVec::from(p.as_slice()), bytes)));
            }
            let mut dir = p.clone();
            dir.push(b'/');
            scans.push(self.net.scan_prefix(dir));
        }
        let mut out = Vec::new();
        for item in rows.into_iter().chain(scans.into_iter().flatten()) {
            let (path, bytes) = item?;
            if !filter.matches(&path) {
                continue;
            }
            let entry: NetEntry = decode(&bytes).map_err(|e| e.context(net_place(&path)))?;
            out.push(Change {
                path: path.to_vec(),
                kind: Some(entry.kind),
                before: None,
                file_type: entry.file_type,
                origin: entry.origin,
                seq: entry.seq,
            });
        }
        // Prefix scans come one after the other; "a/x" sorts after "a-b".
        if !filter.prefixes.is_empty() {
            out.sort_by(|a, b| a.path.cmp(&b.path));
        }
        Ok(out)
    }

    /// Paths with a record after `seq`, in O(records since).
    fn since(&self, seq: u64, filter: &Filter) -> Result<Vec<Change>, StoreError> {
        let mut seen: BTreeMap<Vec<u8>, Seen> = BTreeMap::new();
        let start = seq.saturating_add(1);
        for item in self.log.range(u64_key(start)..) {
            let (key, bytes) = item?;
            let record: LogRecord = decode(&bytes)
                .map_err(|e| e.context(format_args!("log record {:?}", key_u64(&key).ok())))?;
            if !filter.matches(&record.path) {
                continue;
            }
            match seen.get_mut(&record.path) {
                Some(s) => s.last = record,
                None => {
                    seen.insert(
                        record.path.clone(),
                        Seen {
                            before: record.before,
                            last: record,
                        },
                    );
                }
            }
        }
        let mut out = Vec::with_capacity(seen.len());
        for (path, s) in seen {
            let entry = self.net_entry(&path)?;
            if entry.is_none() && s.before.is_none() {
                continue; // came and went within the window
            }
            let (file_type, origin) = match &entry {
                Some(e) => (e.file_type, e.origin.clone()),
                None => (s.last.file_type, s.last.origin),
            };
            out.push(Change {
                path,
                kind: entry.map(|e| e.kind),
                before: s.before,
                file_type,
                origin,
                seq: s.last.seq,
            });
        }
        Ok(out)
    }
}

/// Why changes since `since` cannot be answered from the log, if so.
fn fresh_reason(state: &Meta, since: Token) -> Option<FreshReason> {
    if since.instance != state.instance {
        return Some(FreshReason::OtherInstance {
            asked: since.instance,
            current: state.instance,
        });
    }
    // Records after `since.seq` are all present when since.seq >= oldest position.
    // A seq before the instance began cannot come from this instance's tokens, and the
    // records between it and the instance start may be incomplete.
    let oldest = state.oldest_position();
    if since.seq < oldest {
        return Some(FreshReason::Expired {
            asked: since.seq,
            oldest,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_component_wise() {
        let f = Filter::new(&[b"a".to_vec()], &[]).unwrap();
        assert!(f.matches(b"a"));
        assert!(f.matches(b"a/x"));
        assert!(!f.matches(b"ab"));
        assert!(!f.matches(b"b"));
        let f = Filter::new(&[b"/a/b/".to_vec(), b"a".to_vec()], &[]).unwrap();
        assert_eq!(f.prefixes, vec![b"a".to_vec()]);
        let f = Filter::new(&[b"x".to_vec(), b"/".to_vec()], &[]).unwrap();
        assert!(f.prefixes.is_empty());
        assert!(f.matches(b"anything"));
    }

    #[test]
    fn globs() {
        let f = Filter::new(&[], &["*.pyc".into(), "lib/**".into()]).unwrap();
        assert!(f.matches(b"x.pyc"));
        assert!(f.matches(b"a/b/x.pyc"));
        assert!(f.matches(b"lib/python/x.py"));
        assert!(!f.matches(b"bin/x"));
        assert!(f.matches(b"\xff\xfe.pyc"));
        assert!(matches!(
            Filter::new(&[], &["a[".into()]),
            Err(StoreError::BadGlob { .. })
        ));
    }
}
