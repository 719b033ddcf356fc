#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The integration tests: one binary driving the real executable (and the
//! library, for the node conformance suite), with qemu-img as the oracle.

mod backup;
mod bad_input;
mod bitmaps;
mod cbw;
mod cbw_races;
mod conformance;
mod crash;
mod docs;
mod failures;
mod fixture;
mod layout;
mod live;
mod logging;
mod manifest;
mod nbd_client;
mod nbd_source;
mod phases;
mod qcow2_fuzz;
mod qcow2_inplace;
mod qcow2_matrix;
mod serve;
mod sets;
mod signals;
mod soak;
mod trust;
mod vm;
