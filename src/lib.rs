//! apiserver-proxy: small static binaries for the network path between
//! Kubernetes workloads, nodes and the kube-apiserver.
//!
//! Synchronous by design: every component is plain threads and blocking
//! sockets with timeouts. There is no async runtime, so the dependency tree
//! stays short enough to audit and the binaries stay small enough for
//! `FROM scratch` images.
//!
//! # Codemap
//!
//! - `src/bin/*.rs`: thin mains. Parse flags into a typed config, init
//!   logging, call the role's `run`, map the result to an exit code
//!   (0 ok, 1 runtime error, 2 bad usage) through [`cli::main_with`].
//! - [`cli`]: pflag-compatible parsing helpers, klog-compatible logging flags.
//! - [`sys`]: the `unsafe` system calls: signal masks, signalfd, eventfd,
//!   poll, epoll, non-blocking connect.
//! - [`alloc`]: the global allocator (dlmalloc behind a futex lock), and
//!   the static builds' `memcpy` (`rep movsb`, and a 16-byte loop at the
//!   distances where AMD's `rep movsb` is slow).
//! - [`shutdown`]: the shutdown flag, the signal watcher, join-on-drop workers.
//! - [`sidecar`]: `apiserver-proxy-sidecar`. [`sidecar::plan`] decides (pure),
//!   [`sidecar::netlink`] talks rtnetlink, [`sidecar::iptables`] runs the
//!   iptables binaries, [`sidecar::run`](mod@sidecar::run) is the reconcile loop.
//! - [`tls`]: the only TLS module: rustls configs from PEM files (ring
//!   provider), client-CA verification, certificate reload on file change.
//! - [`http`]: the shared HTTP/1.1 server (TLS or plain TCP) with its own
//!   request and response types; connections wait between requests in one
//!   epoll set, served by a pool of workers (one per core, more while
//!   some are held up by slow clients); limits and timeouts.
//! - [`metrics`]: hand-written Prometheus text exposition.
//! - [`webhook`]: `apiserver-proxy-pod-webhook`. [`webhook::review`] turns an
//!   AdmissionReview into its answer (pure), [`webhook::server`] routes and
//!   counts, [`webhook::run`] serves.
//! - [`tunnel`]: Konnectivity. Pure: [`tunnel::proto`] (packets),
//!   [`tunnel::message`] (the protocol's vocabulary), [`tunnel::router`] (the
//!   server's routing state machine), [`tunnel::agent::table`] (the agent's
//!   connection table), [`tunnel::connect`] (the HTTP CONNECT parser). I/O:
//!   [`tunnel::server`] (hub, gRPC services, CONNECT frontend and the
//!   agent streams' pumps that read its plaintext clients),
//!   [`tunnel::agent`] (streams, dials, pumps), [`tunnel::listen`] (sockets
//!   and connection threads), [`tunnel::queue`] (bounded per-tunnel queues),
//!   and the test tools [`tunnel::test_client`] and [`tunnel::test_server`].
//! - [`h2`]: synchronous HTTP/2 over any blocking byte stream.
//!   [`h2::frame`] is the pure frame codec, [`h2::transport`] splits TCP,
//!   Unix and TLS streams into one reader and one writer half (TLS:
//!   rustls's handshake, then `h2::records` frames, encrypts and decrypts
//!   records in place with rustls's AEAD, one key per half, no lock),
//!   [`h2::conn`] runs a connection on two reused threads (reader, writer,
//!   or the writer only when the accepting thread reads it: `serve_here`; a
//!   sender writes its own frames when no batch is being written, its DATA
//!   from where it lies, in one vectored write; over TLS the reader takes
//!   large DATA payloads out of the records straight into their buffers).
//! - [`grpc`]: gRPC on top of [`h2`]: message framing, metadata, status,
//!   a client (calls) and a server (handlers by `:path`, one reused thread
//!   each).
//!
//! # Invariants
//!
//! - Decision code does no I/O: the sidecar's plan, the tunnel's router,
//!   agent table and CONNECT parser are pure functions of their inputs (the
//!   caller passes clocks and random picks) and are unit-tested with literal
//!   inputs.
//! - The webhook's review is a pure function of the review JSON and the
//!   FQDN; only `http` touches its sockets, only `tls` builds TLS configs.
//! - Every buffer filled from the network is bounded (`http::Limits`), and
//!   every socket has a timeout.
//! - Only `sidecar::netlink` opens netlink sockets; only `sidecar::iptables`
//!   starts processes; `unsafe` is confined to `sys`, `alloc` and one
//!   lifetime erasure in `shutdown` (a scoped job on a pooled thread).
//! - Roles share only `cli`, `sys`, `shutdown`, `tls`, `http`, `metrics`
//!   (and the tunnel roles `h2`, `grpc` and the tunnel's shared modules);
//!   no role imports another (the proxy-server and proxy-agent share only
//!   `tunnel::{proto, message, queue, listen, identifiers}`).
//! - A thread that reads a stream carrying many tunnels never blocks on one
//!   of them: a tunnel whose bounded queue stays full is closed instead.
//! - Every thread has an owner that joins it ([`shutdown::Worker`], or a
//!   [`shutdown::WorkerSet`], whose threads wait briefly for the next job
//!   before ending: a thread start costs ~0.2 ms here; a pooled
//!   `Worker` is a job on such a thread, waited for the same way); shutdown has one path, driven by SIGTERM/SIGINT
//!   ([`shutdown::run_with_signals`]), and wakes blocked calls.
//! - Input from the network, files or the kernel never panics; an `expect`
//!   states the invariant that makes it unreachable.
//! - An HTTP/2 connection has one writer of its socket at a time (its
//!   writer, a pooled job that runs while there is something to write and
//!   is started again by one timer thread for keepalive and handshake
//!   deadlines, or a sender writing its own batch) and one reader; no
//!   lock is held across a blocking read; every receive
//!   buffer is bounded by the flow-control window we advertised, and credit
//!   goes back only as the application consumes data.
//! - The frame codec and the packet codec do no I/O.
//!
//! # Deliberately absent
//!
//! No async runtime, no OpenSSL, no iptables library (the kernel tables are
//! only touched through the `iptables`/`ip6tables` binaries, as kube-proxy
//! does), no log files (stderr only, as in containers).

pub mod alloc;
pub mod cli;
pub mod grpc;
pub mod h2;
pub mod http;
pub mod metrics;
pub mod shutdown;
pub mod sidecar;
pub mod sys;
pub mod tls;
pub mod tunnel;
pub mod webhook;

/// Every binary allocates through dlmalloc behind a futex lock (see
/// [`alloc`]).
#[global_allocator]
static ALLOCATOR: alloc::Allocator = alloc::Allocator::new();
