//! TLS for the gRPC listeners, with certificates reloaded when their files change.
//!
//! Kubernetes rotates a mounted Secret (cert-manager renewals) by swapping files under the
//! mount; quotad checks the files' modification times every few seconds and, when they
//! changed, builds a new server configuration for the connections accepted from then on. A
//! broken new file (half written, wrong key) keeps the previous configuration and is logged,
//! so a bad rotation never takes serving down. With a client CA, every client must present a
//! certificate it signed (mTLS).

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::config::TlsConfig;

/// How often the files are checked for changes.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
#[error("tls: {0}")]
pub struct TlsError(String);

impl TlsError {
    pub fn new(why: impl Into<String>) -> TlsError {
        TlsError(why.into())
    }
}

/// The current server configuration, swapped when the files change.
pub struct Certificates {
    files: Vec<PathBuf>,
    settings: TlsConfig,
    current: RwLock<(Arc<rustls::ServerConfig>, Vec<Option<SystemTime>>)>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Certificates {
    pub fn load(settings: &TlsConfig) -> Result<Certificates, TlsError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let files: Vec<PathBuf> = [
            &settings.cert_file,
            &settings.key_file,
            &settings.client_ca_file,
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        let config = build(settings)?;
        let stamps = stamps(&files);
        Ok(Certificates {
            files,
            settings: settings.clone(),
            current: RwLock::new((config, stamps)),
        })
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        tokio_rustls::TlsAcceptor::from(current.0.clone())
    }

    /// Builds a new configuration if the files changed; returns whether it did.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamps(&self.files);
        if self.current.read().unwrap_or_else(|e| e.into_inner()).1 == now {
            return false;
        }
        match build(&self.settings) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = (config, now);
                tracing::info!("TLS certificates reloaded");
                true
            }
            Err(e) => {
                // Remember the stamps so a broken file is reported once, not every tick.
                self.current.write().unwrap_or_else(|e| e.into_inner()).1 = now;
                tracing::warn!(
                    "TLS files changed but cannot be used; keeping the previous ones: {e}"
                );
                false
            }
        }
    }
}

/// How this replica reaches the others over TLS when it forwards a call to an account's owner
/// (on Redis): their certificates are checked against the peer CA and the peer server name,
/// and this server's own certificate is presented as the client's, for replicas that ask for
/// one (mTLS). The files are read each time a connection to a peer is made, so connections
/// made after a rotation use the new certificates.
#[derive(Debug, Clone)]
pub struct PeerTls {
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
    server_name: Option<String>,
}

impl PeerTls {
    /// None when TLS is off (forwards then go over plain HTTP/2).
    pub fn from_config(settings: &TlsConfig) -> Option<PeerTls> {
        Some(PeerTls {
            ca_file: settings.peer_ca()?.clone(),
            cert_file: settings.cert_file.clone()?,
            key_file: settings.key_file.clone()?,
            server_name: settings.peer_server_name.clone(),
        })
    }

    /// The client configuration for a connection to a peer, read from the files now.
    pub fn client_config(&self) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = read("tls.peer_ca_file", &self.ca_file)?;
        let cert = read("tls.cert_file", &self.cert_file)?;
        let key = read("tls.key_file", &self.key_file)?;
        let config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .identity(tonic::transport::Identity::from_pem(cert, key));
        Ok(match &self.server_name {
            Some(name) => config.domain_name(name.clone()),
            None => config,
        })
    }

    /// Checks the files once, at start, so a wrong path is an error then, not at the first
    /// forward.
    pub fn check(&self) -> Result<(), TlsError> {
        self.client_config().map(|_| ())
    }
}

fn stamps(files: &[PathBuf]) -> Vec<Option<SystemTime>> {
    files
        .iter()
        .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .collect()
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError(format!("{key}: cannot read {}: {e}", path.display())))
}

fn build(settings: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (Some(cert_file), Some(key_file)) = (&settings.cert_file, &settings.key_file) else {
        return Err(TlsError(
            "tls.cert_file and tls.key_file are required".into(),
        ));
    };
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read("tls.cert_file", cert_file)?)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError(format!("tls.cert_file: {e}")))?;
    if chain.is_empty() {
        return Err(TlsError("tls.cert_file holds no certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&read("tls.key_file", key_file)?)
        .map_err(|e| TlsError(format!("tls.key_file: {e}")))?;
    let builder = rustls::ServerConfig::builder();
    let builder = match &settings.client_ca_file {
        Some(ca_file) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&read("tls.client_ca_file", ca_file)?) {
                let cert = cert.map_err(|e| TlsError(format!("tls.client_ca_file: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| TlsError(format!("tls.client_ca_file: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .map_err(|e| TlsError(format!("tls.client_ca_file: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError(format!("tls.key_file does not match tls.cert_file: {e}")))?;
    // HTTP/1.1 for the JSON door; gRPC negotiates h2.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// An accepted connection, plain or TLS.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            Conn::Plain(s) => s.connect_info(),
            Conn::Tls(s) => s.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Accepts connections on `listener` (TCP_NODELAY set, TLS handshaken when `tls` is given)
/// and hands them over on a channel, so a slow or failed handshake never blocks the next.
pub fn incoming(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<Certificates>>,
) -> (
    tokio_stream::wrappers::ReceiverStream<std::io::Result<Conn>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::debug!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            match &tls {
                None => {
                    if tx.send(Ok(Conn::Plain(stream))).await.is_err() {
                        return;
                    }
                }
                Some(certificates) => {
                    let acceptor = certificates.acceptor();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let handshake =
                            tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream));
                        match handshake.await {
                            Ok(Ok(tls)) => {
                                let _ = tx.send(Ok(Conn::Tls(Box::new(tls)))).await;
                            }
                            Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
                            Err(_) => tracing::debug!("TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    });
    (tokio_stream::wrappers::ReceiverStream::new(rx), task)
}
