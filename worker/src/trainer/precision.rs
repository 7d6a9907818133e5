//! Mixed precision: the forward pass under autocast, and dynamic loss scaling for fp16.
//!
//! The weights, their gradients and the optimiser's state stay in fp32 whatever the precision;
//! inside an [`Autocast`] region libtorch runs the ops that gain from it (matrix products,
//! convolutions, recurrent layers) in bf16 or fp16 and keeps the sensitive ones (reductions,
//! losses, softmax) in fp32, as `torch.autocast` does. fp16's range is narrow, so its gradients
//! are computed on a scaled loss and unscaled before the step ([`LossScaler`], PyTorch's
//! `GradScaler` policy); bf16 has fp32's range and needs no scaling.
//!
//! libtorch's C API (tch) switches only CUDA autocast, to fp16. Autocast per device type and
//! its dtype are plain C++ functions of `libtorch_cpu` taking small enums and a bool: called
//! here through their mangled names, whose calling convention on the Itanium C++ ABI (every
//! platform libtorch ships for Linux) is the C one for such arguments. Autocast state is per
//! thread, and each trainer has its own thread.

use crate::error::WorkerError;
pub use chorus_core::builtin::Precision;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// `c10::DeviceType` values.
const CPU: i8 = 0;
const CUDA: i8 = 1;
/// `c10::ScalarType` values.
const HALF: i8 = 5;
const BFLOAT16: i8 = 15;

mod ffi {
    unsafe extern "C" {
        #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
        pub fn set_autocast_enabled(device: i8, enabled: bool);
        #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
        pub fn is_autocast_enabled(device: i8) -> bool;
        #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
        pub fn set_autocast_dtype(device: i8, dtype: i8);
        #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
        pub fn get_autocast_dtype(device: i8) -> i8;
        #[link_name = "_ZN2at8autocast17increment_nestingEv"]
        pub fn increment_nesting() -> i32;
        #[link_name = "_ZN2at8autocast17decrement_nestingEv"]
        pub fn decrement_nesting() -> i32;
        #[link_name = "_ZN2at8autocast11clear_cacheEv"]
        pub fn clear_cache();
    }
}

/// Autocast on one device of this thread while it lives; the state before is restored on drop.
pub struct Autocast {
    /// (device type, enabled before, dtype before), or `None` for fp32.
    saved: Option<(i8, bool, i8)>,
}

impl Autocast {
    /// Enters autocast for `device` at `precision` (fp32: nothing happens).
    pub fn enter(precision: Precision, device: Device) -> Autocast {
        let dtype = match precision {
            Precision::Fp32 => return Autocast { saved: None },
            Precision::Bf16 => BFLOAT16,
            Precision::Fp16 => HALF,
        };
        let device_type = match device {
            Device::Cuda(_) => CUDA,
            _ => CPU,
        };
        // SAFETY: these functions only read and write libtorch's thread-local autocast state;
        // CPU and CUDA are device types autocast supports, so they do not throw.
        unsafe {
            let saved = (
                device_type,
                ffi::is_autocast_enabled(device_type),
                ffi::get_autocast_dtype(device_type),
            );
            ffi::set_autocast_dtype(device_type, dtype);
            ffi::set_autocast_enabled(device_type, true);
            ffi::increment_nesting();
            Autocast { saved: Some(saved) }
        }
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        let Some((device_type, enabled, dtype)) = self.saved else {
            return;
        };
        // SAFETY: as in `enter`.
        unsafe {
            // Casts of weights are cached for the region; leaving the outermost one frees them.
            if ffi::decrement_nesting() == 0 {
                ffi::clear_cache();
            }
            ffi::set_autocast_enabled(device_type, enabled);
            ffi::set_autocast_dtype(device_type, dtype);
        }
    }
}

/// Dynamic loss scaling for fp16: start at 2^16, halve and skip the step when a gradient
/// overflows, double after 2,000 steps in a row without one.
#[derive(Debug, Clone, PartialEq)]
pub struct LossScaler {
    scale: f64,
    /// Steps since the last overflow or growth.
    good_steps: u64,
}

const INITIAL_SCALE: f64 = 65_536.0;
const GROWTH_INTERVAL: u64 = 2_000;
/// fp16's largest value is 65,504: a scale beyond this cannot help any gradient.
const MAX_SCALE: f64 = 16_777_216.0;
const MIN_SCALE: f64 = 1.0 / 16_777_216.0;
const STATE_KEY: &str = "trainer.loss_scale";

impl LossScaler {
    /// A scaler for `precision`: only fp16 has one.
    pub fn for_precision(precision: Precision) -> Option<LossScaler> {
        (precision == Precision::Fp16).then_some(LossScaler {
            scale: INITIAL_SCALE,
            good_steps: 0,
        })
    }

    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The loss to differentiate.
    pub fn scale_loss(&self, loss: &Tensor) -> Tensor {
        loss * self.scale
    }

    /// Divides the gradients (of a loss scaled by [`Self::scale`], times `also`) by both, and
    /// moves the scale on. Returns false when a gradient overflowed: the step must be skipped.
    /// Every rank of a data-parallel run calls it on the same reduced gradients, so they agree.
    pub fn unscale(&mut self, grads: &[Tensor], also: f64) -> Result<bool, WorkerError> {
        let finite = tch::no_grad(|| {
            let flags: Vec<Tensor> = grads.iter().map(|g| g.isfinite().all()).collect();
            if flags.is_empty() {
                return Ok(true);
            }
            Tensor::stack(&flags, 0)
                .all()
                .f_int64_value(&[])
                .map(|v| v != 0)
                .map_err(|e| WorkerError::Train(format!("checking gradients for overflow: {e}")))
        })?;
        if !finite {
            self.scale = (self.scale * 0.5).max(MIN_SCALE);
            self.good_steps = 0;
            return Ok(false);
        }
        let factor = 1.0 / (self.scale * also);
        tch::no_grad(|| {
            for g in grads {
                let mut g = g.shallow_clone();
                let _ = g.f_mul_scalar_(factor);
            }
        });
        self.good_steps += 1;
        if self.good_steps >= GROWTH_INTERVAL {
            self.scale = (self.scale * 2.0).min(MAX_SCALE);
            self.good_steps = 0;
        }
        Ok(true)
    }

    /// The scaler's state for a checkpoint.
    pub fn to_tensors(&self) -> Vec<(String, Tensor)> {
        vec![(
            STATE_KEY.to_string(),
            Tensor::from_slice(&[self.scale, self.good_steps as f64]),
        )]
    }

    /// The state a checkpoint kept; a checkpoint without one (taken at another precision)
    /// starts a fresh scaler.
    pub fn from_tensors(t: &HashMap<String, Tensor>) -> Result<LossScaler, String> {
        let Some(v) = t.get(STATE_KEY) else {
            return Ok(LossScaler::for_precision(Precision::Fp16).expect("fp16 has a scaler"));
        };
        let v: Vec<f64> = Vec::<f64>::try_from(v.to_kind(Kind::Double).flatten(0, -1))
            .map_err(|e| format!("{STATE_KEY} is unreadable: {e}"))?;
        match v.as_slice() {
            [scale, good] if scale.is_finite() && *scale > 0.0 && *good >= 0.0 => Ok(LossScaler {
                scale: *scale,
                good_steps: *good as u64,
            }),
            _ => Err(format!("{STATE_KEY} holds {v:?}, not a scale and a step count")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_autocast_computes_matrix_products_in_bf16_and_restores_fp32() {
        let a = Tensor::ones([4, 8], (Kind::Float, Device::Cpu));
        let b = Tensor::ones([8, 2], (Kind::Float, Device::Cpu));
        {
            let _region = Autocast::enter(Precision::Bf16, Device::Cpu);
            assert_eq!(a.matmul(&b).kind(), Kind::BFloat16);
            {
                // Nested regions leave the outer one as it was.
                let _inner = Autocast::enter(Precision::Fp16, Device::Cpu);
                assert_eq!(a.matmul(&b).kind(), Kind::Half);
            }
            assert_eq!(a.matmul(&b).kind(), Kind::BFloat16);
        }
        assert_eq!(a.matmul(&b).kind(), Kind::Float);
        let _fp32 = Autocast::enter(Precision::Fp32, Device::Cpu);
        assert_eq!(a.matmul(&b).kind(), Kind::Float);
    }

    #[test]
    fn the_scaler_skips_overflows_and_grows_after_good_steps() {
        let mut s = LossScaler::for_precision(Precision::Fp16).unwrap();
        assert!(LossScaler::for_precision(Precision::Bf16).is_none());
        let g = Tensor::from_slice(&[65_536.0f32 * 4.0, 65_536.0 * 8.0]);
        assert!(s.unscale(std::slice::from_ref(&g), 2.0).unwrap());
        assert_eq!(Vec::<f32>::try_from(&g).unwrap(), vec![2.0, 4.0]);
        let bad = Tensor::from_slice(&[1.0f32, f32::INFINITY]);
        assert!(!s.unscale(&[bad], 1.0).unwrap());
        assert_eq!(s.scale(), 32_768.0);
        for _ in 0..GROWTH_INTERVAL {
            let g = Tensor::from_slice(&[1.0f32]);
            assert!(s.unscale(&[g], 1.0).unwrap());
        }
        assert_eq!(s.scale(), 65_536.0);
        let kept: HashMap<String, Tensor> = s.to_tensors().into_iter().collect();
        assert_eq!(LossScaler::from_tensors(&kept).unwrap(), s);
    }
}
