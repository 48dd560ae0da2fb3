//! Reading the flow map and turning entries into records.

pub mod batch;
pub mod ipfix;
pub mod record;
pub mod records;
pub mod view;
