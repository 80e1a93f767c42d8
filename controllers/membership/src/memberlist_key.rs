//! The membership's cluster keys (pure: no I/O; the file watcher is
//! [`crate::memberlist_keyfile`]).
//!
//! A key is the content of a file mounted from a Kubernetes Secret (surrounding whitespace
//! trimmed, at least [`MIN_KEY_LEN`] bytes). Its id — carried in every datagram so that a
//! receiver knows which key to check with — is derived from the key itself (the first four
//! bytes of `SHA-256("palisade-memberlist-key-id\0" ‖ key)`), so nothing else has to be
//! configured and the id says nothing useful about the key.
//!
//! Rotation: the [`KeyRing`] sends with the newest key and, for `window` after a change, still
//! accepts the previous one, so agents that pick the new Secret up at different moments (the
//! kubelet refreshes mounted Secrets within about a minute) keep hearing each other.
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// Shorter keys are refused (a random 32-byte key, as the chart creates, is the norm).
pub const MIN_KEY_LEN: usize = 16;
/// Longer files are refused (a key file is a few dozen bytes; a large one is a mistake).
pub const MAX_KEY_LEN: usize = 4096;

/// One cluster key.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    id: u32,
    secret: Vec<u8>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        write!(f, "Key({:08x})", self.id)
    }
}

impl Key {
    /// A key from a key file's content.
    pub fn parse(content: &[u8]) -> Result<Key, String> {
        let trimmed = content.trim_ascii();
        if trimmed.len() < MIN_KEY_LEN {
            return Err(format!(
                "the memberlist key has {} bytes; at least {MIN_KEY_LEN} are needed \
                 (e.g. `head -c 32 /dev/urandom | base64`)",
                trimmed.len()
            ));
        }
        if trimmed.len() > MAX_KEY_LEN {
            return Err(format!(
                "the memberlist key has {} bytes; at most {MAX_KEY_LEN} are allowed",
                trimmed.len()
            ));
        }
        Ok(Key::from_secret(trimmed.to_vec()))
    }

    /// The fixed, publicly known key of `--memberlist-insecure`: datagrams keep their format,
    /// sequence and clock checks, but anyone can forge them.
    pub fn insecure() -> Key {
        Key::from_secret(b"palisade-memberlist-insecure".to_vec())
    }

    fn from_secret(secret: Vec<u8>) -> Key {
        let mut h = Sha256::new();
        h.update(b"palisade-memberlist-key-id\0");
        h.update(&secret);
        let d = h.finalize();
        Key {
            id: u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
            secret,
        }
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub(crate) fn secret(&self) -> &[u8] {
        &self.secret
    }
}

/// The key to send with and the keys accepted now.
///
/// A change is two-phased so that agents picking up the new Secret at different moments never
/// send a key a peer cannot check yet: for the first half of the rotation window the new key
/// is accepted but not sent; then it is sent, and the old one is accepted for the second half.
/// Agents therefore keep hearing each other as long as they all see the new file within half
/// a window of each other (the kubelet refreshes Secret volumes within about a minute; the
/// default window is 2 min).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRing {
    current: Key,
    /// The new key: accepted now, sent from the instant on; the old one is then accepted for
    /// the duration more.
    next: Option<(Key, Instant, Duration)>,
    /// The key replaced last, accepted until the instant.
    previous: Option<(Key, Instant)>,
}

impl KeyRing {
    pub fn new(current: Key) -> KeyRing {
        KeyRing {
            current,
            next: None,
            previous: None,
        }
    }

    /// The settled key (the one before a rotation in progress).
    pub fn current(&self) -> &Key {
        &self.current
    }

    /// The key datagrams are sent with at `now`.
    pub fn sending(&self, now: Instant) -> &Key {
        match &self.next {
            Some((k, at, _)) if now >= *at => k,
            _ => &self.current,
        }
    }

    /// The file changed to `key` at `now` (see the type's docs for the two phases).
    pub fn rotate(&mut self, key: Key, now: Instant, window: Duration) {
        let half = window / 2;
        if let Some((n, at, h)) = self.next.take() {
            if now >= at {
                // The earlier rotation had switched: settle it.
                let old = std::mem::replace(&mut self.current, n);
                self.previous = Some((old, at + h));
            }
            // Else it is superseded before anyone was sent it: forget it.
        }
        if key == self.current {
            return;
        }
        self.next = Some((key, now + half, window - half));
    }

    /// The accepted key with this id, if any.
    pub fn lookup(&self, id: u32, now: Instant) -> Option<&Key> {
        if let Some((k, _, _)) = &self.next {
            if k.id == id {
                return Some(k);
            }
        }
        if self.current.id == id {
            return match &self.next {
                Some((_, at, h)) if now >= *at + *h => None,
                _ => Some(&self.current),
            };
        }
        match &self.previous {
            Some((k, until)) if k.id == id && now < *until => Some(k),
            _ => None,
        }
    }

    /// Whether a rotation is in progress at `now` (more than one key accepted).
    pub fn in_rotation(&self, now: Instant) -> bool {
        self.next.as_ref().is_some_and(|(_, at, h)| now < *at + *h)
            || self
                .previous
                .as_ref()
                .is_some_and(|(_, until)| now < *until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_trimmed_checked_and_identified_by_content() {
        let a = Key::parse(b"  0123456789abcdef0123\n").unwrap();
        let b = Key::parse(b"0123456789abcdef0123").unwrap();
        assert_eq!(a, b, "whitespace around the key does not count");
        let c = Key::parse(b"0123456789abcdef0124").unwrap();
        assert_ne!(a.id(), c.id());
        assert!(Key::parse(b"short\n").unwrap_err().contains("at least 16"));
        assert!(Key::parse(b"").is_err());
        assert!(Key::parse(&vec![b'x'; MAX_KEY_LEN + 1]).is_err());
        assert!(!format!("{a:?}").contains("0123"), "Debug hides the secret");
        assert_ne!(Key::insecure().id(), a.id());
    }

    #[tokio::test(start_paused = true)]
    async fn rotation_accepts_the_new_key_first_and_the_old_one_until_the_window_ends() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let old = Key::parse(b"old-key-old-key-old-key").unwrap();
        let new = Key::parse(b"new-key-new-key-new-key").unwrap();
        let other = Key::parse(b"other-key-other-key").unwrap();
        let mut ring = KeyRing::new(old.clone());
        assert_eq!(ring.lookup(old.id(), t0), Some(&old));
        assert_eq!(ring.lookup(new.id(), t0), None);
        assert!(!ring.in_rotation(t0));
        let window = s(120);
        ring.rotate(new.clone(), t0, window);
        // First half: both accepted, the old one still sent.
        for t in [t0, t0 + s(59)] {
            assert_eq!(ring.sending(t), &old);
            assert_eq!(ring.lookup(new.id(), t), Some(&new));
            assert_eq!(ring.lookup(old.id(), t), Some(&old));
        }
        // Second half: the new one sent, the old one still accepted.
        for t in [t0 + s(60), t0 + s(119)] {
            assert_eq!(ring.sending(t), &new);
            assert_eq!(ring.lookup(old.id(), t), Some(&old));
            assert!(ring.in_rotation(t));
        }
        // Over.
        assert_eq!(ring.lookup(old.id(), t0 + window), None);
        assert_eq!(ring.lookup(new.id(), t0 + window), Some(&new));
        assert!(!ring.in_rotation(t0 + window));
        assert_eq!(ring.lookup(other.id(), t0), None);
        // The same key again (the next poll) changes nothing once settled.
        ring.rotate(new.clone(), t0 + s(130), window);
        assert_eq!(ring.current(), &new);
        assert_eq!(ring.sending(t0 + s(130)), &new);
        assert_eq!(ring.lookup(old.id(), t0 + s(130)), None);
        // A key replaced again before it was ever sent is forgotten.
        let mut ring = KeyRing::new(old.clone());
        ring.rotate(other.clone(), t0, window);
        ring.rotate(new.clone(), t0 + s(10), window);
        assert_eq!(ring.lookup(other.id(), t0 + s(11)), None);
        assert_eq!(ring.sending(t0 + s(69)), &old);
        assert_eq!(ring.sending(t0 + s(70)), &new);
    }
}
