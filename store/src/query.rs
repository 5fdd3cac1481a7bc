//! Answering queries: the whole net state, or what changed since a position.

use crate::changelog::{Meta, Store, chunk_place};
use crate::codec::{ChunkReader, RecordHead, StoredNet, decode_net, key_u64, u64_key};
use crate::commands::Resolver;
use crate::error::StoreError;
use crate::model::*;
use globset::{Glob, GlobSet, GlobSetBuilder};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

/// The path filter of a query: its prefixes and globs.
pub struct Filter {
    /// Normalised (no leading or trailing `/`), and empty when everything matches.
    prefixes: Vec<Vec<u8>>,
    globs: Option<GlobSet>,
}

impl Filter {
    /// The filter of `prefixes` (component-wise, leading and trailing `/` ignored) and
    /// `globs` (globset syntax). Errors: `StoreError::BadGlob`.
    pub fn new(prefixes: &[Vec<u8>], globs: &[String]) -> Result<Filter, StoreError> {
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

    /// Whether `path` (relative, no leading `/`) is kept.
    pub fn matches(&self, path: &[u8]) -> bool {
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
    last: RecordHead,
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
        crate::changelog::guarded("reading", || self.query_unguarded(q))
    }

    fn query_unguarded(&self, q: &Query) -> Result<ChangeSet, StoreError> {
        let filter = Filter::new(&q.prefixes, &q.globs)?;
        let state = self.read_state();
        let token = state.token();
        let ended = self.ended()?;
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
                ended,
                changes: self.full(&filter)?,
            });
        };
        if let Some(fresh) = fresh_reason(&state, since) {
            return Ok(ChangeSet {
                token,
                fresh: Some(fresh),
                ended,
                changes: self.full(&filter)?,
            });
        }
        Ok(ChangeSet {
            token,
            fresh: None,
            ended,
            changes: self.since(since.seq, &filter)?,
        })
    }

    /// The whole net state under the filter, in O(entries under the prefixes).
    fn full(&self, filter: &Filter) -> Result<Vec<Change>, StoreError> {
        let mut out = Vec::new();
        let mut resolver = Resolver::new(&self.commands);
        let mut add = |path: &[u8], value: &[u8]| {
            if filter.matches(path) {
                let entry = decode_net(value)?;
                out.push(Change {
                    path: path.to_vec(),
                    kind: Some(entry.kind),
                    before: None,
                    file_type: entry.file_type,
                    origin: resolver.origin(entry.origin)?,
                    seq: entry.seq,
                });
            }
            Ok::<(), StoreError>(())
        };
        if filter.prefixes.is_empty() {
            self.net
                .scan(b"", |path, value| add(path, value).map(|()| true))?;
        }
        for p in &filter.prefixes {
            // The prefix itself, then what lies below it: a plain byte-prefix scan
            // would also walk "a-b" for "a".
            if let Some(value) = self.net.get(p, |v| Ok(v.to_vec()))? {
                add(p, &value)?;
            }
            let mut dir = p.clone();
            dir.push(b'/');
            self.net.scan(&dir, |path, value| {
                if !path.starts_with(&dir) {
                    return Ok(false);
                }
                add(path, value).map(|()| true)
            })?;
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
        // The chunk holding `start` begins at or before it.
        let from = match self.log.get_lt(u64_key(start.saturating_add(1)))? {
            Some((key, _)) => key_u64(&key).map_err(|e| e.context("log"))?,
            None => start,
        };
        for item in self.log.range(u64_key(from)..) {
            let (key, bytes) = item?;
            let first = key_u64(&key).map_err(|e| e.context("log"))?;
            let mut reader =
                ChunkReader::new(first, &bytes).map_err(|e| e.context(chunk_place(first)))?;
            while let Some(head) = reader.next().map_err(|e| e.context(chunk_place(first)))? {
                let path = reader.path();
                if head.seq < start || !filter.matches(path) {
                    continue;
                }
                match seen.get_mut(path) {
                    Some(s) => s.last = head,
                    None => {
                        seen.insert(
                            path.to_vec(),
                            Seen {
                                before: head.before,
                                last: head,
                            },
                        );
                    }
                }
            }
        }
        let paths: Vec<&[u8]> = seen.keys().map(Vec::as_slice).collect();
        let mut entries: Vec<Option<StoredNet>> = vec![None; paths.len()];
        self.net.get_sorted(&paths, |i, value| {
            entries[i] = Some(decode_net(value)?);
            Ok(())
        })?;
        let mut resolver = Resolver::new(&self.commands);
        let mut out = Vec::with_capacity(seen.len());
        for ((path, s), entry) in seen.into_iter().zip(entries) {
            if entry.is_none() && s.before.is_none() {
                continue; // came and went within the window
            }
            let (file_type, origin) = match &entry {
                Some(e) => (e.file_type, e.origin),
                None => (s.last.file_type, s.last.origin),
            };
            out.push(Change {
                path,
                kind: entry.map(|e| e.kind),
                before: s.before,
                file_type,
                origin: resolver.origin(origin)?,
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
