//! The load tool of `make bench` (bench/bench.py drives it): one client for
//! us and for the baselines (direct TCP, socat, squid), so every figure in
//! bench/RESULTS.md is measured the same way. Reports, asserts nothing.
//!
//! ```sh
//! cargo build --release --example bench_load
//! bench_load sink                      # prints its port; serves the transfer protocol below
//! bench_load send --via direct --target 127.0.0.1:PORT --conns 16 --bytes 134217728
//! bench_load send --via connect-uds --proxy /tmp/k.sock --target 127.0.0.1:PORT --download
//! bench_load send --via connect-tls --proxy 127.0.0.1:8090 --ca CA --cert CRT --key KEY ...
//! bench_load grpc --proxy /tmp/k.sock --target 127.0.0.1:PORT --bytes 1073741824
//! bench_load latency --via connect-tcp --proxy 127.0.0.1:3128 --target 127.0.0.1:PORT --n 1000
//! bench_load grpc-latency --proxy /tmp/k.sock --target 127.0.0.1:PORT --n 1000
//! bench_load sink --hold              # accepts and holds connections (idle tunnels' far ends)
//! bench_load idle --via connect-uds --proxy /tmp/k.sock --target 127.0.0.1:PORT --n 10000 --pids SERVER_PID,AGENT_PID
//! bench_load idle --via grpc --proxy /tmp/k.sock --target 127.0.0.1:PORT --n 1000 --pids SERVER_PID,AGENT_PID
//! ```
//!
//! Transfer protocol (so that every relay, with or without half-close, is
//! timed to the last byte): the client sends a 16-byte head, the bytes it
//! uploads (u64, big-endian) and the bytes it wants downloaded, then the
//! upload; the sink reads the upload, answers one byte, then sends the
//! download. A transfer ends when the client has that byte (and the
//! download). Each subcommand prints one JSON line on stdout.
//!
//! `--via`: `direct` (TCP to the target), `connect-tcp` (HTTP CONNECT over
//! plain TCP: squid, socat does not speak CONNECT so it is `direct` to
//! socat's port), `connect-uds` (HTTP CONNECT over a Unix socket),
//! `connect-tls` (HTTP CONNECT over mTLS TCP).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use apiserver_proxy::grpc;
use apiserver_proxy::h2::conn::{Config as H2Config, Connection};
use apiserver_proxy::h2::transport::{TlsSetup, Transport};
use apiserver_proxy::tunnel::message::Message;
use apiserver_proxy::tunnel::proto::Packet;
use prost::Message as _;

const CHUNK: usize = 256 * 1024;
/// DATA packet size on the gRPC path: kube-apiserver copies with 32 KiB buffers.
const GRPC_CHUNK: usize = 32 * 1024;
const TIMEOUT: Duration = Duration::from_secs(120);

type Args = HashMap<String, String>;

fn main() {
    let mut argv = std::env::args().skip(1);
    let cmd = argv.next().unwrap_or_default();
    let mut args = Args::new();
    let rest: Vec<String> = argv.collect();
    let mut i = 0;
    while i < rest.len() {
        let a = rest[i].trim_start_matches("--");
        if let Some((k, v)) = a.split_once('=') {
            args.insert(k.into(), v.into());
        } else if i + 1 < rest.len() && !rest[i + 1].starts_with("--") {
            args.insert(a.into(), rest[i + 1].clone());
            i += 1;
        } else {
            args.insert(a.into(), String::new());
        }
        i += 1;
    }
    let result = match cmd.as_str() {
        "sink" => sink(&args),
        "send" => send(&args),
        "grpc" => grpc_send(&args),
        "latency" => latency(&args),
        "grpc-latency" => grpc_latency(&args),
        "idle" => idle(&args),
        _ => Err(format!(
            "usage: bench_load sink|send|grpc|latency|idle [--flag value]... (got {cmd:?})"
        )),
    };
    if let Err(e) = result {
        eprintln!("bench_load {cmd}: {e}");
        std::process::exit(1);
    }
}

fn arg<'a>(args: &'a Args, name: &str) -> Result<&'a str, String> {
    args.get(name)
        .map(String::as_str)
        .ok_or_else(|| format!("--{name} is required"))
}

fn num(args: &Args, name: &str, default: u64) -> Result<u64, String> {
    match args.get(name) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|e| format!("--{name} {v:?}: {e}")),
    }
}

fn err(context: &str) -> impl Fn(io::Error) -> String + '_ {
    move |e| format!("{context}: {e}")
}

// --- the sink (destination) ---------------------------------------------------------

/// Accepts on 127.0.0.1 (port 0 unless `--port`), prints the port, and
/// serves the transfer protocol, one thread per connection, forever.
fn sink(args: &Args) -> Result<(), String> {
    let port = num(args, "port", 0)?;
    let listener = TcpListener::bind(("127.0.0.1", port as u16)).map_err(err("bind"))?;
    println!("{}", listener.local_addr().map_err(err("addr"))?.port());
    io::stdout().flush().map_err(err("stdout"))?;
    if args.contains_key("hold") {
        // Idle tunnels' far ends: held, no thread each.
        let held: Vec<TcpStream> = listener.incoming().flatten().collect();
        drop(held);
        return Ok(());
    }
    for sock in listener.incoming() {
        let Ok(sock) = sock else { continue };
        let _ = std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || {
                let _ = serve_sink(sock);
            });
    }
    Ok(())
}

fn serve_sink(mut sock: TcpStream) -> io::Result<()> {
    sock.set_read_timeout(Some(TIMEOUT))?;
    sock.set_write_timeout(Some(TIMEOUT))?;
    sock.set_nodelay(true)?;
    let mut head = [0u8; 16];
    sock.read_exact(&mut head)?;
    let up = u64::from_be_bytes(head[..8].try_into().expect("8 bytes"));
    let down = u64::from_be_bytes(head[8..].try_into().expect("8 bytes"));
    let mut buf = vec![0u8; CHUNK];
    let mut left = up;
    while left > 0 {
        let n = sock.read(&mut buf[..CHUNK.min(left as usize)])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        left -= n as u64;
    }
    sock.write_all(b"k")?;
    write_zeros(&mut sock, down, &buf)?;
    // Hold the connection until the client closes it.
    while sock.read(&mut buf)? > 0 {}
    Ok(())
}

fn write_zeros(w: &mut impl Write, mut left: u64, buf: &[u8]) -> io::Result<()> {
    while left > 0 {
        let n = buf.len().min(left as usize);
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    w.flush()
}

fn head(up: u64, down: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&up.to_be_bytes());
    h[8..].copy_from_slice(&down.to_be_bytes());
    h
}

// --- streams to the target --------------------------------------------------------

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

struct Dialer {
    via: String,
    proxy: String,
    target: String,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Dialer {
    fn new(args: &Args) -> Result<Dialer, String> {
        let via = arg(args, "via")?.to_string();
        let tls = if via == "connect-tls" {
            let identity = (
                std::path::Path::new(arg(args, "cert")?),
                std::path::Path::new(arg(args, "key")?),
            );
            Some(
                apiserver_proxy::tls::client_config(
                    std::path::Path::new(arg(args, "ca")?),
                    Some(identity),
                    vec![b"http/1.1".to_vec()],
                )
                .map_err(|e| e.to_string())?,
            )
        } else {
            None
        };
        Ok(Dialer {
            proxy: args.get("proxy").cloned().unwrap_or_default(),
            target: arg(args, "target")?.to_string(),
            via,
            tls,
        })
    }

    /// A connection to the proxy (or the target when direct), handshaken.
    fn connect(&self) -> Result<Box<dyn Stream>, String> {
        let tcp = |addr: &str| -> Result<TcpStream, String> {
            let s = TcpStream::connect(addr).map_err(err(addr))?;
            s.set_nodelay(true).map_err(err("nodelay"))?;
            s.set_read_timeout(Some(TIMEOUT)).map_err(err("timeout"))?;
            s.set_write_timeout(Some(TIMEOUT)).map_err(err("timeout"))?;
            Ok(s)
        };
        Ok(match self.via.as_str() {
            "direct" => Box::new(tcp(&self.target)?),
            "connect-tcp" => Box::new(tcp(&self.proxy)?),
            "connect-uds" => {
                let s = UnixStream::connect(&self.proxy).map_err(err(&self.proxy))?;
                s.set_read_timeout(Some(TIMEOUT)).map_err(err("timeout"))?;
                s.set_write_timeout(Some(TIMEOUT)).map_err(err("timeout"))?;
                Box::new(s)
            }
            "connect-tls" => {
                let mut sock = tcp(&self.proxy)?;
                let host = self.proxy.rsplit_once(':').map_or("", |(h, _)| h);
                let name = rustls::pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| e.to_string())?;
                let cfg = self.tls.clone().expect("connect-tls has a config");
                let mut conn =
                    rustls::ClientConnection::new(cfg, name).map_err(|e| e.to_string())?;
                while conn.is_handshaking() {
                    conn.complete_io(&mut sock).map_err(err("TLS handshake"))?;
                }
                Box::new(rustls::StreamOwned::new(conn, sock))
            }
            other => return Err(format!("unknown --via {other:?}")),
        })
    }

    fn is_connect(&self) -> bool {
        self.via != "direct"
    }

    fn connect_request(&self) -> Vec<u8> {
        format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n\r\n", t = self.target).into_bytes()
    }

    /// A stream to the target: through a CONNECT tunnel unless direct.
    fn open(&self) -> Result<Box<dyn Stream>, String> {
        let mut s = self.connect()?;
        if self.is_connect() {
            s.write_all(&self.connect_request())
                .and_then(|()| s.flush())
                .map_err(err("CONNECT"))?;
            read_answer(&mut s, None)?;
        }
        Ok(s)
    }
}

/// Reads a CONNECT answer's head byte by byte (no tunnel byte consumed);
/// `first` is set when its first byte arrived. Fails unless it is a 200.
fn read_answer(s: &mut dyn Stream, mut first: Option<&mut Instant>) -> Result<(), String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 || s.read(&mut byte).map_err(err("CONNECT answer"))? == 0 {
            return Err(format!(
                "CONNECT answer: {:?}",
                String::from_utf8_lossy(&head)
            ));
        }
        if let Some(t) = first.take() {
            *t = Instant::now();
        }
        head.push(byte[0]);
    }
    if head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200") {
        Ok(())
    } else {
        Err(format!(
            "CONNECT refused: {:?}",
            String::from_utf8_lossy(&head)
        ))
    }
}

// --- send: throughput of N connections --------------------------------------------

/// `--conns N --bytes B [--download] [--stalled K]`: opens N streams, then
/// moves B bytes on each at once (client to target, or target to client
/// with `--download`); prints the total bytes and the seconds from the
/// start to the last stream's end. `--stalled K` first opens K more
/// streams that ask for a download and never read.
fn send(args: &Args) -> Result<(), String> {
    let dialer = Dialer::new(args)?;
    let conns = num(args, "conns", 1)? as usize;
    let bytes = num(args, "bytes", 1 << 30)?;
    let download = args.contains_key("download");
    let mut stalled = Vec::new();
    for _ in 0..num(args, "stalled", 0)? {
        let mut s = dialer.open()?;
        s.write_all(&head(0, 1 << 40))
            .and_then(|()| s.flush())
            .map_err(err("stalled head"))?;
        stalled.push(s);
    }
    if !stalled.is_empty() {
        // Let the stalled streams fill every buffer on their path.
        std::thread::sleep(Duration::from_millis(num(args, "stall-ms", 500)?));
    }
    let streams = (0..conns)
        .map(|_| dialer.open())
        .collect::<Result<Vec<_>, _>>()?;
    let barrier = Arc::new(Barrier::new(conns + 1));
    let workers: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            let barrier = barrier.clone();
            std::thread::spawn(move || -> Result<Instant, String> {
                let buf = vec![0u8; CHUNK];
                barrier.wait();
                let (up, down) = if download { (0, bytes) } else { (bytes, 0) };
                s.write_all(&head(up, down)).map_err(err("head"))?;
                write_zeros(&mut s, up, &buf).map_err(err("upload"))?;
                read_n(&mut s, 1 + down)?;
                Ok(Instant::now())
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut end = start;
    for w in workers {
        end = end.max(w.join().map_err(|_| "worker panicked")??);
    }
    drop(stalled);
    let secs = (end - start).as_secs_f64();
    println!(
        "{{\"bytes\": {}, \"secs\": {secs:.6}}}",
        bytes * conns as u64
    );
    Ok(())
}

fn read_n(s: &mut dyn Stream, mut left: u64) -> Result<(), String> {
    let mut buf = vec![0u8; CHUNK];
    while left > 0 {
        let n = s
            .read(&mut buf[..CHUNK.min(left as usize)])
            .map_err(err("reading"))?;
        if n == 0 {
            return Err(format!("EOF with {left} bytes to go"));
        }
        left -= n as u64;
    }
    Ok(())
}

// --- grpc: one Proxy stream through the gRPC frontend ---------------------------------

/// `--proxy PATH|HOST:PORT --target ADDR --bytes B` (mTLS over TCP with
/// `--ca --cert --key`): DIAL_REQ, then the transfer protocol in 32 KiB
/// DATA packets; times the transfer from the first DATA to the answer byte.
/// A `ProxyService/Proxy` call on a new HTTP/2 connection to `--proxy`
/// (a Unix socket path, or HOST:PORT with mTLS from `--ca --cert --key`).
fn grpc_call(args: &Args) -> Result<(grpc::Client, grpc::ClientCall), String> {
    let proxy = arg(args, "proxy")?;
    let h2 = H2Config::default();
    let some = Some(TIMEOUT);
    let transport = if proxy.starts_with('/') {
        let sock = UnixStream::connect(proxy).map_err(err(proxy))?;
        Transport::plain(sock, some, some)
    } else {
        let cfg = apiserver_proxy::tls::client_config(
            std::path::Path::new(arg(args, "ca")?),
            Some((
                std::path::Path::new(arg(args, "cert")?),
                std::path::Path::new(arg(args, "key")?),
            )),
            vec![b"h2".to_vec()],
        )
        .map_err(|e| e.to_string())?;
        let host = proxy.rsplit_once(':').map_or("", |(h, _)| h);
        let name =
            rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
        let conn = TlsSetup::Client(cfg, name);
        let sock = TcpStream::connect(proxy).map_err(err(proxy))?;
        sock.set_nodelay(true).map_err(err("nodelay"))?;
        Transport::tls(sock, conn, some, some)
    }
    .map_err(|e| e.to_string())?;
    let conn = Connection::client(transport, h2).map_err(|e| e.to_string())?;
    let client = grpc::Client::new(conn, "localhost");
    let call = client
        .call("/ProxyService/Proxy", &[])
        .map_err(|s| format!("{s:?}"))?;
    Ok((client, call))
}

fn grpc_recv(call: &grpc::ClientCall) -> Result<Message, String> {
    let bytes = call
        .recv()
        .map_err(|s| format!("{s:?}"))?
        .ok_or("stream ended")?;
    let packet = Packet::decode(bytes.as_slice()).map_err(|e| e.to_string())?;
    Message::try_from(packet).map_err(|e| format!("{e:?}"))
}

/// DIAL_REQ for `target` on `call`; the connection id of its DIAL_RSP.
fn grpc_dial(call: &grpc::ClientCall, target: &str, random: i64) -> Result<i64, String> {
    let request = Packet::dial_request("tcp", target, random).encode_to_vec();
    call.send(&request).map_err(|s| format!("{s:?}"))?;
    match grpc_recv(call)? {
        Message::DialRsp {
            error, connect_id, ..
        } if error.is_empty() => Ok(connect_id),
        other => Err(format!("dial: {other:?}")),
    }
}

fn grpc_send(args: &Args) -> Result<(), String> {
    let target = arg(args, "target")?;
    let bytes = num(args, "bytes", 1 << 30)?;
    let (_client, call) = grpc_call(args)?;
    let send = |p: Packet| call.send(&p.encode_to_vec()).map_err(|s| format!("{s:?}"));
    let recv = || grpc_recv(&call);
    let id = grpc_dial(&call, target, 42)?;
    let start = Instant::now();
    send(Packet::data(id, head(bytes, 0).to_vec()))?;
    // Encoded once and sent again and again, as the direct sender writes
    // one buffer of zeros: what is timed is the proxy, not this encoder.
    let full = Packet::data(id, vec![0u8; GRPC_CHUNK]).encode_to_vec();
    let mut left = bytes;
    while left > 0 {
        let n = GRPC_CHUNK.min(left as usize);
        if n == GRPC_CHUNK {
            call.send(&full).map_err(|s| format!("{s:?}"))?;
        } else {
            send(Packet::data(id, vec![0u8; n]))?;
        }
        left -= n as u64;
    }
    loop {
        match recv()? {
            Message::Data { data, .. } if !data.is_empty() => break,
            Message::Data { .. } => {}
            other => return Err(format!("expected the answer byte, got {}", other.kind())),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = send(Packet::close_request(id));
    let _ = call.close_send();
    println!("{{\"bytes\": {bytes}, \"secs\": {secs:.6}}}");
    Ok(())
}

// --- grpc-latency: DIAL_REQ to DIAL_RSP ------------------------------------------------

/// `--proxy P --target ADDR --n N`: N sequential dials through the gRPC
/// frontend, each on a new connection as kube-apiserver opens one (not
/// timed), timed from sending DIAL_REQ to receiving the DIAL_RSP; each
/// tunnel is closed (CLOSE_REQ, CLOSE_RSP) before the next.
fn grpc_latency(args: &Args) -> Result<(), String> {
    let target = arg(args, "target")?;
    let n = num(args, "n", 1000)?.max(1) as usize;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let (_client, call) = grpc_call(args)?;
        let start = Instant::now();
        let id = grpc_dial(&call, target, i as i64 + 1)?;
        samples.push(start.elapsed());
        call.send(&Packet::close_request(id).encode_to_vec())
            .map_err(|s| format!("{s:?}"))?;
        while !matches!(grpc_recv(&call)?, Message::CloseRsp { .. }) {}
    }
    print_latency(samples);
    Ok(())
}

// --- latency: CONNECT to the first answer byte ------------------------------------------

/// `--via connect-* --n N`: N sequential tunnels; each is timed from
/// writing CONNECT (after any TLS handshake) to the answer's first byte.
fn latency(args: &Args) -> Result<(), String> {
    let dialer = Dialer::new(args)?;
    let n = num(args, "n", 1000)?.max(1) as usize;
    let mut samples = Vec::with_capacity(n);
    let request = dialer.connect_request();
    for _ in 0..n {
        let mut s = dialer.connect()?;
        let start = Instant::now();
        let mut first = start;
        s.write_all(&request)
            .and_then(|()| s.flush())
            .map_err(err("CONNECT"))?;
        read_answer(&mut s, Some(&mut first))?;
        samples.push(first - start);
    }
    print_latency(samples);
    Ok(())
}

/// One JSON line: the count, median and p99 of `samples` (not empty).
fn print_latency(mut samples: Vec<Duration>) {
    samples.sort();
    let n = samples.len();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{{\"n\": {n}, \"median_us\": {:.1}, \"p99_us\": {:.1}}}",
        us(samples[n / 2]),
        us(samples[(n * 99 / 100).min(n - 1)])
    );
}

// --- idle: N tunnels held open ------------------------------------------------------

/// `--via connect-* --proxy P --target ADDR --n N --pids A,B`: N idle
/// CONNECT tunnels to ADDR (a `sink --hold`); prints each pid's RSS,
/// threads and descriptors before and with the tunnels open.
fn idle(args: &Args) -> Result<(), String> {
    // `--via grpc`: each tunnel a Proxy call on its own HTTP/2 connection.
    let grpc = arg(args, "via")? == "grpc";
    let dialer = if grpc { None } else { Some(Dialer::new(args)?) };
    let n = num(args, "n", 10_000)? as usize;
    let pids: Vec<u32> = arg(args, "pids")?
        .split(',')
        .map(|p| p.parse().map_err(|e| format!("pid {p:?}: {e}")))
        .collect::<Result<_, _>>()?;
    let settle = Duration::from_millis(num(args, "settle-ms", 2000)?);
    std::thread::sleep(settle);
    let before: Vec<_> = pids.iter().map(|&p| status(p)).collect::<Result<_, _>>()?;
    let start = Instant::now();
    let mut clients = Vec::with_capacity(n);
    let mut calls = Vec::new();
    for i in 0..n {
        let mut tunnel = || -> Result<(), String> {
            match &dialer {
                Some(dialer) => clients.push(dialer.open()?),
                None => {
                    let (client, call) = grpc_call(args)?;
                    grpc_dial(&call, arg(args, "target")?, i as i64 + 1)?;
                    calls.push((client, call));
                }
            }
            Ok(())
        };
        tunnel().map_err(|e| format!("tunnel {i}: {e}"))?;
    }
    let opened = start.elapsed().as_secs_f64();
    std::thread::sleep(settle);
    let after: Vec<_> = pids.iter().map(|&p| status(p)).collect::<Result<_, _>>()?;
    let procs: Vec<String> = pids
        .iter()
        .zip(before.iter().zip(&after))
        .map(|(pid, (b, a))| {
            format!(
                "{{\"pid\": {pid}, \"rss_kib_before\": {}, \"rss_kib\": {}, \"threads_before\": {}, \"threads\": {}, \"fds_before\": {}, \"fds\": {}}}",
                b.0, a.0, b.1, a.1, b.2, a.2
            )
        })
        .collect();
    println!(
        "{{\"tunnels\": {n}, \"open_secs\": {opened:.3}, \"procs\": [{}]}}",
        procs.join(", ")
    );
    drop(clients);
    drop(calls);
    Ok(())
}

/// VmRSS (KiB), Threads and open descriptors of a process.
fn status(pid: u32) -> Result<(u64, u64, usize), String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(err("status"))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or(format!("no {name} for pid {pid}"))
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(err("fd"))?
        .count();
    Ok((field("VmRSS:")?, field("Threads:")?, fds))
}
