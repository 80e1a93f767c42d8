//! An in-process Kubernetes-like API server for integration tests and the lab.
//!
//! No kube-apiserver/etcd can run where Palisade is built and tested, and mock clients
//! (e.g. `kube-fake-client`) cannot stream watches, send bookmarks or expire resourceVersions,
//! which is what `kube::runtime` watchers and reflectors depend on. [`TestApiServer`] is a
//! real HTTP/1.1 server that a real `kube::Client` talks to exactly like a cluster:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use k8s_openapi::api::core::v1::Pod;
//! use kube::api::{Api, ListParams};
//! use palisade_testapi::TestApiServer;
//! use serde_json::json;
//!
//! let server = TestApiServer::start("127.0.0.1:0".parse()?).await?;
//! // Fixtures go straight into the store (watchers see them like API writes).
//! server.store().put_object(json!({
//!     "apiVersion": "v1", "kind": "Pod",
//!     "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
//!     "spec": {"nodeName": "node-a", "containers": []},
//!     "status": {"podIP": "10.244.1.5"}
//! }))?;
//! // The code under test uses a normal client (or `server.write_kubeconfig(path)`).
//! let client = kube::Client::try_from(kube::Config::new(server.url().parse()?))?;
//! let pods: Api<Pod> = Api::all(client);
//! assert_eq!(pods.list(&ListParams::default().labels("app=web")).await?.items.len(), 1);
//! // Test controls.
//! server.set_unavailable(true); // 503 for everything, watches cut
//! server.set_unavailable(false);
//! server.compact(); // resuming watches get 410 Expired and relist
//! assert_eq!(server.count_requests("list", "pods"), 1);
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # What it serves
//! Kinds come from a table ([`default_resources`], extended with [`TestApiServer::register`]):
//! core/v1 pods, namespaces, nodes, services, events, configmaps; networking.k8s.io/v1
//! networkpolicies; discovery.k8s.io/v1 endpointslices; events.k8s.io/v1 events;
//! coordination.k8s.io/v1 leases; palisade.dev/v1alpha1 ipaddresspools and l2advertisements
//! (cluster-scoped). Objects are stored as JSON keyed by kind, namespace and name.
//!
//! Paths: `/api/v1/...` and `/apis/{group}/{version}/...`, namespaced
//! `namespaces/{ns}/{plural}[/{name}[/status]]`, cluster-scoped `{plural}[/{name}[/status]]`,
//! all-namespaces `{plural}` (list, watch). Discovery (`/api`, `/apis`, `/api/v1`,
//! `/apis/{g}`, `/apis/{g}/{v}`), `/version`, `/healthz`, `/readyz`, `/livez`.
//!
//! # Faithful to the real API server (what kube-rs relies on)
//! - One global, monotonically increasing resourceVersion (a decimal string) stamped on every
//!   write; uid, creationTimestamp and generation (bumped when anything but metadata/status
//!   changes); namespace from the path; `generateName`; writes that change nothing are no-ops
//!   (no new resourceVersion, no watch event).
//! - list: `{Kind}List` with `metadata.resourceVersion`, items with apiVersion/kind; label
//!   selectors (`=`, `==`, `!=`, `in`, `notin`, exists, `!`, `>`, `<`); field selectors
//!   `metadata.name`, `metadata.namespace` and per-kind fields (pods: `spec.nodeName`,
//!   `status.phase`, `status.podIP`, ...), unknown fields rejected with 400; `limit`/`continue`
//!   pagination where every page carries the first page's resourceVersion, and a continue
//!   token older than the retained history is `410 Expired`.
//! - watch: chunked newline-delimited `{"type","object"}` events strictly after the given
//!   resourceVersion, replayed from a bounded history ring; `0`/unset start with the current
//!   state as ADDED; a resourceVersion older than the history gives an ERROR event with a
//!   `410 Expired` Status (HTTP 200, as upstream's watch cache); periodic BOOKMARKs when
//!   `allowWatchBookmarks=true`; `timeoutSeconds`; selectors filter watches and an object
//!   that stops matching is DELETED (that watcher's last matching state, with the new
//!   resourceVersion), one that starts matching is ADDED; `sendInitialEvents=true` streaming
//!   lists end the initial state with the `k8s.io/initial-events-end` bookmark.
//! - create (409 AlreadyExists), update (409 Conflict on a stale `metadata.resourceVersion`,
//!   which is what leader election with Leases needs; 409 on a uid mismatch), patch (merge,
//!   JSON patch; a resourceVersion inside the patch is a precondition), delete (404, DeleteOptions
//!   preconditions), deletecollection. Status subresource: writes to the main resource keep
//!   the stored status, writes to `/status` change only status, create drops status (except
//!   Nodes). PUT creates missing Leases and Events (as upstream). Namespaces get the
//!   `kubernetes.io/metadata.name` label and `status.phase: Active`.
//! - Errors are `kind: Status` objects with code/reason/message (and details), so kube-rs
//!   returns `kube::Error::Api`; bad JSON, bad selectors, bad parameters are 400s, never
//!   panics. Server-side apply without `fieldManager` is a 422.
//!
//! # Different from the real API server
//! - No schema validation, no admission, no defaulting beyond the metadata above, no
//!   OpenAPI; any JSON under a registered kind is accepted (and [`Store::put_object`]
//!   bypasses even the API's metadata checks, to insert deliberately malformed objects).
//! - Strategic merge patch is applied as a JSON merge patch (lists are replaced, not merged
//!   by key; `$patch` directives are not interpreted). Server-side apply is a merge patch of
//!   the JSON body (no YAML, no field ownership/managers, no conflicts, `force` ignored; fields a
//!   manager stops sending are not removed); it does create missing objects.
//! - No managedFields bookkeeping, no authentication/authorization, no finalizers, no
//!   graceful deletion (delete is immediate, no `deletionTimestamp`), no garbage collection
//!   (deleting a Namespace leaves its objects), namespaces need not exist to hold objects.
//! - `resourceVersionMatch=Exact` lists work only at the latest resourceVersion (otherwise
//!   410); a list with a resourceVersion newer than the store is an immediate 504 instead of
//!   waiting; a watch from a resourceVersion newer than the store (only possible against a
//!   restarted test server) is 410 so clients relist. Continued lists show current objects
//!   after the token's key (with the first page's resourceVersion) rather than an MVCC
//!   snapshot, which is consistent for list-then-watch from that resourceVersion.
//! - core/v1 and events.k8s.io/v1 Events are stored separately. `dryRun` is rejected with 400.
//!   Only JSON (no protobuf, no YAML bodies, no Table output); HTTP/1.1 only; plain HTTP.
//! - Bookmarks come every [`Options::bookmark_interval`] (1 s by default, upstream about a
//!   minute), always at the latest resourceVersion seen by that watch.
//!
//! # Test controls (library API, not HTTP)
//! [`TestApiServer::set_unavailable`] / [`TestApiServer::set_outage`] (503s or dropped
//! connections; open watches are cut), [`TestApiServer::close_watches`],
//! [`TestApiServer::compact`] / [`Options::history_limit`] (410s),
//! [`TestApiServer::request_log`] / [`TestApiServer::count_requests`] (who did what, by verb,
//! resource, user agent and peer address), [`TestApiServer::store`] for direct object access,
//! [`TestApiServer::open_watches`].
//!
//! Note for users of kube's default client: `kube::Config::default_retry` (on by default)
//! retries 503/504 answers with backoff (up to 15 times, minutes in total), so during an
//! [`Outage::ServiceUnavailable`] calls wait rather than fail; [`Outage::Disconnect`] makes them
//! fail at once.
//!
//! # Modules
//! `server` (handle, accept loop, controls), `routes` (path/query parsing, verbs), `store`
//! (objects, resourceVersions, history), `watch` (event streams), `selectors`, `patch`,
//! `resources` (kind table), `discovery`, `status` (errors), `meta` (metadata helpers).
#![forbid(unsafe_code)]

mod discovery;
mod meta;
mod patch;
mod resources;
mod routes;
mod selectors;
mod server;
mod status;
mod store;
mod watch;

pub use resources::{default_resources, ResourceDef};
pub use server::{Options, Outage, RequestRecord, TestApiServer};
pub use status::ApiError;
pub use store::{Store, DEFAULT_HISTORY_LIMIT};
