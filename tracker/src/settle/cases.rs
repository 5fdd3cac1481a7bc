//! What `settle` makes of a batch, as a table: the recorded net state before, the
//! path events of the batch, what the filesystem shows now (each path's net state
//! against the lower layers, and which paths are names of one upper inode), and the
//! records and net updates expected. Runs without root, against in-memory layers.
//!
//! Notation:
//! - states: `path kind type` (`f modified file`, `d replaced dir`), or `path -` in
//!   expected net updates for "no longer a change";
//! - events: `created f`, `deleted d/` (a trailing `/` marks a dir), `written f`,
//!   `attrib f`, `renamed a -> b` (`-` for a side outside the upper dir: overlayfs'
//!   work dir), each optionally `by PID`;
//! - records: `action path type by PID`.

use super::{Layers, Recorded, settle};
use crate::classify::Net;
use crate::pathevent::{Change, PathEvent};
use crate::work::WorkSet;
use std::collections::{BTreeMap, HashSet};
use std::io;
use store::{Action, FileType, NetEntry, NetKind, Origin, StoreError};

struct Case {
    name: &'static str,
    recorded: &'static [&'static str],
    events: &'static [&'static str],
    now: &'static [&'static str],
    /// Groups of names of one upper inode.
    links: &'static [&'static [&'static str]],
    /// Pids whose changes are a reset.
    resetting: &'static [u32],
    records: &'static [&'static str],
    net: &'static [&'static str],
}

const NO: &[&str] = &[];

const CASES: &[Case] = &[
    // Files of the upper dir alone.
    Case {
        name: "a new file, written and chmod'ed in the same batch, is one creation",
        recorded: NO,
        events: &[
            "created f by 7",
            "written f by 7",
            "attrib f by 7",
            "written f by 7",
        ],
        now: &["f added file"],
        links: &[],
        resetting: &[],
        records: &["created f file by 7"],
        net: &["f added file"],
    },
    Case {
        name: "writes to a file made in an earlier batch are one record per writer",
        recorded: &["f added file"],
        events: &["written f by 7", "written f by 7", "written f by 8"],
        now: &["f added file"],
        links: &[],
        resetting: &[],
        records: &["written f file by 7", "written f file by 8"],
        net: &["f added file"],
    },
    Case {
        name: "a new file removed in the same batch leaves nothing in the net state",
        recorded: NO,
        events: &["created t by 7", "written t by 7", "deleted t by 7"],
        now: NO,
        links: &[],
        resetting: &[],
        records: &["created t file by 7", "deleted t by 7"],
        net: &["t -"],
    },
    Case {
        name: "a new file removed in a later batch stops being a change",
        recorded: &["f added file"],
        events: &["deleted f by 7"],
        now: NO,
        links: &[],
        resetting: &[],
        records: &["deleted f file by 7"],
        net: &["f -"],
    },
    Case {
        name: "a new dir and a file in it",
        recorded: NO,
        events: &["created d/ by 7", "created d/f by 7", "written d/f by 7"],
        now: &["d added dir", "d/f added file"],
        links: &[],
        resetting: &[],
        records: &["created d dir by 7", "created d/f file by 7"],
        net: &["d added dir", "d/f added file"],
    },
    // Lower files: copy-up, whiteouts.
    Case {
        name: "an append to a lower file: a copy-up moved in, then the write",
        recorded: NO,
        events: &["renamed - -> f by 7", "written f by 7"],
        now: &["f modified file"],
        links: &[],
        resetting: &[],
        records: &["written f file by 7"],
        net: &["f modified file"],
    },
    Case {
        name: "a chmod of a lower file: a copy-up, then the attribute change",
        recorded: NO,
        events: &["renamed - -> f by 7", "attrib f by 7"],
        now: &["f metadata file"],
        links: &[],
        resetting: &[],
        records: &["attrib f file by 7"],
        net: &["f metadata file"],
    },
    Case {
        name: "a copy-up reported as a creation is a write",
        recorded: NO,
        events: &["created f by 7"],
        now: &["f modified file"],
        links: &[],
        resetting: &[],
        records: &["written f file by 7"],
        net: &["f modified file"],
    },
    Case {
        name: "a copy-up that changed only metadata, reported as a creation, is an attribute change",
        recorded: NO,
        events: &["created f by 7"],
        now: &["f metadata file"],
        links: &[],
        resetting: &[],
        records: &["attrib f file by 7"],
        net: &["f metadata file"],
    },
    Case {
        name: "a copy-up that changed nothing leaves no record",
        recorded: NO,
        events: &["renamed - -> f by 7"],
        now: NO,
        links: &[],
        resetting: &[],
        records: NO,
        net: &["f -"],
    },
    Case {
        name: "removing a lower file moves a whiteout into place: a deletion",
        recorded: NO,
        events: &["renamed - -> f by 7"],
        now: &["f removed whiteout"],
        links: &[],
        resetting: &[],
        records: &["deleted f whiteout by 7"],
        net: &["f removed whiteout"],
    },
    Case {
        name: "a whiteout linked into place (a creation event) is a deletion",
        recorded: NO,
        events: &["created f by 7"],
        now: &["f removed whiteout"],
        links: &[],
        resetting: &[],
        records: &["deleted f whiteout by 7"],
        net: &["f removed whiteout"],
    },
    Case {
        name: "a copied-up lower file deleted, then a whiteout moved in",
        recorded: &["f modified file"],
        events: &["deleted f by 7", "renamed - -> f by 7"],
        now: &["f removed whiteout"],
        links: &[],
        resetting: &[],
        records: &["deleted f file by 7", "deleted f whiteout by 7"],
        net: &["f removed whiteout"],
    },
    Case {
        name: "a removed lower file made again: a new file over the whiteout",
        recorded: &["f removed whiteout"],
        events: &[
            "renamed f -> - by 7",
            "renamed - -> f by 7",
            "written f by 7",
        ],
        now: &["f modified file"],
        links: &[],
        resetting: &[],
        records: &["renamed-from f file by 7", "written f file by 7"],
        net: &["f modified file"],
    },
    Case {
        name: "a lower file written back to its lower bytes is no change",
        recorded: &["f modified file"],
        events: &["written f by 7"],
        now: NO,
        links: &[],
        resetting: &[],
        records: &["written f file by 7"],
        net: &["f -"],
    },
    // Dirs: opaque dirs, dirs replaced by files and back.
    Case {
        name: "rm -rf of a lower dir then mkdir: an opaque dir moved in over the whiteout",
        recorded: &["d removed whiteout"],
        events: &["renamed d/ -> - by 7", "renamed - -> d/ by 7"],
        now: &["d replaced dir"],
        links: &[],
        resetting: &[],
        records: &["renamed-from d dir by 7", "created d dir by 7"],
        net: &["d replaced dir"],
    },
    Case {
        name: "a lower dir removed with what a build put in it",
        recorded: &["d/new added file", "d/lib modified file"],
        events: &[
            "deleted d/new by 7",
            "deleted d/lib by 7",
            "renamed - -> d by 7",
        ],
        now: &["d removed whiteout"],
        links: &[],
        resetting: &[],
        records: &[
            "deleted d/new file by 7",
            "deleted d/lib file by 7",
            "deleted d whiteout by 7",
        ],
        net: &["d removed whiteout", "d/lib -", "d/new -"],
    },
    Case {
        name: "a lower file replaced by a dir",
        recorded: &["x removed whiteout"],
        events: &["renamed x -> - by 7", "renamed - -> x/ by 7"],
        now: &["x replaced dir"],
        links: &[],
        resetting: &[],
        records: &["renamed-from x file by 7", "created x dir by 7"],
        net: &["x replaced dir"],
    },
    Case {
        name: "a new dir replaced by a file of the same name",
        recorded: &["d added dir"],
        events: &["deleted d/ by 7", "created d by 7"],
        now: &["d added file"],
        links: &[],
        resetting: &[],
        records: &["deleted d dir by 7", "created d file by 7"],
        net: &["d added file"],
    },
    Case {
        name: "an spfs mask written straight into the upper dir is a removal by spfs",
        recorded: NO,
        events: &["created etc/ by 3", "created etc/b by 3"],
        now: &["etc/b removed whiteout"],
        links: &[],
        resetting: &[],
        records: &["created etc dir by 3", "deleted etc/b whiteout by 3"],
        net: &["etc -", "etc/b removed whiteout"],
    },
    // Renames.
    Case {
        name: "a rename within a dir is a linked pair",
        recorded: &["a added file"],
        events: &["renamed a -> b by 7"],
        now: &["b added file"],
        links: &[],
        resetting: &[],
        records: &["renamed-from a file by 7", "renamed-to b file by 7"],
        net: &["a -", "b added file"],
    },
    Case {
        name: "a rename between dirs over an existing new file",
        recorded: &["x/a added file", "y/b added file"],
        events: &["renamed x/a -> y/b by 7"],
        now: &["x added dir", "y added dir", "y/b added file"],
        links: &[],
        resetting: &[],
        records: &["renamed-from x/a file by 7", "renamed-to y/b file by 7"],
        net: &["x/a -", "y/b added file"],
    },
    Case {
        name: "renaming a lower file leaves a whiteout where it was",
        recorded: NO,
        events: &[
            "renamed - -> f by 7",
            "renamed f -> g by 7",
            "renamed - -> f by 7",
        ],
        now: &["f removed whiteout", "g added file"],
        links: &[],
        resetting: &[],
        records: &[
            "renamed-from f file by 7",
            "renamed-to g file by 7",
            "deleted f whiteout by 7",
        ],
        net: &["f removed whiteout", "g added file"],
    },
    Case {
        name: "RENAME_EXCHANGE of two new files: each side is moved",
        recorded: &["a added file", "b added file"],
        events: &["renamed a -> b by 7", "renamed b -> a by 7"],
        now: &["a added file", "b added file"],
        links: &[],
        resetting: &[],
        records: &[
            "renamed-from a file by 7",
            "renamed-to b file by 7",
            "renamed-from b file by 7",
            "renamed-to a file by 7",
        ],
        net: &["a added file", "b added file"],
    },
    Case {
        name: "a new dir renamed: what was recorded below it moves along",
        recorded: &["d added dir", "d/f added file", "d/g added file"],
        events: &["renamed d/ -> e/ by 7"],
        now: &["e added dir", "e/f added file", "e/g added file"],
        links: &[],
        resetting: &[],
        records: &["renamed-from d dir by 7", "renamed-to e dir by 7"],
        net: &[
            "d -",
            "d/f -",
            "d/g -",
            "e added dir",
            "e/f added file",
            "e/g added file",
        ],
    },
    Case {
        name: "a lower dir renamed (a redirect): its new place is walked, a whiteout stays",
        recorded: NO,
        events: &["renamed - -> e/ by 7", "renamed - -> d by 7"],
        now: &["d removed whiteout", "e added dir", "e/f added file"],
        links: &[],
        resetting: &[],
        records: &["deleted d whiteout by 7"],
        net: &["d removed whiteout", "e added dir", "e/f added file"],
    },
    Case {
        name: "an entry moved out of the upper dir is gone from it",
        recorded: &["a added file"],
        events: &["renamed a -> - by 7"],
        now: NO,
        links: &[],
        resetting: &[],
        records: &["renamed-from a file by 7"],
        net: &["a -"],
    },
    // Hard links: every name of a changed upper inode.
    Case {
        name: "ln of a lower file then chmod through the new name changes the old name too",
        recorded: NO,
        events: &["renamed - -> f by 7", "created f2 by 8", "attrib f2 by 9"],
        now: &["f metadata file", "f2 added file"],
        links: &[&["f", "f2"]],
        resetting: &[],
        // The chmod right after the link is part of f2's creation, but a change of f.
        records: &["created f2 file by 8", "attrib f file by 9"],
        net: &["f metadata file", "f2 added file"],
    },
    Case {
        name: "a write through one name in a later batch is a write to every name",
        recorded: &["f2 added file"],
        events: &["written f2 by 9"],
        now: &["f modified file", "f2 added file"],
        links: &[&["f", "f2"]],
        resetting: &[],
        records: &["written f2 file by 9", "written f file by 9"],
        net: &["f modified file", "f2 added file"],
    },
    Case {
        name: "three names of one inode",
        recorded: &["a added file", "b added file"],
        events: &["written c by 9"],
        now: &["a added file", "b added file", "c added file"],
        links: &[&["a", "b", "c"]],
        resetting: &[],
        records: &[
            "written c file by 9",
            "written a file by 9",
            "written b file by 9",
        ],
        net: &["a added file", "b added file", "c added file"],
    },
    Case {
        name: "whiteouts share one inode, but are never each other's names",
        recorded: &["x removed whiteout"],
        events: &["created y by 7"],
        now: &["x removed whiteout", "y removed whiteout"],
        links: &[],
        resetting: &[],
        records: &["deleted y whiteout by 7"],
        net: &["y removed whiteout"],
    },
    Case {
        name: "an O_TMPFILE file linked over a removed lower file, then written through its descriptor",
        recorded: &["h removed whiteout"],
        events: &[
            "renamed h -> - by 7",
            "renamed - -> h by 7",
            "written h by 7",
        ],
        now: &["h modified file"],
        links: &[],
        resetting: &[],
        records: &["renamed-from h file by 7", "written h file by 7"],
        net: &["h modified file"],
    },
    // Resets.
    Case {
        name: "what a resetting process does is logged as a reset",
        recorded: &["f modified file", "n added file"],
        events: &["deleted f by 5", "deleted n by 5"],
        now: NO,
        links: &[],
        resetting: &[5],
        records: &["reset f file by 5", "reset n file by 5"],
        net: &["f -", "n -"],
    },
    Case {
        name: "a dir removed by a reset takes its recorded changes along, as resets",
        recorded: &["d added dir", "d/f added file"],
        events: &["deleted d/ by 5"],
        now: NO,
        links: &[],
        resetting: &[5],
        records: &[
            "reset d dir by 5",
            "reset d dir by 5",
            "reset d/f file by 5",
        ],
        net: &["d -", "d/f -"],
    },
    Case {
        name: "others' changes during a reset stay theirs",
        recorded: &["f modified file"],
        events: &["deleted f by 5", "created g by 6"],
        now: &["g added file"],
        links: &[],
        resetting: &[5],
        records: &["reset f file by 5", "created g file by 6"],
        net: &["f -", "g added file"],
    },
    // Batching.
    Case {
        name: "delete and recreate within a batch: the path is what it is at the end",
        recorded: &["f added file"],
        events: &["deleted f by 7", "created f by 7", "written f by 7"],
        now: &["f added file"],
        links: &[],
        resetting: &[],
        records: &["deleted f file by 7", "created f file by 7"],
        net: &["f added file"],
    },
    Case {
        name: "a path that cannot be inspected keeps its recorded state",
        recorded: &["f added file"],
        events: &["written f by 7", "written g by 7"],
        now: &["f ! ", "g added file"],
        links: &[],
        resetting: &[],
        records: &["written f file by 7", "written g file by 7"],
        net: &["g added file"],
    },
    Case {
        name: "an event without a process (a rescan's view) has no origin",
        recorded: NO,
        events: &["created f"],
        now: &["f added file"],
        links: &[],
        resetting: &[],
        records: &["created f file"],
        net: &["f added file"],
    },
];

/// The filesystem of a case.
struct Mem {
    now: BTreeMap<Vec<u8>, (NetKind, FileType)>,
    failing: HashSet<Vec<u8>>,
    links: Vec<Vec<Vec<u8>>>,
}

impl Layers for Mem {
    fn classify(&self, rel: &[u8]) -> io::Result<Net> {
        if self.failing.contains(rel) {
            return Err(io::Error::other("cannot be inspected"));
        }
        Ok(self.now.get(rel).copied())
    }

    fn walk(&self, rel: &[u8], out: &mut Vec<(Vec<u8>, NetKind, FileType)>) -> io::Result<()> {
        for (path, (kind, ft)) in &self.now {
            if under(path, rel) {
                out.push((path.clone(), *kind, *ft));
            }
        }
        Ok(())
    }

    fn other_names(&self, rel: &[u8]) -> io::Result<Vec<Vec<u8>>> {
        Ok(self
            .links
            .iter()
            .find(|group| group.iter().any(|n| n == rel))
            .map(|group| group.iter().filter(|n| *n != rel).cloned().collect())
            .unwrap_or_default())
    }
}

/// `path` is `dir` or below it.
fn under(path: &[u8], dir: &[u8]) -> bool {
    path.starts_with(dir) && (path.len() == dir.len() || path.get(dir.len()) == Some(&b'/'))
}

struct Rec(BTreeMap<Vec<u8>, NetEntry>);

impl Recorded for Rec {
    fn net_entry(&self, path: &[u8]) -> Result<Option<NetEntry>, StoreError> {
        Ok(self.0.get(path).cloned())
    }

    fn net_under(&self, dir: &[u8]) -> Result<Vec<(Vec<u8>, NetEntry)>, StoreError> {
        Ok(self
            .0
            .iter()
            .filter(|(p, _)| under(p, dir))
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect())
    }
}

fn kind(s: &str) -> NetKind {
    match s {
        "added" => NetKind::Added,
        "modified" => NetKind::Modified,
        "metadata" => NetKind::Metadata,
        "removed" => NetKind::Removed,
        "replaced" => NetKind::Replaced,
        other => panic!("unknown kind {other:?}"),
    }
}

fn file_type(s: &str) -> FileType {
    match s {
        "file" => FileType::File,
        "dir" => FileType::Dir,
        "whiteout" => FileType::Whiteout,
        "symlink" => FileType::Symlink,
        other => panic!("unknown type {other:?}"),
    }
}

fn action_name(a: Action) -> &'static str {
    match a {
        Action::Created => "created",
        Action::Written => "written",
        Action::Attrib => "attrib",
        Action::Deleted => "deleted",
        Action::RenamedFrom => "renamed-from",
        Action::RenamedTo => "renamed-to",
        Action::Reclassified => "reclassified",
        Action::Reset => "reset",
    }
}

fn type_name(t: FileType) -> String {
    format!("{t:?}").to_lowercase()
}

/// `path kind type` as a state.
fn state(line: &str) -> (Vec<u8>, (NetKind, FileType)) {
    let parts: Vec<&str> = line.split_whitespace().collect();
    let [path, k, t] = parts[..] else {
        panic!("state {line:?} is not `path kind type`")
    };
    (path.as_bytes().to_vec(), (kind(k), file_type(t)))
}

/// An event line, with its process.
fn event(line: &str) -> (PathEvent, Option<Origin>) {
    let (body, origin) = match line.split_once(" by ") {
        Some((body, pid)) => (
            body,
            Some(Origin {
                pid: pid.parse().expect("a pid"),
                command: Vec::new(),
            }),
        ),
        None => (line, None),
    };
    let (verb, rest) = body.split_once(' ').expect("`verb path`");
    let path = |p: &str| -> (Vec<u8>, bool) {
        match p.strip_suffix('/') {
            Some(dir) => (dir.as_bytes().to_vec(), true),
            None => (p.as_bytes().to_vec(), false),
        }
    };
    let change = |change| {
        let (path, dir) = path(rest);
        PathEvent::Change { change, path, dir }
    };
    let event = match verb {
        "created" => change(Change::Created),
        "deleted" => change(Change::Deleted),
        "written" => change(Change::Written),
        "attrib" => change(Change::Attrib),
        "renamed" => {
            let (from, to) = rest.split_once(" -> ").expect("`renamed a -> b`");
            let side = |s: &str| (s != "-").then(|| path(s));
            let (from, to) = (side(from), side(to));
            let dir = from.as_ref().or(to.as_ref()).is_some_and(|(_, d)| *d);
            PathEvent::Renamed {
                from: from.map(|(p, _)| p),
                to: to.map(|(p, _)| p),
                dir,
            }
        }
        other => panic!("unknown event {other:?}"),
    };
    (event, origin)
}

#[test]
fn settle_cases() {
    assert!(
        CASES.len() >= 30,
        "the specification keeps at least 30 cases"
    );
    let mut failures = Vec::new();
    for case in CASES {
        let mut work = WorkSet::default();
        for line in case.events {
            let (e, origin) = event(line);
            work.add(e, origin, 1);
        }
        let mut now = BTreeMap::new();
        let mut failing = HashSet::new();
        for line in case.now {
            match line.split_once(" ! ") {
                Some((path, _)) => {
                    failing.insert(path.as_bytes().to_vec());
                }
                None => {
                    let (p, s) = state(line);
                    now.insert(p, s);
                }
            }
        }
        let layers = Mem {
            now,
            failing,
            links: case
                .links
                .iter()
                .map(|g| g.iter().map(|n| n.as_bytes().to_vec()).collect())
                .collect(),
        };
        let recorded = Rec(case
            .recorded
            .iter()
            .map(|line| {
                let (path, (kind, file_type)) = state(line);
                (
                    path,
                    NetEntry {
                        kind,
                        file_type,
                        origin: None,
                        seq: 1,
                    },
                )
            })
            .collect());
        let resetting: HashSet<u32> = case.resetting.iter().copied().collect();
        let settled = settle(&work, &layers, &recorded, &resetting).expect("settled");
        let records: Vec<String> = settled
            .batch
            .observations
            .iter()
            .map(|o| {
                let mut line = format!(
                    "{} {}",
                    action_name(o.action),
                    String::from_utf8_lossy(&o.path)
                );
                if o.file_type != FileType::Unknown {
                    line += &format!(" {}", type_name(o.file_type));
                }
                if let Some(origin) = &o.origin {
                    line += &format!(" by {}", origin.pid);
                }
                line
            })
            .collect();
        if records != case.records {
            failures.push(format!(
                "records: {}\n  got:  {records:?}\n  want: {:?}",
                case.name, case.records
            ));
        }
        let net: Vec<String> = settled
            .batch
            .net
            .iter()
            .map(|u| match u.state {
                Some((k, t)) => format!(
                    "{} {} {}",
                    String::from_utf8_lossy(&u.path),
                    format!("{k:?}").to_lowercase(),
                    type_name(t)
                ),
                None => format!("{} -", String::from_utf8_lossy(&u.path)),
            })
            .collect();
        if net != case.net {
            failures.push(format!(
                "net: {}\n  got:  {net:?}\n  want: {:?}",
                case.name, case.net
            ));
        }
        assert_eq!(
            settled.errors.len(),
            case.now.iter().filter(|l| l.contains(" ! ")).count(),
            "inspection errors: {}",
            case.name
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
