//! Devices on the edge: one supervised mapper task per device, talking to it
//! through a protocol [`driver::Driver`] (Modbus TCP/RTU, OPC UA, MQTT on the
//! edge bus, virtual generators, or an external mapper over the local mapper
//! interface), keeping its twin, writing desired values with read-back, and
//! reporting changes beyond the deadband at most once per report cycle.
//!
//! Architecture invariants:
//! - One device never slows another: each runs in its own task, every
//!   device I/O has a timeout, and nothing a device sends can panic the agent.
//! - The protocol logic that decides things (register batching, value
//!   decoding, twin reporting) is sans-IO and tested with a virtual clock;
//!   the drivers only move bytes.

pub mod bus;
pub mod driver;
pub mod external;
pub mod host;
pub mod local_api;
pub mod modbus;
pub mod mqtt;
#[cfg(feature = "opcua")]
pub mod opcua;
pub mod twin;
pub mod virtual_device;

use std::sync::Arc;

pub use bus::{EdgeBus, MemoryBus};
pub use driver::{DeviceConfig, Driver, DriverError};
pub use host::{DriverFactory, HostEvent, MapperHost};

/// The drivers built into this agent, by protocol. `external` devices are
/// served by [`external`] mappers when `external` is given.
pub fn standard_drivers(bus: Arc<dyn EdgeBus>, external: Option<crate::external::ExternalRegistry>) -> DriverFactory {
    Arc::new(move |cfg: &DeviceConfig| -> Result<Box<dyn Driver>, DriverError> {
        use yunbian_api::Protocol;
        Ok(match &cfg.device.spec.protocol {
            Protocol::Virtual(_) => Box::new(virtual_device::VirtualDriver::new(cfg)?),
            Protocol::Mqtt(_) => Box::new(mqtt::MqttDriver::new(cfg, bus.clone())?),
            Protocol::ModbusTcp(_) | Protocol::ModbusRtu(_) => Box::new(modbus::ModbusDriver::new(cfg)?),
            #[cfg(feature = "opcua")]
            Protocol::Opcua(_) => Box::new(opcua::OpcuaDriver::new(cfg)?),
            #[cfg(not(feature = "opcua"))]
            Protocol::Opcua(_) => {
                return Err(DriverError::Config(
                    "this agent was built without OPC UA support (cargo feature `opcua`)".into(),
                ))
            }
            Protocol::External(e) => match &external {
                Some(registry) => Box::new(crate::external::ExternalDriver::new(cfg, registry.clone())?),
                None => {
                    return Err(DriverError::Config(format!(
                        "external mapper {:?}: this agent does not serve the mapper interface",
                        e.mapper
                    )))
                }
            },
        })
    })
}
