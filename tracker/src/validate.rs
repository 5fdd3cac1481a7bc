//! spk's build validation rules, evaluated from the changelog in O(changes).
//!
//! spk validates a build by walking and hashing the whole upper dir and diffing it
//! against the environment's manifest. Here the changelog already lists what changed
//! since the build started and who changed it; each changed path is compared with its
//! lower original only (the classifier compared the bytes when it recorded the change,
//! so "rewritten with identical bytes" is a metadata-only change: a Touch).
//!
//! ```no_run
//! # fn main() -> Result<(), tracker::TrackerError> {
//! use tracker::validate::{Rules, validate};
//! let store = store::Store::open(std::path::Path::new("/var/lib/spfs-changes/runtimes/spfs-abc"))?;
//! let layers = tracker::classify::Classifier::new(
//!     std::path::Path::new("/tmp/spfs-runtime/upper"),
//!     &[std::path::PathBuf::from("/tmp/spfs-runtime/lower")],
//! ).expect("layers are readable");
//! let since = Some(store::Since::Mark("build-start".into()));
//! let masks = tracker::masks::Masks::default();
//! let report = validate(&store, &layers, &["base".into()], &masks, since, &Rules::default())?;
//! for v in &report.violations {
//!     eprintln!("{:?} {:?}: {}", v.rule, v.action, String::from_utf8_lossy(&v.path));
//! }
//! # Ok(()) }
//! ```

use crate::TrackerError;
use crate::classify::{Classifier, Original};
use crate::masks::Masks;
use serde::{Deserialize, Serialize};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use store::{FileType, FreshReason, NetKind, Origin, Query, Since, Store, Token};

/// How an existing (lower) file was altered, as spk names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AlterAction {
    /// Content, type, mode or owner differ.
    Change,
    /// Deleted.
    Remove,
    /// Rewritten with identical content (only times or xattrs differ).
    Touch,
}

/// spk's rule names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RuleName {
    EmptyPackage,
    AlterExistingFiles,
    CollectExistingFiles,
    /// A `--deny-path` glob.
    DenyPath,
}

/// Which rules deny. `Default` is spk's default: deny EmptyPackage, deny
/// AlterExistingFiles Change and Remove (Touch allowed), deny CollectExistingFiles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rules {
    pub deny_empty_package: bool,
    pub deny_alter: Vec<AlterAction>,
    pub deny_collect_existing: bool,
    /// Globs (relative to the mount) no change may match.
    pub deny_paths: Vec<String>,
    /// Paths (relative to the mount) the build will collect into its package.
    pub collect: Vec<Vec<u8>>,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            deny_empty_package: true,
            deny_alter: vec![AlterAction::Change, AlterAction::Remove],
            deny_collect_existing: true,
            deny_paths: Vec::new(),
            collect: Vec::new(),
        }
    }
}

impl Rules {
    /// Allows or denies a rule given as spk spells it: `EmptyPackage`,
    /// `AlterExistingFiles` (all actions), `AlterExistingFiles:Touch`,
    /// `CollectExistingFiles`.
    pub fn set(&mut self, rule: &str, deny: bool) -> Result<(), TrackerError> {
        let (name, action) = match rule.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (rule, None),
        };
        match (name, action) {
            ("EmptyPackage", None) => self.deny_empty_package = deny,
            ("CollectExistingFiles", None) => self.deny_collect_existing = deny,
            ("AlterExistingFiles", action) => {
                let actions = match action {
                    None => vec![AlterAction::Change, AlterAction::Remove, AlterAction::Touch],
                    Some("Change") => vec![AlterAction::Change],
                    Some("Remove") => vec![AlterAction::Remove],
                    Some("Touch") => vec![AlterAction::Touch],
                    Some(other) => {
                        return Err(TrackerError::Validate(format!(
                            "unknown AlterExistingFiles action {other:?} (Change, Remove or Touch)"
                        )));
                    }
                };
                self.deny_alter.retain(|a| !actions.contains(a));
                if deny {
                    self.deny_alter.extend(actions);
                }
                self.deny_alter.sort();
            }
            _ => {
                return Err(TrackerError::Validate(format!(
                    "unknown rule {rule:?} (EmptyPackage, AlterExistingFiles[:Change|:Remove|:Touch], CollectExistingFiles)"
                )));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    pub rule: RuleName,
    pub action: Option<AlterAction>,
    /// Relative to the mount; empty for EmptyPackage.
    pub path: Vec<u8>,
    pub kind: Option<NetKind>,
    /// The lower layer that holds the original.
    pub layer: Option<String>,
    /// The process that made the change.
    pub origin: Option<Origin>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub token: Token,
    /// Set when `since` could not be honoured: every change was validated.
    pub fresh: Option<FreshReason>,
    /// How many changed paths were looked at.
    pub checked: usize,
    pub violations: Vec<Violation>,
}

/// Evaluates `rules` over what changed since `since`. `layer_names[i]` names lower
/// layer `i` of `layers` in reports. `masks` are the environment's (spfs writes them at
/// every mount): their whiteouts are no change of the build's, and what they hide has
/// no original to alter.
pub fn validate(
    store: &Store,
    layers: &Classifier,
    layer_names: &[String],
    masks: &Masks,
    since: Option<Since>,
    rules: &Rules,
) -> Result<Report, TrackerError> {
    let set = store.query(&Query {
        since,
        ..Query::default()
    })?;
    let inspect = |path: &[u8]| {
        if masks.hides(path) {
            return Ok(Original {
                layer: None,
                mode_or_owner_differs: false,
                is_dir: false,
            });
        }
        layers.original(path).map_err(|e| {
            TrackerError::Validate(format!(
                "cannot compare {} with the lower layers: {e}",
                String::from_utf8_lossy(path)
            ))
        })
    };
    let name = |i: Option<usize>| {
        i.map(|i| {
            layer_names
                .get(i)
                .cloned()
                .unwrap_or_else(|| format!("lower layer {i}"))
        })
    };
    let deny_paths = glob_set(&rules.deny_paths)?;
    // Matched on the path's bytes: globset takes them as they are on Unix.
    let denied = |path: &[u8]| deny_paths.is_match(Path::new(OsStr::from_bytes(path)));
    let mut violations = Vec::new();
    let mut installed = false;
    for c in &set.changes {
        let Some(kind) = c.kind else { continue };
        if kind == NetKind::Removed && masks.contains(&c.path) {
            continue;
        }
        if matches!(kind, NetKind::Added | NetKind::Modified | NetKind::Replaced)
            && c.file_type != FileType::Dir
        {
            installed = true;
        }
        if denied(&c.path) {
            violations.push(Violation {
                rule: RuleName::DenyPath,
                action: None,
                path: c.path.clone(),
                kind: Some(kind),
                layer: None,
                origin: c.origin.clone(),
            });
        }
        if kind == NetKind::Added {
            continue;
        }
        let original = inspect(&c.path)?;
        if original.layer.is_none() {
            continue;
        }
        let action = match kind {
            NetKind::Removed => AlterAction::Remove,
            NetKind::Modified | NetKind::Replaced => AlterAction::Change,
            NetKind::Metadata if original.mode_or_owner_differs => AlterAction::Change,
            NetKind::Metadata => AlterAction::Touch,
            NetKind::Added => continue,
        };
        if rules.deny_alter.contains(&action) {
            violations.push(Violation {
                rule: RuleName::AlterExistingFiles,
                action: Some(action),
                path: c.path.clone(),
                kind: Some(kind),
                layer: name(original.layer),
                origin: c.origin.clone(),
            });
        }
        // A removed or replaced dir took every original below it along.
        if original.is_dir && matches!(kind, NetKind::Removed | NetKind::Replaced) {
            let below = layers.lower_tree(&c.path).map_err(|e| {
                TrackerError::Validate(format!(
                    "cannot list the originals below {}: {e}",
                    String::from_utf8_lossy(&c.path)
                ))
            })?;
            for (path, layer, _) in below {
                // Hidden by the environment, or there again in the new dir (put back
                // by a reset, or made anew: its own change is recorded for it).
                let there = layers
                    .upper_inode(&path)
                    .map_err(|e| {
                        TrackerError::Validate(format!(
                            "cannot look at {} in the upper dir: {e}",
                            String::from_utf8_lossy(&path)
                        ))
                    })?
                    .is_some();
                if masks.hides(&path) || there {
                    continue;
                }
                if rules.deny_alter.contains(&AlterAction::Remove) {
                    violations.push(Violation {
                        rule: RuleName::AlterExistingFiles,
                        action: Some(AlterAction::Remove),
                        path: path.clone(),
                        kind: Some(NetKind::Removed),
                        layer: name(Some(layer)),
                        origin: c.origin.clone(),
                    });
                }
                if denied(&path) {
                    violations.push(Violation {
                        rule: RuleName::DenyPath,
                        action: None,
                        path,
                        kind: Some(NetKind::Removed),
                        layer: None,
                        origin: c.origin.clone(),
                    });
                }
            }
        }
    }
    if rules.deny_empty_package && !installed {
        violations.push(Violation {
            rule: RuleName::EmptyPackage,
            action: None,
            path: Vec::new(),
            kind: None,
            layer: None,
            origin: None,
        });
    }
    if rules.deny_collect_existing {
        for path in &rules.collect {
            let original = inspect(path)?;
            if original.layer.is_some() {
                let entry = store.net_entry(path)?;
                violations.push(Violation {
                    rule: RuleName::CollectExistingFiles,
                    action: None,
                    path: path.clone(),
                    kind: entry.as_ref().map(|e| e.kind),
                    layer: name(original.layer),
                    origin: entry.and_then(|e| e.origin),
                });
            }
        }
    }
    violations.sort_by(|a, b| (a.rule, &a.path).cmp(&(b.rule, &b.path)));
    Ok(Report {
        token: set.token,
        fresh: set.fresh,
        checked: set.changes.len(),
        violations,
    })
}

fn glob_set(globs: &[String]) -> Result<globset::GlobSet, TrackerError> {
    let mut builder = globset::GlobSetBuilder::new();
    for g in globs {
        let glob = globset::Glob::new(g.trim_start_matches('/'))
            .map_err(|e| TrackerError::Validate(format!("bad --deny-path glob {g:?}: {e}")))?;
        builder.add(glob);
    }
    builder
        .build()
        .map_err(|e| TrackerError::Validate(format!("bad --deny-path globs: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_follow_spk_names_and_defaults() {
        let mut r = Rules::default();
        assert!(r.deny_empty_package && r.deny_collect_existing);
        assert_eq!(r.deny_alter, vec![AlterAction::Change, AlterAction::Remove]);
        r.set("AlterExistingFiles:Touch", true).expect("known rule");
        assert_eq!(
            r.deny_alter,
            vec![AlterAction::Change, AlterAction::Remove, AlterAction::Touch]
        );
        r.set("AlterExistingFiles", false).expect("known rule");
        assert!(r.deny_alter.is_empty());
        r.set("EmptyPackage", false).expect("known rule");
        assert!(!r.deny_empty_package);
        assert!(r.set("NoSuchRule", true).is_err());
        assert!(r.set("AlterExistingFiles:Melt", true).is_err());
    }
}
