//! Event sources: Harbor webhooks and registry polling; buses later.

pub mod harbor;
pub mod poll;
