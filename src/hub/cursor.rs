//! Cursors: a client's position in a topic, opaque to clients.
//!
//! A cursor names its topic (a stable hash of route name and topic), the topic's incarnation
//! (epoch) and a position (the sequence number of the last message delivered), and carries a
//! checksum. The hashes are stable across processes and versions, so a cursor from before a
//! restart is recognised as well formed but expired (410), never as garbage (400). The checksum
//! detects corruption, not forgery: a cursor grants nothing, it only says where a reader stands.
//!
//! Wire form: base64url (no padding) of `version u8 | binding u64 | epoch u64 | seq u64 |
//! check u32`, 39 characters of `[A-Za-z0-9_-]`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

const VERSION: u8 = 1;
const RAW_LEN: usize = 1 + 8 + 8 + 8 + 4;
/// Length of an encoded cursor.
pub const ENCODED_LEN: usize = 39;
/// Longest `cursor` a client may send (docs/protocol.md 1.1).
pub const CLIENT_MAX_LEN: usize = 256;

/// A decoded cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// Which (route, topic) it belongs to: [`binding`].
    pub binding: u64,
    /// The topic incarnation it was issued by.
    pub epoch: u64,
    /// Sequence number of the last message the holder has; 0 before the first.
    pub seq: u64,
}

/// What a client asked for in `cursor` (or `Last-Event-ID`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested {
    Earliest,
    Latest,
    At(Cursor),
}

/// Why a client's cursor text is not a cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    #[error("cursor is longer than 256 characters")]
    TooLong,
    #[error("cursor is malformed")]
    Malformed,
    #[error("cursor is corrupted (checksum mismatch)")]
    Corrupted,
}

impl Cursor {
    pub fn encode(&self) -> String {
        let mut raw = [0u8; RAW_LEN];
        raw[0] = VERSION;
        raw[1..9].copy_from_slice(&self.binding.to_be_bytes());
        raw[9..17].copy_from_slice(&self.epoch.to_be_bytes());
        raw[17..25].copy_from_slice(&self.seq.to_be_bytes());
        let check = fnv1a(&raw[..25]) as u32;
        raw[25..].copy_from_slice(&check.to_be_bytes());
        URL_SAFE_NO_PAD.encode(raw)
    }

    pub fn decode(text: &str) -> Result<Cursor, CursorError> {
        if text.len() > CLIENT_MAX_LEN {
            return Err(CursorError::TooLong);
        }
        if text.len() != ENCODED_LEN {
            return Err(CursorError::Malformed);
        }
        let mut raw = [0u8; RAW_LEN];
        let n = URL_SAFE_NO_PAD
            .decode_slice(text, &mut raw)
            .map_err(|_| CursorError::Malformed)?;
        if n != RAW_LEN || raw[0] != VERSION {
            return Err(CursorError::Malformed);
        }
        let check = u32::from_be_bytes(raw[25..].try_into().expect("4 bytes"));
        if check != fnv1a(&raw[..25]) as u32 {
            return Err(CursorError::Corrupted);
        }
        let word = |i: usize| u64::from_be_bytes(raw[i..i + 8].try_into().expect("8 bytes"));
        Ok(Cursor {
            binding: word(1),
            epoch: word(9),
            seq: word(17),
        })
    }
}

impl Requested {
    pub fn parse(text: &str) -> Result<Requested, CursorError> {
        match text {
            "earliest" => Ok(Requested::Earliest),
            "latest" => Ok(Requested::Latest),
            _ => Cursor::decode(text).map(Requested::At),
        }
    }
}

/// The binding of a (route, topic): FNV-1a over both, stable across processes and builds.
pub fn binding(route: &str, topic: &str) -> u64 {
    let mut h = FNV_OFFSET;
    for part in [route.as_bytes(), b"\0", topic.as_bytes()] {
        h = fnv1a_continue(h, part);
    }
    h
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_continue(FNV_OFFSET, bytes)
}

fn fnv1a_continue(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn encoded_form_is_url_safe_and_fixed_length() {
        let c = Cursor {
            binding: binding("news", "sport"),
            epoch: 7,
            seq: 42,
        };
        let text = c.encode();
        assert_eq!(text.len(), ENCODED_LEN);
        assert!(
            text.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(Cursor::decode(&text), Ok(c));
    }

    #[test]
    fn keywords_and_errors() {
        assert_eq!(Requested::parse("latest"), Ok(Requested::Latest));
        assert_eq!(Requested::parse("earliest"), Ok(Requested::Earliest));
        assert_eq!(Requested::parse("garbage"), Err(CursorError::Malformed));
        assert_eq!(
            Requested::parse(&"a".repeat(300)),
            Err(CursorError::TooLong)
        );
        assert_eq!(
            Requested::parse(&"A".repeat(39)),
            Err(CursorError::Malformed)
        );
    }

    #[test]
    fn bindings_differ_by_route_and_topic() {
        assert_ne!(binding("a", "bc"), binding("ab", "c"));
        assert_ne!(binding("news", "x"), binding("news", "y"));
        assert_eq!(binding("news", "x"), binding("news", "x"));
    }

    proptest! {
        #[test]
        fn roundtrip(binding: u64, epoch: u64, seq: u64) {
            let c = Cursor { binding, epoch, seq };
            prop_assert_eq!(Cursor::decode(&c.encode()), Ok(c));
        }

        #[test]
        fn any_single_bit_flip_is_detected(epoch: u64, seq: u64, byte in 0usize..RAW_LEN, bit in 0u8..8) {
            let text = Cursor { binding: 1, epoch, seq }.encode();
            let mut raw = URL_SAFE_NO_PAD.decode(&text).unwrap();
            raw[byte] ^= 1 << bit;
            let flipped = URL_SAFE_NO_PAD.encode(&raw);
            prop_assert!(Cursor::decode(&flipped).is_err());
        }

        #[test]
        fn arbitrary_text_never_panics(text in ".{0,300}") {
            let _ = Requested::parse(&text);
        }
    }
}
