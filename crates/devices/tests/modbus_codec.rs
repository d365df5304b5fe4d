//! Property tests of the Modbus value codec (`yunbian_devices::modbus::codec`):
//! encoding then decoding gives the value back for every data type, byte
//! and word order; decoding then encoding gives the registers back; and
//! decoding never panics on arbitrary register contents or visitors.

use proptest::prelude::*;
use serde_json::{json, Value};
use yunbian_api::{Endian, ModbusDataType as Dt, ModbusVisitor, PropertyType as Ty, RegisterType};
use yunbian_devices::modbus::codec::{decode_registers, encode_registers, plan_reads, PlanOptions, Point};
use yunbian_devices::modbus::fuzzing::check_decode;

fn endian() -> impl Strategy<Value = Endian> {
    prop_oneof![Just(Endian::Big), Just(Endian::Little)]
}

fn visitor(dt: Dt, word: Endian, byte: Endian) -> ModbusVisitor {
    ModbusVisitor { data_type: Some(dt), word_order: word, byte_order: byte, scale: 1.0, ..Default::default() }
}

fn round_trip(v: &ModbusVisitor, ty: Ty, value: &Value) -> Result<Value, String> {
    let words = encode_registers(v, ty, value).map_err(|e| e.to_string())?;
    assert_eq!(words.len(), usize::from(v.quantity()));
    decode_registers(v, ty, &words).map_err(|e| e.to_string())
}

proptest! {
    #[test]
    fn integers_round_trip(x in any::<i64>(), dt in prop_oneof![Just(Dt::Int16), Just(Dt::Uint16), Just(Dt::Int32), Just(Dt::Uint32)],
                           word in endian(), byte in endian()) {
        let (lo, hi): (i64, i64) = match dt {
            Dt::Int16 => (i16::MIN.into(), i16::MAX.into()),
            Dt::Uint16 => (0, u16::MAX.into()),
            Dt::Int32 => (i32::MIN.into(), i32::MAX.into()),
            _ => (0, u32::MAX.into()),
        };
        let v = visitor(dt, word, byte);
        let value = json!(x);
        if (lo..=hi).contains(&x) {
            prop_assert_eq!(round_trip(&v, Ty::Int, &value), Ok(value.clone()));
            prop_assert_eq!(round_trip(&v, Ty::Float, &value).map(|v| v.as_f64()), Ok(Some(x as f64)));
        } else {
            prop_assert!(encode_registers(&v, Ty::Int, &value).is_err(), "{} fits {:?}?", x, dt);
        }
    }

    #[test]
    fn integers_with_integral_scale_and_offset_round_trip(raw in any::<i32>(), scale in -1000i64..1000, offset in -100_000i64..100_000,
                                                          word in endian(), byte in endian()) {
        prop_assume!(scale != 0);
        let mut v = visitor(Dt::Int32, word, byte);
        v.scale = scale as f64;
        v.offset = offset as f64;
        let value = json!(i64::from(raw) * scale + offset);
        prop_assert_eq!(round_trip(&v, Ty::Int, &value), Ok(value.clone()));
    }

    #[test]
    fn float32_round_trips(bits in any::<u32>(), word in endian(), byte in endian()) {
        let f = f32::from_bits(bits);
        prop_assume!(f.is_finite());
        let v = visitor(Dt::Float32, word, byte);
        // What a read of this float32 gives…
        let mut words = vec![(bits >> 16) as u16, bits as u16];
        if byte == Endian::Little { words.iter_mut().for_each(|w| *w = w.swap_bytes()); }
        if word == Endian::Little { words.reverse(); }
        let read = decode_registers(&v, Ty::Float, &words).expect("finite float32 decodes");
        // …writes back to the same registers, and reads the same again.
        prop_assert_eq!(encode_registers(&v, Ty::Float, &read), Ok(words));
        prop_assert_eq!(round_trip(&v, Ty::Float, &read), Ok(read.clone()));
    }

    #[test]
    fn float64_round_trips(x in any::<f64>(), word in endian(), byte in endian()) {
        prop_assume!(x.is_finite());
        let v = visitor(Dt::Float64, word, byte);
        let value = json!(x);
        prop_assert_eq!(round_trip(&v, Ty::Float, &value), Ok(value.clone()));
    }

    #[test]
    fn scaled_registers_round_trip(raw in any::<u16>(), scale in prop_oneof![Just(0.1), Just(0.01), Just(0.5), Just(2.0), Just(0.25), Just(-0.1), Just(3.7)],
                                   offset in prop_oneof![Just(0.0), Just(-5.0), Just(273.15), Just(-40.0)], byte in endian()) {
        let mut v = visitor(Dt::Uint16, Endian::Big, byte);
        v.scale = scale;
        v.offset = offset;
        let words = vec![if byte == Endian::Little { raw.swap_bytes() } else { raw }];
        let value = decode_registers(&v, Ty::Float, &words).expect("decodes");
        prop_assert_eq!(encode_registers(&v, Ty::Float, &value), Ok(words), "value {}", value);
    }

    #[test]
    fn strings_round_trip(s in "[^\u{0}]{0,12}", count in 1u16..12, byte in endian()) {
        let mut v = visitor(Dt::String, Endian::Big, byte);
        v.count = Some(count);
        let value = json!(s);
        if s.len() <= usize::from(count) * 2 {
            prop_assert_eq!(round_trip(&v, Ty::String, &value), Ok(value.clone()));
        } else {
            prop_assert!(encode_registers(&v, Ty::String, &value).is_err());
        }
    }

    #[test]
    fn decoding_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
        check_decode(&data);
    }

    #[test]
    fn decoding_arbitrary_visitors_never_panics(words in proptest::collection::vec(any::<u16>(), 0..10), dt in 0usize..8, ty in 0usize..5,
                                                count in proptest::option::of(0u16..300), scale in any::<f64>(), offset in any::<f64>(),
                                                word in endian(), byte in endian()) {
        let dts = [Dt::Int16, Dt::Uint16, Dt::Int32, Dt::Uint32, Dt::Float32, Dt::Float64, Dt::Bool, Dt::String];
        let tys = [Ty::Int, Ty::Float, Ty::Bool, Ty::String, Ty::Bytes];
        let v = ModbusVisitor { data_type: Some(dts[dt]), count, scale, offset, word_order: word, byte_order: byte, ..Default::default() };
        if let Ok(value) = decode_registers(&v, tys[ty], &words) {
            prop_assert!(tys[ty].accepts(&value));
            let _ = encode_registers(&v, tys[ty], &value);
        }
    }

    #[test]
    fn plans_cover_every_point_once_within_limits(points in proptest::collection::vec((0u16..300, 0usize..8, 0usize..4, 1u16..20), 0..60),
                                                  gap in 0u16..5) {
        let dts = [Dt::Int16, Dt::Uint16, Dt::Int32, Dt::Uint32, Dt::Float32, Dt::Float64, Dt::Bool, Dt::String];
        let tables = [RegisterType::Coil, RegisterType::DiscreteInput, RegisterType::Input, RegisterType::Holding];
        let pts: Vec<Point> = points.iter().enumerate().map(|(i, &(address, dt, table, count))| {
            let register = tables[table];
            let data_type = if register.is_bits() { Dt::Bool } else { dts[dt] };
            Point::new(format!("p{i}"), ModbusVisitor { register, address, count: Some(count), data_type: Some(data_type), scale: 1.0, ..Default::default() }, Ty::Float)
        }).collect();
        let plan = plan_reads(&pts, PlanOptions { max_gap: gap, ..Default::default() });
        let mut seen = vec![0; pts.len()];
        for r in &plan.requests {
            let max = if r.table.is_bits() { 2000 } else { 125 };
            prop_assert!(r.quantity <= max);
            for s in &r.slots {
                let p = &pts[s.point];
                prop_assert_eq!(p.visitor.register, r.table);
                prop_assert_eq!(p.visitor.address, r.address + s.offset);
                prop_assert!(s.offset + s.quantity <= r.quantity);
                seen[s.point] += 1;
            }
        }
        prop_assert!(plan.unplannable.is_empty());
        prop_assert!(seen.iter().all(|&n| n == 1));
    }
}
