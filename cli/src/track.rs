//! `spfs-changes track`: a background tracker attached to an existing runtime.

use crate::target::{RUNTIMES_DIR, SOCKET_NAME};
use anyhow::{Context, bail};
use clap::Args;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tracker::control::{Client, Request, Response};
use tracker::runtime::Runtime;
use tracker::service::Service;
use tracker::sys;

#[derive(Args)]
pub struct TrackArgs {
    /// The overlay's mount point (in the namespace of --pid, else in this one).
    #[arg(long)]
    mount: Option<PathBuf>,
    /// Any process of the runtime: its mount namespace is tracked from outside.
    #[arg(long)]
    pid: Option<u32>,
    /// Stay in the foreground (for service managers) instead of detaching.
    #[arg(long)]
    foreground: bool,
    /// Where to keep the changelog [default: /var/lib/spfs-changes/runtimes/<runtime>].
    #[arg(long)]
    state: Option<PathBuf>,
}

pub fn track(args: TrackArgs) -> anyhow::Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        bail!("`track` needs root: fanotify filesystem marks need CAP_SYS_ADMIN");
    }
    let mount = args.mount.clone().unwrap_or_else(|| PathBuf::from("/spfs"));
    let runtime = match args.pid {
        Some(pid) => Runtime::by_pid(pid, &mount)?,
        None => Runtime::by_mount(&mount)?,
    };
    let state = args
        .state
        .clone()
        .unwrap_or_else(|| Path::new(RUNTIMES_DIR).join(&runtime.key));
    std::fs::create_dir_all(&state).with_context(|| format!("state dir {}", state.display()))?;
    let socket = state.join(SOCKET_NAME);
    if let Some(pid) = running_tracker(&socket) {
        println!(
            "already tracked: {} is watched by tracker pid {pid} (socket {})",
            mount.display(),
            socket.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if args.foreground {
        if runtime.contains_self() {
            leave_runtime_ns()?;
        }
        serve(runtime, state, None)?;
        return Ok(ExitCode::SUCCESS);
    }
    let (read_end, write_end) = nix::unistd::pipe()?;
    match sys::fork_single_threaded()? {
        Some(child) => {
            drop(write_end);
            let mut report = String::new();
            std::fs::File::from(read_end).read_to_string(&mut report)?;
            match report.strip_prefix("ok ") {
                Some(rest) => {
                    println!(
                        "tracking {} (tracker pid {child}, {})",
                        mount.display(),
                        rest.trim()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                None if report.is_empty() => bail!(
                    "the tracker exited while starting; see {}",
                    state.join("tracker.log").display()
                ),
                None => bail!("{}", report.trim_start_matches("error: ").trim()),
            }
        }
        None => {
            drop(read_end);
            // Errors before the tracker is up went to the parent through the pipe;
            // later ones are logged by `serve`.
            let code = i32::from(daemon(runtime, state, write_end).is_err());
            std::process::exit(code);
        }
    }
}

/// The detached child: its own session, out of the runtime's namespace, stdio away
/// from the terminal (logs go to the state dir).
fn daemon(runtime: Runtime, state: PathBuf, ready: OwnedFd) -> anyhow::Result<()> {
    let mut ready = std::fs::File::from(ready);
    let result = (|| -> anyhow::Result<()> {
        nix::unistd::setsid()?;
        if runtime.contains_self() {
            leave_runtime_ns()?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(state.join("tracker.log"))?;
        let null = std::fs::File::open("/dev/null")?;
        nix::unistd::dup2_stdin(&null)?;
        nix::unistd::dup2_stdout(&std::fs::File::open("/dev/null")?)?;
        nix::unistd::dup2_stderr(&log)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = writeln!(ready, "error: {}", crate::one_line(&e));
        return Err(e);
    }
    serve(runtime, state, Some(ready))
}

/// Runs the tracker and its socket until the runtime ends or a client says stop.
fn serve(runtime: Runtime, state: PathBuf, mut ready: Option<std::fs::File>) -> anyhow::Result<()> {
    let mount = runtime.mount_point.clone();
    let mut service = match Service::start(runtime, state) {
        Ok(s) => s,
        Err(e) => {
            let e = anyhow::Error::from(e);
            if let Some(ready) = &mut ready {
                let _ = writeln!(ready, "error: {}", crate::one_line(&e));
            }
            return Err(e);
        }
    };
    let socket = service.socket();
    match ready.take() {
        Some(mut ready) => {
            let _ = writeln!(ready, "ok socket {}", socket.display());
        }
        None => eprintln!("tracking {} (socket {})", mount.display(), socket.display()),
    }
    service.supervise();
    Ok(service.stop()?)
}

/// The pid of a tracker answering on `socket`, if one does.
fn running_tracker(socket: &Path) -> Option<String> {
    let mut client = Client::connect(socket).ok()?;
    match client.call(&Request::Runtime).ok()? {
        Response::Runtime(_) => {}
        _ => return None,
    }
    let pid = std::fs::read_to_string(socket.with_file_name(tracker::service::PID_FILE_NAME))
        .unwrap_or_default();
    Some(pid.trim().to_string())
        .filter(|p| !p.is_empty())
        .or(Some("?".into()))
}

/// Moves this (single-threaded) process out of the runtime's mount namespace, into
/// PID 1's or, when that cannot be read, the nearest outside ancestor's, and to `/`.
fn leave_runtime_ns() -> anyhow::Result<()> {
    let (pid, _) = tracker::runtime::outside_process()
        .context("cannot leave the runtime's mount namespace: no process outside it found")?;
    tracker::sys::join_mount_ns(pid, None)
        .with_context(|| format!("cannot leave the runtime's mount namespace for pid {pid}'s"))
}
