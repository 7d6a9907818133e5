//! The experiment spec as the CLI and the coordinator read it: `spec::parse` (YAML, `--set`
//! overrides, validation).
//!
//! Input: the YAML text, then optionally `\0`-separated `--set` overrides (`a.b=value`).
//! Oracles: no panic, no runaway time or memory (libFuzzer's `-timeout` and `-malloc_limit_mb`),
//! and every accepted spec round-trips through the normalised YAML the coordinator stores and
//! re-reads at every start: `parse(to_yaml(parse(x))) == parse(x)`, up to what `to_yaml` fills
//! in (the resolved `max_trials`), and that YAML is a fixed point.
#![no_main]

use chorus_core::spec;
use libfuzzer_sys::fuzz_target;

/// More overrides than the CLI user would type only make each run slower.
const MAX_OVERRIDES: usize = 8;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0);
    let Some(Ok(yaml)) = parts.next().map(std::str::from_utf8) else {
        return;
    };
    let overrides: Vec<String> = parts
        .take(MAX_OVERRIDES)
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let Ok(valid) = spec::parse(yaml, &overrides) else {
        return;
    };
    let stored = valid.to_yaml();
    let again = match spec::parse(&stored, &[]) {
        Ok(v) => v,
        Err(e) => panic!("an accepted spec does not re-parse from its stored YAML: {e}\n--- stored:\n{stored}"),
    };
    let mut normalised = valid.clone();
    normalised.spec.max_trials = Some(valid.max_trials);
    assert!(
        again == normalised,
        "an accepted spec changes when re-read from its stored YAML\n--- stored:\n{stored}\n--- first: {normalised:?}\n--- again: {again:?}"
    );
    let restored = again.to_yaml();
    assert!(
        restored == stored,
        "the stored YAML of an accepted spec is not a fixed point\n--- stored:\n{stored}\n--- again:\n{restored}"
    );
});
