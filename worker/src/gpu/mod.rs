//! The GPUs this worker offers: found through the CUDA driver API, named the way
//! `CUDA_VISIBLE_DEVICES` names them, and watched through NVML ([`telemetry`]).
//!
//! # What a GPU id means
//!
//! The worker's GPU list ([`crate::WorkerConfig::gpu_ids`]) is in this process's CUDA ordinal
//! order: the id at position `i` is the device the CUDA driver calls ordinal `i` in this process,
//! an order that already honours a `CUDA_VISIBLE_DEVICES` set on the worker. Each id is a name
//! `CUDA_VISIBLE_DEVICES` accepts: the names the worker's own `CUDA_VISIBLE_DEVICES` lists, in
//! its order, or the ordinals `0`, `1`, ... when it is not set. So:
//!
//! - a command trial gets the ids of the GPUs allotted to it in its `CUDA_VISIBLE_DEVICES` (a
//!   child inherits the worker's `CUDA_DEVICE_ORDER`, so an ordinal names the same device there);
//! - an in-process trainer (a builtin trial) shares this process's CUDA, where an allotted id's
//!   position in the worker's list is its device ordinal: [`ordinal_of`].
//!
//! The driver (`libcuda.so.1`) is loaded at run time, so the worker builds without a CUDA toolkit,
//! and a host without an NVIDIA driver has no GPUs: discovery never fails and never panics.
//! Discovery initialises the driver, which may start threads of its own; the binary forks its
//! guardian before (see [`crate::Args::into_config_without_gpus`]).

pub mod telemetry;

use cudarc::driver::result::{self as cu, DriverError};
use cudarc::driver::sys as cusys;
use std::sync::OnceLock;
use tracing::{info, warn};

/// One device as the CUDA driver describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuDevice {
    /// Its CUDA ordinal in this process.
    pub ordinal: usize,
    pub name: String,
    /// As NVML and `nvidia-smi` print it: `GPU-` and 32 hex digits in 8-4-4-4-12 groups.
    pub uuid: String,
    pub total_memory_bytes: u64,
}

/// What the CUDA driver said about this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The driver answered, perhaps with no device (all hidden, or none installed).
    Devices(Vec<GpuDevice>),
    /// No usable driver, and why.
    NoDriver(String),
}

impl Probe {
    pub fn devices(&self) -> &[GpuDevice] {
        match self {
            Probe::Devices(d) => d,
            Probe::NoDriver(_) => &[],
        }
    }
}

static PROBE: OnceLock<Probe> = OnceLock::new();

/// The devices of this process, asked of the driver once (and logged then); later calls return
/// the same answer, so the GPU list and the telemetry always agree on what ordinal `i` is.
pub fn probe() -> &'static Probe {
    PROBE.get_or_init(|| {
        let probe = probe_driver();
        match &probe {
            Probe::Devices(devices) if devices.is_empty() => info!("the CUDA driver lists no GPU"),
            Probe::Devices(devices) => {
                for d in devices {
                    info!(
                        ordinal = d.ordinal,
                        name = %d.name,
                        uuid = %d.uuid,
                        memory_mib = d.total_memory_bytes >> 20,
                        "found a GPU"
                    );
                }
            }
            Probe::NoDriver(why) => info!(reason = %why, "no GPUs: the CUDA driver is not usable here"),
        }
        probe
    })
}

fn probe_driver() -> Probe {
    match with_driver(enumerate) {
        Err(reason) => Probe::NoDriver(reason),
        Ok(Ok(devices)) => Probe::Devices(devices),
        // What cuInit says when every device is hidden (`CUDA_VISIBLE_DEVICES=-1`) or none works.
        Ok(Err(DriverError(cusys::CUresult::CUDA_ERROR_NO_DEVICE))) => Probe::Devices(Vec::new()),
        Ok(Err(e)) => Probe::NoDriver(format!("the CUDA driver does not start: {}", driver_error(e))),
    }
}

/// Runs `f` against the CUDA driver, which is loaded at run time: `Err` with the reason when
/// there is no usable driver library (none on this host, or one lacking an entry point, on
/// which cudarc panics when it resolves it lazily), else what `f` returned.
pub(crate) fn with_driver<T>(f: impl FnOnce() -> Result<T, DriverError>) -> Result<Result<T, DriverError>, String> {
    // SAFETY: only tries to open the library under the names cudarc knows, then closes it.
    if !unsafe { cusys::is_culib_present() } {
        return Err(
            "cannot load the CUDA driver library (libcuda.so.1): this host has no NVIDIA driver, or its \
             directory is not on LD_LIBRARY_PATH"
                .into(),
        );
    }
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|panic| format!("the CUDA driver library cannot be used: {}", panic_text(&*panic)))
}

/// Only device queries: no context is created, so no device memory is taken.
fn enumerate() -> Result<Vec<GpuDevice>, DriverError> {
    cu::init()?;
    let count = cu::device::get_count()?;
    (0..count)
        .map(|ordinal| {
            let device = cu::device::get(ordinal)?;
            Ok(GpuDevice {
                ordinal: ordinal as usize,
                name: cu::device::get_name(device)?,
                uuid: uuid_text(&cu::device::get_uuid(device)?.bytes),
                // SAFETY: `device` came from cuDeviceGet.
                total_memory_bytes: unsafe { cu::device::total_mem(device) }? as u64,
            })
        })
        .collect()
}

/// The text form of a device UUID, as NVML's `nvmlDeviceGetUUID` gives it.
fn uuid_text(bytes: &[std::ffi::c_char; 16]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{:02x}", *b as u8)).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A driver error with the driver's own words for it.
pub(crate) fn driver_error(e: DriverError) -> String {
    match e.error_string() {
        Ok(text) => format!("{:?} ({})", e.0, text.to_string_lossy()),
        Err(_) => format!("{:?}", e.0),
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// The worker's GPU list (see the module's contract): `--gpus N` when given, else every device
/// this process sees. Asks the driver (once per process) and reads `CUDA_VISIBLE_DEVICES`.
pub fn worker_gpus(requested: Option<u32>) -> Vec<String> {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let discovered = ids_of(visible.as_deref(), probe());
    match requested {
        None => discovered,
        Some(n) => {
            if (n as usize) > discovered.len() {
                // Taken at its word (a host whose driver this process cannot load may still
                // run command trials on GPUs), but a builtin trainer will find no such device.
                warn!(
                    requested = n,
                    found = discovered.len(),
                    "--gpus asks for more GPUs than this process finds; offering ordinals 0..{n}"
                );
            }
            choose_gpus(&discovered, n)
        }
    }
}

/// The ids of the devices this process sees, in ordinal order: the names `CUDA_VISIBLE_DEVICES`
/// gives them when it is set, else their ordinals. Without a driver the variable is taken at its
/// word (nothing can check it); with one, a name the driver does not count is no device.
fn ids_of(visible: Option<&str>, probe: &Probe) -> Vec<String> {
    match (visible.map(parse_visible_devices), probe) {
        (Some(mut names), Probe::Devices(devices)) => {
            if names.len() > devices.len() {
                warn!(
                    cuda_visible_devices = visible.unwrap_or_default(),
                    devices = devices.len(),
                    "CUDA_VISIBLE_DEVICES names more GPUs than the CUDA driver finds; offering only the first {}",
                    devices.len()
                );
                names.truncate(devices.len());
            }
            names
        }
        (Some(names), Probe::NoDriver(_)) => names,
        (None, probe) => (0..probe.devices().len()).map(|i| i.to_string()).collect(),
    }
}

/// CUDA stops enumerating at the first invalid entry (`-1` is the usual way to hide all GPUs).
pub fn parse_visible_devices(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .take_while(|d| !d.is_empty() && !d.starts_with('-') && *d != "NoDevFiles")
        .map(str::to_string)
        .collect()
}

/// `--gpus N` names how many; the discovered names are used when there are enough of them.
/// Beyond them it offers ordinals the host may not have, as it was told: the coordinator places
/// on what a worker says it has, and the person who set `--gpus` knows the host.
pub fn choose_gpus(discovered: &[String], n: u32) -> Vec<String> {
    let n = n as usize;
    if discovered.len() >= n {
        discovered[..n].to_vec()
    } else {
        (0..n).map(|i| i.to_string()).collect()
    }
}

/// The CUDA device ordinal, in this process, of the worker GPU `id`: its position in the
/// worker's list (see the module's contract). `None` when `id` is not one of the worker's GPUs.
pub fn ordinal_of(worker_gpus: &[String], id: &str) -> Option<usize> {
    worker_gpus.iter().position(|g| g == id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn device(ordinal: usize) -> GpuDevice {
        GpuDevice {
            ordinal,
            name: "NVIDIA H100 80GB HBM3".into(),
            uuid: format!("GPU-{ordinal:08x}-0000-0000-0000-000000000000"),
            total_memory_bytes: 80 << 30,
        }
    }

    #[test]
    fn visible_devices_follow_cuda_rules() {
        assert_eq!(parse_visible_devices("0,2"), vec!["0", "2"]);
        assert_eq!(parse_visible_devices(" 3 , GPU-abc"), vec!["3", "GPU-abc"]);
        assert!(parse_visible_devices("").is_empty());
        assert!(parse_visible_devices("-1").is_empty());
        assert_eq!(parse_visible_devices("1,-1,2"), vec!["1"]);
    }

    #[test]
    fn ids_are_the_visible_names_or_the_ordinals() {
        let two = Probe::Devices(vec![device(0), device(1)]);
        let none = Probe::NoDriver("no libcuda".into());
        // The worker's CUDA_VISIBLE_DEVICES names its GPUs, in its order.
        assert_eq!(ids_of(Some("3,1"), &two), ids(&["3", "1"]));
        // Without it, the ordinals the driver counts.
        assert_eq!(ids_of(None, &two), ids(&["0", "1"]));
        assert!(ids_of(None, &none).is_empty());
        assert!(ids_of(None, &Probe::Devices(Vec::new())).is_empty());
        // A name the driver does not count is no device...
        assert_eq!(ids_of(Some("0,1,7"), &two), ids(&["0", "1"]));
        assert!(ids_of(Some("-1"), &Probe::Devices(Vec::new())).is_empty());
        // ...but without a driver nothing can check the variable, which is taken at its word.
        assert_eq!(ids_of(Some("0,1,7"), &none), ids(&["0", "1", "7"]));
    }

    #[test]
    fn gpu_flag_takes_discovered_names_when_it_can() {
        let found = ids(&["4", "5"]);
        assert_eq!(choose_gpus(&found, 1), vec!["4"]);
        assert_eq!(choose_gpus(&found, 3), vec!["0", "1", "2"]);
        assert!(choose_gpus(&found, 0).is_empty());
    }

    #[test]
    fn an_allotted_id_is_its_position_in_the_worker_list() {
        // A worker started with CUDA_VISIBLE_DEVICES=2,3 sees physical GPU 3 as its ordinal 1.
        let worker = ids(&["2", "3"]);
        assert_eq!(ordinal_of(&worker, "3"), Some(1));
        assert_eq!(ordinal_of(&worker, "2"), Some(0));
        assert_eq!(ordinal_of(&worker, "0"), None);
        let by_uuid = ids(&["GPU-b", "GPU-a"]);
        assert_eq!(ordinal_of(&by_uuid, "GPU-a"), Some(1));
        assert_eq!(ordinal_of(&[], "0"), None);
    }

    #[test]
    fn uuids_read_as_nvml_prints_them() {
        let mut bytes = [0 as std::ffi::c_char; 16];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (0xf0u8.wrapping_add(i as u8 * 0x11)) as std::ffi::c_char;
        }
        assert_eq!(uuid_text(&bytes), "GPU-f0011223-3445-5667-7889-9aabbccddeef");
    }

    #[test]
    fn discovery_without_a_driver_finds_nothing_and_with_one_describes_each_device() {
        let probe = probe();
        // SAFETY: only opens and closes the library.
        if unsafe { cusys::is_culib_present() } {
            // A GPU host: whatever it has is described in full, in ordinal order.
            for (i, d) in probe.devices().iter().enumerate() {
                assert_eq!(d.ordinal, i);
                assert!(!d.name.is_empty(), "{d:?}");
                assert!(d.uuid.starts_with("GPU-") && d.uuid.len() == 40, "{d:?}");
                assert!(d.total_memory_bytes > 0, "{d:?}");
            }
        } else {
            assert!(
                matches!(probe, Probe::NoDriver(why) if why.contains("libcuda.so.1")),
                "{probe:?}"
            );
            assert!(probe.devices().is_empty());
            if std::env::var_os("CUDA_VISIBLE_DEVICES").is_none() {
                assert!(worker_gpus(None).is_empty());
            }
            // Asked again: the same answer, and still no panic.
            assert_eq!(super::probe(), probe);
        }
    }
}
