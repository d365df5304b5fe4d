//! `device set` and `device watch`: writing desired values of a device's
//! properties and streaming what its node reports.
//!
//! `set` is a read-modify-write of the Device object: read the device and
//! its model, check every write locally with
//! [`yunbian_api::check_desired_write`] (nothing is sent when one is
//! invalid), set `spec.desired[prop]`, and `PUT` with the resourceVersion
//! that was read. A 409 means someone changed the device in between: read
//! again, check again, write again, a few times ([`SET_ATTEMPTS`]). With
//! `--wait`, the device is watched until each written property's twin
//! carries the value and `observedDesired` has reached its version
//! ([`write_progress`]).
//!
//! `watch` lists the device once and prints its current readings, then
//! follows the kind's watch stream and prints one line per property whose
//! reading changed and one per state change ([`ReadingStream`]). It resumes
//! after a closed stream or a lost connection and lists again after a 410,
//! as `get -w` does.
//!
//! The decisions (value parsing, the checks, progress of a write, which
//! lines a new object version produces) are pure functions tested here;
//! the async functions only move objects between them and the client.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};
use yunbian_api::{check_desired_write, DeviceModelSpec, DeviceSpec, Kind, WatchEventType};

use crate::client::{Client, ClientError, ListOptions};
use crate::columns::text;
use crate::commands::{emit, revision_of, Session, REWATCH_DELAY};
use crate::describe::show_value;
use crate::time::parse_duration_ms;

/// Conditional writes tried before `device set` gives up on a device that
/// keeps changing.
pub const SET_ATTEMPTS: u32 = 5;

/// How long `--wait` waits when given without a value.
const DEFAULT_WAIT: &str = "30s";

/// `device` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum DeviceCommand {
    /// Set desired values of writable properties (checked against the model before anything is sent).
    Set(SetArgs),
    /// Stream a device's reported values and state changes as the cloud receives them (Ctrl-C to stop).
    Watch(WatchArgs),
}

/// Arguments of `device set`.
#[derive(Debug, Clone, Args)]
pub struct SetArgs {
    /// The device.
    pub name: String,
    /// PROP=VALUE pairs. VALUE is JSON when it parses as JSON (42, true, "text", [1,2]), else text.
    #[arg(required = true, value_name = "PROP=VALUE", value_parser = Assignment::parse)]
    pub values: Vec<Assignment>,
    /// Wait until the node has written and read back every value (--wait=2m for longer than 30s).
    #[arg(
        long,
        value_name = "TIMEOUT",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = DEFAULT_WAIT,
        value_parser = parse_wait
    )]
    pub wait: Option<Duration>,
}

/// Arguments of `device watch`.
#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// The device.
    pub name: String,
    /// Only these properties (repeat the flag or separate with commas).
    #[arg(short = 'p', long = "property", value_name = "PROP", value_delimiter = ',')]
    pub properties: Vec<String>,
    /// Output format: text lines, or one JSON object per line.
    #[arg(short = 'o', long, value_enum, default_value_t = StreamFormat::Text)]
    pub output: StreamFormat,
}

/// How `device watch` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StreamFormat {
    /// `<time> <device> <prop>=<value> <quality>`.
    Text,
    /// `{"device", "property", "value", "ts", "quality"}`, one per line.
    Json,
}

fn parse_wait(s: &str) -> Result<Duration, String> {
    match parse_duration_ms(s)? {
        0 => Err("--wait needs a timeout above zero".into()),
        ms => Ok(Duration::from_millis(ms)),
    }
}

/// One `PROP=VALUE` of `device set`.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// The property.
    pub property: String,
    /// The value to write.
    pub value: Value,
}

impl Assignment {
    /// Parses `prop=value`: the value as JSON when it is JSON (`42`,
    /// `true`, `"text"`, `[1,2]`, `null` is refused), else as the text
    /// itself (`eco`, `hello world`, the empty string).
    pub fn parse(s: &str) -> Result<Assignment, String> {
        let (property, raw) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected PROP=VALUE"))?;
        let property = property.trim();
        if property.is_empty() || property.chars().any(char::is_whitespace) {
            return Err(format!("{s:?}: bad property name {property:?}"));
        }
        let value = match serde_json::from_str::<Value>(raw) {
            Ok(Value::Null) => {
                return Err(format!("{s:?}: null cannot be written (to write the text, quote it: '\"null\"')"))
            }
            Ok(v) => v,
            Err(_) => Value::String(raw.to_string()),
        };
        Ok(Assignment { property: property.to_string(), value })
    }
}

impl std::fmt::Display for Assignment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.property, self.value)
    }
}

/// Runs one `device` subcommand.
pub(crate) async fn run(session: &Session, cmd: DeviceCommand) -> Result<()> {
    match cmd {
        DeviceCommand::Set(a) => set(session, a).await,
        DeviceCommand::Watch(a) => watch(session, a).await,
    }
}

// ---------------------------------------------------------------- set

/// Checks every assignment against the device and its model and, when all
/// are valid, sets them in the device's `spec.desired`. `device` and
/// `model` are the objects as the server sent them; on error, `device` is
/// unchanged and the message names every invalid property.
pub fn apply_desired(device: &mut Value, model: &Value, values: &[Assignment]) -> Result<()> {
    let name = text(device, "/metadata/name");
    let mut seen = BTreeSet::new();
    for a in values {
        if !seen.insert(a.property.as_str()) {
            bail!("property {:?} is given more than once", a.property);
        }
    }
    let spec: DeviceSpec = serde_json::from_value(device.get("spec").cloned().unwrap_or(Value::Null))
        .with_context(|| format!("read the spec of device {name}"))?;
    let model_spec: DeviceModelSpec = serde_json::from_value(model.get("spec").cloned().unwrap_or(json!({})))
        .with_context(|| format!("read the spec of device model {}", spec.model))?;
    let errors: Vec<String> =
        values.iter().filter_map(|a| check_desired_write(&spec, &model_spec, &a.property, &a.value).err()).collect();
    if !errors.is_empty() {
        bail!("device {name}: {} (nothing was written)", errors.join("; "));
    }
    let spec =
        device.get_mut("spec").and_then(Value::as_object_mut).ok_or_else(|| anyhow!("device {name} has no spec"))?;
    let desired = spec.entry("desired").or_insert_with(|| json!({}));
    if !desired.is_object() {
        *desired = json!({});
    }
    for a in values {
        desired[&a.property] = a.value.clone();
    }
    Ok(())
}

/// What [`set_desired`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    /// The device as stored after the write.
    pub device: Value,
    /// Conditional writes it took (1 when nobody else wrote meanwhile).
    pub attempts: u32,
}

/// Sets desired values of device `name`: read the device and its model,
/// [`apply_desired`], and write back on condition that the device did not
/// change since it was read; on a conflict, start over, at most
/// [`SET_ATTEMPTS`] times.
pub async fn set_desired(client: &Client, name: &str, values: &[Assignment]) -> Result<Written> {
    for attempt in 1..=SET_ATTEMPTS {
        let mut device = client.get_object(Kind::Device, name).await?;
        let model_name = text(&device, "/spec/model");
        let model = client.get_object(Kind::DeviceModel, &model_name).await.map_err(|e| {
            if e.is_not_found() {
                anyhow!("device {name}: its model {model_name:?} does not exist, so nothing can be checked or written")
            } else {
                e.into()
            }
        })?;
        apply_desired(&mut device, &model, values)?;
        let revision = device.pointer("/metadata/resourceVersion").and_then(revision_of).unwrap_or(0);
        if revision == 0 {
            bail!("device {name}: the server sent no metadata.resourceVersion, so it cannot be written safely");
        }
        device["metadata"]["resourceVersion"] = Value::from(revision);
        if let Some(o) = device.as_object_mut() {
            o.remove("status");
        }
        match client.put_object(Kind::Device, name, &device).await {
            Ok(stored) => return Ok(Written { device: stored, attempts: attempt }),
            Err(e) if e.status() == Some(409) => {
                tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
            }
            Err(e @ ClientError::Api { .. }) => bail!("device {name}: {e}"),
            Err(e) => return Err(e.into()),
        }
    }
    bail!("device {name} kept changing while it was being written: gave up after {SET_ATTEMPTS} conflicting writes")
}

/// How far the node is with one written value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Written and verified by read-back (`observedDesired` ≥ the version).
    Applied {
        /// The desired version the node applied.
        version: u64,
    },
    /// The node reports an error for the property, or another writer's
    /// value replaced this one.
    Failed(String),
    /// Not there yet, and why.
    Pending(String),
}

/// Whether two desired values are the same (`42` and `42.0` are).
fn same_value(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) if a.is_number() && b.is_number() => x == y,
        _ => a == b,
    }
}

/// Progress of the write of `a` in `device` as last seen; `generation` is
/// the device's generation right after the write (0 when unknown).
pub fn write_progress(device: &Value, a: &Assignment, generation: u64) -> Progress {
    let twin = device.pointer("/status/twins").and_then(|t| t.get(&a.property)).unwrap_or(&Value::Null);
    let Some(desired) = twin.get("desired").filter(|d| !d.is_null()) else {
        return Progress::Pending("not received by the node yet".into());
    };
    let version = desired.get("version").and_then(Value::as_u64).unwrap_or(0);
    let value = desired.get("value").unwrap_or(&Value::Null);
    if !same_value(value, &a.value) {
        if generation > 0 && version > generation {
            let source = text(desired, "/source");
            let by = if source.is_empty() { String::new() } else { format!(" ({source})") };
            return Progress::Failed(format!("replaced by a newer write of {value} (version {version}{by})"));
        }
        return Progress::Pending("not received by the node yet".into());
    }
    let observed = twin.get("observedDesired").and_then(Value::as_u64).unwrap_or(0);
    if observed >= version {
        return Progress::Applied { version };
    }
    let error = text(twin, "/error");
    if !error.is_empty() {
        return Progress::Failed(error);
    }
    Progress::Pending(format!("being written (version {version})"))
}

async fn set(session: &Session, a: SetArgs) -> Result<()> {
    let client = session.client()?;
    let written = set_desired(&client, &a.name, &a.values).await?;
    let generation = written.device.pointer("/metadata/generation").and_then(Value::as_u64).unwrap_or(0);
    let list = a.values.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ");
    emit(format!("device/{} desired {list} (generation {generation})\n", a.name))?;
    match a.wait {
        Some(timeout) => wait_applied(&client, &a.name, &a.values, written.device, timeout).await,
        None => Ok(()),
    }
}

/// What `--wait` has seen so far.
struct WaitState<'a> {
    values: &'a [Assignment],
    generation: u64,
    applied: BTreeSet<String>,
    last: Value,
}

impl WaitState<'_> {
    /// Takes a new version of the device; answers whether every value is
    /// applied. Prints each property once as it becomes applied.
    fn observe(&mut self, device: Value) -> Result<bool> {
        self.last = device;
        for a in self.values {
            match write_progress(&self.last, a, self.generation) {
                Progress::Applied { version } => {
                    if self.applied.insert(a.property.clone()) {
                        emit(format!("{}: applied (version {version})\n", a.property))?;
                    }
                }
                Progress::Failed(e) => bail!("{}: {e}", a.property),
                Progress::Pending(_) => {}
            }
        }
        Ok(self.applied.len() == self.values.len())
    }

    fn pending(&self) -> String {
        self.values
            .iter()
            .filter_map(|a| match write_progress(&self.last, a, self.generation) {
                Progress::Pending(why) => Some(format!("{} {why}", a.property)),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

async fn wait_applied(
    client: &Client,
    name: &str,
    values: &[Assignment],
    written: Value,
    timeout: Duration,
) -> Result<()> {
    let generation = written.pointer("/metadata/generation").and_then(Value::as_u64).unwrap_or(0);
    let revision = written.pointer("/metadata/resourceVersion").and_then(revision_of).unwrap_or(0);
    let mut state = WaitState { values, generation, applied: BTreeSet::new(), last: Value::Null };
    if state.observe(written)? {
        return Ok(());
    }
    let follow = follow_device(client, name, revision, |change| match change {
        DeviceChange::Changed(d) => state.observe(d),
        DeviceChange::Deleted => bail!("device {name} was deleted"),
    });
    let waited = tokio::time::timeout(timeout, follow).await;
    match waited {
        Ok(r) => r,
        Err(_) => bail!("device {name}: not applied within {}: {}", show_timeout(timeout), state.pending()),
    }
}

/// A `--wait` timeout as given (`30s`, `2m`, `1500ms`).
fn show_timeout(d: Duration) -> String {
    if d.subsec_millis() != 0 {
        format!("{}ms", d.as_millis())
    } else {
        crate::time::format_age(i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
    }
}

/// Lists devices and finds `name` in the list; answers it (or `None`
/// when absent) with the list's revision to watch from.
async fn list_device(client: &Client, name: &str) -> Result<(Option<Value>, u64), ClientError> {
    let list = client.list_with(Kind::Device, &ListOptions::default()).await?;
    let device = list.items.into_iter().find(|d| text(d, "/metadata/name") == name);
    Ok((device, list.resource_version))
}

/// A change of the followed device.
#[derive(Debug, Clone, PartialEq)]
enum DeviceChange {
    /// The device as it is now.
    Changed(Value),
    /// It was deleted (or is absent from a new list).
    Deleted,
}

/// Feeds every change of device `name` after `revision` to `on_change`
/// until it answers `true` or fails. Reopens closed streams, rides out lost
/// connections, lists again after a 410 (as `get -w` does).
async fn follow_device(
    client: &Client,
    name: &str,
    mut revision: u64,
    mut on_change: impl FnMut(DeviceChange) -> Result<bool>,
) -> Result<()> {
    let mut relist = false;
    loop {
        if relist {
            match list_device(client, name).await {
                Ok((device, rv)) => {
                    relist = false;
                    revision = rv;
                    let change = device.map_or(DeviceChange::Deleted, DeviceChange::Changed);
                    if on_change(change)? {
                        return Ok(());
                    }
                }
                Err(e @ ClientError::Unreachable { .. }) => {
                    eprintln!("watch interrupted: {e}; retrying");
                    tokio::time::sleep(REWATCH_DELAY).await;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let mut stream = match client.watch(Kind::Device, &ListOptions::default(), Some(revision)).await {
            Ok(s) => s,
            Err(e) if e.status() == Some(410) => {
                relist = true;
                continue;
            }
            Err(e @ ClientError::Unreachable { .. }) => {
                eprintln!("watch interrupted: {e}; retrying");
                tokio::time::sleep(REWATCH_DELAY).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        while let Some(event) = stream.next_event().await {
            let event = match event {
                Ok(ev) => ev,
                Err(e) if e.status() == Some(410) => {
                    relist = true;
                    break;
                }
                Err(e @ ClientError::Unreachable { .. }) => {
                    eprintln!("watch interrupted: {e}; retrying");
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(rv) = event.object.pointer("/metadata/resourceVersion").and_then(revision_of) {
                revision = revision.max(rv);
            }
            if text(&event.object, "/metadata/name") != name {
                continue;
            }
            let change = match event.kind {
                WatchEventType::Deleted => DeviceChange::Deleted,
                _ => DeviceChange::Changed(event.object),
            };
            if on_change(change)? {
                return Ok(());
            }
        }
        if !relist {
            // The server ended the stream (restart, timeout): resume.
            tokio::time::sleep(REWATCH_DELAY).await;
        }
    }
}

// ---------------------------------------------------------------- watch

/// One thing `device watch` prints.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// A property's reading changed (value, timestamp or quality).
    Reading {
        /// The property.
        property: String,
        /// The value read.
        value: Value,
        /// When it was read, Unix milliseconds.
        ts: u64,
        /// `good`, `bad` or `uncertain`.
        quality: String,
    },
    /// The device's state changed.
    State {
        /// The state before.
        from: String,
        /// The state now.
        to: String,
        /// The device's last error.
        error: String,
        /// When the change was seen, Unix milliseconds.
        ts: u64,
    },
    /// The device was deleted.
    Deleted {
        /// When the deletion was seen, Unix milliseconds.
        ts: u64,
    },
}

/// What `device watch` knows of the device, to print only what changed.
#[derive(Debug, Clone, Default)]
pub struct ReadingStream {
    device: String,
    only: BTreeSet<String>,
    readings: BTreeMap<String, (Value, u64, String)>,
    state: Option<String>,
}

impl ReadingStream {
    /// Follows `device`; `only`, when not empty, limits the properties.
    pub fn new(device: &str, only: &[String]) -> ReadingStream {
        ReadingStream { device: device.to_string(), only: only.iter().cloned().collect(), ..Default::default() }
    }

    /// The events a new version of the device makes: every reading that
    /// differs from the last one printed (all of them the first time) and,
    /// after the first time, a state change. `now_ms` stamps state changes.
    pub fn observe(&mut self, device: &Value, now_ms: u64) -> Vec<StreamEvent> {
        let mut out = Vec::new();
        let state = {
            let s = text(device, "/status/state");
            if s.is_empty() {
                "unknown".to_string()
            } else {
                s
            }
        };
        if let Some(before) = self.state.replace(state.clone()) {
            if before != state {
                out.push(StreamEvent::State {
                    from: before,
                    to: state,
                    error: text(device, "/status/lastError"),
                    ts: now_ms,
                });
            }
        }
        let Some(twins) = device.pointer("/status/twins").and_then(Value::as_object) else {
            return out;
        };
        for (property, twin) in twins {
            if !self.only.is_empty() && !self.only.contains(property) {
                continue;
            }
            let Some(reported) = twin.get("reported").filter(|r| !r.is_null()) else {
                continue;
            };
            let value = reported.get("value").cloned().unwrap_or(Value::Null);
            let ts = reported.get("timestamp").and_then(Value::as_u64).unwrap_or(0);
            let quality = {
                let q = text(reported, "/quality");
                if q.is_empty() {
                    "good".to_string()
                } else {
                    q
                }
            };
            let now = (value, ts, quality);
            if self.readings.get(property) == Some(&now) {
                continue;
            }
            let (value, ts, quality) = now.clone();
            self.readings.insert(property.clone(), now);
            out.push(StreamEvent::Reading { property: property.clone(), value, ts, quality });
        }
        out
    }

    /// The device is gone: print that, and start over if it comes back.
    pub fn deleted(&mut self, now_ms: u64) -> StreamEvent {
        self.readings.clear();
        self.state = None;
        StreamEvent::Deleted { ts: now_ms }
    }

    /// One line for `event`, ending in `\n`.
    pub fn render(&self, event: &StreamEvent, format: StreamFormat) -> String {
        let d = &self.device;
        let line = match (format, event) {
            (StreamFormat::Text, StreamEvent::Reading { property, value, ts, quality }) => {
                format!("{} {d} {property}={} {quality}", format_ms(*ts), show_value(value))
            }
            (StreamFormat::Text, StreamEvent::State { from, to, error, ts }) => {
                let mut s = format!("{} {d} state {from}→{to}", format_ms(*ts));
                if !error.is_empty() {
                    s.push_str(&format!(": {error}"));
                }
                s
            }
            (StreamFormat::Text, StreamEvent::Deleted { ts }) => format!("{} {d} deleted", format_ms(*ts)),
            (StreamFormat::Json, StreamEvent::Reading { property, value, ts, quality }) => {
                json!({"device": d, "property": property, "value": value, "ts": ts, "quality": quality}).to_string()
            }
            (StreamFormat::Json, StreamEvent::State { from, to, error, ts }) => {
                json!({"device": d, "state": to, "previousState": from, "lastError": error, "ts": ts}).to_string()
            }
            (StreamFormat::Json, StreamEvent::Deleted { ts }) => {
                json!({"device": d, "deleted": true, "ts": ts}).to_string()
            }
        };
        format!("{line}\n")
    }
}

/// Unix milliseconds as RFC 3339 UTC with milliseconds.
pub fn format_ms(ms: u64) -> String {
    let secs = yunbian_api::time::format_rfc3339(ms / 1000);
    format!("{}.{:03}Z", secs.trim_end_matches('Z'), ms % 1000)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Properties of `device` (visitors and twins) that `only` names but the
/// device does not have.
fn unknown_properties(device: &Value, only: &[String]) -> Vec<String> {
    let mut known: BTreeSet<String> = device
        .pointer("/spec/properties")
        .and_then(Value::as_array)
        .map(|ps| ps.iter().map(|p| text(p, "/name")).collect())
        .unwrap_or_default();
    if let Some(twins) = device.pointer("/status/twins").and_then(Value::as_object) {
        known.extend(twins.keys().cloned());
    }
    only.iter().filter(|p| !known.contains(*p)).cloned().collect()
}

async fn watch(session: &Session, a: WatchArgs) -> Result<()> {
    let client = session.client()?;
    let (device, revision) = list_device(&client, &a.name).await?;
    let device = device.ok_or_else(|| anyhow!("device {} not found", a.name))?;
    let unknown = unknown_properties(&device, &a.properties);
    if !unknown.is_empty() {
        bail!("device {} has no property {}", a.name, unknown.join(", "));
    }
    let mut stream = ReadingStream::new(&a.name, &a.properties);
    let print = |stream: &ReadingStream, events: Vec<StreamEvent>| -> Result<bool> {
        let text: String = events.iter().map(|e| stream.render(e, a.output)).collect();
        if text.is_empty() {
            Ok(true)
        } else {
            emit(text)
        }
    };
    let first = stream.observe(&device, now_ms());
    if !print(&stream, first)? {
        return Ok(());
    }
    follow_device(&client, &a.name, revision, |change| {
        let out = match change {
            DeviceChange::Changed(d) => stream.observe(&d, now_ms()),
            DeviceChange::Deleted if stream.state.is_some() => vec![stream.deleted(now_ms())],
            DeviceChange::Deleted => Vec::new(),
        };
        // A closed stdout (`| head`) ends the watch quietly.
        Ok(!print(&stream, out)?)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assign(s: &str) -> Assignment {
        Assignment::parse(s).expect("valid assignment")
    }

    #[test]
    fn values_are_json_when_they_parse_else_text() {
        assert_eq!(assign("setpoint=42"), Assignment { property: "setpoint".into(), value: json!(42) });
        assert_eq!(assign("gain=0.5").value, json!(0.5));
        assert_eq!(assign("on=true").value, json!(true));
        assert_eq!(assign("label=\"text\"").value, json!("text"));
        assert_eq!(assign("label=eco").value, json!("eco"));
        assert_eq!(assign("label=hello world").value, json!("hello world"));
        assert_eq!(assign("label=\"null\"").value, json!("null"));
        assert_eq!(assign("raw=[1,2]").value, json!([1, 2]));
        assert_eq!(assign("cfg={\"a\":1}").value, json!({"a": 1}));
        assert_eq!(assign("expr=a=b").value, json!("a=b"));
        assert_eq!(assign("empty=").value, json!(""));
        assert_eq!(assign(" p =1").property, "p");
        for bad in ["novalue", "=1", "a b=1", "x=null"] {
            assert!(Assignment::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(assign("mode=eco").to_string(), "mode=\"eco\"");
        assert_eq!(show_timeout(Duration::from_millis(1500)), "1500ms");
        assert_eq!(show_timeout(Duration::from_secs(120)), "2m");
    }

    fn device() -> Value {
        json!({
            "metadata": {"name": "boiler-1", "resourceVersion": 7, "generation": 3},
            "spec": {"model": "boiler", "node": "edge-1", "protocol": {"virtual": {}},
                     "properties": [{"name": "temp"}, {"name": "setpoint"}, {"name": "mode"}],
                     "desired": {"mode": "eco"}}
        })
    }

    fn model() -> Value {
        json!({"metadata": {"name": "boiler"}, "spec": {"properties": [
            {"name": "temp", "type": "float"},
            {"name": "setpoint", "type": "float", "accessMode": "ReadWrite", "minimum": 0, "maximum": 100},
            {"name": "mode", "type": "string", "accessMode": "ReadWrite"},
            {"name": "fan", "type": "bool", "accessMode": "ReadWrite"}
        ]}})
    }

    #[test]
    fn writes_are_checked_against_the_model_and_all_or_nothing() {
        let mut d = device();
        apply_desired(&mut d, &model(), &[assign("setpoint=42"), assign("mode=boost")]).expect("valid");
        assert_eq!(d["spec"]["desired"], json!({"setpoint": 42, "mode": "boost"}));

        let mut d = device();
        let e = apply_desired(&mut d, &model(), &[assign("setpoint=120"), assign("temp=1"), assign("mode=ok")])
            .expect_err("invalid");
        assert_eq!(
            e.to_string(),
            "device boiler-1: property \"setpoint\": 120 is above the maximum 100; \
             property \"temp\" is ReadOnly and cannot be written (nothing was written)"
        );
        assert_eq!(d, device(), "nothing changed");
        let e = apply_desired(&mut d, &model(), &[assign("fan=true")]).expect_err("no visitor");
        assert!(e.to_string().contains("\"fan\" has no visitor"), "{e}");
        let e = apply_desired(&mut d, &model(), &[assign("ghost=1")]).expect_err("unknown");
        assert!(e.to_string().contains("model \"boiler\" has no property \"ghost\""), "{e}");
        let e = apply_desired(&mut d, &model(), &[assign("setpoint=hot")]).expect_err("type");
        assert!(e.to_string().contains("\"hot\" is not a value of type float"), "{e}");
        let e = apply_desired(&mut d, &model(), &[assign("mode=a"), assign("mode=b")]).expect_err("twice");
        assert_eq!(e.to_string(), "property \"mode\" is given more than once");

        let mut bare = json!({"metadata": {"name": "b"}, "spec": {"model": "boiler", "protocol": {"virtual": {}},
                                                                  "properties": [{"name": "mode"}]}});
        apply_desired(&mut bare, &model(), &[assign("mode=eco")]).expect("valid");
        assert_eq!(bare["spec"]["desired"], json!({"mode": "eco"}));
    }

    fn with_twin(twin: Value) -> Value {
        let mut d = device();
        d["status"] = json!({"twins": {"setpoint": twin}});
        d
    }

    #[test]
    fn progress_of_a_write() {
        let a = assign("setpoint=42");
        assert_eq!(
            write_progress(&device(), &a, 4),
            Progress::Pending("not received by the node yet".into()),
            "no twin yet"
        );
        let old = with_twin(json!({"desired": {"value": 10, "version": 2}, "observedDesired": 2}));
        assert!(matches!(write_progress(&old, &a, 4), Progress::Pending(_)), "older value");
        let writing = with_twin(json!({"desired": {"value": 42.0, "version": 4}, "observedDesired": 2}));
        assert_eq!(write_progress(&writing, &a, 4), Progress::Pending("being written (version 4)".into()));
        let done = with_twin(json!({"desired": {"value": 42.0, "version": 4}, "observedDesired": 4}));
        assert_eq!(write_progress(&done, &a, 4), Progress::Applied { version: 4 });
        let failed =
            with_twin(json!({"desired": {"value": 42, "version": 4}, "observedDesired": 2, "error": "exception 2"}));
        assert_eq!(write_progress(&failed, &a, 4), Progress::Failed("exception 2".into()));
        let replaced = with_twin(json!({"desired": {"value": 7, "version": 9, "source": "local"}}));
        assert_eq!(
            write_progress(&replaced, &a, 4),
            Progress::Failed("replaced by a newer write of 7 (version 9 (local))".into())
        );
    }

    #[test]
    fn readings_are_printed_when_they_change() {
        let mut s = ReadingStream::new("boiler-1", &[]);
        let mut d = device();
        d["status"] = json!({"state": "online", "twins": {
            "temp": {"reported": {"value": 21.5, "timestamp": 1_700_000_000_123u64, "quality": "good"}},
            "setpoint": {"desired": {"value": 42, "version": 4}},
            "mode": {"reported": {"value": "eco", "timestamp": 1_700_000_000_000u64}}
        }});
        let first = s.observe(&d, 0);
        let lines: String = first.iter().map(|e| s.render(e, StreamFormat::Text)).collect();
        assert_eq!(
            lines,
            "2023-11-14T22:13:20.000Z boiler-1 mode=eco good\n2023-11-14T22:13:20.123Z boiler-1 temp=21.5 good\n"
        );
        assert!(s.observe(&d, 0).is_empty(), "nothing changed");

        d["status"]["twins"]["temp"]["reported"] = json!({"value": 21.5, "timestamp": 1_700_000_001_000u64});
        d["status"]["state"] = json!("offline");
        d["status"]["lastError"] = json!("connection refused");
        let next = s.observe(&d, 1_700_000_002_000);
        let lines: String = next.iter().map(|e| s.render(e, StreamFormat::Text)).collect();
        assert_eq!(
            lines,
            "2023-11-14T22:13:22.000Z boiler-1 state online→offline: connection refused\n\
             2023-11-14T22:13:21.000Z boiler-1 temp=21.5 good\n"
        );
        let json_line = s.render(&next[1], StreamFormat::Json);
        let v: Value = serde_json::from_str(&json_line).expect("json");
        assert_eq!(
            v,
            json!({"device": "boiler-1", "property": "temp", "value": 21.5, "ts": 1_700_000_001_000u64, "quality": "good"})
        );
        assert_eq!(s.render(&s.clone().deleted(5), StreamFormat::Text), "1970-01-01T00:00:00.005Z boiler-1 deleted\n");

        let mut only = ReadingStream::new("boiler-1", &["temp".to_string()]);
        let evs = only.observe(&d, 0);
        assert_eq!(evs.len(), 1);
        assert!(matches!(&evs[0], StreamEvent::Reading { property, .. } if property == "temp"));
        assert_eq!(unknown_properties(&d, &["temp".into(), "ghost".into()]), ["ghost"]);
    }
}
