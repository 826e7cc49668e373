//! `quotad`: config → telemetry → app → serve until a signal → drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use quotad::config::{Config, StoreKind};
use quotad::domain::SystemClock;

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
    /// Where account state lives.
    #[arg(long, value_enum)]
    store: Option<StoreKind>,
    /// Redis URL for `--store redis` (redis://, or rediss:// for TLS).
    #[arg(long)]
    redis_url: Option<String>,
}

impl ConfigArgs {
    fn load(&self) -> anyhow::Result<Config> {
        let mut config = Config::load(self.config.as_deref())?;
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(kind) = self.store {
            config.store.kind = kind;
        }
        if let Some(url) = &self.redis_url {
            config.store.redis.url = url.clone();
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
    tracing::info!(store = ?config.store.kind, "listening on {}", listener.local_addr()?);
    quotad::run(&config, listener, Arc::new(SystemClock), shutdown_signal()).await?;
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
