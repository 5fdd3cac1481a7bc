//! `spfs-changes validate`: spk's build validation rules over the changelog.

use crate::TargetArgs;
use crate::output::{escape, full_path};
use crate::target::{self, Target};
use anyhow::{Context, bail};
use clap::Args;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tracker::control::{Request, Response};
use tracker::validate::{AlterAction, Failure, Report, Rule, RuleKind, RuleName, Violation};

#[derive(Args)]
pub struct ValidateArgs {
    /// Only changes after this mark or token (e.g. build-start).
    #[arg(long)]
    since: Option<String>,
    /// The build's rules, in spk's YAML: an spk recipe (its `build: validation:
    /// rules:`), a map with `rules:`, or a list such as `[{deny: AlterExistingFiles,
    /// action: Touch}]`. Default: the rules of the recipe `spk build` published for
    /// the package being built (`spfs read spk/spec/NAME/VERSION`). spk's default
    /// rules always come first.
    #[arg(long, value_name = "FILE")]
    rules: Option<PathBuf>,
    /// Allow a rule, after the build's rules: EmptyPackage, RecursiveBuild,
    /// AlterExistingFiles[:Change|:Remove|:Touch], CollectExistingFiles.
    #[arg(long = "allow", value_name = "RULE")]
    allow: Vec<String>,
    /// Deny a rule (same names as --allow), after the --allow rules.
    #[arg(long = "deny", value_name = "RULE")]
    deny: Vec<String>,
    /// Require a rule (same names as --allow), after the --deny rules.
    #[arg(long = "require", value_name = "RULE")]
    require: Vec<String>,
    /// The packages the --allow/--deny/--require rules of AlterExistingFiles and
    /// CollectExistingFiles speak of (spk's `packages:`; `~` is the package being
    /// built). Default: every package.
    #[arg(long, value_name = "NAME", value_delimiter = ',')]
    packages: Vec<String>,
    /// The package being built, NAME/VERSION[/BUILD]. Default: $SPK_PKG (spk sets it
    /// for build scripts), else the one build whose metadata spk wrote into /spfs.
    #[arg(long, value_name = "IDENT")]
    package: Option<String>,
    /// Deny any change to a path matching this glob (relative to the mount).
    #[arg(long = "deny-path", value_name = "GLOB")]
    deny_paths: Vec<String>,
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
            // Nobody reads the rest (`validate --json | head`): the verdict still stands.
            if let Err(e) = printed
                && e.kind() != std::io::ErrorKind::BrokenPipe
            {
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
    if !args.packages.is_empty()
        && args.allow.is_empty()
        && args.deny.is_empty()
        && args.require.is_empty()
    {
        bail!("--packages names the packages of --allow/--deny/--require rules, and none is given");
    }
    if args.deny_paths.iter().any(|g| g.is_empty()) {
        bail!("--deny-path needs a glob, and one is empty");
    }
    let Target::Live { mut client, mount } = target::open(&args.target, true)? else {
        bail!(
            "no tracker runs for this runtime: validation compares changes with the runtime's lower layers"
        );
    };
    let mut package = args
        .package
        .clone()
        .or_else(|| std::env::var("SPK_PKG").ok().filter(|p| !p.is_empty()));
    // Validating from outside the build (`--runtime`, `--pid`): the package is the one
    // whose build spk set up in the runtime, and its recipe's rules apply.
    if package.is_none() && args.rules.is_none() {
        package = package_being_built(&mut client)?.map(|p| p.to_string());
    }
    let (rules, rules_from) = build_rules(args.rules.as_deref(), package.as_deref())?;
    let mut extra = Vec::new();
    for (kind, given) in [
        (RuleKind::Allow, &args.allow),
        (RuleKind::Deny, &args.deny),
        (RuleKind::Require, &args.require),
    ] {
        for r in given {
            extra.push(Rule::from_arg(kind, r, &args.packages)?);
        }
    }
    // Globs may be written relative to the mount or under it (`/spfs/etc/**`).
    let deny_paths = args
        .deny_paths
        .iter()
        .map(|g| String::from_utf8_lossy(&target::relative_to(&mount, Path::new(g))).into_owned())
        .collect();
    let request = tracker::validate::Request {
        since: args.since.as_deref().map(store::parse_since),
        rules: rules.unwrap_or_default(),
        rules_from,
        extra,
        package,
        deny_paths,
    };
    match client.call(&Request::Validate(request))? {
        Response::Validation(report) => Ok((*report, mount)),
        other => bail!("unexpected answer from tracker: {other:?}"),
    }
}

/// The package whose build spk set up in the tracked runtime, from the tracker's
/// changelog (`packages::building_among`).
fn package_being_built(
    client: &mut tracker::control::Client,
) -> anyhow::Result<Option<tracker::validate::Package>> {
    let query = store::Query {
        prefixes: vec![tracker::validate::packages::METADATA_ROOT.to_vec()],
        ..store::Query::default()
    };
    match client.call(&Request::Changes(query))? {
        Response::Changes(set) => Ok(tracker::validate::packages::building_among(
            set.changes
                .iter()
                .filter_map(|c| Some((c.path.as_slice(), c.kind?))),
            None,
        )),
        other => bail!("unexpected answer from tracker: {other:?}"),
    }
}

/// The build's own rules: those of `--rules`, else those of the recipe spk published
/// for the package being built; with where they came from.
fn build_rules(
    file: Option<&Path>,
    package: Option<&str>,
) -> anyhow::Result<(Option<Vec<Rule>>, String)> {
    if let Some(file) = file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("rules file {}", file.display()))?;
        let rules = tracker::validate::rules::parse(&text)
            .with_context(|| format!("rules file {}", file.display()))?;
        return Ok((
            Some(rules),
            format!("spk's defaults and {}", file.display()),
        ));
    }
    let Some(package) = package.and_then(tracker::validate::Package::parse) else {
        return Ok((None, "spk's defaults".into()));
    };
    let Some(recipe) = tracker::validate::packages::stored_recipe(&package)? else {
        return Ok((
            None,
            format!(
                "spk's defaults; no recipe of {}/{} was found",
                package.name, package.version
            ),
        ));
    };
    let rules = tracker::validate::rules::parse(&recipe).with_context(|| {
        format!(
            "the recipe of {}/{} (spfs read spk/spec/{}/{}); give its rules with --rules FILE",
            package.name, package.version, package.name, package.version
        )
    })?;
    Ok((
        Some(rules),
        format!(
            "spk's defaults and the recipe of {}/{}",
            package.name, package.version
        ),
    ))
}

fn who(v: &Violation) -> String {
    match &v.origin {
        Some(o) if o.command.is_empty() => format!("by pid {}", o.pid),
        Some(o) => format!("by pid {} ({})", o.pid, escape(&o.command)),
        None => "by an unknown process".into(),
    }
}

/// One violation for people: spk's words, the package that installed the original,
/// the writer.
fn describe(v: &Violation, mount: &Path) -> String {
    let path = escape(&full_path(mount, &v.path));
    let rule = match v.action {
        Some(a) => format!("{} ({})", v.rule.name(), a.name()),
        None => v.rule.name().to_string(),
    };
    if v.path.is_empty() {
        return format!("{rule}: {}", v.detail);
    }
    let what = match (v.rule, v.action) {
        (RuleName::AlterExistingFiles, Some(a)) => format!("{} {path}", a.verb()),
        (RuleName::CollectExistingFiles, _) => format!("collected {path}"),
        _ => format!("{path} {}", v.detail),
    };
    let owner = match (&v.package, &v.layer) {
        _ if v.rule == RuleName::DenyPath => String::new(),
        (Some(p), _) => format!(", which is owned by {p}"),
        (None, Some(l)) => format!(", which is in layer {l} (no spk package)"),
        (None, None) => String::new(),
    };
    format!("{rule}: {what}{owner}, {}", who(v))
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
        writeln!(out, "{}", describe(v, mount))?;
        if let Some(why) = v
            .spk_misses
            .as_ref()
            .filter(|_| v.rule != RuleName::DenyPath)
        {
            writeln!(out, "  ({why})")?;
        }
    }
    for v in &report.spk_only {
        writeln!(
            out,
            "note: spk 0.44 would fail this build where its rules as documented do not: {}",
            describe(v, mount)
        )?;
    }
    for rule in &report.not_evaluated {
        writeln!(out, "note: not evaluated here: {rule}")?;
    }
    let built = report
        .package
        .as_deref()
        .map(|p| format!(" of {p}"))
        .unwrap_or_default();
    writeln!(out, "{}", summary(report, &built))?;
    out.flush()
}

/// The last line of the report: the verdict, what broke it, how much was checked.
fn summary(report: &Report, built: &str) -> String {
    let (paths, rules): (Vec<&Violation>, Vec<&Violation>) = report
        .violations
        .iter()
        .partition(|v| v.rule == RuleName::DenyPath);
    let times = |n: usize| match n {
        1 => "once".to_string(),
        n => format!("{n} times"),
    };
    let spk = if rules.is_empty() {
        format!("passes spk's rules ({})", report.rules_from)
    } else {
        let missed = rules.iter().filter(|v| v.spk_misses.is_some()).count();
        format!(
            "breaks spk's rules ({}) {} ({missed} of them spk 0.44 would not report)",
            report.rules_from,
            times(rules.len())
        )
    };
    let denied = match paths.len() {
        0 => String::new(),
        1 => " and changes 1 path --deny-path forbids".to_string(),
        n => format!(" and changes {n} paths --deny-path forbids"),
    };
    let verdict = if report.violations.is_empty() {
        "valid"
    } else {
        "invalid"
    };
    let checked = match report.checked {
        1 => "1 changed path checked".to_string(),
        n => format!("{n} changed paths checked"),
    };
    format!("{verdict}: the build{built} {spk}{denied}; {checked}")
}

fn violation_json(v: &Violation, mount: &Path) -> serde_json::Value {
    let path = full_path(mount, &v.path);
    let mut j = json!({
        "rule": v.rule.name(),
        "failure": match v.failure { Failure::Denied => "denied", Failure::Required => "required" },
        "action": v.action.map(AlterAction::name),
        "path": if v.path.is_empty() { None } else { Some(String::from_utf8_lossy(&path).into_owned()) },
        "kind": v.kind.map(store::NetKind::name),
        "package": v.package,
        "layer": v.layer,
        "pid": v.origin.as_ref().map(|o| o.pid),
        "command": v.origin.as_ref().map(|o| String::from_utf8_lossy(&o.command).into_owned()),
        "detail": v.detail,
        "spk_0_44": match &v.spk_misses { None => "reported".to_string(), Some(why) => why.clone() },
    });
    if std::str::from_utf8(&path).is_err() {
        j["path_bytes"] = json!(path);
    }
    j
}

fn print_json(report: &Report, mount: &Path) -> std::io::Result<()> {
    let list = |vs: &[Violation]| {
        vs.iter()
            .map(|v| violation_json(v, mount))
            .collect::<Vec<_>>()
    };
    let doc = json!({
        "valid": report.violations.is_empty(),
        "token": report.token.to_string(),
        "fresh": report.fresh.as_ref().map(crate::output::fresh_reason),
        "checked": report.checked,
        "package": report.package,
        "rules_from": report.rules_from,
        "violations": list(&report.violations),
        "spk_0_44_only": list(&report.spk_only),
        "not_evaluated": report.not_evaluated,
    });
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &doc)?;
    use std::io::Write;
    writeln!(out)
}
