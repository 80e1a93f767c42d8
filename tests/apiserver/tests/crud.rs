//! Request/response behaviour through the real `kube::Client`: CRUD, conflicts, patches,
//! status subresource, selectors, pagination, errors, kubeconfig, discovery, request log.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{api_code, client, client_as, server};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, PodSpec, PodStatus, Service};
use kube::api::{
    Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams, ResourceExt,
};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::Client;
use palisade_loadbalancer::crd::{IPAddressPool, IPAddressPoolSpec};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn pod(name: &str, node: &str, labels: &[(&str, &str)]) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            ..PodStatus::default()
        }),
    }
}

fn names<K: ResourceExt>(items: &[K]) -> Vec<String> {
    items.iter().map(ResourceExt::name_any).collect()
}

#[tokio::test]
async fn pod_lifecycle_with_conflicts_and_status() {
    let server = server().await;
    let client = client(&server);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = namespaces
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some("team-a".into()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        ns.labels()
            .get("kubernetes.io/metadata.name")
            .map(String::as_str),
        Some("team-a")
    );
    assert_eq!(ns.status.and_then(|s| s.phase).as_deref(), Some("Active"));

    let pods: Api<Pod> = Api::namespaced(client.clone(), "team-a");
    let created = pods
        .create(
            &PostParams::default(),
            &pod("web-1", "node-a", &[("app", "web")]),
        )
        .await
        .unwrap();
    assert_eq!(created.namespace().as_deref(), Some("team-a"));
    assert!(created.uid().is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    assert_eq!(created.metadata.generation, Some(1));
    assert!(
        created.status.is_none(),
        "create drops status (status subresource)"
    );
    let rv1: u64 = created.resource_version().unwrap().parse().unwrap();

    let (code, reason) = api_code(
        pods.create(&PostParams::default(), &pod("web-1", "node-a", &[]))
            .await,
    );
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));

    // Replace with the current resourceVersion works and bumps generation on spec change...
    let mut changed = created.clone();
    changed.spec.as_mut().unwrap().hostname = Some("web".into());
    let replaced = pods
        .replace("web-1", &PostParams::default(), &changed)
        .await
        .unwrap();
    let rv2: u64 = replaced.resource_version().unwrap().parse().unwrap();
    assert!(rv2 > rv1);
    assert_eq!(replaced.metadata.generation, Some(2));
    // ...the stale one is a 409 Conflict.
    let (code, reason) = api_code(
        pods.replace("web-1", &PostParams::default(), &changed)
            .await,
    );
    assert_eq!((code, reason.as_str()), (409, "Conflict"));

    // Main-resource writes ignore status; /status writes change only status.
    let mut with_status = replaced.clone();
    with_status.status = Some(PodStatus {
        phase: Some("Running".into()),
        ..PodStatus::default()
    });
    let ignored = pods
        .replace("web-1", &PostParams::default(), &with_status)
        .await
        .unwrap();
    assert!(ignored.status.is_none());
    assert_eq!(
        ignored.resource_version(),
        replaced.resource_version(),
        "no-op write"
    );
    let patched = pods
        .patch_status(
            "web-1",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"podIP": "10.244.1.5", "phase": "Running"},
                                  "spec": {"hostname": "ignored"}}),
            ),
        )
        .await
        .unwrap();
    let status = patched.status.clone().unwrap();
    assert_eq!(status.pod_ip.as_deref(), Some("10.244.1.5"));
    assert_eq!(
        patched.spec.as_ref().unwrap().hostname.as_deref(),
        Some("web")
    );
    assert_eq!(
        pods.get_status("web-1")
            .await
            .unwrap()
            .status
            .unwrap()
            .pod_ip
            .as_deref(),
        Some("10.244.1.5")
    );
    let mut status_update = patched.clone();
    status_update.status.as_mut().unwrap().phase = Some("Succeeded".into());
    let after = pods
        .replace_status("web-1", &PostParams::default(), &status_update)
        .await
        .unwrap();
    assert_eq!(after.status.unwrap().phase.as_deref(), Some("Succeeded"));

    // Merge patch of labels; a resourceVersion inside a patch is a precondition.
    let labelled = pods
        .patch(
            "web-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"tier": "fe", "app": null}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        labelled.labels(),
        &BTreeMap::from([("tier".to_owned(), "fe".to_owned())])
    );
    let (code, _) = api_code(
        pods.patch(
            "web-1",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"resourceVersion": rv1.to_string(), "labels": {"x": "y"}}}),
            ),
        )
        .await,
    );
    assert_eq!(code, 409);

    // JSON patch and strategic merge patch (applied as merge patch).
    let jp: json_patch::Patch = serde_json::from_value(json!([
        {"op": "add", "path": "/metadata/annotations", "value": {"a": "1"}}
    ]))
    .unwrap();
    let p = pods
        .patch("web-1", &PatchParams::default(), &Patch::<()>::Json(jp))
        .await
        .unwrap();
    assert_eq!(p.annotations().get("a").map(String::as_str), Some("1"));
    let p = pods
        .patch(
            "web-1",
            &PatchParams::default(),
            &Patch::Strategic(json!({"metadata": {"annotations": {"b": "2"}}})),
        )
        .await
        .unwrap();
    assert_eq!(p.annotations().len(), 2);

    // Delete returns the object; then it is gone.
    let deleted = pods
        .delete("web-1", &DeleteParams::default())
        .await
        .unwrap();
    let deleted = deleted.left().expect("deleted object");
    assert!(deleted.resource_version().unwrap().parse::<u64>().unwrap() > rv2);
    let (code, reason) = api_code(pods.get("web-1").await);
    assert_eq!((code, reason.as_str()), (404, "NotFound"));
    assert!(pods.get_opt("web-1").await.unwrap().is_none());
    let (code, _) = api_code(pods.delete("web-1", &DeleteParams::default()).await);
    assert_eq!(code, 404);
    let (code, _) = api_code(
        pods.patch("web-1", &PatchParams::default(), &Patch::Merge(json!({})))
            .await,
    );
    assert_eq!(code, 404);
}

#[tokio::test]
async fn label_and_field_selectors_and_all_namespaces() {
    let server = server().await;
    let client = client(&server);
    for (ns, name, node, app) in [
        ("a", "p1", "node-a", "web"),
        ("a", "p2", "node-b", "web"),
        ("b", "p3", "node-a", "db"),
        ("b", "p4", "node-b", "cache"),
    ] {
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        pods.create(&PostParams::default(), &pod(name, node, &[("app", app)]))
            .await
            .unwrap();
    }
    let all: Api<Pod> = Api::all(client.clone());
    let list = |lp: ListParams| {
        let all = all.clone();
        async move { names(&all.list(&lp).await.unwrap().items) }
    };
    assert_eq!(list(ListParams::default()).await, ["p1", "p2", "p3", "p4"]);
    assert_eq!(
        list(ListParams::default().labels("app=web")).await,
        ["p1", "p2"]
    );
    assert_eq!(
        list(ListParams::default().labels("app in (db,cache)")).await,
        ["p3", "p4"]
    );
    assert_eq!(
        list(ListParams::default().labels("app!=web")).await,
        ["p3", "p4"]
    );
    assert_eq!(
        list(ListParams::default().fields("spec.nodeName=node-a")).await,
        ["p1", "p3"]
    );
    assert_eq!(
        list(ListParams::default().fields("metadata.namespace=b,spec.nodeName!=node-a")).await,
        ["p4"]
    );
    let in_a: Api<Pod> = Api::namespaced(client.clone(), "a");
    assert_eq!(
        names(&in_a.list(&ListParams::default()).await.unwrap().items),
        ["p1", "p2"]
    );

    let (code, _) = api_code(
        all.list(&ListParams::default().fields("spec.bogus=x"))
            .await,
    );
    assert_eq!(code, 400);
    let (code, _) = api_code(all.list(&ListParams::default().labels("app in web")).await);
    assert_eq!(code, 400);

    // deletecollection honours the selector.
    in_a.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("app=web"),
    )
    .await
    .unwrap();
    assert_eq!(list(ListParams::default()).await, ["p3", "p4"]);
}

#[tokio::test]
async fn pagination_and_generate_name() {
    let server = server().await;
    let client = client(&server);
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let mut created = Vec::new();
    for _ in 0..7 {
        let cm = ConfigMap {
            metadata: ObjectMeta {
                generate_name: Some("cm-".into()),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        };
        let cm = cms.create(&PostParams::default(), &cm).await.unwrap();
        assert!(cm.name_any().starts_with("cm-") && cm.name_any().len() == 8);
        created.push(cm.name_any());
    }
    created.sort();
    let mut seen = Vec::new();
    let mut lp = ListParams::default().limit(3);
    let mut pages = 0;
    let mut list_rv = None;
    loop {
        let page = cms.list(&lp).await.unwrap();
        pages += 1;
        seen.extend(names(&page.items));
        let rv = page.metadata.resource_version.clone();
        assert!(
            list_rv.is_none() || list_rv == rv,
            "one resourceVersion for all pages"
        );
        list_rv = rv;
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => {
                lp = ListParams::default().limit(3).continue_token(&token)
            }
            _ => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, created);

    // A continue token whose resourceVersion was compacted away is 410 Expired.
    let first = cms.list(&ListParams::default().limit(2)).await.unwrap();
    let token = first.metadata.continue_.unwrap();
    cms.create(
        &PostParams::default(),
        &ConfigMap {
            metadata: ObjectMeta {
                name: Some("late".into()),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        },
    )
    .await
    .unwrap();
    server.compact();
    let (code, reason) = api_code(
        cms.list(&ListParams::default().limit(2).continue_token(&token))
            .await,
    );
    assert_eq!((code, reason.as_str()), (410, "Expired"));
}

async fn lease(api: &Api<Lease>, name: &str) -> Lease {
    api.get(name).await.unwrap()
}

#[tokio::test]
async fn lease_optimistic_concurrency_and_request_log() {
    let server = server().await;
    let a: Api<Lease> = Api::namespaced(client_as(&server, "agent-a"), "palisade-system");
    let b: Api<Lease> = Api::namespaced(client_as(&server, "agent-b"), "palisade-system");

    // PUT on a missing Lease creates it (create-on-update, as upstream for Leases).
    let initial = Lease {
        metadata: ObjectMeta {
            name: Some("palisade-leader".into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("agent-a".into()),
            lease_duration_seconds: Some(15),
            ..LeaseSpec::default()
        }),
    };
    a.replace("palisade-leader", &PostParams::default(), &initial)
        .await
        .unwrap();

    // Both read the same version; both try to take it; exactly one wins.
    let seen_a = lease(&a, "palisade-leader").await;
    let seen_b = lease(&b, "palisade-leader").await;
    let mut take_a = seen_a.clone();
    take_a.spec.as_mut().unwrap().holder_identity = Some("agent-a".into());
    take_a.spec.as_mut().unwrap().lease_transitions = Some(1);
    let mut take_b = seen_b.clone();
    take_b.spec.as_mut().unwrap().holder_identity = Some("agent-b".into());
    take_b.spec.as_mut().unwrap().lease_transitions = Some(1);
    let ra = a
        .replace("palisade-leader", &PostParams::default(), &take_a)
        .await;
    let rb = b
        .replace("palisade-leader", &PostParams::default(), &take_b)
        .await;
    assert!(ra.is_ok());
    assert_eq!(api_code(rb), (409, "Conflict".to_owned()));
    assert_eq!(
        lease(&b, "palisade-leader")
            .await
            .spec
            .unwrap()
            .holder_identity
            .as_deref(),
        Some("agent-a")
    );

    // The request log tells who wrote what.
    let log = server.request_log();
    let writers: Vec<(String, u16)> = log
        .iter()
        .filter(|r| r.is_write() && r.resource == "leases")
        .map(|r| (r.user_agent.clone().unwrap_or_default(), r.code))
        .collect();
    assert_eq!(
        writers,
        [
            ("agent-a".to_owned(), 201),
            ("agent-a".to_owned(), 200),
            ("agent-b".to_owned(), 409)
        ]
    );
    assert_eq!(server.count_requests("update", "leases"), 3);
    assert_eq!(server.count_requests("get", "leases"), 3);
    let rec = log.iter().find(|r| r.verb == "update").unwrap();
    assert_eq!(rec.group, "coordination.k8s.io");
    assert_eq!(rec.namespace.as_deref(), Some("palisade-system"));
    assert_eq!(rec.name.as_deref(), Some("palisade-leader"));
    assert!(rec.peer.ip().is_loopback());
    server.clear_request_log();
    assert!(server.request_log().is_empty());
}

#[tokio::test]
async fn service_server_side_apply_and_status() {
    let server = server().await;
    let client = client(&server);
    let svcs: Api<Service> = Api::namespaced(client, "default");
    let apply = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "annotations": {"palisade.dev/address-pool": "lan"}},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}
    });
    // Apply without fieldManager is rejected like upstream.
    let (code, _) = api_code(
        svcs.patch("web", &PatchParams::default(), &Patch::Apply(&apply))
            .await,
    );
    assert_eq!(code, 422);
    let pp = PatchParams::apply("tests").force();
    let created = svcs.patch("web", &pp, &Patch::Apply(&apply)).await.unwrap();
    assert_eq!(
        created.spec.as_ref().unwrap().type_.as_deref(),
        Some("LoadBalancer")
    );
    let again = svcs.patch("web", &pp, &Patch::Apply(&apply)).await.unwrap();
    assert_eq!(
        again.resource_version(),
        created.resource_version(),
        "no-op apply"
    );

    let with_ip = svcs
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.200"}]}}}),
            ),
        )
        .await
        .unwrap();
    let ingress = with_ip
        .status
        .unwrap()
        .load_balancer
        .unwrap()
        .ingress
        .unwrap();
    assert_eq!(ingress[0].ip.as_deref(), Some("198.51.100.200"));
    // A main-resource patch cannot touch status.
    let p = svcs
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"loadBalancer": null}, "spec": {"loadBalancerClass": "palisade.dev/lb"}})),
        )
        .await
        .unwrap();
    assert!(p.status.unwrap().load_balancer.unwrap().ingress.is_some());
    assert_eq!(
        server
            .store()
            .get_object("v1", "Service", Some("default"), "web")
            .unwrap()
            .pointer("/spec/loadBalancerClass"),
        Some(&json!("palisade.dev/lb"))
    );
}

#[tokio::test]
async fn custom_resources_typed_dynamic_and_malformed() {
    let server = server().await;
    let client = client(&server);
    let pools: Api<IPAddressPool> = Api::all(client.clone());
    let pool = IPAddressPool::new(
        "lan",
        IPAddressPoolSpec {
            addresses: vec!["198.51.100.200-198.51.100.250".into()],
            ..IPAddressPoolSpec::default()
        },
    );
    let created = pools.create(&PostParams::default(), &pool).await.unwrap();
    assert!(created.metadata.namespace.is_none(), "cluster-scoped");
    assert_eq!(created.spec.addresses, pool.spec.addresses);
    pools
        .patch_status(
            "lan",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"assignedIPv4": 1, "availableIPv4": 50}})),
        )
        .await
        .unwrap();
    let raw = server
        .store()
        .get_object("palisade.dev/v1alpha1", "IPAddressPool", None, "lan")
        .unwrap();
    assert_eq!(raw.pointer("/status/availableIPv4"), Some(&json!(50)));

    // A malformed pool (spec.addresses is not a list) goes in through the store...
    server
        .store()
        .put_object(json!({
            "apiVersion": "palisade.dev/v1alpha1", "kind": "IPAddressPool",
            "metadata": {"name": "broken"},
            "spec": {"addresses": 42}
        }))
        .unwrap();
    // ...the typed list fails to decode it (what an agent must guard against)...
    assert!(matches!(
        pools.list(&ListParams::default()).await,
        Err(kube::Error::SerdeError(_))
    ));
    // ...and a dynamic client sees both.
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("palisade.dev", "v1alpha1", "IPAddressPool"),
        "ipaddresspools",
    );
    let dynamic: Api<DynamicObject> = Api::all_with(client, &ar);
    let items = dynamic.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(names(&items), ["broken", "lan"]);
    assert_eq!(items[0].data.pointer("/spec/addresses"), Some(&json!(42)));
}

#[tokio::test]
async fn kubeconfig_version_and_discovery() {
    let server = server().await;
    let dir = std::env::temp_dir().join(format!("palisade-testapi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kubeconfig");
    server.write_kubeconfig(&path).unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        config.cluster_url.to_string().trim_end_matches('/'),
        server.url()
    );
    assert_eq!(config.default_namespace, "default");
    let client = Client::try_from(config).unwrap();
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "33")
    );

    let discovery = kube::discovery::Discovery::new(client.clone())
        .run()
        .await
        .unwrap();
    let group = discovery
        .groups()
        .find(|g| g.name() == "palisade.dev")
        .expect("palisade.dev discovered");
    let kinds: Vec<String> = group
        .recommended_resources()
        .into_iter()
        .map(|(ar, _)| ar.kind)
        .collect();
    assert!(kinds.contains(&"IPAddressPool".to_owned()), "{kinds:?}");
    assert!(discovery.has_group("coordination.k8s.io"));
    let (pods, caps) = discovery
        .groups()
        .find(|g| g.name().is_empty())
        .unwrap()
        .recommended_kind("Pod")
        .unwrap();
    assert_eq!(pods.plural, "pods");
    assert!(caps
        .subresources
        .iter()
        .any(|(sr, _)| sr.plural == "pods/status" || sr.plural == "status"));

    // Kinds registered later are served (and discovered).
    server.register(palisade_testapi::ResourceDef::namespaced(
        "example.dev",
        "v1",
        "Widget",
        "widgets",
    ));
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.dev", "v1", "Widget"),
        "widgets",
    );
    let widgets: Api<DynamicObject> = Api::namespaced_with(client, "default", &ar);
    let w: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 3}
    }))
    .unwrap();
    widgets.create(&PostParams::default(), &w).await.unwrap();
    assert_eq!(widgets.get("w").await.unwrap().data["spec"]["size"], 3);
}

/// Sends one raw HTTP/1.1 request and returns (status code, body as JSON or string).
async fn raw(server: &palisade_testapi::TestApiServer, request: &str) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
        .await
        .expect("response")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let code: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    (
        code,
        serde_json::from_str(body).unwrap_or(Value::String(body.to_owned())),
    )
}

fn request(method: &str, path: &str, content_type: &str, body: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn bad_input_gets_status_errors() {
    let server = server().await;
    let cases = [
        (
            request(
                "POST",
                "/api/v1/namespaces/x/pods",
                "application/json",
                "{not json",
            ),
            400,
        ),
        (
            request(
                "POST",
                "/api/v1/namespaces/x/pods",
                "application/json",
                "[1,2]",
            ),
            400,
        ),
        (
            request(
                "POST",
                "/api/v1/namespaces/x/pods",
                "application/json",
                r#"{"metadata": 7}"#,
            ),
            400,
        ),
        (
            request(
                "POST",
                "/api/v1/namespaces/x/pods",
                "application/json",
                r#"{"metadata": {}}"#,
            ),
            422,
        ),
        (
            request(
                "POST",
                "/api/v1/namespaces/x/pods",
                "application/json",
                r#"{"kind": "Service", "metadata": {"name": "a"}}"#,
            ),
            400,
        ),
        (
            request(
                "POST",
                "/api/v1/namespaces/x/pods",
                "application/json",
                r#"{"metadata": {"name": "a", "namespace": "y"}}"#,
            ),
            400,
        ),
        (
            request(
                "POST",
                "/api/v1/namespaces/x/pods",
                "application/yaml",
                "a: b",
            ),
            415,
        ),
        (
            request(
                "POST",
                "/api/v1/pods",
                "application/json",
                r#"{"metadata": {"name": "a"}}"#,
            ),
            405,
        ),
        (
            request(
                "GET",
                "/api/v1/namespaces/x/pods?labelSelector=a%20in%20b",
                "",
                "",
            ),
            400,
        ),
        (
            request("GET", "/api/v1/namespaces/x/pods?limit=abc", "", ""),
            400,
        ),
        (
            request(
                "GET",
                "/api/v1/namespaces/x/pods?watch=true&resourceVersion=xyz",
                "",
                "",
            ),
            400,
        ),
        (
            request(
                "GET",
                "/api/v1/namespaces/x/pods?watch=true&sendInitialEvents=true",
                "",
                "",
            ),
            422,
        ),
        (
            request(
                "GET",
                "/api/v1/namespaces/x/pods?watch=true&timeoutSeconds=-1",
                "",
                "",
            ),
            400,
        ),
        (request("GET", "/api/v1/namespaces/x/widgets", "", ""), 404),
        (request("GET", "/apis/nope.dev/v1/things", "", ""), 404),
        (request("GET", "/api/v1/pods/abc", "", ""), 404),
        (
            request("GET", "/api/v1/namespaces/x/pods/a/log", "", ""),
            404,
        ),
        (request("GET", "/nothing/here", "", ""), 404),
        (
            request("PATCH", "/api/v1/namespaces/x/pods/a", "text/plain", "{}"),
            415,
        ),
        (
            request(
                "PUT",
                "/api/v1/namespaces/x/pods/a",
                "application/json",
                r#"{"metadata": {"name": "b"}}"#,
            ),
            404,
        ),
    ];
    for (req, want) in cases {
        let (code, body) = raw(&server, &req).await;
        assert_eq!(code, want, "{req}\n{body}");
        assert_eq!(body["kind"], "Status", "{req}");
        assert_eq!(body["code"], want, "{req}");
    }
    // With an existing object: name mismatch, bad patch bodies.
    server
        .store()
        .put_object(
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "namespace": "x"}}),
        )
        .unwrap();
    for (req, want) in [
        (
            request(
                "PUT",
                "/api/v1/namespaces/x/pods/a",
                "application/json",
                r#"{"metadata": {"name": "b"}}"#,
            ),
            400,
        ),
        (
            request(
                "PUT",
                "/api/v1/namespaces/x/pods/a",
                "application/json",
                r#"{"metadata": {"name": "a", "resourceVersion": "abc"}}"#,
            ),
            400,
        ),
        (
            request(
                "PATCH",
                "/api/v1/namespaces/x/pods/a",
                "application/merge-patch+json",
                "{oops",
            ),
            400,
        ),
        (
            request(
                "PATCH",
                "/api/v1/namespaces/x/pods/a",
                "application/json-patch+json",
                r#"[{"op":"remove","path":"/nope"}]"#,
            ),
            422,
        ),
        (
            request(
                "PATCH",
                "/api/v1/namespaces/x/pods/a",
                "application/merge-patch+json",
                r#"{"metadata": {"name": "zzz"}}"#,
            ),
            400,
        ),
        (
            request(
                "DELETE",
                "/api/v1/namespaces/x/pods/a",
                "application/json",
                r#"{"preconditions": {"uid": "other"}}"#,
            ),
            409,
        ),
    ] {
        let (code, body) = raw(&server, &req).await;
        assert_eq!(code, want, "{req}\n{body}");
        assert_eq!(body["kind"], "Status", "{req}");
    }
    // Discovery and health documents answer too.
    for path in [
        "/",
        "/api",
        "/apis",
        "/api/v1",
        "/apis/palisade.dev",
        "/apis/palisade.dev/v1alpha1",
        "/version",
    ] {
        let (code, body) = raw(&server, &request("GET", path, "", "")).await;
        assert_eq!(code, 200, "{path}");
        assert!(body.is_object(), "{path}: {body}");
    }
    assert_eq!(
        raw(&server, &request("GET", "/healthz", "", "")).await,
        (200, json!("ok"))
    );
    // The server is still fine.
    let pods: Api<Pod> = Api::namespaced(client(&server), "x");
    assert_eq!(
        pods.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
}
