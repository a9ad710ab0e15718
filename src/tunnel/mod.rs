//! Konnectivity: proxy-server and proxy-agent (being built). The pure
//! parts come first: [`message`] (the protocol's vocabulary),
//! [`identifiers`] (agent identifiers and selection strategies) and
//! [`router`] (the server's routing state machine).

pub mod agent;
pub mod connect;
pub mod identifiers;
pub mod message;
pub mod queue;
pub mod router;
pub mod server;
