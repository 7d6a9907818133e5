//! `chorus dataset` as a user runs it: the real binary writing to and reading from a `file://`
//! directory, with PNG and WAV files this test makes itself.

use chorus_core::storage::{StorageUri, open};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

fn chorus(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(args)
        .env_remove("CHORUS_S3_ENDPOINT")
        .output()
        .expect("the chorus binary runs")
}

fn ok(args: &[&str]) -> String {
    let out = chorus(args);
    assert!(
        out.status.success(),
        "chorus {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str], code: i32) -> String {
    let out = chorus(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "chorus {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stderr).unwrap()
}

fn uri(dir: &Path) -> String {
    StorageUri::from_dir(dir).unwrap().as_str().to_string()
}

#[test]
fn synth_then_inspect() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("emo");
    let out = uri(&dir);
    let summary = ok(&[
        "dataset",
        "synth",
        "--out",
        &out,
        "--samples",
        "140",
        "--shards",
        "4",
        "--seed",
        "3",
    ]);
    assert!(summary.contains("samples:    140 in 4 shards"), "{summary}");
    assert!(dir.join("manifest.json").is_file());
    assert!(dir.join("shard-00003.tar").is_file());

    let j: Value = serde_json::from_str(&ok(&["dataset", "inspect", &out, "--output", "json"])).unwrap();
    assert_eq!(j["name"], "emo");
    assert_eq!(j["samples"], 140);
    assert_eq!(j["splits"]["train"]["samples"], 112);
    assert_eq!(j["splits"]["val"]["samples"], 14);
    assert_eq!(j["splits"]["test"]["samples"], 14);
    assert_eq!(j["shards"].as_array().unwrap().len(), 4);
    let classes = j["classes"].as_array().unwrap();
    let names: Vec<&str> = classes.iter().map(|c| c["name"].as_str().unwrap()).collect();
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
    assert!(classes.iter().all(|c| c["total"] == 20), "{classes:?}");
    for m in ["image", "audio", "text"] {
        let n = j["modalities"][m].as_u64().unwrap();
        assert!((120..=140).contains(&n), "{m}: {n}");
    }
    let on_disk: u64 = (0..4)
        .map(|i| std::fs::metadata(dir.join(format!("shard-{i:05}.tar"))).unwrap().len())
        .sum();
    assert_eq!(j["bytes"], on_disk);

    // Same seed, same bytes; an existing dataset is only replaced with --force.
    let err = fails(
        &[
            "dataset",
            "synth",
            "--out",
            &out,
            "--samples",
            "140",
            "--shards",
            "4",
            "--seed",
            "3",
        ],
        1,
    );
    assert!(err.contains("already exists") && err.contains("--force"), "{err}");
    let before = std::fs::read(dir.join("manifest.json")).unwrap();
    ok(&[
        "dataset",
        "synth",
        "--out",
        &out,
        "--samples",
        "140",
        "--shards",
        "4",
        "--seed",
        "3",
        "--force",
    ]);
    assert_eq!(std::fs::read(dir.join("manifest.json")).unwrap(), before);

    let j: Value = serde_json::from_str(&ok(&["dataset", "inspect", &out, "--verify", "-o", "json"])).unwrap();
    assert_eq!(j["verified"], true);

    // A flipped byte in a shard: --verify names it and exits 1.
    let shard = dir.join("shard-00001.tar");
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x40;
    std::fs::write(&shard, bytes).unwrap();
    let err = fails(&["dataset", "inspect", &out, "--verify"], 1);
    assert!(err.contains("error: shard shard-00001.tar: checksum mismatch"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn usage_errors_exit_2_and_missing_datasets_1() {
    let tmp = tempfile::tempdir().unwrap();
    let out = uri(&tmp.path().join("x"));
    let err = fails(
        &["dataset", "synth", "--out", &out, "--samples", "50", "--shards", "2"],
        2,
    );
    assert!(err.contains("2 shard(s) cannot hold 3 non-empty splits"), "{err}");
    let err = fails(
        &[
            "dataset",
            "synth",
            "--out",
            &out,
            "--samples",
            "50",
            "--shards",
            "3",
            "--val-fraction",
            "0.95",
        ],
        2,
    );
    assert!(err.contains("add up to at most 1"), "{err}");
    let err = fails(
        &[
            "dataset",
            "synth",
            "--out",
            "ftp://x/y",
            "--samples",
            "5",
            "--shards",
            "1",
        ],
        2,
    );
    assert!(err.contains("unsupported scheme"), "{err}");
    let missing = uri(&tmp.path().join("nothing-here"));
    let err = fails(&["dataset", "inspect", &missing], 1);
    assert!(err.contains("no dataset at") && err.contains("nothing-here"), "{err}");
    assert!(
        !tmp.path().join("nothing-here").exists(),
        "inspect must not create directories"
    );
}

fn write_png(path: &Path, w: u32, h: u32, rgb: bool) {
    if rgb {
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 3) as u8, (y * 2) as u8, 200]))
            .save(path)
            .unwrap();
    } else {
        image::GrayImage::from_fn(w, h, |x, y| image::Luma([(x + y) as u8]))
            .save(path)
            .unwrap();
    }
}

fn write_wav(path: &Path, rate: u32, channels: u16, secs: f32) {
    let spec = hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for i in 0..(rate as f32 * secs) as usize {
        let v = ((i as f32 * 440.0 * 2.0 * std::f32::consts::PI / rate as f32).sin() * 12000.0) as i16;
        for _ in 0..channels {
            w.write_sample(v).unwrap();
        }
    }
    w.finalize().unwrap();
}

#[test]
fn pack_a_csv_of_real_files() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("corpus");
    std::fs::create_dir_all(src.join("faces")).unwrap();
    std::fs::create_dir_all(src.join("clips")).unwrap();
    write_png(&src.join("faces/a.png"), 48, 48, false);
    write_png(&src.join("faces/b.png"), 120, 80, true);
    write_png(&src.join("faces/c.png"), 64, 64, false);
    write_wav(&src.join("clips/a.wav"), 16_000, 1, 0.5);
    write_wav(&src.join("clips/b.wav"), 44_100, 2, 0.25);
    write_wav(&src.join("clips/c.wav"), 8_000, 1, 1.0);
    let abs_c = src.join("clips/c.wav");
    let csv = format!(
        "image,audio,text,label,split\n\
         faces/a.png,clips/a.wav,\"I am furious, really\",anger,train\n\
         faces/b.png,clips/b.wav,What a lovely day,Happiness,train\n\
         ,{},so sad today,4,train\n\
         faces/c.png,,,neutral,val\n\
         ,,\"just text, no files\",surprise,\n",
        abs_c.display()
    );
    std::fs::write(src.join("data.csv"), csv).unwrap();
    let out_dir = tmp.path().join("packed");
    let out = uri(&out_dir);
    let csv_path = src.join("data.csv");
    let csv_arg = csv_path.to_str().unwrap();
    let j: Value = serde_json::from_str(&ok(&[
        "dataset", "pack", "--csv", csv_arg, "--out", &out, "--shards", "2", "--seed", "1", "-o", "json",
    ]))
    .unwrap();
    assert_eq!(j["samples"], 5);
    // The unsplit row goes by the fractions: 10% of one row rounds to none, so train.
    assert_eq!(j["splits"]["train"]["samples"], 4);
    assert_eq!(j["splits"]["val"]["samples"], 1);
    assert_eq!(j["modalities"], serde_json::json!({"image": 3, "audio": 3, "text": 4}));
    let totals: Vec<u64> = j["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["total"].as_u64().unwrap())
        .collect();
    assert_eq!(totals, [1, 0, 0, 1, 1, 1, 1]);

    let (manifest, samples) = read_packed(&out);
    let keys: Vec<&str> = samples.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(
        keys,
        ["00000002", "00000003", "00000004", "00000005", "00000006"],
        "keys are CSV lines"
    );
    let [a, b, c, d, e] = &samples[..] else { panic!() };
    assert_eq!(a.label, 0);
    assert_eq!(a.text.as_deref(), Some("I am furious, really"));
    let a_img = a.image.as_ref().unwrap();
    assert_eq!(a_img[48 * 2 + 3], 5, "a 48x48 gray image is stored as is");
    assert_eq!(a.audio.as_ref().unwrap().len(), 8000);
    assert_eq!(b.label, 3);
    assert_eq!(b.image.as_ref().unwrap().len(), 48 * 48);
    // 0.25 s at 44.1 kHz stereo: 11025 frames, resampled to 4000 samples at 16 kHz.
    let b_audio = b.audio.as_ref().unwrap();
    assert_eq!(b_audio.len(), 4000);
    let peak = b_audio.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!((peak - 12000.0 / 32768.0).abs() < 0.01, "downmixed, not summed: {peak}");
    assert_eq!((c.label, c.image.is_none()), (4, true));
    assert_eq!(
        c.audio.as_ref().unwrap().len(),
        16_000,
        "8 kHz for 1 s upsampled to 16 kHz"
    );
    assert_eq!((d.label, d.audio.is_none(), d.text.is_none()), (6, true, true));
    assert_eq!((e.label, e.image.is_none()), (5, true));
    // The vocabulary holds the words of the train texts.
    assert_eq!(
        manifest.vocabulary.encode("furious lovely", 3),
        [
            manifest.vocabulary.id("furious").unwrap(),
            manifest.vocabulary.id("lovely").unwrap(),
            0
        ]
    );

    // Bad rows name their line, and exit 2.
    std::fs::write(src.join("bad.csv"), "image,label\nfaces/a.png,anger\nfaces/a.png,joy\n").unwrap();
    let bad = src.join("bad.csv");
    let bad_out = uri(&tmp.path().join("bad"));
    let err = fails(
        &["dataset", "pack", "--csv", bad.to_str().unwrap(), "--out", &bad_out],
        2,
    );
    assert!(
        err.contains("bad.csv line 3: label \"joy\" is neither a class"),
        "{err}"
    );
    std::fs::write(
        src.join("bad.csv"),
        "image,label\nfaces/a.png,anger\nfaces/zz.png,anger\n",
    )
    .unwrap();
    let err = fails(
        &["dataset", "pack", "--csv", bad.to_str().unwrap(), "--out", &bad_out],
        2,
    );
    assert!(
        err.contains("bad.csv line 3: image ") && err.contains("zz.png"),
        "{err}"
    );
    assert!(
        !tmp.path().join("bad/manifest.json").exists(),
        "a failed pack commits nothing"
    );
    let err = fails(
        &[
            "dataset",
            "pack",
            "--csv",
            bad.to_str().unwrap(),
            "--out",
            &bad_out,
            "--classes",
            "x,y",
        ],
        2,
    );
    assert!(
        err.contains("line 2: label \"anger\" is neither a class (x, y)"),
        "{err}"
    );
    let err = fails(
        &[
            "dataset",
            "pack",
            "--csv",
            bad.to_str().unwrap(),
            "--out",
            &bad_out,
            "--classes",
            "x,,y",
        ],
        2,
    );
    assert!(
        err.contains("--classes: class names must be non-empty and distinct"),
        "{err}"
    );
}

/// `dataset pack` reads JPEG faces as well as PNG: a colour JPEG of another size is cropped,
/// resized and turned gray like a PNG would be (close to it: JPEG is lossy).
#[test]
fn pack_reads_jpeg_faces() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("corpus");
    std::fs::create_dir_all(&src).unwrap();
    let face = image::RgbImage::from_fn(96, 64, |x, _| {
        let v = if x < 48 { 60 } else { 180 };
        image::Rgb([v, v, v])
    });
    face.save(src.join("a.jpg")).unwrap();
    face.save(src.join("a.png")).unwrap();
    std::fs::write(src.join("data.csv"), "image,label\na.jpg,anger\na.png,anger\n").unwrap();
    let out = uri(&tmp.path().join("packed"));
    let csv = src.join("data.csv");
    ok(&[
        "dataset",
        "pack",
        "--csv",
        csv.to_str().unwrap(),
        "--out",
        &out,
        "--shards",
        "1",
    ]);
    let (_, samples) = read_packed(&out);
    let (jpg, png) = (samples[0].image.as_ref().unwrap(), samples[1].image.as_ref().unwrap());
    assert_eq!(jpg.len(), 48 * 48);
    let worst = jpg.iter().zip(png).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    let mean = |v: &[u8]| v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
    assert!(
        (mean(jpg) - mean(png)).abs() < 3.0,
        "same picture: {} vs {}",
        mean(jpg),
        mean(png)
    );
    assert!(worst < 100, "lossy, not different: worst pixel off by {worst}");
}

/// A packed dataset's manifest and every sample, read back as the trainer would, by key.
fn read_packed(out: &str) -> (chorus_dataset::Manifest, Vec<chorus_dataset::Sample>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let storage = open(&StorageUri::parse(out).unwrap(), &Default::default()).unwrap();
    let manifest = rt.block_on(chorus_dataset::read_manifest(&storage)).unwrap();
    let mut samples = Vec::new();
    for shard in &manifest.shards {
        let bytes = rt.block_on(chorus_dataset::fetch_shard(&storage, shard)).unwrap();
        samples.extend(chorus_dataset::parse_shard(&shard.key, &bytes, &manifest).unwrap());
    }
    samples.sort_by(|a, b| a.key.cmp(&b.key));
    (manifest, samples)
}

fn fer_row(emotion: u8, pixels: usize, usage: &str) -> String {
    let cells: Vec<String> = (0..pixels)
        .map(|i| ((i * 5 + emotion as usize) % 256).to_string())
        .collect();
    format!("{emotion},{},{usage}\n", cells.join(" "))
}

#[test]
fn import_fer2013_csv() {
    let tmp = tempfile::tempdir().unwrap();
    let csv = tmp.path().join("fer2013.csv");
    std::fs::write(
        &csv,
        format!(
            "emotion,pixels,Usage\n{}{}{}",
            fer_row(3, 2304, "Training"),
            fer_row(0, 2304, "PublicTest"),
            fer_row(6, 2304, "PrivateTest")
        ),
    )
    .unwrap();
    let out = uri(&tmp.path().join("fer"));
    let j: Value = serde_json::from_str(&ok(&[
        "dataset",
        "import",
        "fer2013",
        "--csv",
        csv.to_str().unwrap(),
        "--out",
        &out,
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(j["name"], "fer");
    assert_eq!(j["samples"], 3);
    for split in ["train", "val", "test"] {
        assert_eq!(j["splits"][split]["samples"], 1, "{split}");
    }
    assert_eq!(j["modalities"], serde_json::json!({"image": 3, "audio": 0, "text": 0}));
    assert_eq!(j["skipped"], serde_json::json!({}));
    let (_, samples) = read_packed(&out);
    let labels: Vec<(&str, u8)> = samples.iter().map(|s| (s.key.as_str(), s.label)).collect();
    assert_eq!(labels, [("00000002", 3), ("00000003", 0), ("00000004", 6)]);
    let face = samples[0].image.as_ref().unwrap();
    assert_eq!((face[0], face[1], face[100]), (3, 8, ((100 * 5 + 3) % 256) as u8));

    std::fs::write(
        &csv,
        format!(
            "emotion,pixels,Usage\n{}{}",
            fer_row(3, 2304, "Training"),
            fer_row(2, 2303, "Training")
        ),
    )
    .unwrap();
    let bad = uri(&tmp.path().join("bad"));
    let err = fails(
        &[
            "dataset",
            "import",
            "fer2013",
            "--csv",
            csv.to_str().unwrap(),
            "--out",
            &bad,
        ],
        2,
    );
    assert!(
        err.contains("fer2013.csv line 3: 2303 pixel values, expected 2304 (48x48)"),
        "{err}"
    );
    assert!(!tmp.path().join("bad/manifest.json").exists());
}

#[test]
fn import_ravdess_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ravdess");
    for (rel, secs) in [
        ("Actor_01/03-01-05-01-01-01-01.wav", 0.5),
        ("Actor_02/03-01-02-02-02-01-02.wav", 0.25),
        ("Actor_22/03-01-03-01-01-01-22.wav", 0.5),
        ("Actor_24/03-01-04-01-02-01-24.wav", 0.5),
        ("Actor_24/01-01-04-01-02-01-24.wav", 0.1),
    ] {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        write_wav(&path, 48_000, 2, secs);
    }
    let out = uri(&tmp.path().join("voices"));
    let summary = ok(&[
        "dataset",
        "import",
        "ravdess",
        "--dir",
        root.to_str().unwrap(),
        "--out",
        &out,
    ]);
    assert!(summary.contains("samples:    4 in 4 shards"), "{summary}");
    assert!(
        summary.contains("left out of the dataset:\n  1  not audio-only (modality 01 full-AV or 02 video-only)\n"),
        "{summary}"
    );
    let (manifest, samples) = read_packed(&out);
    assert_eq!(
        (manifest.splits.train, manifest.splits.val, manifest.splits.test),
        (2, 1, 1)
    );
    let by_key = |k: &str| samples.iter().find(|s| s.key == k).unwrap();
    let angry = by_key("03-01-05-01-01-01-01");
    assert_eq!((angry.label, angry.audio.as_ref().unwrap().len()), (0, 8_000));
    assert_eq!(angry.text.as_deref(), Some("Kids are talking by the door"));
    let calm = by_key("03-01-02-02-02-01-02");
    assert_eq!((calm.label, calm.audio.as_ref().unwrap().len()), (6, 4_000));
    assert_eq!(calm.text.as_deref(), Some("Dogs are sitting by the door"));
    // The tone is kept at its amplitude: 12000 / 32768 on both channels.
    let peak = angry.audio.as_ref().unwrap()[1000..7000]
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()));
    assert!((peak - 12000.0 / 32768.0).abs() < 0.005, "{peak}");

    std::fs::create_dir_all(root.join("Actor_03")).unwrap();
    write_wav(&root.join("Actor_03/03-01-09-01-01-01-03.wav"), 48_000, 2, 0.1);
    let err = fails(
        &[
            "dataset",
            "import",
            "ravdess",
            "--dir",
            root.to_str().unwrap(),
            "--out",
            &uri(&tmp.path().join("bad")),
        ],
        2,
    );
    assert!(
        err.contains("Actor_03/03-01-09-01-01-01-03.wav: emotion 09 is not 01 to 08"),
        "{err}"
    );
}

#[test]
fn import_meld_csvs() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("meld");
    let header =
        "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n";
    std::fs::create_dir_all(src.join("train_wav")).unwrap();
    std::fs::create_dir_all(src.join("test_wav")).unwrap();
    std::fs::write(
        src.join("train_sent_emo.csv"),
        format!(
            "{header}1,\"Oh, really? Fine, whatever.\",Ross,anger,negative,3,0,1,2,\"00:01:02,003\",\"00:01:04,000\"\n\
             2,\"Yes!\nYes, yes!\",Monica,joy,positive,3,1,1,2,\"00:01:05,000\",\"00:01:06,000\"\n"
        ),
    )
    .unwrap();
    std::fs::write(
        src.join("test_sent_emo.csv"),
        format!("{header}1,I'm scared,Chandler,fear,negative,0,0,3,3,\"00:00:01,000\",\"00:00:02,000\"\n"),
    )
    .unwrap();
    write_wav(&src.join("train_wav/dia3_utt0.wav"), 44_100, 1, 0.5);
    write_wav(&src.join("test_wav/dia0_utt0.wav"), 16_000, 1, 0.25);
    let csv = |n: &str| src.join(n).to_str().unwrap().to_string();
    let (train_csv, test_csv) = (csv("train_sent_emo.csv"), csv("test_sent_emo.csv"));
    let (train_dir, test_dir) = (csv("train_wav"), csv("test_wav"));
    let out = uri(&tmp.path().join("meld-out"));
    let j: Value = serde_json::from_str(&ok(&[
        "dataset",
        "import",
        "meld",
        "--csv",
        &train_csv,
        "--audio-dir",
        &train_dir,
        "--csv",
        &test_csv,
        "--audio-dir",
        &test_dir,
        "--out",
        &out,
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(j["samples"], 3);
    assert_eq!(j["splits"]["train"]["samples"], 2);
    assert_eq!(j["splits"]["test"]["samples"], 1);
    assert_eq!(
        j["incomplete"],
        serde_json::json!({"no clip in the audio directory: written as text only": 1})
    );
    let (manifest, samples) = read_packed(&out);
    let by_key = |k: &str| samples.iter().find(|s| s.key == k).unwrap();
    let a = by_key("train-dia3_utt0");
    assert_eq!(a.label, 0);
    assert_eq!(a.text.as_deref(), Some("Oh, really? Fine, whatever."));
    assert_eq!(a.audio.as_ref().unwrap().len(), 8_000);
    let b = by_key("train-dia3_utt1");
    assert_eq!((b.label, b.audio.is_none()), (3, true));
    assert_eq!(b.text.as_deref(), Some("Yes!\nYes, yes!"));
    let c = by_key("test-dia0_utt0");
    assert_eq!((c.label, c.audio.as_ref().unwrap().len()), (2, 4_000));
    assert!(manifest.vocabulary.id("whatever").is_some());
    assert_eq!(
        manifest.vocabulary.id("scared"),
        None,
        "test words stay out of the vocabulary"
    );

    std::fs::write(
        src.join("dev.csv"),
        format!("{header}1,Huh,Joey,confused,neutral,0,0,1,1,a,b\n"),
    )
    .unwrap();
    let bad = uri(&tmp.path().join("bad"));
    let dev_csv = csv("dev.csv");
    let err = fails(
        &[
            "dataset",
            "import",
            "meld",
            "--csv",
            &dev_csv,
            "--audio-dir",
            &test_dir,
            "--split",
            "val",
            "--out",
            &bad,
        ],
        2,
    );
    assert!(
        err.contains("dev.csv line 2: emotion \"confused\" is not one of MELD's anger, disgust, fear, joy, neutral, sadness, surprise"),
        "{err}"
    );
    let err = fails(
        &[
            "dataset",
            "import",
            "meld",
            "--csv",
            &train_csv,
            "--csv",
            &test_csv,
            "--audio-dir",
            &train_dir,
            "--audio-dir",
            &test_dir,
            "--audio-dir",
            &test_dir,
            "--out",
            &bad,
        ],
        2,
    );
    assert!(err.contains("2 --csv but 3 --audio-dir"), "{err}");
}
