//! apiserver-proxy-sidecar: see `apiserver_proxy::sidecar`.

use std::process::ExitCode;

use apiserver_proxy::cli;
use apiserver_proxy::shutdown::{self, Shutdown};
use apiserver_proxy::sidecar::{self, run, run::Health};

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
            // Threads started here wait for shutdown when dropped, so the
            // trigger below runs on every path before they go.
            let mut health_server = None;
            let result = (|| {
                if let Some(port) = config.health_port {
                    health_server = Some(
                        run::serve_health(port, &health, config.sync_interval, &shutdown)
                            .map_err(|e| e.to_string())?,
                    );
                }
                sidecar::run(&config, &shutdown, &health).map_err(|e| e.to_string())
            })();
            shutdown.trigger("exiting");
            drop(health_server);
            result
        },
    )
}
