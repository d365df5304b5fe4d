//! A simulated boiler speaking Modbus TCP, for the demo: input registers
//! 0–1 hold the water temperature (float32, high word first), holding
//! register 10 the setpoint in tenths of a degree (uint16), coil 0 the
//! burner. The temperature drifts towards the setpoint while the burner is
//! on, and cools otherwise. Serves function codes 1, 3, 4, 5, 6 and 16;
//! anything else gets exception 1, addresses past the tables exception 2.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TABLE: usize = 64;

#[derive(Debug)]
struct Tables {
    input: [u16; TABLE],
    holding: [u16; TABLE],
    coils: [bool; TABLE],
}

/// A running simulator.
pub struct Boiler {
    /// Where it listens.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Boiler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn set_temp(t: &mut Tables, celsius: f32) {
    let bits = celsius.to_bits();
    t.input[0] = (bits >> 16) as u16;
    t.input[1] = bits as u16;
}

/// Starts a boiler on `bind` (port 0: any).
pub async fn start(bind: &str) -> Result<Boiler> {
    let listener = tokio::net::TcpListener::bind(bind).await.with_context(|| format!("bind {bind}"))?;
    let addr = listener.local_addr()?;
    let tables = Arc::new(Mutex::new(Tables { input: [0; TABLE], holding: [0; TABLE], coils: [false; TABLE] }));
    {
        let mut t = tables.lock().expect("fresh lock");
        t.holding[10] = 600; // 60.0 °C
        t.coils[0] = true;
        set_temp(&mut t, 20.0);
    }
    let sim = tables.clone();
    let task = tokio::spawn(async move {
        let physics = async {
            let mut temp = 20.0f32;
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Ok(mut t) = sim.lock() else { return };
                let target = if t.coils[0] { t.holding[10] as f32 / 10.0 } else { 15.0 };
                temp += (target - temp) * 0.05;
                set_temp(&mut t, (temp * 100.0).round() / 100.0);
            }
        };
        let serve = async {
            loop {
                let Ok((sock, _)) = listener.accept().await else { continue };
                tokio::spawn(serve_conn(sock, sim.clone()));
            }
        };
        tokio::join!(physics, serve);
    });
    let _ = tables;
    Ok(Boiler { addr, task })
}

async fn serve_conn(mut sock: tokio::net::TcpStream, tables: Arc<Mutex<Tables>>) {
    let mut head = [0u8; 7];
    loop {
        if sock.read_exact(&mut head).await.is_err() {
            return;
        }
        let len = u16::from_be_bytes([head[4], head[5]]) as usize;
        if !(2..=254).contains(&len) {
            return;
        }
        let mut pdu = vec![0u8; len - 1];
        if sock.read_exact(&mut pdu).await.is_err() {
            return;
        }
        let reply = match tables.lock() {
            Ok(mut t) => answer(&mut t, &pdu),
            Err(_) => return,
        };
        let mut out = Vec::with_capacity(7 + reply.len());
        out.extend_from_slice(&head[..4]);
        out.extend_from_slice(&((reply.len() + 1) as u16).to_be_bytes());
        out.push(head[6]);
        out.extend_from_slice(&reply);
        if sock.write_all(&out).await.is_err() {
            return;
        }
    }
}

fn word(b: &[u8], i: usize) -> Option<usize> {
    Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]) as usize)
}

fn answer(t: &mut Tables, pdu: &[u8]) -> Vec<u8> {
    let fc = pdu.first().copied().unwrap_or(0);
    let exception = |code: u8| vec![fc | 0x80, code];
    let (Some(addr), Some(arg)) = (word(pdu, 1), word(pdu, 3)) else { return exception(3) };
    match fc {
        1 => {
            if arg == 0 || addr + arg > TABLE {
                return exception(2);
            }
            let mut bytes = vec![0u8; arg.div_ceil(8)];
            for i in 0..arg {
                if t.coils[addr + i] {
                    bytes[i / 8] |= 1 << (i % 8);
                }
            }
            let mut r = vec![fc, bytes.len() as u8];
            r.extend(bytes);
            r
        }
        3 | 4 => {
            if arg == 0 || addr + arg > TABLE {
                return exception(2);
            }
            let table = if fc == 3 { &t.holding } else { &t.input };
            let mut r = vec![fc, (arg * 2) as u8];
            for v in &table[addr..addr + arg] {
                r.extend_from_slice(&v.to_be_bytes());
            }
            r
        }
        5 => {
            if addr >= TABLE {
                return exception(2);
            }
            t.coils[addr] = arg == 0xFF00;
            pdu[..5].to_vec()
        }
        6 => {
            if addr >= TABLE {
                return exception(2);
            }
            t.holding[addr] = arg as u16;
            pdu[..5].to_vec()
        }
        16 => {
            if arg == 0 || addr + arg > TABLE || pdu.len() < 6 + arg * 2 {
                return exception(2);
            }
            for i in 0..arg {
                t.holding[addr + i] = word(pdu, 6 + i * 2).unwrap_or(0) as u16;
            }
            pdu[..5].to_vec()
        }
        _ => exception(1),
    }
}
