//! Entry points for the fuzz targets (fuzz/): the connection reader's
//! header-block path without a connection around it. Not a stable API.

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
}
