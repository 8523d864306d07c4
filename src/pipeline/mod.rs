//! Pipelines: matching events, naming targets, running conversions.
