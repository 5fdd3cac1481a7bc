//! The tracker: watches the filesystem holding an overlay's upper dir with fanotify and
//! keeps the changelog (`store`) equal to what changed in that upper dir.
//!
//! It knows nothing of terminals: callers get typed answers and errors.

pub mod classify;
pub mod control;
mod engine;
mod error;
pub mod fid;
pub mod mountinfo;
mod reader;
pub mod reset;
pub mod resolve;
pub mod runtime;
pub mod sys;
pub mod validate;

pub use engine::{Config, Layout, Status, Tracker};
pub use error::TrackerError;
