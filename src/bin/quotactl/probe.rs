//! Probes of an address whose gRPC call failed below gRPC, to say why (see `failure.rs`).
//! Each is one short connection with a timeout, made only after a failure, and none carries a
//! token:
//!
//! - [`http`]: a plain HTTP/1.1 `GET /healthz`. quotad's HTTP port answers it and names its gRPC
//!   port in the `quotad-grpc-listen` header (and TLS in `quotad-grpc-tls`); a TLS server
//!   answers plain text with a TLS alert record.
//! - [`plain_grpc`]: a plain-text gRPC health check, to find a quotad without TLS behind an
//!   `https://` address.
//! - [`tls_refusal`]: a TLS handshake followed by the HTTP/2 preface, reading what the server
//!   says. Once a TLS 1.3 handshake is done on the client's side, a server that wants a client
//!   certificate (or refuses the one given) says so with an alert that reaches only a call
//!   already under way; through tonic it is often just "connection closed". This probe waits
//!   for that alert, so the cause is found every time.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::connect::Target;

/// How long each probe may take.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// What a plain HTTP/1.1 request to the address found.
#[derive(Debug, PartialEq, Eq)]
pub enum Http {
    /// quotad's HTTP port, naming where gRPC is served.
    QuotadHttpPort {
        grpc_listen: String,
        tls: bool,
    },
    /// A TLS server: it answered plain text with a TLS record.
    Tls,
    Nothing,
}

fn connect(authority: &str) -> Option<TcpStream> {
    let stream = authority
        .to_socket_addrs()
        .ok()?
        .find_map(|addr| TcpStream::connect_timeout(&addr, TIMEOUT).ok())?;
    stream.set_read_timeout(Some(TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(TIMEOUT)).ok()?;
    Some(stream)
}

/// Blocking: run it on a blocking thread.
pub fn http(authority: &str) -> Http {
    let Some(mut stream) = connect(authority) else {
        return Http::Nothing;
    };
    let request = "GET /healthz HTTP/1.1\r\nHost: quotad\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).is_err() {
        return Http::Nothing;
    }
    let mut answer = Vec::new();
    let _ = stream.take(16 * 1024).read_to_end(&mut answer);
    read_http(&answer)
}

fn read_http(answer: &[u8]) -> Http {
    // A TLS record: alert (21) or handshake (22), then major version 3.
    if let [21 | 22, 3, ..] = answer {
        return Http::Tls;
    }
    let text = String::from_utf8_lossy(answer);
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    let header = |name: &str| {
        head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
    };
    match header("quotad-grpc-listen") {
        Some(grpc_listen) => Http::QuotadHttpPort {
            grpc_listen,
            tls: header("quotad-grpc-tls").as_deref() == Some("true"),
        },
        None => Http::Nothing,
    }
}

/// Whether a plain-text gRPC health check at the address gets an answer.
pub async fn plain_grpc(target: &Target) -> bool {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(target.with_scheme(false)) else {
        return false;
    };
    let check = async {
        let channel = endpoint.connect_timeout(TIMEOUT).connect().await.ok()?;
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .ok()
    };
    matches!(tokio::time::timeout(TIMEOUT, check).await, Ok(Some(_)))
}

/// The client certificate (chain and key, PEM) a probe presents, as the real calls do.
pub struct ClientIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

/// What the server's TLS said against this client: the error of the handshake or of the first
/// read after it (an alert), if any. Blocking: run it on a blocking thread.
pub fn tls_refusal(target: &Target, identity: Option<&ClientIdentity>) -> Option<rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let config = match identity {
        Some(id) => {
            let chain = CertificateDer::pem_slice_iter(&id.cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .ok()?;
            let key = PrivateKeyDer::from_pem_slice(&id.key_pem).ok()?;
            builder.with_client_auth_cert(chain, key).ok()?
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = ServerName::try_from(target.host.clone()).ok()?;
    let client = rustls::ClientConnection::new(Arc::new(config), name).ok()?;
    let mut tls = rustls::StreamOwned::new(client, connect(&target.authority)?);
    let rustls_error = |e: std::io::Error| {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .cloned()
    };
    // Writing drives the handshake; the preface makes a willing server answer SETTINGS.
    if let Err(e) = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") {
        return rustls_error(e);
    }
    // A first byte back (SETTINGS) means the server took this client.
    tls.read_exact(&mut [0u8; 1]).err().and_then(rustls_error)
}

/// Accepts any server certificate: the probe sends no token and no data, and trust in the
/// server was already checked by the call that failed.
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_grpc_port_or_a_tls_alert() {
        let answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\
            Quotad-Grpc-Listen: 0.0.0.0:50051\r\nquotad-grpc-tls: true\r\n\r\nok\n";
        assert_eq!(
            read_http(answer),
            Http::QuotadHttpPort {
                grpc_listen: "0.0.0.0:50051".into(),
                tls: true
            }
        );
        assert_eq!(read_http(b"HTTP/1.1 404 Not Found\r\n\r\n"), Http::Nothing);
        assert_eq!(read_http(&[21, 3, 3, 0, 2, 2, 50]), Http::Tls);
        assert_eq!(read_http(b""), Http::Nothing);
    }
}
