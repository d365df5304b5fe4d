//! The chunk codec: one series' points, `(timestamp ms, f64)`, strictly
//! increasing in time, packed into a bit stream as they arrive.
//!
//! # Chunk format
//!
//! ```text
//! varint  n_points            (≥ 1)
//! u8      mode                0 = decimal/delta, 1 = decimal/delta-of-delta, 2 = xor
//! u8      scale               decimal modes: values are integers × 10^-scale (0..=6)
//! varint  zigzag(t0)          first timestamp
//! bytes   bit stream          MSB first, zero-padded to a byte
//! ```
//!
//! **Timestamps** are delta-of-delta coded (Gorilla), the previous delta
//! starting at 0 and the first point carrying no timestamp bits:
//! `0` → dod 0; `10`+7 bits, `110`+12 bits, `1110`+20 bits of zigzag(dod);
//! `1111`+64 bits otherwise. A regular 1 s series costs 1 bit per point.
//!
//! **Values, decimal modes.** Most sensor and counter values are decimals
//! with few digits (21.3, 1024). The chunk picks a scale `s` and stores
//! `n = v × 10^s` as an integer when `n as f64 / 10^s` gives back exactly
//! the same bits. The residual `r` (mode 0: `n - n_prev`; mode 1:
//! `n - n_prev - delta_prev`) is coded: `0` → 0; `10`+2 bits, `110`+6 bits,
//! `1110`+12 bits, `11110`+24 bits of zigzag(r); `111110`+64 bits. `111111`
//! escapes: `1`+3 bits raises the scale for the rest of the chunk (the
//! predictor is multiplied up, then the value's residual code follows, never
//! itself an escape); `0`+64 raw IEEE bits carries
//! a value no scale fits (NaN, ±inf, -0.0, too many digits) and leaves the
//! predictor untouched.
//!
//! **Values, xor mode** (Gorilla): `0` → same as previous; `10` + the
//! meaningful bits inside the previous window; `11` + 5 bits leading zeros
//! + 6 bits (length - 1) + the meaningful bits. The first value is 64 raw bits.
//!
//! The mode and scale of a chunk are chosen when it starts, from the first
//! value and from what the series' previous chunk saw ([`ChunkHint`]): the
//! encoder is streaming, never re-encodes, and needs O(1) state per series.
//!
//! Decoding never panics: every read is bounded by the buffer, arithmetic
//! wraps, and a chunk whose timestamps do not strictly increase is an error.

use crate::error::DecodeError;

/// Largest decimal scale tried (10^6).
pub const MAX_SCALE: u8 = 6;
const POW10: [f64; 7] = [1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0, 1_000_000.0];
const MAX_EXACT: f64 = 9_007_199_254_740_992.0; // 2^53

/// How a chunk codes its values (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueMode {
    /// Scaled integers, first differences.
    DecimalDelta,
    /// Scaled integers, second differences (counters).
    DecimalDod,
    /// Gorilla XOR of the IEEE bits.
    Xor,
}

impl ValueMode {
    fn byte(self) -> u8 {
        match self {
            ValueMode::DecimalDelta => 0,
            ValueMode::DecimalDod => 1,
            ValueMode::Xor => 2,
        }
    }
    fn from_byte(b: u8) -> Result<Self, DecodeError> {
        match b {
            0 => Ok(ValueMode::DecimalDelta),
            1 => Ok(ValueMode::DecimalDod),
            2 => Ok(ValueMode::Xor),
            _ => Err(DecodeError::Invalid("chunk value mode")),
        }
    }
}

/// What a series' previous chunk learned, used to start the next one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkHint {
    /// Largest decimal scale a value needed (`None`: some value fit none).
    pub scale: u8,
    /// Whether second differences were cheaper than first differences.
    pub prefer_dod: bool,
    /// Whether most values had to be escaped (use xor next time).
    pub prefer_xor: bool,
}

/// The smallest scale at which `v` is an exact decimal, if any.
pub fn decimal_scale(v: f64) -> Option<u8> {
    (0..=MAX_SCALE).find(|&s| to_scaled(v, s).is_some())
}

fn to_scaled(v: f64, scale: u8) -> Option<i64> {
    let p = POW10[scale as usize];
    let x = (v * p).round();
    if !x.is_finite() || x.abs() >= MAX_EXACT {
        return None;
    }
    let n = x as i64;
    if ((n as f64) / p).to_bits() == v.to_bits() {
        Some(n)
    } else {
        None
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Appends an unsigned LEB128 varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends a zigzag varint.
pub fn put_ivarint(out: &mut Vec<u8>, v: i64) {
    put_varint(out, zigzag(v));
}

/// A cursor over bytes read from disk; every read checks bounds.
#[derive(Debug)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }
    /// Bytes consumed so far.
    pub fn pos(&self) -> usize {
        self.pos
    }
    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    /// Reads a varint.
    pub fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).ok_or(DecodeError::Truncated)?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::Invalid("varint too long"))
    }
    /// Reads a zigzag varint.
    pub fn ivarint(&mut self) -> Result<i64, DecodeError> {
        self.varint().map(unzigzag)
    }
    /// Reads a varint that must fit `max`.
    pub fn len(&mut self, max: usize) -> Result<usize, DecodeError> {
        let v = self.varint()?;
        if v > max as u64 {
            return Err(DecodeError::Invalid("length out of range"));
        }
        Ok(v as usize)
    }
    /// Reads `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    /// Reads one byte.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.bytes(1)?[0])
    }
    /// Reads a little-endian u32.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// Reads a little-endian u64.
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    /// Reads a length-prefixed UTF-8 string.
    pub fn string(&mut self) -> Result<String, DecodeError> {
        let n = self.len(self.remaining())?;
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Invalid("string is not UTF-8"))
    }
}

/// Appends bits MSB first.
#[derive(Debug, Default, Clone)]
struct BitWriter {
    bytes: Vec<u8>,
    acc: u64,
    nacc: u32,
}

impl BitWriter {
    #[inline]
    fn write(&mut self, value: u64, nbits: u32) {
        debug_assert!(nbits <= 64);
        if nbits == 0 {
            return;
        }
        let value = if nbits == 64 { value } else { value & ((1u64 << nbits) - 1) };
        let free = 64 - self.nacc;
        if nbits <= free {
            self.acc = if nbits == 64 { value } else { (self.acc << nbits) | value };
            self.nacc += nbits;
            if self.nacc == 64 {
                self.bytes.extend_from_slice(&self.acc.to_be_bytes());
                self.acc = 0;
                self.nacc = 0;
            }
        } else {
            let hi = nbits - free;
            self.acc = (self.acc << free) | (value >> hi);
            self.bytes.extend_from_slice(&self.acc.to_be_bytes());
            self.acc = value & ((1u64 << hi) - 1);
            self.nacc = hi;
        }
    }

    fn bit_len(&self) -> usize {
        self.bytes.len() * 8 + self.nacc as usize
    }

    fn finish_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.bytes);
        let nbytes = self.nacc.div_ceil(8) as usize;
        if nbytes > 0 {
            let tail = (self.acc << (64 - self.nacc)).to_be_bytes();
            out.extend_from_slice(&tail[..nbytes]);
        }
    }

    fn heap_bytes(&self) -> usize {
        self.bytes.capacity()
    }

    fn shrink(&mut self) {
        self.bytes.shrink_to_fit();
    }
}

struct BitReader<'a> {
    buf: &'a [u8],
    bit: usize,
}

impl<'a> BitReader<'a> {
    #[inline]
    fn read(&mut self, nbits: u32) -> Result<u64, DecodeError> {
        if nbits == 0 {
            return Ok(0);
        }
        if self.bit + nbits as usize > self.buf.len() * 8 {
            return Err(DecodeError::Truncated);
        }
        let mut v: u64 = 0;
        let mut left = nbits;
        while left > 0 {
            let byte = self.buf[self.bit / 8];
            let off = (self.bit % 8) as u32;
            let take = left.min(8 - off);
            let bits = (u64::from(byte) >> (8 - off - take)) & ((1u64 << take) - 1);
            v = if take == 64 { bits } else { (v << take) | bits };
            left -= take;
            self.bit += take as usize;
        }
        Ok(v)
    }

    #[inline]
    fn bit(&mut self) -> Result<bool, DecodeError> {
        Ok(self.read(1)? == 1)
    }

    /// Counts leading 1 bits up to `max` (consuming the terminating 0 if any).
    #[inline]
    fn ones(&mut self, max: u32) -> Result<u32, DecodeError> {
        let mut n = 0;
        while n < max {
            if !self.bit()? {
                return Ok(n);
            }
            n += 1;
        }
        Ok(n)
    }
}

/// A chunk being written: the head of one series.
#[derive(Debug, Clone)]
pub struct ChunkEncoder {
    bits: BitWriter,
    n: u32,
    mode: ValueMode,
    scale: u8,
    t0: i64,
    t_prev: i64,
    t_delta: i64,
    v_prev: i64,
    v_delta: i64,
    x_prev: u64,
    x_lead: u32,
    x_trail: u32,
    // Learning for the next chunk.
    max_scale: u8,
    /// Scale at the start of the chunk (the header's).
    scale0: u8,
    cost_delta: u64,
    cost_dod: u64,
    escapes: u32,
    min_t: i64,
    max_t: i64,
}

impl ChunkEncoder {
    /// An empty chunk; mode and scale are fixed by the first value and `hint`.
    pub fn new(first: f64, hint: ChunkHint) -> Self {
        let (mode, scale) = match decimal_scale(first) {
            Some(s) if !hint.prefer_xor => {
                let scale = if to_scaled(first, s.max(hint.scale)).is_some() { s.max(hint.scale) } else { s };
                (if hint.prefer_dod { ValueMode::DecimalDod } else { ValueMode::DecimalDelta }, scale)
            }
            _ => (ValueMode::Xor, 0),
        };
        ChunkEncoder {
            bits: BitWriter::default(),
            n: 0,
            mode,
            scale,
            t0: 0,
            t_prev: 0,
            t_delta: 0,
            v_prev: 0,
            v_delta: 0,
            x_prev: 0,
            x_lead: 0,
            x_trail: 0,
            max_scale: 0,
            scale0: scale,
            cost_delta: 0,
            cost_dod: 0,
            escapes: 0,
            min_t: 0,
            max_t: 0,
        }
    }

    /// Number of points.
    pub fn len(&self) -> u32 {
        self.n
    }

    /// Whether no point was appended.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Last timestamp (meaningless when empty).
    pub fn max_t(&self) -> i64 {
        self.max_t
    }

    /// First timestamp (meaningless when empty).
    pub fn min_t(&self) -> i64 {
        self.min_t
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.bits.heap_bytes()
    }

    /// Releases spare capacity (before sealing or when memory is tight).
    pub fn shrink(&mut self) {
        self.bits.shrink();
    }

    /// Encoded size so far, in bits (without the header).
    pub fn bit_len(&self) -> usize {
        self.bits.bit_len()
    }

    /// What this chunk learned, for the series' next chunk.
    pub fn hint(&self) -> ChunkHint {
        ChunkHint {
            scale: self.max_scale,
            prefer_dod: self.cost_dod < self.cost_delta,
            prefer_xor: self.n > 0 && self.escapes * 2 > self.n,
        }
    }

    /// Appends a point. The caller guarantees `t` is greater than the last one.
    pub fn push(&mut self, t: i64, v: f64) {
        debug_assert!(self.n == 0 || t > self.t_prev);
        let w = &mut self.bits;
        if self.n == 0 {
            self.t0 = t;
            self.min_t = t;
        } else {
            let delta = t.wrapping_sub(self.t_prev);
            let dod = delta.wrapping_sub(self.t_delta);
            let z = zigzag(dod);
            if z == 0 {
                w.write(0, 1);
            } else if z < 1 << 7 {
                w.write(0b10, 2);
                w.write(z, 7);
            } else if z < 1 << 12 {
                w.write(0b110, 3);
                w.write(z, 12);
            } else if z < 1 << 20 {
                w.write(0b1110, 4);
                w.write(z, 20);
            } else {
                w.write(0b1111, 4);
                w.write(z, 64);
            }
            self.t_delta = delta;
        }
        self.t_prev = t;
        self.max_t = t;
        match self.mode {
            ValueMode::Xor => self.push_xor(v),
            ValueMode::DecimalDelta | ValueMode::DecimalDod => self.push_decimal(v),
        }
        self.n += 1;
    }

    fn push_decimal(&mut self, v: f64) {
        let needed = decimal_scale(v);
        self.max_scale = self.max_scale.max(needed.unwrap_or(MAX_SCALE));
        let mut scaled = to_scaled(v, self.scale);
        if scaled.is_none() {
            // More digits than the chunk's scale: raise the scale for the
            // rest of the chunk when the predictor survives the rescale.
            if let Some(s2) = needed.filter(|&s2| s2 > self.scale) {
                let f = 10i64.pow(u32::from(s2 - self.scale));
                let prev = self.v_prev.checked_mul(f).filter(|p| (*p as f64).abs() < MAX_EXACT);
                let delta = self.v_delta.checked_mul(f).filter(|d| (*d as f64).abs() < MAX_EXACT);
                if let (Some(prev), Some(delta)) = (prev, delta) {
                    self.bits.write(0b111111, 6);
                    self.bits.write(1, 1);
                    self.bits.write(u64::from(s2), 3);
                    self.scale = s2;
                    self.v_prev = prev;
                    self.v_delta = delta;
                    scaled = to_scaled(v, s2);
                }
            }
        }
        let w = &mut self.bits;
        let Some(n) = scaled else {
            self.escapes += 1;
            w.write(0b111111, 6);
            w.write(0, 1);
            w.write(v.to_bits(), 64);
            return;
        };
        let delta = n.wrapping_sub(self.v_prev);
        let dod = delta.wrapping_sub(self.v_delta);
        self.cost_delta = self.cost_delta.saturating_add(u64::from(64 - zigzag(delta).leading_zeros()));
        self.cost_dod = self.cost_dod.saturating_add(u64::from(64 - zigzag(dod).leading_zeros()));
        let r = if self.mode == ValueMode::DecimalDod { dod } else { delta };
        let z = zigzag(r);
        if z == 0 {
            w.write(0, 1);
        } else if z < 1 << 2 {
            w.write(0b10, 2);
            w.write(z, 2);
        } else if z < 1 << 6 {
            w.write(0b110, 3);
            w.write(z, 6);
        } else if z < 1 << 12 {
            w.write(0b1110, 4);
            w.write(z, 12);
        } else if z < 1 << 24 {
            w.write(0b11110, 5);
            w.write(z, 24);
        } else {
            w.write(0b111110, 6);
            w.write(z, 64);
        }
        self.v_prev = n;
        self.v_delta = delta;
    }

    fn push_xor(&mut self, v: f64) {
        let bits = v.to_bits();
        let w = &mut self.bits;
        if self.n == 0 {
            w.write(bits, 64);
            self.x_prev = bits;
            self.x_lead = 64;
            return;
        }
        let x = bits ^ self.x_prev;
        self.x_prev = bits;
        if x == 0 {
            w.write(0, 1);
            return;
        }
        let lead = x.leading_zeros().min(31);
        let trail = x.trailing_zeros();
        if self.x_lead != 64 && lead >= self.x_lead && trail >= self.x_trail {
            let len = 64 - self.x_lead - self.x_trail;
            w.write(0b10, 2);
            w.write(x >> self.x_trail, len);
        } else {
            let len = 64 - lead - trail;
            w.write(0b11, 2);
            w.write(u64::from(lead), 5);
            w.write(u64::from(len - 1), 6);
            w.write(x >> trail, len);
            self.x_lead = lead;
            self.x_trail = trail;
        }
    }

    /// Serializes the chunk (header + bit stream) into `out`.
    pub fn finish_into(&self, out: &mut Vec<u8>) {
        put_varint(out, u64::from(self.n));
        out.push(self.mode.byte());
        out.push(self.scale0);
        put_ivarint(out, self.t0);
        self.bits.finish_into(out);
    }

    /// Serialized size.
    pub fn encoded_len(&self) -> usize {
        10 + 2 + 10 + self.bits.bit_len().div_ceil(8)
    }
}

/// Encodes sorted, strictly increasing points into one chunk.
pub fn encode_points(points: &[(i64, f64)], hint: ChunkHint, out: &mut Vec<u8>) -> ChunkHint {
    let Some(&(_, first)) = points.first() else {
        put_varint(out, 0);
        out.push(0);
        out.push(0);
        put_ivarint(out, 0);
        return hint;
    };
    let mut enc = ChunkEncoder::new(first, hint);
    for &(t, v) in points {
        enc.push(t, v);
    }
    enc.finish_into(out);
    enc.hint()
}

/// Decodes a chunk, appending its points to `out`. Returns bytes consumed.
pub fn decode_chunk(buf: &[u8], out: &mut Vec<(i64, f64)>) -> Result<usize, DecodeError> {
    let mut c = Cursor::new(buf);
    let n = c.varint()?;
    let mode = ValueMode::from_byte(c.u8()?)?;
    let mut scale = c.u8()?;
    if scale > MAX_SCALE {
        return Err(DecodeError::Invalid("chunk scale"));
    }
    let t0 = c.ivarint()?;
    let body = &buf[c.pos()..];
    if n == 0 {
        return Ok(c.pos());
    }
    // Every point after the first takes at least two bits.
    if n > 1 + (body.len() as u64 * 8) / 2 {
        return Err(DecodeError::Invalid("chunk point count exceeds its size"));
    }
    out.reserve(n as usize);
    let mut p = POW10[scale as usize];
    let mut r = BitReader { buf: body, bit: 0 };
    let (mut t, mut t_delta) = (t0, 0i64);
    let (mut v_prev, mut v_delta) = (0i64, 0i64);
    let (mut x_prev, mut x_lead, mut x_trail) = (0u64, 64u32, 0u32);
    for i in 0..n {
        if i > 0 {
            let z = match r.ones(4)? {
                0 => 0,
                1 => r.read(7)?,
                2 => r.read(12)?,
                3 => r.read(20)?,
                _ => r.read(64)?,
            };
            t_delta = t_delta.wrapping_add(unzigzag(z));
            let next = t.wrapping_add(t_delta);
            if next <= t {
                return Err(DecodeError::Invalid("chunk timestamps do not increase"));
            }
            t = next;
        }
        let v = match mode {
            ValueMode::Xor => {
                if i == 0 {
                    x_prev = r.read(64)?;
                } else if r.bit()? {
                    if r.bit()? {
                        let lead = r.read(5)? as u32;
                        let len = r.read(6)? as u32 + 1;
                        if lead + len > 64 {
                            return Err(DecodeError::Invalid("xor window"));
                        }
                        let trail = 64 - lead - len;
                        x_prev ^= r.read(len)? << trail;
                        x_lead = lead;
                        x_trail = trail;
                    } else {
                        if x_lead == 64 {
                            return Err(DecodeError::Invalid("xor window reused before set"));
                        }
                        let len = 64 - x_lead - x_trail;
                        x_prev ^= r.read(len)? << x_trail;
                    }
                }
                if i == 0 {
                    x_lead = 64;
                }
                f64::from_bits(x_prev)
            }
            ValueMode::DecimalDelta | ValueMode::DecimalDod => {
                let z = match r.ones(6)? {
                    0 => Some(0),
                    1 => Some(r.read(2)?),
                    2 => Some(r.read(6)?),
                    3 => Some(r.read(12)?),
                    4 => Some(r.read(24)?),
                    5 => Some(r.read(64)?),
                    _ => None,
                };
                let z = match z {
                    Some(z) => Some(z),
                    None if r.bit()? => {
                        let s2 = r.read(3)? as u8;
                        if s2 <= scale || s2 > MAX_SCALE {
                            return Err(DecodeError::Invalid("chunk rescale"));
                        }
                        let f = 10i64.pow(u32::from(s2 - scale));
                        v_prev = v_prev.wrapping_mul(f);
                        v_delta = v_delta.wrapping_mul(f);
                        scale = s2;
                        p = POW10[scale as usize];
                        Some(match r.ones(6)? {
                            0 => 0,
                            1 => r.read(2)?,
                            2 => r.read(6)?,
                            3 => r.read(12)?,
                            4 => r.read(24)?,
                            5 => r.read(64)?,
                            _ => return Err(DecodeError::Invalid("escape after rescale")),
                        })
                    }
                    None => None,
                };
                match z {
                    Some(z) => {
                        let res = unzigzag(z);
                        let delta = if mode == ValueMode::DecimalDod { v_delta.wrapping_add(res) } else { res };
                        v_prev = v_prev.wrapping_add(delta);
                        v_delta = delta;
                        (v_prev as f64) / p
                    }
                    None => f64::from_bits(r.read(64)?),
                }
            }
        };
        out.push((t, v));
    }
    Ok(c.pos() + r.bit.div_ceil(8))
}
