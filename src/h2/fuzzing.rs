//! Entry points for the fuzz targets (fuzz/): the connection reader's
//! header-block path without a connection around it, and the TLS record
//! reader after a real handshake. Not a stable API.

use super::conn::{self, TABLE_SIZE};
use super::frame;
use super::{ErrorCode, Field};

/// What the reader does with one complete header block that decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Block {
    /// Accepted: the stream sees these fields.
    Fields(Vec<Field>),
    /// The stream is reset (PROTOCOL_ERROR): list too large, a name that
    /// is not UTF-8, or a field rule of RFC 9113 section 8.2 broken.
    StreamError,
}

/// The reader's HPACK decoder with its limits: the dynamic table capped
/// at 4096 bytes, blocks over twice the header list limit refused before
/// decoding, fields beyond the limit decoded (the table must stay in sync)
/// but not kept.
pub struct HeaderDecoder {
    decoder: loona_hpack::Decoder<'static>,
    limit: usize,
}

impl HeaderDecoder {
    /// A decoder for a connection with this SETTINGS_MAX_HEADER_LIST_SIZE.
    pub fn new(max_header_list_size: u32) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        HeaderDecoder {
            decoder,
            limit: max_header_list_size as usize,
        }
    }

    /// One complete block (HEADERS plus CONTINUATIONs). `Err`: the
    /// connection ends with this code (the decoder is then unusable).
    pub fn decode(&mut self, block: &[u8], trailers: bool) -> Result<Block, ErrorCode> {
        if block.len() > 2 * self.limit {
            return Err(ErrorCode::ENHANCE_YOUR_CALM);
        }
        let decoded =
            conn::decode_block(&mut self.decoder, block, self.limit).map_err(|e| match e {
                frame::Error::Connection { code, .. } | frame::Error::Stream { code, .. } => code,
            })?;
        if decoded.size > self.limit
            || decoded.bad_name
            || conn::malformed(&decoded.fields, trailers).is_some()
        {
            return Ok(Block::StreamError);
        }
        Ok(Block::Fields(decoded.fields))
    }
}

/// The TLS record reader (`h2::records`) against a real rustls client:
/// `input[0] % 8` application records (each `input[i]` bytes long, taken
/// from what follows), a KeyUpdate after the first when `input[1] & 1`, a
/// close_notify after them when `input[1] & 2`, then the rest of the input
/// as raw bytes on the socket. Checks that the reader returns exactly the
/// records' bytes and then ends (EOF or an error), whatever the raw bytes
/// are: nothing forged is ever taken for data, and nothing panics.
pub fn tls_records(input: &[u8]) {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    let [count, flags, rest @ ..] = input else {
        return;
    };
    let server = crate::tls::test_server_config("server-ec.crt", "server-ec.key")
        .expect("test certificates load");
    let client =
        crate::tls::client_config(&crate::tls::test_data("ca.crt"), None, vec![b"h2".to_vec()])
            .expect("test CA loads");
    let (ours, theirs) = UnixStream::pair().expect("socket pair");
    for s in [&ours, &theirs] {
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    }
    let side = std::thread::spawn(move || {
        super::Transport::tls::<UnixStream>(
            ours,
            super::TlsSetup::Server(server),
            Some(Duration::from_secs(5)),
            Some(Duration::from_secs(5)),
        )
    });
    let name = "localhost".try_into().expect("a valid name");
    let conn = rustls::ClientConnection::new(client, name).expect("client");
    let mut peer = rustls::StreamOwned::new(conn, theirs);
    let mut sent = Vec::new();
    let mut rest = rest;
    for i in 0..count % 8 {
        let Some((&len, tail)) = rest.split_first() else {
            break;
        };
        let (record, tail) = tail.split_at((len as usize).min(tail.len()));
        rest = tail;
        if record.is_empty() || peer.write_all(record).and_then(|()| peer.flush()).is_err() {
            continue;
        }
        sent.extend_from_slice(record);
        if i == 0 && flags & 1 != 0 {
            let _ = peer.conn.refresh_traffic_keys();
        }
    }
    if flags & 2 != 0 {
        peer.conn.send_close_notify();
    }
    let _ = peer.flush();
    let _ = peer.sock.write_all(rest);
    let _ = peer.sock.shutdown(std::net::Shutdown::Write);
    let transport = match side.join() {
        Ok(Ok(transport)) => transport,
        other => {
            // Only if no record was sent may the handshake have failed.
            assert!(
                sent.is_empty(),
                "handshake failed: {:?}",
                other.map(|r| r.err())
            );
            return;
        }
    };
    let mut reader = transport.reader;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    assert_eq!(
        got, sent,
        "the reader returned other bytes than the records"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_as_the_reader_does() {
        // RFC 7541 C.3.1 then C.3.2 (the second block uses the table).
        let mut d = HeaderDecoder::new(64 * 1024);
        let first = b"\x82\x86\x84\x41\x0fwww.example.com";
        let Ok(Block::Fields(fields)) = d.decode(first, false) else {
            panic!("C.3.1 decodes");
        };
        assert_eq!(
            fields[3],
            (":authority".into(), b"www.example.com".to_vec())
        );
        let second = b"\x82\x86\x84\xbe\x58\x08no-cache";
        let Ok(Block::Fields(fields)) = d.decode(second, false) else {
            panic!("C.3.2 decodes");
        };
        assert_eq!(
            fields[3],
            (":authority".into(), b"www.example.com".to_vec())
        );
        assert_eq!(fields[4], ("cache-control".into(), b"no-cache".to_vec()));
        // Over the list limit: the stream is reset, the table stays usable.
        let mut small = HeaderDecoder::new(40);
        assert_eq!(small.decode(first, false), Ok(Block::StreamError));
        assert!(small.decode(second, false).is_ok());
        // Pseudo-headers in trailers, a block over twice the limit, garbage.
        assert_eq!(d.decode(b"\x82", true), Ok(Block::StreamError));
        assert_eq!(
            small.decode(&[0x82; 81], false),
            Err(ErrorCode::ENHANCE_YOUR_CALM)
        );
        assert_eq!(d.decode(b"\xff", false), Err(ErrorCode::COMPRESSION_ERROR));
    }

    #[test]
    fn tls_records_delivers_records_and_nothing_forged() {
        // Three records, a key update after the first, close_notify.
        let mut input = vec![3, 3, 5];
        input.extend_from_slice(b"hello");
        input.push(2);
        input.extend_from_slice(b"hi");
        input.push(3);
        input.extend_from_slice(b"end");
        tls_records(&input);
        // Garbage after the records: a forged record header and bytes.
        input[1] = 1;
        input.extend_from_slice(&[23, 3, 3, 0, 20]);
        input.extend_from_slice(&[7; 20]);
        tls_records(&input);
        tls_records(&[1, 0]);
        tls_records(&[0, 0, 22, 3, 1, 0, 0]);
    }
}
