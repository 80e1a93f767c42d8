//! Reading the membership key file and following its changes (the I/O half of
//! [`crate::memberlist_key`]).
//!
//! The file is mounted from a Kubernetes Secret; the kubelet replaces it (an atomic symlink
//! swap of `..data`) when the Secret changes. The agent reads it every [`POLL`] and, when its
//! content changed and is a valid key, sends with the new key from then on and accepts the
//! previous one for the rotation window. A file that becomes unreadable or invalid keeps the
//! current key (warned about once per change), so a botched edit of the Secret never cuts
//! the node off.
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::memberlist_key::{Key, KeyRing, MAX_KEY_LEN};

/// How often the key file is read.
pub const POLL: Duration = Duration::from_secs(2);

/// Where the membership's key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    File(PathBuf),
    /// `--memberlist-insecure`: the publicly known key (see [`Key::insecure`]).
    Insecure,
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| {
        format!(
            "cannot read the memberlist key file {}: {e}",
            path.display()
        )
    })?;
    let mut content = Vec::new();
    f.take(MAX_KEY_LEN as u64 + 64)
        .read_to_end(&mut content)
        .map_err(|e| {
            format!(
                "cannot read the memberlist key file {}: {e}",
                path.display()
            )
        })?;
    Ok(content)
}

/// Loads the key now (an error names the file and what is wrong) and, for a file, follows
/// it until `shutdown`.
pub fn start(
    source: &KeySource,
    rotation_window: Duration,
    shutdown: CancellationToken,
) -> Result<watch::Receiver<KeyRing>, String> {
    let path = match source {
        KeySource::Insecure => return Ok(watch::channel(KeyRing::new(Key::insecure())).1),
        KeySource::File(p) => p.clone(),
    };
    let mut content = read(&path)?;
    let key = Key::parse(&content).map_err(|e| format!("{}: {e}", path.display()))?;
    tracing::info!(key_id = format!("{:08x}", key.id()), file = %path.display(), "memberlist key loaded");
    let (tx, rx) = watch::channel(KeyRing::new(key));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error: Option<String> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let path = path.clone();
            let now_content = tokio::task::spawn_blocking(move || read(&path))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
            let result = now_content.and_then(|c| {
                if c == content {
                    return Ok(None);
                }
                let key = Key::parse(&c)?;
                content = c;
                Ok(Some(key))
            });
            match result {
                Ok(None) => last_error = None,
                Ok(Some(key)) => {
                    last_error = None;
                    tracing::info!(
                        key_id = format!("{:08x}", key.id()),
                        window = ?rotation_window,
                        "memberlist key changed; accepting it now, sending with it after half the rotation window, accepting the previous key until the window ends"
                    );
                    tx.send_modify(|ring| ring.rotate(key, Instant::now(), rotation_window));
                }
                Err(e) => {
                    if last_error.as_ref() != Some(&e) {
                        tracing::warn!(error = %e, "memberlist key file unusable; keeping the current key");
                        last_error = Some(e);
                    }
                }
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_changed_file_rotates_the_key_and_a_broken_one_keeps_it() {
        let dir = std::env::temp_dir().join(format!("palisade-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        assert!(start(
            &KeySource::File(path.clone()),
            POLL,
            CancellationToken::new()
        )
        .unwrap_err()
        .contains("cannot read the memberlist key file"));
        std::fs::write(&path, "short").unwrap();
        assert!(start(
            &KeySource::File(path.clone()),
            POLL,
            CancellationToken::new()
        )
        .unwrap_err()
        .contains("at least 16"));
        std::fs::write(&path, "first-key-first-key\n").unwrap();
        let first = Key::parse(b"first-key-first-key").unwrap();
        let second = Key::parse(b"second-key-second-key").unwrap();
        let shutdown = CancellationToken::new();
        let mut rx = start(
            &KeySource::File(path.clone()),
            Duration::from_secs(60),
            shutdown.clone(),
        )
        .unwrap();
        assert_eq!(rx.borrow_and_update().current(), &first);
        // A broken file keeps the current key.
        std::fs::write(&path, "x").unwrap();
        tokio::time::sleep(POLL + Duration::from_millis(500)).await;
        assert_eq!(rx.borrow().current(), &first);
        // Replaced like the kubelet does (rename over it).
        let tmp = dir.join("key.tmp");
        std::fs::write(&tmp, "second-key-second-key").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        tokio::time::timeout(POLL * 3, rx.changed())
            .await
            .expect("the change is picked up")
            .unwrap();
        let ring = rx.borrow().clone();
        let now = Instant::now();
        assert_eq!(
            ring.sending(now),
            &first,
            "the new key is sent after half the window"
        );
        assert_eq!(ring.sending(now + Duration::from_secs(30)), &second);
        assert_eq!(ring.lookup(second.id(), now), Some(&second));
        assert_eq!(ring.lookup(first.id(), now), Some(&first));
        shutdown.cancel();
        let _ = std::fs::remove_dir_all(&dir);
        let ins = start(&KeySource::Insecure, POLL, CancellationToken::new()).unwrap();
        assert_eq!(ins.borrow().current(), &Key::insecure());
    }
}
