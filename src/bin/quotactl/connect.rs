//! How `quotactl` reaches quotad: the address (`http://` for plain gRPC, `https://` for TLS),
//! the TLS settings (`--ca-cert`, and `--cert`/`--key` for mTLS) and the bearer token of each
//! service (`--quota-token` on QuotaService and Envoy RLS calls, `--token` on AdminService
//! calls). Every subcommand, `bench` included, connects through [`Connection`], so they all
//! accept the same options. Settings are checked before anything is sent: a file that cannot
//! be read or a token that cannot go in a header is an error naming its option.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use hyper_util::client::legacy::connect::HttpConnector;
use quotad::api::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use quotad::api::pb::admin_service_client::AdminServiceClient;
use quotad::api::pb::quota_service_client::QuotaServiceClient;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use crate::failure::Failure;
use crate::probe::ClientIdentity;

/// A channel's connector that connects once. Tonic's channel otherwise connects again, unseen,
/// whenever its connection closes; a server that closes each connection just after accepting
/// it (a TLS quotad refusing a client without a certificate, a TLS port spoken to in plain
/// text) then kept a call reconnecting until its 30 s ran out, whenever the close came before
/// the call was sent (seen on a loaded machine). A quotactl command is one short session: a
/// lost connection is an error to report, and the report finds out why.
#[derive(Clone)]
struct OneConnection {
    tcp: HttpConnector,
    used: Arc<AtomicBool>,
}

impl Default for OneConnection {
    fn default() -> Self {
        let mut tcp = HttpConnector::new();
        // https:// too: the channel puts TLS over this connection.
        tcp.enforce_http(false);
        // The endpoint's own setting reaches only its built-in connector (its connect timeout
        // wraps this one).
        tcp.set_nodelay(true);
        OneConnection {
            tcp,
            used: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl tower::Service<tonic::codegen::http::Uri> for OneConnection {
    type Response = <HttpConnector as tower::Service<tonic::codegen::http::Uri>>::Response;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: tonic::codegen::http::Uri) -> Self::Future {
        if self.used.swap(true, Ordering::AcqRel) {
            return Box::pin(std::future::ready(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "quotad closed the connection",
            )
            .into())));
        }
        let connecting = self.tcp.call(uri);
        Box::pin(async move { connecting.await.map_err(Into::into) })
    }
}

/// How long to wait for a TCP connection (and a TLS handshake) before giving up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one call may take. quotad answers within its `server.request_timeout_ms` (2 s by
/// default); this bounds only a server that never answers (a port that is not quotad's).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Where quotad is and how to prove who we are; global options of every subcommand.
#[derive(Args, Clone)]
#[command(next_help_heading = "Connection (every subcommand)")]
pub struct ConnectArgs {
    /// quotad's gRPC address: http://HOST:PORT, or https://HOST:PORT for TLS.
    ///
    /// quotad's `listen` port (50051 by default), or its `admin_listen` port for admin calls
    /// when one is set; not the HTTP port of metrics and probes (9090). https:// when quotad
    /// has a `[tls]` section.
    #[arg(
        long,
        global = true,
        env = "QUOTACTL_ADDR",
        value_name = "URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub addr: String,
    /// Admin token, for AdminService calls.
    ///
    /// Sent as `authorization: Bearer TOKEN` on AdminService calls: account, grant, revoke,
    /// topup set and disable, export, and the setup of bench's credit-funded accounts. Must
    /// equal quotad's `admin_token`.
    #[arg(
        long,
        global = true,
        env = "QUOTAD_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Quota token, for QuotaService and Envoy RLS calls (when quotad sets one).
    ///
    /// Sent as `authorization: Bearer TOKEN` on QuotaService calls (reserve, commit, release,
    /// usage, history, topup show, bench) and Envoy rate limit calls (bench --workload rls).
    /// Must equal quotad's `quota_token`; not needed when quotad sets none.
    #[arg(
        long,
        global = true,
        env = "QUOTAD_QUOTA_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub quota_token: Option<String>,
    /// CA certificate(s) to trust for https:// (PEM), instead of the system's roots.
    ///
    /// The CA (or CAs) that signed quotad's certificate. When given, only these are trusted;
    /// without it, the system's trusted roots are.
    #[arg(long, global = true, env = "QUOTACTL_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate for mTLS (PEM), with --key.
    ///
    /// Needed when quotad sets `tls.client_ca_file`: the certificate (and its chain) must be
    /// signed by that CA.
    #[arg(long, global = true, env = "QUOTACTL_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Private key of --cert (PEM).
    #[arg(long, global = true, env = "QUOTACTL_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
}

/// The address, checked: scheme, host and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// As given (without a trailing slash).
    pub url: String,
    pub tls: bool,
    /// `host:port` (the scheme's default port when none is given).
    pub authority: String,
    pub host: String,
}

impl Target {
    pub fn parse(addr: &str) -> anyhow::Result<Target> {
        let addr = addr.trim();
        let example =
            |rest: &str| format!("http://{rest} (or https://{rest} when quotad serves TLS)");
        let (tls, rest) = if let Some(rest) = addr.strip_prefix("http://") {
            (false, rest)
        } else if let Some(rest) = addr.strip_prefix("https://") {
            (true, rest)
        } else if let Some((scheme, rest)) = addr.split_once("://") {
            bail!(
                "--addr {addr:?}: the scheme must be http:// or https://, not {scheme}://; \
                 e.g. {}",
                example(rest)
            );
        } else if addr.parse::<u16>().is_ok() {
            bail!(
                "--addr {addr:?} is a bare port: use {}",
                example(&format!("127.0.0.1:{addr}"))
            );
        } else {
            bail!("--addr {addr:?} has no scheme: use {}", example(addr));
        };
        let rest = rest.trim_end_matches('/');
        let addr = &format!("{}://{rest}", if tls { "https" } else { "http" });
        let uri: tonic::codegen::http::Uri = addr.parse().map_err(|e| {
            anyhow::anyhow!(
                "--addr {addr:?} is not a URL ({e}): e.g. {}",
                example("127.0.0.1:50051")
            )
        })?;
        let Some(host) = uri.host().filter(|h| !h.is_empty()) else {
            bail!(
                "--addr {addr:?} has no host: e.g. {}",
                example("127.0.0.1:50051")
            );
        };
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            bail!(
                "--addr {addr:?}: give the server only, without a path: e.g. {}",
                example(rest.split('/').next().unwrap_or(rest))
            );
        }
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let host = host.to_owned();
        let authority = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Target {
            url: addr.to_owned(),
            tls,
            authority,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
        })
    }

    /// The same server under the other scheme (`http://` ⇄ `https://`).
    pub fn with_scheme(&self, tls: bool) -> String {
        format!(
            "{}://{}",
            if tls { "https" } else { "http" },
            self.url
                .split_once("://")
                .map_or(&*self.url, |(_, rest)| rest)
        )
    }

    /// The same host on another port, under `tls`'s scheme.
    pub fn on_port(&self, port: u16, tls: bool) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{}://{host}:{port}", if tls { "https" } else { "http" })
    }
}

/// Adds `authorization: Bearer TOKEN` to every call when a token is given.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The header of `token`; an empty one (an exported but empty variable) is no token.
fn bearer(flag: &str, token: Option<&str>) -> anyhow::Result<Bearer> {
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return Ok(Bearer(None));
    };
    let printable = token.bytes().all(|b| b == b' ' || b.is_ascii_graphic());
    match format!("Bearer {token}").parse() {
        Ok(value) if printable => Ok(Bearer(Some(value))),
        _ => bail!("{flag} must be printable ASCII (it goes in a header)"),
    }
}

pub type QuotaClient = QuotaServiceClient<InterceptedService<Channel, Bearer>>;
pub type AdminClient = AdminServiceClient<InterceptedService<Channel, Bearer>>;
pub type RlsClient = RateLimitServiceClient<InterceptedService<Channel, Bearer>>;

/// Settings checked; connections made on demand.
pub struct Connection {
    pub target: Target,
    endpoint: Endpoint,
    admin: Bearer,
    quota: Bearer,
    /// The client certificate (mTLS), kept for the probes that find why a connection failed.
    pub identity: Option<Arc<ClientIdentity>>,
    /// The --ca-cert file, when one replaces the system roots.
    pub ca_cert: Option<PathBuf>,
    /// What this connection was made from, for [`Connection::at`].
    args: ConnectArgs,
}

impl Connection {
    pub fn new(args: &ConnectArgs) -> anyhow::Result<Connection> {
        let target = Target::parse(&args.addr)?;
        let admin = bearer("--token (QUOTAD_ADMIN_TOKEN)", args.token.as_deref())?;
        let quota = bearer(
            "--quota-token (QUOTAD_QUOTA_TOKEN)",
            args.quota_token.as_deref(),
        )?;
        let mut endpoint = Endpoint::from_shared(target.url.clone())
            .with_context(|| format!("--addr {:?} is not a valid address", target.url))?
            .tcp_nodelay(true)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT);
        match (&args.cert, &args.key) {
            (Some(_), None) => {
                bail!("--cert needs --key (QUOTACTL_KEY): the certificate's private key")
            }
            (None, Some(_)) => bail!("--key needs --cert (QUOTACTL_CERT): the client certificate"),
            _ => {}
        }
        let mut identity = None;
        if target.tls {
            let mut tls = ClientTlsConfig::new().timeout(CONNECT_TIMEOUT);
            tls = match &args.ca_cert {
                Some(file) => {
                    tls.ca_certificate(Certificate::from_pem(certificates("--ca-cert", file)?))
                }
                None => tls.with_native_roots(),
            };
            // Built once without the client certificate, so that an error names its cause.
            endpoint.clone().tls_config(tls.clone()).map_err(|e| {
                let detail = crate::failure::chain_text(&e);
                match args.ca_cert {
                    None => anyhow::anyhow!(
                        "cannot trust the system's CA certificates ({detail}): pass quotad's CA \
                         with --ca-cert FILE (QUOTACTL_CA_CERT)"
                    ),
                    Some(_) => anyhow::anyhow!("--ca-cert: {detail}"),
                }
            })?;
            if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
                let id = ClientIdentity {
                    cert_pem: certificates("--cert", cert)?,
                    key_pem: private_key(key)?,
                };
                tls = tls.identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
                identity = Some(Arc::new(id));
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| {
                anyhow::anyhow!(
                    "--cert and --key: {} (is --key the private key of --cert?)",
                    crate::failure::chain_text(&e)
                )
            })?;
        } else {
            let given = [
                ("--ca-cert (QUOTACTL_CA_CERT)", args.ca_cert.is_some()),
                ("--cert (QUOTACTL_CERT)", args.cert.is_some()),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, set)| *set) {
                bail!(
                    "{flag} is for TLS, but --addr {:?} is plain http://: use {} to connect with TLS",
                    target.url,
                    target.with_scheme(true)
                );
            }
        }
        Ok(Connection {
            identity,
            ca_cert: args.ca_cert.clone().filter(|_| target.tls),
            target,
            endpoint,
            admin,
            quota,
            args: args.clone(),
        })
    }

    /// The same connection settings (tokens, TLS) for another quotad at `addr`.
    pub fn at(&self, addr: &str) -> anyhow::Result<Connection> {
        Connection::new(&ConnectArgs {
            addr: addr.to_owned(),
            ..self.args.clone()
        })
    }

    /// A new connection (its own TCP connection and HTTP/2 session), made once: see
    /// [`OneConnection`].
    pub async fn channel(&self) -> Result<Channel, Failure> {
        (self.endpoint)
            .connect_with_connector(OneConnection::default())
            .await
            .map_err(Failure::Connect)
    }

    pub fn has_admin_token(&self) -> bool {
        self.admin.0.is_some()
    }

    pub fn has_quota_token(&self) -> bool {
        self.quota.0.is_some()
    }

    pub fn quota(&self, channel: Channel) -> QuotaClient {
        QuotaServiceClient::with_interceptor(channel, self.quota.clone())
    }

    pub fn admin(&self, channel: Channel) -> AdminClient {
        AdminServiceClient::with_interceptor(channel, self.admin.clone())
    }

    /// Envoy's rate limit service, which quotad guards with the quota token.
    pub fn rls(&self, channel: Channel) -> RlsClient {
        RateLimitServiceClient::with_interceptor(channel, self.quota.clone())
    }
}

fn read(flag: &str, file: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(file).with_context(|| format!("{flag}: cannot read {}", file.display()))
}

/// The file's PEM certificates, checked (tonic would only fail at the handshake).
fn certificates(flag: &str, file: &Path) -> anyhow::Result<Vec<u8>> {
    let pem = read(flag, file)?;
    let parsed: Result<Vec<CertificateDer<'_>>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    match parsed {
        Ok(certs) if !certs.is_empty() => Ok(pem),
        Ok(_) => bail!("{flag}: {} holds no PEM certificate", file.display()),
        Err(e) => bail!(
            "{flag}: {} is not a PEM certificate file ({e})",
            file.display()
        ),
    }
}

fn private_key(file: &Path) -> anyhow::Result<Vec<u8>> {
    let pem = read("--key", file)?;
    if let Err(e) = PrivateKeyDer::from_pem_slice(&pem) {
        bail!("--key: {} holds no PEM private key ({e})", file.display());
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A channel's connector connects once, and refuses the next connection it is asked for.
    #[tokio::test]
    async fn a_connector_connects_once() {
        use tower::{Service, ServiceExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: tonic::codegen::http::Uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let mut connector = OneConnection::default();
        let first = connector.ready().await.unwrap().call(uri.clone()).await;
        assert!(first.is_ok(), "{:?}", first.err());
        listener.accept().await.unwrap();
        let second = connector
            .ready()
            .await
            .unwrap()
            .call(uri)
            .await
            .err()
            .unwrap();
        let io = second.downcast_ref::<std::io::Error>().unwrap();
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionAborted);
        assert_eq!(io.to_string(), "quotad closed the connection");
    }

    #[test]
    fn tokens_must_fit_a_header_and_empty_is_none() {
        assert!(bearer("--token", None).unwrap().0.is_none());
        assert!(bearer("--token", Some("")).unwrap().0.is_none());
        let value = bearer("--token", Some("s3cret")).unwrap().0.unwrap();
        assert_eq!(value.to_str().unwrap(), "Bearer s3cret");
        for bad in ["é", "a\nb", "tab\t"] {
            let err = bearer("--quota-token", Some(bad))
                .err()
                .unwrap()
                .to_string();
            assert_eq!(
                err,
                "--quota-token must be printable ASCII (it goes in a header)"
            );
        }
    }

    #[test]
    fn addresses_need_a_scheme_and_say_how() {
        let t = Target::parse("https://quotad.internal:50051/").unwrap();
        assert!(t.tls);
        assert_eq!(t.authority, "quotad.internal:50051");
        assert_eq!(t.url, "https://quotad.internal:50051");
        assert_eq!(t.with_scheme(false), "http://quotad.internal:50051");
        assert_eq!(t.on_port(50051, true), "https://quotad.internal:50051");
        let t = Target::parse("http://[::1]:7").unwrap();
        assert_eq!((t.authority.as_str(), t.host.as_str()), ("[::1]:7", "::1"));
        assert_eq!(t.on_port(8, false), "http://[::1]:8");
        assert_eq!(Target::parse("http://q").unwrap().authority, "q:80");

        let err = |addr: &str| Target::parse(addr).unwrap_err().to_string();
        assert_eq!(
            err("127.0.0.1:50051"),
            "--addr \"127.0.0.1:50051\" has no scheme: use http://127.0.0.1:50051 \
             (or https://127.0.0.1:50051 when quotad serves TLS)"
        );
        assert!(err("localhost:50051").contains("use http://localhost:50051"));
        assert!(err("50051").contains("use http://127.0.0.1:50051"));
        assert!(err("grpc://q:1").contains("not grpc://; e.g. http://q:1"));
        assert!(err("http://").contains("http://127.0.0.1:50051"));
        assert!(err("http://q:1/quota").contains("without a path: e.g. http://q:1 "));
    }
}
