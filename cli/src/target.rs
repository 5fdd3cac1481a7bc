//! Finds the changelog a command speaks of: a running tracker's socket, or the db of a
//! runtime whose tracker has ended.

use crate::TargetArgs;
use anyhow::{Context, bail};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use store::{Query, Store, Token};
use tracker::Status;
use tracker::control::{Client, Request, Response};

pub use tracker::service::{RUNS_DIR, SOCKET_NAME};
use tracker::service::{Tracking, Which};

pub enum Target {
    Live {
        client: Client,
        mount: PathBuf,
    },
    Kept {
        /// Boxed: sled's handle is large next to a socket.
        store: Box<Store>,
        mount: PathBuf,
        state: PathBuf,
    },
}

/// The changelog `args` name, or the one of the runtime this process is in (whose
/// tracker is started when none runs and `auto_start`), or the latest `run`'s.
pub fn open(args: &TargetArgs, auto_start: bool) -> anyhow::Result<Target> {
    let socket = args
        .socket
        .clone()
        .or_else(|| std::env::var_os("SPFS_CHANGES_SOCKET").map(PathBuf::from));
    if let Some(socket) = socket {
        return live(&socket);
    }
    let which = match (&args.runtime_name, args.pid) {
        (Some(_), Some(_)) => bail!("--runtime and --pid name a runtime each: give one"),
        (Some(name), None) => Some(Which::Named(name.clone())),
        (None, Some(pid)) => Some(Which::Pid(pid)),
        (None, None) => None,
    };
    let state = match args
        .state
        .clone()
        .or_else(|| std::env::var_os("SPFS_CHANGES_STATE").map(PathBuf::from))
    {
        Some(s) => s,
        None => match located(which.as_ref().unwrap_or(&Which::Current), auto_start)? {
            Some(dir) => dir,
            None if which.is_some() => bail!("no changelog of that runtime is kept on this host"),
            None => {
                let latest = Path::new(RUNS_DIR).join("latest");
                std::fs::read_link(&latest).with_context(|| {
                    format!(
                        "no runtime given (--state, --socket), no tracker for this runtime and no earlier run at {}",
                        latest.display()
                    )
                })?
            }
        },
    };
    if !state.is_dir() {
        bail!("no changelog at {}: not a directory", state.display());
    }
    let socket = state.join(SOCKET_NAME);
    if socket.exists() {
        match live(&socket) {
            Ok(target) => return Ok(target),
            // A tracker that refuses this user: its changelog is not theirs either.
            Err(e)
                if e.chain().any(|c| {
                    matches!(
                        c.downcast_ref::<tracker::TrackerError>(),
                        Some(tracker::TrackerError::Answer(_))
                    )
                }) =>
            {
                return Err(e);
            }
            Err(_) => {}
        }
    }
    if !state.join(store::DB_DIR_NAME).exists() {
        bail!(
            "no changelog in {} (and no tracker answers there)",
            state.display()
        );
    }
    let store = Box::new(Store::open(&state).map_err(|e| match e {
        store::StoreError::Corrupt { .. } => anyhow::anyhow!(
            "{e}; no answer is given from it (a tracker started on the runtime keeps it aside and rebuilds the changelog from the upper dir)"
        ),
        other => other.into(),
    })?);
    let mount = store
        .info("mount")?
        .map(|b| PathBuf::from(std::ffi::OsString::from_vec(b)))
        .unwrap_or_else(|| PathBuf::from("/spfs"));
    Ok(Target::Kept {
        store,
        mount,
        state,
    })
}

/// The state dir of runtime `which` (the one this process is in, if any, for
/// `Which::Current`); with `auto_start`, a tracker is started for it when none runs
/// (said once, on stderr).
fn located(which: &Which, auto_start: bool) -> anyhow::Result<Option<PathBuf>> {
    if !auto_start {
        let key = match which {
            Which::Current => tracker::runtime::key_of_current(),
            Which::Pid(pid) => tracker::runtime::key_of_pid(*pid),
            Which::Named(name) => Some(tracker::runtime::key_of_name(name)),
        };
        return Ok(key
            .map(|key| Path::new(tracker::service::RUNTIMES_DIR).join(key))
            .filter(|dir| dir.is_dir()));
    }
    let Some((state, tracking)) = tracker::service::ensure_tracked(which, Path::new("/spfs"))?
    else {
        return Ok(None);
    };
    if let Tracking::Started { pid, .. } = tracking {
        eprintln!(
            "spfs-changes: no tracker watched this runtime; one does from now on (tracker pid {pid}). What changed before is known from the upper dir, not who changed it or when."
        );
    }
    Ok(Some(state))
}

fn live(socket: &Path) -> anyhow::Result<Target> {
    let mut client = Client::connect(socket)?;
    // The runtime's description is answered without touching the changelog: cheap
    // whatever the runtime's size.
    let Response::Runtime(runtime) = client.call(&Request::Runtime)? else {
        bail!("tracker at {} gave an unexpected answer", socket.display());
    };
    Ok(Target::Live {
        client,
        mount: runtime.mount_point,
    })
}

/// `p` without the mount (when under it) and without leading slashes: how the
/// changelog names paths.
pub fn relative_to(mount: &Path, p: &Path) -> Vec<u8> {
    let p = p.strip_prefix(mount).unwrap_or(p);
    let bytes = p.as_os_str().as_bytes();
    let start = bytes.iter().position(|&b| b != b'/').unwrap_or(bytes.len());
    bytes[start..].to_vec()
}

impl Target {
    pub fn mount(&self) -> &Path {
        match self {
            Target::Live { mount, .. } | Target::Kept { mount, .. } => mount,
        }
    }

    /// A path as the user wrote it (`/spfs/lib`, `lib/`, `/lib`) relative to the mount.
    pub fn relative(&self, p: &Path) -> Vec<u8> {
        let mut bytes = relative_to(self.mount(), p);
        while bytes.last() == Some(&b'/') {
            bytes.pop();
        }
        bytes
    }

    /// The changes compared as `spfs diff` compares them (the writers' command lines
    /// only with `commands`); from a kept changelog (no layers to compare with), signs
    /// from the recorded kinds only.
    pub fn diff(&mut self, query: Query, commands: bool) -> anyhow::Result<tracker::diff::DiffSet> {
        match self {
            Target::Live { client, .. } => match client.call(&Request::Diff(query, commands))? {
                Response::Diff(set) => Ok(*set),
                other => bail!("unexpected answer from tracker: {other:?}"),
            },
            Target::Kept { store, .. } => Ok(tracker::diff::recorded_only(store.query(&query)?)),
        }
    }

    /// Set when the changelog is a kept one that stopped recording before its runtime
    /// ended (`ChangeSet::ended`).
    pub fn ended(&self) -> anyhow::Result<Option<store::Ended>> {
        match self {
            Target::Live { .. } => Ok(None),
            Target::Kept { store, .. } => Ok(store.ended()?),
        }
    }

    pub fn history(&mut self, path: &[u8]) -> anyhow::Result<Vec<store::LogRecord>> {
        match self {
            Target::Live { client, .. } => match client.call(&Request::History(path.to_vec()))? {
                Response::History(records) => Ok(records),
                other => bail!("unexpected answer from tracker: {other:?}"),
            },
            Target::Kept { store, .. } => Ok(store.history(path)?),
        }
    }

    pub fn mark(&mut self, name: &str) -> anyhow::Result<Token> {
        match self {
            Target::Live { client, .. } => match client.call(&Request::Mark(name.to_string()))? {
                Response::Token(t) => Ok(t),
                other => bail!("unexpected answer from tracker: {other:?}"),
            },
            Target::Kept { store, .. } => Ok(store.mark(name)?),
        }
    }

    pub fn status(&mut self) -> anyhow::Result<Status> {
        match self {
            Target::Live { client, .. } => match client.call(&Request::Status)? {
                Response::Status(s) => Ok(*s),
                other => bail!("unexpected answer from tracker: {other:?}"),
            },
            Target::Kept { store, mount, .. } => {
                let stats = store.stats()?;
                let upper = store
                    .info("upper")?
                    .map(|b| PathBuf::from(std::ffi::OsString::from_vec(b)))
                    .unwrap_or_default();
                Ok(Status {
                    token: Some(store.token()),
                    live: false,
                    mount: mount.clone(),
                    upper,
                    gaps: stats.gaps,
                    net_paths: stats.net_paths,
                    db_bytes: stats.db_bytes,
                    watch: match store.ended()? {
                        Some(e) => format!(
                            "none (no tracker is running; reading the kept changelog): {}",
                            crate::output::ended_note(&e)
                        ),
                        None => "none (no tracker is running; reading the kept changelog)".into(),
                    },
                    ..Status::default()
                })
            }
        }
    }

    pub fn stop(&mut self) -> anyhow::Result<()> {
        match self {
            Target::Live { client, .. } => {
                client.call(&Request::Stop)?;
                Ok(())
            }
            Target::Kept { state, .. } => bail!("no tracker is running for {}", state.display()),
        }
    }
}
