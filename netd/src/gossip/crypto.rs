//! The cluster keyring and the sealed datagram framing (pure: no I/O).
//!
//! Every gossip datagram on the wire is one *frame*:
//!
//! ```text
//! offset size field
//!      0    2 magic "SN"
//!      2    1 format version (1)
//!      3    4 key id (big endian)
//!      7    8 session: random per opened socket (the sender's replay identity)
//!     15    8 counter: per session, strictly increasing, never reused
//!     23    8 sender clock, unix milliseconds (freshness bound against replays of old sessions)
//!     31    1 fragment index
//!     32    1 fragment count (1..=255)
//!     33    … XChaCha20-Poly1305 ciphertext of the payload, then its 16-byte tag
//! ```
//!
//! The 33-byte header is the associated data, so every field is authenticated. The 24-byte
//! nonce is `session ‖ counter ‖ 0⁸`: unique per key as long as sessions are random and
//! counters never repeat, which [`Sealer`] guarantees.
//!
//! Replay protection ([`ReplayGuard`]) keeps per session the highest counter seen and a
//! 1024-wide sliding window below it, plus a freshness bound on the sender clock so a replay
//! of a session the guard has forgotten is refused too. It is updated only after the tag
//! verified, so forged datagrams cannot move a window.
//!
//! Invariants: a key is accepted to open before it is used to seal (rotation is add → switch →
//! remove); the sealing key cannot be removed; key material never appears in `Debug` output.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};

/// Frame magic.
pub const MAGIC: [u8; 2] = *b"SN";
/// Frame format version.
pub const FORMAT_VERSION: u8 = 1;
/// Header length (the associated data).
pub const HEADER_LEN: usize = 33;
/// Poly1305 tag length.
pub const TAG_LEN: usize = 16;
/// Bytes a frame adds to its payload.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// Key length (256 bits).
pub const KEY_LEN: usize = 32;

/// What can go wrong managing keys.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyringError {
    #[error("key id {id} is already in the keyring with different material; pick a new id")]
    DuplicateId { id: u32 },
    #[error("key id {id} is not in the keyring; add it first")]
    UnknownId { id: u32 },
    #[error("key id {id} is the sealing key; switch sealing to another key before removing it")]
    RemovingSealingKey { id: u32 },
    #[error("a cluster key is {expected} bytes, got {got}")]
    BadLength { expected: usize, got: usize },
}

/// Why a datagram was refused. Each kind has its own counter.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum OpenError {
    #[error("datagram of {len} bytes is shorter than a frame")]
    TooShort { len: usize },
    #[error("not a swarmnet gossip frame (bad magic or version)")]
    BadMagic,
    #[error("bad fragment fields {index}/{count}")]
    BadFragment { index: u8, count: u8 },
    #[error("sealed under key id {id}, which is not in the keyring")]
    UnknownKey { id: u32 },
    #[error("authentication failed (wrong key or tampered datagram)")]
    Auth,
    #[error("replayed datagram (session {session:x}, counter {counter})")]
    Replay { session: u64, counter: u64 },
    #[error("sender clock {sent_ms} ms is more than the freshness bound away from ours ({now_ms})")]
    Stale { sent_ms: u64, now_ms: u64 },
    #[error("too many concurrent sender sessions; datagram from a new session dropped")]
    SessionTableFull,
}

/// The authenticated header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub key_id: u32,
    pub session: u64,
    pub counter: u64,
    pub sent_ms: u64,
    pub frag_index: u8,
    pub frag_count: u8,
}

impl FrameHeader {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..2].copy_from_slice(&MAGIC);
        h[2] = FORMAT_VERSION;
        h[3..7].copy_from_slice(&self.key_id.to_be_bytes());
        h[7..15].copy_from_slice(&self.session.to_be_bytes());
        h[15..23].copy_from_slice(&self.counter.to_be_bytes());
        h[23..31].copy_from_slice(&self.sent_ms.to_be_bytes());
        h[31] = self.frag_index;
        h[32] = self.frag_count;
        h
    }

    /// Parses the header of a datagram (not yet authenticated).
    pub fn parse(datagram: &[u8]) -> Result<Self, OpenError> {
        if datagram.len() < OVERHEAD {
            return Err(OpenError::TooShort {
                len: datagram.len(),
            });
        }
        if datagram[0..2] != MAGIC || datagram[2] != FORMAT_VERSION {
            return Err(OpenError::BadMagic);
        }
        let u64_at = |o: usize| u64::from_be_bytes(datagram[o..o + 8].try_into().unwrap());
        let h = FrameHeader {
            key_id: u32::from_be_bytes(datagram[3..7].try_into().unwrap()),
            session: u64_at(7),
            counter: u64_at(15),
            sent_ms: u64_at(23),
            frag_index: datagram[31],
            frag_count: datagram[32],
        };
        if h.frag_count == 0 || h.frag_index >= h.frag_count {
            return Err(OpenError::BadFragment {
                index: h.frag_index,
                count: h.frag_count,
            });
        }
        Ok(h)
    }

    fn nonce(&self) -> XNonce {
        let mut n = [0u8; 24];
        n[0..8].copy_from_slice(&self.session.to_be_bytes());
        n[8..16].copy_from_slice(&self.counter.to_be_bytes());
        XNonce::from(n)
    }
}

struct Entry {
    id: u32,
    material: [u8; KEY_LEN],
    cipher: XChaCha20Poly1305,
}

#[derive(Default)]
struct Inner {
    keys: Vec<Entry>,
    sealing: u32,
}

/// The cluster keys, shared by every socket of a node (cheap to clone; rotation through any
/// clone is seen by all at once).
///
/// Rotation without a partition: [`Keyring::add`] the new key on every node (accepted to
/// open, not used), then [`Keyring::use_for_sealing`] it (in any order across nodes: every
/// node already accepts it), then after a grace period longer than the orchestrator's
/// distribution delay [`Keyring::remove`] the old one.
#[derive(Clone)]
pub struct Keyring {
    inner: Arc<RwLock<Inner>>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("Keyring")
            .field("ids", &inner.keys.iter().map(|e| e.id).collect::<Vec<_>>())
            .field("sealing", &inner.sealing)
            .finish()
    }
}

impl Keyring {
    /// A keyring holding one key, used to seal.
    pub fn new(id: u32, key: [u8; KEY_LEN]) -> Self {
        let inner = Inner {
            keys: vec![Entry {
                id,
                material: key,
                cipher: XChaCha20Poly1305::new(&key.into()),
            }],
            sealing: id,
        };
        Keyring {
            inner: Arc::new(RwLock::new(inner)),
        }
    }

    /// Parses key material from a slice (e.g. decoded from the orchestrator's message).
    pub fn key_from_slice(bytes: &[u8]) -> Result<[u8; KEY_LEN], KeyringError> {
        bytes
            .try_into()
            .map_err(|_wrong_len| KeyringError::BadLength {
                expected: KEY_LEN,
                got: bytes.len(),
            })
    }

    /// Accepts `key` to open datagrams; sealing is unchanged. Adding the same id with the same
    /// material again is a no-op (idempotent).
    pub fn add(&self, id: u32, key: [u8; KEY_LEN]) -> Result<(), KeyringError> {
        let mut inner = self.write();
        if let Some(e) = inner.keys.iter().find(|e| e.id == id) {
            return if e.material == key {
                Ok(())
            } else {
                Err(KeyringError::DuplicateId { id })
            };
        }
        inner.keys.push(Entry {
            id,
            material: key,
            cipher: XChaCha20Poly1305::new(&key.into()),
        });
        Ok(())
    }

    /// Seals with key `id` from now on.
    pub fn use_for_sealing(&self, id: u32) -> Result<(), KeyringError> {
        let mut inner = self.write();
        if !inner.keys.iter().any(|e| e.id == id) {
            return Err(KeyringError::UnknownId { id });
        }
        inner.sealing = id;
        Ok(())
    }

    /// Stops accepting key `id`. Removing an absent key is Ok.
    pub fn remove(&self, id: u32) -> Result<(), KeyringError> {
        let mut inner = self.write();
        if inner.sealing == id {
            return Err(KeyringError::RemovingSealingKey { id });
        }
        inner.keys.retain(|e| e.id != id);
        Ok(())
    }

    /// The id of the key that seals.
    pub fn sealing_id(&self) -> u32 {
        self.read().sealing
    }

    /// Ids accepted to open, in the order they were added.
    pub fn ids(&self) -> Vec<u32> {
        self.read().keys.iter().map(|e| e.id).collect()
    }

    /// Seals one frame under the sealing key. `header.key_id` is overwritten with it.
    pub fn seal(&self, mut header: FrameHeader, payload: &[u8]) -> Vec<u8> {
        let inner = self.read();
        header.key_id = inner.sealing;
        let entry = inner
            .keys
            .iter()
            .find(|e| e.id == inner.sealing)
            .expect("the sealing key is always in the ring (remove refuses it)");
        let aad = header.encode();
        let ct = entry
            .cipher
            .encrypt(
                &header.nonce(),
                Payload {
                    msg: payload,
                    aad: &aad,
                },
            )
            .expect("XChaCha20-Poly1305 encrypts any payload below 256 GiB");
        let mut out = Vec::with_capacity(HEADER_LEN + ct.len());
        out.extend_from_slice(&aad);
        out.extend_from_slice(&ct);
        out
    }

    /// Authenticates and decrypts one frame. Replay is *not* checked here (see
    /// [`ReplayGuard`]): call it with the returned header.
    pub fn open(&self, datagram: &[u8]) -> Result<(FrameHeader, Vec<u8>), OpenError> {
        let header = FrameHeader::parse(datagram)?;
        let inner = self.read();
        let entry = inner
            .keys
            .iter()
            .find(|e| e.id == header.key_id)
            .ok_or(OpenError::UnknownKey { id: header.key_id })?;
        let plain = entry
            .cipher
            .decrypt(
                &header.nonce(),
                Payload {
                    msg: &datagram[HEADER_LEN..],
                    aad: &datagram[..HEADER_LEN],
                },
            )
            .map_err(|_aead_error_is_opaque| OpenError::Auth)?;
        Ok((header, plain))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the ring half-updated (every write is
        // one push/retain/assignment), so a poisoned lock is still consistent.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Issues frame headers for one socket: a random session and a strictly increasing counter.
#[derive(Debug)]
pub struct Sealer {
    session: u64,
    next_counter: u64,
}

impl Sealer {
    pub fn new(session: u64) -> Self {
        Sealer {
            session,
            next_counter: 1,
        }
    }

    pub fn session(&self) -> u64 {
        self.session
    }

    /// The next header (key id filled in by [`Keyring::seal`]).
    pub fn next_header(&mut self, sent_ms: u64, frag_index: u8, frag_count: u8) -> FrameHeader {
        let counter = self.next_counter;
        self.next_counter += 1;
        FrameHeader {
            key_id: 0,
            session: self.session,
            counter,
            sent_ms,
            frag_index,
            frag_count,
        }
    }
}

/// Width of the per-session sliding window, in counters.
pub const REPLAY_WINDOW: u64 = 1024;
const WINDOW_WORDS: usize = (REPLAY_WINDOW / 64) as usize;

#[derive(Debug)]
struct SessionWindow {
    top: u64,
    /// Bit `i` set: counter `top - i` was seen.
    bits: [u64; WINDOW_WORDS],
    last_seen_ms: u64,
}

impl SessionWindow {
    fn seen(&self, counter: u64) -> bool {
        if counter > self.top {
            return false;
        }
        let back = self.top - counter;
        if back >= REPLAY_WINDOW {
            return true; // too old to tell: treat as replay
        }
        self.bits[(back / 64) as usize] & (1 << (back % 64)) != 0
    }

    fn mark(&mut self, counter: u64) {
        if counter > self.top {
            let shift = counter - self.top;
            if shift >= REPLAY_WINDOW {
                self.bits = [0; WINDOW_WORDS];
            } else {
                shift_left(&mut self.bits, shift as u32);
            }
            self.top = counter;
        }
        let back = self.top - counter;
        self.bits[(back / 64) as usize] |= 1 << (back % 64);
    }
}

/// Shifts a little-endian multiword bitmap left by `n < REPLAY_WINDOW` bits.
fn shift_left(bits: &mut [u64; WINDOW_WORDS], n: u32) {
    let words = (n / 64) as usize;
    let rem = n % 64;
    for i in (0..WINDOW_WORDS).rev() {
        let mut v = if i >= words {
            bits[i - words] << rem
        } else {
            0
        };
        if rem != 0 && i > words {
            v |= bits[i - words - 1] >> (64 - rem);
        }
        bits[i] = v;
    }
}

/// Per-sender replay protection with bounded memory.
#[derive(Debug)]
pub struct ReplayGuard {
    sessions: HashMap<u64, SessionWindow>,
    max_sessions: usize,
    freshness_ms: u64,
}

impl ReplayGuard {
    /// `max_sessions` bounds memory (a session is one sender socket; only key holders create
    /// them); `freshness_ms` bounds how far a sender clock may be from ours, and how long an
    /// idle session is remembered (at least that long, so an evicted session's datagrams are
    /// already stale).
    pub fn new(max_sessions: usize, freshness_ms: u64) -> Self {
        ReplayGuard {
            sessions: HashMap::new(),
            max_sessions,
            freshness_ms,
        }
    }

    /// Checks an authenticated header and records it. Call only after [`Keyring::open`]
    /// succeeded.
    pub fn check_and_record(&mut self, h: &FrameHeader, now_ms: u64) -> Result<(), OpenError> {
        if h.sent_ms.abs_diff(now_ms) > self.freshness_ms {
            return Err(OpenError::Stale {
                sent_ms: h.sent_ms,
                now_ms,
            });
        }
        if !self.sessions.contains_key(&h.session) && self.sessions.len() >= self.max_sessions {
            let fresh = self.freshness_ms;
            self.sessions
                .retain(|_, w| now_ms.saturating_sub(w.last_seen_ms) <= 2 * fresh);
            if self.sessions.len() >= self.max_sessions {
                return Err(OpenError::SessionTableFull);
            }
        }
        let w = self.sessions.entry(h.session).or_insert(SessionWindow {
            top: 0,
            bits: [0; WINDOW_WORDS],
            last_seen_ms: now_ms,
        });
        if h.counter == 0 || w.seen(h.counter) {
            return Err(OpenError::Replay {
                session: h.session,
                counter: h.counter,
            });
        }
        w.mark(h.counter);
        w.last_seen_ms = now_ms;
        Ok(())
    }

    /// Sessions currently remembered.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Keyring {
        Keyring::new(1, [7; KEY_LEN])
    }

    #[test]
    fn seal_open_roundtrip_and_tamper() {
        let k = ring();
        let mut s = Sealer::new(42);
        let d = k.seal(s.next_header(1000, 0, 1), b"hello");
        assert_eq!(d.len(), 5 + OVERHEAD);
        let (h, p) = k.open(&d).unwrap();
        assert_eq!(
            (h.key_id, h.session, h.counter, h.sent_ms),
            (1, 42, 1, 1000)
        );
        assert_eq!(p, b"hello");
        for i in 0..d.len() {
            let mut t = d.clone();
            t[i] ^= 1;
            assert!(k.open(&t).is_err(), "flipping byte {i} must be refused");
        }
    }

    #[test]
    fn unknown_key_and_wrong_key() {
        let d = Keyring::new(9, [1; KEY_LEN]).seal(Sealer::new(1).next_header(0, 0, 1), b"x");
        assert_eq!(ring().open(&d), Err(OpenError::UnknownKey { id: 9 }));
        let same_id_other_key = Keyring::new(1, [2; KEY_LEN]);
        let d = same_id_other_key.seal(Sealer::new(1).next_header(0, 0, 1), b"x");
        assert_eq!(ring().open(&d), Err(OpenError::Auth));
    }

    #[test]
    fn rotation_steps() {
        let a = ring();
        let b = ring();
        a.add(2, [8; KEY_LEN]).unwrap();
        b.add(2, [8; KEY_LEN]).unwrap();
        a.add(2, [8; KEY_LEN]).unwrap(); // idempotent
        assert_eq!(
            a.add(2, [9; KEY_LEN]),
            Err(KeyringError::DuplicateId { id: 2 })
        );
        a.use_for_sealing(2).unwrap();
        let d = a.seal(Sealer::new(1).next_header(0, 0, 1), b"x");
        assert_eq!(b.open(&d).unwrap().0.key_id, 2); // b still seals with 1 but opens 2
        let d = b.seal(Sealer::new(2).next_header(0, 0, 1), b"y");
        assert_eq!(a.open(&d).unwrap().0.key_id, 1);
        assert_eq!(a.remove(2), Err(KeyringError::RemovingSealingKey { id: 2 }));
        a.remove(1).unwrap();
        a.remove(1).unwrap();
        assert_eq!(a.open(&d), Err(OpenError::UnknownKey { id: 1 }));
        assert_eq!(a.ids(), vec![2]);
        assert!(!format!("{a:?}").contains("8, 8"));
    }

    #[test]
    fn replay_window() {
        let mut g = ReplayGuard::new(4, 60_000);
        let h = |c: u64| FrameHeader {
            key_id: 1,
            session: 5,
            counter: c,
            sent_ms: 1_000_000,
            frag_index: 0,
            frag_count: 1,
        };
        let now = 1_000_000;
        g.check_and_record(&h(3), now).unwrap();
        g.check_and_record(&h(1), now).unwrap(); // reordered, in window
        assert!(g.check_and_record(&h(3), now).is_err());
        assert!(g.check_and_record(&h(1), now).is_err());
        g.check_and_record(&h(2), now).unwrap();
        g.check_and_record(&h(2000), now).unwrap();
        assert!(g.check_and_record(&h(900), now).is_err()); // fell out of the window
        g.check_and_record(&h(1990), now).unwrap();
        assert!(g.check_and_record(&h(1990), now).is_err());
        g.check_and_record(&h(2000 + 70), now).unwrap();
        assert!(g.check_and_record(&h(1990), now).is_err()); // still remembered after a shift
        g.check_and_record(&h(1991), now).unwrap();
        assert!(g.check_and_record(&h(0), now).is_err());
        let mut stale = h(5000);
        stale.sent_ms = 0;
        assert!(matches!(
            g.check_and_record(&stale, now),
            Err(OpenError::Stale { .. })
        ));
    }

    #[test]
    fn replay_sessions_are_bounded() {
        let mut g = ReplayGuard::new(2, 1000);
        let h = |s: u64, t: u64| FrameHeader {
            key_id: 1,
            session: s,
            counter: 1,
            sent_ms: t,
            frag_index: 0,
            frag_count: 1,
        };
        g.check_and_record(&h(1, 0), 0).unwrap();
        g.check_and_record(&h(2, 0), 0).unwrap();
        assert_eq!(
            g.check_and_record(&h(3, 0), 0),
            Err(OpenError::SessionTableFull)
        );
        // once the old sessions idled past twice the freshness bound they are forgotten
        g.check_and_record(&h(3, 2500), 2500).unwrap();
        assert_eq!(g.sessions(), 1);
    }

    #[test]
    fn bitmap_shift_crosses_words() {
        let mut b = [0u64; WINDOW_WORDS];
        b[0] = 1 | (1 << 63);
        shift_left(&mut b, 65);
        assert_eq!(b[1], 1 << 1);
        assert_eq!(b[2], 1);
        assert_eq!(b[0], 0);
    }
}
