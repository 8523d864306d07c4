//! Event sources: Harbor webhooks today; buses and registry polling later.

pub mod harbor;
