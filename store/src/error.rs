//! Errors of the changelog: one clear line each, because they end up in front of the
//! people running builds, not of the people who wrote the tracker.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled allows one process per database (it takes a file lock), so a second
    /// opener must be told who probably holds it instead of seeing an io error.
    #[error("changelog {} is in use by another process (a running tracker?)", path.display())]
    Locked { path: PathBuf },
    #[error("cannot open changelog {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("changelog database error: {0}")]
    Db(#[from] sled::Error),
    #[error("changelog transaction failed: {0}")]
    Transaction(String),
    #[error("changelog is corrupt: {what}")]
    Corrupt { what: String },
    #[error("changelog record has format version {found}, this build reads version {expected}")]
    Format { found: u8, expected: u8 },
    #[error("no mark named {0:?}")]
    UnknownMark(String),
    #[error("not a token: {0:?} (a token is <16 hex digits>:<decimal seq>)")]
    BadToken(String),
    #[error("bad glob {glob:?}: {source}")]
    BadGlob {
        glob: String,
        #[source]
        source: globset::Error,
    },
    #[error(
        "bad mark name {0:?}: a mark name is 1 to 256 bytes, has no whitespace or control characters and does not look like a token"
    )]
    BadMarkName(String),
    /// The kernel never produces an empty path or one holding NUL, so either is a bug
    /// of the caller, refused before it reaches the changelog.
    #[error("bad path \"{}\": {why}", path.escape_ascii())]
    BadPath { path: Vec<u8>, why: &'static str },
}

impl StoreError {
    /// Prefixes a `Corrupt` error with where the bad record was found.
    pub(crate) fn context(self, place: impl std::fmt::Display) -> StoreError {
        match self {
            StoreError::Corrupt { what } => StoreError::Corrupt {
                what: format!("{place}: {what}"),
            },
            other => other,
        }
    }
}
