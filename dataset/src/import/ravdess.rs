//! `chorus dataset import ravdess`: the RAVDESS audio files into a dataset of voices.
//!
//! RAVDESS names every file `MM-VC-EE-II-SS-RR-AA.wav`, seven two-digit fields: modality (01
//! full-AV, 02 video-only, 03 audio-only), vocal channel (01 speech, 02 song), emotion (01 to 08,
//! see [`RAVDESS_CLASSES`]), intensity (01 normal, 02 strong), statement (01, 02), repetition
//! (01, 02) and actor (01 to 24). The directory is walked recursively (the `Actor_NN` folders);
//! audio-only WAVs become samples, other files are counted and left out (hidden files and macOS's
//! `__MACOSX` folders without a count). A WAV whose name breaks the convention is an error naming
//! the file: it is a file of another corpus, or a renamed one, whose label cannot be trusted.
//!
//! - **Labels**: by emotion name; calm has no class of its own and becomes neutral, the class
//!   nearest to it (both are the absence of a marked emotion).
//! - **Splits** by actor, so no voice is in two splits: actors 21 and 22 are val, 23 and 24
//!   test, the others train (each pair one male and one female actor: odd numbers are male).
//! - **Text**: the statement the actor speaks or sings, from the statement field (see
//!   [`RAVDESS_STATEMENTS`]). Both statements occur with every emotion, so the text carries no
//!   class; it is there so a fusion model trains with all inputs present.
//! - **Audio**: 48 kHz 16-bit WAVs (mono or stereo) averaged to mono and resampled to 16 kHz by
//!   [`crate::resample`], read one file at a time as its shard fills.
//!
//! Sample keys are the file names without `.wav`; a name found twice in the tree is an error.

use super::{Entry, ImportOptions, Imported, Media, Tally, emotion, emotion_classes};
use crate::convert::load_audio;
use crate::error::{DatasetError, Result};
use crate::manifest::Split;
use chorus_core::storage::Storage;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// RAVDESS's emotion codes 01 to 08 (code = index + 1), and the Chorus class each becomes.
pub const RAVDESS_CLASSES: [(&str, &str); 8] = [
    ("neutral", "neutral"),
    ("calm", "neutral"),
    ("happy", "happiness"),
    ("sad", "sadness"),
    ("angry", "anger"),
    ("fearful", "fear"),
    ("disgust", "disgust"),
    ("surprised", "surprise"),
];

/// The two statements, by statement code 01 and 02.
pub const RAVDESS_STATEMENTS: [&str; 2] = ["Kids are talking by the door", "Dogs are sitting by the door"];

/// RAVDESS's actors are numbered 01 to this.
pub const RAVDESS_ACTORS: u8 = 24;

#[derive(Debug, Clone)]
pub struct RavdessOptions {
    /// The directory that holds the `Actor_NN` folders (or any tree of RAVDESS files).
    pub dir: PathBuf,
    /// Actors whose files form the val split (default 21, 22).
    pub val_actors: Vec<u8>,
    /// Actors whose files form the test split (default 23, 24).
    pub test_actors: Vec<u8>,
    /// Leave the sung files (vocal channel 02) out.
    pub speech_only: bool,
    pub import: ImportOptions,
}

impl RavdessOptions {
    pub const DEFAULT_VAL_ACTORS: [u8; 2] = [21, 22];
    pub const DEFAULT_TEST_ACTORS: [u8; 2] = [23, 24];
}

/// What a RAVDESS file name says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Name {
    modality: u8,
    song: bool,
    /// Index into [`RAVDESS_CLASSES`].
    emotion: usize,
    statement: usize,
    actor: u8,
}

/// Imports the tree under `opts.dir` into a dataset under `storage`, manifest last.
pub async fn import_ravdess(storage: Storage, opts: &RavdessOptions, replace: bool) -> Result<Imported> {
    opts.import.check()?;
    let split_of = actor_splits(&opts.val_actors, &opts.test_actors)?;
    let mut files = Vec::new();
    walk(&opts.dir, 0, &mut files)?;
    // Directory order differs between file systems; the seed's shuffle must not.
    files.sort();
    let mut skipped = Tally::default();
    let mut entries = Vec::new();
    let mut seen: HashMap<String, PathBuf> = HashMap::new();
    for path in files {
        let is_wav = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("wav"));
        if !is_wav {
            skipped.add("not a .wav file");
            continue;
        }
        let bad = |reason: String| DatasetError::Input {
            path: path.display().to_string(),
            reason,
        };
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let name = parse_name(&stem).map_err(bad)?;
        if name.modality != 3 {
            skipped.add("not audio-only (modality 01 full-AV or 02 video-only)");
            continue;
        }
        if name.song && opts.speech_only {
            skipped.add("song (vocal channel 02), left out by --speech-only");
            continue;
        }
        if let Some(first) = seen.insert(stem.clone(), path.clone()) {
            return Err(bad(format!("{stem} is also at {}", first.display())));
        }
        entries.push(Entry {
            key: stem,
            label: emotion(RAVDESS_CLASSES[name.emotion].1),
            split: Some(split_of[name.actor as usize]),
            text: Some(RAVDESS_STATEMENTS[name.statement].to_string()),
            source: path,
        });
    }
    if entries.is_empty() {
        let others = skipped.total();
        return Err(DatasetError::Input {
            path: opts.dir.display().to_string(),
            reason: format!("holds no audio-only RAVDESS .wav files ({others} other files)"),
        });
    }
    let source = format!("chorus dataset import ravdess --dir {}", opts.dir.display());
    let manifest = super::write(
        storage,
        &opts.import,
        source,
        emotion_classes(),
        entries,
        replace,
        |e| {
            let audio = load_audio(&e.source).map_err(|reason| DatasetError::Input {
                path: e.source.display().to_string(),
                reason,
            })?;
            Ok(Media {
                image: None,
                audio: Some(audio),
            })
        },
    )
    .await?;
    Ok(Imported {
        manifest,
        skipped: skipped.into_map(),
        incomplete: Tally::default().into_map(),
    })
}

/// The split of each actor, indexed by actor number (index 0 unused).
fn actor_splits(val: &[u8], test: &[u8]) -> Result<[Split; RAVDESS_ACTORS as usize + 1]> {
    let mut splits = [Split::Train; RAVDESS_ACTORS as usize + 1];
    for (flag, actors, split) in [("--val-actors", val, Split::Val), ("--test-actors", test, Split::Test)] {
        for &a in actors {
            if !(1..=RAVDESS_ACTORS).contains(&a) {
                return Err(DatasetError::InvalidArgument(format!(
                    "{flag}: actor {a} is not 1 to {RAVDESS_ACTORS}"
                )));
            }
            if splits[a as usize] != Split::Train {
                return Err(DatasetError::InvalidArgument(format!(
                    "actor {a} is given to two splits: one speaker must stay in one split"
                )));
            }
            splits[a as usize] = split;
        }
    }
    Ok(splits)
}

/// Folders nested deeper than this are refused: RAVDESS is two levels deep, and links are
/// followed, so a link to a folder above itself would otherwise recurse without end.
const MAX_DEPTH: usize = 16;

/// Every file under `dir`, recursively, except hidden ones and `__MACOSX` folders (the
/// resource forks a macOS zip adds, named like the WAVs but holding no audio).
fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(DatasetError::Input {
            path: dir.display().to_string(),
            reason: format!("is nested more than {MAX_DEPTH} folders deep (a link to a folder above it?)"),
        });
    }
    let io = |e: std::io::Error| DatasetError::Io {
        path: dir.display().to_string(),
        source: e,
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name == "__MACOSX" {
            continue;
        }
        let path = entry.path();
        // Follows links, so a tree assembled from links to the download works.
        let meta = std::fs::metadata(&path).map_err(|e| DatasetError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        if meta.is_dir() {
            walk(&path, depth + 1, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// `MM-VC-EE-II-SS-RR-AA`, every field checked.
fn parse_name(stem: &str) -> Result<Name, String> {
    let fields: Vec<&str> = stem.split('-').collect();
    if fields.len() != 7
        || fields
            .iter()
            .any(|f| f.len() != 2 || !f.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("the name is not RAVDESS's MM-VC-EE-II-SS-RR-AA.wav (seven two-digit fields)".into());
    }
    let n: Vec<u8> = fields.iter().map(|f| f.parse().expect("two digits")).collect();
    let check = |i: usize, what: &str, max: u8, names: &str| {
        if (1..=max).contains(&n[i]) {
            Ok(n[i])
        } else {
            Err(format!("{what} {} is not 01 to {max:02} ({names})", fields[i]))
        }
    };
    let modality = check(0, "modality", 3, "01 full-AV, 02 video-only, 03 audio-only")?;
    let channel = check(1, "vocal channel", 2, "01 speech, 02 song")?;
    let emotions = RAVDESS_CLASSES
        .iter()
        .enumerate()
        .map(|(i, (name, _))| format!("{:02} {name}", i + 1))
        .collect::<Vec<_>>()
        .join(", ");
    let emotion = check(2, "emotion", 8, &emotions)?;
    check(3, "intensity", 2, "01 normal, 02 strong")?;
    let statement = check(4, "statement", 2, "01 kids, 02 dogs")?;
    check(5, "repetition", 2, "01, 02")?;
    let actor = check(6, "actor", RAVDESS_ACTORS, "01 to 24")?;
    Ok(Name {
        modality,
        song: channel == 2,
        emotion: emotion as usize - 1,
        statement: statement as usize - 1,
        actor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_say_what_is_wrong() {
        let n = parse_name("03-01-05-02-01-02-12").unwrap();
        assert_eq!(
            n,
            Name {
                modality: 3,
                song: false,
                emotion: 4,
                statement: 0,
                actor: 12
            }
        );
        assert_eq!(RAVDESS_CLASSES[n.emotion].1, "anger");
        assert!(parse_name("03-02-02-01-02-01-01").unwrap().song);
        let e = parse_name("03-01-09-01-01-01-01").unwrap_err();
        assert!(e.starts_with("emotion 09 is not 01 to 08 (01 neutral, 02 calm,"), "{e}");
        let e = parse_name("03-01-01-01-01-01-25").unwrap_err();
        assert!(e.starts_with("actor 25 is not 01 to 24"), "{e}");
        assert!(
            parse_name("03-01-01-01-01-01")
                .unwrap_err()
                .contains("seven two-digit fields")
        );
        assert!(parse_name("03-01-01-01-01-01-1a").is_err());
        assert!(
            parse_name("00-01-01-01-01-01-01")
                .unwrap_err()
                .starts_with("modality 00")
        );
    }

    #[test]
    fn actors_stay_in_one_split() {
        let s = actor_splits(&[21, 22], &[23, 24]).unwrap();
        assert_eq!(
            (s[1], s[20], s[21], s[24]),
            (Split::Train, Split::Train, Split::Val, Split::Test)
        );
        let e = actor_splits(&[3], &[3]).unwrap_err().to_string();
        assert!(e.contains("actor 3 is given to two splits"), "{e}");
        assert!(
            actor_splits(&[0], &[])
                .unwrap_err()
                .to_string()
                .contains("--val-actors: actor 0")
        );
    }
}
