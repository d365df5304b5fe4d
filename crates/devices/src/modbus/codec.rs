//! The Modbus protocol logic that decides things, sans-IO (no sockets, no
//! clock, no tokio): which requests a poll sends, and how register contents
//! become property values and back.
//!
//! # Read planning
//!
//! [`plan_reads`] turns the device's [`Point`]s (property + visitor + model
//! type) into [`ReadRequest`]s, one register table at a time:
//!
//! 1. the points of a table are sorted by address (then size);
//! 2. a point joins the current request when it starts at most
//!    [`PlanOptions::max_gap`] registers (or bits) after the request's end —
//!    so overlapping and adjacent points always merge — and the merged
//!    request stays within the protocol maximum ([`MAX_READ_REGISTERS`] = 125
//!    registers for functions 3/4, [`MAX_READ_BITS`] = 2000 bits for 1/2);
//! 3. otherwise the current request is closed and a new one starts.
//!
//! Every request lists its [`Slot`]s: which point, at which offset of the
//! response, how many registers. A point that cannot be read at all (larger
//! than a request may be, or running past address 65535) is returned in
//! [`ReadPlan::unplannable`] with why, so only that property fails.
//!
//! `max_gap` defaults to **0**: reading registers nobody asked for can hit
//! unmapped addresses, which many devices answer with an exception for the
//! whole request. Devices known to map their whole range can raise it to
//! save round trips.
//!
//! # Value coding
//!
//! Registers travel as big-endian 16-bit words. A value of `n` registers is
//! assembled as follows (and [`encode_registers`] does the exact inverse):
//!
//! 1. **word order** (numbers only): `big` — the first register holds the
//!    most significant word (Modbus's own order); `little` — the first
//!    register holds the least significant word, so the registers are
//!    reversed. Strings keep their characters in register order.
//! 2. **byte order** within each register: `big` — the high byte first;
//!    `little` — the two bytes of every register are swapped.
//! 3. the resulting bytes are read as a big-endian `int16`, `uint16`,
//!    `int32`, `uint32`, IEEE 754 `float32` or `float64`; `bool` is "the
//!    register is not 0"; `string` is the bytes with trailing NULs trimmed,
//!    which must be UTF-8.
//!
//! Example: float32 10.0 is `0x41200000`; with word order big it is the
//! registers `[0x4120, 0x0000]`, with word order little `[0x0000, 0x4120]`.
//!
//! Numbers then become `raw × scale + offset`, typed as the model says:
//!
//! - an `int` property is a JSON integer, computed exactly in integers when
//!   scale and offset are integral (the model check requires it); a result
//!   that is not an integer or does not fit an `i64` is an error;
//! - a `float` property is a JSON number. Where the scale is the inverse of
//!   an integer `n` (0.1, 0.01, 0.5…), the value is computed as `raw / n`,
//!   which is correctly rounded, so 215 × 0.1 reads as 21.5 and 12 × 0.1 as
//!   1.2, not 1.2000000000000002. A float32 becomes the shortest decimal that
//!   round-trips (0.1f32 reads as 0.1, not 0.10000000149011612). NaN and
//!   infinities are errors: JSON cannot carry them and they are never
//!   readings;
//! - a `bool` property of a numeric type is `raw ≠ 0`.
//!
//! Coils and discrete inputs are single bits: `true`/`false` for bool
//! properties, 1/0 for numbers.
//!
//! Writing inverts this: `raw = (value − offset) / scale` (or `× n`). For
//! integer data types the raw value is **rounded to the nearest integer,
//! ties away from zero** (a setpoint of 21.55 with scale 0.1 writes 216);
//! integer values with integral scale and offset are computed exactly. A raw
//! value outside the data type's range (say 70000 for a uint16, or a
//! negative one for uint32) is an error, never a wrapped or clamped write.
//! Float32 writes round to the nearest float32; one beyond float32's range
//! is an error. Strings are NUL-padded to `count` registers and an error
//! when longer.

use serde_json::{Number, Value};
use yunbian_api::{Endian, ModbusDataType, ModbusVisitor, PropertyType, RegisterType};

/// Most registers one read request (function 3 or 4) may ask for.
pub const MAX_READ_REGISTERS: u16 = 125;
/// Most bits one read request (function 1 or 2) may ask for.
pub const MAX_READ_BITS: u16 = 2000;
/// Most registers one write request (function 16) may carry.
pub const MAX_WRITE_REGISTERS: u16 = 123;

/// One property as the Modbus codec sees it: its name, where it lives, and
/// the type the model gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Property name.
    pub name: String,
    /// Where and how it is stored.
    pub visitor: ModbusVisitor,
    /// The model's type.
    pub ty: PropertyType,
}

impl Point {
    /// A point.
    pub fn new(name: impl Into<String>, visitor: ModbusVisitor, ty: PropertyType) -> Self {
        Point { name: name.into(), visitor, ty }
    }

    /// Registers (or bits) it occupies.
    pub fn quantity(&self) -> u16 {
        self.visitor.quantity()
    }
}

/// How requests are merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanOptions {
    /// Unrequested registers (or bits) a request may read to join two
    /// points (0: only overlapping or adjacent points merge).
    pub max_gap: u16,
    /// Largest register read (at most [`MAX_READ_REGISTERS`]).
    pub max_registers: u16,
    /// Largest bit read (at most [`MAX_READ_BITS`]).
    pub max_bits: u16,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions { max_gap: 0, max_registers: MAX_READ_REGISTERS, max_bits: MAX_READ_BITS }
    }
}

impl PlanOptions {
    fn max_for(&self, table: RegisterType) -> u16 {
        if table.is_bits() {
            self.max_bits.clamp(1, MAX_READ_BITS)
        } else {
            self.max_registers.clamp(1, MAX_READ_REGISTERS)
        }
    }
}

/// Where one point's value is in a request's response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Index of the point in the slice given to [`plan_reads`].
    pub point: usize,
    /// Offset of its first register (or bit) in the response.
    pub offset: u16,
    /// Registers (or bits) it occupies.
    pub quantity: u16,
}

impl Slot {
    /// Its part of a response of the request's quantity, if the response is
    /// long enough.
    pub fn slice<'a, T>(&self, response: &'a [T]) -> Option<&'a [T]> {
        let start = usize::from(self.offset);
        response.get(start..start + usize::from(self.quantity))
    }
}

/// One read request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    /// Table (and so function code).
    pub table: RegisterType,
    /// First address.
    pub address: u16,
    /// Registers or bits.
    pub quantity: u16,
    /// The points it reads, by address.
    pub slots: Vec<Slot>,
}

/// Why a point cannot be read by any request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// It is larger than one request may read.
    #[error("{quantity} {unit} is more than one request may read ({max})")]
    TooLarge {
        /// Its size.
        quantity: u16,
        /// `registers` or `bits`.
        unit: &'static str,
        /// The maximum.
        max: u16,
    },
    /// It runs past the last address, 65535.
    #[error("address {address} + {quantity} runs past the last address 65535")]
    PastLastAddress {
        /// Its first address.
        address: u16,
        /// Its size.
        quantity: u16,
    },
}

/// The requests of one poll.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReadPlan {
    /// Requests, by table (coils, discrete inputs, input, holding) and address.
    pub requests: Vec<ReadRequest>,
    /// Points no request can read (by index), with why.
    pub unplannable: Vec<(usize, PlanError)>,
}

/// Plans the requests reading `points`; see the module documentation.
pub fn plan_reads(points: &[Point], opts: PlanOptions) -> ReadPlan {
    let mut plan = ReadPlan::default();
    let mut order: Vec<usize> = Vec::with_capacity(points.len());
    for (i, p) in points.iter().enumerate() {
        let table = p.visitor.register;
        let (quantity, max) = (p.quantity(), opts.max_for(table));
        if quantity > max {
            let unit = if table.is_bits() { "bits" } else { "registers" };
            plan.unplannable.push((i, PlanError::TooLarge { quantity, unit, max }));
        } else if u32::from(p.visitor.address) + u32::from(quantity) > 0x1_0000 {
            plan.unplannable.push((i, PlanError::PastLastAddress { address: p.visitor.address, quantity }));
        } else {
            order.push(i);
        }
    }
    order.sort_by_key(|&i| (points[i].visitor.register, points[i].visitor.address, points[i].quantity(), i));

    // The request being built: table, start, end (exclusive, u32 so that
    // 65535 + 1 fits), slots.
    let mut current: Option<(RegisterType, u32, u32, Vec<Slot>)> = None;
    for i in order {
        let p = &points[i];
        let (table, quantity) = (p.visitor.register, p.quantity());
        let start = u32::from(p.visitor.address);
        let end = start + u32::from(quantity);
        let max = u32::from(opts.max_for(table));
        if let Some((t, s, e, slots)) = current.as_mut() {
            if *t == table && start <= *e + u32::from(opts.max_gap) && end.max(*e) - *s <= max {
                *e = end.max(*e);
                slots.push(Slot { point: i, offset: (start - *s) as u16, quantity });
                continue;
            }
        }
        if let Some(done) = current.take() {
            plan.requests.push(finish(done));
        }
        current = Some((table, start, end, vec![Slot { point: i, offset: 0, quantity }]));
    }
    if let Some(done) = current.take() {
        plan.requests.push(finish(done));
    }
    plan
}

fn finish((table, start, end, slots): (RegisterType, u32, u32, Vec<Slot>)) -> ReadRequest {
    // Both fit a u16: start is an address, and end - start <= 2000.
    ReadRequest { table, address: start as u16, quantity: (end - start) as u16, slots }
}

// ---------------------------------------------------------------- decoding

/// Why registers could not become a value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// The response did not carry the point's registers.
    #[error("expected {expected} registers, got {got}")]
    Length {
        /// Registers the data type needs.
        expected: usize,
        /// Registers given.
        got: usize,
    },
    /// NaN or an infinity (raw, or after scale and offset).
    #[error("value is not a finite number ({0})")]
    NotFinite(f64),
    /// A string that is not UTF-8.
    #[error("string is not valid UTF-8: {0}")]
    InvalidUtf8(String),
    /// An int property whose value is not an integer after scale and offset.
    #[error("{0} is not an integer after scale and offset")]
    NotInteger(f64),
    /// An int property whose value does not fit an i64.
    #[error("value does not fit a 64-bit integer after scale and offset")]
    IntegerOverflow,
    /// The data type cannot give the model's type (the model check prevents it).
    #[error("data type {data_type} cannot give a {property_type} value")]
    TypeMismatch {
        /// Data type.
        data_type: &'static str,
        /// Model type.
        property_type: &'static str,
    },
}

/// A number as read, before scale and offset.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Raw {
    Int(i64),
    Float(f64),
}

impl Raw {
    fn as_f64(self) -> f64 {
        match self {
            Raw::Int(i) => i as f64,
            Raw::Float(f) => f,
        }
    }
}

/// The value's bytes, most significant first (word order applied to
/// numbers only, then byte order within each register).
fn value_bytes(words: &[u16], byte_order: Endian, word_order: Endian, numeric: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(words.len() * 2);
    let mut push = |w: u16| match byte_order {
        Endian::Big => out.extend_from_slice(&w.to_be_bytes()),
        Endian::Little => out.extend_from_slice(&w.to_le_bytes()),
    };
    if numeric && word_order == Endian::Little {
        words.iter().rev().for_each(|&w| push(w));
    } else {
        words.iter().for_each(|&w| push(w));
    }
    out
}

/// The inverse of [`value_bytes`].
fn words_of(bytes: &[u8], byte_order: Endian, word_order: Endian, numeric: bool) -> Vec<u16> {
    let mut words: Vec<u16> = bytes
        .chunks(2)
        .map(|c| {
            let pair = [c[0], c.get(1).copied().unwrap_or(0)];
            match byte_order {
                Endian::Big => u16::from_be_bytes(pair),
                Endian::Little => u16::from_le_bytes(pair),
            }
        })
        .collect();
    if numeric && word_order == Endian::Little {
        words.reverse();
    }
    words
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    for (d, s) in a.iter_mut().zip(bytes) {
        *d = *s;
    }
    a
}

/// The shortest decimal that round-trips `f`, as an f64.
fn f32_to_f64_shortest(f: f32) -> f64 {
    // `Display` of f32 prints the shortest representation that parses back
    // to the same f32; parsing it as f64 gives the "intended" decimal.
    f.to_string().parse::<f64>().unwrap_or(f64::from(f))
}

fn raw_of(dt: ModbusDataType, bytes: &[u8]) -> Result<Raw, DecodeError> {
    let raw = match dt {
        ModbusDataType::Int16 => Raw::Int(i64::from(i16::from_be_bytes(array(bytes)))),
        ModbusDataType::Uint16 | ModbusDataType::Bool => Raw::Int(i64::from(u16::from_be_bytes(array(bytes)))),
        ModbusDataType::Int32 => Raw::Int(i64::from(i32::from_be_bytes(array(bytes)))),
        ModbusDataType::Uint32 => Raw::Int(i64::from(u32::from_be_bytes(array(bytes)))),
        ModbusDataType::Float32 => Raw::Float(f32_to_f64_shortest(f32::from_be_bytes(array(bytes)))),
        ModbusDataType::Float64 => Raw::Float(f64::from_be_bytes(array(bytes))),
        ModbusDataType::String => {
            return Err(DecodeError::TypeMismatch { data_type: dt.as_str(), property_type: "number" })
        }
    };
    if let Raw::Float(f) = raw {
        if !f.is_finite() {
            return Err(DecodeError::NotFinite(f));
        }
    }
    Ok(raw)
}

/// `n` when `scale` is exactly the f64 nearest to `1/n` for an integer `n`
/// (0.1 → 10, 0.5 → 2, 0.001 → 1000).
fn inverse_integer(scale: f64) -> Option<f64> {
    if scale == 0.0 || !scale.is_finite() || scale.abs() >= 1.0 {
        return None;
    }
    let n = (1.0 / scale).round();
    (n.is_finite() && n.abs() <= 9.007_199_254_740_992e15 && 1.0 / n == scale).then_some(n)
}

/// Whether `f` is an integer an i128 holds exactly.
fn integral(f: f64) -> Option<i128> {
    (f.is_finite() && f.fract() == 0.0 && f.abs() < 1.7e38).then_some(f as i128)
}

fn scaled_f64(raw: f64, scale: f64, offset: f64) -> f64 {
    let x = match inverse_integer(scale) {
        Some(n) => raw / n,
        None => raw * scale,
    };
    // -0.0 + 0.0 is +0.0: leave a zero offset out so -0.0 reads (and so
    // writes back) as itself.
    if offset == 0.0 {
        x
    } else {
        x + offset
    }
}

fn number(f: f64) -> Result<Value, DecodeError> {
    Number::from_f64(f).map(Value::Number).ok_or(DecodeError::NotFinite(f))
}

fn typed(raw: Raw, v: &ModbusVisitor, ty: PropertyType) -> Result<Value, DecodeError> {
    match ty {
        PropertyType::Bool => Ok(Value::Bool(raw.as_f64() != 0.0)),
        PropertyType::Int => {
            if let (Raw::Int(i), Some(s), Some(o)) = (raw, integral(v.scale), integral(v.offset)) {
                let x =
                    i128::from(i).checked_mul(s).and_then(|x| x.checked_add(o)).ok_or(DecodeError::IntegerOverflow)?;
                return i64::try_from(x).map(Value::from).map_err(|_| DecodeError::IntegerOverflow);
            }
            let f = scaled_f64(raw.as_f64(), v.scale, v.offset);
            if !f.is_finite() {
                return Err(DecodeError::NotFinite(f));
            }
            if f.fract() != 0.0 {
                return Err(DecodeError::NotInteger(f));
            }
            if !(-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&f) {
                return Err(DecodeError::IntegerOverflow);
            }
            Ok(Value::from(f as i64))
        }
        PropertyType::Float => {
            let f = scaled_f64(raw.as_f64(), v.scale, v.offset);
            if !f.is_finite() {
                return Err(DecodeError::NotFinite(f));
            }
            number(f)
        }
        PropertyType::String | PropertyType::Bytes => {
            Err(DecodeError::TypeMismatch { data_type: v.data_type().as_str(), property_type: ty.as_str() })
        }
    }
}

/// Decodes a point's registers (exactly its [`ModbusVisitor::quantity`])
/// into its value; see the module documentation.
pub fn decode_registers(v: &ModbusVisitor, ty: PropertyType, words: &[u16]) -> Result<Value, DecodeError> {
    let dt = v.data_type();
    let expected = usize::from(dt.registers(v.count));
    if words.len() != expected {
        return Err(DecodeError::Length { expected, got: words.len() });
    }
    if dt == ModbusDataType::String {
        let bytes = value_bytes(words, v.byte_order, v.word_order, false);
        return match ty {
            PropertyType::Bytes => Ok(Value::Array(bytes.into_iter().map(Value::from).collect())),
            PropertyType::String => {
                let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
                String::from_utf8(bytes[..end].to_vec())
                    .map(Value::String)
                    .map_err(|e| DecodeError::InvalidUtf8(e.utf8_error().to_string()))
            }
            _ => Err(DecodeError::TypeMismatch { data_type: dt.as_str(), property_type: ty.as_str() }),
        };
    }
    let bytes = value_bytes(words, v.byte_order, v.word_order, true);
    let raw = raw_of(dt, &bytes)?;
    if dt == ModbusDataType::Bool {
        return match ty {
            PropertyType::Bool => Ok(Value::Bool(raw != Raw::Int(0))),
            _ => typed(Raw::Int(i64::from(raw != Raw::Int(0))), v, ty),
        };
    }
    typed(raw, v, ty)
}

/// Decodes one coil or discrete input.
pub fn decode_bit(v: &ModbusVisitor, ty: PropertyType, bit: bool) -> Result<Value, DecodeError> {
    match ty {
        PropertyType::Bool => Ok(Value::Bool(bit)),
        PropertyType::Int => Ok(Value::from(i64::from(bit))),
        PropertyType::Float => number(f64::from(u8::from(bit))),
        PropertyType::String | PropertyType::Bytes => {
            Err(DecodeError::TypeMismatch { data_type: v.data_type().as_str(), property_type: ty.as_str() })
        }
    }
}

// ---------------------------------------------------------------- encoding

/// Why a value could not become registers.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    /// The JSON value is not of a kind the point can take.
    #[error("expected {expected}, got {got}")]
    WrongValue {
        /// What the point takes.
        expected: &'static str,
        /// What was given.
        got: String,
    },
    /// After scale and offset, the value does not fit the data type.
    #[error("{value} is {raw} after scale and offset, outside the range of {data_type}")]
    OutOfRange {
        /// The value given.
        value: f64,
        /// The raw value it maps to.
        raw: f64,
        /// The data type.
        data_type: &'static str,
    },
    /// NaN or an infinity.
    #[error("value is not a finite number")]
    NotFinite,
    /// The scale is 0, so no raw value gives the value.
    #[error("scale is 0: the value cannot be written")]
    ZeroScale,
    /// A string or byte array longer than its registers.
    #[error("{len} bytes do not fit {max} bytes ({registers} registers)")]
    TooLong {
        /// Its length.
        len: usize,
        /// Bytes available.
        max: usize,
        /// Registers.
        registers: u16,
    },
}

fn kind_of(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 40 {
        format!("{}…", s.chars().take(40).collect::<String>())
    } else {
        s
    }
}

/// The raw value of a number written to an integer data type, rounded to the
/// nearest integer (ties away from zero), exactly when possible.
fn raw_integer(value: &Value, v: &ModbusVisitor) -> Result<i128, EncodeError> {
    if let (Some(i), Some(s), Some(o)) = (value.as_i64(), integral(v.scale), integral(v.offset)) {
        if s != 0 {
            let diff = i128::from(i) - o;
            if diff % s == 0 {
                return Ok(diff / s);
            }
        }
    }
    let f = raw_float(value, v)?;
    Ok(f.round().clamp(-1.0e30, 1.0e30) as i128)
}

/// `(value − offset) / scale` as a float.
fn raw_float(value: &Value, v: &ModbusVisitor) -> Result<f64, EncodeError> {
    let x = value.as_f64().ok_or_else(|| EncodeError::WrongValue { expected: "a number", got: kind_of(value) })?;
    if !x.is_finite() {
        return Err(EncodeError::NotFinite);
    }
    if v.scale == 0.0 {
        return Err(EncodeError::ZeroScale);
    }
    let raw = match inverse_integer(v.scale) {
        Some(n) => (x - v.offset) * n,
        None => (x - v.offset) / v.scale,
    };
    if raw.is_finite() {
        Ok(raw)
    } else {
        Err(EncodeError::NotFinite)
    }
}

fn value_f64(value: &Value) -> f64 {
    value.as_f64().unwrap_or(f64::NAN)
}

/// Encodes a value for a register table (holding registers) into exactly
/// the point's registers; see the module documentation.
pub fn encode_registers(v: &ModbusVisitor, ty: PropertyType, value: &Value) -> Result<Vec<u16>, EncodeError> {
    let dt = v.data_type();
    let registers = dt.registers(v.count);
    let bytes: Vec<u8> = match dt {
        ModbusDataType::String => {
            let raw: Vec<u8> = match (ty, value) {
                (PropertyType::Bytes, Value::Array(items)) => items
                    .iter()
                    .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                    .collect::<Option<Vec<u8>>>()
                    .ok_or_else(|| EncodeError::WrongValue { expected: "an array of bytes", got: kind_of(value) })?,
                (_, Value::String(s)) => s.as_bytes().to_vec(),
                _ => return Err(EncodeError::WrongValue { expected: "a string", got: kind_of(value) }),
            };
            let max = usize::from(registers) * 2;
            if raw.len() > max {
                return Err(EncodeError::TooLong { len: raw.len(), max, registers });
            }
            let mut padded = raw;
            padded.resize(max, 0);
            return Ok(words_of(&padded, v.byte_order, v.word_order, false));
        }
        ModbusDataType::Bool => {
            let on = encode_bool(value)?;
            u16::from(on).to_be_bytes().to_vec()
        }
        ModbusDataType::Float32 => {
            let raw = raw_float(value, v)?;
            if raw.abs() > f64::from(f32::MAX) {
                return Err(EncodeError::OutOfRange { value: value_f64(value), raw, data_type: dt.as_str() });
            }
            (raw as f32).to_be_bytes().to_vec()
        }
        ModbusDataType::Float64 => raw_float(value, v)?.to_be_bytes().to_vec(),
        ModbusDataType::Int16 | ModbusDataType::Uint16 | ModbusDataType::Int32 | ModbusDataType::Uint32 => {
            let raw = raw_integer(value, v)?;
            let out_of_range =
                || EncodeError::OutOfRange { value: value_f64(value), raw: raw as f64, data_type: dt.as_str() };
            match dt {
                ModbusDataType::Int16 => i16::try_from(raw).map_err(|_| out_of_range())?.to_be_bytes().to_vec(),
                ModbusDataType::Uint16 => u16::try_from(raw).map_err(|_| out_of_range())?.to_be_bytes().to_vec(),
                ModbusDataType::Int32 => i32::try_from(raw).map_err(|_| out_of_range())?.to_be_bytes().to_vec(),
                _ => u32::try_from(raw).map_err(|_| out_of_range())?.to_be_bytes().to_vec(),
            }
        }
    };
    Ok(words_of(&bytes, v.byte_order, v.word_order, true))
}

fn encode_bool(value: &Value) -> Result<bool, EncodeError> {
    match value {
        Value::Bool(b) => Ok(*b),
        Value::Number(n) if n.as_f64() == Some(0.0) => Ok(false),
        Value::Number(n) if n.as_f64() == Some(1.0) => Ok(true),
        _ => Err(EncodeError::WrongValue { expected: "true, false, 0 or 1", got: kind_of(value) }),
    }
}

/// Encodes a value for a coil: a bool, or 0/1.
pub fn encode_bit(value: &Value) -> Result<bool, EncodeError> {
    encode_bool(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mv(register: RegisterType, address: u16, dt: ModbusDataType) -> ModbusVisitor {
        ModbusVisitor { register, address, data_type: Some(dt), scale: 1.0, ..Default::default() }
    }

    fn pt(name: &str, register: RegisterType, address: u16, dt: ModbusDataType) -> Point {
        Point::new(name, mv(register, address, dt), PropertyType::Float)
    }

    /// (table, address, quantity, point names) of every request.
    fn shape(points: &[Point], plan: &ReadPlan) -> Vec<(RegisterType, u16, u16, Vec<String>)> {
        plan.requests
            .iter()
            .map(|r| (r.table, r.address, r.quantity, r.slots.iter().map(|s| points[s.point].name.clone()).collect()))
            .collect()
    }

    #[test]
    fn planning_table() {
        use ModbusDataType::*;
        use RegisterType::*;
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        struct Case {
            what: &'static str,
            points: Vec<Point>,
            gap: u16,
            want: Vec<(RegisterType, u16, u16, Vec<std::string::String>)>,
        }
        let mut long_string = pt("long", Holding, 0, String);
        long_string.visitor.count = Some(126);
        let mut s60a = pt("s60a", Holding, 0, String);
        s60a.visitor.count = Some(60);
        let mut s60b = pt("s60b", Holding, 60, String);
        s60b.visitor.count = Some(60);
        let mut s60c = pt("s60c", Holding, 120, String);
        s60c.visitor.count = Some(60);
        let cases = vec![
            Case { what: "nothing", points: vec![], gap: 0, want: vec![] },
            Case {
                what: "adjacent registers merge",
                points: vec![pt("a", Holding, 0, Uint16), pt("b", Holding, 1, Float32), pt("c", Holding, 3, Int16)],
                gap: 0,
                want: vec![(Holding, 0, 4, s(&["a", "b", "c"]))],
            },
            Case {
                what: "order of the points does not matter",
                points: vec![pt("c", Holding, 3, Int16), pt("a", Holding, 0, Uint16), pt("b", Holding, 1, Float32)],
                gap: 0,
                want: vec![(Holding, 0, 4, s(&["a", "b", "c"]))],
            },
            Case {
                what: "overlapping points share registers",
                points: vec![
                    pt("f", Holding, 10, Float32),
                    pt("hi", Holding, 10, Uint16),
                    pt("lo", Holding, 11, Uint16),
                ],
                gap: 0,
                want: vec![(Holding, 10, 2, s(&["hi", "f", "lo"]))],
            },
            Case {
                what: "a gap splits with max_gap 0",
                points: vec![pt("a", Holding, 0, Uint16), pt("b", Holding, 2, Uint16)],
                gap: 0,
                want: vec![(Holding, 0, 1, s(&["a"])), (Holding, 2, 1, s(&["b"]))],
            },
            Case {
                what: "a gap within max_gap merges",
                points: vec![pt("a", Holding, 0, Uint16), pt("b", Holding, 3, Uint16), pt("c", Holding, 7, Uint16)],
                gap: 2,
                want: vec![(Holding, 0, 4, s(&["a", "b"])), (Holding, 7, 1, s(&["c"]))],
            },
            Case {
                what: "tables never merge",
                points: vec![
                    pt("h", Holding, 0, Uint16),
                    pt("i", Input, 1, Uint16),
                    pt("c", Coil, 0, Bool),
                    pt("d", DiscreteInput, 0, Bool),
                    pt("c2", Coil, 1, Bool),
                ],
                gap: 0,
                want: vec![
                    (Coil, 0, 2, s(&["c", "c2"])),
                    (DiscreteInput, 0, 1, s(&["d"])),
                    (Input, 1, 1, s(&["i"])),
                    (Holding, 0, 1, s(&["h"])),
                ],
            },
            Case {
                what: "capped at 125 registers",
                points: vec![s60a, s60b, s60c],
                gap: 0,
                want: vec![(Holding, 0, 120, s(&["s60a", "s60b"])), (Holding, 120, 60, s(&["s60c"]))],
            },
            Case {
                what: "a value does not straddle the cap",
                points: (0..63).map(|i| pt(&format!("f{i}"), Input, i * 2, Float32)).collect(),
                gap: 0,
                want: vec![(Input, 0, 124, (0..62).map(|i| format!("f{i}")).collect()), (Input, 124, 2, s(&["f62"]))],
            },
            Case {
                what: "2000 coils in one request, the 2001st in the next",
                points: (0..2001).map(|i| pt(&format!("c{i}"), Coil, i, Bool)).collect(),
                gap: 0,
                want: vec![
                    (Coil, 0, 2000, (0..2000).map(|i| format!("c{i}")).collect()),
                    (Coil, 2000, 1, s(&["c2000"])),
                ],
            },
            Case {
                what: "last address",
                points: vec![pt("end", Holding, 65535, Uint16), pt("before", Holding, 65534, Uint16)],
                gap: 0,
                want: vec![(Holding, 65534, 2, s(&["before", "end"]))],
            },
            Case {
                what: "too large or past the end: unplannable, the rest planned",
                points: vec![long_string, pt("past", Holding, 65535, Float32), pt("ok", Holding, 0, Uint16)],
                gap: 0,
                want: vec![(Holding, 0, 1, s(&["ok"]))],
            },
        ];
        for case in cases {
            let plan = plan_reads(&case.points, PlanOptions { max_gap: case.gap, ..Default::default() });
            assert_eq!(shape(&case.points, &plan), case.want, "{}", case.what);
            // Every slot lies inside its request, and every point is read or
            // unplannable exactly once.
            let mut seen = vec![0; case.points.len()];
            for r in &plan.requests {
                for sl in &r.slots {
                    assert!(sl.offset + sl.quantity <= r.quantity, "{}", case.what);
                    assert_eq!(case.points[sl.point].visitor.address, r.address + sl.offset, "{}", case.what);
                    seen[sl.point] += 1;
                }
            }
            for (i, _) in &plan.unplannable {
                seen[*i] += 1;
            }
            assert!(seen.iter().all(|&n| n == 1), "{}: {seen:?}", case.what);
        }
    }

    #[test]
    fn unplannable_reasons() {
        let mut long = pt("long", RegisterType::Input, 0, ModbusDataType::String);
        long.visitor.count = Some(200);
        let plan =
            plan_reads(&[long, pt("past", RegisterType::Input, 65534, ModbusDataType::Float64)], Default::default());
        assert!(plan.requests.is_empty());
        assert_eq!(
            plan.unplannable,
            vec![
                (0, PlanError::TooLarge { quantity: 200, unit: "registers", max: 125 }),
                (1, PlanError::PastLastAddress { address: 65534, quantity: 4 }),
            ]
        );
    }

    fn vis(dt: ModbusDataType, word: Endian, byte: Endian) -> ModbusVisitor {
        ModbusVisitor { data_type: Some(dt), word_order: word, byte_order: byte, scale: 1.0, ..Default::default() }
    }

    #[test]
    fn float32_in_both_word_orders() {
        let big = vis(ModbusDataType::Float32, Endian::Big, Endian::Big);
        let little = vis(ModbusDataType::Float32, Endian::Little, Endian::Big);
        assert_eq!(decode_registers(&big, PropertyType::Float, &[0x4120, 0x0000]), Ok(json!(10.0)));
        assert_eq!(decode_registers(&little, PropertyType::Float, &[0x0000, 0x4120]), Ok(json!(10.0)));
        assert_eq!(encode_registers(&big, PropertyType::Float, &json!(10.0)), Ok(vec![0x4120, 0x0000]));
        assert_eq!(encode_registers(&little, PropertyType::Float, &json!(10.0)), Ok(vec![0x0000, 0x4120]));
        // Byte order swaps within each register: 0x41480000 = 12.5.
        let both = vis(ModbusDataType::Float32, Endian::Little, Endian::Little);
        assert_eq!(decode_registers(&both, PropertyType::Float, &[0x0000, 0x4841]), Ok(json!(12.5)));
        let bytes_only = vis(ModbusDataType::Float32, Endian::Big, Endian::Little);
        assert_eq!(decode_registers(&bytes_only, PropertyType::Float, &[0x4841, 0x0000]), Ok(json!(12.5)));
        // float32 0.1 reads as 0.1, not 0.10000000149011612.
        assert_eq!(decode_registers(&big, PropertyType::Float, &[0x3DCC, 0xCCCD]), Ok(json!(0.1)));
    }

    #[test]
    fn integer_types_and_orders() {
        use ModbusDataType::*;
        let b = Endian::Big;
        let l = Endian::Little;
        let cases: Vec<(ModbusVisitor, PropertyType, Vec<u16>, Value)> = vec![
            (vis(Int16, b, b), PropertyType::Int, vec![0xFFFB], json!(-5)),
            (vis(Uint16, b, b), PropertyType::Int, vec![0xFFFB], json!(65531)),
            (vis(Uint16, b, l), PropertyType::Int, vec![0x3412], json!(0x1234)),
            (vis(Int32, b, b), PropertyType::Int, vec![0xFFFE, 0x7960], json!(-100_000)),
            (vis(Int32, l, b), PropertyType::Int, vec![0x7960, 0xFFFE], json!(-100_000)),
            (vis(Uint32, b, b), PropertyType::Int, vec![0xB2D0, 0x5E00], json!(3_000_000_000u32)),
            (vis(Uint32, b, b), PropertyType::Float, vec![0xFFFF, 0xFFFF], json!(4_294_967_295.0)),
            (vis(Float64, b, b), PropertyType::Float, vec![0x405E, 0xDD2F, 0x1A9F, 0xBE77], json!(123.456)),
            (vis(Float64, l, b), PropertyType::Float, vec![0xBE77, 0x1A9F, 0xDD2F, 0x405E], json!(123.456)),
            (vis(Bool, b, b), PropertyType::Bool, vec![0x0100], json!(true)),
            (vis(Bool, b, b), PropertyType::Bool, vec![0], json!(false)),
            (vis(Uint16, b, b), PropertyType::Bool, vec![7], json!(true)),
        ];
        for (v, ty, words, want) in cases {
            assert_eq!(decode_registers(&v, ty, &words), Ok(want.clone()), "{v:?} {words:x?}");
            if (v.data_type() != Bool || want == json!(false)) && ty != PropertyType::Bool {
                assert_eq!(encode_registers(&v, ty, &want), Ok(words), "{v:?} {want}");
            }
        }
    }

    #[test]
    fn strings_and_bytes() {
        let mut v = vis(ModbusDataType::String, Endian::Big, Endian::Big);
        v.count = Some(4);
        let words = [0x4845, 0x4C4C, 0x4F00, 0x0000];
        assert_eq!(decode_registers(&v, PropertyType::String, &words), Ok(json!("HELLO")));
        assert_eq!(encode_registers(&v, PropertyType::String, &json!("HELLO")), Ok(words.to_vec()));
        assert_eq!(
            decode_registers(&v, PropertyType::Bytes, &words),
            Ok(json!([0x48, 0x45, 0x4C, 0x4C, 0x4F, 0, 0, 0]))
        );
        assert!(matches!(
            encode_registers(&v, PropertyType::String, &json!("123456789")),
            Err(EncodeError::TooLong { len: 9, max: 8, registers: 4 })
        ));
        // Word order does not reorder characters; byte order swaps pairs.
        v.word_order = Endian::Little;
        assert_eq!(decode_registers(&v, PropertyType::String, &words), Ok(json!("HELLO")));
        v.byte_order = Endian::Little;
        assert_eq!(decode_registers(&v, PropertyType::String, &[0x4548, 0x4C4C, 0x004F, 0]), Ok(json!("HELLO")));
        v.byte_order = Endian::Big;
        assert!(matches!(
            decode_registers(&v, PropertyType::String, &[0x0000, 0xC328, 0, 0]),
            Err(DecodeError::InvalidUtf8(_))
        ));
        assert_eq!(decode_registers(&v, PropertyType::String, &[0, 0, 0, 0]), Ok(json!("")));
    }

    #[test]
    fn scale_and_offset_round_trip() {
        let mut v = vis(ModbusDataType::Uint16, Endian::Big, Endian::Big);
        v.scale = 0.1;
        v.offset = -5.0;
        assert_eq!(decode_registers(&v, PropertyType::Float, &[215]), Ok(json!(16.5)));
        assert_eq!(encode_registers(&v, PropertyType::Float, &json!(16.5)), Ok(vec![215]));
        for raw in [0u16, 1, 12, 215, 999, 65535] {
            let value = decode_registers(&v, PropertyType::Float, &[raw]).expect("decodes");
            assert_eq!(encode_registers(&v, PropertyType::Float, &value), Ok(vec![raw]), "{value}");
        }
        // 12 × 0.1 is 1.2, not 1.2000000000000002.
        v.offset = 0.0;
        assert_eq!(decode_registers(&v, PropertyType::Float, &[12]), Ok(json!(1.2)));
        // Rounding: 21.55 / 0.1 = 215.5 → 216 (ties away from zero).
        assert_eq!(encode_registers(&v, PropertyType::Float, &json!(21.55)), Ok(vec![216]));
        // Range: -0.1 is raw -1, not a uint16; 6553.6 is raw 65536.
        assert!(matches!(encode_registers(&v, PropertyType::Float, &json!(-0.1)), Err(EncodeError::OutOfRange { .. })));
        assert!(matches!(
            encode_registers(&v, PropertyType::Float, &json!(6553.6)),
            Err(EncodeError::OutOfRange { .. })
        ));
        assert_eq!(encode_registers(&v, PropertyType::Float, &json!(6553.5)), Ok(vec![65535]));

        // Float32 with scale 2 and offset 1, both word orders.
        for word in [Endian::Big, Endian::Little] {
            let mut f = vis(ModbusDataType::Float32, word, Endian::Big);
            f.scale = 2.0;
            f.offset = 1.0;
            let words = encode_registers(&f, PropertyType::Float, &json!(21.0)).expect("encodes");
            let plain = vis(ModbusDataType::Float32, word, Endian::Big);
            assert_eq!(decode_registers(&plain, PropertyType::Float, &words), Ok(json!(10.0)));
            assert_eq!(decode_registers(&f, PropertyType::Float, &words), Ok(json!(21.0)));
        }

        // Int properties: exact integer arithmetic.
        let mut i = vis(ModbusDataType::Int32, Endian::Big, Endian::Big);
        i.scale = 10.0;
        i.offset = -3.0;
        assert_eq!(decode_registers(&i, PropertyType::Int, &[0, 5]), Ok(json!(47)));
        assert_eq!(encode_registers(&i, PropertyType::Int, &json!(47)), Ok(vec![0, 5]));
        assert_eq!(encode_registers(&i, PropertyType::Int, &json!(52)), Ok(vec![0, 6]), "5.5 rounds to 6");
        // An int property with a fractional scale must come out integral.
        i.scale = 0.5;
        i.offset = 0.0;
        assert_eq!(decode_registers(&i, PropertyType::Int, &[0, 4]), Ok(json!(2)));
        assert_eq!(decode_registers(&i, PropertyType::Int, &[0, 3]), Err(DecodeError::NotInteger(1.5)));
    }

    #[test]
    fn bad_values_are_errors() {
        let f = vis(ModbusDataType::Float32, Endian::Big, Endian::Big);
        assert!(matches!(decode_registers(&f, PropertyType::Float, &[0x7FC0, 0]), Err(DecodeError::NotFinite(_))));
        assert!(matches!(decode_registers(&f, PropertyType::Float, &[0x7F80, 0]), Err(DecodeError::NotFinite(_))));
        assert_eq!(
            decode_registers(&f, PropertyType::Float, &[0x4120]),
            Err(DecodeError::Length { expected: 2, got: 1 })
        );
        assert!(matches!(encode_registers(&f, PropertyType::Float, &json!(1e39)), Err(EncodeError::OutOfRange { .. })));
        assert!(matches!(encode_registers(&f, PropertyType::Float, &json!("x")), Err(EncodeError::WrongValue { .. })));
        let mut big = vis(ModbusDataType::Float64, Endian::Big, Endian::Big);
        big.scale = 1e300;
        assert!(matches!(
            decode_registers(&big, PropertyType::Float, &[0x7FEF, 0xFFFF, 0xFFFF, 0xFFFF]),
            Err(DecodeError::NotFinite(_))
        ));
        let mut zero = vis(ModbusDataType::Uint16, Endian::Big, Endian::Big);
        zero.scale = 0.0;
        assert_eq!(encode_registers(&zero, PropertyType::Float, &json!(1)), Err(EncodeError::ZeroScale));
        let u = vis(ModbusDataType::Uint32, Endian::Big, Endian::Big);
        assert!(matches!(encode_registers(&u, PropertyType::Int, &json!(-1)), Err(EncodeError::OutOfRange { .. })));
        assert!(matches!(
            encode_registers(&u, PropertyType::Int, &json!(4_294_967_296u64)),
            Err(EncodeError::OutOfRange { .. })
        ));
        assert_eq!(encode_bit(&json!(true)), Ok(true));
        assert_eq!(encode_bit(&json!(0)), Ok(false));
        assert!(encode_bit(&json!(2)).is_err());
        let coil = ModbusVisitor { register: RegisterType::Coil, ..Default::default() };
        assert_eq!(decode_bit(&coil, PropertyType::Bool, true), Ok(json!(true)));
        assert_eq!(decode_bit(&coil, PropertyType::Int, true), Ok(json!(1)));
    }
}
