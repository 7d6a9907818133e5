//! The dataset format end to end on `memory://` storage: what a writer puts there reads back
//! the same, and every kind of bad input is refused with an error naming the shard and the
//! sample.

use chorus_core::storage::{Storage, StorageUri, open};
use chorus_dataset::*;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use std::io::Cursor;

fn storage(name: &str) -> Storage {
    open(
        &StorageUri::parse(&format!("memory://{name}/datasets/emo")).unwrap(),
        &Default::default(),
    )
    .unwrap()
}

fn classes() -> Vec<String> {
    EMOTIONS.iter().map(|c| c.to_string()).collect()
}

fn header() -> DatasetHeader {
    DatasetHeader {
        name: "emo".into(),
        source: None,
        classes: classes(),
        vocabulary: Vocabulary::new(["i", "am", "furious"]),
    }
}

fn face(seed: u8) -> Vec<u8> {
    (0..IMAGE_PIXELS).map(|i| (i as u8).wrapping_mul(seed)).collect()
}

fn chirp(len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i as f32) * 0.05).sin() * 0.5).collect()
}

fn sample(key: &str, label: u8, image: bool, audio: bool, text: bool) -> Sample {
    Sample {
        key: key.into(),
        image: image.then(|| face(label + 1)),
        audio: audio.then(|| chirp(800 + label as usize)),
        text: text.then(|| format!("I am furious {key}")),
        label,
    }
}

async fn write(storage: &Storage, samples: &[(Split, Sample)], shards: usize) -> Manifest {
    let mut counts = SplitCounts::default();
    for (split, _) in samples {
        *counts.get_mut(*split) += 1;
    }
    let plan = ShardPlan::new(counts, shards).unwrap();
    let mut w = DatasetWriter::create(storage.clone(), header(), plan, false)
        .await
        .unwrap();
    for (split, s) in samples {
        w.add(*split, s).await.unwrap();
    }
    w.finish().await.unwrap()
}

fn assert_same(got: &Sample, want: &Sample) {
    assert_eq!(got.key, want.key);
    assert_eq!(got.label, want.label);
    assert_eq!(got.image, want.image);
    assert_eq!(got.text, want.text);
    assert_eq!(got.audio.is_some(), want.audio.is_some(), "{}", want.key);
    if let (Some(g), Some(w)) = (&got.audio, &want.audio) {
        assert_eq!(g.len(), w.len());
        // 16-bit quantisation.
        assert!(g.iter().zip(w).all(|(a, b)| (a - b).abs() < 1e-4));
    }
}

#[tokio::test]
async fn what_is_written_reads_back_including_missing_modalities() {
    let st = storage("roundtrip");
    let samples = vec![
        (Split::Train, sample("a", 0, true, true, true)),
        (Split::Train, sample("b", 3, false, true, true)),
        (Split::Train, sample("c", 6, true, false, false)),
        (Split::Train, sample("d", 2, false, false, false)),
        (Split::Train, sample("e", 5, true, true, false)),
        (Split::Val, sample("f", 1, true, false, true)),
        (Split::Test, sample("g", 4, false, true, false)),
    ];
    let written = write(&st, &samples, 4).await;
    let m = read_manifest(&st).await.unwrap();
    assert_eq!(m, written);
    assert_eq!(m.shards.len(), 4);
    assert_eq!(
        m.splits,
        SplitCounts {
            train: 5,
            val: 1,
            test: 1
        }
    );
    assert_eq!(
        m.modalities(),
        ModalityCounts {
            image: 4,
            audio: 4,
            text: 3
        }
    );
    assert_eq!(m.class_counts(Split::Train), [1, 0, 1, 1, 0, 1, 1]);
    assert_eq!(m.vocabulary.encode("I am FURIOUS!", 4), [2, 3, 4, PAD]);
    // The manifest is the last object and sits directly under the dataset's URI path.
    let head = st.store.head(&Path::from("datasets/emo/manifest.json")).await.unwrap();
    for shard in &m.shards {
        let meta = st
            .store
            .head(&Path::from(format!("datasets/emo/{}", shard.key)))
            .await
            .unwrap();
        assert!(meta.last_modified <= head.last_modified);
    }

    let mut read = Vec::new();
    for shard in &m.shards {
        let bytes = fetch_shard(&st, shard).await.unwrap();
        let parsed = parse_shard(&shard.key, &bytes, &m).unwrap();
        assert_eq!(parsed.len() as u64, shard.samples);
        read.extend(parsed.into_iter().map(|s| (shard.split, s)));
    }
    assert_eq!(read.len(), samples.len());
    for ((gs, got), (ws, want)) in read.iter().zip(&samples) {
        assert_eq!(gs, ws);
        assert_same(got, want);
    }
    assert!(verify(&st, &m).await.is_empty());
}

#[tokio::test]
async fn a_committed_dataset_is_only_replaced_when_asked() {
    let st = storage("replace");
    let one: Vec<_> = (0..6)
        .map(|i| (Split::Train, sample(&format!("k{i}"), 1, true, false, false)))
        .collect();
    write(&st, &one, 3).await;
    let plan = ShardPlan::new(
        SplitCounts {
            train: 1,
            val: 0,
            test: 0,
        },
        1,
    )
    .unwrap();
    let e = DatasetWriter::create(st.clone(), header(), plan.clone(), false)
        .await
        .err()
        .unwrap();
    assert!(matches!(e, DatasetError::AlreadyExists { .. }), "{e}");
    let mut w = DatasetWriter::create(st.clone(), header(), plan, true).await.unwrap();
    // Replacing uncommits the old dataset before anything else changes.
    assert!(matches!(read_manifest(&st).await, Err(DatasetError::NoManifest { .. })));
    w.add(Split::Train, &sample("z", 0, false, false, true)).await.unwrap();
    let m = w.finish().await.unwrap();
    assert_eq!(m.shards.len(), 1);
    let stale = st.store.head(&Path::from("datasets/emo/shard-00002.tar")).await;
    assert!(matches!(stale, Err(object_store::Error::NotFound { .. })), "{stale:?}");
}

#[tokio::test]
async fn writers_refuse_samples_beyond_the_plan_or_too_few() {
    let st = storage("plan");
    let plan = ShardPlan::new(
        SplitCounts {
            train: 2,
            val: 0,
            test: 0,
        },
        1,
    )
    .unwrap();
    let mut w = DatasetWriter::create(st.clone(), header(), plan.clone(), false)
        .await
        .unwrap();
    let e = w.add(Split::Val, &sample("a", 0, true, true, true)).await.unwrap_err();
    assert_eq!(e.to_string(), "more val samples than the 0 planned");
    w.add(Split::Train, &sample("a", 0, true, true, true)).await.unwrap();
    let e = w.finish().await.unwrap_err();
    assert!(
        e.to_string()
            .contains("shard-00000.tar got fewer than its 2 planned samples"),
        "{e}"
    );
    assert!(matches!(read_manifest(&st).await, Err(DatasetError::NoManifest { .. })));
    let mut w = DatasetWriter::create(st, header(), plan, false).await.unwrap();
    let e = w
        .add(Split::Train, &sample("a", 7, true, true, true))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "shard shard-00000.tar, sample a: label 7 is not a class index (the dataset has 7 classes)"
    );
}

// ---------------------------------------------------------------------------------------------
// Bad inputs, each built by hand so nothing in the writer can hide them.

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image::GrayImage::new(w, h)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

fn wav(rate: u32, channels: u16) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    let spec = hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::new(&mut out, spec).unwrap();
    for i in 0..400 {
        w.write_sample((i % 100) as i16).unwrap();
    }
    w.finalize().unwrap();
    out.into_inner()
}

/// A manifest with one train shard `shard-00000.tar` that claims what the bytes hold, so the
/// only thing wrong is the thing each test breaks.
fn manifest_for(bytes: &[u8], class_counts: Vec<u64>, modalities: ModalityCounts) -> Manifest {
    let samples = class_counts.iter().sum();
    Manifest {
        version: FORMAT_VERSION,
        name: "bad".into(),
        source: None,
        classes: classes(),
        sample_rate: SAMPLE_RATE,
        image_size: IMAGE_SIZE,
        splits: SplitCounts {
            train: samples,
            val: 0,
            test: 0,
        },
        shards: vec![ShardInfo {
            key: shard_key(0),
            split: Split::Train,
            samples,
            bytes: bytes.len() as u64,
            crc32c: crc32c::crc32c(bytes),
            class_counts,
            modalities,
        }],
        vocabulary: Vocabulary::new(Vec::<String>::new()),
    }
}

fn one_of(class: usize) -> Vec<u64> {
    let mut c = vec![0; 7];
    c[class] = 1;
    c
}

fn parse_err(files: &[(&str, &[u8])], class: usize, modalities: ModalityCounts) -> String {
    let bytes = tar_of(files);
    let m = manifest_for(&bytes, one_of(class), modalities);
    parse_shard(&m.shards[0].key, &bytes, &m).unwrap_err().to_string()
}

const IMAGE_ONLY: ModalityCounts = ModalityCounts {
    image: 1,
    audio: 0,
    text: 0,
};
const AUDIO_ONLY: ModalityCounts = ModalityCounts {
    image: 0,
    audio: 1,
    text: 0,
};

#[test]
fn a_png_that_is_not_48x48_is_refused() {
    let e = parse_err(&[("k1.cls", b"2"), ("k1.png", &png(50, 50))], 2, IMAGE_ONLY);
    assert_eq!(e, "shard shard-00000.tar, sample k1: PNG is 50x50, expected 48x48");
    let e = parse_err(&[("k1.cls", b"2"), ("k1.png", b"\x89PNG garbage")], 2, IMAGE_ONLY);
    assert!(
        e.starts_with("shard shard-00000.tar, sample k1: PNG is not decodable"),
        "{e}"
    );
    // The right size decodes.
    let bytes = tar_of(&[("k1.cls", b"2"), ("k1.png", &png(48, 48))]);
    let m = manifest_for(&bytes, one_of(2), IMAGE_ONLY);
    assert_eq!(
        parse_shard(&m.shards[0].key, &bytes, &m).unwrap()[0]
            .image
            .as_ref()
            .unwrap()
            .len(),
        2304
    );
}

#[test]
fn a_wav_that_is_not_16khz_mono_is_refused() {
    let e = parse_err(&[("k2.cls", b"0"), ("k2.wav", &wav(8000, 1))], 0, AUDIO_ONLY);
    assert_eq!(
        e,
        "shard shard-00000.tar, sample k2: WAV is 8000 Hz with 1 channel(s), expected 16000 Hz mono"
    );
    let e = parse_err(&[("k2.cls", b"0"), ("k2.wav", &wav(16000, 2))], 0, AUDIO_ONLY);
    assert!(e.contains("16000 Hz with 2 channel(s)"), "{e}");
    let e = parse_err(&[("k2.cls", b"0"), ("k2.wav", b"RIFF....")], 0, AUDIO_ONLY);
    assert!(
        e.starts_with("shard shard-00000.tar, sample k2: WAV is not decodable"),
        "{e}"
    );
}

#[test]
fn labels_must_be_class_indices() {
    let e = parse_err(&[("k3.cls", b"9")], 0, ModalityCounts::default());
    assert_eq!(
        e,
        "shard shard-00000.tar, sample k3: label 9 is not a class index (the dataset has 7 classes)"
    );
    let e = parse_err(&[("k3.cls", b"happy")], 0, ModalityCounts::default());
    assert_eq!(
        e,
        "shard shard-00000.tar, sample k3: label \"happy\" is not a non-negative integer"
    );
    let e = parse_err(&[("k3.cls", b"-1")], 0, ModalityCounts::default());
    assert!(e.contains("\"-1\" is not a non-negative integer"), "{e}");
    // Whitespace around the digits is what `echo 3 > k.cls` leaves; it is fine.
    let bytes = tar_of(&[("k3.cls", b" 3\n")]);
    let m = manifest_for(&bytes, one_of(3), ModalityCounts::default());
    assert_eq!(parse_shard(&m.shards[0].key, &bytes, &m).unwrap()[0].label, 3);
}

#[test]
fn a_sample_without_a_label_is_refused() {
    let e = parse_err(&[("k0.cls", b"1"), ("k4.txt", b"hello")], 1, ModalityCounts::default());
    assert_eq!(
        e,
        "shard shard-00000.tar, sample k4: has no .cls file (the label is required)"
    );
}

#[test]
fn corrupt_tar_bytes_are_refused() {
    let mut bytes = tar_of(&[("k5.cls", b"1"), ("k6.cls", b"2")]);
    let m = manifest_for(&bytes, vec![0, 1, 1, 0, 0, 0, 0], ModalityCounts::default());
    // Scribble over the second entry's header (the first takes 512 bytes of header, 512 of data).
    bytes[1024..1124].fill(b'x');
    let e = parse_shard(&m.shards[0].key, &bytes, &m).unwrap_err().to_string();
    assert!(
        e.starts_with("shard shard-00000.tar: not a readable tar after sample k5:"),
        "{e}"
    );
    let junk = vec![0x5au8; 4096];
    let e = parse_shard(&m.shards[0].key, &junk, &m).unwrap_err().to_string();
    assert!(e.starts_with("shard shard-00000.tar: not a readable tar:"), "{e}");
    // Truncated mid-file.
    let whole = tar_of(&[("k5.cls", b"1"), ("k5.png", &png(48, 48))]);
    let e = parse_shard(&m.shards[0].key, &whole[..600], &m)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("shard shard-00000.tar: not a readable tar"), "{e}");
}

/// A tar entry whose header claims more bytes than the shard holds: reproduced with the
/// `dataset_shard` fuzz target (fuzz/regressions/), where the reader reserved the claimed size
/// up front (8 GiB, or a capacity overflow for GNU base-256 sizes) before reading a byte.
#[test]
fn a_tar_entry_claiming_more_than_the_shard_is_refused() {
    let m = manifest_for(&[], one_of(1), ModalityCounts::default());
    for (claimed, gnu) in [(8 * 1024 * 1024 * 1024 - 1, false), (1u64 << 62, true)] {
        let mut h = if gnu {
            tar::Header::new_gnu()
        } else {
            tar::Header::new_ustar()
        };
        h.set_path("k7.cls").unwrap();
        h.set_mode(0o644);
        h.set_size(claimed);
        h.set_cksum();
        let mut bytes = h.as_bytes().to_vec();
        bytes.push(b'1');
        bytes.resize(512 * 4, 0);
        let e = parse_shard(&m.shards[0].key, &bytes, &m).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("shard shard-00000.tar: tar entry k7.cls claims {claimed} bytes, more than the whole shard's 2048")
        );
    }
}

/// A PNG header (with a real IDAT) that claims a 20000x20000 image, 152 bytes in all.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit gray, deflate, no filter, no interlace
    chunk(&mut out, b"IHDR", &ihdr);
    // zlib, one stored block holding one byte (a row's filter type), and its Adler-32.
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x01, 0x01, 0x01, 0x00, 0xfe, 0xff, 0x00, 0x00, 0x01, 0x00, 0x01],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

/// The size of a face is read from its header before any pixel is decoded: a tiny file
/// claiming 20000x20000 made the reader allocate 400 MB before finding out.
#[test]
fn a_png_claiming_a_huge_image_is_refused_from_its_header() {
    let png = png_claiming(20_000, 20_000);
    assert_eq!(decode_png(&png).unwrap_err(), "PNG is 20000x20000, expected 48x48");
    // The same construction at the right size is a real PNG.
    let small = png_claiming(48, 48);
    assert!(decode_png(&small).unwrap_err().starts_with("PNG is not decodable"));
}

#[test]
fn shards_that_disagree_with_the_manifest_are_refused() {
    let bytes = tar_of(&[("a.cls", b"1"), ("b.cls", b"1")]);
    let mut m = manifest_for(&bytes, vec![0, 3, 0, 0, 0, 0, 0], ModalityCounts::default());
    let e = parse_shard("shard-00000.tar", &bytes, &m).unwrap_err().to_string();
    assert_eq!(e, "shard shard-00000.tar: holds 2 samples but the manifest lists 3");
    m.shards[0].class_counts = vec![1, 1, 0, 0, 0, 0, 0];
    m.shards[0].samples = 2;
    let e = parse_shard("shard-00000.tar", &bytes, &m).unwrap_err().to_string();
    assert!(
        e.contains("samples per class [0, 2, 0, 0, 0, 0, 0] differ from the manifest's [1, 1"),
        "{e}"
    );
    m.shards[0].class_counts = vec![0, 2, 0, 0, 0, 0, 0];
    m.shards[0].modalities.text = 1;
    let e = parse_shard("shard-00000.tar", &bytes, &m).unwrap_err().to_string();
    assert!(e.contains("modality counts"), "{e}");
    let e = parse_shard("shard-00009.tar", &bytes, &m).unwrap_err().to_string();
    assert_eq!(e, "shard shard-00009.tar: not listed in the manifest");
}

#[tokio::test]
async fn checksums_sizes_and_missing_shards_are_caught_on_fetch() {
    let st = storage("checksum");
    let samples: Vec<_> = (0..2)
        .map(|i| (Split::Train, sample(&format!("s{i}"), 3, true, true, true)))
        .collect();
    let m = write(&st, &samples, 1).await;
    let key = Path::from("datasets/emo/shard-00000.tar");
    let mut bytes = st.store.get(&key).await.unwrap().bytes().await.unwrap().to_vec();
    // One flipped bit inside a PNG: the tar still parses, so only the checksum can tell.
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    st.store.put(&key, PutPayload::from(bytes.clone())).await.unwrap();
    let e = fetch_shard(&st, &m.shards[0]).await.unwrap_err().to_string();
    assert!(
        e.starts_with("shard shard-00000.tar: checksum mismatch: crc32c "),
        "{e}"
    );
    assert!(
        e.ends_with(&format!("differs from the manifest's {:08x}", m.shards[0].crc32c)),
        "{e}"
    );
    assert_eq!(verify(&st, &m).await.len(), 1);

    st.store
        .put(&key, PutPayload::from(bytes[..1024].to_vec()))
        .await
        .unwrap();
    let e = fetch_shard(&st, &m.shards[0]).await.unwrap_err().to_string();
    assert!(
        e.contains(&format!("size 1024 differs from the manifest's {}", m.shards[0].bytes)),
        "{e}"
    );

    st.store.delete(&key).await.unwrap();
    let e = fetch_shard(&st, &m.shards[0]).await.unwrap_err().to_string();
    assert_eq!(
        e,
        "shard shard-00000.tar: listed in the manifest but missing from storage"
    );
}

#[tokio::test]
async fn manifests_that_contradict_themselves_are_refused() {
    let st = storage("manifest");
    let e = read_manifest(&st).await.unwrap_err();
    assert!(matches!(e, DatasetError::NoManifest { .. }), "{e}");
    let bytes = tar_of(&[("a.cls", b"1")]);
    let mut m = manifest_for(&bytes, one_of(1), ModalityCounts::default());
    m.splits.train = 5;
    let key = Path::from("datasets/emo/manifest.json");
    st.store
        .put(&key, PutPayload::from(serde_json::to_vec(&m).unwrap()))
        .await
        .unwrap();
    let e = read_manifest(&st).await.unwrap_err().to_string();
    assert_eq!(
        e,
        "manifest datasets/emo/manifest.json: splits.train is 5 but its shards hold 1 samples"
    );
    st.store
        .put(&key, PutPayload::from(&b"{\"version\": 1}"[..]))
        .await
        .unwrap();
    let e = read_manifest(&st).await.unwrap_err().to_string();
    assert!(
        e.starts_with("manifest datasets/emo/manifest.json: not a dataset manifest: missing field"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// The generator.

#[tokio::test]
async fn synth_is_deterministic_balanced_and_readable() {
    let opts = SynthOptions {
        name: "s".into(),
        samples: 280,
        shards: 5,
        seed: 42,
        ..Default::default()
    };
    let (a, b, c) = (storage("synth-a"), storage("synth-b"), storage("synth-c"));
    let started = std::time::Instant::now();
    let ma = synth(a.clone(), &opts, false).await.unwrap();
    eprintln!("280 samples in {:?}", started.elapsed());
    let mb = synth(b, &opts, false).await.unwrap();
    assert_eq!(ma, mb, "same seed, same bytes");
    let mc = synth(
        c,
        &SynthOptions {
            seed: 43,
            ..opts.clone()
        },
        false,
    )
    .await
    .unwrap();
    assert_ne!(ma.shards[0].crc32c, mc.shards[0].crc32c);

    assert_eq!(
        ma.splits,
        SplitCounts {
            train: 224,
            val: 28,
            test: 28
        }
    );
    assert_eq!(
        ma.shards.iter().map(|s| s.split).collect::<Vec<_>>(),
        [Split::Train, Split::Train, Split::Train, Split::Val, Split::Test]
    );
    let total: Vec<u64> = (0..7)
        .map(|c| Split::ALL.iter().map(|s| ma.class_counts(*s)[c]).sum())
        .collect();
    assert_eq!(total, [40; 7]);
    // Balanced within each split, not only overall.
    assert_eq!(ma.class_counts(Split::Train), [32; 7]);
    assert_eq!(ma.class_counts(Split::Val), [4; 7]);
    assert_eq!(ma.class_counts(Split::Test), [4; 7]);
    let mods = ma.modalities();
    for n in [mods.image, mods.audio, mods.text] {
        assert!((250..280).contains(&n), "{mods:?}");
    }
    assert!(verify(&a, &ma).await.is_empty());
    let first = parse_shard(&ma.shards[0].key, &fetch_shard(&a, &ma.shards[0]).await.unwrap(), &ma).unwrap();
    let s = &first[0];
    assert_eq!(s.key, "00000000");
    assert_eq!(s, &{
        let mut want = synth::synth_sample(42, 0, s.label, 0.05);
        // The shard stores 16-bit audio.
        want.audio = s.audio.clone();
        want
    });
}
