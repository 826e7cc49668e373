//! Why a call failed, in one line that says what to do.
//!
//! A refusal from quotad (a gRPC status it sent) is named by its code and message; refusals
//! with a known cure get the cure instead: a missing or wrong token names the option that
//! carries it. A failure below gRPC (no TCP connection, a TLS handshake that failed, a server
//! that does not speak HTTP/2) carries a chain of errors from tonic, hyper and rustls; it is
//! read for a known cause (certificate not trusted, client certificate required) and, when the
//! chain alone cannot tell, the address is probed (`probe.rs`). Each piece of text appears
//! once: wrappers that repeat their cause ("transport error: transport error") are folded.

use std::error::Error as StdError;
use std::fmt;

use tonic::{Code, Status};

use crate::bench::ERROR_NAMES;
use crate::connect::{CALL_TIMEOUT, CONNECT_TIMEOUT, Connection};
use crate::probe;

/// Which of quotad's services a call went to: it decides which token was needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Quota,
    Admin,
    /// Envoy's `envoy.service.ratelimit.v3.RateLimitService`, guarded by the quota token.
    Rls,
    Health,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Service::Quota => "QuotaService",
            Service::Admin => "AdminService",
            Service::Rls => "Envoy rate limit (RLS)",
            Service::Health => "grpc.health.v1",
        }
    }
}

/// A failed connection or call.
#[derive(Debug)]
pub enum Failure {
    /// The connection could not be made (TCP, TLS or HTTP/2).
    Connect(tonic::transport::Error),
    /// A call failed: refused by quotad, or broken below gRPC (the status then has a source).
    Call { service: Service, status: Status },
}

impl fmt::Display for Failure {
    /// Without the probes of [`explain`]: for contexts that cannot wait for them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Connect(e) => f.write_str(&chain_text(e)),
            Failure::Call { status, .. } if status.source().is_some() => {
                f.write_str(&status_text(status))
            }
            Failure::Call { status, .. } => f.write_str(&refusal_text(status)),
        }
    }
}

impl StdError for Failure {}

/// `call.await.answer(Service::Quota)?`: the answer's message, or a [`Failure`] naming the service.
pub trait Answer<T> {
    fn answer(self, service: Service) -> Result<T, Failure>;
}

impl<T> Answer<T> for Result<tonic::Response<T>, Status> {
    fn answer(self, service: Service) -> Result<T, Failure> {
        self.map(tonic::Response::into_inner)
            .map_err(|status| Failure::Call { service, status })
    }
}

/// The proto name of a gRPC code, e.g. `UNAUTHENTICATED`.
pub fn code_name(code: Code) -> &'static str {
    ERROR_NAMES[code as usize]
}

/// `CODE: message`, or `CODE` alone.
fn refusal_text(status: &Status) -> String {
    let code = code_name(status.code());
    match status.message() {
        "" => code.to_owned(),
        message => format!("{code}: {message}"),
    }
}

/// A status made on this side (no connection, broken connection): its message and the chain
/// of causes, each piece once.
pub fn status_text(status: &Status) -> String {
    let mut parts = vec![status.message().to_owned()];
    if let Some(source) = status.source() {
        parts.extend(chain(source));
    }
    join_once(parts)
}

/// An error and its causes, each piece once: "transport error: tcp connect error: Connection
/// refused (os error 111)" rather than every layer repeating the one below.
pub fn chain_text(error: &(dyn StdError + 'static)) -> String {
    join_once(chain(error))
}

fn chain(error: &(dyn StdError + 'static)) -> Vec<String> {
    let mut parts = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        parts.push(e.to_string());
        next = e.source();
    }
    parts
}

/// Joins with ": ", leaving out empty pieces, generic ones ("transport error") when more
/// follows, and pieces already said by another (wrappers often repeat their cause).
fn join_once(parts: Vec<String>) -> String {
    let parts: Vec<String> = parts
        .into_iter()
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    let mut kept: Vec<&str> = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let said_elsewhere = parts
            .iter()
            .enumerate()
            .any(|(j, other)| j != i && other.contains(part.as_str()) && (other != part || j < i));
        let generic = matches!(part.as_str(), "transport error" | "error trying to connect")
            && i + 1 < parts.len();
        if !said_elsewhere && !generic {
            kept.push(part);
        }
    }
    if kept.is_empty() {
        return parts.last().cloned().unwrap_or_default();
    }
    kept.join(": ")
}

/// Every error of the chain, looking inside `io::Error`s too (their `source` skips the error
/// they wrap, which is where rustls's error sits).
fn causes<'a>(error: &'a (dyn StdError + 'static)) -> Vec<&'a (dyn StdError + 'static)> {
    let mut out = Vec::new();
    let mut todo = vec![error];
    while let Some(e) = todo.pop() {
        out.push(e);
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            todo.push(inner);
        }
        if let Some(source) = e.source() {
            todo.push(source);
        }
    }
    out
}

fn find<'a, E: StdError + 'static>(causes: &[&'a (dyn StdError + 'static)]) -> Option<&'a E> {
    causes.iter().find_map(|e| e.downcast_ref::<E>())
}

/// The whole error as one line: contexts added on the way up, then the failure explained.
pub async fn explain(error: &anyhow::Error, conn: &Connection) -> String {
    let mut parts = Vec::new();
    for cause in error.chain() {
        if let Some(failure) = cause.downcast_ref::<Failure>() {
            parts.push(describe(failure, conn).await);
            break;
        }
        parts.push(cause.to_string());
    }
    join_once(parts)
}

/// An error before any connection (bad options): its chain, each piece once.
pub fn plain(error: &anyhow::Error) -> String {
    join_once(error.chain().map(ToString::to_string).collect())
}

async fn describe(failure: &Failure, conn: &Connection) -> String {
    match failure {
        Failure::Call { service, status } if status.source().is_none() => {
            refused(*service, status, conn)
        }
        Failure::Call { status, .. } => {
            let detail = status_text(status);
            broken(causes(status), detail, conn).await
        }
        Failure::Connect(e) => broken(causes(e), chain_text(e), conn).await,
    }
}

/// quotad answered with an error status.
fn refused(service: Service, status: &Status, conn: &Connection) -> String {
    let message = status.message();
    match (status.code(), service) {
        (Code::Unauthenticated, Service::Admin) if message.contains("no admin token") => {
            "quotad has no admin token configured, so it refuses every admin call: start quotad \
             with `admin_token` set (QUOTAD_ADMIN_TOKEN or admin_token_file in its environment), \
             then pass that token with --token or QUOTAD_ADMIN_TOKEN"
                .to_owned()
        }
        (Code::Unauthenticated, Service::Admin) if !conn.has_admin_token() => {
            "this is an admin call and needs quotad's admin token: pass --token TOKEN or set \
             QUOTAD_ADMIN_TOKEN"
                .to_owned()
        }
        (Code::Unauthenticated, Service::Admin) => format!(
            "quotad refused the admin token given with --token or QUOTAD_ADMIN_TOKEN ({message})"
        ),
        (Code::Unauthenticated, Service::Quota | Service::Rls) if !conn.has_quota_token() => {
            format!(
                "quotad requires its quota token on {} calls: pass --quota-token TOKEN or set \
                 QUOTAD_QUOTA_TOKEN",
                service.name()
            )
        }
        (Code::Unauthenticated, Service::Quota | Service::Rls) => format!(
            "quotad refused the quota token given with --quota-token or QUOTAD_QUOTA_TOKEN \
             ({message})"
        ),
        (Code::Unimplemented, Service::Admin) => format!(
            "{} does not serve AdminService: a quotad with `admin_listen` set serves it on that \
             port alone; point --addr there",
            conn.target.url
        ),
        (Code::Unimplemented, _) => format!(
            "{} does not serve {}: is it quotad's `admin_listen` port? Point --addr at its \
             `listen` port",
            conn.target.url,
            service.name()
        ),
        _ => refusal_text(status),
    }
}

/// The call or connection broke below gRPC.
async fn broken(
    causes: Vec<&(dyn StdError + 'static)>,
    detail: String,
    conn: &Connection,
) -> String {
    let target = &conn.target;
    if let Some(io) = find::<std::io::Error>(&causes)
        && io.kind() == std::io::ErrorKind::ConnectionRefused
    {
        return format!(
            "cannot connect to {}: connection refused (is quotad running, and is this its gRPC \
             `listen` port?)",
            target.authority
        );
    }
    if let Some(io) = find::<std::io::Error>(&causes)
        && io.kind() == std::io::ErrorKind::TimedOut
    {
        return format!(
            "no answer from {} within {} s: is quotad's gRPC port reachable from here?",
            target.authority,
            CONNECT_TIMEOUT.as_secs()
        );
    }
    if find::<tonic::TimeoutExpired>(&causes).is_some() {
        return format!(
            "{} accepted the connection but did not answer the call within {} s: is it \
             quotad's gRPC port?",
            target.authority,
            CALL_TIMEOUT.as_secs()
        );
    }
    let tls_error = find::<rustls::Error>(&causes)
        .cloned()
        .or_else(|| alert_in_text(&causes).map(rustls::Error::AlertReceived));
    if let Some(words) = tls_error.as_ref().and_then(|e| tls_words(e, conn)) {
        return words;
    }
    let http = {
        let authority = target.authority.clone();
        tokio::task::spawn_blocking(move || probe::http(&authority))
            .await
            .unwrap_or(probe::Http::Nothing)
    };
    match http {
        probe::Http::QuotadHttpPort { grpc_listen, tls } => {
            let port = grpc_listen.rsplit(':').next().and_then(|p| p.parse().ok());
            return match port {
                Some(port) => format!(
                    "{} is quotad's HTTP port (metrics and probes); the gRPC port is {port} \
                     (quotad listens on {grpc_listen}): use --addr {}",
                    target.authority,
                    target.on_port(port, tls)
                ),
                None => format!(
                    "{} is quotad's HTTP port (metrics and probes), not its gRPC port \
                     (quotad listens on {grpc_listen})",
                    target.authority
                ),
            };
        }
        probe::Http::Tls if !target.tls => {
            return format!(
                "quotad at {} speaks TLS: use --addr {} (with --ca-cert FILE when a private CA \
                 signed its certificate)",
                target.authority,
                target.with_scheme(true)
            );
        }
        probe::Http::Tls => {
            // A TLS server that let the handshake through, then closed: ask it why.
            let (target, identity) = (target.clone(), conn.identity.clone());
            let refusal = tokio::task::spawn_blocking(move || {
                probe::tls_refusal(&target, identity.as_deref())
            })
            .await
            .ok()
            .flatten();
            if let Some(words) = refusal.as_ref().and_then(|e| tls_words(e, conn)) {
                return words;
            }
        }
        probe::Http::Nothing => {}
    }
    if target.tls && tls_error.is_some() {
        return if probe::plain_grpc(target).await {
            format!(
                "quotad at {} serves plain gRPC, without TLS: use --addr {}",
                target.authority,
                target.with_scheme(false)
            )
        } else {
            format!(
                "TLS with {} failed ({detail}): is it quotad's gRPC port, with TLS on?",
                target.authority
            )
        };
    }
    format!("cannot reach quotad at {}: {detail}", target.url)
}

/// An alert from the server, when only its text survived: HTTP/2 keeps an I/O error's
/// message but not the error (rustls's), once the connection is up.
fn alert_in_text(causes: &[&(dyn StdError + 'static)]) -> Option<rustls::AlertDescription> {
    use rustls::AlertDescription as Alert;
    const KNOWN: [Alert; 10] = [
        Alert::CertificateRequired,
        Alert::HandshakeFailure,
        Alert::BadCertificate,
        Alert::UnknownCA,
        Alert::CertificateUnknown,
        Alert::DecryptError,
        Alert::AccessDenied,
        Alert::CertificateExpired,
        Alert::CertificateRevoked,
        Alert::ProtocolVersion,
    ];
    causes.iter().find_map(|e| {
        let text = e.to_string();
        let (_, rest) = text.split_once("received fatal alert: ")?;
        let name = rest.split(|c: char| !c.is_ascii_alphanumeric()).next()?;
        KNOWN.into_iter().find(|alert| format!("{alert:?}") == name)
    })
}

/// What a TLS error means for the user, when it is one with a known cure.
fn tls_words(error: &rustls::Error, conn: &Connection) -> Option<String> {
    use rustls::{AlertDescription as Alert, CertificateError};
    let target = &conn.target;
    let trusted = match &conn.ca_cert {
        Some(file) => format!("the CA in --ca-cert ({})", file.display()),
        None => "a CA trusted by this system".to_owned(),
    };
    let cure_ca = match &conn.ca_cert {
        Some(_) => "pass the CA that signed quotad's certificate with --ca-cert",
        None => "pass the CA that signed it with --ca-cert FILE (QUOTACTL_CA_CERT)",
    };
    Some(match error {
        rustls::Error::InvalidCertificate(e) => match e {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                format!("quotad's certificate is not signed by {trusted}: {cure_ca}")
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    "quotad's certificate is not valid for {:?}: connect by a name or address it \
                     holds",
                    target.host
                )
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "quotad's certificate has expired".to_owned()
            }
            other => format!("quotad's certificate was not accepted: {other:?}"),
        },
        rustls::Error::AlertReceived(alert) => match alert {
            Alert::CertificateRequired => client_cert_needed(conn),
            Alert::HandshakeFailure | Alert::BadCertificate if conn.identity.is_none() => {
                client_cert_needed(conn)
            }
            Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateUnknown
            | Alert::DecryptError
            | Alert::AccessDenied
            | Alert::CertificateExpired
            | Alert::CertificateRevoked => format!(
                "quotad refused the client certificate in --cert ({alert:?}): it must be signed \
                 by the CA quotad trusts (its tls.client_ca_file) and be current"
            ),
            other => format!("the TLS handshake with quotad failed: quotad sent {other:?}"),
        },
        _ => return None,
    })
}

fn client_cert_needed(conn: &Connection) -> String {
    if conn.identity.is_some() {
        "quotad refused the client certificate in --cert: it must be signed by the CA quotad \
         trusts (its tls.client_ca_file)"
            .to_owned()
    } else {
        "quotad requires a client certificate (mTLS): pass --cert FILE --key FILE \
         (QUOTACTL_CERT, QUOTACTL_KEY), signed by the CA in quotad's tls.client_ca_file"
            .to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_say_each_piece_once() {
        let parts = |p: &[&str]| join_once(p.iter().map(|s| s.to_string()).collect());
        assert_eq!(
            parts(&[
                "transport error",
                "tcp connect error: Connection refused (os error 111)",
                "Connection refused (os error 111)",
            ]),
            "tcp connect error: Connection refused (os error 111)"
        );
        assert_eq!(
            parts(&["transport error", "transport error"]),
            "transport error"
        );
        assert_eq!(parts(&["a", "", "b: c", "c"]), "a: b: c");
        assert_eq!(
            parts(&["setting up x", "UNAUTHENTICATED: no"]),
            "setting up x: UNAUTHENTICATED: no"
        );
    }
}
