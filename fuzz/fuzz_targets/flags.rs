//! Arbitrary argument vectors through every binary's flag parser: the
//! first byte picks the binary, the rest is split on NUL into arguments
//! (any bytes, not only UTF-8), as `main` would pass them.
//!
//! Checks: no panic; an error is one non-empty line of bounded length
//! (what `main` prints before "Run '... --help'"); parsing is
//! deterministic (but for the random default ids). The parsers only look at files (existence) and, for the
//! webhook's --host, resolve names: `make fuzz` runs this target without
//! a network (unshare -n) when it can.
#![no_main]

use std::ffi::OsString;
use std::fmt::Debug;
use std::os::unix::ffi::OsStringExt;

use apiserver_proxy::cli::{Command, UsageError};
use apiserver_proxy::{sidecar, tunnel, webhook};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let args: Vec<OsString> = if rest.is_empty() {
        Vec::new()
    } else {
        rest.split(|&b| b == 0)
            .map(|a| OsString::from_vec(a.to_vec()))
            .collect()
    };
    let input_len = rest.len();
    match pick % 6 {
        0 => check(input_len, || sidecar::parse(args.clone())),
        1 => check(input_len, || webhook::parse(args.clone())),
        2 => check(input_len, || tunnel::server::parse(args.clone(), None)),
        3 => check(input_len, || {
            tunnel::server::parse(args.clone(), Some("server-from-env".into()))
        }),
        4 => check(input_len, || tunnel::agent::parse(args.clone(), None)),
        _ => {
            check(input_len, || tunnel::test_client::parse(args.clone()));
            check(input_len, || tunnel::test_server::parse(args.clone()));
        }
    }
});

fn check<T: Debug>(input_len: usize, parse: impl Fn() -> Result<Command<T>, UsageError>) {
    let first = parse();
    if let Err(err) = &first {
        let text = err.to_string();
        assert!(!text.trim().is_empty(), "an empty error");
        assert!(
            !text.contains(['\n', '\r']),
            "an error of more than one line: {text:?}"
        );
        // Values are quoted with escapes (up to 10 bytes per input byte).
        assert!(
            text.len() <= 10 * input_len + 512,
            "an error out of proportion ({} bytes for {input_len})",
            text.len()
        );
    }
    let second = parse();
    assert_eq!(
        without_uuids(&format!("{first:?}")),
        without_uuids(&format!("{second:?}")),
        "parsing is not deterministic"
    );
}

/// The server and agent ids default to random UUIDs (as upstream's do).
fn without_uuids(text: &str) -> String {
    let is_uuid = |s: &[u8]| {
        s.len() == 36
            && s.iter().enumerate().all(|(i, &b)| match i {
                8 | 13 | 18 | 23 => b == b'-',
                _ => b.is_ascii_hexdigit(),
            })
    };
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        if i + 36 <= bytes.len() && is_uuid(&bytes[i..i + 36]) {
            out.push_str("<uuid>");
            i += 36;
        } else {
            let c = text[i..].chars().next().expect("i is on a char boundary");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}
