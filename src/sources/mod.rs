//! Event sources: Harbor webhooks today; buses and registry polling later.
