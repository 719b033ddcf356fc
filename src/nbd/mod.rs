//! The NBD protocol: [`proto`] encodes and decodes its messages (shared by
//! the server and, later, the NBD source client), [`server`] serves one
//! export over Unix or TCP sockets.

pub mod proto;
pub mod server;

pub use server::{Counters, DirtyRuns, Export, OnFlush, Server};
