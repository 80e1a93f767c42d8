//! The object store: objects as JSON, one global resourceVersion counter, and the event
//! history that watches are served from.
//!
//! Every write takes the next resourceVersion, stamps it into `metadata.resourceVersion`,
//! and appends one event to a bounded history ring. A watch from resourceVersion `R` replays
//! the events after `R`; if some of them were evicted (ring full, or [`Store::compact`]), the
//! watch gets `410 Expired`, as from the real server.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Map, Value};
use tokio::sync::watch;

use crate::meta::{
    as_object_mut, generate_suffix, meta_nonempty, meta_str, metadata_mut, new_uid, now_timestamp,
    set_resource_version, spec_part, valid_path_segment,
};
use crate::patch::{apply_patch, PatchKind};
use crate::resources::{default_resources, Registry, ResourceDef, ResourceId};
use crate::selectors::Selector;
use crate::status::ApiError;

/// Default number of events the history ring keeps.
pub const DEFAULT_HISTORY_LIMIT: usize = 10_000;

/// Object key inside one kind: (namespace, name); namespace is `""` for cluster-scoped kinds.
type Key = (String, String);

/// What happened to an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One write, as kept in the history ring.
#[derive(Clone, Debug)]
pub(crate) struct HistoryEntry {
    pub(crate) rv: u64,
    pub(crate) resource: ResourceId,
    pub(crate) namespace: String,
    pub(crate) event: EventType,
    /// The object after the write (for deletes: the last state, with the delete's RV).
    pub(crate) object: Arc<Value>,
    /// The object before the write (`None` for creates).
    pub(crate) prev: Option<Arc<Value>>,
}

/// Which part of an object an update may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Subresource {
    /// The main resource: everything but `status` (for kinds with a status subresource).
    Main,
    /// `/status`: only `status`.
    Status,
}

/// DeleteOptions preconditions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Preconditions {
    pub(crate) uid: Option<String>,
    pub(crate) resource_version: Option<String>,
}

/// A page of a list.
#[derive(Debug)]
pub(crate) struct ListPage {
    pub(crate) items: Vec<Arc<Value>>,
    pub(crate) resource_version: u64,
    pub(crate) continue_token: Option<String>,
}

/// What a new watch starts with.
#[derive(Debug)]
pub(crate) struct WatchStart {
    /// Objects to send as synthetic ADDED events first.
    pub(crate) initial: Vec<Arc<Value>>,
    /// The resourceVersion the watch has seen everything up to.
    pub(crate) position: u64,
}

#[derive(Debug)]
struct State {
    registry: Registry,
    objects: Vec<BTreeMap<Key, Arc<Value>>>,
    rv: u64,
    history: VecDeque<HistoryEntry>,
    history_limit: usize,
    /// Events with `rv <= compacted_rv` may be gone from the history.
    compacted_rv: u64,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    rv_tx: watch::Sender<u64>,
}

/// The objects of a [`crate::TestApiServer`], also usable directly (without HTTP) by tests.
///
/// Cheap to clone; all clones share the same data. Direct writes ([`Store::put_object`],
/// [`Store::delete_object`]) take resourceVersions and reach watchers exactly like API writes,
/// but skip the API's checks, so they can also insert objects a real server would reject.
#[derive(Clone, Debug)]
pub struct Store {
    shared: Arc<Shared>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new(DEFAULT_HISTORY_LIMIT)
    }
}

fn parse_rv(s: &str) -> Result<u64, ApiError> {
    s.parse::<u64>()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version: {s:?}")))
}

fn encode_continue(rv: u64, key: &Key) -> String {
    let raw = json!([rv, key.0, key.1]).to_string();
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(token: &str) -> Option<(u64, Key)> {
    let bytes = token
        .as_bytes()
        .chunks(2)
        .map(|pair| {
            let hex = std::str::from_utf8(pair).ok().filter(|h| h.len() == 2)?;
            u8::from_str_radix(hex, 16).ok()
        })
        .collect::<Option<Vec<u8>>>()?;
    let (rv, ns, name): (u64, String, String) = serde_json::from_slice(&bytes).ok()?;
    Some((rv, (ns, name)))
}

impl State {
    fn def(&self, id: ResourceId) -> Result<&ResourceDef, ApiError> {
        self.registry.get(id).ok_or_else(ApiError::no_route)
    }

    fn key(&self, id: ResourceId, namespace: Option<&str>, name: &str) -> Result<Key, ApiError> {
        let def = self.def(id)?;
        let ns = if def.namespaced {
            namespace.unwrap_or_default().to_owned()
        } else {
            String::new()
        };
        Ok((ns, name.to_owned()))
    }

    /// Records one write: stamps the next resourceVersion, stores or removes the object,
    /// appends the event. Returns the stored (or, for deletes, final) object.
    fn commit(
        &mut self,
        id: ResourceId,
        key: Key,
        event: EventType,
        mut object: Value,
        prev: Option<Arc<Value>>,
    ) -> Arc<Value> {
        self.rv += 1;
        let rv = self.rv;
        set_resource_version(&mut object, rv);
        let object = Arc::new(object);
        if let Some(objects) = self.objects.get_mut(id) {
            if event == EventType::Deleted {
                objects.remove(&key);
            } else {
                objects.insert(key.clone(), Arc::clone(&object));
            }
        }
        self.history.push_back(HistoryEntry {
            rv,
            resource: id,
            namespace: key.0,
            event,
            object: Arc::clone(&object),
            prev,
        });
        while self.history.len() > self.history_limit {
            if let Some(evicted) = self.history.pop_front() {
                self.compacted_rv = evicted.rv;
            }
        }
        object
    }

    fn get(&self, id: ResourceId, key: &Key) -> Option<&Arc<Value>> {
        self.objects.get(id).and_then(|objs| objs.get(key))
    }

    fn ensure_object_slots(&mut self) {
        let n = self.registry.all().len();
        if self.objects.len() < n {
            self.objects.resize_with(n, BTreeMap::new);
        }
    }
}

/// Checks or sets apiVersion/kind of a body for kind `def`.
fn check_type_meta(obj: &mut Value, def: &ResourceDef) -> Result<(), ApiError> {
    let api_version = def.api_version();
    let top = as_object_mut(obj)?;
    match top.get("apiVersion").and_then(Value::as_str) {
        Some(v) if !v.is_empty() && v != api_version => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({api_version})"
            )))
        }
        _ => {}
    }
    match top.get("kind").and_then(Value::as_str) {
        Some(k) if !k.is_empty() && k != def.kind => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                def.kind
            )))
        }
        _ => {}
    }
    top.insert("apiVersion".into(), Value::String(api_version));
    top.insert("kind".into(), Value::String(def.kind.clone()));
    Ok(())
}

/// Checks or sets `metadata.namespace` against the namespace of the request path.
fn check_namespace(
    obj: &mut Value,
    def: &ResourceDef,
    namespace: Option<&str>,
) -> Result<(), ApiError> {
    let meta = metadata_mut(obj)?;
    if !def.namespaced {
        meta.remove("namespace");
        return Ok(());
    }
    let path_ns = namespace.unwrap_or_default();
    match meta.get("namespace").and_then(Value::as_str) {
        Some(ns) if !ns.is_empty() && ns != path_ns => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        _ => {
            meta.insert("namespace".into(), Value::String(path_ns.to_owned()));
            Ok(())
        }
    }
}

/// What the real server adds to Namespaces: the immutable `kubernetes.io/metadata.name` label.
fn apply_kind_defaults(obj: &mut Value, def: &ResourceDef, name: &str) {
    if def.group.is_empty() && def.kind == "Namespace" {
        if let Ok(meta) = metadata_mut(obj) {
            let labels = meta
                .entry("labels")
                .or_insert_with(|| Value::Object(Map::new()));
            if labels.is_null() {
                *labels = Value::Object(Map::new());
            }
            if let Some(labels) = labels.as_object_mut() {
                labels.insert(
                    "kubernetes.io/metadata.name".into(),
                    Value::String(name.to_owned()),
                );
            }
        }
    }
}

/// Copies `status` of `from` into `to` (removing it from `to` if `from` has none).
fn copy_status(to: &mut Value, from: &Value) {
    if let Some(top) = to.as_object_mut() {
        match from.get("status") {
            Some(status) => {
                top.insert("status".into(), status.clone());
            }
            None => {
                top.remove("status");
            }
        }
    }
}

/// Equality ignoring `metadata.resourceVersion` (a write that changes nothing is a no-op).
fn same_content(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
        }
        v
    };
    strip(a) == strip(b)
}

impl Store {
    /// An empty store with the default kinds and a history ring of `history_limit` events.
    pub fn new(history_limit: usize) -> Self {
        let mut registry = Registry::default();
        for def in default_resources() {
            registry.register(def);
        }
        let mut state = State {
            registry,
            objects: Vec::new(),
            rv: 1,
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            compacted_rv: 1,
        };
        state.ensure_object_slots();
        let (rv_tx, _) = watch::channel(state.rv);
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                rv_tx,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn notify(&self, rv: u64) {
        self.shared.rv_tx.send_replace(rv);
    }

    /// Adds a kind (or replaces the definition of one with the same group/version/plural).
    pub fn register(&self, def: ResourceDef) {
        let mut state = self.lock();
        state.registry.register(def);
        state.ensure_object_slots();
    }

    /// All registered kinds.
    pub fn resources(&self) -> Vec<ResourceDef> {
        self.lock().registry.all().to_vec()
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Drops the whole event history: every watch that resumes from an older resourceVersion
    /// (and every list continue token) gets `410 Expired` and must relist. Open watches that
    /// are keeping up are not affected.
    pub fn compact(&self) {
        let mut state = self.lock();
        state.history.clear();
        state.compacted_rv = state.rv;
    }

    /// Sets how many events the history ring keeps (at least 1), evicting the oldest if needed.
    pub fn set_history_limit(&self, limit: usize) {
        let mut state = self.lock();
        state.history_limit = limit.max(1);
        while state.history.len() > state.history_limit {
            if let Some(evicted) = state.history.pop_front() {
                state.compacted_rv = evicted.rv;
            }
        }
    }

    /// Creates or replaces an object directly, bypassing the API's checks.
    ///
    /// The kind comes from `apiVersion` + `kind` (it must be registered); `metadata.name` is
    /// required; a namespaced object without `metadata.namespace` goes to `default`. uid,
    /// creationTimestamp and generation are filled in when missing, resourceVersion is always
    /// set, and watchers get ADDED or MODIFIED. Nothing else is checked: `spec` and `status`
    /// are stored as given, so tests can insert objects that do not match their schema.
    /// Returns the stored object.
    pub fn put_object(&self, object: Value) -> Result<Value, ApiError> {
        let mut object = object;
        let api_version = object
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let kind = object
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let name = meta_nonempty(&object, "name")
            .ok_or_else(|| ApiError::bad_request("put_object: metadata.name is required"))?
            .to_owned();
        let mut state = self.lock();
        let id = state.registry.by_kind(&api_version, &kind).ok_or_else(|| {
            ApiError::bad_request(format!(
                "put_object: no registered kind for apiVersion {api_version:?} kind {kind:?}"
            ))
        })?;
        let def = state.def(id)?.clone();
        let namespace = meta_nonempty(&object, "namespace")
            .unwrap_or("default")
            .to_owned();
        check_namespace(&mut object, &def, Some(&namespace))?;
        let key = state.key(id, Some(&namespace), &name)?;
        apply_kind_defaults(&mut object, &def, &name);
        let prev = state.get(id, &key).cloned();
        let meta = metadata_mut(&mut object)?;
        let prev_meta = |field: &str| {
            prev.as_deref()
                .and_then(|p| meta_str(p, field))
                .map(str::to_owned)
        };
        if !meta.get("uid").is_some_and(Value::is_string) {
            meta.insert(
                "uid".into(),
                Value::String(prev_meta("uid").unwrap_or_else(new_uid)),
            );
        }
        if !meta.get("creationTimestamp").is_some_and(Value::is_string) {
            meta.insert(
                "creationTimestamp".into(),
                Value::String(prev_meta("creationTimestamp").unwrap_or_else(now_timestamp)),
            );
        }
        if !meta.contains_key("generation") {
            let old_gen = prev
                .as_deref()
                .and_then(|p| p.pointer("/metadata/generation"))
                .and_then(Value::as_i64);
            let generation = match (&prev, old_gen) {
                (Some(p), Some(g)) if spec_part(p) != spec_part(&object) => g + 1,
                (Some(_), Some(g)) => g,
                _ => 1,
            };
            if let Ok(meta) = metadata_mut(&mut object) {
                meta.insert("generation".into(), json!(generation));
            }
        }
        if let Some(p) = &prev {
            if same_content(p, &object) {
                return Ok((**p).clone());
            }
        }
        let event = if prev.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        let stored = state.commit(id, key, event, object, prev);
        let rv = state.rv;
        drop(state);
        self.notify(rv);
        Ok((*stored).clone())
    }

    /// Puts several objects (see [`Store::put_object`]), stopping at the first error.
    pub fn put_objects(
        &self,
        objects: impl IntoIterator<Item = Value>,
    ) -> Result<Vec<Value>, ApiError> {
        objects.into_iter().map(|o| self.put_object(o)).collect()
    }

    fn id_for(&self, api_version: &str, kind: &str) -> Option<ResourceId> {
        self.lock().registry.by_kind(api_version, kind)
    }

    /// One object by apiVersion, kind, namespace (ignored for cluster-scoped kinds) and name.
    pub fn get_object(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let id = self.id_for(api_version, kind)?;
        let state = self.lock();
        let key = state.key(id, namespace, name).ok()?;
        state.get(id, &key).map(|o| (**o).clone())
    }

    /// All objects of a kind, in one namespace or (with `None`) everywhere, in key order.
    pub fn list_objects(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
    ) -> Vec<Value> {
        let Some(id) = self.id_for(api_version, kind) else {
            return Vec::new();
        };
        let state = self.lock();
        state
            .objects
            .get(id)
            .map(|objs| {
                objs.iter()
                    .filter(|((ns, _), _)| namespace.is_none_or(|want| want == ns))
                    .map(|(_, o)| (**o).clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Deletes an object directly (watchers get DELETED). Returns its last state, if it existed.
    pub fn delete_object(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let id = self.id_for(api_version, kind)?;
        let mut state = self.lock();
        let key = state.key(id, namespace, name).ok()?;
        let prev = state.get(id, &key).cloned()?;
        let last = state.commit(id, key, EventType::Deleted, (*prev).clone(), Some(prev));
        let rv = state.rv;
        drop(state);
        self.notify(rv);
        Some((*last).clone())
    }

    // ----- API operations (used by the HTTP layer) -----

    pub(crate) fn lookup(
        &self,
        group: &str,
        version: &str,
        plural: &str,
    ) -> Option<(ResourceId, ResourceDef)> {
        let state = self.lock();
        let id = state.registry.by_path(group, version, plural)?;
        state.registry.get(id).cloned().map(|d| (id, d))
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.rv_tx.subscribe()
    }

    pub(crate) fn get(
        &self,
        id: ResourceId,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Arc<Value>, ApiError> {
        let state = self.lock();
        let key = state.key(id, namespace, name)?;
        match state.get(id, &key) {
            Some(o) => Ok(Arc::clone(o)),
            None => Err(ApiError::not_found(state.def(id)?, name)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn list(
        &self,
        id: ResourceId,
        namespace: Option<&str>,
        selector: &Selector,
        limit: Option<usize>,
        continue_token: Option<&str>,
        resource_version: Option<&str>,
        exact: bool,
    ) -> Result<ListPage, ApiError> {
        let state = self.lock();
        let (list_rv, start) = match continue_token.filter(|t| !t.is_empty()) {
            Some(token) => {
                let (rv, key) = decode_continue(token)
                    .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
                if rv < state.compacted_rv || rv > state.rv {
                    return Err(ApiError::expired(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    ));
                }
                (rv, Some(key))
            }
            None => {
                if let Some(rv) = resource_version.filter(|s| !s.is_empty()) {
                    let rv = parse_rv(rv)?;
                    if exact && rv != state.rv {
                        return Err(ApiError::expired(format!(
                            "resourceVersion {rv} is not the latest ({}); this test server serves Exact lists only at the latest resourceVersion",
                            state.rv
                        )));
                    }
                    if rv > state.rv {
                        return Err(ApiError::new(
                            504,
                            "Timeout",
                            format!("Too large resource version: {rv}, current: {}", state.rv),
                        ));
                    }
                }
                (state.rv, None)
            }
        };
        let Some(objects) = state.objects.get(id) else {
            return Err(ApiError::no_route());
        };
        let lower = match &start {
            Some(key) => Bound::Excluded(key.clone()),
            None => Bound::Unbounded,
        };
        let limit = limit.filter(|l| *l > 0);
        let mut items = Vec::new();
        let mut last_key: Option<&Key> = None;
        let mut more = false;
        for (key, obj) in objects.range((lower, Bound::Unbounded)) {
            if namespace.is_some_and(|ns| ns != key.0) || !selector.matches(obj) {
                continue;
            }
            if limit.is_some_and(|l| items.len() >= l) {
                more = true;
                break;
            }
            items.push(Arc::clone(obj));
            last_key = Some(key);
        }
        // The token names the last returned key: the next page starts after it.
        let continue_token = last_key
            .filter(|_| more)
            .map(|key| encode_continue(list_rv, key));
        Ok(ListPage {
            items,
            resource_version: list_rv,
            continue_token,
        })
    }

    /// Creates an object from an API body (`POST`, or `PUT`/apply on a missing object).
    pub(crate) fn create(
        &self,
        id: ResourceId,
        namespace: Option<&str>,
        body: Value,
    ) -> Result<Value, ApiError> {
        let mut state = self.lock();
        let stored = Self::create_locked(&mut state, id, namespace, body)?;
        let rv = state.rv;
        drop(state);
        self.notify(rv);
        Ok(stored)
    }

    fn create_locked(
        state: &mut State,
        id: ResourceId,
        namespace: Option<&str>,
        body: Value,
    ) -> Result<Value, ApiError> {
        let def = state.def(id)?.clone();
        let mut obj = body;
        check_type_meta(&mut obj, &def)?;
        check_namespace(&mut obj, &def, namespace)?;
        let meta = metadata_mut(&mut obj)?;
        let mut name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if name.is_empty() {
            let generate = meta
                .get("generateName")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if generate.is_empty() {
                return Err(ApiError::invalid(
                    &def,
                    "",
                    "metadata.name: Required value: name or generateName is required",
                ));
            }
            name = format!("{generate}{}", generate_suffix());
        }
        if !valid_path_segment(&name) {
            return Err(ApiError::invalid(
                &def,
                &name,
                format!("metadata.name: Invalid value: {name:?}: may not contain '/' or '%' or be '.' or '..'"),
            ));
        }
        if meta
            .get("resourceVersion")
            .and_then(Value::as_str)
            .is_some_and(|rv| !rv.is_empty())
        {
            return Err(ApiError::new(
                500,
                "InternalError",
                "Internal error occurred: resourceVersion should not be set on objects to be created",
            ));
        }
        meta.insert("name".into(), Value::String(name.clone()));
        meta.insert("uid".into(), Value::String(new_uid()));
        meta.insert("creationTimestamp".into(), Value::String(now_timestamp()));
        meta.insert("generation".into(), json!(1));
        meta.remove("deletionTimestamp");
        meta.remove("deletionGracePeriodSeconds");
        if def.status_subresource && !def.create_keeps_status {
            if let Some(top) = obj.as_object_mut() {
                top.remove("status");
            }
        }
        apply_kind_defaults(&mut obj, &def, &name);
        if def.group.is_empty() && def.kind == "Namespace" {
            if let Some(top) = obj.as_object_mut() {
                top.entry("status")
                    .or_insert_with(|| json!({"phase": "Active"}));
            }
        }
        let key = state.key(id, namespace, &name)?;
        if state.get(id, &key).is_some() {
            return Err(ApiError::already_exists(&def, &name));
        }
        let stored = state.commit(id, key, EventType::Added, obj, None);
        Ok((*stored).clone())
    }

    /// Replaces an object from an API body (`PUT`). Returns the stored object and whether it
    /// was created.
    pub(crate) fn update(
        &self,
        id: ResourceId,
        namespace: Option<&str>,
        name: &str,
        body: Value,
        sub: Subresource,
    ) -> Result<(Value, bool), ApiError> {
        let mut state = self.lock();
        let def = state.def(id)?.clone();
        let key = state.key(id, namespace, name)?;
        let result = match state.get(id, &key).cloned() {
            Some(old) => {
                Self::update_locked(&mut state, id, key, &old, body, sub).map(|v| (v, false))
            }
            None => {
                if def.create_on_update && sub == Subresource::Main {
                    if meta_nonempty(&body, "resourceVersion").is_some() {
                        Err(ApiError::not_found(&def, name))
                    } else {
                        let mut body = body;
                        check_name(&mut body, name)?;
                        Self::create_locked(&mut state, id, namespace, body).map(|v| (v, true))
                    }
                } else {
                    Err(ApiError::not_found(&def, name))
                }
            }
        };
        let rv = state.rv;
        drop(state);
        self.notify(rv);
        result
    }

    fn update_locked(
        state: &mut State,
        id: ResourceId,
        key: Key,
        old: &Arc<Value>,
        body: Value,
        sub: Subresource,
    ) -> Result<Value, ApiError> {
        let def = state.def(id)?.clone();
        let name = key.1.clone();
        let mut obj = body;
        check_type_meta(&mut obj, &def)?;
        check_namespace(&mut obj, &def, Some(&key.0))?;
        check_name(&mut obj, &name)?;
        let old_rv = meta_str(old, "resourceVersion")
            .unwrap_or_default()
            .to_owned();
        if let Some(rv) = meta_nonempty(&obj, "resourceVersion") {
            parse_rv(rv)?;
            if rv != old_rv {
                return Err(ApiError::conflict(&def, &name));
            }
        }
        let old_uid = meta_str(old, "uid").unwrap_or_default().to_owned();
        if let Some(uid) = meta_nonempty(&obj, "uid") {
            if uid != old_uid {
                return Err(ApiError::precondition(
                    &def,
                    &name,
                    &format!("UID in precondition: {uid}, UID in object meta: {old_uid}"),
                ));
            }
        }
        if sub == Subresource::Status {
            // Only status changes; everything else stays as stored.
            let mut merged = (**old).clone();
            copy_status(&mut merged, &obj);
            obj = merged;
        } else if def.status_subresource {
            copy_status(&mut obj, old);
        }
        let old_generation = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        let generation = if spec_part(old) == spec_part(&obj) {
            old_generation
        } else {
            old_generation + 1
        };
        apply_kind_defaults(&mut obj, &def, &name);
        let meta = metadata_mut(&mut obj)?;
        meta.insert("uid".into(), Value::String(old_uid));
        meta.insert("resourceVersion".into(), Value::String(old_rv));
        meta.insert("generation".into(), json!(generation));
        match meta_str(old, "creationTimestamp") {
            Some(ts) => meta.insert("creationTimestamp".into(), Value::String(ts.to_owned())),
            None => meta.remove("creationTimestamp"),
        };
        if same_content(old, &obj) {
            return Ok((**old).clone());
        }
        let stored = state.commit(id, key, EventType::Modified, obj, Some(Arc::clone(old)));
        Ok((*stored).clone())
    }

    /// Patches an object (`PATCH`). Returns the stored object and whether it was created
    /// (server-side apply on a missing object).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn patch(
        &self,
        id: ResourceId,
        namespace: Option<&str>,
        name: &str,
        kind: PatchKind,
        body: &[u8],
        sub: Subresource,
    ) -> Result<(Value, bool), ApiError> {
        let mut state = self.lock();
        let def = state.def(id)?.clone();
        let key = state.key(id, namespace, name)?;
        let result = match state.get(id, &key).cloned() {
            Some(old) => {
                let mut patched = (*old).clone();
                apply_patch(kind, &mut patched, body)?;
                Self::update_locked(&mut state, id, key, &old, patched, sub).map(|v| (v, false))
            }
            None if kind == PatchKind::Apply && sub == Subresource::Main => {
                let mut obj = Value::Object(Map::new());
                apply_patch(kind, &mut obj, body)?;
                check_name(&mut obj, name)?;
                Self::create_locked(&mut state, id, namespace, obj).map(|v| (v, true))
            }
            None => Err(ApiError::not_found(&def, name)),
        };
        let rv = state.rv;
        drop(state);
        self.notify(rv);
        result
    }

    /// Deletes an object (`DELETE`), immediately. Returns its final state.
    pub(crate) fn delete(
        &self,
        id: ResourceId,
        namespace: Option<&str>,
        name: &str,
        pre: &Preconditions,
    ) -> Result<Value, ApiError> {
        let mut state = self.lock();
        let def = state.def(id)?.clone();
        let key = state.key(id, namespace, name)?;
        let Some(old) = state.get(id, &key).cloned() else {
            return Err(ApiError::not_found(&def, name));
        };
        if let Some(uid) = pre.uid.as_deref().filter(|s| !s.is_empty()) {
            let actual = meta_str(&old, "uid").unwrap_or_default();
            if uid != actual {
                return Err(ApiError::precondition(
                    &def,
                    name,
                    &format!("UID in precondition: {uid}, UID in object meta: {actual}"),
                ));
            }
        }
        if let Some(rv) = pre.resource_version.as_deref().filter(|s| !s.is_empty()) {
            let actual = meta_str(&old, "resourceVersion").unwrap_or_default();
            if rv != actual {
                return Err(ApiError::precondition(
                    &def,
                    name,
                    &format!("ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {actual}"),
                ));
            }
        }
        let last = state.commit(id, key, EventType::Deleted, (*old).clone(), Some(old));
        let rv = state.rv;
        drop(state);
        self.notify(rv);
        Ok((*last).clone())
    }

    /// Deletes every object of a kind in scope that matches `selector`.
    pub(crate) fn delete_collection(
        &self,
        id: ResourceId,
        namespace: Option<&str>,
        selector: &Selector,
    ) -> Result<Vec<Value>, ApiError> {
        let mut state = self.lock();
        state.def(id)?;
        let victims: Vec<(Key, Arc<Value>)> = state
            .objects
            .get(id)
            .map(|objs| {
                objs.iter()
                    .filter(|((ns, _), o)| {
                        namespace.is_none_or(|want| want == ns) && selector.matches(o)
                    })
                    .map(|(k, o)| (k.clone(), Arc::clone(o)))
                    .collect()
            })
            .unwrap_or_default();
        let mut deleted = Vec::with_capacity(victims.len());
        for (key, old) in victims {
            let last = state.commit(id, key, EventType::Deleted, (*old).clone(), Some(old));
            deleted.push((*last).clone());
        }
        let rv = state.rv;
        drop(state);
        self.notify(rv);
        Ok(deleted)
    }

    /// Starts a watch: validates the resourceVersion and snapshots the initial objects.
    pub(crate) fn watch_start(
        &self,
        id: ResourceId,
        namespace: Option<&str>,
        selector: &Selector,
        resource_version: Option<&str>,
        send_initial_events: Option<bool>,
    ) -> Result<WatchStart, ApiError> {
        let state = self.lock();
        let rv = match resource_version.filter(|s| !s.is_empty()) {
            Some(s) => Some(parse_rv(s)?),
            None => None,
        };
        // Unset or "0" means "start at any point": the current state comes first as ADDED
        // events, unless sendInitialEvents=false says otherwise. sendInitialEvents=true always
        // sends the current state.
        let from_state = match (rv, send_initial_events) {
            (_, Some(send)) => send || rv.is_none_or(|r| r == 0),
            (None | Some(0), None) => true,
            (Some(_), None) => false,
        };
        if from_state {
            let initial = state
                .objects
                .get(id)
                .map(|objs| {
                    objs.iter()
                        .filter(|((ns, _), o)| {
                            namespace.is_none_or(|want| want == ns) && selector.matches(o)
                        })
                        .map(|(_, o)| Arc::clone(o))
                        .collect()
                })
                .unwrap_or_default();
            return Ok(WatchStart {
                initial,
                position: state.rv,
            });
        }
        let rv = rv.unwrap_or(state.rv);
        if rv < state.compacted_rv {
            return Err(ApiError::expired(format!(
                "too old resource version: {rv} ({})",
                state.compacted_rv + 1
            )));
        }
        if rv > state.rv {
            // The real server would wait a few seconds and answer 504; an RV from the future
            // only happens with a restarted test server, and 410 makes clients relist.
            return Err(ApiError::expired(format!(
                "too large resource version: {rv} (current {}); the test server was probably restarted",
                state.rv
            )));
        }
        Ok(WatchStart {
            initial: Vec::new(),
            position: rv,
        })
    }

    /// The events of kind `id` (in `namespace`, if given) after `position`, and the new position.
    pub(crate) fn watch_poll(
        &self,
        id: ResourceId,
        namespace: Option<&str>,
        position: u64,
    ) -> Result<(Vec<HistoryEntry>, u64), ApiError> {
        let state = self.lock();
        if position < state.compacted_rv {
            return Err(ApiError::expired(format!(
                "too old resource version: {position} ({})",
                state.compacted_rv + 1
            )));
        }
        let start = state.history.partition_point(|e| e.rv <= position);
        let events = state
            .history
            .range(start..)
            .filter(|e| e.resource == id && namespace.is_none_or(|ns| ns == e.namespace))
            .cloned()
            .collect();
        Ok((events, state.rv.max(position)))
    }
}

/// Checks or sets `metadata.name` against the name of the request path.
fn check_name(obj: &mut Value, name: &str) -> Result<(), ApiError> {
    let meta = metadata_mut(obj)?;
    match meta.get("name").and_then(Value::as_str) {
        Some(n) if !n.is_empty() && n != name => Err(ApiError::bad_request(format!(
            "the name of the object ({n}) does not match the name on the URL ({name})"
        ))),
        _ => {
            meta.insert("name".into(), Value::String(name.to_owned()));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, labels: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "ns", "labels": labels},
               "spec": {"containers": []}})
    }

    fn pods(store: &Store) -> (ResourceId, ResourceDef) {
        store.lookup("", "v1", "pods").unwrap()
    }

    #[test]
    fn resource_versions_increase_and_noops_do_not_write() {
        let store = Store::default();
        let a = store.put_object(pod("a", json!({}))).unwrap();
        let b = store.put_object(pod("b", json!({}))).unwrap();
        let rv_a: u64 = meta_str(&a, "resourceVersion").unwrap().parse().unwrap();
        let rv_b: u64 = meta_str(&b, "resourceVersion").unwrap().parse().unwrap();
        assert!(rv_b > rv_a);
        let again = store.put_object(pod("b", json!({}))).unwrap();
        assert_eq!(again, b);
        assert_eq!(store.resource_version(), rv_b);
    }

    #[test]
    fn pagination_walks_every_item_once() {
        let store = Store::default();
        for i in 0..7 {
            store.put_object(pod(&format!("p{i}"), json!({}))).unwrap();
        }
        let (id, _) = pods(&store);
        let mut seen = Vec::new();
        let mut token: Option<String> = None;
        let mut rvs = Vec::new();
        loop {
            let page = store
                .list(
                    id,
                    None,
                    &Selector::default(),
                    Some(3),
                    token.as_deref(),
                    None,
                    false,
                )
                .unwrap();
            seen.extend(
                page.items
                    .iter()
                    .map(|o| meta_str(o, "name").unwrap().to_owned()),
            );
            rvs.push(page.resource_version);
            // A write between pages does not change the list's resourceVersion.
            store.put_object(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("c{}", rvs.len())}})).unwrap();
            match page.continue_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        assert_eq!(seen, (0..7).map(|i| format!("p{i}")).collect::<Vec<_>>());
        assert!(rvs.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn continue_tokens_roundtrip_and_reject_garbage() {
        let key = ("ns".to_owned(), "name".to_owned());
        assert_eq!(decode_continue(&encode_continue(7, &key)), Some((7, key)));
        for bad in ["", "z", "zz", "abc", "é", "5b5d"] {
            assert_eq!(decode_continue(bad), None, "{bad}");
        }
    }

    #[test]
    fn compaction_expires_old_positions() {
        let store = Store::new(2);
        let (id, _) = pods(&store);
        let start = store.resource_version();
        for i in 0..3 {
            store.put_object(pod(&format!("p{i}"), json!({}))).unwrap();
        }
        assert_eq!(store.watch_poll(id, None, start).unwrap_err().code, 410);
        let now = store.resource_version();
        assert!(store.watch_poll(id, None, now - 2).is_ok());
        store.compact();
        assert_eq!(store.watch_poll(id, None, now - 1).unwrap_err().code, 410);
        assert!(store.watch_poll(id, None, now).is_ok());
    }

    #[test]
    fn update_conflicts_and_status_rules() {
        let store = Store::default();
        let (id, _) = pods(&store);
        let created = store
            .create(id, Some("ns"), json!({"metadata": {"name": "p"}, "spec": {"a": 1}, "status": {"phase": "Running"}}))
            .unwrap();
        assert!(created.get("status").is_none(), "create drops status");
        let mut stale = created.clone();
        stale["spec"]["a"] = json!(2);
        let (updated, _) = store
            .update(id, Some("ns"), "p", stale.clone(), Subresource::Main)
            .unwrap();
        assert_eq!(updated["metadata"]["generation"], json!(2));
        assert_eq!(
            store
                .update(id, Some("ns"), "p", stale, Subresource::Main)
                .unwrap_err()
                .code,
            409
        );
        let mut with_status = updated.clone();
        with_status["status"] = json!({"phase": "Running"});
        with_status["spec"]["a"] = json!(3);
        let (s, _) = store
            .update(id, Some("ns"), "p", with_status, Subresource::Status)
            .unwrap();
        assert_eq!(s["status"]["phase"], "Running");
        assert_eq!(s["spec"]["a"], 2, "status update ignores spec");
        assert_eq!(s["metadata"]["generation"], json!(2));
    }

    #[test]
    fn bad_bodies_are_errors_not_panics() {
        let store = Store::default();
        let (id, _) = pods(&store);
        for body in [
            json!(1),
            json!([]),
            json!({"metadata": 5}),
            json!({"metadata": {}}),
            json!({"kind": "Service", "metadata": {"name": "x"}}),
        ] {
            let err = store.create(id, Some("ns"), body).unwrap_err();
            assert!(err.code == 400 || err.code == 422, "{err}");
        }
        assert!(store
            .put_object(json!({"kind": "Nope", "apiVersion": "v9", "metadata": {"name": "x"}}))
            .is_err());
        assert!(store.put_object(json!("str")).is_err());
    }
}
