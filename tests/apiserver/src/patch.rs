//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902), and the two Kubernetes
//! patch types this server approximates with a merge patch (strategic merge and server-side
//! apply).

use serde_json::Value;

use crate::status::ApiError;

/// The patch types selected by the request's `Content-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchKind {
    /// `application/merge-patch+json` (RFC 7386).
    Merge,
    /// `application/strategic-merge-patch+json`, applied as a merge patch: lists are replaced
    /// whole instead of merged by their merge key, and `$patch` directives are not interpreted.
    Strategic,
    /// `application/apply-patch+yaml` (server-side apply), applied as a merge patch of the JSON
    /// body: no field ownership, no conflicts between managers, fields the manager stops sending
    /// are kept; a missing object is created.
    Apply,
    /// `application/json-patch+json` (RFC 6902).
    Json,
}

impl PatchKind {
    /// The patch type for a `Content-Type` value (parameters such as `charset` are ignored).
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(Self::Apply),
            "application/json-patch+json" => Some(Self::Json),
            _ => None,
        }
    }
}

/// RFC 7386: objects merge recursively, `null` removes a key, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(target_map) = target {
        for (key, value) in patch_map {
            if value.is_null() {
                target_map.remove(key);
            } else {
                merge_patch(target_map.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// Applies a patch body of the given kind to `target`.
pub fn apply_patch(kind: PatchKind, target: &mut Value, body: &[u8]) -> Result<(), ApiError> {
    match kind {
        PatchKind::Merge | PatchKind::Strategic | PatchKind::Apply => {
            let patch: Value = serde_json::from_slice(body).map_err(|e| {
                ApiError::bad_request(format!(
                    "error decoding patch: {e} (this test server accepts JSON bodies only, also for apply)"
                ))
            })?;
            if !patch.is_object() {
                return Err(ApiError::bad_request(
                    "error decoding patch: the patch must be a JSON object",
                ));
            }
            merge_patch(target, &patch);
            Ok(())
        }
        PatchKind::Json => {
            let patch: json_patch::Patch = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("error decoding json patch: {e}")))?;
            json_patch::patch(target, &patch).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the server rejected our request due to an error in our request: {e}"),
                )
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rfc7386_examples() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut t, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}}));

        let mut t = json!({"a": ["b"]});
        merge_patch(&mut t, &json!({"a": "c"}));
        assert_eq!(t, json!({"a": "c"}));

        let mut t = json!({"a": "foo"});
        merge_patch(&mut t, &json!({"b": {"c": null, "d": 1}}));
        assert_eq!(t, json!({"a": "foo", "b": {"d": 1}}));
    }

    #[test]
    fn json_patch_and_errors() {
        let mut t = json!({"metadata": {"labels": {"a": "1"}}});
        apply_patch(
            PatchKind::Json,
            &mut t,
            br#"[{"op":"add","path":"/metadata/labels/b","value":"2"},{"op":"remove","path":"/metadata/labels/a"}]"#,
        )
        .unwrap();
        assert_eq!(t, json!({"metadata": {"labels": {"b": "2"}}}));
        let err = apply_patch(
            PatchKind::Json,
            &mut t,
            br#"[{"op":"remove","path":"/nope"}]"#,
        )
        .unwrap_err();
        assert_eq!(err.code, 422);
        assert_eq!(
            apply_patch(PatchKind::Merge, &mut t, b"{not json")
                .unwrap_err()
                .code,
            400
        );
        assert_eq!(
            apply_patch(PatchKind::Merge, &mut t, b"[1]")
                .unwrap_err()
                .code,
            400
        );
        assert_eq!(
            PatchKind::from_content_type("application/merge-patch+json; charset=utf-8"),
            Some(PatchKind::Merge)
        );
    }
}
