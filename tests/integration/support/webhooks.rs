//! A real webhook receiver for tests: a hyper HTTP/1.1 server on a loopback port that checks
//! each request's `Quotad-Signature` over the raw body as a receiver would, answers 500 to the
//! first delivery of each event id (or to every delivery while told to be down) and 200 after,
//! and remembers every delivery.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub idempotency_key: String,
    pub signature: String,
    pub signature_valid: bool,
    pub raw_body: String,
    pub body: serde_json::Value,
    /// What the receiver answered.
    pub status: u16,
}

pub struct Receiver {
    secret: String,
    /// Answer 500 to everything.
    down: AtomicBool,
    /// Event ids answered 500 once already.
    failed_once: Mutex<HashSet<String>>,
    seen: Mutex<Vec<Delivery>>,
}

impl Receiver {
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.seen.lock().unwrap().clone()
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// The ids answered 200, in the order first answered so.
    pub fn accepted_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = Vec::new();
        for d in self.deliveries() {
            let id = d.body["id"].as_str().unwrap_or_default().to_owned();
            if d.status == 200 && !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }

    fn answer(&self, head: &hyper::http::request::Parts, raw: Bytes) -> u16 {
        let header = |name: &str| {
            (head.headers.get(name))
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let raw_body = String::from_utf8_lossy(&raw).into_owned();
        let signature = header("quotad-signature");
        let body: serde_json::Value = serde_json::from_str(&raw_body).unwrap_or_default();
        let id = body["id"].as_str().unwrap_or_default().to_owned();
        let status =
            if self.down.load(Ordering::SeqCst) || self.failed_once.lock().unwrap().insert(id) {
                500
            } else {
                200
            };
        self.seen.lock().unwrap().push(Delivery {
            idempotency_key: header("idempotency-key"),
            signature_valid: signature_is_valid(&self.secret, &signature, &raw_body),
            signature,
            raw_body,
            body,
            status,
        });
        status
    }
}

/// What a receiver does with `Quotad-Signature: t=SECONDS,v1=HEX`: recompute the HMAC-SHA256
/// of `SECONDS.BODY` under the shared secret, and refuse a stale timestamp.
pub fn signature_is_valid(secret: &str, signature: &str, raw_body: &str) -> bool {
    let Some((t, v1)) = signature
        .strip_prefix("t=")
        .and_then(|rest| rest.split_once(",v1="))
    else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag: Vec<u8> = (0..v1.len() / 2)
        .filter_map(|i| u8::from_str_radix(&v1[2 * i..2 * i + 2], 16).ok())
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let fresh = t.parse::<u64>().is_ok_and(|t| now.abs_diff(t) < 300);
    fresh && ring::hmac::verify(&key, format!("{t}.{raw_body}").as_bytes(), &tag).is_ok()
}

/// Starts a receiver checking signatures under `secret`; its URL and its state.
pub async fn receiver(secret: &str) -> (String, Arc<Receiver>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/quotad-events", listener.local_addr().unwrap());
    let state = Arc::new(Receiver {
        secret: secret.to_owned(),
        down: AtomicBool::new(false),
        failed_once: Mutex::default(),
        seen: Mutex::default(),
    });
    let serving = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let state = serving.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let state = state.clone();
                    async move {
                        let (head, body) = request.into_parts();
                        let raw = body.collect().await.map(|b| b.to_bytes());
                        let status = match raw {
                            Ok(raw) => state.answer(&head, raw),
                            Err(_) => 400,
                        };
                        let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
                        *response.status_mut() = StatusCode::from_u16(status).unwrap();
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    (url, state)
}
