//! Result sinks: where conversion results are published.
