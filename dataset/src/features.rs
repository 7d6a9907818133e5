//! Audio features for the trainer, computed on the loader's threads.

use realfft::{RealFftPlanner, RealToComplex};
use std::sync::Arc;

/// Bands of [`log_mel`].
pub const MEL_BANDS: usize = 64;
/// Added before the log so silence gives a finite floor (`ln 1e-6 ≈ -13.8`).
const LOG_FLOOR: f32 = 1e-6;
const MAX_MEL_HZ: f32 = 8000.0;

fn hz_to_mel(hz: f32) -> f32 {
    2595.0 * (1.0 + hz / 700.0).log10()
}

fn mel_to_hz(mel: f32) -> f32 {
    700.0 * (10f32.powf(mel / 2595.0) - 1.0)
}

/// A 64-band log-mel spectrogram with its FFT plan, window and filterbank computed once; build
/// one per loader thread and reuse it (it is also `Send + Sync`, so one can be shared).
///
/// The spectrum comes from a real-input FFT: a frame is real, so half of a complex transform's
/// output mirrors the other half, and `realfft` computes only the half it needs (about half the
/// work; the results agree with a complex FFT to rounding, see the tests).
///
/// Frames are 25 ms with a Hann window, every 10 ms, zero-padded to the next power of two (512
/// points at 16 kHz); power spectra go through triangular filters spaced evenly on the HTK mel
/// scale from 0 Hz to 8 kHz (or Nyquist, if lower), then `ln(x + 1e-6)`. There is no centring
/// padding: `n` samples give `1 + (n - 400) / 160` frames at 16 kHz, one zero-padded frame for
/// a clip shorter than a window, and none for an empty clip.
pub struct LogMel {
    win: usize,
    hop: usize,
    n_fft: usize,
    window: Vec<f32>,
    fft: Arc<dyn RealToComplex<f32>>,
    /// Per band: first FFT bin and the weights from there on, so a frame touches only the bins
    /// a band covers.
    filters: Vec<(usize, Vec<f32>)>,
}

impl LogMel {
    pub fn new(sample_rate: u32) -> Self {
        assert!(
            sample_rate >= 1000,
            "sample rate {sample_rate} Hz is too low for 25 ms frames"
        );
        let sr = sample_rate as f32;
        let win = (sr * 0.025).round() as usize;
        let hop = (sr * 0.010).round() as usize;
        let n_fft = win.next_power_of_two();
        let window = (0..win)
            .map(|i| 0.5 - 0.5 * (2.0 * std::f32::consts::PI * i as f32 / win as f32).cos())
            .collect();
        let fft = RealFftPlanner::<f32>::new().plan_fft_forward(n_fft);
        let top = MAX_MEL_HZ.min(sr / 2.0);
        let mel_top = hz_to_mel(top);
        let edges: Vec<f32> = (0..MEL_BANDS + 2)
            .map(|i| mel_to_hz(mel_top * i as f32 / (MEL_BANDS + 1) as f32))
            .collect();
        let bin_hz = sr / n_fft as f32;
        let filters = (0..MEL_BANDS)
            .map(|m| {
                let (lo, mid, hi) = (edges[m], edges[m + 1], edges[m + 2]);
                let weights: Vec<(usize, f32)> = (0..=n_fft / 2)
                    .filter_map(|k| {
                        let f = k as f32 * bin_hz;
                        let w = if f <= lo || f >= hi {
                            0.0
                        } else if f <= mid {
                            (f - lo) / (mid - lo)
                        } else {
                            (hi - f) / (hi - mid)
                        };
                        (w > 0.0).then_some((k, w))
                    })
                    .collect();
                let first = weights.first().map_or(0, |w| w.0);
                (first, weights.into_iter().map(|w| w.1).collect())
            })
            .collect();
        LogMel {
            win,
            hop,
            n_fft,
            window,
            fft,
            filters,
        }
    }

    /// Frames that `len` samples give.
    pub fn frames(&self, len: usize) -> usize {
        match len {
            0 => 0,
            n if n < self.win => 1,
            n => 1 + (n - self.win) / self.hop,
        }
    }

    pub fn compute(&self, audio: &[f32]) -> Vec<[f32; MEL_BANDS]> {
        let frames = self.frames(audio.len());
        let mut out = Vec::with_capacity(frames);
        let mut buf = self.fft.make_input_vec();
        let mut spectrum = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let mut power = vec![0.0f32; self.n_fft / 2 + 1];
        for f in 0..frames {
            let start = f * self.hop;
            let chunk = &audio[start..(start + self.win).min(audio.len())];
            // The transform overwrites its input, so every frame fills the whole buffer again.
            for (i, b) in buf.iter_mut().enumerate() {
                *b = match chunk.get(i) {
                    Some(&x) => x * self.window[i],
                    None => 0.0,
                };
            }
            self.fft
                .process_with_scratch(&mut buf, &mut spectrum, &mut scratch)
                .expect("buffers made by the plan have its lengths");
            for (p, b) in power.iter_mut().zip(&spectrum) {
                *p = b.norm_sqr();
            }
            out.push(self.bands(&power));
        }
        out
    }

    /// Filterbank energies of one power spectrum, then the log.
    fn bands(&self, power: &[f32]) -> [f32; MEL_BANDS] {
        let mut row = [0.0f32; MEL_BANDS];
        for (r, (first, weights)) in row.iter_mut().zip(&self.filters) {
            let e: f32 = weights.iter().zip(&power[*first..]).map(|(w, p)| w * p).sum();
            *r = (e + LOG_FLOOR).ln();
        }
        row
    }
}

/// [`LogMel::compute`] with a filterbank built for this call; loaders should keep a [`LogMel`].
pub fn log_mel(audio: &[f32], sample_rate: u32) -> Vec<[f32; MEL_BANDS]> {
    LogMel::new(sample_rate).compute(audio)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(hz: f32, secs: f32, sr: u32) -> Vec<f32> {
        (0..(secs * sr as f32) as usize)
            .map(|i| 0.5 * (2.0 * std::f32::consts::PI * hz * i as f32 / sr as f32).sin())
            .collect()
    }

    /// The band whose centre lies nearest `hz` on the mel scale, computed from the definition
    /// rather than from the filterbank under test.
    fn nearest_band(hz: f32) -> usize {
        let step = hz_to_mel(8000.0) / (MEL_BANDS + 1) as f32;
        (0..MEL_BANDS)
            .min_by(|a, b| {
                let da = ((*a + 1) as f32 * step - hz_to_mel(hz)).abs();
                let db = ((*b + 1) as f32 * step - hz_to_mel(hz)).abs();
                da.total_cmp(&db)
            })
            .unwrap()
    }

    fn argmax(row: &[f32; MEL_BANDS]) -> usize {
        (0..MEL_BANDS).max_by(|a, b| row[*a].total_cmp(&row[*b])).unwrap()
    }

    #[test]
    fn a_1khz_tone_peaks_in_the_1khz_band() {
        let mel = log_mel(&tone(1000.0, 1.0, 16_000), 16_000);
        // 16000 samples, 400-sample windows every 160: 1 + 15600 / 160 = 98 frames.
        assert_eq!(mel.len(), 98);
        assert_eq!(mel[0].len(), 64);
        let band = nearest_band(1000.0);
        assert_eq!(band, 22);
        for row in &mel {
            assert_eq!(argmax(row), band);
            // Far bands hold only window leakage: orders of magnitude less energy.
            assert!(row[band] - row[50] > 8.0, "{row:?}");
            assert!(row[band] - row[5] > 8.0, "{row:?}");
        }
        let high = log_mel(&tone(4000.0, 0.2, 16_000), 16_000);
        assert_eq!(argmax(&high[3]), nearest_band(4000.0));
    }

    #[test]
    fn frame_counts_and_silence() {
        let lm = LogMel::new(16_000);
        assert_eq!(lm.frames(0), 0);
        assert_eq!(lm.frames(1), 1);
        assert_eq!(lm.frames(400), 1);
        assert_eq!(lm.frames(559), 1);
        assert_eq!(lm.frames(560), 2);
        assert_eq!(lm.frames(9600), 58);
        assert!(lm.compute(&[]).is_empty());
        let silent = lm.compute(&[0.0; 1000]);
        assert_eq!(silent.len(), 4);
        assert!(silent.iter().flatten().all(|v| (*v - 1e-6f32.ln()).abs() < 1e-3));
        // A short clip is zero-padded into one frame, not dropped.
        assert_eq!(lm.compute(&tone(1000.0, 0.01, 16_000)).len(), 1);
    }

    /// The real-input FFT gives the spectrum a plain DFT of the windowed, zero-padded frame does.
    #[test]
    fn the_real_fft_matches_a_direct_dft() {
        let lm = LogMel::new(16_000);
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<f32> = (0..2000)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                (rng % 2001) as f32 / 1000.0 - 1.0
            })
            .collect();
        let audio: Vec<f32> = tone(440.0, 0.125, 16_000)
            .iter()
            .zip(&noise)
            .map(|(t, n)| t + 0.1 * n)
            .collect();
        let fast = lm.compute(&audio);
        for f in [0, 3, fast.len() - 1] {
            let frame: Vec<f64> = (0..lm.n_fft)
                .map(|i| match audio.get(f * lm.hop + i) {
                    Some(&x) if i < lm.win => (x * lm.window[i]) as f64,
                    _ => 0.0,
                })
                .collect();
            let power: Vec<f32> = (0..=lm.n_fft / 2)
                .map(|k| {
                    let (mut re, mut im) = (0.0f64, 0.0f64);
                    for (i, x) in frame.iter().enumerate() {
                        let a = -2.0 * std::f64::consts::PI * (k * i) as f64 / lm.n_fft as f64;
                        re += x * a.cos();
                        im += x * a.sin();
                    }
                    (re * re + im * im) as f32
                })
                .collect();
            let direct = lm.bands(&power);
            for (a, b) in fast[f].iter().zip(&direct) {
                assert!((a - b).abs() < 1e-3, "frame {f}: {a} against {b}");
            }
        }
    }

    #[test]
    fn every_band_covers_some_bin() {
        let lm = LogMel::new(16_000);
        assert_eq!(lm.n_fft, 512);
        assert!(lm.filters.iter().all(|(_, w)| !w.is_empty()));
    }
}
