//! What users attach to an experiment around its run, and the marks of its lifecycle after it:
//! labels, a note, archival, a deletion in progress, and the experiment it continues. The
//! bounds here are the contract of `LabelExperiment` and `SetExperimentNote`; they keep a row
//! small however many experiments a store holds.

use crate::error::CoordError;
use chorus_core::ExperimentId;
use std::collections::BTreeMap;

/// Most labels on one experiment.
pub const MAX_LABELS: usize = 64;
/// Longest label key, in bytes (a key is ASCII).
pub const MAX_LABEL_KEY: usize = 63;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE: usize = 256;
/// Longest note, in bytes.
pub const MAX_NOTE: usize = 4096;

/// An experiment's lifecycle marks, as stored with its row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lifecycle {
    pub labels: BTreeMap<String, String>,
    pub note: String,
    pub archived: bool,
    /// A deletion that was begun and has not finished: the next start, or the next request,
    /// finishes it.
    pub deleting: Option<Deletion>,
    /// The experiment this one continues.
    pub continued_from: Option<ExperimentId>,
}

/// What a deletion removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deletion {
    /// Everything under the experiment's storage prefix, then its rows.
    All,
    /// Every trial's checkpoints but those of the `n` best trials; records and rows stay.
    KeepBest(u32),
}

impl Deletion {
    /// As stored in the `deleting` column.
    pub fn as_stored(&self) -> String {
        match self {
            Deletion::All => "all".to_string(),
            Deletion::KeepBest(n) => format!("keep-best:{n}"),
        }
    }

    /// Reads the `deleting` column: empty is no deletion.
    pub fn from_stored(s: &str) -> Result<Option<Deletion>, String> {
        match s {
            "" => Ok(None),
            "all" => Ok(Some(Deletion::All)),
            other => other
                .strip_prefix("keep-best:")
                .and_then(|n| n.parse().ok())
                .map(|n| Some(Deletion::KeepBest(n)))
                .ok_or_else(|| format!("unknown deletion mark {other:?}")),
        }
    }
}

fn invalid(field: String, message: String) -> CoordError {
    CoordError::InvalidField { field, message }
}

/// Checks a label key: 1 to 63 characters of `[a-z0-9_.-/]`.
pub fn check_label_key(key: &str) -> Result<(), CoordError> {
    let field = format!("labels.{key}");
    if key.is_empty() {
        return Err(invalid("labels".into(), "a label key cannot be empty".into()));
    }
    if key.len() > MAX_LABEL_KEY {
        return Err(invalid(
            field,
            format!(
                "a label key has at most {MAX_LABEL_KEY} characters; this one has {}",
                key.len()
            ),
        ));
    }
    if let Some(c) = key
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '_' | '.' | '-' | '/'))
    {
        return Err(invalid(
            field,
            format!("a label key holds only a-z, 0-9, '_', '.', '-' and '/'; {c:?} is not allowed"),
        ));
    }
    Ok(())
}

impl Lifecycle {
    /// Removes `remove`, then sets `add`; refuses (changing nothing) a bad key, a value too
    /// long, or more than [`MAX_LABELS`] labels in the end.
    pub fn relabel(&mut self, add: &BTreeMap<String, String>, remove: &[String]) -> Result<(), CoordError> {
        for k in remove.iter().chain(add.keys()) {
            check_label_key(k)?;
        }
        for (k, v) in add {
            if v.len() > MAX_LABEL_VALUE {
                return Err(invalid(
                    format!("labels.{k}"),
                    format!(
                        "a label value has at most {MAX_LABEL_VALUE} bytes; this one has {}",
                        v.len()
                    ),
                ));
            }
        }
        let mut labels = self.labels.clone();
        for k in remove {
            labels.remove(k);
        }
        labels.extend(add.iter().map(|(k, v)| (k.clone(), v.clone())));
        if labels.len() > MAX_LABELS {
            return Err(invalid(
                "labels".into(),
                format!(
                    "an experiment has at most {MAX_LABELS} labels; this change would leave {}",
                    labels.len()
                ),
            ));
        }
        self.labels = labels;
        Ok(())
    }

    /// Replaces the note; refuses one longer than [`MAX_NOTE`] bytes.
    pub fn set_note(&mut self, note: &str) -> Result<(), CoordError> {
        if note.len() > MAX_NOTE {
            return Err(invalid(
                "note".into(),
                format!("a note has at most {MAX_NOTE} bytes; this one has {}", note.len()),
            ));
        }
        self.note = note.to_string();
        Ok(())
    }

    /// Whether the experiment carries every label of `selector` with its value.
    pub fn matches(&self, selector: &BTreeMap<String, String>) -> bool {
        selector.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn labels_are_bounded_and_a_refused_change_changes_nothing() {
        let mut l = Lifecycle::default();
        l.relabel(&map(&[("team", "vision"), ("k8s.io/zone", "a")]), &[])
            .unwrap();
        for bad in ["", "Team", "a b", "é", &"k".repeat(64)] {
            let e = l.relabel(&map(&[(bad, "x")]), &[]).unwrap_err();
            assert!(matches!(e, CoordError::InvalidField { .. }), "{bad:?}: {e}");
        }
        let long = "v".repeat(MAX_LABEL_VALUE + 1);
        assert!(l.relabel(&map(&[("ok", &long)]), &["team".into()]).is_err());
        assert_eq!(l.labels, map(&[("team", "vision"), ("k8s.io/zone", "a")]));
        l.relabel(&map(&[("ok", &"v".repeat(MAX_LABEL_VALUE))]), &["team".into()])
            .unwrap();
        assert_eq!(l.labels.len(), 2);
        let many: BTreeMap<String, String> = (0..MAX_LABELS).map(|i| (format!("k{i}"), "v".into())).collect();
        let e = l.relabel(&many, &[]).unwrap_err();
        assert!(e.to_string().contains("at most 64 labels"), "{e}");
        l.relabel(&many, &["ok".into(), "k8s.io/zone".into()]).unwrap();
        assert_eq!(l.labels.len(), MAX_LABELS);
    }

    #[test]
    fn notes_are_bounded_and_selectors_need_every_label() {
        let mut l = Lifecycle::default();
        assert!(l.set_note(&"n".repeat(MAX_NOTE + 1)).is_err());
        l.set_note(&"n".repeat(MAX_NOTE)).unwrap();
        l.relabel(&map(&[("a", "1"), ("b", "2")]), &[]).unwrap();
        assert!(l.matches(&map(&[])));
        assert!(l.matches(&map(&[("a", "1"), ("b", "2")])));
        assert!(!l.matches(&map(&[("a", "1"), ("b", "3")])));
        assert!(!l.matches(&map(&[("c", "1")])));
    }

    #[test]
    fn deletion_marks_read_back() {
        for d in [
            None,
            Some(Deletion::All),
            Some(Deletion::KeepBest(0)),
            Some(Deletion::KeepBest(7)),
        ] {
            let s = d.map(|d| d.as_stored()).unwrap_or_default();
            assert_eq!(Deletion::from_stored(&s).unwrap(), d);
        }
        assert!(Deletion::from_stored("some").is_err());
    }
}
