//! apiserver-proxy-sidecar: see `apiserver_proxy::sidecar`.

use std::process::ExitCode;

use apiserver_proxy::cli;
use apiserver_proxy::shutdown::run_with_signals;
use apiserver_proxy::sidecar::{self, run, run::Health};

fn main() -> ExitCode {
    cli::main_with(
        "apiserver-proxy-sidecar",
        &format!("{}\n{}", sidecar::HELP, cli::LOG_FLAGS_HELP),
        sidecar::parse,
        |config| config.log.verbosity,
        |config| {
            run_with_signals(
                |e| format!("watching signals: {e}"),
                |shutdown| {
                    let health = Health::default();
                    let health_server = match config.health_port {
                        Some(port) => Some(
                            run::serve_health(port, &health, config.sync_interval, shutdown)
                                .map_err(|e| e.to_string())?,
                        ),
                        None => None,
                    };
                    let result = sidecar::run(&config, shutdown, &health);
                    // The health server waits for shutdown when dropped.
                    shutdown.trigger("exiting");
                    drop(health_server);
                    result.map_err(|e| e.to_string())
                },
            )
        },
    )
}
