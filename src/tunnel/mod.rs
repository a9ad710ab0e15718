//! The Konnectivity tunnel: wire packets (and, later, the server and agent).

pub mod proto;
