//! Which devices and device models each node's desired view holds.
//!
//! A Device goes to the node it is attached to (`spec.node`, or the node the
//! device controller chose in `status.node` for a `nodeSelector`); a
//! DeviceModel goes to every node that has at least one device of that
//! model. Objects go without their status, and a status-only change (twin
//! reports, every few seconds) changes no view.
//!
//! Pure bookkeeping: store objects in, per-node view changes out. The hub
//! applies all changes of one store event to a node in one delta.

use std::collections::{BTreeMap, HashMap};

use yunbian_api::Kind;
use yunbian_store::StoredObject;
use yunbian_sync::{Change, DesiredObject};

#[derive(Debug, Clone, PartialEq)]
struct Routed {
    node: String,
    model: String,
    generation: u64,
}

/// Routing of devices and models to node views.
#[derive(Debug, Default)]
pub struct DeviceRouting {
    devices: HashMap<String, Routed>,
    /// Device objects as sent (for resync diffs).
    device_objects: HashMap<String, DesiredObject>,
    models: HashMap<String, (u64, DesiredObject)>,
    refs: HashMap<(String, String), u32>,
}

/// Per-node changes.
pub type NodeChanges = BTreeMap<String, Vec<Change>>;

fn generation(o: &StoredObject) -> u64 {
    o.value.pointer("/metadata/generation").and_then(|g| g.as_u64()).unwrap_or(0)
}

fn routed(o: &StoredObject) -> Option<Routed> {
    let spec_node = o.value.pointer("/spec/node").and_then(|v| v.as_str()).unwrap_or_default();
    let node = if spec_node.is_empty() {
        o.value.pointer("/status/node").and_then(|v| v.as_str()).unwrap_or_default()
    } else {
        spec_node
    };
    if node.is_empty() {
        return None;
    }
    let model = o.value.pointer("/spec/model").and_then(|v| v.as_str()).unwrap_or_default().to_string();
    Some(Routed { node: node.to_string(), model, generation: generation(o) })
}

/// The object as the edge gets it: without status, except the node a
/// `nodeSelector` device was given.
pub fn without_status(o: &StoredObject) -> DesiredObject {
    let mut value = (*o.value).clone();
    if let Some(m) = value.as_object_mut() {
        m.remove("status");
    }
    DesiredObject { kind: o.kind, name: o.name.clone(), revision: o.revision, value }
}

impl DeviceRouting {
    /// Builds the routing from listings.
    pub fn build(devices: &[StoredObject], models: &[StoredObject]) -> Self {
        let mut r = DeviceRouting::default();
        for m in models {
            r.models.insert(m.name.clone(), (generation(m), without_status(m)));
        }
        for d in devices {
            if let Some(rt) = routed(d) {
                *r.refs.entry((rt.node.clone(), rt.model.clone())).or_default() += 1;
                r.device_objects.insert(d.name.clone(), without_status(d));
                r.devices.insert(d.name.clone(), rt);
            }
        }
        r
    }

    /// Every node's device and model objects.
    pub fn wanted(&self) -> HashMap<String, Vec<DesiredObject>> {
        let mut out: HashMap<String, Vec<DesiredObject>> = HashMap::new();
        for (name, rt) in &self.devices {
            if let Some(o) = self.device_objects.get(name) {
                out.entry(rt.node.clone()).or_default().push(o.clone());
            }
        }
        for (node, model) in self.refs.keys() {
            if let Some((_, o)) = self.models.get(model) {
                out.entry(node.clone()).or_default().push(o.clone());
            }
        }
        out
    }

    fn add_ref(&mut self, node: &str, model: &str, out: &mut NodeChanges) {
        let n = self.refs.entry((node.to_string(), model.to_string())).or_default();
        *n += 1;
        if *n == 1 {
            if let Some((_, o)) = self.models.get(model) {
                out.entry(node.to_string()).or_default().push(Change::Upsert { object: o.clone() });
            }
        }
    }

    fn drop_ref(&mut self, node: &str, model: &str, out: &mut NodeChanges) {
        let key = (node.to_string(), model.to_string());
        let Some(n) = self.refs.get_mut(&key) else { return };
        *n -= 1;
        if *n == 0 {
            self.refs.remove(&key);
            if self.models.contains_key(model) {
                out.entry(node.to_string())
                    .or_default()
                    .push(Change::Remove { kind: Kind::DeviceModel, name: model.to_string() });
            }
        }
    }

    /// A device was added or modified (`Some`) or deleted (`None`).
    pub fn on_device(&mut self, name: &str, object: Option<&StoredObject>) -> NodeChanges {
        let mut out = NodeChanges::new();
        let prev = self.devices.get(name).cloned();
        let next = object.and_then(routed);
        if prev == next {
            return out; // status-only change, or unroutable both times
        }
        if let Some(p) = &prev {
            let moved = next.as_ref().is_none_or(|n| n.node != p.node);
            if moved {
                out.entry(p.node.clone())
                    .or_default()
                    .push(Change::Remove { kind: Kind::Device, name: name.to_string() });
            }
            self.devices.remove(name);
            self.device_objects.remove(name);
            if moved || next.as_ref().is_some_and(|n| n.model != p.model) {
                self.drop_ref(&p.node, &p.model, &mut out);
            }
        }
        if let (Some(n), Some(o)) = (next, object) {
            let same_ref = prev.as_ref().is_some_and(|p| p.node == n.node && p.model == n.model);
            if !same_ref {
                self.add_ref(&n.node, &n.model, &mut out);
            }
            let obj = without_status(o);
            out.entry(n.node.clone()).or_default().push(Change::Upsert { object: obj.clone() });
            self.device_objects.insert(name.to_string(), obj);
            self.devices.insert(name.to_string(), n);
        }
        out
    }

    /// A model was added or modified (`Some`) or deleted (`None`).
    pub fn on_model(&mut self, name: &str, object: Option<&StoredObject>) -> NodeChanges {
        let mut out = NodeChanges::new();
        let nodes: Vec<String> = self.refs.keys().filter(|(_, m)| m == name).map(|(n, _)| n.clone()).collect();
        match object {
            Some(o) => {
                let g = generation(o);
                if self.models.get(name).is_some_and(|(old, _)| *old == g) {
                    return out;
                }
                let obj = without_status(o);
                self.models.insert(name.to_string(), (g, obj.clone()));
                for n in nodes {
                    out.entry(n).or_default().push(Change::Upsert { object: obj.clone() });
                }
            }
            None => {
                if self.models.remove(name).is_some() {
                    for n in nodes {
                        out.entry(n)
                            .or_default()
                            .push(Change::Remove { kind: Kind::DeviceModel, name: name.to_string() });
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;

    fn obj(kind: Kind, name: &str, rev: u64, v: serde_json::Value) -> StoredObject {
        StoredObject { kind, name: name.into(), revision: rev, value: Arc::new(v) }
    }

    fn dev(name: &str, node: &str, model: &str, generation: u64) -> StoredObject {
        obj(
            Kind::Device,
            name,
            generation,
            json!({"metadata": {"name": name, "generation": generation}, "spec": {"node": node, "model": model}, "status": {"state": "online"}}),
        )
    }

    fn model(name: &str, generation: u64) -> StoredObject {
        obj(
            Kind::DeviceModel,
            name,
            generation,
            json!({"metadata": {"name": name, "generation": generation}, "spec": {}}),
        )
    }

    fn kinds(c: &[Change]) -> Vec<String> {
        c.iter()
            .map(|c| match c {
                Change::Upsert { object } => format!("+{}/{}", object.kind.noun(), object.name),
                Change::Remove { kind, name } => format!("-{}/{}", kind.noun(), name),
            })
            .collect()
    }

    #[test]
    fn models_follow_their_devices_and_status_changes_route_nothing() {
        let mut r = DeviceRouting::build(&[], &[model("m", 1)]);
        let c = r.on_device("d1", Some(&dev("d1", "n1", "m", 1)));
        assert_eq!(kinds(&c["n1"]), ["+devicemodel/m", "+device/d1"]);
        assert!(c["n1"]
            .iter()
            .all(|c| !matches!(c, Change::Upsert { object } if object.value.get("status").is_some())));
        // A second device of the same model: the model is not sent again.
        let c = r.on_device("d2", Some(&dev("d2", "n1", "m", 1)));
        assert_eq!(kinds(&c["n1"]), ["+device/d2"]);
        // Status-only change: nothing.
        assert!(r.on_device("d2", Some(&dev("d2", "n1", "m", 1))).is_empty());
        // Model change reaches the node once.
        let c = r.on_model("m", Some(&model("m", 2)));
        assert_eq!(kinds(&c["n1"]), ["+devicemodel/m"]);
        // Move d1 to n2: removed from n1, model follows, n1 keeps the model for d2.
        let c = r.on_device("d1", Some(&dev("d1", "n2", "m", 2)));
        assert_eq!(kinds(&c["n1"]), ["-device/d1"]);
        assert_eq!(kinds(&c["n2"]), ["+devicemodel/m", "+device/d1"]);
        // Delete d2: the model leaves n1 too.
        let c = r.on_device("d2", None);
        assert_eq!(kinds(&c["n1"]), ["-device/d2", "-devicemodel/m"]);
        let w = r.wanted();
        assert_eq!(w.len(), 1);
        assert_eq!(w["n2"].len(), 2);
    }

    #[test]
    fn unplaced_devices_are_nowhere_until_placed() {
        let mut r = DeviceRouting::build(&[], &[model("m", 1)]);
        let unplaced = obj(
            Kind::Device,
            "d",
            1,
            json!({"metadata": {"name": "d", "generation": 1}, "spec": {"model": "m", "nodeSelector": {"site": "a"}}}),
        );
        assert!(r.on_device("d", Some(&unplaced)).is_empty());
        let placed = obj(
            Kind::Device,
            "d",
            2,
            json!({"metadata": {"name": "d", "generation": 1}, "spec": {"model": "m", "nodeSelector": {"site": "a"}}, "status": {"node": "n3"}}),
        );
        let c = r.on_device("d", Some(&placed));
        assert_eq!(kinds(&c["n3"]), ["+devicemodel/m", "+device/d"]);
    }
}
