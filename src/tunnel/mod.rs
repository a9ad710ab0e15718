//! Konnectivity: proxy-server and proxy-agent. The pure parts: [`proto`]
//! (the wire packets), [`message`] (the protocol's vocabulary, converted
//! from and to packets), [`identifiers`] (agent identifiers and selection
//! strategies), [`router`] (the server's routing state machine),
//! [`agent::table`] (the agent's connection table) and [`connect`] (the
//! HTTP CONNECT request parser).

pub mod agent;
pub mod connect;
pub mod identifiers;
pub mod listen;
pub mod message;
pub mod proto;
pub mod queue;
pub mod router;
pub mod server;
pub mod test_client;
pub mod test_server;
