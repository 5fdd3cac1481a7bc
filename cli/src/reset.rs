//! `spfs-changes reset`: put selected paths back to what the lower layers hold,
//! without ever editing the layers of a mounted overlay: with the overlay unmounted
//! when it can be, else (it is busy) by writing through the mount.

use crate::TargetArgs;
use crate::output::{escape, full_path};
use crate::target::{self, Target};
use anyhow::bail;
use clap::Args;
use std::process::ExitCode;
use tracker::reset::Outcome;

#[derive(Args)]
pub struct ResetArgs {
    /// spfs's patterns: `file.*`, `dir1/`, `/file`, `*` (a leading /spfs is accepted).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    patterns: Vec<String>,
    /// Put every change back.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    target: TargetArgs,
}

pub fn reset(args: ResetArgs) -> anyhow::Result<ExitCode> {
    let patterns = if args.all {
        vec!["*".to_string()]
    } else {
        args.patterns
    };
    if !nix::unistd::geteuid().is_root() {
        return reset_through_tracker(&args.target, patterns);
    }
    let Target::Live { mut client, mount } = target::open(&args.target, true)? else {
        bail!(
            "no tracker runs for this runtime: reset needs one to find the changes and record the reset"
        );
    };
    let mut progress = |p: tracker::restore::Progress<'_>| {
        eprintln!(
            "reset: refilling {}: {} entries",
            escape(&full_path(&mount, p.path)),
            p.entries
        );
    };
    let Some((_, plan, outcome)) = tracker::reset::request(&mut client, &patterns, &mut progress)?
    else {
        println!("nothing to reset: no change matches {}", patterns.join(" "));
        return Ok(ExitCode::SUCCESS);
    };
    let through = match outcome {
        Outcome::ThroughMount { why, .. } => Some(format!(" through the mount: {why}")),
        Outcome::Done { .. } => None,
    };
    let lines = plan
        .targets
        .iter()
        .map(|t| (t, t.kind.map_or("unchanged", store::NetKind::name)))
        .chain(
            plan.hidden
                .iter()
                .map(|t| (t, "hidden by a removed or replaced dir")),
        );
    for (i, (t, was)) in lines.enumerate() {
        let full = full_path(&mount, &t.path);
        // The first line names the holders, the others only say how.
        let how = match &through {
            None => "",
            Some(first) if i == 0 => first.as_str(),
            Some(_) => " through the mount",
        };
        println!("reset {} (was {was}){how}", escape(&full));
    }
    Ok(ExitCode::SUCCESS)
}

/// Not root: the runtime's tracker (root) resets on the caller's behalf, if the
/// caller owns the runtime, and hands back what its reset printed.
fn reset_through_tracker(target: &TargetArgs, patterns: Vec<String>) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    use tracker::control::{Request, Response};
    let Target::Live { mut client, .. } = target::open(target, true)? else {
        bail!(
            "no tracker runs for this runtime: reset needs one (and, for a user other than root, the spfs-changes service)"
        );
    };
    match client.call(&Request::ResetFor(patterns))? {
        Response::Helped {
            code,
            stdout,
            stderr,
        } => {
            std::io::stdout().write_all(&stdout)?;
            std::io::stderr().write_all(&stderr)?;
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
        Response::Error(e) => bail!("{e}"),
        other => bail!("unexpected answer from tracker: {other:?}"),
    }
}
