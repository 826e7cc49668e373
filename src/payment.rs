//! Paying for auto top-up purchases. A [`PaymentProvider`] charges the account's default payment
//! method; the worker ([`run_worker`]) takes purchases that operations started, has them paid in
//! the background (never on the Reserve/Commit path), retries a payment that got no settling
//! answer with the same idempotency key, and settles each purchase in the store.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

use crate::domain::money::Money;
use crate::domain::top_up::{PaymentResult, Purchase};

/// One charge: the purchase id is the idempotency key, the same on every retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentRequest {
    pub account_id: String,
    pub purchase_id: String,
    pub amount_micros: i64,
    /// What the credits cost, at the price of credits when the purchase was queued.
    pub price: Money,
}

pub type PaymentFuture = Pin<Box<dyn Future<Output = PaymentResult> + Send>>;

/// Charges an account's default payment method.
pub trait PaymentProvider: Send + Sync + std::fmt::Debug + 'static {
    fn charge(&self, request: PaymentRequest) -> PaymentFuture;
}

/// The embedded provider: approves every charge (or declines every one, for demos).
#[derive(Debug, Clone, Default)]
pub struct SimulatedProvider {
    pub decline: bool,
}

impl PaymentProvider for SimulatedProvider {
    fn charge(&self, request: PaymentRequest) -> PaymentFuture {
        let result = if self.decline {
            PaymentResult::Declined {
                error: "declined by the simulated payment provider".into(),
            }
        } else {
            PaymentResult::Approved {
                payment_id: format!("sim_{}", request.purchase_id),
            }
        };
        Box::pin(async move { result })
    }
}

/// A billing service over HTTP: `POST` of a JSON charge with the purchase id as the
/// `Idempotency-Key` header (so a retry is the same charge), a bearer token and/or an HMAC
/// signature, and a timeout.
///
/// The signature header, when a secret is set, is `Quotad-Signature: t=UNIX_SECONDS,v1=HEX`
/// with HEX the HMAC-SHA256 of `UNIX_SECONDS.BODY` under the shared secret: the service
/// recomputes it over the raw body and refuses stale timestamps, so a captured request can
/// neither be altered nor replayed later.
///
/// Request body: `{"account_id": …, "purchase_id": …, "amount_micros": …, "amount_minor": …,
/// "currency": …}`: the credits bought, and what they cost in the currency's minor units
/// (cents) at the configured price of credits.
/// Answers: 2xx `{"status": "approved", "payment_id": …}` approves; 2xx
/// `{"status": "declined", "error": …}` or 402 declines; anything else (5xx, a timeout, a
/// connection error, a body that says neither) settles nothing and is retried.
#[derive(Clone)]
pub struct HttpProvider {
    url: hyper::Uri,
    auth: HttpAuth,
    hmac: Option<ring::hmac::Key>,
    timeout: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for HttpProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpProvider")
            .field("url", &self.url)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Credentials for the billing service; either, both or neither.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct HttpAuth {
    pub bearer_token: Option<String>,
    pub hmac_secret: Option<String>,
}

impl HttpProvider {
    pub fn new(url: &str, auth: HttpAuth, timeout: Duration) -> Result<HttpProvider, String> {
        let url: hyper::Uri = url
            .parse()
            .map_err(|e| format!("payments.http_url {url:?}: {e}"))?;
        if url.scheme_str() != Some("http") {
            return Err(format!(
                "payments.http_url {url}: only http:// is supported (put TLS in the mesh)"
            ));
        }
        let client = Client::builder(TokioExecutor::new()).build_http();
        let hmac = auth
            .hmac_secret
            .as_deref()
            .map(|secret| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes()));
        Ok(HttpProvider {
            url,
            auth,
            hmac,
            timeout,
            client,
        })
    }

    async fn post(&self, charge: PaymentRequest) -> PaymentResult {
        let failed = |error: String| PaymentResult::Failed { error };
        let body = serde_json::json!({
            "account_id": charge.account_id,
            "purchase_id": charge.purchase_id,
            "amount_micros": charge.amount_micros,
            "amount_minor": charge.price.minor,
            "currency": charge.price.currency.as_str(),
        });
        let body = body.to_string();
        let mut request = hyper::Request::post(self.url.clone())
            .header("content-type", "application/json")
            .header("idempotency-key", &charge.purchase_id);
        if let Some(token) = &self.auth.bearer_token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if let Some(key) = &self.hmac {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            request = request.header("quotad-signature", signature(key, now, &body));
        }
        let request = match request.body(Full::new(Bytes::from(body))) {
            Ok(request) => request,
            Err(e) => return failed(format!("cannot build the billing request: {e}")),
        };
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("billing service: {e}"))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("billing service: {e}"))?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        let (status, body) = match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => {
                return failed(format!(
                    "billing service did not answer within {:?}",
                    self.timeout
                ));
            }
            Ok(Err(e)) => return failed(e),
            Ok(Ok(answer)) => answer,
        };
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let text = |key: &str| {
            answer
                .get(key)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        if status.as_u16() == 402 || (status.is_success() && text("status") == "declined") {
            let error = text("error");
            return PaymentResult::Declined {
                error: if error.is_empty() {
                    "payment declined".into()
                } else {
                    error
                },
            };
        }
        if status.is_success() && text("status") == "approved" && !text("payment_id").is_empty() {
            return PaymentResult::Approved {
                payment_id: text("payment_id"),
            };
        }
        failed(format!("billing service answered {status}"))
    }
}

/// `t=SECONDS,v1=HEX(HMAC-SHA256(key, "SECONDS.BODY"))`.
pub fn signature(key: &ring::hmac::Key, unix_seconds: u64, body: &str) -> String {
    let tag = ring::hmac::sign(key, format!("{unix_seconds}.{body}").as_bytes());
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={unix_seconds},v1={hex}")
}

impl PaymentProvider for HttpProvider {
    fn charge(&self, request: PaymentRequest) -> PaymentFuture {
        let provider = self.clone();
        Box::pin(async move { provider.post(request).await })
    }
}

/// A purchase to have paid, for an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentOrder {
    pub account_id: String,
    pub purchase: Purchase,
    pub price: Money,
}

/// How the worker retries a payment that got no settling answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 8,
            first_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(30),
        }
    }
}

/// Where operations drop the purchases they started; the worker picks them up.
#[derive(Debug)]
pub struct PaymentQueue {
    tx: mpsc::UnboundedSender<PaymentOrder>,
    rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<PaymentOrder>>>,
    /// Purchases this replica is paying now, so a resumed one is not paid twice at once.
    paying: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Default for PaymentQueue {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        PaymentQueue {
            tx,
            rx: std::sync::Mutex::new(Some(rx)),
            paying: Default::default(),
        }
    }
}

impl PaymentQueue {
    /// Queues a purchase for payment at `price`, unless this replica is paying it already.
    pub fn push(&self, account_id: &str, purchase: Purchase, price: Money) {
        let fresh = self
            .paying
            .lock()
            .map(|mut p| p.insert(purchase.id.clone()))
            .unwrap_or(true);
        if fresh {
            // The receiver lives as long as the server; after it is gone nothing can pay anyway,
            // and the purchase stays in flight in the store, to be resumed.
            let _ = self.tx.send(PaymentOrder {
                account_id: account_id.to_owned(),
                purchase,
                price,
            });
        }
    }

    /// This replica is done with the purchase (settled, or given up on for now).
    pub fn done(&self, purchase_id: &str) {
        if let Ok(mut paying) = self.paying.lock() {
            paying.remove(purchase_id);
        }
    }

    /// The receiving end, once (for the worker).
    pub fn take(&self) -> Option<mpsc::UnboundedReceiver<PaymentOrder>> {
        self.rx.lock().ok()?.take()
    }
}

/// Settles a purchase with a payment's result and returns the next purchase, if settling
/// started one.
pub trait Settle: Send + Sync + 'static {
    fn settle(
        &self,
        account_id: &str,
        purchase_id: &str,
        result: PaymentResult,
    ) -> impl Future<Output = Option<Purchase>> + Send;

    /// The worker is done with a purchase (settled, or given up on until it is resumed).
    fn done(&self, purchase_id: &str);
}

/// Pays every order that arrives, each in its own task, until the queue closes.
pub async fn run_worker<T: Settle>(
    mut orders: mpsc::UnboundedReceiver<PaymentOrder>,
    provider: Arc<dyn PaymentProvider>,
    settle: Arc<T>,
    retry: RetryPolicy,
) {
    while let Some(order) = orders.recv().await {
        let (provider, settle) = (provider.clone(), settle.clone());
        tokio::spawn(async move {
            let id = order.purchase.id.clone();
            pay(order, provider.as_ref(), settle.as_ref(), retry).await;
            settle.done(&id);
        });
    }
}

async fn pay<T: Settle>(
    mut order: PaymentOrder,
    provider: &dyn PaymentProvider,
    settle: &T,
    retry: RetryPolicy,
) {
    let mut delay = retry.first_delay;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let request = PaymentRequest {
            account_id: order.account_id.clone(),
            purchase_id: order.purchase.id.clone(),
            amount_micros: order.purchase.amount,
            price: order.price,
        };
        let result = provider.charge(request).await;
        let unsettled = matches!(result, PaymentResult::Failed { .. });
        if let PaymentResult::Failed { error } = &result {
            tracing::warn!(account = %crate::telemetry::account_hash(&order.account_id), attempt, error, "top-up payment got no answer; retrying");
        }
        let next = settle
            .settle(&order.account_id, &order.purchase.id, result)
            .await;
        if unsettled {
            if attempt >= retry.attempts {
                tracing::warn!(account = %crate::telemetry::account_hash(&order.account_id), "top-up payment still unsettled; left in flight");
                return;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(retry.max_delay);
            continue;
        }
        match next {
            // Settling started another purchase (e.g. the first was capped short): pay it too.
            Some(purchase) => {
                settle.done(&order.purchase.id);
                order.purchase = purchase;
                attempt = 0;
                delay = retry.first_delay;
            }
            None => return,
        }
    }
}
