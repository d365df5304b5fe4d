//! MQTT load generator, and a way to run our broker as its own process, so
//! the same generator measures our broker and Mosquitto alike
//! (`scripts/bench-mqtt.sh` runs both).
//!
//! ```text
//! mqtt_bench serve --port 1883                       # our broker, plain TCP, anonymous
//! mqtt_bench run --port 1883 --qos 1 --clients 100 --subscribers 10 --payload 64 --seconds 10
//! ```
//!
//! `run` connects `--subscribers` clients (MQTT 3.1.1), each subscribing to
//! its share of the topics `bench/0` … `bench/{clients-1}` (each topic has
//! exactly one subscriber), then `--clients` publishers, each publishing to
//! its own topic as fast as end-to-end flow control allows: a publisher
//! keeps at most `--window` messages between itself and its subscriber
//! (sent but not yet delivered), so the run measures what the broker
//! sustains without queueing up or dropping. A window that makes no
//! progress for 200 ms counts as lost and is refilled. Every payload starts
//! with the send time and the publisher's index; the subscribers record
//! publish→deliver latency. Prints one line:
//! `label qos clients subscribers delivered published msgs_per_s p50_us p99_us`.
//!
//! The client here is a minimal one written on the crate's codec.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use yunbian_bus::codec::SubscriptionOptions;
use yunbian_bus::codec::{decode, encode, Ack, Connect, Packet, Properties, Protocol, Publish, QoS, Subscribe};

struct Args {
    mode: String,
    host: String,
    port: u16,
    qos: QoS,
    clients: usize,
    subscribers: usize,
    payload: usize,
    seconds: u64,
    window: usize,
    label: String,
}

fn parse_args() -> Args {
    let mut a = Args {
        mode: String::new(),
        host: "127.0.0.1".into(),
        port: 1883,
        qos: QoS::AtMostOnce,
        clients: 100,
        subscribers: 10,
        payload: 64,
        seconds: 10,
        window: 10,
        label: "broker".into(),
    };
    let mut it = std::env::args().skip(1);
    a.mode = it.next().unwrap_or_default();
    while let Some(flag) = it.next() {
        let v = it.next().unwrap_or_else(|| die(&format!("{flag} needs a value")));
        let num = |v: &str| v.parse::<u64>().unwrap_or_else(|_| die(&format!("{flag}: not a number: {v}")));
        match flag.as_str() {
            "--host" => a.host = v,
            "--port" => a.port = num(&v) as u16,
            "--qos" => a.qos = QoS::from_u8(num(&v) as u8).unwrap_or_else(|| die("--qos: 0, 1 or 2")),
            "--clients" => a.clients = num(&v) as usize,
            "--subscribers" => a.subscribers = num(&v).max(1) as usize,
            "--payload" => a.payload = num(&v).max(12) as usize,
            "--seconds" => a.seconds = num(&v),
            "--window" => a.window = num(&v).max(1) as usize,
            "--label" => a.label = v,
            _ => die(&format!("unknown flag {flag}")),
        }
    }
    a
}

fn die(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(2)
}

/// Runtime worker threads: `MQTT_BENCH_WORKERS` (default 2). The edge
/// agent runs everything, broker included, on one worker.
fn main() {
    let workers = std::env::var("MQTT_BENCH_WORKERS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap_or_else(|e| die(&format!("runtime: {e}")));
    rt.block_on(async {
        let args = parse_args();
        match args.mode.as_str() {
            "serve" => serve(args.port).await,
            "run" => run(args).await,
            _ => die("usage: mqtt_bench serve|run [flags] (see the source's header)"),
        }
    });
}

async fn serve(port: u16) {
    let mut cfg = yunbian_bus::BrokerConfig::default();
    cfg.listeners[0].bind = SocketAddr::from(([127, 0, 0, 1], port));
    let broker = yunbian_bus::Broker::start(cfg).await.unwrap_or_else(|e| die(&format!("start broker: {e}")));
    eprintln!("listening on {:?}", broker.local_addrs());
    let _ = tokio::signal::ctrl_c().await;
    eprintln!("stats: {:?}", broker.stats());
    broker.shutdown().await;
}

/// A minimal MQTT 3.1.1 client connection.
struct Client {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl Client {
    async fn connect(addr: &str, id: String) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap_or_else(|e| die(&format!("connect {addr}: {e}")));
        let _ = stream.set_nodelay(true);
        let mut c = Client { stream, rbuf: BytesMut::with_capacity(64 * 1024), wbuf: BytesMut::new() };
        let connect = Connect {
            protocol: Protocol::V311,
            clean_start: true,
            keep_alive: 60,
            properties: Properties::default(),
            client_id: id,
            will: None,
            username: None,
            password: None,
        };
        c.queue(&Packet::Connect(Box::new(connect)));
        c.flush().await;
        match c.next().await {
            Some(Packet::ConnAck(a)) if a.code == 0 => c,
            other => die(&format!("CONNACK: {other:?}")),
        }
    }

    fn queue(&mut self, p: &Packet) {
        encode(p, Protocol::V311, &mut self.wbuf).unwrap_or_else(|e| die(&format!("encode: {e}")));
    }

    async fn flush(&mut self) {
        if let Err(e) = self.stream.write_all(&self.wbuf).await {
            die(&format!("write: {e}"));
        }
        self.wbuf.clear();
    }

    async fn next(&mut self) -> Option<Packet> {
        loop {
            match decode(&mut self.rbuf, Some(Protocol::V311), usize::MAX) {
                Ok(Some(p)) => return Some(p),
                Ok(None) => {}
                Err(e) => die(&format!("decode: {e}")),
            }
            match self.stream.read_buf(&mut self.rbuf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }
}

async fn run(args: Args) {
    let addr = format!("{}:{}", args.host, args.port);
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    // Per publisher: messages delivered to its subscriber, and a wake-up.
    let progress: Arc<Vec<(AtomicU64, tokio::sync::Notify)>> =
        Arc::new((0..args.clients).map(|_| (AtomicU64::new(0), tokio::sync::Notify::new())).collect());

    let mut subs = Vec::new();
    for j in 0..args.subscribers {
        let topics: Vec<usize> = (0..args.clients).filter(|k| k % args.subscribers == j).collect();
        let mut c = Client::connect(&addr, format!("bench-sub-{j}")).await;
        let filters =
            topics.iter().map(|k| (format!("bench/{k}"), SubscriptionOptions::qos(args.qos))).collect::<Vec<_>>();
        if filters.is_empty() {
            continue;
        }
        c.queue(&Packet::Subscribe(Subscribe { packet_id: 1, properties: Properties::default(), filters }));
        c.flush().await;
        match c.next().await {
            Some(Packet::SubAck(a)) if a.codes.iter().all(|&x| x < 0x80) => {}
            other => die(&format!("SUBACK: {other:?}")),
        }
        let stop = stop.clone();
        let progress = progress.clone();
        subs.push(tokio::spawn(async move {
            let mut latencies: Vec<u32> = Vec::with_capacity(1 << 16);
            loop {
                let next = tokio::select! {
                    p = c.next() => p,
                    _ = tokio::time::sleep(Duration::from_millis(200)), if stop.load(Ordering::Relaxed) => None,
                };
                match next {
                    Some(Packet::Publish(p)) => {
                        if let (Some(ts), Some(idx)) = (p.payload.get(..8), p.payload.get(8..12)) {
                            let sent = u64::from_be_bytes(ts.try_into().unwrap_or([0; 8]));
                            let idx = u32::from_be_bytes(idx.try_into().unwrap_or([0; 4])) as usize;
                            if let Some((delivered, notify)) = progress.get(idx) {
                                delivered.fetch_add(1, Ordering::Relaxed);
                                notify.notify_one();
                            }
                            let now = start.elapsed().as_nanos() as u64;
                            latencies.push((now.saturating_sub(sent) / 1000).min(u64::from(u32::MAX)) as u32);
                        }
                        if let (QoS::AtLeastOnce, Some(id)) = (p.qos, p.packet_id) {
                            c.queue(&Packet::PubAck(Ack::new(id)));
                            if c.wbuf.len() > 1024 || c.rbuf.is_empty() {
                                c.flush().await;
                            }
                        }
                    }
                    Some(_) => {}
                    None => break,
                }
            }
            latencies
        }));
    }

    let mut pubs = Vec::new();
    for i in 0..args.clients {
        let mut c = Client::connect(&addr, format!("bench-pub-{i}")).await;
        let stop = stop.clone();
        let published = published.clone();
        let progress = progress.clone();
        let (qos, window, size) = (args.qos, args.window as u64, args.payload);
        let topic = format!("bench/{i}");
        pubs.push(tokio::spawn(async move {
            let (delivered, notify) = &progress[i];
            let mut next_id: u16 = 1;
            let mut sent: u64 = 0;
            let mut seen = 0;
            while !stop.load(Ordering::Relaxed) {
                // Keep `window` messages between this publisher and its subscriber.
                let done = delivered.load(Ordering::Relaxed);
                let mut n = 0;
                while sent.saturating_sub(done) < window {
                    let mut payload = BytesMut::with_capacity(size);
                    payload.put_u64(start.elapsed().as_nanos() as u64);
                    payload.put_u32(i as u32);
                    payload.resize(size, 0x55);
                    let packet_id = (qos != QoS::AtMostOnce).then(|| {
                        let id = next_id;
                        next_id = next_id.checked_add(1).unwrap_or(1);
                        id
                    });
                    c.queue(&Packet::Publish(Publish {
                        dup: false,
                        qos,
                        retain: false,
                        topic: topic.clone(),
                        packet_id,
                        properties: Properties::default(),
                        payload: Bytes::from(payload),
                    }));
                    sent += 1;
                    n += 1;
                }
                if n > 0 {
                    c.flush().await;
                    published.fetch_add(n, Ordering::Relaxed);
                }
                tokio::select! {
                    p = c.next() => if p.is_none() { return },  // PUBACKs
                    _ = notify.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {
                        // No progress: what is outstanding was lost (dropped).
                        let now = delivered.load(Ordering::Relaxed);
                        if now == seen {
                            sent = now;
                        }
                        seen = now;
                    }
                }
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for p in pubs {
        let _ = p.await;
    }
    let published = published.load(Ordering::Relaxed);
    let mut all: Vec<u32> = Vec::new();
    for s in subs {
        if let Ok(l) = s.await {
            all.extend(l);
        }
    }
    let delivered = all.len() as u64;
    all.sort_unstable();
    let pct =
        |p: f64| all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(0);
    println!(
        "{} {} {} {} {} {} {:.0} {} {}",
        args.label,
        args.qos as u8,
        args.clients,
        args.subscribers,
        delivered,
        published,
        delivered as f64 / args.seconds as f64,
        pct(0.50),
        pct(0.99)
    );
}
