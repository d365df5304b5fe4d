//! `yunbian device-reader`: the demo's sample app that reads device data
//! from its node's edge bus. It connects to the broker named by
//! `YUNBIAN_MQTT` (set by the agent for every workload), subscribes to every
//! device reading, and prints one line per message. A small MQTT 3.1.1
//! client on the bus crate's codec: what any app in any language does with
//! its own MQTT library.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use yunbian_bus::codec::{self, Connect, Packet, Subscribe, SubscriptionOptions};
use yunbian_bus::{Properties, Protocol, QoS};

/// Arguments of `yunbian device-reader`.
#[derive(Debug, Args)]
pub struct DeviceReaderArgs {
    /// Broker address (default: `$YUNBIAN_MQTT`, then 127.0.0.1:1883).
    #[arg(long)]
    broker: Option<String>,
    /// Topic filter.
    #[arg(long, default_value = "yunbian/devices/+/properties/+")]
    topic: String,
}

const KEEP_ALIVE: u16 = 30;

/// Reads and prints until the connection ends; reconnects with a pause.
pub async fn run(args: DeviceReaderArgs) -> Result<()> {
    let broker =
        args.broker.or_else(|| std::env::var("YUNBIAN_MQTT").ok()).unwrap_or_else(|| "127.0.0.1:1883".to_string());
    loop {
        if let Err(e) = read(&broker, &args.topic).await {
            eprintln!("device-reader: {e:#}; reconnecting in 2s");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn read(broker: &str, topic: &str) -> Result<()> {
    let mut sock = tokio::net::TcpStream::connect(broker).await.with_context(|| format!("connect to {broker}"))?;
    let id = format!("device-reader-{}", std::process::id());
    let mut out = BytesMut::new();
    let connect = Connect {
        protocol: Protocol::V311,
        clean_start: true,
        keep_alive: KEEP_ALIVE,
        properties: Properties::default(),
        client_id: id,
        will: None,
        username: None,
        password: None,
    };
    codec::encode(&Packet::Connect(Box::new(connect)), Protocol::V311, &mut out).context("encode CONNECT")?;
    let sub = Subscribe {
        packet_id: 1,
        properties: Properties::default(),
        filters: vec![(topic.to_string(), SubscriptionOptions::qos(QoS::AtMostOnce))],
    };
    codec::encode(&Packet::Subscribe(sub), Protocol::V311, &mut out).context("encode SUBSCRIBE")?;
    sock.write_all(&out).await.context("send CONNECT and SUBSCRIBE")?;
    println!("device-reader: subscribed to {topic} on {broker}");
    let mut buf = BytesMut::with_capacity(4096);
    let mut ping = tokio::time::interval(Duration::from_secs(KEEP_ALIVE as u64 / 2));
    loop {
        tokio::select! {
            _ = ping.tick() => {
                let mut p = BytesMut::new();
                codec::encode(&Packet::PingReq, Protocol::V311, &mut p).context("encode PINGREQ")?;
                sock.write_all(&p).await.context("send PINGREQ")?;
            }
            n = sock.read_buf(&mut buf) => {
                if n.context("read")? == 0 {
                    bail!("broker closed the connection");
                }
                while let Some(packet) = codec::decode(&mut buf, Some(Protocol::V311), 1 << 20).context("decode")? {
                    match packet {
                        Packet::ConnAck(a) if a.code != 0 => bail!("broker refused the connection (code {})", a.code),
                        Packet::Publish(p) => print_reading(&p.topic, &p.payload),
                        _ => {}
                    }
                }
            }
        }
    }
}

fn print_reading(topic: &str, payload: &[u8]) {
    // yunbian/devices/<device>/properties/<property>
    let parts: Vec<&str> = topic.split('/').collect();
    let (device, prop) = match parts.as_slice() {
        ["yunbian", "devices", d, "properties", p] => (*d, *p),
        _ => (topic, ""),
    };
    let v: serde_json::Value = serde_json::from_slice(payload).unwrap_or(serde_json::Value::Null);
    let quality = v["quality"].as_str().unwrap_or("?");
    println!("{device:<12} {prop:<10} = {:<10} ({quality})", v["value"]);
}
