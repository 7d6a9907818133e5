//! Process-wide libtorch concerns: loading its CUDA half, intra-op threads, and random numbers
//! that do not depend on which trainers share the process.
//!
//! The binary links `libtorch_cpu` only, so it starts on hosts without any CUDA library. libtorch
//! decides once per process whether CUDA exists (the first query caches its CUDA hooks for good),
//! so [`load_cuda`] must run before anything else touches libtorch; [`prepare`] does that.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::{Mutex, OnceLock};
use tch::Tensor;

/// Whether `libtorch_cuda.so` could be loaded, and if not why (the loader's own message).
static CUDA: OnceLock<Result<(), String>> = OnceLock::new();

/// libtorch has one global generator; every use of it holds this lock so that trainers sharing the
/// process cannot interleave their draws.
static GLOBAL_GENERATOR: Mutex<()> = Mutex::new(());

/// Loads `libtorch_cuda.so` (found through `LD_LIBRARY_PATH`, then `$LIBTORCH/lib`) into the
/// global symbol namespace, once per process, so that its static initialisers register CUDA with
/// libtorch. On a host without CUDA libraries this fails quickly and changes nothing.
pub fn load_cuda() -> Result<(), String> {
    CUDA.get_or_init(|| {
        let mut candidates = vec![std::ffi::OsString::from("libtorch_cuda.so")];
        if let Some(root) = std::env::var_os("LIBTORCH") {
            candidates.push(
                std::path::Path::new(&root)
                    .join("lib/libtorch_cuda.so")
                    .into_os_string(),
            );
        }
        let mut errors = Vec::new();
        for name in candidates {
            match dlopen_global(&name) {
                Ok(()) => {
                    tracing::info!(library = ?name, "loaded libtorch's CUDA support");
                    return Ok(());
                }
                Err(e) if !errors.contains(&e) => errors.push(e),
                Err(_) => {}
            }
        }
        tracing::debug!(errors = ?errors, "libtorch's CUDA support is not available");
        Err(errors.join("; "))
    })
    .clone()
}

fn dlopen_global(name: &std::ffi::OsStr) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let c_name = std::ffi::CString::new(name.as_bytes()).map_err(|_| format!("{name:?}: contains a NUL byte"))?;
    // SAFETY: `c_name` is a valid C string; the handle is deliberately never closed, since
    // libtorch keeps pointers into the library for the life of the process.
    let handle = unsafe { libc::dlopen(c_name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns null or a C string valid until the next dl* call on this thread.
        let message = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                "unknown dlopen error".to_string()
            } else {
                std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        return Err(message);
    }
    Ok(())
}

/// Readies libtorch for a trainer on the calling thread: tunes the allocator and tries to load
/// CUDA (once per process; always, because a later CUDA trial in this process could not load it
/// any more), then gives this thread `threads` intra-op threads.
pub fn prepare(threads: usize) {
    static ALLOCATOR: std::sync::Once = std::sync::Once::new();
    ALLOCATOR.call_once(tune_allocator);
    let _ = load_cuda();
    // libtorch applies its process-wide thread count to a thread the first time that thread asks;
    // asking first and setting after makes this thread's count its own, whatever other trainers
    // set meanwhile.
    let _ = tch::get_num_threads();
    tch::set_num_threads(threads.max(1) as i32);
}

/// A training step allocates and frees activations of a few MiB to tens of MiB, over and over.
/// With glibc's defaults those come from fresh `mmap`s or a heap trimmed after every step, so
/// each step pays page faults for memory it just gave back (measured: emotion-bench steps on one
/// thread took 157 or 180 ms from run to run; with this, 156-161 ms). Keeping allocations up to
/// 32 MiB in the heap and up to 256 MiB of free heap before trimming ends that churn, at the cost
/// of the worker holding on to that much memory after a trial.
fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator parameters; it is called once, before the trainer
    // allocates, and failure (a zero return) just leaves the defaults.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// Runs `f` with libtorch's global generator seeded with `seed` and held exclusively. Only
/// model construction draws from it; everything drawn during training comes from [`Draws`].
pub fn with_global_seed<T>(seed: u64, f: impl FnOnce() -> T) -> T {
    let _guard = GLOBAL_GENERATOR.lock().unwrap_or_else(|p| p.into_inner());
    tch::manual_seed(seed as i64);
    f()
}

/// Mixes integers into one well-spread 64-bit key (splitmix64 over each part).
pub fn mix(parts: &[u64]) -> u64 {
    let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
    for &p in parts {
        h ^= p;
        h = h.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h = z ^ (z >> 31);
    }
    h
}

/// Random numbers for one step, derived from a key alone (the seed, epoch and step mixed), so a
/// run resumed at a step draws exactly what the uninterrupted run drew there. Each draw takes
/// its own stream, numbered in the order the step asks.
pub struct Draws {
    key: u64,
    next_stream: std::cell::Cell<u64>,
}

impl Draws {
    pub fn new(key: u64) -> Self {
        Draws {
            key,
            next_stream: std::cell::Cell::new(0),
        }
    }

    fn rng(&self) -> ChaCha8Rng {
        let stream = self.next_stream.get();
        self.next_stream.set(stream + 1);
        ChaCha8Rng::seed_from_u64(mix(&[self.key, stream]))
    }

    /// Standard normal values (Box-Muller), as a CPU float tensor of `shape`.
    pub fn normal(&self, shape: &[i64]) -> Tensor {
        let n: i64 = shape.iter().product();
        let mut rng = self.rng();
        let mut out = Vec::with_capacity(n as usize);
        while (out.len() as i64) < n {
            // 1 - u keeps the logarithm finite: u is in [0, 1).
            let u1 = 1.0 - rng.random::<f64>();
            let u2 = rng.random::<f64>();
            let r = (-2.0 * u1.ln()).sqrt();
            let theta = std::f64::consts::TAU * u2;
            out.push((r * theta.cos()) as f32);
            out.push((r * theta.sin()) as f32);
        }
        out.truncate(n as usize);
        Tensor::from_slice(&out).view(shape)
    }

    /// A dropout mask: each value is `1 / (1 - p)` with probability `1 - p`, else 0.
    pub fn dropout_mask(&self, shape: &[i64], p: f64) -> Tensor {
        let n: i64 = shape.iter().product();
        let keep = 1.0 - p;
        let scale = (1.0 / keep) as f32;
        let threshold = (keep * (u32::MAX as f64 + 1.0)) as u64;
        let mut rng = self.rng();
        let mask: Vec<f32> = (0..n)
            .map(|_| {
                if (rng.random::<u32>() as u64) < threshold {
                    scale
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_slice(&mask).view(shape)
    }

    /// Uniform integers in `0..n`.
    pub fn below(&self, count: usize, n: u64) -> Vec<u64> {
        let mut rng = self.rng();
        (0..count).map(|_| rng.random_range(0..n)).collect()
    }

    /// Uniform floats in `[0, 1)`.
    pub fn uniform(&self, count: usize) -> Vec<f64> {
        let mut rng = self.rng();
        (0..count).map(|_| rng.random::<f64>()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_depend_on_the_key_and_the_order_only() {
        let a = Draws::new(7);
        let b = Draws::new(7);
        let c = Draws::new(8);
        let (a1, a2) = (a.normal(&[4, 5]), a.normal(&[4, 5]));
        assert!(a1.equal(&b.normal(&[4, 5])));
        assert!(a2.equal(&b.normal(&[4, 5])));
        assert!(!a1.equal(&a2), "each draw takes a fresh stream");
        assert!(!a1.equal(&c.normal(&[4, 5])));
    }

    #[test]
    fn normal_draws_look_standard_normal() {
        let x = Draws::new(1).normal(&[20_000]);
        let mean = x.mean(tch::Kind::Float).double_value(&[]);
        let std = x.std(true).double_value(&[]);
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((std - 1.0).abs() < 0.03, "std {std}");
    }

    #[test]
    fn dropout_masks_keep_the_expected_share_and_scale() {
        let m = Draws::new(3).dropout_mask(&[10_000], 0.2);
        let kept = m
            .gt(0.0)
            .to_kind(tch::Kind::Float)
            .mean(tch::Kind::Float)
            .double_value(&[]);
        assert!((kept - 0.8).abs() < 0.02, "kept {kept}");
        let max = m.max().double_value(&[]);
        assert!((max - 1.25).abs() < 1e-6);
    }

    #[test]
    fn the_global_seed_makes_libtorch_draws_repeatable() {
        let a = with_global_seed(5, || Tensor::randn([8], (tch::Kind::Float, tch::Device::Cpu)));
        let b = with_global_seed(5, || Tensor::randn([8], (tch::Kind::Float, tch::Device::Cpu)));
        assert!(a.equal(&b));
    }

    #[test]
    fn mixing_separates_nearby_keys() {
        assert_ne!(mix(&[1, 2]), mix(&[2, 1]));
        assert_ne!(mix(&[0]), mix(&[0, 0]));
    }
}
