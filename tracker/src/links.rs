//! The names of upper inodes, for hard links: `ln /spfs/f /spfs/f2; chmod 600
//! /spfs/f2` changes `f` too, though every event names `f2`.
//!
//! Events name one path; a file with several names (overlayfs links them in the upper
//! dir, one inode) changes under all of them. Most runtimes never see a hard link, so
//! the index costs nothing until the first one: then one walk of the upper dir notes
//! the inode of every file in it, and from then on every file the watcher classifies
//! is noted too, so the other names of a file are known when it gains a second name
//! or changes through one. Past its bound the index is dropped, and the next hard
//! link walks again.

use crate::classify::{Classifier, Net, UpperInode};
use crate::fid::Handle;
use crate::resolve::{Place, Resolver};
use crate::settle::Layers;
use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use store::{FileType, NetKind};

/// Past this many remembered files the index starts over (its memory is bounded; the
/// walk finds what it forgot).
const INDEX_LIMIT: usize = 256 * 1024;

/// Inode number -> the upper-relative names last seen for it.
#[derive(Debug, Default)]
pub struct LinkIndex {
    /// Whether the index is kept (since the first hard link, until its bound).
    active: bool,
    /// The upper dir holds more files than the index's bound: names are found by a
    /// walk each time instead of walking to rebuild an index that cannot hold them.
    exhausted: bool,
    names: HashMap<u64, Vec<Vec<u8>>>,
    len: usize,
}

impl LinkIndex {
    fn note(&mut self, ino: u64, path: &[u8]) {
        if !self.active {
            return;
        }
        let names = self.names.entry(ino).or_default();
        if names.iter().any(|n| n == path) {
            return;
        }
        names.push(path.to_vec());
        self.len += 1;
        if self.len > INDEX_LIMIT {
            *self = LinkIndex {
                exhausted: true,
                ..LinkIndex::default()
            };
        }
    }

    /// Starts the index from a walk of the upper dir (each path once: no checks for
    /// repeats, which the whiteouts overlayfs links to one inode would make slow).
    fn activate(&mut self, classifier: &Classifier) -> io::Result<()> {
        *self = LinkIndex {
            active: true,
            ..LinkIndex::default()
        };
        for (ino, path) in classifier.upper_inodes()? {
            self.names.entry(ino).or_default().push(path);
            self.len += 1;
        }
        if self.len > INDEX_LIMIT {
            *self = LinkIndex {
                exhausted: true,
                ..LinkIndex::default()
            };
        }
        Ok(())
    }

    fn replace(&mut self, ino: u64, names: Vec<Vec<u8>>) {
        if !self.active {
            return;
        }
        let old = self.names.insert(ino, names).map_or(0, |n| n.len());
        self.len = self.len - old + self.names.get(&ino).map_or(0, Vec::len);
    }
}

/// The layers as the watcher sees them for one batch: the classifier for states, the
/// index for hard links.
pub struct Live<'a> {
    /// States against the lower layers.
    pub classifier: &'a Classifier,
    /// Handles to paths (for changes named by a name that is gone).
    pub resolver: &'a Resolver,
    /// The inode -> names index, kept across batches.
    pub links: &'a RefCell<LinkIndex>,
    /// The paths this batch classified that have several names, with their inode:
    /// only those have other names to look for (no second `lstat` for the rest).
    pub several: RefCell<HashMap<Vec<u8>, UpperInode>>,
}

impl<'a> Live<'a> {
    pub fn new(
        classifier: &'a Classifier,
        resolver: &'a Resolver,
        links: &'a RefCell<LinkIndex>,
    ) -> Self {
        Live {
            classifier,
            resolver,
            links,
            several: RefCell::default(),
        }
    }
}

impl Layers for Live<'_> {
    fn classify(&self, rel: &[u8]) -> io::Result<Net> {
        let (state, inode) = self.classifier.classify_inode(rel)?;
        if let Some(inode) = inode
            && inode.linkable
        {
            self.links.borrow_mut().note(inode.ino, rel);
            if inode.links > 1 {
                self.several.borrow_mut().insert(rel.to_vec(), inode);
            }
        }
        Ok(state)
    }

    fn object_name(&self, object: &Handle) -> io::Result<Option<Vec<u8>>> {
        Ok(match self.resolver.object(object.as_ref())? {
            Some(Place::Upper(rel)) if !rel.is_empty() => Some(rel),
            _ => None,
        })
    }

    fn walk(&self, rel: &[u8], out: &mut Vec<(Vec<u8>, NetKind, FileType)>) -> io::Result<()> {
        self.classifier.walk(rel, out)
    }

    fn other_names(&self, rel: &[u8]) -> io::Result<Vec<Vec<u8>>> {
        let Some(inode) = self.several.borrow().get(rel).copied() else {
            return Ok(Vec::new());
        };
        let (active, exhausted) = {
            let links = self.links.borrow();
            (links.active, links.exhausted)
        };
        if !active && !exhausted {
            self.links.borrow_mut().activate(self.classifier)?;
        }
        let known = self
            .links
            .borrow()
            .names
            .get(&inode.ino)
            .cloned()
            .unwrap_or_default();
        let mut names = Vec::with_capacity(known.len() + 1);
        for name in known {
            if self.classifier.upper_inode(&name)?.map(|i| i.ino) == Some(inode.ino) {
                names.push(name);
            }
        }
        if !names.iter().any(|n| n == rel) {
            names.push(rel.to_vec());
        }
        if (names.len() as u64) < inode.links {
            names = self
                .classifier
                .upper_inodes()?
                .into_iter()
                .filter(|(ino, _)| *ino == inode.ino)
                .map(|(_, path)| path)
                .collect();
        }
        self.links.borrow_mut().replace(inode.ino, names.clone());
        names.retain(|n| n != rel);
        Ok(names)
    }
}
