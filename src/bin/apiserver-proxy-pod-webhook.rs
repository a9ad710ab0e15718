//! `apiserver-proxy-pod-webhook`: see [`apiserver_proxy::webhook`].

use std::process::ExitCode;

use apiserver_proxy::shutdown::run_with_signals;
use apiserver_proxy::{cli, webhook};

fn main() -> ExitCode {
    cli::main_with(
        webhook::NAME,
        &webhook::help(),
        webhook::parse,
        |config| config.log.verbosity,
        |config| {
            run_with_signals(webhook::Error::Signals, |shutdown| {
                webhook::run(config, shutdown)
            })
        },
    )
}
