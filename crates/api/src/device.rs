//! Devices: `DeviceModel` (what properties a kind of device has) and
//! `Device` (one physical device: which node talks to it, over which
//! protocol, where each property lives, and its twin).
//!
//! A device's `spec` is intent: the protocol settings, the per-property
//! visitors (register, nodeId, topic…), the collection and report cycles, and
//! the `desired` values of writable properties. Its `status` is observation,
//! written by the node that runs the device's mapper: one [`Twin`] per
//! property (`reported`, `desired`, `observedDesired`), the device `state`,
//! and the last error.
//!
//! Checks that need only the device are in [`crate::validate`]; checks that
//! need the model too (a visitor whose data type cannot carry the model's
//! type, a desired value for a `ReadOnly` property) are in
//! [`check_device_against_model`], which the cloud runs at apply time and the
//! agent runs again before it writes to a device.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::kinds::{KindOf, Object};
use crate::meta::Kind;
use crate::validate::{Errors, FieldError};

/// A kind of device: its properties.
pub type DeviceModel = Object<DeviceModelSpec, DeviceModelStatus>;
/// One device attached to one node.
pub type Device = Object<DeviceSpec, DeviceStatus>;

// ---------------------------------------------------------------- DeviceModel

/// The properties every device of this model has.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceModelSpec {
    /// What the model is.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// The properties, each with a unique name.
    #[serde(default)]
    pub properties: Vec<PropertyModel>,
}

/// Observed facts about a model (none yet; the type keeps the object shape).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceModelStatus {}

impl KindOf for DeviceModelSpec {
    type Status = DeviceModelStatus;
    const KIND: Kind = Kind::DeviceModel;
}

/// Value type of a property.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PropertyType {
    /// A signed 64-bit integer.
    Int,
    /// A 64-bit float.
    #[default]
    Float,
    /// True or false.
    Bool,
    /// UTF-8 text.
    String,
    /// Raw bytes (JSON: base64 is not used; an array of numbers 0–255).
    Bytes,
}

impl PropertyType {
    /// Name as written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            PropertyType::Int => "int",
            PropertyType::Float => "float",
            PropertyType::Bool => "bool",
            PropertyType::String => "string",
            PropertyType::Bytes => "bytes",
        }
    }

    /// Whether `v` is a value of this type (ints are accepted as floats).
    pub fn accepts(self, v: &serde_json::Value) -> bool {
        match self {
            PropertyType::Int => v.as_i64().is_some(),
            PropertyType::Float => v.is_number(),
            PropertyType::Bool => v.is_boolean(),
            PropertyType::String => v.is_string(),
            PropertyType::Bytes => v.as_array().is_some_and(|a| a.iter().all(|b| b.as_u64().is_some_and(|b| b <= 255))),
        }
    }
}

/// Whether a property may be written.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum AccessMode {
    /// Read only.
    #[default]
    ReadOnly,
    /// Read and write (desired values are written to the device).
    ReadWrite,
}

/// One property of a model.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PropertyModel {
    /// Unique within the model.
    pub name: String,
    /// Value type.
    #[serde(rename = "type", default)]
    pub ty: PropertyType,
    /// Unit (`°C`, `rpm`…), free text.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub unit: String,
    /// Whether it may be written.
    #[serde(default)]
    pub access_mode: AccessMode,
    /// Smallest valid value (numbers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum: Option<f64>,
    /// Largest valid value (numbers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum: Option<f64>,
    /// What it is.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

impl PropertyModel {
    /// Why `v` cannot be this property's value, if it cannot.
    pub fn check_value(&self, v: &serde_json::Value) -> Result<(), String> {
        if !self.ty.accepts(v) {
            return Err(format!("{v} is not a value of type {}", self.ty.as_str()));
        }
        if let Some(x) = v.as_f64() {
            if let Some(min) = self.minimum {
                if x < min {
                    return Err(format!("{x} is below the minimum {min}"));
                }
            }
            if let Some(max) = self.maximum {
                if x > max {
                    return Err(format!("{x} is above the maximum {max}"));
                }
            }
        }
        Ok(())
    }
}

impl DeviceModelSpec {
    /// The property called `name`.
    pub fn property(&self, name: &str) -> Option<&PropertyModel> {
        self.properties.iter().find(|p| p.name == name)
    }
}

// ---------------------------------------------------------------- Device

/// Default collection cycle.
pub const DEFAULT_COLLECT_CYCLE: &str = "1s";
/// Default report cycle.
pub const DEFAULT_REPORT_CYCLE: &str = "10s";

/// Intent for one device.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceSpec {
    /// The DeviceModel's name.
    pub model: String,
    /// The node the device is attached to. Either this or `nodeSelector`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// Nodes that can reach the device; the cloud picks one (in
    /// `status.node`) and moves the device when that node is lost.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// How to talk to the device.
    pub protocol: Protocol,
    /// Where each property lives on the device.
    #[serde(default)]
    pub properties: Vec<PropertyVisitor>,
    /// How often the device is polled (`1s`, `500ms`).
    #[serde(default = "default_collect", skip_serializing_if = "is_default_collect")]
    pub collect_cycle: String,
    /// At most one twin report to the cloud per cycle (`10s`).
    #[serde(default = "default_report", skip_serializing_if = "is_default_report")]
    pub report_cycle: String,
    /// Whether readings go to the cloud at all (they always go to the edge bus).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub report_to_cloud: bool,
    /// Absolute change of a numeric value below which it is not reported
    /// (per-property `deadband` overrides it).
    #[serde(default, skip_serializing_if = "is_zero_f")]
    pub deadband: f64,
    /// Values to write to writable properties.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub desired: BTreeMap<String, serde_json::Value>,
}

fn default_collect() -> String {
    DEFAULT_COLLECT_CYCLE.to_string()
}
fn default_report() -> String {
    DEFAULT_REPORT_CYCLE.to_string()
}
fn is_default_collect(s: &String) -> bool {
    s == DEFAULT_COLLECT_CYCLE
}
fn is_default_report(s: &String) -> bool {
    s == DEFAULT_REPORT_CYCLE
}
fn yes() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}
fn is_zero_f(f: &f64) -> bool {
    *f == 0.0
}

impl DeviceSpec {
    /// Collection cycle in milliseconds (validated objects only; 1 s otherwise).
    pub fn collect_cycle_ms(&self) -> u64 {
        crate::time::parse_duration_ms(&self.collect_cycle).unwrap_or(1_000).max(1)
    }

    /// Report cycle in milliseconds (validated objects only; 10 s otherwise).
    pub fn report_cycle_ms(&self) -> u64 {
        crate::time::parse_duration_ms(&self.report_cycle).unwrap_or(10_000)
    }

    /// The visitor of property `name`.
    pub fn visitor(&self, name: &str) -> Option<&PropertyVisitor> {
        self.properties.iter().find(|p| p.name == name)
    }
}

/// How to talk to a device: exactly one protocol.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Protocol {
    /// Modbus over TCP.
    ModbusTcp(ModbusTcp),
    /// Modbus RTU over a serial line.
    ModbusRtu(ModbusRtu),
    /// OPC UA client session.
    Opcua(OpcuaConnection),
    /// Values published by the device on the edge MQTT broker.
    Mqtt(MqttConnection),
    /// Generated values, for demos and tests.
    Virtual(VirtualDevice),
    /// Served by an external mapper registered with the agent under `mapper`.
    External(ExternalConnection),
}

impl Default for Protocol {
    fn default() -> Self {
        Protocol::Virtual(VirtualDevice::default())
    }
}

impl Protocol {
    /// Name as written in manifests.
    pub fn name(&self) -> &'static str {
        match self {
            Protocol::ModbusTcp(_) => "modbusTcp",
            Protocol::ModbusRtu(_) => "modbusRtu",
            Protocol::Opcua(_) => "opcua",
            Protocol::Mqtt(_) => "mqtt",
            Protocol::Virtual(_) => "virtual",
            Protocol::External(_) => "external",
        }
    }
}

/// Modbus TCP endpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModbusTcp {
    /// Host name or address.
    pub host: String,
    /// TCP port (default 502).
    #[serde(default = "modbus_port")]
    pub port: u16,
    /// Unit (slave) id (default 1).
    #[serde(default = "one_u8")]
    pub unit_id: u8,
    /// Per-request timeout (default `1s`).
    #[serde(default = "one_second")]
    pub timeout: String,
}

fn modbus_port() -> u16 {
    502
}
fn one_u8() -> u8 {
    1
}
fn one_second() -> String {
    "1s".to_string()
}

/// Serial parity.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    /// No parity bit.
    #[default]
    None,
    /// Even parity.
    Even,
    /// Odd parity.
    Odd,
}

/// Modbus RTU line.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModbusRtu {
    /// Serial device path (`/dev/ttyUSB0`).
    pub serial_port: String,
    /// Baud rate (default 9600).
    #[serde(default = "baud")]
    pub baud_rate: u32,
    /// Parity (default none).
    #[serde(default)]
    pub parity: Parity,
    /// Data bits, 5–8 (default 8).
    #[serde(default = "eight")]
    pub data_bits: u8,
    /// Stop bits, 1 or 2 (default 1).
    #[serde(default = "one_u8")]
    pub stop_bits: u8,
    /// Unit (slave) id (default 1).
    #[serde(default = "one_u8")]
    pub unit_id: u8,
    /// Per-request timeout (default `1s`).
    #[serde(default = "one_second")]
    pub timeout: String,
}

fn baud() -> u32 {
    9600
}
fn eight() -> u8 {
    8
}

/// OPC UA security policy.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum SecurityPolicy {
    /// No security.
    #[default]
    None,
    /// Basic256Sha256.
    Basic256Sha256,
    /// Aes128_Sha256_RsaOaep.
    #[serde(rename = "Aes128Sha256RsaOaep")]
    Aes128Sha256RsaOaep,
    /// Aes256_Sha256_RsaPss.
    #[serde(rename = "Aes256Sha256RsaPss")]
    Aes256Sha256RsaPss,
}

/// OPC UA message security mode.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum SecurityMode {
    /// Plain.
    #[default]
    None,
    /// Signed.
    Sign,
    /// Signed and encrypted.
    SignAndEncrypt,
}

/// An OPC UA server and how to log in.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OpcuaConnection {
    /// `opc.tcp://host:port/path`.
    pub endpoint: String,
    /// Security policy (default None).
    #[serde(default)]
    pub security_policy: SecurityPolicy,
    /// Security mode (default None).
    #[serde(default)]
    pub security_mode: SecurityMode,
    /// User name (with `password`); anonymous when empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub username: String,
    /// Password for `username`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub password: String,
    /// PEM/DER client certificate file on the node (user or application identity).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub certificate_file: String,
    /// Private key file for `certificateFile`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub private_key_file: String,
    /// Per-request timeout (default `2s`).
    #[serde(default = "two_seconds")]
    pub timeout: String,
    /// Subscribe to value changes instead of polling every `collectCycle`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub subscribe: bool,
}

fn two_seconds() -> String {
    "2s".to_string()
}

/// A device that publishes on the edge broker.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MqttConnection {
    /// Seconds without any message after which the device is offline (0 = never).
    #[serde(default)]
    pub offline_after: String,
}

/// Generated values.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualDevice {
    /// Seed of the random generators (same seed, same values).
    #[serde(default)]
    pub seed: u64,
}

/// A device served by an external mapper.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalConnection {
    /// Name the mapper registers with (its protocol name).
    pub mapper: String,
    /// Free-form settings handed to the mapper as they are.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub config: serde_json::Value,
}

/// Where one property lives on the device; exactly the visitor of the
/// device's protocol is set.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PropertyVisitor {
    /// The model property.
    pub name: String,
    /// Modbus register (modbusTcp and modbusRtu).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modbus: Option<ModbusVisitor>,
    /// OPC UA node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opcua: Option<OpcuaVisitor>,
    /// MQTT topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<MqttVisitor>,
    /// Generator.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "virtual")]
    pub generator: Option<Generator>,
    /// Free-form settings for an external mapper.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<serde_json::Value>,
    /// Deadband of this property (overrides the device's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadband: Option<f64>,
}

/// Modbus register table.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub enum RegisterType {
    /// Read/write bits (function 1, 5, 15).
    Coil,
    /// Read-only bits (function 2).
    DiscreteInput,
    /// Read-only 16-bit registers (function 4).
    Input,
    /// Read/write 16-bit registers (functions 3, 6, 16).
    #[default]
    Holding,
}

impl RegisterType {
    /// Whether the table holds bits (coils, discrete inputs).
    pub fn is_bits(self) -> bool {
        matches!(self, RegisterType::Coil | RegisterType::DiscreteInput)
    }

    /// Whether values can be written.
    pub fn writable(self) -> bool {
        matches!(self, RegisterType::Coil | RegisterType::Holding)
    }

    /// Name as written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            RegisterType::Coil => "coil",
            RegisterType::DiscreteInput => "discreteInput",
            RegisterType::Input => "input",
            RegisterType::Holding => "holding",
        }
    }
}

/// How register words are interpreted.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModbusDataType {
    /// One register, signed.
    Int16,
    /// One register, unsigned.
    #[default]
    Uint16,
    /// Two registers, signed.
    Int32,
    /// Two registers, unsigned.
    Uint32,
    /// Two registers, IEEE 754.
    Float32,
    /// Four registers, IEEE 754.
    Float64,
    /// One bit (coils, discrete inputs) or a register ≠ 0.
    Bool,
    /// `count` registers, two ASCII bytes each, NULs trimmed.
    String,
}

impl ModbusDataType {
    /// Registers the type occupies (strings: their `count`).
    pub fn registers(self, count: Option<u16>) -> u16 {
        match self {
            ModbusDataType::Int16 | ModbusDataType::Uint16 | ModbusDataType::Bool => 1,
            ModbusDataType::Int32 | ModbusDataType::Uint32 | ModbusDataType::Float32 => 2,
            ModbusDataType::Float64 => 4,
            ModbusDataType::String => count.unwrap_or(1).max(1),
        }
    }

    /// Name as written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            ModbusDataType::Int16 => "int16",
            ModbusDataType::Uint16 => "uint16",
            ModbusDataType::Int32 => "int32",
            ModbusDataType::Uint32 => "uint32",
            ModbusDataType::Float32 => "float32",
            ModbusDataType::Float64 => "float64",
            ModbusDataType::Bool => "bool",
            ModbusDataType::String => "string",
        }
    }
}

/// Byte or word order.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Endian {
    /// Most significant first (Modbus's own order).
    #[default]
    Big,
    /// Least significant first.
    Little,
}

/// A Modbus register and how to decode it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModbusVisitor {
    /// Table.
    #[serde(default)]
    pub register: RegisterType,
    /// Zero-based address.
    pub address: u16,
    /// Registers (strings; other types know their size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u16>,
    /// Data type (default uint16; bool for coils and discrete inputs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_type: Option<ModbusDataType>,
    /// Byte order inside each register (default big).
    #[serde(default)]
    pub byte_order: Endian,
    /// Register order of multi-register values (default big: high word first).
    #[serde(default)]
    pub word_order: Endian,
    /// Value = raw × scale + offset (default 1).
    #[serde(default = "one_f", skip_serializing_if = "is_one_f")]
    pub scale: f64,
    /// Value = raw × scale + offset (default 0).
    #[serde(default, skip_serializing_if = "is_zero_f")]
    pub offset: f64,
}

fn one_f() -> f64 {
    1.0
}
fn is_one_f(f: &f64) -> bool {
    *f == 1.0
}

impl ModbusVisitor {
    /// The data type, defaulted by table.
    pub fn data_type(&self) -> ModbusDataType {
        self.data_type.unwrap_or(if self.register.is_bits() { ModbusDataType::Bool } else { ModbusDataType::Uint16 })
    }

    /// Registers (or bits) read for this property.
    pub fn quantity(&self) -> u16 {
        if self.register.is_bits() {
            1
        } else {
            self.data_type().registers(self.count)
        }
    }
}

/// An OPC UA node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OpcuaVisitor {
    /// Node id in the standard string form (`ns=2;s=Temperature`, `i=2258`).
    pub node_id: String,
}

/// An MQTT topic the device publishes the property on.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MqttVisitor {
    /// Topic (no wildcards).
    pub topic: String,
    /// Where the value is in a JSON payload (`temp`, `data.temp`, `$.data[0]`);
    /// empty: the whole payload is the value (a number, `true`, text).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub json_path: String,
    /// Topic a desired value is published on for the device to apply; the
    /// write is verified by the next value on `topic`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub set_topic: String,
}

/// A value generator for virtual devices.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, tag = "generator")]
pub enum Generator {
    /// `offset + amplitude·sin(2π·t/period)`.
    #[serde(rename_all = "camelCase")]
    Sine {
        /// Amplitude.
        #[serde(default = "one_f")]
        amplitude: f64,
        /// Period (`60s`).
        #[serde(default = "sixty_seconds")]
        period: String,
        /// Centre.
        #[serde(default)]
        offset: f64,
    },
    /// A random walk clamped to `[min, max]`.
    #[serde(rename_all = "camelCase")]
    RandomWalk {
        /// First value.
        #[serde(default)]
        start: f64,
        /// Largest step per collection.
        #[serde(default = "one_f")]
        step: f64,
        /// Lower bound.
        #[serde(default = "neg_big")]
        min: f64,
        /// Upper bound.
        #[serde(default = "big")]
        max: f64,
    },
    /// Cycles through `values`, one every `period`.
    #[serde(rename_all = "camelCase")]
    Step {
        /// The values.
        values: Vec<serde_json::Value>,
        /// How long each lasts (`10s`).
        #[serde(default = "ten_seconds")]
        period: String,
    },
    /// Always `value` (until written: writable virtual properties keep what is written).
    #[serde(rename_all = "camelCase")]
    Constant {
        /// The value.
        value: serde_json::Value,
    },
}

fn sixty_seconds() -> String {
    "60s".to_string()
}
fn ten_seconds() -> String {
    "10s".to_string()
}
fn big() -> f64 {
    1e9
}
fn neg_big() -> f64 {
    -1e9
}

// ---------------------------------------------------------------- status

/// Whether the node can talk to the device.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    /// Not known yet (no node has reported).
    #[default]
    Unknown,
    /// The last collection reached the device.
    Online,
    /// Consecutive collections failed.
    Offline,
}

impl DeviceState {
    /// Name as shown.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Unknown => "unknown",
            DeviceState::Online => "online",
            DeviceState::Offline => "offline",
        }
    }
}

/// How much a reported value can be trusted.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Quality {
    /// Read from the device in the last collection.
    #[default]
    Good,
    /// The last read failed; the value is the last good one.
    Bad,
    /// Read, but the device flagged it (OPC UA uncertain status).
    Uncertain,
}

impl Quality {
    /// Name as shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Quality::Good => "good",
            Quality::Bad => "bad",
            Quality::Uncertain => "uncertain",
        }
    }
}

/// A value read from the device.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Reported {
    /// The value (typed as the model says).
    pub value: serde_json::Value,
    /// When it was read, Unix milliseconds.
    pub timestamp: u64,
    /// Quality.
    #[serde(default)]
    pub quality: Quality,
}

/// The desired value the node is working on.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DesiredTwin {
    /// The value.
    pub value: serde_json::Value,
    /// Version of this desired value: the device's `metadata.generation`
    /// when it came from `spec.desired`, or a higher local version when it
    /// was set on the edge (MQTT `…/set`, local HTTP API).
    pub version: u64,
    /// `cloud` or `local`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
}

/// One property's twin.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Twin {
    /// Last value read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<Reported>,
    /// Desired value being applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<DesiredTwin>,
    /// Version of the desired value written and verified by read-back.
    #[serde(default, skip_serializing_if = "is_zero_u")]
    pub observed_desired: u64,
    /// Last error reading or writing this property; empty when fine.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

fn is_zero_u(v: &u64) -> bool {
    *v == 0
}

/// Observation of one device.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceStatus {
    /// The node running the device's mapper (chosen by the cloud for
    /// `nodeSelector` devices; `spec.node` otherwise).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// Online/offline.
    #[serde(default)]
    pub state: DeviceState,
    /// RFC 3339 time the device was last online.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_online_time: String,
    /// Last device-level error (connection refused, timeout…).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_error: String,
    /// Twins by property name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub twins: BTreeMap<String, Twin>,
    /// The `metadata.generation` of the spec the node last applied.
    #[serde(default, skip_serializing_if = "is_zero_u")]
    pub observed_generation: u64,
    /// Why the device is not placed (no node matches), when it is not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Outbox sequence of the node's report this status came from (the
    /// cloud ignores older reports of the same node).
    #[serde(default, skip_serializing_if = "is_zero_u")]
    pub observed_seq: u64,
    /// The node whose report this status is (sequences are per node: a
    /// device that moved starts over with its new node's).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reported_by: String,
}

impl KindOf for DeviceSpec {
    type Status = DeviceStatus;
    const KIND: Kind = Kind::Device;
}

// ---------------------------------------------------------------- checks against the model

fn visitor_carries(ty: PropertyType, v: &ModbusVisitor) -> Result<(), String> {
    let dt = v.data_type();
    if v.register.is_bits() && dt != ModbusDataType::Bool {
        return Err(format!("{} registers hold bits: dataType must be bool", v.register.as_str()));
    }
    let ok = match ty {
        PropertyType::Bool => dt == ModbusDataType::Bool,
        PropertyType::Int => {
            matches!(
                dt,
                ModbusDataType::Int16 | ModbusDataType::Uint16 | ModbusDataType::Int32 | ModbusDataType::Uint32
            ) && v.scale.fract() == 0.0
                && v.offset.fract() == 0.0
        }
        PropertyType::Float => !matches!(dt, ModbusDataType::Bool | ModbusDataType::String),
        PropertyType::String => dt == ModbusDataType::String,
        PropertyType::Bytes => dt == ModbusDataType::String,
    };
    if ok {
        Ok(())
    } else if ty == PropertyType::Int && dt != ModbusDataType::Bool && dt != ModbusDataType::String {
        Err(format!("model type int needs an integer data type with integral scale and offset (got {})", dt.as_str()))
    } else {
        Err(format!("data type {} cannot carry the model's type {}", dt.as_str(), ty.as_str()))
    }
}

/// Problems of `device` that only its model reveals: unknown properties,
/// visitors that cannot carry the model's type, writes to read-only
/// properties, desired values of the wrong type or out of range. Paths are
/// rooted at the object (`spec.properties[2].modbus.dataType`).
pub fn check_device_against_model(device: &DeviceSpec, model: &DeviceModelSpec) -> Vec<FieldError> {
    let mut errs = Errors::default();
    for (i, v) in device.properties.iter().enumerate() {
        let path = format!("spec.properties[{i}]");
        let Some(pm) = model.property(&v.name) else {
            errs.add(format!("{path}.name"), format!("model {:?} has no property {:?}", device.model, v.name));
            continue;
        };
        if let Some(m) = &v.modbus {
            if let Err(e) = visitor_carries(pm.ty, m) {
                errs.add(format!("{path}.modbus.dataType"), e);
            }
            if pm.access_mode == AccessMode::ReadWrite && !m.register.writable() {
                errs.add(
                    format!("{path}.modbus.register"),
                    format!("property is ReadWrite but {} registers are read-only", m.register.as_str()),
                );
            }
        }
        if let Some(Generator::Constant { value }) = &v.generator {
            if let Err(e) = pm.check_value(value) {
                errs.add(format!("{path}.virtual.value"), e);
            }
        }
        if let Some(Generator::Step { values, .. }) = &v.generator {
            for (j, value) in values.iter().enumerate() {
                if let Err(e) = pm.check_value(value) {
                    errs.add(format!("{path}.virtual.values[{j}]"), e);
                }
            }
        }
        if matches!(v.generator, Some(Generator::Sine { .. } | Generator::RandomWalk { .. }))
            && !matches!(pm.ty, PropertyType::Float | PropertyType::Int)
        {
            errs.add(
                format!("{path}.virtual.generator"),
                format!("generates numbers; the model's type is {}", pm.ty.as_str()),
            );
        }
    }
    for (name, value) in &device.desired {
        let path = format!("spec.desired[{name}]");
        let Some(pm) = model.property(name) else {
            errs.add(path, format!("model {:?} has no property {name:?}", device.model));
            continue;
        };
        if pm.access_mode != AccessMode::ReadWrite {
            errs.add(path, "property is ReadOnly and cannot be written");
            continue;
        }
        if device.visitor(name).is_none() {
            errs.add(path, "property has no visitor in spec.properties, so it cannot be written");
            continue;
        }
        if let Err(e) = pm.check_value(value) {
            errs.add(path, e);
        }
    }
    errs.0
}

/// Checks a desired write of `value` to `property` (from `device set`, the
/// edge bus or the local HTTP API): the property must exist, be ReadWrite,
/// have a visitor, and the value must fit its type and range.
pub fn check_desired_write(
    device: &DeviceSpec,
    model: &DeviceModelSpec,
    property: &str,
    value: &serde_json::Value,
) -> Result<(), String> {
    let pm =
        model.property(property).ok_or_else(|| format!("model {:?} has no property {property:?}", device.model))?;
    if pm.access_mode != AccessMode::ReadWrite {
        return Err(format!("property {property:?} is ReadOnly and cannot be written"));
    }
    if device.visitor(property).is_none() {
        return Err(format!("property {property:?} has no visitor, so it cannot be written"));
    }
    pm.check_value(value).map_err(|e| format!("property {property:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> DeviceModelSpec {
        DeviceModelSpec {
            description: String::new(),
            properties: vec![
                PropertyModel { name: "temp".into(), ty: PropertyType::Float, ..Default::default() },
                PropertyModel {
                    name: "setpoint".into(),
                    ty: PropertyType::Float,
                    access_mode: AccessMode::ReadWrite,
                    minimum: Some(0.0),
                    maximum: Some(100.0),
                    ..Default::default()
                },
                PropertyModel { name: "count".into(), ty: PropertyType::Int, ..Default::default() },
            ],
        }
    }

    fn modbus(name: &str, register: RegisterType, dt: ModbusDataType) -> PropertyVisitor {
        PropertyVisitor {
            name: name.into(),
            modbus: Some(ModbusVisitor { register, address: 0, data_type: Some(dt), scale: 1.0, ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn visitor_type_mismatch_and_read_only_writes_have_paths() {
        let mut d = DeviceSpec {
            model: "m".into(),
            properties: vec![
                modbus("temp", RegisterType::Input, ModbusDataType::Float32),
                modbus("setpoint", RegisterType::Input, ModbusDataType::Float32),
                modbus("count", RegisterType::Holding, ModbusDataType::Float32),
                modbus("nope", RegisterType::Holding, ModbusDataType::Uint16),
            ],
            ..Default::default()
        };
        d.desired.insert("temp".into(), serde_json::json!(1.0));
        d.desired.insert("setpoint".into(), serde_json::json!(120.0));
        let errs: Vec<String> = check_device_against_model(&d, &model()).iter().map(|e| e.to_string()).collect();
        let has = |p: &str| errs.iter().any(|e| e.starts_with(p));
        assert!(has("spec.properties[1].modbus.register: property is ReadWrite"), "{errs:?}");
        assert!(has("spec.properties[2].modbus.dataType: model type int"), "{errs:?}");
        assert!(has("spec.properties[3].name: model \"m\" has no property"), "{errs:?}");
        assert!(has("spec.desired[temp]: property is ReadOnly"), "{errs:?}");
        assert!(has("spec.desired[setpoint]: 120 is above the maximum 100"), "{errs:?}");
        assert_eq!(errs.len(), 5, "{errs:?}");
    }

    #[test]
    fn desired_write_checks() {
        let d = DeviceSpec {
            model: "m".into(),
            properties: vec![modbus("setpoint", RegisterType::Holding, ModbusDataType::Float32)],
            ..Default::default()
        };
        let m = model();
        assert!(check_desired_write(&d, &m, "setpoint", &serde_json::json!(42)).is_ok());
        assert!(check_desired_write(&d, &m, "setpoint", &serde_json::json!("hot")).is_err());
        assert!(check_desired_write(&d, &m, "temp", &serde_json::json!(1)).is_err_and(|e| e.contains("ReadOnly")));
        assert!(check_desired_write(&d, &m, "ghost", &serde_json::json!(1)).is_err());
    }

    #[test]
    fn manifest_shape_round_trips() {
        let y = r#"
model: boiler
node: edge-1
protocol:
  modbusTcp: {host: 127.0.0.1, port: 5020, unitId: 3}
collectCycle: 500ms
properties:
  - name: temp
    modbus: {register: input, address: 10, dataType: float32, wordOrder: little, scale: 0.1}
  - name: level
    virtual: {generator: sine, amplitude: 5, period: 30s}
"#;
        let v: serde_json::Value = serde_yaml::from_str(y).expect("yaml");
        let d: DeviceSpec = serde_json::from_value(v).expect("parses");
        assert!(matches!(&d.protocol, Protocol::ModbusTcp(t) if t.port == 5020 && t.unit_id == 3 && t.timeout == "1s"));
        assert_eq!(d.collect_cycle_ms(), 500);
        assert_eq!(d.report_cycle_ms(), 10_000);
        assert!(d.report_to_cloud);
        let m = d.properties[0].modbus.as_ref().expect("modbus");
        assert_eq!((m.quantity(), m.word_order, m.scale), (2, Endian::Little, 0.1));
        assert!(matches!(d.properties[1].generator, Some(Generator::Sine { amplitude, .. }) if amplitude == 5.0));
        let back: DeviceSpec = serde_json::from_value(serde_json::to_value(&d).expect("ser")).expect("de");
        assert_eq!(back, d);
    }
}
