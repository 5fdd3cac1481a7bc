//! spk's rules specified as a table (`cases.txt`): per case, the build, its changed
//! paths, its rules, and what is left failing in each view. Runs without root.

use super::judge::{self, Build, Entry, Failure, Original, Upper, View};
use super::packages::Package;
use super::rules::{self, AlterAction};

const SPEC: &str = include_str!("cases.txt");

#[derive(Default)]
struct Case<'a> {
    name: &'a str,
    package: Option<Package>,
    env: Vec<Package>,
    metadata: bool,
    entries: Vec<Entry>,
    rules: String,
    documented: Vec<&'a str>,
    spk: Vec<&'a str>,
}

fn package(ident: &str) -> Package {
    Package::parse(ident).unwrap_or_else(|| panic!("bad ident {ident}"))
}

fn entry(line: &str) -> Entry {
    let f: Vec<&str> = line.split_whitespace().collect();
    let (path, upper, lower, owner, spk) = match f[..] {
        [path, upper, lower, owner] => (path, upper, lower, owner, None),
        [path, upper, lower, owner, spk] => (path, upper, lower, owner, spk.strip_prefix("spk:")),
        _ => panic!("entry: PATH UPPER LOWER OWNER [spk:OWNER], got {line}"),
    };
    let upper = match upper {
        "file" => Some(Upper { is_dir: false }),
        "dir" => Some(Upper { is_dir: true }),
        "-" => None,
        other => panic!("upper {other}"),
    };
    let (is_dir, same) = match lower {
        "-" => (false, false),
        "file" => (false, false),
        "dir" => (true, false),
        "same-file" => (false, true),
        "same-dir" => (true, true),
        other => panic!("lower {other}"),
    };
    let original = (lower != "-").then(|| Original {
        package: (owner != "none").then(|| package(owner)),
        is_dir,
        same,
    });
    // spk 0.44 pictures a package's original as it is, unless the case says its
    // merge lost it (`spk:-`) or took another package's; removals it does not look at.
    let spk044 = match spk {
        Some("-") => None,
        Some(other) => original.clone().map(|o| Original {
            package: Some(package(other)),
            same: false,
            ..o
        }),
        None => original.clone().filter(|o| o.package.is_some()),
    };
    Entry {
        path: path.as_bytes().to_vec(),
        upper,
        spk044: if upper.is_some() { spk044 } else { None },
        original,
    }
}

fn cases() -> Vec<Case<'static>> {
    let mut out: Vec<Case> = Vec::new();
    let mut section = "";
    for line in SPEC.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix("case: ") {
            out.push(Case {
                name,
                metadata: true,
                ..Case::default()
            });
            section = "";
            continue;
        }
        let case = out.last_mut().expect("a line after a `case:` line");
        match line {
            "rules:" | "documented:" | "spk 0.44:" => {
                section = line;
                continue;
            }
            "no metadata" => {
                case.metadata = false;
                continue;
            }
            _ => {}
        }
        if let Some(ident) = line.strip_prefix("package: ") {
            case.package = Some(package(ident));
        } else if let Some(idents) = line.strip_prefix("env: ") {
            case.env = idents.split_whitespace().map(package).collect();
        } else if let Some(e) = line.strip_prefix("entry: ") {
            case.entries.push(entry(e));
        } else {
            match section {
                "rules:" => {
                    case.rules.push_str(line);
                    case.rules.push('\n');
                }
                "documented:" => case.documented.push(line),
                "spk 0.44:" => case.spk.push(line),
                _ => panic!("{}: unexpected line {line:?}", case.name),
            }
        }
    }
    out
}

/// A finding as a result line: RULE FAILURE ACTION PATH.
fn line(f: &judge::Finding, entries: &[Entry]) -> String {
    let rule = f.rule.name();
    let failure = match f.failure {
        Failure::Denied => "Denied",
        Failure::Required => "Required",
    };
    let action = f.action.map_or("-", AlterAction::name);
    let path = f.entry.map_or("-".to_string(), |i| {
        String::from_utf8_lossy(&entries[i].path).into_owned()
    });
    format!("{rule} {failure} {action} {path}")
}

#[test]
fn spk_rules_over_build_changes() {
    let all = cases();
    assert!(all.len() >= 20, "the table was read");
    let mut wrong = Vec::new();
    for case in all {
        let mut entries = case.entries.clone();
        if case.metadata
            && let Some(p) = &case.package
        {
            // What spk writes before the build script runs.
            let meta = String::from_utf8_lossy(&p.metadata_dir()).into_owned();
            let spk_own = [
                ("spk/pkg/probe".to_string(), true),
                (meta.clone(), true),
                (format!("{meta}/spec.yaml"), false),
                (format!("{meta}/build.sh"), false),
                (format!("{meta}/run.cmpt"), false),
            ];
            for (path, is_dir) in spk_own {
                entries.push(Entry {
                    path: path.into_bytes(),
                    upper: Some(Upper { is_dir }),
                    original: None,
                    spk044: None,
                });
            }
        }
        let own = rules::parse(&case.rules).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let expanded = rules::expanded(&own);
        let build = Build {
            entries: &entries,
            package: case.package.as_ref(),
            environment: &case.env,
        };
        for (view, want) in [
            (View::Documented, &case.documented),
            (View::Spk044, &case.spk),
        ] {
            let mut got_sorted: Vec<String> = judge::judge(&build, &expanded, view)
                .iter()
                .map(|f| line(f, &entries))
                .collect();
            got_sorted.sort();
            let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
            want.sort();
            if got_sorted != want {
                wrong.push(format!(
                    "case {:?}, {view:?}:\n  got  {got_sorted:?}\n  want {want:?}",
                    case.name
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
