//! Arbitrary bytes after the preface into a live server connection (its
//! reader and writer threads, flow control, HPACK, stream states). Streams
//! it opens are accepted, read and answered. Protocol errors are fine;
//! panics (libfuzzer-sys aborts on any thread's panic) and hangs are not.
#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use apiserver_proxy::h2::{Config, Connection, Transport, frame};
use apiserver_proxy::shutdown::Worker;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (ours, mut peer) = UnixStream::pair().expect("socketpair");
    // Everything is written before the connection starts: it never has to
    // wait on a closed socket (no SIGPIPE under the fuzzer's main).
    let mut input = frame::PREFACE.to_vec();
    input.extend_from_slice(data);
    if input.len() > 150_000 {
        return;
    }
    peer.write_all(&input).expect("fits the socket buffer");
    peer.shutdown(Shutdown::Write).expect("half-close");
    let drain = Worker::spawn("drain", move || {
        let mut buf = [0u8; 16 * 1024];
        while matches!(peer.read(&mut buf), Ok(n) if n > 0) {}
    })
    .expect("thread");
    let timeout = Some(Duration::from_secs(5));
    let transport = Transport::plain(ours, timeout, timeout).expect("transport");
    let config = Config {
        keepalive_interval: None,
        ..Config::default()
    };
    let conn = Connection::server(transport, config).expect("connection");
    while let Some(stream) = conn.accept() {
        while let Ok(Some(Some(_))) = stream.recv_timeout(Some(Duration::ZERO)) {}
        let _ = stream.send_headers(&[(":status".into(), b"200".to_vec())], false);
        let _ = stream.send_data(b"reply", true);
    }
    drop(conn);
    drain.join();
});
