//! Forwarding to the account's owner. On Redis each
//! account is decided by the replica that owns its partition; a call that reaches another
//! replica is refused by its store with the owner's address (`UNAVAILABLE`, metadata
//! `quotad-owner`). This layer then sends the same request to that owner and answers with the
//! owner's answer, so callers may reach any replica. If ownership moved again meanwhile, it
//! tries once more, on the owner the second answer names. Request ids make every retry act once.
//!
//! A forwarded request carries `quotad-forwarded` and is never forwarded again, so replicas with
//! different views of the membership cannot send a call in circles. Every answer says in
//! `quotad-owner` which replica decided it, for clients and ring-hash balancers that can go
//! straight there. The caller's metadata (its bearer token included) goes along unchanged, so
//! the owner checks the same credentials. When quotad serves TLS, forwards go over TLS as well
//! ([`PeerTls`]: the owner's certificate checked, this replica's own presented).
//!
//! Without Redis, and while this replica owns every account, the layer does nothing: a
//! request passes untouched, with no buffering. A call that arrives then and finds its account
//! moved meanwhile (a replica joined) is answered `UNAVAILABLE` with the owner's address, for
//! the caller to retry.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use http_body_util::{BodyExt, Full};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Bytes, http};
use tonic::transport::{Channel, Endpoint};
use tower::{Layer, Service, ServiceExt};

use crate::metrics::Metrics;
use crate::tls::PeerTls;

/// How long a TLS connection to another replica is kept before it is made again with the
/// certificate files read afresh: well within a certificate's renewal window (cert-manager
/// renews at two thirds of a certificate's life, days ahead).
const TLS_RENEW_EVERY: Duration = Duration::from_secs(600);

/// The metadata naming the replica that decided (in an answer) or that decides (in a refusal).
pub const OWNER_HEADER: &str = "quotad-owner";
/// Marks a request sent on by another replica.
pub const FORWARDED_HEADER: &str = "quotad-forwarded";

/// Whether this replica owns every account now (then nothing needs forwarding).
pub type OwnsEverything = Arc<dyn Fn() -> bool + Send + Sync>;

#[derive(Clone)]
pub struct ForwardLayer {
    peers: Option<Arc<Peers>>,
}

impl ForwardLayer {
    /// Forwarding for a replica reached at `own_address` (`None`: not on Redis, inert).
    pub fn new(
        own_address: Option<&str>,
        tls: Option<PeerTls>,
        owns_everything: OwnsEverything,
        connect_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> ForwardLayer {
        ForwardLayer {
            peers: own_address.map(|own| {
                Arc::new(Peers {
                    own: Some(own)
                        .filter(|o| !o.is_empty())
                        .and_then(|o| o.parse().ok()),
                    owns_everything,
                    tls,
                    channels: DashMap::new(),
                    connect_timeout,
                    metrics,
                })
            }),
        }
    }
}

impl<S> Layer<S> for ForwardLayer {
    type Service = Forward<S>;

    fn layer(&self, inner: S) -> Forward<S> {
        Forward {
            inner,
            peers: self.peers.clone(),
        }
    }
}

/// One connection per owner, made on first use and kept (over TLS: remade every
/// [`TLS_RENEW_EVERY`], with the certificate files read again).
struct Peers {
    own: Option<http::HeaderValue>,
    owns_everything: OwnsEverything,
    tls: Option<PeerTls>,
    channels: DashMap<String, (Channel, Instant)>,
    connect_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Peers {
    fn channel(&self, address: &str) -> Result<Channel, Status> {
        let kept = self.channels.get(address).map(|c| c.clone());
        if let Some((channel, made)) = &kept
            && (self.tls.is_none() || made.elapsed() < TLS_RENEW_EVERY)
        {
            return Ok(channel.clone());
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
            .map_err(|e| Status::unavailable(format!("owner address {address:?}: {e}")))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            let configured = tls.client_config().and_then(|config| {
                (endpoint.clone().tls_config(config))
                    .map_err(|e| crate::tls::TlsError::new(e.to_string()))
            });
            endpoint = match (configured, kept) {
                (Ok(endpoint), _) => endpoint,
                (Err(e), Some((channel, _))) => {
                    tracing::warn!("cannot renew TLS to the other replicas, keeping the last: {e}");
                    return Ok(channel);
                }
                (Err(e), None) => {
                    return Err(Status::unavailable(format!(
                        "cannot reach the account's owner at {address} over TLS: {e}"
                    )));
                }
            };
        }
        let channel = endpoint.connect_lazy();
        (self.channels).insert(address.to_owned(), (channel.clone(), Instant::now()));
        Ok(channel)
    }

    /// Sends the request to the replica at `address`.
    async fn send(
        &self,
        address: &str,
        parts: &http::request::Parts,
        body: Bytes,
    ) -> Result<http::Response<Body>, Status> {
        let mut channel = self.channel(address)?;
        let mut request = http::Request::builder()
            .method(parts.method.clone())
            .uri(parts.uri.path_and_query().map_or("/", |p| p.as_str()))
            .version(http::Version::HTTP_2)
            .body(Body::new(Full::new(body)))
            .map_err(|e| Status::internal(format!("forwarding: {e}")))?;
        *request.headers_mut() = parts.headers.clone();
        request
            .headers_mut()
            .insert(FORWARDED_HEADER, http::HeaderValue::from_static("1"));
        let unreachable = |e| {
            Status::unavailable(format!(
                "cannot reach the account's owner at {address}: {e}"
            ))
        };
        let answered = match channel.ready().await {
            Ok(ready) => ready.call(request).await.map_err(unreachable),
            Err(e) => Err(unreachable(e)),
        };
        // Read whole here (an answer is one small message and its trailers): an owner that
        // goes away mid-answer then gives the caller a clear UNAVAILABLE to retry, not a stream
        // reset from this replica's own transport.
        let answered = match answered {
            Ok(answer) => {
                let (head, body) = answer.into_parts();
                match body.collect().await {
                    Ok(whole) => Ok(http::Response::from_parts(head, Body::new(whole))),
                    Err(e) => Err(Status::unavailable(format!(
                        "the account's owner at {address} stopped answering mid-call ({e}); \
                         it may have acted: retry with the same request id"
                    ))),
                }
            }
            Err(status) => Err(status),
        };
        self.metrics.forwarded(match answered {
            Ok(_) => "answered",
            Err(_) => "unreachable",
        });
        answered
    }
}

#[derive(Clone)]
pub struct Forward<S> {
    inner: S,
    peers: Option<Arc<Peers>>,
}

/// The owner a refusal names, if the answer is one.
fn moved_to(response: &http::Response<Body>) -> Option<String> {
    let headers = response.headers();
    let unavailable = headers.get("grpc-status").is_some_and(|s| s == "14");
    let owner = headers.get(OWNER_HEADER)?.to_str().ok()?;
    (unavailable && !owner.is_empty()).then(|| owner.to_owned())
}

fn stamped(
    mut response: http::Response<Body>,
    owner: Option<http::HeaderValue>,
) -> http::Response<Body> {
    if let Some(owner) = owner {
        response.headers_mut().insert(OWNER_HEADER, owner);
    }
    response
}

impl<S> Service<http::Request<Body>> for Forward<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The ready service goes with this call; its clone waits for the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let peers = self.peers.clone();
        Box::pin(async move {
            let Some(peers) = peers else {
                return inner.call(request).await;
            };
            if (peers.owns_everything)() || request.headers().contains_key(FORWARDED_HEADER) {
                // Answered here, or refused with the owner's address (kept as it is).
                let response = inner.call(request).await?;
                let own = moved_to(&response).is_none().then(|| peers.own.clone());
                return Ok(stamped(response, own.flatten()));
            }
            let (parts, body) = request.into_parts();
            let body = match body.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) => {
                    return Ok(Status::cancelled(format!("reading the request: {e}")).into_http());
                }
            };
            let local =
                http::Request::from_parts(parts.clone(), Body::new(Full::new(body.clone())));
            let response = inner.call(local).await?;
            let Some(mut owner) = moved_to(&response) else {
                return Ok(stamped(response, peers.own.clone()));
            };
            for attempt in 0..2 {
                let answer = match peers.send(&owner, &parts, body.clone()).await {
                    Ok(answer) => answer,
                    Err(status) => return Ok(status.into_http()),
                };
                match moved_to(&answer) {
                    Some(next) if attempt == 0 && next != owner => owner = next,
                    Some(_) => return Ok(answer),
                    None => {
                        let decided_by = http::HeaderValue::from_str(&owner).ok();
                        return Ok(stamped(answer, decided_by));
                    }
                }
            }
            unreachable!("the second attempt always answers")
        })
    }
}
