//! `spfs-changes track`: a background tracker attached to an existing runtime.

use anyhow::bail;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use tracker::runtime::Runtime;
use tracker::service::{self, Tracking};

#[derive(Args)]
pub struct TrackArgs {
    /// The overlay's mount point (in the namespace of --pid, else in this one).
    #[arg(long)]
    mount: Option<PathBuf>,
    /// Any process of the runtime: its mount namespace is tracked from outside.
    #[arg(long, value_name = "PID")]
    pid: Option<u32>,
    /// The spfs runtime of this name (`spfs runtime list`), tracked from outside.
    #[arg(long = "runtime", value_name = "NAME", conflicts_with = "pid")]
    runtime_name: Option<String>,
    /// Stay in the foreground (for service managers) instead of detaching.
    #[arg(long)]
    pub foreground: bool,
    /// Where to keep the changelog [default: /var/lib/spfs-changes/runtimes/<runtime>].
    #[arg(long)]
    state: Option<PathBuf>,
}

pub fn track(args: TrackArgs) -> anyhow::Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        bail!("`track` needs root: fanotify filesystem marks need CAP_SYS_ADMIN");
    }
    let mount = args.mount.clone().unwrap_or_else(|| PathBuf::from("/spfs"));
    let pid = match &args.runtime_name {
        Some(name) => Some(tracker::runtime::find_spfs_runtime(name).ok_or_else(|| {
            anyhow::anyhow!("no process of an spfs runtime named {name} is running here")
        })?),
        None => args.pid,
    };
    let runtime = match pid {
        Some(pid) => Runtime::by_pid(pid, &mount)?,
        None => Runtime::by_mount(&mount)?,
    };
    let state = args
        .state
        .clone()
        .unwrap_or_else(|| service::default_state_dir(&runtime));
    let foreground = args.foreground;
    service::track(runtime, state, foreground, |t| match t {
        Tracking::AlreadyTracked { pid, socket } => println!(
            "already tracked: {} is watched by tracker pid {pid} (socket {})",
            mount.display(),
            socket.display()
        ),
        Tracking::Started { socket, .. } if foreground => {
            eprintln!("tracking {} (socket {})", mount.display(), socket.display())
        }
        Tracking::Started { pid, socket } => println!(
            "tracking {} (tracker pid {pid}, socket {})",
            mount.display(),
            socket.display()
        ),
        // `track` starts one or fails.
        Tracking::Kept => {}
    })?;
    Ok(ExitCode::SUCCESS)
}
