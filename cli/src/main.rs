//! `spfs-changes` (also `spfs changes`): what changed in an spfs runtime, from the
//! changelog a fanotify tracker keeps. This binary only parses arguments, calls the
//! `tracker` and `store` crates and prints.

mod daemon;
mod output;
mod reset;
mod run;
mod target;
mod track;
mod validate;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "spfs-changes",
    version,
    about = "What changed in an spfs runtime, in O(changes)",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no subcommand: what `changes` prints (so `spfs changes` alone lists them).
    #[command(flatten)]
    changes: ChangesArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run a command in a fresh tracked overlay runtime, then print what it changed.
    Run(run::RunArgs),
    /// Attach a background tracker to an existing runtime (spfs's included).
    Track(track::TrackArgs),
    /// Print what changed (since a mark or token), `spfs diff` style or as JSON.
    Changes(ChangesArgs),
    /// Every recorded change of one path, oldest first.
    History(HistoryArgs),
    /// Name the current position in the changelog (e.g. `build-start`).
    Mark(MarkArgs),
    /// Put paths back to what the lower layers hold (safely: see README).
    Reset(reset::ResetArgs),
    /// Check spk's build rules over what changed (exit 0 clean, 1 violations, 2 error).
    Validate(validate::ValidateArgs),
    /// Show the tracker's state and counters.
    Status(StatusArgs),
    /// Ask a running tracker to stop.
    Stop(TargetArgs),
    /// Host service (root): a tracker for every spfs runtime, attached as it starts.
    Daemon(daemon::DaemonArgs),
    /// The runtimes with a changelog on this host: name, pid, mount, tracker, changed
    /// paths, state dir.
    List(ListArgs),
}

#[derive(Args)]
struct ListArgs {
    #[arg(long)]
    json: bool,
}

/// Which changelog to talk to.
#[derive(Args, Clone, Default)]
pub struct TargetArgs {
    /// Control socket of a running tracker [default: $SPFS_CHANGES_SOCKET].
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// State dir of a runtime's changelog [default: $SPFS_CHANGES_STATE, else the
    /// latest `run`].
    #[arg(long, global = true)]
    state: Option<PathBuf>,
    /// The spfs runtime of this name (`spfs runtime list`), from anywhere on the host.
    #[arg(long = "runtime", global = true, value_name = "NAME")]
    runtime_name: Option<String>,
    /// The runtime process PID is in, from anywhere on the host.
    #[arg(long, global = true, value_name = "PID")]
    pid: Option<u32>,
}

#[derive(Args)]
struct ChangesArgs {
    /// Only changes after this mark name or `<instance>:<seq>` token.
    #[arg(long)]
    since: Option<String>,
    /// One JSON document.
    #[arg(long, conflicts_with = "jsonl")]
    json: bool,
    /// One JSON object per line, then a trailer line with the token.
    #[arg(long)]
    jsonl: bool,
    /// Also list what `spfs diff` cannot see: owner, mtime or xattrs changed, and
    /// since a mark, paths put back as they were at it (`[owner {0:0=>1000:1000}]`,
    /// `[mtime]`, `[touched]`).
    #[arg(long)]
    all: bool,
    /// Only paths matching this glob (relative to the mount, e.g. `lib/**/*.so`).
    #[arg(long = "glob")]
    globs: Vec<String>,
    /// Only these paths and what lies below them (`/spfs/lib`, `lib`).
    prefixes: Vec<PathBuf>,
    #[command(flatten)]
    target: TargetArgs,
}

#[derive(Args)]
struct HistoryArgs {
    /// The path (`/spfs/lib/x.so` or `lib/x.so`).
    path: PathBuf,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    target: TargetArgs,
}

#[derive(Args)]
struct MarkArgs {
    name: String,
    #[command(flatten)]
    target: TargetArgs,
}

#[derive(Args)]
struct StatusArgs {
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    target: TargetArgs,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // clap's own message would be several lines and name no argument.
        Err(e) if e.kind() == clap::error::ErrorKind::InvalidUtf8 => {
            eprintln!(
                "spfs-changes: error: an argument is not valid UTF-8: paths, patterns and \
                 names are given as UTF-8 (`changes --json` gives other paths' exact bytes)"
            );
            return ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
    // A background tracker's stderr becomes its log file: no terminal colours there.
    let detaching = matches!(&cli.command, Some(Command::Track(args)) if !args.foreground);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(!detaching && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SPFS_CHANGES_LOG")
                // sled reports its own troubles through log lines; ours say it once.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sled=off")),
        )
        .init();
    // Trackers this program starts reset for their runtime's owner with it.
    if let Ok(exe) = std::env::current_exe() {
        let _ = tracker::control::RESET_HELPER.set(exe);
    }
    let result = match cli.command {
        None => changes(cli.changes),
        Some(command) => match command {
            Command::Run(args) => run::run(args),
            Command::Track(args) => track::track(args),
            Command::Changes(args) => changes(args),
            Command::Mark(args) => mark(args),
            Command::History(args) => history(args),
            Command::Reset(args) => reset::reset(args),
            Command::Validate(args) => return validate::validate(args),
            Command::Status(args) => status(args),
            Command::Stop(target) => stop(target),
            Command::List(args) => list(args),
            Command::Daemon(args) => daemon::daemon(args),
        },
    };
    match result {
        Ok(code) => code,
        // The reader went away (`spfs changes | head`): nothing more to say.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spfs-changes: error: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Joins an error and its causes on one line.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ").replace('\n', " ")
}

fn changes(args: ChangesArgs) -> anyhow::Result<ExitCode> {
    let mut target = target::open(&args.target, true)?;
    let query = store::Query {
        since: args.since.as_deref().map(store::parse_since),
        prefixes: args.prefixes.iter().map(|p| target.relative(p)).collect(),
        globs: args.globs,
    };
    // Text has no place for the writers' command lines.
    let set = target.diff(query, args.json || args.jsonl)?;
    let mut out = std::io::stdout().lock();
    let format = if args.json {
        output::Format::Json
    } else if args.jsonl {
        output::Format::JsonLines
    } else {
        output::Format::Diff
    };
    if let (Some(reason), output::Format::Diff) = (&set.fresh, format) {
        eprintln!(
            "spfs-changes: note: {}; showing every change instead",
            output::fresh_reason(reason)
        );
    }
    if let (Some(ended), output::Format::Diff) = (&set.ended, format) {
        eprintln!("spfs-changes: note: {}", output::ended_note(ended));
    }
    let how = output::Listing {
        format,
        all: args.all,
        color: std::io::IsTerminal::is_terminal(&std::io::stdout()),
    };
    output::write_changes(&mut out, &set, target.mount(), how)?;
    Ok(ExitCode::SUCCESS)
}

fn history(args: HistoryArgs) -> anyhow::Result<ExitCode> {
    let mut target = target::open(&args.target, true)?;
    let rel = target.relative(&args.path);
    let records = target.history(&rel)?;
    if let Some(ended) = target.ended()? {
        eprintln!("spfs-changes: note: {}", output::ended_note(&ended));
    }
    if records.is_empty() {
        // Said, so that a path outside the runtime or mistyped is not a silent blank.
        eprintln!(
            "spfs-changes: no recorded change of {}",
            output::escape(&output::full_path(target.mount(), &rel))
        );
    }
    let mut out = std::io::stdout().lock();
    output::write_history(&mut out, &records, target.mount(), args.json)?;
    Ok(ExitCode::SUCCESS)
}

fn mark(args: MarkArgs) -> anyhow::Result<ExitCode> {
    let token = target::open(&args.target, true)?.mark(&args.name)?;
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let status = target::open(&args.target, true)?.status()?;
    let mut out = std::io::stdout().lock();
    output::write_status(&mut out, &status, args.json)?;
    Ok(ExitCode::SUCCESS)
}

fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    use tracker::service::{RUNS_DIR, RUNTIMES_DIR};
    let listed = tracker::service::list(
        &[
            std::path::Path::new(RUNTIMES_DIR),
            std::path::Path::new(RUNS_DIR),
        ],
        nix::unistd::geteuid().as_raw(),
    );
    output::write_list(&mut std::io::stdout().lock(), &listed, args.json)?;
    Ok(ExitCode::SUCCESS)
}

fn stop(args: TargetArgs) -> anyhow::Result<ExitCode> {
    target::open(&args, false)?.stop()?;
    Ok(ExitCode::SUCCESS)
}
