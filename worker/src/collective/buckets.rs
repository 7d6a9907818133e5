//! Gradient buckets: many small gradients fused into a few flat buffers, so one all-reduce
//! covers many tensors and each collective's fixed latency is paid per bucket, not per tensor.
//!
//! The plan is made once per model: tensors in the given order are grouped into contiguous
//! runs of at most `bucket_bytes` (a tensor larger than that gets a bucket of its own). A few
//! f64 scalars (sample counts, loss sums, flags) ride at the end of the last bucket, reduced
//! with the same call, so a training step needs no extra round trip for them. They travel as
//! float32: exact for integers up to 2^24, which bounds the samples of one step.

use super::{Collective, ReduceOp};
use crate::error::WorkerError;
use tch::{Kind, Tensor};

/// The bucket size PyTorch DDP uses by default.
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

const F32_BYTES: usize = 4;

/// One flat buffer and the tensors (by index) it holds, with their offsets in it.
struct Bucket {
    members: Vec<(usize, i64, i64)>,
    /// Elements the members take; in the last bucket the extra scalars follow them.
    used: i64,
    buffer: Tensor,
}

pub struct GradientBuckets {
    buckets: Vec<Bucket>,
    sizes: Vec<Vec<i64>>,
}

impl GradientBuckets {
    /// Plans buckets for tensors shaped like `params`, on their device.
    pub fn new(params: &[Tensor], bucket_bytes: usize) -> Self {
        let per_bucket = (bucket_bytes / F32_BYTES).max(1) as i64;
        let device = params.first().map_or(tch::Device::Cpu, Tensor::device);
        let mut buckets = Vec::new();
        let mut members: Vec<(usize, i64, i64)> = Vec::new();
        let mut used = 0i64;
        for (i, p) in params.iter().enumerate() {
            let n = p.numel() as i64;
            if used > 0 && used + n > per_bucket {
                buckets.push(std::mem::take(&mut members));
                used = 0;
            }
            members.push((i, used, n));
            used += n;
        }
        if !members.is_empty() || buckets.is_empty() {
            buckets.push(members);
        }
        let buckets = buckets
            .into_iter()
            .map(|m| {
                let len: i64 = m.iter().map(|&(_, _, n)| n).sum();
                Bucket {
                    members: m,
                    used: len,
                    buffer: Tensor::zeros([len], (Kind::Float, device)),
                }
            })
            .collect();
        GradientBuckets {
            buckets,
            sizes: params.iter().map(Tensor::size).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Reduces `grads` (shaped like the planned tensors; an undefined one counts as zeros) and
    /// `extra` across the ranks, in place.
    pub fn all_reduce(
        &mut self,
        grads: &mut [Tensor],
        collective: &mut dyn Collective,
        op: ReduceOp,
        extra: &mut [f64],
    ) -> Result<(), WorkerError> {
        if grads.len() != self.sizes.len() {
            return Err(WorkerError::Collective(format!(
                "{} gradients for buckets planned over {} tensors",
                grads.len(),
                self.sizes.len()
            )));
        }
        let last = self.buckets.len() - 1;
        let tail = extra.len() as i64;
        {
            // Sized once for the extras, which are the same few every step, rather than
            // concatenated each step: that would copy the whole bucket again.
            let bucket = &mut self.buckets[last];
            if bucket.buffer.numel() as i64 != bucket.used + tail {
                bucket.buffer = Tensor::zeros([bucket.used + tail], (Kind::Float, bucket.buffer.device()));
            }
        }
        tch::no_grad(|| -> Result<(), WorkerError> {
            for (b, bucket) in self.buckets.iter_mut().enumerate() {
                let mut flat = bucket.buffer.shallow_clone();
                if b == last && tail > 0 {
                    let values = Tensor::from_slice(&extra.iter().map(|&x| x as f32).collect::<Vec<f32>>());
                    flat.narrow(0, bucket.used, tail).copy_(&values);
                }
                for &(i, offset, n) in &bucket.members {
                    let mut slot = flat.narrow(0, offset, n);
                    if grads[i].defined() {
                        slot.copy_(&grads[i].reshape([n]));
                    } else {
                        let _ = slot.zero_();
                    }
                }
                collective.all_reduce(&mut flat, op)?;
                for &(i, offset, n) in &bucket.members {
                    let reduced = flat.narrow(0, offset, n).view(self.sizes[i].as_slice());
                    if grads[i].defined() {
                        grads[i].copy_(&reduced);
                    } else {
                        grads[i] = reduced.copy();
                    }
                }
                if b == last && tail > 0 {
                    let reduced: Vec<f32> =
                        Vec::try_from(flat.narrow(0, bucket.used, tail).to_device(tch::Device::Cpu))?;
                    for (x, v) in extra.iter_mut().zip(reduced) {
                        *x = f64::from(v);
                    }
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::ring::{RingCollective, RingConfig, RingListener};
    use std::time::Duration;

    fn tensors(rank: usize) -> Vec<Tensor> {
        [vec![3i64], vec![17, 5], vec![300], vec![1], vec![4, 4, 4]]
            .iter()
            .enumerate()
            .map(|(i, shape)| {
                let n: i64 = shape.iter().product();
                (Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * (rank as f64 + 1.0) + i as f64)
                    .view(shape.as_slice())
            })
            .collect()
    }

    #[test]
    fn plans_contiguous_buckets_and_gives_big_tensors_their_own() {
        let b = GradientBuckets::new(&tensors(0), 64 * F32_BYTES);
        // Sizes 3, 85, 300, 1, 64 in buckets of 64: [3], [85], [300], [1], [64].
        assert_eq!(b.len(), 5);
        let b = GradientBuckets::new(&tensors(0), 100 * F32_BYTES);
        // [3, 85], [300], [1, 64].
        assert_eq!(b.len(), 3);
        assert!(!GradientBuckets::new(&tensors(0), DEFAULT_BUCKET_BYTES).is_empty());
    }

    /// Two ranks over a real ring with tiny buckets: every tensor and every extra is the sum.
    #[test]
    fn bucketed_reduce_equals_the_per_tensor_sum() {
        let listeners: Vec<RingListener> = (0..2)
            .map(|_| RingListener::bind(std::net::Ipv4Addr::LOCALHOST.into()).unwrap())
            .collect();
        let peers: Vec<_> = listeners.iter().map(RingListener::local_addr).collect();
        let results: Vec<(Vec<Tensor>, Vec<f64>)> = std::thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, l)| {
                    let peers = peers.clone();
                    s.spawn(move || {
                        let config = RingConfig {
                            timeout: Duration::from_secs(10),
                            ..RingConfig::default()
                        };
                        let mut ring = RingCollective::connect(l, rank, &peers, 3, config).unwrap();
                        let mut grads = tensors(rank);
                        // An undefined gradient (a parameter the step did not reach) counts as zeros.
                        grads[3] = Tensor::new();
                        let mut buckets = GradientBuckets::new(&tensors(rank), 1024);
                        let mut extra = vec![rank as f64 + 1.0, 0.5];
                        buckets
                            .all_reduce(&mut grads, &mut ring, ReduceOp::Sum, &mut extra)
                            .unwrap();
                        // Again with more extras (the last bucket grows for them), averaged.
                        let mut again = tensors(rank);
                        let mut more = vec![rank as f64 * 2.0, 7.0, 1e6 + rank as f64];
                        buckets
                            .all_reduce(&mut again, &mut ring, ReduceOp::Average, &mut more)
                            .unwrap();
                        let (a, b) = (tensors(0), tensors(1));
                        for i in 0..a.len() {
                            let want = (&a[i] + &b[i]) / 2.0;
                            assert!(again[i].allclose(&want, 1e-6, 1e-6, false), "averaged tensor {i}");
                        }
                        assert_eq!(more, vec![1.0, 7.0, 1e6 + 0.5]);
                        (grads, extra)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let (a, b) = (tensors(0), tensors(1));
        for (grads, extra) in &results {
            assert_eq!(extra, &vec![3.0, 1.0]);
            for i in 0..a.len() {
                let want = if i == 3 {
                    Tensor::zeros_like(&a[3])
                } else {
                    &a[i] + &b[i]
                };
                assert!(grads[i].allclose(&want, 1e-6, 1e-6, false), "tensor {i}");
            }
        }
    }
}
