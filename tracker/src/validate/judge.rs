//! spk's rules evaluated over a build's changes, with spk's precedence between them
//! (crates/spk-build/src/validation/ in spk 0.44): every expanded rule gives outcomes,
//! each with a *locality*, and a later outcome replaces an earlier one of the same
//! condition whose subject it covers and whose locality is a prefix of its own; an
//! outcome whose locality extends the new one's silences it. What is left denied or
//! required fails the build.
//!
//! Two views of the same changes: `View::Documented` applies the rules as spk
//! documents them (a removal of a dependency's file is a Remove; rewriting one as it
//! was is a Touch); `View::Spk044` applies them to what spk 0.44 itself looks at, which
//! drops removals and unchanged files of other packages before validating and counts
//! its own metadata files as installed (crates/spk-build/src/build/binary.rs).

use super::packages::Package;
use super::rules::{AlterAction, Matcher, PackageName, Rule, RuleKind};
use serde::{Deserialize, Serialize};

/// One changed path of the build, relative to the mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: Vec<u8>,
    /// What the upper dir holds there: `None` when the path was removed.
    pub upper: Option<Upper>,
    /// What the lower layers hold there: `None` when nothing.
    pub original: Option<Original>,
    /// What spk 0.44's picture of the build environment holds there (see
    /// `environment`): the original of a package's layer, unless spk's merge lost it
    /// or took another package's. `None` for removed paths too, which spk 0.44 does
    /// not look at.
    pub spk044: Option<Original>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upper {
    pub is_dir: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Original {
    /// The spk package whose layer holds it (the top-most layer that does); `None`
    /// for a layer of no spk package.
    pub package: Option<Package>,
    pub is_dir: bool,
    /// The upper entry has the original's type, mode and content (spk's entries
    /// compare those, not owners or times).
    pub same: bool,
}

/// spk's `DiffMode`, without the entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Diff {
    Added,
    Changed,
    Removed,
    Unchanged,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Documented,
    Spk044,
}

/// The rules that look at files, and ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RuleName {
    EmptyPackage,
    AlterExistingFiles,
    CollectExistingFiles,
    RecursiveBuild,
    /// A `--deny-path` glob (not an spk rule).
    DenyPath,
}

impl RuleName {
    pub fn name(self) -> &'static str {
        match self {
            RuleName::EmptyPackage => "EmptyPackage",
            RuleName::AlterExistingFiles => "AlterExistingFiles",
            RuleName::CollectExistingFiles => "CollectExistingFiles",
            RuleName::RecursiveBuild => "RecursiveBuild",
            RuleName::DenyPath => "deny-path",
        }
    }
}

/// Whether a rule failed because what it denies happened, or what it requires did not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Failure {
    Denied,
    Required,
}

/// A rule left failing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Finding {
    pub rule: RuleName,
    pub failure: Failure,
    pub action: Option<AlterAction>,
    /// Index of the entry it is about, if one.
    pub entry: Option<usize>,
    /// What spk's message says (`which is owned by ...`, `expected to alter files from
    /// ...`).
    pub detail: String,
}

/// What the rules are evaluated over.
pub struct Build<'a> {
    pub entries: &'a [Entry],
    /// The package being built, when known: its source dir is ignored, its metadata
    /// dir is spk's own, `~` in a rule names it.
    pub package: Option<&'a Package>,
    /// The packages of the build environment (for RecursiveBuild).
    pub environment: &'a [Package],
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Subject {
    Everything,
    Path(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    NoMatch,
    Allowed,
    Failed(Finding),
}

#[derive(Debug, Clone)]
struct Outcome {
    condition: RuleName,
    locality: String,
    subject: Subject,
    status: Status,
}

impl Outcome {
    /// spk's `Outcome::is_overridden_by`.
    fn is_overridden_by(&self, other: &Outcome, entries: &[Entry]) -> bool {
        let covered = match (&other.subject, &self.subject) {
            (Subject::Everything, _) => true,
            (Subject::Path(a), Subject::Path(b)) => entries[*a].path == entries[*b].path,
            (Subject::Path(_), Subject::Everything) => false,
        };
        self.condition == other.condition && covered && other.locality.starts_with(&self.locality)
    }
}

/// spk's `Report::add_outcome`, in order.
#[derive(Default)]
struct Outcomes(Vec<Outcome>);

impl Outcomes {
    fn add(&mut self, new: Outcome, entries: &[Entry]) {
        let silenced = self
            .0
            .iter()
            .any(|r| new.is_overridden_by(r, entries) && r.locality != new.locality);
        if silenced {
            return;
        }
        self.0.retain(|r| !r.is_overridden_by(&new, entries));
        self.0.push(new);
    }
}

/// The findings left failing after every rule of `rules` (already expanded, in
/// order) was applied to `build` as `view` sees it.
pub fn judge(build: &Build<'_>, rules: &[Rule], view: View) -> Vec<Finding> {
    let seen = Seen::new(build, view);
    let mut outcomes = Outcomes::default();
    for rule in rules {
        for o in seen.outcomes(rule) {
            outcomes.add(o, build.entries);
        }
    }
    let mut found: Vec<Finding> = outcomes
        .0
        .into_iter()
        .filter_map(|o| match o.status {
            Status::Failed(f) => Some(f),
            Status::NoMatch | Status::Allowed => None,
        })
        .collect();
    found.sort();
    found
}

/// The entries as one view sees them.
struct Seen<'a> {
    build: &'a Build<'a>,
    /// Per entry: its diff, and whether spk would package it.
    diffs: Vec<Option<(Diff, bool)>>,
    view: View,
}

impl<'a> Seen<'a> {
    fn new(build: &'a Build<'a>, view: View) -> Seen<'a> {
        let source = build
            .package
            .map(|p| format!("spk/pkg/{}/{}/src", p.name, p.version).into_bytes());
        let diffs = build
            .entries
            .iter()
            .map(|e| {
                // The source dir is the build's sandbox (binary.rs `sources_dir`).
                if source
                    .as_deref()
                    .is_some_and(|s| is_at_or_below(&e.path, s))
                {
                    return None;
                }
                let original = Self::original_in(view, e);
                let diff = match (&e.upper, original) {
                    (None, None) => return None,
                    (None, Some(_)) => Diff::Removed,
                    (Some(_), None) => Diff::Added,
                    (Some(_), Some(o)) if o.same => Diff::Unchanged,
                    (Some(_), Some(_)) => Diff::Changed,
                };
                let own = |o: Option<&Original>| {
                    let name = o.and_then(|o| o.package.as_ref()).map(|p| &p.name);
                    name.is_some() && name == build.package.map(|p| &p.name)
                };
                let collected = match diff {
                    Diff::Added | Diff::Changed => true,
                    Diff::Removed => false,
                    Diff::Unchanged => own(original),
                };
                // spk 0.44 validates only what it collects.
                if view == View::Spk044 && !collected {
                    return None;
                }
                Some((diff, collected))
            })
            .collect();
        Seen { build, diffs, view }
    }

    fn entries(&self) -> impl Iterator<Item = (usize, &'a Entry, Diff, bool)> + '_ {
        self.build
            .entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| self.diffs[i].map(|(d, c)| (i, e, d, c)))
    }

    /// spk's `DiffMode::is_dir`: a change between two dirs, or a dir added, removed
    /// or unchanged.
    fn is_dir(&self, e: &Entry, diff: Diff) -> bool {
        let upper = e.upper.is_some_and(|u| u.is_dir);
        let original = self.original(e).is_some_and(|o| o.is_dir);
        match diff {
            Diff::Changed => upper && original,
            Diff::Added | Diff::Unchanged => upper,
            Diff::Removed => original,
        }
    }

    fn current(&self) -> Option<&'a str> {
        self.build.package.map(|p| p.name.as_str())
    }

    /// `packages:` with `~` made the package being built (`None`: it is not known).
    fn names<'p>(&'p self, packages: &'p [PackageName]) -> Vec<Option<&'p str>> {
        packages
            .iter()
            .map(|p| match p {
                PackageName::Current => self.current(),
                PackageName::Name(n) => Some(n.as_str()),
            })
            .collect()
    }

    /// The original this view compares `e` with.
    fn original(&self, e: &'a Entry) -> Option<&'a Original> {
        Self::original_in(self.view, e)
    }

    fn original_in(view: View, e: &Entry) -> Option<&Original> {
        match view {
            View::Documented => e.original.as_ref(),
            View::Spk044 => e.spk044.as_ref(),
        }
    }

    fn owner(&self, e: &'a Entry) -> Option<&'a Package> {
        self.original(e).and_then(|o| o.package.as_ref())
    }

    /// Whether an owner is among `names` (any owner when there are none).
    fn owned_by(names: &[Option<&str>], owner: Option<&Package>) -> bool {
        names.is_empty() || owner.is_some_and(|o| names.contains(&Some(o.name.as_str())))
    }

    fn outcomes(&self, rule: &Rule) -> Vec<Outcome> {
        match &rule.matcher {
            Matcher::EmptyPackage => vec![self.empty_package(rule.kind)],
            Matcher::AlterExistingFiles { packages, action } => {
                self.alter(rule.kind, packages, action.unwrap_or(AlterAction::Change))
            }
            Matcher::CollectExistingFiles { packages } => self.collect(rule.kind, packages),
            Matcher::RecursiveBuild => vec![self.recursive(rule.kind)],
            // Checked by spk from the recipe; CollectAllFiles is never parsed as itself.
            Matcher::CollectAllFiles | Matcher::Recipe(_) => Vec::new(),
        }
    }

    fn whole(condition: RuleName, locality: String, status: Status) -> Outcome {
        Outcome {
            condition,
            locality,
            subject: Subject::Everything,
            status,
        }
    }

    fn failed(
        rule: RuleName,
        failure: Failure,
        action: Option<AlterAction>,
        detail: String,
    ) -> Status {
        Status::Failed(Finding {
            rule,
            failure,
            action,
            entry: None,
            detail,
        })
    }

    fn empty_package(&self, kind: RuleKind) -> Outcome {
        let installed = match self.view {
            // spk 0.44 counts its own metadata files, so a build is never empty.
            View::Spk044 => self.entries().any(|(.., collected)| collected),
            View::Documented => {
                let meta = self.build.package.map(Package::metadata_dir);
                self.entries().any(|(_, e, diff, collected)| {
                    let spk_own = meta
                        .as_deref()
                        .is_some_and(|m| is_at_or_below(&e.path, m) || is_at_or_below(m, &e.path));
                    // A dir that was already there is no installed file.
                    collected && !spk_own && !(diff == Diff::Changed && self.is_dir(e, diff))
                })
            }
        };
        let status = match kind {
            RuleKind::Deny if !installed => Self::failed(
                RuleName::EmptyPackage,
                Failure::Denied,
                None,
                "the build installed no files".into(),
            ),
            RuleKind::Require if installed => Self::failed(
                RuleName::EmptyPackage,
                Failure::Required,
                None,
                "the build was expected to install no files, but did".into(),
            ),
            _ => Status::Allowed,
        };
        Self::whole(RuleName::EmptyPackage, String::new(), status)
    }

    fn recursive(&self, kind: RuleKind) -> Outcome {
        let current = self.current();
        let recursive = current.is_some_and(|c| self.build.environment.iter().any(|p| p.name == c));
        let name = current.unwrap_or("?");
        let status = match kind {
            RuleKind::Deny if recursive => Self::failed(
                RuleName::RecursiveBuild,
                Failure::Denied,
                None,
                format!("{name} was found in its own build environment"),
            ),
            RuleKind::Require if !recursive => Self::failed(
                RuleName::RecursiveBuild,
                Failure::Required,
                None,
                format!("{name} was required to be in its own build environment, but was not"),
            ),
            _ => Status::Allowed,
        };
        Self::whole(RuleName::RecursiveBuild, String::new(), status)
    }

    /// One whole-build outcome of `status` at each of `localities`.
    fn everywhere(condition: RuleName, localities: Vec<String>, status: Status) -> Vec<Outcome> {
        localities
            .into_iter()
            .map(|l| Self::whole(condition, l, status.clone()))
            .collect()
    }

    /// A deny's outcomes: one per entry, each at `prefix` and the owner's name when
    /// the rule names the owner (spk's deny localities), saying who owns the original.
    fn denied_each(
        &self,
        condition: RuleName,
        action: Option<AlterAction>,
        prefix: &str,
        packages: &[PackageName],
        entries: Vec<usize>,
    ) -> Vec<Outcome> {
        entries
            .into_iter()
            .map(|i| {
                let owner = self.owner(&self.build.entries[i]);
                Outcome {
                    condition,
                    locality: format!("{prefix}{}", named_owner(packages, owner)),
                    subject: Subject::Path(i),
                    status: Status::Failed(Finding {
                        rule: condition,
                        failure: Failure::Denied,
                        action,
                        entry: Some(i),
                        detail: owned_by(owner),
                    }),
                }
            })
            .collect()
    }

    /// Localities of a rule's package names, `prefix` before each; with no names,
    /// `bare` alone (spk's `by_localities`: an allow then has the empty locality, a
    /// require keeps its prefix, which is why a bare allow overrides no deny).
    fn localities(names: &[Option<&str>], prefix: &str, bare: &str) -> Vec<String> {
        if names.is_empty() {
            return vec![bare.to_string()];
        }
        names
            .iter()
            .map(|n| format!("{prefix}{}", n.unwrap_or("~")))
            .collect()
    }

    fn alter(&self, kind: RuleKind, packages: &[PackageName], action: AlterAction) -> Vec<Outcome> {
        let names = self.names(packages);
        let altered: Vec<usize> = self
            .entries()
            .filter(|&(_, e, diff, _)| {
                !self.is_dir(e, diff)
                    && matches!(
                        (action, diff),
                        (AlterAction::Remove, Diff::Removed)
                            | (AlterAction::Touch, Diff::Unchanged)
                            | (AlterAction::Change, Diff::Changed)
                    )
                    && Self::owned_by(&names, self.owner(e))
            })
            .map(|(i, ..)| i)
            .collect();
        let condition = RuleName::AlterExistingFiles;
        let prefix = format!("{}/", action.name());
        match kind {
            RuleKind::Allow => {
                let status = if altered.is_empty() {
                    Status::NoMatch
                } else {
                    Status::Allowed
                };
                Self::everywhere(condition, Self::localities(&names, &prefix, ""), status)
            }
            RuleKind::Require if !altered.is_empty() => {
                vec![Self::whole(condition, String::new(), Status::Allowed)]
            }
            RuleKind::Require => {
                let detail = format!(
                    "the build was expected to alter ({}) files of {}, but did not",
                    action.verb(),
                    owners(&names)
                );
                let status = Self::failed(condition, Failure::Required, Some(action), detail);
                Self::everywhere(
                    condition,
                    Self::localities(&names, &prefix, &prefix),
                    status,
                )
            }
            RuleKind::Deny => self.denied_each(condition, Some(action), &prefix, packages, altered),
        }
    }

    fn collect(&self, kind: RuleKind, packages: &[PackageName]) -> Vec<Outcome> {
        let names = self.names(packages);
        let existing: Vec<usize> = self
            .entries()
            .filter(|&(_, e, _, collected)| {
                collected
                    && self.original(e).is_some_and(|o| !o.is_dir)
                    && Self::owned_by(&names, self.owner(e))
            })
            .map(|(i, ..)| i)
            .collect();
        let condition = RuleName::CollectExistingFiles;
        match kind {
            RuleKind::Allow | RuleKind::Require if !existing.is_empty() => {
                Self::everywhere(condition, Self::localities(&names, "", ""), Status::Allowed)
            }
            RuleKind::Allow => {
                Self::everywhere(condition, Self::localities(&names, "", ""), Status::NoMatch)
            }
            RuleKind::Require => {
                let detail = format!(
                    "the build was expected to collect files of {}, but did not",
                    owners(&names)
                );
                // spk reports this one as denied (collect_existing_files.rs).
                let status = Self::failed(condition, Failure::Denied, None, detail);
                Self::everywhere(condition, Self::localities(&names, "", ""), status)
            }
            RuleKind::Deny => self.denied_each(condition, None, "", packages, existing),
        }
    }
}

/// The owner's name when the rule names it by name (the locality of a deny), else "".
fn named_owner(packages: &[PackageName], owner: Option<&Package>) -> String {
    packages
        .iter()
        .find_map(|p| match (p, owner) {
            (PackageName::Name(n), Some(o)) if *n == o.name => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn owned_by(owner: Option<&Package>) -> String {
    match owner {
        Some(p) => format!("which is owned by {p}"),
        None => "which is in a layer of no spk package".into(),
    }
}

fn owners(names: &[Option<&str>]) -> String {
    if names.is_empty() {
        return "any package".into();
    }
    names
        .iter()
        .map(|n| n.unwrap_or("the package being built"))
        .collect::<Vec<_>>()
        .join(", or ")
}

/// Whether `path` is `dir` or below it (whole components).
pub fn is_at_or_below(path: &[u8], dir: &[u8]) -> bool {
    path.strip_prefix(dir)
        .is_some_and(|rest| rest.is_empty() || rest[0] == b'/')
}
