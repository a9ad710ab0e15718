//! http-test-server: see `apiserver_proxy::tunnel::test_server`.

use std::process::ExitCode;

use apiserver_proxy::cli;
use apiserver_proxy::shutdown::{self, Shutdown};
use apiserver_proxy::tunnel::test_server;

fn main() -> ExitCode {
    cli::main_with(
        "http-test-server",
        &format!("{}\n{}", test_server::HELP, cli::LOG_FLAGS_HELP),
        test_server::parse,
        |config| config.log.verbosity,
        |config| -> Result<(), String> {
            let shutdown = Shutdown::new().map_err(|e| format!("setting up shutdown: {e}"))?;
            let _signals =
                shutdown::watch_signals(&shutdown).map_err(|e| format!("watching signals: {e}"))?;
            let result = test_server::run(&config, &shutdown);
            shutdown.trigger("exiting");
            result
        },
    )
}
