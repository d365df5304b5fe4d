//! Manifest parsing: YAML (one or many `---` documents) or JSON into typed,
//! validated [`Resource`]s. Unknown fields are rejected with their path.

use serde::de::DeserializeOwned;

use crate::artifact::{object_name_errors, Artifact};
use crate::device::*;
use crate::kinds::*;
use crate::meta::Kind;
use crate::rule::*;
use crate::validate::{FieldError, Validate};

/// Any object of any kind.
// Resources are short-lived (parsed, validated, written): boxing the large
// App variant would cost every match site for no measurable gain.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    /// A Node.
    Node(Node),
    /// A NodeGroup.
    NodeGroup(NodeGroup),
    /// A Token.
    Token(Token),
    /// An App.
    App(App),
    /// An AppInstance.
    AppInstance(AppInstance),
    /// A DeviceModel.
    DeviceModel(DeviceModel),
    /// A Device.
    Device(Device),
    /// A Rule.
    Rule(Rule),
    /// An Artifact.
    Artifact(Artifact),
}

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ManifestError {
    /// Not YAML/JSON at all.
    #[error("{0}")]
    Syntax(String),
    /// `kind` missing or unknown.
    #[error("kind: {0}")]
    Kind(String),
    /// Well-formed but wrong field types or unknown fields.
    #[error("{path}: {message}")]
    Field {
        /// Path of the offending field.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// Parsed, but invalid.
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldError>),
}

impl ManifestError {
    /// Every problem as `path: message` lines.
    pub fn details(&self) -> Vec<String> {
        match self {
            ManifestError::Invalid(v) => v.iter().map(|e| e.to_string()).collect(),
            other => vec![other.to_string()],
        }
    }
}

impl Resource {
    /// The kind.
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Node(_) => Kind::Node,
            Resource::NodeGroup(_) => Kind::NodeGroup,
            Resource::Token(_) => Kind::Token,
            Resource::App(_) => Kind::App,
            Resource::AppInstance(_) => Kind::AppInstance,
            Resource::DeviceModel(_) => Kind::DeviceModel,
            Resource::Device(_) => Kind::Device,
            Resource::Rule(_) => Kind::Rule,
            Resource::Artifact(_) => Kind::Artifact,
        }
    }

    /// The object's name.
    pub fn name(&self) -> &str {
        match self {
            Resource::Node(o) => o.name(),
            Resource::NodeGroup(o) => o.name(),
            Resource::Token(o) => o.name(),
            Resource::App(o) => o.name(),
            Resource::AppInstance(o) => o.name(),
            Resource::DeviceModel(o) => o.name(),
            Resource::Device(o) => o.name(),
            Resource::Rule(o) => o.name(),
            Resource::Artifact(o) => o.name(),
        }
    }

    /// JSON form.
    pub fn to_value(&self) -> serde_json::Value {
        match self {
            Resource::Node(o) => o.to_value(),
            Resource::NodeGroup(o) => o.to_value(),
            Resource::Token(o) => o.to_value(),
            Resource::App(o) => o.to_value(),
            Resource::AppInstance(o) => o.to_value(),
            Resource::DeviceModel(o) => o.to_value(),
            Resource::Device(o) => o.to_value(),
            Resource::Rule(o) => o.to_value(),
            Resource::Artifact(o) => o.to_value(),
        }
    }

    /// Validation problems.
    pub fn errors(&self) -> Vec<FieldError> {
        match self {
            Resource::Node(o) => o.errors(),
            Resource::NodeGroup(o) => o.errors(),
            Resource::Token(o) => o.errors(),
            Resource::App(o) => o.errors(),
            Resource::AppInstance(o) => o.errors(),
            Resource::DeviceModel(o) => o.errors(),
            Resource::Device(o) => o.errors(),
            Resource::Rule(o) => o.errors(),
            Resource::Artifact(o) => {
                let mut errs = o.errors();
                errs.extend(object_name_errors(o));
                errs
            }
        }
    }

    /// Decodes and validates one JSON value.
    pub fn from_value(v: serde_json::Value) -> Result<Resource, ManifestError> {
        let kind_str =
            v.get("kind").and_then(|k| k.as_str()).ok_or_else(|| ManifestError::Kind("is required".into()))?;
        let kind: Kind = match kind_str {
            "Node" => Kind::Node,
            "NodeGroup" => Kind::NodeGroup,
            "Token" => Kind::Token,
            "App" => Kind::App,
            "AppInstance" => Kind::AppInstance,
            "DeviceModel" => Kind::DeviceModel,
            "Device" => Kind::Device,
            "Rule" => Kind::Rule,
            "Artifact" => Kind::Artifact,
            "Event" => {
                return Err(ManifestError::Kind(
                    "Event objects are raised by alert rules, they cannot be applied".into(),
                ))
            }
            other => return Err(ManifestError::Kind(format!("unknown kind {other:?}"))),
        };
        let r = match kind {
            Kind::Node => Resource::Node(typed(v)?),
            Kind::NodeGroup => Resource::NodeGroup(typed(v)?),
            Kind::Token => Resource::Token(typed(v)?),
            Kind::App => Resource::App(typed(v)?),
            Kind::AppInstance => Resource::AppInstance(typed(v)?),
            Kind::DeviceModel => Resource::DeviceModel(typed(v)?),
            Kind::Device => Resource::Device(typed(v)?),
            Kind::Rule => Resource::Rule(typed(v)?),
            Kind::Artifact => Resource::Artifact(typed(v)?),
            Kind::Event => unreachable!("refused above"),
        };
        let errs = r.errors();
        if errs.is_empty() {
            Ok(r)
        } else {
            Err(ManifestError::Invalid(errs))
        }
    }
}

fn typed<T: DeserializeOwned>(v: serde_json::Value) -> Result<T, ManifestError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        ManifestError::Field { path: if path == "." { String::new() } else { path }, message }
    })
}

/// Files saved by some editors start with a UTF-8 byte-order mark.
fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// Parses one document (YAML or JSON) into a validated resource.
pub fn parse_one(text: &str) -> Result<Resource, ManifestError> {
    let text = strip_bom(text);
    let v: serde_json::Value = serde_yaml::from_str(text).map_err(|e| ManifestError::Syntax(e.to_string()))?;
    Resource::from_value(v)
}

/// Parses a stream of `---`-separated YAML documents (or one JSON document,
/// or a JSON `{"items": [...]}` list). Empty documents are skipped.
pub fn parse_manifests(text: &str) -> Result<Vec<Resource>, ManifestError> {
    let text = strip_bom(text);
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v: serde_json::Value =
            serde::Deserialize::deserialize(doc).map_err(|e| ManifestError::Syntax(e.to_string()))?;
        if v.is_null() {
            continue;
        }
        if let Some(items) = v.get("items").and_then(|i| i.as_array()) {
            for item in items {
                out.push(Resource::from_value(item.clone())?);
            }
        } else {
            out.push(Resource::from_value(v)?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = r#"
apiVersion: yunbian.io/v1
kind: App
metadata:
  name: hello
spec:
  replicas: 2
  runtime: process
  process:
    command: ["/bin/sh", "-c", "while true; do echo hello from $NODE_NAME; sleep 1; done"]
    env: {GREETING: hi}
    workingDir: /tmp
  restartPolicy: Always
  resources:
    requests: {cpu: 100m, memory: 32Mi}
    limits: {cpu: 500m, memory: 64Mi}
  health:
    liveness: {tcp: {port: 8080}, periodSeconds: 5}
  placement:
    nodeSelector: {site: a}
"#;

    #[test]
    fn parses_the_reference_app() {
        let r = parse_one(HELLO).expect("valid");
        let Resource::App(app) = r else { panic!("not an app") };
        assert_eq!(app.spec.replicas, 2);
        assert_eq!(app.spec.resources.limits.memory_bytes(), 64 << 20);
        assert_eq!(app.spec.health.liveness.as_ref().map(|l| l.period_seconds), Some(5));
        assert_eq!(app.spec.placement.node_selector.get("site").map(String::as_str), Some("a"));
    }

    #[test]
    fn unknown_field_named_with_path() {
        let text = HELLO.replace("restartPolicy: Always", "restartPolicy: Always\n  replicaz: 3");
        let e = parse_one(&text).expect_err("unknown field");
        let s = e.to_string();
        assert!(s.contains("replicaz"), "{s}");
        assert!(s.starts_with("spec"), "{s}");
    }

    #[test]
    fn negative_replicas() {
        let text = HELLO.replace("replicas: 2", "replicas: -1");
        let e = parse_one(&text).expect_err("invalid");
        assert_eq!(e.to_string(), "spec.replicas: must be >= 0");
    }

    #[test]
    fn multi_document() {
        let text = format!("{HELLO}\n---\n{}", HELLO.replace("name: hello", "name: hello2"));
        let v = parse_manifests(&text).expect("two docs");
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].name(), "hello2");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for g in ["", "][", "kind: 3", "kind: Pod", "{\"kind\":\"App\"}", "\u{0}\u{1}"] {
            let _ = parse_one(g);
            let _ = parse_manifests(g);
        }
    }
}
