//! HTTP/2 frame codec (RFC 9113 section 4 and 6): bytes to [`Frame`] and back.
//!
//! Owns: the 9-byte frame header, per-type payload layout and the per-frame
//! validity rules the RFC states (lengths, stream 0 rules, padding, SETTINGS
//! values). Every malformed input maps to the error code the RFC names.
//! Must not: do I/O, hold connection state or decode HPACK (the connection
//! does both; this module only carries header block fragments).

use std::fmt;

/// Frame type octets.
pub mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const PRIORITY: u8 = 0x2;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PUSH_PROMISE: u8 = 0x5;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
}

/// Flag bits.
pub mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

/// SETTINGS identifiers.
pub mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// The client connection preface (RFC 9113 section 3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const HEADER_LEN: usize = 9;
/// The smallest maximum frame size a peer may announce, and the default.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 16_384;
pub const MAX_MAX_FRAME_SIZE: u32 = (1 << 24) - 1;
/// The largest flow-control window (2^31-1).
pub const MAX_WINDOW: u32 = (1 << 31) - 1;
pub const DEFAULT_WINDOW: u32 = 65_535;

/// HTTP/2 error codes (RFC 9113 section 7).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    pub const NO_ERROR: ErrorCode = ErrorCode(0x0);
    pub const PROTOCOL_ERROR: ErrorCode = ErrorCode(0x1);
    pub const INTERNAL_ERROR: ErrorCode = ErrorCode(0x2);
    pub const FLOW_CONTROL_ERROR: ErrorCode = ErrorCode(0x3);
    pub const SETTINGS_TIMEOUT: ErrorCode = ErrorCode(0x4);
    pub const STREAM_CLOSED: ErrorCode = ErrorCode(0x5);
    pub const FRAME_SIZE_ERROR: ErrorCode = ErrorCode(0x6);
    pub const REFUSED_STREAM: ErrorCode = ErrorCode(0x7);
    pub const CANCEL: ErrorCode = ErrorCode(0x8);
    pub const COMPRESSION_ERROR: ErrorCode = ErrorCode(0x9);
    pub const CONNECT_ERROR: ErrorCode = ErrorCode(0xa);
    pub const ENHANCE_YOUR_CALM: ErrorCode = ErrorCode(0xb);
    pub const INADEQUATE_SECURITY: ErrorCode = ErrorCode(0xc);
    pub const HTTP_1_1_REQUIRED: ErrorCode = ErrorCode(0xd);

    fn name(self) -> Option<&'static str> {
        const NAMES: [&str; 14] = [
            "NO_ERROR",
            "PROTOCOL_ERROR",
            "INTERNAL_ERROR",
            "FLOW_CONTROL_ERROR",
            "SETTINGS_TIMEOUT",
            "STREAM_CLOSED",
            "FRAME_SIZE_ERROR",
            "REFUSED_STREAM",
            "CANCEL",
            "COMPRESSION_ERROR",
            "CONNECT_ERROR",
            "ENHANCE_YOUR_CALM",
            "INADEQUATE_SECURITY",
            "HTTP_1_1_REQUIRED",
        ];
        NAMES.get(self.0 as usize).copied()
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "error code {:#x}", self.0),
        }
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A frame that breaks the RFC, and whether it kills the connection or only
/// one stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// Answer with GOAWAY and close.
    Connection {
        code: ErrorCode,
        reason: &'static str,
    },
    /// Answer with RST_STREAM on this stream; the connection lives on.
    Stream {
        stream: u32,
        code: ErrorCode,
        reason: &'static str,
    },
}

impl Error {
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Connection { code, .. } | Error::Stream { code, .. } => *code,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connection { code, reason } => write!(f, "connection error {code}: {reason}"),
            Error::Stream {
                stream,
                code,
                reason,
            } => {
                write!(f, "stream {stream} error {code}: {reason}")
            }
        }
    }
}

impl std::error::Error for Error {}

fn conn_err(code: ErrorCode, reason: &'static str) -> Error {
    Error::Connection { code, reason }
}

/// The fixed 9-byte header in front of every frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub len: u32,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl FrameHeader {
    pub fn parse(b: &[u8; HEADER_LEN]) -> FrameHeader {
        FrameHeader {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: b[3],
            flags: b[4],
            // The reserved bit is ignored on receipt (section 4.1).
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & MAX_WINDOW,
        }
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.encode());
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let len = self.len.to_be_bytes();
        let stream = (self.stream & MAX_WINDOW).to_be_bytes();
        [
            len[1], len[2], len[3], self.kind, self.flags, stream[0], stream[1], stream[2],
            stream[3],
        ]
    }
}

/// One decoded frame. Padding is stripped; DATA keeps its flow-controlled
/// length, which includes the padding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Data {
        stream: u32,
        end_stream: bool,
        data: Vec<u8>,
        flow_len: u32,
    },
    Headers {
        stream: u32,
        end_stream: bool,
        end_headers: bool,
        fragment: Vec<u8>,
    },
    Priority {
        stream: u32,
    },
    RstStream {
        stream: u32,
        code: ErrorCode,
    },
    Settings {
        ack: bool,
        params: Vec<(u16, u32)>,
    },
    PushPromise {
        stream: u32,
    },
    Ping {
        ack: bool,
        payload: [u8; 8],
    },
    GoAway {
        last_stream: u32,
        code: ErrorCode,
        debug: Vec<u8>,
    },
    WindowUpdate {
        stream: u32,
        increment: u32,
    },
    Continuation {
        stream: u32,
        end_headers: bool,
        fragment: Vec<u8>,
    },
    /// Unknown frame types are ignored (section 4.1), but a CONTINUATION
    /// check still needs to see them.
    Unknown {
        kind: u8,
        stream: u32,
    },
}

/// Strips padding when the PADDED flag is set.
fn unpad(flags: u8, payload: &[u8]) -> Result<&[u8], Error> {
    if flags & flag::PADDED == 0 {
        return Ok(payload);
    }
    let (&pad, rest) = payload.split_first().ok_or(conn_err(
        ErrorCode::FRAME_SIZE_ERROR,
        "padded frame without pad length",
    ))?;
    if pad as usize > rest.len() {
        return Err(conn_err(
            ErrorCode::PROTOCOL_ERROR,
            "padding longer than the payload",
        ));
    }
    Ok(&rest[..rest.len() - pad as usize])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Decodes one frame whose header was already parsed and whose payload is
/// complete. `max_frame_size` is the limit we announced.
pub fn decode(h: &FrameHeader, payload: &[u8], max_frame_size: u32) -> Result<Frame, Error> {
    if h.len > max_frame_size || payload.len() != h.len as usize {
        return Err(conn_err(
            ErrorCode::FRAME_SIZE_ERROR,
            "frame larger than SETTINGS_MAX_FRAME_SIZE",
        ));
    }
    let on_stream = |what: &'static str| {
        if h.stream == 0 {
            Err(conn_err(ErrorCode::PROTOCOL_ERROR, what))
        } else {
            Ok(())
        }
    };
    let on_conn = |what: &'static str| {
        if h.stream != 0 {
            Err(conn_err(ErrorCode::PROTOCOL_ERROR, what))
        } else {
            Ok(())
        }
    };
    match h.kind {
        kind::DATA => {
            on_stream("DATA on stream 0")?;
            let data = unpad(h.flags, payload)?;
            Ok(Frame::Data {
                stream: h.stream,
                end_stream: h.flags & flag::END_STREAM != 0,
                data: data.to_vec(),
                flow_len: h.len,
            })
        }
        kind::HEADERS => {
            on_stream("HEADERS on stream 0")?;
            let mut block = unpad(h.flags, payload)?;
            if h.flags & flag::PRIORITY != 0 {
                if block.len() < 5 {
                    return Err(conn_err(
                        ErrorCode::FRAME_SIZE_ERROR,
                        "HEADERS too short for priority",
                    ));
                }
                if be32(block) & MAX_WINDOW == h.stream {
                    return Err(Error::Stream {
                        stream: h.stream,
                        code: ErrorCode::PROTOCOL_ERROR,
                        reason: "stream depends on itself",
                    });
                }
                block = &block[5..];
            }
            Ok(Frame::Headers {
                stream: h.stream,
                end_stream: h.flags & flag::END_STREAM != 0,
                end_headers: h.flags & flag::END_HEADERS != 0,
                fragment: block.to_vec(),
            })
        }
        kind::PRIORITY => {
            on_stream("PRIORITY on stream 0")?;
            if payload.len() != 5 {
                return Err(Error::Stream {
                    stream: h.stream,
                    code: ErrorCode::FRAME_SIZE_ERROR,
                    reason: "PRIORITY length is not 5",
                });
            }
            if be32(payload) & MAX_WINDOW == h.stream {
                return Err(Error::Stream {
                    stream: h.stream,
                    code: ErrorCode::PROTOCOL_ERROR,
                    reason: "stream depends on itself",
                });
            }
            Ok(Frame::Priority { stream: h.stream })
        }
        kind::RST_STREAM => {
            on_stream("RST_STREAM on stream 0")?;
            if payload.len() != 4 {
                return Err(conn_err(
                    ErrorCode::FRAME_SIZE_ERROR,
                    "RST_STREAM length is not 4",
                ));
            }
            Ok(Frame::RstStream {
                stream: h.stream,
                code: ErrorCode(be32(payload)),
            })
        }
        kind::SETTINGS => {
            on_conn("SETTINGS on a stream")?;
            let ack = h.flags & flag::ACK != 0;
            if ack && !payload.is_empty() {
                return Err(conn_err(
                    ErrorCode::FRAME_SIZE_ERROR,
                    "SETTINGS ACK with a payload",
                ));
            }
            if payload.len() % 6 != 0 {
                return Err(conn_err(
                    ErrorCode::FRAME_SIZE_ERROR,
                    "SETTINGS length not a multiple of 6",
                ));
            }
            let mut params = Vec::with_capacity(payload.len() / 6);
            for p in payload.chunks_exact(6) {
                let id = u16::from_be_bytes([p[0], p[1]]);
                let value = be32(&p[2..]);
                match id {
                    setting::ENABLE_PUSH if value > 1 => {
                        return Err(conn_err(
                            ErrorCode::PROTOCOL_ERROR,
                            "SETTINGS_ENABLE_PUSH not 0 or 1",
                        ));
                    }
                    setting::INITIAL_WINDOW_SIZE if value > MAX_WINDOW => {
                        return Err(conn_err(
                            ErrorCode::FLOW_CONTROL_ERROR,
                            "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1",
                        ));
                    }
                    setting::MAX_FRAME_SIZE
                        if !(DEFAULT_MAX_FRAME_SIZE..=MAX_MAX_FRAME_SIZE).contains(&value) =>
                    {
                        return Err(conn_err(
                            ErrorCode::PROTOCOL_ERROR,
                            "SETTINGS_MAX_FRAME_SIZE outside 2^14..2^24-1",
                        ));
                    }
                    _ => {}
                }
                params.push((id, value));
            }
            Ok(Frame::Settings { ack, params })
        }
        kind::PUSH_PROMISE => {
            on_stream("PUSH_PROMISE on stream 0")?;
            Ok(Frame::PushPromise { stream: h.stream })
        }
        kind::PING => {
            on_conn("PING on a stream")?;
            let payload: [u8; 8] = payload
                .try_into()
                .map_err(|_| conn_err(ErrorCode::FRAME_SIZE_ERROR, "PING length is not 8"))?;
            Ok(Frame::Ping {
                ack: h.flags & flag::ACK != 0,
                payload,
            })
        }
        kind::GOAWAY => {
            on_conn("GOAWAY on a stream")?;
            if payload.len() < 8 {
                return Err(conn_err(
                    ErrorCode::FRAME_SIZE_ERROR,
                    "GOAWAY shorter than 8 bytes",
                ));
            }
            Ok(Frame::GoAway {
                last_stream: be32(payload) & MAX_WINDOW,
                code: ErrorCode(be32(&payload[4..])),
                debug: payload[8..].to_vec(),
            })
        }
        kind::WINDOW_UPDATE => {
            if payload.len() != 4 {
                return Err(conn_err(
                    ErrorCode::FRAME_SIZE_ERROR,
                    "WINDOW_UPDATE length is not 4",
                ));
            }
            let increment = be32(payload) & MAX_WINDOW;
            if increment == 0 {
                return Err(if h.stream == 0 {
                    conn_err(ErrorCode::PROTOCOL_ERROR, "WINDOW_UPDATE with increment 0")
                } else {
                    Error::Stream {
                        stream: h.stream,
                        code: ErrorCode::PROTOCOL_ERROR,
                        reason: "WINDOW_UPDATE with increment 0",
                    }
                });
            }
            Ok(Frame::WindowUpdate {
                stream: h.stream,
                increment,
            })
        }
        kind::CONTINUATION => {
            on_stream("CONTINUATION on stream 0")?;
            Ok(Frame::Continuation {
                stream: h.stream,
                end_headers: h.flags & flag::END_HEADERS != 0,
                fragment: payload.to_vec(),
            })
        }
        kind => Ok(Frame::Unknown {
            kind,
            stream: h.stream,
        }),
    }
}

/// A DATA frame whose payload is read into its own buffer
/// ([`Decoder::start_direct`]): the bytes so far, with room for the rest
/// (allocated, not zeroed: reads append to it).
pub struct DirectData {
    header: FrameHeader,
    payload: Vec<u8>,
}

impl DirectData {
    /// The payload so far, for a reader to append at most
    /// [`DirectData::missing`] bytes to.
    pub fn payload(&mut self) -> &mut Vec<u8> {
        &mut self.payload
    }

    /// Payload bytes still to come.
    pub fn missing(&self) -> usize {
        (self.header.len as usize).saturating_sub(self.payload.len())
    }

    pub fn is_complete(&self) -> bool {
        self.missing() == 0
    }

    /// The frame, once complete: as [`decode`] would give it.
    pub fn into_frame(self) -> Result<Frame, Error> {
        if self.header.stream == 0 {
            return Err(conn_err(ErrorCode::PROTOCOL_ERROR, "DATA on stream 0"));
        }
        Ok(Frame::Data {
            stream: self.header.stream,
            end_stream: self.header.flags & flag::END_STREAM != 0,
            data: self.payload,
            flow_len: self.header.len,
        })
    }
}

/// Accumulates bytes from the socket and yields complete frames. The buffer
/// never holds more than one partial frame of the size we announced plus
/// one read's worth of bytes.
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_frame_size: u32,
}

impl Decoder {
    pub fn new(max_frame_size: u32) -> Decoder {
        Decoder {
            buf: Vec::new(),
            start: 0,
            end: 0,
            max_frame_size,
        }
    }

    /// The buffer to read into: at least `want` bytes. Report what was
    /// read with [`Decoder::filled`].
    ///
    /// A partial frame is moved to the front only when the tail is too
    /// short, and the buffer then keeps room for two reads: so the move
    /// (at most one frame) happens once per `want` bytes consumed, not once
    /// per read. The buffer stays below `2 * want` plus one frame.
    pub fn spare(&mut self, want: usize) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.end < want && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < want {
            self.buf.resize(self.end + 2 * want, 0);
        }
        &mut self.buf[self.end..self.end + want]
    }

    /// Keeps `n` bytes written into the slice from [`Decoder::spare`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.spare(bytes.len())[..bytes.len()].copy_from_slice(bytes);
        self.filled(bytes.len());
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// How many bytes complete the frame being buffered (its header first):
    /// a reader that never reads past a frame asks for this many.
    pub fn to_frame_end(&self) -> usize {
        let avail = &self.buf[self.start..self.end];
        match avail.first_chunk::<HEADER_LEN>() {
            None => HEADER_LEN - avail.len(),
            Some(head) => {
                let total = HEADER_LEN + FrameHeader::parse(head).len as usize;
                total.saturating_sub(avail.len()).max(1)
            }
        }
    }

    /// When the buffer holds the header of an unpadded DATA frame of at
    /// least `min` payload bytes (within our frame size), and nothing past
    /// that frame: takes the header and the payload bytes buffered so far
    /// out of the buffer, for the caller to read the rest of the payload
    /// straight onto [`DirectData::payload`] (no copy through this buffer).
    pub fn start_direct(&mut self, min: usize) -> Option<DirectData> {
        let avail = &self.buf[self.start..self.end];
        let header = FrameHeader::parse(avail.first_chunk::<HEADER_LEN>()?);
        let len = header.len as usize;
        let have = avail.len() - HEADER_LEN;
        if header.kind != kind::DATA
            || header.flags & flag::PADDED != 0
            || len < min
            || header.len > self.max_frame_size
            || have >= len
        {
            return None;
        }
        let mut payload = Vec::with_capacity(len);
        payload.extend_from_slice(&avail[HEADER_LEN..]);
        self.start = self.end;
        Some(DirectData { header, payload })
    }

    /// The next complete frame, or `None` until more bytes arrive. The length
    /// is checked as soon as the header is in, so an oversized frame is
    /// refused before its payload is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, Error> {
        let avail = &self.buf[self.start..self.end];
        let Some(head) = avail.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = FrameHeader::parse(head);
        if header.len > self.max_frame_size {
            return Err(conn_err(
                ErrorCode::FRAME_SIZE_ERROR,
                "frame larger than SETTINGS_MAX_FRAME_SIZE",
            ));
        }
        let total = HEADER_LEN + header.len as usize;
        if avail.len() < total {
            return Ok(None);
        }
        let frame = decode(&header, &avail[HEADER_LEN..total], self.max_frame_size)?;
        self.start += total;
        Ok(Some(frame))
    }
}

// --- encoding ----------------------------------------------------------------

fn header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    FrameHeader {
        len: len as u32,
        kind,
        flags,
        stream,
    }
    .write(out);
}

pub fn write_data(out: &mut Vec<u8>, stream: u32, data: &[u8], end_stream: bool) {
    write_data_header(out, stream, data.len(), end_stream);
    out.extend_from_slice(data);
}

/// The header of a DATA frame whose `len` payload bytes the caller appends.
pub fn write_data_header(out: &mut Vec<u8>, stream: u32, len: usize, end_stream: bool) {
    out.extend_from_slice(&data_header(stream, len, end_stream));
}

/// The header of a DATA frame of `len` payload bytes, for a caller that
/// writes the payload from where it lies.
pub fn data_header(stream: u32, len: usize, end_stream: bool) -> [u8; HEADER_LEN] {
    FrameHeader {
        len: len as u32,
        kind: kind::DATA,
        flags: if end_stream { flag::END_STREAM } else { 0 },
        stream,
    }
    .encode()
}

/// Writes a header block as HEADERS plus CONTINUATION frames of at most
/// `max_frame_size` bytes each.
pub fn write_headers(
    out: &mut Vec<u8>,
    stream: u32,
    block: &[u8],
    end_stream: bool,
    max_frame_size: u32,
) {
    let max = max_frame_size.max(DEFAULT_MAX_FRAME_SIZE) as usize;
    let mut chunks = block.chunks(max).peekable();
    let first = chunks.next().unwrap_or(&[]);
    let mut flags = if end_stream { flag::END_STREAM } else { 0 };
    if chunks.peek().is_none() {
        flags |= flag::END_HEADERS;
    }
    header(out, first.len(), kind::HEADERS, flags, stream);
    out.extend_from_slice(first);
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            flag::END_HEADERS
        } else {
            0
        };
        header(out, chunk.len(), kind::CONTINUATION, flags, stream);
        out.extend_from_slice(chunk);
    }
}

pub fn write_rst_stream(out: &mut Vec<u8>, stream: u32, code: ErrorCode) {
    header(out, 4, kind::RST_STREAM, 0, stream);
    out.extend_from_slice(&code.0.to_be_bytes());
}

pub fn write_settings(out: &mut Vec<u8>, params: &[(u16, u32)]) {
    header(out, params.len() * 6, kind::SETTINGS, 0, 0);
    for (id, value) in params {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&value.to_be_bytes());
    }
}

pub fn write_settings_ack(out: &mut Vec<u8>) {
    header(out, 0, kind::SETTINGS, flag::ACK, 0);
}

pub fn write_ping(out: &mut Vec<u8>, payload: [u8; 8], ack: bool) {
    header(out, 8, kind::PING, if ack { flag::ACK } else { 0 }, 0);
    out.extend_from_slice(&payload);
}

pub fn write_goaway(out: &mut Vec<u8>, last_stream: u32, code: ErrorCode, debug: &[u8]) {
    header(out, 8 + debug.len(), kind::GOAWAY, 0, 0);
    out.extend_from_slice(&(last_stream & MAX_WINDOW).to_be_bytes());
    out.extend_from_slice(&code.0.to_be_bytes());
    out.extend_from_slice(debug);
}

pub fn write_window_update(out: &mut Vec<u8>, stream: u32, increment: u32) {
    header(out, 4, kind::WINDOW_UPDATE, 0, stream);
    out.extend_from_slice(&(increment & MAX_WINDOW).to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        header(&mut out, payload.len(), kind, flags, stream);
        out.extend_from_slice(payload);
        out
    }

    fn one(bytes: &[u8]) -> Result<Frame, Error> {
        let mut d = Decoder::new(DEFAULT_MAX_FRAME_SIZE);
        d.push(bytes);
        Ok(d.next_frame()?.expect("complete frame"))
    }

    fn conn_code(bytes: &[u8]) -> ErrorCode {
        match one(bytes) {
            Err(Error::Connection { code, .. }) => code,
            other => panic!("expected a connection error, got {other:?}"),
        }
    }

    fn stream_code(bytes: &[u8]) -> (u32, ErrorCode) {
        match one(bytes) {
            Err(Error::Stream { stream, code, .. }) => (stream, code),
            other => panic!("expected a stream error, got {other:?}"),
        }
    }

    #[test]
    fn every_frame_round_trips() {
        let mut out = Vec::new();
        write_data(&mut out, 1, b"hello", true);
        write_headers(&mut out, 3, b"abc", false, DEFAULT_MAX_FRAME_SIZE);
        write_rst_stream(&mut out, 5, ErrorCode::CANCEL);
        write_settings(
            &mut out,
            &[(setting::INITIAL_WINDOW_SIZE, 1 << 20), (0x99, 7)],
        );
        write_settings_ack(&mut out);
        write_ping(&mut out, *b"12345678", true);
        write_goaway(&mut out, 7, ErrorCode::ENHANCE_YOUR_CALM, b"calm");
        write_window_update(&mut out, 0, 1000);
        let mut d = Decoder::new(DEFAULT_MAX_FRAME_SIZE);
        // Byte by byte: a frame appears only when complete.
        let mut frames = Vec::new();
        for b in &out {
            d.push(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(d.buffered(), 0);
        assert_eq!(
            frames,
            vec![
                Frame::Data {
                    stream: 1,
                    end_stream: true,
                    data: b"hello".to_vec(),
                    flow_len: 5
                },
                Frame::Headers {
                    stream: 3,
                    end_stream: false,
                    end_headers: true,
                    fragment: b"abc".to_vec()
                },
                Frame::RstStream {
                    stream: 5,
                    code: ErrorCode::CANCEL
                },
                Frame::Settings {
                    ack: false,
                    params: vec![(4, 1 << 20), (0x99, 7)]
                },
                Frame::Settings {
                    ack: true,
                    params: vec![]
                },
                Frame::Ping {
                    ack: true,
                    payload: *b"12345678"
                },
                Frame::GoAway {
                    last_stream: 7,
                    code: ErrorCode::ENHANCE_YOUR_CALM,
                    debug: b"calm".to_vec()
                },
                Frame::WindowUpdate {
                    stream: 0,
                    increment: 1000
                },
            ]
        );
    }

    #[test]
    fn large_header_blocks_split_into_continuations() {
        let block = vec![7u8; 40_000];
        let mut out = Vec::new();
        write_headers(&mut out, 1, &block, true, DEFAULT_MAX_FRAME_SIZE);
        let mut d = Decoder::new(DEFAULT_MAX_FRAME_SIZE);
        d.push(&out);
        let mut joined = Vec::new();
        match d.next_frame().unwrap().unwrap() {
            Frame::Headers {
                end_stream: true,
                end_headers: false,
                fragment,
                ..
            } => joined.extend(fragment),
            f => panic!("{f:?}"),
        }
        assert!(
            matches!(d.next_frame().unwrap().unwrap(), Frame::Continuation { end_headers: false, fragment, .. } if {joined.extend(&fragment); true})
        );
        assert!(
            matches!(d.next_frame().unwrap().unwrap(), Frame::Continuation { end_headers: true, fragment, .. } if {joined.extend(&fragment); true})
        );
        assert_eq!(joined, block);
    }

    #[test]
    fn padding_is_stripped_and_counted() {
        let f = one(&raw(
            kind::DATA,
            flag::PADDED | flag::END_STREAM,
            1,
            b"\x03abc\0\0\0",
        ))
        .unwrap();
        assert_eq!(
            f,
            Frame::Data {
                stream: 1,
                end_stream: true,
                data: b"abc".to_vec(),
                flow_len: 7
            }
        );
        let f = one(&raw(
            kind::HEADERS,
            flag::PADDED | flag::PRIORITY | flag::END_HEADERS,
            1,
            b"\x01\0\0\0\x03\x10hd\0",
        ))
        .unwrap();
        assert_eq!(
            f,
            Frame::Headers {
                stream: 1,
                end_stream: false,
                end_headers: true,
                fragment: b"hd".to_vec()
            }
        );
        // Padding that swallows the whole payload, or more.
        assert_eq!(
            conn_code(&raw(kind::DATA, flag::PADDED, 1, b"\x04abc")),
            ErrorCode::PROTOCOL_ERROR
        );
        assert_eq!(
            conn_code(&raw(kind::HEADERS, flag::PADDED, 1, b"\x09")),
            ErrorCode::PROTOCOL_ERROR
        );
        assert_eq!(
            conn_code(&raw(kind::DATA, flag::PADDED, 1, b"")),
            ErrorCode::FRAME_SIZE_ERROR
        );
        // Exactly all padding is fine.
        assert!(one(&raw(kind::DATA, flag::PADDED, 1, b"\x02\0\0")).is_ok());
    }

    #[test]
    fn bad_lengths_are_frame_size_errors() {
        let e = ErrorCode::FRAME_SIZE_ERROR;
        assert_eq!(conn_code(&raw(kind::PING, 0, 0, b"1234567")), e);
        assert_eq!(conn_code(&raw(kind::PING, 0, 0, b"123456789")), e);
        assert_eq!(conn_code(&raw(kind::RST_STREAM, 0, 1, b"123")), e);
        assert_eq!(conn_code(&raw(kind::WINDOW_UPDATE, 0, 1, b"12345")), e);
        assert_eq!(conn_code(&raw(kind::GOAWAY, 0, 0, b"1234567")), e);
        assert_eq!(conn_code(&raw(kind::SETTINGS, 0, 0, b"12345")), e);
        assert_eq!(
            conn_code(&raw(kind::SETTINGS, flag::ACK, 0, b"\0\x01\0\0\0\0")),
            e
        );
        assert_eq!(
            conn_code(&raw(kind::HEADERS, flag::PRIORITY, 1, b"\0\0")),
            e
        );
        assert_eq!(stream_code(&raw(kind::PRIORITY, 0, 3, b"1234")), (3, e));
        // Longer than we allow: refused from the header alone.
        let mut d = Decoder::new(DEFAULT_MAX_FRAME_SIZE);
        let mut big = Vec::new();
        header(
            &mut big,
            DEFAULT_MAX_FRAME_SIZE as usize + 1,
            kind::DATA,
            0,
            1,
        );
        d.push(&big);
        assert_eq!(d.next_frame().unwrap_err().code(), e);
    }

    #[test]
    fn stream_zero_rules_are_protocol_errors() {
        let e = ErrorCode::PROTOCOL_ERROR;
        assert_eq!(conn_code(&raw(kind::DATA, 0, 0, b"x")), e);
        assert_eq!(conn_code(&raw(kind::HEADERS, flag::END_HEADERS, 0, b"")), e);
        assert_eq!(conn_code(&raw(kind::PRIORITY, 0, 0, b"\0\0\0\x01\0")), e);
        assert_eq!(conn_code(&raw(kind::RST_STREAM, 0, 0, b"\0\0\0\0")), e);
        assert_eq!(conn_code(&raw(kind::CONTINUATION, 0, 0, b"")), e);
        assert_eq!(conn_code(&raw(kind::PUSH_PROMISE, 0, 0, b"\0\0\0\x02")), e);
        assert_eq!(conn_code(&raw(kind::SETTINGS, 0, 1, b"")), e);
        assert_eq!(conn_code(&raw(kind::PING, 0, 1, b"12345678")), e);
        assert_eq!(conn_code(&raw(kind::GOAWAY, 0, 1, b"12345678")), e);
        assert_eq!(conn_code(&raw(kind::WINDOW_UPDATE, 0, 0, b"\0\0\0\0")), e);
        assert_eq!(
            stream_code(&raw(kind::WINDOW_UPDATE, 0, 5, b"\x80\0\0\0")),
            (5, e)
        );
        assert_eq!(
            stream_code(&raw(kind::PRIORITY, 0, 3, b"\0\0\0\x03\0")),
            (3, e)
        );
        assert_eq!(
            stream_code(&raw(kind::HEADERS, flag::PRIORITY, 3, b"\0\0\0\x03\0")),
            (3, e)
        );
    }

    #[test]
    fn settings_values_are_checked() {
        let s = |id: u16, v: u32| {
            let mut p = id.to_be_bytes().to_vec();
            p.extend(v.to_be_bytes());
            raw(kind::SETTINGS, 0, 0, &p)
        };
        assert_eq!(
            conn_code(&s(setting::ENABLE_PUSH, 2)),
            ErrorCode::PROTOCOL_ERROR
        );
        assert_eq!(
            conn_code(&s(setting::INITIAL_WINDOW_SIZE, 1 << 31)),
            ErrorCode::FLOW_CONTROL_ERROR
        );
        assert_eq!(
            conn_code(&s(setting::MAX_FRAME_SIZE, 16_383)),
            ErrorCode::PROTOCOL_ERROR
        );
        assert_eq!(
            conn_code(&s(setting::MAX_FRAME_SIZE, 1 << 24)),
            ErrorCode::PROTOCOL_ERROR
        );
        assert!(one(&s(setting::MAX_FRAME_SIZE, MAX_MAX_FRAME_SIZE)).is_ok());
        assert!(one(&s(setting::INITIAL_WINDOW_SIZE, MAX_WINDOW)).is_ok());
        // Unknown settings are kept for the caller to ignore.
        assert!(one(&s(0x4242, 9)).is_ok());
    }

    #[test]
    fn unknown_frames_and_reserved_bits() {
        assert_eq!(
            one(&raw(0xfa, 0xff, 7, b"whatever")).unwrap(),
            Frame::Unknown {
                kind: 0xfa,
                stream: 7
            }
        );
        // The reserved bit of the stream id and of the increment is ignored.
        assert_eq!(
            one(&raw(kind::WINDOW_UPDATE, 0, 0x8000_0001, b"\x80\0\0\x05")).unwrap(),
            Frame::WindowUpdate {
                stream: 1,
                increment: 5
            }
        );
    }

    /// A reader that stops at frame ends (TLS) and takes large DATA
    /// payloads straight: the same frames as the buffered path, in order.
    #[test]
    fn exact_reads_and_direct_payloads_give_the_same_frames() {
        let big: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
        let mut padded = vec![3u8];
        padded.extend_from_slice(&big[..9_000]);
        padded.extend_from_slice(&[0; 3]);
        let wire = [
            raw(kind::SETTINGS, 0, 0, &[]),
            raw(kind::DATA, flag::END_STREAM, 1, &big),
            raw(kind::DATA, 0, 3, b"small"),
            raw(kind::DATA, flag::PADDED, 5, &padded),
            raw(kind::DATA, 0, 0, &big[..5_000]),
        ]
        .concat();
        let mut buffered = Decoder::new(DEFAULT_MAX_FRAME_SIZE * 2);
        buffered.push(&wire);
        let mut expected = Vec::new();
        while let Ok(Some(frame)) = buffered.next_frame() {
            expected.push(frame);
        }
        assert!(buffered.next_frame().is_err(), "DATA on stream 0");
        // Reads of at most 7 bytes, never past a frame's end.
        let mut d = Decoder::new(DEFAULT_MAX_FRAME_SIZE * 2);
        let (mut at, mut got, mut direct_frames) = (0, Vec::new(), 0);
        let mut direct: Option<DirectData> = None;
        let error = loop {
            if direct.is_none() {
                direct = d.start_direct(4096);
            }
            let n = match &mut direct {
                Some(dd) => {
                    let n = dd.missing().min(7);
                    dd.payload().extend_from_slice(&wire[at..at + n]);
                    n
                }
                None => {
                    let n = d.to_frame_end().min(7);
                    d.spare(n).copy_from_slice(&wire[at..at + n]);
                    d.filled(n);
                    n
                }
            };
            at += n;
            if let Some(dd) = direct.take_if(|dd| dd.is_complete()) {
                direct_frames += 1;
                match dd.into_frame() {
                    Ok(frame) => got.push(frame),
                    Err(e) => break e,
                }
            }
            assert!(d.buffered() <= HEADER_LEN + 20_000);
            while let Some(frame) = d.next_frame().unwrap() {
                got.push(frame);
            }
        };
        assert_eq!(got, expected);
        assert_eq!(direct_frames, 2, "the 20,000- and 5,000-byte DATA frames");
        assert!(matches!(
            error,
            Error::Connection {
                code: ErrorCode::PROTOCOL_ERROR,
                ..
            }
        ));
        assert_eq!(at, wire.len());
    }

    #[test]
    fn error_codes_print_their_names() {
        assert_eq!(
            ErrorCode::FLOW_CONTROL_ERROR.to_string(),
            "FLOW_CONTROL_ERROR"
        );
        assert_eq!(ErrorCode(0x42).to_string(), "error code 0x42");
    }
}
