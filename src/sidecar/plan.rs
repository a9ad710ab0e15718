//! The sidecar's decisions, as pure functions of what the kernel reported:
//! which links and addresses to create or remove, which iptables rules must
//! exist, and what to undo on cleanup.
//!
//! Owns: the meaning of "pinned": each address on the interface as a host
//! route (/32 or /128), scope global, on a link that is up, and nowhere else.
//! Must not: do I/O. Everything here is tested with literal inputs.

use std::collections::BTreeSet;
use std::net::IpAddr;

/// A network link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub up: bool,
    pub loopback: bool,
}

/// An interface address as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// Index of the link that holds it.
    pub index: u32,
    pub ip: IpAddr,
    pub prefix: u8,
    /// Scope global (RT_SCOPE_UNIVERSE).
    pub global: bool,
    /// False when IPv6 duplicate address detection failed.
    pub usable: bool,
}

/// The prefix length of a single-address route: 32 or 128.
pub fn host_prefix(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

impl Address {
    /// The address we want: `ip` alone, scope global, on link `index`.
    pub fn pinned(index: u32, ip: IpAddr) -> Self {
        Address {
            index,
            ip,
            prefix: host_prefix(ip),
            global: true,
            usable: true,
        }
    }

    fn is_pinned_form(&self) -> bool {
        self.prefix == host_prefix(self.ip) && self.global && self.usable
    }
}

/// One change to make, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The interface does not exist: create it as a dummy link (up).
    CreateDummy { name: String },
    /// The interface exists but is down.
    SetUp { index: u32, name: String },
    /// Our address is missing from the interface.
    AddAddress(Address),
    /// Our IP with the wrong prefix or scope on the interface, or our IP on
    /// another link: remove it (upstream removes duplicates too).
    RemoveAddress(Address),
    /// Cleanup only: the dummy link this process created.
    DeleteLink { index: u32, name: String },
}

/// Plans one pass. When the interface is missing the plan is only to create
/// it; the caller observes again and plans the rest.
pub fn plan(interface: &str, ips: &[IpAddr], links: &[Link], addresses: &[Address]) -> Vec<Step> {
    let Some(link) = links.iter().find(|l| l.name == interface) else {
        return vec![Step::CreateDummy {
            name: interface.to_string(),
        }];
    };
    let mut steps = Vec::new();
    if !link.up {
        steps.push(Step::SetUp {
            index: link.index,
            name: link.name.clone(),
        });
    }
    for &ip in ips {
        let mut present = false;
        for address in addresses.iter().filter(|a| a.ip == ip) {
            if address.index != link.index || !address.is_pinned_form() {
                steps.push(Step::RemoveAddress(address.clone()));
            } else {
                present = true;
            }
        }
        if !present {
            steps.push(Step::AddAddress(Address::pinned(link.index, ip)));
        }
    }
    steps
}

/// iptables or ip6tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    /// The binary that manages this family's tables.
    pub fn binary(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
}

/// One iptables rule: table, chain and match/target arguments, written the
/// way `iptables-save` prints them so that `-C` and the saved form agree.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    pub family: Family,
    pub table: &'static str,
    pub chain: &'static str,
    pub spec: Vec<String>,
}

impl Rule {
    fn new(ip: IpAddr, table: &'static str, chain: &'static str, dir: Dir, port: u16) -> Self {
        let (addr_flag, port_flag) = match dir {
            Dir::ToProxy => ("-d", "--dport"),
            Dir::FromProxy => ("-s", "--sport"),
        };
        let target = if table == "raw" { "NOTRACK" } else { "ACCEPT" };
        let spec = [
            addr_flag,
            &format!("{ip}/{}", host_prefix(ip)),
            "-p",
            "tcp",
            "-m",
            "tcp",
            port_flag,
            &port.to_string(),
            "-j",
            target,
        ];
        Rule {
            family: Family::of(ip),
            table,
            chain,
            spec: spec.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The rule as `iptables-save` prints it, without the table.
    pub fn saved_form(&self) -> String {
        format!("-A {} {}", self.chain, self.spec.join(" "))
    }
}

#[derive(Clone, Copy)]
enum Dir {
    ToProxy,
    FromProxy,
}

/// The five rules for the proxy's listen address: connections to and from
/// `ip:port` skip conntrack (the address is local, so tracking them only
/// costs) and are accepted by the filter table despite being untracked.
pub fn rules(ip: IpAddr, port: u16) -> Vec<Rule> {
    vec![
        Rule::new(ip, "raw", "PREROUTING", Dir::ToProxy, port),
        Rule::new(ip, "raw", "OUTPUT", Dir::ToProxy, port),
        Rule::new(ip, "raw", "OUTPUT", Dir::FromProxy, port),
        Rule::new(ip, "filter", "INPUT", Dir::ToProxy, port),
        Rule::new(ip, "filter", "OUTPUT", Dir::FromProxy, port),
    ]
}

/// What this process created, so that `--cleanup` removes exactly that.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ledger {
    /// The interface, if this process created it.
    pub created_link: Option<String>,
    /// IPs this process added to the interface.
    pub addresses: BTreeSet<IpAddr>,
    /// Rules this process inserted.
    pub rules: BTreeSet<Rule>,
}

/// Plans the undo of everything in `ledger` that still exists: our addresses
/// first, then the link we created. Never a loopback link, never anything
/// that was there before we started.
pub fn plan_cleanup(
    ledger: &Ledger,
    interface: &str,
    links: &[Link],
    addresses: &[Address],
) -> Vec<Step> {
    let Some(link) = links.iter().find(|l| l.name == interface) else {
        return Vec::new();
    };
    let mut steps: Vec<Step> = addresses
        .iter()
        .filter(|a| a.index == link.index && ledger.addresses.contains(&a.ip))
        .map(|a| Step::RemoveAddress(a.clone()))
        .collect();
    if ledger.created_link.as_deref() == Some(interface) && !link.loopback {
        steps.push(Step::DeleteLink {
            index: link.index,
            name: link.name.clone(),
        });
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn lo() -> Link {
        Link {
            index: 1,
            name: "lo".into(),
            up: true,
            loopback: true,
        }
    }

    fn eth0() -> Link {
        Link {
            index: 2,
            name: "eth0".into(),
            up: true,
            loopback: false,
        }
    }

    fn addr(index: u32, s: &str, prefix: u8) -> Address {
        Address {
            index,
            ip: ip(s),
            prefix,
            global: true,
            usable: true,
        }
    }

    #[test]
    fn missing_interface_is_created_first() {
        let steps = plan("apiproxy", &[ip("10.0.0.1")], &[lo()], &[]);
        assert_eq!(
            steps,
            vec![Step::CreateDummy {
                name: "apiproxy".into()
            }]
        );
    }

    #[test]
    fn adds_missing_addresses_as_host_routes() {
        let steps = plan(
            "lo",
            &[ip("10.96.0.2"), ip("fd00::1")],
            &[lo()],
            &[addr(1, "127.0.0.1", 8)],
        );
        assert_eq!(
            steps,
            vec![
                Step::AddAddress(addr(1, "10.96.0.2", 32)),
                Step::AddAddress(addr(1, "fd00::1", 128)),
            ]
        );
    }

    #[test]
    fn nothing_to_do_when_pinned() {
        let addresses = [addr(1, "10.96.0.2", 32), addr(1, "fd00::1", 128)];
        assert!(plan("lo", &[ip("10.96.0.2"), ip("fd00::1")], &[lo()], &addresses).is_empty());
    }

    #[test]
    fn down_link_is_raised() {
        let mut link = eth0();
        link.up = false;
        let steps = plan(
            "eth0",
            &[ip("10.0.0.9")],
            &[lo(), link],
            &[addr(2, "10.0.0.9", 32)],
        );
        assert_eq!(
            steps,
            vec![Step::SetUp {
                index: 2,
                name: "eth0".into()
            }]
        );
    }

    #[test]
    fn duplicates_on_other_links_are_removed() {
        let addresses = [addr(2, "10.96.0.2", 24), addr(1, "10.96.0.2", 32)];
        let steps = plan("lo", &[ip("10.96.0.2")], &[lo(), eth0()], &addresses);
        assert_eq!(steps, vec![Step::RemoveAddress(addr(2, "10.96.0.2", 24))]);
    }

    #[test]
    fn wrong_prefix_or_scope_is_replaced() {
        let mut host_scope = addr(1, "10.96.0.3", 32);
        host_scope.global = false;
        let addresses = [addr(1, "10.96.0.2", 24), host_scope.clone()];
        let steps = plan(
            "lo",
            &[ip("10.96.0.2"), ip("10.96.0.3")],
            &[lo()],
            &addresses,
        );
        assert_eq!(
            steps,
            vec![
                Step::RemoveAddress(addr(1, "10.96.0.2", 24)),
                Step::AddAddress(addr(1, "10.96.0.2", 32)),
                Step::RemoveAddress(host_scope),
                Step::AddAddress(addr(1, "10.96.0.3", 32)),
            ]
        );
    }

    #[test]
    fn the_five_rules_match_upstream() {
        let saved: Vec<_> = rules(ip("10.96.0.2"), 443)
            .iter()
            .map(|r| (r.table, r.saved_form()))
            .collect();
        assert_eq!(
            saved,
            vec![
                (
                    "raw",
                    "-A PREROUTING -d 10.96.0.2/32 -p tcp -m tcp --dport 443 -j NOTRACK"
                        .to_string()
                ),
                (
                    "raw",
                    "-A OUTPUT -d 10.96.0.2/32 -p tcp -m tcp --dport 443 -j NOTRACK".to_string()
                ),
                (
                    "raw",
                    "-A OUTPUT -s 10.96.0.2/32 -p tcp -m tcp --sport 443 -j NOTRACK".to_string()
                ),
                (
                    "filter",
                    "-A INPUT -d 10.96.0.2/32 -p tcp -m tcp --dport 443 -j ACCEPT".to_string()
                ),
                (
                    "filter",
                    "-A OUTPUT -s 10.96.0.2/32 -p tcp -m tcp --sport 443 -j ACCEPT".to_string()
                ),
            ]
        );
        let v6 = rules(ip("fd00::2"), 9443);
        assert!(v6.iter().all(|r| r.family == Family::V6));
        assert_eq!(
            v6[0].saved_form(),
            "-A PREROUTING -d fd00::2/128 -p tcp -m tcp --dport 9443 -j NOTRACK"
        );
    }

    #[test]
    fn cleanup_undoes_only_our_work() {
        let mut ledger = Ledger::default();
        ledger.addresses.insert(ip("10.96.0.2"));
        let addresses = [
            addr(1, "10.96.0.2", 32),
            addr(1, "10.96.0.3", 32),
            addr(1, "127.0.0.1", 8),
        ];
        let steps = plan_cleanup(&ledger, "lo", &[lo()], &addresses);
        assert_eq!(steps, vec![Step::RemoveAddress(addr(1, "10.96.0.2", 32))]);
    }

    #[test]
    fn cleanup_deletes_a_created_link_but_never_loopback() {
        let ledger = Ledger {
            created_link: Some("lo".into()),
            ..Ledger::default()
        };
        assert!(plan_cleanup(&ledger, "lo", &[lo()], &[]).is_empty());
        let dummy = Link {
            index: 7,
            name: "apiproxy".into(),
            up: true,
            loopback: false,
        };
        let ledger = Ledger {
            created_link: Some("apiproxy".into()),
            ..Ledger::default()
        };
        assert_eq!(
            plan_cleanup(&ledger, "apiproxy", &[lo(), dummy], &[]),
            vec![Step::DeleteLink {
                index: 7,
                name: "apiproxy".into()
            }]
        );
        // A link we did not create stays.
        assert!(plan_cleanup(&Ledger::default(), "eth0", &[eth0()], &[]).is_empty());
    }
}
