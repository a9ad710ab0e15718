//! proxy-server: see `apiserver_proxy::tunnel::server`.

use std::process::ExitCode;

use apiserver_proxy::cli;
use apiserver_proxy::shutdown::{self, Shutdown};
use apiserver_proxy::tunnel::server;

fn main() -> ExitCode {
    cli::main_with(
        "proxy-server",
        &format!("{}\n{}", server::HELP, cli::LOG_FLAGS_HELP),
        |args| server::parse(args, std::env::var("PROXY_SERVER_ID").ok()),
        |config| config.log.verbosity,
        |config| -> Result<(), String> {
            let shutdown = Shutdown::new().map_err(|e| format!("setting up shutdown: {e}"))?;
            let _signals =
                shutdown::watch_signals(&shutdown).map_err(|e| format!("watching signals: {e}"))?;
            let result = server::run(&config, &shutdown).map_err(|e| e.to_string());
            shutdown.trigger("exiting");
            result
        },
    )
}
