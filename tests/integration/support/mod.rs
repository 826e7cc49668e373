//! Shared test harness: starts a real quotad server on a free loopback port with a manual clock,
//! and hands out real tonic clients for it.

pub mod billing;
pub mod contract;
pub mod fault_proxy;
pub mod json;
pub mod pki;
pub mod process;
pub mod python;
pub mod redis;
pub mod webdriver;
pub mod webhooks;

use std::net::SocketAddr;
use std::sync::Arc;

use quotad::api::pb;
use quotad::api::pb::admin_service_client::AdminServiceClient;
use quotad::api::pb::quota_service_client::QuotaServiceClient;
use quotad::config::{Config, StoreKind};
use quotad::domain::{ManualClock, Timestamp};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

pub const ADMIN_TOKEN: &str = "test-admin-token";
/// Where test clocks start: 2026-11-24T22:00:00Z, on the hour.
pub const T0: Timestamp = Timestamp::from_millis(1_795_557_600_000);
pub const CREDIT: i64 = 1_000_000;

pub type QuotaClient = QuotaServiceClient<Channel>;
pub type AdminClient = AdminServiceClient<InterceptedService<Channel, BearerToken>>;

/// An AdminService client of the quotad at `url`, with the test admin token.
pub async fn admin_client(url: &str) -> AdminClient {
    let channel = Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    AdminServiceClient::with_interceptor(channel, BearerToken(Some(ADMIN_TOKEN.into())))
}

/// Creates (or changes) account `id` on the plus plan, allowed to buy credits.
pub async fn plus_account(server: &TestServer, id: &str) {
    let account = pb::Account {
        account_id: id.into(),
        plan: "plus".into(),
        credit_purchase_allowed: true,
    };
    let upsert = pb::UpsertAccountRequest {
        account: Some(account),
    };
    server.admin().await.upsert_account(upsert).await.unwrap();
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct BearerToken(pub Option<String>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        Ok(req)
    }
}

/// A quotad serving on 127.0.0.1:<free port>, in this process, with a manual clock.
pub struct TestServer {
    pub addr: SocketAddr,
    pub clock: ManualClock,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// What a test server keeps its state in: the memory store, or Redis (the shared test server,
/// a key prefix of its own; the server owns every partition).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestStore {
    Memory,
    Redis,
}

impl From<StoreKind> for TestStore {
    fn from(kind: StoreKind) -> TestStore {
        match kind {
            StoreKind::Memory => TestStore::Memory,
            StoreKind::Redis => TestStore::Redis,
        }
    }
}

impl TestServer {
    pub async fn start(store: impl Into<TestStore>) -> TestServer {
        Self::start_with(Config::default(), store).await
    }

    /// A server with no admin token configured: AdminService is disabled.
    pub async fn start_without_admin_token(store: impl Into<TestStore>) -> TestServer {
        Self::serve(Self::on_store(Config::default(), store).await).await
    }

    pub async fn start_with(mut config: Config, store: impl Into<TestStore>) -> TestServer {
        config.admin_token = Some(ADMIN_TOKEN.into());
        Self::serve(Self::on_store(config, store).await).await
    }

    /// A server on a Redis of the test's own (which it may pause or stop).
    pub async fn start_on_redis(mut config: Config, url: &str) -> TestServer {
        config.admin_token = Some(ADMIN_TOKEN.into());
        config.store.redis.url = url.to_owned();
        config.store.redis.command_timeout_ms = 3_000;
        config.store.kind = StoreKind::Redis;
        Self::serve(config).await
    }

    /// `config` on `store`: a Redis store is the shared test server, with a key prefix of its own.
    async fn on_store(mut config: Config, store: impl Into<TestStore>) -> Config {
        let store = store.into();
        config.store.kind = match store {
            TestStore::Memory => StoreKind::Memory,
            TestStore::Redis => StoreKind::Redis,
        };
        if config.store.kind == StoreKind::Redis {
            let server = tokio::task::spawn_blocking(redis::shared_server)
                .await
                .unwrap();
            config.store.redis.url = server.url();
            config.store.redis.key_prefix = redis::fresh_prefix();
            config.store.redis.command_timeout_ms = 2_000;
        }
        config
    }

    async fn serve(mut config: Config) -> TestServer {
        config.shutdown_grace_seconds = 5;
        let tls = config.tls.enabled();
        config.validate().expect("test config is valid");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let clock = ManualClock::new(T0);
        let server_clock = Arc::new(clock.clone());
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            let listeners = quotad::Listeners::grpc_only(listener);
            quotad::run(&config, listeners, server_clock, shutdown)
                .await
                .expect("server runs");
        });
        let server = TestServer {
            addr,
            clock,
            shutdown: Some(tx),
            task: Some(task),
        };
        // Over TLS the test checks readiness itself, with its own client certificate.
        if !tls {
            server.wait_until_serving().await;
        }
        server
    }

    /// Polls `grpc.health.v1` until the server says SERVING (its store has answered).
    async fn wait_until_serving(&self) {
        use tonic_health::pb::health_check_response::ServingStatus;
        let mut health = tonic_health::pb::health_client::HealthClient::new(self.channel().await);
        for _ in 0..500 {
            let request = tonic_health::pb::HealthCheckRequest::default();
            if let Ok(answer) = health.check(request).await
                && answer.into_inner().status() == ServingStatus::Serving
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the test server never became ready");
    }

    /// The server's clock, in whole seconds since the epoch.
    pub fn now_secs(&self) -> i64 {
        use quotad::domain::Clock;
        self.clock.now().as_millis().div_euclid(1_000)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .expect("connects to the test server")
    }

    pub async fn quota(&self) -> QuotaClient {
        QuotaServiceClient::new(self.channel().await)
    }

    pub async fn admin(&self) -> AdminClient {
        self.admin_with_token(Some(ADMIN_TOKEN)).await
    }

    pub async fn admin_with_token(&self, token: Option<&str>) -> AdminClient {
        AdminServiceClient::with_interceptor(
            self.channel().await,
            BearerToken(token.map(str::to_owned)),
        )
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

pub fn usage(model: &str, input: u64, cached: u64, output: u64) -> pb::Usage {
    pb::Usage {
        model: model.into(),
        input_tokens: input,
        cached_input_tokens: cached,
        output_tokens: output,
        ..Default::default()
    }
}

/// Usage on gpt-5.5-mini that costs exactly `credits` credits (200 credits per million output tokens).
pub fn costing(credits: u64) -> pb::Usage {
    usage("gpt-5.5-mini", 0, 0, credits * 5_000)
}

/// A Reserve of a task costing exactly `credits` credits.
pub fn reserve_request(
    account: &str,
    request: &str,
    product: &str,
    credits: u64,
) -> pb::ReserveRequest {
    pb::ReserveRequest {
        account_id: account.into(),
        request_id: request.into(),
        product: product.into(),
        estimate: Some(costing(credits)),
        ..Default::default()
    }
}

/// GetUsage until `done` holds (for what runs in the background, such as payments), for at most
/// 10 s.
pub async fn usage_until(
    q: &mut QuotaClient,
    account: &str,
    done: impl Fn(&pb::GetUsageResponse) -> bool,
) -> pb::GetUsageResponse {
    let started = std::time::Instant::now();
    loop {
        let req = pb::GetUsageRequest {
            account_id: account.into(),
            recent_limit: 50,
        };
        let usage = q.get_usage(req).await.unwrap().into_inner();
        if done(&usage) {
            return usage;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "not settled: {usage:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Expands to one test per named function (taking the store kind) per store: `memory::NAME` and
/// `redis::NAME`, each a real server on that store.
macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::support::TestStore::Memory).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::support::TestStore::Redis).await;
                }
            )*
        }
    };
}
pub(crate) use on_every_store;

/// One read of the usage export by consumer group `billing` (up to 1,000 events, deliveries
/// idle past `claim_idle_ms` first), acknowledged if `ack`.
pub async fn export_batch(
    admin: &mut AdminClient,
    claim_idle_ms: u32,
    ack: bool,
) -> Vec<pb::ExportedUsageEvent> {
    let read = pb::ReadUsageExportRequest {
        group: "billing".into(),
        consumer: "test".into(),
        max_events: 1_000,
        claim_idle_ms,
    };
    let events = admin
        .read_usage_export(read)
        .await
        .unwrap()
        .into_inner()
        .events;
    if ack && !events.is_empty() {
        let ack = pb::AckUsageExportRequest {
            group: "billing".into(),
            delivery_ids: events.iter().map(|e| e.delivery_id.clone()).collect(),
        };
        admin.ack_usage_export(ack).await.unwrap();
    }
    events
}
