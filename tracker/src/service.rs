//! A tracker serving one runtime: the changelog, its watcher and its control socket,
//! for as long as the runtime lives. `spfs-changes track` and `run` are thin shells
//! around it, and spk can start the same thing in-process.

use crate::control::Server;
use crate::runtime::Runtime;
use crate::{Config, Tracker, TrackerError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// File name of the control socket in a state dir.
pub const SOCKET_NAME: &str = "control.sock";
/// File name holding the serving process's pid in a state dir.
pub const PID_FILE_NAME: &str = "tracker.pid";

/// Set to `1`, the service's tracker ends batches only at syncs
/// (`Tracker::batch_at_syncs`): what tests use to say "these steps in one batch".
pub const BATCH_AT_SYNCS_ENV: &str = "SPFS_CHANGES_BATCH_AT_SYNCS";

/// The changelog's info key naming the runtime it belongs to (`Runtime::identity`).
const IDENTITY_KEY: &str = "runtime";

/// How often `supervise` checks that the runtime still exists.
const LIFETIME_CHECK: Duration = Duration::from_millis(250);

/// A running tracker and its control socket for one runtime.
pub struct Service {
    tracker: Arc<Tracker>,
    server: Server,
    runtime: Runtime,
    state: PathBuf,
}

impl Service {
    /// Starts tracking `runtime` with its changelog in `state` (created if missing),
    /// and serves it on `state/control.sock` to root and the runtime's owner. The
    /// tracker follows the runtime's remounts itself. Fails when the kernel, the
    /// layers, the state dir or spfs (for an spfs runtime's masks) cannot be used.
    pub fn start(runtime: Runtime, state: PathBuf) -> Result<Service, TrackerError> {
        std::fs::create_dir_all(&state)
            .map_err(TrackerError::io("cannot create state dir", &state))?;
        let identity = runtime.identity()?;
        if let Some(identity) = &identity {
            set_aside_other_runtimes_changelog(&state, identity)?;
        }
        let sync_dir = runtime.sync_dir()?;
        let config = Config::for_runtime(runtime.clone(), state.clone(), sync_dir)?;
        let tracker = Arc::new(Tracker::start(config)?);
        if std::env::var_os(BATCH_AT_SYNCS_ENV).is_some_and(|v| v == "1") {
            tracker.batch_at_syncs(true);
        }
        if let Some(identity) = &identity {
            tracker
                .store()
                .set_info(IDENTITY_KEY, identity.as_bytes())?;
        }
        let socket = state.join(SOCKET_NAME);
        let server = Server::start(tracker.clone(), &socket, runtime.owner_uid, runtime.info())?;
        let pid_file = state.join(PID_FILE_NAME);
        std::fs::write(&pid_file, format!("{}\n", std::process::id()))
            .map_err(TrackerError::io("cannot write", &pid_file))?;
        Ok(Service {
            tracker,
            server,
            runtime,
            state,
        })
    }

    pub fn tracker(&self) -> &Arc<Tracker> {
        &self.tracker
    }

    pub fn socket(&self) -> PathBuf {
        self.state.join(SOCKET_NAME)
    }

    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Serves until a client asks to stop or no process is left in the runtime.
    pub fn supervise(&mut self) {
        loop {
            if self.server.stop_requested(LIFETIME_CHECK) {
                tracing::info!("stop requested");
                return;
            }
            if !self.runtime.alive() {
                tracing::info!("the runtime is gone");
                return;
            }
            // The witness may have moved to another process of the runtime.
            self.server.set_runtime(self.runtime.info());
        }
    }

    /// Stops serving, lets the watcher process what is queued and flushes the
    /// changelog.
    pub fn stop(self) -> Result<(), TrackerError> {
        let Service {
            tracker,
            server,
            state,
            ..
        } = self;
        drop(server);
        let _ = std::fs::remove_file(state.join(PID_FILE_NAME));
        match Arc::try_unwrap(tracker) {
            Ok(t) => t.stop(),
            Err(_) => Err(TrackerError::Stopped(
                "the control socket still holds the tracker".into(),
            )),
        }
    }
}

/// A changelog in `state` that is not `identity`'s (an earlier runtime that had the
/// same name) is renamed aside, `changelog.sled.earlier-<unix seconds>`: never
/// adopted, never deleted.
fn set_aside_other_runtimes_changelog(state: &Path, identity: &str) -> Result<(), TrackerError> {
    let db = state.join(store::DB_DIR_NAME);
    if !db.exists() {
        return Ok(());
    }
    let recorded = store::Store::open(state)?.info(IDENTITY_KEY)?;
    if recorded.as_deref() == Some(identity.as_bytes()) {
        return Ok(());
    }
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = state.join(format!("{}.earlier-{secs}", store::DB_DIR_NAME));
    std::fs::rename(&db, &aside).map_err(TrackerError::io("cannot set aside", &db))?;
    tracing::warn!(
        kept = %aside.display(),
        was = %recorded.map(|r| String::from_utf8_lossy(&r).into_owned()).unwrap_or_else(|| "unknown".into()),
        "the state dir held another runtime's changelog; starting a new one"
    );
    Ok(())
}
