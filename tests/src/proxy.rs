//! A TCP proxy on loopback that a test can turn into a bad network: it forwards, stalls, or
//! refuses, on demand.
//!
//! Put it between two real components (a worker and its coordinator, Chorus and its S3 server)
//! and flip its [`ProxyMode`]: a stalled link keeps its connections open and moves no byte (a
//! partition that drops packets, a store that hangs); a refusing one resets every connection it
//! holds and closes each new one as soon as it is accepted (a dead peer, a store that fails).
//! Plain threads, one accept loop and two pumps per connection, so it works under any runtime.

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward both ways.
    Pass,
    /// Accept connections and keep them open, but move no byte either way until the mode
    /// changes; bytes already read are held and delivered after.
    Stall,
    /// Shut down every open connection, and every new one as soon as it is accepted.
    Refuse,
}

/// How long a pump waits on a read before it looks at the mode again.
const POLL: Duration = Duration::from_millis(100);
/// Bytes a pump moves at a time.
const BUF: usize = 64 * 1024;

struct Shared {
    upstream: SocketAddr,
    mode: Mutex<ProxyMode>,
    changed: Condvar,
    /// Open connections (client side, upstream side), to shut down on [`ProxyMode::Refuse`].
    conns: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
    next_id: AtomicU64,
    closed: AtomicBool,
}

impl Shared {
    fn mode(&self) -> ProxyMode {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shut_all(&self) {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        for (a, b) in conns.values() {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }

    /// Blocks while the proxy stalls; false once the connection must end instead.
    fn wait_to_forward(&self) -> bool {
        let mut mode = self.mode.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return false;
            }
            match *mode {
                ProxyMode::Pass => return true,
                ProxyMode::Refuse => return false,
                ProxyMode::Stall => {
                    mode = self
                        .changed
                        .wait_timeout(mode, POLL)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }
}

/// A proxy listening on a free loopback port, forwarding to `upstream`; stopped when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FaultProxy {
    pub fn start(upstream: SocketAddr) -> Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind the proxy")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            mode: Mutex::new(ProxyMode::Pass),
            changed: Condvar::new(),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name(format!("proxy-{addr}"))
            .spawn(move || accept_loop(listener, s))?;
        Ok(FaultProxy { addr, shared })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn mode(&self) -> ProxyMode {
        self.shared.mode()
    }

    pub fn set_mode(&self, mode: ProxyMode) {
        *self.shared.mode.lock().unwrap_or_else(|p| p.into_inner()) = mode;
        self.shared.changed.notify_all();
        if mode == ProxyMode::Refuse {
            self.shared.shut_all();
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        self.shared.shut_all();
        // Wake the accept loop so it sees `closed`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.closed.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        if shared.mode() == ProxyMode::Refuse {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(upstream) = TcpStream::connect_timeout(&shared.upstream, Duration::from_secs(2)) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        let clones = (|| -> std::io::Result<_> {
            Ok((
                client.try_clone()?,
                upstream.try_clone()?,
                client.try_clone()?,
                upstream.try_clone()?,
            ))
        })();
        let Ok((c_reg, u_reg, c_back, u_back)) = clones else {
            continue;
        };
        shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (c_reg, u_reg));
        // A refusal that raced the registration still reaches this connection.
        if shared.mode() == ProxyMode::Refuse {
            shared.shut_all();
        }
        let (s1, s2) = (shared.clone(), shared.clone());
        let done = Arc::new(AtomicUsize::new(0));
        let d2 = done.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("proxy-up-{id}"))
            .spawn(move || pump(client, upstream, &s1, id, &done));
        if spawned.is_ok() {
            let _ = std::thread::Builder::new()
                .name(format!("proxy-down-{id}"))
                .spawn(move || pump(u_back, c_back, &s2, id, &d2));
        }
    }
}

/// Moves bytes from `from` to `to` until either side closes or the proxy refuses; the second
/// pump of a connection to finish removes it from the registry.
fn pump(mut from: TcpStream, mut to: TcpStream, shared: &Shared, id: u64, done: &AtomicUsize) {
    let _ = from.set_read_timeout(Some(POLL));
    let mut buf = vec![0u8; BUF];
    loop {
        if shared.closed.load(Ordering::SeqCst) || shared.mode() == ProxyMode::Refuse {
            break;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(_) => break,
        };
        if !shared.wait_to_forward() || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
    if done.fetch_add(1, Ordering::SeqCst) == 1 {
        shared.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut c = c;
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg)?;
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got)?;
        Ok(got)
    }

    #[test]
    fn forwards_stalls_and_refuses() {
        let p = FaultProxy::start(echo_server()).unwrap();
        let mut s = TcpStream::connect(p.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(600))).unwrap();
        assert_eq!(roundtrip(&mut s, b"hello").unwrap(), b"hello");

        p.set_mode(ProxyMode::Stall);
        let err = roundtrip(&mut s, b"held").unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{err}"
        );
        p.set_mode(ProxyMode::Pass);
        // The held bytes arrive once the stall ends.
        let mut got = [0u8; 4];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"held");

        p.set_mode(ProxyMode::Refuse);
        let mut buf = [0u8; 1];
        assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)), "an open connection is cut");
        let mut fresh = TcpStream::connect(p.addr()).unwrap();
        fresh.set_read_timeout(Some(Duration::from_millis(600))).unwrap();
        assert!(roundtrip(&mut fresh, b"x").is_err(), "a new one is closed at once");

        p.set_mode(ProxyMode::Pass);
        let mut again = TcpStream::connect(p.addr()).unwrap();
        again.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert_eq!(roundtrip(&mut again, b"back").unwrap(), b"back");
    }
}
