//! The rollout routes over real HTTPS on loopback: a whole cloud is started
//! in-process (its App controller records revisions even with no node to
//! place on) and driven with the CLI's client. Checks the HTTP codes and
//! messages of `POST /v1/apps/{name}/rollout/{pause|resume|undo}`, that
//! pause and resume change only `spec.rollout.paused` (and bump the
//! generation), and that undo brings the previous template back as a new
//! revision.

use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use yunbian_api::Kind;
use yunbian_cli::{Client, ClientConfig};
use yunbian_cloud::CloudOptions;

mod common;

use common::TestDir;

fn app(version: &str) -> Value {
    json!({
        "apiVersion": "yunbian.io/v1", "kind": "App", "metadata": {"name": "web"},
        "spec": {"replicas": 2, "runtime": "process",
                 "process": {"command": ["/bin/true"], "env": {"VERSION": version}},
                 "rollout": {"maxSurge": 1}},
    })
}

/// `POST path body` → (status, JSON body).
async fn post(client: &Client, path: &str, body: &str) -> (StatusCode, Value) {
    let (code, bytes) =
        client.request_bytes(Method::POST, path, Some(body.as_bytes().to_vec())).await.expect("request");
    (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Waits until the App's history holds `n` revisions; returns the App.
async fn history_of(client: &Client, n: usize) -> Value {
    for _ in 0..100 {
        let a = client.get_object(Kind::App, "web").await.expect("get app");
        if a.pointer("/status/history").and_then(Value::as_array).map_or(0, Vec::len) == n {
            return a;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the controller did not record {n} revisions");
}

fn versions(app: &Value) -> Vec<(u64, String)> {
    app.pointer("/status/history")
        .and_then(Value::as_array)
        .map(|h| {
            h.iter()
                .map(|r| {
                    let n = r["revision"].as_u64().unwrap_or(0);
                    (n, r.pointer("/template/process/env/VERSION").and_then(Value::as_str).unwrap_or("").to_string())
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_routes_answer_with_the_right_codes() {
    let dir = TestDir::new("rollout-routes");
    let cloud = yunbian_cloud::start(CloudOptions::new(dir.0.join("cloud"), "127.0.0.1:0")).await.expect("cloud");
    let client = Client::new(ClientConfig::load(Some(&cloud.admin_config)).expect("config")).expect("client");

    let (code, body) = post(&client, "/v1/apps/nope/rollout/pause", "").await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["message"], "app nope not found");

    client.apply(&app("1")).await.expect("apply 1");
    let a = history_of(&client, 1).await;
    let generation = a.pointer("/metadata/generation").and_then(Value::as_u64).expect("generation");

    let (code, body) = post(&client, "/v1/apps/web/rollout/restart", "").await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("use pause, resume or undo")), "{body}");

    // Nothing to undo with one revision.
    let (code, body) = post(&client, "/v1/apps/web/rollout/undo", "").await;
    assert_eq!(code, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["message"], "app web has no earlier revision to go back to");

    // Pause and resume: the spec changes, the generation grows, twice is harmless.
    let (code, body) = post(&client, "/v1/apps/web/rollout/pause", "").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body.pointer("/object/spec/rollout/paused"), Some(&json!(true)), "{body}");
    assert_eq!(body.pointer("/object/metadata/generation").and_then(Value::as_u64), Some(generation + 1));
    let (code, body) = post(&client, "/v1/apps/web/rollout/pause", "").await;
    assert_eq!((code, body["message"].as_str()), (StatusCode::OK, Some("app/web is already paused")));
    let (code, body) = post(&client, "/v1/apps/web/rollout/resume", "").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body.pointer("/object/spec/rollout/paused"), None, "{body}");
    assert_eq!(body.pointer("/object/spec/rollout/maxSurge"), Some(&json!(1)), "the rest of the spec stays");

    // Undo: bad bodies, unknown and current revisions, then the real thing.
    client.apply(&app("2")).await.expect("apply 2");
    history_of(&client, 2).await;
    let (code, body) = post(&client, "/v1/apps/web/rollout/undo", "{\"toRevison\": 1}").await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
    let (code, body) = post(&client, "/v1/apps/web/rollout/undo", "{\"toRevision\": 9}").await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["message"], "app web has no revision 9 (known: 1, 2)");
    let (code, body) = post(&client, "/v1/apps/web/rollout/undo", "{\"toRevision\": 2}").await;
    assert_eq!(code, StatusCode::CONFLICT, "{body}");
    let (code, body) = post(&client, "/v1/apps/web/rollout/undo", "").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body.pointer("/object/spec/process/env/VERSION"), Some(&json!("1")), "{body}");
    // Revision 1's template comes back as revision 3.
    let a = history_of(&client, 2).await;
    let mut h = versions(&a);
    for _ in 0..100 {
        if h.last().is_some_and(|(n, _)| *n == 3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        h = versions(&client.get_object(Kind::App, "web").await.expect("get"));
    }
    assert_eq!(h, vec![(2, "2".to_string()), (3, "1".to_string())]);

    // With another token: 401.
    let mut anonymous = ClientConfig::load(Some(&cloud.admin_config)).expect("config");
    anonymous.token = "not-the-admin-token".to_string();
    let anonymous = Client::new(anonymous).expect("client");
    let (code, _) = post(&anonymous, "/v1/apps/web/rollout/pause", "").await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    drop(cloud);
}
