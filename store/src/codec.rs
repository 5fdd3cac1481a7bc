//! The one place where records become bytes and back.
//!
//! Every value starts with a format-version byte so that a future layout change can be
//! recognised (and refused or migrated) instead of being misread as garbage.

use crate::error::StoreError;
use bincode::config::{Configuration, standard};
use serde::{Serialize, de::DeserializeOwned};

/// Version of the on-disk record layout written by this build.
pub const FORMAT_VERSION: u8 = 1;

/// Largest record `decode` accepts: a garbage length prefix must not make us allocate
/// gigabytes. Records hold a path (< 4 KiB) and a command line (< ARG_MAX, a few MiB).
const DECODE_LIMIT: usize = 64 << 20;

/// bincode 2's standard layout (varint integers, little endian).
fn config() -> Configuration {
    standard()
}

/// Encodes `v` behind the format-version byte.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    bincode::serde::encode_into_std_write(v, &mut out, config()).expect(
        "bincode only fails to encode sequences of unknown length or failing writers; \
         our records are plain derives and a Vec writer cannot fail",
    );
    out
}

/// Decodes a value written by `encode`, refusing other format versions, truncated
/// records and trailing bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    let (&version, rest) = bytes.split_first().ok_or_else(|| StoreError::Corrupt {
        what: "empty record".to_owned(),
    })?;
    if version != FORMAT_VERSION {
        return Err(StoreError::Format {
            found: version,
            expected: FORMAT_VERSION,
        });
    }
    let (value, used) =
        bincode::serde::decode_from_slice(rest, config().with_limit::<DECODE_LIMIT>()).map_err(
            |e| StoreError::Corrupt {
                what: format!("undecodable record: {e}"),
            },
        )?;
    if used != rest.len() {
        return Err(StoreError::Corrupt {
            what: format!("record has {} trailing bytes", rest.len() - used),
        });
    }
    Ok(value)
}

/// Big-endian so that sled's byte order is numeric order.
pub fn u64_key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

/// Reads a key written by `u64_key`.
pub fn key_u64(key: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(key)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            what: format!("key of {} bytes where an 8-byte number belongs", key.len()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Token;

    #[test]
    fn round_trip() {
        let t = Token {
            instance: 0xdead_beef,
            seq: 42,
        };
        let bytes = encode(&t);
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode::<Token>(&bytes).unwrap(), t);
    }

    #[test]
    fn refuses_other_versions_and_garbage() {
        let mut bytes = encode(&7u64);
        bytes[0] = 9;
        assert!(matches!(
            decode::<u64>(&bytes),
            Err(StoreError::Format {
                found: 9,
                expected: FORMAT_VERSION
            })
        ));
        assert!(matches!(
            decode::<u64>(&[]),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            decode::<u64>(&[FORMAT_VERSION]),
            Err(StoreError::Corrupt { .. })
        ));
        let mut long = encode(&7u64);
        long.push(0);
        assert!(matches!(
            decode::<u64>(&long),
            Err(StoreError::Corrupt { .. })
        ));
        // A huge claimed length must fail cleanly, not allocate.
        assert!(matches!(
            decode::<Vec<u8>>(&[
                FORMAT_VERSION,
                0xfd,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0x7f
            ]),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn keys_sort_numerically() {
        assert!(u64_key(255) < u64_key(256));
        assert_eq!(key_u64(&u64_key(1 << 40)).unwrap(), 1 << 40);
        assert!(matches!(key_u64(b"abc"), Err(StoreError::Corrupt { .. })));
    }
}
