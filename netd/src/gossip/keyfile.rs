//! The keyring file (`--gossip-key-file`) that the operator or the orchestrator writes, parsed
//! strictly (pure), and applied to a running [`Keyring`].
//!
//! ```toml
//! # The key that seals from now on.
//! current = 2
//! # Every key accepted to open (the current one included), 32 bytes as 64 hex digits.
//! [[keys]]
//! id = 1
//! secret = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
//! [[keys]]
//! id = 2
//! secret = "…"
//! ```
//!
//! Rotation without a partition, in three writes of the file on every node (netd re-reads it
//! when it changes, no restart): (1) add the new key, `current` unchanged, on all nodes; (2) once
//! every node accepts it, make it `current`; (3) after a grace period, remove the old key.
//! Between (1) and (3) every node opens both keys, so no datagram is refused whatever the
//! order in which nodes pick up each write.
//!
//! Invariants: at most [`MAX_KEYS`] keys; `current` is one of them; ids are unique; key
//! material is never logged (errors name ids only).

use serde::Deserialize;

use super::crypto::{KEY_LEN, Keyring, KeyringError};

/// Keys accepted at once: rotation needs two; a few more tolerate overlapping rotations.
pub const MAX_KEYS: usize = 8;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyFile {
    current: u32,
    keys: Vec<RawKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: u32,
    secret: String,
}

impl std::fmt::Debug for RawKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawKey").field("id", &self.id).finish()
    }
}

/// A validated keyring file.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyFile {
    pub current: u32,
    keys: Vec<(u32, [u8; KEY_LEN])>,
}

impl std::fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyFile")
            .field("current", &self.current)
            .field("ids", &self.ids())
            .finish()
    }
}

/// Why a keyring file was refused. The previous keyring stays in force.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyFileError {
    #[error("keyring file is not valid TOML of the expected shape: {0}")]
    Syntax(String),
    #[error("keyring file has no keys; add a [[keys]] entry with id and secret")]
    Empty,
    #[error("keyring file has {0} keys; at most {MAX_KEYS} are accepted")]
    TooMany(usize),
    #[error("key id {0} appears twice in the keyring file")]
    DuplicateId(u32),
    #[error("key {id}: secret must be {expected} hex digits ({KEY_LEN} bytes)")]
    BadSecret { id: u32, expected: usize },
    #[error("current = {0}, but no key with that id is in the file")]
    CurrentMissing(u32),
    #[error(transparent)]
    Keyring(#[from] KeyringError),
}

impl KeyFile {
    /// Parses and validates the file's text.
    pub fn parse(text: &str) -> Result<Self, KeyFileError> {
        let raw: RawKeyFile =
            toml::from_str(text).map_err(|e| KeyFileError::Syntax(e.message().to_string()))?;
        if raw.keys.is_empty() {
            return Err(KeyFileError::Empty);
        }
        if raw.keys.len() > MAX_KEYS {
            return Err(KeyFileError::TooMany(raw.keys.len()));
        }
        let mut keys = Vec::with_capacity(raw.keys.len());
        for k in raw.keys {
            if keys.iter().any(|(id, _)| *id == k.id) {
                return Err(KeyFileError::DuplicateId(k.id));
            }
            let bad = KeyFileError::BadSecret {
                id: k.id,
                expected: 2 * KEY_LEN,
            };
            keys.push((k.id, decode_hex(k.secret.trim()).ok_or(bad)?));
        }
        if !keys.iter().any(|(id, _)| *id == raw.current) {
            return Err(KeyFileError::CurrentMissing(raw.current));
        }
        Ok(KeyFile {
            current: raw.current,
            keys,
        })
    }

    /// Key ids in the file, in file order.
    pub fn ids(&self) -> Vec<u32> {
        self.keys.iter().map(|(id, _)| *id).collect()
    }

    /// A new keyring holding exactly this file's keys, sealing with `current`.
    pub fn keyring(&self) -> Result<Keyring, KeyFileError> {
        let (_, cur) = self
            .keys
            .iter()
            .find(|(id, _)| *id == self.current)
            .ok_or(KeyFileError::CurrentMissing(self.current))?;
        let ring = Keyring::new(self.current, *cur);
        for (id, k) in &self.keys {
            ring.add(*id, *k)?;
        }
        Ok(ring)
    }

    /// Makes `ring` hold exactly this file's keys: add new ones, switch sealing, then remove
    /// the keys the file dropped (in that order, so the ring never lacks its sealing key). A
    /// known id with different material is refused before anything changes.
    pub fn apply(&self, ring: &Keyring) -> Result<(), KeyFileError> {
        let known = ring.ids();
        for (id, k) in self.keys.iter().filter(|(id, _)| known.contains(id)) {
            // For a known id, `add` changes nothing: the same material is a no-op, other
            // material an error. So this checks every known id before anything is added.
            ring.add(*id, *k)?;
        }
        for (id, k) in &self.keys {
            ring.add(*id, *k)?;
        }
        ring.use_for_sealing(self.current)?;
        for id in ring.ids() {
            if !self.keys.iter().any(|(k, _)| *k == id) {
                ring.remove(id)?;
            }
        }
        Ok(())
    }
}

fn decode_hex(s: &str) -> Option<[u8; KEY_LEN]> {
    let b = s.as_bytes();
    if b.len() != 2 * KEY_LEN {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; KEY_LEN];
    for (i, o) in out.iter_mut().enumerate() {
        *o = nibble(b[2 * i])? << 4 | nibble(b[2 * i + 1])?;
    }
    Some(out)
}

/// Renders a keyring file (for tests, benches and tooling that writes one).
pub fn render(current: u32, keys: &[(u32, [u8; KEY_LEN])]) -> String {
    let mut s = format!("current = {current}\n");
    for (id, k) in keys {
        let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
        s += &format!("[[keys]]\nid = {id}\nsecret = \"{hex}\"\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_render_roundtrip_and_refusals() {
        let text = render(2, &[(1, [1; KEY_LEN]), (2, [2; KEY_LEN])]);
        let f = KeyFile::parse(&text).unwrap();
        assert_eq!((f.current, f.ids()), (2, vec![1, 2]));
        assert!(
            !format!("{f:?}").contains("0101"),
            "no key material in Debug"
        );
        let ring = f.keyring().unwrap();
        assert_eq!((ring.sealing_id(), ring.ids()), (2, vec![2, 1]));

        assert!(matches!(
            KeyFile::parse("current = 1\nkeys = []\nextra = 1\n"),
            Err(KeyFileError::Syntax(_))
        ));
        assert_eq!(
            KeyFile::parse("current = 1\nkeys = []\n"),
            Err(KeyFileError::Empty)
        );
        assert_eq!(
            KeyFile::parse(&render(3, &[(1, [1; KEY_LEN])])),
            Err(KeyFileError::CurrentMissing(3))
        );
        assert_eq!(
            KeyFile::parse(&render(1, &[(1, [1; KEY_LEN]), (1, [2; KEY_LEN])])),
            Err(KeyFileError::DuplicateId(1))
        );
        assert_eq!(
            KeyFile::parse("current = 1\n[[keys]]\nid = 1\nsecret = \"abcd\"\n"),
            Err(KeyFileError::BadSecret {
                id: 1,
                expected: 64
            })
        );
        let many: Vec<(u32, [u8; KEY_LEN])> = (0..9).map(|i| (i, [i as u8; KEY_LEN])).collect();
        assert_eq!(
            KeyFile::parse(&render(0, &many)),
            Err(KeyFileError::TooMany(9))
        );
    }

    #[test]
    fn apply_follows_the_rotation_steps() {
        let a = [1; KEY_LEN];
        let b = [2; KEY_LEN];
        let ring = KeyFile::parse(&render(1, &[(1, a)]))
            .unwrap()
            .keyring()
            .unwrap();
        // (1) accept b, still seal with a.
        KeyFile::parse(&render(1, &[(1, a), (2, b)]))
            .unwrap()
            .apply(&ring)
            .unwrap();
        assert_eq!((ring.sealing_id(), ring.ids()), (1, vec![1, 2]));
        // (2) seal with b.
        KeyFile::parse(&render(2, &[(1, a), (2, b)]))
            .unwrap()
            .apply(&ring)
            .unwrap();
        assert_eq!(ring.sealing_id(), 2);
        // (3) drop a.
        KeyFile::parse(&render(2, &[(2, b)]))
            .unwrap()
            .apply(&ring)
            .unwrap();
        assert_eq!((ring.sealing_id(), ring.ids()), (2, vec![2]));
        // A known id with other material is refused and changes nothing.
        let e = KeyFile::parse(&render(3, &[(2, a), (3, a)]))
            .unwrap()
            .apply(&ring)
            .unwrap_err();
        assert_eq!(
            e,
            KeyFileError::Keyring(KeyringError::DuplicateId { id: 2 })
        );
        assert_eq!((ring.sealing_id(), ring.ids()), (2, vec![2]));
    }
}
