//! The sidecar's reconcile loop: a full pass (addresses and rules) at start
//! and every `--sync-interval`, an address pass at once whenever netlink
//! reports that an address or link changed, and the undo on shutdown.
//!
//! Owns: the [`Ledger`] of what this process added, and the timing of
//! passes. It is single-threaded: one `poll` waits on the netlink watcher,
//! the shutdown descriptor and the next tick. Only a pass's iptables calls
//! run on a helper thread, so that a wait for the xtables lock does not
//! hold up address repairs.

use std::fmt;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use super::Config;
use super::iptables::{self, Iptables};
use super::netlink::{self, Netlink, Watcher};
use super::plan::{self, Ledger, Step};
use crate::cli::format_duration;
use crate::shutdown::Shutdown;
use crate::sys;

/// How many plan-and-apply rounds one pass may take (create the link, then
/// raise it and add addresses) before it gives up.
const MAX_ROUNDS: usize = 4;
/// First retry delay after a failed pass; doubles up to the sync interval.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// How long the pass waits for netlink events at a time while its iptables
/// calls run.
const WAIT_SLICE: Duration = Duration::from_millis(20);

/// A failed pass or a failed set-up.
#[derive(Debug)]
pub enum Error {
    Netlink(netlink::Error),
    Iptables(iptables::Error),
    /// The interface is missing and this kernel cannot create dummy links.
    NoDummySupport {
        interface: String,
    },
    /// The kernel state kept changing under us.
    NotConverged {
        remaining: Vec<Step>,
    },
    Setup(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Netlink(e) => e.fmt(f),
            Error::Iptables(e) => e.fmt(f),
            Error::NoDummySupport { interface } => write!(
                f,
                "interface {interface} does not exist and this kernel cannot create dummy links \
                 (no 'dummy' link type: load the dummy module or create the interface first)"
            ),
            Error::NotConverged { remaining } => {
                write!(
                    f,
                    "addresses kept changing during the pass; still to do: {remaining:?}"
                )
            }
            Error::Setup(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for Error {}

impl From<netlink::Error> for Error {
    fn from(e: netlink::Error) -> Self {
        Error::Netlink(e)
    }
}

impl From<iptables::Error> for Error {
    fn from(e: iptables::Error) -> Self {
        Error::Iptables(e)
    }
}

/// What `/healthz` reports: the last successful full pass.
#[derive(Debug, Clone, Default)]
pub struct Health {
    inner: Arc<Mutex<Option<SystemTime>>>,
}

impl Health {
    pub fn last_success(&self) -> Option<SystemTime> {
        *self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn record_success(&self) {
        *self.inner.lock().unwrap_or_else(PoisonError::into_inner) = Some(SystemTime::now());
    }
}

impl Health {
    /// The `/healthz` answer at `now`: healthy while the last successful
    /// full check is at most two sync intervals (plus 30 s of slack for
    /// iptables lock waits) old.
    pub fn status(&self, sync_interval: Duration, now: SystemTime) -> (u16, String) {
        let Some(last) = self.last_success() else {
            return (503, "no successful check yet\n".to_string());
        };
        let age = now.duration_since(last).unwrap_or_default();
        let unix = last
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let text = format!(
            "last successful check {}s ago (unix time {unix})\n",
            age.as_secs()
        );
        if age <= sync_interval * 2 + Duration::from_secs(30) {
            (200, format!("ok: {text}"))
        } else {
            (500, format!("stale: {text}"))
        }
    }
}

/// Serves `GET /healthz` on all addresses at `port` until shutdown.
pub fn serve_health(
    port: u16,
    health: &Health,
    sync_interval: Duration,
    shutdown: &Shutdown,
) -> Result<crate::http::Server, Error> {
    let health = health.clone();
    let handler: crate::http::Handler =
        std::sync::Arc::new(move |request: &crate::http::Request| {
            if request.url() != "/healthz" {
                return crate::http::Response::empty_404();
            }
            let (status, body) = health.status(sync_interval, SystemTime::now());
            crate::http::Response::text(body).with_status_code(status)
        });
    let addr = std::net::SocketAddr::from(([0, 0, 0, 0], port));
    let server = crate::http::Server::bind(
        addr,
        None,
        crate::http::Limits::default(),
        handler,
        shutdown,
    )
    .map_err(|e| Error::Setup(format!("health port: {e}")))?;
    log::info!("health port listening on {}", server.local_addr());
    Ok(server)
}

/// Applies plans to the kernel and remembers what it added.
struct Reconciler {
    interface: String,
    ips: Vec<std::net::IpAddr>,
    rules: Vec<plan::Rule>,
    netlink: Netlink,
    iptables: Option<Iptables>,
    ledger: Ledger,
}

impl Reconciler {
    fn new(config: &Config) -> Result<Self, Error> {
        let iptables = config
            .iptables
            .as_ref()
            .map(|b| Iptables::new(b.v4.clone(), b.v6.clone()));
        let rules = if iptables.is_some() {
            plan::rules(config.ip_address, config.port)
        } else {
            Vec::new()
        };
        Ok(Reconciler {
            interface: config.interface.clone(),
            ips: config.addresses(),
            rules,
            netlink: Netlink::open()?,
            iptables,
            ledger: Ledger::default(),
        })
    }

    /// Addresses, then rules. The rules' iptables calls run on a helper
    /// thread: each may wait up to 10 s for the xtables lock (kube-proxy
    /// holds it for seconds on big clusters), and meanwhile `watcher`'s
    /// events still get the addresses repaired at once.
    fn full_pass(&mut self, watcher: Option<&Watcher>) -> Result<(), Error> {
        self.pin_addresses()?;
        let Some(iptables) = self.iptables.clone() else {
            return Ok(());
        };
        let rules = self.rules.clone();
        let (inserted, result) = std::thread::scope(|scope| {
            let worker = std::thread::Builder::new()
                .name("iptables".into())
                .spawn_scoped(scope, || ensure_rules(&iptables, &rules));
            let Ok(worker) = worker else {
                return ensure_rules(&iptables, &rules);
            };
            while !worker.is_finished() {
                self.repair_while_waiting(watcher);
            }
            worker.join().unwrap_or_else(|_| {
                let error = iptables::Error {
                    command: "iptables".into(),
                    detail: "the iptables thread panicked".into(),
                };
                (Vec::new(), Err(error))
            })
        });
        self.ledger.rules.extend(inserted);
        result.map_err(Error::from)
    }

    /// Waits a little for netlink events and repairs the addresses if any
    /// came (or some were lost).
    fn repair_while_waiting(&mut self, watcher: Option<&Watcher>) {
        let Some(watcher) = watcher else {
            std::thread::sleep(WAIT_SLICE);
            return;
        };
        match sys::poll_readable(&[watcher.as_raw_fd()], Some(WAIT_SLICE)) {
            Ok(ready) if ready.first().copied().unwrap_or(false) => {
                let events = watcher.drain();
                if events.as_ref().is_ok_and(|e| e.is_empty()) {
                    return;
                }
                log::debug!(
                    "netlink events {events:?} during the iptables calls: checking addresses"
                );
                if let Err(e) = self.pin_addresses() {
                    log::error!("repair failed: {e}; the next pass retries");
                }
                if events.is_err() {
                    std::thread::sleep(WAIT_SLICE);
                }
            }
            Ok(_) => {}
            Err(_) => std::thread::sleep(WAIT_SLICE),
        }
    }

    /// Makes the interface and addresses match the plan.
    fn pin_addresses(&mut self) -> Result<(), Error> {
        for _ in 0..MAX_ROUNDS {
            let links = self.netlink.links()?;
            let addresses = self.netlink.addresses()?;
            let steps = plan::plan(&self.interface, &self.ips, &links, &addresses);
            if steps.is_empty() {
                return Ok(());
            }
            for step in steps {
                self.apply(&step)?;
            }
        }
        let links = self.netlink.links()?;
        let addresses = self.netlink.addresses()?;
        let remaining = plan::plan(&self.interface, &self.ips, &links, &addresses);
        if remaining.is_empty() {
            Ok(())
        } else {
            Err(Error::NotConverged { remaining })
        }
    }

    fn apply(&mut self, step: &Step) -> Result<(), Error> {
        let tolerate = |result: Result<(), netlink::Error>, benign: &[i32]| match result {
            Err(e) if e.errno().is_some_and(|errno| benign.contains(&errno)) => Ok(false),
            Err(e) => Err(e),
            Ok(()) => Ok(true),
        };
        match step {
            Step::CreateDummy { name } => {
                match tolerate(self.netlink.create_dummy(name), &[libc::EEXIST]) {
                    Ok(true) => {
                        log::info!("created dummy interface {name}");
                        self.ledger.created_link = Some(name.clone());
                    }
                    Ok(false) => {}
                    Err(e) if e.errno() == Some(libc::EOPNOTSUPP) => {
                        return Err(Error::NoDummySupport {
                            interface: name.clone(),
                        });
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Step::SetUp { index, name } => {
                self.netlink.set_up(*index)?;
                log::info!("set interface {name} (index {index}) up");
            }
            Step::AddAddress(address) => {
                if tolerate(self.netlink.add_address(address), &[libc::EEXIST])? {
                    log::info!(
                        "added {}/{} to {}",
                        address.ip,
                        address.prefix,
                        self.interface
                    );
                    self.ledger.addresses.insert(address.ip);
                }
            }
            Step::RemoveAddress(address) => {
                let gone = [libc::EADDRNOTAVAIL, libc::ENOENT, libc::ENODEV];
                if tolerate(self.netlink.delete_address(address), &gone)? {
                    log::info!(
                        "removed {}/{} from link {}",
                        address.ip,
                        address.prefix,
                        address.index
                    );
                }
            }
            Step::DeleteLink { index, name } => {
                if tolerate(self.netlink.delete_link(*index), &[libc::ENODEV])? {
                    log::info!("deleted interface {name}");
                }
            }
        }
        Ok(())
    }

    /// Removes what this process added; keeps going past failures and
    /// reports the first.
    fn clean_up(&mut self) -> Result<(), Error> {
        let mut first_error = None;
        if let Some(iptables) = &self.iptables {
            for rule in std::mem::take(&mut self.ledger.rules) {
                // Another writer may have inserted a copy: remove them all.
                let removed = (|| -> Result<(), iptables::Error> {
                    while iptables.exists(&rule)? {
                        iptables.delete(&rule)?;
                    }
                    Ok(())
                })();
                match removed {
                    Ok(()) => log::info!("deleted {} rule: {}", rule.table, rule.saved_form()),
                    Err(e) => {
                        log::error!("cleanup: {e}");
                        first_error.get_or_insert(Error::from(e));
                    }
                }
            }
        }
        let undo = (|| -> Result<(), Error> {
            let links = self.netlink.links()?;
            let addresses = self.netlink.addresses()?;
            for step in plan::plan_cleanup(&self.ledger, &self.interface, &links, &addresses) {
                self.apply(&step)?;
            }
            Ok(())
        })();
        if let Err(e) = undo {
            log::error!("cleanup: {e}");
            first_error.get_or_insert(e);
        }
        match first_error {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

/// Inserts every missing rule, checking each with `-C` first. Returns the
/// rules it inserted (for the ledger), also when a later call fails.
fn ensure_rules(
    iptables: &Iptables,
    rules: &[plan::Rule],
) -> (Vec<plan::Rule>, Result<(), iptables::Error>) {
    let mut inserted = Vec::new();
    for rule in rules {
        let added = iptables.exists(rule).and_then(|exists| {
            if exists {
                Ok(false)
            } else {
                iptables.insert(rule).map(|()| true)
            }
        });
        match added {
            Ok(true) => {
                log::info!("inserted {} rule: {}", rule.table, rule.saved_form());
                inserted.push(rule.clone());
            }
            Ok(false) => {}
            Err(e) => return (inserted, Err(e)),
        }
    }
    (inserted, Ok(()))
}

/// Runs the sidecar until shutdown (daemon mode) or for one pass.
pub fn run(config: &Config, shutdown: &Shutdown, health: &Health) -> Result<(), Error> {
    let mut reconciler = Reconciler::new(config)?;
    log::info!(
        "pinning {} on {}{}, full check every {}",
        config
            .addresses()
            .iter()
            .map(|ip| ip.to_string())
            .collect::<Vec<_>>()
            .join(" and "),
        config.interface,
        if config.iptables.is_some() {
            format!(" with iptables rules for port {}", config.port)
        } else {
            String::new()
        },
        format_duration(config.sync_interval),
    );
    if !config.daemon {
        if config.cleanup {
            log::warn!("--cleanup has no effect with --daemon=false: the pass's work is kept");
        }
        reconciler.full_pass(None)?;
        health.record_success();
        log::info!(
            "addresses{} in place",
            if config.iptables.is_some() {
                " and rules"
            } else {
                ""
            }
        );
        return Ok(());
    }

    // Subscribe before the first pass so that no change slips between them.
    let mut watcher = open_watcher();
    let mut retry = FIRST_RETRY;
    let mut next_full = Instant::now();
    loop {
        let now = Instant::now();
        if now >= next_full {
            match reconciler.full_pass(watcher.as_ref()) {
                Ok(()) => {
                    log::debug!("full check passed");
                    health.record_success();
                    retry = FIRST_RETRY;
                    next_full = now + config.sync_interval;
                }
                Err(e) => {
                    let wait = retry.min(config.sync_interval);
                    log::error!(
                        "reconcile failed: {e}; retrying in {}",
                        format_duration(wait)
                    );
                    next_full = now + wait;
                    retry = (retry * 2).min(config.sync_interval);
                }
            }
            if watcher.is_none() {
                watcher = open_watcher();
            }
        }

        let mut fds = vec![shutdown.as_raw_fd()];
        if let Some(w) = &watcher {
            fds.push(w.as_raw_fd());
        }
        let timeout = next_full.saturating_duration_since(Instant::now());
        let ready = sys::poll_readable(&fds, Some(timeout))
            .map_err(|e| Error::Setup(format!("waiting for events: {e}")))?;
        if shutdown.is_triggered() {
            break;
        }
        if ready.get(1).copied().unwrap_or(false) {
            let events = match watcher.as_ref().map(Watcher::drain) {
                Some(Ok(events)) => events,
                Some(Err(e)) => {
                    log::error!("{e}; reopening the event socket at the next pass");
                    watcher = None;
                    next_full = Instant::now();
                    continue;
                }
                None => Vec::new(),
            };
            if !events.is_empty() {
                log::debug!("netlink events {events:?}: checking addresses");
                if let Err(e) = reconciler.pin_addresses() {
                    log::error!("repair failed: {e}; retrying in {}", format_duration(retry));
                    next_full = next_full.min(Instant::now() + retry);
                }
            }
        }
    }

    if config.cleanup {
        log::info!("cleaning up what this process added");
        reconciler.clean_up()?;
        log::info!("cleanup done");
    }
    Ok(())
}

fn open_watcher() -> Option<Watcher> {
    match Watcher::open() {
        Ok(w) => Some(w),
        Err(e) => {
            log::error!("{e}; repairs wait for the periodic check");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_the_last_success() {
        let health = Health::default();
        let minute = Duration::from_secs(60);
        assert_eq!(health.status(minute, SystemTime::now()).0, 503);
        health.record_success();
        let now = SystemTime::now();
        let (status, body) = health.status(minute, now);
        assert_eq!(status, 200);
        assert!(
            body.starts_with("ok: last successful check 0s ago"),
            "{body}"
        );
        let (status, body) = health.status(minute, now + Duration::from_secs(151));
        assert_eq!(status, 500);
        assert!(
            body.starts_with("stale: last successful check 151s ago"),
            "{body}"
        );
    }
}
