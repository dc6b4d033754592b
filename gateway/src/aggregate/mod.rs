//! Windowed aggregation of readings. [`window`] is the pure state machine (no tokio, no I/O,
//! time passed in); the task that feeds it from the writer and stores its output comes next.

pub mod window;
