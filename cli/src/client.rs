//! The connection to the coordinator: channel settings (plain http/2, or TLS with `--ca` or the
//! system's roots), the auth interceptor, and deadlines.

use crate::error::CliError;
use chorus_proto::MAX_MESSAGE_BYTES;
use chorus_proto::pb::experiment_service_client::ExperimentServiceClient;
use std::time::Duration;
use tonic::Request;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pings keep `--wait` and `logs -f` streams honest: a coordinator that vanished without closing
/// the connection (host down, network partition) is noticed within interval + timeout, and the
/// watcher reconnects instead of waiting forever on a dead socket.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Adds `authorization: Bearer <token>` to every call when a token is configured.
#[derive(Clone)]
pub struct AuthInterceptor {
    header: Option<MetadataValue<Ascii>>,
}

impl AuthInterceptor {
    pub fn new(token: Option<&str>) -> Result<Self, CliError> {
        let header = match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => None,
            Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| {
                CliError::Usage("the token contains characters that cannot be sent in a header".into())
            })?),
        };
        Ok(AuthInterceptor { header })
    }
}

impl Interceptor for AuthInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, tonic::Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

pub type ExperimentClient = ExperimentServiceClient<InterceptedService<Channel, AuthInterceptor>>;

/// A connected coordinator and the per-call deadline for request/response calls.
pub struct Coordinator {
    url: String,
    client: ExperimentClient,
    timeout: Duration,
}

impl Coordinator {
    /// Connects eagerly, so an unreachable coordinator is reported as such before any call.
    /// The channel reconnects by itself afterwards (a restarted coordinator is picked up).
    pub async fn connect(
        url: &str,
        ca: Option<&str>,
        token: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, CliError> {
        let interceptor = AuthInterceptor::new(token)?;
        let channel = connect_channel(url, ca).await?;
        let client = ExperimentServiceClient::with_interceptor(channel, interceptor)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Coordinator {
            url: url.to_string(),
            client,
            timeout,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// A client handle for one call; tonic clients are cheap to clone and need `&mut self`.
    pub fn api(&self) -> ExperimentClient {
        self.client.clone()
    }

    /// A request for a unary call, with the `--timeout` deadline sent to the server.
    pub fn unary<T>(&self, msg: T) -> Request<T> {
        with_deadline(msg, self.timeout)
    }

    /// A request for a stream: no deadline, because a watch or a followed log lasts as long as
    /// the experiment or trial does; keepalive pings catch a dead peer instead.
    pub fn streaming<T>(&self, msg: T) -> Request<T> {
        Request::new(msg)
    }
}

/// A connected channel to `url`, over TLS for `https://`: trusting the PEM bundle at `ca`, or
/// the system's roots without one. An empty `ca` counts as unset.
pub async fn connect_channel(url: &str, ca: Option<&str>) -> Result<Channel, CliError> {
    let ca = ca.map(str::trim).filter(|c| !c.is_empty());
    let tls = url.starts_with("https://");
    if !tls && !url.starts_with("http://") {
        return Err(CliError::Usage(format!(
            "--coordinator {url:?} must be an http:// or https:// URL"
        )));
    }
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| CliError::Usage(format!("--coordinator {url:?} is not a valid URL: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    if tls {
        let config = match ca {
            Some(path) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_ca(path)?)),
            None => ClientTlsConfig::new().with_native_roots(),
        };
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| CliError::Usage(format!("--coordinator {url:?}: cannot set up TLS: {e}")))?;
    } else if let Some(path) = ca {
        return Err(CliError::Usage(format!(
            "--ca {path} is for an https:// coordinator; {url} is plain http"
        )));
    }
    endpoint.connect().await.map_err(|source| CliError::Connect {
        url: url.to_string(),
        source,
    })
}

/// The CA bundle, checked to hold PEM certificates so a wrong file is named as such rather than
/// failing the handshake later.
fn read_ca(path: &str) -> Result<Vec<u8>, CliError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|e| CliError::Usage(format!("--ca {path}: cannot read it: {e}")))?;
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|e| CliError::Usage(format!("--ca {path}: not a valid PEM certificate: {e}")))?;
        count += 1;
    }
    if count == 0 {
        return Err(CliError::Usage(format!(
            "--ca {path}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it"
        )));
    }
    Ok(pem)
}

fn with_deadline<T>(msg: T, timeout: Duration) -> Request<T> {
    let mut req = Request::new(msg);
    req.set_timeout(timeout);
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interceptor_adds_bearer_token() {
        let mut i = AuthInterceptor::new(Some("s3cret")).unwrap();
        let req = i.call(Request::new(())).unwrap();
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer s3cret");
    }

    #[test]
    fn interceptor_without_token_adds_nothing() {
        for t in [None, Some(""), Some("  ")] {
            let mut i = AuthInterceptor::new(t).unwrap();
            let req = i.call(Request::new(())).unwrap();
            assert!(req.metadata().get("authorization").is_none(), "{t:?}");
        }
    }

    #[tokio::test]
    async fn a_bad_ca_file_is_named_before_connecting() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("ca.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let junk = junk.to_str().unwrap();
        // Port 9 (discard): nothing is reached, the file is refused first.
        let e = connect_channel("https://127.0.0.1:9", Some(junk)).await.unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
        let e = connect_channel("https://127.0.0.1:9", Some("/nonexistent/ca.pem"))
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("--ca /nonexistent/ca.pem: cannot read it"),
            "{e}"
        );
        let e = connect_channel("http://127.0.0.1:9", Some(junk)).await.unwrap_err();
        assert!(e.to_string().contains("plain http"), "{e}");
        // An empty CHORUS_CA counts as unset: this one fails at connecting, not at the file.
        let e = connect_channel("http://127.0.0.1:9", Some("  ")).await.unwrap_err();
        assert!(matches!(e, CliError::Connect { .. }), "{e}");
        let e = connect_channel("ftp://127.0.0.1:9", None).await.unwrap_err();
        assert!(e.to_string().contains("http:// or https://"), "{e}");
    }

    #[test]
    fn token_with_newline_is_rejected() {
        assert!(AuthInterceptor::new(Some("a\nb")).is_err());
    }

    #[test]
    fn unary_requests_carry_a_deadline() {
        let req = with_deadline((), Duration::from_secs(7));
        // gRPC's wire form of the deadline: an integer and a unit, here seconds or finer.
        let t = req
            .metadata()
            .get("grpc-timeout")
            .expect("grpc-timeout header")
            .to_str()
            .unwrap();
        assert!(["7S", "7000m", "7000000u"].contains(&t), "{t}");
    }
}
