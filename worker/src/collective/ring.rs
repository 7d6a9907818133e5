//! The CPU collective: a ring over TCP, one connection to each neighbour.
//!
//! Rank `r` sends to rank `r+1` and receives from rank `r-1` (modulo the world size) over two
//! connections, one per direction, even when both neighbours are the same rank (world size 2), so
//! every rank sends and receives at the same time in every step. All-reduce is the bandwidth-optimal
//! ring: a reduce-scatter then an all-gather, `2(n-1)` steps over `n` segments, each rank sending
//! `2(n-1)/n` of the data. In each step the outgoing segment is written on a helper thread while
//! the incoming one is read and reduced as it arrives, so the transfer and the arithmetic overlap
//! and no two ranks can block each other on full socket buffers. A call small enough that its
//! bytes always fit in the socket buffers writes and then reads on the calling thread instead:
//! there a thread costs more than the transfer.
//!
//! Floats travel in the host's byte order: the ranks of one trial run the same build.
//!
//! Failure: every read and write has the configured timeout. The first error poisons the ring (later
//! calls fail at once with it) and shuts both sockets down, so the neighbours fail too and the
//! error travels round the ring: a dead, stuck or departed rank becomes an error on every rank.

use super::{Collective, ReduceOp};
use crate::error::WorkerError;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Opens and answers every connection, so a stray client (a port scanner, a health probe) that
/// does not start with it is told apart from a peer.
const MAGIC: u64 = u64::from_le_bytes(*b"CHORUSR1");
const HELLO_LEN: usize = 24;
const HELLO_WAIT: Duration = Duration::from_secs(5);
const HEADER_LEN: usize = 24;

/// Asked of the kernel for both directions of every connection; it bounds the calls that may
/// write before reading (see [`Ring::fits`]). Linux caps it at `net.core.wmem_max`, so the size
/// granted is read back rather than assumed.
const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// How long one blocked write waits before [`Ring::write_all`] looks at the clock. A write that
/// moved some bytes before its timeout returns them and a fresh one waits again, so the send
/// timeout is counted from the last progress here rather than left to the kernel, where it could
/// stretch to twice the configured one.
const WRITE_WAKE: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy)]
pub struct RingConfig {
    /// The longest any read, write or connection attempt may wait for a peer.
    pub timeout: Duration,
    /// The most one read takes in before it is reduced (or, in a broadcast, forwarded). The
    /// default keeps the piece in L2 cache while it is added; on loopback 64 KiB to 4 MiB measure
    /// alike.
    pub chunk_bytes: usize,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            timeout: Duration::from_secs(60),
            chunk_bytes: 256 * 1024,
        }
    }
}

/// The socket a rank's left neighbour connects to. Bound before rendezvous so that its address can
/// be published, and so that peers that start earlier find it listening.
#[derive(Debug)]
pub struct RingListener {
    inner: TcpListener,
    addr: SocketAddr,
}

impl RingListener {
    /// Binds an ephemeral port on `ip`.
    pub fn bind(ip: IpAddr) -> Result<RingListener, WorkerError> {
        let inner = TcpListener::bind((ip, 0))
            .map_err(|e| WorkerError::Collective(format!("cannot listen for ring peers on {ip}: {e}")))?;
        let addr = inner
            .local_addr()
            .map_err(|e| WorkerError::Collective(format!("ring listener on {ip}: {e}")))?;
        Ok(RingListener { inner, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// One direction of the ring: the stream and who is at its other end (the peer's published
/// listener address, which is what an operator can match with a host).
#[derive(Debug)]
struct Link {
    stream: TcpStream,
    rank: usize,
    addr: SocketAddr,
}

#[derive(Debug)]
struct Links {
    /// Receives from rank `r-1`.
    left: Link,
    /// Sends to rank `r+1`.
    right: Link,
    /// Bytes a call may send without ever waiting on the right neighbour to read: half of what
    /// the kernel granted as the send buffer (its accounting counts some overhead beside the
    /// payload).
    send_capacity: usize,
    /// Fault injection: once this many bytes were received, the next read stalls for twice the
    /// timeout, as in a process that stopped reading, and then fails.
    #[cfg(test)]
    stall_after_bytes: Option<usize>,
    #[cfg(test)]
    received: std::sync::atomic::AtomicUsize,
}

impl Links {
    fn shutdown(&self) {
        // Errors only say the socket is already closed, which is the goal.
        let _ = self.left.stream.shutdown(Shutdown::Both);
        let _ = self.right.stream.shutdown(Shutdown::Both);
    }
}

/// A ring of `n` ranks over TCP. See the module documentation.
#[derive(Debug)]
pub struct RingCollective {
    rank: usize,
    world: usize,
    config: RingConfig,
    /// `None` at world size 1, where every call is local.
    links: Option<Links>,
    /// Numbers the calls, so that ranks which fall out of step are caught at the next call.
    seq: u64,
    /// The first error, returned again by every later call.
    failed: Option<String>,
    /// Where an incoming chunk lands before it is added into the destination; reused across calls.
    scratch: Vec<f32>,
}

impl RingCollective {
    /// Joins the ring: connects to rank `rank+1` and accepts rank `rank-1`, each presenting
    /// `session` (the attempt's token). `peers` holds every rank's listener address, indexed by
    /// rank. Waits up to `config.timeout` for the neighbours to appear.
    pub fn connect(
        listener: RingListener,
        rank: usize,
        peers: &[SocketAddr],
        session: u64,
        config: RingConfig,
    ) -> Result<RingCollective, WorkerError> {
        let world = peers.len();
        if rank >= world {
            return Err(WorkerError::Collective(format!(
                "connect: rank {rank} is outside a world of size {world}"
            )));
        }
        if config.chunk_bytes < 4 {
            return Err(WorkerError::Collective(format!(
                "connect: chunk of {} bytes cannot hold one float",
                config.chunk_bytes
            )));
        }
        let links = if world == 1 {
            None
        } else {
            let fail = |msg: String| WorkerError::Collective(format!("connect on rank {rank} of {world}: {msg}"));
            let mut links = Handshake {
                rank,
                world,
                peers,
                session,
                deadline: Instant::now() + config.timeout,
                timeout: config.timeout,
            }
            .run(&listener.inner)
            .map_err(fail)?;
            for link in [&links.left, &links.right] {
                configure_socket(&link.stream, config.timeout).map_err(|e| {
                    fail(format!(
                        "cannot configure the connection with rank {} ({}): {e}",
                        link.rank, link.addr
                    ))
                })?;
            }
            links.send_capacity = send_buffer(&links.right.stream).map_err(|e| {
                fail(format!(
                    "cannot read the send buffer of the connection with rank {} ({}): {e}",
                    links.right.rank, links.right.addr
                ))
            })? / 2;
            tracing::debug!(
                rank,
                world,
                send_capacity = links.send_capacity,
                left = %links.left.addr,
                right = %links.right.addr,
                "joined the ring"
            );
            Some(links)
        };
        Ok(RingCollective {
            rank,
            world,
            config,
            links,
            seq: 0,
            failed: None,
            scratch: Vec::new(),
        })
    }

    /// Reduces `data` across the ranks in place; every rank ends with bit-identical values.
    pub fn all_reduce_f32(&mut self, data: &mut [f32], op: ReduceOp) -> Result<(), WorkerError> {
        let header = Header {
            tag: Tag::AllReduce,
            aux: match op {
                ReduceOp::Sum => 0,
                ReduceOp::Average => 1,
            },
            seq: self.seq,
            len: data.len() as u64,
        };
        self.begin("all_reduce")?;
        let Some(links) = &self.links else {
            return Ok(());
        };
        let chunk = (self.config.chunk_bytes / 4).max(1);
        if self.scratch.len() < chunk {
            self.scratch = vec![0.0; chunk];
        }
        let ring = Ring {
            links,
            rank: self.rank,
            world: self.world,
            timeout: self.config.timeout,
            inline: Ring::fits(
                links,
                (data.len() * 4) as u64 * 2 * (self.world as u64 - 1) / self.world as u64,
            ),
        };
        let result = ring.all_reduce(data, op, &header, &mut self.scratch[..chunk]);
        self.finish("all_reduce", result)
    }

    /// Overwrites `data` on every rank with `root`'s `data`.
    pub fn broadcast_bytes(&mut self, data: &mut [u8], root: usize) -> Result<(), WorkerError> {
        if root >= self.world {
            return Err(WorkerError::Collective(format!(
                "broadcast on rank {} of {}: root rank {root} is outside the world",
                self.rank, self.world
            )));
        }
        let header = Header {
            tag: Tag::Broadcast,
            aux: root as u32,
            seq: self.seq,
            len: data.len() as u64,
        };
        self.begin("broadcast")?;
        let Some(links) = &self.links else {
            return Ok(());
        };
        let ring = Ring {
            links,
            rank: self.rank,
            world: self.world,
            timeout: self.config.timeout,
            inline: Ring::fits(links, data.len() as u64),
        };
        let result = ring.broadcast(data, root, &header, self.config.chunk_bytes);
        self.finish("broadcast", result)
    }

    /// Returns once every rank has entered the barrier.
    pub fn barrier(&mut self) -> Result<(), WorkerError> {
        let header = Header {
            tag: Tag::Barrier,
            aux: 0,
            seq: self.seq,
            len: 0,
        };
        self.begin("barrier")?;
        let Some(links) = &self.links else {
            return Ok(());
        };
        let ring = Ring {
            links,
            rank: self.rank,
            world: self.world,
            timeout: self.config.timeout,
            inline: true,
        };
        let result = ring.barrier(&header);
        self.finish("barrier", result)
    }

    /// Fails at once if the ring failed before; otherwise counts the call.
    fn begin(&mut self, op: &str) -> Result<(), WorkerError> {
        if let Some(first) = &self.failed {
            return Err(WorkerError::Collective(format!(
                "{op} on rank {} of {}: the ring failed earlier: {first}",
                self.rank, self.world
            )));
        }
        self.seq += 1;
        Ok(())
    }

    fn finish(&mut self, op: &str, result: Result<(), String>) -> Result<(), WorkerError> {
        result.map_err(|msg| {
            let msg = format!("{op} on rank {} of {}: {msg}", self.rank, self.world);
            if let Some(links) = &self.links {
                links.shutdown();
            }
            self.failed = Some(msg.clone());
            WorkerError::Collective(msg)
        })
    }
}

impl Drop for RingCollective {
    fn drop(&mut self) {
        // Closing the descriptors would do, unless a copy of them lives on in a child process:
        // shutting down tells the neighbours now either way.
        if let Some(links) = &self.links {
            links.shutdown();
        }
    }
}

impl Collective for RingCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<(), WorkerError> {
        check_tensor(t, "all_reduce", self.rank, self.world)?;
        if t.kind() != Kind::Float {
            return Err(WorkerError::Collective(format!(
                "all_reduce on rank {} of {}: the ring reduces float32 tensors, not {:?}",
                self.rank,
                self.world,
                t.kind()
            )));
        }
        let n = t.numel();
        if n == 0 {
            return self.all_reduce_f32(&mut [], op);
        }
        // SAFETY: `t` is a defined, contiguous float32 tensor in CPU memory (checked above), so
        // its data pointer addresses `n` initialised, aligned f32 values; the `&mut Tensor` keeps
        // this handle from being used until the slice is gone.
        let data = unsafe { std::slice::from_raw_parts_mut(t.data_ptr().cast::<f32>(), n) };
        self.all_reduce_f32(data, op)
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<(), WorkerError> {
        check_tensor(t, "broadcast", self.rank, self.world)?;
        let len = t.numel() * t.kind().elt_size_in_bytes();
        if len == 0 {
            return self.broadcast_bytes(&mut [], root);
        }
        // SAFETY: as in `all_reduce`; every dtype's elements are plain bytes in memory.
        let data = unsafe { std::slice::from_raw_parts_mut(t.data_ptr().cast::<u8>(), len) };
        self.broadcast_bytes(data, root)
    }

    fn barrier(&mut self) -> Result<(), WorkerError> {
        RingCollective::barrier(self)
    }
}

fn check_tensor(t: &Tensor, op: &str, rank: usize, world: usize) -> Result<(), WorkerError> {
    let reject = |why: String| {
        Err(WorkerError::Collective(format!(
            "{op} on rank {rank} of {world}: {why}"
        )))
    };
    if !t.defined() {
        return reject("the tensor is undefined".into());
    }
    if t.device() != Device::Cpu {
        return reject(format!("the ring serves CPU tensors, this one is on {:?}", t.device()));
    }
    if !t.is_contiguous() {
        return reject(format!("the tensor of shape {:?} is not contiguous", t.size()));
    }
    Ok(())
}

/// The settings of every ring connection: no Nagle delay, large buffers, reads that time out after
/// `timeout`, and writes that return every quarter second at most (the ring keeps the write
/// deadline itself). Public so that a measurement of the bare transport can use the same.
pub fn configure_socket(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout.min(WRITE_WAKE)))?;
    set_buffer(stream, libc::SO_SNDBUF, SOCKET_BUFFER_BYTES)?;
    set_buffer(stream, libc::SO_RCVBUF, SOCKET_BUFFER_BYTES)
}

/// The send buffer the kernel granted, in its accounting (about twice what was asked).
fn send_buffer(stream: &TcpStream) -> io::Result<usize> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt on a socket this process owns, into a live int whose size is passed.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(usize::try_from(value).unwrap_or(0))
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_buffer(stream: &TcpStream, option: libc::c_int, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: a plain setsockopt on a socket this process owns, with a pointer to a live int and
    // its size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How a peer answered a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Accepted = 0,
    WrongSession = 1,
    WrongRank = 2,
    WrongWorld = 3,
}

struct Handshake<'a> {
    rank: usize,
    world: usize,
    peers: &'a [SocketAddr],
    session: u64,
    deadline: Instant,
    timeout: Duration,
}

impl Handshake<'_> {
    /// Every rank first connects rightwards and sends its hello, then accepts from the left and
    /// answers, and only then reads the answer from the right: were the answer awaited before
    /// accepting, each rank would wait on the next one all round the ring.
    fn run(&self, listener: &TcpListener) -> Result<Links, String> {
        let right_rank = (self.rank + 1) % self.world;
        let left_rank = (self.rank + self.world - 1) % self.world;
        let right = self.connect_right(right_rank)?;
        let left = self.accept_left(listener, left_rank)?;
        self.read_verdict(&right)?;
        Ok(Links {
            left,
            right,
            send_capacity: 0,
            #[cfg(test)]
            stall_after_bytes: None,
            #[cfg(test)]
            received: Default::default(),
        })
    }

    fn remaining(&self) -> Option<Duration> {
        self.deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    }

    fn connect_right(&self, right_rank: usize) -> Result<Link, String> {
        let addr = self.peers[right_rank];
        let stream = loop {
            let Some(left) = self.remaining() else {
                return Err(format!(
                    "cannot reach rank {right_rank} ({addr}) within {:?}",
                    self.timeout
                ));
            };
            match TcpStream::connect_timeout(&addr, left) {
                Ok(s) => break s,
                // The peer may not have bound its listener yet: peers start at slightly different
                // times, so only the deadline ends the attempts.
                Err(e) => {
                    if self.remaining().is_none() {
                        return Err(format!(
                            "cannot reach rank {right_rank} ({addr}) within {:?}: {e}",
                            self.timeout
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let mut hello = [0u8; HELLO_LEN];
        hello[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        hello[8..16].copy_from_slice(&self.session.to_le_bytes());
        hello[16..20].copy_from_slice(&(self.rank as u32).to_le_bytes());
        hello[20..24].copy_from_slice(&(self.world as u32).to_le_bytes());
        let io_err = |e: io::Error| format!("handshake with rank {right_rank} ({addr}): {e}");
        stream.set_write_timeout(self.remaining()).map_err(io_err)?;
        (&stream).write_all(&hello).map_err(io_err)?;
        Ok(Link {
            stream,
            rank: right_rank,
            addr,
        })
    }

    fn accept_left(&self, listener: &TcpListener, left_rank: usize) -> Result<Link, String> {
        let addr = self.peers[left_rank];
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("listener {addr}: {e}"))?;
        loop {
            let Some(left) = self.remaining() else {
                return Err(format!(
                    "rank {left_rank} ({addr}) did not connect within {:?}",
                    self.timeout
                ));
            };
            let (stream, from) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => return Err(format!("accepting rank {left_rank} ({addr}): {e}")),
            };
            let mut hello = [0u8; HELLO_LEN];
            // A peer sends its hello right after connecting; a client that sends nothing must
            // not hold up the one that will.
            let read = stream
                .set_nonblocking(false)
                .and_then(|()| stream.set_read_timeout(Some(left.min(HELLO_WAIT))))
                .and_then(|()| (&stream).read_exact(&mut hello));
            if read.is_err() || u64::from_le_bytes(hello[0..8].try_into().unwrap()) != MAGIC {
                // Not a ring peer: ignore it and keep waiting for the real one.
                tracing::debug!(%from, "ignored a connection that did not open with the ring handshake");
                continue;
            }
            let session = u64::from_le_bytes(hello[8..16].try_into().unwrap());
            let rank = u32::from_le_bytes(hello[16..20].try_into().unwrap()) as usize;
            let world = u32::from_le_bytes(hello[20..24].try_into().unwrap()) as usize;
            let (verdict, why) = if session != self.session {
                (
                    Verdict::WrongSession,
                    format!(
                        "it presented session {session:#x}, this rank's session is {:#x}",
                        self.session
                    ),
                )
            } else if world != self.world {
                (
                    Verdict::WrongWorld,
                    format!(
                        "it is in a world of size {world}, this rank in one of size {}",
                        self.world
                    ),
                )
            } else if rank != left_rank {
                (
                    Verdict::WrongRank,
                    format!("it presented rank {rank}, this rank expects rank {left_rank} ({addr})"),
                )
            } else {
                (Verdict::Accepted, String::new())
            };
            self.send_verdict(&stream, verdict);
            if verdict != Verdict::Accepted {
                // A peer speaking the protocol with the wrong identity means the rendezvous mixed
                // attempts up (a stale rank still running): waiting would only delay the failure.
                return Err(format!("refused a connection from {from}: {why}"));
            }
            return Ok(Link {
                stream,
                rank: left_rank,
                addr,
            });
        }
    }

    fn send_verdict(&self, stream: &TcpStream, verdict: Verdict) {
        let mut answer = [0u8; HELLO_LEN];
        answer[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        answer[8..16].copy_from_slice(&self.session.to_le_bytes());
        answer[16..20].copy_from_slice(&(self.rank as u32).to_le_bytes());
        answer[20..24].copy_from_slice(&(verdict as u32).to_le_bytes());
        // The connecting side learns nothing more from a failure to tell it: it times out.
        let _ = stream
            .set_write_timeout(self.remaining())
            .and_then(|()| (&*stream).write_all(&answer));
    }

    fn read_verdict(&self, right: &Link) -> Result<(), String> {
        let mut answer = [0u8; HELLO_LEN];
        let read = right
            .stream
            .set_read_timeout(Some(self.remaining().unwrap_or(Duration::from_millis(1))))
            .and_then(|()| (&right.stream).read_exact(&mut answer));
        if let Err(e) = read {
            return Err(describe(&e, Direction::Handshake, right, self.timeout));
        }
        let magic = u64::from_le_bytes(answer[0..8].try_into().unwrap());
        let session = u64::from_le_bytes(answer[8..16].try_into().unwrap());
        let verdict = u32::from_le_bytes(answer[20..24].try_into().unwrap());
        if magic != MAGIC {
            return Err(format!(
                "rank {} ({}) answered the handshake with something else than a ring peer",
                right.rank, right.addr
            ));
        }
        let why = match verdict {
            v if v == Verdict::Accepted as u32 => return Ok(()),
            v if v == Verdict::WrongSession as u32 => {
                format!("it is in session {session:#x}, this rank in {:#x}", self.session)
            }
            v if v == Verdict::WrongRank as u32 => {
                format!("it does not expect rank {} as its left neighbour", self.rank)
            }
            v if v == Verdict::WrongWorld as u32 => format!("its world is not of size {}", self.world),
            v => format!("unknown answer {v}"),
        };
        Err(format!("rank {} ({}) refused this rank: {why}", right.rank, right.addr))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    AllReduce = 1,
    Broadcast = 2,
    Barrier = 3,
}

/// Opens every call on each link, so that ranks making different calls (another op, size or root)
/// fail with both calls named instead of exchanging garbage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    tag: Tag,
    /// The reduce op, or the broadcast root.
    aux: u32,
    seq: u64,
    /// Floats for all-reduce, bytes for broadcast.
    len: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&(self.tag as u32).to_le_bytes());
        b[4..8].copy_from_slice(&self.aux.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    fn describe_raw(b: &[u8; HEADER_LEN]) -> String {
        let tag = u32::from_le_bytes(b[0..4].try_into().unwrap());
        let aux = u32::from_le_bytes(b[4..8].try_into().unwrap());
        let seq = u64::from_le_bytes(b[8..16].try_into().unwrap());
        let len = u64::from_le_bytes(b[16..24].try_into().unwrap());
        let tag = match tag {
            1 => Some(Tag::AllReduce),
            2 => Some(Tag::Broadcast),
            3 => Some(Tag::Barrier),
            _ => None,
        };
        match tag {
            Some(tag) => Header { tag, aux, seq, len }.to_string(),
            None => format!("an unknown message (tag {tag:?})"),
        }
    }
}

impl std::fmt::Display for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seq = self.seq;
        match self.tag {
            Tag::AllReduce => {
                let op = if self.aux == 0 { "sum" } else { "average" };
                write!(f, "call #{seq}: all_reduce ({op}) of {} floats", self.len)
            }
            Tag::Broadcast => write!(f, "call #{seq}: broadcast of {} bytes from rank {}", self.len, self.aux),
            Tag::Barrier => write!(f, "call #{seq}: barrier"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Direction {
    Send,
    Receive,
    Handshake,
}

/// Turns an I/O error on a link into words that name the peer and say what it means.
fn describe(e: &io::Error, direction: Direction, link: &Link, timeout: Duration) -> String {
    let peer = format!("rank {} ({})", link.rank, link.addr);
    match e.kind() {
        io::ErrorKind::UnexpectedEof => format!("{peer} closed the connection"),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted => {
            format!("{peer} closed the connection ({e})")
        }
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => match direction {
            Direction::Send => format!("{peer} took no data within {timeout:?}"),
            Direction::Receive => format!("no data from {peer} within {timeout:?}"),
            Direction::Handshake => format!("no handshake answer from {peer} within {timeout:?}"),
        },
        _ => match direction {
            Direction::Send => format!("sending to {peer}: {e}"),
            Direction::Receive | Direction::Handshake => format!("receiving from {peer}: {e}"),
        },
    }
}

/// Keeps the first error of a step whose halves run on two threads, and shuts the sockets down
/// so that the other half, blocked on its neighbour, fails now instead of at its timeout. The error
/// is recorded before the shutdown, so the other half's consequent error never displaces it.
struct FirstError<'a> {
    links: &'a Links,
    first: Mutex<Option<String>>,
}

impl<'a> FirstError<'a> {
    fn new(links: &'a Links) -> Self {
        FirstError {
            links,
            first: Mutex::new(None),
        }
    }

    fn record(&self, msg: String) {
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(msg);
            drop(first);
            self.links.shutdown();
        }
    }

    fn into_result(self) -> Result<(), String> {
        match self.first.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(msg) => Err(msg),
            None => Ok(()),
        }
    }
}

/// Where a step's incoming segment goes.
enum Incoming<'a> {
    /// Added into these floats (reduce-scatter), read through the scratch buffer that follows.
    Add(&'a mut [f32], &'a mut [f32]),
    /// Written over these bytes (all-gather).
    Overwrite(&'a mut [u8]),
}

/// One call's view of the ring.
struct Ring<'a> {
    links: &'a Links,
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Whether this call's sends fit in the socket buffers (see [`Ring::fits`]), so that each step
    /// may write and then read on one thread.
    inline: bool,
}

impl Ring<'_> {
    /// Whether a call that sends `bytes` (and its header) on each link may write before reading
    /// without a risk of deadlock. A rank finishes a call only after every rank has started it,
    /// and so finished the one before: at most two calls' bytes are ever unread on a link, and
    /// when each takes at most half the send buffer, no write ever waits on the reader.
    fn fits(links: &Links, bytes: u64) -> bool {
        bytes + HEADER_LEN as u64 <= links.send_capacity as u64 / 2
    }

    fn all_reduce(&self, data: &mut [f32], op: ReduceOp, header: &Header, scratch: &mut [f32]) -> Result<(), String> {
        let n = self.world;
        let r = self.rank;
        // Reduce-scatter: after step k, the segment received holds the sum over k+2 ranks; after
        // n-1 steps rank r holds segment r+1 summed over all ranks.
        for k in 0..n - 1 {
            let out = segment(data.len(), n, (r + n - k) % n);
            let inc = segment(data.len(), n, (r + 2 * n - k - 1) % n);
            let (out, inc) = split_pair(data, out, inc);
            let first = (k == 0).then_some(header);
            self.exchange(first, f32_bytes(out), Incoming::Add(inc, &mut *scratch))?;
        }
        if op == ReduceOp::Average {
            // Dividing only the segment this rank owns, before it is gathered, makes every rank's
            // result the same bits and costs 1/n of a pass.
            let world = n as f32;
            let owned = segment(data.len(), n, (r + 1) % n);
            for x in &mut data[owned] {
                *x /= world;
            }
        }
        for k in 0..n - 1 {
            let out = segment(data.len(), n, (r + 1 + n - k) % n);
            let inc = segment(data.len(), n, (r + n - k) % n);
            let (out, inc) = split_pair(data, out, inc);
            self.exchange(None, f32_bytes(out), Incoming::Overwrite(f32_bytes_mut(inc)))?;
        }
        Ok(())
    }

    /// One ring step: `out` (after `header`, if any) to the right while the left neighbour's
    /// segment (after its header, checked against `header`) is received into `incoming`.
    fn exchange(&self, header: Option<&Header>, out: &[u8], incoming: Incoming<'_>) -> Result<(), String> {
        if self.inline {
            self.send(header, out)?;
            return self.receive(header, incoming);
        }
        let first = FirstError::new(self.links);
        std::thread::scope(|s| {
            s.spawn(|| {
                if let Err(msg) = self.send(header, out) {
                    first.record(msg);
                }
            });
            if let Err(msg) = self.receive(header, incoming) {
                first.record(msg);
            }
        });
        first.into_result()
    }

    fn send(&self, header: Option<&Header>, data: &[u8]) -> Result<(), String> {
        let link = &self.links.right;
        if let Some(h) = header {
            self.write_all(&h.encode())
        } else {
            Ok(())
        }
        .and_then(|()| self.write_all(data))
        .map_err(|e| describe(&e, Direction::Send, link, self.timeout))
    }

    /// Writes to the right, failing once the neighbour has taken nothing for the timeout.
    fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        let mut progress = Instant::now();
        while !data.is_empty() {
            match (&self.links.right.stream).write(data) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    data = &data[n..];
                    progress = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
                        && progress.elapsed() < self.timeout => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn receive(&self, header: Option<&Header>, incoming: Incoming<'_>) -> Result<(), String> {
        let link = &self.links.left;
        if let Some(h) = header {
            self.check_header(h)?;
        }
        let failed = |e: io::Error| describe(&e, Direction::Receive, link, self.timeout);
        match incoming {
            Incoming::Overwrite(dst) => self.read_exact(dst).map_err(failed),
            Incoming::Add(dst, scratch) => self.read_add(dst, scratch).map_err(failed),
        }
    }

    fn check_header(&self, expected: &Header) -> Result<(), String> {
        let link = &self.links.left;
        let mut got = [0u8; HEADER_LEN];
        self.read_exact(&mut got)
            .map_err(|e| describe(&e, Direction::Receive, link, self.timeout))?;
        if got != expected.encode() {
            return Err(format!(
                "rank {} ({}) is in {}, this rank in {expected}",
                link.rank,
                link.addr,
                Header::describe_raw(&got)
            ));
        }
        Ok(())
    }

    fn read_exact(&self, mut dst: &mut [u8]) -> io::Result<()> {
        while !dst.is_empty() {
            let n = self.read(dst)?;
            dst = &mut dst[n..];
        }
        Ok(())
    }

    /// Reads from the left, failing on end of stream (a clean close is still a lost peer here).
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        #[cfg(test)]
        {
            use std::sync::atomic::Ordering;
            let received = self.links.received.load(Ordering::Relaxed);
            if self.links.stall_after_bytes.is_some_and(|limit| received >= limit) {
                std::thread::sleep(self.timeout * 2);
                return Err(io::ErrorKind::TimedOut.into());
            }
        }
        loop {
            match (&self.links.left.stream).read(buf) {
                Ok(0) if !buf.is_empty() => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    #[cfg(test)]
                    self.links.received.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Adds the incoming floats into `dst` as they arrive, a socket read at a time, so each piece is
    /// reduced while it is still in cache and the reduction hides behind the transfer.
    fn read_add(&self, dst: &mut [f32], scratch: &mut [f32]) -> io::Result<()> {
        let total = dst.len() * 4;
        let chunk = scratch.len() * 4;
        // A read may end inside a float: the complete floats are added at once, and the bytes of
        // the partial one move to the front of `scratch` to wait for the rest.
        let mut done = 0; // bytes of `dst` already reduced
        let mut pending = 0; // bytes at the front of `scratch` not yet added
        while done < total {
            let want = (total - done).min(chunk);
            let got = self.read(&mut f32_bytes_mut(scratch)[pending..want])?;
            pending += got;
            let floats = pending / 4;
            let first = done / 4;
            for (d, s) in dst[first..first + floats].iter_mut().zip(&scratch[..floats]) {
                *d += *s;
            }
            done += floats * 4;
            let rest = pending - floats * 4;
            if rest > 0 {
                f32_bytes_mut(scratch).copy_within(floats * 4..pending, 0);
            }
            pending = rest;
        }
        Ok(())
    }

    /// Pipelined along the ring from `root`: each rank forwards a chunk as soon as it has it.
    fn broadcast(&self, data: &mut [u8], root: usize, header: &Header, chunk: usize) -> Result<(), String> {
        let n = self.world;
        let position = (self.rank + n - root) % n;
        if position == 0 {
            return self.send(Some(header), data);
        }
        if position == n - 1 {
            return self.receive(Some(header), Incoming::Overwrite(data));
        }
        self.check_header(header)?;
        if self.inline {
            let failed = |e: io::Error| describe(&e, Direction::Receive, &self.links.left, self.timeout);
            self.read_exact(data).map_err(failed)?;
            return self.send(Some(header), data);
        }
        let first = FirstError::new(self.links);
        std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel::<&[u8]>();
            let forward = &first;
            s.spawn(move || {
                if let Err(msg) = self.send(Some(header), &[]) {
                    forward.record(msg);
                    return;
                }
                for piece in rx {
                    if let Err(msg) = self.send(None, piece) {
                        forward.record(msg);
                        return;
                    }
                }
            });
            for piece in data.chunks_mut(chunk) {
                if let Err(e) = self.read_exact(piece) {
                    first.record(describe(&e, Direction::Receive, &self.links.left, self.timeout));
                    return;
                }
                if tx.send(piece).is_err() {
                    return;
                }
            }
        });
        first.into_result()
    }

    /// `n-1` rounds of passing a token rightwards: by the last, each rank has heard, through its
    /// left neighbour, from every other rank, so all have entered.
    fn barrier(&self, header: &Header) -> Result<(), String> {
        for _ in 0..self.world - 1 {
            self.send(Some(header), &[])?;
            self.check_header(header)?;
        }
        Ok(())
    }
}

/// Segment `i` of `n` over `len` elements: the first `len % n` segments hold one more.
fn segment(len: usize, n: usize, i: usize) -> Range<usize> {
    let base = len / n;
    let extra = len % n;
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

/// Borrows two disjoint ranges of `data`, one to read and one to write.
fn split_pair<T>(data: &mut [T], read: Range<usize>, write: Range<usize>) -> (&[T], &mut [T]) {
    if read.start < write.start {
        let (lo, hi) = data.split_at_mut(write.start);
        (&lo[read], &mut hi[..write.len()])
    } else {
        let (lo, hi) = data.split_at_mut(read.start);
        (&hi[..read.len()], &mut lo[write])
    }
}

fn f32_bytes(x: &[f32]) -> &[u8] {
    // SAFETY: any f32 is 4 initialised bytes and u8 has no alignment requirement.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), std::mem::size_of_val(x)) }
}

fn f32_bytes_mut(x: &mut [f32]) -> &mut [u8] {
    // SAFETY: as in `f32_bytes`, and every bit pattern is a valid f32, so writes through the
    // bytes leave valid floats.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast(), std::mem::size_of_val(x)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::thread;

    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn config(timeout_s: u64) -> RingConfig {
        RingConfig {
            timeout: Duration::from_secs(timeout_s),
            // Small, so that test-sized data crosses many chunk and read boundaries.
            chunk_bytes: 4096 + 4 * 3 + 2,
        }
    }

    /// Joins `sessions.len()` ranks on loopback, rank r presenting `sessions[r]`.
    fn join(sessions: &[u64], config: RingConfig) -> Vec<Result<RingCollective, WorkerError>> {
        let listeners: Vec<_> = sessions
            .iter()
            .map(|_| RingListener::bind(LOCALHOST).unwrap())
            .collect();
        let peers: Vec<_> = listeners.iter().map(RingListener::local_addr).collect();
        let peers = &peers;
        thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .zip(sessions)
                .enumerate()
                .map(|(rank, (l, &session))| s.spawn(move || RingCollective::connect(l, rank, peers, session, config)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn ring(world: usize, config: RingConfig) -> Vec<RingCollective> {
        join(&vec![7; world], config).into_iter().map(Result::unwrap).collect()
    }

    /// Runs `f` on every rank at once, each on its own thread.
    fn on_all<T: Send>(ranks: &mut [RingCollective], f: impl Fn(usize, &mut RingCollective) -> T + Sync) -> Vec<T> {
        let f = &f;
        thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter_mut()
                .enumerate()
                .map(|(r, c)| s.spawn(move || f(r, c)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Deterministic values in [-1, 1) that differ by rank and index.
    fn values(rank: usize, len: usize) -> Vec<f32> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (rank as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn err_text(r: Result<(), WorkerError>) -> String {
        match r {
            Ok(()) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn segments_cover_the_data_in_order() {
        for len in [0, 1, 2, 3, 4, 5, 17, 100] {
            for n in 1..=5 {
                let segs: Vec<_> = (0..n).map(|i| segment(len, n, i)).collect();
                assert_eq!(segs[0].start, 0);
                assert_eq!(segs[n - 1].end, len);
                for w in segs.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() >= w[1].len() && w[0].len() - w[1].len() <= 1);
                }
            }
        }
    }

    #[test]
    fn all_reduce_equals_the_sum_and_average_at_every_world_size() {
        let lengths = [0, 1, 2, 3, 5, 1023, 4099, 3 * 1024 * 1024 / 4 + 3];
        for world in 1..=4 {
            let mut ranks = ring(world, config(10));
            for &len in &lengths {
                let mut expected = vec![0f64; len];
                for r in 0..world {
                    for (e, v) in expected.iter_mut().zip(values(r, len)) {
                        *e += v as f64;
                    }
                }
                let scale: f64 = world as f64;
                for op in [ReduceOp::Sum, ReduceOp::Average] {
                    let results = on_all(&mut ranks, |r, c| {
                        let mut data = values(r, len);
                        c.all_reduce_f32(&mut data, op).unwrap();
                        data
                    });
                    for (r, got) in results.iter().enumerate() {
                        assert_eq!(got.len(), len);
                        for (i, (&g, &e)) in got.iter().zip(&expected).enumerate() {
                            let e = if op == ReduceOp::Average { e / scale } else { e };
                            assert!(
                                (g as f64 - e).abs() <= 1e-5 * world as f64,
                                "world {world} len {len} {op:?} rank {r} [{i}]: {g} != {e}"
                            );
                        }
                        // Each segment is reduced once and then copied: all ranks agree exactly.
                        assert!(got.iter().zip(&results[0]).all(|(a, b)| a.to_bits() == b.to_bits()));
                    }
                }
            }
        }
    }

    #[test]
    fn broadcast_copies_the_roots_bytes_from_every_root() {
        for world in [1, 2, 3] {
            let mut ranks = ring(world, config(10));
            for len in [0, 1, 7, 4097, 300_001] {
                for root in 0..world {
                    let results = on_all(&mut ranks, |r, c| {
                        let mut data: Vec<u8> = (0..len).map(|i| (i * 31 + r * 7) as u8).collect();
                        c.broadcast_bytes(&mut data, root).unwrap();
                        data
                    });
                    let expected: Vec<u8> = (0..len).map(|i| (i * 31 + root * 7) as u8).collect();
                    for (r, got) in results.iter().enumerate() {
                        assert!(
                            *got == expected,
                            "world {world} len {len} root {root}: rank {r} differs"
                        );
                    }
                }
            }
            let root = world;
            let e = err_text(ranks[0].broadcast_bytes(&mut [1], root));
            assert!(e.contains("root rank"), "{e}");
        }
    }

    #[test]
    fn barrier_waits_for_the_last_rank() {
        let mut ranks = ring(3, config(10));
        let waited = on_all(&mut ranks, |r, c| {
            if r == 2 {
                thread::sleep(Duration::from_millis(400));
            }
            let start = Instant::now();
            c.barrier().unwrap();
            start.elapsed()
        });
        assert!(waited[0] >= Duration::from_millis(300), "{waited:?}");
        assert!(waited[1] >= Duration::from_millis(300), "{waited:?}");
    }

    #[test]
    fn a_peer_with_another_session_is_refused() {
        let results = join(&[7, 7, 8], config(5));
        let errors: Vec<String> = results
            .into_iter()
            .filter_map(|r| r.err().map(|e| e.to_string()))
            .collect();
        assert!(!errors.is_empty());
        assert!(
            errors
                .iter()
                .any(|e| e.contains("session 0x8") && e.contains("refused")),
            "{errors:?}"
        );
    }

    #[test]
    fn ranks_in_different_calls_fail_naming_both() {
        let mut ranks = ring(2, config(5));
        let results = on_all(&mut ranks, |r, c| {
            let mut data = vec![1.0; 10 + r];
            c.all_reduce_f32(&mut data, ReduceOp::Sum)
        });
        let e = err_text(results.into_iter().next().unwrap());
        assert!(
            e.contains("all_reduce (sum) of 11 floats") && e.contains("of 10 floats"),
            "{e}"
        );
    }

    /// Every rank but `skip` must fail with an error that names the op, within the timeout and
    /// some slack, and later calls must fail at once.
    fn assert_all_failed(results: Vec<(Result<(), WorkerError>, Duration)>, skip: usize, timeout: Duration) {
        for (r, (result, elapsed)) in results.into_iter().enumerate() {
            if r == skip {
                continue;
            }
            let e = err_text(result);
            assert!(e.contains(&format!("all_reduce on rank {r} of 3")), "{e}");
            assert!(
                elapsed < timeout + Duration::from_secs(3),
                "rank {r} took {elapsed:?}: {e}"
            );
        }
    }

    #[test]
    fn a_departed_rank_fails_every_other_rank() {
        let timeout = Duration::from_secs(2);
        let mut ranks = ring(3, config(2));
        on_all(&mut ranks, |r, c| {
            c.all_reduce_f32(&mut values(r, 1000), ReduceOp::Sum).unwrap()
        });
        let departed = ranks.pop().unwrap();
        let results = thread::scope(|s| {
            s.spawn(move || {
                thread::sleep(Duration::from_millis(100));
                drop(departed);
            });
            on_all(&mut ranks, |r, c| {
                let start = Instant::now();
                let result = c.all_reduce_f32(&mut values(r, 1 << 20), ReduceOp::Sum);
                (result, start.elapsed())
            })
        });
        let texts: Vec<String> = results.iter().map(|(r, _)| format!("{r:?}")).collect();
        assert!(texts.iter().any(|t| t.contains("closed the connection")), "{texts:?}");
        assert_all_failed(results, 2, timeout);
        let again = Instant::now();
        let e = err_text(ranks[0].barrier());
        assert!(
            e.contains("failed earlier") && again.elapsed() < Duration::from_millis(100),
            "{e}"
        );
    }

    #[test]
    fn a_rank_that_stops_reading_fails_every_other_rank() {
        let timeout = Duration::from_secs(2);
        let mut ranks = ring(3, config(2));
        ranks[2].links.as_mut().unwrap().stall_after_bytes = Some(100_000);
        let results = on_all(&mut ranks, |r, c| {
            let start = Instant::now();
            let result = c.all_reduce_f32(&mut values(r, 4 << 20), ReduceOp::Sum);
            (result, start.elapsed())
        });
        assert_all_failed(results, 2, timeout);
    }

    #[test]
    fn tensors_go_through_the_trait() {
        let mut ranks = ring(2, config(10));
        let results = on_all(&mut ranks, |r, c| {
            let c: &mut dyn Collective = c;
            let mut t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0]).reshape([5]) * (r as f64 + 1.0);
            c.all_reduce(&mut t, ReduceOp::Average).unwrap();
            let mut ints = Tensor::from_slice(&[10i64 * (r as i64 + 1), 20, 30]);
            c.broadcast(&mut ints, 1).unwrap();
            let mut empty = Tensor::zeros([0], (Kind::Float, Device::Cpu));
            c.all_reduce(&mut empty, ReduceOp::Sum).unwrap();
            let mut int_tensor = Tensor::from_slice(&[1i32, 2]);
            let int_err = err_text(c.all_reduce(&mut int_tensor, ReduceOp::Sum));
            let mut strided = Tensor::ones([3, 4], (Kind::Float, Device::Cpu)).transpose(0, 1);
            let strided_err = err_text(c.all_reduce(&mut strided, ReduceOp::Sum));
            let mut undefined = Tensor::new();
            let undefined_err = err_text(c.all_reduce(&mut undefined, ReduceOp::Sum));
            c.barrier().unwrap();
            (
                Vec::<f32>::try_from(&t).unwrap(),
                Vec::<i64>::try_from(&ints).unwrap(),
                int_err,
                strided_err,
                undefined_err,
            )
        });
        for (t, ints, int_err, strided_err, undefined_err) in results {
            assert_eq!(t, vec![1.5, 3.0, 4.5, 6.0, 7.5]);
            assert_eq!(ints, vec![20, 20, 30]);
            assert!(int_err.contains("float32"), "{int_err}");
            assert!(strided_err.contains("not contiguous"), "{strided_err}");
            assert!(undefined_err.contains("undefined"), "{undefined_err}");
        }
    }
}
