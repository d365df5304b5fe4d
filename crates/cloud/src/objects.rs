//! Typed access to the store for the cloud's own components: create with
//! server-owned metadata, apply (replace spec, keep status), and status
//! updates with optimistic-concurrency retries.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use yunbian_api::{Kind, KindOf, Object};
use yunbian_store::{Store, StoreError, StoredObject};

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// RFC 3339 now.
pub fn now_rfc3339() -> String {
    yunbian_api::time::format_rfc3339(unix_now())
}

/// Decodes a stored object into its typed form.
pub fn decode<S: KindOf>(o: &StoredObject) -> Result<Object<S, S::Status>, StoreError> {
    serde_json::from_value((*o.value).clone())
        .map_err(|e| StoreError::Backend(format!("stored {} {} does not decode: {e}", o.kind.noun(), o.name)))
}

/// Fills server-owned metadata for a new object.
pub fn stamp_new(v: &mut Value) {
    if let Some(m) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        m.insert("uid".into(), Value::String(yunbian_pki::random_hex(16)));
        m.insert("generation".into(), Value::from(1u64));
        m.insert("creationTimestamp".into(), Value::String(now_rfc3339()));
        m.remove("resourceVersion");
    }
}

/// Outcome of [`apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The object did not exist.
    Created,
    /// Spec or labels changed.
    Configured,
    /// Nothing changed.
    Unchanged,
}

/// Creates or replaces an object's intent (spec, labels, annotations),
/// keeping its status and server-owned metadata. `generation` grows when
/// the spec changes. A `metadata.resourceVersion` in `incoming` is enforced.
pub async fn apply(
    store: &Arc<dyn Store>,
    kind: Kind,
    name: &str,
    mut incoming: Value,
) -> Result<(Applied, StoredObject), StoreError> {
    let expected = incoming.pointer("/metadata/resourceVersion").and_then(Value::as_u64).filter(|v| *v > 0);
    if let Some(o) = incoming.as_object_mut() {
        o.remove("status");
    }
    loop {
        match store.get(kind, name).await {
            Err(StoreError::NotFound { .. }) => {
                if let Some(rv) = expected {
                    return Err(StoreError::Conflict { kind, name: name.to_string(), expected: rv, current: 0 });
                }
                let mut v = incoming.clone();
                stamp_new(&mut v);
                match store.create(kind, name, v).await {
                    Ok(o) => return Ok((Applied::Created, o)),
                    Err(StoreError::AlreadyExists { .. }) => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
            Ok(cur) => {
                if let Some(rv) = expected.filter(|rv| *rv != cur.revision) {
                    return Err(StoreError::Conflict {
                        kind,
                        name: name.to_string(),
                        expected: rv,
                        current: cur.revision,
                    });
                }
                let mut next = (*cur.value).clone();
                let spec_changed = next.get("spec") != incoming.get("spec");
                let meta_changed = ["labels", "annotations"]
                    .iter()
                    .any(|f| next.pointer(&format!("/metadata/{f}")) != incoming.pointer(&format!("/metadata/{f}")));
                if !spec_changed && !meta_changed {
                    return Ok((Applied::Unchanged, cur));
                }
                next["spec"] = incoming.get("spec").cloned().unwrap_or(Value::Null);
                for f in ["labels", "annotations"] {
                    match incoming.pointer(&format!("/metadata/{f}")) {
                        Some(v) => next["metadata"][f] = v.clone(),
                        None => {
                            if let Some(m) = next["metadata"].as_object_mut() {
                                m.remove(f);
                            }
                        }
                    }
                }
                if spec_changed {
                    let g = next.pointer("/metadata/generation").and_then(Value::as_u64).unwrap_or(0);
                    next["metadata"]["generation"] = Value::from(g + 1);
                }
                match store.update(kind, name, next, Some(expected.unwrap_or(cur.revision))).await {
                    Ok(o) => return Ok((Applied::Configured, o)),
                    Err(StoreError::Conflict { .. }) if expected.is_none() => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

/// Changes an object's status with `f`, retrying on conflicts. `f` returns
/// false to leave the object alone. Returns whether a write happened.
pub async fn update_status<S: KindOf>(
    store: &Arc<dyn Store>,
    name: &str,
    mut f: impl FnMut(&mut Object<S, S::Status>) -> bool,
) -> Result<bool, StoreError> {
    for _ in 0..16 {
        let cur = store.get(S::KIND, name).await?;
        let mut obj: Object<S, S::Status> = decode(&cur)?;
        if !f(&mut obj) {
            return Ok(false);
        }
        match store.update(S::KIND, name, obj.to_value(), Some(cur.revision)).await {
            Ok(_) => return Ok(true),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Backend(format!("{} {name}: too many concurrent updates", S::KIND.noun())))
}
