//! `diff` specified as a table (`cases.txt`): per case, the two sides, the recorded
//! changes, and the lines printed. Runs without root, against in-memory trees.

use super::*;
use std::collections::BTreeMap;
use store::{ChangeSet, FileType, NetKind, Token};

const SPEC: &str = include_str!("cases.txt");

#[derive(Default)]
struct Case<'a> {
    name: &'a str,
    /// `Some("mark")` or `Some("token")` for a `--since` answer.
    since: Option<&'a str>,
    net: Vec<&'a str>,
    marked: Vec<&'a str>,
    before: Vec<&'a str>,
    after: Vec<&'a str>,
    changed: Vec<&'a str>,
    print: Vec<&'a str>,
    all: Vec<&'a str>,
}

fn cases(spec: &str) -> Vec<Case<'_>> {
    let mut out: Vec<Case> = Vec::new();
    // Which list the lines that follow `print:` or `all:` go to.
    let mut section = "";
    for line in spec.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix("case: ") {
            out.push(Case {
                name,
                ..Case::default()
            });
            section = "";
            continue;
        }
        let case = out.last_mut().expect("a line after a `case:` line");
        if let Some(point) = line.strip_prefix("since ") {
            case.since = Some(point);
            continue;
        }
        if line == "print:" || line == "all:" {
            section = line;
            continue;
        }
        match section {
            "print:" => {
                case.print.push(line);
                continue;
            }
            "all:" => {
                case.all.push(line);
                continue;
            }
            _ => {}
        }
        let (field, value) = line.split_once(':').expect("`field: value`");
        let items: Vec<&str> = value
            .split(';')
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        match field {
            "before" => case.before = items,
            "after" => case.after = items,
            "changed" => case.changed = items,
            "net" => case.net = items,
            "marked" => case.marked = items,
            other => panic!("unknown field {other}"),
        }
    }
    out
}

/// A path's node and content (bytes or link target).
type Tree = BTreeMap<Vec<u8>, (Node, Vec<u8>)>;

/// `a/ 755`, `f 644 "x" 1:1 @5`, `l -> target`, `m mask`.
fn tree(items: &[&str]) -> Tree {
    let mut out = Tree::new();
    for item in items {
        let (path, rest) = item.split_once(' ').expect("`path spec`");
        let mut words = rest.split_whitespace();
        let first = words.next().expect("a mode, `->` or `mask`");
        let (mut node, content) = if first == "mask" {
            (Node::MASK, Vec::new())
        } else if first == "->" {
            let target = words.next().expect("a link target").as_bytes().to_vec();
            (
                node(NodeKind::Symlink, 0o120777, target.len() as u64),
                target,
            )
        } else {
            let perm = u32::from_str_radix(first, 8).expect("an octal mode");
            if path.ends_with('/') {
                (node(NodeKind::Dir, 0o40000 | perm, 0), Vec::new())
            } else {
                let quoted = words.next().expect("file bytes in quotes");
                let bytes = quoted.trim_matches('"').as_bytes().to_vec();
                (
                    node(NodeKind::File, 0o100000 | perm, bytes.len() as u64),
                    bytes,
                )
            }
        };
        for w in words {
            if let Some(t) = w.strip_prefix('@') {
                node.mtime_ns = t.parse().expect("an mtime");
            } else if let Some((u, g)) = w.split_once(':') {
                node.uid = u.parse().expect("a uid");
                node.gid = g.parse().expect("a gid");
            }
        }
        out.insert(
            path.trim_end_matches('/').as_bytes().to_vec(),
            (node, content),
        );
    }
    out
}

fn node(kind: NodeKind, mode: u32, size: u64) -> Node {
    Node {
        kind,
        mode,
        size,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
    }
}

struct Trees {
    before: Tree,
    after: Tree,
}

impl Sides for Trees {
    fn pair(&self, rel: &[u8]) -> io::Result<Pair> {
        let a = self.before.get(rel);
        let b = self.after.get(rel);
        Ok(Pair {
            before: a.map(|(n, _)| *n),
            after: b.map(|(n, _)| *n),
            content_differs: matches!((a, b), (Some((_, x)), Some((_, y))) if x != y),
            before_known: true,
        })
    }

    fn xattrs_differ(&self, _rel: &[u8]) -> io::Result<bool> {
        Ok(false)
    }

    fn before_below(&self, rel: &[u8]) -> io::Result<Vec<Vec<u8>>> {
        Ok(keys_below(&self.before, rel))
    }

    fn masks(&self) -> Vec<Vec<u8>> {
        self.before
            .iter()
            .filter(|(_, (n, _))| n.kind == NodeKind::Mask)
            .map(|(p, _)| p.clone())
            .collect()
    }

    fn after_record(&self, rel: &[u8]) -> io::Result<Recorded> {
        Ok(recorded(self.after.get(rel)))
    }
}

/// The keys of `map` below dir `rel`.
fn keys_below<V>(map: &BTreeMap<Vec<u8>, V>, rel: &[u8]) -> Vec<Vec<u8>> {
    let mut prefix = rel.to_vec();
    prefix.push(b'/');
    map.keys()
        .filter(|k| k.starts_with(&prefix))
        .cloned()
        .collect()
}

/// A tree entry as a mark records it (content kept as is: equal bytes, equal record).
fn recorded(entry: Option<&(Node, Vec<u8>)>) -> Recorded {
    Recorded {
        node: entry.map(|(n, _)| *n),
        content: entry.map(|(_, c)| c.clone()).unwrap_or_default(),
    }
}

/// The changelog at the point: kinds then, and the mark's records (none for a token).
struct Point {
    kinds: BTreeMap<Vec<u8>, Option<NetKind>>,
    marked: Option<Tree>,
}

impl Past for Point {
    fn kind_then(&self, rel: &[u8]) -> io::Result<Option<NetKind>> {
        Ok(self.kinds.get(rel).copied().flatten())
    }

    fn recorded(&self, rel: &[u8]) -> io::Result<Option<Recorded>> {
        Ok(self
            .marked
            .as_ref()
            .and_then(|m| m.get(rel))
            .map(|e| recorded(Some(e))))
    }

    fn changes_below(&self, rel: &[u8]) -> io::Result<Vec<Vec<u8>>> {
        Ok(keys_below(&self.kinds, rel))
    }
}

fn change(item: &str) -> Change {
    let words: Vec<&str> = item.split_whitespace().collect();
    let kind = |w: &str| NetKind::from_name(w).unwrap_or_else(|| panic!("no kind {w}"));
    let (before, now) = match words.as_slice() {
        [_, k] => (None, Some(kind(k))),
        [_, "none", "was", b] => (Some(kind(b)), None),
        [_, k, "was", b] => (Some(kind(b)), Some(kind(k))),
        _ => panic!("`path kind [was kind]`: {item}"),
    };
    Change {
        path: words[0].as_bytes().to_vec(),
        kind: now,
        before,
        file_type: FileType::Unknown,
        origin: None,
        seq: 1,
    }
}

fn line(e: &DiffEntry, all: bool) -> String {
    format!(
        "{}/spfs/{}{}",
        e.sign.symbol(),
        String::from_utf8_lossy(&e.path),
        e.details(all)
    )
}

#[test]
fn cases_from_the_spec() {
    let all_cases = cases(SPEC);
    assert!(all_cases.len() >= 10, "the spec holds its cases");
    for case in all_cases {
        let sides = Trees {
            before: tree(&case.before),
            after: tree(&case.after),
        };
        let set = ChangeSet {
            token: Token {
                instance: 1,
                seq: 1,
            },
            fresh: None,
            ended: None,
            changes: case.changed.iter().map(|c| change(c)).collect(),
        };
        let scope = Scope { keep: &|_| true };
        let got = match case.since {
            None => diff(set, &sides, &scope),
            Some(point) => {
                let mut kinds: BTreeMap<Vec<u8>, Option<NetKind>> = case
                    .net
                    .iter()
                    .map(|c| (change(c).path, change(c).kind))
                    .collect();
                kinds.extend(set.changes.iter().map(|c| (c.path.clone(), c.before)));
                let past = Point {
                    kinds,
                    marked: (point == "mark").then(|| tree(&case.marked)),
                };
                diff(
                    set,
                    &AtPoint {
                        now: &sides,
                        past: &past,
                    },
                    &scope,
                )
            }
        }
        .expect("in-memory sides do not fail");
        let printed: Vec<String> = got
            .entries
            .iter()
            .filter(|e| e.sign != Sign::Touched)
            .map(|e| line(e, false))
            .collect();
        assert_eq!(printed, case.print, "case: {}", case.name);
        let touched: Vec<String> = got
            .entries
            .iter()
            .filter(|e| e.sign == Sign::Touched)
            .map(|e| line(e, true))
            .collect();
        assert_eq!(touched, case.all, "case (--all): {}", case.name);
    }
}

#[test]
fn spfs_order_is_dirs_first_then_bytes() {
    let mut paths = [
        ("b", false),
        ("a/z", false),
        ("B", false),
        ("a", true),
        ("c", true),
        ("a/y", true),
    ];
    paths.sort_by_cached_key(|(p, t)| order_key(p.as_bytes(), *t));
    let order: Vec<&str> = paths.iter().map(|(p, _)| *p).collect();
    assert_eq!(order, ["a", "a/y", "a/z", "c", "B", "b"]);
}
