//! HTTP routing: parses Kubernetes API paths and query parameters and maps them onto the
//! store. Every failure is answered with a `kind: Status` object.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde::Serialize;
use serde_json::Value;

use crate::discovery;
use crate::patch::PatchKind;
use crate::resources::{ResourceDef, ResourceId};
use crate::selectors::Selector;
use crate::server::{App, Outage, RequestRecord};
use crate::status::ApiError;
use crate::store::{Preconditions, Subresource};
use crate::watch::{error_body, watch_body, WatchSpec};

pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new().fallback(handle).with_state(app)
}

fn json_response(code: u16, value: &impl Serialize) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match serde_json::to_vec(value) {
        Ok(body) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(err) => error_response(&ApiError::new(500, "InternalError", err.to_string())),
    }
}

fn error_response(err: &ApiError) -> Response {
    let status = StatusCode::from_u16(err.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(&err.to_status()).unwrap_or_default();
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

async fn handle(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let mut record = RequestRecord {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or_default().to_owned(),
        verb: "unknown".to_owned(),
        group: String::new(),
        version: String::new(),
        resource: String::new(),
        subresource: String::new(),
        namespace: None,
        name: None,
        code: 0,
        peer,
        user_agent: parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    };
    let response = if app.controls.outage() != Outage::Off {
        error_response(&ApiError::unavailable())
    } else {
        match route(
            &app,
            &parts.method,
            &parts.uri,
            &parts.headers,
            body,
            &mut record,
        )
        .await
        {
            Ok(resp) => resp,
            Err(err) => error_response(&err),
        }
    };
    record.code = response.status().as_u16();
    tracing::trace!(method = %record.method, path = %record.path, code = record.code, "request");
    app.controls.record(record);
    response
}

/// Query parameters (first occurrence wins).
struct Params(Vec<(String, String)>);

impl Params {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Go's `strconv.ParseBool` truth values.
    fn flag(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(Some(true)),
            Some("" | "0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(Some(false)),
            Some(other) => Err(ApiError::bad_request(format!(
                "invalid boolean for {key}: {other:?}"
            ))),
        }
    }
}

/// A resource request after path parsing.
struct Target {
    id: ResourceId,
    def: ResourceDef,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

async fn route(
    app: &App,
    method: &Method,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: Body,
    record: &mut RequestRecord,
) -> Result<Response, ApiError> {
    let segs: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    let params = Params(
        Query::<Vec<(String, String)>>::try_from_uri(uri)
            .map_err(|e| ApiError::bad_request(format!("invalid query: {e}")))?
            .0,
    );
    let defs = || app.store.resources();
    let discovery_get = |record: &mut RequestRecord| -> Result<(), ApiError> {
        record.verb = "discovery".to_owned();
        if *method == Method::GET {
            Ok(())
        } else {
            Err(ApiError::method_not_allowed(method.as_str()))
        }
    };
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        [] => {
            discovery_get(record)?;
            let paths = [
                "/api", "/api/v1", "/apis", "/version", "/healthz", "/readyz", "/livez",
            ];
            return Ok(json_response(200, &serde_json::json!({ "paths": paths })));
        }
        ["version"] => {
            discovery_get(record)?;
            return Ok(json_response(200, &discovery::version()));
        }
        ["healthz" | "readyz" | "livez"] => {
            discovery_get(record)?;
            return Ok((StatusCode::OK, "ok").into_response());
        }
        ["api"] => {
            discovery_get(record)?;
            return Ok(json_response(
                200,
                &discovery::core_versions(app.controls.addr),
            ));
        }
        ["apis"] => {
            discovery_get(record)?;
            return Ok(json_response(200, &discovery::group_list(&defs())));
        }
        ["apis", group] => {
            discovery_get(record)?;
            let doc = discovery::group(&defs(), group).ok_or_else(ApiError::no_route)?;
            return Ok(json_response(200, &doc));
        }
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(ApiError::no_route()),
    };
    if rest.is_empty() {
        discovery_get(record)?;
        let doc =
            discovery::resource_list(&defs(), group, version).ok_or_else(ApiError::no_route)?;
        return Ok(json_response(200, &doc));
    }
    let target = parse_target(app, group, version, rest)?;
    record.group = target.def.group.clone();
    record.version = target.def.version.clone();
    record.resource = target.def.plural.clone();
    record.subresource = target.subresource.clone().unwrap_or_default();
    record.namespace = target.namespace.clone();
    record.name = target.name.clone();
    if params.get("dryRun").is_some_and(|v| !v.is_empty()) {
        return Err(ApiError::bad_request(
            "dryRun is not supported by the test API server",
        ));
    }
    match (&target.name, &target.subresource) {
        (None, _) => collection(app, method, headers, body, &params, &target, record).await,
        (Some(name), None) => {
            object(
                app,
                method,
                headers,
                body,
                &params,
                &target,
                name,
                Subresource::Main,
                record,
            )
            .await
        }
        (Some(name), Some(sub)) if sub == "status" && target.def.status_subresource => {
            if *method == Method::DELETE || *method == Method::POST {
                return Err(ApiError::method_not_allowed(method.as_str()));
            }
            object(
                app,
                method,
                headers,
                body,
                &params,
                &target,
                name,
                Subresource::Status,
                record,
            )
            .await
        }
        (Some(_), Some(_)) => Err(ApiError::no_route()),
    }
}

fn parse_target(app: &App, group: &str, version: &str, rest: &[&str]) -> Result<Target, ApiError> {
    let lookup = |plural: &str| app.store.lookup(group, version, plural);
    // `namespaces/{ns}/{plural}...` when `plural` is a namespaced kind of this group/version;
    // otherwise the path is about a cluster-scoped kind (e.g. `namespaces/{name}/status`).
    if let ["namespaces", ns, plural, tail @ ..] = rest {
        if let Some((id, def)) = lookup(plural).filter(|(_, d)| d.namespaced) {
            let (name, subresource) = match tail {
                [] => (None, None),
                [name] => (Some(*name), None),
                [name, sub] => (Some(*name), Some(*sub)),
                _ => return Err(ApiError::no_route()),
            };
            return Ok(Target {
                id,
                def,
                namespace: Some((*ns).to_owned()),
                name: name.map(str::to_owned),
                subresource: subresource.map(str::to_owned),
            });
        }
    }
    let (plural, name, subresource) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(*name), None),
        [plural, name, sub] => (*plural, Some(*name), Some(*sub)),
        _ => return Err(ApiError::no_route()),
    };
    let (id, def) = lookup(plural).ok_or_else(ApiError::no_route)?;
    // A namespaced kind can be listed/watched across namespaces, but its objects are only
    // addressable inside a namespace.
    if def.namespaced && name.is_some() {
        return Err(ApiError::no_route());
    }
    Ok(Target {
        id,
        def,
        namespace: None,
        name: name.map(str::to_owned),
        subresource: subresource.map(str::to_owned),
    })
}

async fn read_body(app: &App, body: Body) -> Result<Vec<u8>, ApiError> {
    let bytes = axum::body::to_bytes(body, app.controls.options.max_body_bytes)
        .await
        .map_err(|e| {
            ApiError::new(
                413,
                "RequestEntityTooLarge",
                format!("cannot read request body: {e}"),
            )
        })?;
    Ok(bytes.to_vec())
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Parses a JSON body for POST/PUT (`application/json` or no content type).
async fn json_body(app: &App, headers: &HeaderMap, body: Body) -> Result<Value, ApiError> {
    let ct = content_type(headers);
    let essence = ct.split(';').next().unwrap_or_default().trim();
    if !essence.is_empty() && essence != "application/json" && essence != "*/*" {
        return Err(ApiError::unsupported_media_type(&ct));
    }
    let bytes = read_body(app, body).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("error decoding request body: {e}")))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListMeta {
    resource_version: String,
    #[serde(rename = "continue", skip_serializing_if = "Option::is_none")]
    continue_token: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListBody<'a> {
    api_version: String,
    kind: String,
    metadata: ListMeta,
    items: Vec<&'a Value>,
}

fn list_response(
    def: &ResourceDef,
    rv: u64,
    continue_token: Option<String>,
    items: Vec<&Value>,
) -> Response {
    json_response(
        200,
        &ListBody {
            api_version: def.api_version(),
            kind: format!("{}List", def.kind),
            metadata: ListMeta {
                resource_version: rv.to_string(),
                continue_token,
            },
            items,
        },
    )
}

fn selector(params: &Params, def: &ResourceDef) -> Result<Selector, ApiError> {
    Selector::parse(
        params.get("labelSelector"),
        params.get("fieldSelector"),
        def,
    )
}

async fn collection(
    app: &App,
    method: &Method,
    headers: &HeaderMap,
    body: Body,
    params: &Params,
    target: &Target,
    record: &mut RequestRecord,
) -> Result<Response, ApiError> {
    let ns = target.namespace.as_deref();
    let def = &target.def;
    match *method {
        Method::GET if params.flag("watch")?.unwrap_or(false) => {
            record.verb = "watch".to_owned();
            watch(app, params, target)
        }
        Method::GET => {
            record.verb = "list".to_owned();
            let sel = selector(params, def)?;
            let limit = match params.get("limit").filter(|s| !s.is_empty()) {
                Some(l) => Some(
                    l.parse::<usize>()
                        .map_err(|_| ApiError::bad_request(format!("invalid limit: {l:?}")))?,
                ),
                None => None,
            };
            let exact = match params.get("resourceVersionMatch").unwrap_or_default() {
                "" | "NotOlderThan" => false,
                "Exact" => true,
                other => {
                    return Err(ApiError::bad_request(format!(
                        "invalid resourceVersionMatch: {other:?}"
                    )))
                }
            };
            let page = app.store.list(
                target.id,
                ns,
                &sel,
                limit,
                params.get("continue"),
                params.get("resourceVersion"),
                exact,
            )?;
            Ok(list_response(
                def,
                page.resource_version,
                page.continue_token,
                page.items.iter().map(|a| &**a).collect(),
            ))
        }
        Method::POST => {
            record.verb = "create".to_owned();
            if def.namespaced && ns.is_none() {
                return Err(ApiError::method_not_allowed(method.as_str()));
            }
            let obj = json_body(app, headers, body).await?;
            let created = app.store.create(target.id, ns, obj)?;
            record.name = created
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .map(str::to_owned);
            Ok(json_response(201, &created))
        }
        Method::DELETE => {
            record.verb = "deletecollection".to_owned();
            let sel = selector(params, def)?;
            let deleted = app.store.delete_collection(target.id, ns, &sel)?;
            let rv = app.store.resource_version();
            Ok(list_response(def, rv, None, deleted.iter().collect()))
        }
        _ => Err(ApiError::method_not_allowed(method.as_str())),
    }
}

fn watch(app: &App, params: &Params, target: &Target) -> Result<Response, ApiError> {
    let sel = selector(params, &target.def)?;
    let bookmarks = params.flag("allowWatchBookmarks")?.unwrap_or(false);
    let send_initial_events = params.flag("sendInitialEvents")?;
    if send_initial_events == Some(true) {
        if params.get("resourceVersionMatch") != Some("NotOlderThan") {
            return Err(ApiError::invalid(
                &target.def,
                "",
                "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            ));
        }
        if !bookmarks {
            return Err(ApiError::invalid(
                &target.def,
                "",
                "allowWatchBookmarks: Forbidden: sendInitialEvents requires setting allowWatchBookmarks to true",
            ));
        }
    }
    let timeout = match params.get("timeoutSeconds").filter(|s| !s.is_empty()) {
        Some(t) => Duration::from_secs(
            t.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds: {t:?}")))?,
        ),
        None => Duration::ZERO,
    };
    // Like upstream, an absent or zero timeoutSeconds means the server's default.
    let timeout = if timeout.is_zero() {
        app.controls.options.default_watch_timeout
    } else {
        timeout
    };
    let headers = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        ),
        (
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache, private"),
        ),
    ];
    let start = match app.store.watch_start(
        target.id,
        target.namespace.as_deref(),
        &sel,
        params.get("resourceVersion"),
        send_initial_events,
    ) {
        Ok(start) => start,
        // Like the real server: the watch is accepted and reports 410 as an ERROR event.
        Err(err) if err.code == 410 => {
            return Ok((StatusCode::OK, headers, error_body(&err)).into_response())
        }
        Err(err) => return Err(err),
    };
    let spec = WatchSpec {
        id: target.id,
        def: target.def.clone(),
        namespace: target.namespace.clone(),
        selector: sel,
        bookmarks,
        initial_events_end: send_initial_events == Some(true),
        timeout,
        bookmark_interval: app.controls.options.bookmark_interval,
    };
    // Subscribe to cuts before re-checking the outage flag (set first, then cut), so a watch
    // that raced with the start of an outage cannot stay open through it.
    let cut = app.controls.cut_tx.subscribe();
    if app.controls.outage() != Outage::Off {
        return Err(ApiError::unavailable());
    }
    let body = watch_body(
        app.store.clone(),
        cut,
        Arc::clone(&app.controls.open_watches),
        spec,
        start,
    );
    Ok((StatusCode::OK, headers, body).into_response())
}

#[allow(clippy::too_many_arguments)]
async fn object(
    app: &App,
    method: &Method,
    headers: &HeaderMap,
    body: Body,
    params: &Params,
    target: &Target,
    name: &str,
    sub: Subresource,
    record: &mut RequestRecord,
) -> Result<Response, ApiError> {
    let ns = target.namespace.as_deref();
    match *method {
        Method::GET => {
            record.verb = "get".to_owned();
            let obj = app.store.get(target.id, ns, name)?;
            Ok(json_response(200, &*obj))
        }
        Method::PUT => {
            record.verb = "update".to_owned();
            let obj = json_body(app, headers, body).await?;
            let (stored, created) = app.store.update(target.id, ns, name, obj, sub)?;
            Ok(json_response(if created { 201 } else { 200 }, &stored))
        }
        Method::PATCH => {
            record.verb = "patch".to_owned();
            let ct = content_type(headers);
            let kind = PatchKind::from_content_type(&ct)
                .ok_or_else(|| ApiError::unsupported_media_type(&ct))?;
            if kind == PatchKind::Apply && params.get("fieldManager").is_none_or(str::is_empty) {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                ));
            }
            let bytes = read_body(app, body).await?;
            let (stored, created) = app.store.patch(target.id, ns, name, kind, &bytes, sub)?;
            Ok(json_response(if created { 201 } else { 200 }, &stored))
        }
        Method::DELETE => {
            record.verb = "delete".to_owned();
            let bytes = read_body(app, body).await?;
            let pre = if bytes.iter().all(u8::is_ascii_whitespace) {
                Preconditions::default()
            } else {
                let opts: Value = serde_json::from_slice(&bytes).map_err(|e| {
                    ApiError::bad_request(format!("error decoding DeleteOptions: {e}"))
                })?;
                let field = |f: &str| {
                    opts.pointer(&format!("/preconditions/{f}"))
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                };
                Preconditions {
                    uid: field("uid"),
                    resource_version: field("resourceVersion"),
                }
            };
            let deleted = app.store.delete(target.id, ns, name, &pre)?;
            Ok(json_response(200, &deleted))
        }
        _ => Err(ApiError::method_not_allowed(method.as_str())),
    }
}
