//! A dataset's `manifest.json` as `read_manifest` reads it: JSON into `Manifest`, then
//! `validate`, then the counts that `chorus dataset inspect` and the loaders read from it.
//!
//! Oracles: no panic (overflow checks are on), and a manifest that validates agrees with itself:
//! its split totals, per-class counts and modality counts add up.
#![no_main]

use chorus_dataset::{Manifest, Split};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = serde_json::from_slice::<Manifest>(data) else {
        return;
    };
    if m.validate().is_err() {
        return;
    }
    let mut total = 0u64;
    for split in Split::ALL {
        let by_class: u64 = m.class_counts(split).iter().sum();
        assert_eq!(
            by_class,
            m.splits.get(split),
            "{split}: class counts disagree with the split"
        );
        assert_eq!(m.shards_in(split).map(|s| s.samples).sum::<u64>(), m.splits.get(split));
        total += by_class;
    }
    assert_eq!(total, m.samples());
    let mods = m.modalities();
    assert!(mods.image.max(mods.audio).max(mods.text) <= m.samples());
    let bytes: u64 = m.shards.iter().map(|s| s.bytes).sum();
    assert_eq!(bytes, m.bytes());
    for s in &m.shards {
        assert_eq!(m.shard(&s.key), Some(s), "shard keys are unique");
    }
    assert!(m.vocabulary.tokens().len() >= 2);
});
