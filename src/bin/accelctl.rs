//! `accelctl`: one-shot conversions and the task API client.
fn main() {}
