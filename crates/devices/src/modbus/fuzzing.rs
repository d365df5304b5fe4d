//! The per-input check of the register decoder, shared by the cargo-fuzz
//! target `modbus_decode` (`fuzz/fuzz_targets/modbus_decode.rs`) and the
//! corpus replay test (`tests/modbus_fuzz_corpus.rs`).
//!
//! Input layout (any bytes are accepted; missing bytes read as 0):
//!
//! | byte | meaning |
//! | ---- | ------- |
//! | 0    | data type: `% 8` → int16, uint16, int32, uint32, float32, float64, bool, string |
//! | 1    | bit 0 byte order little, bit 1 word order little, bits 2–7 `% 5` → property type int, float, bool, string, bytes |
//! | 2    | string `count` (`% 16 + 1` registers) |
//! | 3    | scale, an index into [`SCALES`] |
//! | 4    | offset, an index into [`OFFSETS`] |
//! | 5…   | the registers, big-endian pairs (an odd last byte is dropped) |
//!
//! [`check_decode`] panics only when a property is violated: decoding
//! panics, a decoded value is not of the model's type, or a plain
//! (scale 1, offset 0) value does not encode back to the same registers.

use yunbian_api::{Endian, ModbusDataType, ModbusVisitor, PropertyType, RegisterType};

use super::codec::{decode_bit, decode_registers, encode_registers};

/// Scales an input can pick.
pub const SCALES: [f64; 10] = [1.0, 0.1, 10.0, 2.0, 0.5, -1.0, 0.01, 1e300, 3.7, 0.0];
/// Offsets an input can pick.
pub const OFFSETS: [f64; 6] = [0.0, -5.0, 1.5, 1e308, -40.0, 1e-300];

const TYPES: [ModbusDataType; 8] = [
    ModbusDataType::Int16,
    ModbusDataType::Uint16,
    ModbusDataType::Int32,
    ModbusDataType::Uint32,
    ModbusDataType::Float32,
    ModbusDataType::Float64,
    ModbusDataType::Bool,
    ModbusDataType::String,
];
const PROPERTY_TYPES: [PropertyType; 5] =
    [PropertyType::Int, PropertyType::Float, PropertyType::Bool, PropertyType::String, PropertyType::Bytes];

/// The visitor, property type and registers an input describes.
pub fn parse_input(data: &[u8]) -> (ModbusVisitor, PropertyType, Vec<u16>) {
    let at = |i: usize| data.get(i).copied().unwrap_or(0);
    let flags = at(1);
    let order = |bit: u8| if flags & bit != 0 { Endian::Little } else { Endian::Big };
    let visitor = ModbusVisitor {
        register: RegisterType::Holding,
        address: 0,
        count: Some(u16::from(at(2) % 16) + 1),
        data_type: Some(TYPES[usize::from(at(0)) % TYPES.len()]),
        byte_order: order(1),
        word_order: order(2),
        scale: SCALES[usize::from(at(3)) % SCALES.len()],
        offset: OFFSETS[usize::from(at(4)) % OFFSETS.len()],
    };
    let ty = PROPERTY_TYPES[usize::from(flags >> 2) % PROPERTY_TYPES.len()];
    let words = data.get(5..).unwrap_or(&[]).chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    (visitor, ty, words)
}

/// Decodes the input's registers (as given, and cut to the data type's
/// size) and its first bit, checking the properties above.
pub fn check_decode(data: &[u8]) {
    let (v, ty, words) = parse_input(data);
    // As given: a wrong length must be an error, not a panic.
    let _ = decode_registers(&v, ty, &words);
    let n = usize::from(v.quantity());
    if words.len() >= n {
        let words = &words[..n];
        if let Ok(value) = decode_registers(&v, ty, words) {
            assert!(ty.accepts(&value), "{value} is not a {} ({v:?}, {words:04x?})", ty.as_str());
            let encoded = encode_registers(&v, ty, &value);
            if round_trips(&v, ty) {
                assert_eq!(encoded.as_deref(), Ok(words), "{value} did not encode back ({v:?})");
            }
        }
    }
    for bit in [false, true] {
        if let Ok(value) = decode_bit(&v, ty, bit) {
            assert!(ty.accepts(&value), "bit {bit} gave {value} for a {}", ty.as_str());
        }
    }
}

/// Whether decode then encode must give back the same registers: plain
/// scale and offset, and a decoding that loses nothing (not a bool, which
/// maps every non-zero register to true; not a float read as an int, where
/// -0.0 becomes 0).
fn round_trips(v: &ModbusVisitor, ty: PropertyType) -> bool {
    let dt = v.data_type();
    let float_dt = matches!(dt, ModbusDataType::Float32 | ModbusDataType::Float64);
    v.scale == 1.0
        && v.offset == 0.0
        && dt != ModbusDataType::Bool
        && ty != PropertyType::Bool
        && !(float_dt && ty == PropertyType::Int)
}
