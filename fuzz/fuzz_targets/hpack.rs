//! Header blocks through the connection reader's HPACK path
//! (`h2::fuzzing::HeaderDecoder`: 4096-byte table, the header list limit,
//! the RFC 9113 field rules), several blocks per input sharing one
//! dynamic table as on a connection.
//!
//! Input: one byte choosing the limit, then blocks, each a big-endian
//! u16 (top bit: trailers) and that many bytes (the last may be short).
//! Checks: accepted lists are within the limit and re-encode to
//! themselves; the limit never changes what the table holds (a decoder
//! with a large limit agrees on every block the small one accepts).
#![no_main]

use apiserver_proxy::h2::fuzzing::{Block, HeaderDecoder};
use apiserver_proxy::h2::{Config, ErrorCode};
use libfuzzer_sys::fuzz_target;

const LARGE: u32 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, mut rest)) = data.split_first() else {
        return;
    };
    let limit = match pick % 4 {
        0 => Config::default().max_header_list_size,
        1 => 16 * 1024,
        2 => 256,
        _ => 40,
    };
    let mut ours = HeaderDecoder::new(limit);
    let mut wide = HeaderDecoder::new(LARGE);
    while rest.len() >= 2 {
        let trailers = rest[0] & 0x80 != 0;
        let len = (usize::from(rest[0] & 0x7f) << 8 | usize::from(rest[1])).min(rest.len() - 2);
        let block = &rest[2..2 + len];
        rest = &rest[2 + len..];
        let got = ours.decode(block, trailers);
        let reference = wide.decode(block, trailers);
        match got {
            Err(code) => {
                if block.len() > 2 * limit as usize {
                    assert_eq!(code, ErrorCode::ENHANCE_YOUR_CALM);
                } else {
                    assert_eq!(code, ErrorCode::COMPRESSION_ERROR);
                    assert!(reference.is_err(), "only the limited decoder failed");
                }
                return;
            }
            Ok(Block::Fields(fields)) => {
                let size: usize = fields.iter().map(|(n, v)| n.len() + v.len() + 32).sum();
                assert!(size <= limit as usize, "{size} > {limit}");
                assert_eq!(reference, Ok(Block::Fields(fields.clone())));
                // Our fields, re-encoded, decode to themselves.
                let mut encoder = loona_hpack::Encoder::new();
                let encoded =
                    encoder.encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_slice())));
                let mut fresh = HeaderDecoder::new(limit);
                assert_eq!(
                    fresh.decode(&encoded, trailers),
                    Ok(Block::Fields(fields)),
                    "re-encoded list differs"
                );
            }
            Ok(Block::StreamError) => {
                // The wide decoder may accept (the list was only too long)
                // but must not have failed the connection.
                assert!(reference.is_ok(), "table out of sync after a reset stream");
            }
        }
    }
});
