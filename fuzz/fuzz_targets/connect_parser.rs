//! Arbitrary bytes through the HTTP CONNECT request parser
//! (`tunnel::connect::parse`), whole and as the frontend sees them: the
//! bytes read so far, growing.
//!
//! Checks: an accepted request's head is within the input and the limit,
//! ends the head, parses alone to the same request, and its address is a
//! valid authority that round-trips through a fresh request; an incomplete
//! head stays incomplete for every shorter prefix; extra bytes after a
//! complete head never change the answer; every refusal has a 4xx status
//! and our error answer for it is a well-formed HTTP response.
#![no_main]

use apiserver_proxy::tunnel::connect::{self, ConnectRequest, MAX_HEAD, Refusal};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let result = connect::parse(data);
    // The frontend parses each growing buffer; a prefix that is already
    // complete or refused decides, so check a few prefixes agree.
    if let Some(&b) = data.first() {
        let cut = usize::from(b) * data.len() / 256;
        check_prefix(&data[..cut], &result);
        check_prefix(&data[..data.len() / 2], &result);
    }
    match &result {
        Ok(Some(request)) => accepted(data, request),
        Ok(None) => assert!(data.len() < MAX_HEAD, "an incomplete head past the limit"),
        Err(refusal) => refused(refusal),
    }
});

/// A shorter prefix of the same bytes: incomplete, or the same answer
/// (a complete head does not change when more bytes follow it).
fn check_prefix(prefix: &[u8], whole: &Result<Option<ConnectRequest>, Refusal>) {
    match connect::parse(prefix) {
        Ok(None) => {}
        Ok(Some(request)) => assert_eq!(whole, &Ok(Some(request)), "a complete head changed"),
        Err(refusal) => {
            // Refused early: the whole may only be refused too (status may
            // differ only through the size limit, which grows with input).
            assert!(whole.is_err(), "prefix refused ({refusal}), whole accepted");
        }
    }
}

fn accepted(data: &[u8], request: &ConnectRequest) {
    let head = &data[..request.head_len];
    assert!(request.head_len <= data.len() && request.head_len <= MAX_HEAD);
    assert!(head.ends_with(b"\n"), "the head ends with its blank line");
    assert_eq!(
        connect::parse(head),
        Ok(Some(request.clone())),
        "the head alone parses the same"
    );
    let mut more = head.to_vec();
    more.extend_from_slice(b"\x00\xffGET / HTTP/1.1\r\n\r\n");
    assert_eq!(connect::parse(&more), Ok(Some(request.clone())));

    // The address: host:port, a port the agent can dial, no spaces or
    // controls, and it survives being sent again.
    let address = &request.address;
    assert!(
        !address.bytes().any(|b| b <= b' ' || b == 0x7f),
        "{address:?}"
    );
    let (host, port) = address.rsplit_once(':').expect("host:port");
    assert!(!host.is_empty());
    let port: u16 = port.parse().expect("a numeric port");
    assert!(port > 0);
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']').expect("closing bracket");
        inner
            .parse::<std::net::Ipv6Addr>()
            .expect("bracketed hosts are IPv6 addresses");
    }
    let again = format!("CONNECT {address} HTTP/1.1\r\nHost: {address}\r\n\r\n");
    let reparsed = connect::parse(again.as_bytes())
        .expect("accepted again")
        .expect("complete");
    assert_eq!(&reparsed.address, address);
    assert_eq!(reparsed.head_len, again.len());
}

fn refused(refusal: &Refusal) {
    assert!(
        matches!(refusal.status, 400 | 405 | 431),
        "unexpected status {refusal}"
    );
    // The answer we send for it: one status line, our headers only (no
    // field injected from the request), Content-Length matching the body.
    let answer = connect::error_response(refusal.status, &refusal.reason);
    let mut headers = [httparse::EMPTY_HEADER; 8];
    let mut response = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(head)) = response.parse(&answer) else {
        panic!(
            "our error answer does not parse: {:?}",
            String::from_utf8_lossy(&answer)
        );
    };
    assert_eq!(response.code, Some(refusal.status));
    let expected = if refusal.status == 405 { 4 } else { 3 };
    assert_eq!(response.headers.len(), expected, "headers injected");
    let length = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| {
            std::str::from_utf8(h.value)
                .unwrap()
                .parse::<usize>()
                .unwrap()
        })
        .expect("a Content-Length");
    assert_eq!(length, answer.len() - head);
}
