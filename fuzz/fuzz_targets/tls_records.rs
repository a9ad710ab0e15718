//! The TLS record reader after a real handshake with a rustls client:
//! valid records (with a key update, a close_notify) then arbitrary bytes.
//! The reader must return exactly the records' bytes, then end; nothing
//! forged passes as data and nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    apiserver_proxy::h2::fuzzing::tls_records(data);
});
