//! `spfs-changes validate` end to end, as root: every test starts a fresh tracked
//! runtime with `spfs-changes run` over two lower layers, runs a "build" (a script
//! file, `build.sh`, so its writes are recognisable) after `spfs-changes mark
//! build-start`, and checks what `validate` reports from inside the runtime: exit code,
//! `valid`, and for each violation its rule, action, path, kind, layer and writer.
//!
//! The layers (top-most first), each the render of one spk package (it holds the
//! package's metadata dir, `spk/pkg/<name>/<version>/<build>/`):
//! - `top` (`top/2.0.0/TOP00001`): `bin/tool`, `lib/shadowed`
//! - `base` (`base/1.0.0/BASE0001`): `lib/a.so`, `lib/same` ("same\n"), `lib/gone`,
//!   `lib/shadowed`, `etc/conf`
//!
//! spk's rule semantics themselves (expansion, precedence, what spk 0.44 misses) are
//! specified without root in tracker/src/validate/cases.txt; these tests check that a
//! tracked runtime feeds them the right changes, packages, layers and writers.
//!
//! The writer's command line is read by the tracker from `/proc` when it processes the
//! event, so a writer that has exited by then is reported by pid only. Like a real
//! build (which runs long after its first writes), `build.sh` therefore ends with a
//! sync point (`spfs-changes mark build-end`) before it exits; the short-lived tools it
//! runs (`rm`, `chmod`) are checked by pid, and by command only when one was recorded.

mod common;
#[path = "../../tests/support/mod.rs"]
mod support;

use common::{cmd, quote, s, text};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::need_root;

/// The spk packages whose renders the two layers are.
const BASE: &str = "base/1.0.0/BASE0001";
const TOP: &str = "top/2.0.0/TOP00001";

/// `validate` arguments as given.
fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|a| a.to_string()).collect()
}

/// `validate` arguments: `--since build-start --json`, then `extra`.
fn json_since(extra: &[&str]) -> Vec<String> {
    args(&[&["--since", "build-start", "--json"], extra].concat())
}

/// `validate` arguments of the report for people: `--since build-start`, then `extra`.
fn human_since(extra: &[&str]) -> Vec<String> {
    args(&[&["--since", "build-start"], extra].concat())
}

/// A violation as [`Outcome::summary`] lists it: rule, action, path.
type Row = (String, Option<String>, Option<String>);

fn row(rule: &str, action: Option<&str>, path: Option<&Path>) -> Row {
    (
        rule.to_string(),
        action.map(str::to_string),
        path.map(|p| s(p).to_string()),
    )
}

/// One `spfs-changes validate` answer.
#[derive(Debug)]
struct Outcome {
    args: Vec<String>,
    code: i32,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("validate {:?} printed no JSON ({e}): {self:?}", self.args))
    }

    /// Exit code `code`, and with `--json`, `valid` agreeing with it.
    fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "validate {:?} exit code; stdout:\n{}\nstderr:\n{}",
            self.args, self.stdout, self.stderr
        );
        assert!(!self.stderr.contains("panicked"), "{self:?}");
        if self.args.iter().any(|a| a == "--json") && code != 2 {
            assert_eq!(
                self.json()["valid"],
                Value::Bool(code == 0),
                "validate {:?}: {}",
                self.args,
                self.stdout
            );
        }
        self
    }

    fn clean(&self) -> &Self {
        self.expect_code(0);
        if self.args.iter().any(|a| a == "--json") {
            assert_eq!(self.violations().len(), 0, "{}", self.stdout);
        }
        self
    }

    fn violations(&self) -> Vec<Value> {
        self.json()["violations"]
            .as_array()
            .unwrap_or_else(|| panic!("no violations array: {}", self.stdout))
            .clone()
    }

    /// (rule, action, path) of every violation, in report order.
    fn summary(&self) -> Vec<Row> {
        self.violations()
            .iter()
            .map(|v| {
                (
                    v["rule"].as_str().expect("rule").to_string(),
                    v["action"].as_str().map(str::to_string),
                    v["path"].as_str().map(str::to_string),
                )
            })
            .collect()
    }

    /// The one violation of `rule` at `path`.
    fn violation(&self, rule: &str, path: &Path) -> Value {
        let found: Vec<Value> = self
            .violations()
            .into_iter()
            .filter(|v| v["rule"] == rule && v["path"] == s(path))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "one {rule} violation at {} expected: {}",
            path.display(),
            self.stdout
        );
        found.into_iter().next().expect("one")
    }

    /// A one-line error on stderr naming `needle`, nothing on stdout.
    fn one_line_error(&self, needle: &str) {
        self.expect_code(2);
        assert_eq!(self.stdout, "", "nothing on stdout: {self:?}");
        assert_eq!(
            self.stderr.lines().count(),
            1,
            "one line: {:?}",
            self.stderr
        );
        assert!(
            self.stderr.contains(needle),
            "error {:?} does not mention {needle:?}",
            self.stderr
        );
    }
}

/// A per-test dir holding the two lower layers, the mount point, the runtime dir and
/// the state dir of one `spfs-changes run`.
struct Runtime {
    tmp: tempfile::TempDir,
}

/// What a build did, beside what `validate` said about it.
struct Ran {
    /// `$$` of `build.sh`.
    build_pid: u64,
    validations: Vec<Outcome>,
    /// The changes `run` printed at the end (`spfs diff` style).
    listing: String,
}

impl Ran {
    fn pid_file(rt: &Runtime, name: &str) -> u64 {
        let s = std::fs::read_to_string(rt.path(name))
            .unwrap_or_else(|e| panic!("{name} was not written: {e}"));
        s.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name} holds {s:?}: {e}"))
    }
}

impl Runtime {
    fn new() -> Runtime {
        let tmp = tempfile::Builder::new()
            .prefix("spfs-changes-validate.")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let rt = Runtime { tmp };
        rt.write("base/lib/a.so", b"\x7fELF original a\n", 0o755);
        rt.write("base/lib/same", b"same\n", 0o644);
        rt.write("base/lib/gone", b"gone\n", 0o644);
        rt.write("base/lib/shadowed", b"base copy\n", 0o644);
        rt.write("base/etc/conf", b"conf=1\n", 0o644);
        rt.write("top/bin/tool", b"#!/bin/sh\necho tool\n", 0o755);
        rt.write("top/lib/shadowed", b"top copy\n", 0o644);
        rt.write(
            &format!("base/spk/pkg/{BASE}/spec.yaml"),
            b"pkg: base/1.0.0\n",
            0o644,
        );
        rt.write(
            &format!("top/spk/pkg/{TOP}/spec.yaml"),
            b"pkg: top/2.0.0\n",
            0o644,
        );
        rt
    }

    fn write(&self, rel: &str, content: &[u8], mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, content).expect("write lower file");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    fn mnt(&self) -> PathBuf {
        self.path("mnt")
    }

    /// `rel` as seen through the runtime's mount.
    fn m(&self, rel: &str) -> PathBuf {
        self.mnt().join(rel)
    }

    fn layer(&self, name: &str) -> String {
        s(&self.path(name)).to_string()
    }

    /// The [`Row`] of an `AlterExistingFiles` violation of `action` at `rel`.
    fn alter(&self, action: &str, rel: &str) -> Row {
        row("AlterExistingFiles", Some(action), Some(&self.m(rel)))
    }

    /// The [`Row`] of a `CollectExistingFiles` violation at `rel`.
    fn collect(&self, rel: &str) -> Row {
        row("CollectExistingFiles", None, Some(&self.m(rel)))
    }

    /// Writes a rules file `name` into the temp dir; returns its path.
    fn rules(&self, name: &str, yaml: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, yaml).expect("write rules");
        p
    }

    /// In a fresh runtime: `setup` (sh, `$M` is the mount, `$T` the temp dir), `mark
    /// build-start`, `build` as `$T/build.sh`, then `validate` once per entry of
    /// `validations` (each the arguments after `validate`).
    fn run(&self, setup: &str, build: &str, validations: &[Vec<String>]) -> Ran {
        std::fs::write(
            self.path("build.sh"),
            format!(
                "set -e\necho $$ > \"$T/build.pid\"\n{build}\n# Still running when the tracker reads who wrote what.\nspfs-changes mark build-end >/dev/null\n"
            ),
        )
        .expect("write build.sh");
        let mut script = format!(
            "set -u\nM={}\nT={}\nexport M T\ncd \"$T\"\n{setup}\nspfs-changes mark build-start >/dev/null || exit 90\nsh \"$T/build.sh\"; echo $? > \"$T/build.rc\"\n",
            quote(s(&self.mnt())),
            quote(s(self.tmp.path())),
        );
        for (i, args) in validations.iter().enumerate() {
            let args: Vec<String> = args.iter().map(|a| quote(a)).collect();
            script.push_str(&format!(
                "spfs-changes validate {} > \"$T/v{i}.out\" 2> \"$T/v{i}.err\"; echo $? > \"$T/v{i}.rc\"\n",
                args.join(" ")
            ));
        }
        let out: Output = cmd(&[
            "run",
            "--state",
            s(&self.path("state")),
            "--lower",
            s(&self.path("top")),
            "--lower",
            s(&self.path("base")),
            "--mount",
            s(&self.mnt()),
            "--runtime-dir",
            s(&self.path("rt")),
            "--",
            "sh",
            "-c",
            &script,
        ])
        .output()
        .expect("spawn spfs-changes run");
        assert!(
            out.status.success(),
            "run failed ({}): {}\nscript:\n{script}",
            out.status,
            text(&out.stderr)
        );
        let read = |name: String| {
            std::fs::read_to_string(self.path(&name))
                .unwrap_or_else(|e| panic!("{name} was not written: {e}"))
        };
        assert_eq!(
            read("build.rc".into()).trim(),
            "0",
            "build.sh failed; run said: {}",
            text(&out.stderr)
        );
        let validations = validations
            .iter()
            .enumerate()
            .map(|(i, args)| Outcome {
                args: args.clone(),
                code: read(format!("v{i}.rc")).trim().parse().expect("exit code"),
                stdout: read(format!("v{i}.out")),
                stderr: read(format!("v{i}.err")),
            })
            .collect();
        Ran {
            build_pid: Ran::pid_file(self, "build.pid"),
            validations,
            listing: text(&out.stdout),
        }
    }
}

/// Made by `build.sh` itself (a shell redirection): its pid, its command line.
fn assert_by_build(v: &Value, ran: &Ran) {
    assert_eq!(v["pid"].as_u64(), Some(ran.build_pid), "writer pid: {v}");
    let command = v["command"].as_str().unwrap_or("");
    assert!(
        command.contains("build.sh"),
        "writer command {command:?} should name build.sh: {v}"
    );
}

/// Made by a tool `build.sh` ran with pid `pid`: that pid, and a command naming the
/// tool when the tracker could still read it.
fn assert_by_tool(v: &Value, pid: u64, tool: &str) {
    assert_eq!(v["pid"].as_u64(), Some(pid), "writer pid: {v}");
    let command = v["command"].as_str().unwrap_or("");
    assert!(
        command.is_empty() || command.contains(tool) || command.contains("build.sh"),
        "writer command {command:?} should name {tool} or build.sh: {v}"
    );
}

/// A violation of `kind` against a file of `layer`, which is the render of `package`.
fn assert_kind_layer(v: &Value, kind: &str, layer: &str, package: &str) {
    assert_eq!(
        (
            v["kind"].as_str(),
            v["layer"].as_str(),
            v["package"].as_str()
        ),
        (Some(kind), Some(layer), Some(package)),
        "{v}"
    );
}

#[test]
fn empty_package_is_denied_unless_allowed() {
    if !need_root() {
        return;
    }
    // Nothing at all.
    let rt = Runtime::new();
    let ran = rt.run(
        "",
        ":",
        &[
            json_since(&[]),
            json_since(&["--allow", "EmptyPackage"]),
            human_since(&[]),
        ],
    );
    let empty = [row("EmptyPackage", None, None)];
    let denied = ran.validations[0].expect_code(1);
    assert_eq!(denied.summary(), empty);
    assert_eq!(denied.json()["checked"], 0);
    let v = &denied.violations()[0];
    assert!(v["layer"].is_null() && v["kind"].is_null(), "{v}");
    // No spk build here: spk 0.44 would see the same empty build.
    assert_eq!(v["spk_0_44"], "reported", "{v}");
    ran.validations[1].clean();
    let human = &ran.validations[2];
    human.expect_code(1);
    assert_eq!(
        human.stdout.lines().next(),
        Some("EmptyPackage: the build installed no files"),
        "{}",
        human.stdout
    );

    // A new dir is installed (spk packages it), and so is a file.
    for build in [
        "mkdir -p \"$M/share/doc/empty\"",
        "mkdir -p \"$M/share/doc/pkg\"; echo docs > \"$M/share/doc/pkg/README\"",
    ] {
        let rt = Runtime::new();
        let ran = rt.run("", build, &[json_since(&[]), human_since(&[])]);
        ran.validations[0].clean();
        assert!(
            ran.validations[1].stdout.starts_with("valid: "),
            "{:?}",
            ran.validations[1]
        );
    }
}

#[test]
fn altering_existing_files_is_reported_with_action_layer_and_writer() {
    if !need_root() {
        return;
    }
    let rt = Runtime::new();
    let ran = rt.run(
        "",
        r#"printf 'other bytes' > "$M/lib/a.so"
printf 'patched' > "$M/bin/tool"
printf 'patched' > "$M/lib/shadowed"
chmod 600 "$M/etc/conf" & echo $! > "$T/chmod.pid"; wait $!
rm "$M/lib/gone" & echo $! > "$T/rm.pid"; wait $!"#,
        &[
            json_since(&[]),
            human_since(&[]),
            json_since(&[
                "--allow",
                "AlterExistingFiles:Change",
                "--allow",
                "CollectExistingFiles",
                "--packages",
                "base,top",
            ]),
            // spk's bare allow has the empty locality: it overrides no deny.
            json_since(&["--allow", "AlterExistingFiles"]),
            json_since(&[
                "--allow",
                "AlterExistingFiles",
                "--allow",
                "CollectExistingFiles",
                "--packages",
                "base,top",
            ]),
        ],
    );
    let chmod_pid = Ran::pid_file(&rt, "chmod.pid");
    let rm_pid = Ran::pid_file(&rt, "rm.pid");
    let (base, top) = (rt.layer("base"), rt.layer("top"));

    let report = ran.validations[0].expect_code(1);
    assert_eq!(
        report.summary(),
        [
            rt.alter("Change", "bin/tool"),
            rt.alter("Change", "etc/conf"),
            rt.alter("Change", "lib/a.so"),
            rt.alter("Remove", "lib/gone"),
            rt.alter("Change", "lib/shadowed"),
            rt.collect("bin/tool"),
            rt.collect("etc/conf"),
            rt.collect("lib/a.so"),
            rt.collect("lib/shadowed"),
        ],
        "{}",
        report.stdout
    );
    assert_eq!(report.json()["checked"], 5, "{}", report.stdout);

    let a = report.violation("AlterExistingFiles", &rt.m("lib/a.so"));
    assert_kind_layer(&a, "modified", &base, BASE);
    assert_eq!(a["spk_0_44"], "reported", "{a}");
    assert_by_build(&a, &ran);
    // Only in the top layer: the top layer is named.
    let tool = report.violation("AlterExistingFiles", &rt.m("bin/tool"));
    assert_kind_layer(&tool, "modified", &top, TOP);
    assert_by_build(&tool, &ran);
    // In both: the copy overlayfs showed, the top one.
    let shadowed = report.violation("AlterExistingFiles", &rt.m("lib/shadowed"));
    assert_eq!(shadowed["layer"].as_str(), Some(top.as_str()), "{shadowed}");
    assert_eq!(shadowed["package"].as_str(), Some(TOP), "{shadowed}");
    assert_by_build(&shadowed, &ran);
    // A mode change is a Change too.
    let conf = report.violation("AlterExistingFiles", &rt.m("etc/conf"));
    assert_kind_layer(&conf, "metadata", &base, BASE);
    assert_by_tool(&conf, chmod_pid, "chmod");
    let gone = report.violation("AlterExistingFiles", &rt.m("lib/gone"));
    assert_kind_layer(&gone, "removed", &base, BASE);
    assert_by_tool(&gone, rm_pid, "rm");
    let missed = gone["spk_0_44"].as_str().unwrap_or("");
    assert!(missed.contains("drops removals"), "{gone}");

    // The same, for people.
    let human = ran.validations[1].expect_code(1);
    let lines: Vec<&str> = human.stdout.lines().collect();
    // 9 violations, the removal's note that spk 0.44 misses it, the summary.
    assert_eq!(lines.len(), 11, "{}", human.stdout);
    let a_line = format!(
        "AlterExistingFiles (Change): changed {}, which is owned by {BASE}, by pid {} (",
        rt.m("lib/a.so").display(),
        ran.build_pid
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&a_line) && l.contains("build.sh") && l.ends_with(')')),
        "no line like {a_line:?}: {lines:#?}"
    );
    let gone_line = format!(
        "AlterExistingFiles (Remove): removed {}, which is owned by {BASE}, by pid {rm_pid}",
        rt.m("lib/gone").display()
    );
    let at = lines.iter().position(|l| l.starts_with(&gone_line));
    assert!(at.is_some(), "no line like {gone_line:?}: {lines:#?}");
    assert!(
        at.and_then(|i| lines.get(i + 1))
            .is_some_and(|l| l.starts_with("  (spk 0.44 misses this: ")),
        "{lines:#?}"
    );
    assert!(
        lines[10].starts_with("invalid: the build breaks spk's rules (spk's defaults")
            && lines[10].contains(" 9 times (1 of them spk 0.44 would not report)"),
        "{lines:#?}"
    );

    // Allowing Change leaves the removal; a bare allow changes nothing; allowing
    // every action of the two packages leaves nothing.
    let removal_only = ran.validations[2].expect_code(1);
    assert_eq!(removal_only.summary(), [rt.alter("Remove", "lib/gone")]);
    assert_eq!(
        ran.validations[3].expect_code(1).summary(),
        report.summary()
    );
    ran.validations[4].clean();

    // A build that touches only new paths is clean.
    let rt = Runtime::new();
    let ran = rt.run(
        "",
        r#"echo new > "$M/lib/new.so"
mkdir -p "$M/share/pkg" && printf 'x' > "$M/share/pkg/data"
ln -s new.so "$M/lib/link.so""#,
        &[json_since(&[])],
    );
    let clean = ran.validations[0].clean();
    // lib/new.so, share, share/pkg, share/pkg/data, lib/link.so
    assert_eq!(clean.json()["checked"], 5, "{}", clean.stdout);
}

#[test]
fn collecting_existing_files_is_denied_and_names_the_package() {
    if !need_root() {
        return;
    }
    let rt = Runtime::new();
    let a = rt.m("lib/a.so");
    let allow_alter = ["--allow", "AlterExistingFiles", "--packages", "base"];
    let ran = rt.run(
        "",
        "echo new > \"$M/lib/new.so\"; echo more >> \"$M/lib/a.so\"",
        &[
            json_since(&allow_alter),
            json_since(&[&allow_alter[..], &["--allow", "CollectExistingFiles"]].concat()),
            json_since(&[
                "--allow",
                "AlterExistingFiles:Change",
                "--allow",
                "CollectExistingFiles",
                "--deny",
                "CollectExistingFiles",
                "--packages",
                "top",
            ]),
            human_since(&allow_alter),
        ],
    );
    let existing = ran.validations[0].expect_code(1);
    assert_eq!(existing.summary(), [rt.collect("lib/a.so")]);
    let v = existing.violation("CollectExistingFiles", &a);
    assert_kind_layer(&v, "modified", &rt.layer("base"), BASE);
    assert_by_build(&v, &ran);

    ran.validations[1].clean();
    // --packages applies to every rule of the command line: allowing top's files
    // allows every package's (spk's localities); a deny of top's files does not
    // touch base's.
    ran.validations[2].clean();

    let human = ran.validations[3].expect_code(1);
    let line = format!(
        "CollectExistingFiles: collected {}, which is owned by {BASE}, by pid {} (",
        a.display(),
        ran.build_pid
    );
    assert!(human.stdout.starts_with(&line), "{}", human.stdout);
}

#[test]
fn deny_path_globs_deny_changes_under_them() {
    if !need_root() {
        return;
    }
    let rt = Runtime::new();
    let ran = rt.run(
        "",
        "echo new > \"$M/etc/new\"; echo new > \"$M/lib/new.so\"",
        &[
            json_since(&["--deny-path", "etc/**"]),
            json_since(&["--deny-path", "share/**"]),
            human_since(&["--deny-path", "etc/**"]),
        ],
    );
    let denied = ran.validations[0].expect_code(1);
    let etc_new = rt.m("etc/new");
    assert_eq!(denied.summary(), [row("deny-path", None, Some(&etc_new))]);
    let v = denied.violation("deny-path", &etc_new);
    assert_eq!(v["kind"].as_str(), Some("added"), "{v}");
    assert!(v["layer"].is_null(), "{v}");
    assert_by_build(&v, &ran);
    ran.validations[1].clean();
    let human = ran.validations[2].expect_code(1);
    let line = format!(
        "deny-path: {} may not change, by pid {} (",
        etc_new.display(),
        ran.build_pid
    );
    assert!(
        human.stdout.trim().starts_with(&line) && human.stdout.contains("build.sh"),
        "{:?} does not start with {line:?}",
        human.stdout
    );
    assert!(
        human.stdout.lines().last().is_some_and(|l| l.starts_with(
            "invalid: the build passes spk's rules (spk's defaults) and changes 1 path --deny-path forbids; "
        )),
        "{}",
        human.stdout
    );

    // A build that leaves etc alone.
    let rt = Runtime::new();
    let ran = rt.run(
        "",
        "echo new > \"$M/lib/new.so\"; cat \"$M/etc/conf\" > /dev/null",
        &[json_since(&["--deny-path", "etc/**"])],
    );
    ran.validations[0].clean();
}

#[test]
fn rules_files_are_honoured_and_bad_rules_cannot_validate() {
    if !need_root() {
        return;
    }
    let rt = Runtime::new();
    let allow_remove = rt.rules(
        "allow-remove.yaml",
        "rules:\n  - allow: AlterExistingFiles\n    packages: [base]\n    action: Remove\n",
    );
    // A bare list, spk's other spelling.
    let allow_all = rt.rules(
        "allow-all.yaml",
        "- allow: AlterExistingFiles\n  packages: [base]\n- allow: EmptyPackage\n",
    );
    let bad_name = rt.rules("bad-name.yaml", "rules:\n  - allow: NoSuchRule\n");
    let bad_action = rt.rules(
        "bad-action.yaml",
        "rules:\n  - deny: AlterExistingFiles\n    action: Melt\n",
    );
    let not_rules = rt.rules("not-rules.yaml", "rules:\n  - permit: EmptyPackage\n");

    let with_rules = |p: &Path| json_since(&["--rules", s(p)]);
    let ran = rt.run(
        "",
        "rm \"$M/lib/gone\"; echo new > \"$M/lib/new.so\"",
        &[
            json_since(&[]),
            with_rules(&allow_remove),
            with_rules(&allow_all),
            // --deny comes after the file.
            json_since(&[
                "--rules",
                s(&allow_remove),
                "--deny",
                "AlterExistingFiles:Remove",
                "--packages",
                "base",
            ]),
            with_rules(&bad_name),
            with_rules(&bad_action),
            with_rules(&not_rules),
            with_rules(&rt.path("missing.yaml")),
            json_since(&["--deny", "NoSuchRule"]),
            // Packages of no rule: a mistake, not "every package".
            json_since(&["--packages", "base"]),
        ],
    );
    let gone = rt.alter("Remove", "lib/gone");
    assert_eq!(
        ran.validations[0].expect_code(1).summary(),
        std::slice::from_ref(&gone)
    );
    ran.validations[1].clean();
    ran.validations[2].clean();
    assert_eq!(ran.validations[3].expect_code(1).summary(), [gone]);
    ran.validations[4].one_line_error("NoSuchRule");
    ran.validations[5].one_line_error("Melt");
    ran.validations[6].one_line_error("not-rules.yaml");
    ran.validations[7].one_line_error("missing.yaml");
    ran.validations[8].one_line_error("NoSuchRule");
    ran.validations[9].one_line_error("--packages");
}

#[test]
fn since_build_start_ignores_what_came_before() {
    if !need_root() {
        return;
    }
    let rt = Runtime::new();
    let ran = rt.run(
        // Breaks the default rules, before the mark.
        "printf 'setup bytes' > \"$M/lib/a.so\"; rm \"$M/lib/gone\"",
        "echo new > \"$M/lib/new.so\"",
        &[json_since(&[]), args(&["--json"]), human_since(&[])],
    );
    let since = ran.validations[0].clean();
    assert_eq!(since.json()["checked"], 1, "{}", since.stdout);
    assert!(since.json()["fresh"].is_null(), "{}", since.stdout);
    let human = ran.validations[2].clean();
    assert!(
        human
            .stdout
            .starts_with("valid: the build passes spk's rules")
            && human.stdout.ends_with("; 1 changed path checked\n"),
        "{}",
        human.stdout
    );

    let all = ran.validations[1].expect_code(1);
    assert_eq!(
        all.summary(),
        [
            rt.alter("Change", "lib/a.so"),
            rt.alter("Remove", "lib/gone"),
            rt.collect("lib/a.so"),
        ],
        "{}",
        all.stdout
    );
    assert_eq!(all.json()["checked"], 3, "{}", all.stdout);
    // Made by the setup shell, not the build.
    let a = all.violation("AlterExistingFiles", &rt.m("lib/a.so"));
    assert!(a["pid"].as_u64().is_some_and(|p| p != ran.build_pid), "{a}");
    assert!(
        ran.listing
            .contains(&format!("-{}", rt.m("lib/gone").display())),
        "{}",
        ran.listing
    );
}

#[test]
fn identical_bytes_are_a_touch_other_bytes_a_change() {
    if !need_root() {
        return;
    }
    // A fresh runtime, and the validations of each build: by default, denying
    // Touch on the command line, denying it in a rules file, and for people.
    let runtime = || {
        let rt = Runtime::new();
        let rules = rt.rules(
            "deny-touch.yaml",
            "- deny: AlterExistingFiles\n  action: Touch\n",
        );
        let validations = [
            json_since(&[]),
            json_since(&["--deny", "AlterExistingFiles:Touch"]),
            json_since(&["--rules", s(&rules)]),
            human_since(&["--deny", "AlterExistingFiles:Touch"]),
        ];
        (rt, validations)
    };
    // The same bytes, four ways: a shell rewrite, a copy back, touch(1), and a change
    // undone. Each
    // build also installs a file, so it is no EmptyPackage.
    for (how, build) in [
        ("echo", "echo same > \"$M/lib/same\""),
        (
            "copy back",
            "cp \"$M/lib/same\" \"$T/x\"; cat \"$T/x\" > \"$M/lib/same\"",
        ),
        ("touch", "touch \"$M/lib/same\""),
        (
            "changed and changed back",
            "echo other > \"$M/lib/same\"; echo same > \"$M/lib/same\"",
        ),
    ] {
        let (rt, validations) = runtime();
        let ran = rt.run(
            "",
            &format!("{build}\necho new > \"$M/lib/new.so\""),
            &validations,
        );
        let same = rt.m("lib/same");
        ran.validations[0].clean();
        for denied in &ran.validations[1..3] {
            denied.expect_code(1);
            assert_eq!(
                denied.summary(),
                [rt.alter("Touch", "lib/same")],
                "{how}: {}",
                denied.stdout
            );
            let t = denied.violation("AlterExistingFiles", &same);
            assert_eq!(t["kind"].as_str(), Some("metadata"), "{how}: {t}");
            assert_kind_layer(&t, "metadata", &rt.layer("base"), BASE);
            let missed = t["spk_0_44"].as_str().unwrap_or("");
            assert!(missed.contains("rewritten unchanged"), "{how}: {t}");
            assert!(t["pid"].as_u64().is_some(), "{how}: {t}");
            if how == "echo" {
                assert_by_build(&t, &ran);
            }
        }
        let human = ran.validations[3].expect_code(1);
        assert!(
            human.stdout.starts_with(&format!(
                "AlterExistingFiles (Touch): touched {}, which is owned by {BASE}, by pid ",
                same.display(),
            )),
            "{how}: {}",
            human.stdout
        );
    }

    // Other bytes: a Change, denied by default.
    let (rt, validations) = runtime();
    let ran = rt.run("", "echo different > \"$M/lib/same\"", &validations);
    let same = rt.m("lib/same");
    for report in &ran.validations[..3] {
        report.expect_code(1);
        assert_eq!(
            report.summary(),
            [rt.alter("Change", "lib/same"), rt.collect("lib/same")],
            "{}",
            report.stdout
        );
        let c = report.violation("AlterExistingFiles", &same);
        assert_eq!(c["kind"].as_str(), Some("modified"), "{c}");
        assert_by_build(&c, &ran);
    }
}

#[test]
fn what_cannot_be_validated_exits_2() {
    if !need_root() {
        return;
    }
    let rt = Runtime::new();
    let ran = rt.run(
        "",
        "echo new > \"$M/lib/new.so\"",
        &[
            args(&["--since", "nosuchmark", "--json"]),
            args(&["--since", "nosuchmark"]),
            args(&["--since", "build-start", "--deny-path", "etc/[", "--json"]),
        ],
    );
    ran.validations[0].one_line_error("nosuchmark");
    ran.validations[1].one_line_error("nosuchmark");
    ran.validations[2].one_line_error("etc/[");

    // Outside any run: no tracker to compare with the lower layers.
    let outcome = |a: &[&str], c: &mut Command| {
        let out = c.output().expect("spawn spfs-changes");
        Outcome {
            args: args(a),
            code: out.status.code().unwrap_or(-1),
            stdout: text(&out.stdout),
            stderr: text(&out.stderr),
        }
    };
    let empty = rt.path("empty-state");
    std::fs::create_dir(&empty).expect("mkdir");
    for args in [
        vec!["validate", "--state", s(&empty), "--json"],
        vec!["validate", "--state", s(&empty), "--since", "build-start"],
        // The changelog the run kept: its tracker has stopped.
        vec!["validate", "--state", s(&rt.path("state")), "--json"],
        vec!["validate", "--state", s(&rt.path("no-such-state"))],
    ] {
        outcome(&args, &mut cmd(&args)).one_line_error("validate");
    }
    // A socket nothing listens on.
    let args = ["validate", "--json"];
    outcome(
        &args,
        cmd(&args).env("SPFS_CHANGES_SOCKET", rt.path("state/control.sock")),
    )
    .one_line_error("validate");
}

/// Overlayfs makes every whiteout a hard link of one shared whiteout inode. An event
/// on that inode that names no dir entry (the link count changing when `mkdir` over
/// a whiteout moves the old whiteout out) must not be pinned on another of its links
/// (here the whiteout of `lib/gone`, removed before the mark) and blamed on the build.
#[test]
fn a_removal_before_the_mark_is_not_blamed_on_the_build() {
    if !need_root() {
        return;
    }
    let rt = Runtime::new();
    let ran = rt.run(
        "rm \"$M/lib/gone\"; rm \"$M/lib/same\"",
        "mkdir \"$M/lib/same\"; echo x > \"$M/lib/same/f\"",
        &[json_since(&[])],
    );
    // The dir made over the removed file is the build's Change; the removal of
    // lib/gone, before the mark, is nothing of the build's.
    let report = ran.validations[0].expect_code(1);
    assert_eq!(
        report.summary(),
        [rt.alter("Change", "lib/same"), rt.collect("lib/same")],
        "{}",
        report.stdout
    );
}

/// A lower dir removed and made again: the overlay shows new files in it (the dir is
/// opaque now), where spfs and spk compare path by path. A file written differently
/// is a Change of the original, one written as it was a Touch, one not made again a
/// Remove, by what removed the dir (not by what made it again).
#[test]
fn a_dir_removed_and_made_again_is_compared_path_by_path() {
    if !need_root() {
        return;
    }
    let rt = Runtime::new();
    let ran = rt.run(
        "",
        r#"rm -r "$M/lib" & echo $! > "$T/rm.pid"; wait $!
mkdir "$M/lib"
printf 'other bytes' > "$M/lib/a.so"
echo same > "$M/lib/same""#,
        &[
            json_since(&[]),
            json_since(&["--deny", "AlterExistingFiles:Touch"]),
        ],
    );
    let rm_pid = Ran::pid_file(&rt, "rm.pid");
    let report = ran.validations[0].expect_code(1);
    assert_eq!(
        report.summary(),
        [
            rt.alter("Change", "lib/a.so"),
            rt.alter("Remove", "lib/gone"),
            rt.alter("Remove", "lib/shadowed"),
            rt.collect("lib/a.so"),
        ],
        "{}",
        report.stdout
    );
    for removed in ["lib/gone", "lib/shadowed"] {
        let v = report.violation("AlterExistingFiles", &rt.m(removed));
        assert_by_tool(&v, rm_pid, "rm");
    }
    let changed = report.violation("AlterExistingFiles", &rt.m("lib/a.so"));
    assert_eq!(changed["spk_0_44"], "reported", "{changed}");
    assert_by_build(&changed, &ran);
    let touched = ran.validations[1].expect_code(1);
    assert!(
        touched.summary().contains(&rt.alter("Touch", "lib/same")),
        "{}",
        touched.stdout
    );
}

/// Removing a whole lower dir is recorded as the removal of the dir alone; deny-path
/// globs must still see every original it took along (`etc/**`, `etc/conf`).
#[test]
fn removing_a_denied_tree_is_denied() {
    if !need_root() {
        return;
    }
    let rt = Runtime::new();
    let ran = rt.run(
        "",
        "rm -r \"$M/etc\"; echo new > \"$M/lib/new.so\"",
        &["etc/**", "etc/conf"].map(|glob| {
            json_since(&[
                "--allow",
                "AlterExistingFiles",
                "--packages",
                "base",
                "--deny-path",
                glob,
            ])
        }),
    );
    for denied in &ran.validations {
        denied.expect_code(1);
        assert!(
            denied
                .summary()
                .iter()
                .all(|(rule, _, _)| rule == "deny-path"),
            "{}",
            denied.stdout
        );
    }
}

/// What spk does around a build script, done by hand: it writes the package's
/// metadata (`spk/pkg/unpublished-probe/1.0.0/PROBE001/`) into /spfs before the script runs, and
/// the source dir `spk/pkg/unpublished-probe/1.0.0/src` is the build's sandbox. `validate` finds
/// the build, applies the recipe's rules after spk's defaults, and ignores the
/// sandbox. (The recipe spk publishes is read in cli/tests/spk_real.rs.)
#[test]
fn an_spk_build_is_judged_by_its_recipe_and_its_sandbox_ignored() {
    if !need_root() {
        return;
    }
    let meta = "spk/pkg/unpublished-probe/1.0.0/PROBE001";
    let setup = format!(
        "mkdir -p \"$M/{meta}\" \"$M/spk/pkg/unpublished-probe/1.0.0/src\"\n\
         echo 'pkg: unpublished-probe/1.0.0/PROBE001' > \"$M/{meta}/spec.yaml\"\n\
         echo 'make install' > \"$M/{meta}/build.sh\"\n"
    );
    let rt = Runtime::new();
    let recipe = rt.rules(
        "probe.spk.yaml",
        "pkg: unpublished-probe/1.0.0\nbuild:\n  script: [make install]\n  validation:\n    rules:\n    - deny: AlterExistingFiles\n      action: Touch\n",
    );
    let obsolete = rt.rules(
        "obsolete.spk.yaml",
        "pkg: unpublished-probe/1.0.0\nbuild:\n  validation:\n    disabled: [MustInstallSomething]\n",
    );
    let ran = rt.run(
        &setup,
        r#"echo same > "$M/lib/same"
echo obj > "$M/spk/pkg/unpublished-probe/1.0.0/src/out.o"
echo new > "$M/lib/probe.so""#,
        &[
            json_since(&["--rules", s(&recipe)]),
            json_since(&[]),
            // Another build: probe's sandbox is no sandbox of its, and no recipe of
            // it was published.
            json_since(&["--package", "other/2.0.0", "--allow", "EmptyPackage"]),
            human_since(&["--rules", s(&recipe)]),
            json_since(&["--rules", s(&obsolete)]),
        ],
    );
    let report = ran.validations[0].expect_code(1);
    assert_eq!(
        report.summary(),
        [rt.alter("Touch", "lib/same")],
        "{}",
        report.stdout
    );
    let doc = report.json();
    assert_eq!(doc["package"], "unpublished-probe/1.0.0/PROBE001", "{doc}");
    let from = doc["rules_from"].as_str().unwrap_or("");
    assert!(from.ends_with(s(&recipe)), "{doc}");
    let t = report.violation("AlterExistingFiles", &rt.m("lib/same"));
    assert_kind_layer(&t, "metadata", &rt.layer("base"), BASE);
    assert_by_build(&t, &ran);
    // Found from its metadata, with no recipe published: spk's defaults, said so.
    let found = ran.validations[1].clean();
    let doc = found.json();
    assert_eq!(doc["package"], "unpublished-probe/1.0.0/PROBE001", "{doc}");
    assert!(
        doc["rules_from"]
            .as_str()
            .is_some_and(|f| f.contains("no recipe of unpublished-probe/1.0.0 was found")),
        "{doc}"
    );
    let other = ran.validations[2].clean();
    let doc = other.json();
    assert_eq!(doc["package"], "other/2.0.0", "{doc}");
    assert!(
        doc["rules_from"]
            .as_str()
            .is_some_and(|f| f.contains("no recipe of other/2.0.0 was found")),
        "{doc}"
    );
    let human = ran.validations[3].expect_code(1);
    assert!(
        human.stdout.lines().last().is_some_and(|l| l.starts_with(
            "invalid: the build of unpublished-probe/1.0.0/PROBE001 breaks spk's rules (spk's defaults and "
        )),
        "{}",
        human.stdout
    );
    // A recipe spk itself would refuse cannot be validated.
    ran.validations[4].one_line_error("obsolete validators");
}
