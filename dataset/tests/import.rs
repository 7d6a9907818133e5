//! The corpus importers end to end: tiny corpora in their published formats (FER2013's CSV, a
//! RAVDESS tree of 48 kHz stereo WAVs, MELD's CSVs and clips), made here, imported to `memory://`
//! storage and read back through the dataset's own reader.

use chorus_core::storage::{Storage, StorageUri, open};
use chorus_dataset::*;
use std::collections::BTreeMap;
use std::f64::consts::PI;
use std::path::Path;

fn storage(name: &str) -> Storage {
    open(
        &StorageUri::parse(&format!("memory://{name}/datasets/emo")).unwrap(),
        &Default::default(),
    )
    .unwrap()
}

fn options(name: &str) -> ImportOptions {
    ImportOptions {
        name: name.into(),
        shards: None,
        seed: 1,
        val_fraction: 0.1,
        test_fraction: 0.1,
        max_vocabulary: 1000,
    }
}

/// Every sample of the dataset, by key, with the split of its shard.
async fn read_back(storage: &Storage) -> (Manifest, BTreeMap<String, (Split, Sample)>) {
    let manifest = read_manifest(storage).await.unwrap();
    let mut out = BTreeMap::new();
    for shard in &manifest.shards {
        let bytes = fetch_shard(storage, shard).await.unwrap();
        for s in parse_shard(&shard.key, &bytes, &manifest).unwrap() {
            assert!(out.insert(s.key.clone(), (shard.split, s)).is_none(), "keys are unique");
        }
    }
    (manifest, out)
}

fn class(name: &str) -> u8 {
    EMOTIONS.iter().position(|e| *e == name).unwrap() as u8
}

async fn nothing_committed(storage: &Storage) {
    assert!(matches!(
        read_manifest(storage).await,
        Err(DatasetError::NoManifest { .. })
    ));
}

// FER2013

fn fer_pixels(seed: usize) -> Vec<u8> {
    (0..48 * 48).map(|i| ((i * seed + seed) % 256) as u8).collect()
}

fn fer_row(emotion: u8, pixels: &[u8], usage: &str) -> String {
    let cells: Vec<String> = pixels.iter().map(u8::to_string).collect();
    format!("{emotion},{},{usage}\n", cells.join(" "))
}

#[tokio::test]
async fn fer2013_rows_become_faces_with_their_split_and_class() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("fer2013.csv");
    let rows = [
        (0, "Training"),
        (3, "Training"),
        (6, "PublicTest"),
        (5, "PrivateTest"),
        (2, "Training"),
        (1, "PrivateTest"),
    ];
    let mut text = String::from("emotion,pixels,Usage\n");
    for (i, (emotion, usage)) in rows.iter().enumerate() {
        text.push_str(&fer_row(*emotion, &fer_pixels(i + 1), usage));
    }
    std::fs::write(&csv, text).unwrap();
    let st = storage("fer");
    let opts = Fer2013Options {
        csv: csv.clone(),
        import: options("fer"),
    };
    let imported = import_fer2013(st.clone(), &opts, false).await.unwrap();
    assert!(imported.skipped.is_empty() && imported.incomplete.is_empty());
    let (manifest, samples) = read_back(&st).await;
    assert_eq!(imported.manifest, manifest);
    assert_eq!(manifest.classes, EMOTIONS);
    assert_eq!(
        (manifest.splits.train, manifest.splits.val, manifest.splits.test),
        (3, 1, 2)
    );
    assert_eq!(
        manifest.modalities(),
        ModalityCounts {
            image: 6,
            audio: 0,
            text: 0
        }
    );
    let want = [
        ("00000002", Split::Train, "anger"),
        ("00000003", Split::Train, "happiness"),
        ("00000004", Split::Val, "neutral"),
        ("00000005", Split::Test, "surprise"),
        ("00000006", Split::Train, "fear"),
        ("00000007", Split::Test, "disgust"),
    ];
    for (i, (key, split, name)) in want.into_iter().enumerate() {
        let (got_split, s) = &samples[key];
        assert_eq!((*got_split, s.label), (split, class(name)), "{key}");
        assert_eq!(
            s.image.as_deref(),
            Some(&fer_pixels(i + 1)[..]),
            "{key}: pixels as in the CSV"
        );
        assert!(s.audio.is_none() && s.text.is_none());
    }
}

#[tokio::test]
async fn fer2013_without_usage_is_split_by_the_fractions() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("train.csv");
    let mut text = String::from("emotion,pixels\n");
    for i in 0..10 {
        text.push_str(&format!("{},{}\n", i % 7, vec!["9"; 2304].join(" ")));
    }
    std::fs::write(&csv, text).unwrap();
    let st = storage("fer-nousage");
    let mut import = options("fer");
    import.val_fraction = 0.2;
    let m = import_fer2013(st.clone(), &Fer2013Options { csv, import }, false)
        .await
        .unwrap()
        .manifest;
    assert_eq!((m.splits.train, m.splits.val, m.splits.test), (7, 2, 1));
}

#[tokio::test]
async fn fer2013_bad_rows_name_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("fer2013.csv");
    let good = fer_row(0, &fer_pixels(1), "Training");
    let st = storage("fer-bad");
    let run = |text: String| {
        std::fs::write(&csv, text).unwrap();
        let opts = Fer2013Options {
            csv: csv.clone(),
            import: options("fer"),
        };
        let st = st.clone();
        async move { import_fer2013(st, &opts, false).await.unwrap_err() }
    };
    let short = fer_row(4, &fer_pixels(2)[..2303], "Training");
    let e = run(format!("emotion,pixels,Usage\n{good}{good}{short}")).await;
    assert!(matches!(e, DatasetError::Csv { line: 4, .. }), "{e:?}");
    assert!(
        e.to_string()
            .ends_with("fer2013.csv line 4: 2303 pixel values, expected 2304 (48x48)"),
        "{e}"
    );
    let e = run(format!(
        "emotion,pixels,Usage\n{good}{}",
        fer_row(7, &fer_pixels(1), "Training")
    ))
    .await
    .to_string();
    assert!(e.contains("line 3: emotion \"7\" is not a FER2013 code 0 to 6"), "{e}");
    let e = run(format!(
        "emotion,pixels,Usage\n{}",
        fer_row(1, &fer_pixels(1), "Holdout")
    ))
    .await
    .to_string();
    assert!(
        e.contains("line 2: Usage \"Holdout\" is not Training, PublicTest or PrivateTest"),
        "{e}"
    );
    let e = run(format!("emotion,pixels,Usage,extra\n{good}")).await.to_string();
    assert!(e.contains("line 1: unknown column \"extra\""), "{e}");
    let e = run(format!("pixels,Usage\n{good}")).await.to_string();
    assert!(e.contains("line 1: the header has no emotion column"), "{e}");
    nothing_committed(&st).await;
}

// RAVDESS

/// A 48 kHz 16-bit stereo WAV: a 1 kHz tone at `left` and `right` amplitudes.
fn write_stereo_wav(path: &Path, frames: usize, left: f64, right: f64) {
    let spec = hound::WavSpec {
        channels: 2,
        sample_rate: 48_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for i in 0..frames {
        let s = (2.0 * PI * 1000.0 * i as f64 / 48_000.0).sin() * 32767.0;
        w.write_sample((s * left) as i16).unwrap();
        w.write_sample((s * right) as i16).unwrap();
    }
    w.finalize().unwrap();
}

fn ravdess_options(dir: &Path, speech_only: bool) -> RavdessOptions {
    RavdessOptions {
        dir: dir.to_path_buf(),
        val_actors: RavdessOptions::DEFAULT_VAL_ACTORS.to_vec(),
        test_actors: RavdessOptions::DEFAULT_TEST_ACTORS.to_vec(),
        speech_only,
        import: options("ravdess"),
    }
}

fn ravdess_tree(root: &Path) {
    let wav = |rel: &str, frames: usize| write_stereo_wav(&root.join(rel), frames, 0.5, 0.3);
    wav("Actor_01/03-01-05-01-01-01-01.wav", 24_000); // angry, kids, train
    wav("Actor_01/03-01-02-02-02-01-01.wav", 36_000); // calm, dogs, train
    wav("Actor_01/03-02-03-01-01-02-01.wav", 12_345); // happy song, train
    wav("Actor_01/02-01-05-01-01-01-01.wav", 4_800); // video-only: left out
    std::fs::write(root.join("Actor_01/01-01-05-01-01-01-01.mp4"), b"not audio").unwrap();
    wav("Actor_21/03-01-08-01-01-01-21.wav", 24_000); // surprised, val
    wav("Actor_23/03-01-07-02-02-02-23.wav", 24_000); // disgust, test
    std::fs::write(root.join(".DS_Store"), b"x").unwrap();
    std::fs::create_dir_all(root.join("__MACOSX/Actor_01")).unwrap();
    std::fs::write(root.join("__MACOSX/Actor_01/._03-01-05-01-01-01-01.wav"), b"fork").unwrap();
}

fn rms(x: &[f32]) -> f64 {
    (x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / x.len() as f64).sqrt()
}

#[tokio::test]
async fn ravdess_files_become_voices_split_by_actor() {
    let dir = tempfile::tempdir().unwrap();
    ravdess_tree(dir.path());
    let st = storage("ravdess");
    let imported = import_ravdess(st.clone(), &ravdess_options(dir.path(), false), false)
        .await
        .unwrap();
    assert_eq!(
        imported.skipped,
        BTreeMap::from([
            ("not a .wav file".to_string(), 1),
            ("not audio-only (modality 01 full-AV or 02 video-only)".to_string(), 1)
        ])
    );
    let (manifest, samples) = read_back(&st).await;
    assert_eq!(
        (manifest.splits.train, manifest.splits.val, manifest.splits.test),
        (3, 1, 1)
    );
    assert_eq!(
        manifest.modalities(),
        ModalityCounts {
            image: 0,
            audio: 5,
            text: 5
        }
    );
    let want = [
        (
            "03-01-05-01-01-01-01",
            Split::Train,
            "anger",
            "Kids are talking by the door",
            8_000,
        ),
        (
            "03-01-02-02-02-01-01",
            Split::Train,
            "neutral",
            "Dogs are sitting by the door",
            12_000,
        ),
        (
            "03-02-03-01-01-02-01",
            Split::Train,
            "happiness",
            "Kids are talking by the door",
            4_115,
        ),
        (
            "03-01-08-01-01-01-21",
            Split::Val,
            "surprise",
            "Kids are talking by the door",
            8_000,
        ),
        (
            "03-01-07-02-02-02-23",
            Split::Test,
            "disgust",
            "Dogs are sitting by the door",
            8_000,
        ),
    ];
    for (key, split, name, text, len) in want {
        let (got_split, s) = &samples[key];
        assert_eq!((*got_split, s.label), (split, class(name)), "{key}");
        assert_eq!(s.text.as_deref(), Some(text), "{key}");
        assert!(s.image.is_none());
        let audio = s.audio.as_ref().unwrap();
        assert_eq!(audio.len(), len, "{key}: 48 kHz frames * 16000 / 48000");
        // Channels averaged: (0.5 + 0.3) / 2 = 0.4, a sine's RMS being amplitude / sqrt 2; the
        // 1 kHz tone passes the anti-alias filter unchanged.
        let db = 20.0 * (rms(&audio[400..len - 400]) / (0.4 / 2f64.sqrt())).log10();
        assert!(db.abs() < 0.1, "{key}: {db:.2} dB");
    }
    // The vocabulary holds the train statements' words.
    assert!(manifest.vocabulary.id("kids").is_some() && manifest.vocabulary.id("dogs").is_some());

    let st = storage("ravdess-speech");
    let imported = import_ravdess(st.clone(), &ravdess_options(dir.path(), true), false)
        .await
        .unwrap();
    assert_eq!(
        imported.skipped["song (vocal channel 02), left out by --speech-only"],
        1
    );
    assert_eq!(imported.manifest.splits.train, 2);
}

#[tokio::test]
async fn ravdess_names_that_break_the_convention_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    ravdess_tree(dir.path());
    let bad = dir.path().join("Actor_02/03-01-09-01-01-01-02.wav");
    write_stereo_wav(&bad, 480, 0.5, 0.5);
    let st = storage("ravdess-bad");
    let e = import_ravdess(st.clone(), &ravdess_options(dir.path(), false), false)
        .await
        .unwrap_err();
    assert!(matches!(e, DatasetError::Input { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!(
            "{}: emotion 09 is not 01 to 08 (01 neutral, 02 calm, 03 happy, 04 sad, 05 angry, 06 fearful, 07 disgust, 08 surprised)",
            bad.display()
        )
    );
    std::fs::remove_file(&bad).unwrap();
    let twice = dir.path().join("elsewhere/03-01-05-01-01-01-01.wav");
    write_stereo_wav(&twice, 480, 0.5, 0.5);
    let e = import_ravdess(st.clone(), &ravdess_options(dir.path(), false), false)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("03-01-05-01-01-01-01 is also at"), "{e}");
    std::fs::remove_file(&twice).unwrap();
    // A WAV that is not a WAV is caught when its shard is written, and nothing is committed.
    std::fs::write(dir.path().join("Actor_23/03-01-01-01-01-01-23.wav"), b"RIFF junk").unwrap();
    let e = import_ravdess(st.clone(), &ravdess_options(dir.path(), false), false)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("03-01-01-01-01-01-23.wav: "), "{e}");
    nothing_committed(&st).await;
    let empty = tempfile::tempdir().unwrap();
    let e = import_ravdess(st.clone(), &ravdess_options(empty.path(), false), false)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.ends_with("holds no audio-only RAVDESS .wav files (0 other files)"),
        "{e}"
    );
    // Links are followed, and a link to a folder above itself is caught.
    #[cfg(unix)]
    {
        let looped = tempfile::tempdir().unwrap();
        ravdess_tree(looped.path());
        std::os::unix::fs::symlink(looped.path(), looped.path().join("Actor_01/up")).unwrap();
        let e = import_ravdess(st.clone(), &ravdess_options(looped.path(), false), false)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("is nested more than 16 folders deep"), "{e}");
    }
}

// MELD

const MELD_HEADER: &str =
    "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n";

fn write_mono_wav(path: &Path, rate: u32, frames: usize) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for i in 0..frames {
        let s = (2.0 * PI * 440.0 * i as f64 / f64::from(rate)).sin() * 10_000.0;
        w.write_sample(s as i16).unwrap();
    }
    w.finalize().unwrap();
}

fn meld_corpus(root: &Path) -> Vec<MeldPart> {
    let train = format!(
        "{MELD_HEADER}\
         1,\"Oh my God, he's lost it. He's totally lost it.\",Phoebe,sadness,negative,0,0,4,7,\"00:20:57,256\",\"00:21:00,049\"\n\
         2,\"Wait, \"\"what\"\"?\nNo way!\",Joey,surprise,positive,0,1,4,7,\"00:21:00,100\",\"00:21:02,000\"\n\
         3,Yay! Pizza!,Monica,joy,positive,1,0,2,3,\"00:01:00,000\",\"00:01:02,000\"\n\
         4,,Ross,neutral,neutral,1,1,2,3,\"00:01:03,000\",\"00:01:04,000\"\n"
    );
    let dev = format!(
        "{MELD_HEADER}1,I am so angry right now,Ross,anger,negative,0,0,1,1,\"00:00:01,000\",\"00:00:02,000\"\n"
    );
    std::fs::write(root.join("train_sent_emo.csv"), train).unwrap();
    std::fs::write(root.join("dev_sent_emo.csv"), dev).unwrap();
    write_mono_wav(&root.join("train_wav/dia0_utt0.wav"), 44_100, 22_050);
    write_mono_wav(&root.join("train_wav/dia0_utt1.wav"), 22_050, 11_025);
    // dia1_utt0 has no clip; dia1_utt1 has a clip but no text.
    write_mono_wav(&root.join("train_wav/dia1_utt1.wav"), 16_000, 3_200);
    write_mono_wav(&root.join("dev_wav/dia0_utt0.wav"), 48_000, 4_800);
    vec![
        MeldPart {
            csv: root.join("train_sent_emo.csv"),
            audio_dir: root.join("train_wav"),
            split: None,
        },
        MeldPart {
            csv: root.join("dev_sent_emo.csv"),
            audio_dir: root.join("dev_wav"),
            split: None,
        },
    ]
}

#[tokio::test]
async fn meld_utterances_keep_their_text_clip_and_class() {
    let dir = tempfile::tempdir().unwrap();
    let parts = meld_corpus(dir.path());
    let st = storage("meld");
    let opts = MeldOptions {
        parts,
        import: options("meld"),
    };
    let imported = import_meld(st.clone(), &opts, false).await.unwrap();
    assert_eq!(
        imported.incomplete,
        BTreeMap::from([("no clip in the audio directory: written as text only".to_string(), 1)])
    );
    assert!(imported.skipped.is_empty());
    let (manifest, samples) = read_back(&st).await;
    assert_eq!(
        (manifest.splits.train, manifest.splits.val, manifest.splits.test),
        (4, 1, 0)
    );
    let s = |key: &str| &samples[key];
    let (split, a) = s("train-dia0_utt0");
    assert_eq!((*split, a.label), (Split::Train, class("sadness")));
    assert_eq!(
        a.text.as_deref(),
        Some("Oh my God, he's lost it. He's totally lost it.")
    );
    assert_eq!(a.audio.as_ref().unwrap().len(), 8_000, "0.5 s at 44.1 kHz");
    let (_, b) = s("train-dia0_utt1");
    assert_eq!(b.label, class("surprise"));
    assert_eq!(b.text.as_deref(), Some("Wait, \"what\"?\nNo way!"));
    assert_eq!(b.audio.as_ref().unwrap().len(), 8_000, "0.5 s at 22.05 kHz");
    let (_, c) = s("train-dia1_utt0");
    assert_eq!((c.label, c.audio.is_none()), (class("happiness"), true));
    assert_eq!(c.text.as_deref(), Some("Yay! Pizza!"));
    let (_, d) = s("train-dia1_utt1");
    assert_eq!((d.label, d.text.is_none()), (class("neutral"), true));
    assert_eq!(d.audio.as_ref().unwrap().len(), 3_200);
    let (split, e) = s("val-dia0_utt0");
    assert_eq!((*split, e.label), (Split::Val, class("anger")));
    assert_eq!(e.audio.as_ref().unwrap().len(), 1_600, "0.1 s at 48 kHz");
    // The vocabulary is the train split's words: "angry" is only in dev.
    let v = &manifest.vocabulary;
    assert!(v.id("lost").is_some() && v.id("pizza").is_some() && v.id("what").is_some());
    assert_eq!(v.id("angry"), None);
}

#[tokio::test]
async fn meld_bad_rows_name_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut parts = meld_corpus(dir.path());
    let st = storage("meld-bad");
    let run = |parts: Vec<MeldPart>| {
        let st = st.clone();
        async move {
            let opts = MeldOptions {
                parts,
                import: options("meld"),
            };
            import_meld(st, &opts, false).await.unwrap_err().to_string()
        }
    };
    let csv = dir.path().join("train_sent_emo.csv");
    let good = std::fs::read_to_string(&csv).unwrap();
    // Line 7: the second row's line break pushes every later row down one line.
    std::fs::write(
        &csv,
        format!("{good}5,\"Love, love\",Rachel,love,positive,2,0,1,1,a,b\n"),
    )
    .unwrap();
    let e = run(parts.clone()).await;
    assert!(
        e.ends_with(
            "train_sent_emo.csv line 7: emotion \"love\" is not one of MELD's anger, disgust, fear, joy, neutral, sadness, surprise"
        ),
        "{e}"
    );
    std::fs::write(&csv, format!("{good}5,Hi,Rachel,joy,positive,x,0,1,1,a,b\n")).unwrap();
    let e = run(parts.clone()).await;
    assert!(
        e.ends_with("line 7: Dialogue_ID \"x\" is not a non-negative integer"),
        "{e}"
    );
    std::fs::write(&csv, format!("{good}5,Again,Rachel,joy,positive,0,1,1,1,a,b\n")).unwrap();
    let e = run(parts.clone()).await;
    assert!(
        e.contains("line 7: dia0_utt1 is already in the train split (") && e.ends_with("line 3)"),
        "{e}"
    );
    std::fs::write(&csv, good.replace("Emotion", "Feeling")).unwrap();
    let e = run(parts.clone()).await;
    assert!(e.contains("line 1: the header has no Emotion column"), "{e}");
    std::fs::write(&csv, &good).unwrap();
    parts[1].csv = dir.path().join("meld.csv");
    std::fs::copy(dir.path().join("dev_sent_emo.csv"), &parts[1].csv).unwrap();
    let e = run(parts.clone()).await;
    assert!(
        e.contains("cannot tell the split of") && e.contains("give --split"),
        "{e}"
    );
    parts[1].split = Some(Split::Test);
    parts[1].audio_dir = dir.path().join("no-such-dir");
    let e = run(parts.clone()).await;
    assert!(e.contains("no-such-dir: is not a directory"), "{e}");
    nothing_committed(&st).await;
}
