//! The experiment spec as the CLI and the coordinator read it: `spec::spec_text` (size, UTF-8),
//! then `spec::parse` (YAML, `--set` overrides, validation).
//!
//! Input: the experiment file's bytes, then optionally `\0`-separated `--set` overrides
//! (`a.b=value`). Oracles: no panic, no runaway time or memory (libFuzzer's `-timeout` and
//! `-malloc_limit_mb`), and every accepted spec round-trips through the normalised YAML the
//! coordinator stores and re-reads at every start: `parse_stored(to_yaml(v)) == v`.
#![no_main]

use chorus_core::spec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0);
    let Ok(yaml) = spec::spec_text(parts.next().unwrap_or_default()) else {
        return;
    };
    // Arguments reach the CLI as OS strings; clap hands over only UTF-8 ones.
    let overrides: Vec<String> = parts
        .filter_map(|p| std::str::from_utf8(p).ok())
        .map(str::to_owned)
        .collect();
    let Ok(valid) = spec::parse(yaml, &overrides) else {
        return;
    };
    let stored = valid.to_yaml();
    let again = match spec::parse_stored(&stored) {
        Ok(v) => v,
        Err(e) => panic!("an accepted spec does not re-read from its stored YAML: {e}\n--- stored:\n{stored}"),
    };
    assert!(
        again == valid,
        "an accepted spec changes when re-read from its stored YAML\n--- stored:\n{stored}\n--- first: {valid:?}\n--- again: {again:?}"
    );
});
