//! What the pod tests share: a coordinator started in-process on a loopback port, a small PKI
//! made fresh for each test with rcgen, and the coordinator binary.

use chorus_coordinator::{Options, run};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A coordinator serving in this process until stopped.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Starts a coordinator on 127.0.0.1:0 and waits until it serves.
    pub async fn start(opts: Options) -> Server {
        Self::try_start(opts).await.expect("the coordinator starts")
    }

    /// Starts a coordinator, or says why it did not.
    pub async fn try_start(opts: Options) -> anyhow::Result<Server> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut task = tokio::spawn(run(
            listener,
            opts,
            move |addr| {
                let _ = ready_tx.send(addr);
            },
            async {
                let _ = stopped.await;
            },
        ));
        let ended = tokio::select! {
            addr = ready_rx => match addr {
                Ok(addr) => return Ok(Server { addr, stop: Some(stop), task }),
                // Dropped unsent: the run ended before serving; its result says why.
                Err(_) => task.await,
            },
            ended = &mut task => ended,
        };
        Err(ended?.err().unwrap_or_else(|| anyhow::anyhow!("ended before serving")))
    }

    /// Asks it to stop and waits until it has.
    pub async fn stop(mut self) {
        let _ = self.stop.take().expect("running").send(());
        self.task.await.unwrap().unwrap();
    }

    /// Asks it to stop without waiting.
    pub fn signal_stop(&mut self) {
        let _ = self.stop.take().expect("running").send(());
    }

    /// A plain-text channel to it.
    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
}

/// A certificate authority and the files it issues, in a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Pki {
            dir: tempfile::tempdir().unwrap(),
            ca,
        }
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A certificate for `names` (SAN DNS names), for a server or a client: (cert, key) PEM.
    pub fn issue(&self, names: &[&str], client: bool) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes `contents` to `name` in the PKI's directory.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }

    /// A TLS channel to `addr` that trusts this CA, presenting `identity` (cert, key) if given.
    pub async fn connect(&self, addr: SocketAddr, identity: Option<&(String, String)>) -> Result<Channel, String> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.ca_pem()))
            .domain_name("localhost");
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| format!("{e:?}"))
    }
}

/// The coordinator binary, with no inherited CHORUS_* settings.
pub fn binary() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_chorus-coordinator"));
    for (k, _) in std::env::vars() {
        if k.starts_with("CHORUS_") {
            c.env_remove(k);
        }
    }
    c
}

/// Runs the binary to its end: (exit code, stdout, stderr).
pub fn run_binary(c: &mut std::process::Command) -> (i32, String, String) {
    let out = c.output().expect("the binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An experiment spec of `max_trials` random trials.
pub fn spec(name: &str, max_trials: u64) -> String {
    format!(
        "name: {name}\nmetric: {{name: loss, goal: minimize}}\nparameters:\n  lr: {{min: 0.001, max: 0.1}}\n\
         searcher: {{name: random, seed: 1}}\nmax_trials: {max_trials}\nparallel_trials: 2\n\
         trial:\n  command: [train, '${{params.lr}}']\n"
    )
}

/// Options for a coordinator on `dir`.
pub fn options(dir: &Path) -> Options {
    let mut o = Options::new(dir.to_path_buf());
    o.reconcile_interval = Duration::from_millis(50);
    o
}
