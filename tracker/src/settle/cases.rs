//! What `settle` makes of a batch, specified as a table: `cases.txt` gives, per case,
//! the recorded net state before, the path events of the batch, what the filesystem
//! shows now (each path's net state against the lower layers, and which paths are
//! names of one upper inode), and the records and net updates expected. Runs without
//! root, against in-memory layers.

use super::{Layers, Recorded, settle};
use crate::classify::Net;
use crate::fid::Handle;
use crate::pathevent::{Change, PathEvent};
use crate::work::WorkSet;
use std::collections::{BTreeMap, HashSet};
use std::io;
use store::{FileType, NetEntry, NetKind, Origin, StoreError};

const SPEC: &str = include_str!("cases.txt");

/// One case of `cases.txt`.
#[derive(Default)]
struct Case<'a> {
    name: &'a str,
    recorded: Vec<&'a str>,
    events: Vec<&'a str>,
    now: Vec<&'a str>,
    links: Vec<Vec<&'a str>>,
    resetting: Vec<u32>,
    records: Vec<&'a str>,
    net: Vec<&'a str>,
}

/// The cases of the spec, in order.
fn cases(spec: &str) -> Vec<Case<'_>> {
    let mut out: Vec<Case> = Vec::new();
    for line in spec.lines() {
        if let Some(name) = line.strip_prefix("== ") {
            out.push(Case {
                name,
                ..Case::default()
            });
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (field, value) = line.split_once(':').expect("`field: value`");
        let case = out.last_mut().expect("a field after a `==` line");
        let items = || {
            value
                .split(';')
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .collect::<Vec<_>>()
        };
        match field {
            "recorded" => case.recorded = items(),
            "events" => case.events = items(),
            "now" => case.now = items(),
            "links" => case.links.push(value.split_whitespace().collect()),
            "resetting" => {
                case.resetting = value
                    .split_whitespace()
                    .map(|p| p.parse().expect("a pid"))
                    .collect()
            }
            "records" => case.records = items(),
            "net" => case.net = items(),
            other => panic!("unknown field {other:?} in case {:?}", case.name),
        }
    }
    out
}

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

    fn object_name(&self, object: &Handle) -> io::Result<Option<Vec<u8>>> {
        Ok((object.bytes != b"-").then(|| object.bytes.clone()))
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

/// As the store answers: entries strictly below `dir`.
impl Recorded for Rec {
    fn net_under(&self, dir: &[u8]) -> Result<Vec<(Vec<u8>, NetEntry)>, StoreError> {
        Ok(self
            .0
            .iter()
            .filter(|(p, _)| under(p, dir) && p.as_slice() != dir)
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect())
    }

    fn net_entry(&self, path: &[u8]) -> Result<Option<NetEntry>, StoreError> {
        Ok(self.0.get(path).cloned())
    }
}

/// `path kind type` as a state.
fn state(line: &str) -> (Vec<u8>, (NetKind, FileType)) {
    let parts: Vec<&str> = line.split_whitespace().collect();
    let [path, k, t] = parts[..] else {
        panic!("state {line:?} is not `path kind type`")
    };
    let kind = NetKind::from_name(k).unwrap_or_else(|| panic!("unknown kind {k:?}"));
    let file_type = FileType::from_name(t).unwrap_or_else(|| panic!("unknown type {t:?}"));
    (path.as_bytes().to_vec(), (kind, file_type))
}

/// An event line, with its process.
fn event(line: &str) -> (PathEvent, Option<Origin>) {
    // `of NAME`: the event's inode handle, which resolves to NAME now (`-`: gone).
    let (line, object) = match line.split_once(" of ") {
        Some((line, name)) => (
            line,
            Some(Handle {
                handle_type: 1,
                bytes: name.as_bytes().to_vec(),
            }),
        ),
        None => (line, None),
    };
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
        PathEvent::Change {
            change,
            path,
            dir,
            object: object.clone(),
        }
    };
    let event = match verb {
        "created" => change(Change::Created),
        "deleted" => change(Change::Deleted),
        "written" => change(Change::Written),
        "attrib" => change(Change::Attrib),
        "renamed" => {
            let (from, to) = rest.split_once(" -> ").expect("`renamed a -> b`");
            // `renamed - -> f as whiteout`: what moved in, as the event's object says.
            let (to, moved_in) = match to.split_once(" as ") {
                Some((to, t)) => (
                    to,
                    Some(FileType::from_name(t).unwrap_or_else(|| panic!("no type {t:?}"))),
                ),
                None => (to, None),
            };
            let side = |s: &str| (s != "-").then(|| path(s));
            let (from, to) = (side(from), side(to));
            let dir = from.as_ref().or(to.as_ref()).is_some_and(|(_, d)| *d);
            PathEvent::Renamed {
                from: from.map(|(p, _)| p),
                to: to.map(|(p, _)| p),
                dir,
                moved_in,
            }
        }
        other => panic!("unknown event {other:?}"),
    };
    (event, origin)
}

#[test]
fn settle_cases() {
    let cases = cases(SPEC);
    assert!(
        cases.len() >= 30,
        "the specification keeps at least 30 cases"
    );
    let mut failures = Vec::new();
    for case in &cases {
        let mut work = WorkSet::default();
        for line in &case.events {
            let (e, origin) = event(line);
            work.add(e, &origin, 1);
        }
        let mut now = BTreeMap::new();
        let mut failing = HashSet::new();
        for line in &case.now {
            match line.strip_suffix(" !") {
                Some(path) => {
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
                let mut line = format!("{} {}", o.action.name(), String::from_utf8_lossy(&o.path));
                if o.file_type != FileType::Unknown {
                    line += &format!(" {}", o.file_type.name());
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
                    k.name(),
                    t.name()
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
            case.now.iter().filter(|l| l.ends_with(" !")).count(),
            "inspection errors: {}",
            case.name
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
