//! Pipelines: naming targets and running conversions (pull once, convert, push).

pub mod convert;
pub mod matching;
pub mod naming;
pub mod progress;

pub use convert::{Conversion, ConvertError, ConvertRequest, ConvertResult, Converter, TargetResult};
pub use matching::Matcher;
pub use naming::TargetNaming;
pub use progress::{BarProgress, LogProgress, Progress, Stage};
