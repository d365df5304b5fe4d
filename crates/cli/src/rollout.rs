//! `yunbian rollout history|status|pause|resume|undo app/NAME`: an App's
//! revisions and the progress of its rollout (docs/design/019-rollouts.md).
//!
//! `history` and `status` read the App (`status.history`,
//! `status.rollout`); `pause`, `resume` and `undo` call
//! `POST /v1/apps/{name}/rollout/{action}`, which changes the App on the
//! cloud. Rendering is pure ([`history_table`], [`status_text`]) so it is
//! tested without a cloud.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Subcommand;
use serde_json::{json, Value};
use yunbian_api::Kind;

use crate::columns::text;
use crate::commands::{emit, Session};
use crate::table::Table;
use crate::time::{age_since, unix_now};

/// How often `rollout status --watch` reads the App.
const WATCH_PERIOD: Duration = Duration::from_secs(1);

/// `rollout` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum RolloutCommand {
    /// List an App's revisions (oldest first), marking the current one.
    History {
        /// app/NAME (or NAME).
        #[arg(value_parser = parse_app)]
        app: String,
    },
    /// Show how far the rollout is: phase, revision, canary step, counts.
    Status {
        /// app/NAME (or NAME).
        #[arg(value_parser = parse_app)]
        app: String,
        /// Follow until Complete (exit 0), RolledBack or Failed (exit 1).
        #[arg(short = 'w', long)]
        watch: bool,
    },
    /// Stop the rollout where it is (sets spec.rollout.paused).
    Pause {
        /// app/NAME (or NAME).
        #[arg(value_parser = parse_app)]
        app: String,
    },
    /// Go on: clears spec.rollout.paused and passes a `pause: true` canary step.
    Resume {
        /// app/NAME (or NAME).
        #[arg(value_parser = parse_app)]
        app: String,
    },
    /// Put an earlier revision's template back (recorded as a new revision).
    Undo {
        /// app/NAME (or NAME).
        #[arg(value_parser = parse_app)]
        app: String,
        /// The revision to go back to (default: the previous one).
        #[arg(long)]
        to_revision: Option<u64>,
    },
}

/// `app/NAME`, `apps/NAME` or `NAME` → `NAME`.
pub fn parse_app(s: &str) -> Result<String, String> {
    let name = match s.split_once('/') {
        Some(("app" | "apps", name)) => name,
        Some((kind, _)) => return Err(format!("{s:?}: rollouts are about apps (app/NAME), not {kind}")),
        None => s,
    };
    if name.is_empty() || name.contains('/') {
        return Err(format!("{s:?}: expected app/NAME"));
    }
    Ok(name.to_string())
}

/// Runs one `rollout` subcommand.
pub(crate) async fn run(session: &Session, cmd: RolloutCommand) -> Result<()> {
    let client = session.client()?;
    match cmd {
        RolloutCommand::History { app } => {
            let obj = client.get_object(Kind::App, &app).await?;
            emit(history_table(&obj, unix_now()))?;
        }
        RolloutCommand::Status { app, watch: false } => {
            let obj = client.get_object(Kind::App, &app).await?;
            emit(status_text(&obj))?;
        }
        RolloutCommand::Status { app, watch: true } => {
            let mut last = String::new();
            loop {
                let obj = client.get_object(Kind::App, &app).await?;
                let out = status_text(&obj);
                if out != last {
                    if !last.is_empty() && !emit("\n")? {
                        return Ok(());
                    }
                    if !emit(&out)? {
                        return Ok(());
                    }
                    last = out;
                }
                match settled(&obj) {
                    Some("Complete") => return Ok(()),
                    Some(phase) => bail!("app/{app}: rollout {phase}: {}", text(&obj, "/status/rollout/message")),
                    None => tokio::time::sleep(WATCH_PERIOD).await,
                }
            }
        }
        RolloutCommand::Pause { app } => action(session, &app, "pause", &json!({})).await?,
        RolloutCommand::Resume { app } => action(session, &app, "resume", &json!({})).await?,
        RolloutCommand::Undo { app, to_revision } => {
            let body = match to_revision {
                Some(n) => json!({ "toRevision": n }),
                None => json!({}),
            };
            action(session, &app, "undo", &body).await?
        }
    }
    Ok(())
}

async fn action(session: &Session, app: &str, action: &str, body: &Value) -> Result<()> {
    let client = session.client()?;
    let answer = client.post(&format!("/v1/apps/{app}/rollout/{action}"), body).await?;
    emit(format!("{}\n", answer.get("message").and_then(Value::as_str).unwrap_or("done")))?;
    Ok(())
}

/// The phase when the controller has acted on the App's latest spec and
/// the rollout has ended (`Complete`, `RolledBack` or `Failed`).
pub fn settled(app: &Value) -> Option<&'static str> {
    let generation = app.pointer("/metadata/generation").and_then(Value::as_u64).unwrap_or(0);
    let observed = app.pointer("/status/observedGeneration").and_then(Value::as_u64).unwrap_or(0);
    if observed < generation {
        return None;
    }
    match app.pointer("/status/rollout/phase").and_then(Value::as_str) {
        Some("Complete") => Some("Complete"),
        Some("RolledBack") => Some("RolledBack"),
        Some("Failed") => Some("Failed"),
        _ => None,
    }
}

/// `rollout history`: REVISION, CREATED, CHANGE, HASH and a note on the
/// current revision (and the stable one during or after a rollback).
pub fn history_table(app: &Value, now: i64) -> String {
    let history = app.pointer("/status/history").and_then(Value::as_array).cloned().unwrap_or_default();
    if history.is_empty() {
        return format!("app/{} has no recorded revision yet\n", text(app, "/metadata/name"));
    }
    let rollout = app.pointer("/status/rollout");
    let num = |v: Option<&Value>, p: &str| v.and_then(|v| v.pointer(p)).and_then(Value::as_u64);
    let newest = history.last().and_then(|r| r.get("revision")).and_then(Value::as_u64);
    let current = num(rollout, "/revision").filter(|r| *r != 0).or(newest);
    let stable = num(rollout, "/stableRevision");
    let phase = rollout.and_then(|r| r.get("phase")).and_then(Value::as_str).unwrap_or("");
    let mut t = Table::new(&["revision", "created", "change", "hash", ""]);
    for r in &history {
        let n = r.get("revision").and_then(Value::as_u64).unwrap_or(0);
        let note = if Some(n) == current {
            match phase {
                "RolledBack" => "current (rolled back)".to_string(),
                "Failed" => "current (failed)".to_string(),
                "Progressing" | "Paused" => format!("current ({})", phase.to_lowercase()),
                _ => "current".to_string(),
            }
        } else if Some(n) == stable && matches!(phase, "RolledBack" | "Failed" | "Progressing" | "Paused") {
            "stable (running)".to_string()
        } else {
            String::new()
        };
        let created = text(r, "/created");
        let created = if created.is_empty() { "-".to_string() } else { format!("{} ago", age_since(&created, now)) };
        t.push(vec![n.to_string(), created, text(r, "/change"), text(r, "/hash"), note]);
    }
    t.render()
}

/// `rollout status`: phase, revision, canary step, counts and message.
pub fn status_text(app: &Value) -> String {
    let name = text(app, "/metadata/name");
    let Some(r) = app.pointer("/status/rollout") else {
        let desired = app.pointer("/status/replicas").and_then(Value::as_u64).unwrap_or(0);
        let ready = app.pointer("/status/readyReplicas").and_then(Value::as_u64).unwrap_or(0);
        return format!("app/{name}: no rollout recorded yet ({ready}/{desired} ready)\n");
    };
    let n = |p: &str| r.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    let steps = app.pointer("/spec/rollout/canary/steps").and_then(Value::as_array).map_or(0, Vec::len) as u64;
    let desired = app.pointer("/status/replicas").and_then(Value::as_u64).unwrap_or(0);
    let mut out = format!("app/{name}: {}\n", text(r, "/phase"));
    out.push_str(&format!("  revision:   {} (stable {})\n", n("/revision"), n("/stableRevision")));
    if steps > 0 {
        out.push_str(&format!("  step:       {}/{steps}\n", n("/step").min(steps)));
    }
    out.push_str(&format!(
        "  instances:  {} updated, {} available, {desired} desired\n",
        n("/updatedReplicas"),
        n("/availableReplicas")
    ));
    if n("/failures") > 0 {
        out.push_str(&format!("  failures:   {}\n", n("/failures")));
    }
    if app.pointer("/spec/rollout/paused").and_then(Value::as_bool) == Some(true) {
        out.push_str("  paused:     yes (yunbian rollout resume)\n");
    }
    let message = text(r, "/message");
    if !message.is_empty() {
        out.push_str(&format!("  message:    {message}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> Value {
        json!({
            "metadata": {"name": "web", "generation": 3},
            "spec": {"rollout": {"canary": {"steps": [{"groups": ["a"]}, {"pause": true}]}}},
            "status": {
                "replicas": 4,
                "observedGeneration": 3,
                "history": [
                    {"revision": 1, "hash": "aaaa", "created": "2026-01-01T00:00:00Z", "change": "created"},
                    {"revision": 2, "hash": "bbbb", "created": "2026-01-01T01:00:00Z", "change": "artifact site 1.0 → 2.0"}
                ],
                "rollout": {"phase": "Paused", "revision": 2, "stableRevision": 1, "step": 1,
                            "updatedReplicas": 2, "availableReplicas": 2,
                            "message": "paused at step 2/2"}
            }
        })
    }

    #[test]
    fn app_targets_parse() {
        assert_eq!(parse_app("app/web"), Ok("web".into()));
        assert_eq!(parse_app("apps/web"), Ok("web".into()));
        assert_eq!(parse_app("web"), Ok("web".into()));
        assert!(parse_app("node/e1").expect_err("not an app").contains("rollouts are about apps"));
        assert!(parse_app("app/").is_err());
    }

    #[test]
    fn history_marks_current_and_stable() {
        let now = yunbian_api::time::parse_rfc3339("2026-01-01T02:00:00Z").expect("time") as i64;
        let out = history_table(&app(), now);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines[0].starts_with("REVISION   CREATED"), "{out}");
        assert!(
            lines[1].starts_with("1 ") && lines[1].contains("created") && lines[1].ends_with("stable (running)"),
            "{out}"
        );
        assert!(lines[2].contains("artifact site 1.0 → 2.0") && lines[2].ends_with("current (paused)"), "{out}");
        assert!(lines[2].contains("60m ago"), "{out}");
        let mut none = app();
        none["status"]["history"] = json!([]);
        assert_eq!(history_table(&none, now), "app/web has no recorded revision yet\n");
    }

    #[test]
    fn status_shows_step_counts_and_message() {
        let out = status_text(&app());
        assert!(out.starts_with("app/web: Paused\n"), "{out}");
        assert!(out.contains("revision:   2 (stable 1)"), "{out}");
        assert!(out.contains("step:       1/2"), "{out}");
        assert!(out.contains("2 updated, 2 available, 4 desired"), "{out}");
        assert!(out.contains("message:    paused at step 2/2"), "{out}");
    }

    #[test]
    fn settled_waits_for_the_controller() {
        let mut a = app();
        assert_eq!(settled(&a), None, "paused is not an end");
        a["status"]["rollout"]["phase"] = json!("Complete");
        assert_eq!(settled(&a), Some("Complete"));
        a["metadata"]["generation"] = json!(4);
        assert_eq!(settled(&a), None, "the controller has not seen the latest spec");
        a["status"]["observedGeneration"] = json!(4);
        a["status"]["rollout"]["phase"] = json!("RolledBack");
        assert_eq!(settled(&a), Some("RolledBack"));
    }
}
