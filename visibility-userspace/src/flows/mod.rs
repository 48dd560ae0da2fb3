//! Reading the flow map and turning entries into records.

pub mod record;
pub mod view;
