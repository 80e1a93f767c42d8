//! Small helpers over `metadata` of JSON objects, written so that no input shape panics.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value};

use crate::status::ApiError;

/// `metadata.<field>` as a string, if it is one.
pub(crate) fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

/// `metadata.<field>` as a non-empty string.
pub(crate) fn meta_nonempty<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    meta_str(obj, field).filter(|s| !s.is_empty())
}

/// The top-level map of `obj`, or a 400 if `obj` is not a JSON object.
pub(crate) fn as_object_mut(obj: &mut Value) -> Result<&mut Map<String, Value>, ApiError> {
    obj.as_object_mut()
        .ok_or_else(|| ApiError::bad_request("the request body must be a JSON object"))
}

/// The `metadata` map of `obj`, created if missing; a 400 if either is not a JSON object.
pub(crate) fn metadata_mut(obj: &mut Value) -> Result<&mut Map<String, Value>, ApiError> {
    let top = as_object_mut(obj)?;
    let meta = top
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if meta.is_null() {
        *meta = Value::Object(Map::new());
    }
    meta.as_object_mut()
        .ok_or_else(|| ApiError::bad_request("metadata must be a JSON object"))
}

/// Sets `metadata.resourceVersion`, ignoring objects whose shape does not allow it.
pub(crate) fn set_resource_version(obj: &mut Value, rv: u64) {
    if let Ok(meta) = metadata_mut(obj) {
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
}

/// The object without `metadata` and `status`: what a generation bump looks at.
pub(crate) fn spec_part(obj: &Value) -> Value {
    match obj {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| *k != "metadata" && *k != "status")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Current time as the API server writes timestamps (RFC 3339, seconds, `Z`).
pub(crate) fn now_timestamp() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(d.as_nanos());
    }
    hasher.finish()
}

/// A random version-4 style UUID string.
pub(crate) fn new_uid() -> String {
    let a = random_u64();
    let b = random_u64();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0x0fff,
        ((b >> 48) & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

/// The 5-character suffix `generateName` appends (same alphabet as upstream).
pub(crate) fn generate_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut n = random_u64();
    let mut out = String::with_capacity(5);
    for _ in 0..5 {
        let idx = usize::try_from(n % ALPHABET.len() as u64).unwrap_or(0);
        out.push(char::from(ALPHABET.get(idx).copied().unwrap_or(b'x')));
        n /= ALPHABET.len() as u64;
    }
    out
}

/// Whether `name` can appear as one path segment (upstream's `IsValidPathSegmentName`).
pub(crate) fn valid_path_segment(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '%'])
}
