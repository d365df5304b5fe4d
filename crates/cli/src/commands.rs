//! The client command tree (`get`, `describe`, `top`, `apply`, `delete`, `logs`,
//! `token`, `device`, `query`, `series`) and [`run`], which executes one
//! command against the cloud. The `device` subcommands live in
//! [`crate::device`], `query` and `series` in [`crate::data`].
//!
//! Every failure becomes an `anyhow::Error` whose message is one line fit
//! for `error: {e:#}`; messages about objects (`app hello not found`) are
//! the server's own. Local checks (manifest validation, argument syntax)
//! happen before the configuration is even loaded, so they need no cloud.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};
use yunbian_api::{parse_manifests, Kind, Resource};

use crate::client::{Client, ClientError, ListOptions};
use crate::columns::{headers, row, text};
use crate::config::ClientConfig;
use crate::data::{QueryArgs, SeriesArgs};
use crate::describe::{describe, Related};
use crate::device::DeviceCommand;
use crate::table::Table;
use crate::time::{parse_duration, unix_now};

/// Pause before reopening a watch the server closed.
pub(crate) const REWATCH_DELAY: Duration = Duration::from_secs(1);

/// Commands that talk to the cloud API as admin.
#[derive(Debug, Clone, Subcommand)]
pub enum ClientCommand {
    /// List objects of a kind, or show one, as a table, JSON or YAML; or the latency matrix.
    Get(GetCommand),
    /// Show one object in detail, with its related objects.
    Describe(DescribeArgs),
    /// Show what nodes use: CPU and memory against allocatable, instances, disk, RTT to the cloud.
    Top(TopArgs),
    /// Create or update objects from manifest files.
    Apply(ApplyArgs),
    /// Delete objects.
    Delete(DeleteArgs),
    /// Print the output of an app's instances or of one instance.
    Logs(LogsArgs),
    /// Create, list and revoke join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Write desired values of a device's properties, or stream its readings.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Read the points edges shipped to the cloud, raw or one per step.
    Query(QueryArgs),
    /// List the series the cloud holds data for.
    Series(SeriesArgs),
    /// Push, list, describe, delete and sign artifacts (executables, bundles, wasm modules, OCI layouts).
    #[command(subcommand)]
    Artifact(crate::artifact::ArtifactCommand),
    /// An App's revisions and rollout: history, status, pause, resume, undo.
    #[command(subcommand)]
    Rollout(crate::rollout::RolloutCommand),
}

/// The `get` command line: objects of a kind ([`GetArgs`]) or the latency
/// matrix.
#[derive(Debug, Clone, Args)]
pub struct GetCommand {
    /// nodes, nodegroups, tokens, apps, instances, devicemodels or devices (singular and short forms work too),
    /// or latency (the measured round trips between nodes and to the cloud).
    #[arg(value_parser = parse_get_kind)]
    pub kind: GetKind,
    /// Show only this object.
    pub name: Option<String>,
    /// Output format: wide (more columns), yaml or json.
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<OutputFormat>,
    /// After listing, print changes as they happen.
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// Only objects with these labels: k=v,k2=v2.
    #[arg(short = 'l', long, value_parser = Selector::parse)]
    pub selector: Option<Selector>,
    /// latency only: just the paths from or to this node.
    #[arg(long)]
    pub node: Option<String>,
}

/// Arguments of `get` for objects of a kind.
#[derive(Debug, Clone)]
pub struct GetArgs {
    /// The kind.
    pub kind: Kind,
    /// Show only this object.
    pub name: Option<String>,
    /// Output format: wide (more columns), yaml or json.
    pub output: Option<OutputFormat>,
    /// After listing, print changes as they happen.
    pub watch: bool,
    /// Only objects with these labels.
    pub selector: Option<Selector>,
}

/// Arguments of `describe`.
#[derive(Debug, Clone, Args)]
pub struct DescribeArgs {
    /// nodes, nodegroups, tokens, apps, instances, devicemodels or devices.
    #[arg(value_parser = parse_kind)]
    pub kind: Kind,
    /// The object's name.
    pub name: String,
}

/// Arguments of `apply`.
#[derive(Debug, Clone, Args)]
pub struct ApplyArgs {
    /// Manifest file, directory (every *.yaml, *.yml, *.json in it) or - for stdin.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
}

/// Arguments of `delete`.
#[derive(Debug, Clone, Args)]
pub struct DeleteArgs {
    /// nodes, nodegroups, tokens, apps, instances, devicemodels or devices.
    #[arg(value_parser = parse_kind)]
    pub kind: Kind,
    /// Names of the objects to delete.
    #[arg(required = true)]
    pub names: Vec<String>,
}

/// Arguments of `logs`.
#[derive(Debug, Clone, Args)]
pub struct LogsArgs {
    /// app/NAME, instance/NAME, or NAME (an app, else an instance).
    pub target: String,
    /// Apps only: just the instances on this node.
    #[arg(long)]
    pub node: Option<String>,
    /// Lines of past output to show first.
    #[arg(long)]
    pub tail: Option<u64>,
    /// Keep streaming new output.
    #[arg(short = 'f', long)]
    pub follow: bool,
}

/// `token` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum TokenCommand {
    /// Create a join token and print it (it is shown only once).
    Create {
        /// Validity: 30s, 15m, 24h, 7d, 1h30m, or 0 for never.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: u64,
        /// What the token is for.
        #[arg(short = 'd', long, default_value = "")]
        description: String,
    },
    /// List join tokens.
    #[command(alias = "ls")]
    List {
        /// Output format: wide, yaml or json.
        #[arg(short = 'o', long, value_enum)]
        output: Option<OutputFormat>,
    },
    /// Revoke a join token so no more nodes can join with it.
    Revoke {
        /// The token's name (its id).
        name: String,
    },
}

/// How `get` prints objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// The table with extra columns.
    Wide,
    /// YAML: the object, or `items:` for a list.
    Yaml,
    /// JSON: the object, or `{"items": [...]}` for a list.
    Json,
}

/// An equality label selector: `k=v,k2=v2` (all must match).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(BTreeMap<String, String>);

impl Selector {
    /// Parses `k=v,k2=v2` (`k==v` is accepted too).
    pub fn parse(s: &str) -> Result<Selector, String> {
        let mut map = BTreeMap::new();
        if s.trim().is_empty() {
            return Err("empty selector: use k=v,k2=v2".into());
        }
        for part in s.split(',') {
            let part = part.trim();
            if part.contains("!=") {
                return Err(format!("{part:?}: only k=v selectors are supported"));
            }
            let (k, v) = part
                .split_once("==")
                .or_else(|| part.split_once('='))
                .ok_or_else(|| format!("{part:?}: expected k=v"))?;
            let (k, v) = (k.trim(), v.trim());
            let ok = |x: &str, slash: bool| {
                x.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') || (slash && c == '/'))
            };
            if k.is_empty() || !ok(k, true) {
                return Err(format!("{part:?}: bad label key {k:?}"));
            }
            if !ok(v, false) {
                return Err(format!("{part:?}: bad label value {v:?}"));
            }
            if let Some(old) = map.insert(k.to_string(), v.to_string()) {
                if old != v {
                    return Err(format!("label {k:?} selected twice with different values"));
                }
            }
        }
        Ok(Selector(map))
    }

    /// The selector as sent in `?labelSelector=`.
    pub fn to_query(&self) -> String {
        self.0.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
    }

    /// Whether the object's `metadata.labels` carry every pair.
    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(k, v)| {
            obj.pointer("/metadata/labels").and_then(|l| l.get(k)).and_then(Value::as_str) == Some(v.as_str())
        })
    }
}

impl FromStr for Selector {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Selector::parse(s)
    }
}

fn parse_kind(s: &str) -> Result<Kind, String> {
    s.parse::<Kind>().map_err(|e| e.to_string())
}

/// What `get` lists: objects of a kind, or the latency matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GetKind {
    /// Objects of a kind.
    Object(Kind),
    /// The latency matrix (`GET /v1/latency`).
    Latency,
}

fn parse_get_kind(s: &str) -> Result<GetKind, String> {
    match s {
        "latency" | "latencies" => Ok(GetKind::Latency),
        _ => parse_kind(s).map(GetKind::Object),
    }
}

/// Arguments of `top`.
#[derive(Debug, Clone, Args)]
pub struct TopArgs {
    /// nodes (the only resource `top` shows).
    #[arg(value_parser = parse_top_kind)]
    pub kind: Kind,
    /// Only nodes with these labels: k=v,k2=v2.
    #[arg(short = 'l', long, value_parser = Selector::parse)]
    pub selector: Option<Selector>,
}

fn parse_top_kind(s: &str) -> Result<Kind, String> {
    match parse_kind(s)? {
        Kind::Node => Ok(Kind::Node),
        k => Err(format!("top shows nodes, not {}", k.plural())),
    }
}

/// Runs one client command. `config_path` is `--config`; when `None`,
/// `$YUNBIAN_CONFIG` or `./admin.yaml` is used.
pub async fn run(config_path: Option<PathBuf>, cmd: ClientCommand) -> Result<()> {
    let session = Session { config_path };
    match cmd {
        ClientCommand::Get(a) => match a.kind {
            GetKind::Latency => latency(&session, &a).await,
            GetKind::Object(_) if a.node.is_some() => bail!("--node applies to get latency only"),
            GetKind::Object(kind) => {
                let GetCommand { name, output, watch, selector, .. } = a;
                get(&session, GetArgs { kind, name, output, watch, selector }).await
            }
        },
        ClientCommand::Describe(a) => describe_cmd(&session, a.kind, &a.name).await,
        ClientCommand::Top(a) => top(&session, a).await,
        ClientCommand::Apply(a) => apply(&session, &a.files).await,
        ClientCommand::Delete(a) => delete(&session, a.kind, &a.names).await,
        ClientCommand::Logs(a) => logs(&session, a).await,
        ClientCommand::Token(t) => token(&session, t).await,
        ClientCommand::Device(d) => crate::device::run(&session, d).await,
        ClientCommand::Query(a) => crate::data::query(&session, a).await,
        ClientCommand::Series(a) => crate::data::series(&session, a).await,
        ClientCommand::Artifact(a) => crate::artifact::run(&session, a).await,
        ClientCommand::Rollout(r) => crate::rollout::run(&session, r).await,
    }
}

/// What every command needs to reach the cloud, loaded on first use.
pub(crate) struct Session {
    config_path: Option<PathBuf>,
}

impl Session {
    pub(crate) fn client(&self) -> Result<Client> {
        let config = ClientConfig::load(self.config_path.as_deref())?;
        Ok(Client::new(config)?)
    }
}

// ---------------------------------------------------------------- get

pub(crate) async fn get(session: &Session, a: GetArgs) -> Result<()> {
    if a.name.is_some() && a.selector.is_some() {
        bail!("a name and --selector cannot be used together");
    }
    let kind = a.kind;
    let client = session.client()?;
    let options = ListOptions { label_selector: a.selector.as_ref().map(Selector::to_query), ..Default::default() };
    if a.watch {
        return watch(&client, kind, a.name.as_deref(), a.selector.as_ref(), &options, a.output).await;
    }
    let now = unix_now();
    let text = match &a.name {
        Some(name) => {
            let obj = client.get_object(kind, name).await?;
            render_one(kind, &obj, a.output, now)?
        }
        None => {
            let mut items = client.list_with(kind, &options).await?.items;
            if let Some(sel) = &a.selector {
                // In case the server ignores the selector.
                items.retain(|o| sel.matches(o));
            }
            sort_by_name(&mut items);
            if items.is_empty() && !matches!(a.output, Some(OutputFormat::Json | OutputFormat::Yaml)) {
                eprintln!("No {} found.", kind.plural());
                return Ok(());
            }
            render_list(kind, &items, a.output, now)?
        }
    };
    emit(text)?;
    Ok(())
}

fn sort_by_name(items: &mut [Value]) {
    items.sort_by_key(|v| text(v, "/metadata/name"));
}

fn table_of(kind: Kind, items: &[Value], wide: bool, now: i64) -> Table {
    let mut t = Table::new(&headers(kind, wide));
    for item in items {
        t.push(row(kind, item, wide, now));
    }
    t
}

fn render_one(kind: Kind, obj: &Value, output: Option<OutputFormat>, now: i64) -> Result<String> {
    match output {
        Some(OutputFormat::Json) => Ok(format!("{}\n", serde_json::to_string_pretty(obj)?)),
        Some(OutputFormat::Yaml) => Ok(serde_yaml::to_string(obj)?),
        wide => Ok(table_of(kind, std::slice::from_ref(obj), wide.is_some(), now).render()),
    }
}

fn render_list(kind: Kind, items: &[Value], output: Option<OutputFormat>, now: i64) -> Result<String> {
    match output {
        Some(OutputFormat::Json) => Ok(format!("{}\n", serde_json::to_string_pretty(&json!({ "items": items }))?)),
        Some(OutputFormat::Yaml) => Ok(serde_yaml::to_string(&json!({ "items": items }))?),
        wide => Ok(table_of(kind, items, wide.is_some(), now).render()),
    }
}

/// `get latency [--node N]`: the measured round trips, one path a row.
async fn latency(session: &Session, a: &GetCommand) -> Result<()> {
    if a.name.is_some() || a.selector.is_some() || a.watch {
        bail!("get latency takes no name, --selector or --watch (use --node)");
    }
    let client = session.client()?;
    let query: Vec<(&str, String)> = a.node.iter().map(|n| ("node", n.clone())).collect();
    let path = crate::client::with_query("/v1/latency", &query);
    let matrix = client.get(&path).await?;
    let text = match a.output {
        Some(OutputFormat::Json) => format!("{}\n", serde_json::to_string_pretty(&matrix)?),
        Some(OutputFormat::Yaml) => serde_yaml::to_string(&matrix)?,
        _ => {
            let rows = crate::columns::latency_rows(&matrix);
            if rows.is_empty() {
                eprintln!("No latency measured yet.");
                return Ok(());
            }
            let mut t = Table::new(&["FROM", "TO", "RTT", "LOSS"]);
            for r in rows {
                t.push(r);
            }
            t.render()
        }
    };
    emit(text)?;
    Ok(())
}

/// `top nodes`: usage against allocatable capacity, per node.
async fn top(session: &Session, a: TopArgs) -> Result<()> {
    let client = session.client()?;
    let options = ListOptions { label_selector: a.selector.as_ref().map(Selector::to_query), ..Default::default() };
    let mut items = client.list_with(a.kind, &options).await?.items;
    if let Some(sel) = &a.selector {
        items.retain(|o| sel.matches(o));
    }
    sort_by_name(&mut items);
    if items.is_empty() {
        eprintln!("No nodes found.");
        return Ok(());
    }
    let mut t = Table::new(&crate::columns::TOP_NODE_HEADERS);
    for o in &items {
        t.push(crate::columns::top_node_row(o));
    }
    emit(t.render())?;
    Ok(())
}

/// `get --watch`: list, print, then print every change; list again when
/// the server says the revision is too old (410).
async fn watch(
    client: &Client,
    kind: Kind,
    name: Option<&str>,
    selector: Option<&Selector>,
    options: &ListOptions,
    output: Option<OutputFormat>,
) -> Result<()> {
    let wide = output == Some(OutputFormat::Wide);
    let structured = matches!(output, Some(OutputFormat::Json | OutputFormat::Yaml));
    let wanted =
        |o: &Value| name.is_none_or(|n| text(o, "/metadata/name") == n) && selector.is_none_or(|s| s.matches(o));
    let print_object = |o: &Value, table: &mut Table| -> Result<bool> {
        let out = match output {
            Some(OutputFormat::Json) => format!("{}\n", serde_json::to_string_pretty(o)?),
            Some(OutputFormat::Yaml) => format!("---\n{}", serde_yaml::to_string(o)?),
            _ => table.render_row(&row(kind, o, wide, unix_now())),
        };
        emit(out)
    };
    let mut table = Table::new(&headers(kind, wide));
    let mut first = true;
    'relist: loop {
        let list = client.list_with(kind, options).await?;
        let mut items: Vec<Value> = list.items.into_iter().filter(|o| wanted(o)).collect();
        sort_by_name(&mut items);
        if first && !structured {
            for item in &items {
                table.push(row(kind, item, wide, unix_now()));
            }
            if !emit(table.render())? {
                return Ok(());
            }
        } else {
            for item in &items {
                if !print_object(item, &mut table)? {
                    return Ok(());
                }
            }
        }
        first = false;
        let mut revision = list.resource_version;
        loop {
            let mut stream = match client.watch(kind, options, Some(revision)).await {
                Err(e) if e.status() == Some(410) => continue 'relist,
                other => other?,
            };
            while let Some(event) = stream.next_event().await {
                let event = match event {
                    Err(e) if e.status() == Some(410) => continue 'relist,
                    other => other?,
                };
                if let Some(rv) = event.object.pointer("/metadata/resourceVersion").and_then(revision_of) {
                    revision = revision.max(rv);
                }
                if wanted(&event.object) && !print_object(&event.object, &mut table)? {
                    return Ok(());
                }
            }
            // The server ended the stream (restart, timeout): resume.
            tokio::time::sleep(REWATCH_DELAY).await;
        }
    }
}

pub(crate) fn revision_of(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

// ---------------------------------------------------------------- describe

async fn describe_cmd(session: &Session, kind: Kind, name: &str) -> Result<()> {
    let client = session.client()?;
    let obj = client.get_object(kind, name).await?;
    let related = match kind {
        Kind::App => {
            let options = ListOptions { app: Some(name.to_string()), ..Default::default() };
            let mut items = client.list_with(Kind::AppInstance, &options).await?.items;
            items.retain(|i| text(i, "/spec/app") == name);
            Some(Related { title: "Instances", kind: Kind::AppInstance, items })
        }
        Kind::Node => {
            let options = ListOptions { node: Some(name.to_string()), ..Default::default() };
            let mut items = client.list_with(Kind::AppInstance, &options).await?.items;
            items.retain(|i| text(i, "/spec/node") == name);
            Some(Related { title: "Instances", kind: Kind::AppInstance, items })
        }
        Kind::NodeGroup => {
            let selector: BTreeMap<String, String> = obj
                .pointer("/spec/selector")
                .and_then(Value::as_object)
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
                .unwrap_or_default();
            let selector = Selector(selector);
            let options = ListOptions { label_selector: Some(selector.to_query()), ..Default::default() };
            let mut items = client.list_with(Kind::Node, &options).await?.items;
            items.retain(|n| selector.matches(n));
            Some(Related { title: "Nodes", kind: Kind::Node, items })
        }
        Kind::DeviceModel => {
            let mut items = client.list(Kind::Device).await?;
            items.retain(|d| text(d, "/spec/model") == name);
            Some(Related { title: "Devices", kind: Kind::Device, items })
        }
        Kind::Token | Kind::AppInstance | Kind::Device | Kind::Rule | Kind::Event | Kind::Artifact => None,
    };
    emit(describe(kind, &obj, related.as_ref(), unix_now()))?;
    Ok(())
}

// ---------------------------------------------------------------- apply

/// One manifest source: its name for messages and its text.
struct Source {
    name: String,
    text: String,
}

fn read_sources(paths: &[PathBuf]) -> Result<Vec<Source>> {
    let mut out = Vec::new();
    let mut stdin_read = false;
    for path in paths {
        if path.as_os_str() == "-" {
            if stdin_read {
                bail!("-f - given more than once");
            }
            stdin_read = true;
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).context("read manifests from stdin")?;
            out.push(Source { name: "<stdin>".into(), text });
        } else if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("read directory {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_manifest_file(p))
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("no *.yaml, *.yml or *.json files in {}", path.display());
            }
            for f in files {
                out.push(read_file(&f)?);
            }
        } else {
            out.push(read_file(path)?);
        }
    }
    Ok(out)
}

fn is_manifest_file(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
}

fn read_file(path: &Path) -> Result<Source> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| anyhow!("cannot read {name}: {e}"))?;
    Ok(Source { name, text })
}

/// Reads and validates every manifest; nothing is sent unless all are
/// valid.
fn load_manifests(paths: &[PathBuf]) -> Result<Vec<Resource>> {
    let mut resources = Vec::new();
    for src in read_sources(paths)? {
        let parsed = parse_manifests(&src.text).map_err(|e| anyhow!("{}: {e}", src.name))?;
        resources.extend(parsed);
    }
    if resources.is_empty() {
        bail!("no objects found in the given manifests");
    }
    Ok(resources)
}

async fn apply(session: &Session, paths: &[PathBuf]) -> Result<()> {
    let resources = load_manifests(paths)?;
    let client = session.client()?;
    for r in resources {
        let label = format!("{}/{}", r.kind().noun(), r.name());
        let created = client.apply(&r.to_value()).await.map_err(|e| object_error(&label, e))?;
        emit(format!("{label} {}\n", if created { "created" } else { "configured" }))?;
    }
    Ok(())
}

/// Names the object in server answers about it; transport errors are
/// about the cloud, not the object, and stay as they are.
fn object_error(label: &str, e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Api { .. } | ClientError::Request(_) => anyhow!("{label}: {e}"),
        other => other.into(),
    }
}

// ---------------------------------------------------------------- delete

async fn delete(session: &Session, kind: Kind, names: &[String]) -> Result<()> {
    let client = session.client()?;
    for name in names {
        client.delete_object(kind, name).await?;
        emit(format!("{} {name:?} deleted\n", kind.noun()))?;
    }
    Ok(())
}

// ---------------------------------------------------------------- logs

/// What `logs` reads from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LogTarget {
    /// `app/NAME`.
    App(String),
    /// `instance/NAME`.
    Instance(String),
    /// A bare name: an app if one exists, else an instance.
    Either(String),
}

impl LogTarget {
    fn parse(s: &str) -> Result<LogTarget> {
        let Some((kind, name)) = s.split_once('/') else {
            if s.is_empty() {
                bail!("logs: name is empty");
            }
            return Ok(LogTarget::Either(s.to_string()));
        };
        if name.is_empty() || name.contains('/') {
            bail!("logs: expected app/NAME, instance/NAME or NAME, got {s:?}");
        }
        match kind.parse::<Kind>().map_err(|e| anyhow!("logs: {e}"))? {
            Kind::App => Ok(LogTarget::App(name.to_string())),
            Kind::AppInstance => Ok(LogTarget::Instance(name.to_string())),
            other => bail!("logs are kept for apps and instances, not {}s", other.noun()),
        }
    }
}

async fn logs(session: &Session, a: LogsArgs) -> Result<()> {
    let target = LogTarget::parse(&a.target)?;
    if a.node.is_some() && matches!(target, LogTarget::Instance(_)) {
        bail!("--node applies to apps only: an instance runs on one node");
    }
    let client = session.client()?;
    let node = a.node.as_deref();
    let mut stream = match &target {
        LogTarget::App(n) => client.logs(Kind::App, n, a.tail, a.follow, node).await?,
        LogTarget::Instance(n) => client.logs(Kind::AppInstance, n, a.tail, a.follow, None).await?,
        LogTarget::Either(n) => match client.logs(Kind::App, n, a.tail, a.follow, node).await {
            Err(e) if e.is_not_found() && node.is_none() => {
                match client.logs(Kind::AppInstance, n, a.tail, a.follow, None).await {
                    Err(e) if e.is_not_found() => bail!("no app or instance named {n:?}"),
                    other => other?,
                }
            }
            other => other?,
        },
    };
    while let Some(chunk) = stream.next_chunk().await {
        if !emit(chunk?)? {
            break;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- token

async fn token(session: &Session, cmd: TokenCommand) -> Result<()> {
    match cmd {
        TokenCommand::Create { ttl, description } => {
            let client = session.client()?;
            let token = client.create_token(ttl, &description).await?;
            emit(format!("{token}\n"))?;
        }
        TokenCommand::List { output } => {
            return get(session, GetArgs { kind: Kind::Token, name: None, output, watch: false, selector: None }).await;
        }
        TokenCommand::Revoke { name } => {
            let client = session.client()?;
            client.revoke_token(&name).await?;
            emit(format!("token {name:?} revoked\n"))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- output

/// Writes to stdout and flushes. Answers `false` when the reader went
/// away (`| head`), which ends output quietly rather than as an error.
pub(crate) fn emit(bytes: impl AsRef<[u8]>) -> Result<bool> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes.as_ref()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("write to stdout"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: ClientCommand,
    }

    fn parse(args: &[&str]) -> Result<ClientCommand, clap::Error> {
        Cli::try_parse_from(std::iter::once("yunbian").chain(args.iter().copied())).map(|c| c.cmd)
    }

    #[test]
    fn command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn selectors() {
        let s = Selector::parse("site=a, tier==web").expect("valid");
        assert_eq!(s.to_query(), "site=a,tier=web");
        assert!(s.matches(&json!({"metadata": {"labels": {"site": "a", "tier": "web", "x": "y"}}})));
        assert!(!s.matches(&json!({"metadata": {"labels": {"site": "a"}}})));
        assert!(!s.matches(&json!({})));
        assert_eq!(Selector::parse("example.com/zone=").expect("empty value").to_query(), "example.com/zone=");
        for bad in ["", "site", "site!=a", "=a", "a=b,", "a=b c", "a=1,a=2", "a=x/y"] {
            assert!(Selector::parse(bad).is_err(), "{bad}");
        }
        assert!(Selector::parse("a=1,a=1").is_ok());
    }

    #[test]
    fn get_arguments() {
        let ClientCommand::Get(g) = parse(&["get", "inst", "-o", "wide", "-w", "-l", "app=hello"]).expect("parses")
        else {
            panic!("not get")
        };
        assert_eq!(g.kind, GetKind::Object(Kind::AppInstance));
        assert_eq!(g.output, Some(OutputFormat::Wide));
        assert!(g.watch);
        assert_eq!(g.selector.map(|s| s.to_query()).as_deref(), Some("app=hello"));
        let e = parse(&["get", "pods"]).expect_err("unknown kind");
        assert!(e.to_string().contains("unknown kind"), "{e}");
        assert!(parse(&["get", "apps", "-o", "table"]).is_err());
        let ClientCommand::Get(l) = parse(&["get", "latency", "--node", "e1", "-o", "json"]).expect("parses") else {
            panic!("not get")
        };
        assert_eq!((l.kind, l.node.as_deref()), (GetKind::Latency, Some("e1")));
        let ClientCommand::Top(t) = parse(&["top", "nodes", "-l", "site=a"]).expect("parses") else {
            panic!("not top")
        };
        assert_eq!(t.kind, Kind::Node);
        let e = parse(&["top", "apps"]).expect_err("only nodes");
        assert!(e.to_string().contains("top shows nodes, not apps"), "{e}");
    }

    #[test]
    fn token_arguments() {
        let ClientCommand::Token(TokenCommand::Create { ttl, description }) =
            parse(&["token", "create"]).expect("parses")
        else {
            panic!("not token create")
        };
        assert_eq!((ttl, description.as_str()), (86_400, ""));
        let ClientCommand::Token(TokenCommand::Create { ttl, .. }) =
            parse(&["token", "create", "--ttl", "0", "-d", "site a"]).expect("parses")
        else {
            panic!("not token create")
        };
        assert_eq!(ttl, 0);
        assert!(parse(&["token", "create", "--ttl", "1 week"]).is_err());
    }

    #[test]
    fn device_arguments() {
        use crate::device::{Assignment, DeviceCommand, SetArgs, StreamFormat, WatchArgs};
        let ClientCommand::Device(DeviceCommand::Set(SetArgs { name, values, wait })) =
            parse(&["device", "set", "boiler-1", "setpoint=42", "mode=eco", "label=\"x y\""]).expect("parses")
        else {
            panic!("not device set")
        };
        assert_eq!(name, "boiler-1");
        assert_eq!(
            values,
            [
                Assignment { property: "setpoint".into(), value: json!(42) },
                Assignment { property: "mode".into(), value: json!("eco") },
                Assignment { property: "label".into(), value: json!("x y") },
            ]
        );
        assert_eq!(wait, None);
        let wait_of = |args: &[&str]| match parse(args).expect("parses") {
            ClientCommand::Device(DeviceCommand::Set(s)) => (s.wait, s.values.len()),
            other => panic!("not device set: {other:?}"),
        };
        assert_eq!(wait_of(&["device", "set", "d", "--wait", "a=1"]), (Some(Duration::from_secs(30)), 1));
        assert_eq!(wait_of(&["device", "set", "d", "a=1", "--wait=2m"]), (Some(Duration::from_secs(120)), 1));
        assert_eq!(wait_of(&["device", "set", "d", "a=1", "--wait=500ms"]), (Some(Duration::from_millis(500)), 1));
        for bad in [
            &["device", "set", "d"][..],
            &["device", "set", "d", "novalue"],
            &["device", "set", "d", "a=1", "--wait=0"],
            &["device", "set", "d", "a=1", "--wait=soon"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }

        let ClientCommand::Device(DeviceCommand::Watch(WatchArgs { name, properties, output })) =
            parse(&["device", "watch", "boiler-1", "--property", "temp,level", "-p", "mode", "-o", "json"])
                .expect("parses")
        else {
            panic!("not device watch")
        };
        assert_eq!((name.as_str(), output), ("boiler-1", StreamFormat::Json));
        assert_eq!(properties, ["temp", "level", "mode"]);
        let ClientCommand::Device(DeviceCommand::Watch(w)) = parse(&["device", "watch", "d"]).expect("parses") else {
            panic!("not device watch")
        };
        assert_eq!((w.properties.len(), w.output), (0, StreamFormat::Text));
        assert!(parse(&["device", "watch", "d", "-o", "yaml"]).is_err());
        let ClientCommand::Get(g) = parse(&["get", "dev", "-o", "wide"]).expect("parses") else { panic!("not get") };
        assert_eq!(g.kind, GetKind::Object(Kind::Device));
        let ClientCommand::Describe(d) = parse(&["describe", "dm", "boiler"]).expect("parses") else {
            panic!("not describe")
        };
        assert_eq!(d.kind, Kind::DeviceModel);
    }

    #[test]
    fn data_arguments() {
        use crate::data::{Agg, DataFormat, Span};
        let ClientCommand::Query(q) = parse(&[
            "query",
            r#"temperature{device="boiler-1"}"#,
            "--since",
            "2h",
            "--until",
            "2026-11-21T09:00:00Z",
            "--step",
            "1m",
            "--agg",
            "max",
            "-o",
            "csv",
        ])
        .expect("parses") else {
            panic!("not query")
        };
        assert_eq!(q.selector, r#"temperature{device="boiler-1"}"#);
        assert_eq!(
            (q.since, q.step, q.agg, q.output),
            (Span(7_200_000), Some(Span(60_000)), Some(Agg::Max), DataFormat::Csv)
        );
        assert_eq!(q.until, Some(1_795_251_600_000));
        let ClientCommand::Query(q) = parse(&["query", "up", "--until", "1700000000000"]).expect("parses") else {
            panic!("not query")
        };
        assert_eq!(
            (q.since, q.step, q.agg, q.output, q.until),
            (Span(3_600_000), None, None, DataFormat::Table, Some(1_700_000_000_000))
        );
        for bad in [
            &["query"][..],
            &["query", "up", "--agg", "avg"],
            &["query", "up", "--step", "1m", "--agg", "median"],
            &["query", "up", "--since", "0"],
            &["query", "up", "--since", "an hour"],
            &["query", "up", "--until", "noon"],
            &["query", "up", "--step", "0s"],
            &["query", "up", "-o", "yaml"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let ClientCommand::Series(s) =
            parse(&["series", "--match", r#"{node="edge-1"}"#, "-o", "json"]).expect("parses")
        else {
            panic!("not series")
        };
        assert_eq!((s.matcher.as_str(), s.output), (r#"{node="edge-1"}"#, DataFormat::Json));
        let ClientCommand::Series(s) = parse(&["series", "-m", "up"]).expect("parses") else { panic!("not series") };
        assert_eq!(s.output, DataFormat::Table);
        assert!(parse(&["series"]).is_err());
    }

    #[test]
    fn log_targets() {
        assert_eq!(LogTarget::parse("app/hello").ok(), Some(LogTarget::App("hello".into())));
        assert_eq!(LogTarget::parse("instances/hello-x").ok(), Some(LogTarget::Instance("hello-x".into())));
        assert_eq!(LogTarget::parse("hello").ok(), Some(LogTarget::Either("hello".into())));
        for bad in ["node/edge-1", "app/", "pod/x", "app/a/b", ""] {
            assert!(LogTarget::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn manifests_are_validated_before_any_network_call() {
        let dir = std::env::temp_dir().join(format!("yunbian-cli-apply-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let good = "apiVersion: yunbian.io/v1\nkind: App\nmetadata: {name: a}\nspec: {replicas: 1, runtime: fake}\n";
        std::fs::write(dir.join("1-good.yaml"), good).expect("write");
        std::fs::write(dir.join("2-bad.yml"), good.replace("replicas: 1", "replicas: -1")).expect("write");
        std::fs::write(dir.join("notes.txt"), "not a manifest").expect("write");
        let e = load_manifests(std::slice::from_ref(&dir)).expect_err("invalid");
        assert_eq!(e.to_string(), format!("{}: spec.replicas: must be >= 0", dir.join("2-bad.yml").display()));
        std::fs::remove_file(dir.join("2-bad.yml")).expect("remove");
        let ok = load_manifests(std::slice::from_ref(&dir)).expect("valid");
        assert_eq!(ok.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn list_renderings() {
        let items = vec![
            json!({"metadata": {"name": "g1"}, "spec": {"selector": {"site": "a"}}, "status": {"nodes": 2, "readyNodes": 1}}),
        ];
        assert_eq!(
            render_list(Kind::NodeGroup, &items, None, 0).expect("table"),
            "NAME   TIER   SITE     REGION   ZONE     COST     NODES   CPU   MEMORY\n\
             g1     edge   <none>   <none>   <none>   <none>   1/2     0/0   0/0\n"
        );
        let j: Value =
            serde_json::from_str(&render_list(Kind::NodeGroup, &items, Some(OutputFormat::Json), 0).expect("json"))
                .expect("valid json");
        assert_eq!(j["items"][0]["metadata"]["name"], "g1");
        let y = render_list(Kind::NodeGroup, &items, Some(OutputFormat::Yaml), 0).expect("yaml");
        assert!(y.starts_with("items:\n- metadata:\n    name: g1\n"), "{y}");
    }
}
