//! TLS for the gRPC listener: rustls over accepted TCP sockets, a certificate that follows its
//! files (cert-manager rotates them in place; no restart), and optional client certificates
//! whose SAN DNS names are a worker's identity (mutual TLS).
//!
//! The certificate is resolved per handshake from what was last loaded; at most every
//! [`TlsOptions::reload_check`] the files' modification times are compared, and a changed pair
//! is loaded again. A new pair that does not parse, or whose key does not match, is logged and
//! the old one kept, so a half-written secret never takes the coordinator down.
//!
//! A client certificate is optional at the handshake (the CLI has none and uses its token); one
//! that is presented must chain to the client CA, or the handshake fails. What the certificate
//! proves reaches the handlers as the connection's [`PeerInfo`], a request extension.
//!
//! This module knows nothing of workers or tokens: `api::auth` decides what an identity may do.

use crate::error::{CoordError, Result};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Where the coordinator's TLS material lives (PEM files).
#[derive(Debug, Clone)]
pub struct TlsOptions {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA bundle that worker client certificates must chain to; mutual TLS when set.
    pub client_ca: Option<PathBuf>,
    /// How often, at most, the files are checked for a change (on a handshake).
    pub reload_check: Duration,
}

impl TlsOptions {
    pub fn new(cert: PathBuf, key: PathBuf) -> Self {
        TlsOptions {
            cert,
            key,
            client_ca: None,
            reload_check: Duration::from_secs(5),
        }
    }
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> CoordError {
    CoordError::Tls(format!("{}: {message}", path.display()))
}

/// The process-wide crypto provider (aws-lc-rs), named rather than taken from a global default
/// so that no other crate's choice can change it.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Reads a PEM certificate chain and its private key and checks that they belong together.
pub fn load_key_pair(cert: &Path, key: &Path) -> Result<CertifiedKey> {
    let chain = load_certs(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key, format!("no PEM private key: {e}")))?;
    CertifiedKey::from_der(chain, key_der, &provider())
        .map_err(|e| file_error(key, format!("does not fit the certificate {}: {e}", cert.display())))
}

/// Reads every certificate of a PEM file; at least one.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, format!("not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// Builds the server's TLS acceptor (HTTP/2 by ALPN, as gRPC clients expect).
pub fn acceptor(opts: &TlsOptions) -> Result<TlsAcceptor> {
    let resolver = Arc::new(ReloadingCert::new(opts)?);
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| CoordError::Tls(format!("TLS configuration: {e}")))?;
    let builder = match &opts.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in load_certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| file_error(ca, format!("not a usable CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| file_error(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// What the files looked like when last loaded (or last found broken).
type Stamp = [(SystemTime, u64); 2];

fn stamp(cert: &Path, key: &Path) -> io::Result<Stamp> {
    let one = |p: &Path| std::fs::metadata(p).and_then(|m| Ok((m.modified()?, m.len())));
    Ok([one(cert)?, one(key)?])
}

/// The server certificate, loaded again when its files change.
#[derive(Debug)]
struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    every: Duration,
    current: Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    stamp: Stamp,
    checked: Instant,
}

impl ReloadingCert {
    fn new(opts: &TlsOptions) -> Result<Self> {
        let stamp = stamp(&opts.cert, &opts.key).map_err(|e| file_error(&opts.cert, e))?;
        let key = Arc::new(load_key_pair(&opts.cert, &opts.key)?);
        Ok(ReloadingCert {
            cert: opts.cert.clone(),
            key: opts.key.clone(),
            every: opts.reload_check,
            current: Mutex::new(Loaded {
                key,
                stamp,
                checked: Instant::now(),
            }),
        })
    }

    /// The certificate to present now. A few `stat`s and, after a change, a parse of two small
    /// files: cheap enough for the handshake path, and only every `every` at most.
    fn current(&self) -> Arc<CertifiedKey> {
        // A std mutex: held for a stat (and rarely a parse of two small files), never across
        // an await.
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.checked.elapsed() >= self.every {
            cur.checked = Instant::now();
            match stamp(&self.cert, &self.key) {
                Ok(s) if s != cur.stamp => {
                    // Either way this pair is done with: a broken one is tried again only once
                    // the files change again.
                    cur.stamp = s;
                    match load_key_pair(&self.cert, &self.key) {
                        Ok(k) => {
                            tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                            cur.key = Arc::new(k);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "new TLS certificate not usable; still serving the previous one")
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(cert = %self.cert.display(), error = %e, "cannot read the TLS files; still serving the previous certificate")
                }
            }
        }
        cur.key.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// What a connection's peer proved: its address, and the SAN DNS names of the client
/// certificate it presented (verified against the client CA), if any.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    pub client_names: Option<Arc<Vec<String>>>,
}

/// One accepted TLS connection, as the gRPC server reads and writes it.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl TlsConn {
    fn new(stream: TlsStream<TcpStream>) -> Self {
        let (tcp, session) = stream.get_ref();
        let client_names = session.peer_certificates().and_then(|chain| {
            let leaf = webpki::EndEntityCert::try_from(chain.first()?).ok()?;
            Some(Arc::new(leaf.valid_dns_names().map(str::to_string).collect::<Vec<_>>()))
        });
        let info = PeerInfo {
            remote: tcp.peer_addr().ok(),
            client_names,
        };
        TlsConn { stream, info }
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// A handshake that takes longer than this is dropped: a client that connects and says nothing
/// must not hold a task and a socket forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long accepting pauses after an error (out of file descriptors, ...).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Handshakes done and not yet taken by the server; accepting waits (backpressure) beyond it.
const READY_QUEUE: usize = 1024;

/// Accepts TCP connections on `listener` and yields them once their TLS handshake is done.
/// Each handshake runs in its own task, so one slow client never delays another; one that
/// fails is logged and dropped. Accepting stops when the returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(READY_QUEUE);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: it lasts a while, so pause rather
                    // than spin on it.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            // Without TCP_NODELAY, small replies wait out the peer's delayed ACK.
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(TlsConn::new(stream))).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    /// A pair that stops parsing keeps the old certificate; a good new pair replaces it.
    #[test]
    fn rotation_reloads_good_files_and_keeps_the_old_pair_over_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let (c1, k1) = pair("one.example");
        std::fs::write(&cert, &c1).unwrap();
        std::fs::write(&key, &k1).unwrap();
        let mut opts = TlsOptions::new(cert.clone(), key.clone());
        opts.reload_check = Duration::ZERO;
        let r = ReloadingCert::new(&opts).unwrap();
        let first = r.current();
        assert!(
            Arc::ptr_eq(&first, &r.current()),
            "unchanged files are not parsed again"
        );

        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
        assert_eq!(r.current().cert, first.cert, "a broken file keeps the old certificate");

        let (c2, k2) = pair("two.example");
        std::fs::write(&key, &k2).unwrap();
        std::fs::write(&cert, &c2).unwrap();
        let second = r.current();
        assert_ne!(second.cert, first.cert);
        let leaf = webpki::EndEntityCert::try_from(&second.cert[0]).unwrap();
        assert_eq!(leaf.valid_dns_names().collect::<Vec<_>>(), ["two.example"]);

        // A key that does not fit the certificate is refused too.
        std::fs::write(&key, &k1).unwrap();
        assert_eq!(r.current().cert, second.cert);
        let err = load_key_pair(&cert, &key).unwrap_err().to_string();
        assert!(err.contains("does not fit"), "{err}");
    }
}
