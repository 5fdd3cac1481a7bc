//! A tracker serving one runtime: the changelog, its watcher and its control socket,
//! for as long as the runtime lives. `spfs-changes track` and `run` are thin shells
//! around it, and spk can start the same thing in-process.

use crate::control::Server;
use crate::masks::Masks;
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

/// Where each attached runtime's changelog lives by default, by runtime key
/// (`Runtime::key`): clients inside a runtime find it the same way.
pub const RUNTIMES_DIR: &str = "/var/lib/spfs-changes/runtimes";
/// The log file of a background tracker, in its state dir.
pub const LOG_NAME: &str = "tracker.log";

/// Where `run` keeps each runtime's changelog, and `latest` links the newest.
pub const RUNS_DIR: &str = "/var/lib/spfs-changes/runs";

/// The file in a state dir describing the runtime it tracks (`Record`).
pub const RECORD_NAME: &str = "runtime.json";

/// The changelog's info key naming the runtime it belongs to (`Runtime::spfs`, else
/// `Runtime::upper_identity`).
const IDENTITY_KEY: &str = "runtime";

/// How often `supervise` checks that the runtime still exists.
const LIFETIME_CHECK: Duration = Duration::from_millis(250);

/// A running tracker and its control socket for one runtime.
pub struct Service {
    tracker: Arc<Tracker>,
    server: Server,
    runtime: Runtime,
    state: PathBuf,
    /// Held while the service lives: no second tracker watches the runtime.
    _claim: nix::fcntl::Flock<std::fs::File>,
}

impl Service {
    /// Starts tracking `runtime` with its changelog in `state` (created if missing),
    /// and serves it on `state/control.sock` to root and the runtime's owner. The
    /// tracker follows the runtime's remounts itself. Fails when the kernel, the
    /// layers, the state dir or spfs (for an spfs runtime's masks) cannot be used.
    pub fn start(runtime: Runtime, state: PathBuf) -> Result<Service, TrackerError> {
        make_private(&state)?;
        let claim = claim(&runtime, &state)?;
        let (identity, masks) = match runtime.spfs()? {
            Some((identity, masks)) => (identity, masks),
            None => (runtime.upper_identity()?, Masks::default()),
        };
        set_aside_other_runtimes_changelog(&state, &identity)?;
        let sync_dir = runtime.sync_dir()?;
        let config = Config::for_runtime(runtime.clone(), masks, state.clone(), sync_dir);
        let tracker = Arc::new(Tracker::start(config)?);
        if std::env::var_os(BATCH_AT_SYNCS_ENV).is_some_and(|v| v == "1") {
            tracker.batch_at_syncs(true);
        }
        tracker
            .store()
            .set_info(IDENTITY_KEY, identity.as_bytes())?;
        let socket = state.join(SOCKET_NAME);
        let server = Server::start(tracker.clone(), &socket, runtime.owner_uid, runtime.info())?;
        write_for_owner(
            &state.join(PID_FILE_NAME),
            format!("{}\n", std::process::id()).as_bytes(),
            runtime.owner_uid,
        )?;
        Record::of(&runtime).write(&state, runtime.owner_uid)?;
        Ok(Service {
            tracker,
            server,
            runtime,
            state,
            _claim: claim,
        })
    }

    /// The tracker it serves.
    pub fn tracker(&self) -> &Arc<Tracker> {
        &self.tracker
    }

    /// Its control socket (`<state dir>/control.sock`).
    pub fn socket(&self) -> PathBuf {
        self.state.join(SOCKET_NAME)
    }

    /// Where its changelog lives.
    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// The runtime it tracks.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Serves until a client asks to stop, a termination signal arrives (`signals`,
    /// checked every 250 ms) or no process is left in the runtime; says which.
    pub fn supervise(&mut self, signals: &Signals) -> Ending {
        loop {
            if self.server.stop_requested(LIFETIME_CHECK) {
                tracing::info!("stop requested");
                return Ending::StopRequested;
            }
            if let Some(signal) = signals.received() {
                tracing::info!(signal, "stopping on a termination signal");
                return Ending::Signal(signal);
            }
            if !self.runtime.alive() {
                tracing::info!("the runtime is gone");
                return Ending::RuntimeEnded;
            }
            // The witness may have moved to another process of the runtime.
            self.server.set_runtime(self.runtime.info());
        }
    }

    /// Stops serving, lets the watcher process what is queued (everything done before
    /// this call) and flushes the changelog. When the runtime goes on (stopped by a
    /// request or a signal), the changelog says from when it misses changes
    /// (`Store::set_ended`), until a tracker starts on it again. When the runtime has
    /// ended, its changelog is handed to the runtime's owner, who can then read it
    /// (and remove it) without root: no tracker will write it again.
    pub fn stop(self, ending: Ending) -> Result<(), TrackerError> {
        let Service {
            tracker,
            server,
            mut runtime,
            state,
            _claim,
        } = self;
        drop(server);
        let store = tracker.store().clone();
        let stopped = match Arc::try_unwrap(tracker) {
            Ok(t) => t.stop(),
            Err(_) => Err(TrackerError::Stopped(
                "the control socket still holds the tracker".into(),
            )),
        };
        let alive = runtime.alive();
        if let Some(why) = ending.cut_short()
            && alive
        {
            let ended = store::Ended {
                time_ns: now_ns(),
                why,
            };
            if let Err(e) = store.set_ended(Some(&ended)) {
                tracing::error!(error = %e, "cannot record that the changelog stops here");
            }
        }
        drop(store);
        if stopped.is_ok()
            && runtime.owner_uid != 0
            && !alive
            && let Err(e) = hand_over(&state, runtime.owner_uid)
        {
            tracing::warn!(error = %e, state = %state.display(), "cannot hand the ended runtime's changelog to its owner");
        }
        // Last: until it is gone, the tracker may still write.
        let _ = std::fs::remove_file(state.join(PID_FILE_NAME));
        stopped
    }
}

/// Why a service stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// No process is left in the runtime (or, for `run`, its command ended).
    RuntimeEnded,
    /// A client asked (`spfs-changes stop`).
    StopRequested,
    /// A termination signal (its number) arrived.
    Signal(i32),
}

impl Ending {
    /// In words, when the runtime may go on without its tracker.
    fn cut_short(self) -> Option<String> {
        match self {
            Ending::RuntimeEnded => None,
            Ending::StopRequested => Some("a stop request".into()),
            Ending::Signal(n) => Some(
                nix::sys::signal::Signal::try_from(n)
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|_| format!("signal {n}")),
            ),
        }
    }
}

/// The termination signals (SIGTERM, SIGINT, SIGHUP: what `timeout`, service
/// managers, CI runners and a closed terminal send), caught instead of ending the
/// process at once, so that a tracker stops as `spfs-changes stop` stops it: the
/// kernel queue drained, the changelog flushed, its end recorded.
pub struct Signals {
    last: Arc<std::sync::atomic::AtomicUsize>,
}

impl Signals {
    /// Installs the handlers (for the whole process, once per call).
    pub fn catch() -> Result<Signals, TrackerError> {
        let last = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for signal in [
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGHUP,
        ] {
            signal_hook::flag::register_usize(signal, last.clone(), signal as usize).map_err(
                |e| TrackerError::Stopped(format!("cannot handle termination signals: {e}")),
            )?;
        }
        Ok(Signals { last })
    }

    /// The last termination signal received, if any.
    pub fn received(&self) -> Option<i32> {
        match self.last.load(std::sync::atomic::Ordering::SeqCst) {
            0 => None,
            n => i32::try_from(n).ok(),
        }
    }
}

/// The signals `run_command` passes on: what asks a process to end.
fn passed_on() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        set.add(s);
    }
    set
}

/// Blocks the signals `run_command` passes on, in the calling thread and every thread
/// it starts from now on: call it before any thread starts. (The command itself
/// starts with none blocked: std resets the mask in the child.)
pub fn hold_termination_signals() -> Result<(), TrackerError> {
    passed_on()
        .thread_block()
        .map_err(|e| TrackerError::Stopped(format!("cannot block termination signals: {e}")))
}

/// Runs `command` to its end, as `run` runs its runtime's command. SIGTERM, SIGINT,
/// SIGHUP and SIGQUIT sent to this process by another (`kill`, `timeout`, a CI
/// runner) are passed on to the command, which decides when to end; those a terminal
/// sends to its whole foreground group (Ctrl-C) reach the command directly and are not
/// sent twice. Needs `hold_termination_signals` first. Returns its exit status and the
/// signals passed on.
pub fn run_command(
    command: &mut std::process::Command,
) -> std::io::Result<(std::process::ExitStatus, Vec<i32>)> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut child = command.spawn()?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let done = Arc::new(AtomicBool::new(false));
    let forwarder = {
        let done = done.clone();
        std::thread::Builder::new()
            .name("spfs-changes-signals".into())
            .spawn(move || {
                let set = passed_on();
                let mut passed = Vec::new();
                while !done.load(Ordering::SeqCst) {
                    match crate::sys::take_signal(&set, Duration::from_millis(100)) {
                        Ok(Some((signal, true))) => {
                            // The command is not reaped before `done` is set, so `pid`
                            // is still its own here.
                            if let Ok(s) = nix::sys::signal::Signal::try_from(signal) {
                                tracing::info!(
                                    signal = s.as_str(),
                                    "passing a signal on to the command"
                                );
                                let _ = nix::sys::signal::kill(pid, s);
                                passed.push(signal);
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot wait for signals");
                            break;
                        }
                    }
                }
                passed
            })?
    };
    // Waits for the end without reaping, so that the forwarder never signals a pid
    // the kernel may have handed to another process.
    let waited = loop {
        match nix::sys::wait::waitid(
            nix::sys::wait::Id::Pid(pid),
            nix::sys::wait::WaitPidFlag::WEXITED | nix::sys::wait::WaitPidFlag::WNOWAIT,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other,
        }
    };
    done.store(true, Ordering::SeqCst);
    let passed = forwarder.join().unwrap_or_default();
    waited.map_err(std::io::Error::from)?;
    Ok((child.wait()?, passed))
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Makes a state dir what only root may read: created if missing, owned by root,
/// mode 0711 (the control socket inside is reached by name; the socket's peer check
/// decides who is answered), and nothing in it that another user could have planted
/// (a state dir handed to a runtime's owner when its runtime ended is taken back when
/// a tracker starts on it again: `spfs run --rerun`).
fn make_private(state: &Path) -> Result<(), TrackerError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::create_dir_all(state).map_err(TrackerError::io("cannot create state dir", state))?;
    let meta = std::fs::symlink_metadata(state).map_err(TrackerError::io("state dir", state))?;
    if !meta.is_dir() {
        return Err(TrackerError::io("state dir", state)(std::io::Error::other(
            "not a directory",
        )));
    }
    if meta.uid() != 0 {
        if let Some(link) = first_symlink(state) {
            return Err(TrackerError::io("refusing to write", &link)(
                std::io::Error::other(
                    "another user's state dir holds a symbolic link; move the state dir away",
                ),
            ));
        }
        give(state, 0).map_err(TrackerError::io("cannot take back", state))?;
    }
    std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o711))
        .map_err(TrackerError::io("cannot restrict", state))?;
    let db = state.join(store::DB_DIR_NAME);
    if db.is_dir() {
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o700))
            .map_err(TrackerError::io("cannot restrict", &db))?;
    }
    for name in [LOG_NAME, RECORD_NAME, PID_FILE_NAME, store::SEAL_NAME] {
        let p = state.join(name);
        if p.exists() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                .map_err(TrackerError::io("cannot restrict", &p))?;
        }
    }
    Ok(())
}

/// The lock file on the runtime's own filesystem, beside its upper dir (outside upper
/// and work): whichever state dir a tracker keeps its changelog in, the runtime has
/// one tracker.
pub const CLAIM_NAME: &str = ".spfs-changes-tracker.lock";

/// Claims `runtime` for a tracker keeping its changelog in `state` (an exclusive
/// `flock`, released when the process ends however it ends). Errors when another
/// tracker holds it, naming that one's pid and state dir.
fn claim(
    runtime: &Runtime,
    state: &Path,
) -> Result<nix::fcntl::Flock<std::fs::File>, TrackerError> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let parent = runtime.layers.upper.parent().ok_or_else(|| {
        TrackerError::Attach(
            "the upper dir is a filesystem root: no room for a lock beside it".into(),
        )
    })?;
    let path = runtime.reachable(&parent.join(CLAIM_NAME));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(TrackerError::io("cannot open", &path))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(mut held) => {
            let said = format!("{} {}\n", std::process::id(), state.display());
            held.set_len(0)
                .and_then(|()| held.rewind())
                .and_then(|()| held.write_all(said.as_bytes()))
                .map_err(TrackerError::io("cannot write", &path))?;
            Ok(held)
        }
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut said = String::new();
            let _ = file.read_to_string(&mut said);
            let (pid, dir) = said.trim().split_once(' ').unwrap_or(("?", "?"));
            Err(TrackerError::Attach(format!(
                "the runtime at {} is already tracked by tracker pid {pid}, with its changelog in {dir}",
                runtime.mount_point.display()
            )))
        }
        Err((_, e)) => Err(TrackerError::io("cannot lock", &path)(e.into())),
    }
}

/// The first symbolic link at or below `dir`, if any.
fn first_symlink(dir: &Path) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let kind = entry.file_type().ok()?;
        if kind.is_symlink() {
            return Some(entry.path());
        }
        if kind.is_dir()
            && let Some(p) = first_symlink(&entry.path())
        {
            return Some(p);
        }
    }
    None
}

/// Writes a state file only root and the runtime's owner may read (mode 0600, owned
/// by `owner_uid`): what `list` and a client need to find their runtime's tracker.
fn write_for_owner(path: &Path, bytes: &[u8], owner_uid: u32) -> Result<(), TrackerError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(TrackerError::io("cannot write", path))?;
    file.write_all(bytes)
        .map_err(TrackerError::io("cannot write", path))?;
    std::os::unix::fs::fchown(&file, Some(owner_uid), None)
        .map_err(TrackerError::io("cannot hand to the runtime's owner", path))
}

/// Makes `uid` the owner of `dir` and everything in it (symlinks themselves, never
/// what they point to), readable by that user alone: the changelog names their files
/// and command lines.
fn hand_over(dir: &Path, uid: u32) -> std::io::Result<()> {
    give(dir, uid)?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
}

fn give(dir: &Path, uid: u32) -> std::io::Result<()> {
    use nix::fcntl::AtFlags;
    use nix::unistd::{Uid, fchownat};
    let chown = |p: &Path| {
        fchownat(
            nix::fcntl::AT_FDCWD,
            p,
            Some(Uid::from_raw(uid)),
            None,
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(std::io::Error::from)
    };
    chown(dir)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            give(&entry.path(), uid)?;
        } else {
            chown(&entry.path())?;
        }
    }
    Ok(())
}

/// What a state dir says of the runtime it tracks (`runtime.json`, written when a
/// tracker starts): for `list`, and for finding a runtime's changelog by name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// spfs's name for the runtime, if it is an spfs runtime.
    pub name: Option<String>,
    /// The overlay's mount point, in the runtime's namespace.
    pub mount_point: PathBuf,
    /// A process of the runtime when the tracker started.
    pub pid: u32,
    /// The runtime's mount namespace (inode).
    pub mount_ns: u64,
    /// Who may use the control socket besides root.
    pub owner_uid: u32,
    /// The tracker's pid.
    pub tracker_pid: u32,
    /// When the tracker started, nanoseconds since the Unix epoch.
    pub started_ns: u64,
}

impl Record {
    fn of(runtime: &Runtime) -> Record {
        let info = runtime.info();
        Record {
            name: runtime.spfs_name.clone(),
            mount_point: info.mount_point,
            pid: info.pid,
            mount_ns: info.mount_ns,
            owner_uid: runtime.owner_uid,
            tracker_pid: std::process::id(),
            started_ns: now_ns(),
        }
    }

    fn write(&self, state: &Path, owner_uid: u32) -> Result<(), TrackerError> {
        // Serializing a struct of plain fields to JSON cannot fail.
        let text = serde_json::to_vec_pretty(self).expect("a record serializes");
        write_for_owner(&state.join(RECORD_NAME), &text, owner_uid)
    }

    /// The record in state dir `state`, if it has a readable one.
    pub fn read(state: &Path) -> Option<Record> {
        serde_json::from_slice(&std::fs::read(state.join(RECORD_NAME)).ok()?).ok()
    }
}

/// One state dir, as `list` shows it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub state: PathBuf,
    pub record: Option<Record>,
    /// The pid of the tracker answering there (`?` when it did not write it), if one
    /// does.
    pub tracker: Option<String>,
    /// Changed paths in its changelog, when the tracker said (a live one only: a kept
    /// changelog is not opened to count).
    pub changed: Option<u64>,
}

/// Every state dir under `dirs` (`RUNTIMES_DIR`, `RUNS_DIR`) that user `viewer` may
/// use (all for root: a runtime's owner sees only their runtimes), live trackers
/// first, each group by state dir.
pub fn list(dirs: &[&Path], viewer: u32) -> Vec<Listed> {
    use crate::control::{Client, Request, Response};
    let mut out = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let state = entry.path();
            // `latest` is a link to another entry of RUNS_DIR.
            if entry.file_type().map_or(true, |t| !t.is_dir()) {
                continue;
            }
            let record = Record::read(&state);
            if viewer != 0 && record.as_ref().is_none_or(|r| r.owner_uid != viewer) {
                continue;
            }
            let tracker = running_tracker(&state);
            let changed = tracker.as_ref().and_then(|_| {
                let mut client = Client::connect(&state.join(SOCKET_NAME)).ok()?;
                match client.call(&Request::Status).ok()? {
                    Response::Status(s) => Some(s.net_paths),
                    _ => None,
                }
            });
            out.push(Listed {
                record,
                state,
                tracker,
                changed,
            });
        }
    }
    out.sort_by(|a, b| (a.tracker.is_none(), &a.state).cmp(&(b.tracker.is_none(), &b.state)));
    out
}

/// Which runtime a command speaks of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Which {
    /// The one the calling process is in.
    Current,
    /// The runtime process `pid` is in.
    Pid(u32),
    /// The spfs runtime of this name (`spfs runtime list`).
    Named(String),
}

/// The state dir of runtime `which` (its overlay at `mount_point`), with a tracker
/// serving it: the one already there, or one started now in the background (then
/// `Tracking::Started`: what changed before this moment is known from a rescan, not
/// who changed it or when). `None` when the calling process is in no runtime
/// (`Which::Current` only). Starting one needs root (fanotify marks), and this process
/// to have one thread. Errors: no such process or runtime, not root and nothing kept.
pub fn ensure_tracked(
    which: &Which,
    mount_point: &Path,
) -> Result<Option<(PathBuf, Tracking)>, TrackerError> {
    let (key, pid) = match which {
        Which::Current => match crate::runtime::key_of_current() {
            Some(key) => (key, None),
            None => return Ok(None),
        },
        Which::Pid(pid) => match crate::runtime::key_of_pid(*pid) {
            Some(key) => (key, Some(*pid)),
            None => {
                let why = match crate::sys::mount_ns_of(*pid) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        format!("no process {pid}")
                    }
                    Err(e)
                        if e.kind() == std::io::ErrorKind::PermissionDenied
                            && !nix::unistd::geteuid().is_root() =>
                    {
                        format!(
                            "process {pid} is another user's: only its owner or root may use its runtime"
                        )
                    }
                    Err(e) => format!("cannot read the mount namespace of process {pid}: {e}"),
                    Ok(_) => format!(
                        "process {pid} is not in a runtime: it shares the host's mount namespace"
                    ),
                };
                return Err(TrackerError::Attach(why));
            }
        },
        Which::Named(name) => (
            crate::runtime::key_of_name(name),
            crate::runtime::find_spfs_runtime(name),
        ),
    };
    let state = Path::new(RUNTIMES_DIR).join(&key);
    match probe(&state) {
        Probe::Running(tracker) => {
            let socket = state.join(SOCKET_NAME);
            return Ok(Some((
                state,
                Tracking::AlreadyTracked {
                    pid: tracker,
                    socket,
                },
            )));
        }
        // Its tracker runs but will not serve this user: nothing else may either.
        Probe::Refused(why) => return Err(TrackerError::Answer(why)),
        Probe::None => {}
    }
    let live = match (which, pid) {
        (Which::Named(name), None) => {
            if state.join(store::DB_DIR_NAME).exists() {
                return Ok(Some((state, Tracking::Kept)));
            }
            return Err(TrackerError::Attach(format!(
                "no spfs runtime named {name} is running here, and no changelog of one is kept (see `spfs runtime list`)"
            )));
        }
        // A private mount namespace with nothing at the mount point is not a runtime.
        (Which::Current, _) => std::fs::read("/proc/thread-self/mountinfo")
            .map(|text| {
                crate::mountinfo::find_mount(&crate::mountinfo::parse(&text), mount_point).is_some()
            })
            .unwrap_or(false),
        _ => true,
    };
    if !live {
        return Ok(None);
    }
    if !nix::unistd::geteuid().is_root() {
        // Not allowed to start one: what an earlier tracker kept is all there is.
        if state.join(store::DB_DIR_NAME).exists() {
            return Ok(Some((state, Tracking::Kept)));
        }
        return Err(TrackerError::Attach(
            "no tracker watches this runtime, and starting one needs root (fanotify): ask for the spfs-changes service to run on this host".into(),
        ));
    }
    let runtime = match pid {
        Some(pid) => Runtime::by_pid(pid, mount_point)?,
        None => Runtime::by_mount(mount_point)?,
    };
    let tracking = track(runtime, state.clone(), false, |_| {})?;
    Ok(Some((state, tracking)))
}

/// A changelog in `state` that is not `identity`'s (an earlier runtime that had the
/// same name) is renamed aside, `changelog.sled.earlier-<unix seconds>`: never
/// adopted, never deleted.
fn set_aside_other_runtimes_changelog(state: &Path, identity: &str) -> Result<(), TrackerError> {
    let db = state.join(store::DB_DIR_NAME);
    if !db.exists() {
        return Ok(());
    }
    let recorded = match store::Store::open(state) {
        Ok(store) => store.info(IDENTITY_KEY)?,
        // The tracker sets a damaged changelog aside itself.
        Err(store::StoreError::Corrupt { .. }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
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

/// The default state dir of `runtime`.
pub fn default_state_dir(runtime: &Runtime) -> PathBuf {
    Path::new(RUNTIMES_DIR).join(&runtime.key)
}

/// The pid (as the tracker wrote it; `?` when it did not) of a tracker answering on
/// the socket of state dir `state`, if one does.
pub fn running_tracker(state: &Path) -> Option<String> {
    match probe(state) {
        Probe::Running(pid) => Some(pid),
        Probe::Refused(_) | Probe::None => None,
    }
}

/// What answers on the socket of a state dir.
enum Probe {
    /// A tracker, with its pid (`?` when it did not write it).
    Running(String),
    /// A tracker that will not serve this user: why.
    Refused(String),
    None,
}

fn probe(state: &Path) -> Probe {
    use crate::control::{Client, Request, Response};
    let Ok(mut client) = Client::connect(&state.join(SOCKET_NAME)) else {
        return Probe::None;
    };
    match client.call(&Request::Runtime) {
        Ok(Response::Runtime(_)) => {}
        Err(TrackerError::Answer(why)) => return Probe::Refused(why),
        _ => return Probe::None,
    }
    let pid = std::fs::read_to_string(state.join(PID_FILE_NAME)).unwrap_or_default();
    Probe::Running(
        Some(pid.trim().to_string())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "?".into()),
    )
}

/// What `track` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tracking {
    /// A tracker started: its pid and socket.
    Started { pid: u32, socket: PathBuf },
    /// A tracker already serves this state dir (its pid, `?` when unknown).
    AlreadyTracked { pid: String, socket: PathBuf },
    /// No tracker, and none could be started: the state dir holds what an earlier
    /// one kept (`ensure_tracked` as another user than root).
    Kept,
}

/// Attaches a tracker to `runtime` with its changelog in `state`, unless one already
/// serves it. In the background (`foreground` false): a detached child (its own
/// session, out of the runtime's namespace, stdio to `state/tracker.log`) runs the
/// service until the runtime ends; this returns once the child is watching, or with
/// the reason it could not start. In the foreground (for service managers): serves
/// here until the runtime ends or a client says stop, calling `on_ready` once
/// watching. Must be called while the process has one thread (it forks, and a
/// tracker leaving a runtime's namespace must be single-threaded to `setns`).
pub fn track(
    runtime: Runtime,
    state: PathBuf,
    foreground: bool,
    on_ready: impl FnOnce(&Tracking),
) -> Result<Tracking, TrackerError> {
    std::fs::create_dir_all(&state).map_err(TrackerError::io("cannot create state dir", &state))?;
    let socket = state.join(SOCKET_NAME);
    if let Some(pid) = running_tracker(&state) {
        let t = Tracking::AlreadyTracked { pid, socket };
        on_ready(&t);
        return Ok(t);
    }
    if foreground {
        if runtime.contains_self() {
            crate::runtime::leave_runtime_ns()?;
        }
        let signals = Signals::catch()?;
        let mut service = Service::start(runtime, state)?;
        let t = Tracking::Started {
            pid: std::process::id(),
            socket: service.socket(),
        };
        on_ready(&t);
        let ending = service.supervise(&signals);
        service.stop(ending)?;
        return Ok(t);
    }
    let (read_end, write_end) = nix::unistd::pipe()
        .map_err(|e| TrackerError::io("cannot make a pipe for", &state)(e.into()))?;
    match crate::sys::fork_single_threaded().map_err(TrackerError::io("cannot fork for", &state))? {
        Some(child) => {
            drop(write_end);
            let mut report = String::new();
            let _ = std::io::Read::read_to_string(&mut std::fs::File::from(read_end), &mut report);
            match report.strip_prefix("ok") {
                Some(_) => {
                    let t = Tracking::Started { pid: child, socket };
                    on_ready(&t);
                    Ok(t)
                }
                None if report.is_empty() => Err(TrackerError::Stopped(format!(
                    "the tracker exited while starting; see {}",
                    state.join(LOG_NAME).display()
                ))),
                None => Err(TrackerError::Attach(
                    report.trim_start_matches("error: ").trim().to_string(),
                )),
            }
        }
        None => {
            drop(read_end);
            // Errors before the tracker is up go to the parent through the pipe;
            // later ones to the log.
            let code = i32::from(background(runtime, state, write_end).is_err());
            std::process::exit(code);
        }
    }
}

/// The detached child of `track`: its own session, out of the runtime's namespace,
/// stdio away from the terminal (logs to the state dir), then the service.
fn background(
    runtime: Runtime,
    state: PathBuf,
    ready: std::os::fd::OwnedFd,
) -> Result<(), TrackerError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut ready = std::fs::File::from(ready);
    let started = (|| -> Result<(Service, Signals), TrackerError> {
        nix::unistd::setsid()
            .map_err(|e| TrackerError::io("cannot start a session for", &state)(e.into()))?;
        if runtime.contains_self() {
            crate::runtime::leave_runtime_ns()?;
        }
        let log_path = state.join(LOG_NAME);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(TrackerError::io("cannot open", &log_path))?;
        let null = std::fs::File::open("/dev/null")
            .map_err(TrackerError::io("cannot open", "/dev/null"))?;
        let redirect = |e: nix::errno::Errno| {
            TrackerError::io("cannot redirect stdio to", &log_path)(e.into())
        };
        nix::unistd::dup2_stdin(&null).map_err(redirect)?;
        nix::unistd::dup2_stdout(&null).map_err(redirect)?;
        nix::unistd::dup2_stderr(&log).map_err(redirect)?;
        let signals = Signals::catch()?;
        Ok((Service::start(runtime, state.clone())?, signals))
    })();
    let (mut service, signals) = match started {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(ready, "error: {}", e.to_string().replace('\n', " "));
            return Err(e);
        }
    };
    let _ = writeln!(ready, "ok");
    drop(ready);
    let ending = service.supervise(&signals);
    let stopped = service.stop(ending);
    if let Err(e) = &stopped {
        tracing::error!(error = %e, "tracker ended");
    }
    stopped
}
