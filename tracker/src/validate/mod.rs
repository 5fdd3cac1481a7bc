//! spk's build validation rules, evaluated from the changelog in O(changes).
//!
//! spk validates a build by walking and hashing the whole upper dir and diffing it
//! against the build environment's manifest. Here the changelog already lists what
//! changed since the build started and who changed it; each changed path is compared
//! with its lower original only (the classifier compared the bytes when it recorded
//! the change, so "rewritten with identical bytes" is a metadata-only change: a Touch).
//!
//! The rules are spk 0.44's (`rules`: parsing, defaults, expansion; `judge`: the
//! evaluation and precedence), applied as spk documents them, and once more as spk
//! 0.44 applies them, so that each violation says whether spk itself would report it.
//! Each names the package that installed the original (`packages`) and its writer.
//!
//! ```no_run
//! # fn main() -> Result<(), tracker::TrackerError> {
//! use tracker::validate::{Request, validate};
//! let store = store::Store::open(std::path::Path::new("/var/lib/spfs-changes/runtimes/spfs-abc"))?;
//! let layers = tracker::classify::Classifier::new(
//!     std::path::Path::new("/tmp/spfs-runtime/upper"),
//!     &[std::path::PathBuf::from("/tmp/spfs-runtime/lower")],
//! ).expect("layers are readable");
//! let request = Request {
//!     since: Some(store::Since::Mark("build-start".into())),
//!     ..Request::default()
//! };
//! let masks = tracker::masks::Masks::default();
//! let report = validate(&store, &layers, &["base".into()], &masks, &request)?;
//! for v in &report.violations {
//!     eprintln!("{} {:?}: {}", v.rule.name(), v.action, String::from_utf8_lossy(&v.path));
//! }
//! # Ok(()) }
//! ```

pub mod environment;
pub mod judge;
pub mod packages;
pub mod rules;

pub use judge::{Failure, RuleName};
pub use packages::Package;
pub use rules::{AlterAction, Rule, RuleKind};

use crate::TrackerError;
use crate::classify::{Classifier, Original};
use crate::diff::{Live, Sides};
use crate::masks::Masks;
use environment::Spk044Environment;
use judge::{Build, Entry, Finding, View};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use store::{Action, FileType, FreshReason, NetKind, Origin, Query, Since, Store, Token};

/// What to validate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Only changes after this point (a mark set when the build started).
    pub since: Option<Since>,
    /// The build's own rules (a recipe's `build: validation: rules:`), applied after
    /// spk's defaults.
    pub rules: Vec<Rule>,
    /// Where the rules came from, for the report ("spk's defaults and probe.spk.yaml");
    /// empty: "spk's defaults".
    pub rules_from: String,
    /// More rules, applied last (a command line's `--allow`/`--deny`/`--require`).
    pub extra: Vec<Rule>,
    /// The package being built, `name/version[/build]` (spk's `SPK_PKG`); `None`:
    /// found from the metadata dir spk wrote.
    pub package: Option<String>,
    /// Globs (relative to the mount) no change may match.
    pub deny_paths: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    pub rule: RuleName,
    pub failure: Failure,
    pub action: Option<AlterAction>,
    /// Relative to the mount; empty when the rule is about the whole build.
    pub path: Vec<u8>,
    pub kind: Option<NetKind>,
    /// The spk package (`name/version/build`) that installed the original.
    pub package: Option<String>,
    /// The lower layer that holds the original.
    pub layer: Option<String>,
    /// The process that made the change.
    pub origin: Option<Origin>,
    /// The rest of spk's message ("which is owned by ...").
    pub detail: String,
    /// Why spk 0.44 would not report it; `None` when it would.
    pub spk_misses: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub token: Token,
    /// Set when `since` could not be honoured: every change was validated.
    pub fresh: Option<FreshReason>,
    /// How many changed paths were looked at.
    pub checked: usize,
    /// The package being built, when known (`name/version/build`).
    pub package: Option<String>,
    /// Where the rules after spk's defaults came from.
    pub rules_from: String,
    /// The rules as spk documents them, left failing.
    pub violations: Vec<Violation>,
    /// Failures spk 0.44 itself would report that the documented rules do not.
    pub spk_only: Vec<Violation>,
    /// Rules given that look at the recipe, not at files: spk checks those.
    pub not_evaluated: Vec<String>,
}

/// Evaluates spk's rules over what changed since `request.since`. `layer_names[i]`
/// names lower layer `i` of `layers` in reports. `masks` are the environment's (spfs
/// writes them at every mount): their whiteouts are no change of the build's, and what
/// they hide has no original to alter. Fails when a changed path cannot be compared
/// with the lower layers, or the build's rules cannot be read.
pub fn validate(
    store: &Store,
    layers: &Classifier,
    layer_names: &[String],
    masks: &Masks,
    request: &Request,
) -> Result<Report, TrackerError> {
    let given = match &request.package {
        Some(ident) => Some(Package::parse(ident).ok_or_else(|| {
            TrackerError::Validate(format!(
                "{ident:?} is not a package as spk names it (name/version[/build])"
            ))
        })?),
        None => None,
    };
    let package = packages::building(store, given.as_ref())?;
    let mut rules_from = if request.rules_from.is_empty() {
        "spk's defaults".to_string()
    } else {
        request.rules_from.clone()
    };
    if !request.extra.is_empty() {
        rules_from.push_str(" and the rules given with --allow/--deny/--require");
    }
    let not_evaluated = request
        .rules
        .iter()
        .chain(&request.extra)
        .filter_map(|r| match &r.matcher {
            rules::Matcher::Recipe(_) => Some(format!(
                "{} (spk checks it from the recipe and the solve)",
                r.matcher.name()
            )),
            _ => None,
        })
        .collect();
    let expanded = rules::expanded(&[&request.rules[..], &request.extra].concat());
    let layer_packages = packages::of_layers(layers, layer_names.len()).map_err(|e| {
        TrackerError::Validate(format!("cannot read which package each layer holds: {e}"))
    })?;
    let owner = |layer: Option<usize>| match layer.and_then(|i| layer_packages.get(i)) {
        Some(p) if p.len() == 1 => Some(p[0].clone()),
        _ => None,
    };
    let environment: Vec<Package> = layer_packages
        .iter()
        .flatten()
        .filter(|p| p.build != "src")
        .cloned()
        .collect();
    let package_layers: Vec<usize> = (0..layer_packages.len())
        .filter(|&i| !layer_packages[i].is_empty())
        .collect();
    let mut spk_environment = Spk044Environment::new(layers, &package_layers);
    let set = store.query(&Query {
        since: request.since.clone(),
        ..Query::default()
    })?;
    let sides = Live::new(layers, masks);
    let mut taken_along = HashSet::new();
    let mut entries = Vec::new();
    let mut about = Vec::new();
    for c in &set.changes {
        let Some(kind) = c.kind else { continue };
        if kind == NetKind::Removed && masks.contains(&c.path) {
            continue;
        }
        let original = inspect(layers, masks, &c.path)?;
        let was_dir = original.layer.is_some() && original.is_dir;
        let same = match kind {
            NetKind::Metadata => !original.mode_differs,
            // Below a dir removed and made again the overlay shows a new entry, where
            // spfs and spk compare with the lower one at the same path.
            NetKind::Added if original.layer.is_some() => sides
                .pair(&c.path)
                .map_err(at_path("cannot compare", &c.path, " with the lower layers"))?
                .same_in_spfs_model(),
            _ => false,
        };
        let documented = original.layer.map(|i| judge::Original {
            package: owner(Some(i)),
            is_dir: original.is_dir,
            same,
        });
        let spk044 = match (&documented, kind) {
            (Some(o), k) if k != NetKind::Removed => spk_environment
                .holder(&c.path)
                .map_err(at_path("cannot look up", &c.path, " in the layers"))?
                .map(|(layer, is_dir)| judge::Original {
                    package: owner(Some(layer)),
                    is_dir,
                    // Compared with another layer's entry than the overlay shows: taken
                    // as changed.
                    same: o.same && Some(layer) == original.layer,
                }),
            _ => None,
        };
        entries.push(Entry {
            path: c.path.clone(),
            upper: (kind != NetKind::Removed).then_some(judge::Upper {
                is_dir: c.file_type == FileType::Dir,
            }),
            original: documented,
            spk044,
        });
        about.push(About {
            kind,
            layer: original.layer,
            origin: c.origin.clone(),
        });
        // A removed or replaced dir took every original below it along, by the hand
        // of what removed it (a replaced dir's last writer is what made it again).
        if was_dir && matches!(kind, NetKind::Removed | NetKind::Replaced) {
            let remover = match kind {
                NetKind::Replaced => removal_origin(store, &c.path)?,
                _ => None,
            };
            for (path, layer, is_dir) in originals_below(layers, masks, &c.path)? {
                // A dir below, replaced too, lists what it took with it again.
                if !taken_along.insert(path.clone()) {
                    continue;
                }
                entries.push(Entry {
                    path,
                    upper: None,
                    original: Some(judge::Original {
                        package: owner(Some(layer)),
                        is_dir,
                        same: false,
                    }),
                    spk044: None,
                });
                about.push(About {
                    kind: NetKind::Removed,
                    layer: Some(layer),
                    origin: remover.clone().or_else(|| c.origin.clone()),
                });
            }
        }
    }
    let build = Build {
        entries: &entries,
        package: package.as_ref(),
        environment: &environment,
    };
    let documented = judge::judge(&build, &expanded, View::Documented);
    let spk = judge::judge(&build, &expanded, View::Spk044);
    let name = |i: Option<usize>| {
        i.map(|i| {
            layer_names
                .get(i)
                .cloned()
                .unwrap_or_else(|| format!("lower layer {i}"))
        })
    };
    let violation = |f: &Finding, spk_misses: Option<String>| {
        let at = f.entry.map(|i| (&entries[i], &about[i]));
        Violation {
            rule: f.rule,
            failure: f.failure,
            action: f.action,
            path: at.map(|(e, _)| e.path.clone()).unwrap_or_default(),
            kind: at.map(|(_, a)| a.kind),
            package: at.and_then(|(_, a)| owner(a.layer)).map(|p| p.to_string()),
            layer: at.and_then(|(_, a)| name(a.layer)),
            origin: at.and_then(|(_, a)| a.origin.clone()),
            detail: f.detail.clone(),
            spk_misses,
        }
    };
    let spk_set: HashSet<&Finding> = spk.iter().collect();
    let documented_set: HashSet<&Finding> = documented.iter().collect();
    let mut violations: Vec<Violation> = documented
        .iter()
        .map(|f| {
            let misses = (!spk_set.contains(f)).then(|| why_spk_misses(f, &build));
            violation(f, misses)
        })
        .collect();
    let spk_only = spk
        .iter()
        .filter(|f| !documented_set.contains(f))
        .map(|f| violation(f, None))
        .collect();
    violations.extend(deny_paths(&request.deny_paths, &entries, &about, name)?);
    violations.sort_by(|a, b| (a.rule, &a.path, a.action).cmp(&(b.rule, &b.path, b.action)));
    Ok(Report {
        token: set.token,
        fresh: set.fresh,
        checked: entries.len(),
        package: package.map(|p| p.to_string()),
        rules_from,
        violations,
        spk_only,
        not_evaluated,
    })
}

/// What a report says of each entry besides what the rules look at.
struct About {
    kind: NetKind,
    layer: Option<usize>,
    origin: Option<Origin>,
}

/// The lower original of `path`, path by path as spk compares (`original_by_path`);
/// none where the environment's masks hide it.
fn inspect(layers: &Classifier, masks: &Masks, path: &[u8]) -> Result<Original, TrackerError> {
    if masks.hides(path) {
        return Ok(Original {
            layer: None,
            mode_differs: false,
            is_dir: false,
        });
    }
    layers
        .original_by_path(path)
        .map_err(at_path("cannot compare", path, " with the lower layers"))
}

/// The error of a look at `path` in the layers: "`what` PATH`tail`: cause".
fn at_path<'p>(
    what: &'p str,
    path: &'p [u8],
    tail: &'p str,
) -> impl FnOnce(std::io::Error) -> TrackerError + 'p {
    move |e| {
        TrackerError::Validate(format!(
            "{what} {}{tail}: {e}",
            String::from_utf8_lossy(path)
        ))
    }
}

/// Who last removed or renamed away `path`, as its history records.
fn removal_origin(store: &Store, path: &[u8]) -> Result<Option<Origin>, TrackerError> {
    Ok(store
        .history(path)?
        .into_iter()
        .rev()
        .find(|r| matches!(r.action, Action::Deleted | Action::RenamedFrom))
        .and_then(|r| r.origin))
}

/// The originals below the removed or replaced dir `dir` that are gone: not hidden
/// by the environment, not there again in the upper dir (put back by a reset, or made
/// anew: its own change is recorded for it).
fn originals_below(
    layers: &Classifier,
    masks: &Masks,
    dir: &[u8],
) -> Result<Vec<(Vec<u8>, usize, bool)>, TrackerError> {
    let below =
        layers
            .lower_tree(dir)
            .map_err(at_path("cannot list the originals below", dir, ""))?;
    let mut out = Vec::new();
    for (path, layer, is_dir) in below {
        let there = layers.upper_inode(&path).map_err(at_path(
            "cannot look at",
            &path,
            " in the upper dir",
        ))?;
        if !masks.hides(&path) && there.is_none() {
            out.push((path, layer, is_dir));
        }
    }
    Ok(out)
}

/// Why spk 0.44 does not report a finding the documented rules do.
fn why_spk_misses(f: &Finding, build: &Build<'_>) -> String {
    let entry = f.entry.map(|i| &build.entries[i]);
    let original = entry.and_then(|e| e.original.as_ref());
    let why = match (f.rule, f.action) {
        (RuleName::EmptyPackage, _) => "it counts its own metadata files as installed",
        _ if original.is_some_and(|o| o.package.is_none()) => {
            "it knows only the files of the packages it solved, and this one is in a layer of none"
        }
        _ if let Some(e) = entry.filter(|e| e.upper.is_some() && e.spk044.is_none()) => {
            let dir: Vec<&[u8]> = e.path.splitn(3, |&b| b == b'/').take(2).collect();
            return format!(
                "spk 0.44 misses this: its picture of the build environment merges the \
                 packages' layers only one level below each top-level dir, and another \
                 package's {} hides this file",
                String::from_utf8_lossy(&dir.join(&b'/'))
            );
        }
        (_, Some(AlterAction::Remove)) => "it drops removals before it validates",
        (_, Some(AlterAction::Touch)) => {
            "it ignores files rewritten unchanged unless they belong to the package being built"
        }
        _ => "its view of the build does not fail this rule",
    };
    format!("spk 0.44 misses this: {why}")
}

/// `--deny-path` violations: changed paths (and originals a removed dir took along)
/// that match one of `globs`.
fn deny_paths(
    globs: &[String],
    entries: &[Entry],
    about: &[About],
    name: impl Fn(Option<usize>) -> Option<String>,
) -> Result<Vec<Violation>, TrackerError> {
    if globs.is_empty() {
        return Ok(Vec::new());
    }
    let set = glob_set(globs)?;
    // Matched on the path's bytes: globset takes them as they are on Unix.
    Ok(entries
        .iter()
        .zip(about)
        .filter(|(e, _)| set.is_match(Path::new(OsStr::from_bytes(&e.path))))
        .map(|(e, a)| Violation {
            rule: RuleName::DenyPath,
            failure: Failure::Denied,
            action: None,
            path: e.path.clone(),
            kind: Some(a.kind),
            package: None,
            layer: name(a.layer),
            origin: a.origin.clone(),
            detail: "may not change".into(),
            spk_misses: Some("not an spk rule".into()),
        })
        .collect())
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
mod cases;
