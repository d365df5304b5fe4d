//! `yunbian demo`: a cloud and three edge agents on this machine, each with
//! its own data directory, real sockets and mTLS, two sites, and a sample
//! app. Site b reaches the cloud through a fault-injection link
//! (`yunbian_faults::LinkProxy`); the demo cuts it for a while to show a
//! site running on its own and coming back without restarting anything.
//! Runs until Ctrl-C, then deletes every app deployed in it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::Value;
use yunbian_api::Kind;

/// Arguments of `yunbian demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where the demo keeps its data (reused on the next run).
    #[arg(long, default_value = "yunbian-demo")]
    dir: PathBuf,
    /// Cloud listen address.
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: String,
    /// Exit once the sample app is running (for scripted runs).
    #[arg(long)]
    exit_when_ready: bool,
    /// How long to cut site b's link to show offline autonomy; 0s skips it.
    #[arg(long, default_value = "12s", value_parser = crate::parse_duration)]
    outage: Duration,
}

/// The sample app the demo deploys.
pub const HELLO: &str = r#"apiVersion: yunbian.io/v1
kind: App
metadata:
  name: hello
spec:
  replicas: 3
  runtime: process
  process:
    command: ["/bin/sh", "-c", "while true; do echo \"$GREETING from $INSTANCE_NAME on $NODE_NAME\"; sleep 2; done"]
    env: {GREETING: hello}
  restartPolicy: Always
  resources:
    requests: {cpu: 50m, memory: 16Mi}
    limits: {cpu: 200m, memory: 64Mi}
"#;

/// The demo's two sites as NodeGroups, and an App with one instance per
/// site (site b runs it with its own setting).
pub const SITES: &str = r#"apiVersion: yunbian.io/v1
kind: NodeGroup
metadata: {name: site-a}
spec: {selector: {site: a}, site: a, region: east, zone: east-1, costPerCpuHour: 0.02}
---
apiVersion: yunbian.io/v1
kind: NodeGroup
metadata: {name: site-b}
spec: {selector: {site: b}, site: b, region: west, zone: west-1, costPerCpuHour: 0.03}
---
apiVersion: yunbian.io/v1
kind: App
metadata: {name: site-agent}
spec:
  runtime: process
  process:
    command: ["/bin/sh", "-c", "while true; do echo \"$MODE agent for $NODE_NAME\"; sleep 5; done"]
    env: {MODE: standard}
  resources:
    requests: {cpu: 20m, memory: 8Mi}
  placement:
    groups: [site-a, site-b]
    perGroup: {replicas: 1}
    overrides:
      - {group: site-b, env: {MODE: low-bandwidth}}
  onNodeLost: {action: reschedule, after: 10s}
"#;

/// The wasm sample app (examples/apps/wasm-hello), built into the binary
/// so the demo needs no wasm toolchain.
const WASM_HELLO: &[u8] = include_bytes!("../../../examples/apps/wasm-hello/wasm-hello.wasm");

/// Where the wasm sample listens (on its node, loopback).
const WASM_PORT: u16 = 18080;

const NODES: [(&str, &str); 3] = [("edge-a1", "a"), ("edge-a2", "a"), ("edge-b1", "b")];

/// Each agent's edge bus port (the first node's, plus its index).
const MQTT_BASE: u16 = 18831;

/// The device models, and the devices the demo attaches (`{BOILER}` is the
/// simulated boiler's Modbus address).
pub const DEVICES: &str = r#"apiVersion: yunbian.io/v1
kind: DeviceModel
metadata: {name: boiler}
spec:
  description: A gas boiler with a Modbus TCP controller
  properties:
    - {name: temperature, type: float, unit: "°C"}
    - {name: setpoint, type: float, unit: "°C", accessMode: ReadWrite, minimum: 30, maximum: 90}
    - {name: burner, type: bool, accessMode: ReadWrite}
---
apiVersion: yunbian.io/v1
kind: DeviceModel
metadata: {name: env-sensor}
spec:
  properties:
    - {name: temperature, type: float, unit: "°C"}
    - {name: humidity, type: float, unit: "%"}
---
apiVersion: yunbian.io/v1
kind: Device
metadata: {name: boiler-1}
spec:
  model: boiler
  node: edge-a1
  protocol: {modbusTcp: {host: "127.0.0.1", port: {BOILER_PORT}, unitId: 1}}
  collectCycle: 1s
  reportCycle: 2s
  deadband: 0.05
  properties:
    - {name: temperature, modbus: {register: input, address: 0, dataType: float32}}
    - {name: setpoint, modbus: {register: holding, address: 10, dataType: uint16, scale: 0.1}}
    - {name: burner, modbus: {register: coil, address: 0}}
---
apiVersion: yunbian.io/v1
kind: Device
metadata: {name: env-a2}
spec:
  model: env-sensor
  node: edge-a2
  protocol: {virtual: {seed: 2}}
  reportCycle: 5s
  properties:
    - {name: temperature, virtual: {generator: sine, amplitude: 3, period: 60s, offset: 22}}
    - {name: humidity, virtual: {generator: randomWalk, start: 45, step: 0.5, min: 20, max: 80}}
---
apiVersion: yunbian.io/v1
kind: Device
metadata: {name: env-b1}
spec:
  model: env-sensor
  nodeSelector: {site: b}
  protocol: {virtual: {seed: 3}}
  reportCycle: 5s
  properties:
    - {name: temperature, virtual: {generator: sine, amplitude: 5, period: 90s, offset: 18}}
    - {name: humidity, virtual: {generator: randomWalk, start: 60, step: 1, min: 20, max: 90}}
---
apiVersion: yunbian.io/v1
kind: Rule
metadata: {name: boiler-avg}
spec:
  nodeSelector: {site: a}
  source: {devices: {models: [boiler], properties: [temperature]}}
  steps:
    - filter: "quality == 'good'"
    - window: {size: 10s, aggregate: avg}
    - rename: temperature_avg_10s
  sinks:
    - tsdb: {}
    - mqtt: {topic: "rules/{tags.device}/temperature_avg"}
"#;

/// Edge data for the cloud: 10 s averages of every env sensor shipped by
/// store-and-forward (site b's keep flowing across its outage), and an
/// over-temperature alert.
const DATA_RULES: &str = r#"apiVersion: yunbian.io/v1
kind: Rule
metadata: {name: env-to-cloud}
spec:
  source: {devices: {models: [env-sensor], properties: [temperature]}}
  steps:
    - window: {size: 10s, aggregate: avg}
    - rename: temperature_avg_10s
  sinks:
    - cloud: {priority: 5}
---
apiVersion: yunbian.io/v1
kind: Rule
metadata: {name: env-hot}
spec:
  source: {devices: {models: [env-sensor], properties: [temperature]}}
  sinks:
    - alert: {when: "value > 23.0", severity: warning, message: "{tags.device}: {value} °C (limit 23)"}
"#;

/// The sample app that reads device data from its node's edge bus.
fn device_reader(exe: &str) -> String {
    format!(
        r#"apiVersion: yunbian.io/v1
kind: App
metadata: {{name: device-reader}}
spec:
  replicas: 1
  runtime: process
  process:
    command: ["{exe}", "device-reader"]
  placement: {{nodeSelector: {{site: a}}}}
  restartPolicy: Always
  resources:
    requests: {{cpu: 20m, memory: 16Mi}}
"#
    )
}

fn say(s: &str) {
    println!("\x1b[1m==>\x1b[0m {s}");
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> Result<()> {
    let dir = std::path::absolute(&args.dir).context("resolve the demo directory")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    say(&format!("starting the cloud in {}", dir.join("cloud").display()));
    let mut cloud_opts = yunbian_cloud::CloudOptions::new(dir.join("cloud"), &args.listen);
    // Short timers, so the outage shows within seconds.
    cloud_opts.hub.heartbeat = Duration::from_secs(2);
    cloud_opts.hub.grace = Duration::from_secs(6);
    let cloud = yunbian_cloud::start(cloud_opts).await?;
    // Site b's WAN link: a proxy the demo can cut and heal.
    let link = yunbian_faults::LinkProxy::start(cloud.addr).context("start site b's link")?;
    let link_url = format!("https://127.0.0.1:{}", link.addr().port());
    let config = yunbian_cli::ClientConfig::load(Some(&cloud.admin_config))?;
    let client = yunbian_cli::Client::new(config)?;

    let mut agents = Vec::new();
    let mut token: Option<yunbian_edge::JoinToken> = None;
    for (name, site) in NODES {
        let ddir = dir.join(name);
        if !yunbian_edge::Identity::exists(&ddir) {
            if token.is_none() {
                let t = client.create_token(3600, "yunbian demo").await?;
                say("created a join token (yunbian token create)");
                token = Some(t.parse()?);
            }
            let t = token.as_ref().context("join token")?;
            let labels = [("site".to_string(), site.to_string())].into();
            yunbian_edge::join(&ddir, &cloud.url, t, name, &labels, false)
                .await
                .with_context(|| format!("join {name}"))?;
            say(&format!("joined {name} (site={site}) with its own key and certificate in {}", ddir.display()));
        }
        let url = if site == "b" { &link_url } else { &cloud.url };
        yunbian_edge::identity::set_cloud_urls(&ddir, url)?;
        let mut opts = yunbian_edge::EdgeOptions::new(&ddir);
        opts.launcher = crate::launcher_options();
        // Agents on one machine share artifact chunks over loopback.
        opts.p2p.listen = Some("127.0.0.1:0".into());
        opts.agent.heartbeat = Duration::from_secs(1);
        opts.metrics_listen = Some("127.0.0.1:0".into());
        let i = agents.len() as u16;
        let mqtt = std::net::SocketAddr::from(([127, 0, 0, 1], MQTT_BASE + i));
        opts.devices.broker = Some(yunbian_bus::BrokerConfig {
            listeners: vec![yunbian_bus::ListenerConfig::plain(mqtt)],
            ..Default::default()
        });
        opts.devices.local_api = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 17790 + i)));
        let agent = yunbian_edge::start(opts).await?;
        if let Some(a) = agent.metrics_addr {
            say(&format!("agent {name} running; metrics at http://{a}/metrics"));
        }
        agents.push(agent);
    }

    let t0 = Instant::now();
    loop {
        let nodes = client.list(Kind::Node).await?;
        let ready =
            nodes.iter().filter(|n| n.pointer("/status/phase").and_then(Value::as_str) == Some("Ready")).count();
        if ready >= NODES.len() {
            say(&format!("{ready} nodes Ready"));
            break;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("only {ready} of {} nodes became Ready within 30 s", NODES.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let hello: Value = serde_yaml::from_str(HELLO).context("sample app")?;
    client.apply(&hello).await?;
    say("applied the sample app `hello` (3 replicas, process runtime)");

    let t0 = Instant::now();
    loop {
        let app = client.get_object(Kind::App, "hello").await?;
        let ready = app.pointer("/status/readyReplicas").and_then(Value::as_u64).unwrap_or(0);
        if ready >= 3 {
            say(&format!("hello is running: {ready}/3 instances Running after {:.1}s", t0.elapsed().as_secs_f64()));
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the sample app did not become ready within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for inst in client.list(Kind::AppInstance).await? {
        let g = |p: &str| inst.pointer(p).and_then(Value::as_str).unwrap_or("-").to_string();
        let pid = inst.pointer("/status/pid").and_then(Value::as_u64).unwrap_or(0);
        println!("    {:<18} on {:<8} {:<8} pid {pid}", g("/metadata/name"), g("/spec/node"), g("/status/phase"));
    }
    let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "yunbian".into());
    sites(&client).await?;
    if let Err(e) = wasm_app(&client, &dir).await {
        // The rest of the demo does not depend on it.
        say(&format!("the wasm sample did not come up: {e:#}"));
    }
    let _boiler = devices(&client, &exe).await?;
    for doc in yunbian_api::parse_manifests(DATA_RULES).context("demo data rules")? {
        client.apply(&doc.to_value()).await?;
    }
    say("applied the rules env-to-cloud (10 s averages of the env sensors, shipped to the cloud by store-and-forward) and env-hot (an Event when a sensor is over 23 °C)");
    let rules_at = Instant::now();
    if !args.outage.is_zero() {
        outage(&client, &link, args.outage).await?;
    }
    cloud_data(&client, rules_at).await?;
    println!(
        "\nThe cluster is up. In another terminal:\n\n    export YUNBIAN_CONFIG={}\n    {exe} get nodes -o wide\n    {exe} get nodegroups\n    {exe} describe app site-agent   (why each instance is where it is)\n    {exe} top nodes\n    {exe} get instances\n    {exe} get devices\n    {exe} describe device boiler-1\n    {exe} device set boiler-1 setpoint=80 --wait\n    {exe} device watch boiler-1\n    {exe} logs app/device-reader --follow\n    mosquitto_sub -p {MQTT_BASE} -t 'yunbian/devices/#' -v   (edge-a1's bus)\n    {exe} get rules -o wide\n    {exe} query 'temperature_avg_10s' --since 30m --step 1m --agg avg\n    {exe} series --match '{{node=~\"edge-.*\"}}'\n    {exe} get events\n    {exe} describe node edge-b1   (its data outbox)\n    curl -G http://127.0.0.1:17790/v1/query --data-urlencode 'q=temperature_avg_10s{{device=\"boiler-1\"}}' -d since=10m   (edge-a1's store)\n    {exe} logs app/hello --follow\n    curl http://127.0.0.1:{WASM_PORT}/   (the wasm sample; {exe} describe instance … shows how it ran)\n    {exe} artifact list\n    {exe} apply -f <your-app.yaml>\n\nPress Ctrl-C to stop (the demo's apps are deleted first, so no workload outlives it).",
        cloud.admin_config.display()
    );
    if args.exit_when_ready {
        return cleanup(&client).await;
    }
    tokio::signal::ctrl_c().await.context("wait for Ctrl-C")?;
    cleanup(&client).await
}

/// Applies the NodeGroups and the per-site App, and shows where each
/// instance went and why (what `describe app site-agent` shows).
async fn sites(client: &yunbian_cli::Client) -> Result<()> {
    for doc in yunbian_api::parse_manifests(SITES).context("demo sites")? {
        client.apply(&doc.to_value()).await?;
    }
    say("applied NodeGroups site-a and site-b, and site-agent: one instance per site, site b with its own MODE");
    let t0 = Instant::now();
    loop {
        let app = client.get_object(Kind::App, "site-agent").await?;
        let ready = app.pointer("/status/readyReplicas").and_then(Value::as_u64).unwrap_or(0);
        let placements = app.pointer("/status/placements").and_then(Value::as_array).cloned().unwrap_or_default();
        if ready >= 2 && placements.len() >= 2 {
            for p in placements {
                let g = |k: &str| p.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
                println!(
                    "    {:<22} on {:<8} group {:<7} because: {}",
                    g("instance"),
                    g("node"),
                    g("group"),
                    g("reason")
                );
            }
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("site-agent did not run in both sites within 60 s: {}", app["status"]);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Publishes the wasm sample app as an artifact and runs it (`runtime:
/// wasm`) on a site-a node, then asks it over HTTP.
async fn wasm_app(client: &yunbian_cli::Client, dir: &std::path::Path) -> Result<()> {
    let module = dir.join("wasm-hello.wasm");
    std::fs::write(&module, WASM_HELLO).with_context(|| format!("write {}", module.display()))?;
    let push = yunbian_cli::artifact::PushArgs {
        path: module,
        name: "wasm-hello".into(),
        version: "1.0".into(),
        platform: None,
        kind: None,
    };
    let report = yunbian_cli::artifact::push(client, &push).await.context("push the wasm sample")?;
    say(&format!(
        "pushed the artifact wasm-hello 1.0 ({} bytes, {}, sha256 {}…)",
        report.size,
        report.platform,
        &report.sha256[..12]
    ));
    let app = format!(
        "apiVersion: yunbian.io/v1\nkind: App\nmetadata: {{name: wasm-hello}}\nspec:\n  runtime: wasm\n  artifact: {{name: wasm-hello, version: \"1.0\"}}\n  process: {{env: {{HOST: 127.0.0.1, PORT: \"{WASM_PORT}\"}}}}\n  resources: {{limits: {{memory: 32Mi, cpu: 250m}}}}\n  placement: {{nodeSelector: {{site: a}}}}\n"
    );
    client.apply(&serde_yaml::from_str::<Value>(&app)?).await?;
    say("applied the wasm sample app `wasm-hello` (runtime wasm: pulled by its node, run by wasmtime in a shim process)");
    let t0 = Instant::now();
    loop {
        let running = client.list(Kind::AppInstance).await?.iter().any(|i| {
            i.pointer("/spec/app").and_then(Value::as_str) == Some("wasm-hello")
                && i.pointer("/status/phase").and_then(Value::as_str) == Some("Running")
        });
        if let (true, Ok(body)) = (running, http_get_local(WASM_PORT).await) {
            say(&format!("wasm-hello answers after {:.1}s: {}", t0.elapsed().as_secs_f64(), body.trim()));
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the wasm sample did not answer on 127.0.0.1:{WASM_PORT} within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The body of `GET /` on a loopback port.
async fn http_get_local(port: u16) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n").await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await??;
    match out.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
        _ => bail!("unexpected answer: {out:?}"),
    }
}

/// Attaches the demo's devices (a Modbus boiler simulated in-process,
/// virtual sensors), deploys the app that reads them from the edge bus,
/// and writes a desired value to the boiler.
async fn devices(client: &yunbian_cli::Client, exe: &str) -> Result<crate::modbus_sim::Boiler> {
    let boiler = crate::modbus_sim::start("127.0.0.1:0").await.context("start the simulated boiler")?;
    say(&format!("a simulated boiler speaks Modbus TCP on {}", boiler.addr));
    let manifests = DEVICES.replace("{BOILER_PORT}", &boiler.addr.port().to_string());
    for doc in yunbian_api::parse_manifests(&manifests).context("demo devices")? {
        client.apply(&doc.to_value()).await?;
    }
    say("applied device models boiler and env-sensor, devices boiler-1 (Modbus), env-a2 and env-b1 (virtual), and the rule boiler-avg (10 s averages into the edge time-series store and onto the bus)");
    let reader: Value = serde_yaml::from_str(&device_reader(exe)).context("device-reader app")?;
    client.apply(&reader).await?;
    say("applied the sample app `device-reader`: it reads every reading from its node's MQTT bus");
    let t0 = Instant::now();
    loop {
        let online: Vec<String> = client
            .list(Kind::Device)
            .await?
            .iter()
            .filter(|d| d.pointer("/status/state").and_then(Value::as_str) == Some("online"))
            .filter_map(|d| d.pointer("/metadata/name").and_then(Value::as_str).map(str::to_string))
            .collect();
        if online.len() >= 3 {
            say(&format!("devices online after {:.1}s: {}", t0.elapsed().as_secs_f64(), online.join(", ")));
            break;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("only {online:?} of 3 devices came online within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut b = client.get_object(Kind::Device, "boiler-1").await?;
    b["spec"]["desired"] = serde_json::json!({"setpoint": 72.5});
    if let Some(m) = b.as_object_mut() {
        m.remove("status");
    }
    client.apply(&b).await?;
    let t0 = Instant::now();
    loop {
        let b = client.get_object(Kind::Device, "boiler-1").await?;
        let t = &b["status"]["twins"]["setpoint"];
        let version = t.pointer("/desired/version").and_then(Value::as_u64).unwrap_or(u64::MAX);
        if t.pointer("/observedDesired").and_then(Value::as_u64).unwrap_or(0) >= version {
            say(&format!(
                "boiler-1 setpoint 72.5 written over Modbus and read back in {:.1}s; temperature now {}",
                t0.elapsed().as_secs_f64(),
                b["status"]["twins"]["temperature"]["reported"]["value"]
            ));
            break;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("the boiler's setpoint was not applied within 30 s: {t}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(boiler)
}

/// Waits for the env sensors' averages in the cloud's store (site b's
/// include what it buffered while its link was cut), prints them as
/// `yunbian query` does, and lists the alert events so far.
async fn cloud_data(client: &yunbian_cli::Client, since: Instant) -> Result<()> {
    let path = yunbian_cli::client::with_query(
        "/v1/data/query",
        &[
            ("q", "temperature_avg_10s".to_string()),
            ("since", "10m".into()),
            ("step", "30s".into()),
            ("agg", "avg".into()),
        ],
    );
    let t0 = Instant::now();
    loop {
        let body = client.get(&path).await?;
        let nodes: std::collections::BTreeSet<String> = body["series"]
            .as_array()
            .map(|a| {
                a.iter().filter_map(|s| s.pointer("/tags/node").and_then(Value::as_str).map(str::to_string)).collect()
            })
            .unwrap_or_default();
        if nodes.len() >= 2 {
            say(&format!(
                "the cloud's store holds the 10 s averages from {}, {:.1}s after the rules were applied (yunbian query 'temperature_avg_10s' --since 10m --step 30s):",
                nodes.into_iter().collect::<Vec<_>>().join(" and "),
                since.elapsed().as_secs_f64()
            ));
            let table = yunbian_cli::data::points_table(&body)?;
            for line in table.render().lines().take(12) {
                println!("    {line}");
            }
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("no averages from two nodes reached the cloud within 60 s: {body}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let events = client.list(Kind::Event).await?;
    if events.is_empty() {
        say("no over-temperature alert yet (env-hot raises one when a sensor passes 23 °C; see yunbian get events)");
    }
    for e in events {
        let g = |p: &str| {
            e.pointer(p).map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())).unwrap_or_default()
        };
        say(&format!(
            "event {}: {} {} ×{} — {}",
            g("/metadata/name"),
            g("/spec/severity"),
            g("/status/state"),
            g("/status/count"),
            g("/status/message")
        ));
    }
    Ok(())
}

/// Pids of the instances on `node`, by instance name.
async fn pids_on(client: &yunbian_cli::Client, node: &str) -> Result<Vec<(String, u64)>> {
    let mut v: Vec<(String, u64)> = client
        .list(Kind::AppInstance)
        .await?
        .iter()
        .filter(|i| i.pointer("/spec/node").and_then(Value::as_str) == Some(node))
        .map(|i| {
            let name = i.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_string();
            (name, i.pointer("/status/pid").and_then(Value::as_u64).unwrap_or(0))
        })
        .collect();
    v.sort();
    Ok(v)
}

async fn node_phase(client: &yunbian_cli::Client, node: &str) -> String {
    client
        .get_object(Kind::Node, node)
        .await
        .ok()
        .and_then(|n| n.pointer("/status/phase").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_default()
}

/// Cuts site b's link (packets vanish: no FIN, no RST), shows the cloud
/// losing the node while its workloads keep running, heals the link, and
/// shows the node back with the same processes.
async fn outage(client: &yunbian_cli::Client, link: &yunbian_faults::LinkProxy, length: Duration) -> Result<()> {
    let node = "edge-b1";
    let before = pids_on(client, node).await?;
    let local: Vec<u64> = before.iter().map(|(_, p)| *p).collect();
    say(&format!("cutting site b's link for {}s (a blackhole: packets vanish)", length.as_secs()));
    link.cut();
    let t0 = Instant::now();
    let mut seen_not_ready = false;
    while t0.elapsed() < length {
        if !seen_not_ready && node_phase(client, node).await == "NotReady" {
            seen_not_ready = true;
            say(&format!("the cloud marks {node} NotReady after {:.1}s", t0.elapsed().as_secs_f64()));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let alive = local.iter().filter(|p| **p > 0 && std::path::Path::new(&format!("/proc/{p}")).exists()).count();
    say(&format!("{alive} of {} workloads on {node} still running on their own (pids {local:?})", local.len()));
    link.heal().context("heal site b's link")?;
    say("link healed");
    let t1 = Instant::now();
    loop {
        if node_phase(client, node).await == "Ready" {
            break;
        }
        if t1.elapsed() > Duration::from_secs(60) {
            bail!("{node} did not come back within 60 s of the link healing");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = pids_on(client, node).await?;
    let restarted = after.iter().filter(|a| !before.contains(a)).count();
    say(&format!(
        "{node} Ready again {:.1}s after the heal; {} instance(s), {restarted} restarted or recreated by the reconnect",
        t1.elapsed().as_secs_f64(),
        after.len()
    ));
    Ok(())
}

async fn cleanup(client: &yunbian_cli::Client) -> Result<()> {
    // The demo is a sandbox: everything deployed in it stops with it, so no
    // workload outlives the agents that supervise it.
    say("deleting the demo's apps and waiting for their workloads to stop");
    for app in client.list(Kind::App).await.unwrap_or_default() {
        if let Some(name) = app.pointer("/metadata/name").and_then(Value::as_str) {
            let _ = client.delete_object(Kind::App, name).await;
        }
    }
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        if client.list(Kind::AppInstance).await.map(|l| l.is_empty()).unwrap_or(true) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Give the agents a moment to stop the processes they were told to remove.
    tokio::time::sleep(Duration::from_secs(2)).await;
    say("done");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_manifests_are_valid() {
        for (what, text, n) in [("HELLO", HELLO, 1), ("SITES", SITES, 3), ("DATA_RULES", DATA_RULES, 2)] {
            let docs = yunbian_api::parse_manifests(text).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(docs.len(), n, "{what}");
        }
    }
}
