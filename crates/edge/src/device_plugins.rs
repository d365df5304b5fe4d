//! The device-plugin interface: how vendor plugins tell the agent about
//! accelerators (GPUs, NPUs, …) and take part in their allocation
//! (docs/design/017-device-plugins.md).
//!
//! A plugin is a separate process on the node that talks HTTP/1.1 + JSON to
//! the agent over the unix socket `<data-dir>/device-plugins.sock` (mode
//! 0600: only the agent's user may connect).
//!
//! ```text
//!  plugin                                        agent (serve)
//!    │ POST /v1/plugins {name, resource, env,       │ registers, or refreshes:
//!    │   devices:[{id, model, memoryBytes,          │ every re-post is a heartbeat
//!    │   healthy}]}                                 │ and replaces the device list
//!    │◀── {name, resource, devices, healthy,        │
//!    │     renewEverySeconds, expireAfterSeconds} ──│
//!    │ DELETE /v1/plugins/{name}                    │ devices gone (allocations kept)
//!    │ GET /v1/plugins | /v1/devices | /v1/allocations  (what the agent holds)
//! ```
//!
//! One plugin serves one extended resource (`yunbian.io/gpu`); another
//! plugin may take a resource over only once its owner expired or left. A
//! plugin re-posts its registration when a device's health changes and at
//! least every [`RENEW_EVERY`]; one that stays silent for
//! [`EXPIRE_AFTER`] has its devices reported unhealthy (they count for
//! nothing new) until it posts again.
//!
//! # Allocation
//!
//! An instance whose template asks for `devices: {yunbian.io/gpu: 2}` gets
//! the two healthy, unallocated devices with the lowest ids (numeric ids in
//! numeric order, then the others in byte order), or none and a
//! [`Shortfall`] naming what is missing. The grant is persisted before it
//! is used and stays with the instance until it is no longer desired, even
//! while its devices are unhealthy or their plugin is away (an agent
//! restart, a plugin upgrade): a running workload keeps the devices it was
//! started with. The workload sees `YUNBIAN_DEVICES_<RESOURCE>=ids` (the
//! resource upper-cased, other characters as `_`) and the plugin's own
//! variable (`NVIDIA_VISIBLE_DEVICES=0,1`).
//!
//! # State file
//!
//! `<data-dir>/device-plugins.json`, written atomically (temporary file,
//! fsync, rename) whenever a registration's content, a grant or a release
//! changes it — not on the periodic re-posts that change nothing:
//!
//! ```json
//! {"version": 1,
//!  "plugins": [{"name": "nvidia", "resource": "yunbian.io/gpu", "env": "NVIDIA_VISIBLE_DEVICES",
//!               "devices": [{"id": "0", "model": "NVIDIA A2", "memoryBytes": 16106127360, "healthy": true}]}],
//!  "grants": {"infer-1": {"yunbian.io/gpu": {"ids": ["0"], "env": "NVIDIA_VISIBLE_DEVICES"}}}}
//! ```
//!
//! Restored plugins count as just seen, so their devices stay healthy for
//! one [`EXPIRE_AFTER`] while the plugins re-register after an agent
//! restart. A state file that cannot be read is moved aside (and the agent
//! starts with no grants), never a reason not to run.
//!
//! [`DeviceTable`] is the sans-IO core (registrations, health by age,
//! allocation; `now` in milliseconds is passed in); [`DeviceRegistry`] adds
//! the lock, the clock, the state file and change notification; [`serve`]
//! is the socket server and [`PluginClient`] the client plugins use.
//! Whatever arrives on the socket — garbage, a truncated request, a huge
//! body, JSON of the wrong shape — is answered with a 4xx and a JSON error
//! `{code, message, details}`, or a closed connection, never a panic.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use yunbian_api::{ApiErrorBody, HardwareDevice};

/// The socket's file name in the agent's data directory.
pub const SOCKET_FILE: &str = "device-plugins.sock";
/// The state file's name in the agent's data directory.
pub const STATE_FILE: &str = "device-plugins.json";
/// How often a plugin should re-post its registration.
pub const RENEW_EVERY: Duration = Duration::from_secs(10);
/// Silence after which a plugin's devices count as unhealthy.
pub const EXPIRE_AFTER: Duration = Duration::from_secs(30);
/// Largest request body accepted.
pub const MAX_BODY: usize = 256 * 1024;
/// Most devices one plugin may register.
pub const MAX_DEVICES: usize = 1024;
/// Longest device id.
pub const MAX_ID_LEN: usize = 128;
/// Connections served at once; beyond this new ones are closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Time allowed to send a request's headers, then to read its body.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- wire types

/// `POST /v1/plugins`: a plugin's registration (also its heartbeat).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Registration {
    /// The plugin's name (a DNS label: `nvidia`).
    pub name: String,
    /// The extended resource its devices count towards (`yunbian.io/gpu`).
    pub resource: String,
    /// The variable that tells a workload its devices
    /// (`NVIDIA_VISIBLE_DEVICES`); empty: only `YUNBIAN_DEVICES_…`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub env: String,
    /// Every device the plugin sees now (an empty list is allowed).
    #[serde(default)]
    pub devices: Vec<PluginDevice>,
}

/// One device of a registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginDevice {
    /// The id the workload is given (`0`, `GPU-8e6c…`): printable ASCII
    /// without spaces or commas, at most [`MAX_ID_LEN`] bytes.
    pub id: String,
    /// Vendor and model (`NVIDIA A2`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    /// Device memory in bytes (0: unknown).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub memory_bytes: u64,
    /// Whether the device is usable now.
    pub healthy: bool,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// The answer to a registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Registered {
    /// The plugin.
    pub name: String,
    /// Its resource.
    pub resource: String,
    /// Devices registered.
    pub devices: usize,
    /// Of which healthy.
    pub healthy: usize,
    /// Re-post at least this often.
    pub renew_every_seconds: u64,
    /// Silence after which the devices count as unhealthy.
    pub expire_after_seconds: u64,
}

/// A plugin as `GET /v1/plugins` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginView {
    /// The plugin.
    pub name: String,
    /// Its resource.
    pub resource: String,
    /// Its workload variable.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub env: String,
    /// Milliseconds since its last registration.
    pub last_seen_ms_ago: u64,
    /// Whether it stayed silent past [`EXPIRE_AFTER`].
    pub expired: bool,
    /// Its devices as the node reports them.
    pub devices: Vec<HardwareDevice>,
}

/// What one instance was granted of one resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Grant {
    /// Device ids, lowest first.
    pub ids: Vec<String>,
    /// The plugin's variable at the time of the grant (empty: none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub env: String,
}

/// An instance's grants, per resource.
pub type Grants = BTreeMap<String, Grant>;

// ---------------------------------------------------------------- errors

/// Why a registration or removal was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    /// The registration is malformed (every problem is listed).
    #[error("invalid registration: {}", .0.join("; "))]
    Invalid(Vec<String>),
    /// Another live plugin serves the resource.
    #[error("resource {resource} is served by plugin {owner}; it must unregister or expire first")]
    ResourceTaken {
        /// The resource.
        resource: String,
        /// The plugin serving it.
        owner: String,
    },
    /// No plugin of that name is registered.
    #[error("no plugin {0} is registered")]
    UnknownPlugin(String),
    /// The state file could not be written; nothing changed.
    #[error("persist the device-plugin state: {0}")]
    Persist(String),
}

/// What an instance asked for that the node cannot give now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    /// The resource.
    pub resource: String,
    /// Devices asked for.
    pub wanted: u64,
    /// Healthy devices nobody holds.
    pub free: u64,
    /// Registered devices of the resource.
    pub registered: u64,
    /// Of which unhealthy (or their plugin expired).
    pub unhealthy: u64,
    /// Healthy ones held by other instances.
    pub allocated: u64,
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.registered == 0 {
            return write!(f, "needs {} {}; no device plugin registered any", self.wanted, self.resource);
        }
        write!(
            f,
            "needs {} {}, {} free ({} registered: {} unhealthy, {} allocated to other instances)",
            self.wanted, self.resource, self.free, self.registered, self.unhealthy, self.allocated
        )
    }
}

/// Why an allocation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocateError {
    /// Not enough healthy free devices (one entry per short resource).
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Insufficient(Vec<Shortfall>),
    /// The grant could not be persisted; nothing was granted.
    #[error("persist the device allocation: {0}")]
    Persist(String),
}

// ---------------------------------------------------------------- validation

/// `domain/name`, lower-case letters, digits, `-` and `.` (and `_` in the
/// name), at most 253 bytes.
pub fn check_resource(r: &str) -> Result<(), String> {
    let ok = r.len() <= 253
        && r.split_once('/').is_some_and(|(d, n)| {
            !d.is_empty()
                && !n.is_empty()
                && d.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.".contains(c))
                && n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c))
        });
    if ok {
        Ok(())
    } else {
        Err(format!("resource {r:?} must be domain/name in lower case (yunbian.io/gpu)"))
    }
}

fn check_env(e: &str) -> Result<(), String> {
    let ok = e.chars().next().is_some_and(|c| c.is_ascii_uppercase() || c == '_')
        && e.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        && e.len() <= 128;
    if !ok {
        return Err(format!("env {e:?} must be an upper-case variable name (NVIDIA_VISIBLE_DEVICES)"));
    }
    if e.starts_with("YUNBIAN_") {
        return Err(format!("env {e:?}: variables starting with YUNBIAN_ are the agent's"));
    }
    Ok(())
}

fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(format!("device id {id:?} must be 1 to {MAX_ID_LEN} bytes"));
    }
    if !id.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
        return Err(format!("device id {id:?} must be printable ASCII without spaces or commas"));
    }
    Ok(())
}

impl Registration {
    /// Every problem of the registration (empty: valid).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Err(m) = yunbian_api::validate::check_name(&self.name) {
            out.push(format!("name: {m}"));
        }
        if let Err(m) = check_resource(&self.resource) {
            out.push(m);
        }
        if !self.env.is_empty() {
            if let Err(m) = check_env(&self.env) {
                out.push(m);
            }
        }
        if self.devices.len() > MAX_DEVICES {
            out.push(format!("{} devices; at most {MAX_DEVICES} per plugin", self.devices.len()));
            return out;
        }
        let mut seen = HashSet::new();
        for (i, d) in self.devices.iter().enumerate() {
            if let Err(m) = check_id(&d.id) {
                out.push(format!("devices[{i}]: {m}"));
            } else if !seen.insert(d.id.as_str()) {
                out.push(format!("devices[{i}]: device id {:?} is listed twice", d.id));
            }
            if d.model.len() > 256 {
                out.push(format!("devices[{i}].model: at most 256 bytes"));
            }
        }
        out
    }
}

/// The order devices are handed out in: numeric ids numerically, before
/// the others in byte order.
pub fn id_order(a: &str, b: &str) -> Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y).then_with(|| a.cmp(b)),
        (Ok(_), Err(_)) => Ordering::Less,
        (Err(_), Ok(_)) => Ordering::Greater,
        (Err(_), Err(_)) => a.cmp(b),
    }
}

/// `YUNBIAN_DEVICES_<RESOURCE>`: the resource upper-cased, every other
/// character `_` (`yunbian.io/gpu` → `YUNBIAN_DEVICES_YUNBIAN_IO_GPU`).
pub fn devices_env_name(resource: &str) -> String {
    let norm: String =
        resource.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("YUNBIAN_DEVICES_{norm}")
}

/// The variables a workload gets for its grants.
pub fn grant_env(grants: &Grants) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (resource, g) in grants {
        let ids = g.ids.join(",");
        out.push((devices_env_name(resource), ids.clone()));
        if !g.env.is_empty() {
            out.push((g.env.clone(), ids));
        }
    }
    out
}

// ---------------------------------------------------------------- sans-IO core

#[derive(Debug, Clone)]
struct Plugin {
    reg: Registration,
    last_seen_ms: u64,
    /// Whether its expiry was already noticed (logged once).
    expiry_noticed: bool,
}

/// What a registration changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterOutcome {
    /// The answer for the plugin.
    pub registered: Registered,
    /// Whether the registration's content differs from what was held (a
    /// new plugin, a device added, removed or changing health): the state
    /// file is rewritten and waiters are woken.
    pub changed: bool,
    /// Whether the plugin had expired and is back.
    pub revived: bool,
}

/// Registrations, health and grants: the device-plugin state machine,
/// without I/O (the caller passes `now` in milliseconds of a monotonic
/// clock).
#[derive(Debug, Clone)]
pub struct DeviceTable {
    plugins: BTreeMap<String, Plugin>,
    grants: BTreeMap<String, Grants>,
    expire_after_ms: u64,
}

impl DeviceTable {
    /// An empty table whose plugins expire after `expire_after` of silence.
    pub fn new(expire_after: Duration) -> Self {
        DeviceTable {
            plugins: BTreeMap::new(),
            grants: BTreeMap::new(),
            expire_after_ms: expire_after.as_millis() as u64,
        }
    }

    fn expired(&self, p: &Plugin, now: u64) -> bool {
        now.saturating_sub(p.last_seen_ms) > self.expire_after_ms
    }

    /// Registers or refreshes a plugin (see the module docs).
    pub fn register(&mut self, mut reg: Registration, now: u64) -> Result<RegisterOutcome, PluginError> {
        let problems = reg.problems();
        if !problems.is_empty() {
            return Err(PluginError::Invalid(problems));
        }
        if let Some(owner) = self
            .plugins
            .values()
            .find(|p| p.reg.resource == reg.resource && p.reg.name != reg.name && !self.expired(p, now))
        {
            return Err(PluginError::ResourceTaken { resource: reg.resource, owner: owner.reg.name.clone() });
        }
        // An expired plugin that served the resource gives way.
        let stale: Vec<String> = self
            .plugins
            .values()
            .filter(|p| p.reg.resource == reg.resource && p.reg.name != reg.name)
            .map(|p| p.reg.name.clone())
            .collect();
        for s in &stale {
            self.plugins.remove(s);
        }
        reg.devices.sort_by(|a, b| id_order(&a.id, &b.id));
        let healthy = reg.devices.iter().filter(|d| d.healthy).count();
        let registered = Registered {
            name: reg.name.clone(),
            resource: reg.resource.clone(),
            devices: reg.devices.len(),
            healthy,
            renew_every_seconds: RENEW_EVERY.as_secs(),
            expire_after_seconds: self.expire_after_ms / 1000,
        };
        let (changed, revived) = match self.plugins.get(&reg.name) {
            Some(p) => (p.reg != reg || !stale.is_empty(), self.expired(p, now)),
            None => (true, false),
        };
        self.plugins.insert(reg.name.clone(), Plugin { reg, last_seen_ms: now, expiry_noticed: false });
        Ok(RegisterOutcome { registered, changed, revived })
    }

    /// Removes a plugin: its devices are no longer reported; grants of
    /// running instances are kept.
    pub fn unregister(&mut self, name: &str) -> Result<(), PluginError> {
        self.plugins.remove(name).map(|_| ()).ok_or_else(|| PluginError::UnknownPlugin(name.to_string()))
    }

    /// Plugins that fell silent since the last call (each named once per
    /// silence).
    pub fn newly_expired(&mut self, now: u64) -> Vec<String> {
        let limit = self.expire_after_ms;
        let mut out = Vec::new();
        for p in self.plugins.values_mut() {
            if !p.expiry_noticed && now.saturating_sub(p.last_seen_ms) > limit {
                p.expiry_noticed = true;
                out.push(p.reg.name.clone());
            }
        }
        out
    }

    /// Who holds `(resource, id)`, if anyone.
    fn holder(&self, resource: &str, id: &str) -> Option<&str> {
        self.grants
            .iter()
            .find(|(_, g)| g.get(resource).is_some_and(|g| g.ids.iter().any(|i| i == id)))
            .map(|(i, _)| i.as_str())
    }

    /// Every registered device as the node reports it: healthy only if its
    /// plugin says so and has not expired; `allocatedTo` its holder.
    pub fn devices(&self, now: u64) -> Vec<HardwareDevice> {
        self.plugins.values().flat_map(|p| self.plugin_devices(p, now)).collect()
    }

    fn plugin_devices(&self, p: &Plugin, now: u64) -> Vec<HardwareDevice> {
        let alive = !self.expired(p, now);
        p.reg
            .devices
            .iter()
            .map(|d| HardwareDevice {
                resource: p.reg.resource.clone(),
                id: d.id.clone(),
                model: d.model.clone(),
                memory_bytes: d.memory_bytes,
                healthy: d.healthy && alive,
                allocated_to: self.holder(&p.reg.resource, &d.id).unwrap_or_default().to_string(),
            })
            .collect()
    }

    /// The plugins, for `GET /v1/plugins`.
    pub fn plugins(&self, now: u64) -> Vec<PluginView> {
        self.plugins
            .values()
            .map(|p| PluginView {
                name: p.reg.name.clone(),
                resource: p.reg.resource.clone(),
                env: p.reg.env.clone(),
                last_seen_ms_ago: now.saturating_sub(p.last_seen_ms),
                expired: self.expired(p, now),
                devices: self.plugin_devices(p, now),
            })
            .collect()
    }

    /// The grants of `instance`.
    pub fn grants(&self, instance: &str) -> Option<&Grants> {
        self.grants.get(instance)
    }

    /// Every instance's grants.
    pub fn all_grants(&self) -> &BTreeMap<String, Grants> {
        &self.grants
    }

    /// Grants `wants` (resource → count) to `instance`: its existing grants
    /// when they match the counts (whatever the devices' health now), else
    /// the lowest-id healthy devices nobody holds. Returns the grants and
    /// whether they are new (to be persisted). Nothing changes on error.
    pub fn allocate(
        &mut self,
        instance: &str,
        wants: &BTreeMap<String, u64>,
        now: u64,
    ) -> Result<(Grants, bool), Vec<Shortfall>> {
        let wanted: BTreeMap<&str, u64> =
            wants.iter().filter(|(_, n)| **n > 0).map(|(r, n)| (r.as_str(), *n)).collect();
        if let Some(g) = self.grants.get(instance) {
            let have: BTreeMap<&str, u64> = g.iter().map(|(r, g)| (r.as_str(), g.ids.len() as u64)).collect();
            if have == wanted {
                return Ok((g.clone(), false));
            }
        }
        let mut grants = Grants::new();
        let mut short = Vec::new();
        for (resource, n) in wanted {
            let (mut registered, mut unhealthy, mut allocated) = (0u64, 0u64, 0u64);
            let mut free: Vec<&str> = Vec::new();
            let mut env = String::new();
            for p in self.plugins.values().filter(|p| p.reg.resource == resource) {
                env = p.reg.env.clone();
                let alive = !self.expired(p, now);
                for d in &p.reg.devices {
                    registered += 1;
                    if !(d.healthy && alive) {
                        unhealthy += 1;
                    } else if self.holder(resource, &d.id).is_some_and(|h| h != instance) {
                        allocated += 1;
                    } else {
                        free.push(&d.id);
                    }
                }
            }
            free.sort_by(|a, b| id_order(a, b));
            if (free.len() as u64) < n {
                short.push(Shortfall {
                    resource: resource.to_string(),
                    wanted: n,
                    free: free.len() as u64,
                    registered,
                    unhealthy,
                    allocated,
                });
                continue;
            }
            let ids = free.iter().take(n as usize).map(|s| s.to_string()).collect();
            grants.insert(resource.to_string(), Grant { ids, env });
        }
        if !short.is_empty() {
            return Err(short);
        }
        self.grants.insert(instance.to_string(), grants.clone());
        Ok((grants, true))
    }

    /// Frees the grants of `instance`; whether it held any.
    pub fn release(&mut self, instance: &str) -> bool {
        self.grants.remove(instance).is_some()
    }

    /// Frees the grants of every instance `keep` refuses; the instances freed.
    pub fn release_unless(&mut self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let gone: Vec<String> = self.grants.keys().filter(|i| !keep(i)).cloned().collect();
        for i in &gone {
            self.grants.remove(i);
        }
        gone
    }

    fn snapshot(&self) -> StateFile {
        StateFile {
            version: 1,
            plugins: self.plugins.values().map(|p| p.reg.clone()).collect(),
            grants: self.grants.clone(),
        }
    }

    fn restore(&mut self, s: StateFile, now: u64) {
        for reg in s.plugins {
            if reg.problems().is_empty() {
                self.plugins.insert(reg.name.clone(), Plugin { reg, last_seen_ms: now, expiry_noticed: false });
            }
        }
        self.grants = s.grants;
    }
}

/// The state file (see the module docs).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StateFile {
    version: u32,
    #[serde(default)]
    plugins: Vec<Registration>,
    #[serde(default)]
    grants: BTreeMap<String, Grants>,
}

// ---------------------------------------------------------------- the registry

/// Milliseconds of a monotonic clock (tests pass their own).
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Settings of a [`DeviceRegistry`].
#[derive(Clone)]
pub struct RegistryOptions {
    /// Silence after which a plugin's devices count as unhealthy.
    pub expire_after: Duration,
    /// The clock; `None`: the process's monotonic clock.
    pub clock: Option<Clock>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions { expire_after: EXPIRE_AFTER, clock: None }
    }
}

impl std::fmt::Debug for RegistryOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryOptions").field("expire_after", &self.expire_after).finish_non_exhaustive()
    }
}

/// The agent's device-plugin state: a [`DeviceTable`] behind a lock, its
/// state file, and a version that moves on every change of what can be
/// allocated (so waiting instances are looked at again).
pub struct DeviceRegistry {
    table: Mutex<DeviceTable>,
    path: Option<PathBuf>,
    clock: Clock,
    changed: watch::Sender<u64>,
}

impl DeviceRegistry {
    /// The registry of the agent whose data is in `data_dir`, restored from
    /// its state file. A state file that cannot be read is moved aside as
    /// `device-plugins.json.corrupt-<unix time>`.
    pub fn open(data_dir: &Path, opts: RegistryOptions) -> Arc<DeviceRegistry> {
        let path = data_dir.join(STATE_FILE);
        let reg = Self::build(Some(path.clone()), opts);
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<StateFile>(&bytes) {
                Ok(s) if s.version == 1 => {
                    let now = reg.now();
                    let mut t = reg.lock();
                    t.restore(s, now);
                    tracing::info!(plugins = t.plugins.len(), grants = t.grants.len(), "device-plugin state restored");
                }
                other => {
                    let why = match other {
                        Ok(s) => format!("unknown version {}", s.version),
                        Err(e) => e.to_string(),
                    };
                    let aside = data_dir.join(format!("{STATE_FILE}.corrupt-{}", crate::identity::unix_now()));
                    tracing::error!(file = %path.display(), moved_to = %aside.display(), error = %why,
                        "the device-plugin state file cannot be read; starting without device grants");
                    let _ = std::fs::rename(&path, &aside);
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::error!(file = %path.display(), error = %e, "read the device-plugin state"),
        }
        reg
    }

    /// A registry that keeps nothing on disk.
    pub fn in_memory(opts: RegistryOptions) -> Arc<DeviceRegistry> {
        Self::build(None, opts)
    }

    fn build(path: Option<PathBuf>, opts: RegistryOptions) -> Arc<DeviceRegistry> {
        let clock = opts.clock.unwrap_or_else(|| {
            let t0 = Instant::now();
            Arc::new(move || t0.elapsed().as_millis() as u64)
        });
        Arc::new(DeviceRegistry {
            table: Mutex::new(DeviceTable::new(opts.expire_after)),
            path,
            clock,
            changed: watch::channel(0).0,
        })
    }

    fn now(&self) -> u64 {
        (self.clock)()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DeviceTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the table's state file (none for an in-memory registry).
    fn persist(&self, t: &DeviceTable) -> Result<(), String> {
        let Some(path) = &self.path else { return Ok(()) };
        let bytes = serde_json::to_vec_pretty(&t.snapshot()).map_err(|e| e.to_string())?;
        yunbian_pki::write_atomic(path, &bytes, 0o600).map_err(|e| format!("write {}: {e}", path.display()))
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Moves on every change of registrations or grants.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Registers or refreshes a plugin; a change of content is persisted
    /// first (a failed write changes nothing).
    pub fn register(&self, reg: Registration) -> Result<Registered, PluginError> {
        let now = self.now();
        let mut t = self.lock();
        let before = t.clone();
        let out = t.register(reg, now)?;
        if out.changed {
            if let Err(e) = self.persist(&t) {
                *t = before;
                return Err(PluginError::Persist(e));
            }
        }
        drop(t);
        let r = &out.registered;
        if out.changed || out.revived {
            tracing::info!(plugin = %r.name, resource = %r.resource, devices = r.devices, healthy = r.healthy, "device plugin registered");
            self.bump();
        }
        Ok(out.registered)
    }

    /// Removes a plugin (its grants stay with their instances).
    pub fn unregister(&self, name: &str) -> Result<(), PluginError> {
        let mut t = self.lock();
        let before = t.clone();
        t.unregister(name)?;
        if let Err(e) = self.persist(&t) {
            *t = before;
            return Err(PluginError::Persist(e));
        }
        drop(t);
        tracing::info!(plugin = %name, "device plugin unregistered");
        self.bump();
        Ok(())
    }

    /// The node's devices now (logs plugins that fell silent, once each).
    pub fn devices(&self) -> Vec<HardwareDevice> {
        let now = self.now();
        let mut t = self.lock();
        for p in t.newly_expired(now) {
            tracing::warn!(plugin = %p, silent_for_s = t.expire_after_ms / 1000, "device plugin stopped re-registering; its devices count as unhealthy");
        }
        t.devices(now)
    }

    /// The plugins.
    pub fn plugins(&self) -> Vec<PluginView> {
        let now = self.now();
        self.lock().plugins(now)
    }

    /// Every instance's grants.
    pub fn all_grants(&self) -> BTreeMap<String, Grants> {
        self.lock().all_grants().clone()
    }

    /// The device ids `instance` holds per resource (for its status).
    pub fn held_by(&self, instance: &str) -> BTreeMap<String, Vec<String>> {
        self.lock()
            .grants(instance)
            .map(|g| g.iter().map(|(r, g)| (r.clone(), g.ids.clone())).collect())
            .unwrap_or_default()
    }

    /// Grants `wants` to `instance` (see [`DeviceTable::allocate`]); a new
    /// grant is persisted before it is returned.
    pub fn allocate(&self, instance: &str, wants: &BTreeMap<String, u64>) -> Result<Grants, AllocateError> {
        let now = self.now();
        let mut t = self.lock();
        let before = t.clone();
        let (grants, new) = t.allocate(instance, wants, now).map_err(AllocateError::Insufficient)?;
        if new {
            if let Err(e) = self.persist(&t) {
                *t = before;
                return Err(AllocateError::Persist(e));
            }
            drop(t);
            tracing::info!(instance, grants = ?grants.iter().map(|(r, g)| (r, &g.ids)).collect::<Vec<_>>(), "devices allocated");
            self.bump();
        }
        Ok(grants)
    }

    /// Frees the grants of every instance `keep` refuses.
    pub fn release_unless(&self, keep: impl Fn(&str) -> bool) {
        let mut t = self.lock();
        let gone = t.release_unless(keep);
        if gone.is_empty() {
            return;
        }
        if let Err(e) = self.persist(&t) {
            // The grants are freed in memory; a restart before the next
            // successful write brings them back until then.
            tracing::warn!(error = %e, "persist released device grants");
        }
        drop(t);
        tracing::info!(instances = ?gone, "devices released");
        self.bump();
    }
}

// ---------------------------------------------------------------- the server

/// Binds the socket at `path` (removing a stale socket left there, refusing
/// to replace anything else) with mode 0600. Must be called inside a tokio
/// runtime.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the device-plugin interface on `listener` until the task is
/// dropped, at most [`MAX_CONNECTIONS`] connections at once.
pub async fn serve(registry: Arc<DeviceRegistry>, listener: tokio::net::UnixListener) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "device-plugin socket: accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(limit = MAX_CONNECTIONS, "device-plugin socket: too many connections; closing a new one");
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(move |req| {
                let registry = registry.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&registry, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(REQUEST_TIMEOUT)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "device-plugin connection ended");
            }
        });
    }
}

type HttpResponse = Response<Full<Bytes>>;

fn json<T: Serialize>(code: StatusCode, v: &T) -> HttpResponse {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    r
}

fn error(code: StatusCode, message: impl Into<String>, details: Vec<String>) -> HttpResponse {
    json(code, &ApiErrorBody { code: code.as_u16(), message: message.into(), details })
}

fn plugin_error(e: PluginError) -> HttpResponse {
    match e {
        PluginError::Invalid(d) => error(StatusCode::BAD_REQUEST, "invalid registration", d),
        PluginError::ResourceTaken { .. } => error(StatusCode::CONFLICT, e.to_string(), Vec::new()),
        PluginError::UnknownPlugin(_) => error(StatusCode::NOT_FOUND, e.to_string(), Vec::new()),
        PluginError::Persist(_) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), Vec::new()),
    }
}

/// Reads a body of at most [`MAX_BODY`] bytes within [`REQUEST_TIMEOUT`].
async fn read_body(body: Incoming) -> Result<Bytes, HttpResponse> {
    let limited = Limited::new(body, MAX_BODY);
    match tokio::time::timeout(REQUEST_TIMEOUT, limited.collect()).await {
        Err(_) => Err(error(StatusCode::REQUEST_TIMEOUT, "the request body took too long", Vec::new())),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(error(StatusCode::PAYLOAD_TOO_LARGE, format!("request body exceeds {MAX_BODY} bytes"), Vec::new()))
        }
        Ok(Err(e)) => Err(error(StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}"), Vec::new())),
    }
}

async fn handle(registry: &DeviceRegistry, req: Request<Incoming>) -> HttpResponse {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    match (&method, path.as_str()) {
        (&Method::POST, "/v1/plugins") => {
            let declared = req
                .headers()
                .get(hyper::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            if declared.is_some_and(|n| n > MAX_BODY as u64) {
                return error(StatusCode::PAYLOAD_TOO_LARGE, format!("request body exceeds {MAX_BODY} bytes"), vec![]);
            }
            let body = match read_body(req.into_body()).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            if body.is_empty() {
                return error(StatusCode::BAD_REQUEST, "the request needs a JSON body", Vec::new());
            }
            let reg: Registration = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => {
                    return error(StatusCode::BAD_REQUEST, format!("body is not a valid registration: {e}"), Vec::new())
                }
            };
            match registry.register(reg) {
                Ok(r) => json(StatusCode::OK, &r),
                Err(e) => plugin_error(e),
            }
        }
        (&Method::GET, "/v1/plugins") => json(StatusCode::OK, &registry.plugins()),
        (&Method::GET, "/v1/devices") => json(StatusCode::OK, &registry.devices()),
        (&Method::GET, "/v1/allocations") => json(StatusCode::OK, &registry.all_grants()),
        (&Method::DELETE, p) if p.starts_with("/v1/plugins/") => {
            let name = &p["/v1/plugins/".len()..];
            match registry.unregister(name) {
                Ok(()) => json(StatusCode::OK, &serde_json::json!({ "name": name, "removed": true })),
                Err(e) => plugin_error(e),
            }
        }
        (_, "/v1/plugins" | "/v1/devices" | "/v1/allocations") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this path", Vec::new())
        }
        (_, p) if p.starts_with("/v1/plugins/") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this path", Vec::new())
        }
        _ => error(StatusCode::NOT_FOUND, "no such API path", Vec::new()),
    }
}

// ---------------------------------------------------------------- the client

/// Why a request of a plugin failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached (no agent, wrong path, permissions).
    #[error("connect to {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("device-plugin request: {0}")]
    Http(String),
    /// The agent refused the request.
    #[error("the agent refused ({code}): {message}{}", if details.is_empty() { String::new() } else { format!(" ({})", details.join("; ")) })]
    Refused {
        /// HTTP status.
        code: u16,
        /// The agent's message.
        message: String,
        /// Its details.
        details: Vec<String>,
    },
}

/// The client side of the interface, for plugins written in Rust.
#[derive(Debug, Clone)]
pub struct PluginClient {
    socket: PathBuf,
}

impl PluginClient {
    /// A client of the agent listening at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        PluginClient { socket: socket.into() }
    }

    /// `POST /v1/plugins`.
    pub async fn register(&self, reg: &Registration) -> Result<Registered, ClientError> {
        let body = serde_json::to_vec(reg).map_err(|e| ClientError::Http(e.to_string()))?;
        self.call(Method::POST, "/v1/plugins", Some(body)).await
    }

    /// `DELETE /v1/plugins/{name}`.
    pub async fn unregister(&self, name: &str) -> Result<(), ClientError> {
        self.call::<serde_json::Value>(Method::DELETE, &format!("/v1/plugins/{name}"), None).await.map(|_| ())
    }

    /// `GET /v1/devices`.
    pub async fn devices(&self) -> Result<Vec<HardwareDevice>, ClientError> {
        self.call(Method::GET, "/v1/devices", None).await
    }

    /// `GET /v1/allocations`: instance → resource → grant.
    pub async fn allocations(&self) -> Result<BTreeMap<String, Grants>, ClientError> {
        self.call(Method::GET, "/v1/allocations", None).await
    }

    /// One request; the answer's JSON as `T`, or the agent's error.
    pub async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let (code, bytes) = self.raw(method, path, body.map(Bytes::from).unwrap_or_default()).await?;
        if !(200..300).contains(&code) {
            let e: ApiErrorBody = serde_json::from_slice(&bytes).unwrap_or_else(|_| ApiErrorBody {
                code,
                message: String::from_utf8_lossy(&bytes).into_owned(),
                details: Vec::new(),
            });
            return Err(ClientError::Refused { code, message: e.message, details: e.details });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Http(format!("answer is not the expected JSON: {e}")))
    }

    /// One request with any body; the status and the body of the answer.
    pub async fn raw(&self, method: Method, path: &str, body: Bytes) -> Result<(u16, Bytes), ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect { path: self.socket.clone(), source })?;
        let http = |e: hyper::Error| ClientError::Http(e.to_string());
        let exchange = async {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http)?;
            tokio::spawn(conn);
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, "localhost")
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(body))
                .map_err(|e| ClientError::Http(e.to_string()))?;
            let resp = sender.send_request(req).await.map_err(http)?;
            let code = resp.status().as_u16();
            let bytes = resp.into_body().collect().await.map_err(http)?.to_bytes();
            Ok((code, bytes))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| ClientError::Http("the agent did not answer in time".into()))?
    }
}

/// The registration decoder as a fuzz target checks it: any bytes may
/// arrive on the socket.
pub mod fuzzing {
    use super::*;

    /// Decodes `data` as a registration and registers it in an empty
    /// table. Never panics; panics (the fuzzer's finding) if an accepted
    /// registration breaks the table's promises: every problem refused,
    /// devices kept, sorted, and reported unhealthy-or-not as posted.
    pub fn check_registration(data: &[u8]) {
        let Ok(reg) = serde_json::from_slice::<Registration>(data) else { return };
        let valid = reg.problems().is_empty();
        let mut t = DeviceTable::new(EXPIRE_AFTER);
        match t.register(reg.clone(), 0) {
            Ok(out) => {
                assert!(valid, "a registration with problems was accepted: {reg:?}");
                assert_eq!(out.registered.devices, reg.devices.len());
                let devices = t.devices(0);
                assert!(devices.windows(2).all(|w| id_order(&w[0].id, &w[1].id) != Ordering::Greater));
                let healthy = reg.devices.iter().filter(|d| d.healthy).count();
                assert_eq!(devices.iter().filter(|d| d.healthy).count(), healthy);
                let wants = BTreeMap::from([(reg.resource.clone(), healthy as u64)]);
                let granted = t.allocate("fuzz", &wants, 0).map(|(g, _)| g);
                if healthy > 0 {
                    let g = granted.expect("every healthy device can be granted");
                    assert_eq!(g[&reg.resource].ids.len(), healthy);
                }
            }
            Err(PluginError::Invalid(p)) => assert!(!valid && !p.is_empty()),
            Err(e) => panic!("an empty table refused {reg:?}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(name: &str, resource: &str, devices: &[(&str, bool)]) -> Registration {
        Registration {
            name: name.into(),
            resource: resource.into(),
            env: "NVIDIA_VISIBLE_DEVICES".into(),
            devices: devices
                .iter()
                .map(|(id, healthy)| PluginDevice {
                    id: id.to_string(),
                    model: "NVIDIA A2".into(),
                    memory_bytes: 16 << 30,
                    healthy: *healthy,
                })
                .collect(),
        }
    }

    fn wants(n: u64) -> BTreeMap<String, u64> {
        [("yunbian.io/gpu".to_string(), n)].into()
    }

    const GPU: &str = "yunbian.io/gpu";

    #[test]
    fn lowest_healthy_free_ids_first_and_grants_are_sticky() {
        let mut t = DeviceTable::new(Duration::from_secs(30));
        let out = t.register(reg("nvidia", GPU, &[("10", true), ("2", true), ("0", false), ("1", true)]), 0);
        let out = out.expect("valid");
        assert_eq!((out.registered.devices, out.registered.healthy, out.changed), (4, 3, true));
        let (g, new) = t.allocate("a", &wants(2), 0).expect("room");
        assert!(new);
        assert_eq!(g[GPU].ids, ["1", "2"], "0 is unhealthy; 2 sorts before 10");
        assert_eq!(
            grant_env(&g),
            [
                ("YUNBIAN_DEVICES_YUNBIAN_IO_GPU".to_string(), "1,2".to_string()),
                ("NVIDIA_VISIBLE_DEVICES".to_string(), "1,2".to_string())
            ]
        );
        // Asked again: the same grant, not new.
        assert_eq!(t.allocate("a", &wants(2), 5), Ok((g.clone(), false)));
        // Another instance: what is left, then nothing.
        assert_eq!(t.allocate("b", &wants(1), 0).expect("room").0[GPU].ids, ["10"]);
        let short = t.allocate("c", &wants(1), 0).expect_err("full");
        assert_eq!(
            short,
            vec![Shortfall { resource: GPU.into(), wanted: 1, free: 0, registered: 4, unhealthy: 1, allocated: 3 }]
        );
        assert_eq!(
            short[0].to_string(),
            "needs 1 yunbian.io/gpu, 0 free (4 registered: 1 unhealthy, 3 allocated to other instances)"
        );
        let holders: Vec<_> = t.devices(0).into_iter().map(|d| (d.id, d.allocated_to)).collect();
        assert_eq!(
            holders,
            [("0".into(), "".into()), ("1".into(), "a".into()), ("2".into(), "a".into()), ("10".into(), "b".into())]
        );
        // Freed: the next instance gets the lowest.
        assert!(t.release("a"));
        assert_eq!(t.allocate("c", &wants(1), 0).expect("room").0[GPU].ids, ["1"]);
        assert_eq!(t.release_unless(|i| i == "c"), ["b"]);
    }

    #[test]
    fn silent_plugins_expire_and_their_grants_survive() {
        let mut t = DeviceTable::new(Duration::from_secs(30));
        t.register(reg("nvidia", GPU, &[("0", true), ("1", true)]), 1_000).expect("valid");
        t.allocate("a", &wants(1), 1_000).expect("room");
        assert!(t.newly_expired(31_000).is_empty(), "30 s of silence is allowed");
        assert!(t.devices(31_000).iter().all(|d| d.healthy));
        assert_eq!(t.newly_expired(31_001), ["nvidia"]);
        assert!(t.newly_expired(40_000).is_empty(), "named once");
        assert!(t.devices(31_001).iter().all(|d| !d.healthy));
        // Nothing new can be granted, but the existing grant stands.
        let short = t.allocate("b", &wants(1), 31_001).expect_err("expired");
        assert_eq!((short[0].unhealthy, short[0].allocated), (2, 0));
        assert_eq!(t.allocate("a", &wants(1), 31_001).expect("sticky").0[GPU].ids, ["0"]);
        // A re-post revives the plugin (content unchanged).
        let out = t.register(reg("nvidia", GPU, &[("1", true), ("0", true)]), 50_000).expect("valid");
        assert!(!out.changed && out.revived);
        assert_eq!(t.allocate("b", &wants(1), 50_000).expect("room").0[GPU].ids, ["1"]);
        // A health change is a change.
        assert!(t.register(reg("nvidia", GPU, &[("0", true), ("1", false)]), 51_000).expect("valid").changed);
    }

    #[test]
    fn one_live_plugin_per_resource() {
        let mut t = DeviceTable::new(Duration::from_secs(30));
        t.register(reg("nvidia", GPU, &[("0", true)]), 0).expect("valid");
        let e = t.register(reg("other", GPU, &[("9", true)]), 10_000).expect_err("taken");
        assert_eq!(e, PluginError::ResourceTaken { resource: GPU.into(), owner: "nvidia".into() });
        // Once the owner expired, another plugin takes the resource over.
        t.register(reg("other", GPU, &[("9", true)]), 40_000).expect("owner expired");
        assert_eq!(t.plugins(40_000).iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["other"]);
        assert_eq!(t.unregister("nvidia"), Err(PluginError::UnknownPlugin("nvidia".into())));
        t.unregister("other").expect("registered");
        assert!(t.devices(40_000).is_empty());
    }

    #[test]
    fn registrations_are_validated_with_every_problem_named() {
        let mut bad = reg("Bad_Name", "gpu", &[("0", true), ("0", true), ("a b", true), ("", true)]);
        bad.env = "YUNBIAN_X".into();
        let Err(PluginError::Invalid(p)) = DeviceTable::new(EXPIRE_AFTER).register(bad, 0) else { panic!("accepted") };
        assert_eq!(p.len(), 6, "{p:?}");
        assert!(p[0].starts_with("name:") && p[1].contains("domain/name") && p[2].contains("YUNBIAN_"), "{p:?}");
        assert!(p[3].contains("listed twice") && p[4].contains("spaces") && p[5].contains("1 to 128"), "{p:?}");
        let mut many = reg("nvidia", GPU, &[]);
        many.devices = (0..=MAX_DEVICES)
            .map(|i| PluginDevice { id: i.to_string(), model: String::new(), memory_bytes: 0, healthy: true })
            .collect();
        assert!(many.problems()[0].contains("at most 1024"));
        assert!(check_resource("example.com/npu-v2").is_ok() && check_resource("/gpu").is_err());
    }

    #[test]
    fn env_names_and_id_order() {
        assert_eq!(devices_env_name("yunbian.io/gpu"), "YUNBIAN_DEVICES_YUNBIAN_IO_GPU");
        assert_eq!(devices_env_name("example.com/npu-v2"), "YUNBIAN_DEVICES_EXAMPLE_COM_NPU_V2");
        let mut ids = vec!["GPU-b", "10", "GPU-a", "9", "0"];
        ids.sort_by(|a, b| id_order(a, b));
        assert_eq!(ids, ["0", "9", "10", "GPU-a", "GPU-b"]);
    }

    #[test]
    fn a_grant_for_other_counts_is_replaced() {
        let mut t = DeviceTable::new(EXPIRE_AFTER);
        t.register(reg("nvidia", GPU, &[("0", true), ("1", true), ("2", true)]), 0).expect("valid");
        t.allocate("a", &wants(1), 0).expect("room");
        let (g, new) = t.allocate("a", &wants(2), 0).expect("room");
        assert!(new);
        assert_eq!(g[GPU].ids, ["0", "1"], "its own device counts as free for it");
        assert_eq!(t.allocate("a", &BTreeMap::new(), 0).expect("nothing wanted").0, Grants::new());
    }
}
