use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TrackerError {
    #[error("fanotify needs root (CAP_SYS_ADMIN) to watch a filesystem: run as root")]
    NotRoot,
    #[error("the kernel lacks {feature}: {source}")]
    KernelFeature {
        feature: &'static str,
        source: std::io::Error,
    },
    #[error("cannot watch the filesystem holding {path}: {why}")]
    Unwatchable { path: PathBuf, why: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(
        "the tracker made no progress for {0:?} and did not see its sync cookie; events are not being delivered"
    )]
    SyncTimeout(std::time::Duration),
    #[error("the tracker stopped: {0}")]
    Stopped(String),
    #[error("cannot attach: {0}")]
    Attach(String),
    #[error("validate: {0}")]
    Validate(String),
    #[error("reset: {0}")]
    Reset(String),
    #[error("{0}")]
    Setup(String),
    #[error("control socket: {0}")]
    Protocol(String),
    /// The tracker answered with an error (it refused the caller, or the request
    /// failed there).
    #[error("{0}")]
    Answer(String),
}

impl TrackerError {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| TrackerError::Io { what, path, source }
    }
}
