//! The boundary between the device supervisor and the protocols: a
//! [`Driver`] owns one connection to one device.
//!
//! The supervisor calls `connect`, then `read` once per collection cycle,
//! `write` for desired values (followed by a `read` of the same property to
//! verify), and `disconnect` before reconnecting after a device-level error.
//! It wraps every call in the device's timeout, so a driver may block as
//! long as its peer does; it never needs its own supervision.
//!
//! Errors come in two levels:
//! - a device-level [`DriverError`] (connection refused or lost, timeout,
//!   garbage on the wire) counts towards the device going offline and makes
//!   the supervisor reconnect with back-off;
//! - a property-level error (a Modbus exception for one address, an OPC UA
//!   bad status for one node) is returned inside [`PropertyRead::result`]:
//!   the property's quality turns bad with the error, the device stays online.

use std::sync::Arc;

use yunbian_api::{Device, DeviceModel, Quality};

/// A value read from the device.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// The value, typed as the model says (number, bool, string, bytes as an
    /// array of numbers).
    pub value: serde_json::Value,
    /// When the device produced it, Unix milliseconds: the read time for
    /// polled protocols, the message or source time for pushed ones. A
    /// reading whose timestamp did not advance is not new.
    pub ts_ms: u64,
    /// Quality.
    pub quality: Quality,
}

/// One property's outcome of a [`Driver::read`].
#[derive(Debug, Clone, PartialEq)]
pub struct PropertyRead {
    /// Property name.
    pub property: String,
    /// The reading, or why this property could not be read. `Ok(None)`: no
    /// value yet (a pushed property nobody published).
    pub result: Result<Option<Reading>, String>,
}

/// Device-level failure.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DriverError {
    /// Could not open the connection.
    #[error("connect: {0}")]
    Connect(String),
    /// The device did not answer in time.
    #[error("timed out after {0} ms")]
    Timeout(u64),
    /// The connection failed while in use.
    #[error("i/o: {0}")]
    Io(String),
    /// The device answered something that is not the protocol (wrong
    /// transaction id, truncated frame, nonsense).
    #[error("protocol: {0}")]
    Protocol(String),
    /// The configuration cannot work (validated specs should never get here).
    #[error("configuration: {0}")]
    Config(String),
}

/// Why a write failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WriteError {
    /// The device is unreachable or broke the protocol.
    #[error(transparent)]
    Device(#[from] DriverError),
    /// The device refused this write (exception, bad status, read-only).
    #[error("{0}")]
    Refused(String),
}

/// What a driver is built from: the device, its model, and the agent
/// services a protocol may need.
#[derive(Clone)]
pub struct DeviceConfig {
    /// The device as the cloud sent it (spec only).
    pub device: Arc<Device>,
    /// Its model.
    pub model: Arc<DeviceModel>,
}

impl DeviceConfig {
    /// Device name.
    pub fn name(&self) -> &str {
        self.device.name()
    }
}

/// One connection to one device. Owned by the device's task; never shared.
#[async_trait::async_trait]
pub trait Driver: Send {
    /// Opens (or re-opens) the connection.
    async fn connect(&mut self) -> Result<(), DriverError>;

    /// Reads the named properties (all of `spec.properties` when `only` is
    /// empty). Returns one entry per property, in the order asked.
    async fn read(&mut self, only: &[String]) -> Result<Vec<PropertyRead>, DriverError>;

    /// Writes one property's value (already checked against the model).
    async fn write(&mut self, property: &str, value: &serde_json::Value) -> Result<(), WriteError>;

    /// Closes the connection (the next call is `connect`).
    async fn disconnect(&mut self);
}

/// Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Time stamps for polled readings: Unix milliseconds that never go back
/// (a wall clock stepped backwards would otherwise make every reading look
/// older than the last one, and the twin would drop them as not new until
/// the clock caught up).
#[derive(Debug, Default)]
pub struct ReadStamps {
    last: u64,
}

impl ReadStamps {
    /// The stamp of a reading taken now.
    pub fn stamp(&mut self) -> u64 {
        self.stamp_at(unix_ms())
    }

    /// The stamp of a reading taken at `now` (Unix ms from the caller's clock).
    pub fn stamp_at(&mut self, now: u64) -> u64 {
        let t = now.max(self.last + 1);
        self.last = t;
        t
    }
}

/// Parses a validated duration field, falling back when it is not.
pub fn duration_ms(s: &str, fallback: u64) -> u64 {
    yunbian_api::time::parse_duration_ms(s).unwrap_or(fallback)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_stamps_never_go_back() {
        let mut s = ReadStamps::default();
        assert_eq!(s.stamp_at(1_000), 1_000);
        // Same millisecond, then a clock stepped back: still newer.
        assert_eq!(s.stamp_at(1_000), 1_001);
        assert_eq!(s.stamp_at(400), 1_002);
        assert_eq!(s.stamp_at(5_000), 5_000);
    }
}
