//! Label selectors: validation, canonical form and matching (`metav1.LabelSelector` semantics).
//! The one implementation both reconcilers use: NetworkPolicy pod and namespace selectors,
//! and the LoadBalancer side's pool, namespace, Service and node selectors.
//!
//! A [`Selector`] is a sorted, de-duplicated list of requirements (ANDed). `matchLabels`
//! entries become `key In (value)`, so `{matchLabels: {a: b}}` and
//! `{matchExpressions: [{key: a, operator: In, values: [b]}]}` are the same selector, print the
//! same (`Display` is the canonical form used in set identities, e.g. to share one ipset).
//! The empty selector matches everything. A malformed selector (unknown operator, `In`
//! without values, `Exists` with values) is rejected by [`Selector::from_api`] with a message
//! naming the requirement; callers decide whether that means "matches nothing" (a typo must
//! never widen who is selected) or a reported error.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// The label every namespace carries, set by the API server and immutable.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Selector operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One requirement: `key op values`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Requirement {
    pub key: String,
    pub op: Op,
    /// Sorted, de-duplicated; empty for Exists / DoesNotExist.
    pub values: Vec<String>,
}

impl Requirement {
    fn matches<L: Labels + ?Sized>(&self, labels: &L) -> bool {
        let value = labels.label(&self.key);
        match self.op {
            Op::In => value.is_some_and(|v| self.values.iter().any(|x| x == v)),
            Op::NotIn => value.is_none_or(|v| !self.values.iter().any(|x| x == v)),
            Op::Exists => value.is_some(),
            Op::DoesNotExist => value.is_none(),
        }
    }
}

/// A validated label selector in canonical form.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    reqs: Vec<Requirement>,
}

/// Why a selector is invalid (the API server would have rejected it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectorError(pub String);

impl fmt::Display for SelectorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Read access to a label map.
pub trait Labels {
    fn label(&self, key: &str) -> Option<&str>;
}

impl Labels for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

/// A namespace's labels, with `kubernetes.io/metadata.name` always implied (it is set by the
/// API server; for a namespace we have not seen, it is the only label we know).
#[derive(Clone, Copy, Debug)]
pub struct NamespaceLabels<'a> {
    pub name: &'a str,
    pub labels: Option<&'a BTreeMap<String, String>>,
}

impl Labels for NamespaceLabels<'_> {
    fn label(&self, key: &str) -> Option<&str> {
        if key == NAMESPACE_NAME_LABEL {
            return Some(self.name);
        }
        self.labels.and_then(|l| l.get(key)).map(String::as_str)
    }
}

impl Selector {
    /// The empty selector: matches everything.
    pub fn everything() -> Self {
        Selector::default()
    }

    /// `kubernetes.io/metadata.name In (name)`: exactly one namespace.
    pub fn namespace_named(name: &str) -> Self {
        Selector {
            reqs: vec![Requirement {
                key: NAMESPACE_NAME_LABEL.to_string(),
                op: Op::In,
                values: vec![name.to_string()],
            }],
        }
    }

    /// Validates and canonicalizes an API selector. `None` is the empty selector.
    pub fn from_api(sel: Option<&LabelSelector>) -> Result<Self, SelectorError> {
        let Some(sel) = sel else {
            return Ok(Selector::everything());
        };
        let mut reqs = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            check_key(k)?;
            check_value(k, v)?;
            reqs.push(Requirement {
                key: k.clone(),
                op: Op::In,
                values: vec![v.clone()],
            });
        }
        for e in sel.match_expressions.iter().flatten() {
            check_key(&e.key)?;
            for v in e.values.iter().flatten() {
                check_value(&e.key, v)?;
            }
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            let op = match e.operator.as_str() {
                "In" => Op::In,
                "NotIn" => Op::NotIn,
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => {
                    return Err(SelectorError(format!(
                        "matchExpressions key {:?}: unknown operator {other:?} (use In, NotIn, \
                         Exists or DoesNotExist)",
                        e.key
                    )))
                }
            };
            match op {
                Op::In | Op::NotIn if values.is_empty() => {
                    return Err(SelectorError(format!(
                        "matchExpressions key {:?}: operator {} needs at least one value",
                        e.key, e.operator
                    )))
                }
                Op::Exists | Op::DoesNotExist if !values.is_empty() => {
                    return Err(SelectorError(format!(
                        "matchExpressions key {:?}: operator {} takes no values",
                        e.key, e.operator
                    )))
                }
                _ => {}
            }
            reqs.push(Requirement {
                key: e.key.clone(),
                op,
                values: values.into_iter().collect(),
            });
        }
        reqs.sort();
        reqs.dedup();
        Ok(Selector { reqs })
    }

    /// Whether the labels satisfy every requirement.
    pub fn matches<L: Labels + ?Sized>(&self, labels: &L) -> bool {
        self.reqs.iter().all(|r| r.matches(labels))
    }

    /// The empty selector.
    pub fn is_everything(&self) -> bool {
        self.reqs.is_empty()
    }

    /// `Some(ns)` when this namespace selector can only match the namespace `ns`
    /// (`kubernetes.io/metadata.name In (ns)` plus possibly other requirements).
    pub fn single_namespace(&self) -> Option<&str> {
        self.reqs
            .iter()
            .find(|r| r.key == NAMESPACE_NAME_LABEL && r.op == Op::In && r.values.len() == 1)
            .and_then(|r| r.values.first())
            .map(String::as_str)
    }

    /// The requirements, sorted.
    pub fn requirements(&self) -> &[Requirement] {
        &self.reqs
    }
}

/// True when any selector of a non-empty list matches; true for an empty list ("no
/// restriction"), which is how every selector list in Palisade's CRDs is defined.
pub fn any_matches<L: Labels + ?Sized>(selectors: &[Selector], labels: &L) -> bool {
    selectors.is_empty() || selectors.iter().any(|s| s.matches(labels))
}

fn check_key(key: &str) -> Result<(), SelectorError> {
    // The API server's grammar (a qualified name: `[prefix/]name`), checked here too: the
    // canonical form below is a set's identity, and a key or value with `!`, `(`, `,` or
    // spaces could spell another selector's identity (custom resources reach us without
    // this validation).
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            })
    });
    if !prefix_ok || name.is_empty() || !is_label_name(name) {
        return Err(SelectorError(format!("invalid label key {key:?}")));
    }
    Ok(())
}

/// A label value: empty, or at most 63 characters of `[A-Za-z0-9_.-]` starting and ending
/// with an alphanumeric one (the API server's rule; see [`check_key`] for why it matters).
fn check_value(key: &str, value: &str) -> Result<(), SelectorError> {
    if value.is_empty() || is_label_name(value) {
        Ok(())
    } else {
        Err(SelectorError(format!(
            "label key {key:?}: invalid value {value:?}"
        )))
    }
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, at most 63 characters.
fn is_label_name(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    s.len() <= 63
        && s.starts_with(alnum)
        && s.ends_with(alnum)
        && s.chars().all(|c| alnum(c) || matches!(c, '-' | '_' | '.'))
}

/// Canonical text, like `labels.Selector.String()`: `a in (x,y),b notin (z),c,!d`;
/// the empty selector prints as `{}`.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.reqs.is_empty() {
            return f.write_str("{}");
        }
        for (i, r) in self.reqs.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match r.op {
                Op::In => write!(f, "{} in ({})", r.key, r.values.join(","))?,
                Op::NotIn => write!(f, "{} notin ({})", r.key, r.values.join(","))?,
                Op::Exists => write!(f, "{}", r.key)?,
                Op::DoesNotExist => write!(f, "!{}", r.key)?,
            }
        }
        Ok(())
    }
}

/// Builders for tests and examples: label maps and API selectors from literals.
pub mod builders {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

    /// A label map from pairs.
    pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// One `matchExpressions` entry (`values` empty: none).
    pub fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: if values.is_empty() {
                None
            } else {
                Some(values.iter().map(|s| s.to_string()).collect())
            },
        }
    }

    /// An API selector (`matchLabels` from pairs, then the expressions; empty parts absent).
    pub fn api_selector(
        match_labels: &[(&str, &str)],
        exprs: Vec<LabelSelectorRequirement>,
    ) -> LabelSelector {
        LabelSelector {
            match_labels: if match_labels.is_empty() {
                None
            } else {
                Some(labels(match_labels))
            },
            match_expressions: if exprs.is_empty() { None } else { Some(exprs) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::builders::{api_selector, expr, labels};
    use super::*;

    fn sel(
        ml: &[(&str, &str)],
        exprs: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement>,
    ) -> Selector {
        Selector::from_api(Some(&api_selector(ml, exprs))).expect("valid selector")
    }

    #[test]
    fn empty_and_absent_selectors_match_everything() {
        let none = Selector::from_api(None).unwrap();
        let empty = Selector::from_api(Some(&LabelSelector::default())).unwrap();
        assert!(none.is_everything() && empty.is_everything());
        assert!(none.matches(&labels(&[])));
        assert!(empty.matches(&labels(&[("a", "b")])));
        assert_eq!(none.to_string(), "{}");
    }

    #[test]
    fn match_labels_is_and_of_equalities() {
        let s = sel(&[("app", "web"), ("tier", "fe")], vec![]);
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "fe"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "db"), ("tier", "fe")])));
    }

    #[test]
    fn all_operators() {
        let in_ = sel(&[], vec![expr("env", "In", &["prod", "staging"])]);
        assert!(in_.matches(&labels(&[("env", "prod")])));
        assert!(!in_.matches(&labels(&[("env", "dev")])));
        assert!(!in_.matches(&labels(&[])));

        let not_in = sel(&[], vec![expr("env", "NotIn", &["prod"])]);
        assert!(not_in.matches(&labels(&[("env", "dev")])));
        assert!(not_in.matches(&labels(&[])), "NotIn matches a missing key");
        assert!(!not_in.matches(&labels(&[("env", "prod")])));

        let exists = sel(&[], vec![expr("canary", "Exists", &[])]);
        assert!(exists.matches(&labels(&[("canary", "")])));
        assert!(!exists.matches(&labels(&[])));

        let dne = sel(&[], vec![expr("canary", "DoesNotExist", &[])]);
        assert!(dne.matches(&labels(&[("other", "x")])));
        assert!(!dne.matches(&labels(&[("canary", "1")])));

        let combined = sel(
            &[("app", "web")],
            vec![
                expr("env", "NotIn", &["prod"]),
                expr("canary", "DoesNotExist", &[]),
            ],
        );
        assert!(combined.matches(&labels(&[("app", "web"), ("env", "dev")])));
        assert!(!combined.matches(&labels(&[("app", "web"), ("canary", "y")])));
    }

    #[test]
    fn canonical_form_is_order_independent() {
        let a = sel(
            &[("b", "2"), ("a", "1")],
            vec![expr("c", "In", &["y", "x", "x"])],
        );
        let b = sel(
            &[],
            vec![
                expr("c", "In", &["x", "y"]),
                expr("a", "In", &["1"]),
                expr("b", "In", &["2"]),
            ],
        );
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "a in (1),b in (2),c in (x,y)");
        let c = sel(
            &[],
            vec![expr("d", "DoesNotExist", &[]), expr("e", "Exists", &[])],
        );
        assert_eq!(c.to_string(), "!d,e");
    }

    #[test]
    fn invalid_selectors_are_rejected() {
        for e in [
            expr("a", "In", &[]),
            expr("a", "NotIn", &[]),
            expr("a", "Exists", &["x"]),
            expr("a", "Equals", &["x"]),
            expr("", "Exists", &[]),
            // Keys and values outside the API grammar: with them one selector could print
            // as another's identity (`a notin (x),b in (y)` from one requirement).
            expr("a", "NotIn", &["x),b in (y"]),
            expr("!d", "Exists", &[]),
            expr("a b", "Exists", &[]),
            expr("a", "In", &["-x"]),
            expr("a", "In", &[&"v".repeat(64)]),
            expr("Example.com/a", "Exists", &[]),
            expr("/a", "Exists", &[]),
            expr("x/", "Exists", &[]),
        ] {
            let r = Selector::from_api(Some(&LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![e.clone()]),
            }));
            assert!(r.is_err(), "{e:?} should be invalid");
        }
        let bad_label = LabelSelector {
            match_labels: Some(labels(&[("a", "x,b=y")])),
            match_expressions: None,
        };
        assert!(Selector::from_api(Some(&bad_label)).is_err());
        // What the API server accepts stays accepted.
        for (k, v) in [
            ("app.kubernetes.io/name", "web-1.x_y"),
            ("kubernetes.io/metadata.name", "kube-system"),
            ("a", ""),
            ("A9", &*"v".repeat(63)),
        ] {
            let ok = LabelSelector {
                match_labels: Some(labels(&[(k, v)])),
                match_expressions: Some(vec![expr(k, "In", &[v]), expr(k, "Exists", &[])]),
            };
            assert!(Selector::from_api(Some(&ok)).is_ok(), "{k}={v}");
        }
    }

    #[test]
    fn namespace_labels_imply_the_name_label() {
        let ns = NamespaceLabels {
            name: "team-a",
            labels: None,
        };
        assert!(Selector::namespace_named("team-a").matches(&ns));
        assert!(!Selector::namespace_named("team-b").matches(&ns));
        assert_eq!(
            Selector::namespace_named("team-a").single_namespace(),
            Some("team-a")
        );
        let l = labels(&[("team", "a")]);
        let ns = NamespaceLabels {
            name: "x",
            labels: Some(&l),
        };
        assert!(sel(&[("team", "a")], vec![]).matches(&ns));
        assert!(sel(&[(NAMESPACE_NAME_LABEL, "x")], vec![]).matches(&ns));
    }
}
