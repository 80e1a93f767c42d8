//! Pure translation of a `core/v1` Service into allocator input, and back out of its status.
//!
//! This module owns how Service fields and our annotations are read:
//!
//! ```text
//!   Service ──is_ours(class)──► ServiceRequest ──► Allocator::assign
//!     metadata.annotations  palisade.dev/loadBalancerIPs (wins over spec.loadBalancerIP)
//!                           palisade.dev/address-pool, palisade.dev/allow-shared-ip
//!     spec                  ipFamilies, ipFamilyPolicy, ports, externalTrafficPolicy, selector
//!   status.loadBalancer.ingress[].ip ──status_ips──► Allocator::restore (start-up)
//! ```
//!
//! No I/O; the runtime passes the Namespace's labels in.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::str::FromStr;

use k8s_openapi::api::core::v1::Service;

use crate::allocator::{
    parse_requested_ips, IpFamilyPolicy, Port, Protocol, ServiceKey, ServiceRequest,
};
use crate::constants::annotations;
use crate::error::Error;
use crate::pool::Family;

/// Whether this controller handles the Service: `type: LoadBalancer` and either
/// `loadBalancerClass == class`, or no class at all when `claim_unclassed` is set.
pub fn is_ours(svc: &Service, class: &str, claim_unclassed: bool) -> bool {
    let Some(spec) = &svc.spec else {
        return false;
    };
    if spec.type_.as_deref() != Some("LoadBalancer") {
        return false;
    }
    match spec.load_balancer_class.as_deref() {
        Some(c) => c == class,
        None => claim_unclassed,
    }
}

/// `namespace/name` of a Service (empty strings when unset).
pub fn service_key(svc: &Service) -> ServiceKey {
    ServiceKey::new(
        svc.metadata.namespace.clone().unwrap_or_default(),
        svc.metadata.name.clone().unwrap_or_default(),
    )
}

fn annotation<'a>(svc: &'a Service, key: &str) -> Option<&'a str> {
    svc.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
}

/// Builds the allocator request for a Service. Fails only on an unparsable requested IP.
pub fn service_request(
    svc: &Service,
    namespace_labels: &BTreeMap<String, String>,
) -> Result<ServiceRequest, Error> {
    let spec = svc.spec.clone().unwrap_or_default();
    let requested_ips = match annotation(svc, annotations::LOAD_BALANCER_IPS) {
        Some(list) => parse_requested_ips(list)?,
        None => match spec.load_balancer_ip.as_deref().map(str::trim) {
            Some(s) if !s.is_empty() => parse_requested_ips(s)?,
            _ => Vec::new(),
        },
    };
    let ip_families = spec
        .ip_families
        .iter()
        .flatten()
        .filter_map(|f| Family::from_str(f).ok())
        .collect();
    let ip_family_policy = spec
        .ip_family_policy
        .as_deref()
        .and_then(|p| IpFamilyPolicy::from_str(p).ok())
        .unwrap_or_default();
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let protocol = match p.protocol.as_deref() {
                None => Protocol::Tcp,
                Some(s) => Protocol::from_str(s).ok()?,
            };
            Some(Port {
                protocol,
                port: u16::try_from(p.port).ok()?,
            })
        })
        .collect();
    Ok(ServiceRequest {
        key: service_key(svc),
        labels: svc.metadata.labels.clone().unwrap_or_default(),
        namespace_labels: namespace_labels.clone(),
        requested_ips,
        requested_pool: annotation(svc, annotations::ADDRESS_POOL).map(str::to_string),
        ip_families,
        ip_family_policy,
        sharing_key: annotation(svc, annotations::ALLOW_SHARED_IP).map(str::to_string),
        ports,
        external_traffic_policy_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        selector: spec.selector.unwrap_or_default(),
    })
}

/// The IPs in `status.loadBalancer.ingress` (hostnames and unparsable entries ignored).
pub fn status_ips(svc: &Service) -> Vec<IpAddr> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| {
            i.ip.as_deref()
                .and_then(|ip| IpAddr::from_str(ip.trim()).ok())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(v: serde_json::Value) -> Service {
        serde_json::from_value(v).expect("service")
    }

    #[test]
    fn full_service_translates() {
        let svc = service(json!({
            "metadata": {
                "namespace": "shop", "name": "web",
                "labels": {"tier": "gold"},
                "annotations": {
                    "palisade.dev/loadBalancerIPs": "198.51.100.210, 2001:db8::10",
                    "palisade.dev/address-pool": " lan ",
                    "palisade.dev/allow-shared-ip": "web"
                }
            },
            "spec": {
                "type": "LoadBalancer",
                "loadBalancerIP": "198.51.100.99",
                "ipFamilies": ["IPv4", "IPv6"],
                "ipFamilyPolicy": "RequireDualStack",
                "externalTrafficPolicy": "Local",
                "selector": {"app": "web"},
                "ports": [{"port": 80}, {"port": 53, "protocol": "UDP"}]
            },
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.210"}, {"hostname": "x"}]}}
        }));
        assert!(is_ours(&svc, "palisade.dev/palisade", true));
        assert!(!is_ours(&svc, "palisade.dev/palisade", false));
        let ns = BTreeMap::from([("env".to_string(), "prod".to_string())]);
        let r = service_request(&svc, &ns).unwrap();
        assert_eq!(r.key, ServiceKey::new("shop", "web"));
        assert_eq!(
            r.requested_ips,
            vec![
                "198.51.100.210".parse::<IpAddr>().unwrap(),
                "2001:db8::10".parse().unwrap()
            ],
            "annotation wins over spec.loadBalancerIP"
        );
        assert_eq!(r.requested_pool.as_deref(), Some("lan"));
        assert_eq!(r.sharing_key.as_deref(), Some("web"));
        assert_eq!(r.ip_families, vec![Family::V4, Family::V6]);
        assert_eq!(r.ip_family_policy, IpFamilyPolicy::RequireDualStack);
        assert!(r.external_traffic_policy_local);
        assert_eq!(r.ports, vec![Port::tcp(80), Port::udp(53)]);
        assert_eq!(r.namespace_labels, ns);
        assert_eq!(r.labels["tier"], "gold");
        assert_eq!(r.selector["app"], "web");
        assert_eq!(
            status_ips(&svc),
            vec!["198.51.100.210".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn class_and_type_filtering_and_fallbacks() {
        let classed = service(json!({
            "metadata": {"namespace": "a", "name": "b"},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": "other", "loadBalancerIP": "10.0.0.1"}
        }));
        assert!(!is_ours(&classed, "palisade.dev/palisade", true));
        assert!(is_ours(&classed, "other", false));
        let r = service_request(&classed, &BTreeMap::new()).unwrap();
        assert_eq!(r.requested_ips, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(r.ip_family_policy, IpFamilyPolicy::SingleStack);
        assert!(r.sharing_key.is_none() && r.requested_pool.is_none());

        let cluster_ip = service(json!({"metadata": {"name": "c"}, "spec": {"type": "ClusterIP"}}));
        assert!(!is_ours(&cluster_ip, "palisade.dev/palisade", true));
        assert!(status_ips(&cluster_ip).is_empty());

        let bad = service(json!({
            "metadata": {"namespace": "a", "name": "b",
                         "annotations": {"palisade.dev/loadBalancerIPs": "10.0.0.300"}},
            "spec": {"type": "LoadBalancer"}
        }));
        let e = service_request(&bad, &BTreeMap::new()).unwrap_err();
        assert_eq!(e.reason(), crate::constants::reasons::INVALID_ADDRESS);
        assert!(e.to_string().contains("\"10.0.0.300\""), "{e}");
    }
}
