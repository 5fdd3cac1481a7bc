//! `spfs-changes validate`: spk's build validation rules over the changelog.

use crate::TargetArgs;
use crate::output::{escape, full_path};
use crate::target::{self, Target};
use anyhow::{Context, bail};
use clap::Args;
use serde::Deserialize;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tracker::control::{Request, Response};
use tracker::validate::{AlterAction, Report, RuleName, Rules, Violation};

#[derive(Args)]
pub struct ValidateArgs {
    /// Only changes after this mark or token (e.g. build-start).
    #[arg(long)]
    since: Option<String>,
    /// An spk-style rules file (YAML: `rules: [{allow: EmptyPackage}, {deny:
    /// AlterExistingFiles, action: Touch}]`), applied before --allow/--deny.
    #[arg(long)]
    rules: Option<PathBuf>,
    /// Allow a rule: EmptyPackage, AlterExistingFiles[:Change|:Remove|:Touch],
    /// CollectExistingFiles.
    #[arg(long = "allow")]
    allow: Vec<String>,
    /// Deny a rule (same names as --allow).
    #[arg(long = "deny")]
    deny: Vec<String>,
    /// Deny any change to a path matching this glob (relative to the mount).
    #[arg(long = "deny-path")]
    deny_paths: Vec<String>,
    /// A path the build will collect into its package (for CollectExistingFiles).
    #[arg(long = "collect")]
    collect: Vec<PathBuf>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    target: TargetArgs,
}

/// Exit codes spk can rely on.
const CLEAN: u8 = 0;
const VIOLATIONS: u8 = 1;
const CANNOT_VALIDATE: u8 = 2;

pub fn validate(args: ValidateArgs) -> ExitCode {
    match run(&args) {
        Ok((report, mount)) => {
            let printed = if args.json {
                print_json(&report, &mount)
            } else {
                print_human(&report, &mount)
            };
            if let Err(e) = printed {
                eprintln!("spfs-changes: error: cannot print the report: {e}");
                return ExitCode::from(CANNOT_VALIDATE);
            }
            ExitCode::from(if report.violations.is_empty() {
                CLEAN
            } else {
                VIOLATIONS
            })
        }
        Err(e) => {
            eprintln!(
                "spfs-changes: error: could not validate: {}",
                crate::one_line(&e)
            );
            ExitCode::from(CANNOT_VALIDATE)
        }
    }
}

fn run(args: &ValidateArgs) -> anyhow::Result<(Report, PathBuf)> {
    let Target::Live { mut client, mount } = target::open(&args.target, true)? else {
        bail!(
            "no tracker runs for this runtime: validation compares changes with the runtime's lower layers"
        );
    };
    let mut rules = Rules::default();
    if let Some(file) = &args.rules {
        apply_rules_file(&mut rules, file)?;
    }
    for r in &args.allow {
        rules.set(r, false)?;
    }
    for r in &args.deny {
        rules.set(r, true)?;
    }
    let relative = |p: &Path| target::relative_to(&mount, p);
    // Globs may be written relative to the mount or under it (`/spfs/etc/**`).
    rules.deny_paths = args
        .deny_paths
        .iter()
        .map(|g| String::from_utf8_lossy(&relative(Path::new(g))).into_owned())
        .collect();
    rules.collect = args.collect.iter().map(|p| relative(p)).collect();
    let since = args.since.as_deref().map(store::parse_since);
    match client.call(&Request::Validate(since, rules))? {
        Response::Validation(report) => Ok((*report, mount)),
        other => bail!("unexpected answer from tracker: {other:?}"),
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RulesFile {
    Wrapped { rules: Vec<RuleLine> },
    List(Vec<RuleLine>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleLine {
    allow: Option<String>,
    deny: Option<String>,
    action: Option<String>,
}

fn apply_rules_file(rules: &mut Rules, file: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("rules file {}", file.display()))?;
    let parsed: RulesFile = serde_yaml_ng::from_str(&text)
        .with_context(|| format!("rules file {} is not spk validation rules", file.display()))?;
    let lines = match parsed {
        RulesFile::Wrapped { rules } | RulesFile::List(rules) => rules,
    };
    for line in lines {
        let (name, deny) = match (line.allow, line.deny) {
            (Some(n), None) => (n, false),
            (None, Some(n)) => (n, true),
            _ => bail!(
                "rules file {}: each rule needs exactly one of allow or deny",
                file.display()
            ),
        };
        let rule = match line.action {
            Some(action) => format!("{name}:{action}"),
            None => name,
        };
        rules.set(&rule, deny)?;
    }
    Ok(())
}

fn action_name(a: AlterAction) -> &'static str {
    match a {
        AlterAction::Change => "Change",
        AlterAction::Remove => "Remove",
        AlterAction::Touch => "Touch",
    }
}

fn who(v: &Violation) -> String {
    match &v.origin {
        Some(o) if o.command.is_empty() => format!("by pid {}", o.pid),
        Some(o) => format!("by pid {} ({})", o.pid, escape(&o.command)),
        None => "by an unknown process".into(),
    }
}

fn print_human(report: &Report, mount: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Some(reason) = &report.fresh {
        writeln!(
            out,
            "note: {}; every change was validated",
            crate::output::fresh_reason(reason)
        )?;
    }
    for v in &report.violations {
        let path = escape(&full_path(mount, &v.path));
        let layer = v
            .layer
            .as_deref()
            .map(|l| format!(" from layer {l}"))
            .unwrap_or_default();
        let line = match (v.rule, v.action) {
            (RuleName::EmptyPackage, _) => "EmptyPackage: the build installed no files".to_string(),
            (RuleName::AlterExistingFiles, Some(AlterAction::Remove)) => {
                format!(
                    "AlterExistingFiles (Remove): existing file was removed: {path}{layer}, {}",
                    who(v)
                )
            }
            (RuleName::AlterExistingFiles, Some(AlterAction::Touch)) => {
                format!(
                    "AlterExistingFiles (Touch): existing file was touched: {path}{layer}, {}",
                    who(v)
                )
            }
            (RuleName::AlterExistingFiles, _) => {
                format!(
                    "AlterExistingFiles (Change): existing file was modified: {path}{layer}, {}",
                    who(v)
                )
            }
            (RuleName::CollectExistingFiles, _) => {
                format!("CollectExistingFiles: collected path already existed: {path}{layer}")
            }
            (RuleName::DenyPath, _) => format!("deny-path: {path} may not change, {}", who(v)),
        };
        writeln!(out, "{line}")?;
    }
    if report.violations.is_empty() {
        writeln!(out, "valid: {} changed paths checked", report.checked)?;
    }
    out.flush()
}

fn print_json(report: &Report, mount: &Path) -> std::io::Result<()> {
    let violations: Vec<_> = report
        .violations
        .iter()
        .map(|v| {
            let path = full_path(mount, &v.path);
            let mut j = json!({
                "rule": format!("{:?}", v.rule),
                "action": v.action.map(action_name),
                "path": if v.path.is_empty() { None } else { Some(String::from_utf8_lossy(&path).into_owned()) },
                "kind": v.kind.map(store::NetKind::name),
                "layer": v.layer,
                "pid": v.origin.as_ref().map(|o| o.pid),
                "command": v.origin.as_ref().map(|o| String::from_utf8_lossy(&o.command).into_owned()),
            });
            if std::str::from_utf8(&path).is_err() {
                j["path_bytes"] = json!(path);
            }
            j
        })
        .collect();
    let doc = json!({
        "valid": report.violations.is_empty(),
        "token": report.token.to_string(),
        "fresh": report.fresh.as_ref().map(crate::output::fresh_reason),
        "checked": report.checked,
        "violations": violations,
    });
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &doc)?;
    use std::io::Write;
    writeln!(out)
}
