//! Arbitrary bytes from a peer through the HTTP/2 frame decoder, split at
//! an arbitrary point (partial frames), with every header block fragment
//! through the HPACK decoder the connection uses. Errors are fine; panics,
//! hangs and unbounded memory are not.
#![no_main]

use apiserver_proxy::h2::frame::{self, Frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut frames = frame::Decoder::new(frame::DEFAULT_MAX_FRAME_SIZE);
    let mut hpack = loona_hpack::Decoder::new();
    hpack.set_max_allowed_table_size(4096);
    let split = data.first().map_or(0, |&b| b as usize % (data.len() + 1));
    for chunk in [&data[..split], &data[split..]] {
        frames.push(chunk);
        loop {
            match frames.next_frame() {
                Ok(Some(
                    Frame::Headers { fragment, .. } | Frame::Continuation { fragment, .. },
                )) => {
                    let _ = hpack.decode(&fragment);
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(frames.buffered() <= frame::HEADER_LEN + frame::DEFAULT_MAX_FRAME_SIZE as usize);
    }
});
