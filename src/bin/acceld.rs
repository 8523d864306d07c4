//! `acceld`: the conversion daemon.
fn main() {}
