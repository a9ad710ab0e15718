//! `apiserver-proxy-pod-webhook`: see [`apiserver_proxy::webhook`].

use std::process::ExitCode;

use apiserver_proxy::shutdown::{Shutdown, watch_signals};
use apiserver_proxy::{cli, webhook};

fn main() -> ExitCode {
    cli::main_with(
        webhook::NAME,
        &webhook::help(),
        webhook::parse,
        |config| config.log.verbosity,
        |config| {
            // Before any other thread starts, so that every thread inherits
            // the blocked SIGTERM/SIGINT mask.
            let shutdown = Shutdown::new().map_err(webhook::Error::Signals)?;
            let _signals = watch_signals(&shutdown).map_err(webhook::Error::Signals)?;
            let result = webhook::run(config, &shutdown);
            // Stops the signal watcher if the server stopped on its own.
            shutdown.trigger("server stopped");
            result
        },
    )
}
