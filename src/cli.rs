//! Shared command-line plumbing for every binary.
//!
//! Owns: pflag-compatible value parsing (Go durations and booleans), the
//! klog-compatible logging flags that upstream manifests pass, logging set-up,
//! the usage error type and the `main` wrapper that maps results to exit codes.
//! Must not: know any role's flags; each role parses its own into a typed
//! `Config` in two phases (raw flags, then validation).
//!
//! Flag syntax follows spf13/pflag, which every upstream binary uses:
//! `--name value`, `--name=value`, boolean flags as `--name` or
//! `--name=false`, and the shorthand `-v N` / `-v=N` for verbosity.

use std::ffi::OsString;
use std::fmt;
use std::process::ExitCode;
use std::time::Duration;

use lexopt::{Arg, Parser};

/// One command-line item, owned so that it can be matched while the parser
/// is borrowed again for the flag's value. `Short('v')` and `Long("v")`
/// are the only spellings most flags need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flag {
    Long(String),
    Short(char),
    Value(OsString),
}

/// The next item on the command line, if any.
pub fn next_flag(parser: &mut Parser) -> Result<Option<Flag>, UsageError> {
    Ok(parser.next()?.map(|arg| match arg {
        Arg::Long(name) => Flag::Long(name.to_string()),
        Arg::Short(c) => Flag::Short(c),
        Arg::Value(value) => Flag::Value(value),
    }))
}

/// Exit code for a runtime failure.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code for bad usage: unknown flags, invalid values, missing flags.
pub const EXIT_USAGE: u8 = 2;

/// A problem with the command line; the binary prints it and exits 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    /// One line whatever the command line held: control characters (a
    /// newline inside an unknown flag's name) are shown escaped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for UsageError {}

impl From<lexopt::Error> for UsageError {
    fn from(err: lexopt::Error) -> Self {
        UsageError(err.to_string())
    }
}

impl UsageError {
    /// An invalid value for `--flag`.
    pub fn invalid(flag: &str, value: &str, why: impl fmt::Display) -> Self {
        UsageError(format!("invalid value {value:?} for --{flag}: {why}"))
    }
}

/// What the command line asked for: run with a config, or print help.
#[derive(Debug)]
pub enum Command<T> {
    Run(T),
    Help,
}

/// The shared `main`: parse, init logging, run, map the outcome to an exit
/// code (0 ok, 1 runtime error, 2 bad usage). Errors print once, here.
pub fn main_with<C, E: fmt::Display>(
    name: &str,
    help: &str,
    parse: impl FnOnce(Vec<OsString>) -> Result<Command<C>, UsageError>,
    verbosity: impl FnOnce(&C) -> u8,
    run: impl FnOnce(C) -> Result<(), E>,
) -> ExitCode {
    let config = match parse(std::env::args_os().skip(1).collect()) {
        Ok(Command::Run(config)) => config,
        Ok(Command::Help) => {
            print!("{help}");
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("{name}: {err}");
            eprintln!("Run '{name} --help' for the list of flags.");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    init_logging(verbosity(&config));
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{name}: {err}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Sets up stderr logging. `RUST_LOG` wins; otherwise klog's `-v` maps onto
/// levels: 0-1 info, 2-4 debug, 5 and more trace.
pub fn init_logging(verbosity: u8) {
    let level = match verbosity {
        0..=1 => "info",
        2..=4 => "debug",
        _ => "trace",
    };
    let env = env_logger::Env::default().default_filter_or(level);
    // A second init (tests that call run twice) is harmless: keep the first.
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .try_init();
}

/// The next flag value as UTF-8 text.
pub fn string_value(parser: &mut Parser, flag: &str) -> Result<String, UsageError> {
    let value = parser.value()?;
    value
        .into_string()
        .map_err(|raw| UsageError::invalid(flag, &raw.to_string_lossy(), "not valid UTF-8"))
}

/// The next flag value parsed with `parse`, with the flag named in the error.
pub fn parsed_value<T, E: fmt::Display>(
    parser: &mut Parser,
    flag: &str,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Result<T, UsageError> {
    let text = string_value(parser, flag)?;
    parse(&text).map_err(|err| UsageError::invalid(flag, &text, err))
}

/// A boolean flag: `--flag` means true, `--flag=VALUE` takes a Go boolean.
/// As in pflag, `--flag false` (a separate word) is not a value.
pub fn bool_value(parser: &mut Parser, flag: &str) -> Result<bool, UsageError> {
    match parser.optional_value() {
        None => Ok(true),
        Some(raw) => {
            let text = raw.to_string_lossy();
            parse_bool(&text).map_err(|err| UsageError::invalid(flag, &text, err))
        }
    }
}

/// Go's `strconv.ParseBool`.
pub fn parse_bool(text: &str) -> Result<bool, String> {
    match text {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err("expected true or false".to_string()),
    }
}

/// Go's `time.ParseDuration` for non-negative durations: a sequence of
/// decimal numbers with units, as in `1m`, `1m30s`, `1.5h`, `300ms`, `0`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || format!("invalid duration {text:?} (use units such as 500ms, 30s, 1m, 1h)");
    let body = text.strip_prefix('+').unwrap_or(text);
    if body.starts_with('-') {
        return Err(format!("duration {text:?} is negative"));
    }
    if body == "0" {
        return Ok(Duration::ZERO);
    }
    if body.is_empty() {
        return Err(invalid());
    }
    let mut total_nanos: f64 = 0.0;
    let mut rest = body;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return Err(invalid());
        }
        let value: f64 = number.parse().map_err(|_| invalid())?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let nanos_per_unit = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(invalid()),
        };
        total_nanos += value * nanos_per_unit;
        rest = next;
    }
    // Go rejects anything past ~292 years; so do we.
    if !total_nanos.is_finite() || total_nanos > i64::MAX as f64 {
        return Err(format!("duration {text:?} is too large"));
    }
    Ok(Duration::from_nanos(total_nanos.round() as u64))
}

/// Formats a duration the way Go prints it (`1m0s`, `5s`, `500ms`), for help
/// text and logs.
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".to_string();
    }
    let nanos = d.as_nanos();
    if nanos < 1_000_000_000 {
        return if nanos % 1_000_000 == 0 {
            format!("{}ms", nanos / 1_000_000)
        } else if nanos % 1_000 == 0 {
            format!("{}µs", nanos / 1_000)
        } else {
            format!("{nanos}ns")
        };
    }
    let secs = d.as_secs();
    let frac = d.subsec_nanos();
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if frac == 0 {
        out.push_str(&format!("{s}s"));
    } else {
        let fraction = format!("{frac:09}");
        out.push_str(&format!("{s}.{}s", fraction.trim_end_matches('0')));
    }
    out
}

/// The klog/glog flags that upstream binaries accept. We log to stderr only;
/// these are accepted so existing manifests keep working, and `-v` sets the
/// level (see [`init_logging`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogFlags {
    pub verbosity: u8,
}

/// Help text for [`LogFlags`], appended to each binary's help.
pub const LOG_FLAGS_HELP: &str = "\
Logging (klog-compatible; logs always go to stderr, RUST_LOG overrides -v):
  -v, --v LEVEL                  verbosity: 0-1 info, 2-4 debug, 5+ trace (default 0)
      --logtostderr[=BOOL], --alsologtostderr[=BOOL], --add_dir_header[=BOOL],
      --skip_headers[=BOOL], --skip_log_headers[=BOOL], --one_output[=BOOL]
      --log_dir DIR, --log_file FILE, --log_file_max_size MB, --stderrthreshold SEV,
      --vmodule SPEC, --log_backtrace_at FILE:N, --log-flush-frequency DURATION
                                 accepted for compatibility and ignored (with
                                 underscores or dashes: --log-dir = --log_dir)
";

impl LogFlags {
    /// Consumes `flag` if it is a logging flag; returns whether it did.
    pub fn accept(&mut self, flag: &Flag, parser: &mut Parser) -> Result<bool, UsageError> {
        let name = match flag {
            Flag::Short('v') => "v".to_string(),
            // Gardener's binaries spell klog flags with underscores,
            // Konnectivity's normalise them to dashes: accept both.
            Flag::Long(name) => name.replace('_', "-"),
            _ => return Ok(false),
        };
        match name.as_str() {
            "v" => self.verbosity = parsed_value(parser, "v", |s| s.parse::<u8>())?,
            "logtostderr" | "alsologtostderr" | "add-dir-header" | "skip-headers"
            | "skip-log-headers" | "one-output" => {
                bool_value(parser, &name)?;
            }
            "log-dir"
            | "log-file"
            | "log-file-max-size"
            | "stderrthreshold"
            | "vmodule"
            | "log-backtrace-at"
            | "log-flush-frequency" => {
                string_value(parser, &name)?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// What [`next_long`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// `-h` or `--help`.
    Help,
    /// A long flag for the role to handle (its value not yet consumed).
    Long(String),
}

/// The next role flag: logging flags are consumed into `log`, `-h` and
/// `--help` become [`Next::Help`], and anything that is not a long flag is
/// an error. Every role's parse loop is built on it.
pub fn next_long(parser: &mut Parser, log: &mut LogFlags) -> Result<Option<Next>, UsageError> {
    while let Some(flag) = next_flag(parser)? {
        if log.accept(&flag, parser)? {
            continue;
        }
        return match flag {
            Flag::Short('h') => Ok(Some(Next::Help)),
            Flag::Long(name) if name == "help" => Ok(Some(Next::Help)),
            Flag::Long(name) => Ok(Some(Next::Long(name))),
            other => Err(unexpected(other)),
        };
    }
    Ok(None)
}

/// The error for a long flag no role knows.
pub fn unknown_flag(name: &str) -> UsageError {
    UsageError(format!("unknown flag --{name}"))
}

/// The error for an argument no flag claimed.
pub fn unexpected(flag: Flag) -> UsageError {
    match flag {
        Flag::Value(value) => UsageError(format!(
            "unexpected argument {:?} (flags take the form --name=value)",
            value.to_string_lossy()
        )),
        Flag::Long(name) => UsageError(format!("unknown flag --{name}")),
        Flag::Short(c) => UsageError(format!("unknown flag -{c}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzz/fuzz_targets/flags.rs: an unknown flag's name was
    /// printed raw, so a newline in it split the error over two lines.
    #[test]
    fn usage_errors_are_one_line() {
        let err = unknown_flag("he\nlp\r\u{1b}[31m");
        assert_eq!(err.to_string(), "unknown flag --he\\nlp\\r\\u{1b}[31m");
        let mut parser = Parser::from_args(["--v=1\n2"]);
        let mut log = LogFlags::default();
        let err = next_long(&mut parser, &mut log).unwrap_err();
        assert!(!err.to_string().contains('\n'), "{err}");
        assert_eq!(unknown_flag("bogus").to_string(), "unknown flag --bogus");
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1m0s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("10us"), Ok(Duration::from_micros(10)));
        assert_eq!(parse_duration("10µs"), Ok(Duration::from_micros(10)));
        assert_eq!(parse_duration("7ns"), Ok(Duration::from_nanos(7)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("+2s"), Ok(Duration::from_secs(2)));
        for bad in [
            "",
            "1",
            "m",
            "1x",
            "-1s",
            "1..2s",
            ".s",
            "s1",
            "99999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn durations_print_like_go() {
        assert_eq!(format_duration(Duration::from_secs(60)), "1m0s");
        assert_eq!(format_duration(Duration::from_secs(5)), "5s");
        assert_eq!(format_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_duration(Duration::from_secs(3661)), "1h1m1s");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn go_booleans() {
        assert_eq!(parse_bool("true"), Ok(true));
        assert_eq!(parse_bool("F"), Ok(false));
        assert!(parse_bool("yes").is_err());
    }

    fn log_flags(args: &[&str]) -> Result<LogFlags, UsageError> {
        let mut parser = Parser::from_args(args.iter().copied());
        let mut flags = LogFlags::default();
        while let Some(flag) = next_flag(&mut parser)? {
            if !flags.accept(&flag, &mut parser)? {
                return Err(unexpected(flag));
            }
        }
        Ok(flags)
    }

    #[test]
    fn klog_flags_are_accepted() {
        assert_eq!(log_flags(&["-v", "4"]).unwrap().verbosity, 4);
        assert_eq!(log_flags(&["-v=3"]).unwrap().verbosity, 3);
        assert_eq!(log_flags(&["--v=5"]).unwrap().verbosity, 5);
        assert_eq!(log_flags(&["-v2"]).unwrap().verbosity, 2);
        let all = [
            "--logtostderr",
            "--alsologtostderr=false",
            "--log_dir",
            "/tmp",
            "--log_file=x",
            "--log-file-max-size=1800",
            "--skip-headers",
            "--stderrthreshold=2",
            "--vmodule=a=1",
        ];
        assert_eq!(log_flags(&all).unwrap().verbosity, 0);
        assert!(log_flags(&["-v", "x"]).is_err());
        assert!(log_flags(&["--logtostderr=maybe"]).is_err());
        assert!(log_flags(&["--nope"]).is_err());
    }
}
