//! Helpers shared by the integration tests: child processes that die with
//! the test, polling with deadlines (never fixed sleeps), command runners,
//! and the static release binaries for empty-root tests.
#![allow(dead_code)]

pub mod interop;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Polls `check` every few milliseconds until it returns `Some` or the
/// deadline passes; panics with `what` on timeout.
pub fn poll<T>(what: &str, deadline: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(value) = check() {
            return value;
        }
        if Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Runs a command to completion and returns its output.
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Runs a command that must succeed and returns its stdout.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A child process killed (SIGKILL) and reaped when dropped, unless it was
/// already waited for.
pub struct ChildGuard {
    pub child: Option<Child>,
}

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> Self {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        ChildGuard { child: Some(child) }
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .expect("child present until waited")
            .id()
    }

    /// Sends a signal (by name, as `kill -s` takes it).
    pub fn signal(&self, name: &str) {
        run_ok("kill", &["-s", name, &self.pid().to_string()]);
    }

    /// Waits for the exit with a deadline and returns the output.
    pub fn wait_output(&mut self, deadline: Duration) -> Output {
        let mut child = self.child.take().expect("child present until waited");
        let end = Instant::now() + deadline;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return child.wait_with_output().expect("collect output"),
                Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(5)),
                _ => {
                    let _ = child.kill();
                    let out = child.wait_with_output().expect("collect output");
                    panic!(
                        "process did not exit within {deadline:?}; stderr: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The directory of the static musl release binaries, built by `make build`
/// (which `make test` runs first and passes here).
pub fn release_dir() -> PathBuf {
    let dir = std::env::var_os("APISERVER_PROXY_RELEASE_DIR")
        .map(PathBuf::from)
        .expect(
            "APISERVER_PROXY_RELEASE_DIR is not set: run the suite with `make test`, \
         which builds the static release binaries first",
        );
    assert!(
        dir.is_dir(),
        "{} does not exist: run `make build`",
        dir.display()
    );
    dir
}

/// A unique name for throw-away resources (namespaces, files).
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}-{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Starts `cmd` with stderr collected line by line into the returned log
/// (for the ports a binary logs at start and for failure messages). The
/// collecting thread ends when the process does.
pub fn spawn_logged(cmd: &mut Command) -> (ChildGuard, Arc<Mutex<String>>, JoinHandle<()>) {
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = ChildGuard::spawn(cmd);
    let stderr = child
        .child
        .as_mut()
        .and_then(|c| c.stderr.take())
        .expect("stderr is piped");
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    (child, log, reader)
}

/// The port of the first "<what> listening on ADDR" line in `log` (every
/// binary logs one per listener; tests start them on port 0).
pub fn logged_port(log: &str, what: &str) -> Option<u16> {
    let needle = format!("{what} listening on ");
    let line = log.lines().find(|l| l.contains(&needle))?;
    let addr = line.split(&needle).nth(1)?.split_whitespace().next()?;
    addr.rsplit(':').next()?.trim_end_matches('/').parse().ok()
}

/// One of our binaries, started with `RUST_LOG=debug`, its stderr collected
/// for the ports it logs and for failure messages.
pub struct Logged {
    pub child: ChildGuard,
    log: Arc<Mutex<String>>,
}

impl Logged {
    pub fn start(program: &str, args: &[String]) -> Self {
        let mut cmd = Command::new(program);
        cmd.args(args).env("RUST_LOG", "debug");
        let (child, log, _reader) = spawn_logged(&mut cmd);
        Logged { child, log }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits for "<what> listening on ADDR" and returns ADDR's port.
    pub fn port(&mut self, what: &str) -> u16 {
        poll(
            &format!("{what:?} listening, in the log"),
            Duration::from_secs(20),
            || {
                assert!(self.child.is_running(), "exited early:\n{}", self.log());
                logged_port(&self.log(), what)
            },
        )
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&mut self, needle: &str) {
        poll(
            &format!("{needle:?} in the log"),
            Duration::from_secs(20),
            || {
                assert!(self.child.is_running(), "exited early:\n{}", self.log());
                self.log().contains(needle).then_some(())
            },
        );
    }
}

/// Reads a response head byte by byte, up to and including the blank line
/// that ends it (so nothing after it is consumed), or to the end of stream.
#[allow(dead_code)]
pub fn read_head(sock: &mut impl std::io::Read) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match sock.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}
