//! A real HTTP billing service for tests: plain HTTP/1.1 on a loopback port, one request per
//! connection, answering from a script and remembering what it was sent.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How the billing endpoint answers one request.
#[derive(Debug, Clone)]
pub enum Answer {
    Approve,
    Decline,
    ServerError,
    /// Wait this long before approving (longer than quotad's timeout, or than it lives).
    Stall(Duration),
}

#[derive(Debug, Clone)]
pub struct Seen {
    pub idempotency_key: String,
    pub authorization: String,
    /// The `Quotad-Signature` header, and the body exactly as sent, to check it against.
    pub signature: String,
    pub raw_body: String,
    pub body: serde_json::Value,
}

#[derive(Default)]
pub struct Billing {
    script: Mutex<VecDeque<Answer>>,
    seen: Mutex<Vec<Seen>>,
}

impl Billing {
    pub fn answers(&self, answers: &[Answer]) {
        self.script.lock().unwrap().extend(answers.iter().cloned());
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// A minimal HTTP/1.1 billing service: one request per connection, answers from the script
/// (approve when the script is empty).
pub async fn billing_service() -> (String, Arc<Billing>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/charges", listener.local_addr().unwrap());
    let billing = Arc::new(Billing::default());
    let state = billing.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let mut raw = Vec::new();
                let mut buf = [0u8; 4096];
                let (head, body) = loop {
                    let n = socket.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    raw.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&raw).into_owned();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if body.len() >= length {
                            break (head.to_owned(), body[..length].to_owned());
                        }
                    }
                };
                let header = |name: &str| {
                    head.lines()
                        .find_map(|l| {
                            l.split_once(':')
                                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                                .map(|(_, v)| v.trim().to_owned())
                        })
                        .unwrap_or_default()
                };
                let seen = Seen {
                    idempotency_key: header("idempotency-key"),
                    authorization: header("authorization"),
                    signature: header("quotad-signature"),
                    body: serde_json::from_str(&body).unwrap(),
                    raw_body: body,
                };
                let key = seen.idempotency_key.clone();
                state.seen.lock().unwrap().push(seen);
                let answer = state
                    .script
                    .lock()
                    .unwrap()
                    .pop_front()
                    .unwrap_or(Answer::Approve);
                let (status, json) = match answer {
                    Answer::Approve => (
                        "200 OK",
                        format!(r#"{{"status":"approved","payment_id":"pay_{key}"}}"#),
                    ),
                    Answer::Decline => (
                        "402 Payment Required",
                        r#"{"status":"declined","error":"card declined"}"#.to_owned(),
                    ),
                    Answer::ServerError => ("500 Internal Server Error", "{}".to_owned()),
                    Answer::Stall(wait) => {
                        tokio::time::sleep(wait).await;
                        (
                            "200 OK",
                            format!(r#"{{"status":"approved","payment_id":"late_{key}"}}"#),
                        )
                    }
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{json}",
                    json.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    (url, billing)
}
