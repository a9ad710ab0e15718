//! proxy-test-client: see `apiserver_proxy::tunnel::test_client`.

use std::process::ExitCode;

use apiserver_proxy::cli;
use apiserver_proxy::tunnel::test_client;

fn main() -> ExitCode {
    cli::main_with(
        "proxy-test-client",
        &format!("{}\n{}", test_client::HELP, cli::LOG_FLAGS_HELP),
        test_client::parse,
        |config| config.log.verbosity,
        |config| test_client::run(&config),
    )
}
