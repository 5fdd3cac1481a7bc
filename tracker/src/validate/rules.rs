//! spk's validation rules as spk 0.44 reads and expands them
//! (crates/spk-schema/src/validation.rs in spk): the rule kinds, the YAML a recipe's
//! `build: validation: rules:` holds, the defaults every build starts from, and the
//! implicit rules a bare one stands for.

use crate::TrackerError;
use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;

/// Whether a rule allows, denies or requires its condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RuleKind {
    Allow,
    Deny,
    Require,
}

/// How an existing file was altered, as spk names it (`FileAlteration`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AlterAction {
    /// Type, mode or content differ from the original.
    Change,
    /// Deleted.
    Remove,
    /// In the upper dir with the original's type, mode and content (rewritten as it
    /// was, or only its owner, times or xattrs changed).
    Touch,
}

impl AlterAction {
    /// spk's spelling, as in `action: Touch`.
    pub fn name(self) -> &'static str {
        match self {
            AlterAction::Change => "Change",
            AlterAction::Remove => "Remove",
            AlterAction::Touch => "Touch",
        }
    }

    /// The verb of spk's message ("changed /spfs/...").
    pub fn verb(self) -> &'static str {
        match self {
            AlterAction::Change => "changed",
            AlterAction::Remove => "removed",
            AlterAction::Touch => "touched",
        }
    }
}

/// A package a rule names: by name, or the package being built (YAML `~`, spk's
/// `NameOrCurrent::Current`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PackageName {
    Current,
    Name(String),
}

/// What a rule looks for (spk's `ValidationMatcher`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Matcher {
    EmptyPackage,
    /// Every installed file collected by a component. spk 0.44's parser never makes
    /// this one (it reads `CollectAllFiles` as `EmptyPackage`, and so does `parse`).
    CollectAllFiles,
    AlterExistingFiles {
        packages: Vec<PackageName>,
        /// `None` stands for Change and Remove (see `expand`).
        action: Option<AlterAction>,
    },
    CollectExistingFiles {
        packages: Vec<PackageName>,
    },
    RecursiveBuild,
    /// Rules spk checks from the recipe and the solve, not from files: kept so a
    /// recipe's rules parse, reported as not evaluated.
    Recipe(RecipeRule),
}

/// Rules about the recipe rather than the files a build wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RecipeRule {
    SpdxLicense,
    StrongInheritanceVarDescription,
    LongVarDescription,
    InheritRequirements,
}

impl Matcher {
    /// spk's name of the condition (`ValidationMatcherDiscriminants`).
    pub fn name(&self) -> &'static str {
        match self {
            Matcher::EmptyPackage => "EmptyPackage",
            Matcher::CollectAllFiles => "CollectAllFiles",
            Matcher::AlterExistingFiles { .. } => "AlterExistingFiles",
            Matcher::CollectExistingFiles { .. } => "CollectExistingFiles",
            Matcher::RecursiveBuild => "RecursiveBuild",
            Matcher::Recipe(RecipeRule::SpdxLicense) => "SpdxLicense",
            Matcher::Recipe(RecipeRule::StrongInheritanceVarDescription) => {
                "StrongInheritanceVarDescription"
            }
            Matcher::Recipe(RecipeRule::LongVarDescription) => "LongVarDescription",
            Matcher::Recipe(RecipeRule::InheritRequirements) => "InheritRequirements",
        }
    }
}

/// One rule: `allow|deny|require: <Matcher>` with its fields.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rule {
    pub kind: RuleKind,
    pub matcher: Matcher,
}

impl Rule {
    pub fn new(kind: RuleKind, matcher: Matcher) -> Rule {
        Rule { kind, matcher }
    }

    /// A rule spelled on a command line: `Name` or `AlterExistingFiles:ACTION`, with
    /// `packages` for the rules that take them (empty: every package).
    pub fn from_arg(kind: RuleKind, arg: &str, packages: &[String]) -> Result<Rule, TrackerError> {
        let (name, action) = match arg.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (arg, None),
        };
        let packages: Vec<PackageName> = packages
            .iter()
            .map(|p| match p.as_str() {
                "~" => Ok(PackageName::Current),
                name => package_name(name).map_err(invalid),
            })
            .collect::<Result<_, _>>()?;
        let mut matcher = matcher_named(name)?;
        match &mut matcher {
            Matcher::AlterExistingFiles {
                packages: p,
                action: a,
            } => {
                *p = packages;
                *a = action.map(action_named).transpose()?;
            }
            Matcher::CollectExistingFiles { packages: p } if action.is_none() => *p = packages,
            _ if action.is_some() => {
                return Err(invalid(format!(
                    "{name} takes no action (only AlterExistingFiles:Change|Remove|Touch does)"
                )));
            }
            _ => {}
        }
        Ok(Rule { kind, matcher })
    }

    /// The rules this one stands for, in spk's order (`with_implicit_additions`): a
    /// bare AlterExistingFiles is Change and Remove (not Touch); RecursiveBuild adds
    /// AlterExistingFiles Remove, Change and Touch and CollectExistingFiles of the
    /// package being built, before itself.
    pub fn expand(self) -> Vec<Rule> {
        let kind = self.kind;
        let alter = |action| Rule {
            kind,
            matcher: Matcher::AlterExistingFiles {
                packages: vec![PackageName::Current],
                action: Some(action),
            },
        };
        match self.matcher {
            Matcher::RecursiveBuild => vec![
                alter(AlterAction::Remove),
                alter(AlterAction::Change),
                alter(AlterAction::Touch),
                Rule {
                    kind,
                    matcher: Matcher::CollectExistingFiles {
                        packages: vec![PackageName::Current],
                    },
                },
                self,
            ],
            Matcher::AlterExistingFiles {
                packages,
                action: None,
            } => [AlterAction::Change, AlterAction::Remove]
                .into_iter()
                .map(|action| Rule {
                    kind,
                    matcher: Matcher::AlterExistingFiles {
                        packages: packages.clone(),
                        action: Some(action),
                    },
                })
                .collect(),
            _ => vec![self],
        }
    }
}

/// spk's default rules, which every build starts from (`ValidationSpec::default_rules`):
/// a recipe's rules come after them and can override, never remove, them.
pub fn defaults() -> Vec<Rule> {
    use Matcher::*;
    use RuleKind::*;
    vec![
        Rule::new(Allow, Recipe(RecipeRule::SpdxLicense)),
        Rule::new(Deny, EmptyPackage),
        Rule::new(Deny, RecursiveBuild),
        Rule::new(Require, Recipe(RecipeRule::StrongInheritanceVarDescription)),
        Rule::new(
            Deny,
            AlterExistingFiles {
                packages: Vec::new(),
                action: None,
            },
        ),
        Rule::new(
            Deny,
            CollectExistingFiles {
                packages: Vec::new(),
            },
        ),
        Rule::new(Deny, Recipe(RecipeRule::LongVarDescription)),
        Rule::new(Require, Recipe(RecipeRule::InheritRequirements)),
    ]
}

/// The rules evaluated, in order: the defaults then `rules`, each expanded
/// (`ValidationSpec::to_expanded_rules`).
pub fn expanded(rules: &[Rule]) -> Vec<Rule> {
    defaults()
        .into_iter()
        .chain(rules.iter().cloned())
        .flat_map(Rule::expand)
        .collect()
}

/// Reads the rules of a YAML document: an spk recipe or package spec (its
/// `build: validation: rules:`), a map with `rules:`, or the list itself. Each rule
/// is a map whose first key is `allow`, `deny` or `require` with a condition name;
/// AlterExistingFiles takes `packages:` and `action:`, CollectExistingFiles and
/// InheritRequirements take `packages:` (`~` names the package being built).
/// A recipe's `validation: disabled:` is refused, as spk 0.44 refuses it. Errors name
/// the rule at fault.
pub fn parse(yaml: &str) -> Result<Vec<Rule>, TrackerError> {
    let doc: Value = serde_yaml_ng::from_str(yaml)
        .map_err(|e| invalid(format!("not YAML spk can read: {e}")))?;
    let list = match &doc {
        Value::Sequence(list) => list.clone(),
        Value::Mapping(map) => {
            let validation = map
                .get("build")
                .and_then(|b| b.get("validation"))
                .or_else(|| map.get("validation"));
            let holder = validation.unwrap_or(&doc);
            if holder
                .get("disabled")
                .and_then(Value::as_sequence)
                .is_some_and(|d| !d.is_empty())
            {
                return Err(invalid(
                    "use of obsolete validators via 'build.validation.disabled' (spk 0.44 fails such a build; write rules instead)".into(),
                ));
            }
            match holder.get("rules") {
                Some(Value::Sequence(list)) => list.clone(),
                Some(Value::Null) | None if validation.is_some() || map.contains_key("build") => {
                    Vec::new()
                }
                Some(_) => return Err(invalid("`rules:` must be a list".into())),
                None => {
                    return Err(invalid(
                        "no rules: expected an spk recipe (build: validation: rules:), a map with `rules:`, or a list of rules".into(),
                    ));
                }
            }
        }
        Value::Null => Vec::new(),
        _ => return Err(invalid("expected a list of rules".into())),
    };
    list.iter()
        .enumerate()
        .map(|(i, v)| parse_rule(v).map_err(|e| invalid(format!("rule {}: {e}", i + 1))))
        .collect()
}

fn parse_rule(v: &Value) -> Result<Rule, String> {
    let Value::Mapping(map) = v else {
        return Err("expected a map such as `deny: AlterExistingFiles`".into());
    };
    let mut entries = map.iter();
    let Some((Value::String(first), condition)) = entries.next() else {
        return Err("expected `allow`, `deny` or `require` as its first key".into());
    };
    let kind = match first.as_str() {
        "allow" => RuleKind::Allow,
        "deny" => RuleKind::Deny,
        "require" => RuleKind::Require,
        other => {
            return Err(format!(
                "unknown rule kind {other:?} (allow, deny or require)"
            ));
        }
    };
    let Value::String(name) = condition else {
        return Err(format!("{first}: expected a condition name"));
    };
    let mut matcher = matcher_named(name).map_err(|e| e.to_string())?;
    for (key, value) in entries {
        let key = key.as_str().unwrap_or("?");
        match (&mut matcher, key) {
            (Matcher::AlterExistingFiles { packages, .. }, "packages")
            | (Matcher::CollectExistingFiles { packages }, "packages") => {
                *packages = parse_packages(value)?;
            }
            (Matcher::Recipe(RecipeRule::InheritRequirements), "packages") => {
                parse_packages(value)?;
            }
            (Matcher::AlterExistingFiles { action, .. }, "action") => {
                let name = value
                    .as_str()
                    .ok_or("action: expected Change, Remove or Touch")?;
                *action = Some(action_named(name).map_err(|e| e.to_string())?);
            }
            (m, key) => return Err(format!("{} takes no field {key:?}", m.name())),
        }
    }
    Ok(Rule { kind, matcher })
}

fn parse_packages(v: &Value) -> Result<Vec<PackageName>, String> {
    let list = match v {
        Value::Sequence(list) => list,
        Value::Null => return Ok(Vec::new()),
        _ => return Err("packages: expected a list of package names".into()),
    };
    list.iter()
        .map(|p| match p {
            // YAML's null (`~`), as spk's untagged `NameOrCurrent::Current` reads it.
            Value::Null => Ok(PackageName::Current),
            Value::String(s) => package_name(s),
            _ => Err("packages: expected package names (or ~ for this package)".to_string()),
        })
        .collect()
}

/// A package name as spk accepts one (`validate_pkg_name` in spk-schema's
/// foundation/src/name: 2 to 64 characters of `a-z`, `0-9` and `-`, not starting
/// with `-`).
fn package_name(s: &str) -> Result<PackageName, String> {
    let valid = (2..=64).contains(&s.len())
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if valid {
        Ok(PackageName::Name(s.to_string()))
    } else {
        Err(format!(
            "{s:?} is not a package name (2 to 64 of a-z, 0-9 and -, not starting with -)"
        ))
    }
}

fn matcher_named(name: &str) -> Result<Matcher, TrackerError> {
    Ok(match name {
        // spk 0.44 reads CollectAllFiles as EmptyPackage (validation.rs); followed here
        // so that a recipe means what spk makes of it.
        "EmptyPackage" | "CollectAllFiles" => Matcher::EmptyPackage,
        "AlterExistingFiles" => Matcher::AlterExistingFiles {
            packages: Vec::new(),
            action: None,
        },
        "CollectExistingFiles" => Matcher::CollectExistingFiles {
            packages: Vec::new(),
        },
        "RecursiveBuild" => Matcher::RecursiveBuild,
        "SpdxLicense" => Matcher::Recipe(RecipeRule::SpdxLicense),
        "StrongInheritanceVarDescription" => {
            Matcher::Recipe(RecipeRule::StrongInheritanceVarDescription)
        }
        "LongVarDescription" => Matcher::Recipe(RecipeRule::LongVarDescription),
        "InheritRequirements" => Matcher::Recipe(RecipeRule::InheritRequirements),
        other => {
            return Err(invalid(format!(
                "unknown rule {other:?} (EmptyPackage, AlterExistingFiles, CollectExistingFiles, RecursiveBuild, CollectAllFiles, SpdxLicense, StrongInheritanceVarDescription, LongVarDescription, InheritRequirements)"
            )));
        }
    })
}

fn action_named(name: &str) -> Result<AlterAction, TrackerError> {
    match name {
        "Change" => Ok(AlterAction::Change),
        "Remove" => Ok(AlterAction::Remove),
        "Touch" => Ok(AlterAction::Touch),
        other => Err(invalid(format!(
            "unknown AlterExistingFiles action {other:?} (Change, Remove or Touch)"
        ))),
    }
}

fn invalid(why: String) -> TrackerError {
    TrackerError::Validate(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alter(packages: &[PackageName], action: AlterAction) -> Matcher {
        Matcher::AlterExistingFiles {
            packages: packages.to_vec(),
            action: Some(action),
        }
    }

    #[test]
    fn bare_alter_existing_files_is_change_and_remove_not_touch() {
        let rule = Rule::from_arg(RuleKind::Deny, "AlterExistingFiles", &[]).expect("known");
        let got: Vec<Matcher> = rule.expand().into_iter().map(|r| r.matcher).collect();
        assert_eq!(
            got,
            vec![
                alter(&[], AlterAction::Change),
                alter(&[], AlterAction::Remove)
            ]
        );
    }

    #[test]
    fn recursive_build_stands_for_the_own_package_files_then_itself() {
        let rule = Rule::new(RuleKind::Allow, Matcher::RecursiveBuild);
        let got: Vec<Matcher> = rule.expand().into_iter().map(|r| r.matcher).collect();
        let current = [PackageName::Current];
        assert_eq!(
            got,
            vec![
                alter(&current, AlterAction::Remove),
                alter(&current, AlterAction::Change),
                alter(&current, AlterAction::Touch),
                Matcher::CollectExistingFiles {
                    packages: current.to_vec()
                },
                Matcher::RecursiveBuild,
            ]
        );
    }

    #[test]
    fn defaults_come_first_and_expand_too() {
        let user = [Rule::new(RuleKind::Allow, Matcher::EmptyPackage)];
        let all = expanded(&user);
        // 8 defaults; RecursiveBuild is 5 rules, bare AlterExistingFiles is 2.
        assert_eq!(all.len(), 8 + 4 + 1 + 1);
        assert_eq!(all.last(), Some(&user[0]));
        assert_eq!(all[0].matcher, Matcher::Recipe(RecipeRule::SpdxLicense));
    }

    /// Each row: a YAML document and the rules read from it, or the start of the error.
    #[test]
    fn rule_documents() {
        let rows: &[(&str, Result<Vec<Rule>, &str>)] = &[
            (
                "- deny: EmptyPackage",
                Ok(vec![Rule::new(RuleKind::Deny, Matcher::EmptyPackage)]),
            ),
            (
                "rules:\n- allow: AlterExistingFiles\n  packages: [base, ~]\n  action: Touch",
                Ok(vec![Rule::new(
                    RuleKind::Allow,
                    alter(
                        &[PackageName::Name("base".into()), PackageName::Current],
                        AlterAction::Touch,
                    ),
                )]),
            ),
            (
                "pkg: probe/1.0.0\nbuild:\n  script: [true]\n  validation:\n    rules:\n    - require: CollectExistingFiles\n      packages: [base]",
                Ok(vec![Rule::new(
                    RuleKind::Require,
                    Matcher::CollectExistingFiles {
                        packages: vec![PackageName::Name("base".into())],
                    },
                )]),
            ),
            ("pkg: probe/1.0.0\nbuild:\n  script: [true]", Ok(vec![])),
            // spk 0.44 reads CollectAllFiles as EmptyPackage.
            (
                "- deny: CollectAllFiles",
                Ok(vec![Rule::new(RuleKind::Deny, Matcher::EmptyPackage)]),
            ),
            (
                "- require: InheritRequirements\n  packages: [base]",
                Ok(vec![Rule::new(
                    RuleKind::Require,
                    Matcher::Recipe(RecipeRule::InheritRequirements),
                )]),
            ),
            (
                "- forbid: EmptyPackage",
                Err("validate: rule 1: unknown rule kind"),
            ),
            (
                "- deny: NoSuchRule",
                Err("validate: rule 1: validate: unknown rule"),
            ),
            (
                "- deny: EmptyPackage\n  packages: [x]",
                Err("validate: rule 1: EmptyPackage takes no field"),
            ),
            (
                "- deny: AlterExistingFiles\n  action: Melt",
                Err("validate: rule 1: validate: unknown AlterExistingFiles action"),
            ),
            // spk reads only YAML's null as the package being built; a quoted "~" is
            // a name, and not a valid one.
            (
                "- deny: CollectExistingFiles\n  packages: [\"~\"]",
                Err("validate: rule 1: \"~\" is not a package name"),
            ),
            (
                "- deny: CollectExistingFiles\n  packages: [/root]",
                Err("validate: rule 1: \"/root\" is not a package name"),
            ),
            (
                "- deny: CollectExistingFiles\n  packages: [-x, Base]",
                Err("validate: rule 1: \"-x\" is not a package name"),
            ),
            (
                "- action: Touch\n  deny: AlterExistingFiles",
                Err("validate: rule 1: unknown rule kind"),
            ),
            (
                "build:\n  validation:\n    disabled: [MustInstallSomething]",
                Err("validate: use of obsolete validators"),
            ),
            ("rules: 3", Err("validate: `rules:` must be a list")),
            ("a: b", Err("validate: no rules")),
            ("[", Err("validate: not YAML")),
        ];
        for (yaml, want) in rows {
            let got = parse(yaml).map_err(|e| e.to_string());
            match (want, &got) {
                (Ok(w), Ok(g)) => assert_eq!(g, w, "{yaml}"),
                (Err(w), Err(g)) => assert!(g.starts_with(w), "{yaml}: {g}"),
                _ => panic!("{yaml}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn command_line_rules() {
        let base = ["base".to_string()];
        let r = Rule::from_arg(RuleKind::Deny, "AlterExistingFiles:Touch", &base).expect("known");
        assert_eq!(
            r.matcher,
            alter(&[PackageName::Name("base".into())], AlterAction::Touch)
        );
        assert!(Rule::from_arg(RuleKind::Deny, "EmptyPackage:Touch", &[]).is_err());
        assert!(Rule::from_arg(RuleKind::Deny, "AlterExistingFiles:Melt", &[]).is_err());
        assert!(Rule::from_arg(RuleKind::Deny, "NoSuchRule", &[]).is_err());
        // `~` on a command line is the package being built; other names are spk's.
        let current = ["~".to_string()];
        let r = Rule::from_arg(RuleKind::Allow, "CollectExistingFiles", &current).expect("~");
        assert_eq!(
            r.matcher,
            Matcher::CollectExistingFiles {
                packages: vec![PackageName::Current]
            }
        );
        let bad = ["/root".to_string()];
        assert!(Rule::from_arg(RuleKind::Allow, "CollectExistingFiles", &bad).is_err());
    }
}
