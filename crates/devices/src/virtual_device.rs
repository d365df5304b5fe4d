//! Virtual devices: properties produced by generators (sine, random walk,
//! step, constant), for demos and tests. A written value replaces the
//! generator's output until the next write, as a real actuator would hold it.
//!
//! Values are a function of the wall clock (sine, step) or of a seeded
//! generator advanced once per read (random walk), so two agents with the same
//! seed produce the same walk.

use std::collections::BTreeMap;

use yunbian_api::{Generator, PropertyType, Quality};

use crate::driver::{duration_ms, unix_ms, DeviceConfig, Driver, DriverError, PropertyRead, Reading, WriteError};

struct VirtualProperty {
    generator: Generator,
    ty: PropertyType,
    walk: f64,
    written: Option<serde_json::Value>,
}

/// The driver of `protocol: virtual`.
pub struct VirtualDriver {
    props: BTreeMap<String, VirtualProperty>,
    order: Vec<String>,
    rng: u64,
    clock: fn() -> u64,
    stamps: crate::driver::ReadStamps,
}

impl VirtualDriver {
    /// Builds the generators of the device's properties.
    pub fn new(cfg: &DeviceConfig) -> Result<Self, DriverError> {
        Self::with_clock(cfg, unix_ms)
    }

    /// As [`VirtualDriver::new`], with a clock in Unix milliseconds (tests).
    pub fn with_clock(cfg: &DeviceConfig, clock: fn() -> u64) -> Result<Self, DriverError> {
        let seed = match &cfg.device.spec.protocol {
            yunbian_api::Protocol::Virtual(v) => v.seed,
            other => return Err(DriverError::Config(format!("protocol {} is not virtual", other.name()))),
        };
        let mut props = BTreeMap::new();
        let mut order = Vec::new();
        for v in &cfg.device.spec.properties {
            let Some(g) = &v.generator else {
                return Err(DriverError::Config(format!("property {} has no generator", v.name)));
            };
            let ty = cfg.model.spec.property(&v.name).map(|p| p.ty).unwrap_or_default();
            let walk = match g {
                Generator::RandomWalk { start, .. } => *start,
                _ => 0.0,
            };
            props.insert(v.name.clone(), VirtualProperty { generator: g.clone(), ty, walk, written: None });
            order.push(v.name.clone());
        }
        // Never zero: xorshift would stay at zero.
        let rng = seed ^ 0x9E37_79B9_7F4A_7C15;
        Ok(VirtualDriver { props, order, rng: rng.max(1), clock, stamps: Default::default() })
    }

    fn next_unit(&mut self) -> f64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (r >> 11) as f64 / (1u64 << 53) as f64
    }

    fn value_of(&mut self, name: &str, now: u64) -> Option<serde_json::Value> {
        let unit = self.next_unit();
        let p = self.props.get_mut(name)?;
        if let Some(w) = &p.written {
            return Some(w.clone());
        }
        let raw = match &p.generator {
            Generator::Sine { amplitude, period, offset } => {
                let period = duration_ms(period, 60_000).max(1) as f64;
                let phase = (now as f64 % period) / period;
                serde_json::json!(offset + amplitude * (std::f64::consts::TAU * phase).sin())
            }
            Generator::RandomWalk { step, min, max, .. } => {
                p.walk = (p.walk + (unit * 2.0 - 1.0) * step).clamp(*min, *max);
                serde_json::json!(p.walk)
            }
            Generator::Step { values, period } => {
                let period = duration_ms(period, 10_000).max(1);
                let i = (now / period) as usize % values.len().max(1);
                values.get(i).cloned().unwrap_or(serde_json::Value::Null)
            }
            Generator::Constant { value } => value.clone(),
        };
        Some(match (p.ty, raw.as_f64()) {
            (PropertyType::Int, Some(f)) => serde_json::json!(f.round() as i64),
            (PropertyType::Float, Some(f)) => serde_json::json!((f * 1e6).round() / 1e6),
            _ => raw,
        })
    }
}

#[async_trait::async_trait]
impl Driver for VirtualDriver {
    async fn connect(&mut self) -> Result<(), DriverError> {
        Ok(())
    }

    async fn read(&mut self, only: &[String]) -> Result<Vec<PropertyRead>, DriverError> {
        let now = (self.clock)();
        let ts_ms = self.stamps.stamp_at(now);
        let names: Vec<String> = if only.is_empty() { self.order.clone() } else { only.to_vec() };
        Ok(names
            .into_iter()
            .map(|n| {
                let result = match self.value_of(&n, now) {
                    Some(value) => Ok(Some(Reading { value, ts_ms, quality: Quality::Good })),
                    None => Err(format!("no such property {n:?}")),
                };
                PropertyRead { property: n, result }
            })
            .collect())
    }

    async fn write(&mut self, property: &str, value: &serde_json::Value) -> Result<(), WriteError> {
        let p = self
            .props
            .get_mut(property)
            .ok_or_else(|| WriteError::Refused(format!("no such property {property:?}")))?;
        p.written = Some(value.clone());
        Ok(())
    }

    async fn disconnect(&mut self) {}
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use yunbian_api::*;

    use super::*;

    fn cfg(seed: u64) -> DeviceConfig {
        let model = DeviceModel::new(
            "m",
            DeviceModelSpec {
                description: String::new(),
                properties: vec![
                    PropertyModel { name: "w".into(), ty: PropertyType::Float, ..Default::default() },
                    PropertyModel {
                        name: "k".into(),
                        ty: PropertyType::Int,
                        access_mode: AccessMode::ReadWrite,
                        ..Default::default()
                    },
                    PropertyModel { name: "s".into(), ty: PropertyType::Float, ..Default::default() },
                ],
            },
        );
        let gen =
            |name: &str, g: Generator| PropertyVisitor { name: name.into(), generator: Some(g), ..Default::default() };
        let device = Device::new(
            "d",
            DeviceSpec {
                model: "m".into(),
                node: "n".into(),
                protocol: Protocol::Virtual(VirtualDevice { seed }),
                properties: vec![
                    gen("w", Generator::RandomWalk { start: 0.0, step: 1.0, min: -2.0, max: 2.0 }),
                    gen("k", Generator::Constant { value: serde_json::json!(7) }),
                    gen("s", Generator::Sine { amplitude: 10.0, period: "4s".into(), offset: 5.0 }),
                ],
                ..Default::default()
            },
        );
        DeviceConfig { device: Arc::new(device), model: Arc::new(model) }
    }

    fn at_one_second() -> u64 {
        1_000
    }

    #[tokio::test]
    async fn generators_are_seeded_bounded_and_writable() {
        let mut a = VirtualDriver::with_clock(&cfg(42), at_one_second).expect("driver");
        let mut b = VirtualDriver::with_clock(&cfg(42), at_one_second).expect("driver");
        for _ in 0..50 {
            let ra = a.read(&[]).await.expect("read");
            let rb = b.read(&[]).await.expect("read");
            assert_eq!(ra, rb, "same seed, same values");
            let w = ra[0].result.clone().expect("ok").expect("value").value.as_f64().expect("number");
            assert!((-2.0..=2.0).contains(&w), "{w}");
            // Quarter period of a 4 s sine: offset + amplitude.
            assert_eq!(ra[2].result.clone().expect("ok").expect("value").value, serde_json::json!(15.0));
        }
        a.write("k", &serde_json::json!(9)).await.expect("write");
        let r = a.read(&["k".to_string()]).await.expect("read");
        assert_eq!(r[0].result.clone().expect("ok").expect("value").value, serde_json::json!(9));
    }
}
