//! The OPC UA driver: one client session to one OPC UA server, built on
//! `async-opcua` (client feature only), behind the `opcua` cargo feature.
//!
//! Connection life cycle. `connect` builds a session to the configured
//! endpoint (GetEndpoints, then CreateSession/ActivateSession with the
//! configured security policy, mode and identity) and drives the library's
//! session event loop in a task of its own. The library's own reconnect loop
//! is switched off (`session_retry_limit(0)` and `disable_reconnects`): when
//! the transport closes, the event loop ends, the link state turns `Down`, and
//! the next `read`/`write` returns a device-level [`DriverError`], so the
//! supervisor calls `disconnect` and `connect` with its own back-off. Every
//! call into the library is bounded by the device's `timeout`.
//!
//! Reading. Polled devices: one Read service call per `read` for all asked
//! properties. Subscribed devices (`subscribe: true`): one subscription with
//! one monitored item per property, created on connect; `read` returns the
//! latest notification of each property (the same value and timestamp again
//! when nothing changed: the supervisor judges staleness). A property written
//! through [`Driver::write`] is read directly by the next `read`, so the
//! supervisor's verification does not see a value older than its write.
//!
//! Values are converted to JSON as the model's type says; a DataValue with a
//! bad status (for example `BadNodeIdUnknown` for a wrong nodeId) is a
//! property-level error carrying the status name, an uncertain one is
//! [`Quality::Uncertain`].
//!
//! Writing. The node's current value (or, when it has none, its DataType
//! attribute) tells the variant type to write; it is read once per property
//! and session. A bad status of the Write service is [`WriteError::Refused`].
//!
//! Security. With policy and mode `None` no certificate is used. Otherwise
//! the client keeps its PKI (own certificate and key, `trusted/` and
//! `rejected/` server certificates) under `$YUNBIAN_OPCUA_PKI_DIR`, or under
//! `<temp dir>/yunbian-opcua-pki` when it is not set. `certificateFile` and
//! `privateKeyFile`, when given, are the application instance certificate;
//! otherwise a self-signed one is created in the PKI directory on first use.
//! The Device spec has no field for the server's certificate, so unknown
//! server certificates are trusted and stored in `trusted/` (with a warning)
//! unless `YUNBIAN_OPCUA_TRUST_SERVERS=strict`, in which case only
//! certificates already in `trusted/` are accepted (rejected ones are stored
//! in `rejected/`, where an operator can move them to `trusted/`).
//!
//! Identity: `username`/`password` when a user name is set, else the X.509
//! certificate (`certificateFile`/`privateKeyFile`) when set, else anonymous.

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opcua::client::{ClientBuilder, DataChangeCallback, IdentityToken, MonitoredItem, Session, SessionPollResult};
use opcua::crypto::SecurityPolicy as UaSecurityPolicy;
use opcua::types::{
    AttributeId, ByteString, DataValue, DateTime, EndpointDescription, MessageSecurityMode, MonitoredItemCreateRequest,
    MonitoringMode, MonitoringParameters, NodeId, QualifiedName, ReadValueId, StatusCode, TimestampsToReturn, UAString,
    UserTokenPolicy, Variant, VariantScalarTypeId, WriteValue,
};
use serde_json::Value as Json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use yunbian_api::device::{OpcuaConnection, PropertyType, Protocol, SecurityMode, SecurityPolicy};
use yunbian_api::Quality;

use crate::driver::{duration_ms, unix_ms, DeviceConfig, Driver, DriverError, PropertyRead, Reading, WriteError};

/// Environment variable naming the client PKI directory.
pub const PKI_DIR_ENV: &str = "YUNBIAN_OPCUA_PKI_DIR";
/// Environment variable: `strict` trusts only server certificates already in
/// `<pki>/trusted/`; anything else (or unset) trusts unknown ones.
pub const TRUST_SERVERS_ENV: &str = "YUNBIAN_OPCUA_TRUST_SERVERS";

const APPLICATION_URI: &str = "urn:yunbian:edge:opcua-client";

/// A property as the driver addresses it.
struct NodeProperty {
    name: String,
    ty: PropertyType,
    /// The node, or why the property has none.
    node: Result<NodeId, String>,
}

/// What the session event loop task reports.
#[derive(Debug, Clone, PartialEq)]
enum Link {
    /// The session is being created and activated.
    Connecting,
    /// The session is active.
    Up,
    /// The session ended (and is not retried); why.
    Down(String),
}

/// Latest notification of one monitored item.
#[derive(Debug, Clone)]
enum Slot {
    /// No notification yet.
    Pending,
    /// The last notification and when it arrived (Unix ms).
    Value(Box<DataValue>, u64),
    /// The monitored item could not be created.
    Failed(String),
}

/// One open session.
struct Connected {
    session: Arc<Session>,
    link: watch::Receiver<Link>,
    event_loop: JoinHandle<()>,
    /// Per property index, when subscribed.
    slots: Option<Arc<Mutex<Vec<Slot>>>>,
    /// Properties written since their last direct read (subscribed only).
    read_directly: Vec<usize>,
    /// Variant type of each written property's node.
    write_types: HashMap<usize, VariantScalarTypeId>,
}

/// An OPC UA client session to one device, implementing [`Driver`].
pub struct OpcuaDriver {
    device: String,
    conn: OpcuaConnection,
    timeout: Duration,
    cycle_ms: u64,
    props: Vec<NodeProperty>,
    client: Option<opcua::client::Client>,
    connected: Option<Connected>,
}

impl OpcuaDriver {
    /// Builds the driver for a device whose protocol is `opcua` (no I/O).
    pub fn new(cfg: &DeviceConfig) -> Result<OpcuaDriver, DriverError> {
        let spec = &cfg.device.spec;
        let Protocol::Opcua(conn) = &spec.protocol else {
            return Err(DriverError::Config(format!("protocol is {}, not opcua", spec.protocol.name())));
        };
        if !conn.endpoint.starts_with("opc.tcp://") {
            return Err(DriverError::Config(format!("endpoint {:?} is not an opc.tcp:// URL", conn.endpoint)));
        }
        let model = &cfg.model.spec;
        let props =
            spec.properties
                .iter()
                .map(|v| {
                    let ty = model.property(&v.name).map(|p| p.ty).unwrap_or_default();
                    let node = match (&v.opcua, model.property(&v.name)) {
                        (_, None) => Err(format!("the model has no property {:?}", v.name)),
                        (None, _) => Err("the property has no opcua visitor".to_string()),
                        (Some(o), _) => NodeId::from_str(&o.node_id)
                            .map_err(|_| format!("{:?} is not an OPC UA node id", o.node_id)),
                    };
                    NodeProperty { name: v.name.clone(), ty, node }
                })
                .collect();
        Ok(OpcuaDriver {
            device: cfg.name().to_string(),
            conn: conn.clone(),
            timeout: Duration::from_millis(duration_ms(&conn.timeout, 2_000).max(1)),
            cycle_ms: spec.collect_cycle_ms(),
            props,
            client: None,
            connected: None,
        })
    }

    fn timeout_ms(&self) -> u64 {
        self.timeout.as_millis() as u64
    }

    /// Runs `fut` bounded by the device timeout.
    async fn bounded<T>(&self, fut: impl std::future::Future<Output = T>) -> Result<T, DriverError> {
        tokio::time::timeout(self.timeout, fut).await.map_err(|_| DriverError::Timeout(self.timeout_ms()))
    }

    fn secured(&self) -> bool {
        self.conn.security_policy != SecurityPolicy::None || self.conn.security_mode != SecurityMode::None
    }

    fn client_builder(&self) -> ClientBuilder {
        let pki_dir = std::env::var_os(PKI_DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("yunbian-opcua-pki"));
        let strict = std::env::var(TRUST_SERVERS_ENV).is_ok_and(|v| v == "strict");
        let secured = self.secured();
        let mut builder = ClientBuilder::new()
            .application_name("Yunbian edge agent")
            .application_uri(APPLICATION_URI)
            .product_uri("urn:yunbian")
            .session_name(format!("yunbian:{}", self.device))
            .pki_dir(pki_dir)
            .create_sample_keypair(secured)
            .trust_server_certs(secured && !strict)
            // Self-signed device certificates rarely name the address the
            // edge uses; trust is decided by the trusted/ directory alone.
            .verify_server_certs(strict)
            // We drive reconnection ourselves: one attempt, then an error.
            .session_retry_limit(0)
            .request_timeout(self.timeout)
            .publish_timeout(self.timeout + Duration::from_millis(self.cycle_ms.saturating_mul(10)))
            .keep_alive_interval(Duration::from_secs(5).max(self.timeout))
            .max_failed_keep_alive_count(3)
            .recreate_subscriptions(false)
            .session_timeout(60_000);
        if secured && !self.conn.certificate_file.is_empty() && !self.conn.private_key_file.is_empty() {
            builder =
                builder.certificate_path(&self.conn.certificate_file).private_key_path(&self.conn.private_key_file);
        }
        builder
    }

    fn identity(&self) -> Result<IdentityToken, DriverError> {
        if !self.conn.username.is_empty() {
            return Ok(IdentityToken::new_user_name(self.conn.username.clone(), self.conn.password.clone()));
        }
        if !self.conn.certificate_file.is_empty() && !self.conn.private_key_file.is_empty() {
            return IdentityToken::new_x509_path(&self.conn.certificate_file, &self.conn.private_key_file)
                .map_err(|e| DriverError::Config(format!("load user certificate: {e}")));
        }
        Ok(IdentityToken::Anonymous)
    }

    fn endpoint(&self) -> EndpointDescription {
        let policy = match self.conn.security_policy {
            SecurityPolicy::None => UaSecurityPolicy::None,
            SecurityPolicy::Basic256Sha256 => UaSecurityPolicy::Basic256Sha256,
            SecurityPolicy::Aes128Sha256RsaOaep => UaSecurityPolicy::Aes128Sha256RsaOaep,
            SecurityPolicy::Aes256Sha256RsaPss => UaSecurityPolicy::Aes256Sha256RsaPss,
        };
        let mode = match self.conn.security_mode {
            SecurityMode::None => MessageSecurityMode::None,
            SecurityMode::Sign => MessageSecurityMode::Sign,
            SecurityMode::SignAndEncrypt => MessageSecurityMode::SignAndEncrypt,
        };
        (self.conn.endpoint.as_str(), policy.to_uri(), mode, UserTokenPolicy::anonymous()).into()
    }

    async fn open(&mut self) -> Result<Connected, DriverError> {
        if self.client.is_none() {
            // Creating the client may generate an RSA key pair (seconds on a
            // small CPU): keep it off the runtime's worker threads.
            let client = self.client_builder();
            let client = tokio::task::spawn_blocking(move || client.client())
                .await
                .map_err(|e| DriverError::Config(format!("build the OPC UA client: {e}")))?
                .map_err(|e| DriverError::Config(format!("client configuration: {}", e.join("; "))))?;
            self.client = Some(client);
        }
        let identity = self.identity()?;
        let endpoint = self.endpoint();
        let timeout = self.timeout;
        let timeout_ms = self.timeout_ms();
        let client = self.client.as_mut().ok_or_else(|| DriverError::Config("no client".into()))?;
        let (session, event_loop) =
            tokio::time::timeout(timeout, client.connect_to_matching_endpoint(endpoint, identity))
                .await
                .map_err(|_| DriverError::Timeout(timeout_ms))?
                .map_err(|e| DriverError::Connect(format!("{}: {e}", self.conn.endpoint)))?;
        session.disable_reconnects();

        let (tx, mut link) = watch::channel(Link::Connecting);
        let device = self.device.clone();
        let event_loop = tokio::spawn(async move {
            use futures_util::StreamExt;
            let stream = event_loop.enter();
            let mut stream = std::pin::pin!(stream);
            let end = loop {
                match stream.next().await {
                    Some(Ok(SessionPollResult::Reconnected(_))) => {
                        let _ = tx.send(Link::Up);
                    }
                    Some(Ok(SessionPollResult::ConnectionLost(code))) => break format!("connection lost: {code}"),
                    Some(Ok(SessionPollResult::ReconnectFailed(code))) => break format!("session refused: {code}"),
                    Some(Ok(_)) => {}
                    Some(Err(code)) => break session_failure(code),
                    None => break "connection closed".to_string(),
                }
            };
            tracing::debug!(device = %device, reason = %end, "opcua session ended");
            let _ = tx.send(Link::Down(end));
        });
        let mut opened = Connected {
            session,
            link: link.clone(),
            event_loop,
            slots: None,
            read_directly: Vec::new(),
            write_types: HashMap::new(),
        };
        let state = match tokio::time::timeout(timeout, link.wait_for(|l| *l != Link::Connecting)).await {
            Err(_) => Err(DriverError::Timeout(timeout_ms)),
            Ok(Err(_)) => Err(DriverError::Connect("session event loop ended".into())),
            Ok(Ok(l)) => match &*l {
                Link::Down(why) => Err(DriverError::Connect(why.clone())),
                _ => Ok(()),
            },
        };
        if let Err(e) = state {
            opened.event_loop.abort();
            return Err(e);
        }
        if self.conn.subscribe {
            if let Err(e) = self.subscribe(&mut opened).await {
                self.close(opened).await;
                return Err(e);
            }
        }
        Ok(opened)
    }

    async fn subscribe(&self, c: &mut Connected) -> Result<(), DriverError> {
        let slots = Arc::new(Mutex::new(vec![Slot::Pending; self.props.len()]));
        let sink = slots.clone();
        let callback = DataChangeCallback::new(move |dv: DataValue, item: &MonitoredItem| {
            let index = item.client_handle() as usize;
            if let Ok(mut s) = sink.lock() {
                if let Some(slot) = index.checked_sub(1).and_then(|i| s.get_mut(i)) {
                    *slot = Slot::Value(Box::new(dv), unix_ms());
                }
            }
        });
        let interval = Duration::from_millis(self.cycle_ms);
        let id = self
            .bounded(c.session.create_subscription(interval, 60, 10, 0, 0, true, callback))
            .await?
            .map_err(|e| DriverError::Protocol(format!("create subscription: {e}")))?;
        let mut handles = Vec::new();
        let mut requests = Vec::new();
        for (i, p) in self.props.iter().enumerate() {
            match &p.node {
                Ok(node) => {
                    handles.push(i);
                    requests.push(MonitoredItemCreateRequest::new(
                        value_of(node),
                        MonitoringMode::Reporting,
                        MonitoringParameters {
                            client_handle: (i + 1) as u32,
                            sampling_interval: self.cycle_ms as f64,
                            queue_size: 1,
                            discard_oldest: true,
                            ..Default::default()
                        },
                    ));
                }
                Err(e) => set_slot(&slots, i, Slot::Failed(e.clone())),
            }
        }
        if !requests.is_empty() {
            let created = self
                .bounded(c.session.create_monitored_items(id, TimestampsToReturn::Both, requests))
                .await?
                .map_err(|e| DriverError::Protocol(format!("create monitored items: {e}")))?;
            if created.len() != handles.len() {
                return Err(DriverError::Protocol(format!(
                    "{} monitored items created for {} requested",
                    created.len(),
                    handles.len()
                )));
            }
            for (i, item) in handles.into_iter().zip(created) {
                if !item.result.status_code.is_good() {
                    set_slot(&slots, i, Slot::Failed(item.result.status_code.to_string()));
                }
            }
        }
        c.slots = Some(slots);
        Ok(())
    }

    async fn close(&self, c: Connected) {
        if matches!(*c.link.borrow(), Link::Up) {
            let _ = tokio::time::timeout(self.timeout, c.session.disconnect()).await;
        }
        c.event_loop.abort();
    }

    /// The open session, or the device-level error that closed it.
    fn live(&mut self) -> Result<&mut Connected, DriverError> {
        let c = self.connected.as_mut().ok_or_else(|| DriverError::Io("not connected".into()))?;
        if let Link::Down(why) = &*c.link.borrow() {
            return Err(DriverError::Io(why.clone()));
        }
        Ok(c)
    }

    /// One Read service call for the value of each of `indices`.
    async fn read_values(&mut self, indices: &[usize]) -> Result<Vec<DataValue>, DriverError> {
        let nodes: Vec<ReadValueId> =
            indices.iter().filter_map(|&i| self.props[i].node.as_ref().ok().map(value_of)).collect();
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        let timeout = self.timeout;
        let session = self.live()?.session.clone();
        let values = tokio::time::timeout(timeout, session.read(&nodes, TimestampsToReturn::Both, 0.0))
            .await
            .map_err(|_| DriverError::Timeout(timeout.as_millis() as u64))?
            .map_err(|e| self.service_error("read", e))?;
        if values.len() != nodes.len() {
            return Err(DriverError::Protocol(format!("{} values read for {} nodes", values.len(), nodes.len())));
        }
        Ok(values)
    }

    /// A failed service call: the session's own end if it ended, else the call's error.
    fn service_error(&mut self, what: &str, e: opcua::types::Error) -> DriverError {
        match self.live() {
            Err(down) => down,
            Ok(_) => DriverError::Io(format!("{what}: {e}")),
        }
    }

    /// The variant type to write to property `i`'s node.
    async fn write_type(&mut self, i: usize, node: &NodeId) -> Result<VariantScalarTypeId, WriteError> {
        if let Some(t) = self.live()?.write_types.get(&i) {
            return Ok(*t);
        }
        let reads = [value_of(node), ReadValueId { attribute_id: AttributeId::DataType as u32, ..value_of(node) }];
        let session = self.live()?.session.clone();
        let got = self
            .bounded(session.read(&reads, TimestampsToReturn::Neither, 0.0))
            .await?
            .map_err(|e| self.service_error("read data type", e))?;
        let (Some(value), Some(data_type)) = (got.first(), got.get(1)) else {
            return Err(
                DriverError::Protocol("read of the node's value and data type returned too little".into()).into()
            );
        };
        if let Some(status) = value.status.filter(|s| s.is_bad()) {
            return Err(WriteError::Refused(status.to_string()));
        }
        let from_value = value.value.as_ref().filter(|v| !v.is_array()).and_then(Variant::scalar_type_id);
        let from_data_type = match &data_type.value {
            Some(Variant::NodeId(id)) if id.namespace == 0 => match &id.identifier {
                opcua::types::Identifier::Numeric(n) if (1..=15).contains(n) => VariantScalarTypeId::try_from(*n).ok(),
                _ => None,
            },
            _ => None,
        };
        let t = from_value
            .or(from_data_type)
            .ok_or_else(|| WriteError::Refused("the node's data type is not a scalar this driver can write".into()))?;
        self.live()?.write_types.insert(i, t);
        Ok(t)
    }
}

/// Names a session that could not be opened or ended, saying why in words
/// where the status code alone is cryptic.
fn session_failure(code: StatusCode) -> String {
    let hint = match code.to_string().as_str() {
        "BadUserAccessDenied" | "BadIdentityTokenRejected" | "BadIdentityTokenInvalid" => {
            " (user name, password or certificate refused by the server)"
        }
        "BadCertificateUntrusted" | "BadSecurityChecksFailed" => " (certificate not trusted)",
        "BadSecurityPolicyRejected" | "BadSecurityModeRejected" => " (security policy or mode not offered)",
        _ => "",
    };
    format!("session refused: {code}{hint}")
}

fn set_slot(slots: &Mutex<Vec<Slot>>, i: usize, slot: Slot) {
    if let Ok(mut s) = slots.lock() {
        if let Some(x) = s.get_mut(i) {
            *x = slot;
        }
    }
}

fn value_of(node: &NodeId) -> ReadValueId {
    ReadValueId {
        node_id: node.clone(),
        attribute_id: AttributeId::Value as u32,
        index_range: Default::default(),
        data_encoding: QualifiedName::null(),
    }
}

fn ms_of(t: &DateTime) -> Option<u64> {
    if t.is_null() {
        return None;
    }
    u64::try_from(t.as_chrono().timestamp_millis()).ok()
}

/// Turns one DataValue into a property outcome; `received_ms` is the
/// timestamp when the server sent none.
pub fn reading_of(dv: &DataValue, ty: PropertyType, received_ms: u64) -> Result<Option<Reading>, String> {
    let status = dv.status.unwrap_or(StatusCode::Good);
    if status.is_bad() {
        return Err(status.to_string());
    }
    let quality = if status.is_uncertain() { Quality::Uncertain } else { Quality::Good };
    let value = match &dv.value {
        None | Some(Variant::Empty) => return Ok(None),
        Some(v) => json_of(v, ty)?,
    };
    let ts_ms = dv
        .source_timestamp
        .as_ref()
        .and_then(ms_of)
        .or_else(|| dv.server_timestamp.as_ref().and_then(ms_of))
        .unwrap_or(received_ms);
    Ok(Some(Reading { value, ts_ms, quality }))
}

fn int_of(v: &Variant) -> Option<i128> {
    Some(match v {
        Variant::SByte(x) => *x as i128,
        Variant::Byte(x) => *x as i128,
        Variant::Int16(x) => *x as i128,
        Variant::UInt16(x) => *x as i128,
        Variant::Int32(x) => *x as i128,
        Variant::UInt32(x) => *x as i128,
        Variant::Int64(x) => *x as i128,
        Variant::UInt64(x) => *x as i128,
        _ => return None,
    })
}

fn float_of(v: &Variant) -> Option<f64> {
    match v {
        Variant::Float(x) => Some(*x as f64),
        Variant::Double(x) => Some(*x),
        _ => int_of(v).map(|i| i as f64),
    }
}

fn variant_name(v: &Variant) -> String {
    match v.scalar_type_id() {
        Some(t) if !v.is_array() => format!("{t:?}"),
        Some(t) => format!("array of {t:?}"),
        None => format!("{:?}", v.type_id()),
    }
}

/// Converts a variant to JSON typed as the model says.
pub fn json_of(v: &Variant, ty: PropertyType) -> Result<Json, String> {
    let mismatch = || format!("the node holds {}, the model's type is {}", variant_name(v), ty.as_str());
    match ty {
        PropertyType::Int => match (int_of(v), v) {
            (Some(i), _) => {
                i64::try_from(i).map(Json::from).map_err(|_| format!("{i} does not fit a signed 64-bit int"))
            }
            (None, Variant::Float(_) | Variant::Double(_)) => {
                let f = float_of(v).unwrap_or(f64::NAN);
                if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    Ok(Json::from(f as i64))
                } else {
                    Err(format!("{f} is not an integer"))
                }
            }
            (None, Variant::Boolean(b)) => Ok(Json::from(*b as i64)),
            _ => Err(mismatch()),
        },
        PropertyType::Float => {
            let f = float_of(v).ok_or_else(mismatch)?;
            serde_json::Number::from_f64(f).map(Json::Number).ok_or_else(|| format!("{f} is not a finite number"))
        }
        PropertyType::Bool => match v {
            Variant::Boolean(b) => Ok(Json::Bool(*b)),
            _ => int_of(v).map(|i| Json::Bool(i != 0)).ok_or_else(mismatch),
        },
        PropertyType::String => match v {
            Variant::String(s) => Ok(Json::String(s.as_ref().to_string())),
            Variant::LocalizedText(t) => Ok(Json::String(t.text.as_ref().to_string())),
            _ => Err(mismatch()),
        },
        PropertyType::Bytes => match v {
            Variant::ByteString(b) => Ok(Json::from(b.value.clone().unwrap_or_default())),
            Variant::Array(a) if a.value_type == VariantScalarTypeId::Byte => a
                .values
                .iter()
                .map(|x| match x {
                    Variant::Byte(b) => Ok(Json::from(*b)),
                    _ => Err(mismatch()),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Json::Array),
            _ => Err(mismatch()),
        },
    }
}

/// Converts a JSON value to the variant type `t` of the node it is written to.
pub fn variant_of(value: &Json, t: VariantScalarTypeId) -> Result<Variant, String> {
    use VariantScalarTypeId as T;
    let int = || -> Result<i128, String> {
        if let Some(i) = value.as_i64() {
            return Ok(i as i128);
        }
        if let Some(u) = value.as_u64() {
            return Ok(u as i128);
        }
        match value.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(f as i128),
            Some(f) => Err(format!("{f} is not an integer, the node holds {t:?}")),
            None => match value {
                Json::Bool(b) => Ok(*b as i128),
                _ => Err(format!("{value} is not a number, the node holds {t:?}")),
            },
        }
    };
    let range = |i: i128| format!("{i} is out of range for {t:?}");
    macro_rules! int_to {
        ($variant:ident, $ty:ty) => {{
            let i = int()?;
            <$ty>::try_from(i).map(Variant::$variant).map_err(|_| range(i))
        }};
    }
    match t {
        T::Boolean => match value {
            Json::Bool(b) => Ok(Variant::Boolean(*b)),
            _ => match int()? {
                0 => Ok(Variant::Boolean(false)),
                1 => Ok(Variant::Boolean(true)),
                i => Err(format!("{i} is not a boolean")),
            },
        },
        T::SByte => int_to!(SByte, i8),
        T::Byte => int_to!(Byte, u8),
        T::Int16 => int_to!(Int16, i16),
        T::UInt16 => int_to!(UInt16, u16),
        T::Int32 => int_to!(Int32, i32),
        T::UInt32 => int_to!(UInt32, u32),
        T::Int64 => int_to!(Int64, i64),
        T::UInt64 => int_to!(UInt64, u64),
        T::Float | T::Double => {
            let f = value.as_f64().ok_or_else(|| format!("{value} is not a number, the node holds {t:?}"))?;
            Ok(if t == T::Float { Variant::Float(f as f32) } else { Variant::Double(f) })
        }
        T::String => value
            .as_str()
            .map(|s| Variant::String(UAString::from(s)))
            .ok_or_else(|| format!("{value} is not a string, the node holds String")),
        T::ByteString => {
            let bytes = value
                .as_array()
                .and_then(|a| {
                    a.iter().map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok())).collect::<Option<Vec<u8>>>()
                })
                .ok_or_else(|| format!("{value} is not an array of bytes, the node holds ByteString"))?;
            Ok(Variant::ByteString(ByteString::from(bytes)))
        }
        other => Err(format!("writing {other:?} nodes is not supported")),
    }
}

#[async_trait::async_trait]
impl Driver for OpcuaDriver {
    async fn connect(&mut self) -> Result<(), DriverError> {
        if let Some(old) = self.connected.take() {
            self.close(old).await;
        }
        let opened = self.open().await?;
        self.connected = Some(opened);
        Ok(())
    }

    async fn read(&mut self, only: &[String]) -> Result<Vec<PropertyRead>, DriverError> {
        // Which properties, by index (None: not a property of this device).
        let asked: Vec<(String, Option<usize>)> = if only.is_empty() {
            self.props.iter().enumerate().map(|(i, p)| (p.name.clone(), Some(i))).collect()
        } else {
            only.iter().map(|n| (n.clone(), self.props.iter().position(|p| &p.name == n))).collect()
        };
        let subscribed = self.live()?.slots.clone();
        let now = unix_ms();
        // Polled: every asked property; subscribed: those written since.
        let direct: Vec<usize> = match &subscribed {
            None => asked.iter().filter_map(|(_, i)| *i).collect(),
            Some(_) => {
                let pending = &self.live()?.read_directly;
                asked.iter().filter_map(|(_, i)| *i).filter(|i| pending.contains(i)).collect()
            }
        };
        let direct: Vec<usize> = direct.into_iter().filter(|&i| self.props[i].node.is_ok()).collect();
        let values = self.read_values(&direct).await?;
        let mut fresh: HashMap<usize, DataValue> = direct.iter().copied().zip(values).collect();
        if let Some(slots) = &subscribed {
            let c = self.live()?;
            c.read_directly.retain(|i| !fresh.contains_key(i));
            if let Ok(mut s) = slots.lock() {
                for (i, dv) in &fresh {
                    if let Some(slot) = s.get_mut(*i) {
                        *slot = Slot::Value(Box::new(dv.clone()), now);
                    }
                }
            }
        }
        let slots = subscribed.as_ref().and_then(|s| s.lock().ok().map(|s| s.clone()));
        let out = asked
            .into_iter()
            .map(|(name, i)| {
                let result = match i {
                    None => Err(format!("the device has no property {name:?}")),
                    Some(i) => {
                        let p = &self.props[i];
                        match (&p.node, fresh.remove(&i), slots.as_ref().and_then(|s| s.get(i))) {
                            (Err(e), _, _) => Err(e.clone()),
                            (Ok(_), Some(dv), _) => reading_of(&dv, p.ty, now),
                            (Ok(_), None, Some(Slot::Value(dv, at))) => reading_of(dv, p.ty, *at),
                            (Ok(_), None, Some(Slot::Failed(e))) => Err(e.clone()),
                            (Ok(_), None, Some(Slot::Pending)) => Ok(None),
                            (Ok(_), None, None) => Err("no value was read".to_string()),
                        }
                    }
                };
                PropertyRead { property: name, result }
            })
            .collect();
        Ok(out)
    }

    async fn write(&mut self, property: &str, value: &Json) -> Result<(), WriteError> {
        let i = self
            .props
            .iter()
            .position(|p| p.name == property)
            .ok_or_else(|| WriteError::Refused(format!("the device has no property {property:?}")))?;
        let node = self.props[i].node.clone().map_err(WriteError::Refused)?;
        let t = self.write_type(i, &node).await?;
        let variant = variant_of(value, t).map_err(WriteError::Refused)?;
        let write = WriteValue {
            node_id: node,
            attribute_id: AttributeId::Value as u32,
            index_range: Default::default(),
            value: DataValue::value_only(variant),
        };
        let session = self.live()?.session.clone();
        let results = self.bounded(session.write(&[write])).await?.map_err(|e| self.service_error("write", e))?;
        let status = results
            .first()
            .copied()
            .ok_or_else(|| WriteError::Device(DriverError::Protocol("write returned no result".into())))?;
        if status.is_bad() {
            return Err(WriteError::Refused(status.to_string()));
        }
        let c = self.live()?;
        if c.slots.is_some() && !c.read_directly.contains(&i) {
            c.read_directly.push(i);
        }
        Ok(())
    }

    async fn disconnect(&mut self) {
        if let Some(c) = self.connected.take() {
            self.close(c).await;
        }
    }
}

impl Drop for OpcuaDriver {
    fn drop(&mut self) {
        if let Some(c) = self.connected.take() {
            c.event_loop.abort();
        }
    }
}
