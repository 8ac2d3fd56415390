//! `plugin-host`: parses the configuration, sets up logging, runs the host
//! until SIGINT or SIGTERM.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use plugin_host::Config;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let mut config = Config::parse();
    if let Some(path) = &config.config_file {
        match plugin_host::config::file::FileConfig::read(path) {
            Ok(file) => config.file = file,
            Err(error) => {
                eprintln!("plugin-host: {error}");
                return ExitCode::from(2);
            }
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(plugin_host::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "plugin-host stopped");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
