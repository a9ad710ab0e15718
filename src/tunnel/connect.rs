//! The HTTP CONNECT frontend's request parser and responses (pure).
//!
//! Owns: what `--mode=http-connect` accepts (`CONNECT host:port HTTP/1.x`,
//! a bounded head) and the exact bytes it answers with. kube-apiserver
//! requires that the success line is followed by nothing but tunnel bytes.
//! Must not: touch sockets; the frontend feeds it the bytes read so far.

use std::fmt;

/// The largest request head accepted; beyond it the answer is 431.
pub const MAX_HEAD: usize = 16 * 1024;
/// The most header lines accepted.
const MAX_HEADERS: usize = 64;

/// The one success answer.
pub const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection Established\r\n\r\n";

/// A parsed CONNECT request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The target, "host:port" as sent (the request's authority).
    pub address: String,
    /// Bytes of the request head; anything after them is tunnel data the
    /// client sent early.
    pub head_len: usize,
}

/// A request the frontend refuses, with its HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status, self.reason)
    }
}

fn refuse(status: u16, reason: impl Into<String>) -> Refusal {
    Refusal {
        status,
        reason: reason.into(),
    }
}

/// Parses the bytes received so far. `Ok(None)`: the head is incomplete,
/// read more (the caller enforces the header timeout).
pub fn parse(buf: &[u8]) -> Result<Option<ConnectRequest>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= MAX_HEAD {
                Err(refuse(431, "request header too large"))
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(refuse(431, "too many header lines")),
        Err(e) => return Err(refuse(400, format!("malformed request: {e}"))),
    };
    if head_len > MAX_HEAD {
        return Err(refuse(431, "request header too large"));
    }
    let method = request.method.unwrap_or_default();
    if method != "CONNECT" {
        return Err(refuse(
            405,
            format!("method {method} is not allowed; use CONNECT"),
        ));
    }
    let target = request.path.unwrap_or_default();
    validate_authority(target)
        .map_err(|why| refuse(400, format!("bad CONNECT target {target:?}: {why}")))?;
    Ok(Some(ConnectRequest {
        address: target.to_string(),
        head_len,
    }))
}

/// "host:port" with a non-empty host and a port from 1 to 65535; IPv6
/// hosts in brackets.
fn validate_authority(target: &str) -> Result<(), &'static str> {
    let (host, port) = if let Some(rest) = target.strip_prefix('[') {
        let (host, port) = rest.split_once("]:").ok_or("expected [ipv6]:port")?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err("not an IPv6 address in brackets");
        }
        (host, port)
    } else {
        target.rsplit_once(':').ok_or("expected host:port")?
    };
    if host.is_empty() || host.contains(['/', '@', ' ']) {
        return Err("bad host");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err("bad port"),
    }
}

/// The answer for a refusal or a failed dial: status line, a plain-text
/// body with the reason, and `Connection: close`.
pub fn error_response(status: u16, body: &str) -> Vec<u8> {
    let phrase = crate::http::reason_phrase(status);
    let body = format!("{body}\n");
    let mut out = format!(
        "HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status == 405 {
        out.push_str("Allow: CONNECT\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&body);
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_connect_and_keeps_early_bytes() {
        let buf = b"CONNECT 10.0.0.1:10250 HTTP/1.1\r\nHost: 10.0.0.1:10250\r\nUser-Agent: x\r\n\r\nEARLY";
        let req = parse(buf).unwrap().unwrap();
        assert_eq!(req.address, "10.0.0.1:10250");
        assert_eq!(&buf[req.head_len..], b"EARLY");
        let v6 = parse(b"CONNECT [fd00::1]:443 HTTP/1.0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(v6.address, "[fd00::1]:443");
    }

    #[test]
    fn incomplete_heads_wait_for_more() {
        assert_eq!(parse(b"CONNECT 10.0.0.1:1 HTTP/1.1\r\nHost"), Ok(None));
        assert_eq!(parse(b""), Ok(None));
    }

    #[test]
    fn refusals_have_the_right_status() {
        let status = |buf: &[u8]| parse(buf).unwrap_err().status;
        assert_eq!(status(b"GET / HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(status(b"POST http://x/ HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(status(b"CONNECT nohost HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"CONNECT x:0 HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"CONNECT x:99999 HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"CONNECT :80 HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"CONNECT [zz]:80 HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"\x00\x01garbage\r\n\r\n"), 400);
        let mut huge = b"CONNECT x:1 HTTP/1.1\r\nX: ".to_vec();
        huge.resize(MAX_HEAD + 10, b'a');
        assert_eq!(status(&huge), 431);
        let mut many = b"CONNECT x:1 HTTP/1.1\r\n".to_vec();
        for i in 0..100 {
            many.extend_from_slice(format!("H{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(status(&many), 431);
    }

    #[test]
    fn responses_are_exact() {
        assert_eq!(ESTABLISHED, b"HTTP/1.1 200 Connection Established\r\n\r\n");
        let text = String::from_utf8(error_response(
            502,
            "dial tcp 10.0.0.1:1: connection refused",
        ))
        .unwrap();
        assert!(text.starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
        assert!(text.contains("Content-Length: 40\r\n"));
        assert!(text.ends_with("\r\n\r\ndial tcp 10.0.0.1:1: connection refused\n"));
        assert!(
            String::from_utf8(error_response(405, "no"))
                .unwrap()
                .contains("Allow: CONNECT")
        );
    }
}
