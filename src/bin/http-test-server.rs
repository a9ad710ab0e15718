//! http-test-server: see `apiserver_proxy::tunnel::test_server`.

use std::process::ExitCode;

use apiserver_proxy::cli;
use apiserver_proxy::shutdown::run_with_signals;
use apiserver_proxy::tunnel::test_server;

fn main() -> ExitCode {
    cli::main_with(
        "http-test-server",
        &format!("{}\n{}", test_server::HELP, cli::LOG_FLAGS_HELP),
        test_server::parse,
        |config| config.log.verbosity,
        |config| {
            run_with_signals(
                |e| format!("watching signals: {e}"),
                |shutdown| test_server::run(&config, shutdown),
            )
        },
    )
}
