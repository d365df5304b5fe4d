//! The Modbus TCP and RTU driver: moves the requests planned by [`codec`]
//! over a [`tokio_modbus`] client and turns the answers into
//! [`PropertyRead`]s.
//!
//! # Connection states
//!
//! ```text
//!   new ──connect()──▶ connected ──read()/write()──▶ connected
//!    ▲                     │
//!    │     transport error, timeout or protocol violation
//!    │     (the connection is dropped: its state is unknown)
//!    └──── disconnected ◀──┘ ◀── disconnect()
//! ```
//!
//! `read` and `write` on a disconnected driver fail with a device-level
//! [`DriverError::Io`] "not connected"; the supervisor calls `connect` again.
//! Dropping the connection after any device-level failure means a late or
//! stray answer can never be taken for the answer to the next request.
//!
//! # Reads
//!
//! A full poll sends the cached [`codec::plan_reads`] plan (adjacent
//! properties in one request); `read(&["p"])` plans just `p`. Each request
//! is bounded by the device's `timeout`. Outcomes:
//! - a normal answer: each property decodes its slice; a decode error (NaN,
//!   bad UTF-8…) fails that property only;
//! - a Modbus exception (illegal address…): when the request carried several
//!   properties, each is re-read on its own, so good properties still get a
//!   value and only the bad one reports the exception;
//! - a transport error, a timeout, or an answer that breaks the protocol
//!   (wrong transaction id or function code, a length that does not match
//!   the request): the whole `read` fails with a [`DriverError`].
//!
//! # Writes
//!
//! Coils: function 5 (write single coil). Holding registers: function 6 for
//! one register, function 16 for several. Input registers and discrete
//! inputs are read-only. A value that does not fit the data type, or a
//! Modbus exception, is [`WriteError::Refused`]; the caller verifies by
//! reading back.

pub mod codec;
pub mod fuzzing;

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use tokio_modbus::client::{Client, Context};
use tokio_modbus::{ExceptionCode, Request, Response, Slave};
use yunbian_api::{ModbusRtu, Parity, Protocol, Quality, RegisterType};

use crate::driver::{duration_ms, DeviceConfig, Driver, DriverError, PropertyRead, Reading, WriteError};
use codec::{PlanOptions, Point, ReadPlan};

/// Timeout used when the spec's cannot be parsed (validated specs always can).
const DEFAULT_TIMEOUT_MS: u64 = 1_000;
/// Longest protocol error text kept (tokio-modbus errors can carry a whole response).
const MAX_ERROR_TEXT: usize = 300;

/// Where the device is.
#[derive(Debug, Clone)]
enum Endpoint {
    /// Modbus TCP.
    Tcp { host: String, port: u16 },
    /// Modbus RTU on a serial line.
    Rtu(ModbusRtu),
}

/// The answer to one read request.
enum Answer {
    Registers(Vec<u16>),
    Bits(Vec<bool>),
}

/// A Modbus TCP or RTU device.
pub struct ModbusDriver {
    device: String,
    endpoint: Endpoint,
    unit_id: u8,
    timeout: Duration,
    /// `spec.properties` in order: the point index, or why it cannot be read.
    properties: Vec<(String, Result<usize, String>)>,
    /// Index of `properties` by name.
    by_name: HashMap<String, usize>,
    points: Vec<Point>,
    options: PlanOptions,
    /// The plan of a full poll.
    full_plan: ReadPlan,
    link: Link,
}

/// The connection, and the request counter.
struct Link {
    ctx: Option<Context>,
    timeout: Duration,
    requests: u64,
    /// Stamps of readings (never going back).
    stamps: crate::driver::ReadStamps,
}

impl std::fmt::Debug for ModbusDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModbusDriver")
            .field("device", &self.device)
            .field("endpoint", &self.endpoint)
            .field("unit_id", &self.unit_id)
            .field("connected", &self.link.ctx.is_some())
            .finish_non_exhaustive()
    }
}

impl ModbusDriver {
    /// A driver for a `modbusTcp` or `modbusRtu` device (not yet connected).
    pub fn new(cfg: &DeviceConfig) -> Result<ModbusDriver, DriverError> {
        Self::with_options(cfg, PlanOptions::default())
    }

    /// A driver merging requests with `options` (see [`codec::PlanOptions`]).
    pub fn with_options(cfg: &DeviceConfig, options: PlanOptions) -> Result<ModbusDriver, DriverError> {
        let spec = &cfg.device.spec;
        let (endpoint, unit_id, timeout) = match &spec.protocol {
            Protocol::ModbusTcp(t) => {
                if t.host.is_empty() {
                    return Err(DriverError::Config("modbusTcp.host is empty".into()));
                }
                (Endpoint::Tcp { host: t.host.clone(), port: t.port }, t.unit_id, &t.timeout)
            }
            Protocol::ModbusRtu(r) => {
                if r.serial_port.is_empty() {
                    return Err(DriverError::Config("modbusRtu.serialPort is empty".into()));
                }
                (Endpoint::Rtu(r.clone()), r.unit_id, &r.timeout)
            }
            other => return Err(DriverError::Config(format!("protocol {} is not Modbus", other.name()))),
        };
        let timeout = Duration::from_millis(duration_ms(timeout, DEFAULT_TIMEOUT_MS).max(1));
        let model = &cfg.model.spec;
        let mut points = Vec::new();
        let mut properties = Vec::new();
        for pv in &spec.properties {
            let entry = match (&pv.modbus, model.property(&pv.name)) {
                (None, _) => Err("no modbus visitor".to_string()),
                (_, None) => Err(format!("model {:?} has no property {:?}", spec.model, pv.name)),
                (Some(v), Some(pm)) => {
                    points.push(Point::new(pv.name.clone(), v.clone(), pm.ty));
                    Ok(points.len() - 1)
                }
            };
            properties.push((pv.name.clone(), entry));
        }
        let full_plan = codec::plan_reads(&points, options);
        for (i, why) in &full_plan.unplannable {
            if let Some(entry) = properties.iter_mut().find(|(_, e)| *e == Ok(*i)) {
                entry.1 = Err(why.to_string());
            }
        }
        let by_name = properties.iter().enumerate().map(|(i, (n, _))| (n.clone(), i)).collect();
        Ok(ModbusDriver {
            device: cfg.name().to_string(),
            endpoint,
            unit_id,
            timeout,
            properties,
            by_name,
            points,
            options,
            full_plan,
            link: Link { ctx: None, timeout, requests: 0, stamps: crate::driver::ReadStamps::default() },
        })
    }

    /// Requests sent since the driver was built (for benchmarks and tests).
    pub fn requests_sent(&self) -> u64 {
        self.link.requests
    }

    /// The plan of a full poll.
    pub fn plan(&self) -> &ReadPlan {
        &self.full_plan
    }

    /// Whether a connection is open.
    pub fn is_connected(&self) -> bool {
        self.link.ctx.is_some()
    }

    fn point_of(&self, property: &str) -> Result<usize, String> {
        match self.by_name.get(property) {
            None => Err(format!("device {:?} has no property {property:?}", self.device)),
            Some(&i) => self.properties[i].1.clone(),
        }
    }
}

/// Opens a connection. A free function over owned values: the driver holds a
/// `Context`, which is not `Sync`, so `&ModbusDriver` must not live across an
/// await.
async fn open(endpoint: Endpoint, unit_id: u8, timeout: Duration) -> Result<Context, DriverError> {
    let slave = Slave(unit_id);
    match &endpoint {
        Endpoint::Tcp { host, port } => {
            let connect = async {
                let stream = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(|e| DriverError::Connect(format!("{host}:{port}: {e}")))?;
                // Requests are small and answered one at a time.
                stream.set_nodelay(true).map_err(|e| DriverError::Connect(e.to_string()))?;
                Ok(tokio_modbus::client::tcp::attach_slave(stream, slave))
            };
            tokio::time::timeout(timeout, connect)
                .await
                .map_err(|_| DriverError::Timeout(timeout.as_millis() as u64))?
        }
        Endpoint::Rtu(line) => {
            let builder = tokio_serial::new(&line.serial_port, line.baud_rate)
                .parity(match line.parity {
                    Parity::None => tokio_serial::Parity::None,
                    Parity::Even => tokio_serial::Parity::Even,
                    Parity::Odd => tokio_serial::Parity::Odd,
                })
                .data_bits(match line.data_bits {
                    5 => tokio_serial::DataBits::Five,
                    6 => tokio_serial::DataBits::Six,
                    7 => tokio_serial::DataBits::Seven,
                    _ => tokio_serial::DataBits::Eight,
                })
                .stop_bits(if line.stop_bits == 2 { tokio_serial::StopBits::Two } else { tokio_serial::StopBits::One })
                .timeout(timeout);
            let port = tokio_serial::SerialStream::open(&builder)
                .map_err(|e| DriverError::Connect(format!("{}: {e}", line.serial_port)))?;
            Ok(tokio_modbus::client::rtu::attach_slave(port, slave))
        }
    }
}

fn clip(mut s: String) -> String {
    if s.len() > MAX_ERROR_TEXT {
        let mut end = MAX_ERROR_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

fn exception_text(code: ExceptionCode) -> String {
    format!("Modbus exception 0x{:02X}: {code}", u8::from(code))
}

impl Link {
    fn drop_connection(&mut self) {
        // Dropping the context closes the socket or serial port.
        self.ctx = None;
    }

    /// Sends one request; `Ok(Err(_))` is a Modbus exception. Any
    /// device-level failure drops the connection.
    async fn call(&mut self, req: Request<'_>) -> Result<Result<Response, ExceptionCode>, DriverError> {
        let ctx = self.ctx.as_mut().ok_or_else(|| DriverError::Io("not connected".into()))?;
        self.requests += 1;
        let outcome = tokio::time::timeout(self.timeout, ctx.call(req)).await;
        let err = match outcome {
            Ok(Ok(answer)) => return Ok(answer),
            Err(_) => DriverError::Timeout(self.timeout.as_millis() as u64),
            Ok(Err(tokio_modbus::Error::Protocol(e))) => DriverError::Protocol(clip(e.to_string())),
            Ok(Err(tokio_modbus::Error::Transport(e))) => match e.kind() {
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput => {
                    DriverError::Protocol(clip(e.to_string()))
                }
                _ => DriverError::Io(clip(e.to_string())),
            },
        };
        self.drop_connection();
        Err(err)
    }

    /// Reads `quantity` registers or bits of `table` from `address`.
    async fn read(
        &mut self,
        table: RegisterType,
        address: u16,
        quantity: u16,
    ) -> Result<Result<Answer, ExceptionCode>, DriverError> {
        let req = match table {
            RegisterType::Coil => Request::ReadCoils(address, quantity),
            RegisterType::DiscreteInput => Request::ReadDiscreteInputs(address, quantity),
            RegisterType::Input => Request::ReadInputRegisters(address, quantity),
            RegisterType::Holding => Request::ReadHoldingRegisters(address, quantity),
        };
        let answer = match self.call(req).await? {
            Err(code) => return Ok(Err(code)),
            Ok(answer) => answer,
        };
        let want = usize::from(quantity);
        let checked = match (table, answer) {
            (RegisterType::Coil, Response::ReadCoils(mut bits))
            | (RegisterType::DiscreteInput, Response::ReadDiscreteInputs(mut bits)) => {
                // Bits come packed in whole bytes: exactly ceil(quantity/8) of them.
                if bits.len() / 8 != want.div_ceil(8) {
                    Err(format!("asked for {want} bits, got {} bytes of them", bits.len() / 8))
                } else {
                    bits.truncate(want);
                    Ok(Answer::Bits(bits))
                }
            }
            (RegisterType::Input, Response::ReadInputRegisters(words))
            | (RegisterType::Holding, Response::ReadHoldingRegisters(words)) => {
                if words.len() != want {
                    Err(format!("asked for {want} registers, got {}", words.len()))
                } else {
                    Ok(Answer::Registers(words))
                }
            }
            (_, other) => Err(format!("answer {:?} does not match the request", other.function_code())),
        };
        match checked {
            Ok(a) => Ok(Ok(a)),
            Err(why) => {
                self.drop_connection();
                Err(DriverError::Protocol(why))
            }
        }
    }

    /// Runs `plan` over `points`, filling `out[i]` for every point it reads.
    async fn run_plan(
        &mut self,
        plan: &ReadPlan,
        points: &[Point],
        out: &mut [Option<Result<Reading, String>>],
    ) -> Result<(), DriverError> {
        for req in &plan.requests {
            match self.read(req.table, req.address, req.quantity).await? {
                Ok(answer) => {
                    let ts_ms = self.stamps.stamp();
                    for slot in &req.slots {
                        out[slot.point] = Some(decode_slot(&points[slot.point], slot, &answer, ts_ms));
                    }
                }
                Err(code) if req.slots.len() == 1 => {
                    out[req.slots[0].point] = Some(Err(exception_text(code)));
                }
                Err(_) => {
                    // Isolate the bad address: each property on its own.
                    for slot in &req.slots {
                        let p = &points[slot.point];
                        let one = codec::Slot { offset: 0, ..*slot };
                        let result = match self.read(req.table, p.visitor.address, slot.quantity).await? {
                            Ok(answer) => decode_slot(p, &one, &answer, self.stamps.stamp()),
                            Err(code) => Err(exception_text(code)),
                        };
                        out[slot.point] = Some(result);
                    }
                }
            }
        }
        Ok(())
    }
}

fn decode_slot(p: &Point, slot: &codec::Slot, answer: &Answer, ts_ms: u64) -> Result<Reading, String> {
    let value = match answer {
        Answer::Registers(words) => match slot.slice(words) {
            Some(words) => codec::decode_registers(&p.visitor, p.ty, words),
            None => return Err("answer too short".into()),
        },
        Answer::Bits(bits) => match slot.slice(bits) {
            Some([bit]) => codec::decode_bit(&p.visitor, p.ty, *bit),
            _ => return Err("answer too short".into()),
        },
    };
    value.map(|value| Reading { value, ts_ms, quality: Quality::Good }).map_err(|e| e.to_string())
}

#[async_trait::async_trait]
impl Driver for ModbusDriver {
    async fn connect(&mut self) -> Result<(), DriverError> {
        self.disconnect().await;
        let ctx = open(self.endpoint.clone(), self.unit_id, self.timeout).await?;
        self.link.ctx = Some(ctx);
        tracing::debug!(device = %self.device, endpoint = ?self.endpoint, "modbus connected");
        Ok(())
    }

    async fn read(&mut self, only: &[String]) -> Result<Vec<PropertyRead>, DriverError> {
        let names: Vec<&str> = if only.is_empty() {
            self.properties.iter().map(|(n, _)| n.as_str()).collect()
        } else {
            only.iter().map(String::as_str).collect()
        };
        let mut out: Vec<Option<Result<Reading, String>>> = vec![None; self.points.len()];
        if only.is_empty() {
            self.link.run_plan(&self.full_plan, &self.points, &mut out).await?;
        } else {
            // Plan just the properties asked for.
            let mut wanted: Vec<usize> = names.iter().filter_map(|n| self.point_of(n).ok()).collect();
            wanted.sort_unstable();
            wanted.dedup();
            let subset: Vec<Point> = wanted.iter().map(|&i| self.points[i].clone()).collect();
            let plan = codec::plan_reads(&subset, self.options);
            let mut sub_out = vec![None; subset.len()];
            self.link.run_plan(&plan, &subset, &mut sub_out).await?;
            for (k, result) in sub_out.into_iter().enumerate() {
                out[wanted[k]] = result;
            }
        }
        Ok(names
            .into_iter()
            .map(|name| {
                let result = match self.point_of(name) {
                    Err(why) => Err(why),
                    Ok(i) => match out[i].clone() {
                        Some(r) => r.map(Some),
                        None => Err("not read".to_string()),
                    },
                };
                PropertyRead { property: name.to_string(), result }
            })
            .collect())
    }

    async fn write(&mut self, property: &str, value: &Value) -> Result<(), WriteError> {
        let i = self.point_of(property).map_err(WriteError::Refused)?;
        let p = &self.points[i];
        let address = p.visitor.address;
        let req = match p.visitor.register {
            RegisterType::Coil => {
                let on = codec::encode_bit(value).map_err(|e| WriteError::Refused(e.to_string()))?;
                Request::WriteSingleCoil(address, on)
            }
            RegisterType::Holding => {
                let words =
                    codec::encode_registers(&p.visitor, p.ty, value).map_err(|e| WriteError::Refused(e.to_string()))?;
                match words.as_slice() {
                    [word] => Request::WriteSingleRegister(address, *word),
                    _ if words.len() > usize::from(codec::MAX_WRITE_REGISTERS) => {
                        return Err(WriteError::Refused(format!(
                            "{} registers are more than one write may carry ({})",
                            words.len(),
                            codec::MAX_WRITE_REGISTERS
                        )))
                    }
                    _ => Request::WriteMultipleRegisters(address, Cow::Owned(words)),
                }
            }
            table @ (RegisterType::Input | RegisterType::DiscreteInput) => {
                return Err(WriteError::Refused(format!("{} registers are read-only", table.as_str())))
            }
        };
        match self.link.call(req).await? {
            Err(code) => Err(WriteError::Refused(exception_text(code))),
            Ok(
                Response::WriteSingleCoil(..)
                | Response::WriteSingleRegister(..)
                | Response::WriteMultipleRegisters(..),
            ) => Ok(()),
            Ok(other) => {
                self.link.drop_connection();
                Err(DriverError::Protocol(format!("answer {:?} does not match the write", other.function_code()))
                    .into())
            }
        }
    }

    async fn disconnect(&mut self) {
        if let Some(mut ctx) = self.link.ctx.take() {
            // A polite close; a peer that does not answer is simply dropped.
            let _ = tokio::time::timeout(self.timeout, ctx.disconnect()).await;
        }
    }
}
