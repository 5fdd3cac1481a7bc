//! `spfs-changes reset`: put selected paths back to what the lower layers hold,
//! without ever editing the layers of a mounted overlay: with the overlay unmounted
//! when it can be, else (it is busy) by writing through the mount.

use crate::TargetArgs;
use crate::output::{escape, full_path, kind_name};
use crate::target::{self, Target};
use anyhow::{Context, bail};
use clap::Args;
use std::process::ExitCode;
use tracker::control::{Request, Response, RuntimeInfo};
use tracker::reset::{MountSpec, Outcome};

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
    if !nix::unistd::geteuid().is_root() {
        bail!("`reset` needs root: it unmounts and mounts the runtime's overlay");
    }
    let patterns = if args.all {
        vec!["*".to_string()]
    } else {
        args.patterns
    };
    let Target::Live { mut client, mount } = target::open(&args.target)? else {
        bail!(
            "no tracker runs for this runtime: reset needs one to find the changes and record the reset"
        );
    };
    let Response::Runtime(runtime) = client.call(&Request::Runtime)? else {
        bail!("the tracker did not say where its runtime is");
    };
    let Response::ResetPlan(plan) = client.call(&Request::ResetPlan(patterns.clone()))? else {
        bail!("the tracker gave no reset plan");
    };
    if plan.targets.is_empty() {
        println!("nothing to reset: no change matches {}", patterns.join(" "));
        return Ok(ExitCode::SUCCESS);
    }
    enter(&runtime)?;
    let spec = MountSpec::current(&runtime.mount_point)?;
    let me = std::process::id();
    client.call(&Request::ResetBegin(me))?;
    let mut progress = |p: tracker::restore::Progress<'_>| {
        eprintln!(
            "reset: refilling {}: {} entries",
            escape(&full_path(&mount, p.path)),
            p.entries
        );
    };
    let outcome = tracker::reset::execute(&spec, &plan, &mut progress);
    client.call(&Request::ResetEnd(me))?;
    let through = match outcome? {
        Outcome::ThroughMount { why, .. } => Some(format!(" through the mount: {why}")),
        Outcome::Done { .. } => None,
    };
    for (i, t) in plan.targets.iter().enumerate() {
        let full = full_path(&mount, &t.path);
        let was = t.kind.map_or("unchanged", kind_name);
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

/// Joins the runtime's mount namespace (when not already in it) and leaves any dir
/// of the overlay, so this process does not keep it busy.
fn enter(runtime: &RuntimeInfo) -> anyhow::Result<()> {
    if tracker::sys::own_mount_ns() == Some(runtime.mount_ns) {
        std::env::set_current_dir("/")?;
        return Ok(());
    }
    tracker::sys::join_mount_ns(runtime.pid, Some(runtime.mount_ns)).with_context(|| {
        format!(
            "cannot enter the runtime's mount namespace through pid {}",
            runtime.pid
        )
    })
}
