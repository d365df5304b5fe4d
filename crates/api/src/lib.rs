//! Yunbian resource model: the typed objects every other crate speaks about,
//! their validation, and manifest parsing.
//!
//! Architecture invariant: this crate does no I/O. It turns bytes (YAML or
//! JSON) into typed, validated objects and back, nothing more.
//!
//! Every object is Kubernetes-shaped: `apiVersion: yunbian.io/v1`, `kind`,
//! `metadata`, `spec`, `status`. Adding a kind means: a spec/status pair in
//! [`kinds`], a variant in [`Kind`] and [`Resource`], and a `Validate` impl.

pub mod artifact;
pub mod device;
pub mod event;
pub mod fuzzing;
pub mod kinds;
pub mod manifest;
pub mod meta;
pub mod placement;
pub mod quantity;
pub mod rule;
pub mod time;
pub mod validate;

pub use artifact::{
    artifact_object_name, signing_statement, Artifact, ArtifactBlob, ArtifactRef, ArtifactSpec, ArtifactStatus,
    BlobSignature, BlobType, ChunkEntry,
};
pub use device::*;
pub use event::*;
pub use kinds::*;
pub use manifest::{parse_manifests, parse_one, ManifestError, Resource};
pub use meta::{Kind, ObjectMeta, API_VERSION};
pub use placement::*;
pub use rule::*;
pub use validate::{FieldError, Validate};

/// One entry of a watch stream, as sent by the cloud API (one JSON object per line).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct WatchEvent {
    /// `ADDED`, `MODIFIED` or `DELETED`.
    #[serde(rename = "type")]
    pub kind: WatchEventType,
    /// The object after the change (for `DELETED`, the last state).
    pub object: serde_json::Value,
}

/// What happened to the object of a [`WatchEvent`].
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum WatchEventType {
    /// The object was created.
    Added,
    /// The object was updated.
    Modified,
    /// The object was deleted.
    Deleted,
}

/// The JSON body of every API error: `{code, message, details}`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ApiErrorBody {
    /// The HTTP status code.
    pub code: u16,
    /// One human line, e.g. `app hello not found`.
    pub message: String,
    /// Field errors and other structured detail.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}

/// What an operator runs to re-enroll `node` when its certificate can no
/// longer be renewed. The agent logs it (with its data directory) and the
/// cloud shows it in the node's status, so both say the same thing.
pub fn rejoin_hint(node: &str, cloud: &str, data_dir: Option<&str>) -> String {
    let dir = match data_dir {
        Some(d) => format!(" --data-dir {d}"),
        None => " [--data-dir DIR]".to_string(),
    };
    format!(
        "create a token with `yunbian token create`, then on the node run `yunbian edge join --cloud {cloud} --name {node} --token <TOKEN> --force{dir}`"
    )
}
