//! The spfs-changes changelog: an ordered log of observed changes, the net state of
//! every path relative to the lower layers, named marks and tokens, in sled.
//!
//! It knows nothing of the kernel: the tracker observes, computes net states and hands
//! them over in `Batch`es; the store keeps them consistent and answers queries in
//! O(changes) instead of O(files in the runtime).

pub mod codec;
pub mod error;
pub mod model;

mod changelog;
mod commands;
mod pathmap;
mod query;
mod token;

pub use changelog::{DB_DIR_NAME, MarkRecords, SEAL_NAME, Store, set_aside_damaged};
pub use error::StoreError;
pub use model::*;
pub use query::Filter;
pub use token::parse_since;

#[cfg(test)]
mod tests;
