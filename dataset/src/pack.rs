//! `chorus dataset pack`: a user's CSV of files and labels into shards.
//!
//! Columns, by header name (case-insensitive, any order): `label` (required: a class name or
//! index), `image` (a PNG or JPEG of any size and colour type: centre-cropped to a square,
//! resized to 48x48, converted to gray), `audio` (a WAV of any rate, channel count and PCM or float
//! format: downmixed to mono, resampled to 16 kHz by [`crate::resample`]), `text` (the
//! utterance), `split` (`train`, `val` or `test`; rows without one are split at random by the
//! fractions). Empty cells mean the modality is missing. Relative paths resolve against the
//! CSV's directory. Sample keys are the CSV line numbers, so an error in a shard leads back to
//! the row. The rows go through the same writing path as the corpus importers
//! ([`crate::import`]).

use crate::convert::{load_audio, load_image};
use crate::error::{DatasetError, Result};
use crate::import::{Entry, ImportOptions, Media, columns, csv_error_line};
use crate::manifest::{Manifest, Split};
use chorus_core::storage::Storage;
use std::path::{Path, PathBuf};

pub use crate::import::DEFAULT_SHARDS;

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

/// Where a row's files are, checked but not yet loaded.
#[derive(Debug, Clone)]
struct Files {
    line: u64,
    image: Option<PathBuf>,
    audio: Option<PathBuf>,
}

/// Packs the CSV into a dataset under `storage`, manifest last.
///
/// Rows are shuffled within each split (with `seed`) so that shards mix classes even when the
/// CSV is sorted by class or speaker; the vocabulary comes from the train split's texts only,
/// so val and test see unknown words as a deployed model would.
pub async fn pack(storage: Storage, opts: &PackOptions, replace: bool) -> Result<Manifest> {
    crate::manifest::check_classes(&opts.classes)
        .map_err(|e| DatasetError::InvalidArgument(format!("--classes: {e}")))?;
    let common = ImportOptions {
        name: opts.name.clone(),
        shards: opts.shards,
        seed: opts.seed,
        val_fraction: opts.val_fraction,
        test_fraction: opts.test_fraction,
        max_vocabulary: opts.max_vocabulary,
    };
    // Fail on bad options before reading any file.
    common.check()?;
    let rows = read_rows(&opts.csv, &opts.classes)?;
    let csv_name = opts.csv.display().to_string();
    let source = format!("chorus dataset pack --csv {}", opts.csv.display());
    crate::import::write(storage, &common, source, opts.classes.clone(), rows, replace, |e| {
        load_files(&e.source).map_err(|reason| DatasetError::Csv {
            path: csv_name.clone(),
            line: e.source.line,
            reason,
        })
    })
    .await
}

fn read_rows(csv_path: &Path, classes: &[String]) -> Result<Vec<Entry<Files>>> {
    let path = csv_path.display().to_string();
    let err = |line: u64, reason: String| DatasetError::Csv {
        path: path.clone(),
        line,
        reason,
    };
    let file = crate::import::open(csv_path)?;
    let base = csv_path.parent().unwrap_or(Path::new("."));
    let mut reader = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(file);
    let headers = reader.headers().map_err(|e| err(1, e.to_string()))?.clone();
    let [image_col, audio_col, text_col, label_col, split_col] =
        columns(&headers, ["image", "audio", "text", "label", "split"], false).map_err(|r| err(1, r))?;
    let label_col = label_col.ok_or_else(|| err(1, "the header has no label column".into()))?;

    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| err(csv_error_line(&e), e.to_string()))?;
        let line = record.position().map_or(0, |p| p.line());
        let cell = |c: Option<usize>| c.and_then(|c| record.get(c)).filter(|v| !v.is_empty());
        let label = parse_label(cell(Some(label_col)).unwrap_or(""), classes).map_err(|r| err(line, r))?;
        let split = cell(split_col)
            .map(str::parse::<Split>)
            .transpose()
            .map_err(|r| err(line, r))?;
        rows.push(Entry {
            key: format!("{line:08}"),
            label,
            split,
            text: cell(text_col).map(str::to_string),
            source: Files {
                line,
                image: cell(image_col).map(|p| base.join(p)),
                audio: cell(audio_col).map(|p| base.join(p)),
            },
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

fn load_files(files: &Files) -> Result<Media, String> {
    let image = files
        .image
        .as_deref()
        .map(|p| load_image(p).map_err(|e| format!("image {}: {e}", p.display())))
        .transpose()?;
    let audio = files
        .audio
        .as_deref()
        .map(|p| load_audio(p).map_err(|e| format!("audio {}: {e}", p.display())))
        .transpose()?;
    Ok(Media { image, audio })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes() -> Vec<String> {
        crate::manifest::emotion_classes()
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
