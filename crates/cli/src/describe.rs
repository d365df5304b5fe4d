//! `describe`: one object as a human, multi-line text — metadata as
//! aligned fields, `spec` and `status` as indented YAML, and a table of
//! related objects (an app's or a node's instances, a group's nodes).

use serde_json::Value;
use yunbian_api::Kind;

use crate::columns::{pairs, text};
use crate::table::Table;
use crate::time::age_since;

/// Objects shown under the description, with the kind of their rows.
#[derive(Debug, Clone)]
pub struct Related {
    /// Section title (`Instances`, `Nodes`).
    pub title: &'static str,
    /// Kind of `items`.
    pub kind: Kind,
    /// The objects.
    pub items: Vec<Value>,
}

/// The full description of `obj` at `now` (Unix seconds).
pub fn describe(kind: Kind, obj: &Value, related: Option<&Related>, now: i64) -> String {
    let mut out = String::new();
    let mut field = |label: &str, value: String| {
        let value = if value.is_empty() { "<none>".to_string() } else { value };
        out.push_str(&format!("{:<18}{value}\n", format!("{label}:")));
    };
    let created = text(obj, "/metadata/creationTimestamp");
    field("Name", text(obj, "/metadata/name"));
    field("Kind", kind.as_str().to_string());
    field("Labels", pairs(obj.pointer("/metadata/labels")));
    field("Annotations", pairs(obj.pointer("/metadata/annotations")));
    field(
        "Created",
        if created.is_empty() { String::new() } else { format!("{created} ({} ago)", age_since(&created, now)) },
    );
    field("UID", text(obj, "/metadata/uid"));
    field("Resource Version", text(obj, "/metadata/resourceVersion"));
    field("Generation", text(obj, "/metadata/generation"));
    if kind == Kind::Node {
        let hb = text(obj, "/status/lastHeartbeat");
        if !hb.is_empty() {
            field("Last Heartbeat", format!("{hb} ({} ago)", age_since(&hb, now)));
        }
        // What is wrong, and what to do about it, before the details.
        for (label, pointer) in [("Reason", "/status/reason"), ("Disk Pressure", "/status/diskPressure")] {
            let v = text(obj, pointer);
            if !v.is_empty() {
                field(label, v);
            }
        }
    }
    for section in ["spec", "status"] {
        if let Some(v) = obj.get(section) {
            out.push_str(&yaml_section(&title_case(section), v));
        }
    }
    if let Some(rel) = related {
        out.push_str(&format!("{}:\n", rel.title));
        if rel.items.is_empty() {
            out.push_str("  <none>\n");
        } else {
            out.push_str(&indent(&related_table(rel, now).render(), "  "));
        }
    }
    out
}

fn related_table(rel: &Related, now: i64) -> Table {
    let mut items: Vec<&Value> = rel.items.iter().collect();
    items.sort_by_key(|v| text(v, "/metadata/name"));
    let mut t = Table::new(&crate::columns::headers(rel.kind, false));
    for v in items {
        t.push(crate::columns::row(rel.kind, v, false, now));
    }
    t
}

fn yaml_section(title: &str, v: &Value) -> String {
    let empty = match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        _ => false,
    };
    if empty {
        return format!("{:<18}<none>\n", format!("{title}:"));
    }
    let yaml = serde_yaml::to_string(v).unwrap_or_else(|e| format!("<cannot render: {e}>\n"));
    format!("{title}:\n{}", indent(&yaml, "  "))
}

fn title_case(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

fn indent(text: &str, prefix: &str) -> String {
    text.lines().map(|l| if l.is_empty() { "\n".to_string() } else { format!("{prefix}{l}\n") }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn app_with_instances() {
        let app = json!({
            "apiVersion": "yunbian.io/v1", "kind": "App",
            "metadata": {"name": "hello", "labels": {"team": "x"}, "creationTimestamp": "1970-01-01T00:00:00Z", "generation": 2},
            "spec": {"replicas": 2, "runtime": "process"},
            "status": {"readyReplicas": 1}
        });
        let inst = json!({"metadata": {"name": "hello-abc"}, "spec": {"app": "hello", "node": "edge-1"},
                          "status": {"phase": "Running", "restartCount": 1}});
        let rel = Related { title: "Instances", kind: Kind::AppInstance, items: vec![inst] };
        let d = describe(Kind::App, &app, Some(&rel), 60);
        assert!(d.starts_with("Name:             hello\nKind:             App\nLabels:           team=x\n"), "{d}");
        assert!(d.contains("Created:          1970-01-01T00:00:00Z (60s ago)\n"), "{d}");
        assert!(d.contains("Generation:       2\n"), "{d}");
        assert!(d.contains("Spec:\n  replicas: 2\n  runtime: process\n"), "{d}");
        assert!(d.contains("Status:\n  readyReplicas: 1\n"), "{d}");
        assert!(d.contains("Instances:\n  NAME        APP     NODE     STATUS    RESTARTS   AGE\n"), "{d}");
        assert!(d.contains("  hello-abc   hello   edge-1   Running   1          <unknown>\n"), "{d}");
    }

    #[test]
    fn empty_sections() {
        let d = describe(Kind::Token, &json!({"metadata": {"name": "t"}, "spec": {}}), None, 0);
        assert!(d.contains("Spec:             <none>\n"), "{d}");
        let rel = Related { title: "Nodes", kind: Kind::Node, items: vec![] };
        let d = describe(Kind::NodeGroup, &json!({"metadata": {"name": "g"}}), Some(&rel), 0);
        assert!(d.ends_with("Nodes:\n  <none>\n"), "{d}");
    }
}
