//! `chorus dataset pack`: a user's CSV of files and labels into shards.
//!
//! Columns, by header name (case-insensitive, any order): `label` (required: a class name or
//! index), `image` (a PNG or JPEG of any size and colour type: centre-cropped to a square,
//! resized to 48x48, converted to gray), `audio` (a WAV of any rate, channel count and PCM or float
//! format: downmixed to mono, resampled to 16 kHz by linear interpolation), `text` (the
//! utterance), `split` (`train`, `val` or `test`; rows without one are split at random by the
//! fractions). Empty cells mean the modality is missing. Relative paths resolve against the
//! CSV's directory. Sample keys are the CSV line numbers, so an error in a shard leads back to
//! the row.

use crate::error::{DatasetError, Result};
use crate::manifest::{IMAGE_SIZE, Manifest, SAMPLE_RATE, Split, SplitCounts};
use crate::sample::Sample;
use crate::store::{DatasetHeader, DatasetWriter, ShardPlan};
use crate::synth::split_counts;
use crate::vocab::Vocabulary;
use chorus_core::storage::Storage;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};

/// Shards `pack` makes unless told otherwise: enough for a few data-parallel ranks.
pub const DEFAULT_SHARDS: usize = 8;

const COLUMNS: [&str; 5] = ["image", "audio", "text", "label", "split"];

#[derive(Debug, Clone)]
pub struct PackOptions {
    pub name: String,
    pub csv: PathBuf,
    pub classes: Vec<String>,
    /// Shards in total; `None` makes [`DEFAULT_SHARDS`], fewer when the CSV has fewer rows and
    /// more when there are more non-empty splits.
    pub shards: Option<usize>,
    pub seed: u64,
    pub val_fraction: f64,
    pub test_fraction: f64,
    /// Most tokens kept in the vocabulary, the two reserved ones included.
    pub max_vocabulary: usize,
}

/// One CSV row, checked but not yet loaded.
#[derive(Debug, Clone)]
struct Row {
    line: u64,
    label: u8,
    image: Option<PathBuf>,
    audio: Option<PathBuf>,
    text: Option<String>,
    split: Option<Split>,
}

/// Packs the CSV into a dataset under `storage`, manifest last.
///
/// Rows are shuffled within each split (with `seed`) so that shards mix classes even when the
/// CSV is sorted by class or speaker; the vocabulary comes from the train split's texts only,
/// so val and test see unknown words as a deployed model would.
pub async fn pack(storage: Storage, opts: &PackOptions, replace: bool) -> Result<Manifest> {
    crate::manifest::check_classes(&opts.classes)
        .map_err(|e| DatasetError::InvalidArgument(format!("--classes: {e}")))?;
    // Fail on bad fractions before reading any file.
    split_counts(0, opts.val_fraction, opts.test_fraction)?;
    let mut rows = read_rows(&opts.csv, &opts.classes)?;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    assign_splits(&mut rows, opts, &mut rng)?;
    let mut by_split: [Vec<Row>; 3] = Default::default();
    for r in rows {
        let split = r.split.expect("assigned above");
        by_split[split as usize].push(r);
    }
    let train_texts = by_split[Split::Train as usize].iter().filter_map(|r| r.text.as_deref());
    let vocabulary = Vocabulary::build(train_texts, opts.max_vocabulary);
    let mut counts = SplitCounts::default();
    for split in Split::ALL {
        *counts.get_mut(split) = by_split[split as usize].len() as u64;
    }
    let shards = opts.shards.unwrap_or_else(|| {
        let non_empty = Split::ALL.iter().filter(|s| counts.get(**s) > 0).count();
        DEFAULT_SHARDS.min(counts.total() as usize).max(non_empty)
    });
    let plan = ShardPlan::new(counts, shards)?;
    let header = DatasetHeader {
        name: opts.name.clone(),
        source: Some(format!("chorus dataset pack --csv {}", opts.csv.display())),
        classes: opts.classes.clone(),
        vocabulary,
    };
    let mut writer = DatasetWriter::create(storage, header, plan, replace).await?;
    let csv_name = opts.csv.display().to_string();
    for (split, rows) in Split::ALL.into_iter().zip(by_split.iter_mut()) {
        rows.shuffle(&mut rng);
        for row in rows.iter() {
            let sample = load_row(row).map_err(|reason| DatasetError::Csv {
                path: csv_name.clone(),
                line: row.line,
                reason,
            })?;
            writer.add(split, &sample).await?;
        }
    }
    writer.finish().await
}

fn read_rows(csv_path: &Path, classes: &[String]) -> Result<Vec<Row>> {
    let path = csv_path.display().to_string();
    let err = |line: u64, reason: String| DatasetError::Csv {
        path: path.clone(),
        line,
        reason,
    };
    let file = std::fs::File::open(csv_path).map_err(|e| DatasetError::Io {
        path: path.clone(),
        source: e,
    })?;
    let base = csv_path.parent().unwrap_or(Path::new("."));
    let mut reader = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(file);
    let headers = reader.headers().map_err(|e| err(1, e.to_string()))?.clone();
    let mut col: [Option<usize>; 5] = [None; 5];
    for (i, h) in headers.iter().enumerate() {
        let name = h.to_ascii_lowercase();
        let Some(c) = COLUMNS.iter().position(|c| *c == name) else {
            return Err(err(
                1,
                format!("unknown column {h:?} (columns: image, audio, text, label, split)"),
            ));
        };
        if col[c].replace(i).is_some() {
            return Err(err(1, format!("column {h:?} appears twice")));
        }
    }
    let [image_col, audio_col, text_col, label_col, split_col] = col;
    let label_col = label_col.ok_or_else(|| err(1, "the header has no label column".into()))?;

    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            err(line, e.to_string())
        })?;
        let line = record.position().map_or(0, |p| p.line());
        let cell = |c: Option<usize>| c.and_then(|c| record.get(c)).filter(|v| !v.is_empty());
        let label = parse_label(cell(Some(label_col)).unwrap_or(""), classes).map_err(|r| err(line, r))?;
        let split = cell(split_col)
            .map(str::parse::<Split>)
            .transpose()
            .map_err(|r| err(line, r))?;
        rows.push(Row {
            line,
            label,
            image: cell(image_col).map(|p| base.join(p)),
            audio: cell(audio_col).map(|p| base.join(p)),
            text: cell(text_col).map(str::to_string),
            split,
        });
    }
    if rows.is_empty() {
        return Err(err(1, "the CSV has no rows".into()));
    }
    Ok(rows)
}

/// A class name (case-insensitive) or a class index.
fn parse_label(cell: &str, classes: &[String]) -> Result<u8, String> {
    if cell.is_empty() {
        return Err("the label is empty (every row needs one)".into());
    }
    if let Some(i) = classes.iter().position(|c| c.eq_ignore_ascii_case(cell)) {
        return Ok(i as u8);
    }
    match cell.parse::<usize>() {
        Ok(i) if i < classes.len() => Ok(i as u8),
        _ => Err(format!(
            "label {cell:?} is neither a class ({}) nor a class index below {}",
            classes.join(", "),
            classes.len()
        )),
    }
}

/// Rows with a `split` cell keep it; the others are shuffled and cut by the fractions.
fn assign_splits(rows: &mut [Row], opts: &PackOptions, rng: &mut ChaCha8Rng) -> Result<()> {
    let mut free: Vec<usize> = (0..rows.len()).filter(|i| rows[*i].split.is_none()).collect();
    free.shuffle(rng);
    let counts = split_counts(free.len() as u64, opts.val_fraction, opts.test_fraction)?;
    for (n, i) in free.into_iter().enumerate() {
        rows[i].split = Some(crate::synth::split_of(n as u64, &counts));
    }
    Ok(())
}

fn load_row(row: &Row) -> Result<Sample, String> {
    let image = row
        .image
        .as_deref()
        .map(|p| load_image(p).map_err(|e| format!("image {}: {e}", p.display())))
        .transpose()?;
    let audio = row
        .audio
        .as_deref()
        .map(|p| load_audio(p).map_err(|e| format!("audio {}: {e}", p.display())))
        .transpose()?;
    Ok(Sample {
        key: format!("{:08}", row.line),
        image,
        audio,
        text: row.text.clone(),
        label: row.label,
    })
}

/// Any image this build decodes (PNG) as 48x48 gray: the centre square, resized, so faces
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
    let gray = img.into_luma8();
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

/// Any PCM or float WAV as 16 kHz mono in `[-1, 1]`: channels averaged, then linear
/// interpolation between neighbouring samples (no anti-alias filter; speech above 8 kHz
/// carries little that a 64-band mel spectrogram keeps).
pub fn load_audio(path: &Path) -> Result<Vec<f32>, String> {
    let reader = hound::WavReader::open(path).map_err(|e| e.to_string())?;
    let spec = reader.spec();
    if spec.channels == 0 || spec.sample_rate == 0 {
        return Err("the WAV header names no channels or no sample rate".into());
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
    Ok(resample(&mono, spec.sample_rate, SAMPLE_RATE))
}

/// Linear interpolation from `from` Hz to `to` Hz.
pub fn resample(x: &[f32], from: u32, to: u32) -> Vec<f32> {
    if from == to || x.is_empty() {
        return x.iter().map(|v| v.clamp(-1.0, 1.0)).collect();
    }
    let n = ((x.len() as u64 * to as u64 + from as u64 / 2) / from as u64).max(1) as usize;
    let step = from as f64 / to as f64;
    (0..n)
        .map(|i| {
            let pos = i as f64 * step;
            let j = (pos as usize).min(x.len() - 1);
            let frac = (pos - j as f64) as f32;
            let next = x[(j + 1).min(x.len() - 1)];
            (x[j] + (next - x[j]) * frac).clamp(-1.0, 1.0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes() -> Vec<String> {
        crate::EMOTIONS.iter().map(|c| c.to_string()).collect()
    }

    #[test]
    fn labels_are_names_or_indices() {
        let c = classes();
        assert_eq!(parse_label("Fear", &c), Ok(2));
        assert_eq!(parse_label("6", &c), Ok(6));
        let e = parse_label("7", &c).unwrap_err();
        assert!(e.contains("neither a class") && e.contains("below 7"), "{e}");
        assert!(parse_label("joy", &c).is_err());
        assert!(parse_label("", &c).unwrap_err().contains("empty"));
    }

    #[test]
    fn resampling_keeps_duration_and_shape() {
        let ramp: Vec<f32> = (0..480).map(|i| i as f32 / 480.0).collect();
        let out = resample(&ramp, 48_000, 16_000);
        assert_eq!(out.len(), 160);
        assert!((out[10] - ramp[30]).abs() < 1e-6);
        let up = resample(&[0.0, 1.0], 8_000, 16_000);
        assert_eq!(up, [0.0, 0.5, 1.0, 1.0]);
    }

    #[test]
    fn csv_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("d.csv");
        std::fs::write(&csv, "label,text\nanger,hi\nhappiness,yo\njoy,hey\n").unwrap();
        let e = read_rows(&csv, &classes()).unwrap_err().to_string();
        assert!(e.ends_with("d.csv line 4: label \"joy\" is neither a class (anger, disgust, fear, happiness, sadness, surprise, neutral) nor a class index below 7"), "{e}");
        std::fs::write(&csv, "label,imgae\n1,a.png\n").unwrap();
        let e = read_rows(&csv, &classes()).unwrap_err().to_string();
        assert!(e.contains("line 1: unknown column \"imgae\""), "{e}");
        std::fs::write(&csv, "text\nhi\n").unwrap();
        assert!(
            read_rows(&csv, &classes())
                .unwrap_err()
                .to_string()
                .contains("no label column")
        );
        std::fs::write(&csv, "label,split\n1,train\n2,holdout\n").unwrap();
        let e = read_rows(&csv, &classes()).unwrap_err().to_string();
        assert!(e.contains("line 3: unknown split \"holdout\""), "{e}");
    }
}
