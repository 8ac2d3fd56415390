//! `plugin-host`: loads the configuration, sets up logging, runs the host
//! until SIGINT or SIGTERM, reloading the config file on SIGHUP; or, as
//! `plugin-host check-config <file>`, only checks a config file.

#![forbid(unsafe_code)]

use std::path::Path;
use std::process::ExitCode;

use plugin_host::config::{Command, LogFormat};
use plugin_host::reload::Live;
use plugin_host::{Config, check_settings};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// The exit status of a refused configuration, as of a command-line error
/// (clap's).
const REFUSED: u8 = 2;

fn main() -> ExitCode {
    let config = match Config::load() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("plugin-host: {error}");
            return ExitCode::from(REFUSED);
        }
    };
    if let Some(Command::CheckConfig { file }) = &config.command {
        return match check_settings(&config) {
            Ok(()) => {
                println!("ok: {}", file.display());
                ExitCode::SUCCESS
            }
            Err(error) => refused(file, &error),
        };
    }
    // `RUST_LOG` filters every target, the access log's (`access`) too.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().init(),
    }
    let live = match Live::build(&config) {
        Ok(live) => live,
        Err(error) => match &config.config_file {
            Some(file) => return refused(file, &error),
            None => {
                eprintln!("plugin-host: {error}");
                return ExitCode::from(REFUSED);
            }
        },
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // First, whatever follows: SIGHUP's default action ends the process.
        let reloads = reload_requests().map_err(|error| {
            tracing::error!(%error, "cannot install the SIGHUP handler");
        })?;
        plugin_host::run(config, live, reloads, shutdown_signal())
            .await
            .map_err(|error| tracing::error!(%error, "plugin-host stopped"))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(()) => ExitCode::FAILURE,
    }
}

/// The one line of a refused config file, and its exit status.
fn refused(file: &Path, error: &plugin_host::HostError) -> ExitCode {
    match error {
        // Its message names the file already.
        plugin_host::HostError::Config(error) => eprintln!("plugin-host: {error}"),
        error => eprintln!("plugin-host: config file {}: {error}", file.display()),
    }
    ExitCode::from(REFUSED)
}

/// One message per SIGHUP (one pending at most: a reload reads the file as
/// it is then).
fn reload_requests() -> std::io::Result<tokio::sync::mpsc::Receiver<()>> {
    let mut hangups = signal(SignalKind::hangup())?;
    let (requests, received) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            if let Err(tokio::sync::mpsc::error::TrySendError::Closed(())) = requests.try_send(()) {
                break;
            }
        }
    });
    Ok(received)
}

async fn shutdown_signal() {
    let mut terminate = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
