//! The second step of the watcher: fanotify events (handles and names) become events
//! on paths relative to the upper dir.
//!
//! What lies outside the upper dir (overlayfs' work dir, unrelated dirs of a shared
//! filesystem) is dropped here; the tracker's own sync dir yields only cookies.

use crate::classify::join_rel;
use crate::fid::{DirEntryRef, Event, Handle, HandleRef};
use crate::resolve::{Place, Resolver};
use crate::sys;
use std::io;
use store::FileType;

/// What happened to a path, as far as one event says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Change {
    /// A new entry (a copy-up or a whiteout put in place too: settling tells).
    Created,
    /// An entry removed.
    Deleted,
    /// Content written (`FAN_MODIFY`, `FAN_CLOSE_WRITE`).
    Written,
    /// Mode, owner, xattrs or times (`FAN_ATTRIB`).
    Attrib,
}

/// One event on the upper dir's paths (no leading `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathEvent {
    /// Something happened to the entry at `path` (a dir when `dir`).
    Change {
        change: Change,
        path: Vec<u8>,
        dir: bool,
        /// For content and attribute changes: the inode's handle. The name an event
        /// gives can be one that is gone by the time it is settled (overlayfs writes
        /// a hard-linked file through the first name it looked up), and the inode
        /// then still has others.
        object: Option<Handle>,
    },
    /// An entry moved. `from` is `None` when it came from outside the upper dir
    /// (overlayfs stages copy-ups, whiteouts and opaque dirs in its work dir and moves
    /// them into place); `to` is `None` when it left it.
    Renamed {
        from: Option<Vec<u8>>,
        to: Option<Vec<u8>>,
        dir: bool,
        /// For an entry that came from outside: its type when the event was read
        /// (`Whiteout` for a whiteout), if it still existed.
        moved_in: Option<FileType>,
    },
    /// Sync cookie `n` was created: everything queued before it has been seen.
    Cookie(u64),
    /// The kernel queue overflowed, or a record could not be decoded: events are lost.
    Lost,
}

/// Turns one fanotify event into path events, in `out`. `sync` is the sync dir's
/// handle. Errors are I/O errors resolving handles.
pub fn resolve(
    event: &Event<'_>,
    resolver: &mut Resolver,
    sync: HandleRef<'_>,
    out: &mut Vec<PathEvent>,
) -> io::Result<()> {
    if event.mask & sys::FAN_Q_OVERFLOW != 0 {
        out.push(PathEvent::Lost);
        return Ok(());
    }
    if event.entry.is_some_and(|e| e.dir == sync) {
        if let Some(n) = cookie(event, sync) {
            out.push(PathEvent::Cookie(n));
        }
        return Ok(());
    }
    let dir = event.mask & sys::FAN_ONDIR != 0;
    if event.mask & sys::FAN_RENAME != 0 {
        let from = entry_path(resolver, event.old)?;
        let to = entry_path(resolver, event.new)?;
        if dir {
            // Everything below a moved dir has a new path.
            resolver.invalidate();
        }
        // What overlayfs moved in from its work dir says what it did: a whiteout
        // deletes, anything else is a copy-up or a new entry.
        let moved_in = match (&from, &to, event.object) {
            (None, Some(_), Some(object)) => resolver.object_type(object)?,
            _ => None,
        };
        if from.is_some() || to.is_some() {
            out.push(PathEvent::Renamed {
                from,
                to,
                dir,
                moved_in,
            });
        }
        return Ok(());
    }
    // An event on an inode with no name (a link count change, which also hits the
    // whiteout inode overlayfs shares between all its deletions) would be pinned on
    // whichever name the inode happens to have: such an attribute change alters no
    // path's state, so it is not taken.
    let attrib_only = event.mask & !(sys::FAN_ATTRIB | sys::FAN_ONDIR) == 0;
    if event.entry.is_none() && attrib_only {
        return Ok(());
    }
    let names_only = event.mask & (sys::FAN_CREATE | sys::FAN_DELETE) == 0;
    let path = match (event.entry, event.object) {
        (Some(entry), object) => match entry_path(resolver, Some(entry))? {
            // A file made with O_TMPFILE in the upper dir keeps the name the kernel
            // gave it ("#<inode>", fs/dcache.c d_tmpfile) after linkat gives it a real
            // one: its content and attribute events name the tmpfile, its object
            // handle names the file. (Overlayfs' own temporary "#<hex>" names are in
            // its work dir, outside.)
            Some(path) if names_only && is_tmpfile_name(entry.name) => match object {
                Some(object) => object_path(resolver, object)?,
                None => Some(path),
            },
            path => path,
        },
        (None, Some(object)) => object_path(resolver, object)?,
        (None, None) => None,
    };
    let Some(path) = path else { return Ok(()) };
    let mut push = |change| {
        let object = match change {
            Change::Written | Change::Attrib => event.object.map(HandleRef::to_owned),
            Change::Created | Change::Deleted => None,
        };
        out.push(PathEvent::Change {
            change,
            path: path.clone(),
            dir,
            object,
        })
    };
    if event.mask & sys::FAN_CREATE != 0 {
        push(Change::Created);
    }
    if event.mask & sys::FAN_DELETE != 0 {
        push(Change::Deleted);
    }
    if event.mask & (sys::FAN_MODIFY | sys::FAN_CLOSE_WRITE) != 0 {
        push(Change::Written);
    }
    if event.mask & sys::FAN_ATTRIB != 0 {
        push(Change::Attrib);
    }
    if dir {
        if event.mask & sys::FAN_CREATE != 0
            && let Some(object) = event.object
        {
            // A new dir's handle is known now: no lookup for the events below it.
            resolver.remember(object.to_owned(), Place::Upper(path.clone()));
        }
        if event.mask & sys::FAN_DELETE != 0 {
            resolver.invalidate();
        }
    }
    Ok(())
}

/// The number of the sync cookie whose creation `event` is, if it is one (`sync` is
/// the sync dir's handle).
pub fn cookie(event: &Event<'_>, sync: HandleRef<'_>) -> Option<u64> {
    let entry = event.entry.filter(|e| e.dir == sync)?;
    (event.mask & sys::FAN_CREATE != 0)
        .then(|| crate::cookies::Cookies::number(entry.name))
        .flatten()
}

/// `#` then decimal digits: the name `d_tmpfile` gives an O_TMPFILE inode.
fn is_tmpfile_name(name: &[u8]) -> bool {
    name.len() > 1 && name[0] == b'#' && name[1..].iter().all(u8::is_ascii_digit)
}

/// The upper-relative path of a (dir, name) pair; `None` outside the upper dir, for
/// the upper dir itself, or when the dir is already gone.
fn entry_path(
    resolver: &mut Resolver,
    entry: Option<DirEntryRef<'_>>,
) -> io::Result<Option<Vec<u8>>> {
    let Some(entry) = entry else { return Ok(None) };
    Ok(match resolver.dir(entry.dir)? {
        Some(Place::Upper(dir)) => {
            if entry.name == b"." || entry.name.is_empty() {
                (!dir.is_empty()).then_some(dir)
            } else {
                Some(join_rel(&dir, entry.name))
            }
        }
        _ => None,
    })
}

/// The upper-relative path of an object handle, when it is in the upper dir (not the
/// upper dir itself).
fn object_path(resolver: &Resolver, object: HandleRef<'_>) -> io::Result<Option<Vec<u8>>> {
    Ok(match resolver.object(object)? {
        Some(Place::Upper(rel)) if !rel.is_empty() => Some(rel),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn tmpfile_names() {
        crate::test_support::table(
            &[
                (b"#12", true),
                (b"#1", true),
                (b"#", false),
                (b"#1a", false),
                (b"12", false),
                (b"#12 (deleted)", false),
            ],
            super::is_tmpfile_name,
        );
    }
}
