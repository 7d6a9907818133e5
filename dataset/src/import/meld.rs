//! `chorus dataset import meld`: MELD's utterance CSVs and their audio clips into a dataset of
//! text and voice.
//!
//! MELD ships one CSV per split (`train_sent_emo.csv`, `dev_sent_emo.csv`, `test_sent_emo.csv`)
//! with the columns `Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,
//! Episode,StartTime,EndTime`, and one clip per utterance. The importer takes one or more CSVs,
//! each with the directory of its clips (`DIR/dia{Dialogue_ID}_utt{Utterance_ID}.wav`, audio
//! extracted from MELD's MP4s at any rate, resampled to 16 kHz by [`crate::resample`]) and its
//! split: given, or told by the file name (`train...`, `dev...` or `val...`, `test...`).
//!
//! - **Columns** used: `Utterance` (the text), `Emotion` (the label, see [`MELD_CLASSES`]),
//!   `Dialogue_ID` and `Utterance_ID` (which clip); the others are ignored. Quoted fields may hold
//!   commas, quotes and line breaks.
//! - A row whose clip is missing is written as text only and counted: the format lets a sample
//!   lack a modality and the trainer masks it, and MELD's own release lacks a few clips. A row
//!   with neither text nor clip is left out and counted.
//! - A bad emotion or id is an error naming the CSV line. Sample keys are
//!   `{split}-dia{D}_utt{U}`; the same utterance twice in one split is an error.

use super::{Entry, ImportOptions, Imported, Media, Tally, columns, csv_error_line, emotion, emotion_classes};
use crate::convert::load_audio;
use crate::error::{DatasetError, Result};
use crate::manifest::Split;
use chorus_core::storage::Storage;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// MELD's emotions and the Chorus class each becomes.
pub const MELD_CLASSES: [(&str, &str); 7] = [
    ("anger", "anger"),
    ("disgust", "disgust"),
    ("fear", "fear"),
    ("joy", "happiness"),
    ("neutral", "neutral"),
    ("sadness", "sadness"),
    ("surprise", "surprise"),
];

/// One CSV of MELD and where its clips are.
#[derive(Debug, Clone)]
pub struct MeldPart {
    pub csv: PathBuf,
    pub audio_dir: PathBuf,
    /// `None`: told by the CSV's file name.
    pub split: Option<Split>,
}

#[derive(Debug, Clone)]
pub struct MeldOptions {
    pub parts: Vec<MeldPart>,
    pub import: ImportOptions,
}

/// Where a row's clip is.
#[derive(Debug, Clone)]
struct Clip {
    /// Index into `MeldOptions::parts`.
    part: usize,
    line: u64,
    audio: Option<PathBuf>,
}

/// Imports the CSVs and clips into a dataset under `storage`, manifest last.
pub async fn import_meld(storage: Storage, opts: &MeldOptions, replace: bool) -> Result<Imported> {
    opts.import.check()?;
    if opts.parts.is_empty() {
        return Err(DatasetError::InvalidArgument("give at least one --csv".into()));
    }
    let splits = opts
        .parts
        .iter()
        .map(|p| p.split.map_or_else(|| split_from_name(&p.csv), Ok))
        .collect::<Result<Vec<Split>>>()?;
    let mut scanned = Scanned::default();
    for (i, (part, split)) in opts.parts.iter().zip(&splits).enumerate() {
        if !part.audio_dir.is_dir() {
            return Err(DatasetError::Input {
                path: part.audio_dir.display().to_string(),
                reason: "is not a directory (the clips dia{Dialogue_ID}_utt{Utterance_ID}.wav go there)".into(),
            });
        }
        scanned.read(&opts.parts, i, *split)?;
    }
    let Scanned {
        entries,
        skipped,
        incomplete,
        ..
    } = scanned;
    if entries.is_empty() {
        return Err(DatasetError::InvalidArgument(
            "the CSVs hold no utterance with text or a clip".into(),
        ));
    }
    let csvs: Vec<String> = opts.parts.iter().map(|p| p.csv.display().to_string()).collect();
    let source = format!("chorus dataset import meld --csv {}", csvs.join(" --csv "));
    let manifest = super::write(
        storage,
        &opts.import,
        source,
        emotion_classes(),
        entries,
        replace,
        |e| {
            let clip: &Clip = &e.source;
            let audio = clip
                .audio
                .as_deref()
                .map(|p| load_audio(p).map_err(|r| format!("audio {}: {r}", p.display())))
                .transpose()
                .map_err(|reason| DatasetError::Csv {
                    path: csvs[clip.part].clone(),
                    line: clip.line,
                    reason,
                })?;
            Ok(Media { image: None, audio })
        },
    )
    .await?;
    Ok(Imported {
        manifest,
        skipped: skipped.into_map(),
        incomplete: incomplete.into_map(),
    })
}

/// MELD's file names start with the split: `train_sent_emo.csv`, `dev_sent_emo.csv`,
/// `test_sent_emo.csv`.
fn split_from_name(csv: &Path) -> Result<Split> {
    let name = csv
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if name.starts_with("train") {
        Ok(Split::Train)
    } else if name.starts_with("dev") || name.starts_with("val") {
        Ok(Split::Val)
    } else if name.starts_with("test") {
        Ok(Split::Test)
    } else {
        Err(DatasetError::InvalidArgument(format!(
            "cannot tell the split of {} from its name (train..., dev..., test...): give --split for each --csv",
            csv.display()
        )))
    }
}

/// The rows of the CSVs read so far.
#[derive(Default)]
struct Scanned {
    entries: Vec<Entry<Clip>>,
    /// Where each key was first seen: part and line.
    first_seen: HashMap<String, (usize, u64)>,
    skipped: Tally,
    incomplete: Tally,
}

impl Scanned {
    /// Checks every row of `parts[part_index]`, noting an entry for each.
    fn read(&mut self, parts: &[MeldPart], part_index: usize, split: Split) -> Result<()> {
        let part = &parts[part_index];
        let path = part.csv.display().to_string();
        let err = |line: u64, reason: String| DatasetError::Csv {
            path: path.clone(),
            line,
            reason,
        };
        let mut reader = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .from_reader(super::open(&part.csv)?);
        let headers = reader.headers().map_err(|e| err(1, e.to_string()))?.clone();
        let wanted = ["Utterance", "Emotion", "Dialogue_ID", "Utterance_ID"];
        let found = columns(&headers, wanted, true).map_err(|r| err(1, r))?;
        let mut cols = [0; 4];
        for ((c, f), name) in cols.iter_mut().zip(found).zip(wanted) {
            *c = f.ok_or_else(|| {
            err(
                1,
                format!("the header has no {name} column (MELD's columns include Utterance, Emotion, Dialogue_ID, Utterance_ID)"),
            )
        })?;
        }
        let [text_col, emotion_col, dialogue_col, utterance_col] = cols;
        let mut record = csv::StringRecord::new();
        loop {
            match reader.read_record(&mut record) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => return Err(err(csv_error_line(&e), e.to_string())),
            }
            let line = record.position().map_or(0, |p| p.line());
            let cell = |c: usize| record.get(c).unwrap_or("");
            let label = parse_emotion(cell(emotion_col)).map_err(|r| err(line, r))?;
            let id = |c: usize, what: &str| {
                cell(c)
                    .parse::<u64>()
                    .map_err(|_| err(line, format!("{what} {:?} is not a non-negative integer", cell(c))))
            };
            let (dialogue, utterance) = (id(dialogue_col, "Dialogue_ID")?, id(utterance_col, "Utterance_ID")?);
            let clip_name = format!("dia{dialogue}_utt{utterance}");
            let key = format!("{split}-{clip_name}");
            if let Some((first_part, first_line)) = self.first_seen.insert(key.clone(), (part_index, line)) {
                let first = &parts[first_part].csv;
                return Err(err(
                    line,
                    format!(
                        "{clip_name} is already in the {split} split ({} line {first_line})",
                        first.display()
                    ),
                ));
            }
            let wav = part.audio_dir.join(format!("{clip_name}.wav"));
            let audio = wav.is_file().then_some(wav);
            let text = Some(cell(text_col).to_string()).filter(|t| !t.is_empty());
            if audio.is_none() && text.is_none() {
                self.skipped.add("no utterance text and no clip");
                continue;
            }
            if audio.is_none() {
                self.incomplete
                    .add("no clip in the audio directory: written as text only");
            }
            self.entries.push(Entry {
                key,
                label,
                split: Some(split),
                text,
                source: Clip {
                    part: part_index,
                    line,
                    audio,
                },
            });
        }
        Ok(())
    }
}

fn parse_emotion(cell: &str) -> Result<u8, String> {
    let lower = cell.to_lowercase();
    MELD_CLASSES
        .iter()
        .find(|(meld, _)| *meld == lower)
        .map(|(_, chorus)| emotion(chorus))
        .ok_or_else(|| {
            let names: Vec<&str> = MELD_CLASSES.iter().map(|(m, _)| *m).collect();
            format!("emotion {cell:?} is not one of MELD's {}", names.join(", "))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emotions_and_splits() {
        assert_eq!(crate::EMOTIONS[parse_emotion("Joy").unwrap() as usize], "happiness");
        assert_eq!(crate::EMOTIONS[parse_emotion("neutral").unwrap() as usize], "neutral");
        let e = parse_emotion("love").unwrap_err();
        assert_eq!(
            e,
            "emotion \"love\" is not one of MELD's anger, disgust, fear, joy, neutral, sadness, surprise"
        );
        assert_eq!(split_from_name(Path::new("/m/dev_sent_emo.csv")).unwrap(), Split::Val);
        assert_eq!(split_from_name(Path::new("train_sent_emo.csv")).unwrap(), Split::Train);
        assert_eq!(split_from_name(Path::new("Test.csv")).unwrap(), Split::Test);
        let e = split_from_name(Path::new("meld.csv")).unwrap_err().to_string();
        assert!(e.contains("give --split"), "{e}");
    }
}
