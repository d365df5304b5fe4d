//! The decoders of device input written here — MQTT payload extraction by
//! JSON path, `…/set` payloads, set topics, topic filters — never panic on
//! anything a device or an app can send, and decode what they should.

use proptest::prelude::*;
use yunbian_api::PropertyType;
use yunbian_devices::bus::{filter_matches, parse_set_topic};
use yunbian_devices::host::parse_set_payload;
use yunbian_devices::mqtt::extract;

fn any_type() -> impl Strategy<Value = PropertyType> {
    prop_oneof![
        Just(PropertyType::Int),
        Just(PropertyType::Float),
        Just(PropertyType::Bool),
        Just(PropertyType::String),
        Just(PropertyType::Bytes),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn extraction_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..256), path in "[a-z$.\\[\\]0-9]{0,24}", ty in any_type()) {
        let _ = extract(&payload, &path, ty);
        let _ = parse_set_payload(&payload);
    }

    #[test]
    fn topics_never_panic(topic in "[a-z/+#$]{0,40}", filter in "[a-z/+#]{0,40}") {
        let _ = parse_set_topic(&topic);
        let _ = filter_matches(&filter, &topic);
    }

    #[test]
    fn numbers_come_back_typed(x in -1e12f64..1e12, i in any::<i64>(), key in "[a-z]{1,8}") {
        let doc = format!(r#"{{"{key}": {{"v": [{x}, {i}]}}}}"#);
        let f = extract(doc.as_bytes(), &format!("{key}.v[0]"), PropertyType::Float).expect("float");
        prop_assert!((f.as_f64().expect("number") - x).abs() <= x.abs() * 1e-12);
        let n = extract(doc.as_bytes(), &format!("$.{key}.v[1]"), PropertyType::Int).expect("int");
        prop_assert_eq!(n.as_i64(), Some(i));
        let missing = format!("{key}.v[2]");
        prop_assert!(extract(doc.as_bytes(), &missing, PropertyType::Float).is_err());
    }
}
