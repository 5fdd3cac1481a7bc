//! `spfs-changes validate` inside real `spk build`s (spk 0.44, installed by
//! `install-real-spfs.sh --modinfo-shim --with-spk`, as `.ci/run` does), compared with
//! spk's own verdict on the same build.
//!
//! A dependency, `scbase/1.0.0`, is built once per run. Each case is a recipe `scprobe`
//! that builds against it and whose build script does one thing to scbase's files
//! (modify, sed -i, chmod, remove, rm -rf of a dir, a dir removed and made again, an identical rewrite, ...), then
//! runs `spfs-changes validate --json` (without failing the build, so that spk's own
//! validation runs too). The tracker is attached before `spk build` starts: by hand
//! (`spfs-changes track` in a runtime where `spk build --no-runtime` then runs,
//! through spk's reset of the upper dir and its remount over the build environment),
//! or by the host daemon (to the runtime `spk build` makes itself).
//!
//! What each case checks:
//! - the violations we say spk 0.44 reports are exactly the ones spk printed, and spk
//!   failed the build exactly when there are such violations;
//! - the others are the rules as spk documents them where spk 0.44's are dead (a
//!   removal of a dependency's file, a touch of one, an empty build), as expected per
//!   case;
//! - each violation names the package that installed the original and its writer.
//!
//! A test binary of its own: the daemon attaches to every runtime on the host, and
//! every case builds the same package, so the tests here run one at a time.

mod common;
mod spfs_support;
#[path = "../../tests/support/mod.rs"]
mod support;

use common::text;
use spfs_support::{Daemon, need_spk, spfs};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// Every case builds `scprobe/1.0.0` with the same options: one at a time.
static ONE_BUILD: Mutex<()> = Mutex::new(());

/// A violation as both sides can name it: rule, action, path.
type Key = (String, Option<String>, String);

/// The dependency's recipe: files, an executable, a dir with two files.
const BASE_RECIPE: &str = r#"pkg: scbase/1.0.0
api: v0/package
sources: []
build:
  script:
    - mkdir -p /spfs/share/scbase/sub /spfs/bin
    - echo "base data" > /spfs/share/scbase/data.txt
    - echo "keep" > /spfs/share/scbase/keep.txt
    - printf '#!/bin/sh\necho tool\n' > /spfs/bin/scbase-tool
    - chmod 0755 /spfs/bin/scbase-tool
    - echo one > /spfs/share/scbase/sub/one.txt
    - echo two > /spfs/share/scbase/sub/two.txt
"#;

/// A case: what the build script does, the recipe's rules, whether it installs its
/// own file, and the violations of the documented rules that spk 0.44 misses.
struct Case {
    name: &'static str,
    script: &'static str,
    rules: &'static str,
    installs: bool,
    /// (rule, action, path) our report has and spk 0.44's does not.
    missed: &'static [(&'static str, Option<&'static str>, &'static str)],
    /// Builds against scother too.
    with_other: bool,
}

fn cases() -> Vec<Case> {
    let case = |name, script, rules, installs, missed| Case {
        name,
        script,
        rules,
        installs,
        missed,
        with_other: false,
    };
    vec![
        case("clean", "", "", true, &[]),
        case(
            "modify",
            "echo more >> /spfs/share/scbase/data.txt",
            "",
            true,
            &[],
        ),
        case(
            "sed-i",
            "sed -i 's/base/BASE/' /spfs/share/scbase/data.txt",
            "",
            true,
            &[],
        ),
        case(
            "chmod",
            "chmod 0600 /spfs/share/scbase/data.txt",
            "",
            true,
            &[],
        ),
        case(
            "remove",
            "rm /spfs/share/scbase/keep.txt",
            "",
            true,
            &[(
                "AlterExistingFiles",
                Some("Remove"),
                "/spfs/share/scbase/keep.txt",
            )],
        ),
        case(
            "rm-rf-dir",
            "rm -rf /spfs/share/scbase/sub",
            "",
            true,
            &[
                (
                    "AlterExistingFiles",
                    Some("Remove"),
                    "/spfs/share/scbase/sub/one.txt",
                ),
                (
                    "AlterExistingFiles",
                    Some("Remove"),
                    "/spfs/share/scbase/sub/two.txt",
                ),
            ],
        ),
        case(
            "dir-made-again",
            "rm -rf /spfs/share/scbase/sub\nmkdir /spfs/share/scbase/sub\necho changed > /spfs/share/scbase/sub/one.txt",
            "",
            true,
            &[(
                "AlterExistingFiles",
                Some("Remove"),
                "/spfs/share/scbase/sub/two.txt",
            )],
        ),
        case(
            "identical-rewrite",
            "t=$(mktemp); cp /spfs/share/scbase/data.txt $t; cp $t /spfs/share/scbase/data.txt; rm -f $t",
            "",
            true,
            &[],
        ),
        case(
            "touch-deny",
            "touch /spfs/share/scbase/keep.txt",
            "[{deny: AlterExistingFiles, action: Touch}]",
            true,
            &[(
                "AlterExistingFiles",
                Some("Touch"),
                "/spfs/share/scbase/keep.txt",
            )],
        ),
        case("empty", "", "", false, &[("EmptyPackage", None, "")]),
        case(
            "mkdir-only",
            "mkdir -p /spfs/share/scprobe-empty",
            "",
            false,
            &[],
        ),
        case(
            "source-dir",
            "echo src > ./made.txt; mkdir -p ./sub; echo s > ./sub/s.txt",
            "",
            true,
            &[],
        ),
        case(
            "allowed-by-recipe",
            "echo more >> /spfs/share/scbase/data.txt",
            "[{allow: AlterExistingFiles, packages: [scbase]}, {allow: CollectExistingFiles, packages: [scbase]}]",
            true,
            &[],
        ),
    ]
}

/// A dir for recipes and reports, reachable from inside runtimes (host /tmp).
fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("spfs-changes-spk.")
            .tempdir_in("/tmp")
            .expect("scratch dir")
    })
    .path()
}

/// `spk ARGS` in the environment [`spfs`] gives (this build's `spfs-changes` first on
/// PATH, no colour).
fn spk(args: &[&str]) -> Command {
    let mut c = Command::new("spk");
    c.args(args);
    spfs_support::test_env(&mut c);
    c
}

/// Builds scbase once; returns its ident (`scbase/1.0.0/<build>`).
fn base() -> &'static str {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| build_dependency("scbase", BASE_RECIPE))
}

/// A second dependency, with files of its own beside its metadata.
fn other() -> &'static str {
    static OTHER: OnceLock<String> = OnceLock::new();
    OTHER.get_or_init(|| {
        build_dependency(
            "scother",
            "pkg: scother/1.0.0\napi: v0/package\nsources: []\nbuild:\n  script:\n    - mkdir -p /spfs/share/scother\n    - echo other > /spfs/share/scother/o.txt\n",
        )
    })
}

/// Builds package `name` (version 1.0.0) from `recipe`; returns its ident.
fn build_dependency(name: &str, recipe: &str) -> String {
    let path = scratch().join(format!("{name}.spk.yaml"));
    std::fs::write(&path, recipe).expect("write the recipe");
    let out = spk(&["build", "-L", path.to_str().expect("utf-8 path")])
        .output()
        .expect("run spk build");
    let log = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "building {name} failed:\n{log}");
    let version = format!("{name}/1.0.0");
    let ls = spk(&["ls", "-L", &version]).output().expect("spk ls");
    let builds = text(&ls.stdout);
    let build = builds
        .split_whitespace()
        .find(|w| w.starts_with(&format!("{version}/")) && !w.ends_with("/src"))
        .map(str::to_string)
        .or_else(|| {
            // `spk ls` prints bare builds in some versions.
            builds
                .split_whitespace()
                .find(|w| w.len() == 8 && *w != "src")
                .map(|b| format!("{version}/{b}"))
        });
    build.unwrap_or_else(|| panic!("{name}'s build in `spk ls`: {builds}"))
}

/// The recipe of a case; its script ends by saving our report beside it.
fn probe_recipe(case: &Case, report: &Path) -> String {
    let mut script = String::new();
    for line in case.script.lines() {
        script.push_str(&format!("    {line}\n"));
    }
    if case.installs {
        script
            .push_str("    mkdir -p /spfs/share/scprobe\n    echo x > /spfs/share/scprobe/x.txt\n");
    }
    let report = report.display();
    script.push_str(&format!(
        "    rc=0; spfs-changes validate --json > {report}.json 2> {report}.err || rc=$?\n    echo $rc > {report}.rc\n"
    ));
    // As a validation from outside the build sees it (`--runtime`): no SPK_PKG.
    script.push_str(&format!(
        "    env -u SPK_PKG spfs-changes validate --json > {report}.outside.json 2>&1 || true\n"
    ));
    let rules = if case.rules.is_empty() {
        String::new()
    } else {
        format!("  validation:\n    rules: {}\n", case.rules)
    };
    let other = if case.with_other {
        "    - pkg: scother\n"
    } else {
        ""
    };
    format!(
        "pkg: scprobe/1.0.0\napi: v0/package\nsources: []\nbuild:\n  options:\n    - pkg: scbase\n{other}{rules}  script: |\n{script}"
    )
}

/// How `spk build` runs with a tracker attached before it.
#[derive(Clone, Copy, Debug)]
enum Attached {
    /// `spfs-changes track`, then `spk build --no-runtime`, in one runtime.
    ByHand,
    /// The host daemon, to the runtime `spk build` makes.
    ByDaemon,
}

/// One build: spk's exit code and the violations it printed, and our report.
struct Built {
    spk_failed: bool,
    spk_says: BTreeSet<Key>,
    log: String,
    ours: serde_json::Value,
    /// Our report without `SPK_PKG`, as from outside the build.
    outside: serde_json::Value,
    our_rc: i32,
}

fn build(case: &Case, attached: Attached, n: usize) -> Built {
    let stem = scratch().join(format!("{}-{attached:?}-{n}", case.name));
    let recipe = PathBuf::from(format!("{}.spk.yaml", stem.display()));
    std::fs::write(&recipe, probe_recipe(case, &stem)).expect("write the recipe");
    let recipe = recipe.to_str().expect("utf-8 path");
    let out = match attached {
        Attached::ByHand => spfs(&[
            "run",
            "-",
            "--",
            "sh",
            "-c",
            &format!("spfs-changes track >/dev/null && exec spk build -L --no-runtime {recipe}"),
        ])
        .output(),
        Attached::ByDaemon => spk(&["build", "-L", recipe]).output(),
    }
    .expect("run spk build");
    let log = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let read = |ext: &str| std::fs::read_to_string(format!("{}.{ext}", stem.display()));
    let our_rc: i32 = read("rc")
        .unwrap_or_else(|e| {
            panic!(
                "{}: the build script did not validate ({e}):\n{log}",
                case.name
            )
        })
        .trim()
        .parse()
        .expect("exit code");
    let ours = serde_json::from_str(&read("json").unwrap_or_default()).unwrap_or_else(|e| {
        panic!(
            "{}: validate printed no JSON ({e}); stderr: {:?}\n{log}",
            case.name,
            read("err")
        )
    });
    let outside =
        serde_json::from_str(&read("outside.json").unwrap_or_default()).unwrap_or_else(|e| {
            panic!(
                "{}: validate without SPK_PKG printed no JSON ({e}): {:?}",
                case.name,
                read("outside.json")
            )
        });
    Built {
        spk_failed: !out.status.success(),
        spk_says: spk_violations(&log),
        log,
        ours,
        outside,
        our_rc,
    }
}

/// The violations in spk's log: `⚠ Build must not alter files from other packages.`
/// then `changed /spfs/...`, and the like.
fn spk_violations(log: &str) -> BTreeSet<Key> {
    let mut out = BTreeSet::new();
    let mut rule = "";
    for line in log.lines() {
        let line = line.trim_start_matches([' ', '│', '⚠']);
        let line = line.trim();
        if line.starts_with("Build must not alter files") {
            rule = "AlterExistingFiles";
        } else if line.starts_with("Build must not collect files") {
            rule = "CollectExistingFiles";
        } else if line.starts_with("Builds must install at least one file") {
            out.insert(("EmptyPackage".into(), None, String::new()));
        } else if let Some((verb, path)) = line.split_once(" /spfs/") {
            let action = match (rule, verb) {
                ("AlterExistingFiles", "changed") => Some("Change"),
                ("AlterExistingFiles", "removed") => Some("Remove"),
                ("AlterExistingFiles", "touched") => Some("Touch"),
                ("CollectExistingFiles", "included") => None,
                _ => continue,
            };
            out.insert((
                rule.to_string(),
                action.map(str::to_string),
                format!("/spfs/{path}"),
            ));
        }
    }
    out
}

fn key(v: &serde_json::Value) -> Key {
    (
        v["rule"].as_str().unwrap_or("").to_string(),
        v["action"].as_str().map(str::to_string),
        v["path"].as_str().unwrap_or("").to_string(),
    )
}

/// Our report's violations, once the ones it says spk 0.44 reports are exactly those
/// spk printed, and spk failed the build exactly when it printed some.
fn agrees_with_spk(ctx: &str, built: &Built) -> Vec<serde_json::Value> {
    let doc = &built.ours;
    let violations = doc["violations"].as_array().cloned().unwrap_or_default();
    let reported: BTreeSet<Key> = violations
        .iter()
        .filter(|v| v["spk_0_44"] == "reported")
        .map(key)
        .collect();
    assert_eq!(
        reported, built.spk_says,
        "{ctx}: what we say spk 0.44 reports is what it printed\nours: {doc:#}\nspk:\n{}",
        built.log
    );
    assert_eq!(
        built.spk_failed,
        !built.spk_says.is_empty(),
        "{ctx}: spk failed the build exactly when it printed violations:\n{}",
        built.log
    );
    violations
}

/// Checks one build against spk's verdict and the case's expectations.
fn check(case: &Case, built: &Built, attached: Attached) {
    check_writers(case, built, attached, Writers::Named);
}

/// How much a check asks of the writers' names.
#[derive(PartialEq)]
enum Writers {
    /// The pid and the command line.
    Named,
    /// The pid; the command line may be missing (a writer gone before its exec was
    /// read: the repeated builds check the verdict, not this).
    Pid,
}

fn check_writers(case: &Case, built: &Built, attached: Attached, writers: Writers) {
    let ctx = format!("{} ({attached:?})", case.name);
    let doc = &built.ours;
    let violations = agrees_with_spk(&ctx, built);
    let missed: BTreeSet<Key> = violations
        .iter()
        .filter(|v| v["spk_0_44"] != "reported")
        .map(key)
        .collect();
    let want_missed: BTreeSet<Key> = case
        .missed
        .iter()
        .map(|(r, a, p)| (r.to_string(), a.map(str::to_string), p.to_string()))
        .collect();
    assert_eq!(missed, want_missed, "{ctx}: what spk 0.44 misses\n{doc:#}");
    // Found from the build's metadata instead of SPK_PKG: the same package, the same
    // recipe's rules, the same verdict.
    let outside = &built.outside;
    for field in ["package", "rules_from", "valid"] {
        assert_eq!(
            outside[field], doc[field],
            "{ctx}: without SPK_PKG, {field}\n{outside:#}"
        );
    }
    let keys = |d: &serde_json::Value| -> BTreeSet<Key> {
        d["violations"]
            .as_array()
            .into_iter()
            .flatten()
            .map(key)
            .collect()
    };
    assert_eq!(
        keys(outside),
        keys(doc),
        "{ctx}: without SPK_PKG\n{outside:#}"
    );
    assert_eq!(
        built.our_rc,
        if violations.is_empty() { 0 } else { 1 },
        "{ctx}: exit code\n{doc:#}"
    );
    assert_eq!(
        doc["package"]
            .as_str()
            .map(|p| p.starts_with("scprobe/1.0.0/")),
        Some(true),
        "{ctx}: {doc:#}"
    );
    for v in &violations {
        if v["path"].is_null() {
            continue;
        }
        assert_eq!(
            v["package"].as_str(),
            Some(base()),
            "{ctx}: the owner is named: {v}"
        );
        assert!(v["pid"].as_u64().is_some(), "{ctx}: the writer's pid: {v}");
        if writers == Writers::Named {
            assert!(
                v["command"].as_str().is_some_and(|c| !c.is_empty()),
                "{ctx}: the writer is named: {v}"
            );
        }
    }
}

/// Builds every case with the tracker attached as `attached` and checks each.
fn every_case_agrees(attached: Attached) {
    for case in cases() {
        let built = build(&case, attached, 0);
        check(&case, &built, attached);
    }
}

/// Every case, with the tracker attached by hand before `spk build --no-runtime`.
#[test]
fn validate_agrees_with_spk_on_every_case_tracked_by_hand() {
    if !need_spk() {
        return;
    }
    let _one = ONE_BUILD.lock().unwrap_or_else(|e| e.into_inner());
    base();
    every_case_agrees(Attached::ByHand);
}

/// Every case, in the runtime `spk build` makes itself, tracked by the host daemon
/// with nothing in the build script but `validate`.
#[test]
fn validate_agrees_with_spk_on_every_case_tracked_by_the_daemon() {
    if !need_spk() {
        return;
    }
    let _one = ONE_BUILD.lock().unwrap_or_else(|e| e.into_inner());
    base();
    let mut daemon = Daemon::start();
    every_case_agrees(Attached::ByDaemon);
    daemon.terminate();
}

/// The tracker attached before `spk build`, which resets the upper dir and mounts the
/// overlay again over the build environment: a build that alters its dependency never
/// passes, in 20 builds.
#[test]
fn no_false_pass_through_spks_remount() {
    if !need_spk() {
        return;
    }
    let _one = ONE_BUILD.lock().unwrap_or_else(|e| e.into_inner());
    base();
    let all = cases();
    let bad: Vec<&Case> = all
        .iter()
        .filter(|c| ["modify", "sed-i", "chmod", "remove"].contains(&c.name))
        .collect();
    for n in 0..20 {
        let case = bad[n % bad.len()];
        let built = build(case, Attached::ByHand, n + 1);
        assert_eq!(built.our_rc, 1, "{} #{n}: {:#}", case.name, built.ours);
        check_writers(case, &built, Attached::ByHand, Writers::Pid);
    }
}

/// Two dependencies: spk 0.44 pictures the build environment with only the top-most
/// package's `spk/pkg` (it merges layers one level below each top-level dir), so it
/// reports an edit of that package's metadata and not of the other's. Both are
/// violations as documented; ours says which one spk misses, and why.
#[test]
fn a_dependencys_metadata_edit_is_judged_as_spk_pictures_the_environment() {
    if !need_spk() {
        return;
    }
    let _one = ONE_BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let owners = [base(), other()];
    let case = Case {
        name: "metadata",
        script: "echo more >> /spfs/spk/pkg/$SPK_PKG_scbase/spec.yaml\necho more >> /spfs/spk/pkg/$SPK_PKG_scother/spec.yaml",
        rules: "",
        installs: true,
        missed: &[],
        with_other: true,
    };
    let built = build(&case, Attached::ByHand, 0);
    let doc = &built.ours;
    let violations = agrees_with_spk(case.name, &built);
    assert!(built.spk_failed, "spk fails the build:\n{}", built.log);
    let metadata = |owner: &str| format!("/spfs/spk/pkg/{owner}/spec.yaml");
    let mut documented = BTreeSet::new();
    for owner in owners {
        documented.insert((
            "AlterExistingFiles".into(),
            Some("Change".into()),
            metadata(owner),
        ));
        documented.insert(("CollectExistingFiles".into(), None, metadata(owner)));
    }
    assert_eq!(
        violations.iter().map(key).collect::<BTreeSet<Key>>(),
        documented,
        "both edits break the documented rules\n{doc:#}"
    );
    let missed: BTreeSet<String> = violations
        .iter()
        .filter(|v| v["spk_0_44"] != "reported")
        .map(|v| {
            assert!(
                v["spk_0_44"]
                    .as_str()
                    .is_some_and(|why| why.contains("one level below")),
                "the reason spk misses it: {v}"
            );
            v["path"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    assert_eq!(
        missed.len(),
        1,
        "spk 0.44 misses the edit of exactly one package's metadata\n{doc:#}"
    );
    for v in &violations {
        let owner = owners
            .iter()
            .find(|o| v["path"].as_str() == Some(metadata(o).as_str()))
            .expect("a metadata path");
        assert_eq!(
            v["package"].as_str(),
            Some(*owner),
            "the owner is named: {v}"
        );
    }
}

/// The example of the README (`examples/spk-build/`): its build script starts a
/// tracker (no daemon runs here) and validates itself; the same recipe with a touch
/// of its dependency's file fails the build, naming the package and the writer.
#[test]
fn the_example_build_validates_itself() {
    if !need_spk() {
        return;
    }
    let _one = ONE_BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/spk-build");
    let mut run = Command::new(example.join("build.sh"));
    spfs_support::test_env(&mut run);
    let out = run.output().expect("run examples/spk-build/build.sh");
    let log = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "the example builds:\n{log}");
    assert!(
        log.contains("valid: the build of hello/1.0.0/")
            && log.contains("(spk's defaults and the recipe of hello/1.0.0)"),
        "{log}"
    );

    let recipe = std::fs::read_to_string(example.join("hello.spk.yaml")).expect("the recipe");
    let touching = recipe.replace(
        "    - spfs-changes validate\n",
        "    - touch /spfs/share/hello-base/data.txt\n    - spfs-changes validate\n",
    );
    assert_ne!(touching, recipe, "the recipe ends with its validation");
    let path = scratch().join("hello.spk.yaml");
    std::fs::write(&path, touching).expect("write the touching recipe");
    let out = spk(&["build", "-L", path.to_str().expect("utf-8 path")])
        .output()
        .expect("run spk build");
    let log = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "the touch fails the build:\n{log}");
    let line = log
        .lines()
        .find(|l| l.starts_with("AlterExistingFiles (Touch): touched /spfs/share/hello-base/data.txt, which is owned by hello-base/1.0.0/"))
        .unwrap_or_else(|| panic!("the violation is reported:\n{log}"));
    assert!(
        line.ends_with("(touch /spfs/share/hello-base/data.txt)"),
        "the writer is named: {line}"
    );
}
