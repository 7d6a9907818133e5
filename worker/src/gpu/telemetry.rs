//! How busy the worker's GPUs are: utilisation and memory, read through NVML
//! (`libnvidia-ml.so.1`, which ships with the NVIDIA driver and is opened at run time, so nothing
//! NVIDIA is needed to build). The worker's `/metrics` endpoint and the per-trial `gpu_util` and
//! `gpu_mem_mb` metrics both read it through [`GpuSampler`].
//!
//! NVML ignores `CUDA_VISIBLE_DEVICES` and numbers devices its own way (by PCI bus), so each of
//! the worker's GPUs is found in it by the UUID the CUDA driver gave for its ordinal (see
//! [`super`] for what an id's position means), never by number. A host without NVML, or a GPU
//! NVML does not know, simply has no telemetry: never an error.

use nvml_wrapper::Nvml;
use tracing::{debug, info};

/// One reading of one device. A figure the device does not report (MIG instances report no
/// utilisation) is `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GpuSample {
    /// Percent (0 to 100) of the driver's last sample period, a sixth of a second to a second by
    /// device, during which a kernel ran.
    pub utilization_percent: Option<u32>,
    /// Device memory in use, by every process on the device.
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
}

impl GpuSample {
    pub fn is_empty(&self) -> bool {
        self.utilization_percent.is_none() && self.memory_used_bytes.is_none() && self.memory_total_bytes.is_none()
    }
}

/// A GPU of the worker that a sampler can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampledGpu {
    /// Its id in the worker's GPU list.
    pub id: String,
    /// The device's product name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
}

/// Reads the worker's GPUs. [`GpuTelemetry`] reads them through NVML; the trait is the seam that
/// lets the code that reports readings be exercised on hosts without GPUs.
pub trait GpuSampler: Send + Sync {
    /// The worker's GPUs this sampler can read, in the worker's order.
    fn gpus(&self) -> Vec<SampledGpu>;

    /// Reads the worker GPU `id` now; `None` when it is not one this sampler reads or it answers
    /// nothing. Blocks on the driver for up to milliseconds: call it off the async runtime.
    fn sample(&self, id: &str) -> Option<GpuSample>;
}

/// NVML, opened once for the worker's life, and where each of the worker's GPUs is in it.
pub struct GpuTelemetry {
    nvml: Nvml,
    gpus: Vec<Matched>,
}

struct Matched {
    gpu: SampledGpu,
    /// NVML's index of the device; stable while the driver is loaded.
    index: u32,
}

impl GpuTelemetry {
    /// Opens NVML and finds the worker's GPUs in it: the id at position `i` of `worker_gpus` is
    /// the CUDA device of ordinal `i` ([`super::probe`]). `None`, logged once, when the worker
    /// has no GPU, NVML cannot be opened, or it knows none of them. Blocking: NVML's first start
    /// takes up to a second.
    pub fn open(worker_gpus: &[String]) -> Option<Self> {
        if worker_gpus.is_empty() {
            debug!("no GPU telemetry: the worker offers no GPU");
            return None;
        }
        let devices = super::probe().devices();
        let nvml = match Nvml::init() {
            Ok(nvml) => nvml,
            Err(e) => {
                info!(error = %e, "no GPU telemetry: NVML (libnvidia-ml.so.1) cannot be opened");
                return None;
            }
        };
        let mut gpus = Vec::new();
        for (position, id) in worker_gpus.iter().enumerate() {
            // The driver's full UUID first: CUDA_VISIBLE_DEVICES accepts a UUID's prefix too.
            let uuid = devices
                .get(position)
                .map(|d| d.uuid.clone())
                .or_else(|| id.starts_with("GPU-").then(|| id.clone()));
            let Some(uuid) = uuid else {
                info!(gpu = %id, "no telemetry for this GPU: the CUDA driver does not list it");
                continue;
            };
            let found = nvml
                .device_by_uuid(uuid.as_str())
                .and_then(|device| Ok((device.index()?, device.name()?)));
            match found {
                Ok((index, name)) => gpus.push(Matched {
                    gpu: SampledGpu { id: id.clone(), name },
                    index,
                }),
                Err(e) => {
                    info!(gpu = %id, uuid = %uuid, error = %e, "no telemetry for this GPU: NVML does not know it")
                }
            }
        }
        if gpus.is_empty() {
            info!("no GPU telemetry: NVML knows none of the worker's GPUs");
            return None;
        }
        info!(
            gpus = %gpus.iter().map(|m| m.gpu.id.as_str()).collect::<Vec<_>>().join(","),
            "GPU telemetry through NVML"
        );
        Some(GpuTelemetry { nvml, gpus })
    }
}

impl GpuSampler for GpuTelemetry {
    fn gpus(&self) -> Vec<SampledGpu> {
        self.gpus.iter().map(|m| m.gpu.clone()).collect()
    }

    fn sample(&self, id: &str) -> Option<GpuSample> {
        let matched = self.gpus.iter().find(|m| m.gpu.id == id)?;
        let device = match self.nvml.device_by_index(matched.index) {
            Ok(d) => d,
            Err(e) => {
                // A GPU fallen off the bus says so here at every reading: debug, not a flood.
                debug!(gpu = %id, error = %e, "cannot read the GPU");
                return None;
            }
        };
        let utilization = device.utilization_rates().ok().map(|u| u.gpu.min(100));
        let memory = device.memory_info().ok();
        let sample = GpuSample {
            utilization_percent: utilization,
            memory_used_bytes: memory.as_ref().map(|m| m.used),
            memory_total_bytes: memory.as_ref().map(|m| m.total),
        };
        (!sample.is_empty()).then_some(sample)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_opens_only_where_nvml_knows_the_workers_gpus() {
        // Nothing to watch: NVML is not even opened.
        assert!(GpuTelemetry::open(&[]).is_none());
        let probe = super::super::probe();
        let ids: Vec<String> = (0..probe.devices().len()).map(|i| i.to_string()).collect();
        match GpuTelemetry::open(&ids) {
            // A GPU host with its driver: every device reads, as the one NVML found by its UUID.
            Some(t) => {
                let gpus = t.gpus();
                assert_eq!(gpus.len(), ids.len());
                for (g, d) in gpus.iter().zip(probe.devices()) {
                    assert_eq!(g.name, d.name);
                    let s = t.sample(&g.id).expect("a GPU NVML found reads");
                    // NVML and the CUDA driver may differ on what the total counts (reserved
                    // memory); both are the same order.
                    let total = s.memory_total_bytes.expect("memory reads");
                    assert!(total > 0 && total / 2 < d.total_memory_bytes, "{s:?} {d:?}");
                    assert!(s.memory_used_bytes.unwrap() <= total);
                    assert!(s.utilization_percent.unwrap() <= 100);
                }
                assert_eq!(t.sample("no such gpu"), None);
            }
            // Without NVML (or without GPUs) there is none, and opening it did not fail or panic.
            None => assert!(
                ids.is_empty() || Nvml::init().is_err(),
                "NVML opens and knows the driver's GPUs, yet no telemetry"
            ),
        }
        // GPUs named without a driver to vouch for them (CUDA_VISIBLE_DEVICES on a host
        // without one) have no UUID to find them by.
        if probe.devices().is_empty() {
            assert!(GpuTelemetry::open(&["0".to_string()]).is_none());
        }
    }
}
