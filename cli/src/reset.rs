//! `spfs-changes reset`: put selected paths back to what the lower layers hold,
//! without ever editing the layers of a mounted overlay.

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
    let Response::ResetPlan(targets) = client.call(&Request::ResetPlan(patterns.clone()))? else {
        bail!("the tracker gave no reset plan");
    };
    if targets.is_empty() {
        println!("nothing to reset: no change matches {}", patterns.join(" "));
        return Ok(ExitCode::SUCCESS);
    }
    enter(&runtime)?;
    let spec = MountSpec::current(&runtime.mount_point)?;
    let me = std::process::id();
    client.call(&Request::ResetBegin(me))?;
    let paths: Vec<Vec<u8>> = targets.iter().map(|c| c.path.clone()).collect();
    let outcome = tracker::reset::execute(&spec, &paths);
    client.call(&Request::ResetEnd(me))?;
    match outcome? {
        Outcome::Busy { holders } => {
            let who: Vec<String> = holders
                .iter()
                .map(|h| format!("pid {} ({})", h.pid, h.command))
                .collect();
            bail!(
                "{} is busy, nothing was changed: held by {}",
                runtime.mount_point.display(),
                if who.is_empty() {
                    "an unknown process".to_string()
                } else {
                    who.join(", ")
                }
            );
        }
        Outcome::Done { .. } => {
            for t in &targets {
                let full = full_path(&mount, &t.path);
                let was = t.kind.map_or("unchanged", kind_name);
                println!("reset {} (was {was})", escape(&full));
            }
        }
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
