//! External mappers: device protocols served by a separate process, written
//! in any language, that talks to the agent over HTTP/JSON on a unix socket
//! (the agent's `<data_dir>/mapper.sock`, mode 0660). The full protocol,
//! with examples, is in `docs/mappers.md`; in short:
//!
//! ```text
//!  mapper                                   agent (serve_unix)
//!    │ POST /v1/mappers {name, protocols?}     │ registers `name` (again: replaces)
//!    │◀──────── {mapper, heartbeatSeconds} ────│
//!    │ GET /v1/mappers/{name}/devices          │ long-poll: answers at once when
//!    │     ?since=<version>&wait=<dur>         │ the version moved past `since`,
//!    │◀── {version, devices:[{name, model,     │ else after `wait` (≤ heartbeat);
//!    │      spec, collectCycleMs, desired}]} ──│ every call is a heartbeat
//!    │ POST /v1/devices/{device}/readings      │ readings, state, acknowledgements
//!    │   {readings, state?, error?,            │ (all-or-nothing: a batch with any
//!    │    observedDesired?}                    │ problem is refused whole, 400)
//! ```
//!
//! A mapper serves the devices whose `protocol.external.mapper` is its name.
//! Inside the agent, each such device runs through the usual
//! [`MapperHost`](crate::host::MapperHost) supervision with an
//! [`ExternalDriver`], whose state lives in the shared [`ExternalRegistry`]:
//! - `connect` fails while no mapper of that name is registered or its last
//!   call is older than [`MISSED_HEARTBEATS`] heartbeat intervals, so the
//!   device goes offline after the usual failures;
//! - `read` fails the same way, and while the mapper has reported nothing for
//!   the device since it registered, or reports the device `offline`;
//!   otherwise it returns the latest pushed reading of each property with the
//!   mapper's timestamp (a reading that did not advance is not new: the
//!   twin's rule);
//! - `write` records the desired value under a new registry version, which
//!   wakes the mapper's long-poll, and returns at once. The host verifies it
//!   when a pushed reading shows the value (checking again for a few
//!   collections, then writing again under a newer version), or at once when
//!   the mapper acknowledges the version in `observedDesired`.
//!
//! Versions: one counter per registry, starting at the agent's start time in
//! Unix milliseconds and growing by one on every change a mapper may care
//! about (a device attached, detached or reconfigured, a desired value
//! written). So a mapper that kept its `since` across an agent restart sees
//! a different version and gets the new list at once.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use yunbian_api::{DeviceModelSpec, DeviceSpec, Protocol, Quality};

use crate::driver::{unix_ms, DeviceConfig, Driver, DriverError, PropertyRead, Reading, WriteError};
use crate::host::MapperHost;
use crate::local_api::{accept_loop, finish_router, parse_json, wait_param, HttpError, HttpResult, ServeError};

/// Heartbeat interval handed to mappers unless the agent chooses another.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// Intervals without a call after which a mapper counts as gone.
pub const MISSED_HEARTBEATS: u32 = 3;
/// Longest mapper name.
pub const MAX_NAME_LEN: usize = 63;

// ---------------------------------------------------------------- wire types

/// `POST /v1/mappers`: a mapper announces itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MapperRegistration {
    /// The name devices refer to in `protocol.external.mapper`.
    pub name: String,
    /// Protocols it speaks (informational: shown in `GET /v1/mappers`).
    #[serde(default)]
    pub protocols: Vec<String>,
}

/// The answer to a registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registered {
    /// The registered name.
    pub mapper: String,
    /// Call at least this often (a devices long-poll or a readings push);
    /// after [`MISSED_HEARTBEATS`] intervals without a call the mapper's
    /// devices go offline.
    pub heartbeat_seconds: u64,
}

/// A desired value for the mapper to apply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredWrite {
    /// The value (checked against the model).
    pub value: serde_json::Value,
    /// Registry version of this write; apply when it is newer than the one
    /// applied, and acknowledge it in `observedDesired`.
    pub version: u64,
}

/// One device as its mapper sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MapperDevice {
    /// Device name (the `{device}` of the readings endpoint).
    pub name: String,
    /// Its model: the properties, their types and access modes.
    pub model: DeviceModelSpec,
    /// Its spec without `desired`: `protocol.external.config`,
    /// `properties[].external`, `collectCycle`, ….
    pub spec: DeviceSpec,
    /// `spec.collectCycle` in milliseconds: how often to read the device.
    pub collect_cycle_ms: u64,
    /// Desired values by property.
    pub desired: BTreeMap<String, DesiredWrite>,
}

/// `GET /v1/mappers/{name}/devices`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MapperDevices {
    /// Pass as `since` in the next call.
    pub version: u64,
    /// Every device this mapper serves.
    pub devices: Vec<MapperDevice>,
}

/// Device state as a mapper reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PushedState {
    /// The mapper reaches the device.
    Online,
    /// The mapper cannot reach the device (`error` says why).
    Offline,
}

/// One reading in a push.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PushedReading {
    /// Property name.
    pub property: String,
    /// The value, of the model's type (ignored when `error` is set).
    #[serde(default)]
    pub value: serde_json::Value,
    /// When the device produced it, Unix milliseconds (default: arrival).
    #[serde(default)]
    pub ts: Option<u64>,
    /// Quality (default good).
    #[serde(default)]
    pub quality: Option<Quality>,
    /// Why this property could not be read (the device stays online).
    #[serde(default)]
    pub error: String,
}

/// `POST /v1/devices/{device}/readings`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReadingsPush {
    /// New readings.
    #[serde(default)]
    pub readings: Vec<PushedReading>,
    /// Device state, when it is known (kept until the next push that has one).
    #[serde(default)]
    pub state: Option<PushedState>,
    /// Why the device is offline.
    #[serde(default)]
    pub error: String,
    /// Versions of desired values the mapper has applied, by property.
    #[serde(default)]
    pub observed_desired: BTreeMap<String, u64>,
}

/// The answer to an accepted push.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PushAccepted {
    /// Readings taken.
    pub accepted: usize,
    /// Properties whose current desired value the acknowledgement marked
    /// observed.
    pub acknowledged: Vec<String>,
}

/// A registered mapper as `GET /v1/mappers` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MapperInfo {
    /// Name.
    pub name: String,
    /// Protocols it announced.
    pub protocols: Vec<String>,
    /// Milliseconds since its last call.
    pub last_seen_ms: u64,
    /// Whether it is within its heartbeats.
    pub alive: bool,
    /// Devices it serves.
    pub devices: Vec<String>,
}

/// Why the registry refused a mapper's call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegistryError {
    /// The mapper name is empty, too long, or not `[A-Za-z0-9._-]`.
    #[error("invalid mapper name {0:?}: use 1–63 of A-Z a-z 0-9 . _ -")]
    BadName(String),
    /// No mapper of that name is registered (register first; after an
    /// agent restart, again).
    #[error("mapper {0:?} is not registered: POST /v1/mappers first")]
    UnknownMapper(String),
    /// No device of that name is served by an external mapper on this node.
    #[error("device {0:?} is not served by an external mapper on this node")]
    UnknownDevice(String),
    /// The push has problems (listed); nothing of it was applied.
    #[error("{} problem(s) in the push; nothing was applied", .0.len())]
    Rejected(Vec<String>),
}

// ---------------------------------------------------------------- registry

#[derive(Debug, Clone)]
struct MapperEntry {
    protocols: Vec<String>,
    last_seen: Instant,
}

struct ExternalDevice {
    /// Which driver owns the entry (a reconfigured device's old driver may
    /// be dropped after the new one attached).
    id: u64,
    mapper: String,
    cfg: DeviceConfig,
    desired: BTreeMap<String, DesiredWrite>,
    readings: BTreeMap<String, Result<Reading, String>>,
    /// The mapper pushed something for this device since it registered.
    heard: bool,
    /// The mapper says the device is offline, with why.
    offline: Option<String>,
}

struct Book {
    version: u64,
    next_id: u64,
    mappers: BTreeMap<String, MapperEntry>,
    devices: BTreeMap<String, ExternalDevice>,
}

struct Shared {
    heartbeat: Duration,
    book: Mutex<Book>,
    changes: watch::Sender<u64>,
}

/// External mappers and the state of the devices they serve, shared by the
/// [`ExternalDriver`]s and the unix-socket server.
#[derive(Clone)]
pub struct ExternalRegistry {
    inner: Arc<Shared>,
}

impl Default for ExternalRegistry {
    fn default() -> Self {
        Self::new(DEFAULT_HEARTBEAT)
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl ExternalRegistry {
    /// A registry asking mappers to call at least every `heartbeat`.
    pub fn new(heartbeat: Duration) -> Self {
        let heartbeat = heartbeat.max(Duration::from_secs(1));
        let version = unix_ms().max(1);
        let (changes, _) = watch::channel(version);
        ExternalRegistry {
            inner: Arc::new(Shared {
                heartbeat,
                book: Mutex::new(Book { version, next_id: 1, mappers: BTreeMap::new(), devices: BTreeMap::new() }),
                changes,
            }),
        }
    }

    /// The heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        self.inner.heartbeat
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        // Nothing here panics while holding the lock; recover rather than poison.
        self.inner.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self, book: &mut Book) {
        book.version += 1;
        self.inner.changes.send_replace(book.version);
    }

    fn expiry(&self) -> Duration {
        self.inner.heartbeat * MISSED_HEARTBEATS
    }

    /// Registers (or re-registers) a mapper. Its devices count as not heard
    /// from until it pushes for them.
    pub fn register(&self, reg: MapperRegistration) -> Result<Registered, RegistryError> {
        if !valid_name(&reg.name) {
            return Err(RegistryError::BadName(reg.name));
        }
        let mut book = self.book();
        book.mappers.insert(reg.name.clone(), MapperEntry { protocols: reg.protocols, last_seen: Instant::now() });
        for d in book.devices.values_mut().filter(|d| d.mapper == reg.name) {
            d.heard = false;
        }
        self.bump(&mut book);
        tracing::info!(mapper = %reg.name, "external mapper registered");
        Ok(Registered { mapper: reg.name, heartbeat_seconds: self.inner.heartbeat.as_secs().max(1) })
    }

    /// Registered mappers.
    pub fn mappers(&self) -> Vec<MapperInfo> {
        let book = self.book();
        let now = Instant::now();
        book.mappers
            .iter()
            .map(|(name, m)| {
                let since = now.saturating_duration_since(m.last_seen);
                MapperInfo {
                    name: name.clone(),
                    protocols: m.protocols.clone(),
                    last_seen_ms: since.as_millis() as u64,
                    alive: since <= self.expiry(),
                    devices: book.devices.iter().filter(|(_, d)| d.mapper == *name).map(|(n, _)| n.clone()).collect(),
                }
            })
            .collect()
    }

    /// The devices `mapper` serves; counts as its heartbeat.
    pub fn devices(&self, mapper: &str) -> Result<MapperDevices, RegistryError> {
        let mut book = self.book();
        let m = book.mappers.get_mut(mapper).ok_or_else(|| RegistryError::UnknownMapper(mapper.to_string()))?;
        m.last_seen = Instant::now();
        let devices = book
            .devices
            .iter()
            .filter(|(_, d)| d.mapper == mapper)
            .map(|(name, d)| {
                let mut spec = d.cfg.device.spec.clone();
                spec.desired.clear();
                MapperDevice {
                    name: name.clone(),
                    model: d.cfg.model.spec.clone(),
                    collect_cycle_ms: spec.collect_cycle_ms(),
                    spec,
                    desired: d.desired.clone(),
                }
            })
            .collect();
        Ok(MapperDevices { version: book.version, devices })
    }

    /// As [`ExternalRegistry::devices`], but when the version is still
    /// `since`, waits up to `wait` (at most the heartbeat interval) for it
    /// to move.
    pub async fn wait_devices(
        &self,
        mapper: &str,
        since: Option<u64>,
        wait: Duration,
    ) -> Result<MapperDevices, RegistryError> {
        let mut rx = self.inner.changes.subscribe();
        let now = self.devices(mapper)?;
        let Some(since) = since else { return Ok(now) };
        if now.version != since || wait.is_zero() {
            return Ok(now);
        }
        let wait = wait.min(self.inner.heartbeat);
        let _ = tokio::time::timeout(wait, rx.wait_for(|v| *v != since)).await;
        self.devices(mapper)
    }

    /// Takes in a push for `device`. Everything is checked first: a push
    /// with any problem is refused whole. Returns the properties whose
    /// latest desired write the push acknowledges, with its value.
    pub fn push(&self, device: &str, push: ReadingsPush) -> Result<Vec<(String, serde_json::Value)>, RegistryError> {
        let mut book = self.book();
        let d = book.devices.get(device).ok_or_else(|| RegistryError::UnknownDevice(device.to_string()))?;
        let spec = &d.cfg.device.spec;
        let model = &d.cfg.model.spec;
        let mut problems = Vec::new();
        for (i, r) in push.readings.iter().enumerate() {
            let Some(pm) = model.property(&r.property).filter(|_| spec.visitor(&r.property).is_some()) else {
                problems.push(format!("readings[{i}].property: device {device:?} has no property {:?}", r.property));
                continue;
            };
            if r.error.is_empty() && !pm.ty.accepts(&r.value) {
                let what = if r.value.is_null() {
                    "missing (give a value or an error)".to_string()
                } else {
                    r.value.to_string()
                };
                problems.push(format!(
                    "readings[{i}].value: {what} is not a value of type {} (property {:?})",
                    pm.ty.as_str(),
                    r.property
                ));
            }
        }
        for p in push.observed_desired.keys() {
            if spec.visitor(p).is_none() {
                problems.push(format!("observedDesired[{p}]: device {device:?} has no property {p:?}"));
            }
        }
        if !problems.is_empty() {
            return Err(RegistryError::Rejected(problems));
        }
        let mapper = d.mapper.clone();
        let now = unix_ms();
        let Some(d) = book.devices.get_mut(device) else {
            return Err(RegistryError::UnknownDevice(device.to_string()));
        };
        for r in push.readings {
            let result = if r.error.is_empty() {
                Ok(Reading { value: r.value, ts_ms: r.ts.unwrap_or(now), quality: r.quality.unwrap_or_default() })
            } else {
                Err(r.error)
            };
            d.readings.insert(r.property, result);
        }
        match push.state {
            Some(PushedState::Offline) => d.offline = Some(push.error),
            Some(PushedState::Online) => d.offline = None,
            None => {}
        }
        d.heard = true;
        let acked = push
            .observed_desired
            .iter()
            .filter_map(|(p, v)| d.desired.get(p).filter(|w| *v >= w.version).map(|w| (p.clone(), w.value.clone())))
            .collect();
        if let Some(m) = book.mappers.get_mut(&mapper) {
            m.last_seen = Instant::now();
        }
        Ok(acked)
    }

    fn liveness(&self, book: &Book, mapper: &str) -> Result<(), String> {
        let m = book.mappers.get(mapper).ok_or_else(|| format!("no external mapper {mapper:?} is registered"))?;
        let since = Instant::now().saturating_duration_since(m.last_seen);
        if since > self.expiry() {
            return Err(format!(
                "external mapper {mapper:?} missed its heartbeats (last call {} s ago)",
                since.as_secs()
            ));
        }
        Ok(())
    }

    fn attach(&self, cfg: &DeviceConfig, mapper: &str) -> u64 {
        let mut book = self.book();
        let id = book.next_id;
        book.next_id += 1;
        book.devices.insert(
            cfg.name().to_string(),
            ExternalDevice {
                id,
                mapper: mapper.to_string(),
                cfg: cfg.clone(),
                desired: BTreeMap::new(),
                readings: BTreeMap::new(),
                heard: false,
                offline: None,
            },
        );
        self.bump(&mut book);
        id
    }

    fn detach(&self, device: &str, id: u64) {
        let mut book = self.book();
        if book.devices.get(device).is_some_and(|d| d.id == id) {
            book.devices.remove(device);
            self.bump(&mut book);
        }
    }

    fn owned<'a>(book: &'a mut Book, device: &str, id: u64) -> Result<&'a mut ExternalDevice, DriverError> {
        book.devices
            .get_mut(device)
            .filter(|d| d.id == id)
            .ok_or_else(|| DriverError::Config(format!("device {device:?} is no longer attached")))
    }

    fn check(&self, device: &str, id: u64) -> Result<(), DriverError> {
        let mut book = self.book();
        let mapper = Self::owned(&mut book, device, id)?.mapper.clone();
        self.liveness(&book, &mapper).map_err(DriverError::Connect)
    }

    fn read(&self, device: &str, id: u64, only: &[String]) -> Result<Vec<PropertyRead>, DriverError> {
        let mut book = self.book();
        let mapper = Self::owned(&mut book, device, id)?.mapper.clone();
        self.liveness(&book, &mapper).map_err(DriverError::Io)?;
        let d = Self::owned(&mut book, device, id)?;
        if !d.heard {
            return Err(DriverError::Io(format!(
                "external mapper {mapper:?} has reported nothing for this device yet"
            )));
        }
        if let Some(e) = &d.offline {
            let why = if e.is_empty() { String::new() } else { format!(": {e}") };
            return Err(DriverError::Io(format!("external mapper {mapper:?} reports the device offline{why}")));
        }
        let names: Vec<String> = if only.is_empty() {
            d.cfg.device.spec.properties.iter().map(|p| p.name.clone()).collect()
        } else {
            only.to_vec()
        };
        Ok(names
            .into_iter()
            .map(|n| {
                let result = match d.readings.get(&n) {
                    Some(Ok(r)) => Ok(Some(r.clone())),
                    Some(Err(e)) => Err(e.clone()),
                    None => Ok(None),
                };
                PropertyRead { property: n, result }
            })
            .collect())
    }

    fn desire(&self, device: &str, id: u64, property: &str, value: &serde_json::Value) -> Result<u64, DriverError> {
        let mut book = self.book();
        let mapper = Self::owned(&mut book, device, id)?.mapper.clone();
        self.liveness(&book, &mapper).map_err(DriverError::Io)?;
        let version = book.version + 1;
        Self::owned(&mut book, device, id)?
            .desired
            .insert(property.to_string(), DesiredWrite { value: value.clone(), version });
        self.bump(&mut book);
        Ok(version)
    }
}

// ---------------------------------------------------------------- driver

/// The driver of `protocol: external`: the device's side of the registry.
pub struct ExternalDriver {
    registry: ExternalRegistry,
    device: String,
    id: u64,
}

impl ExternalDriver {
    /// Attaches the device to the registry (visible to its mapper at once).
    pub fn new(cfg: &DeviceConfig, registry: ExternalRegistry) -> Result<Self, DriverError> {
        let Protocol::External(e) = &cfg.device.spec.protocol else {
            return Err(DriverError::Config(format!("protocol {} is not external", cfg.device.spec.protocol.name())));
        };
        let id = registry.attach(cfg, &e.mapper);
        Ok(ExternalDriver { registry, device: cfg.name().to_string(), id })
    }
}

impl Drop for ExternalDriver {
    fn drop(&mut self) {
        self.registry.detach(&self.device, self.id);
    }
}

#[async_trait::async_trait]
impl Driver for ExternalDriver {
    async fn connect(&mut self) -> Result<(), DriverError> {
        self.registry.check(&self.device, self.id)
    }

    async fn read(&mut self, only: &[String]) -> Result<Vec<PropertyRead>, DriverError> {
        self.registry.read(&self.device, self.id, only)
    }

    async fn write(&mut self, property: &str, value: &serde_json::Value) -> Result<(), WriteError> {
        let version = self.registry.desire(&self.device, self.id, property, value)?;
        tracing::debug!(device = %self.device, property, version, "desired value handed to the external mapper");
        Ok(())
    }

    async fn disconnect(&mut self) {}
}

// ---------------------------------------------------------------- server

#[derive(Clone)]
struct Ctx {
    host: MapperHost,
    registry: ExternalRegistry,
}

impl From<RegistryError> for HttpError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::BadName(_) => HttpError::bad_request(e.to_string()),
            RegistryError::UnknownMapper(_) | RegistryError::UnknownDevice(_) => HttpError::not_found(e.to_string()),
            RegistryError::Rejected(details) => {
                let message = format!("{} problem(s) in the push; nothing was applied", details.len());
                HttpError { code: StatusCode::BAD_REQUEST, message, details }
            }
        }
    }
}

/// The router of the mapper interface.
pub fn router(host: MapperHost, registry: ExternalRegistry) -> Router {
    let r = Router::new()
        .route("/v1/mappers", post(register).get(list_mappers))
        .route("/v1/mappers/{name}/devices", get(mapper_devices))
        .route("/v1/devices/{device}/readings", post(push_readings))
        .with_state(Ctx { host, registry });
    finish_router(r)
}

/// Binds the mapper socket at `path` (removing a stale socket left there)
/// and makes it mode 0660: the agent's user and group may connect.
/// Must be called inside a tokio runtime.
pub fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, ServeError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let bind_err = |source| ServeError::Bind { addr: path.display().to_string(), source };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path).map_err(bind_err)?;
        }
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|source| ServeError::Permissions { path: path.to_path_buf(), source })?;
    Ok(listener)
}

/// Serves the mapper interface on a unix socket at `path` (the agent uses
/// `<data_dir>/mapper.sock`) until the task is dropped.
pub async fn serve_unix(
    host: MapperHost,
    registry: ExternalRegistry,
    path: impl AsRef<Path>,
) -> Result<(), ServeError> {
    let listener = bind_unix(path.as_ref())?;
    tracing::info!(path = %path.as_ref().display(), "external mapper interface listening");
    serve_unix_listener(host, registry, listener).await;
    Ok(())
}

/// Serves the mapper interface on a bound unix listener until the task is dropped.
pub async fn serve_unix_listener(host: MapperHost, registry: ExternalRegistry, listener: tokio::net::UnixListener) {
    let app = router(host, registry);
    let listener = Arc::new(listener);
    accept_loop(
        move || {
            let l = listener.clone();
            async move { l.accept().await.map(|(s, _)| s) }
        },
        app,
        "mapper-socket",
    )
    .await
}

async fn register(State(ctx): State<Ctx>, body: Result<Bytes, BytesRejection>) -> HttpResult<Json<Registered>> {
    let reg: MapperRegistration = parse_json(&body?)?;
    Ok(Json(ctx.registry.register(reg)?))
}

async fn list_mappers(State(ctx): State<Ctx>) -> Json<Vec<MapperInfo>> {
    Json(ctx.registry.mappers())
}

async fn mapper_devices(
    State(ctx): State<Ctx>,
    UrlPath(name): UrlPath<String>,
    Query(query): Query<HashMap<String, String>>,
) -> HttpResult<Json<MapperDevices>> {
    let since = match query.get("since") {
        None => None,
        Some(s) => {
            Some(s.parse::<u64>().map_err(|_| HttpError::bad_request(format!("since={s:?} is not a version number")))?)
        }
    };
    let wait = wait_param(&query, ctx.registry.heartbeat())?.unwrap_or(Duration::ZERO);
    Ok(Json(ctx.registry.wait_devices(&name, since, wait).await?))
}

async fn push_readings(
    State(ctx): State<Ctx>,
    UrlPath(device): UrlPath<String>,
    body: Result<Bytes, BytesRejection>,
) -> HttpResult<Json<PushAccepted>> {
    let push: ReadingsPush = parse_json(&body?)?;
    let accepted = push.readings.len();
    let acked = ctx.registry.push(&device, push)?;
    let mut acknowledged = Vec::new();
    for (property, value) in acked {
        if let Some(version) = ctx.host.acknowledge_write(&device, &property, &value) {
            tracing::debug!(device = %device, property = %property, version, "external mapper acknowledged a desired value");
            acknowledged.push(property);
        }
    }
    Ok(Json(PushAccepted { accepted, acknowledged }))
}
