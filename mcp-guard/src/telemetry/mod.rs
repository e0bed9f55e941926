//! What the daemon reports: events (read from the ring buffer and enriched) and metrics.

pub mod events;
pub mod metrics;
pub mod reader;
pub mod siem;
pub mod sink;
pub mod unix_paths;
