//! gRPC over the synchronous HTTP/2 of [`crate::h2`]: length-prefixed
//! messages, request and response metadata, status in trailers.
//!
//! Owns: the gRPC wire rules (PROTOCOL-HTTP2.md of grpc/grpc): request
//! headers (`:method POST`, `:scheme`, `:path`, `:authority`,
//! `content-type: application/grpc`, `te: trailers`), response headers,
//! trailers with `grpc-status` and percent-encoded `grpc-message`, the
//! 5-byte message prefix, the maximum message size (4 MiB by default, as
//! upstream; larger is RESOURCE_EXHAUSTED), and the mapping of HTTP/2
//! errors to status codes. [`Client`] opens calls; [`Server`] runs each
//! call's handler on a pooled thread and routes it by `:path` (a handler
//! may return early and leave the call to others:
//! [`ServerCall::detach`]).
//! Must not: know the tunnel's messages (calls carry bytes; `prost`
//! helpers encode and decode), or buffer more than one message per call.
//! Deliberately absent: compression (a compressed message is refused with
//! UNIMPLEMENTED), deadlines (`grpc-timeout` is ignored: tunnels live
//! long), and unary-call sugar (every call is a bidirectional stream).

use std::collections::HashMap;
use std::fmt;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::h2::{self, ErrorCode, Event, Field};

/// The largest message accepted by default, as grpc-go and C-core.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;
const PREFIX_LEN: usize = 5;

/// A gRPC status code.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Code(pub u32);

impl Code {
    pub const OK: Code = Code(0);
    pub const CANCELLED: Code = Code(1);
    pub const UNKNOWN: Code = Code(2);
    pub const INVALID_ARGUMENT: Code = Code(3);
    pub const DEADLINE_EXCEEDED: Code = Code(4);
    pub const NOT_FOUND: Code = Code(5);
    pub const ALREADY_EXISTS: Code = Code(6);
    pub const PERMISSION_DENIED: Code = Code(7);
    pub const RESOURCE_EXHAUSTED: Code = Code(8);
    pub const FAILED_PRECONDITION: Code = Code(9);
    pub const ABORTED: Code = Code(10);
    pub const OUT_OF_RANGE: Code = Code(11);
    pub const UNIMPLEMENTED: Code = Code(12);
    pub const INTERNAL: Code = Code(13);
    pub const UNAVAILABLE: Code = Code(14);
    pub const DATA_LOSS: Code = Code(15);
    pub const UNAUTHENTICATED: Code = Code(16);
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [&str; 17] = [
            "OK",
            "CANCELLED",
            "UNKNOWN",
            "INVALID_ARGUMENT",
            "DEADLINE_EXCEEDED",
            "NOT_FOUND",
            "ALREADY_EXISTS",
            "PERMISSION_DENIED",
            "RESOURCE_EXHAUSTED",
            "FAILED_PRECONDITION",
            "ABORTED",
            "OUT_OF_RANGE",
            "UNIMPLEMENTED",
            "INTERNAL",
            "UNAVAILABLE",
            "DATA_LOSS",
            "UNAUTHENTICATED",
        ];
        match NAMES.get(self.0 as usize) {
            Some(name) => f.write_str(name),
            None => write!(f, "code {}", self.0),
        }
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The outcome of a call: a code and a human-readable message. It is the
/// error type of every call operation.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Status {
    pub code: Code,
    pub message: String,
}

impl Status {
    pub fn new(code: Code, message: impl Into<String>) -> Status {
        Status {
            code,
            message: message.into(),
        }
    }

    pub fn ok() -> Status {
        Status::new(Code::OK, "")
    }

    pub fn is_ok(&self) -> bool {
        self.code == Code::OK
    }

    /// How an HTTP/2 failure looks to a caller.
    pub fn from_h2(err: &h2::Error) -> Status {
        let code = match err {
            h2::Error::Reset {
                code: ErrorCode::CANCEL,
                ..
            } => Code::CANCELLED,
            h2::Error::Reset {
                code: ErrorCode::REFUSED_STREAM,
                ..
            } => Code::UNAVAILABLE,
            h2::Error::Reset {
                code: ErrorCode::ENHANCE_YOUR_CALM,
                ..
            } => Code::RESOURCE_EXHAUSTED,
            h2::Error::Reset {
                code: ErrorCode::INADEQUATE_SECURITY,
                ..
            } => Code::PERMISSION_DENIED,
            h2::Error::Reset { .. } => Code::INTERNAL,
            h2::Error::HeadersTooLarge { .. } => Code::INTERNAL,
            h2::Error::SendClosed { .. } => Code::INTERNAL,
            _ => Code::UNAVAILABLE,
        };
        Status::new(code, err.to_string())
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "grpc status {}", self.code)?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for Status {}

/// Header fields of a call without the HTTP/2 pseudo-headers.
#[derive(Clone, Default, Debug, PartialEq, Eq)]
pub struct Metadata {
    fields: Vec<Field>,
}

impl Metadata {
    fn from_fields(fields: &[Field]) -> Metadata {
        Metadata {
            fields: fields
                .iter()
                .filter(|(n, _)| !n.starts_with(':'))
                .cloned()
                .collect(),
        }
    }

    /// The first value of `name` (lower case), if it is UTF-8.
    pub fn get<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        self.get_all(name)
            .next()
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Every value of `name`, in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.fields
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    pub fn fields(&self) -> &[Field] {
        &self.fields
    }
}

fn field(name: &str, value: impl Into<Vec<u8>>) -> Field {
    (name.to_ascii_lowercase(), value.into())
}

fn pseudo<'a>(fields: &'a [Field], name: &str) -> Option<&'a [u8]> {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_slice())
}

/// Percent-encodes `grpc-message` (gRPC spec: bytes outside 0x20..=0x7e and
/// `%` become `%XX`).
pub fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `grpc-message`; a malformed escape is kept literally, as the
/// spec asks.
pub fn percent_decode(value: &[u8]) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        if value[i] == b'%' && i + 2 < value.len() {
            if let (Some(h), Some(l)) = (hex(value[i + 1]), hex(value[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(value[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status_from_trailers(fields: &[Field]) -> Status {
    let Some(code) = pseudo(fields, "grpc-status") else {
        return Status::new(Code::INTERNAL, "server ended the call without grpc-status");
    };
    let code = std::str::from_utf8(code)
        .ok()
        .and_then(|c| c.parse::<u32>().ok());
    let Some(code) = code else {
        return Status::new(Code::INTERNAL, "malformed grpc-status");
    };
    let message = pseudo(fields, "grpc-message")
        .map(percent_decode)
        .unwrap_or_default();
    Status::new(Code(code), message)
}

/// Assembles length-prefixed messages from DATA chunks, refusing anything
/// over the size limit before buffering it.
struct MessageReader {
    buf: Vec<u8>,
    start: usize,
    max: usize,
}

impl MessageReader {
    fn new(max: usize) -> Self {
        MessageReader {
            buf: Vec::new(),
            start: 0,
            max,
        }
    }

    /// Takes a DATA chunk; when nothing is pending the chunk becomes the
    /// buffer (no copy), the common case of one message per frame.
    fn push(&mut self, chunk: Vec<u8>) {
        if self.start == self.buf.len() {
            self.buf = chunk;
            self.start = 0;
        } else {
            self.buf.extend_from_slice(&chunk);
        }
    }

    fn has_partial(&self) -> bool {
        self.start < self.buf.len()
    }

    /// The length of the next message once it is all buffered; refuses
    /// compressed and oversized messages as soon as the prefix is in.
    fn complete(&self) -> Result<Option<usize>, Status> {
        let avail = &self.buf[self.start..];
        let Some(prefix) = avail.first_chunk::<PREFIX_LEN>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if prefix[0] != 0 {
            return Err(Status::new(
                Code::UNIMPLEMENTED,
                "compressed messages are not supported",
            ));
        }
        if len > self.max {
            return Err(Status::new(
                Code::RESOURCE_EXHAUSTED,
                format!("received message larger than max ({len} vs. {})", self.max),
            ));
        }
        Ok((avail.len() >= PREFIX_LEN + len).then_some(len))
    }

    /// Drops a consumed message of `len` bytes from the buffer.
    fn advance(&mut self, len: usize) {
        self.start += PREFIX_LEN + len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 1 << 20 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }

    fn next(&mut self) -> Result<Option<Vec<u8>>, Status> {
        let Some(len) = self.complete()? else {
            return Ok(None);
        };
        let body = self.start + PREFIX_LEN;
        let msg = self.buf[body..body + len].to_vec();
        self.advance(len);
        Ok(Some(msg))
    }

    /// The next message decoded in place. When the message is all that is
    /// buffered (one message per DATA frame, the common case) the buffer is
    /// handed to prost as `Bytes`, so a `bytes` field costs one copy.
    fn next_decoded<M: prost::Message + Default>(
        &mut self,
    ) -> Result<Option<Result<M, String>>, Status> {
        let Some(len) = self.complete()? else {
            return Ok(None);
        };
        let body = self.start + PREFIX_LEN;
        let decoded = if body + len == self.buf.len() {
            let bytes = prost::bytes::Bytes::from(std::mem::take(&mut self.buf)).slice(body..);
            self.start = 0;
            M::decode(bytes)
        } else {
            let decoded = M::decode(&self.buf[body..body + len]);
            self.advance(len);
            decoded
        };
        Ok(Some(decoded.map_err(|e| format!("decoding message: {e}"))))
    }
}

fn prefix(len: usize) -> [u8; PREFIX_LEN] {
    let len = (len as u32).to_be_bytes();
    [0, len[0], len[1], len[2], len[3]]
}

/// The length prefix of a message of `head` plus `rest` bytes, then `head`.
fn prefixed(head: &[u8], rest: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(PREFIX_LEN + head.len());
    out.extend_from_slice(&prefix(head.len() + rest));
    out.extend_from_slice(head);
    out
}

#[cfg(test)]
fn frame_message(msg: &[u8]) -> Vec<u8> {
    [&prefix(msg.len())[..], msg].concat()
}

fn plock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn decode<M: prost::Message + Default>(bytes: &[u8]) -> Result<M, Status> {
    M::decode(bytes).map_err(|e| Status::new(Code::INTERNAL, format!("decoding message: {e}")))
}

// --- client -------------------------------------------------------------------

/// The client side of one HTTP/2 connection: opens calls on it.
pub struct Client {
    conn: h2::Connection,
    authority: String,
    max_message: usize,
}

impl Client {
    /// `authority` is the `:authority` of every call (host:port, or
    /// `localhost` on a Unix socket, as grpc-go uses).
    pub fn new(conn: h2::Connection, authority: &str) -> Client {
        Client {
            conn,
            authority: authority.to_string(),
            max_message: DEFAULT_MAX_MESSAGE_SIZE,
        }
    }

    pub fn with_max_message_size(mut self, max: usize) -> Client {
        self.max_message = max;
        self
    }

    pub fn connection(&self) -> &h2::Connection {
        &self.conn
    }

    /// Starts a bidirectional streaming call to `path` (`/Service/Method`)
    /// with request metadata (lower-case keys).
    pub fn call(&self, path: &str, metadata: &[(&str, &str)]) -> Result<ClientCall, Status> {
        let scheme = if self.conn.is_secure() {
            "https"
        } else {
            "http"
        };
        let mut fields = vec![
            field(":method", "POST"),
            field(":scheme", scheme),
            field(":path", path),
            field(":authority", self.authority.as_str()),
            field("content-type", "application/grpc"),
            field("te", "trailers"),
            field(
                "user-agent",
                concat!("apiserver-proxy-grpc/", env!("CARGO_PKG_VERSION")),
            ),
        ];
        fields.extend(metadata.iter().map(|(k, v)| field(k, *v)));
        let stream = self
            .conn
            .open_stream(&fields, false)
            .map_err(|e| Status::from_h2(&e))?;
        Ok(ClientCall {
            stream,
            recv: Mutex::new(ClientRecv {
                reader: MessageReader::new(self.max_message),
                headers: None,
                status: None,
            }),
            send: Mutex::new(()),
        })
    }
}

struct ClientRecv {
    reader: MessageReader,
    headers: Option<Metadata>,
    status: Option<Status>,
}

/// One call from the client side. `send` and `recv` may run on two threads.
/// Dropping it before the call ended cancels it (RST_STREAM CANCEL).
pub struct ClientCall {
    stream: h2::Stream,
    recv: Mutex<ClientRecv>,
    /// Held across a send, so concurrent senders never interleave frames
    /// of two messages.
    send: Mutex<()>,
}

impl ClientCall {
    /// Sends one message; waits for flow-control credit. Once the server
    /// has finished the call (RST_STREAM NO_ERROR after its trailers),
    /// messages are dropped and `Ok` returned, as grpc-go's SendMsg
    /// returns io.EOF: the call's outcome is what `recv` reports.
    pub fn send(&self, msg: &[u8]) -> Result<(), Status> {
        self.send_parts(&[], msg)
    }

    /// Sends one message made of `head` then `body`, without joining them
    /// first (a packet's fields, then its payload bytes).
    pub fn send_parts(&self, head: &[u8], body: &[u8]) -> Result<(), Status> {
        let head = prefixed(head, body.len());
        let _send = plock(&self.send);
        self.sent(self.stream.send_data_parts(&head, body, false))
    }

    /// [`ClientCall::send_parts`] for a caller that must not wait: sends
    /// only if nobody else is sending and the message goes out at once
    /// (see [`h2::Stream::try_send_data_parts`]); `Ok(false)` when it
    /// would have waited, and nothing was sent.
    pub fn try_send_parts(&self, head: &[u8], body: &[u8]) -> Result<bool, Status> {
        let _send = match self.send.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(false),
        };
        let head = prefixed(head, body.len());
        match self.stream.try_send_data_parts(&head, body) {
            Ok(sent) => Ok(sent),
            Err(e) => self.sent(Err(e)).map(|()| true),
        }
    }

    pub fn send_msg<M: prost::Message>(&self, msg: &M) -> Result<(), Status> {
        self.send(&msg.encode_to_vec())
    }

    /// Ends the request side (half-close); responses keep coming.
    pub fn close_send(&self) -> Result<(), Status> {
        let _send = plock(&self.send);
        self.sent(self.stream.send_data(&[], true))
    }

    fn sent(&self, result: Result<(), h2::Error>) -> Result<(), Status> {
        match result {
            Ok(()) => Ok(()),
            Err(h2::Error::Reset {
                code: ErrorCode::NO_ERROR,
                remote: true,
                ..
            }) => Ok(()),
            Err(err) => {
                // A failed send usually means the call already ended: report
                // its status when it is known.
                if let Ok(recv) = self.recv.try_lock() {
                    if let Some(status) = &recv.status {
                        return Err(status.clone());
                    }
                }
                Err(Status::from_h2(&err))
            }
        }
    }

    /// Cancels the call (RST_STREAM CANCEL).
    pub fn cancel(&self) {
        self.stream.reset(ErrorCode::CANCEL);
    }

    /// The response headers (waits for them). A trailers-only response
    /// yields its status as the error.
    pub fn headers(&self) -> Result<Metadata, Status> {
        let mut recv = plock(&self.recv);
        loop {
            if let Some(h) = &recv.headers {
                return Ok(h.clone());
            }
            if let Some(status) = &recv.status {
                return Err(if status.is_ok() {
                    Status::new(Code::INTERNAL, "call ended without response headers")
                } else {
                    status.clone()
                });
            }
            self.pump(&mut recv)?;
        }
    }

    /// The next message; `Ok(None)` when the call ended with status OK, the
    /// status as the error otherwise.
    pub fn recv(&self) -> Result<Option<Vec<u8>>, Status> {
        self.recv_with(MessageReader::next)
    }

    /// The next message decoded as `M` (see [`ServerCall::recv_decoded`]).
    pub fn recv_decoded<M: prost::Message + Default>(
        &self,
    ) -> Result<Option<Result<M, String>>, Status> {
        self.recv_with(MessageReader::next_decoded)
    }

    fn recv_with<R>(
        &self,
        take: impl Fn(&mut MessageReader) -> Result<Option<R>, Status>,
    ) -> Result<Option<R>, Status> {
        let mut recv = plock(&self.recv);
        loop {
            match take(&mut recv.reader) {
                Ok(Some(msg)) => return Ok(Some(msg)),
                Ok(None) => {}
                Err(status) => {
                    self.stream.reset(ErrorCode::CANCEL);
                    recv.status = Some(status.clone());
                    return Err(status);
                }
            }
            if let Some(status) = &recv.status {
                if recv.reader.has_partial() && status.is_ok() {
                    return Err(Status::new(Code::INTERNAL, "call ended inside a message"));
                }
                return if status.is_ok() {
                    Ok(None)
                } else {
                    Err(status.clone())
                };
            }
            self.pump(&mut recv)?;
        }
    }

    pub fn recv_msg<M: prost::Message + Default>(&self) -> Result<Option<M>, Status> {
        self.recv()?.map(|b| decode(&b)).transpose()
    }

    /// Takes one event from the stream into `recv`.
    fn pump(&self, recv: &mut ClientRecv) -> Result<(), Status> {
        let event = match self.stream.recv() {
            Ok(event) => event,
            Err(err) => {
                let status = Status::from_h2(&err);
                recv.status = Some(status.clone());
                return Err(status);
            }
        };
        recv.take(event);
        Ok(())
    }

    /// Hands every response message from now on to `deliver`, decoded as
    /// `M`, on the connection's reader thread as its frames arrive (see
    /// [`ServerCall::recv_inline`]); then exactly one [`Inbound::End`]:
    /// `Ok` for status OK, else what [`ClientCall::recv`] would have
    /// returned (a message over the limit ends it too: cancel the call
    /// then). `deliver` must not block; `recv` must not be called
    /// afterwards.
    pub fn recv_inline<M: prost::Message + Default>(
        &self,
        mut deliver: impl FnMut(Inbound<M>) + Send + 'static,
    ) {
        let mut recv = {
            let mut recv = plock(&self.recv);
            let headers = recv.headers.clone();
            std::mem::replace(
                &mut *recv,
                ClientRecv {
                    reader: MessageReader::new(0),
                    headers,
                    status: None,
                },
            )
        };
        let mut ended = false;
        let mut consume = move |tapped: Option<h2::Tapped>| {
            if ended {
                return;
            }
            match tapped {
                Some(h2::Tapped::Event(event)) => recv.take(Some(event)),
                Some(h2::Tapped::End) => recv.take(None),
                Some(h2::Tapped::Failed(err)) => {
                    recv.status.get_or_insert(Status::from_h2(&err));
                }
                None => {} // what was buffered before the tap
            }
            if !deliver_complete(&mut recv.reader, &mut deliver) {
                ended = true;
                return;
            }
            let Some(status) = &recv.status else {
                return;
            };
            ended = true;
            deliver(Inbound::End(
                if recv.reader.has_partial() && status.is_ok() {
                    Err(Status::new(Code::INTERNAL, "call ended inside a message"))
                } else if status.is_ok() {
                    Ok(())
                } else {
                    Err(status.clone())
                },
            ));
        };
        consume(None);
        self.stream
            .tap(Box::new(move |tapped| consume(Some(tapped))));
    }
}

impl ClientRecv {
    /// Takes one event of the response (`None`: the stream's end).
    fn take(&mut self, event: Option<Event>) {
        let recv = self;
        match event {
            Some(Event::Headers { fields, end_stream }) if recv.headers.is_none() => {
                let http = pseudo(&fields, ":status").unwrap_or(b"");
                if http != b"200" {
                    recv.status = Some(http_status(http));
                    return;
                }
                let grpc = pseudo(&fields, "content-type")
                    .is_some_and(|c| c.starts_with(b"application/grpc"));
                if !grpc {
                    recv.status = Some(Status::new(
                        Code::UNKNOWN,
                        "response content-type is not application/grpc",
                    ));
                    return;
                }
                recv.headers = Some(Metadata::from_fields(&fields));
                if end_stream {
                    recv.status = Some(status_from_trailers(&fields));
                }
            }
            Some(Event::Headers { fields, .. }) => {
                recv.status = Some(status_from_trailers(&fields))
            }
            Some(Event::Data(data)) => {
                if recv.headers.is_none() {
                    recv.status = Some(Status::new(Code::INTERNAL, "DATA before response headers"));
                } else {
                    recv.reader.push(data);
                }
            }
            None => {
                recv.status.get_or_insert(Status::new(
                    Code::INTERNAL,
                    "server ended the stream without trailers",
                ));
            }
        }
    }
}

/// gRPC's mapping of a non-200 HTTP status to a code.
fn http_status(http: &[u8]) -> Status {
    let code = match http {
        b"400" => Code::INTERNAL,
        b"401" => Code::UNAUTHENTICATED,
        b"403" => Code::PERMISSION_DENIED,
        b"404" => Code::UNIMPLEMENTED,
        b"429" | b"502" | b"503" | b"504" => Code::UNAVAILABLE,
        _ => Code::UNKNOWN,
    };
    Status::new(
        code,
        format!("HTTP status {}", String::from_utf8_lossy(http)),
    )
}

// --- server -------------------------------------------------------------------

type Handler = dyn Fn(&Arc<ServerCall>) -> Status + Send + Sync;

/// Routes calls by `:path` to handlers; each call's handler runs on a
/// pooled thread, and the call ends with the status it returns, unless it
/// detached the call ([`ServerCall::detach`]: then [`ServerCall::complete`]
/// ends it). A handler may hand clones of its call to other threads (an
/// agent stream that frontends send on); sends after the call ended fail.
/// Cheap to clone.
#[derive(Clone)]
pub struct Server {
    routes: Arc<HashMap<String, Arc<Handler>>>,
    max_message: usize,
}

impl Default for Server {
    fn default() -> Self {
        Server::new()
    }
}

impl Server {
    pub fn new() -> Server {
        Server {
            routes: Arc::new(HashMap::new()),
            max_message: DEFAULT_MAX_MESSAGE_SIZE,
        }
    }

    /// Adds a handler for `path` (`/Service/Method`).
    pub fn route(
        mut self,
        path: &str,
        handler: impl Fn(&Arc<ServerCall>) -> Status + Send + Sync + 'static,
    ) -> Server {
        Arc::make_mut(&mut self.routes).insert(path.to_string(), Arc::new(handler));
        self
    }

    pub fn with_max_message_size(mut self, max: usize) -> Server {
        self.max_message = max;
        self
    }

    /// Serves every call of one connection until it ends, then joins the
    /// call threads. Close the connection (through [`h2::Connection::closer`])
    /// to stop early; `goaway` lets open calls finish.
    pub fn serve(&self, conn: &h2::Connection) {
        // Calls run on reused threads (a connection per tunnel must not
        // cost a thread start); joined (every call finished) when this
        // returns.
        let mut calls: Vec<crate::shutdown::Worker> = Vec::new();
        while let Some(stream) = conn.accept() {
            self.start_call(stream, &mut calls);
        }
    }

    /// Serves a new server connection on this thread, which reads it (see
    /// [`h2::Connection::serve_here`]): each call starts on a reused
    /// thread as its request arrives, with no thread waiting to accept it.
    /// Returns once the connection has ended and every call finished.
    pub fn serve_here(
        &self,
        transport: h2::Transport,
        config: h2::Config,
    ) -> Result<(), h2::Error> {
        let mut calls: Vec<crate::shutdown::Worker> = Vec::new();
        let result = h2::Connection::serve_here(transport, config, |stream| {
            self.start_call(stream, &mut calls)
        });
        drop(calls); // every call finished
        result
    }

    /// Checks a new stream's request and runs its call on a reused thread,
    /// kept in `calls` (whose finished ones go) to be joined.
    fn start_call(&self, stream: h2::Stream, calls: &mut Vec<crate::shutdown::Worker>) {
        let Some(call) = self.prepare(stream).map(Arc::new) else {
            return;
        };
        calls.retain(|c| !c.is_finished());
        let server = self.clone();
        match crate::shutdown::Worker::pooled("grpc-call", move || server.run(&call)) {
            Ok(worker) => calls.push(worker),
            Err(err) => log::error!("starting a call thread: {err}"),
        }
    }

    /// Runs the call's handler, then ends the call with its status
    /// (unless the handler detached it: see [`ServerCall::detach`]).
    fn run(&self, call: &Arc<ServerCall>) {
        let status = match self.routes.get(&call.path) {
            Some(handler) => handler(call),
            None => Status::new(Code::UNIMPLEMENTED, format!("unknown method {}", call.path)),
        };
        if !call.detached.load(std::sync::atomic::Ordering::Acquire) {
            call.finish(&status);
        }
    }

    /// Checks the request headers; answers bad requests itself.
    fn prepare(&self, stream: h2::Stream) -> Option<ServerCall> {
        let Ok(Some(Event::Headers { fields, end_stream })) = stream.recv() else {
            return None;
        };
        let method = pseudo(&fields, ":method");
        let path = pseudo(&fields, ":path")
            .and_then(|p| std::str::from_utf8(p).ok())
            .unwrap_or("");
        let content_type = pseudo(&fields, "content-type").unwrap_or(b"");
        if method != Some(b"POST") || path.is_empty() {
            let _ = stream.send_headers(&[field(":status", "405")], true);
            return None;
        }
        if !(content_type == b"application/grpc" || content_type.starts_with(b"application/grpc+"))
        {
            let _ = stream.send_headers(&[field(":status", "415")], true);
            return None;
        }
        Some(ServerCall {
            path: path.to_string(),
            metadata: Metadata::from_fields(&fields),
            send: Mutex::new(ServerSend {
                headers_sent: false,
                headers: Vec::new(),
                finished: false,
            }),
            recv: Mutex::new(ServerRecv {
                reader: MessageReader::new(self.max_message),
                ended: end_stream,
            }),
            stream,
            detached: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

struct ServerSend {
    headers_sent: bool,
    headers: Vec<Field>,
    finished: bool,
}

struct ServerRecv {
    reader: MessageReader,
    ended: bool,
}

/// Delivers every complete message `reader` holds; false (after
/// delivering the end) when one breaks the call's rules (too large,
/// compressed).
fn deliver_complete<M: prost::Message + Default>(
    reader: &mut MessageReader,
    deliver: &mut impl FnMut(Inbound<M>),
) -> bool {
    loop {
        match reader.next_decoded::<M>() {
            Ok(Some(message)) => deliver(Inbound::Message(message)),
            Ok(None) => return true,
            Err(status) => {
                deliver(Inbound::End(Err(status)));
                return false;
            }
        }
    }
}

/// What [`ServerCall::recv_inline`] delivers.
#[derive(Debug)]
pub enum Inbound<M> {
    /// A request message, or why it did not decode (the call goes on).
    Message(Result<M, String>),
    /// The request side is over: `Ok` when the client half-closed.
    End(Result<(), Status>),
}

/// One call on the server side, handed to its handler. `send` and `recv`
/// may run on two threads (share it by reference in a thread scope).
pub struct ServerCall {
    stream: h2::Stream,
    path: String,
    metadata: Metadata,
    send: Mutex<ServerSend>,
    recv: Mutex<ServerRecv>,
    /// The handler returned before the call ended ([`ServerCall::detach`]):
    /// whoever carries it on ends it.
    detached: std::sync::atomic::AtomicBool,
}

impl ServerCall {
    /// Called by a handler that returns while the call goes on without a
    /// thread of its own (its packets handled on the connection's reader,
    /// [`ServerCall::recv_inline`]): the status it returns is not sent;
    /// [`ServerCall::complete`] ends the call later.
    pub fn detach(&self) {
        self.detached
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Ends a detached call with `status` (trailers; nothing when the call
    /// has ended already).
    pub fn complete(&self, status: &Status) {
        self.finish(status);
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The request metadata (agentid, agentidentifiers, authorization...).
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    pub fn peer(&self) -> &str {
        self.stream.peer()
    }

    /// Adds a response header (e.g. `serverid`); effective until the
    /// headers are sent with the first message or [`ServerCall::send_headers`].
    pub fn set_header(&self, name: &str, value: &str) {
        plock(&self.send).headers.push(field(name, value));
    }

    /// Sends the response headers now (they go with the first message
    /// otherwise).
    pub fn send_headers(&self) -> Result<(), Status> {
        let mut send = plock(&self.send);
        self.ensure_headers(&mut send)
    }

    fn ensure_headers(&self, send: &mut ServerSend) -> Result<(), Status> {
        if send.headers_sent {
            return Ok(());
        }
        let mut fields = vec![
            field(":status", "200"),
            field("content-type", "application/grpc"),
        ];
        fields.append(&mut send.headers);
        self.stream
            .send_headers(&fields, false)
            .map_err(|e| Status::from_h2(&e))?;
        send.headers_sent = true;
        Ok(())
    }

    /// Sends one message; waits for flow-control credit.
    pub fn send(&self, msg: &[u8]) -> Result<(), Status> {
        self.send_parts(&[], msg)
    }

    /// Sends one message made of `head` then `body`, without joining them
    /// first (a packet's fields, then its payload bytes).
    pub fn send_parts(&self, head: &[u8], body: &[u8]) -> Result<(), Status> {
        let head = prefixed(head, body.len());
        // Held across the send: a message larger than the window goes out
        // in several frames, and another sender must not cut in between.
        let mut send = plock(&self.send);
        if send.finished {
            return Err(Status::new(Code::INTERNAL, "call already finished"));
        }
        self.ensure_headers(&mut send)?;
        self.stream
            .send_data_parts(&head, body, false)
            .map_err(|e| Status::from_h2(&e))
    }

    /// [`ServerCall::send_parts`] for a caller that must not wait: sends
    /// only if nobody else is sending and the message goes out at once
    /// (see [`h2::Stream::try_send_data_parts`]); `Ok(false)` when it
    /// would have waited, and nothing was sent.
    pub fn try_send_parts(&self, head: &[u8], body: &[u8]) -> Result<bool, Status> {
        let mut send = match self.send.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(false),
        };
        if send.finished {
            return Err(Status::new(Code::INTERNAL, "call already finished"));
        }
        self.ensure_headers(&mut send)?;
        let head = prefixed(head, body.len());
        self.stream
            .try_send_data_parts(&head, body)
            .map_err(|e| Status::from_h2(&e))
    }

    pub fn send_msg<M: prost::Message>(&self, msg: &M) -> Result<(), Status> {
        self.send(&msg.encode_to_vec())
    }

    /// The next request message; `Ok(None)` once the client half-closed.
    /// A cancelled call yields CANCELLED.
    pub fn recv(&self) -> Result<Option<Vec<u8>>, Status> {
        self.recv_with(MessageReader::next)
    }

    /// The next request message decoded as `M`, without an intermediate
    /// copy: `Ok(Some(Err(_)))` for a message that does not decode (the
    /// call goes on), `Ok(None)` once the client half-closed.
    pub fn recv_decoded<M: prost::Message + Default>(
        &self,
    ) -> Result<Option<Result<M, String>>, Status> {
        self.recv_with(MessageReader::next_decoded)
    }

    fn recv_with<R>(
        &self,
        take: impl Fn(&mut MessageReader) -> Result<Option<R>, Status>,
    ) -> Result<Option<R>, Status> {
        let mut recv = plock(&self.recv);
        loop {
            if let Some(msg) = take(&mut recv.reader)? {
                return Ok(Some(msg));
            }
            if recv.ended {
                if recv.reader.has_partial() {
                    return Err(Status::new(
                        Code::INTERNAL,
                        "request ended inside a message",
                    ));
                }
                return Ok(None);
            }
            match self.stream.recv() {
                Ok(Some(Event::Data(data))) => recv.reader.push(data),
                // Request trailers carry nothing gRPC uses.
                Ok(Some(Event::Headers { .. })) | Ok(None) => recv.ended = true,
                Err(err) => return Err(Status::from_h2(&err)),
            }
        }
    }

    pub fn recv_msg<M: prost::Message + Default>(&self) -> Result<Option<M>, Status> {
        self.recv()?.map(|b| decode(&b)).transpose()
    }

    /// Hands every request message from now on to `deliver`, decoded as
    /// `M`, on the connection's reader thread as its frames arrive (see
    /// [`h2::Stream::tap`]): no thread wakes up per message. Then exactly
    /// one [`Inbound::End`]: `Ok` once the client half-closed, the status
    /// that [`ServerCall::recv`] would have returned otherwise. `deliver`
    /// must not block; `recv` must not be called afterwards.
    pub fn recv_inline<M: prost::Message + Default>(
        &self,
        mut deliver: impl FnMut(Inbound<M>) + Send + 'static,
    ) {
        let mut reader = {
            let mut recv = plock(&self.recv);
            std::mem::replace(&mut recv.reader, MessageReader::new(0))
        };
        let mut ended = false;
        self.stream.tap(Box::new(move |tapped| {
            if ended {
                return;
            }
            let end = match tapped {
                h2::Tapped::Event(Event::Data(data)) => {
                    reader.push(data);
                    ended = !deliver_complete(&mut reader, &mut deliver);
                    return;
                }
                // Request trailers carry nothing gRPC uses; the end follows.
                h2::Tapped::Event(Event::Headers { .. }) => return,
                h2::Tapped::End => {
                    // What the reader held before the tap comes first.
                    if !deliver_complete(&mut reader, &mut deliver) {
                        ended = true;
                        return;
                    }
                    if reader.has_partial() {
                        Err(Status::new(
                            Code::INTERNAL,
                            "request ended inside a message",
                        ))
                    } else {
                        Ok(())
                    }
                }
                h2::Tapped::Failed(err) => Err(Status::from_h2(&err)),
            };
            ended = true;
            deliver(Inbound::End(end));
        }));
    }

    /// Ends the call now with `status` and asks the client to stop sending
    /// (RST_STREAM NO_ERROR), so that a `recv` waiting in the handler
    /// returns; the status the handler returns afterwards is not sent.
    pub fn end(&self, status: &Status) {
        self.finish(status);
        self.stream.reset(ErrorCode::NO_ERROR);
    }

    /// Ends the call with `status`: trailers, or a trailers-only response
    /// when nothing was sent yet.
    fn finish(&self, status: &Status) {
        let mut send = plock(&self.send);
        if send.finished {
            return;
        }
        send.finished = true;
        let mut fields = Vec::new();
        if !send.headers_sent {
            fields.push(field(":status", "200"));
            fields.push(field("content-type", "application/grpc"));
            fields.append(&mut send.headers);
        }
        fields.push(field("grpc-status", status.code.0.to_string()));
        if !status.message.is_empty() {
            fields.push(field("grpc-message", percent_encode(&status.message)));
        }
        if let Err(err) = self.stream.send_headers(&fields, true) {
            log::debug!("finishing call {}: {err}", self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shutdown::Worker;

    #[test]
    fn percent_encoding_round_trips() {
        let msg = "bad 100% ünïcode\nline";
        let enc = percent_encode(msg);
        assert_eq!(enc, "bad 100%25 %C3%BCn%C3%AFcode%0Aline");
        assert_eq!(percent_decode(enc.as_bytes()), msg);
        // Malformed escapes stay as they are.
        assert_eq!(percent_decode(b"50%"), "50%");
        assert_eq!(percent_decode(b"%zz%4"), "%zz%4");
    }

    #[test]
    fn messages_are_reassembled_and_bounded() {
        let mut r = MessageReader::new(10);
        let mut wire = frame_message(b"hello");
        wire.extend(frame_message(b""));
        wire.extend(frame_message(b"0123456789"));
        for b in &wire {
            r.push(vec![*b]);
        }
        assert_eq!(r.next().unwrap().unwrap(), b"hello");
        assert_eq!(r.next().unwrap().unwrap(), b"");
        assert_eq!(r.next().unwrap().unwrap(), b"0123456789");
        assert_eq!(r.next().unwrap(), None);
        assert!(!r.has_partial());
        // Several messages in one chunk, then one split across two.
        r.push(wire.clone());
        assert_eq!(r.next().unwrap().unwrap(), b"hello");
        assert_eq!(r.next().unwrap().unwrap(), b"");
        assert_eq!(r.next().unwrap().unwrap(), b"0123456789");
        let (a, b) = wire.split_at(7);
        r.push(a.to_vec());
        assert_eq!(r.next().unwrap(), None);
        assert!(r.has_partial());
        r.push(b.to_vec());
        assert_eq!(r.next().unwrap().unwrap(), b"hello");
        assert_eq!(r.next().unwrap().unwrap(), b"");
        assert_eq!(r.next().unwrap().unwrap(), b"0123456789");
        assert!(!r.has_partial());
        r.push(frame_message(b"01234567890"));
        assert_eq!(r.next().unwrap_err().code, Code::RESOURCE_EXHAUSTED);
        let mut r = MessageReader::new(10);
        r.push(vec![1, 0, 0, 0, 1, 0]);
        assert_eq!(r.next().unwrap_err().code, Code::UNIMPLEMENTED);
    }

    #[test]
    fn trailers_map_to_status() {
        let f = |k: &str, v: &str| (k.to_string(), v.as_bytes().to_vec());
        assert_eq!(status_from_trailers(&[f("grpc-status", "0")]), Status::ok());
        assert_eq!(
            status_from_trailers(&[f("grpc-status", "8"), f("grpc-message", "too%20big")]),
            Status::new(Code::RESOURCE_EXHAUSTED, "too big")
        );
        assert_eq!(status_from_trailers(&[]).code, Code::INTERNAL);
        assert_eq!(
            status_from_trailers(&[f("grpc-status", "x")]).code,
            Code::INTERNAL
        );
        assert_eq!(http_status(b"503").code, Code::UNAVAILABLE);
        assert_eq!(Code::RESOURCE_EXHAUSTED.to_string(), "RESOURCE_EXHAUSTED");
    }

    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    /// Our client and our server on a socket pair; the server thread runs
    /// until the client connection is dropped. Bind the result as
    /// `(_server, client)` so that the client drops first, even when a
    /// test fails.
    fn pair(server: Server, config: h2::Config) -> (Worker, Client) {
        let (a, b) = UnixStream::pair().unwrap();
        let t = Some(Duration::from_secs(10));
        let server_side = h2::Transport::plain(a, t, t).unwrap();
        let worker = Worker::spawn("test-server", move || {
            let conn = h2::Connection::server(server_side, config).unwrap();
            server.serve(&conn);
        })
        .unwrap();
        let conn = h2::Connection::client(
            h2::Transport::plain(b, t, t).unwrap(),
            h2::Config::default(),
        )
        .unwrap();
        (worker, Client::new(conn, "localhost"))
    }

    fn echo(call: &Arc<ServerCall>) -> Status {
        call.set_header("serverid", "s1");
        if let Some(id) = call.metadata().get("agentid") {
            call.set_header("x-agentid", id);
        }
        while let Some(msg) = match call.recv() {
            Ok(m) => m,
            Err(status) => return status,
        } {
            if msg == b"fail" {
                return Status::new(Code::FAILED_PRECONDITION, "asked to fail");
            }
            if let Err(status) = call.send(&msg) {
                return status;
            }
        }
        Status::ok()
    }

    #[test]
    fn calls_carry_metadata_messages_and_status() {
        let (_server, client) = pair(Server::new().route("/S/Echo", echo), h2::Config::default());
        let call = client.call("/S/Echo", &[("agentid", "a1")]).unwrap();
        call.send(b"one").unwrap();
        call.send(b"").unwrap();
        call.close_send().unwrap();
        let headers = call.headers().unwrap();
        assert_eq!(headers.get("serverid"), Some("s1"));
        assert_eq!(headers.get("x-agentid"), Some("a1"));
        assert_eq!(call.recv().unwrap().unwrap(), b"one");
        assert_eq!(call.recv().unwrap().unwrap(), b"");
        assert_eq!(call.recv().unwrap(), None);

        // An error before any message: a trailers-only response.
        let call = client.call("/S/Echo", &[]).unwrap();
        call.send(b"fail").unwrap();
        let status = call.recv().unwrap_err();
        assert_eq!(
            status,
            Status::new(Code::FAILED_PRECONDITION, "asked to fail")
        );
        // As in grpc-go, the (empty) headers of a trailers-only response.
        assert_eq!(call.headers().unwrap().get("serverid"), Some("s1"));

        let call = client.call("/S/Nope", &[]).unwrap();
        assert_eq!(call.recv().unwrap_err().code, Code::UNIMPLEMENTED);
    }

    #[test]
    fn message_size_limit_is_enforced_on_receipt() {
        let server = Server::new().route("/S/Echo", echo);
        let (_server, client) = pair(server, h2::Config::default());
        let client = client.with_max_message_size(DEFAULT_MAX_MESSAGE_SIZE);
        let call = client.call("/S/Echo", &[]).unwrap();
        let max = vec![7u8; DEFAULT_MAX_MESSAGE_SIZE];
        call.send(&max).unwrap();
        assert_eq!(
            call.recv().unwrap().unwrap().len(),
            DEFAULT_MAX_MESSAGE_SIZE
        );
        call.send(&vec![7u8; DEFAULT_MAX_MESSAGE_SIZE + 1]).unwrap();
        assert_eq!(call.recv().unwrap_err().code, Code::RESOURCE_EXHAUSTED);
    }

    #[test]
    fn cancelled_calls_reach_the_handler() {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let tx = Mutex::new(tx);
        let server = Server::new().route("/S/Wait", move |call: &Arc<ServerCall>| {
            let status = loop {
                match call.recv() {
                    Ok(Some(_)) => {}
                    Ok(None) => break Status::ok(),
                    Err(status) => break status,
                }
            };
            let _ = plock(&tx).send(status.code);
            status
        });
        let (_server, client) = pair(server, h2::Config::default());
        let call = client.call("/S/Wait", &[]).unwrap();
        call.send(b"hi").unwrap();
        call.cancel();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            Code::CANCELLED
        );
        assert_eq!(call.recv().unwrap_err().code, Code::CANCELLED);
    }

    #[test]
    fn max_concurrent_streams_makes_callers_wait() {
        let config = h2::Config {
            max_concurrent_streams: 1,
            ..h2::Config::default()
        };
        let (_server, client) = pair(Server::new().route("/S/Echo", echo), config);
        let first = client.call("/S/Echo", &[]).unwrap();
        first.send(b"1").unwrap();
        assert_eq!(first.recv().unwrap().unwrap(), b"1");
        std::thread::scope(|scope| {
            let second = scope.spawn(|| {
                let call = client.call("/S/Echo", &[]).unwrap();
                call.send(b"2").unwrap();
                call.close_send().unwrap();
                call.recv().unwrap().unwrap()
            });
            // The second call can only start once the first has ended.
            first.close_send().unwrap();
            assert_eq!(first.recv().unwrap(), None);
            drop(first);
            assert_eq!(second.join().unwrap(), b"2");
        });
    }

    #[test]
    fn goaway_finishes_open_calls_and_refuses_new_ones() {
        let (_server, client) = pair(Server::new().route("/S/Echo", echo), h2::Config::default());
        let call = client.call("/S/Echo", &[]).unwrap();
        call.send(b"before").unwrap();
        assert_eq!(call.recv().unwrap().unwrap(), b"before");
        client.connection().goaway();
        assert_eq!(
            client.call("/S/Echo", &[]).err().unwrap().code,
            Code::UNAVAILABLE
        );
        call.send(b"after").unwrap();
        assert_eq!(call.recv().unwrap().unwrap(), b"after");
        call.close_send().unwrap();
        assert_eq!(call.recv().unwrap(), None);
        drop(call);
        assert!(
            client
                .connection()
                .wait_closed(Some(Duration::from_secs(10)))
                .is_some()
        );
    }
}
