//! Label selectors on the LoadBalancer side: pool `serviceAllocation` namespace and Service
//! selectors, L2Advertisement pool and node selectors.
//!
//! Matching is the shared implementation (`palisade-labels`, also used for NetworkPolicies),
//! with this side's rule for malformed selectors (unknown operator, `In` without values,
//! `Exists` with values): they match nothing, so a typo never widens who gets an IP or who
//! announces it; [`validate`] names the problem so it can be reported as a condition. Pools
//! parse their selectors once ([`parse`]); advertisements are matched straight from the spec.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
pub use palisade_labels::{any_matches, Selector};

/// Validates and canonicalizes an API selector; the error names the offending requirement.
pub fn parse(selector: &LabelSelector) -> Result<Selector, String> {
    Selector::from_api(Some(selector)).map_err(|e| e.0)
}

/// Does `labels` satisfy `selector`? An empty selector matches everything, a malformed one
/// nothing.
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    parse(selector).is_ok_and(|s| s.matches(labels))
}

/// True when any selector of a non-empty list matches; true for an empty list
/// ("no restriction"), which is how every selector list in our CRDs is defined.
pub fn any_api_matches(selectors: &[LabelSelector], labels: &BTreeMap<String, String>) -> bool {
    selectors.is_empty() || selectors.iter().any(|s| matches(s, labels))
}

/// Checks a selector for problems the API server does not catch in custom resources.
/// The error text names the offending requirement.
pub fn validate(selector: &LabelSelector) -> Result<(), String> {
    parse(selector).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_labels::builders::{api_selector as sel, expr, labels};

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
        assert!(any_api_matches(&[], &l));
        assert!(!any_api_matches(&[sel(&[("a", "2")], vec![])], &l));
        assert!(any_api_matches(
            &[sel(&[("a", "2")], vec![]), sel(&[("a", "1")], vec![])],
            &l
        ));
        // The parsed form agrees.
        let parsed: Vec<Selector> = [sel(&[("a", "2")], vec![]), sel(&[("a", "1")], vec![])]
            .iter()
            .map(|s| parse(s).unwrap())
            .collect();
        assert!(any_matches(&parsed, &l));
        assert!(!any_matches(&parsed[..1], &l));
        assert!(any_matches::<BTreeMap<String, String>>(&[], &l));
    }

    #[test]
    fn validate_names_the_problem() {
        assert!(validate(&sel(&[], vec![expr("a", "In", &["x"])])).is_ok());
        let err = validate(&sel(&[], vec![expr("a", "Equals", &["x"])])).unwrap_err();
        assert!(err.contains("unknown operator \"Equals\""), "{err}");
        let err = validate(&sel(&[], vec![expr("a", "In", &[])])).unwrap_err();
        assert!(err.contains("needs at least one value"), "{err}");
        let err = validate(&sel(&[], vec![expr("a", "Exists", &["x"])])).unwrap_err();
        assert!(err.contains("takes no values"), "{err}");
    }
}
