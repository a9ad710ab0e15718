//! `http-test-server`: upstream's sample destination. Listens on
//! 127.0.0.1:`--server-port` (default 8000) and answers `/success` (a small
//! HTML page), `/sleep?time=N` (the page after N seconds, default 10),
//! `/error` (500) and `/close` (closes the connection without an answer).
//!
//! Owns: only its own tiny HTTP/1.1 loop (the `/close` behaviour needs the
//! raw socket); connection threads come from [`crate::tunnel::listen`].

use std::ffi::OsString;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use lexopt::Parser;

use super::listen::{Conn, Listener, Listeners};
use crate::cli::{self, Command, LogFlags, UsageError};
use crate::shutdown::Shutdown;

pub const SUCCESS_PAGE: &str = "<!DOCTYPE html>\n<html>\n    <head>\n        <title>Success</title>\n    </head>\n    <body>\n        <p>The success test page!</p>\n    </body>\n</html>";

const MAX_HEAD: usize = 16 * 1024;
const MAX_SLEEP_SECS: u64 = 3600;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub port: u16,
    pub bind: String,
    pub log: LogFlags,
}

pub const HELP: &str = "\
http-test-server: a sample destination for tunnel tests.

Usage: http-test-server [flags]

      --server-port PORT   port to listen on, at 127.0.0.1 (default 8000; 0: any free port)
      --bind-address ADDR  address to listen on (default \"127.0.0.1\")
  -h, --help               print this help

Paths: /success, /sleep?time=SECONDS (default 10), /error (500), /close (no answer).
";

pub fn parse(args: Vec<OsString>) -> Result<Command<Config>, UsageError> {
    let mut p = Parser::from_args(args);
    let mut config = Config {
        port: 8000,
        bind: "127.0.0.1".into(),
        log: LogFlags::default(),
    };
    while let Some(next) = cli::next_long(&mut p, &mut config.log)? {
        let cli::Next::Long(n) = next else {
            return Ok(Command::Help);
        };
        match n.as_str() {
            "server-port" => config.port = cli::parsed_value(&mut p, &n, |s| s.parse::<u16>())?,
            "bind-address" => config.bind = cli::string_value(&mut p, &n)?,
            _ => return Err(cli::unknown_flag(&n)),
        }
    }
    Ok(Command::Run(config))
}

/// The answer for a request target, or None for `/close`.
pub fn answer(target: &str) -> Option<(u16, String)> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match path {
        "/success" => Some((200, SUCCESS_PAGE.to_string())),
        "/sleep" => {
            let secs = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("time="))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(10)
                .min(MAX_SLEEP_SECS);
            std::thread::sleep(Duration::from_secs(secs));
            Some((200, SUCCESS_PAGE.to_string()))
        }
        "/error" => Some((500, "Internal Server Error\n".to_string())),
        "/close" => None,
        _ => Some((404, "404 page not found\n".to_string())),
    }
}

fn serve(conn: Conn) {
    let Conn::Tcp(sock) = conn else { return };
    let mut sock = &*sock;
    let _ = sock.set_read_timeout(Some(Duration::from_secs(60)));
    let _ = sock.set_write_timeout(Some(Duration::from_secs(30)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // One request head (bodies are not expected and are ignored).
        let (target, keep_alive, used) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let close = req.headers.iter().any(|h| {
                        h.name.eq_ignore_ascii_case("connection")
                            && h.value.eq_ignore_ascii_case(b"close")
                    }) || req.version == Some(0);
                    break (req.path.unwrap_or("/").to_string(), !close, n);
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                _ => return,
            }
            match sock.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        buf.drain(..used);
        let Some((status, body)) = answer(&target) else {
            return;
        };
        let reason = crate::http::reason_phrase(status);
        let head = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n{}\r\n",
            body.len(),
            if keep_alive {
                ""
            } else {
                "Connection: close\r\n"
            }
        );
        if sock
            .write_all(head.as_bytes())
            .and_then(|()| sock.write_all(body.as_bytes()))
            .is_err()
            || !keep_alive
        {
            return;
        }
    }
}

/// Serves until shutdown.
pub fn run(config: &Config, shutdown: &Shutdown) -> Result<(), String> {
    let listener = Listener::tcp(&config.bind, config.port)
        .map_err(|e| format!("listening on {}:{}: {e}", config.bind, config.port))?;
    log::info!("http-test-server listening on {}", listener.describe());
    let mut listeners = Listeners::new(1024, shutdown);
    listeners
        .spawn(
            "test-server",
            listener,
            Arc::new(|conn, _held| serve(conn)),
            Arc::new(|| {}),
        )
        .map_err(|e| e.to_string())?;
    while !shutdown.wait_timeout(Duration::from_secs(3600)) {}
    listeners.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(answer("/success").unwrap().0, 200);
        assert_eq!(
            answer("/sleep?time=0").unwrap(),
            (200, SUCCESS_PAGE.to_string())
        );
        assert_eq!(answer("/error").unwrap().0, 500);
        assert_eq!(answer("/close"), None);
        assert_eq!(answer("/other").unwrap().0, 404);
    }
}
