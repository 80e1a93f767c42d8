//! Provenance: which API object a rule comes from, written into the rule's
//! `-m comment --comment` and read back by `palisade netpol explain` (and the denied-traffic
//! log) from the rules a packet actually traversed.
//!
//! ```text
//!  policy    np/NAMESPACE/NAME              (a profile chain's jump into a policy chain)
//!  rule      np/NAMESPACE/NAME/ingress/2    (a policy chain rule: the policy's ingress[2])
//!  other     cnp/TIER/NAME, cnp/TIER/NAME/egress/0, ...   (any KIND/SCOPE/NAME)
//! ```
//!
//! Kubernetes names cannot contain `/`, so the text splits unambiguously: three segments are
//! a policy, five a rule of it. Any compiler that writes comments in this grammar
//! (ClusterNetworkPolicy tiers, say) is explained without changes here.

use std::fmt;

/// Kind segment of a NetworkPolicy.
pub const NETWORK_POLICY: &str = "np";

/// A policy-like object: `KIND/SCOPE/NAME` (for a NetworkPolicy the scope is its namespace).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyRef {
    pub kind: String,
    pub scope: String,
    pub name: String,
}

impl PolicyRef {
    /// A NetworkPolicy `namespace/name`.
    pub fn network_policy(namespace: &str, name: &str) -> PolicyRef {
        PolicyRef {
            kind: NETWORK_POLICY.into(),
            scope: namespace.into(),
            name: name.into(),
        }
    }

    /// `KIND/SCOPE/NAME`.
    pub fn parse(s: &str) -> Option<PolicyRef> {
        let mut it = s.split('/');
        let (kind, scope, name) = (it.next()?, it.next()?, it.next()?);
        if it.next().is_some() || [kind, scope, name].iter().any(|x| !segment(x)) {
            return None;
        }
        Some(PolicyRef {
            kind: kind.into(),
            scope: scope.into(),
            name: name.into(),
        })
    }

    /// `ns/name` for a NetworkPolicy, the whole reference otherwise.
    pub fn short(&self) -> String {
        if self.kind == NETWORK_POLICY {
            format!("{}/{}", self.scope, self.name)
        } else {
            self.to_string()
        }
    }
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.kind, self.scope, self.name)
    }
}

/// One rule of a policy: `KIND/SCOPE/NAME/DIRECTION/INDEX`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleRef {
    pub policy: PolicyRef,
    /// `ingress` or `egress`.
    pub direction: String,
    pub index: usize,
}

impl RuleRef {
    pub fn parse(s: &str) -> Option<RuleRef> {
        let (head, index) = s.rsplit_once('/')?;
        let (head, direction) = head.rsplit_once('/')?;
        if !matches!(direction, "ingress" | "egress") {
            return None;
        }
        Some(RuleRef {
            policy: PolicyRef::parse(head)?,
            direction: direction.into(),
            index: index.parse().ok()?,
        })
    }
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.policy, self.direction, self.index)
    }
}

fn segment(s: &str) -> bool {
    !s.is_empty() && !s.contains(char::is_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_round_trip() {
        let p = PolicyRef::network_policy("x", "deny-all");
        assert_eq!(p.to_string(), "np/x/deny-all");
        assert_eq!(PolicyRef::parse("np/x/deny-all"), Some(p.clone()));
        assert_eq!(p.short(), "x/deny-all");
        let r = RuleRef::parse("np/x/allow/ingress/2").unwrap();
        assert_eq!(r.policy.name, "allow");
        assert_eq!(r.index, 2);
        assert_eq!(r.to_string(), "np/x/allow/ingress/2");
        let c = RuleRef::parse("cnp/admin/block-all/egress/0").unwrap();
        assert_eq!(c.policy.kind, "cnp");
        assert_eq!(c.policy.scope, "admin");
        assert_eq!(c.policy.short(), "cnp/admin/block-all");
    }

    #[test]
    fn other_comments_are_not_provenance() {
        for s in [
            "x/a",
            "local pod not known yet",
            "np/x",
            "np/x/a/b",
            "np/x/a/sideways/1",
            "np/x/a/ingress/one",
            "np//a",
            "",
            "IPv6 neighbor solicitation",
        ] {
            assert!(PolicyRef::parse(s).is_none(), "{s}");
            assert!(RuleRef::parse(s).is_none(), "{s}");
        }
    }
}
