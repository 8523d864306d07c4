//! Connections to message buses shared by sources, sinks and webhook forwarding: one module
//! per bus.

pub mod kafka;
pub mod nats;
