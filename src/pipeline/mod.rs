//! Pipelines: events to tasks, durable tasks and their workers, naming targets and running
//! conversions (pull once, convert, push).

mod blobs;
mod fanout;
pub mod convert;
pub mod event;
pub mod matching;
pub mod metrics;
pub mod naming;
pub mod plan;
pub mod progress;
pub mod tasks;
pub mod worker;

pub use convert::{Conversion, ConvertError, ConvertRequest, ConvertResult, Converter, TargetResult};
pub use event::{Event, Router, Skipped};
pub use matching::Matcher;
pub use naming::TargetNaming;
pub use plan::Plan;
pub use progress::{BarProgress, LogProgress, Progress, Stage};
pub use tasks::{Task, TaskStatus, TaskStore};
pub use worker::{ConverterRunner, Runner, Workers};
