//! The build environment as spk 0.44 pictures it before validating.
//!
//! spk compares the build's changes with a manifest it makes of the solved packages'
//! layers (`get_environment_filesystem`, crates/spk-exec/src/exec.rs), not with the
//! overlay. It walks each layer in the solve's order (the overlay's, bottom-most
//! first) and puts every entry in; where a dir is already there, only its direct
//! children that the new layer lacks are kept, and the walk then goes on below with
//! the new layer's subtrees as they are. So the merge reaches one level below each
//! top-level dir: below `/spfs/A/B`, a later layer that also has `A/B` hides what
//! earlier ones hold there. Every package layer has `spk/pkg`, so only the top-most
//! package's metadata is in spk's picture, and two packages that both install into
//! `share/doc` leave only the later one's files there.

use std::collections::HashMap;
use std::io;

/// What one lower layer itself holds at a path (relative to the mount, no leading
/// `/`): `Some(is_dir)`, `None` when nothing.
pub trait LayerEntries {
    fn layer_entry(&self, layer: usize, rel: &[u8]) -> io::Result<Option<bool>>;
}

impl LayerEntries for crate::classify::Classifier {
    fn layer_entry(&self, layer: usize, rel: &[u8]) -> io::Result<Option<bool>> {
        crate::classify::Classifier::layer_entry(self, layer, rel)
    }
}

/// spk 0.44's picture of the environment, looked up path by path.
pub struct Spk044Environment<'a, L> {
    layers: &'a L,
    /// The package layers (lower layer indices), in spk's order: bottom-most first.
    order: Vec<usize>,
    /// Per top-level name: what spk's manifest holds there (see [`Top`]).
    tops: HashMap<Vec<u8>, Top>,
    /// Per `A/B`: the layer whose subtree spk's manifest holds there.
    seconds: HashMap<Vec<u8>, Option<usize>>,
}

/// spk's entry for a top-level name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Top {
    Absent,
    /// A file (or other non-dir) from this layer.
    File(usize),
    /// A dir; the index in `order` from which on layers were merged into it (a
    /// non-dir before that replaced what came earlier).
    Dir {
        since: usize,
    },
}

impl<'a, L: LayerEntries> Spk044Environment<'a, L> {
    /// `package_layers`: the lower layers that hold spk packages, as overlay indices
    /// (0 = top-most). Other layers are not in spk's picture at all.
    pub fn new(layers: &'a L, package_layers: &[usize]) -> Self {
        let mut order = package_layers.to_vec();
        order.sort_unstable_by(|a, b| b.cmp(a));
        Spk044Environment {
            layers,
            order,
            tops: HashMap::new(),
            seconds: HashMap::new(),
        }
    }

    /// The layer whose entry spk's manifest holds at `rel`, with whether it is a dir;
    /// `None` when spk's picture has nothing there.
    pub fn holder(&mut self, rel: &[u8]) -> io::Result<Option<(usize, bool)>> {
        let mut parts = rel.splitn(3, |&b| b == b'/');
        let first = parts.next().unwrap_or_default();
        let second = parts.next();
        if first.is_empty() {
            return Ok(None);
        }
        let top = self.top(first)?;
        let Some(second) = second else {
            return Ok(match top {
                Top::Absent => None,
                Top::File(layer) => Some((layer, false)),
                Top::Dir { since } => self.last_with(since, first)?.map(|l| (l, true)),
            });
        };
        let Top::Dir { since } = top else {
            return Ok(None);
        };
        let prefix = [first, b"/", second].concat();
        let holder = match self.seconds.get(&prefix) {
            Some(h) => *h,
            None => {
                let h = self.last_with(since, &prefix)?;
                self.seconds.insert(prefix, h);
                h
            }
        };
        let Some(layer) = holder else {
            return Ok(None);
        };
        // At and below `A/B`, spk holds that one layer's subtree as it is.
        Ok(self.layers.layer_entry(layer, rel)?.map(|d| (layer, d)))
    }

    /// What spk's manifest holds at top-level name `name`.
    fn top(&mut self, name: &[u8]) -> io::Result<Top> {
        if let Some(t) = self.tops.get(name) {
            return Ok(*t);
        }
        let mut top = Top::Absent;
        for (i, &layer) in self.order.iter().enumerate() {
            top = match (self.layers.layer_entry(layer, name)?, top) {
                (None, t) => t,
                (Some(false), _) => Top::File(layer),
                (Some(true), Top::Dir { since }) => Top::Dir { since },
                (Some(true), _) => Top::Dir { since: i },
            };
        }
        self.tops.insert(name.to_vec(), top);
        Ok(top)
    }

    /// The last layer in spk's order, from `order[since]` on, that holds `rel`.
    fn last_with(&self, since: usize, rel: &[u8]) -> io::Result<Option<usize>> {
        for &layer in self.order[since..].iter().rev() {
            if self.layers.layer_entry(layer, rel)?.is_some() {
                return Ok(Some(layer));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Layers as lists of paths (a trailing `/` marks a dir), top-most first.
    struct Fake(Vec<Vec<&'static str>>);

    impl LayerEntries for Fake {
        fn layer_entry(&self, layer: usize, rel: &[u8]) -> io::Result<Option<bool>> {
            let rel = std::str::from_utf8(rel).expect("utf-8 in tests");
            Ok(self.0[layer].iter().find_map(|p| {
                let (path, dir) = match p.strip_suffix('/') {
                    Some(d) => (d, true),
                    None => (*p, false),
                };
                // A path's parents are dirs of its layer too.
                if path == rel {
                    Some(dir)
                } else {
                    path.starts_with(&format!("{rel}/")).then_some(true)
                }
            }))
        }
    }

    /// Each case: layers (top-most first, all of packages), then paths with the
    /// overlay index of the layer spk's picture takes each from (`None`: not in it).
    #[test]
    fn the_merge_reaches_one_level_below_each_top_level_dir() {
        type Case = (
            &'static str,
            Vec<Vec<&'static str>>,
            Vec<(&'static str, Option<usize>)>,
        );
        let cases: Vec<Case> = vec![
            (
                "the top-most package's metadata hides the others'",
                vec![
                    vec!["spk/pkg/comp/1/B/spec.yaml", "include/comp/h.h"],
                    vec!["spk/pkg/base/1/B/spec.yaml", "share/base/data.txt"],
                ],
                vec![
                    ("spk/pkg/comp/1/B/spec.yaml", Some(0)),
                    ("spk/pkg/base/1/B/spec.yaml", None),
                    ("spk/pkg", Some(0)),
                    ("share/base/data.txt", Some(1)),
                    ("include/comp/h.h", Some(0)),
                ],
            ),
            (
                "files one level below a shared top-level dir are merged",
                vec![
                    vec!["share/a.txt", "share/x/"],
                    vec!["share/b.txt", "share/y/f"],
                ],
                vec![
                    ("share/a.txt", Some(0)),
                    ("share/b.txt", Some(1)),
                    ("share/y/f", Some(1)),
                    ("share", Some(0)),
                ],
            ),
            (
                "two packages installing into share/doc: only the top-most one's files",
                vec![vec!["share/doc/top.txt"], vec!["share/doc/low.txt"]],
                vec![("share/doc/top.txt", Some(0)), ("share/doc/low.txt", None)],
            ),
            (
                "a file at the top level replaces an earlier dir, a later dir starts over",
                vec![vec!["etc/new.conf"], vec!["etc"], vec!["etc/old.conf"]],
                vec![
                    ("etc/new.conf", Some(0)),
                    ("etc/old.conf", None),
                    ("etc", Some(0)),
                ],
            ),
            (
                "nothing there",
                vec![vec!["share/a.txt"]],
                vec![("bin/tool", None), ("share/none", None), ("", None)],
            ),
        ];
        for (name, layers, paths) in cases {
            let fake = Fake(layers);
            let all: Vec<usize> = (0..fake.0.len()).collect();
            let mut env = Spk044Environment::new(&fake, &all);
            for (path, want) in paths {
                let got = env.holder(path.as_bytes()).expect("no io in tests");
                assert_eq!(got.map(|(l, _)| l), want, "{name}: {path}");
            }
        }
    }
}
