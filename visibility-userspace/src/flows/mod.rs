//! Reading the flow map and turning entries into records: the per-interval records
//! (`records`, resumed after a restart from what was reported: `reported`), their JSON sink (`sink`, into a `record_file` or stdout) and IPFIX export (`ipfix`), the counts they
//! keep (`stats`), and the view the CLI shows (`view`).

pub mod batch;
pub mod ipfix;
pub mod record;
pub mod record_file;
pub mod records;
pub mod reported;
pub mod sink;
pub mod stats;
pub mod view;
