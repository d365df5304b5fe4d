//! The rollout routes: `POST /v1/apps/{name}/rollout/{pause|resume|undo}`
//! (`yunbian rollout pause|resume|undo`).
//!
//! `pause` and `resume` set and clear `spec.rollout.paused`; `resume` also
//! moves a rollout waiting at a `{pause: true}` canary step to the next
//! step (a status write by the cloud itself). `undo` puts the template and
//! per-group overrides of an earlier revision back into the App's spec
//! (`{"toRevision": N}`, default the previous one); the App controller then
//! records it as a new revision, as Kubernetes does. The rules themselves
//! are pure functions of [`crate::rollout`].
//!
//! Every write reads the App, changes it and writes it back at the
//! revision it read, retrying on conflicts; `metadata.generation` grows
//! when the spec changes, as with `apply`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use yunbian_api::{App, AppSpec, Kind, Resource, RolloutPhase};
use yunbian_store::StoreError;

use crate::api::{Admin, ApiError, ApiState};
use crate::objects::{decode, now_rfc3339};
use crate::rollout::{self, UndoError};

type St = State<Arc<ApiState>>;

/// The rollout routes.
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new().route("/v1/apps/{name}/rollout/{action}", post(rollout_action))
}

/// The body of `undo`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct UndoRequest {
    /// The revision to go back to (default: the one before the current).
    to_revision: Option<u64>,
}

/// What a rollout action does to an App.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Pause,
    Resume,
    Undo(Option<u64>),
}

async fn rollout_action(
    State(s): St,
    _admin: Admin,
    Path((name, action)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let action = match action.as_str() {
        "pause" => Action::Pause,
        "resume" => Action::Resume,
        "undo" => {
            let body = body?;
            let req: UndoRequest = if body.iter().all(u8::is_ascii_whitespace) {
                UndoRequest::default()
            } else {
                serde_json::from_slice(&body)
                    .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("undo body: {e}")))?
            };
            Action::Undo(req.to_revision)
        }
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("unknown rollout action {other:?}: use pause, resume or undo"),
            ))
        }
    };
    for _ in 0..16 {
        let cur = s.store.get(Kind::App, &name).await?;
        let mut app: App = decode::<AppSpec>(&cur)?;
        let message = apply_action(&mut app, action, &now_rfc3339())?;
        let Some(message) = message else {
            return Ok(Json(json!({ "message": unchanged_message(&app, action), "object": &*cur.value })));
        };
        let spec_changed = decode::<AppSpec>(&cur)?.spec != app.spec;
        if spec_changed {
            app.metadata.generation += 1;
            // The result must be an App `apply` would accept.
            Resource::from_value(app.to_value())?;
        }
        match s.store.update(Kind::App, &name, app.to_value(), Some(cur.revision)).await {
            Ok(o) => {
                tracing::info!(app = %name, ?action, "{message}");
                return Ok(Json(json!({ "message": message, "object": &*o.value })));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::new(StatusCode::CONFLICT, format!("app {name}: too many concurrent updates; try again")))
}

/// Changes `app` for `action`; `Ok(None)` when there is nothing to change
/// (the action is idempotent), an error when it cannot apply.
fn apply_action(app: &mut App, action: Action, now_rfc3339: &str) -> Result<Option<String>, ApiError> {
    let name = app.metadata.name.clone();
    match action {
        Action::Pause => {
            let r = app.spec.rollout.get_or_insert_with(Default::default);
            if r.paused {
                return Ok(None);
            }
            r.paused = true;
            Ok(Some(format!("app/{name} paused: no further rollout step is taken until `yunbian rollout resume`")))
        }
        Action::Resume => {
            let status = app.status.rollout.as_mut();
            if let Some(st) = status.as_ref().filter(|st| st.phase == RolloutPhase::Failed) {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "app {name}: the rollout of revision {} failed ({}); apply a fixed template or run `yunbian rollout undo`",
                        st.revision, st.message
                    ),
                ));
            }
            let was_paused = app.spec.rollout.as_ref().is_some_and(|r| r.paused);
            if let Some(r) = app.spec.rollout.as_mut() {
                r.paused = false;
            }
            let spec = app.spec.rollout.clone().unwrap_or_default();
            let stepped = status.is_some_and(|st| rollout::resume_status(&spec, st, now_rfc3339));
            match (was_paused, stepped) {
                (false, false) => Ok(None),
                (_, true) => Ok(Some(format!("app/{name} resumed: the canary goes on past its pause step"))),
                (true, false) => Ok(Some(format!("app/{name} resumed"))),
            }
        }
        Action::Undo(to) => {
            let spec = rollout::undo(&name, &app.spec, &app.status.history, to).map_err(undo_error)?;
            let revision = match to {
                Some(n) => n,
                None => {
                    let hash = rollout::revision_hash(&spec);
                    app.status.history.iter().rev().find(|r| r.hash == hash).map_or(0, |r| r.revision)
                }
            };
            app.spec = spec;
            Ok(Some(format!(
                "app/{name} rolled back to the template of revision {revision} (recorded as a new revision)"
            )))
        }
    }
}

fn unchanged_message(app: &App, action: Action) -> String {
    let name = &app.metadata.name;
    match action {
        Action::Pause => format!("app/{name} is already paused"),
        Action::Resume => format!("app/{name} is not paused"),
        Action::Undo(_) => format!("app/{name} unchanged"),
    }
}

fn undo_error(e: UndoError) -> ApiError {
    let code = match e {
        UndoError::UnknownRevision { .. } => StatusCode::NOT_FOUND,
        UndoError::NothingToUndo { .. } | UndoError::AlreadyCurrent { .. } => StatusCode::CONFLICT,
    };
    ApiError::new(code, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use yunbian_api::{AppRevision, RolloutSpec, RolloutStatus};

    fn app(version: &str) -> App {
        serde_json::from_value(json!({
            "apiVersion": "yunbian.io/v1",
            "kind": "App",
            "metadata": {"name": "web", "generation": 1},
            "spec": {"replicas": 2, "artifact": {"name": "site", "version": version}},
        }))
        .expect("app decodes")
    }

    fn revision(n: u64, a: &App) -> AppRevision {
        AppRevision {
            revision: n,
            hash: rollout::revision_hash(&a.spec),
            template: a.spec.template(),
            ..Default::default()
        }
    }

    #[test]
    fn pause_and_resume_are_idempotent() {
        let mut a = app("1");
        assert!(apply_action(&mut a, Action::Pause, "t").expect("pause").is_some());
        assert!(a.spec.rollout.as_ref().is_some_and(|r| r.paused));
        assert_eq!(apply_action(&mut a, Action::Pause, "t").expect("again"), None);
        assert!(apply_action(&mut a, Action::Resume, "t").expect("resume").is_some());
        assert!(!a.spec.rollout.as_ref().is_some_and(|r| r.paused));
        assert_eq!(apply_action(&mut a, Action::Resume, "t").expect("again"), None);
    }

    #[test]
    fn resume_passes_a_pause_step_and_refuses_a_failed_rollout() {
        let mut a = app("1");
        a.spec.rollout = Some(
            serde_json::from_value::<RolloutSpec>(json!({"canary": {"steps": [{"percent": 50}, {"pause": true}]}}))
                .expect("spec"),
        );
        a.status.rollout =
            Some(RolloutStatus { phase: RolloutPhase::Paused, step: 1, revision: 2, ..Default::default() });
        let msg = apply_action(&mut a, Action::Resume, "2026-01-01T00:00:00Z").expect("resume");
        assert!(msg.is_some_and(|m| m.contains("past its pause step")));
        let st = a.status.rollout.clone().expect("status");
        assert_eq!(
            (st.step, st.phase, st.step_started.as_str()),
            (2, RolloutPhase::Progressing, "2026-01-01T00:00:00Z")
        );

        a.status.rollout = Some(RolloutStatus {
            phase: RolloutPhase::Failed,
            revision: 2,
            message: "boom".into(),
            ..Default::default()
        });
        let e = apply_action(&mut a, Action::Resume, "t").expect_err("failed");
        assert_eq!(axum::response::IntoResponse::into_response(e).status(), StatusCode::CONFLICT);
    }

    #[test]
    fn undo_restores_the_previous_template_with_http_codes() {
        let (one, two) = (app("1"), app("2"));
        let mut a = two.clone();
        let e = apply_action(&mut a, Action::Undo(None), "t").expect_err("no history");
        assert_eq!(axum::response::IntoResponse::into_response(e).status(), StatusCode::CONFLICT);
        a.status.history = vec![revision(1, &one), revision(2, &two)];
        let e = apply_action(&mut a, Action::Undo(Some(9)), "t").expect_err("unknown");
        assert_eq!(axum::response::IntoResponse::into_response(e).status(), StatusCode::NOT_FOUND);
        let e = apply_action(&mut a, Action::Undo(Some(2)), "t").expect_err("current");
        assert_eq!(axum::response::IntoResponse::into_response(e).status(), StatusCode::CONFLICT);
        let msg = apply_action(&mut a, Action::Undo(None), "t").expect("undo").expect("changed");
        assert!(msg.contains("revision 1"), "{msg}");
        assert_eq!(a.spec.artifact.as_ref().map(|x| x.version.as_str()), Some("1"));
    }
}
