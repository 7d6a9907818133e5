//! Turning a corpus's own media into what a shard stores: any image into a 48x48 gray face, any
//! WAV into 16 kHz mono. `pack` and every importer convert through here, so a dataset made from a
//! CSV and one imported from a corpus look alike to the trainer.

use crate::manifest::{IMAGE_SIZE, SAMPLE_RATE};
use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler, WindowFunction};
use std::path::Path;

/// Any image this build decodes (PNG, JPEG) as 48x48 gray: the centre square, resized, so faces
/// keep their proportions.
pub fn load_image(path: &Path) -> Result<Vec<u8>, String> {
    let img = image::ImageReader::open(path)
        .map_err(|e| e.to_string())?
        .with_guessed_format()
        .map_err(|e| e.to_string())?
        .decode()
        .map_err(|e| match e {
            image::ImageError::Unsupported(_) => {
                format!("{e} (PNG and JPEG are read; convert others first, e.g. `mogrify -format png *.webp`)")
            }
            e => e.to_string(),
        })?;
    face_pixels(img.into_luma8())
}

/// The centre square of a gray image, resized to the format's side (triangle filter): the pixels
/// a shard's PNG holds.
pub(crate) fn face_pixels(gray: image::GrayImage) -> Result<Vec<u8>, String> {
    let (w, h) = gray.dimensions();
    let side = w.min(h);
    if side == 0 {
        return Err("the image is empty".into());
    }
    let square = image::imageops::crop_imm(&gray, (w - side) / 2, (h - side) / 2, side, side).to_image();
    let out = if side == IMAGE_SIZE {
        square
    } else {
        image::imageops::resize(&square, IMAGE_SIZE, IMAGE_SIZE, image::imageops::FilterType::Triangle)
    };
    Ok(out.into_raw())
}

/// The longest clip a sample may carry: ten minutes, far beyond an utterance, well within memory.
pub const MAX_CLIP_SECONDS: f64 = 600.0;

/// Any PCM or float WAV as 16 kHz mono in `[-1, 1]`: channels averaged (before resampling, which
/// is linear, so one channel is filtered instead of several), then [`resample`]d. Clips longer
/// than [`MAX_CLIP_SECONDS`] are refused.
pub fn load_audio(path: &Path) -> Result<Vec<f32>, String> {
    let reader = hound::WavReader::open(path).map_err(|e| e.to_string())?;
    let spec = reader.spec();
    if spec.channels == 0 || spec.sample_rate == 0 {
        return Err("the WAV header names no channels or no sample rate".into());
    }
    if !(MIN_RATE..=MAX_RATE).contains(&spec.sample_rate) {
        return Err(format!(
            "the WAV's sample rate {} Hz is outside {MIN_RATE} to {MAX_RATE} Hz",
            spec.sample_rate
        ));
    }
    // The header's length bounds what is read: a clip longer than any utterance is refused
    // before a byte of it is decoded (a whole clip is held three times over while converted).
    let seconds = reader.duration() as f64 / spec.sample_rate as f64;
    if seconds > MAX_CLIP_SECONDS {
        return Err(format!(
            "the clip lasts {seconds:.0} s; at most {MAX_CLIP_SECONDS:.0} s of audio is taken per sample"
        ));
    }
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => reader.into_samples::<f32>().collect::<Result<_, _>>(),
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample.clamp(1, 32) - 1)) as f32;
            reader
                .into_samples::<i32>()
                .map(|s| s.map(|s| s as f32 * scale))
                .collect::<Result<_, _>>()
        }
    }
    .map_err(|e| format!("cannot read samples: {e}"))?;
    let ch = spec.channels as usize;
    let mono: Vec<f32> = interleaved
        .chunks_exact(ch)
        .map(|f| f.iter().sum::<f32>() / ch as f32)
        .collect();
    drop(interleaved);
    resample(&mono, spec.sample_rate, SAMPLE_RATE)
}

/// The lowest input rate [`load_audio`] accepts: telephone speech is 8 kHz, and nothing below
/// 1 kHz holds speech worth a spectrogram.
pub const MIN_RATE: u32 = 1_000;
/// The highest input rate [`load_audio`] accepts. It bounds the resampler's FFT: for a rate that
/// shares no factor with 16 kHz one block is a whole second of input.
pub const MAX_RATE: u32 = 768_000;

/// Output frames per FFT block the resampler aims for (32 ms at 16 kHz): long enough for a steep
/// anti-alias filter (going from 48 to 16 kHz: flat to 7 kHz, 8 dB down at 7.8 kHz, over 140 dB
/// down from 8.2 kHz on), short enough that a clip's edges settle within about 20 ms.
const BLOCK_OUT: usize = 512;

/// Mono audio from `from` Hz to `to` Hz, band-limited: rubato's synchronous FFT resampler, whose
/// anti-alias filter is a sinc under a Blackman-Harris window, so a tone above the new Nyquist
/// frequency is removed rather than folded into the band (a 12 kHz tone going from 48 to 16 kHz
/// would otherwise come back as 4 kHz). The filter's delay is trimmed, so sample `i` of the output
/// lies at the time of input sample `i * from / to`, and the output has `round(len * to / from)`
/// samples, so a clip keeps its duration. Samples are clipped to `[-1, 1]`, which the filter's
/// ripple can overshoot by a little on a full-scale input.
pub fn resample(x: &[f32], from: u32, to: u32) -> Result<Vec<f32>, String> {
    if from == 0 || to == 0 {
        return Err(format!("cannot resample from {from} Hz to {to} Hz"));
    }
    if from == to || x.is_empty() {
        return Ok(x.iter().map(|v| v.clamp(-1.0, 1.0)).collect());
    }
    let want = ((x.len() as u64 * to as u64 + from as u64 / 2) / from as u64).max(1) as usize;
    let (from, to) = (from as usize, to as usize);
    // The FFT works on blocks of `from / gcd` input and `to / gcd` output frames (or multiples):
    // pick the multiple nearest BLOCK_OUT output frames, and an even one, so the delay the
    // resampler reports (half a block) is a whole number of frames and trims exactly.
    let g = gcd(from, to);
    let (min_in, min_out) = (from / g, to / g);
    let mut blocks = BLOCK_OUT.div_ceil(min_out).max(1);
    if (blocks * min_out) % 2 == 1 {
        blocks += 1;
    }
    let err = |e: &dyn std::fmt::Display| format!("cannot resample from {from} Hz to {to} Hz: {e}");
    let mut resampler = Fft::<f32>::new_custom(
        from,
        to,
        blocks * min_in,
        1,
        1,
        WindowFunction::BlackmanHarris2,
        FixedSync::Input,
    )
    .map_err(|e| err(&e))?;
    let input = InterleavedSlice::new(x, 1, x.len()).map_err(|e| err(&e))?;
    let out = resampler.process_all(&input, x.len(), None).map_err(|e| err(&e))?;
    let mut out = out.take_data();
    // process_all gives ceil(len * to / from) frames; rounding matches the linear resampler this
    // replaced, so durations recorded before stay the same.
    out.resize(want, 0.0);
    for v in &mut out {
        *v = v.clamp(-1.0, 1.0);
    }
    Ok(out)
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::PI;

    /// Computed in f64: in f32 the phase of a second of a 12 kHz tone is off by up to 0.01 rad,
    /// noise at -50 dB that would be blamed on the resampler.
    fn tone(freq: f64, rate: u32, secs: f64, amp: f64) -> Vec<f32> {
        (0..(f64::from(rate) * secs).round() as usize)
            .map(|i| (amp * (2.0 * PI * freq * i as f64 / f64::from(rate)).sin()) as f32)
            .collect()
    }

    /// RMS of the middle of a clip: the edges hold the filter's response to the clip starting and
    /// stopping, a click that is in the band whatever the tone.
    fn rms_middle(x: &[f32], edge: usize) -> f64 {
        let mid = &x[edge..x.len() - edge];
        (mid.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / mid.len() as f64).sqrt()
    }

    #[test]
    fn a_tone_above_the_new_nyquist_is_removed_not_folded() {
        let high = tone(12_000.0, 48_000, 1.0, 0.5);
        let out = resample(&high, 48_000, 16_000).unwrap();
        assert_eq!(out.len(), 16_000);
        let db = 20.0 * (rms_middle(&out, 400) / rms_middle(&high, 1200)).log10();
        // Measured: about -240 dB; f32 rounding alone is near -150 dB.
        assert!(db <= -100.0, "12 kHz tone only {db:.1} dB down");
        // The linear interpolation it replaced folds it to 4 kHz at almost full strength.
        let step: Vec<f32> = (0..16_000).map(|i| high[i * 3]).collect();
        assert!(rms_middle(&step, 400) > 0.1);
    }

    #[test]
    fn a_tone_in_the_band_keeps_its_amplitude_phase_and_duration() {
        for (from, len) in [
            (48_000u32, 48_000usize),
            (44_100, 44_100),
            (22_050, 22_050),
            (8_000, 8_000),
        ] {
            let x = tone(1_000.0, from, len as f64 / f64::from(from), 0.5);
            let out = resample(&x, from, 16_000).unwrap();
            let want = (len as u64 * 16_000 + from as u64 / 2) / from as u64;
            assert_eq!(out.len() as u64, want, "{from} Hz");
            let db = 20.0 * (rms_middle(&out, 400) / (0.5 / 2f64.sqrt())).log10();
            assert!(db.abs() < 0.1, "{from} Hz: 1 kHz tone changed by {db:.2} dB");
            // No delay: the output matches the tone sampled at 16 kHz directly. A shift of one
            // output sample would put it off by 0.19.
            let ideal = tone(1_000.0, 16_000, out.len() as f64 / 16_000.0, 0.5);
            let worst = out[400..out.len() - 400]
                .iter()
                .zip(&ideal[400..])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 0.01, "{from} Hz: off the ideal by {worst}");
        }
    }

    #[test]
    fn short_and_odd_inputs() {
        assert_eq!(resample(&[], 48_000, 16_000).unwrap(), Vec::<f32>::new());
        assert_eq!(resample(&[0.25, 2.0], 16_000, 16_000).unwrap(), [0.25, 1.0]);
        assert_eq!(resample(&[0.5; 2], 48_000, 16_000).unwrap().len(), 1);
        assert_eq!(resample(&[0.5; 7], 8_000, 16_000).unwrap().len(), 14);
        // A rate that shares no factor with 16 kHz.
        let x = tone(500.0, 11_111, 0.5, 0.5);
        let out = resample(&x, 11_111, 16_000).unwrap();
        assert_eq!(out.len(), (x.len() as f64 * 16_000.0 / 11_111.0).round() as usize);
        assert!(resample(&x, 0, 16_000).unwrap_err().contains("0 Hz"));
    }
}
