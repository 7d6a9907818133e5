//! One decoded sample, and the byte encodings of its modalities inside a shard.

use crate::manifest::{IMAGE_PIXELS, IMAGE_SIZE, SAMPLE_RATE};
use image::codecs::png::{CompressionType, FilterType, PngDecoder, PngEncoder};
use image::{DynamicImage, ImageDecoder, ImageEncoder};
use std::io::Cursor;

/// One sample, decoded. Only the label is required; a missing modality is `None`, and a model
/// masks it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The WebDataset key: the file name before the first `.`, unique within a dataset.
    pub key: String,
    /// `IMAGE_SIZE * IMAGE_SIZE` grayscale pixels, row-major, 0 = black.
    pub image: Option<Vec<u8>>,
    /// Mono samples at [`SAMPLE_RATE`], in `[-1, 1]`.
    pub audio: Option<Vec<f32>>,
    /// The utterance, UTF-8.
    pub text: Option<String>,
    /// Index into `Manifest::classes`.
    pub label: u8,
}

/// A 48x48 grayscale PNG. Fast compression: shards are written once but built on the CLI's
/// machine, and faces this small barely compress better at higher levels.
pub fn encode_png(pixels: &[u8]) -> Result<Vec<u8>, String> {
    if pixels.len() != IMAGE_PIXELS {
        return Err(format!("image has {} pixels, expected {IMAGE_PIXELS}", pixels.len()));
    }
    let mut out = Vec::with_capacity(IMAGE_PIXELS / 2);
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Sub)
        .write_image(pixels, IMAGE_SIZE, IMAGE_SIZE, image::ExtendedColorType::L8)
        .map_err(|e| format!("cannot encode PNG: {e}"))?;
    Ok(out)
}

/// The most a PNG decoder may allocate for one face: pixels (48x48 at up to 16-bit RGBA is
/// 18 KiB) and ancillary chunks (text, ICC profiles) together.
pub const PNG_MAX_ALLOC: u64 = 8 * 1024 * 1024;

/// Pixels of a 48x48 PNG. Other colour types than 8-bit gray are converted rather than
/// refused, so shards written by other tools read as long as the size is right. The size is
/// checked from the header, before any pixel is decoded, so a small file that claims a huge
/// image costs nothing; other allocations are bounded by [`PNG_MAX_ALLOC`].
pub fn decode_png(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let not_decodable = |e: image::ImageError| format!("PNG is not decodable: {e}");
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(PNG_MAX_ALLOC);
    let decoder = PngDecoder::with_limits(Cursor::new(bytes), limits).map_err(not_decodable)?;
    let (width, height) = decoder.dimensions();
    if width != IMAGE_SIZE || height != IMAGE_SIZE {
        return Err(format!("PNG is {width}x{height}, expected {IMAGE_SIZE}x{IMAGE_SIZE}"));
    }
    let img = DynamicImage::from_decoder(decoder).map_err(not_decodable)?;
    Ok(img.into_luma8().into_raw())
}

const WAV_SPEC: hound::WavSpec = hound::WavSpec {
    channels: 1,
    sample_rate: SAMPLE_RATE,
    bits_per_sample: 16,
    sample_format: hound::SampleFormat::Int,
};

/// 16 kHz mono 16-bit PCM; samples outside `[-1, 1]` are clipped.
pub fn encode_wav(audio: &[f32]) -> Result<Vec<u8>, String> {
    let mut cursor = Cursor::new(Vec::with_capacity(44 + audio.len() * 2));
    let err = |e: hound::Error| format!("cannot encode WAV: {e}");
    let mut w = hound::WavWriter::new(&mut cursor, WAV_SPEC).map_err(err)?;
    {
        let mut w16 = w.get_i16_writer(audio.len() as u32);
        for &s in audio {
            let s = if s.is_finite() { s.clamp(-1.0, 1.0) } else { 0.0 };
            w16.write_sample((s * i16::MAX as f32).round() as i16);
        }
        w16.flush().map_err(err)?;
    }
    w.finalize().map_err(err)?;
    Ok(cursor.into_inner())
}

/// Samples of a 16 kHz mono 16-bit WAV, scaled to `[-1, 1]`. Anything else is refused: the
/// loader must not resample behind the trainer's back (`pack` converts once instead).
pub fn decode_wav(bytes: &[u8]) -> Result<Vec<f32>, String> {
    let reader = hound::WavReader::new(Cursor::new(bytes)).map_err(|e| format!("WAV is not decodable: {e}"))?;
    let spec = reader.spec();
    if spec.sample_rate != SAMPLE_RATE || spec.channels != 1 {
        return Err(format!(
            "WAV is {} Hz with {} channel(s), expected {SAMPLE_RATE} Hz mono",
            spec.sample_rate, spec.channels
        ));
    }
    if spec.sample_format != hound::SampleFormat::Int || spec.bits_per_sample != 16 {
        return Err(format!(
            "WAV holds {}-bit {}, expected 16-bit integer PCM",
            spec.bits_per_sample,
            match spec.sample_format {
                hound::SampleFormat::Int => "integers",
                hound::SampleFormat::Float => "floats",
            }
        ));
    }
    // hound leaves the reader at the first sample; converting the slice directly is several
    // times faster than its per-sample iterator, and this runs for every sample of every epoch.
    let len = reader.len() as usize;
    let start = reader.into_inner().position() as usize;
    let data = bytes
        .get(start..start + 2 * len)
        .ok_or_else(|| format!("WAV data is truncated: the header promises {len} samples"))?;
    Ok(data
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trips_and_checks_its_size() {
        let pixels: Vec<u8> = (0..IMAGE_PIXELS).map(|i| (i * 7 % 256) as u8).collect();
        let png = encode_png(&pixels).unwrap();
        assert_eq!(decode_png(&png).unwrap(), pixels);
        assert!(encode_png(&pixels[1..]).unwrap_err().contains("2303 pixels"));
        assert!(decode_png(b"not a png").unwrap_err().contains("not decodable"));
    }

    #[test]
    fn wav_round_trips_within_quantisation_and_clips() {
        let audio = [0.0, 0.5, -0.5, 1.0, -1.0, 3.0, f32::NAN];
        let back = decode_wav(&encode_wav(&audio).unwrap()).unwrap();
        let want = [0.0, 0.5, -0.5, 1.0, -1.0, 1.0, 0.0];
        assert_eq!(back.len(), want.len());
        for (b, w) in back.iter().zip(want) {
            assert!((b - w).abs() < 1e-4, "{back:?}");
        }
    }

    #[test]
    fn truncated_wav_data_is_refused() {
        let wav = encode_wav(&[0.25; 100]).unwrap();
        assert_eq!(decode_wav(&wav).unwrap().len(), 100);
        let e = decode_wav(&wav[..wav.len() - 1]).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
    }
}
