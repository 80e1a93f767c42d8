//! Helpers shared by the integration tests: a server on a free loopback port and a real
//! `kube::Client` pointed at it.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use kube::Client;
use palisade_testapi::{Options, TestApiServer};

/// A server with short bookmarks, on 127.0.0.1 and a free port.
pub async fn server() -> TestApiServer {
    server_with(Options {
        bookmark_interval: Duration::from_millis(200),
        ..Options::default()
    })
    .await
}

pub async fn server_with(options: Options) -> TestApiServer {
    TestApiServer::start_with("127.0.0.1:0".parse().unwrap(), options)
        .await
        .expect("start test API server")
}

/// A client as an agent would build it (`kube::Config::new(url)`), with a user agent to tell
/// clients apart in the request log.
pub fn client_as(server: &TestApiServer, user_agent: &str) -> Client {
    let mut config = kube::Config::new(server.url().parse().unwrap());
    config.headers.push((
        axum::http::header::USER_AGENT,
        axum::http::HeaderValue::from_str(user_agent).unwrap(),
    ));
    Client::try_from(config).expect("client")
}

pub fn client(server: &TestApiServer) -> Client {
    client_as(server, "palisade-testapi-tests")
}

/// The `code` of a `kube::Error::Api`, panicking on anything else.
pub fn api_code<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> (u16, String) {
    match result {
        Err(kube::Error::Api(status)) => (status.code, status.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Polls `check` every 20 ms (palisade-poll) until it returns true, failing after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let held = palisade_poll::poll_async(timeout, Duration::from_millis(20), check).await;
    assert!(held, "timed out after {timeout:?} waiting for: {what}");
}
