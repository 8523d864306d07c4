//! `acceld`: the conversion daemon.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("error: the acceld daemon (webhook API and workers) is not available in this build yet; use `accelctl convert` for one-shot conversions");
    ExitCode::FAILURE
}
