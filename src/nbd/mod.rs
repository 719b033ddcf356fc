//! The NBD protocol: [`proto`] encodes and decodes its messages (shared by
//! the server and the client), [`server`] serves one export over Unix or
//! TCP sockets, [`client`] reads one (the ground of NBD sources).

pub mod client;
pub mod proto;
pub mod server;

pub use server::{Counters, DirtyRuns, Export, OnFlush, Server};
