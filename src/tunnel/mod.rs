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

/// A tunnel role that could not start (a port taken, a certificate
/// unreadable): what failed, ready to print.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}
