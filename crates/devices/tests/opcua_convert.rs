//! The OPC UA driver's value conversions, without a server: variants to JSON
//! as the model types them, DataValue statuses to quality or property
//! errors, timestamps, and JSON to the variant type a node holds.

#![cfg(feature = "opcua")]

use opcua::types::{ByteString, DataValue, DateTime, StatusCode, UAString, Variant, VariantScalarTypeId as T};
use serde_json::json;
use yunbian_api::{PropertyType as P, Quality};
use yunbian_devices::opcua::{json_of, reading_of, variant_of};

#[test]
fn variants_become_json_of_the_model_type() {
    assert_eq!(json_of(&Variant::UInt64(9_000_000_000), P::Int), Ok(json!(9_000_000_000u64)));
    assert_eq!(json_of(&Variant::SByte(-3), P::Int), Ok(json!(-3)));
    assert_eq!(json_of(&Variant::Double(4.0), P::Int), Ok(json!(4)));
    assert!(json_of(&Variant::Double(4.5), P::Int).is_err());
    assert!(json_of(&Variant::UInt64(u64::MAX), P::Int).expect_err("refused").contains("does not fit"));
    assert_eq!(json_of(&Variant::Int16(7), P::Float), Ok(json!(7.0)));
    assert_eq!(json_of(&Variant::Float(1.5), P::Float), Ok(json!(1.5)));
    assert!(json_of(&Variant::Double(f64::NAN), P::Float).expect_err("refused").contains("finite"));
    assert_eq!(json_of(&Variant::Boolean(true), P::Bool), Ok(json!(true)));
    assert_eq!(json_of(&Variant::String(UAString::from("hi")), P::String), Ok(json!("hi")));
    assert_eq!(json_of(&Variant::ByteString(ByteString::from(vec![0u8, 255])), P::Bytes), Ok(json!([0, 255])));
    let e = json_of(&Variant::String(UAString::from("hi")), P::Float).expect_err("refused");
    assert!(e.contains("String") && e.contains("float"), "{e}");
}

#[test]
fn statuses_and_timestamps() {
    let mut dv = DataValue::value_only(Variant::Int32(5));
    // No timestamps from the server: the time of receipt.
    let r = reading_of(&dv, P::Int, 1_234).expect("good").expect("value");
    assert_eq!((r.value, r.ts_ms, r.quality), (json!(5), 1_234, Quality::Good));

    let server = DateTime::ymd_hms(2030, 1, 2, 3, 4, 5);
    dv.server_timestamp = Some(server);
    let r = reading_of(&dv, P::Int, 1_234).expect("good").expect("value");
    assert_eq!(r.ts_ms, 1_893_553_445_000, "server time when no source time");

    let source = DateTime::ymd_hms(2030, 1, 2, 3, 3, 5);
    dv.source_timestamp = Some(source);
    let r = reading_of(&dv, P::Int, 1_234).expect("good").expect("value");
    assert_eq!(r.ts_ms, 1_893_553_385_000, "source time first");

    dv.status = Some(StatusCode::UncertainLastUsableValue);
    assert_eq!(reading_of(&dv, P::Int, 0).expect("uncertain").expect("value").quality, Quality::Uncertain);

    dv.status = Some(StatusCode::BadNodeIdUnknown);
    assert_eq!(reading_of(&dv, P::Int, 0), Err("BadNodeIdUnknown".to_string()));

    // Good but empty: no value yet.
    assert_eq!(reading_of(&DataValue::value_only(Variant::Empty), P::Int, 0), Ok(None));
}

#[test]
fn json_becomes_the_node_variant_type() {
    assert_eq!(variant_of(&json!(42), T::Double), Ok(Variant::Double(42.0)));
    assert_eq!(variant_of(&json!(42), T::Int32), Ok(Variant::Int32(42)));
    assert_eq!(variant_of(&json!(42.0), T::UInt16), Ok(Variant::UInt16(42)));
    assert_eq!(variant_of(&json!(1.5), T::Float), Ok(Variant::Float(1.5)));
    assert_eq!(variant_of(&json!(true), T::Boolean), Ok(Variant::Boolean(true)));
    assert_eq!(variant_of(&json!(u64::MAX), T::UInt64), Ok(Variant::UInt64(u64::MAX)));
    assert_eq!(variant_of(&json!("on"), T::String), Ok(Variant::String(UAString::from("on"))));
    assert_eq!(variant_of(&json!([1, 2]), T::ByteString), Ok(Variant::ByteString(ByteString::from(vec![1u8, 2]))));
    assert!(variant_of(&json!(300), T::Byte).expect_err("refused").contains("out of range for Byte"));
    assert!(variant_of(&json!(-1), T::UInt32).expect_err("refused").contains("out of range"));
    assert!(variant_of(&json!(2.5), T::Int32).expect_err("refused").contains("not an integer"));
    assert!(variant_of(&json!("x"), T::Double).is_err());
    assert!(variant_of(&json!([256]), T::ByteString).is_err());
    assert!(variant_of(&json!(1), T::DateTime).expect_err("refused").contains("not supported"));
}
