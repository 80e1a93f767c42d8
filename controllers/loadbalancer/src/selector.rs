//! Label selector matching (`metav1.LabelSelector`), pure and allocation-free.
//!
//! This module owns the one place where the LoadBalancer side evaluates selectors:
//! pool `serviceAllocation` selectors, L2Advertisement pool and node selectors.
//!
//! Semantics follow Kubernetes: `matchLabels` and `matchExpressions` are ANDed, an empty
//! selector matches everything. A malformed requirement (unknown operator, `In` without
//! values, `Exists` with values) matches nothing, so a typo never widens who gets an IP;
//! [`validate`] names the problem so it can be reported as a condition.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

/// Does `labels` satisfy `selector`? An empty selector matches everything.
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    labels_ok
        && selector
            .match_expressions
            .iter()
            .flatten()
            .all(|req| requirement_matches(req, labels))
}

/// True when any selector of a non-empty list matches; true for an empty list
/// ("no restriction"), which is how every selector list in our CRDs is defined.
pub fn any_matches(selectors: &[LabelSelector], labels: &BTreeMap<String, String>) -> bool {
    selectors.is_empty() || selectors.iter().any(|s| matches(s, labels))
}

fn requirement_matches(req: &LabelSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    if validate_requirement(req).is_err() {
        return false;
    }
    let values = req.values.as_deref().unwrap_or_default();
    let value = labels.get(&req.key);
    match req.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        _ => false,
    }
}

/// Checks a selector for problems the API server does not catch in custom resources.
/// The error text names the offending requirement.
pub fn validate(selector: &LabelSelector) -> Result<(), String> {
    for req in selector.match_expressions.iter().flatten() {
        validate_requirement(req)?;
    }
    Ok(())
}

fn validate_requirement(req: &LabelSelectorRequirement) -> Result<(), String> {
    let n = req.values.as_ref().map_or(0, Vec::len);
    match req.operator.as_str() {
        "In" | "NotIn" if n == 0 => Err(format!(
            "matchExpressions key {:?}: operator {} needs at least one value",
            req.key, req.operator
        )),
        "Exists" | "DoesNotExist" if n > 0 => Err(format!(
            "matchExpressions key {:?}: operator {} takes no values",
            req.key, req.operator
        )),
        "In" | "NotIn" | "Exists" | "DoesNotExist" => Ok(()),
        other => Err(format!(
            "matchExpressions key {:?}: unknown operator {other:?} (use In, NotIn, Exists or DoesNotExist)",
            req.key
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: if values.is_empty() {
                None
            } else {
                Some(values.iter().map(|v| v.to_string()).collect())
            },
        }
    }

    fn sel(ml: &[(&str, &str)], exprs: Vec<LabelSelectorRequirement>) -> LabelSelector {
        LabelSelector {
            match_labels: if ml.is_empty() {
                None
            } else {
                Some(labels(ml))
            },
            match_expressions: if exprs.is_empty() { None } else { Some(exprs) },
        }
    }

    #[test]
    fn table() {
        let web_prod = labels(&[("app", "web"), ("env", "prod")]);
        let none = labels(&[]);
        let cases: Vec<(&str, LabelSelector, &BTreeMap<String, String>, bool)> = vec![
            (
                "empty matches all",
                LabelSelector::default(),
                &web_prod,
                true,
            ),
            (
                "empty matches no labels",
                LabelSelector::default(),
                &none,
                true,
            ),
            (
                "matchLabels hit",
                sel(&[("app", "web")], vec![]),
                &web_prod,
                true,
            ),
            (
                "matchLabels miss value",
                sel(&[("app", "db")], vec![]),
                &web_prod,
                false,
            ),
            (
                "matchLabels miss key",
                sel(&[("tier", "x")], vec![]),
                &web_prod,
                false,
            ),
            (
                "In hit",
                sel(&[], vec![expr("env", "In", &["dev", "prod"])]),
                &web_prod,
                true,
            ),
            (
                "In miss",
                sel(&[], vec![expr("env", "In", &["dev"])]),
                &web_prod,
                false,
            ),
            (
                "In absent key",
                sel(&[], vec![expr("x", "In", &["a"])]),
                &web_prod,
                false,
            ),
            (
                "NotIn hit",
                sel(&[], vec![expr("env", "NotIn", &["dev"])]),
                &web_prod,
                true,
            ),
            (
                "NotIn miss",
                sel(&[], vec![expr("env", "NotIn", &["prod"])]),
                &web_prod,
                false,
            ),
            (
                "NotIn absent key",
                sel(&[], vec![expr("x", "NotIn", &["a"])]),
                &web_prod,
                true,
            ),
            (
                "Exists",
                sel(&[], vec![expr("app", "Exists", &[])]),
                &web_prod,
                true,
            ),
            (
                "Exists miss",
                sel(&[], vec![expr("x", "Exists", &[])]),
                &web_prod,
                false,
            ),
            (
                "DoesNotExist",
                sel(&[], vec![expr("x", "DoesNotExist", &[])]),
                &web_prod,
                true,
            ),
            (
                "DoesNotExist miss",
                sel(&[], vec![expr("app", "DoesNotExist", &[])]),
                &web_prod,
                false,
            ),
            (
                "labels AND expressions",
                sel(&[("app", "web")], vec![expr("env", "In", &["dev"])]),
                &web_prod,
                false,
            ),
            (
                "unknown operator",
                sel(&[], vec![expr("app", "Equals", &["web"])]),
                &web_prod,
                false,
            ),
            (
                "In without values",
                sel(&[], vec![expr("x", "NotIn", &[])]),
                &web_prod,
                false,
            ),
            (
                "Exists with values",
                sel(&[], vec![expr("app", "Exists", &["web"])]),
                &web_prod,
                false,
            ),
        ];
        for (name, s, l, want) in cases {
            assert_eq!(matches(&s, l), want, "{name}");
        }
    }

    #[test]
    fn any_matches_empty_list_is_unrestricted() {
        let l = labels(&[("a", "1")]);
        assert!(any_matches(&[], &l));
        assert!(!any_matches(&[sel(&[("a", "2")], vec![])], &l));
        assert!(any_matches(
            &[sel(&[("a", "2")], vec![]), sel(&[("a", "1")], vec![])],
            &l
        ));
    }

    #[test]
    fn validate_names_the_problem() {
        assert!(validate(&sel(&[], vec![expr("a", "In", &["x"])])).is_ok());
        let err = validate(&sel(&[], vec![expr("a", "Equals", &["x"])])).unwrap_err();
        assert!(err.contains("unknown operator \"Equals\""), "{err}");
        let err = validate(&sel(&[], vec![expr("a", "In", &[])])).unwrap_err();
        assert!(err.contains("needs at least one value"), "{err}");
    }
}
