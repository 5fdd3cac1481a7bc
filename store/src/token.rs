//! Parsing tokens and `since` arguments.

use crate::error::StoreError;
use crate::model::{Since, Token};
use std::str::FromStr;

impl FromStr for Token {
    type Err = StoreError;

    /// Accepts exactly what `Display` writes (`<16 hex digits>:<decimal>`), so that a
    /// mark name can never be mistaken for a token or the other way round.
    fn from_str(s: &str) -> Result<Token, StoreError> {
        let bad = || StoreError::BadToken(s.to_owned());
        let (instance, seq) = s.split_once(':').ok_or_else(bad)?;
        if instance.len() != 16 || !instance.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        Ok(Token {
            instance: u64::from_str_radix(instance, 16).map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

/// Parses a `since` argument: `<16 hex>:<decimal>` is a token, anything else a mark
/// name (mark names that would parse as tokens are refused by `Store::mark`).
pub fn parse_since(s: &str) -> Since {
    match s.parse::<Token>() {
        Ok(t) => Since::Token(t),
        Err(_) => Since::Mark(s.to_owned()),
    }
}

/// Why a mark name is refused, if it is.
pub(crate) fn check_mark_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 256
        && !name.chars().any(|c| c.is_whitespace() || c.is_control())
        && name.parse::<Token>().is_err();
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadMarkName(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip() {
        for t in [
            Token {
                instance: 0,
                seq: 0,
            },
            Token {
                instance: u64::MAX,
                seq: u64::MAX,
            },
            Token {
                instance: 0x0123_4567_89ab_cdef,
                seq: 17,
            },
        ] {
            let s = t.to_string();
            assert_eq!(s.parse::<Token>().unwrap(), t, "{s}");
            assert_eq!(parse_since(&s), Since::Token(t));
        }
        assert_eq!(
            "0123456789ABCDEF:5".parse::<Token>().unwrap(),
            Token {
                instance: 0x0123_4567_89ab_cdef,
                seq: 5
            }
        );
    }

    #[test]
    fn bad_tokens() {
        for s in [
            "",
            ":",
            "0123456789abcdef",
            "0123456789abcdef:",
            "123:5",
            "0123456789abcdeg:5",
            "0123456789abcdef:+5",
            "0123456789abcdef:-5",
            "0123456789abcdef:5:6",
            "0123456789abcdef:99999999999999999999999",
            "+123456789abcdef:5",
        ] {
            assert!(
                matches!(s.parse::<Token>(), Err(StoreError::BadToken(ref x)) if x == s),
                "{s:?}"
            );
        }
        assert_eq!(
            parse_since("build-start"),
            Since::Mark("build-start".into())
        );
    }

    #[test]
    fn mark_names() {
        assert!(check_mark_name("build-start").is_ok());
        assert!(check_mark_name(&"x".repeat(256)).is_ok());
        for bad in [
            String::new(),
            "x".repeat(257),
            "a b".into(),
            "a\nb".into(),
            "a\u{a0}b".into(),
            "0123456789abcdef:1".into(),
        ] {
            assert!(matches!(
                check_mark_name(&bad),
                Err(StoreError::BadMarkName(_))
            ));
        }
    }
}
