//! Delivering notifications as signed HTTP webhooks. The rules record each notification in its
//! account's state with the decision that caused it ([`crate::domain::notice`]); the
//! maintenance pass finds accounts with notifications pending and queues them here; the
//! [`run_worker`] posts them in the background (never on the Reserve/Commit path), one account's
//! in the order recorded, retries with back-off until the receiver answers 2xx, and only then
//! has the store forget each one. So delivery is at least once: a crash, a timeout or a lost
//! answer means the same notification, with the same id, is posted again.
//!
//! The request is a `POST` of the event as JSON, with the event id as `Idempotency-Key` and a
//! `Quotad-Signature` header exactly as payments sign ([`crate::payment::signature`]):
//! `t=UNIX_SECONDS,v1=HEX(HMAC-SHA256(secret, "UNIX_SECONDS.BODY"))`.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

use crate::domain::notice::{Notice, NoticeKind};
use crate::metrics::Metrics;

/// Why a webhook endpoint cannot be used as configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("notifications.webhook_url {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("notifications.webhook_url {0}: only http:// is supported (put TLS in the mesh)")]
    NotHttp(String),
    #[error("notifications.hmac_secret must be at least 16 bytes")]
    ShortSecret,
}

/// Why one delivery attempt did not land; each is retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    #[error("the receiver answered {0}")]
    Status(u16),
    #[error("the receiver did not answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach the receiver: {0}")]
    Transport(String),
}

/// How the worker retries a notification the receiver did not take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// Attempts in a row before the worker lets the account rest for `max_delay` (the
    /// maintenance pass queues it again after that); nothing is dropped.
    pub attempts: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            first_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(60),
            attempts: 10,
        }
    }
}

/// A webhook receiver: where events are posted and the secret they are signed with.
#[derive(Clone)]
pub struct Webhook {
    url: hyper::Uri,
    key: ring::hmac::Key,
    timeout: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &self.url)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Webhook {
    pub fn new(url: &str, secret: &str, timeout: Duration) -> Result<Webhook, WebhookError> {
        let parsed: hyper::Uri =
            url.parse()
                .map_err(|e: hyper::http::uri::InvalidUri| WebhookError::Url {
                    url: url.to_owned(),
                    reason: e.to_string(),
                })?;
        if parsed.scheme_str() != Some("http") || parsed.host().is_none() {
            return Err(WebhookError::NotHttp(url.to_owned()));
        }
        if secret.len() < 16 {
            return Err(WebhookError::ShortSecret);
        }
        Ok(Webhook {
            url: parsed,
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes()),
            timeout,
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// Posts one notification; `Ok` once the receiver answered 2xx.
    pub async fn post(&self, account_id: &str, notice: &Notice) -> Result<(), DeliveryError> {
        let body = event_body(account_id, notice);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let request = hyper::Request::post(self.url.clone())
            .header("content-type", "application/json")
            .header("idempotency-key", notice.id(account_id))
            .header(
                "quotad-signature",
                crate::payment::signature(&self.key, now, &body),
            )
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| DeliveryError::Transport(e.to_string()))?;
        let exchange = async {
            let response = (self.client.request(request).await)
                .map_err(|e| DeliveryError::Transport(e.to_string()))?;
            let status = response.status();
            // Read the answer to its end, so the connection can be used again.
            let _ = response.into_body().collect().await;
            Ok::<_, DeliveryError>(status)
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => Err(DeliveryError::Timeout(self.timeout)),
            Ok(Err(e)) => Err(e),
            Ok(Ok(status)) if status.is_success() => Ok(()),
            Ok(Ok(status)) => Err(DeliveryError::Status(status.as_u16())),
        }
    }
}

/// The JSON a receiver gets: `id`, `type`, `account_id`, `at` (RFC 3339, quotad's clock when
/// the decision was made) and the event's own fields, amounts as integer micro-credits.
pub fn event_body(account_id: &str, notice: &Notice) -> String {
    let mut event = serde_json::json!({
        "id": notice.id(account_id),
        "type": notice.kind.type_name(),
        "account_id": account_id,
        "at": notice.at.to_string(),
    });
    let fields = match &notice.kind {
        NoticeKind::CreditsLow { balance, threshold } => serde_json::json!({
            "balance_micros": balance,
            "threshold_micros": threshold,
        }),
        NoticeKind::TopUpSucceeded {
            purchase_id,
            amount,
            payment_id,
            balance,
        } => serde_json::json!({
            "purchase_id": purchase_id,
            "amount_micros": amount,
            "payment_id": payment_id,
            "balance_micros": balance,
        }),
        NoticeKind::TopUpDeclined {
            purchase_id,
            amount,
            error,
            consecutive_declines,
        } => serde_json::json!({
            "purchase_id": purchase_id,
            "amount_micros": amount,
            "error": error,
            "consecutive_declines": consecutive_declines,
        }),
        NoticeKind::TopUpDisabled {
            consecutive_declines,
            error,
        } => serde_json::json!({
            "consecutive_declines": consecutive_declines,
            "error": error,
        }),
        NoticeKind::WindowExhausted {
            window,
            used,
            limit,
            resets_at,
        } => serde_json::json!({
            "window": window,
            "used_micros": used,
            "limit_micros": limit,
            "resets_at": resets_at.map(|at| at.to_string()),
        }),
    };
    if let (Some(event), serde_json::Value::Object(fields)) = (event.as_object_mut(), fields) {
        event.extend(fields);
    }
    event.to_string()
}

/// An account's pending notifications, to deliver in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoticeOrder {
    pub account_id: String,
    pub notices: Vec<Notice>,
}

/// Where the maintenance pass drops accounts with notifications pending; the worker picks them
/// up. An account is delivered by one task at a time, so its events arrive in order.
#[derive(Debug)]
pub struct NoticeQueue {
    tx: mpsc::UnboundedSender<NoticeOrder>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<NoticeOrder>>>,
    /// Accounts being delivered now, and those resting after failed attempts (until when).
    delivering: Mutex<HashSet<String>>,
    resting: Mutex<HashMap<String, Instant>>,
}

impl Default for NoticeQueue {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        NoticeQueue {
            tx,
            rx: Mutex::new(Some(rx)),
            delivering: Default::default(),
            resting: Default::default(),
        }
    }
}

impl NoticeQueue {
    /// Queues an account's pending notifications, unless this replica is delivering them, or
    /// letting the account's receiver rest, already.
    pub fn push(&self, order: NoticeOrder) {
        if let Ok(mut resting) = self.resting.lock() {
            match resting.get(&order.account_id) {
                Some(until) if Instant::now() < *until => return,
                Some(_) => {
                    resting.remove(&order.account_id);
                }
                None => {}
            }
        }
        let fresh = (self.delivering.lock())
            .map(|mut d| d.insert(order.account_id.clone()))
            .unwrap_or(true);
        if fresh {
            // The receiver lives as long as the server; after that the notices stay pending in
            // the store, to be delivered after the restart.
            let _ = self.tx.send(order);
        }
    }

    /// This replica is done with the account for now; with `rest`, it is not queued again
    /// before that long has passed.
    pub fn done(&self, account_id: &str, rest: Option<Duration>) {
        if let Some(rest) = rest
            && let Ok(mut resting) = self.resting.lock()
        {
            resting.insert(account_id.to_owned(), Instant::now() + rest);
        }
        if let Ok(mut delivering) = self.delivering.lock() {
            delivering.remove(account_id);
        }
    }

    /// The receiving end, once (for the worker).
    pub fn take(&self) -> Option<mpsc::UnboundedReceiver<NoticeOrder>> {
        self.rx.lock().ok()?.take()
    }
}

/// Forgets a notification its receiver has, in the store.
pub trait Outbox: Send + Sync + 'static {
    /// Whether the store forgot it (or had already); an error leaves it pending, to be posted
    /// again later.
    fn delivered(&self, account_id: &str, seq: u64) -> impl Future<Output = bool> + Send;

    /// The worker is done with the account for now (see [`NoticeQueue::done`]).
    fn done(&self, account_id: &str, rest: Option<Duration>);
}

/// Accounts whose notifications are being posted at once, at most: a backlog (a receiver that
/// was down, many accounts crossing a threshold together) reaches the receiver a few requests
/// at a time, not all at once.
pub const MAX_ACCOUNTS_IN_FLIGHT: usize = 16;

/// Delivers every order that arrives, each account in its own task (at most
/// [`MAX_ACCOUNTS_IN_FLIGHT`] at once), until the queue closes.
pub async fn run_worker<T: Outbox>(
    mut orders: mpsc::UnboundedReceiver<NoticeOrder>,
    webhook: Arc<Webhook>,
    outbox: Arc<T>,
    backoff: Backoff,
    metrics: Arc<Metrics>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ACCOUNTS_IN_FLIGHT));
    while let Some(order) = orders.recv().await {
        // Never closed: the worker owns it.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (webhook, outbox, metrics) = (webhook.clone(), outbox.clone(), metrics.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let account_id = order.account_id.clone();
            let rest = deliver(order, &webhook, outbox.as_ref(), backoff, &metrics).await;
            outbox.done(&account_id, rest);
        });
    }
}

/// Delivers an account's notifications in order; answers how long to rest if the receiver
/// kept failing.
async fn deliver<T: Outbox>(
    order: NoticeOrder,
    webhook: &Webhook,
    outbox: &T,
    backoff: Backoff,
    metrics: &Metrics,
) -> Option<Duration> {
    let account = crate::telemetry::account_hash(&order.account_id);
    for notice in &order.notices {
        let kind = notice.kind.type_name();
        let mut delay = backoff.first_delay;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match webhook.post(&order.account_id, notice).await {
                Ok(()) => {
                    metrics.webhook(kind, "delivered");
                    if !outbox.delivered(&order.account_id, notice.seq).await {
                        // Still pending in the store (unavailable, or the account moved to
                        // another replica): posted again later, with the same id.
                        return Some(backoff.max_delay);
                    }
                    break;
                }
                Err(error) => {
                    metrics.webhook(kind, "failed");
                    tracing::warn!(%account, attempt, kind, %error, "webhook not delivered; retrying");
                    if attempt >= backoff.attempts.max(1) {
                        return Some(backoff.max_delay);
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(backoff.max_delay);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Timestamp;

    #[test]
    fn the_body_has_the_id_type_account_time_and_integer_amounts() {
        let notice = Notice {
            seq: 7,
            at: Timestamp::from_millis(1_795_557_600_000),
            kind: NoticeKind::TopUpSucceeded {
                purchase_id: "topup:a:1".into(),
                amount: 30_000_000,
                payment_id: "pay_1".into(),
                balance: 35_000_000,
            },
        };
        let body: serde_json::Value = serde_json::from_str(&event_body("a", &notice)).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "id": "ntf:a:7",
                "type": "top_up.succeeded",
                "account_id": "a",
                "at": "2026-11-24T22:00:00.000Z",
                "purchase_id": "topup:a:1",
                "amount_micros": 30_000_000,
                "payment_id": "pay_1",
                "balance_micros": 35_000_000,
            })
        );
    }

    #[test]
    fn only_plain_http_receivers_with_a_real_secret() {
        let ok = Webhook::new(
            "http://hooks:8080/quotad",
            "0123456789abcdef",
            Duration::ZERO,
        );
        assert!(ok.is_ok());
        for (url, secret, expected) in [
            ("https://hooks/x", "0123456789abcdef", "only http://"),
            ("not a url", "0123456789abcdef", "webhook_url"),
            ("http://hooks/x", "short", "at least 16 bytes"),
        ] {
            let err = Webhook::new(url, secret, Duration::ZERO).unwrap_err();
            assert!(err.to_string().contains(expected), "{err}");
        }
    }

    #[test]
    fn a_resting_account_is_not_queued_again_before_its_time() {
        let queue = NoticeQueue::default();
        let mut rx = queue.take().unwrap();
        let order = NoticeOrder {
            account_id: "a".into(),
            notices: Vec::new(),
        };
        queue.push(order.clone());
        queue.push(order.clone());
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err(), "once while it is being delivered");
        queue.done("a", Some(Duration::from_secs(60)));
        queue.push(order.clone());
        assert!(rx.try_recv().is_err(), "resting");
        queue.done("a", Some(Duration::ZERO));
        queue.push(order);
        assert!(rx.try_recv().is_ok(), "after its rest");
    }
}
