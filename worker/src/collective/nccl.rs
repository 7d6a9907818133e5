//! NCCL between the ranks of a data-parallel trial whose tensors live on GPUs, one GPU per rank.
//!
//! Nothing CUDA is linked: the CUDA driver (`libcuda.so.1`, through `cudarc`) and NCCL are loaded
//! when first needed, so the worker builds without a CUDA toolkit and runs on hosts without GPUs,
//! where [`NcclCollective::available`] says why NCCL cannot be used instead of the process
//! panicking. NCCL is loaded as `libnccl.so.2` (then `libnccl.so`): PyTorch's wheels ship it in
//! `site-packages/nvidia/nccl/lib`, which must be on `LD_LIBRARY_PATH` unless `libtorch_cuda.so`
//! was loaded first (it pulls NCCL in through its own rpath, and the loader then finds the copy
//! already in the process by its soname).
//!
//! libtorch queues its kernels on its current stream, by default the legacy default (null) stream;
//! NCCL runs on that same stream, so a collective sees every kernel libtorch queued before it and
//! the kernels queued after it see its result. Each call then waits for the stream, so a call that
//! returned `Ok` left the data in place.
//!
//! A dead or stalled peer must not hang the trainer. Communicators are non-blocking: every wait is
//! a poll of NCCL's asynchronous error and the stream against a deadline, and a deadline that
//! passes aborts the communicator (`ncclCommAbort` stops its kernels), after which it refuses
//! every further call.

use super::{Collective, ReduceOp};
use crate::error::WorkerError;
use crate::gpu::driver_error;
use cudarc::driver::result::{self as cu, DriverError};
use cudarc::driver::sys as cusys;
use cudarc::nccl::sys::{ncclComm_t, ncclConfig_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId};
use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// The names NCCL goes by: the versioned soname first, the one every runtime install has
/// (the `nvidia-nccl-cu13` wheel and distribution packages ship nothing else).
const NCCL_LIBRARIES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// Non-blocking communicators, `ncclCommFinalize` and `ncclGetLastError` arrived in NCCL 2.14.
const OLDEST_NCCL: c_int = nccl_version(2, 14, 0);

/// The layout of `ncclConfig_t` that cudarc's `nccl-02028` bindings describe. NCCL reads a config
/// by its `size` and `version`, so a newer library fills what this layout lacks with defaults.
const CONFIG_VERSION: u32 = nccl_version(2, 28, 0) as u32;

/// `ncclResult_t` is kept as a plain integer: a newer NCCL may return codes that the bindings'
/// enum lacks (2.30 added `ncclTimeout`), and such a value in a Rust enum is undefined behaviour.
type NcclResult = u32;
const NCCL_SUCCESS: NcclResult = 0;
const NCCL_IN_PROGRESS: NcclResult = 7;
const NCCL_CONFIG_UNDEF_INT: c_int = c_int::MIN;

/// Waits poll at first by yielding (a small all-reduce completes within microseconds), then sleep
/// for up to this long, which bounds the delay a long all-reduce adds to its own duration.
const LONGEST_PAUSE: Duration = Duration::from_micros(500);
const YIELD_FOR: Duration = Duration::from_micros(200);

const fn nccl_version(major: c_int, minor: c_int, patch: c_int) -> c_int {
    major * 10_000 + minor * 100 + patch
}

type CudaStream = *mut c_void;

/// The NCCL entry points this module calls, resolved once per process.
struct Nccl {
    /// Which file was loaded and its version, for messages.
    name: &'static str,
    version: c_int,
    get_unique_id: unsafe extern "C" fn(*mut ncclUniqueId) -> NcclResult,
    comm_init_rank_config:
        unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int, *mut ncclConfig_t) -> NcclResult,
    comm_get_async_error: unsafe extern "C" fn(ncclComm_t, *mut NcclResult) -> NcclResult,
    comm_finalize: unsafe extern "C" fn(ncclComm_t) -> NcclResult,
    comm_destroy: unsafe extern "C" fn(ncclComm_t) -> NcclResult,
    comm_abort: unsafe extern "C" fn(ncclComm_t) -> NcclResult,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        ncclRedOp_t,
        ncclComm_t,
        CudaStream,
    ) -> NcclResult,
    broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        c_int,
        ncclComm_t,
        CudaStream,
    ) -> NcclResult,
    get_error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
    get_last_error: unsafe extern "C" fn(ncclComm_t) -> *const c_char,
    /// Never unloaded: the function pointers above point into it.
    _library: libloading::Library,
}

/// Everything [`NcclCollective`] needs from the host, or why the host cannot provide it.
struct Libraries {
    nccl: Nccl,
    driver_version: c_int,
}

static LIBRARIES: OnceLock<Result<Libraries, String>> = OnceLock::new();

fn libraries() -> Result<&'static Libraries, String> {
    LIBRARIES.get_or_init(load_libraries).as_ref().map_err(Clone::clone)
}

fn load_libraries() -> Result<Libraries, String> {
    // Both are tried even when the first fails, so one message names everything that is missing.
    let nccl = load_nccl();
    let driver = load_driver();
    match (nccl, driver) {
        (Ok(nccl), Ok(driver_version)) => {
            tracing::info!(
                library = nccl.name,
                nccl = %version_text(nccl.version),
                cuda_driver = %version_text_cuda(driver_version),
                "loaded NCCL"
            );
            Ok(Libraries { nccl, driver_version })
        }
        (nccl, driver) => {
            let reasons: Vec<String> = [nccl.err(), driver.err()].into_iter().flatten().collect();
            Err(format!("NCCL is not available: {}", reasons.join("; ")))
        }
    }
}

fn load_nccl() -> Result<Nccl, String> {
    let mut failures = Vec::new();
    for name in NCCL_LIBRARIES {
        // SAFETY: loading NCCL runs its initialisers, which only set up NCCL's own state.
        match unsafe { libloading::Library::new(name) } {
            Ok(library) => return resolve_nccl(name, library),
            Err(e) => failures.push(loader_error(&e)),
        }
    }
    Err(format!(
        "cannot load NCCL ({}); put the directory holding libnccl.so.2 on LD_LIBRARY_PATH (for PyTorch's \
         wheels: site-packages/nvidia/nccl/lib)",
        failures.join("; ")
    ))
}

fn resolve_nccl(name: &'static str, library: libloading::Library) -> Result<Nccl, String> {
    // SAFETY (this and every `symbol` call below): the type each entry point is read as is its
    // signature in nccl.h from 2.14 to 2.30, with `ncclResult_t` as the integer it is in C.
    let get_version: unsafe extern "C" fn(*mut c_int) -> NcclResult =
        unsafe { symbol(&library, name, "ncclGetVersion") }?;
    let mut version: c_int = 0;
    // SAFETY: `version` is a valid out-pointer.
    let result = unsafe { get_version(&mut version) };
    if result != NCCL_SUCCESS {
        return Err(format!("{name}: ncclGetVersion failed with code {result}"));
    }
    if version < OLDEST_NCCL {
        return Err(format!(
            "{name} is NCCL {}, but 2.14 or newer is needed (non-blocking communicators)",
            version_text(version)
        ));
    }
    // SAFETY: see the top of this function.
    unsafe {
        Ok(Nccl {
            name,
            version,
            get_unique_id: symbol(&library, name, "ncclGetUniqueId")?,
            comm_init_rank_config: symbol(&library, name, "ncclCommInitRankConfig")?,
            comm_get_async_error: symbol(&library, name, "ncclCommGetAsyncError")?,
            comm_finalize: symbol(&library, name, "ncclCommFinalize")?,
            comm_destroy: symbol(&library, name, "ncclCommDestroy")?,
            comm_abort: symbol(&library, name, "ncclCommAbort")?,
            all_reduce: symbol(&library, name, "ncclAllReduce")?,
            broadcast: symbol(&library, name, "ncclBroadcast")?,
            get_error_string: symbol(&library, name, "ncclGetErrorString")?,
            get_last_error: symbol(&library, name, "ncclGetLastError")?,
            _library: library,
        })
    }
}

/// # Safety
/// `T` must be the type of the entry point `symbol` names.
unsafe fn symbol<T: Copy>(library: &libloading::Library, file: &str, symbol: &str) -> Result<T, String> {
    // SAFETY: guaranteed by the caller.
    unsafe { library.get::<T>(format!("{symbol}\0").as_bytes()) }
        .map(|found| *found)
        .map_err(|e| format!("{file} has no {symbol} (NCCL older than 2.14?): {}", loader_error(&e)))
}

/// Loads and initialises the CUDA driver; returns its version.
fn load_driver() -> Result<c_int, String> {
    let init = crate::gpu::with_driver(|| {
        cu::init()?;
        let mut version: c_int = 0;
        // SAFETY: `version` is a valid out-pointer.
        unsafe { cusys::cuDriverGetVersion(&mut version) }.result()?;
        Ok(version)
    })?;
    init.map_err(|e| format!("the CUDA driver does not start: {}", driver_error(e)))
}

fn loader_error(e: &libloading::Error) -> String {
    match std::error::Error::source(e) {
        Some(source) => source.to_string(),
        None => e.to_string(),
    }
}

fn version_text(v: c_int) -> String {
    format!("{}.{}.{}", v / 10_000, (v % 10_000) / 100, v % 100)
}

fn version_text_cuda(v: c_int) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// One rank's NCCL communicator on one GPU.
pub struct NcclCollective {
    nccl: &'static Nccl,
    /// Null once aborted or never created.
    comm: ncclComm_t,
    rank: usize,
    world_size: usize,
    device_ordinal: usize,
    device: cusys::CUdevice,
    /// The device's primary context: the one libtorch's runtime calls use.
    context: cusys::CUcontext,
    /// One float on the GPU for [`Collective::barrier`].
    barrier_buffer: cusys::CUdeviceptr,
    timeout: Duration,
    /// Why the communicator was given up; every later call fails with it.
    failed: Option<String>,
}

// SAFETY: NCCL allows a communicator to be used from any thread as long as no two threads use it
// at the same time, which `&mut self` on every call guarantees (the type is not `Sync`). The
// context handle and the device pointer are process-wide.
unsafe impl Send for NcclCollective {}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("device_ordinal", &self.device_ordinal)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl NcclCollective {
    /// Whether NCCL and the CUDA driver can be loaded and started on this host; if not, why (a
    /// message that starts "NCCL is not available" and names the missing library).
    pub fn available() -> Result<(), String> {
        libraries().map(|_| ())
    }

    /// The versions in use, e.g. "NCCL 2.28.9 (libnccl.so.2), CUDA driver 13.0", for logs.
    pub fn versions() -> Result<String, String> {
        let libs = libraries()?;
        Ok(format!(
            "NCCL {} ({}), CUDA driver {}",
            version_text(libs.nccl.version),
            libs.nccl.name,
            version_text_cuda(libs.driver_version)
        ))
    }

    /// A fresh communicator id, made by rank 0 and handed to every rank (through the coordinator's
    /// rendezvous) before any of them calls [`NcclCollective::new`]. Always 128 bytes.
    pub fn unique_id() -> Result<Vec<u8>, WorkerError> {
        let nccl = &libraries().map_err(WorkerError::Collective)?.nccl;
        let mut id = ncclUniqueId { internal: [0; 128] };
        // SAFETY: `id` is a valid out-pointer.
        let result = unsafe { (nccl.get_unique_id)(&mut id) };
        if result != NCCL_SUCCESS {
            return Err(WorkerError::Collective(format!(
                "ncclGetUniqueId failed: {}",
                error_text(nccl, result, std::ptr::null_mut())
            )));
        }
        Ok(id.internal.iter().map(|&c| c as u8).collect())
    }

    /// Joins the communicator `unique_id` names as `rank` of `world_size`, on GPU
    /// `device_ordinal` (an index among the GPUs this process sees). Returns once every rank has
    /// joined, or fails after `timeout`, which also bounds every later call.
    pub fn new(
        rank: usize,
        world_size: usize,
        unique_id: &[u8],
        device_ordinal: usize,
        timeout: Duration,
    ) -> Result<Self, WorkerError> {
        if world_size == 0 || world_size > c_int::MAX as usize {
            return Err(WorkerError::Collective(format!(
                "NCCL cannot form a world of size {world_size}"
            )));
        }
        if rank >= world_size {
            return Err(WorkerError::Collective(format!(
                "rank {rank} is outside a world of size {world_size}"
            )));
        }
        let id: [u8; 128] = unique_id.try_into().map_err(|_| {
            WorkerError::Collective(format!(
                "an NCCL unique id is 128 bytes, but rank {rank} was given {}",
                unique_id.len()
            ))
        })?;
        if timeout.is_zero() {
            return Err(WorkerError::Collective("the NCCL timeout must be positive".into()));
        }
        let libs = libraries().map_err(WorkerError::Collective)?;
        let ordinal = c_int::try_from(device_ordinal).unwrap_or(c_int::MAX);
        let cuda = |what: &str, e: DriverError| {
            WorkerError::Collective(format!(
                "rank {rank}: {what} GPU {device_ordinal} failed: {}",
                driver_error(e)
            ))
        };
        let count = cu::device::get_count().map_err(|e| cuda("counting GPUs for", e))?;
        if ordinal >= count {
            return Err(WorkerError::Collective(format!(
                "rank {rank} was given GPU {device_ordinal}, but this process sees {count} GPU(s) \
                 (CUDA_VISIBLE_DEVICES={:?})",
                std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default()
            )));
        }
        let device = cu::device::get(ordinal).map_err(|e| cuda("opening", e))?;
        // SAFETY: `device` came from `device::get`.
        let context = unsafe { cu::primary_ctx::retain(device) }.map_err(|e| cuda("retaining the context of", e))?;
        let mut this = NcclCollective {
            nccl: &libs.nccl,
            comm: std::ptr::null_mut(),
            rank,
            world_size,
            device_ordinal,
            device,
            context,
            barrier_buffer: 0,
            timeout,
            failed: None,
        };
        // From here on `Drop` releases whatever was acquired.
        this.make_current()?;
        // SAFETY: the context is current; four bytes, zeroed before first use.
        unsafe {
            this.barrier_buffer = cu::malloc_sync(4).map_err(|e| cuda("allocating on", e))?;
            cu::memset_d8_sync(this.barrier_buffer, 0, 4).map_err(|e| cuda("clearing memory on", e))?;
        }
        this.join(id)?;
        Ok(this)
    }

    fn join(&mut self, id: [u8; 128]) -> Result<(), WorkerError> {
        let mut unique_id = ncclUniqueId { internal: [0; 128] };
        for (dst, src) in unique_id.internal.iter_mut().zip(id) {
            *dst = src as c_char;
        }
        let mut config = ncclConfig_t {
            size: std::mem::size_of::<ncclConfig_t>(),
            magic: 0xcafe_beef,
            version: CONFIG_VERSION,
            // Non-blocking: the only way to bound how long joining and each call may take.
            blocking: 0,
            cgaClusterSize: NCCL_CONFIG_UNDEF_INT,
            minCTAs: NCCL_CONFIG_UNDEF_INT,
            maxCTAs: NCCL_CONFIG_UNDEF_INT,
            netName: std::ptr::null(),
            splitShare: NCCL_CONFIG_UNDEF_INT,
            trafficClass: NCCL_CONFIG_UNDEF_INT,
            commName: std::ptr::null(),
            collnetEnable: NCCL_CONFIG_UNDEF_INT,
            CTAPolicy: NCCL_CONFIG_UNDEF_INT,
            shrinkShare: NCCL_CONFIG_UNDEF_INT,
            nvlsCTAs: NCCL_CONFIG_UNDEF_INT,
            nChannelsPerNetPeer: NCCL_CONFIG_UNDEF_INT,
            nvlinkCentricSched: NCCL_CONFIG_UNDEF_INT,
        };
        let mut comm: ncclComm_t = std::ptr::null_mut();
        // SAFETY: valid out-pointer and config; NCCL copies the id and the config. The sizes were
        // checked in `new`, so the casts are exact.
        let result = unsafe {
            (self.nccl.comm_init_rank_config)(
                &mut comm,
                self.world_size as c_int,
                unique_id,
                self.rank as c_int,
                &mut config,
            )
        };
        // A failed call may still have made a communicator, which then needs aborting.
        self.comm = comm;
        if result != NCCL_SUCCESS && result != NCCL_IN_PROGRESS {
            let reason = error_text(self.nccl, result, comm);
            return Err(self.give_up("joining", reason));
        }
        self.wait("joining", false)
    }

    /// Makes this communicator's GPU current on the calling thread, where NCCL looks for it.
    fn make_current(&self) -> Result<(), WorkerError> {
        // SAFETY: `context` is a retained primary context.
        unsafe { cu::ctx::set_current(self.context) }.map_err(|e| {
            WorkerError::Collective(format!(
                "rank {}: cannot make GPU {} current: {}",
                self.rank,
                self.device_ordinal,
                driver_error(e)
            ))
        })
    }

    /// The checks every call starts with: the communicator is alive and `t` is a tensor it can
    /// use. Returns the tensor's size in bytes.
    fn begin(&self, op: &str, t: &Tensor) -> Result<usize, WorkerError> {
        self.check_alive(op)?;
        if t.device() != Device::Cuda(self.device_ordinal) {
            return Err(WorkerError::Collective(format!(
                "NCCL {op} on rank {}: the tensor is on {:?}, but this communicator serves cuda:{}",
                self.rank,
                t.device(),
                self.device_ordinal
            )));
        }
        if !t.is_contiguous() {
            return Err(WorkerError::Collective(format!(
                "NCCL {op} on rank {}: the tensor is not contiguous",
                self.rank
            )));
        }
        self.make_current()?;
        Ok(t.numel() * t.kind().elt_size_in_bytes())
    }

    fn check_alive(&self, op: &str) -> Result<(), WorkerError> {
        match &self.failed {
            Some(reason) => Err(WorkerError::Collective(format!(
                "NCCL {op} on rank {}: the communicator was given up earlier ({reason})",
                self.rank
            ))),
            None => Ok(()),
        }
    }

    /// Checks what an NCCL call returned, then waits for the work it queued.
    fn finish(&mut self, op: &str, result: NcclResult) -> Result<(), WorkerError> {
        if result != NCCL_SUCCESS && result != NCCL_IN_PROGRESS {
            let reason = error_text(self.nccl, result, self.comm);
            return Err(self.give_up(op, reason));
        }
        self.wait(op, true)
    }

    /// Polls until NCCL has nothing in progress and, with `stream`, the null stream is drained;
    /// aborts the communicator on an error or when the timeout passes.
    fn wait(&mut self, op: &str, stream: bool) -> Result<(), WorkerError> {
        let start = Instant::now();
        let deadline = start + self.timeout;
        let mut pause = Duration::from_micros(10);
        loop {
            let mut state: NcclResult = NCCL_SUCCESS;
            // SAFETY: `comm` is live (a given-up communicator never gets here) and `state` is a
            // valid out-pointer.
            let result = unsafe { (self.nccl.comm_get_async_error)(self.comm, &mut state) };
            if result != NCCL_SUCCESS {
                let reason = error_text(self.nccl, result, self.comm);
                return Err(self.give_up(op, reason));
            }
            match state {
                NCCL_IN_PROGRESS => {}
                NCCL_SUCCESS if !stream => return Ok(()),
                // SAFETY: the null stream of the current context, which `begin` made current.
                NCCL_SUCCESS => match unsafe { cusys::cuStreamQuery(std::ptr::null_mut()) } {
                    cusys::CUresult::CUDA_SUCCESS => return Ok(()),
                    cusys::CUresult::CUDA_ERROR_NOT_READY => {}
                    e => {
                        let reason = format!("the GPU reported {}", driver_error(DriverError(e)));
                        return Err(self.give_up(op, reason));
                    }
                },
                failed => {
                    let reason = error_text(self.nccl, failed, self.comm);
                    return Err(self.give_up(op, reason));
                }
            }
            let now = Instant::now();
            if now >= deadline {
                let reason = format!(
                    "not finished after {:?}: a peer is dead, stalled or was never started",
                    self.timeout
                );
                return Err(self.give_up(op, reason));
            }
            if now - start < YIELD_FOR {
                std::thread::yield_now();
            } else {
                std::thread::sleep(pause.min(deadline - now));
                pause = (pause * 2).min(LONGEST_PAUSE);
            }
        }
    }

    /// Aborts the communicator (its kernels stop, so the stream moves again) and remembers why.
    fn give_up(&mut self, op: &str, reason: String) -> WorkerError {
        if !self.comm.is_null() {
            // SAFETY: `comm` is live and not used again: it is nulled right after.
            let result = unsafe { (self.nccl.comm_abort)(self.comm) };
            if result != NCCL_SUCCESS {
                tracing::warn!(rank = self.rank, code = result, "ncclCommAbort failed");
            }
            self.comm = std::ptr::null_mut();
        }
        let message = format!(
            "NCCL {op} on rank {} of {} (GPU {}) failed: {reason}",
            self.rank, self.world_size, self.device_ordinal
        );
        self.failed = Some(message.clone());
        WorkerError::Collective(message)
    }
}

/// NCCL's name for `result` and, when it has one, its description of the last error.
fn error_text(nccl: &Nccl, result: NcclResult, comm: ncclComm_t) -> String {
    // SAFETY: both return static or thread-local C strings (or null), read at once.
    let (name, detail) = unsafe {
        (
            c_text((nccl.get_error_string)(result)),
            c_text((nccl.get_last_error)(comm)),
        )
    };
    let name = name.unwrap_or_else(|| format!("NCCL error code {result}"));
    match detail.filter(|d| !d.is_empty()) {
        Some(detail) => format!("{name}: {detail}"),
        None => name,
    }
}

/// # Safety
/// `p` is null or points to a NUL-terminated string.
unsafe fn c_text(p: *const c_char) -> Option<String> {
    // SAFETY: guaranteed by the caller.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<(), WorkerError> {
        let bytes = self.begin("all_reduce", t)?;
        if t.kind() != Kind::Float {
            return Err(WorkerError::Collective(format!(
                "NCCL all_reduce on rank {}: the tensor is {:?}, but gradients are reduced as float32",
                self.rank,
                t.kind()
            )));
        }
        if bytes == 0 {
            return Ok(());
        }
        let red = match op {
            ReduceOp::Sum => ncclRedOp_t::ncclSum,
            ReduceOp::Average => ncclRedOp_t::ncclAvg,
        };
        let ptr = t.data_ptr();
        // SAFETY: `ptr` is the start of `t.numel()` contiguous float32 values on this
        // communicator's GPU (checked in `begin`), reduced in place; `t` is borrowed mutably until
        // the call has completed.
        let result = unsafe {
            (self.nccl.all_reduce)(
                ptr,
                ptr,
                t.numel(),
                ncclDataType_t::ncclFloat32,
                red,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        self.finish("all_reduce", result)
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<(), WorkerError> {
        let bytes = self.begin("broadcast", t)?;
        if root >= self.world_size {
            return Err(WorkerError::Collective(format!(
                "NCCL broadcast from rank {root} in a world of size {}",
                self.world_size
            )));
        }
        if bytes == 0 {
            return Ok(());
        }
        let ptr = t.data_ptr();
        // SAFETY: `ptr` is the start of `bytes` contiguous bytes on this communicator's GPU
        // (checked in `begin`), overwritten in place; `root` fits a c_int as it is below
        // `world_size`.
        let result = unsafe {
            (self.nccl.broadcast)(
                ptr,
                ptr,
                bytes,
                ncclDataType_t::ncclInt8,
                root as c_int,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        self.finish("broadcast", result)
    }

    fn barrier(&mut self) -> Result<(), WorkerError> {
        self.check_alive("barrier")?;
        self.make_current()?;
        let ptr = self.barrier_buffer as *mut c_void;
        // SAFETY: `barrier_buffer` holds one float on this communicator's GPU for its lifetime.
        let result = unsafe {
            (self.nccl.all_reduce)(
                ptr,
                ptr,
                1,
                ncclDataType_t::ncclFloat32,
                ncclRedOp_t::ncclSum,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        self.finish("barrier", result)
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        // Teardown goes ahead even if this fails: NCCL selects the communicator's own GPU.
        let _ = self.make_current();
        if !self.comm.is_null() {
            // Finalizing flushes what peers may still need from this rank; if it cannot finish
            // in time (a peer is gone), aborting is the only way out.
            // SAFETY: `comm` is live.
            let result = unsafe { (self.nccl.comm_finalize)(self.comm) };
            let finalized =
                (result == NCCL_SUCCESS || result == NCCL_IN_PROGRESS) && self.wait("teardown", false).is_ok();
            if finalized {
                // SAFETY: finalized and not used again.
                unsafe { (self.nccl.comm_destroy)(self.comm) };
                self.comm = std::ptr::null_mut();
            } else if !self.comm.is_null() {
                // SAFETY: live and not used again.
                unsafe { (self.nccl.comm_abort)(self.comm) };
                self.comm = std::ptr::null_mut();
            }
        }
        // SAFETY: allocated in `new` on this context (or still 0), freed once; the context was
        // retained once in `new`.
        unsafe {
            if self.barrier_buffer != 0 {
                let _ = cu::free_sync(self.barrier_buffer);
            }
            let _ = cu::primary_ctx::release(self.device);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn message(e: WorkerError) -> String {
        match e {
            WorkerError::Collective(m) => m,
            other => panic!("expected a collective error, got {other}"),
        }
    }

    #[test]
    fn arguments_are_checked_before_any_library_is_needed() {
        let id = [0u8; 128];
        let e = message(NcclCollective::new(2, 2, &id, 0, SECOND).unwrap_err());
        assert!(e.contains("rank 2") && e.contains("size 2"), "{e}");
        let e = message(NcclCollective::new(0, 0, &id, 0, SECOND).unwrap_err());
        assert!(e.contains("size 0"), "{e}");
        let e = message(NcclCollective::new(0, 1, &id[..16], 0, SECOND).unwrap_err());
        assert!(e.contains("128 bytes") && e.contains("16"), "{e}");
        let e = message(NcclCollective::new(0, 1, &id, 0, Duration::ZERO).unwrap_err());
        assert!(e.contains("timeout"), "{e}");
    }

    /// On a host without NVIDIA libraries (every CI machine) NCCL must fail with a message a
    /// person can act on, not a panic. On a GPU host the ignored tests below cover NCCL instead.
    #[test]
    fn a_host_without_nccl_gets_an_error_that_says_what_is_missing() {
        let Err(reason) = NcclCollective::available() else {
            assert!(NcclCollective::versions().unwrap().starts_with("NCCL 2."));
            return;
        };
        assert!(reason.starts_with("NCCL is not available: "), "{reason}");
        assert!(
            reason.contains("libnccl.so.2") || reason.contains("libcuda.so.1"),
            "{reason}"
        );
        assert!(reason.contains("LD_LIBRARY_PATH"), "{reason}");
        assert_eq!(NcclCollective::versions().unwrap_err(), reason);

        let e = message(NcclCollective::unique_id().unwrap_err());
        assert_eq!(e, reason);
        let e = message(NcclCollective::new(0, 1, &[0; 128], 0, SECOND).unwrap_err());
        assert_eq!(e, reason);
    }

    fn gpu() -> Device {
        crate::torch::load_cuda().expect("libtorch_cuda.so must load on a GPU host");
        assert!(tch::Cuda::is_available(), "libtorch finds no GPU");
        NcclCollective::available().expect("NCCL must load on a GPU host");
        eprintln!("{}", NcclCollective::versions().unwrap());
        Device::Cuda(0)
    }

    /// Needs an NVIDIA GPU with libnccl.so.2 and libtorch_cuda.so on LD_LIBRARY_PATH:
    /// `cargo test -p chorus-worker --lib collective::nccl -- --ignored`.
    #[test]
    #[ignore = "needs an NVIDIA GPU and NCCL"]
    fn a_world_of_one_reduces_broadcasts_and_meets_on_a_gpu() {
        let device = gpu();
        let id = NcclCollective::unique_id().unwrap();
        assert_eq!(id.len(), 128);
        let mut nccl = NcclCollective::new(0, 1, &id, 0, Duration::from_secs(60)).unwrap();
        assert_eq!((nccl.rank(), nccl.world_size()), (0, 1));

        // Queued by libtorch on the null stream just before each call: NCCL must see the values.
        let expected = Tensor::arange(1 << 20, (Kind::Float, Device::Cpu)) * 0.5;
        for op in [ReduceOp::Sum, ReduceOp::Average] {
            let mut t = Tensor::arange(1 << 20, (Kind::Float, device)) * 0.5;
            nccl.all_reduce(&mut t, op).unwrap();
            assert!(
                t.to_device(Device::Cpu).equal(&expected),
                "{op:?} changed a world of one"
            );
        }

        let mut ints = Tensor::arange(1000, (Kind::Int64, device));
        nccl.broadcast(&mut ints, 0).unwrap();
        assert!(
            ints.to_device(Device::Cpu)
                .equal(&Tensor::arange(1000, (Kind::Int64, Device::Cpu)))
        );
        let mut bytes = Tensor::ones([3, 7], (Kind::Uint8, device));
        nccl.broadcast(&mut bytes, 0).unwrap();
        assert_eq!(bytes.sum(Kind::Int64).int64_value(&[]), 21);
        nccl.barrier().unwrap();

        // Refusals that leave the communicator usable.
        let e = message(nccl.broadcast(&mut ints, 1).unwrap_err());
        assert!(e.contains("rank 1") && e.contains("size 1"), "{e}");
        let e = message(nccl.all_reduce(&mut ints, ReduceOp::Sum).unwrap_err());
        assert!(e.contains("Int64"), "{e}");
        let mut cpu = Tensor::ones([4], (Kind::Float, Device::Cpu));
        let e = message(nccl.all_reduce(&mut cpu, ReduceOp::Sum).unwrap_err());
        assert!(e.contains("Cpu"), "{e}");
        let mut strided = Tensor::ones([4, 4], (Kind::Float, device)).transpose(0, 1);
        let e = message(nccl.all_reduce(&mut strided, ReduceOp::Sum).unwrap_err());
        assert!(e.contains("contiguous"), "{e}");
        nccl.barrier().unwrap();
    }

    /// A rank whose peer never joins must fail within the timeout, not hang. One GPU suffices:
    /// only rank 0 of 2 is ever started.
    #[test]
    #[ignore = "needs an NVIDIA GPU and NCCL"]
    fn a_peer_that_never_joins_is_a_timeout_not_a_hang() {
        gpu();
        let id = NcclCollective::unique_id().unwrap();
        let start = Instant::now();
        let e = message(NcclCollective::new(0, 2, &id, 0, Duration::from_secs(3)).unwrap_err());
        let took = start.elapsed();
        assert!(
            e.contains("joining") && e.contains("rank 0 of 2") && e.contains("3s"),
            "{e}"
        );
        assert!(
            took >= Duration::from_secs(3) && took < Duration::from_secs(30),
            "{took:?}"
        );
    }
}
