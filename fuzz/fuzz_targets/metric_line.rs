//! The metric line protocol: `metric::parse_line` on a line of trial output (the worker reads
//! output as lossy UTF-8, as here), and `MetricReport::from_json` on the JSON the worker sends the
//! coordinator and stores in `metrics.jsonl`.
//!
//! Oracles: no panic; a report holds at least one finite value and a non-negative step; what the
//! worker sends (`to_json`) reads back as the same report, bit for bit.
#![no_main]

use chorus_core::metric::{Line, MetricReport, PREFIX, parse_line};
use libfuzzer_sys::fuzz_target;

fn check(r: &MetricReport, input: &str) {
    assert!(!r.values.is_empty(), "a report without values from {input:?}");
    assert!(r.step.is_none_or(|s| s >= 0), "a negative step from {input:?}");
    for (k, v) in &r.values {
        assert!(!k.is_empty() && k != "step", "bad metric name {k:?} from {input:?}");
        assert!(v.is_finite(), "non-finite {k} from {input:?}");
    }
    let sent = serde_json::Value::Object(r.to_json()).to_string();
    let back = MetricReport::from_json(&sent)
        .unwrap_or_else(|e| panic!("the worker's own JSON {sent:?} is refused: {e} (from {input:?})"));
    assert_eq!(back.step, r.step, "step changed through {sent:?}");
    assert_eq!(back.values.len(), r.values.len(), "values changed through {sent:?}");
    for ((k1, v1), (k2, v2)) in r.values.iter().zip(&back.values) {
        assert!(
            k1 == k2 && v1.to_bits() == v2.to_bits(),
            "{k1}={v1:e} came back as {k2}={v2:e} through {sent:?} (from {input:?})"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    // A line is what the worker cuts at '\n'.
    let line = line.split('\n').next().unwrap_or_default();
    match parse_line(line) {
        Line::Metric(r) => check(&r, line),
        Line::Malformed(why) => assert!(!why.is_empty()),
        Line::Log => {
            let rest = line.trim_start().strip_prefix(PREFIX);
            assert!(
                rest.is_none_or(|r| !r.is_empty() && !r.starts_with(char::is_whitespace)),
                "a protocol line taken for a log: {line:?}"
            );
        }
    }
    if let Ok(r) = MetricReport::from_json(line) {
        check(&r, line);
    }
});
