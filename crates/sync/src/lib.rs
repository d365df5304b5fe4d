//! The cloud↔edge sync protocol, sans I/O.
//!
//! Architecture invariant: nothing in this crate opens a socket, reads a
//! clock or touches the disk. [`session`] holds the two state machines,
//! [`view`] the cloud's per-node desired view with its delta log, [`data`]
//! store-and-forward of data batches, [`wire`]
//! the messages and their codec. The cloud hub and the edge agent drive
//! these with real connections; the simulation tests drive them with a
//! virtual network and clock.

pub mod data;
pub mod fuzzing;
pub mod session;
pub mod view;
pub mod wire;

pub use session::{CloudAction, CloudSession, EdgeAction, EdgeSession, SessionConfig};
pub use view::{LoggedDelta, NodeView};
pub use wire::{Change, DesiredObject, Down, Report, Up};
