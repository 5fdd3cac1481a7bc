//! `spfs-changes run`: a self-contained tracked runtime shaped like spfs's (a tmpfs
//! runtime dir with upper/work/lower and an overlay on top), for trying the tracker
//! without an spfs install and for tests.

use crate::output::{self, Format};
use crate::target::RUNS_DIR;
use anyhow::{Context, bail};
use clap::Args;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tracker::runtime::Runtime;
use tracker::service::Service;

#[derive(Args)]
pub struct RunArgs {
    /// A lower layer, top-most first (repeatable) [default: one empty layer].
    #[arg(long = "lower")]
    lowers: Vec<PathBuf>,
    /// Where to mount the overlay.
    #[arg(long, default_value = "/spfs")]
    mount: PathBuf,
    /// Where the runtime's tmpfs (upper/, work/, lower/) is mounted, inside the
    /// runtime's private mount namespace.
    #[arg(long, default_value = "/tmp/spfs-runtime")]
    runtime_dir: PathBuf,
    /// Where to keep the changelog [default: /var/lib/spfs-changes/runs/<id>].
    #[arg(long)]
    state: Option<PathBuf>,
    /// The command to run inside the runtime.
    #[arg(last = true, required = true)]
    command: Vec<std::ffi::OsString>,
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        bail!("`run` needs root: it mounts a tmpfs and an overlay in a private mount namespace");
    }
    for lower in &args.lowers {
        let meta =
            std::fs::metadata(lower).with_context(|| format!("lower dir {}", lower.display()))?;
        if !meta.is_dir() {
            bail!("lower dir {} is not a directory", lower.display());
        }
    }
    // A signal ends the command, never this process before it: the changelog is
    // still flushed and printed.
    tracker::service::hold_termination_signals()?;

    let state = match &args.state {
        Some(s) => s.clone(),
        None => new_run_dir()?,
    };
    std::fs::create_dir_all(&state).with_context(|| format!("state dir {}", state.display()))?;
    let state = state.canonicalize()?;

    tracker::sys::enter_private_mount_ns().context("cannot create a private mount namespace")?;

    if args.mount.exists() && is_mount_point(&args.mount)? {
        bail!(
            "mount point {} is in use: something is already mounted there",
            args.mount.display()
        );
    }
    tracker::setup::Overlay::create(&args.runtime_dir, &args.mount, &args.lowers)?;

    // The same service `track` runs, over the runtime just made: it follows remounts
    // of it as part of every sync.
    let service = Service::start(Runtime::here(&args.mount)?, state.clone())?;
    let socket = service.socket();

    let (program, rest) = args.command.split_first().context("no command given")?;
    let (status, passed) = tracker::service::run_command(
        std::process::Command::new(program)
            .args(rest)
            .env("SPFS_CHANGES_SOCKET", &socket)
            .env("SPFS_CHANGES_STATE", &state)
            .env("PATH", path_with_self()?),
    )
    .with_context(|| format!("cannot run {}", program.to_string_lossy()))?;
    for signal in passed {
        eprintln!(
            "spfs-changes: passed {} on to the command",
            nix::sys::signal::Signal::try_from(signal).map_or("a signal", |s| s.as_str())
        );
    }

    let set = service.tracker().diff(&store::Query::default());
    // Stopped (the changelog flushed) whatever became of the listing.
    let listed = set.map_err(anyhow::Error::from).and_then(|set| {
        output::write_changes(
            &mut std::io::stdout().lock(),
            &set,
            &args.mount,
            output::Listing {
                format: Format::Diff,
                all: false,
                color: std::io::IsTerminal::is_terminal(&std::io::stdout()),
            },
        )
        .map_err(anyhow::Error::from)
    });
    service.stop(tracker::service::Ending::RuntimeEnded)?;
    match listed {
        // Nobody reads the listing any more (`run ... | head`): the command's exit
        // status still stands.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) => {}
        other => other?,
    }
    eprintln!(
        "spfs-changes: changelog kept in {} (spfs-changes changes --state {})",
        state.display(),
        state.display()
    );
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// PATH with this binary's dir first, so `spfs-changes` (and `spfs changes`) inside
/// the command reach this same build, installed or not.
fn path_with_self() -> anyhow::Result<std::ffi::OsString> {
    let exe = std::env::current_exe().context("cannot find this binary")?;
    let mut dirs: Vec<PathBuf> = exe.parent().map(Path::to_path_buf).into_iter().collect();
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(dirs).context("cannot build PATH for the command")
}

/// A new dir under RUNS_DIR, and `latest` pointing at it.
fn new_run_dir() -> anyhow::Result<PathBuf> {
    let runs = Path::new(RUNS_DIR);
    std::fs::create_dir_all(runs).with_context(|| format!("cannot create {}", runs.display()))?;
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let dir = runs.join(format!("run-{secs}-{}", std::process::id()));
    std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = runs.join(format!(".latest-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&dir, &tmp)?;
    std::fs::rename(&tmp, runs.join("latest"))?;
    Ok(dir)
}

fn is_mount_point(p: &Path) -> anyhow::Result<bool> {
    let meta = std::fs::metadata(p)?;
    let parent = std::fs::metadata(p.join(".."))?;
    Ok(meta.dev() != parent.dev() || meta.ino() == parent.ino())
}
