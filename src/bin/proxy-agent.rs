//! proxy-agent: see `apiserver_proxy::tunnel::agent`.

use std::process::ExitCode;

use apiserver_proxy::cli;
use apiserver_proxy::shutdown::run_with_signals;
use apiserver_proxy::tunnel::agent;

fn main() -> ExitCode {
    cli::main_with(
        "proxy-agent",
        &format!("{}\n{}", agent::HELP, cli::LOG_FLAGS_HELP),
        |args| agent::parse(args, std::env::var("PROXY_AGENT_ID").ok()),
        |config| config.log.verbosity,
        |config| {
            run_with_signals(
                |e| format!("watching signals: {e}"),
                |shutdown| agent::run(&config, shutdown).map_err(|e| e.to_string()),
            )
        },
    )
}
