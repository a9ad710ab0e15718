//! Each static release binary runs in an empty root: a directory holding
//! only the binary, as in a `FROM scratch` image.
//!
//! Beyond `--help`, each one does its real work there, laid out as
//! Dockerfile.scratch lays out the image (`/<binary>` and the `/entrypoint`
//! symlink, plus the certificate files a Secret or host directory would
//! mount) and with the privileges examples/kubernetes gives it: the webhook,
//! the agent and the test server as uid 65532 with no capability, the
//! proxy-server as uid 0 with no capability, the sidecar as uid 0 with only
//! CAP_NET_ADMIN; always with no_new_privs (allowPrivilegeEscalation: false).
//! Clients (curl, a Unix-socket CONNECT) run outside the root.

mod common;

use std::ffi::CString;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{ChildGuard, poll, run, run_ok, unique};

const DEADLINE: Duration = Duration::from_secs(20);
/// The image's default user (Dockerfile.scratch `USER 65532:65532`).
const NONROOT: u32 = 65532;
/// CAP_NET_ADMIN (linux/capability.h).
const CAP_NET_ADMIN: u64 = 12;

/// Every binary the crate ships. Keep in step with src/bin and the Makefile.
const BINARIES: &[&str] = &[
    "apiserver-proxy-sidecar",
    "apiserver-proxy-pod-webhook",
    "proxy-server",
    "proxy-agent",
    "proxy-test-client",
    "http-test-server",
];

fn empty_root_with(binary: &Path) -> tempdir::Root {
    let root = tempdir::Root::new();
    fs::copy(binary, root.path().join("bin")).expect("copy binary into the empty root");
    root
}

#[test]
fn every_binary_is_static_and_prints_help_in_an_empty_root() {
    let dir = common::release_dir();
    for name in BINARIES {
        let binary = dir.join(name);
        assert!(binary.is_file(), "{} is missing", binary.display());
        let described = common::run_ok("file", &[binary.to_str().unwrap()]);
        assert!(
            described.contains("statically linked"),
            "{name} is not static: {described}"
        );
        let root = empty_root_with(&binary);
        let out = common::run("chroot", &[root.path().to_str().unwrap(), "/bin", "--help"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name} --help failed in an empty root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("Usage:"),
            "{name} --help printed no usage: {stdout}"
        );
    }
}

/// The image layout `ImageRoot` copies is the one Dockerfile.scratch builds:
/// `/<BIN>`, `/entrypoint` -> `<BIN>`, user 65532, and every binary allowed.
#[test]
fn image_root_matches_the_dockerfile() {
    let dockerfile =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile.scratch"))
            .expect("Dockerfile.scratch");
    for line in [
        r#"cp "target/x86_64-unknown-linux-musl/release/$BIN" "/out/$BIN""#,
        r#"ln -s "$BIN" /out/entrypoint"#,
        "FROM scratch",
        "COPY --from=build /out/ /",
        r#"ENTRYPOINT ["/entrypoint"]"#,
    ] {
        assert!(
            dockerfile.contains(line),
            "Dockerfile.scratch lacks {line:?}"
        );
    }
    let allowed = format!(r#"case " {} " in"#, BINARIES.join(" "));
    assert!(
        dockerfile.contains(&allowed),
        "Dockerfile.scratch lacks {allowed:?}"
    );
    let user = format!("USER {NONROOT}:{NONROOT}");
    assert!(
        dockerfile.contains(&user),
        "Dockerfile.scratch lacks {user:?}"
    );
}

/// An empty root laid out like the image: `/<binary>`, `/entrypoint` -> it.
/// Removed on drop.
struct ImageRoot {
    root: tempdir::Root,
}

impl ImageRoot {
    fn new(binary: &str) -> Self {
        let root = tempdir::Root::new();
        let from = common::release_dir().join(binary);
        fs::copy(&from, root.path().join(binary))
            .unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
        symlink(binary, root.path().join("entrypoint")).expect("entrypoint symlink");
        ImageRoot { root }
    }

    fn path(&self) -> &Path {
        self.root.path()
    }

    /// Copies `from` to `to` (a path inside the root), owned by `owner`
    /// (uid, gid) with `mode`, as a mounted Secret or host file would be.
    fn add_file(&self, from: &Path, to: &str, owner: (u32, u32), mode: u32) {
        let dest = self.path().join(to.trim_start_matches('/'));
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        fs::copy(from, &dest).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
        std::os::unix::fs::chown(&dest, Some(owner.0), Some(owner.1)).unwrap();
        fs::set_permissions(&dest, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// `/entrypoint args...` inside this root, as `uid` (gid the same), with
    /// only the capabilities in `keep` (a bit mask), no_new_privs set, and,
    /// when given, in the network namespace `netns` (an open
    /// /run/netns/NAME).
    fn command(&self, args: &[String], uid: u32, keep: u64, netns: Option<&fs::File>) -> Command {
        let root = CString::new(self.path().as_os_str().as_bytes()).unwrap();
        let netns = netns.map(std::os::fd::AsRawFd::as_raw_fd);
        let mut cmd = Command::new("/entrypoint");
        cmd.args(args);
        // SAFETY: the closure runs between fork and exec and makes only
        // async-signal-safe system calls on memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || enter(&root, uid, keep, netns));
        }
        cmd
    }
}

/// In the child: joins `netns`, chroots, narrows the capability bounding
/// set to `keep`, changes to `uid`, and sets no_new_privs. Root's
/// capabilities after exec are its bounding set (the inheritable set is
/// empty here); a non-root user's are none.
fn enter(root: &CString, uid: u32, keep: u64, netns: Option<i32>) -> std::io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: plain system calls with valid pointers (root outlives the call).
    unsafe {
        if let Some(fd) = netns {
            check(libc::setns(fd, libc::CLONE_NEWNET))?;
        }
        check(libc::chroot(root.as_ptr()))?;
        check(libc::chdir(c"/".as_ptr()))?;
        for cap in 0..64u64 {
            if keep & (1 << cap) == 0
                && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
                && *libc::__errno_location() != libc::EINVAL
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        if uid != 0 {
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setgid(uid))?;
            check(libc::setuid(uid))?;
        }
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
    }
}

/// A running process whose stderr is collected (for the ports it logs).
struct Proc {
    child: ChildGuard,
    log: Arc<Mutex<String>>,
}

impl Proc {
    fn start(mut cmd: Command) -> Self {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = ChildGuard::spawn(&mut cmd);
        let stderr = child.child.as_mut().unwrap().stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Proc { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits for a log line containing `needle` and returns the word after it.
    fn after(&mut self, needle: &str) -> String {
        poll(&format!("{needle:?} in the log"), DEADLINE, || {
            assert!(self.child.is_running(), "exited early:\n{}", self.log());
            let log = self.log();
            let line = log.lines().find(|l| l.contains(needle))?;
            Some(
                line.split(needle)
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .to_string(),
            )
        })
    }

    /// Waits for "<what> listening on HOST:PORT" and returns PORT.
    fn port(&mut self, what: &str) -> u16 {
        let addr = self.after(&format!("{what} listening on "));
        let port = addr
            .trim_end_matches(['/', ')'])
            .rsplit(':')
            .next()
            .unwrap();
        port.parse()
            .unwrap_or_else(|_| panic!("no port in {addr:?}"))
    }

    /// Capability sets (effective) of the running process.
    fn effective_capabilities(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    }

    fn uid(&self) -> u32 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    }

    /// SIGTERM, then the exit status must be 0.
    fn stop(mut self) {
        self.child.signal("TERM");
        let out = self.child.wait_output(DEADLINE);
        assert!(
            out.status.success(),
            "exit {:?}:\n{}",
            out.status,
            self.log()
        );
    }
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

#[test]
fn webhook_serves_a_review_in_an_empty_root_as_nonroot() {
    let root = ImageRoot::new("apiserver-proxy-pod-webhook");
    // A Secret mounted with defaultMode 0440 and fsGroup 65532.
    for (from, to) in [("server.crt", "tls.crt"), ("server.key", "tls.key")] {
        root.add_file(&data(from), &format!("/certs/{to}"), (0, NONROOT), 0o440);
    }
    let args = strings(&[
        "--apiserver-fqdn=foo.bar.",
        "--cert-dir=/certs",
        "--host=127.0.0.1",
        "--port=0",
    ]);
    let mut webhook = Proc::start(root.command(&args, NONROOT, 0, None));
    let url = webhook.after("listening on ");
    let port = url.rsplit(':').next().unwrap();
    assert_eq!(webhook.uid(), NONROOT);
    assert_eq!(webhook.effective_capabilities(), 0);
    let review = data("admission.json");
    let out = run_ok(
        "curl",
        &[
            "-sk",
            "--max-time",
            "10",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &format!("@{}", review.display()),
            &format!("https://127.0.0.1:{port}/webhook/pod-apiserver-env"),
        ],
    );
    let answer: serde_json::Value = serde_json::from_str(&out).expect("a JSON review");
    assert_eq!(answer["response"]["allowed"], true, "{out}");
    let patch = run_ok(
        "sh",
        &[
            "-c",
            &format!(
                "printf %s '{}' | base64 -d",
                answer["response"]["patch"].as_str().expect("a patch")
            ),
        ],
    );
    let patch: serde_json::Value = serde_json::from_str(&patch).unwrap();
    let expected = serde_json::json!([
        {"op": "add", "path": "/spec/initContainers/0/env",
         "value": [{"name": "KUBERNETES_SERVICE_HOST", "value": "foo.bar."}]},
        {"op": "add", "path": "/spec/containers/0/env",
         "value": [{"name": "KUBERNETES_SERVICE_HOST", "value": "foo.bar."}]}
    ]);
    assert_eq!(patch, expected);
    webhook.stop();
}

#[test]
fn server_and_agent_tunnel_a_connect_request_each_in_an_empty_root() {
    // Certificates as upstream lays them out.
    let certs = tempdir::Root::new();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make-certs.sh");
    run_ok(script.to_str().unwrap(), &[certs.path().to_str().unwrap()]);
    let cert = |rel: &str| certs.path().join(rel);

    // The destination: the test server, itself in an empty root.
    let dest_root = ImageRoot::new("http-test-server");
    let mut dest = Proc::start(dest_root.command(&strings(&["--server-port=0"]), NONROOT, 0, None));
    let dest_port = dest.port("http-test-server");

    // The server as konnectivity-server.yaml runs it: uid 0, no capability,
    // the key root's with mode 0600, the socket in a root-owned directory.
    let server_root = ImageRoot::new("proxy-server");
    server_root.add_file(
        &cert("agent/issued/proxy-frontend.crt"),
        "/pki/server.crt",
        (0, 0),
        0o644,
    );
    server_root.add_file(
        &cert("agent/private/proxy-frontend.key"),
        "/pki/server.key",
        (0, 0),
        0o600,
    );
    server_root.add_file(
        &cert("agent/issued/ca.crt"),
        "/pki/agent-ca.crt",
        (0, 0),
        0o644,
    );
    fs::create_dir(server_root.path().join("uds")).unwrap();
    let server_args = strings(&[
        "--logtostderr=true",
        "--mode=http-connect",
        "--uds-name=/uds/konnectivity-server.socket",
        "--delete-existing-uds-file",
        "--server-port=0",
        "--agent-port=0",
        "--agent-bind-address=127.0.0.1",
        "--admin-port=0",
        "--health-port=0",
        "--health-bind-address=127.0.0.1",
        "--cluster-cert=/pki/server.crt",
        "--cluster-key=/pki/server.key",
        "--cluster-ca-cert=/pki/agent-ca.crt",
    ]);
    let mut server = Proc::start(server_root.command(&server_args, 0, 0, None));
    let agent_port = server.port("agent port");
    let health_port = server.port("health port");
    assert_eq!(server.uid(), 0);
    assert_eq!(
        server.effective_capabilities(),
        0,
        "root without capabilities"
    );

    // The agent as konnectivity-agent.yaml runs it: uid 65532, no
    // capability, its Secret with mode 0440 and group 65532.
    let agent_root = ImageRoot::new("proxy-agent");
    for (from, to) in [
        ("agent/issued/ca.crt", "ca.crt"),
        ("agent/issued/proxy-agent.crt", "tls.crt"),
        ("agent/private/proxy-agent.key", "tls.key"),
    ] {
        agent_root.add_file(&cert(from), &format!("/certs/{to}"), (0, NONROOT), 0o440);
    }
    let agent_args = vec![
        "--logtostderr=true".to_string(),
        "--proxy-server-host=127.0.0.1".into(),
        format!("--proxy-server-port={agent_port}"),
        "--ca-cert=/certs/ca.crt".into(),
        "--agent-cert=/certs/tls.crt".into(),
        "--agent-key=/certs/tls.key".into(),
        "--agent-identifiers=host=node1&ipv4=127.0.0.1".into(),
        "--health-server-host=127.0.0.1".into(),
        "--health-server-port=0".into(),
        "--admin-server-port=0".into(),
    ];
    let mut agent = Proc::start(agent_root.command(&agent_args, NONROOT, 0, None));
    agent.after("connected to server");
    assert_eq!(agent.uid(), NONROOT);
    assert_eq!(agent.effective_capabilities(), 0);

    // The server counts the agent (its /readyz turns 200), as the static
    // pod's readiness probe would see it.
    let readyz = format!("http://127.0.0.1:{health_port}/readyz");
    poll("the server's /readyz to be 200", DEADLINE, || {
        let out = run(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
                &readyz,
            ],
        );
        (out.stdout == b"200").then_some(())
    });

    // From outside: CONNECT over the socket inside the server's root.
    let socket = server_root.path().join("uds/konnectivity-server.socket");
    let mut stream = poll("the frontend socket", DEADLINE, || {
        UnixStream::connect(&socket).ok()
    });
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let target = format!("127.0.0.1:{dest_port}");
    write!(
        stream,
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n\
         GET /success HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200 Connection Established\r\n\r\nHTTP/1.1 200"),
        "{answer}\nserver:\n{}\nagent:\n{}",
        server.log(),
        agent.log()
    );
    assert!(answer.contains("The success test page!"), "{answer}");
    drop(stream);

    agent.stop();
    server.stop();
    assert!(!socket.exists(), "the server removes its socket on exit");
    dest.stop();
}

#[test]
fn sidecar_pins_an_address_in_an_empty_root_with_only_net_admin() {
    let netns = unique("apxs");
    run_ok("ip", &["netns", "add", &netns]);
    let _cleanup = NetnsGuard(netns.clone());
    let handle = fs::File::open(format!("/run/netns/{netns}")).expect("open the netns");
    let root = ImageRoot::new("apiserver-proxy-sidecar");
    let keep = 1 << CAP_NET_ADMIN;
    let has = |cidr: &str| {
        run_ok("ip", &["-n", &netns, "-o", "addr", "show", "dev", "lo"]).contains(cidr)
    };

    // The init container: one pass, exit 0.
    let once = strings(&[
        "--ip-address=10.250.0.1",
        "--kubernetes-service-ip-address=10.250.0.2",
        "--daemon=false",
    ]);
    let out = root
        .command(&once, 0, keep, Some(&handle))
        .output()
        .expect("run the sidecar");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(has("10.250.0.1/32") && has("10.250.0.2/32"));

    // Without NET_ADMIN the same pass fails (exit 1), so the capability is
    // what made it work, and nothing else.
    run_ok(
        "ip",
        &["-n", &netns, "addr", "del", "10.250.0.1/32", "dev", "lo"],
    );
    let out = root
        .command(&once, 0, 0, Some(&handle))
        .output()
        .expect("run the sidecar");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!has("10.250.0.1/32"));

    // The long-running container: answers its liveness probe once the first
    // full check passed, and repairs a deleted address.
    let daemon = strings(&[
        "--ip-address=10.250.0.1",
        "--kubernetes-service-ip-address=10.250.0.2",
        // The manifest's port; the namespace is fresh, so it is free.
        "--health-port=16911",
    ]);
    let mut sidecar = Proc::start(root.command(&daemon, 0, keep, Some(&handle)));
    let health = format!("http://127.0.0.1:{}/healthz", sidecar.port("health port"));
    poll("/healthz to answer ok", DEADLINE, || {
        let out = run(
            "ip",
            &[
                "netns",
                "exec",
                &netns,
                "curl",
                "-sf",
                "--max-time",
                "5",
                &health,
            ],
        );
        String::from_utf8_lossy(&out.stdout)
            .starts_with("ok")
            .then_some(())
    });
    assert_eq!(sidecar.effective_capabilities(), keep, "only CAP_NET_ADMIN");
    assert!(has("10.250.0.1/32"));
    run_ok(
        "ip",
        &["-n", &netns, "addr", "del", "10.250.0.2/32", "dev", "lo"],
    );
    poll("the address to come back", DEADLINE, || {
        has("10.250.0.2/32").then_some(())
    });
    sidecar.stop();
}

/// Deletes a network namespace on drop, even when the test fails.
struct NetnsGuard(String);
impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.0]);
    }
}

mod tempdir {
    use std::path::{Path, PathBuf};

    /// A temporary directory removed on drop.
    pub struct Root(PathBuf);

    impl Root {
        pub fn new() -> Self {
            let path = std::env::temp_dir().join(super::common::unique("scratch-root-"));
            std::fs::create_dir_all(&path).expect("create temp root");
            Root(path)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Root {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
