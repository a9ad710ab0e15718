//! A small synchronous HTTP/2 (RFC 9113) for gRPC over plain threads.
//!
//! No maintained HTTP/2 crate runs without an async runtime, and the design
//! card allows none, so this module carries exactly what gRPC peers
//! (grpc-go, gRPC C-core) exercise: both roles, HEADERS/CONTINUATION, DATA
//! with padding, flow control on the connection and every stream in both
//! directions, SETTINGS, PING keepalive, RST_STREAM, GOAWAY, and HPACK via
//! `loona-hpack`.
//!
//! - [`frame`]: the pure frame codec (no I/O, no state).
//! - [`transport`]: the byte stream split into a reader and a writer half
//!   (plain TCP/Unix sockets, or TLS: rustls's handshake, then records
//!   decrypted in place and sent with one `writev` per batch, by
//!   `records`).
//! - [`conn`]: the connection state machine, its reader and writer threads,
//!   and the [`Stream`] handles.
//!
//! Deliberately absent: server push (refused), PRIORITY scheduling (frames
//! are accepted and ignored), the HTTP/1.1 upgrade to h2c (prior knowledge
//! only), and CONNECT/extended CONNECT.

pub mod conn;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod records;
pub mod transport;

pub use conn::{Closer, Config, Connection, Error, Event, Field, Stream, Tap, Tapped};
pub use frame::ErrorCode;
pub use transport::{TlsSetup, Transport};
