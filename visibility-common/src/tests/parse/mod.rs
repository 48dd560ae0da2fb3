//! Tests of the header parser, on frames built by [`FrameBuilder`] and on frames
//! that are made odd on purpose after building.
//!
//! [`frames`] holds what the files share; each other file is one topic.

mod frames;
mod ipv4;
mod ipv6_extensions;
mod link_scope;
mod truncated;
mod well_formed;
