//! `yunbian`: one executable that is the cloud, the edge agent, the CLI,
//! the demo and the simulator.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::{Args, Parser, Subcommand};

mod bench;
mod bench_rollout;
mod demo;
mod device_reader;
mod modbus_sim;
mod plugin;
mod shim;
mod shim_oci;
mod sim;

#[derive(Debug, Parser)]
#[command(name = "yunbian", version, about = "Cloud–edge–device collaboration platform", propagate_version = true)]
struct Cli {
    /// Client config (server URL, CA, admin token); default $YUNBIAN_CONFIG, then ./admin.yaml.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the cloud control plane.
    Cloud(CloudArgs),
    /// Run the edge agent of a joined node, or join one (`yunbian edge join`).
    Edge(Box<EdgeArgs>),
    /// Start a cloud, three edge agents and a sample app on this machine.
    Demo(demo::DemoArgs),
    /// Run many simulated edge nodes in one process, for scale tests.
    Sim(sim::SimArgs),
    /// The demo's sample app: print device readings from the edge bus.
    #[command(hide = true)]
    DeviceReader(device_reader::DeviceReaderArgs),
    /// Measure the system (see docs/benchmarks.md).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run a workload that is not a native executable (started by the edge
    /// agent's process runtime, e.g. `shim wasm` for `runtime: wasm`).
    #[command(subcommand)]
    Shim(shim::ShimCommand),
    /// Run a device plugin next to the edge agent (`plugin nvidia`, `plugin fake`).
    #[command(subcommand)]
    Plugin(plugin::PluginCommand),
    #[command(flatten)]
    Client(yunbian_cli::ClientCommand),
}

#[derive(Debug, Args)]
struct CloudArgs {
    /// Directory for the store and credentials (created on first start).
    #[arg(long, default_value = "yunbian-cloud")]
    data_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: String,
    /// URL clients and edges use, if not https://<listen>.
    #[arg(long)]
    advertise: Option<String>,
    /// Heartbeat interval expected from edges.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    heartbeat: Duration,
    /// A node without heartbeat this long becomes NotReady.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    grace: Duration,
    /// Lifetime of node certificates (rotated by nodes at 80%).
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    node_cert_ttl: Duration,
    /// A node certificate that expired less than this ago can still be
    /// renewed (a site offline across its expiry recovers by itself).
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    node_cert_grace: Duration,
    /// Instances of a node NotReady this long are re-placed elsewhere (the
    /// node stops its copies when it reconnects); 0s: never.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    evict_after: Duration,
    /// State store: `embedded` (redb in the data directory, one replica) or
    /// `etcd://HOST:PORT[,HOST:PORT…]` (any number of replicas; controllers
    /// run on the elected leader).
    #[arg(long, default_value = "embedded")]
    store: String,
    /// Key prefix in etcd (several clusters can share one etcd).
    #[arg(long, default_value = "/yunbian")]
    etcd_prefix: String,
    /// Name of this replica in leader election (default: its URL).
    #[arg(long)]
    replica_id: Option<String>,
    /// Bytes per second this replica sends to nodes for artifact chunks,
    /// all together (e.g. 10Mi); 0 for no limit.
    #[arg(long, default_value = "0", value_parser = yunbian_api::quantity::parse_memory_bytes)]
    chunk_egress: u64,
    /// Chunk downloads from the cloud at once per site (the rest wait, or
    /// get the chunk from a peer; a node in no site counts alone); 0 for no
    /// limit.
    #[arg(long, default_value = "2")]
    cloud_pulls_per_site: usize,
    /// Chunk downloads from the cloud at once for all nodes together (each
    /// holds its chunk in memory while paced); 0 for no limit.
    #[arg(long, default_value = "256")]
    cloud_pulls_total: usize,
    /// While a chunk is on its way to a node of a site, and this long after,
    /// other nodes of that site wait for it to serve them instead of getting
    /// another copy from the cloud; 0s turns it off.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    cloud_copy_hold: Duration,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
struct EdgeArgs {
    #[command(subcommand)]
    join: Option<EdgeCommand>,
    #[command(flatten)]
    run: EdgeRunArgs,
}

#[derive(Debug, Args, Clone)]
struct EdgeRunArgs {
    /// The node's data directory.
    #[arg(long, default_value = "yunbian-edge")]
    data_dir: PathBuf,
    /// Serve agent metrics on this address (plain HTTP); "off" to disable.
    /// If the address is taken, the agent runs without metrics and says so.
    #[arg(long, default_value = "127.0.0.1:9470")]
    metrics_listen: String,
    /// Heartbeat interval.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    heartbeat: Duration,
    /// Replace the cloud URL(s) recorded at join, e.g. after adding
    /// replicas: URL[,URL…] (saved in node.yaml).
    #[arg(long = "cloud-urls", value_name = "URL[,URL…]")]
    cloud_urls: Option<String>,
    /// The edge MQTT broker's local listener (anonymous, plain); "off" runs
    /// no broker.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt_listen: String,
    /// An extra broker listener for devices on the site network, e.g.
    /// 0.0.0.0:8883; it requires --mqtt-passwords or --mqtt-client-ca.
    #[arg(long)]
    mqtt_site_listen: Option<std::net::SocketAddr>,
    /// PEM certificate chain of the site listener (turns on TLS).
    #[arg(long, requires = "mqtt_tls_key")]
    mqtt_tls_cert: Option<PathBuf>,
    /// PEM private key of the site listener.
    #[arg(long, requires = "mqtt_tls_cert")]
    mqtt_tls_key: Option<PathBuf>,
    /// CA of client certificates: the site listener then requires one (TLS only).
    #[arg(long, requires = "mqtt_tls_cert")]
    mqtt_client_ca: Option<PathBuf>,
    /// File of `user:password` lines for the site listener (keep it 0600;
    /// passwords are hashed in memory at start).
    #[arg(long)]
    mqtt_passwords: Option<PathBuf>,
    /// Local device HTTP API for apps; "off" to disable.
    #[arg(long, default_value = "127.0.0.1:7790")]
    device_api_listen: String,
    /// Upload limit of store-and-forward data (rules' cloud sinks), bytes
    /// per second, e.g. 256Ki; 0 for none.
    #[arg(long, default_value = "0", value_parser = yunbian_api::quantity::parse_memory_bytes)]
    data_bandwidth: u64,
    /// Most disk the data outbox may use; past it the lowest-priority,
    /// oldest batches are dropped (and counted).
    #[arg(long, default_value = "256Mi", value_parser = yunbian_api::quantity::parse_memory_bytes)]
    data_outbox_max: u64,
    /// Data batches older than this are dropped (and counted); 0s: never.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    data_outbox_ttl: Duration,
    /// When the edge time-series store syncs its write-ahead log: always
    /// (every batch), interval:<duration> (at most that much data lost on
    /// power loss) or never (the OS decides; safe against crashes only).
    #[arg(long, default_value = "interval:1s", value_name = "always|interval:DURATION|never", value_parser = yunbian_edge::rules::parse_fsync)]
    tsdb_fsync: yunbian_edge::rules::FsyncPolicy,
    /// Memory the edge time-series store accounts (head, series, indexes),
    /// e.g. 32Mi; new series past it are refused.
    #[arg(long, default_value = "32Mi", value_parser = yunbian_edge::rules::parse_memory_cap)]
    tsdb_memory_cap: usize,
    /// Most series the edge time-series store keeps.
    #[arg(long, default_value = "100000", value_parser = yunbian_edge::rules::parse_max_series)]
    tsdb_max_series: usize,
    /// Raw points older than this are rolled up (1-min and 1-h) and
    /// deleted; 0s: no age limit.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    tsdb_retention: Duration,
    /// Most disk the edge store's raw blocks may use (oldest rolled up and
    /// deleted first); its write-ahead log is sealed into blocks at 64Mi
    /// or a quarter of this, whichever is smaller. 0: no size limit.
    #[arg(long, default_value = "1Gi", value_parser = yunbian_api::quantity::parse_memory_bytes)]
    tsdb_max_bytes: u64,
    /// Serve cached artifact chunks to peers of the cluster (mTLS) on this
    /// address; "off" to not serve (pulls still use peers).
    #[arg(long, default_value = "0.0.0.0:7444")]
    p2p_listen: String,
    /// The address peers use to reach this node's peer server (NAT, a
    /// proxy); default: the listen port at the address the cloud sees.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
    p2p_advertise: Option<String>,
    /// How often the agent measures round trips: pings to the cloud and
    /// probes of its group peers (docs/design/018-latency-and-peer-health.md).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    probe_every: Duration,
    /// The unix socket where device plugins register (`yunbian plugin …`,
    /// docs/design/017-device-plugins.md); default
    /// `<data-dir>/device-plugins.sock`, "off" for none.
    #[arg(long, value_name = "PATH|off")]
    device_plugin_socket: Option<String>,
    /// Upload limit to peers, bytes per second (e.g. 4Mi); 0 for none.
    #[arg(long, default_value = "0", value_parser = yunbian_api::quantity::parse_memory_bytes)]
    p2p_upload: u64,
    /// Download limit of artifact chunks (peers and cloud together), bytes
    /// per second; 0 for none.
    #[arg(long, default_value = "0", value_parser = yunbian_api::quantity::parse_memory_bytes)]
    artifact_download: u64,
    /// Most disk the artifact cache may use (least recently used blobs not
    /// in use go first).
    #[arg(long, default_value = "2Gi", value_parser = yunbian_api::quantity::parse_memory_bytes)]
    artifact_cache_max: u64,
}

/// The broker configuration the edge flags describe.
fn broker_config(run: &EdgeRunArgs) -> Result<Option<yunbian_bus::BrokerConfig>> {
    use yunbian_bus::{Auth, BrokerConfig, ListenerConfig, TlsConfig, Users};
    if run.mqtt_listen == "off" {
        if run.mqtt_site_listen.is_some() {
            anyhow::bail!("--mqtt-site-listen needs the broker: drop --mqtt-listen off");
        }
        return Ok(None);
    }
    let local: std::net::SocketAddr =
        run.mqtt_listen.parse().with_context(|| format!("--mqtt-listen {:?}: not an address", run.mqtt_listen))?;
    let mut cfg = BrokerConfig { listeners: vec![ListenerConfig::plain(local)], ..Default::default() };
    if let Some(bind) = run.mqtt_site_listen {
        let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()));
        let tls = match (&run.mqtt_tls_cert, &run.mqtt_tls_key) {
            (Some(c), Some(k)) => Some(TlsConfig {
                cert_chain_pem: read(c)?,
                key_pem: read(k)?,
                client_ca_pem: run.mqtt_client_ca.as_ref().map(read).transpose()?,
            }),
            _ => None,
        };
        let auth = match &run.mqtt_passwords {
            Some(p) => {
                let mut users = Users::new();
                for (i, line) in read(p)?.lines().enumerate() {
                    let line = line.trim();
                    if line.is_empty() || line.starts_with('#') {
                        continue;
                    }
                    let (u, pw) = line
                        .split_once(':')
                        .with_context(|| format!("{}:{}: expected user:password", p.display(), i + 1))?;
                    users = users.with_password(u, pw).with_context(|| format!("{}:{}", p.display(), i + 1))?;
                }
                Auth::Password(users)
            }
            None => Auth::Anonymous,
        };
        let client_certs = tls.as_ref().is_some_and(|t| t.client_ca_pem.is_some());
        if matches!(auth, Auth::Anonymous) && !client_certs {
            anyhow::bail!(
                "--mqtt-site-listen is reachable from the site network: give --mqtt-passwords or --mqtt-client-ca"
            );
        }
        let mut l = ListenerConfig::plain(bind);
        l.tls = tls;
        l.auth = auth;
        cfg.listeners.push(l);
    }
    Ok(Some(cfg))
}

#[derive(Debug, Subcommand)]
enum EdgeCommand {
    /// Join a cluster with a token, then run the agent.
    Join(Box<JoinArgs>),
    /// Load an artifact export file (`yunbian artifact export`) into this
    /// node's artifact cache, for sites the registry cannot reach: apps
    /// using it then start without fetching a chunk.
    Import(EdgeImportArgs),
}

#[derive(Debug, Args)]
struct EdgeImportArgs {
    /// The export file.
    file: PathBuf,
    /// The node's data directory.
    #[arg(long, default_value = "yunbian-edge")]
    data_dir: PathBuf,
}

#[derive(Debug, Args)]
struct JoinArgs {
    /// Cloud URL, e.g. https://cloud.example:7443, or several replicas'
    /// URLs separated by commas (the agent fails over between them).
    #[arg(long, value_name = "URL[,URL…]")]
    cloud: String,
    /// Join token from `yunbian token create`.
    #[arg(long)]
    token: String,
    /// Node name (lower-case letters, digits, '-').
    #[arg(long)]
    name: String,
    /// Node labels: k=v,k2=v2.
    #[arg(long, value_parser = parse_labels, default_value = "")]
    labels: BTreeMap<String, String>,
    /// Join only; do not run the agent afterwards.
    #[arg(long)]
    no_run: bool,
    /// Join again although the data directory holds an identity (a node
    /// whose certificate expired past the renewal grace); the local state
    /// and running workloads are kept.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    run: EdgeRunArgs,
}

/// `30s`, `15m`, `24h`, `7d`, `500ms`, `1h30m` (the CLI's duration syntax).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    yunbian_cli::time::parse_duration_ms(s).map(Duration::from_millis)
}

/// `host:port` with a non-zero port (`--p2p-advertise`).
fn parse_host_port(s: &str) -> Result<String, String> {
    let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("{s:?} is not host:port"))?;
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(format!("{s:?}: bad host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(s.to_string()),
        _ => Err(format!("{s:?}: bad port")),
    }
}

/// `k=v,k2=v2`.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut m = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| format!("label {part:?} is not k=v"))?;
        m.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(m)
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("YUNBIAN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}

/// The runtimes this binary offers beside `process`: `wasm` when built with
/// it, `oci` when crun is installed; both run through `yunbian shim`.
pub(crate) fn launcher_options() -> yunbian_edge::launcher::LauncherOptions {
    yunbian_edge::launcher::LauncherOptions {
        shim_exe: std::env::current_exe().ok(),
        wasm: cfg!(feature = "wasm"),
        oci: Some(yunbian_runtime::oci::detect_crun(None)),
        ..Default::default()
    }
}

fn main() {
    let cli = Cli::parse();
    // A shim is a workload process with its own runtime: it starts none of
    // the async runtime below.
    let cli = match cli.command {
        Command::Shim(cmd) => std::process::exit(shim::run(cmd)),
        command => Cli { command, ..cli },
    };
    // The edge agent is mostly idle I/O: one worker thread keeps it small.
    // The cloud, demo and simulator use one worker per core.
    let mut builder = match &cli.command {
        Command::Edge(e) => {
            // The OPC UA client keeps its PKI (application certificate,
            // trusted and rejected server certificates) in this node's data
            // directory, not in a shared /tmp default. Set while the process
            // is still single-threaded.
            if std::env::var_os("YUNBIAN_OPCUA_PKI_DIR").is_none() {
                let dir = match &e.join {
                    Some(EdgeCommand::Join(j)) => &j.run.data_dir,
                    Some(EdgeCommand::Import(i)) => &i.data_dir,
                    None => &e.run.data_dir,
                };
                let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
                std::env::set_var("YUNBIAN_OPCUA_PKI_DIR", dir.join("opcua-pki"));
            }
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(1).max_blocking_threads(8);
            b
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Client(cmd) => yunbian_cli::run(cli.config, cmd).await,
        Command::Bench(cmd) => bench::run(cli.config, cmd).await,
        Command::Cloud(a) => {
            init_tracing();
            let mut opts = yunbian_cloud::CloudOptions::new(&a.data_dir, &a.listen);
            opts.advertise = a.advertise;
            opts.hub.heartbeat = a.heartbeat;
            opts.hub.grace = a.grace;
            opts.node_cert_ttl = a.node_cert_ttl;
            opts.node_cert_grace = a.node_cert_grace;
            opts.controllers.evict_after = Some(a.evict_after).filter(|d| !d.is_zero());
            opts.store = yunbian_cloud::StoreConfig::parse(&a.store, &a.etcd_prefix).map_err(|e| anyhow!(e))?;
            opts.replica_id = a.replica_id;
            opts.p2p.egress_bytes_per_sec = Some(a.chunk_egress).filter(|b| *b > 0);
            opts.p2p.cloud_pulls_per_site = Some(a.cloud_pulls_per_site).filter(|n| *n > 0);
            opts.p2p.cloud_pulls_total = Some(a.cloud_pulls_total).filter(|n| *n > 0);
            opts.p2p.copy_hold = a.cloud_copy_hold;
            let cloud = yunbian_cloud::start(opts).await?;
            eprintln!("cloud listening at {}; client config: {}", cloud.url, cloud.admin_config.display());
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("install the SIGTERM handler")?;
            // Wait on the server through a watch on the handle so a signal
            // can still stop it cleanly (releasing leadership at once).
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
                _ = cloud.server_stopped() => return Err(anyhow!("cloud server stopped")),
            }
            eprintln!("stopping: releasing leadership and connections");
            cloud.stop().await;
            Ok(())
        }
        Command::Edge(e) => {
            init_tracing();
            let e = *e;
            let run = match e.join {
                Some(EdgeCommand::Join(j)) => {
                    let token = j.token.parse::<yunbian_edge::JoinToken>()?;
                    let id = yunbian_edge::join(&j.run.data_dir, &j.cloud, &token, &j.name, &j.labels, j.force).await?;
                    eprintln!("joined as node {} (certificate in {})", id.config.name, j.run.data_dir.display());
                    if j.no_run {
                        return Ok(());
                    }
                    j.run
                }
                Some(EdgeCommand::Import(i)) => {
                    let source = std::sync::Arc::new(yunbian_edge::artifacts::CloudSource::from_data_dir(&i.data_dir)?);
                    let cache =
                        yunbian_edge::artifacts::ArtifactCache::attach(&i.data_dir, source, Default::default())?;
                    let r = cache.import_file(&i.file).await?;
                    println!(
                        "imported {} version {} ({}): {} chunks, {} new in {}",
                        r.name,
                        r.version,
                        r.platforms.join(", "),
                        r.chunks,
                        r.stored,
                        cache.root().display()
                    );
                    return Ok(());
                }
                None => e.run,
            };
            let mut opts = yunbian_edge::EdgeOptions::new(&run.data_dir);
            opts.metrics_listen = Some(run.metrics_listen.clone()).filter(|m| m != "off");
            opts.agent.heartbeat = run.heartbeat;
            opts.devices.broker = broker_config(&run)?;
            opts.devices.local_api = match run.device_api_listen.as_str() {
                "off" => None,
                a => Some(a.parse().with_context(|| format!("--device-api-listen {a:?}: not an address"))?),
            };
            opts.devices.shipping.bandwidth = run.data_bandwidth;
            opts.devices.shipping.max_bytes = run.data_outbox_max;
            opts.devices.shipping.ttl = run.data_outbox_ttl;
            opts.devices.tsdb.fsync = run.tsdb_fsync;
            opts.devices.tsdb.memory_cap_bytes = run.tsdb_memory_cap;
            opts.devices.tsdb.max_series = run.tsdb_max_series;
            opts.devices.tsdb.raw_retention_ms =
                Some(i64::try_from(run.tsdb_retention.as_millis()).unwrap_or(i64::MAX)).filter(|ms| *ms > 0);
            opts.devices.tsdb.max_raw_bytes = Some(run.tsdb_max_bytes).filter(|b| *b > 0);
            opts.launcher = launcher_options();
            opts.p2p.listen = Some(run.p2p_listen.clone()).filter(|l| l != "off");
            opts.p2p.advertise = run.p2p_advertise.clone();
            opts.agent.network = std::sync::Arc::new(yunbian_edge::probe::NetworkMonitor::new(run.probe_every));
            match run.device_plugin_socket.as_deref() {
                Some("off") => opts.device_plugin_socket = None,
                Some(p) => opts.device_plugin_socket = Some(PathBuf::from(p)),
                None => {}
            }
            opts.p2p.upload.upload_bytes_per_sec = Some(run.p2p_upload).filter(|b| *b > 0);
            opts.p2p.download.download_bytes_per_sec = Some(run.artifact_download).filter(|b| *b > 0);
            opts.artifacts.limit = run.artifact_cache_max;
            if let Some(urls) = &run.cloud_urls {
                yunbian_edge::identity::set_cloud_urls(&run.data_dir, urls)?;
            }
            let mut agent = yunbian_edge::start(opts).await?;
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("install the SIGTERM handler")?;
            tokio::select! {
                r = agent.task_mut() => return r.context("agent task")?.context("agent stopped"),
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("stopping: sealing the data outbox; workloads keep running");
            agent.shutdown().await;
            Ok(())
        }
        Command::Demo(a) => {
            init_tracing();
            demo::run(a).await
        }
        Command::DeviceReader(a) => device_reader::run(a).await,
        Command::Plugin(cmd) => {
            init_tracing();
            plugin::run(cmd).await
        }
        Command::Shim(_) => Err(anyhow!("the shim runs before the async runtime starts")),
        Command::Sim(a) => {
            init_tracing();
            sim::run(a).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_labels() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("7 days").is_err());
        assert_eq!(parse_labels("site=a, zone=z1").map(|m| m.len()), Ok(2));
        assert!(parse_labels("site").is_err());
        assert_eq!(parse_labels(""), Ok(BTreeMap::new()));
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
