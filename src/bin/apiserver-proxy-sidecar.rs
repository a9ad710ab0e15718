//! apiserver-proxy-sidecar: see `apiserver_proxy::sidecar`.

use std::process::ExitCode;

use apiserver_proxy::cli;
use apiserver_proxy::shutdown::{self, Shutdown};
use apiserver_proxy::sidecar::{self, run::Health};

fn main() -> ExitCode {
    cli::main_with(
        "apiserver-proxy-sidecar",
        &format!("{}\n{}", sidecar::HELP, cli::LOG_FLAGS_HELP),
        sidecar::parse,
        |config| config.log.verbosity,
        |config| -> Result<(), String> {
            let shutdown = Shutdown::new().map_err(|e| format!("setting up shutdown: {e}"))?;
            let _signals =
                shutdown::watch_signals(&shutdown).map_err(|e| format!("watching signals: {e}"))?;
            let health = Health::default();
            let result = sidecar::run(&config, &shutdown, &health).map_err(|e| e.to_string());
            // Stop the signal watcher (it joins on drop) whatever the outcome.
            shutdown.trigger("exiting");
            result
        },
    )
}
