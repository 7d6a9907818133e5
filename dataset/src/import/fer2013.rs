//! `chorus dataset import fer2013`: the FER2013 CSV (`emotion,pixels,Usage`) into a dataset of
//! faces.
//!
//! Each row is a 48x48 gray face: `emotion` is 0 to 6 in FER's order (Angry, Disgust, Fear, Happy,
//! Sad, Surprise, Neutral, mapped onto the Chorus classes by name, see [`FER2013_CLASSES`]),
//! `pixels` the 2304 grey levels row by row, separated by spaces, and `Usage` the split
//! (`Training` is train, `PublicTest` val, `PrivateTest` test). A CSV without a `Usage` column
//! (the competition's `train.csv`) is split at random by the fractions. Any other column, or a
//! row with a bad emotion, usage or pixel, is an error naming the line: FER2013 has no dirty rows,
//! so one means the file is not FER2013 or was cut.
//!
//! The CSV is read twice and never held: once to check every row and note where it starts, then
//! once more, row by row in shard order (a seek to each), to write the faces. Sample keys are the
//! CSV line numbers.

use super::{Entry, ImportOptions, Imported, Media, Tally, columns, csv_error_line, emotion, emotion_classes};
use crate::convert::face_pixels;
use crate::error::{DatasetError, Result};
use crate::manifest::Split;
use chorus_core::storage::Storage;
use std::path::{Path, PathBuf};

/// FER2013's emotion codes, in order (code = index), and the Chorus class each becomes.
pub const FER2013_CLASSES: [(&str, &str); 7] = [
    ("Angry", "anger"),
    ("Disgust", "disgust"),
    ("Fear", "fear"),
    ("Happy", "happiness"),
    ("Sad", "sadness"),
    ("Surprise", "surprise"),
    ("Neutral", "neutral"),
];

/// FER2013's faces are this many pixels a side.
const FER_SIDE: u32 = 48;
const FER_PIXELS: usize = (FER_SIDE * FER_SIDE) as usize;

#[derive(Debug, Clone)]
pub struct Fer2013Options {
    /// `fer2013.csv`.
    pub csv: PathBuf,
    pub import: ImportOptions,
}

/// Where the columns are.
#[derive(Debug, Clone, Copy)]
struct Columns {
    emotion: usize,
    pixels: usize,
    usage: Option<usize>,
}

/// Imports the CSV into a dataset under `storage`, manifest last.
pub async fn import_fer2013(storage: Storage, opts: &Fer2013Options, replace: bool) -> Result<Imported> {
    opts.import.check()?;
    let path = opts.csv.display().to_string();
    let (cols, entries) = scan(&opts.csv)?;
    let mut reader = reader(&opts.csv)?;
    let mut record = csv::StringRecord::new();
    let source = format!("chorus dataset import fer2013 --csv {path}");
    let manifest = super::write(
        storage,
        &opts.import,
        source,
        emotion_classes(),
        entries,
        replace,
        |e| {
            let pos: &csv::Position = &e.source;
            let err = |reason: String| DatasetError::Csv {
                path: path.clone(),
                line: pos.line(),
                reason,
            };
            reader.seek(pos.clone()).map_err(|e| err(e.to_string()))?;
            if !reader.read_record(&mut record).map_err(|e| err(e.to_string()))? {
                return Err(err("the row is gone: the CSV changed while it was imported".into()));
            }
            let pixels = parse_pixels(record.get(cols.pixels).unwrap_or("")).map_err(&err)?;
            let face = image::GrayImage::from_raw(FER_SIDE, FER_SIDE, pixels).expect("FER_PIXELS pixels");
            Ok(Media {
                image: Some(face_pixels(face).map_err(err)?),
                audio: None,
            })
        },
    )
    .await?;
    Ok(Imported {
        manifest,
        skipped: Tally::default().into_map(),
        incomplete: Tally::default().into_map(),
    })
}

fn reader(csv_path: &Path) -> Result<csv::Reader<std::fs::File>> {
    Ok(csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(super::open(csv_path)?))
}

/// Checks every row; an entry per row, its source being where the row starts in the file.
fn scan(csv_path: &Path) -> Result<(Columns, Vec<Entry<csv::Position>>)> {
    let path = csv_path.display().to_string();
    let err = |line: u64, reason: String| DatasetError::Csv {
        path: path.clone(),
        line,
        reason,
    };
    let mut reader = reader(csv_path)?;
    let headers = reader.headers().map_err(|e| err(1, e.to_string()))?.clone();
    let [emotion_col, pixels_col, usage_col] =
        columns(&headers, ["emotion", "pixels", "Usage"], false).map_err(|r| err(1, r))?;
    let cols = Columns {
        emotion: emotion_col.ok_or_else(|| err(1, "the header has no emotion column".into()))?,
        pixels: pixels_col.ok_or_else(|| err(1, "the header has no pixels column".into()))?,
        usage: usage_col,
    };
    let mut entries = Vec::new();
    let mut record = csv::StringRecord::new();
    loop {
        match reader.read_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => return Err(err(csv_error_line(&e), e.to_string())),
        }
        let pos = record
            .position()
            .expect("a record read from a file has a position")
            .clone();
        let line = pos.line();
        let label = parse_emotion(record.get(cols.emotion).unwrap_or("")).map_err(|r| err(line, r))?;
        parse_pixels(record.get(cols.pixels).unwrap_or("")).map_err(|r| err(line, r))?;
        let split = cols
            .usage
            .map(|c| parse_usage(record.get(c).unwrap_or("")))
            .transpose()
            .map_err(|r| err(line, r))?;
        entries.push(Entry {
            key: format!("{line:08}"),
            label,
            split,
            text: None,
            source: pos,
        });
    }
    if entries.is_empty() {
        return Err(err(1, "the CSV has no rows".into()));
    }
    Ok((cols, entries))
}

/// FER's emotion code as a Chorus class index.
fn parse_emotion(cell: &str) -> Result<u8, String> {
    match cell.parse::<usize>() {
        Ok(code) if code < FER2013_CLASSES.len() => Ok(emotion(FER2013_CLASSES[code].1)),
        _ => Err(format!(
            "emotion {cell:?} is not a FER2013 code 0 to 6 ({})",
            FER2013_CLASSES
                .iter()
                .enumerate()
                .map(|(i, (name, _))| format!("{i} {name}"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn parse_usage(cell: &str) -> Result<Split, String> {
    match cell.to_ascii_lowercase().as_str() {
        "training" => Ok(Split::Train),
        "publictest" => Ok(Split::Val),
        "privatetest" => Ok(Split::Test),
        _ => Err(format!("Usage {cell:?} is not Training, PublicTest or PrivateTest")),
    }
}

/// 2304 grey levels, 0 to 255, separated by whitespace.
fn parse_pixels(cell: &str) -> Result<Vec<u8>, String> {
    let mut pixels = Vec::with_capacity(FER_PIXELS);
    for (i, v) in cell.split_ascii_whitespace().enumerate() {
        let p = v
            .parse::<u8>()
            .map_err(|_| format!("pixel {} is {v:?}, not a grey level 0 to 255", i + 1))?;
        pixels.push(p);
    }
    if pixels.len() != FER_PIXELS {
        return Err(format!(
            "{} pixel values, expected {FER_PIXELS} ({FER_SIDE}x{FER_SIDE})",
            pixels.len()
        ));
    }
    Ok(pixels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_by_name() {
        let names: Vec<&str> = (0..7)
            .map(|c| crate::EMOTIONS[parse_emotion(&c.to_string()).unwrap() as usize])
            .collect();
        assert_eq!(
            names,
            [
                "anger",
                "disgust",
                "fear",
                "happiness",
                "sadness",
                "surprise",
                "neutral"
            ]
        );
        assert!(parse_emotion("7").unwrap_err().contains("0 to 6 (0 Angry, 1 Disgust"));
        assert!(parse_emotion("-1").is_err());
        assert_eq!(parse_usage("PublicTest"), Ok(Split::Val));
        assert!(
            parse_usage("Validation")
                .unwrap_err()
                .contains("not Training, PublicTest or PrivateTest")
        );
    }

    #[test]
    fn pixels_are_counted_and_bounded() {
        let row = vec!["7"; FER_PIXELS].join(" ");
        assert_eq!(parse_pixels(&row).unwrap(), vec![7u8; FER_PIXELS]);
        let short = vec!["7"; FER_PIXELS - 1].join(" ");
        assert_eq!(
            parse_pixels(&short).unwrap_err(),
            "2303 pixel values, expected 2304 (48x48)"
        );
        let e = parse_pixels(&format!("{short} 256")).unwrap_err();
        assert_eq!(e, "pixel 2304 is \"256\", not a grey level 0 to 255");
    }
}
