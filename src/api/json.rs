//! The JSON door: every QuotaService and AdminService call as `POST /v1/{Service}/{Method}`
//! with a JSON body in the proto3 JSON mapping, on the gRPC port (HTTP/1.1 or HTTP/2, plain or
//! TLS), the OpenAPI document that describes it at `GET /openapi.json`, and the usage page
//! that calls it (`/usage`, [`super::page`]).
//!
//! The door transcodes: it turns the JSON request into the gRPC call it stands for and sends that
//! through the very stack a gRPC call takes (the guard's admission, deadline and metrics, the
//! bearer and account-token checks, forwarding to the account's owner), then turns the gRPC
//! answer back into JSON. A JSON answer is therefore the gRPC answer by construction, and no rule,
//! check or credential is written twice. The JSON form of each message is generated from
//! `proto/` (`build.rs`), the same mapping `quotactl --json` prints.
//!
//! Errors are JSON too: `{"code": "INVALID_ARGUMENT", "message": "...", "field": "..."}`, with
//! the gRPC code's name, its message, the offending request field when there is one (the
//! `quotad-field` trailer), and the HTTP status Google's API design maps that code to.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use prost::Message;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::Code;
use tonic::body::Body;
use tonic::codegen::http::{self, HeaderMap, HeaderValue, Method, StatusCode, header};
use tower::{Layer, Service};

use super::pb;

/// Where the JSON door's calls live: `/v1/{Service}/{Method}`.
pub const PREFIX: &str = "/v1/";

/// Where the OpenAPI document is served.
pub const OPENAPI_PATH: &str = "/openapi.json";

/// The trailer (and response header) naming the request field an `INVALID_ARGUMENT` is about.
pub const FIELD_HEADER: &str = "quotad-field";

/// The protobuf package of the services the door serves.
pub const PACKAGE: &str = "quota.v1";

/// One call the door serves, with its message types' conversions.
pub struct Route {
    pub service: &'static str,
    pub method: &'static str,
    /// The request and response messages' full protobuf names.
    pub input: &'static str,
    pub output: &'static str,
    request: fn(&[u8]) -> Result<Vec<u8>, serde_json::Error>,
    response: fn(&[u8]) -> Result<Vec<u8>, String>,
}

impl Route {
    /// The call's path on the JSON door.
    pub fn path(&self) -> String {
        format!("{PREFIX}{}/{}", self.service, self.method)
    }

    /// Whether `json` is a request body of this call.
    pub fn parses(&self, json: &[u8]) -> bool {
        (self.request)(json).is_ok()
    }

    /// The call's gRPC path.
    pub fn grpc_path(&self) -> String {
        format!("/{PACKAGE}.{}/{}", self.service, self.method)
    }
}

/// A JSON request body as the protobuf message it maps to. An empty body is the empty message.
fn from_json<T: Message + Default + DeserializeOwned>(
    json: &[u8],
) -> Result<Vec<u8>, serde_json::Error> {
    let message: T = if json.iter().all(u8::is_ascii_whitespace) {
        T::default()
    } else {
        serde_json::from_slice(json)?
    };
    Ok(message.encode_to_vec())
}

/// A protobuf response message as JSON.
fn to_json<T: Message + Default + Serialize>(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let message = T::decode(bytes).map_err(|e| e.to_string())?;
    serde_json::to_vec(&message).map_err(|e| e.to_string())
}

macro_rules! routes {
    ($($service:literal $method:literal: $input:ident -> $output:ident;)*) => {
        /// Every call of QuotaService and AdminService (a test checks the list against the
        /// services in the descriptors, so a new method cannot be left out).
        pub static ROUTES: &[Route] = &[$(Route {
            service: $service,
            method: $method,
            input: concat!("quota.v1.", stringify!($input)),
            output: concat!("quota.v1.", stringify!($output)),
            request: from_json::<pb::$input>,
            response: to_json::<pb::$output>,
        },)*];
    };
}

routes! {
    "QuotaService" "Reserve": ReserveRequest -> ReserveResponse;
    "QuotaService" "Commit": CommitRequest -> CommitResponse;
    "QuotaService" "Release": ReleaseRequest -> ReleaseResponse;
    "QuotaService" "GetUsage": GetUsageRequest -> GetUsageResponse;
    "AdminService" "UpsertAccount": UpsertAccountRequest -> Account;
    "AdminService" "GetAccount": GetAccountRequest -> Account;
    "AdminService" "GrantCredits": GrantCreditsRequest -> GrantCreditsResponse;
    "AdminService" "RevokeGrant": RevokeGrantRequest -> RevokeGrantResponse;
    "AdminService" "SetAutoTopUp": SetAutoTopUpRequest -> AutoTopUp;
    "AdminService" "PreviewAutoTopUp": SetAutoTopUpRequest -> AutoTopUpPreview;
    "AdminService" "MintAccountToken": MintAccountTokenRequest -> AccountToken;
    "AdminService" "ReadUsageExport": ReadUsageExportRequest -> ReadUsageExportResponse;
    "AdminService" "AckUsageExport": AckUsageExportRequest -> AckUsageExportResponse;
}

/// The route at `path` (`/v1/{Service}/{Method}`), if the door serves it.
pub fn route(path: &str) -> Option<&'static Route> {
    let (service, method) = path.strip_prefix(PREFIX)?.split_once('/')?;
    ROUTES
        .iter()
        .find(|r| r.service == service && r.method == method)
}

/// Puts the JSON door in front of a listener's gRPC stack.
#[derive(Clone)]
pub struct JsonLayer {
    with_quota: bool,
    with_admin: bool,
    max_body_bytes: usize,
}

impl JsonLayer {
    /// The door serves the services its listener serves, and bodies up to the gRPC message limit.
    pub fn new(with_quota: bool, with_admin: bool, max_body_bytes: usize) -> JsonLayer {
        JsonLayer {
            with_quota,
            with_admin,
            max_body_bytes,
        }
    }

    fn serves(&self, route: &Route) -> bool {
        match route.service {
            "QuotaService" => self.with_quota,
            _ => self.with_admin,
        }
    }
}

impl<S> Layer<S> for JsonLayer {
    type Service = JsonDoor<S>;

    fn layer(&self, inner: S) -> JsonDoor<S> {
        JsonDoor {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct JsonDoor<S> {
    inner: S,
    layer: JsonLayer,
}

/// A gRPC call's own future (no box added on its way through), or the door's work on a JSON one.
/// The inner future (the guard's, boxed already) is `Unpin`.
pub enum DoorFuture<F, E> {
    Grpc(F),
    Json(Pin<Box<dyn Future<Output = Result<http::Response<Body>, E>> + Send>>),
}

impl<F, E> Future for DoorFuture<F, E>
where
    F: Future<Output = Result<http::Response<Body>, E>> + Unpin,
{
    type Output = Result<http::Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            DoorFuture::Grpc(inner) => Pin::new(inner).poll(cx),
            DoorFuture::Json(door) => door.as_mut().poll(cx),
        }
    }
}

impl<S> Service<http::Request<Body>> for JsonDoor<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + Unpin + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = DoorFuture<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path();
        // gRPC calls pass straight through: a few prefix tests are all the door costs them.
        if !path.starts_with(PREFIX) && path != OPENAPI_PATH && !super::page::serves(path) {
            return DoorFuture::Grpc(self.inner.call(request));
        }
        if super::page::serves(path) {
            let answer = super::page::answer(request.method(), path);
            return DoorFuture::Json(Box::pin(async move { Ok(answer) }));
        }
        if path == OPENAPI_PATH {
            let answer = if request.method() == Method::GET || request.method() == Method::HEAD {
                json_response(StatusCode::OK, super::openapi::document().to_vec())
            } else {
                method_not_allowed("GET")
            };
            return DoorFuture::Json(Box::pin(async move { Ok(answer) }));
        }
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        DoorFuture::Json(Box::pin(transcode(inner, layer, request)))
    }
}

/// One JSON call: checked, turned into its gRPC call, sent through the stack, answered as JSON.
async fn transcode<S>(
    mut inner: S,
    layer: JsonLayer,
    request: http::Request<Body>,
) -> Result<http::Response<Body>, S::Error>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
{
    let Some(route) = route(request.uri().path()).filter(|r| layer.serves(r)) else {
        return Ok(door_error(
            Code::NotFound,
            format!(
                "no JSON call at {}; calls are POST {PREFIX}{{Service}}/{{Method}}, listed in {OPENAPI_PATH}",
                request.uri().path()
            ),
            None,
        ));
    };
    if request.method() != Method::POST {
        return Ok(method_not_allowed("POST"));
    }
    if let Some(kind) = request.headers().get(header::CONTENT_TYPE)
        && !is_json(kind)
    {
        return Ok(json_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            error_body(
                Code::InvalidArgument,
                "content-type: must be application/json".into(),
                Some("content-type"),
            ),
        ));
    }
    let (mut parts, body) = request.into_parts();
    let body = match Limited::new(body, layer.max_body_bytes).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Ok(json_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                error_body(
                    Code::ResourceExhausted,
                    format!("body: larger than {} bytes", layer.max_body_bytes),
                    Some("body"),
                ),
            ));
        }
        Err(e) => {
            return Ok(door_error(
                Code::InvalidArgument,
                format!("body: cannot be read: {e}"),
                Some("body"),
            ));
        }
    };
    let message = match (route.request)(&body) {
        Ok(message) => message,
        Err(e) => {
            return Ok(door_error(
                Code::InvalidArgument,
                format!(
                    "body: not a {} in the proto3 JSON mapping: {e}",
                    route.input
                ),
                Some("body"),
            ));
        }
    };
    parts.uri = match route.grpc_path().parse() {
        Ok(uri) => uri,
        Err(_) => return Ok(door_error(Code::Internal, "bad route".into(), None)),
    };
    parts.version = http::Version::HTTP_2;
    grpc_headers(&mut parts.headers);
    let grpc = http::Request::from_parts(parts, Body::new(Full::new(frame(&message))));
    std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
    let answer = inner.call(grpc).await?;
    Ok(answer_json(route, answer).await)
}

fn is_json(kind: &HeaderValue) -> bool {
    kind.to_str().is_ok_and(|kind| {
        let essence = kind.split(';').next().unwrap_or("").trim();
        essence.eq_ignore_ascii_case("application/json")
    })
}

/// The JSON request's headers as its gRPC call's: credentials, trace context and the caller's
/// own metadata stay; what described the JSON body or its connection goes.
fn grpc_headers(headers: &mut HeaderMap) {
    for name in [
        header::CONTENT_TYPE,
        header::CONTENT_LENGTH,
        header::CONTENT_ENCODING,
        header::ACCEPT_ENCODING,
        header::TRANSFER_ENCODING,
        header::CONNECTION,
        header::TE,
        header::HOST,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    let grpc_own: Vec<_> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("grpc-"))
        .cloned()
        .collect();
    for name in grpc_own {
        headers.remove(name);
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
}

/// A gRPC message frame: uncompressed, length-prefixed.
fn frame(message: &[u8]) -> Bytes {
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    Bytes::from(framed)
}

/// The gRPC answer as JSON: the response message, or the status as a JSON error.
async fn answer_json(route: &Route, answer: http::Response<Body>) -> http::Response<Body> {
    let (parts, body) = answer.into_parts();
    let collected = match body.collect().await {
        Ok(collected) => collected,
        Err(e) => {
            return door_error(Code::Unavailable, format!("the call broke off: {e}"), None);
        }
    };
    let trailers = collected.trailers().cloned();
    let status = tonic::Status::from_header_map(&parts.headers)
        .or_else(|| trailers.as_ref().and_then(tonic::Status::from_header_map));
    let mut response = match status {
        Some(status) if status.code() != Code::Ok => {
            let field = status
                .metadata()
                .get(FIELD_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            door_error(status.code(), status.message().to_owned(), field.as_deref())
        }
        _ => {
            let bytes = collected.to_bytes();
            let decoded = match bytes.get(..5) {
                Some([0, len @ ..])
                    if bytes.len()
                        == 5 + u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize =>
                {
                    (route.response)(&bytes[5..])
                }
                _ => Err("not one uncompressed gRPC message".to_owned()),
            };
            match decoded {
                Ok(json) => json_response(StatusCode::OK, json),
                Err(e) => door_error(Code::Internal, format!("the answer: {e}"), None),
            }
        }
    };
    // What the stack says about the call itself (the account's owner) reaches JSON callers too.
    if let Some(owner) = parts.headers.get(super::forward::OWNER_HEADER) {
        response
            .headers_mut()
            .insert(super::forward::OWNER_HEADER, owner.clone());
    }
    response
}

/// The HTTP status Google's API design gives a gRPC code.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A gRPC code's name as the JSON error's `code` (`INVALID_ARGUMENT`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The JSON error body.
#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

fn error_body(code: Code, message: String, field: Option<&str>) -> Vec<u8> {
    let body = ErrorBody {
        code: code_name(code),
        message,
        field,
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

fn door_error(code: Code, message: String, field: Option<&str>) -> http::Response<Body> {
    json_response(http_status(code), error_body(code, message, field))
}

fn method_not_allowed(allowed: &'static str) -> http::Response<Body> {
    let mut response = json_response(
        StatusCode::METHOD_NOT_ALLOWED,
        error_body(
            Code::InvalidArgument,
            format!("method: must be {allowed}"),
            Some("method"),
        ),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allowed));
    response
}

fn json_response(status: StatusCode, body: Vec<u8>) -> http::Response<Body> {
    let mut response = http::Response::new(Body::new(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_of_the_two_services_has_a_route_with_its_messages() {
        let set = prost_types::FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET).unwrap();
        let mut served = Vec::new();
        for file in set.file.iter().filter(|f| f.package() == PACKAGE) {
            for service in &file.service {
                for method in &service.method {
                    served.push((
                        service.name().to_owned(),
                        method.name().to_owned(),
                        method.input_type().trim_start_matches('.').to_owned(),
                        method.output_type().trim_start_matches('.').to_owned(),
                    ));
                }
            }
        }
        let routed: Vec<_> = ROUTES
            .iter()
            .map(|r| {
                (
                    r.service.to_owned(),
                    r.method.to_owned(),
                    r.input.to_owned(),
                    r.output.to_owned(),
                )
            })
            .collect();
        assert_eq!(routed, served);
    }

    #[test]
    fn routes_are_found_by_path_and_nothing_else_is() {
        let reserve = route("/v1/QuotaService/Reserve").unwrap();
        assert_eq!(reserve.grpc_path(), "/quota.v1.QuotaService/Reserve");
        assert_eq!(reserve.path(), "/v1/QuotaService/Reserve");
        assert!(route("/v1/QuotaService/Nope").is_none());
        assert!(route("/v1/QuotaService").is_none());
        assert!(route("/quota.v1.QuotaService/Reserve").is_none());
    }

    #[test]
    fn json_bodies_follow_the_proto3_mapping_both_ways() {
        let reserve = route("/v1/QuotaService/Reserve").unwrap();
        let bytes = (reserve.request)(
            br#"{"accountId":"acct-1","request_id":"r1","estimate":{"inputTokens":"12","images":2}}"#,
        )
        .unwrap();
        let message = pb::ReserveRequest::decode(&bytes[..]).unwrap();
        assert_eq!(message.account_id, "acct-1");
        assert_eq!(message.request_id, "r1");
        assert_eq!(message.estimate.unwrap().input_tokens, 12);
        assert!((reserve.request)(br#"{"accountId": 5}"#).is_err());
        assert!((reserve.request)(br#"{"noSuchField": 1}"#).is_err());
        assert_eq!((reserve.request)(b"  ").unwrap(), Vec::<u8>::new());

        let usage = route("/v1/QuotaService/GetUsage").unwrap();
        let answer = pb::GetUsageResponse {
            credit_balance_micros: 5,
            ..Default::default()
        };
        let json: serde_json::Value =
            serde_json::from_slice(&(usage.response)(&answer.encode_to_vec()).unwrap()).unwrap();
        // 64-bit integers are strings in the mapping; fields are lowerCamelCase.
        assert_eq!(json["creditBalanceMicros"], "5");
    }

    #[test]
    fn every_code_has_a_name_and_an_http_status() {
        assert_eq!(code_name(Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(http_status(Code::InvalidArgument), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(http_status(Code::AlreadyExists), StatusCode::CONFLICT);
        assert_eq!(http_status(Code::Unauthenticated), StatusCode::UNAUTHORIZED);
        assert_eq!(http_status(Code::PermissionDenied), StatusCode::FORBIDDEN);
        assert_eq!(
            http_status(Code::Unavailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
