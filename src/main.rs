//! `quotad`: config → telemetry → app → serve until a signal → drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use quotad::config::Config;
use quotad::domain::SystemClock;
use quotad::server::{self, ServeSettings};

#[derive(Parser)]
#[command(
    name = "quotad",
    version,
    about = "Quota-enforcement sidecar: plan windows, reservations and credits over gRPC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API until SIGTERM or SIGINT.
    Serve(ConfigArgs),
    /// Print the effective configuration (secrets redacted) and exit.
    Config(ConfigArgs),
}

#[derive(Args)]
struct ConfigArgs {
    /// TOML config file (layered over the compiled defaults, under QUOTAD_* variables).
    #[arg(long, env = "QUOTAD_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC listen address; port 0 picks a free port.
    #[arg(long)]
    listen: Option<SocketAddr>,
}

impl ConfigArgs {
    fn load(&self) -> anyhow::Result<Config> {
        let mut config = Config::load(self.config.as_deref())?;
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        config.validate()?;
        Ok(config)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Config(args) => {
            print!("{}", args.load()?.to_toml());
            Ok(())
        }
        Command::Serve(args) => serve(args.load()?).await,
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    quotad::telemetry::init(&config);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let app = quotad::build_memory(&config, Arc::new(SystemClock));
    tracing::info!(store = ?config.store.kind, "listening on {}", listener.local_addr()?);
    let settings = ServeSettings {
        admin_token: config.admin_token.clone(),
        shutdown_grace: Duration::from_secs(config.shutdown_grace_seconds),
    };
    server::run(listener, app, settings, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM (how Kubernetes stops a pod) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for SIGINT: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
