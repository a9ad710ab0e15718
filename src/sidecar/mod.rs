//! `apiserver-proxy-sidecar`: pins the API server proxy's IP (and optionally
//! the Kubernetes service IP) on a local interface, optionally installs the
//! NOTRACK/ACCEPT iptables rules for it, and keeps both in place.
//!
//! Owns: the sidecar's flags and validated [`Config`]. The work is split in
//! [`plan`] (pure decisions), [`netlink`] (the kernel's links and
//! addresses), [`iptables`] (the rules, through the binaries) and [`run`](mod@run)
//! (the reconcile loop).

pub mod iptables;
pub mod netlink;
pub mod plan;
pub mod run;

use std::ffi::OsString;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use lexopt::Parser;

use crate::cli::{self, Command, LogFlags, UsageError};

pub use run::run;

/// Linux's interface name limit (IFNAMSIZ - 1).
const MAX_INTERFACE_NAME: usize = 15;

/// The validated command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The proxy's listen address (`--ip-address`).
    pub ip_address: IpAddr,
    /// The Kubernetes service address (`--kubernetes-service-ip-address`).
    pub service_ip_address: Option<IpAddr>,
    pub interface: String,
    pub port: u16,
    /// The iptables / ip6tables binaries when `--setup-iptables` is on.
    pub iptables: Option<IptablesBinaries>,
    pub cleanup: bool,
    pub daemon: bool,
    pub sync_interval: Duration,
    /// `--health-port`: serve `/healthz` on this TCP port (off when None).
    pub health_port: Option<u16>,
    pub log: LogFlags,
}

/// Where the iptables binaries were found at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptablesBinaries {
    pub v4: PathBuf,
    pub v6: PathBuf,
}

impl Config {
    /// Every address to pin, the proxy's first.
    pub fn addresses(&self) -> Vec<IpAddr> {
        let mut ips = vec![self.ip_address];
        if let Some(service) = self.service_ip_address {
            if service != self.ip_address {
                ips.push(service);
            }
        }
        ips
    }
}

pub const HELP: &str = "\
apiserver-proxy-sidecar: pins the API server proxy's IP address on a local
interface, optionally with NOTRACK/ACCEPT iptables rules, and repairs both
within milliseconds when they are removed.

Usage: apiserver-proxy-sidecar --ip-address=IP [flags]

Flags:
      --ip-address IP                       ip-address on which the proxy is listening (required)
      --kubernetes-service-ip-address IP    ip-address of the kubernetes service, pinned too (no iptables rules)
      --interface NAME                      interface to add the addresses to; created as a dummy
                                            link when missing (default \"lo\")
      --port PORT                           port on which the proxy is listening, used in the
                                            iptables rules (default \"9443\")
      --setup-iptables[=BOOL]               install the NOTRACK/ACCEPT rules for --ip-address (default false)
      --cleanup[=BOOL]                      on SIGTERM/SIGINT remove the addresses, rules and interface
                                            this process added (default false)
      --daemon[=BOOL]                       keep running and repairing; --daemon=false does one pass
                                            and exits 0 only if it succeeded (default true)
      --sync-interval DURATION              interval of the full check, besides the instant repair on
                                            netlink events (default 1m0s)
      --health-port PORT                    serve GET /healthz on this TCP port (default: off)
  -h, --help                                print this help
";

/// Parses the command line (without the program name).
pub fn parse(args: Vec<OsString>) -> Result<Command<Config>, UsageError> {
    let mut parser = Parser::from_args(args);
    let mut log = LogFlags::default();
    let mut ip_address = None;
    let mut service_ip = None;
    let mut interface = "lo".to_string();
    let mut port = "9443".to_string();
    let mut setup_iptables = false;
    let mut cleanup = false;
    let mut daemon = true;
    let mut sync_interval = Duration::from_secs(60);
    let mut health_port = None;
    while let Some(next) = cli::next_long(&mut parser, &mut log)? {
        let cli::Next::Long(name) = next else {
            return Ok(Command::Help);
        };
        match name.as_str() {
            "ip-address" => ip_address = Some(cli::string_value(&mut parser, &name)?),
            "kubernetes-service-ip-address" => {
                service_ip = Some(cli::string_value(&mut parser, &name)?)
            }
            "interface" => interface = cli::string_value(&mut parser, &name)?,
            "port" => port = cli::string_value(&mut parser, &name)?,
            "setup-iptables" => setup_iptables = cli::bool_value(&mut parser, &name)?,
            "cleanup" => cleanup = cli::bool_value(&mut parser, &name)?,
            "daemon" => daemon = cli::bool_value(&mut parser, &name)?,
            "sync-interval" => {
                sync_interval = cli::parsed_value(&mut parser, &name, cli::parse_duration)?
            }
            "health-port" => health_port = Some(cli::parsed_value(&mut parser, &name, parse_port)?),
            _ => return Err(cli::unknown_flag(&name)),
        }
    }

    let ip_address = match ip_address {
        None => return Err(UsageError("--ip-address is required".into())),
        Some(text) => parse_ip(&text).map_err(|e| UsageError::invalid("ip-address", &text, e))?,
    };
    let service_ip_address = match service_ip {
        None => None,
        Some(text) if text.is_empty() => None,
        Some(text) => Some(
            parse_ip(&text)
                .map_err(|e| UsageError::invalid("kubernetes-service-ip-address", &text, e))?,
        ),
    };
    validate_interface(&interface).map_err(|e| UsageError::invalid("interface", &interface, e))?;
    let port = parse_port(&port).map_err(|e| UsageError::invalid("port", &port, e))?;
    if sync_interval.is_zero() {
        return Err(UsageError::invalid(
            "sync-interval",
            &cli::format_duration(sync_interval),
            "must be greater than zero",
        ));
    }
    let iptables = if setup_iptables {
        let find = |binary: &str| {
            iptables::find_binary(binary).ok_or_else(|| {
                UsageError(format!(
                    "--setup-iptables needs the {binary} binary, which is not in PATH"
                ))
            })
        };
        // Only the family of --ip-address gets rules, so only that binary is required.
        let needed = plan::Family::of(ip_address).binary();
        let v4 = if needed == "iptables" {
            find("iptables")?
        } else {
            PathBuf::from("iptables")
        };
        let v6 = if needed == "ip6tables" {
            find("ip6tables")?
        } else {
            PathBuf::from("ip6tables")
        };
        Some(IptablesBinaries { v4, v6 })
    } else {
        None
    };
    Ok(Command::Run(Config {
        ip_address,
        service_ip_address,
        interface,
        port,
        iptables,
        cleanup,
        daemon,
        sync_interval,
        health_port,
        log,
    }))
}

/// An IP address we can pin: not unspecified, not multicast, not an
/// IPv4-mapped IPv6 address (ambiguous: which family's rules?), no zone.
pub fn parse_ip(text: &str) -> Result<IpAddr, String> {
    if text.contains('%') {
        return Err("zoned IPv6 addresses (with %zone) cannot be pinned".into());
    }
    let ip: IpAddr = text.parse().map_err(|_| "not an IP address".to_string())?;
    if let IpAddr::V6(v6) = ip {
        if v6.to_ipv4_mapped().is_some() {
            return Err("IPv4-mapped IPv6 addresses are not supported; use the IPv4 form".into());
        }
    }
    if ip.is_unspecified() {
        return Err("the unspecified address cannot be pinned".into());
    }
    if ip.is_multicast() {
        return Err("a multicast address cannot be pinned".into());
    }
    Ok(ip)
}

/// A TCP port, 1 to 65535.
pub fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err("expected a port number from 1 to 65535".into()),
        Ok(port) => Ok(port),
    }
}

/// The kernel's rules for interface names (dev_valid_name).
fn validate_interface(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the interface name is empty".into());
    }
    if name.len() > MAX_INTERFACE_NAME {
        return Err(format!(
            "interface names are at most {MAX_INTERFACE_NAME} bytes, this one has {}",
            name.len()
        ));
    }
    if name == "."
        || name == ".."
        || name.contains(['/', ':'])
        || name.contains(char::is_whitespace)
    {
        return Err("interface names cannot be . or .. or contain '/', ':' or spaces".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_args(args: &[&str]) -> Result<Command<Config>, UsageError> {
        parse(args.iter().map(OsString::from).collect())
    }

    fn config(args: &[&str]) -> Config {
        match parse_args(args) {
            Ok(Command::Run(config)) => config,
            other => panic!("{args:?} gave {other:?}"),
        }
    }

    fn error(args: &[&str]) -> String {
        match parse_args(args) {
            Err(err) => err.0,
            other => panic!("{args:?} should fail, gave {other:?}"),
        }
    }

    #[test]
    fn upstream_defaults() {
        let c = config(&["--ip-address=10.96.0.2"]);
        assert_eq!(c.ip_address, "10.96.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(c.service_ip_address, None);
        assert_eq!(c.interface, "lo");
        assert_eq!(c.port, 9443);
        assert_eq!(c.iptables, None);
        assert!(!c.cleanup);
        assert!(c.daemon);
        assert_eq!(c.sync_interval, Duration::from_secs(60));
        assert_eq!(c.health_port, None);
        assert_eq!(c.addresses().len(), 1);
    }

    #[test]
    fn every_flag_in_both_spellings() {
        let c = config(&[
            "--ip-address",
            "fd00::2",
            "--kubernetes-service-ip-address=fd00::1",
            "--interface",
            "apiproxy",
            "--port=443",
            "--cleanup",
            "--daemon=false",
            "--sync-interval",
            "30s",
            "--health-port=8080",
            "-v",
            "4",
            "--logtostderr=true",
        ]);
        assert_eq!(c.ip_address, "fd00::2".parse::<IpAddr>().unwrap());
        assert_eq!(c.service_ip_address, Some("fd00::1".parse().unwrap()));
        assert_eq!(c.interface, "apiproxy");
        assert_eq!(c.port, 443);
        assert!(c.cleanup);
        assert!(!c.daemon);
        assert_eq!(c.sync_interval, Duration::from_secs(30));
        assert_eq!(c.health_port, Some(8080));
        assert_eq!(c.log.verbosity, 4);
        assert_eq!(c.addresses().len(), 2);
    }

    #[test]
    fn help() {
        assert!(matches!(parse_args(&["--help"]), Ok(Command::Help)));
        assert!(matches!(parse_args(&["-h"]), Ok(Command::Help)));
    }

    #[test]
    fn bad_input_is_named() {
        assert!(error(&[]).contains("--ip-address is required"));
        assert!(error(&["--ip-address=10.0.0"]).contains("not an IP address"));
        assert!(error(&["--ip-address=::ffff:10.0.0.1"]).contains("IPv4-mapped"));
        assert!(error(&["--ip-address=fe80::1%eth0"]).contains("zoned"));
        assert!(error(&["--ip-address=0.0.0.0"]).contains("unspecified"));
        assert!(
            error(&["--ip-address=10.0.0.1", "--kubernetes-service-ip-address=x"])
                .contains("kubernetes-service-ip-address")
        );
        assert!(
            error(&["--ip-address=10.0.0.1", "--sync-interval=0s"]).contains("greater than zero")
        );
        assert!(error(&["--ip-address=10.0.0.1", "--sync-interval=-1m"]).contains("negative"));
        assert!(
            error(&["--ip-address=10.0.0.1", "--sync-interval=5"]).contains("invalid duration")
        );
        assert!(
            error(&["--ip-address=10.0.0.1", "--interface=abcdefghijklmnop"])
                .contains("at most 15")
        );
        assert!(error(&["--ip-address=10.0.0.1", "--interface=a/b"]).contains("'/'"));
        assert!(error(&["--ip-address=10.0.0.1", "--port=0"]).contains("1 to 65535"));
        assert!(error(&["--ip-address=10.0.0.1", "--port=70000"]).contains("1 to 65535"));
        assert!(error(&["--ip-address=10.0.0.1", "--daemon=maybe"]).contains("true or false"));
        assert!(error(&["--ip-address=10.0.0.1", "--bogus"]).contains("unknown flag --bogus"));
        assert!(error(&["--ip-address=10.0.0.1", "stray"]).contains("unexpected argument"));
    }

    #[test]
    fn interface_names_of_fifteen_bytes_are_fine() {
        assert_eq!(
            config(&["--ip-address=10.0.0.1", "--interface=abcdefghijklmno"])
                .interface
                .len(),
            15
        );
    }
}
