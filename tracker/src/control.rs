//! The control socket: how other processes (the CLI inside the runtime, spk) ask a
//! running tracker, which alone may open the changelog (sled allows one process).
//!
//! Frames are a 4-byte big-endian length then a bincode payload. Requests are capped
//! at `MAX_REQUEST` bytes; a frame over the cap or one that does not decode gets an
//! error reply, and the tracker keeps serving everyone else.

use crate::{Status, Tracker, TrackerError};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::{ChangeSet, LogRecord, Query, Token};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// Largest request the tracker reads.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Largest answer a client accepts (a net state of millions of paths fits).
pub const MAX_RESPONSE: usize = 1 << 30;
/// Bumped whenever Request or Response change shape.
const PROTOCOL_VERSION: u8 = 1;

/// Where a tracked runtime is, for clients that must act in its mount namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeInfo {
    /// The overlay's mount point, in the runtime's namespace.
    pub mount_point: PathBuf,
    /// A process in the runtime's mount namespace.
    pub pid: u32,
    /// Inode of that mount namespace.
    pub mount_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Changes(Query),
    History(Vec<u8>),
    Mark(String),
    Sync,
    Status,
    Stop,
    Runtime,
    /// The changes `reset` would put back for these patterns.
    ResetPlan(Vec<String>),
    /// The sender (pid) starts editing the upper dir: log its changes as a reset.
    ResetBegin(u32),
    ResetEnd(u32),
    Validate(crate::validate::Request),
    /// The changes compared as `spfs diff` compares them (last: older clients keep
    /// their variant numbers); with the writers' command lines when asked (they can
    /// be most of the answer).
    Diff(Query, bool),
    /// Reset these patterns on the sender's behalf: the tracker (root) runs its reset
    /// helper, which unmounts and mounts the overlay as the runtime's owner may not.
    ResetFor(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Changes(ChangeSet),
    History(Vec<LogRecord>),
    Token(Token),
    Status(Box<Status>),
    Runtime(RuntimeInfo),
    ResetPlan(crate::reset::ResetPlan),
    Validation(Box<crate::validate::Report>),
    Done,
    Stopping,
    Error(String),
    Diff(Box<crate::diff::DiffSet>),
    /// What the reset helper printed, and its exit code.
    Helped {
        code: i32,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
    },
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![0u8; 5];
    out[4] = PROTOCOL_VERSION;
    // Serializing these plain enums into a Vec cannot fail.
    let body = bincode::serde::encode_to_vec(v, bincode::config::standard())
        .expect("control messages always serialize");
    out.extend_from_slice(&body);
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
    match payload.split_first() {
        Some((&PROTOCOL_VERSION, body)) => {
            bincode::serde::decode_from_slice(body, bincode::config::standard())
                .map(|(v, _)| v)
                .map_err(|e| format!("malformed frame: {e}"))
        }
        Some((v, _)) => Err(format!(
            "protocol version {v} is not spoken here (expected {PROTOCOL_VERSION})"
        )),
        None => Err("empty frame".into()),
    }
}

/// A running control socket server; dropping it stops serving.
pub struct Server {
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    stop_requests: std::sync::mpsc::Receiver<()>,
    path: PathBuf,
    runtime: Arc<Mutex<RuntimeInfo>>,
}

impl Server {
    /// Serves `tracker` on a Unix socket at `path`, answering root and `owner_uid`.
    pub fn start(
        tracker: Arc<Tracker>,
        path: &Path,
        owner_uid: u32,
        runtime: RuntimeInfo,
    ) -> Result<Server, TrackerError> {
        let runtime_info = Arc::new(Mutex::new(runtime));
        let served_runtime = runtime_info.clone();
        let served_socket = Arc::new(path.to_path_buf());
        let _ = std::fs::remove_file(path);
        let std_listener = std::os::unix::net::UnixListener::bind(path)
            .map_err(TrackerError::io("cannot listen on", path))?;
        // Anyone may connect; who may be answered is decided by peer credentials.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .map_err(TrackerError::io("cannot open up", path))?;
        std_listener
            .set_nonblocking(true)
            .map_err(TrackerError::io("cannot listen on", path))?;
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel();
        let executor = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(TrackerError::io(
                "cannot start the socket runtime for",
                path,
            ))?;
        let thread = std::thread::Builder::new()
            .name("spfs-changes-control".into())
            .spawn(move || {
                executor.block_on(async move {
                    let listener = match tokio::net::UnixListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "control socket");
                            return;
                        }
                    };
                    let (stop_async_tx, mut stop_async_rx) = mpsc::unbounded_channel();
                    let connections = Connections::default();
                    let mut backoff = Duration::ZERO;
                    let mut refused = RateLimited::default();
                    let mut failed = RateLimited::default();
                    tokio::pin!(shutdown_rx);
                    loop {
                        tokio::select! {
                            _ = &mut shutdown_rx => break,
                            Some(()) = stop_async_rx.recv() => { let _ = stop_tx.send(()); }
                            accepted = listener.accept() => match accepted {
                                Ok((stream, _)) => {
                                    backoff = Duration::ZERO;
                                    let uid = stream.peer_cred().map_or(u32::MAX, |c| c.uid());
                                    let Some(held) = connections.admit(uid) else {
                                        refused.note(|n| tracing::warn!(uid, refused = n, "too many connections to the control socket: refused"));
                                        continue;
                                    };
                                    let serve = serve_client(stream, tracker.clone(), served_runtime.clone(), served_socket.clone(), owner_uid, stop_async_tx.clone());
                                    tokio::spawn(async move {
                                        serve.await;
                                        drop(held);
                                    });
                                }
                                // Out of descriptors (or another transient failure): the
                                // pending connection stays queued, so retrying at once
                                // would spin; wait for connections to close.
                                Err(e) => {
                                    failed.note(|n| tracing::warn!(error = %e, failures = n, "accept on control socket"));
                                    backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                                    tokio::time::sleep(backoff).await;
                                }
                            }
                        }
                    }
                });
            })
            .map_err(TrackerError::io("cannot start the socket thread for", path))?;
        Ok(Server {
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
            stop_requests: stop_rx,
            path: path.to_path_buf(),
            runtime: runtime_info,
        })
    }

    /// The runtime moved on (another witness process): tell clients from now on.
    pub fn set_runtime(&self, info: RuntimeInfo) {
        if let Ok(mut r) = self.runtime.lock() {
            *r = info;
        }
    }

    /// Waits up to `timeout` for a client's `Stop`; true when one came.
    pub fn stop_requested(&self, timeout: Duration) -> bool {
        self.stop_requests.recv_timeout(timeout).is_ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Connections served at once, in all and per user other than root: a runtime's owner
/// holding connections open must not use up the tracker's descriptors.
const MAX_CONNECTIONS: usize = 256;
const MAX_CONNECTIONS_PER_USER: usize = 32;

/// Open connections by peer uid.
#[derive(Default, Clone)]
struct Connections {
    open: Arc<Mutex<std::collections::HashMap<u32, usize>>>,
}

/// One admitted connection; counted until dropped.
struct Held {
    connections: Connections,
    uid: u32,
}

impl Connections {
    /// Counts a connection of `uid`, unless it would pass a limit.
    fn admit(&self, uid: u32) -> Option<Held> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = open.values().sum();
        let mine = open.get(&uid).copied().unwrap_or(0);
        if total >= MAX_CONNECTIONS || (uid != 0 && mine >= MAX_CONNECTIONS_PER_USER) {
            return None;
        }
        open.insert(uid, mine + 1);
        Some(Held {
            connections: self.clone(),
            uid,
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut open = self
            .connections
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

/// Logs a repeated condition at most every 10 s, with how often it happened since.
#[derive(Default)]
struct RateLimited {
    last: Option<std::time::Instant>,
    count: u64,
}

impl RateLimited {
    fn note(&mut self, log: impl FnOnce(u64)) {
        self.count += 1;
        if self
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            log(self.count);
            self.count = 0;
            self.last = Some(std::time::Instant::now());
        }
    }
}

async fn serve_client(
    mut stream: tokio::net::UnixStream,
    tracker: Arc<Tracker>,
    runtime: Arc<Mutex<RuntimeInfo>>,
    socket: Arc<PathBuf>,
    owner_uid: u32,
    stop: mpsc::UnboundedSender<()>,
) {
    let cred = stream.peer_cred();
    // The kernel's word for who is asking (in this process's pid namespace), not the
    // client's: a reset marks what that process does.
    let peer_pid = cred
        .as_ref()
        .ok()
        .and_then(|c| c.pid())
        .and_then(|p| u32::try_from(p).ok());
    let allowed = match cred {
        Ok(cred) if cred.uid() == 0 || cred.uid() == owner_uid => Ok(()),
        Ok(cred) => Err(format!(
            "uid {} may not use this tracker (only root and uid {owner_uid})",
            cred.uid()
        )),
        Err(e) => Err(format!("cannot read peer credentials: {e}")),
    };
    if let Err(why) = allowed {
        let _ = stream.write_all(&encode(&Response::Error(why))).await;
        return;
    }
    let mut resetting = None;
    serve_requests(
        &mut stream,
        &tracker,
        &runtime,
        &socket,
        &stop,
        peer_pid,
        &mut resetting,
    )
    .await;
    // A client that ends (or dies) in the middle of a reset ends it: its pid may be
    // another process's later.
    if let Some(pid) = resetting {
        tracker.abandon_reset(pid);
    }
}

async fn serve_requests(
    stream: &mut tokio::net::UnixStream,
    tracker: &Arc<Tracker>,
    runtime: &Arc<Mutex<RuntimeInfo>>,
    socket: &Path,
    stop: &mpsc::UnboundedSender<()>,
    peer_pid: Option<u32>,
    resetting: &mut Option<u32>,
) {
    loop {
        let mut len = [0u8; 4];
        if stream.read_exact(&mut len).await.is_err() {
            return;
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_REQUEST {
            let why = format!("frame of {len} bytes exceeds the {MAX_REQUEST}-byte limit");
            let _ = stream.write_all(&encode(&Response::Error(why))).await;
            // The stream cannot be resynchronised past an unread frame.
            return;
        }
        let mut payload = vec![0u8; len];
        if stream.read_exact(&mut payload).await.is_err() {
            return;
        }
        let response = match decode::<Request>(&payload) {
            Err(why) => Response::Error(why),
            Ok(Request::Stop) => {
                let _ = stop.send(());
                Response::Stopping
            }
            Ok(Request::Runtime) => match runtime.lock() {
                Ok(info) => Response::Runtime(info.clone()),
                Err(_) => Response::Error("runtime information is unavailable".into()),
            },
            Ok(Request::ResetFor(patterns)) => {
                let socket = socket.to_path_buf();
                tokio::task::spawn_blocking(move || reset_for(&socket, &patterns))
                    .await
                    .unwrap_or_else(|e| Response::Error(format!("request failed: {e}")))
            }
            Ok(req) => {
                let req = match req {
                    Request::ResetBegin(pid) => {
                        let pid = peer_pid.unwrap_or(pid);
                        *resetting = Some(pid);
                        Request::ResetBegin(pid)
                    }
                    Request::ResetEnd(pid) => {
                        let pid = peer_pid.unwrap_or(pid);
                        *resetting = None;
                        Request::ResetEnd(pid)
                    }
                    other => other,
                };
                let tracker = tracker.clone();
                tokio::task::spawn_blocking(move || answer(&tracker, req))
                    .await
                    .unwrap_or_else(|e| Response::Error(format!("request failed: {e}")))
            }
        };
        if stream.write_all(&encode(&response)).await.is_err() {
            return;
        }
    }
}

fn answer(tracker: &Tracker, req: Request) -> Response {
    let result = match req {
        Request::Changes(q) => tracker.query(&q).map(Response::Changes),
        Request::Diff(q, commands) => tracker.diff(&q).map(|mut d| {
            if !commands {
                for c in d.entries.iter_mut().filter_map(|e| e.change.as_mut()) {
                    if let Some(o) = c.origin.as_mut() {
                        o.command = Vec::new();
                    }
                }
            }
            Response::Diff(Box::new(d))
        }),
        Request::History(path) => tracker
            .sync()
            .and_then(|_| Ok(tracker.store().history(&path)?))
            .map(Response::History),
        Request::Mark(name) => tracker.mark(&name).map(Response::Token),
        Request::Sync => tracker.sync().map(Response::Token),
        Request::Status => tracker
            .sync()
            .and_then(|_| tracker.status())
            .map(|s| Response::Status(Box::new(s))),
        Request::ResetPlan(patterns) => tracker.reset_plan(&patterns).map(Response::ResetPlan),
        Request::Validate(request) => tracker
            .validate(&request)
            .map(|r| Response::Validation(Box::new(r))),
        Request::ResetBegin(pid) => tracker.begin_reset(pid).map(|_| Response::Done),
        Request::ResetEnd(pid) => tracker.end_reset(pid).map(Response::Token),
        // Answered without the tracker.
        Request::Stop | Request::Runtime | Request::ResetFor(_) => Ok(Response::Done),
    };
    result.unwrap_or_else(|e| Response::Error(e.to_string()))
}

/// The program a tracker runs (as root) to reset on behalf of a runtime's owner:
/// `HELPER reset --socket SOCKET -- PATTERN...`. Set once by the program that starts
/// trackers (the `spfs-changes` binary sets itself); unset, such requests are refused.
pub static RESET_HELPER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Runs the reset helper against this tracker's own socket and hands back what it said.
fn reset_for(socket: &Path, patterns: &[String]) -> Response {
    let Some(helper) = RESET_HELPER.get() else {
        return Response::Error(
            "this tracker cannot reset for its runtime's owner: it was started without a reset helper".into(),
        );
    };
    let out = std::process::Command::new(helper)
        .arg("reset")
        .arg("--socket")
        .arg(socket)
        .arg("--")
        .args(patterns)
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        Ok(out) => Response::Helped {
            code: out.status.code().unwrap_or(1),
            stdout: out.stdout,
            stderr: out.stderr,
        },
        Err(e) => Response::Error(format!("cannot run {}: {e}", helper.display())),
    }
}

/// A blocking client, for the CLI and for tools such as spk.
pub struct Client {
    stream: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, TrackerError> {
        let stream = UnixStream::connect(path)
            .map_err(TrackerError::io("cannot connect to tracker at", path))?;
        Ok(Client { stream })
    }

    /// Sends one request and reads its answer; an `Error` answer becomes `Err`.
    pub fn call(&mut self, req: &Request) -> Result<Response, TrackerError> {
        let proto = |e: std::io::Error| TrackerError::Protocol(e.to_string());
        // A refusing server answers and hangs up before reading: its answer is still
        // there to read after our write fails.
        let written = self.stream.write_all(&encode(req));
        let answer = self.read_answer();
        match (answer, written) {
            (Ok(Response::Error(why)), _) => Err(TrackerError::Answer(why)),
            (Ok(r), Ok(())) => Ok(r),
            (_, Err(e)) => Err(proto(e)),
            (Err(e), Ok(())) => Err(e),
        }
    }

    fn read_answer(&mut self) -> Result<Response, TrackerError> {
        let proto = |e: std::io::Error| TrackerError::Protocol(e.to_string());
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).map_err(proto)?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_RESPONSE {
            return Err(TrackerError::Protocol(format!(
                "answer of {len} bytes is too large"
            )));
        }
        let mut payload = vec![0u8; len];
        self.stream.read_exact(&mut payload).map_err(proto)?;
        decode::<Response>(&payload).map_err(TrackerError::Protocol)
    }

    /// Sends raw bytes, for tests of the server's handling of bad frames.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<Response, TrackerError> {
        let written = self.stream.write_all(bytes);
        match (self.read_answer(), written) {
            (Ok(r), _) => Ok(r),
            (Err(_), Err(e)) => Err(TrackerError::Protocol(e.to_string())),
            (Err(e), Ok(())) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_reject_garbage() {
        let req = Request::Changes(Query {
            since: Some(store::Since::Mark("build-start".into())),
            prefixes: vec![b"a\nb".to_vec()],
            globs: vec!["*.so".into()],
        });
        let frame = encode(&req);
        assert_eq!(
            u32::from_be_bytes(frame[..4].try_into().expect("4 bytes")) as usize,
            frame.len() - 4
        );
        assert_eq!(decode::<Request>(&frame[4..]), Ok(req));
        assert!(decode::<Request>(&[]).is_err());
        assert!(
            decode::<Request>(&[9, 1, 2])
                .unwrap_err()
                .contains("version 9")
        );
        assert!(decode::<Request>(&[PROTOCOL_VERSION, 0xff, 0xff, 0xff]).is_err());
    }
}
