//! A tar shard as the worker's loader reads it: `parse_shard` (tar, WebDataset keys, `.cls`
//! labels, PNG and WAV decoding) against the manifest's entry for it.
//!
//! Input: `manifest.json`, `\0`, the shard's key, `\0`, the tar's bytes (JSON has no raw NUL).
//! The manifest must validate first, as `read_manifest` makes it.
//! Oracles: no panic, no runaway time or memory, and what parses agrees with the manifest.
#![no_main]

use chorus_dataset::{IMAGE_PIXELS, Manifest, parse_shard};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == 0);
    let (Some(manifest), Some(key), Some(tar)) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    let Ok(m) = serde_json::from_slice::<Manifest>(manifest) else {
        return;
    };
    if m.validate().is_err() {
        return;
    }
    let Ok(key) = std::str::from_utf8(key) else {
        return;
    };
    let Ok(samples) = parse_shard(key, tar, &m) else {
        return;
    };
    let info = m.shard(key).expect("parse_shard accepts listed shards only");
    assert_eq!(samples.len() as u64, info.samples);
    for s in &samples {
        assert!((s.label as usize) < m.classes.len());
        assert!(s.image.as_ref().is_none_or(|i| i.len() == IMAGE_PIXELS));
        assert!(
            s.audio
                .as_ref()
                .is_none_or(|a| a.iter().all(|x| (-1.0..=1.0).contains(x)))
        );
    }
});
