//! proxy-server: see `apiserver_proxy::tunnel::server`.

use std::process::ExitCode;

use apiserver_proxy::cli;
use apiserver_proxy::shutdown::run_with_signals;
use apiserver_proxy::tunnel::server;

fn main() -> ExitCode {
    cli::main_with(
        "proxy-server",
        &format!("{}\n{}", server::HELP, cli::LOG_FLAGS_HELP),
        |args| server::parse(args, std::env::var("PROXY_SERVER_ID").ok()),
        |config| config.log.verbosity,
        |config| {
            run_with_signals(
                |e| format!("watching signals: {e}"),
                |shutdown| server::run(&config, shutdown).map_err(|e| e.to_string()),
            )
        },
    )
}
