//! `spfs-changes daemon`: the host service that attaches a tracker to every spfs
//! runtime as it starts (`tracker::daemon`).

use anyhow::{Context, bail};
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use tracker::daemon::{Notice, Options};

#[derive(Args)]
pub struct DaemonArgs {
    /// Where spfs mounts its runtimes.
    #[arg(long, default_value = "/spfs")]
    mount: PathBuf,
    /// Do not stop a new runtime's first process while its tracker starts (its first
    /// writes are then known from a rescan, without their writer).
    #[arg(long)]
    no_hold: bool,
    /// Days to keep the changelog of an ended runtime before removing it (0: keep
    /// them all).
    #[arg(long, default_value_t = 14, value_name = "DAYS")]
    retain_days: u64,
}

pub fn daemon(args: DaemonArgs) -> anyhow::Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        bail!("`daemon` needs root: fanotify marks and the process events connector need it");
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(signal, stop.clone())
            .context("cannot handle termination signals")?;
    }
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let mount = args.mount.clone();
    let mut attach = |pid: u32| -> Result<String, String> {
        let out = std::process::Command::new(&exe)
            .args(["track", "--pid", &pid.to_string(), "--mount"])
            .arg(&mount)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
        let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() {
            Ok(said)
        } else {
            Err(String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', " "))
        }
    };
    let options = Options {
        mount_point: args.mount,
        hold: !args.no_hold,
        retention: (args.retain_days > 0)
            .then(|| std::time::Duration::from_secs(args.retain_days * 24 * 3600)),
    };
    tracker::daemon::run(&options, &stop, &mut attach, &mut |n| match n {
        Notice::Ready { existing } => eprintln!(
            "spfs-changes daemon: watching for spfs runtimes at {} ({existing} running attached)",
            options.mount_point.display()
        ),
        Notice::Attached {
            name,
            pid,
            held_after,
            took,
            said,
        } => {
            let held = match held_after {
                Some(d) => format!(
                    "; held {} us after its exec, for {} ms",
                    d.as_micros(),
                    took.as_millis()
                ),
                None => format!("; attached late, in {} ms", took.as_millis()),
            };
            eprintln!("spfs-changes daemon: runtime {name} (pid {pid}): {said}{held}");
        }
        Notice::Failed { name, pid, error } => {
            eprintln!("spfs-changes daemon: runtime {name} (pid {pid}) is not tracked: {error}")
        }
        Notice::Expired { state } => eprintln!(
            "spfs-changes daemon: removed the changelog of an ended runtime, past its retention: {}",
            state.display()
        ),
        Notice::Dropped => eprintln!(
            "spfs-changes daemon: the kernel dropped process events; runtimes started meanwhile are attached at their next exec"
        ),
    })?;
    eprintln!("spfs-changes daemon: stopped (trackers go on until their runtimes end)");
    Ok(ExitCode::SUCCESS)
}
