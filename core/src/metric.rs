//! The metric line protocol: a trial reports a metric by printing one line
//! `chorus:metric {"step": 3, "val_loss": 0.41}` on stdout or stderr. Everything else is log.
//!
//! The payload is a JSON object whose values are finite numbers; `step`, when present, is a
//! non-negative integer naming the training step the values belong to. A line that starts with
//! the prefix but breaks these rules is malformed: the worker logs and counts it, never fails the
//! trial for it.

use serde_json::Value;
use std::collections::BTreeMap;

pub const PREFIX: &str = "chorus:metric";

/// Metrics a worker records for a trial on its own: its GPUs' mean utilisation in percent and
/// the memory used on them in MiB, read every few seconds while an attempt with GPUs runs.
pub const GPU_UTIL: &str = "gpu_util";
pub const GPU_MEM_MB: &str = "gpu_mem_mb";

/// One well-formed report.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricReport {
    pub step: Option<i64>,
    pub values: BTreeMap<String, f64>,
}

impl MetricReport {
    /// A worker's reading of the trial's devices ([`GPU_UTIL`], [`GPU_MEM_MB`]) rather than
    /// the trial's own report: no step, and nothing else in it. It never stands for the trial's
    /// latest metrics.
    pub fn is_device_reading(&self) -> bool {
        self.step.is_none() && !self.values.is_empty() && self.values.keys().all(|k| k == GPU_UTIL || k == GPU_MEM_MB)
    }

    /// The `chorus:metric` line a trial printing this report would print.
    pub fn to_line(&self) -> String {
        format!("{PREFIX} {}", Value::Object(self.to_json()))
    }

    /// The report as the JSON object stored in `metrics.jsonl` and sent to the coordinator.
    pub fn to_json(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        if let Some(s) = self.step {
            m.insert("step".into(), Value::from(s));
        }
        for (k, v) in &self.values {
            m.insert(
                k.clone(),
                serde_json::Number::from_f64(*v).map_or(Value::Null, Value::Number),
            );
        }
        m
    }

    /// Holds a report made in a program (not parsed from a line) to the rules a parsed line
    /// meets, in the parser's words: a value that is not finite is refused as the `null` it
    /// would be written as, and no value may be named `step` (it would be written over the
    /// step).
    pub fn check(&self) -> Result<(), String> {
        if let Some(step) = self.step.filter(|s| *s < 0) {
            return Err(format!("step must be a non-negative integer, got {step}"));
        }
        for (name, value) in &self.values {
            if name.is_empty() {
                return Err("metric names must not be empty".into());
            }
            if name == "step" {
                return Err("a metric must not be named step".into());
            }
            if !value.is_finite() {
                return Err(format!("metric {name:?} must be a finite number, got null"));
            }
        }
        if self.values.is_empty() {
            return Err("the object holds no metric besides step".into());
        }
        Ok(())
    }

    /// Parses a JSON object produced by [`MetricReport::to_json`] or written by a trial.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let Value::Object(obj) = v else {
            return Err("expected a JSON object".into());
        };
        let mut step = None;
        let mut values = BTreeMap::new();
        for (k, v) in obj {
            if k == "step" {
                match v.as_i64() {
                    Some(s) if s >= 0 && v.is_i64() || v.is_u64() => step = Some(s),
                    _ => return Err(format!("step must be a non-negative integer, got {v}")),
                }
                continue;
            }
            if k.is_empty() {
                return Err("metric names must not be empty".into());
            }
            match v.as_f64() {
                Some(x) if x.is_finite() => {
                    values.insert(k, x);
                }
                _ => return Err(format!("metric {k:?} must be a finite number, got {v}")),
            }
        }
        if values.is_empty() {
            return Err("the object holds no metric besides step".into());
        }
        Ok(MetricReport { step, values })
    }
}

/// What one output line is.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    /// Ordinary log output.
    Log,
    Metric(MetricReport),
    /// Starts with the prefix but is not a valid report; the string says why.
    Malformed(String),
}

/// Classifies one line of trial output (without its newline).
pub fn parse_line(line: &str) -> Line {
    let Some(rest) = line.trim_start().strip_prefix(PREFIX) else {
        return Line::Log;
    };
    if !rest.is_empty() && !rest.starts_with(char::is_whitespace) {
        // e.g. `chorus:metrics` is somebody's log, not our protocol.
        return Line::Log;
    }
    match MetricReport::from_json(rest.trim()) {
        Ok(r) => Line::Metric(r),
        Err(e) => Line::Malformed(e),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn device_readings_are_told_from_the_trials_reports() {
        let report = |step: Option<i64>, names: &[&str]| MetricReport {
            step,
            values: names.iter().map(|k| (k.to_string(), 1.0)).collect(),
        };
        assert!(report(None, &[GPU_UTIL, GPU_MEM_MB]).is_device_reading());
        assert!(report(None, &[GPU_UTIL]).is_device_reading());
        // A trial that reports a GPU figure with a step, or beside its own metrics, reports it.
        assert!(!report(Some(3), &[GPU_UTIL]).is_device_reading());
        assert!(!report(None, &[GPU_UTIL, "loss"]).is_device_reading());
        assert!(!report(None, &[]).is_device_reading());
    }

    /// A report made in a program meets the rules a parsed line does, in the same words.
    #[test]
    fn a_typed_report_is_checked_as_a_line_is() {
        let report = |step: Option<i64>, values: &[(&str, f64)]| MetricReport {
            step,
            values: values.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        };
        assert_eq!(report(Some(3), &[("loss", 0.5)]).check(), Ok(()));
        for (r, why) in [
            (report(Some(-1), &[("loss", 0.5)]), "non-negative"),
            (report(None, &[("", 0.5)]), "must not be empty"),
            (report(None, &[("loss", f64::NAN)]), "finite number, got null"),
            (report(None, &[("loss", f64::INFINITY)]), "finite number, got null"),
            (report(None, &[("step", 1.0)]), "named step"),
            (report(Some(1), &[]), "no metric besides step"),
        ] {
            let err = r.check().unwrap_err();
            assert!(err.contains(why), "{r:?}: {err}");
        }
        // The parser says the same of the line such a report is written as.
        let line = serde_json::Value::Object(report(None, &[("loss", f64::NAN)]).to_json()).to_string();
        assert_eq!(
            MetricReport::from_json(&line).unwrap_err(),
            report(None, &[("loss", f64::NAN)]).check().unwrap_err()
        );
    }

    use super::*;

    #[test]
    fn parses_reports() {
        let Line::Metric(r) = parse_line(r#"chorus:metric {"step": 3, "val_loss": 0.41, "acc": 1}"#) else {
            panic!()
        };
        assert_eq!(r.step, Some(3));
        assert_eq!(r.values["val_loss"], 0.41);
        assert_eq!(r.values["acc"], 1.0);
        assert_eq!(
            MetricReport::from_json(&serde_json::Value::Object(r.to_json()).to_string()).unwrap(),
            r
        );
    }

    #[test]
    fn classifies_logs_and_malformed_lines() {
        assert_eq!(parse_line("epoch 3 done"), Line::Log);
        assert_eq!(parse_line("chorus:metrics are nice"), Line::Log);
        for bad in [
            "chorus:metric",
            "chorus:metric {",
            "chorus:metric [1]",
            r#"chorus:metric {"step": -1, "x": 1}"#,
            r#"chorus:metric {"step": 1.5, "x": 1}"#,
            r#"chorus:metric {"x": "high"}"#,
            r#"chorus:metric {"step": 2}"#,
        ] {
            assert!(matches!(parse_line(bad), Line::Malformed(_)), "{bad}");
        }
    }

    /// Found by the `metric_line` fuzz target: serde_json's default float parsing may be one unit
    /// in the last place off, so a value the worker sent (`to_json`) could read back as another
    /// one in the coordinator and in `metrics.jsonl`.
    #[test]
    fn reports_read_back_bit_for_bit() {
        #[allow(clippy::excessive_precision)]
        let cases = [
            (
                r#"{"x": 99999999999999999999999999999999999999999999999999999999925}"#,
                99999999999999999999999999999999999999999999999999999999925.0,
            ),
            (r#"{"x": 1.0000000000000001e59}"#, 1.0000000000000001e59),
            (r#"{"x": 2.2250738585072014e-308}"#, 2.2250738585072014e-308),
        ];
        for (text, nearest) in cases {
            let r = MetricReport::from_json(text).unwrap();
            assert_eq!(r.values["x"].to_bits(), f64::to_bits(nearest), "{text}");
            let sent = Value::Object(r.to_json()).to_string();
            let back = MetricReport::from_json(&sent).unwrap();
            assert_eq!(back, r, "changed through {sent}");
            assert_eq!(back.values["x"].to_bits(), f64::to_bits(nearest), "{sent}");
        }
    }
}
