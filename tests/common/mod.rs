//! Shared test harness: real servers on loopback and real-content image fixtures.
#![allow(dead_code)]

pub mod acceld;
pub mod containerd;
pub mod fixtures;
pub mod kafka;
pub mod nats;
pub mod registry;
