//! Manta: throwaway microVM sandboxes over HTTP.
//!
//! `manta-server` is a thin wrapper around this library: [`config`] reads the environment,
//! [`vmm`] probes the host and boots guests, [`network`] and [`rootfs`] give each sandbox its
//! own tap, address and disk, [`guest`] talks SSH to it, [`sandbox`] ties the lifecycle
//! together and [`api`] serves it. [`bench`] is the `manta-bench` client that measures it.

pub mod api;
pub mod bench;
pub mod config;
pub mod doctor;
pub mod guest;
pub mod network;
pub mod rootfs;
pub mod sandbox;
pub mod server;
pub mod vmm;
