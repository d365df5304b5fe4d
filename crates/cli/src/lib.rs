//! The `yunbian` command-line client: a kubectl-like front end to the cloud
//! REST API described in `docs/api.md`.
//!
//! Layers, from the wire up:
//!
//! - [`config`]: `admin.yaml` (server URL, cluster CA, admin token).
//! - [`client`]: an HTTPS client that trusts only the cluster CA and speaks
//!   the API's JSON, error bodies and newline-delimited watch streams.
//! - [`table`], [`columns`], [`time`], [`describe`]: pure text rendering
//!   (kubectl-style tables, ages, descriptions) with no I/O.
//! - [`device`]: `device set` (checked, conflict-retried writes of desired
//!   values, `--wait` for the node to apply them) and `device watch`.
//! - [`data`]: `query` and `series`, reading the data edges shipped to the
//!   cloud, as a table, CSV or JSON.
//! - [`artifact`]: `artifact push` (chunked, resumable uploads),
//!   `list`/`describe`/`delete`, `keygen` and `sign` (ed25519), `gc`.
//! - [`rollout`]: `rollout history|status|pause|resume|undo app/NAME`.
//! - [`commands`]: the clap command tree ([`ClientCommand`]) and [`run`],
//!   which the `yunbian` binary calls and whose errors it prints as
//!   `error: {e:#}`.
//!
//! Architecture invariant: this crate is only a client. It owns no state
//! and validates manifests with `yunbian-api` before sending them, so a bad
//! file is refused before any network call.

#![forbid(unsafe_code)]

pub mod artifact;
pub mod client;
pub mod columns;
pub mod commands;
pub mod config;
pub mod data;
pub mod describe;
pub mod device;
pub mod rollout;
pub mod table;
pub mod time;

pub use client::{ByteStream, Client, ClientError, ListOptions, ObjectList, WatchStream};
pub use commands::{run, ClientCommand, OutputFormat, Selector, TokenCommand};
pub use config::{ClientConfig, ConfigError};
pub use device::{set_desired, Assignment, DeviceCommand, StreamFormat};
