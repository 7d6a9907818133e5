//! Adam, AdamW and SGD (with momentum) over named variables, with state that checkpoints save
//! and restore exactly. tch's own optimisers keep their moments out of reach, which would make
//! resuming restart Adam from zero moments.
//!
//! The updates are PyTorch's (`torch.optim`, default flags): Adam adds `weight_decay * p` to the
//! gradient (L2); AdamW decays the parameter itself by `lr * weight_decay` before the update
//! (decoupled); both bias-correct their moments by `1 - beta^t`, `t` counting the parameter's own
//! updates. SGD uses dampening 0 and optional Nesterov momentum. Gradients come in as tensors
//! (from `Tensor::run_backward`), so there is no `.grad` to zero and nothing accumulates.

use crate::error::WorkerError;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    #[default]
    Adam,
    #[serde(rename = "adamw")]
    AdamW,
    Sgd,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerSettings {
    pub kind: OptimizerKind,
    pub weight_decay: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl OptimizerSettings {
    pub fn adam(beta1: f64, beta2: f64) -> Self {
        OptimizerSettings {
            kind: OptimizerKind::Adam,
            weight_decay: 0.0,
            momentum: 0.0,
            nesterov: false,
            beta1,
            beta2,
            eps: 1e-8,
        }
    }

    pub fn validate(&self) -> Result<(), WorkerError> {
        let bad = |m: &str| Err(WorkerError::Train(m.to_string()));
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad("betas must lie in [0, 1)");
        }
        if self.weight_decay < 0.0 || self.momentum < 0.0 || self.eps <= 0.0 {
            return bad("weight_decay and momentum must be >= 0 and eps > 0");
        }
        if self.nesterov && self.momentum == 0.0 {
            return bad("nesterov needs a momentum");
        }
        Ok(())
    }
}

/// Per-parameter state. Adam's second moment is kept divided by `1 - beta2` (`v / (1 - beta2)`),
/// which lets the update run in place without temporaries; checkpoints store it that way.
struct Slot {
    updates: i64,
    /// Adam: first moment. SGD: momentum buffer.
    first: Tensor,
    /// Adam: second moment over `1 - beta2`. SGD: unused (empty).
    second: Tensor,
}

pub struct Optimizer {
    settings: OptimizerSettings,
    names: Vec<String>,
    params: Vec<Tensor>,
    slots: Vec<Slot>,
}

impl Optimizer {
    /// `named`: the variables to update, in a fixed order (sorted by name by the caller).
    pub fn new(settings: OptimizerSettings, named: Vec<(String, Tensor)>) -> Self {
        let adam = settings.kind != OptimizerKind::Sgd;
        let slots = named
            .iter()
            .map(|(_, p)| Slot {
                updates: 0,
                first: p.zeros_like().detach(),
                second: if adam {
                    p.zeros_like().detach()
                } else {
                    Tensor::zeros([0], (Kind::Float, p.device()))
                },
            })
            .collect();
        let (names, params) = named.into_iter().unzip();
        Optimizer {
            settings,
            names,
            params,
            slots,
        }
    }

    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// Applies one update with learning rate `lr`; `grads[i]` belongs to `params()[i]`, and an
    /// undefined gradient (the parameter took no part) leaves that parameter and its state alone.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) {
        assert_eq!(grads.len(), self.params.len(), "one gradient per parameter");
        let s = self.settings;
        tch::no_grad(|| {
            for ((p, g), slot) in self.params.iter_mut().zip(grads).zip(&mut self.slots) {
                if !g.defined() {
                    continue;
                }
                slot.updates += 1;
                match s.kind {
                    OptimizerKind::Adam | OptimizerKind::AdamW => adam(p, g, slot, &s, lr),
                    OptimizerKind::Sgd => sgd(p, g, slot, &s, lr),
                }
            }
        });
    }

    /// The state as named tensors under `prefix` (for a safetensors file).
    pub fn state_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        let updates: Vec<i64> = self.slots.iter().map(|s| s.updates).collect();
        out.push((format!("{prefix}updates"), Tensor::from_slice(&updates)));
        for (name, slot) in self.names.iter().zip(&self.slots) {
            out.push((format!("{prefix}{name}.first"), slot.first.shallow_clone()));
            if slot.second.numel() > 0 {
                out.push((format!("{prefix}{name}.second"), slot.second.shallow_clone()));
            }
        }
        out
    }

    /// Restores what `state_tensors(prefix)` saved, checking that every name and shape matches.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, prefix: &str) -> Result<(), String> {
        let get = |name: &str| tensors.get(name).ok_or_else(|| format!("optimizer state lacks {name}"));
        let updates: Vec<i64> =
            Vec::try_from(get(&format!("{prefix}updates"))?).map_err(|e: tch::TchError| e.to_string())?;
        if updates.len() != self.slots.len() {
            return Err(format!(
                "optimizer state holds {} parameters, the model {}",
                updates.len(),
                self.slots.len()
            ));
        }
        tch::no_grad(|| {
            for ((name, slot), n) in self.names.iter().zip(&mut self.slots).zip(updates) {
                slot.updates = n;
                copy_checked(&mut slot.first, get(&format!("{prefix}{name}.first"))?, name)?;
                if slot.second.numel() > 0 {
                    copy_checked(&mut slot.second, get(&format!("{prefix}{name}.second"))?, name)?;
                }
            }
            Ok(())
        })
    }
}

/// Copies `src` into `dst` after checking the shapes agree (`copy_` would broadcast silently).
pub fn copy_checked(dst: &mut Tensor, src: &Tensor, name: &str) -> Result<(), String> {
    if dst.size() != src.size() {
        return Err(format!(
            "{name}: shape {:?} in the file, {:?} expected",
            src.size(),
            dst.size()
        ));
    }
    dst.f_copy_(src).map_err(|e| format!("{name}: {e}"))
}

fn adam(p: &mut Tensor, g: &Tensor, slot: &mut Slot, s: &OptimizerSettings, lr: f64) {
    let t = slot.updates as i32;
    let (b1, b2) = (s.beta1, s.beta2);
    let g = match s.kind {
        OptimizerKind::Adam if s.weight_decay != 0.0 => g + &*p * s.weight_decay,
        _ => g.shallow_clone(),
    };
    if s.kind == OptimizerKind::AdamW && s.weight_decay != 0.0 {
        let _ = p.g_mul_scalar_(1.0 - lr * s.weight_decay);
    }
    let _ = slot.first.lerp_(&g, 1.0 - b1);
    let _ = slot.second.g_mul_scalar_(b2).addcmul_(&g, &g);
    if lr == 0.0 {
        return;
    }
    let bias1 = 1.0 - b1.powi(t);
    let bias2 = 1.0 - b2.powi(t);
    // p -= lr / bias1 * m / (sqrt(v / bias2) + eps), with v = second * (1 - b2), as
    // p += m / denom where denom = (sqrt(v / bias2) + eps) * (-bias1 / lr).
    let mut denom = slot.second.sqrt();
    let _ = denom
        .g_mul_scalar_(((1.0 - b2) / bias2).sqrt())
        .g_add_scalar_(s.eps)
        .g_mul_scalar_(-bias1 / lr);
    let _ = p.addcdiv_(&slot.first, &denom);
}

fn sgd(p: &mut Tensor, g: &Tensor, slot: &mut Slot, s: &OptimizerSettings, lr: f64) {
    let mut d = if s.weight_decay != 0.0 {
        g + &*p * s.weight_decay
    } else {
        g.shallow_clone()
    };
    if s.momentum != 0.0 {
        let _ = slot.first.g_mul_scalar_(s.momentum).g_add_(&d);
        d = if s.nesterov {
            d + &slot.first * s.momentum
        } else {
            slot.first.shallow_clone()
        };
    }
    let _ = p.g_add_(&(d * -lr));
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Gradients for three steps of a two-value parameter.
    const GRADS: [[f64; 2]; 3] = [[0.5, -1.0], [0.25, 2.0], [-0.75, 0.1]];
    const START: [f64; 2] = [1.0, -2.0];

    fn run(settings: OptimizerSettings, lr: f64) -> Vec<f64> {
        let p = Tensor::from_slice(&START.map(|x| x as f32)).set_requires_grad(true);
        let mut opt = Optimizer::new(settings, vec![("w".into(), p.shallow_clone())]);
        for g in GRADS {
            opt.step(&[Tensor::from_slice(&g.map(|x| x as f32))], lr);
        }
        Vec::<f32>::try_from(&p).unwrap().into_iter().map(f64::from).collect()
    }

    /// torch.optim.Adam / AdamW, written out in f64.
    fn reference_adam(decoupled: bool, wd: f64, lr: f64) -> Vec<f64> {
        let (b1, b2, eps) = (0.9, 0.999, 1e-8);
        let mut p = START.to_vec();
        let (mut m, mut v) = (vec![0.0; 2], vec![0.0; 2]);
        for (t, g) in GRADS.iter().enumerate() {
            let t = (t + 1) as i32;
            for i in 0..2 {
                let mut gi = g[i];
                if decoupled {
                    p[i] *= 1.0 - lr * wd;
                } else {
                    gi += wd * p[i];
                }
                m[i] = b1 * m[i] + (1.0 - b1) * gi;
                v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                let m_hat = m[i] / (1.0 - b1.powi(t));
                let v_hat = v[i] / (1.0 - b2.powi(t));
                p[i] -= lr * m_hat / (v_hat.sqrt() + eps);
            }
        }
        p
    }

    fn reference_sgd(momentum: f64, nesterov: bool, wd: f64, lr: f64) -> Vec<f64> {
        let mut p = START.to_vec();
        let mut buf = [0.0; 2];
        for g in GRADS {
            for i in 0..2 {
                let gi = g[i] + wd * p[i];
                buf[i] = momentum * buf[i] + gi;
                let d = if nesterov { gi + momentum * buf[i] } else { buf[i] };
                p[i] -= lr * d;
            }
        }
        p
    }

    fn assert_close(got: &[f64], want: &[f64]) {
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn adam_matches_pytorch() {
        assert_close(
            &run(OptimizerSettings::adam(0.9, 0.999), 0.1),
            &reference_adam(false, 0.0, 0.1),
        );
        let l2 = OptimizerSettings {
            weight_decay: 0.3,
            ..OptimizerSettings::adam(0.9, 0.999)
        };
        assert_close(&run(l2, 0.1), &reference_adam(false, 0.3, 0.1));
    }

    #[test]
    fn adamw_decouples_weight_decay() {
        let s = OptimizerSettings {
            kind: OptimizerKind::AdamW,
            weight_decay: 0.3,
            ..OptimizerSettings::adam(0.9, 0.999)
        };
        let got = run(s, 0.1);
        assert_close(&got, &reference_adam(true, 0.3, 0.1));
        // And it is not the same as L2-regularised Adam.
        let l2 = reference_adam(false, 0.3, 0.1);
        assert!((got[0] - l2[0]).abs() > 1e-4);
    }

    #[test]
    fn sgd_plain_momentum_and_nesterov() {
        let sgd = |momentum, nesterov, weight_decay| OptimizerSettings {
            kind: OptimizerKind::Sgd,
            momentum,
            nesterov,
            weight_decay,
            ..OptimizerSettings::adam(0.9, 0.999)
        };
        assert_close(&run(sgd(0.0, false, 0.0), 0.1), &reference_sgd(0.0, false, 0.0, 0.1));
        assert_close(&run(sgd(0.9, false, 0.01), 0.1), &reference_sgd(0.9, false, 0.01, 0.1));
        assert_close(&run(sgd(0.9, true, 0.0), 0.1), &reference_sgd(0.9, true, 0.0, 0.1));
    }

    #[test]
    fn undefined_gradients_leave_a_parameter_alone() {
        let a = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let b = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mut opt = Optimizer::new(
            OptimizerSettings::adam(0.9, 0.999),
            vec![("a".into(), a.shallow_clone()), ("b".into(), b.shallow_clone())],
        );
        opt.step(&[Tensor::ones([2], (Kind::Float, Device::Cpu)), Tensor::new()], 0.1);
        assert!(a.double_value(&[0]) < 1.0);
        assert_eq!(b.double_value(&[0]), 1.0);
        let updates = opt.state_tensors("").remove(0).1;
        assert_eq!(Vec::<i64>::try_from(&updates).unwrap(), [1, 0]);
    }

    #[test]
    fn state_round_trips_exactly() {
        let make = || Tensor::from_slice(&[0.3f32, -0.7]).set_requires_grad(true);
        let (p1, p2) = (make(), make());
        let s = OptimizerSettings::adam(0.9, 0.999);
        let mut a = Optimizer::new(s, vec![("w".into(), p1.shallow_clone())]);
        a.step(&[Tensor::from_slice(&[0.1f32, 0.2])], 0.01);
        let saved: HashMap<String, Tensor> = a
            .state_tensors("opt.")
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect();
        let mut b = Optimizer::new(s, vec![("w".into(), p2.shallow_clone())]);
        b.load_state(&saved, "opt.").unwrap();
        tch::no_grad(|| p2.shallow_clone().copy_(&p1));
        let g = Tensor::from_slice(&[-0.4f32, 0.05]);
        a.step(&[g.shallow_clone()], 0.01);
        b.step(&[g], 0.01);
        assert!(p1.equal(&p2), "same state, same update");

        let mut wrong = Optimizer::new(s, vec![("v".into(), make())]);
        assert!(wrong.load_state(&saved, "opt.").unwrap_err().contains("lacks"));
    }
}
