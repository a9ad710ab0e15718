//! Arbitrary bytes through the tunnel packet decoder. Whatever decodes must
//! re-encode to something that decodes to the same packet.
#![no_main]

use apiserver_proxy::tunnel::proto::Packet;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(packet) = Packet::decode(data) {
        let again =
            Packet::decode(packet.encode_to_vec().as_slice()).expect("our own encoding decodes");
        assert_eq!(again, packet);
    }
});
