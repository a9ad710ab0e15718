//! apiserver-proxy-sidecar against the real kernel and the real iptables
//! binaries, each test in its own throw-away network namespace (root only;
//! `make test` runs as root in CI).

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{ChildGuard, poll, run, run_ok, unique};

const SIDECAR: &str = env!("CARGO_BIN_EXE_apiserver-proxy-sidecar");
const DEADLINE: Duration = Duration::from_secs(10);

/// A network namespace deleted on drop, even when the test fails.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Self {
        let name = unique("apxt");
        run_ok("ip", &["netns", "add", &name]);
        Netns { name }
    }

    /// Runs a command inside the namespace.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    fn run_ok(&self, program: &str, args: &[&str]) -> String {
        let out = self.run(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?} in {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A sidecar command line to run in this namespace.
    fn sidecar(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, SIDECAR]).args(args);
        cmd
    }

    /// Runs the sidecar to completion (one pass or a usage error).
    fn sidecar_once(&self, args: &[&str]) -> Output {
        self.sidecar(args).output().expect("run sidecar")
    }

    /// Starts the sidecar in the background; stderr goes to a log file so
    /// the test can watch its progress.
    fn start(&self, args: &[&str]) -> Daemon {
        let log = std::env::temp_dir().join(format!("{}.log", self.name));
        let file = fs::File::create(&log).expect("create log file");
        let child = ChildGuard::spawn(self.sidecar(args).stdout(Stdio::null()).stderr(file));
        Daemon { child, log }
    }

    /// `ip -o addr show` lines (address and scope only) for one link.
    fn addresses(&self, link: &str) -> Vec<String> {
        self.run_ok("ip", &["-o", "addr", "show", "dev", link])
            .lines()
            .map(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                // "1: lo    inet 10.0.0.1/32 scope global lo ..."
                format!("{} {} scope {}", words[2], words[3], words[5])
            })
            .collect()
    }

    fn has_address(&self, link: &str, cidr: &str) -> bool {
        self.addresses(link)
            .iter()
            .any(|a| a.split(' ').nth(1) == Some(cidr))
    }

    /// One table as `iptables-save` prints it, without comments and counters.
    fn saved(&self, binary: &str, table: &str) -> Vec<String> {
        self.run_ok(&format!("{binary}-save"), &["-t", table])
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match l.split_once(" [") {
                Some((chain, _)) if l.starts_with(':') => chain.to_string(),
                _ => l.to_string(),
            })
            .collect()
    }

    /// The rules (`-A` lines) of one table.
    fn rules(&self, binary: &str, table: &str) -> Vec<String> {
        self.saved(binary, table)
            .into_iter()
            .filter(|l| l.starts_with("-A "))
            .collect()
    }

    /// Everything the sidecar may touch, for before/after comparisons.
    fn snapshot(&self) -> Vec<String> {
        let mut all = Vec::new();
        for binary in ["iptables", "ip6tables"] {
            for table in ["raw", "filter"] {
                all.push(format!("== {binary} {table}"));
                all.extend(self.saved(binary, table));
            }
        }
        all.push("== addresses".into());
        all.extend(self.run_ok("ip", &["-o", "addr"]).lines().map(|l| {
            // Drop the lifetimes, which count down.
            l.split("valid_lft").next().unwrap_or(l).trim().to_string()
        }));
        all
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
        let _ = fs::remove_file(std::env::temp_dir().join(format!("{}.log", self.name)));
    }
}

struct Daemon {
    child: ChildGuard,
    log: PathBuf,
}

impl Daemon {
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` at least `count` times.
    fn wait_for_log(&mut self, needle: &str, count: usize) {
        poll(
            &format!("{count}x {needle:?} in the sidecar log"),
            DEADLINE,
            || {
                assert!(
                    self.child.is_running(),
                    "sidecar exited early:\n{}",
                    self.log()
                );
                (self.log().matches(needle).count() >= count).then_some(())
            },
        );
    }

    /// SIGTERM, then the exit status and log.
    fn terminate(&mut self) -> (Output, String) {
        self.child.signal("TERM");
        let out = self.child.wait_output(DEADLINE);
        (out, self.log())
    }
}

fn expected_rules(ip: &str, prefix: u8, port: u16) -> (Vec<String>, Vec<String>) {
    let raw = vec![
        format!("-A PREROUTING -d {ip}/{prefix} -p tcp -m tcp --dport {port} -j NOTRACK"),
        // Prepended one by one, like upstream: the later OUTPUT rule comes first.
        format!("-A OUTPUT -s {ip}/{prefix} -p tcp -m tcp --sport {port} -j NOTRACK"),
        format!("-A OUTPUT -d {ip}/{prefix} -p tcp -m tcp --dport {port} -j NOTRACK"),
    ];
    let filter = vec![
        format!("-A INPUT -d {ip}/{prefix} -p tcp -m tcp --dport {port} -j ACCEPT"),
        format!("-A OUTPUT -s {ip}/{prefix} -p tcp -m tcp --sport {port} -j ACCEPT"),
    ];
    (raw, filter)
}

fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "sidecar failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this kernel can create dummy links (probed in a scratch namespace).
fn kernel_has_dummy() -> bool {
    let ns = Netns::new();
    ns.run("ip", &["link", "add", "probe0", "type", "dummy"])
        .status
        .success()
}

#[test]
fn pins_both_addresses_on_lo_ipv4_and_ipv6() {
    for (proxy, service, proxy_cidr, service_cidr) in [
        ("10.96.0.2", "10.96.0.1", "10.96.0.2/32", "10.96.0.1/32"),
        (
            "fd00:10::2",
            "fd00:10::1",
            "fd00:10::2/128",
            "fd00:10::1/128",
        ),
    ] {
        let ns = Netns::new();
        let out = ns.sidecar_once(&[
            &format!("--ip-address={proxy}"),
            &format!("--kubernetes-service-ip-address={service}"),
            "--daemon=false",
        ]);
        assert_success(&out);
        let addresses = ns.addresses("lo");
        for cidr in [proxy_cidr, service_cidr] {
            let scope_global = format!("{cidr} scope global");
            assert!(
                addresses.iter().any(|a| a.ends_with(&scope_global)),
                "{cidr}: {addresses:?}"
            );
        }
        // lo is brought up so the addresses are usable.
        assert!(ns.run_ok("ip", &["link", "show", "lo"]).contains(",UP"));
    }
}

#[test]
fn pins_both_addresses_on_a_pre_created_interface() {
    let ns = Netns::new();
    // A bridge: a real non-loopback link that every kernel here can create.
    ns.run_ok("ip", &["link", "add", "apx0", "type", "bridge"]);
    let out = ns.sidecar_once(&[
        "--ip-address=192.168.77.2",
        "--kubernetes-service-ip-address=fd00:77::1",
        "--interface=apx0",
        "--daemon=false",
    ]);
    assert_success(&out);
    assert!(ns.has_address("apx0", "192.168.77.2/32"));
    assert!(ns.has_address("apx0", "fd00:77::1/128"));
    assert!(!ns.has_address("lo", "192.168.77.2/32"));
    assert!(ns.run_ok("ip", &["link", "show", "apx0"]).contains(",UP"));
}

#[test]
fn the_five_rules_exactly_for_ipv4_and_ipv6_with_a_custom_port() {
    for (ip, prefix, binary, other) in [
        ("10.96.0.2", 32, "iptables", "ip6tables"),
        ("fd00::2", 128, "ip6tables", "iptables"),
    ] {
        let ns = Netns::new();
        let out = ns.sidecar_once(&[
            &format!("--ip-address={ip}"),
            "--kubernetes-service-ip-address=10.96.0.1",
            "--port=6443",
            "--setup-iptables",
            "--daemon=false",
        ]);
        assert_success(&out);
        let (raw, filter) = expected_rules(ip, prefix, 6443);
        assert_eq!(ns.rules(binary, "raw"), raw, "{binary} raw");
        assert_eq!(ns.rules(binary, "filter"), filter, "{binary} filter");
        // No rules for the other family, none for the service IP.
        assert!(ns.rules(other, "raw").is_empty());
        assert!(ns.rules(other, "filter").is_empty());
    }
}

#[test]
fn repeated_runs_and_sync_ticks_never_duplicate() {
    let ns = Netns::new();
    let args = [
        "--ip-address=10.96.0.2",
        "--kubernetes-service-ip-address=fd00::1",
        "--setup-iptables",
        "--port=443",
    ];
    let once: Vec<&str> = args.iter().copied().chain(["--daemon=false"]).collect();
    assert_success(&ns.sidecar_once(&once));
    let before = ns.snapshot();
    assert_success(&ns.sidecar_once(&once));
    assert_eq!(ns.snapshot(), before, "a second run changed something");

    let daemon_args: Vec<&str> = args
        .iter()
        .copied()
        .chain(["--sync-interval=20ms", "-v", "2"])
        .collect();
    let mut daemon = ns.start(&daemon_args);
    daemon.wait_for_log("full check passed", 10);
    assert_eq!(ns.snapshot(), before, "sync ticks changed something");
    let (out, log) = daemon.terminate();
    assert!(out.status.success(), "{log}");
    assert!(
        !log.contains("added"),
        "nothing should have been added: {log}"
    );
}

#[test]
fn a_deleted_address_comes_back_within_a_second() {
    let ns = Netns::new();
    // A long interval: only the netlink event can bring it back in time.
    let mut daemon = ns.start(&[
        "--ip-address=10.96.0.2",
        "--kubernetes-service-ip-address=fd00::1",
        "--sync-interval=1h",
    ]);
    poll("the address", DEADLINE, || {
        ns.has_address("lo", "10.96.0.2/32").then_some(())
    });
    for (cidr, repeat) in [("10.96.0.2/32", 0), ("fd00::1/128", 0), ("10.96.0.2/32", 1)] {
        ns.run_ok("ip", &["addr", "del", cidr, "dev", "lo"]);
        poll(
            &format!("{cidr} to come back (round {repeat})"),
            Duration::from_secs(1),
            || ns.has_address("lo", cidr).then_some(()),
        );
    }
    // lo set down: raised again.
    ns.run_ok("ip", &["link", "set", "lo", "down"]);
    poll("lo to come back up", Duration::from_secs(1), || {
        ns.run_ok("ip", &["link", "show", "lo"])
            .contains(",UP")
            .then_some(())
    });
    poll(
        "addresses after lo went down",
        Duration::from_secs(1),
        || ns.has_address("lo", "10.96.0.2/32").then_some(()),
    );
    assert!(daemon.child.is_running());
}

#[test]
fn sigterm_with_cleanup_removes_only_what_it_added() {
    for (ip, cidr, binary) in [
        ("10.96.0.2", "10.96.0.2/32", "iptables"),
        ("fd00::2", "fd00::2/128", "ip6tables"),
    ] {
        let ns = Netns::new();
        // Pre-existing: an address the sidecar also wants, and an unrelated rule.
        ns.run_ok("ip", &["link", "set", "lo", "up"]);
        ns.run_ok("ip", &["addr", "add", "10.96.0.1/32", "dev", "lo"]);
        ns.run_ok(
            binary,
            &[
                "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT",
            ],
        );
        let unrelated = ns.rules(binary, "filter");
        let mut daemon = ns.start(&[
            &format!("--ip-address={ip}"),
            "--kubernetes-service-ip-address=10.96.0.1",
            "--setup-iptables",
            "--cleanup",
        ]);
        poll("rules installed", DEADLINE, || {
            (ns.rules(binary, "filter").len() == 3).then_some(())
        });
        assert!(ns.has_address("lo", cidr));
        let (out, log) = daemon.terminate();
        assert!(out.status.success(), "exit {:?}: {log}", out.status);
        assert!(!ns.has_address("lo", cidr), "our address stayed: {log}");
        assert!(
            ns.has_address("lo", "10.96.0.1/32"),
            "the pre-existing address was removed"
        );
        assert!(ns.has_address("lo", "127.0.0.1/8"));
        assert_eq!(ns.rules(binary, "filter"), unrelated);
        assert!(ns.rules(binary, "raw").is_empty());
        assert!(
            ns.run_ok("ip", &["link", "show", "lo"])
                .contains("LOOPBACK"),
            "lo must stay"
        );
    }
}

#[test]
fn sigterm_without_cleanup_leaves_everything() {
    let ns = Netns::new();
    let mut daemon = ns.start(&["--ip-address=10.96.0.2", "--setup-iptables"]);
    poll("rules installed", DEADLINE, || {
        (ns.rules("iptables", "filter").len() == 2).then_some(())
    });
    let (out, _) = daemon.terminate();
    assert!(out.status.success());
    assert!(ns.has_address("lo", "10.96.0.2/32"));
    assert_eq!(ns.rules("iptables", "filter").len(), 2);
}

#[test]
fn one_pass_exit_codes() {
    let ns = Netns::new();
    assert_success(&ns.sidecar_once(&["--ip-address=10.96.0.2", "--daemon=false"]));
    // A real kernel refusal: IPv6 disabled in this namespace.
    ns.run_ok("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    ns.run_ok("sysctl", &["-qw", "net.ipv6.conf.lo.disable_ipv6=1"]);
    let out = ns.sidecar_once(&["--ip-address=fd00::2", "--daemon=false"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("adding fd00::2/128"),
        "unclear error: {stderr}"
    );
}

#[test]
fn bad_input_exits_2_with_one_clear_line() {
    let ns = Netns::new();
    let cases: &[(&[&str], &str)] = &[
        (&[], "--ip-address is required"),
        (&["--ip-address=10.96.0"], "not an IP address"),
        (&["--ip-address=::ffff:10.96.0.2"], "IPv4-mapped"),
        (&["--ip-address=fe80::1%lo"], "zoned"),
        (
            &["--ip-address=10.96.0.2", "--sync-interval=0s"],
            "greater than zero",
        ),
        (
            &["--ip-address=10.96.0.2", "--sync-interval=-5s"],
            "negative",
        ),
        (
            &[
                "--ip-address=10.96.0.2",
                "--interface=averyveryverylongname",
            ],
            "at most 15 bytes",
        ),
        (&["--ip-address=10.96.0.2", "--port=http"], "1 to 65535"),
        (
            &["--ip-address=10.96.0.2", "--no-such-flag"],
            "unknown flag",
        ),
    ];
    for (args, message) in cases {
        let out = ns.sidecar_once(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.lines().next().unwrap_or("").contains(message),
            "{args:?}: {stderr}"
        );
    }
    // --setup-iptables without iptables in PATH.
    let out = Command::new(SIDECAR)
        .args([
            "--ip-address=10.96.0.2",
            "--setup-iptables",
            "--daemon=false",
        ])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs the iptables binary"));
}

#[test]
fn missing_interface_becomes_a_dummy_link_or_a_clear_error() {
    let ns = Netns::new();
    let args = [
        "--ip-address=10.96.0.2",
        "--interface=apxdummy",
        "--daemon=false",
    ];
    if kernel_has_dummy() {
        assert_success(&ns.sidecar_once(&args));
        let link = ns.run_ok("ip", &["-d", "link", "show", "apxdummy"]);
        assert!(link.contains("dummy") && link.contains(",UP"), "{link}");
        assert!(ns.has_address("apxdummy", "10.96.0.2/32"));
        // With --cleanup the link it created goes away on SIGTERM.
        ns.run_ok("ip", &["link", "del", "apxdummy"]);
        let mut daemon = ns.start(&[
            "--ip-address=10.96.0.2",
            "--interface=apxdummy",
            "--cleanup",
        ]);
        poll("the dummy link", DEADLINE, || {
            ns.has_address("apxdummy", "10.96.0.2/32").then_some(())
        });
        let (out, log) = daemon.terminate();
        assert!(out.status.success(), "{log}");
        assert!(
            !ns.run("ip", &["link", "show", "apxdummy"]).status.success(),
            "link stayed"
        );
    } else {
        let out = ns.sidecar_once(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("cannot create dummy links"), "{stderr}");
        assert!(!ns.run("ip", &["link", "show", "apxdummy"]).status.success());
    }
}

#[test]
fn health_port_reports_the_last_successful_check() {
    let ns = Netns::new();
    let port = 18000 + (std::process::id() % 1000) as u16;
    let mut daemon = ns.start(&["--ip-address=10.96.0.2", &format!("--health-port={port}")]);
    let body = poll("/healthz to answer 200", DEADLINE, || {
        let out = ns.run(
            "curl",
            &[
                "-s",
                "-w",
                " %{http_code}",
                &format!("http://127.0.0.1:{port}/healthz"),
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.ends_with(" 200").then_some(text)
    });
    assert!(body.starts_with("ok: last successful check"), "{body}");
    let out = ns.run(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://127.0.0.1:{port}/other"),
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    let (out, log) = daemon.terminate();
    assert!(out.status.success(), "{log}");
}

// --- churn (issue 7): other writers and the xtables lock -------------------------

/// Starts the sidecar with extra environment variables (PATH, XTABLES_LOCKFILE).
fn start_with_env(ns: &Netns, args: &[&str], env: &[(&str, String)]) -> Daemon {
    let log = std::env::temp_dir().join(format!("{}.log", ns.name));
    let file = fs::File::create(&log).expect("create log file");
    let mut cmd = ns.sidecar(args);
    for (key, value) in env {
        cmd.env(key, value);
    }
    let child = ChildGuard::spawn(cmd.stdout(Stdio::null()).stderr(file));
    Daemon { child, log }
}

/// The rules of both tables, sorted (re-inserted rules may come back in
/// another order), with duplicates kept so that they show.
fn sorted_rules(ns: &Netns, binary: &str) -> Vec<String> {
    let mut rules = ns.rules(binary, "raw");
    rules.extend(ns.rules(binary, "filter"));
    rules.sort();
    rules
}

fn sorted_expected(ip: &str, prefix: u8, port: u16) -> Vec<String> {
    let (mut raw, filter) = expected_rules(ip, prefix, port);
    raw.extend(filter);
    raw.sort();
    raw
}

/// The `-D` command lines that delete the expected rules: (table, args).
fn deletions(ip: &str, prefix: u8, port: u16) -> Vec<(&'static str, Vec<String>)> {
    let (raw, filter) = expected_rules(ip, prefix, port);
    let table = |t: &'static str, rules: Vec<String>| {
        rules.into_iter().map(move |r| {
            let args = r
                .replacen("-A ", "-D ", 1)
                .split_whitespace()
                .map(String::from)
                .collect();
            (t, args)
        })
    };
    table("raw", raw).chain(table("filter", filter)).collect()
}

/// Fails if any line of `rules` appears twice.
fn assert_no_duplicates(rules: &[String], when: &str) {
    let mut seen = std::collections::HashSet::new();
    for rule in rules {
        assert!(
            seen.insert(rule),
            "{when}: duplicate rule {rule:?} in {rules:#?}"
        );
    }
}

/// 50 rounds of another process deleting the sidecar's address and every
/// one of its rules while it runs (iptables and ip6tables, the nft backend
/// here): it repairs them, never holds a rule twice (checked after every
/// round, and at the end), and never exits.
#[test]
fn churn_deleting_addresses_and_rules_50_times() {
    for (ip, prefix, binary) in [
        ("10.96.0.2", 32u8, "iptables"),
        ("fd00::2", 128, "ip6tables"),
    ] {
        let ns = Netns::new();
        let cidr = format!("{ip}/{prefix}");
        let expected = sorted_expected(ip, prefix, 443);
        let mut daemon = ns.start(&[
            &format!("--ip-address={ip}"),
            "--setup-iptables",
            "--port=443",
            "--sync-interval=100ms",
            "-v",
            "2",
        ]);
        poll("the rules", DEADLINE, || {
            (sorted_rules(&ns, binary) == expected).then_some(())
        });
        let deletes = deletions(ip, prefix, 443);
        let mut deleted_rules = 0;
        for round in 0..50 {
            if ns
                .run("ip", &["addr", "del", &cidr, "dev", "lo"])
                .status
                .success()
            {
                // Counted below through the log's repairs.
            }
            for (table, args) in &deletes {
                let mut full = vec!["-w", "10", "-t", table];
                full.extend(args.iter().map(String::as_str));
                if ns.run(binary, &full).status.success() {
                    deleted_rules += 1;
                }
            }
            assert_no_duplicates(&sorted_rules(&ns, binary), &format!("round {round}"));
            assert!(
                daemon.child.is_running(),
                "the sidecar exited:\n{}",
                daemon.log()
            );
        }
        // Converges: exactly the five rules (once each) and the address.
        poll("the rules after the churn", DEADLINE, || {
            (sorted_rules(&ns, binary) == expected).then_some(())
        });
        poll("the address after the churn", DEADLINE, || {
            ns.has_address("lo", &cidr).then_some(())
        });
        // Several full checks later, still exactly that.
        let passes = daemon.log().matches("full check passed").count();
        daemon.wait_for_log("full check passed", passes + 3);
        assert_eq!(sorted_rules(&ns, binary), expected);
        let (out, log) = daemon.terminate();
        assert!(out.status.success(), "{log}");
        assert!(
            deleted_rules >= 5,
            "the churn never deleted a rule ({deleted_rules})"
        );
        let reinserted = log.matches("inserted").count();
        eprintln!("{binary}: {deleted_rules} rules deleted, {reinserted} inserted by the sidecar");
        assert!(reinserted > 5, "no repairs seen:\n{log}");
    }
}

/// A directory whose `iptables`/`ip6tables` (and `-save`) are the legacy
/// (x_tables) variants, which take the xtables lock; nft ones do not.
fn legacy_path(dir: &std::path::Path) -> String {
    for name in ["iptables", "ip6tables", "iptables-save", "ip6tables-save"] {
        let legacy = match name.split_once('-') {
            Some((bin, rest)) => format!("/usr/sbin/{bin}-legacy-{rest}"),
            None => format!("/usr/sbin/{name}-legacy"),
        };
        std::os::unix::fs::symlink(&legacy, dir.join(name)).unwrap();
    }
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// The xtables lock held by another process (this test, on a private lock
/// file through XTABLES_LOCKFILE, so that the machine-wide
/// /run/xtables.lock and other tests are untouched): the sidecar's rules
/// wait for it, a hold longer than iptables' `-w 10` fails a pass, which is
/// retried; the sidecar never exits and ends with each rule exactly once.
#[test]
fn the_xtables_lock_held_by_another_process() {
    if !std::path::Path::new("/usr/sbin/iptables-legacy").exists() {
        eprintln!("skipped: no iptables-legacy (nft iptables takes no lock)");
        return;
    }
    let ns = Netns::new();
    let dir = std::env::temp_dir().join(unique("xtlock-"));
    fs::create_dir_all(&dir).unwrap();
    struct RemoveDir(PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = RemoveDir(dir.clone());
    let lockfile = dir.join("xtables.lock");
    let env = [
        ("PATH", legacy_path(&dir)),
        ("XTABLES_LOCKFILE", lockfile.display().to_string()),
    ];
    let legacy = "iptables-legacy";
    let expected = sorted_expected("10.96.0.2", 32, 443);
    let lock = || {
        let file = fs::File::create(&lockfile).unwrap();
        file.lock().expect("flock the private xtables lock");
        file
    };

    // 1. Held from before the start: the address comes (netlink), the
    //    rules wait for the lock and come right after it is released.
    let held = lock();
    let mut daemon = start_with_env(
        &ns,
        &[
            "--ip-address=10.96.0.2",
            "--setup-iptables",
            "--port=443",
            "--sync-interval=500ms",
            "-v",
            "2",
        ],
        &env,
    );
    poll("the address", DEADLINE, || {
        ns.has_address("lo", "10.96.0.2/32").then_some(())
    });
    // The stimulus: another process keeps the lock for a few seconds.
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            sorted_rules(&ns, legacy).is_empty(),
            "a rule went in while the lock was held"
        );
    }
    assert!(daemon.child.is_running(), "{}", daemon.log());
    drop(held);
    poll("the rules once the lock is free", DEADLINE, || {
        (sorted_rules(&ns, legacy) == expected).then_some(())
    });
    // Not through the nft tables.
    assert!(sorted_rules(&ns, "iptables-nft").is_empty());

    // 2. A rule deleted, then the lock held for longer than `-w 10`: the
    //    pass fails (logged), the sidecar stays, and repairs afterwards.
    ns.run_ok(
        legacy,
        &[
            "-t",
            "filter",
            "-D",
            "INPUT",
            "-d",
            "10.96.0.2/32",
            "-p",
            "tcp",
            "-m",
            "tcp",
            "--dport",
            "443",
            "-j",
            "ACCEPT",
        ],
    );
    let failed_before = daemon.log().matches("reconcile failed").count();
    let held = lock();
    poll(
        "a pass failing on the lock",
        Duration::from_secs(30),
        || {
            assert!(daemon.child.is_running(), "{}", daemon.log());
            (daemon.log().matches("reconcile failed").count() > failed_before).then_some(())
        },
    );
    // Nothing went in while the lock was held.
    assert_eq!(sorted_rules(&ns, legacy).len(), expected.len() - 1);
    // A pass is waiting for the lock again (the retry): an address deleted
    // meanwhile still comes back at once, not after the wait.
    // (`ip netns exec` execs the sidecar: its children are its iptables.)
    let sidecar_pid = daemon.child.pid().to_string();
    let waiting = || {
        let out = run("pgrep", &["-P", &sidecar_pid, "iptables"]);
        out.status.success().then_some(())
    };
    for round in 0..3 {
        poll("an iptables call waiting for the lock", DEADLINE, waiting);
        ns.run_ok("ip", &["addr", "del", "10.96.0.2/32", "dev", "lo"]);
        poll(
            &format!("the address back while the lock is held (round {round})"),
            Duration::from_secs(1),
            || ns.has_address("lo", "10.96.0.2/32").then_some(()),
        );
    }
    drop(held);
    poll(
        "the rule back after the lock",
        Duration::from_secs(30),
        || (sorted_rules(&ns, legacy) == expected).then_some(()),
    );
    let passes = daemon.log().matches("full check passed").count();
    daemon.wait_for_log("full check passed", passes + 3);
    assert_eq!(sorted_rules(&ns, legacy), expected);
    assert_no_duplicates(&sorted_rules(&ns, legacy), "the end");
    let (out, log) = daemon.terminate();
    assert!(out.status.success(), "{log}");
}
