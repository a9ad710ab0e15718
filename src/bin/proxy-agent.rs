//! proxy-agent: see `apiserver_proxy::tunnel::agent`.

use std::process::ExitCode;

use apiserver_proxy::cli;
use apiserver_proxy::shutdown::{self, Shutdown};
use apiserver_proxy::tunnel::agent;

fn main() -> ExitCode {
    cli::main_with(
        "proxy-agent",
        &format!("{}\n{}", agent::HELP, cli::LOG_FLAGS_HELP),
        |args| agent::parse(args, std::env::var("PROXY_AGENT_ID").ok()),
        |config| config.log.verbosity,
        |config| -> Result<(), String> {
            let shutdown = Shutdown::new().map_err(|e| format!("setting up shutdown: {e}"))?;
            let _signals =
                shutdown::watch_signals(&shutdown).map_err(|e| format!("watching signals: {e}"))?;
            let result = agent::run(&config, &shutdown).map_err(|e| e.to_string());
            shutdown.trigger("exiting");
            result
        },
    )
}
