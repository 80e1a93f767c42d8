//! TCP MD5 passwords of BGPPeers (`passwordSecret`), read with a `get` of the one Secret.
//!
//! As in MetalLB the Secret lives in the agent's own namespace (the chart's release
//! namespace; the chart grants `get` on Secrets there and nothing else) and holds the password
//! under the key `password` (type `kubernetes.io/basic-auth`). There is no Secret watch: a
//! fetched password is reused for [`PASSWORD_TTL`], and the reconciler runs a pass at least
//! that often while a peer has a `passwordSecret`, so a rotated password (or a Secret created
//! after its BGPPeer) takes effect within about a minute.
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use palisade_bgp::md5sig::MAX_KEY_LEN;
use palisade_bgp::Md5Key;
use palisade_loadbalancer::crd::SecretReference;

/// How long a fetched password (or the reason there is none) is reused.
pub const PASSWORD_TTL: Duration = Duration::from_secs(60);
/// The Secret's key holding the password (MetalLB's, `kubernetes.io/basic-auth`).
pub const PASSWORD_KEY: &str = "password";

/// Why a peer has no password.
#[derive(Debug)]
pub enum PasswordError {
    /// The BGPPeer or the Secret is wrong (reported as an Event; the peer is not started).
    Config(String),
    /// The API server could not be asked (the pass is retried).
    Api(kube::Error),
}

/// The password in a Secret's data, checked.
pub fn password_of(secret: &Secret) -> Result<Md5Key, String> {
    let name = secret.metadata.name.as_deref().unwrap_or_default();
    let value = secret
        .data
        .as_ref()
        .and_then(|d| d.get(PASSWORD_KEY))
        .ok_or_else(|| format!("Secret {name} has no key {PASSWORD_KEY:?}"))?;
    let key = &value.0;
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(format!(
            "Secret {name}: the password is {} bytes; TCP MD5 needs 1 to {MAX_KEY_LEN}",
            key.len()
        ));
    }
    Ok(Md5Key(key.clone()))
}

/// When a Secret was read, and what it gave.
type Fetched = (Instant, Result<Md5Key, String>);

/// Reads and caches the passwords.
pub struct PasswordSecrets {
    api: Api<Secret>,
    namespace: String,
    cache: Mutex<BTreeMap<String, Fetched>>,
}

impl PasswordSecrets {
    /// Secrets in `namespace` (the agent's own).
    pub fn new(client: Client, namespace: &str) -> PasswordSecrets {
        PasswordSecrets {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            cache: Mutex::new(BTreeMap::new()),
        }
    }

    /// The password `r` points at.
    pub async fn get(&self, r: &SecretReference) -> Result<Md5Key, PasswordError> {
        if let Some(ns) = r.namespace.as_deref().filter(|ns| *ns != self.namespace) {
            return Err(PasswordError::Config(format!(
                "passwordSecret {ns}/{}: the Secret must be in the agent's namespace {}",
                r.name, self.namespace
            )));
        }
        let cached = self.cache.lock().ok().and_then(|c| c.get(&r.name).cloned());
        if let Some((at, found)) = &cached {
            if at.elapsed() < PASSWORD_TTL {
                return found.clone().map_err(PasswordError::Config);
            }
        }
        let found = match self.api.get_opt(&r.name).await {
            Ok(Some(secret)) => password_of(&secret),
            Ok(None) => Err(format!(
                "passwordSecret: Secret {}/{} does not exist",
                self.namespace, r.name
            )),
            Err(e) => {
                // Keep using a password we had rather than drop a working session.
                if let Some((_, Ok(key))) = cached {
                    tracing::warn!(secret = %r.name, error = %e, "reading the BGP password failed; using the one read before");
                    return Ok(key);
                }
                return Err(PasswordError::Api(e));
            }
        };
        if let Ok(mut c) = self.cache.lock() {
            c.insert(r.name.clone(), (Instant::now(), found.clone()));
        }
        found.map_err(PasswordError::Config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(data: serde_json::Value) -> Secret {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "bgp-auth"}, "type": "kubernetes.io/basic-auth", "data": data
        }))
        .expect("a Secret")
    }

    #[test]
    fn password_is_checked() {
        // "s3cret" base64
        let k = password_of(&secret(serde_json::json!({"password": "czNjcmV0"}))).unwrap();
        assert_eq!(k.0, b"s3cret");
        assert!(
            format!("{k:?}").find("s3cret").is_none(),
            "Debug hides the key"
        );
        assert!(password_of(&secret(serde_json::json!({"username": "czNjcmV0"}))).is_err());
        assert!(password_of(&secret(serde_json::json!({"password": ""}))).is_err());
        let long = "eHh4".repeat(27); // 81 bytes
        let e = password_of(&secret(serde_json::json!({ "password": long }))).unwrap_err();
        assert!(e.contains("81 bytes"), "{e}");
        let max = "eHh4".repeat(26) + "eHg="; // 80 bytes
        assert_eq!(
            password_of(&secret(serde_json::json!({ "password": max })))
                .unwrap()
                .0
                .len(),
            80
        );
    }
}
