//! The node daemon and operator CLI of intranode visibility.
pub mod datapath;
pub mod error;
pub mod maps;
pub mod net;
