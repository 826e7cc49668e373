//! `quotad`: config → runtime → telemetry → listeners → serve until a signal (reloading the rules on
//! SIGHUP or a changed file) → drain → flush.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use quotad::Listeners;
use quotad::config::{Config, ConfigSource, Overrides, StoreKind};
use quotad::domain::SystemClock;
use quotad::telemetry::Telemetry;

// Many small, short-lived allocations per call (HTTP/2 frames, headers, futures, answers):
// mimalloc's thread-local free lists take a measurable share off the system allocator's cost.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Redis URL for `--store redis` (redis://, rediss:// for TLS, or
    /// redis+sentinel://host:port[,host:port…]/SERVICE for a master behind Sentinel).
    #[arg(long)]
    redis_url: Option<String>,
    /// Keep what the memory store decides in this directory (an embedded database), so that
    /// it survives a restart; one quotad process per directory.
    #[arg(long, env = "QUOTAD_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

impl ConfigArgs {
    fn source(self) -> ConfigSource {
        ConfigSource {
            file: self.config,
            overrides: Overrides {
                listen: self.listen,
                store: self.store,
                redis_url: self.redis_url,
                data_dir: self.data_dir,
            },
        }
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Config(args) => {
            print!("{}", args.source().load()?.to_toml());
            Ok(())
        }
        Command::Serve(args) => {
            let source = args.source();
            let config = source.load()?;
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            if config.server.worker_threads > 0 {
                runtime.worker_threads(config.server.worker_threads);
            }
            let runtime = runtime
                .enable_all()
                .build()
                .context("cannot start the runtime")?;
            runtime.block_on(serve(source, config))
        }
    }
}

async fn serve(source: ConfigSource, config: Config) -> anyhow::Result<()> {
    let telemetry = Telemetry::init(&config)?;
    let bind = |addr: SocketAddr, what: &'static str| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} ({what})"))
    };
    let listeners = Listeners {
        grpc: bind(config.listen, "listen").await?,
        admin: match config.admin_listen {
            Some(addr) => Some(bind(addr, "admin_listen").await?),
            None => None,
        },
        http: match config.http_listen {
            Some(addr) => Some(bind(addr, "http_listen").await?),
            None => None,
        },
    };
    tracing::info!(
        store = ?config.store.kind,
        tls = config.tls.enabled(),
        otlp = telemetry.exporting(),
        "listening on {}",
        listeners.grpc.local_addr()?
    );
    if let Some(admin) = &listeners.admin {
        tracing::info!("AdminService at {}", admin.local_addr()?);
    }
    if let Some(http) = &listeners.http {
        tracing::info!("metrics and probes at http://{}", http.local_addr()?);
    }
    let clock = Arc::new(SystemClock);
    let served = quotad::run_reloading(source, &config, listeners, clock, shutdown_signal()).await;
    tracing::info!("stopped");
    telemetry.shutdown();
    Ok(served?)
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
