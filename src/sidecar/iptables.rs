//! iptables rules through the `iptables` / `ip6tables` binaries.
//!
//! Owns: the crate's child processes. Every call passes `-w` with a bound,
//! so it waits for the xtables lock that kube-proxy holds, but not forever,
//! and every child is killed if it outlives a deadline. Must not: edit the
//! kernel tables any other way.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::plan::{Family, Rule};

/// Seconds iptables waits for the xtables lock (its `-w` argument).
const LOCK_WAIT_SECS: &str = "10";
/// A child still running after this is killed.
const PROCESS_DEADLINE: Duration = Duration::from_secs(30);

/// An iptables invocation that failed.
#[derive(Debug)]
pub struct Error {
    pub command: String,
    pub detail: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.command, self.detail)
    }
}

impl std::error::Error for Error {}

/// Finds `binary` in `PATH`, as the sidecar needs it before it starts.
pub fn find_binary(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Runs iptables for one family.
#[derive(Debug, Clone)]
pub struct Iptables {
    v4: PathBuf,
    v6: PathBuf,
}

impl Iptables {
    pub fn new(v4: PathBuf, v6: PathBuf) -> Self {
        Iptables { v4, v6 }
    }

    /// Whether the rule exists (`-C`).
    pub fn exists(&self, rule: &Rule) -> Result<bool, Error> {
        let (code, command, stderr) = self.run(rule, &["-C", rule.chain])?;
        match code {
            0 => Ok(true),
            // 1: "Bad rule (does a matching rule exist in that chain?)".
            1 => Ok(false),
            _ => Err(Error {
                command,
                detail: stderr,
            }),
        }
    }

    /// Inserts the rule at the top of its chain (as upstream prepends), so
    /// that an ACCEPT is not shadowed by an earlier DROP.
    pub fn insert(&self, rule: &Rule) -> Result<(), Error> {
        self.expect_success(rule, &["-I", rule.chain, "1"])
    }

    pub fn delete(&self, rule: &Rule) -> Result<(), Error> {
        self.expect_success(rule, &["-D", rule.chain])
    }

    fn expect_success(&self, rule: &Rule, action: &[&str]) -> Result<(), Error> {
        let (code, command, stderr) = self.run(rule, action)?;
        if code == 0 {
            Ok(())
        } else {
            Err(Error {
                command,
                detail: stderr,
            })
        }
    }

    /// Runs `BIN -w N -t TABLE ACTION... SPEC...`; returns the exit code,
    /// the command line and stderr.
    fn run(&self, rule: &Rule, action: &[&str]) -> Result<(i32, String, String), Error> {
        let binary = match rule.family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        };
        let mut args: Vec<&str> = vec!["-w", LOCK_WAIT_SECS, "-t", rule.table];
        args.extend_from_slice(action);
        args.extend(rule.spec.iter().map(String::as_str));
        let command = format!("{} {}", rule.family.binary(), args.join(" "));
        log::trace!("running {command}");
        let mut child = Command::new(binary)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error {
                command: command.clone(),
                detail: format!("cannot start: {e}"),
            })?;
        let deadline = Instant::now() + PROCESS_DEADLINE;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error {
                        command,
                        detail: format!("no answer within {PROCESS_DEADLINE:?}, killed"),
                    });
                }
                Err(e) => {
                    return Err(Error {
                        command,
                        detail: format!("waiting: {e}"),
                    });
                }
            }
        };
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            // Bounded: iptables prints a line or two.
            let _ = pipe.by_ref().take(16 * 1024).read_to_string(&mut stderr);
        }
        let code = status.code().unwrap_or(-1);
        Ok((code, command, stderr.trim().to_string()))
    }
}
