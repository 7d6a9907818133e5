//! A trial's metric history in object storage, kept per attempt so that no attempt can
//! overwrite another's lines.
//!
//! Each attempt writes only objects named for it under `metrics/`: first
//! `{attempt:04}-lineage.json`, which says how many lines of each earlier attempt its history
//! carries (the counts the coordinator acknowledged, handed over in the assignment), then its
//! own lines in segments of bounded size (`{attempt:04}-{segment:06}.jsonl`). A first attempt
//! carries nothing over and writes no lineage: an attempt 1 with segments and no lineage
//! carries nothing. The trial's history is what its newest attempt's lineage names,
//! followed by that attempt's own lines. An attempt the coordinator has given up on may go on
//! writing its own segments for a while (until it learns it is stale), but nothing of what it
//! writes after the new attempt started is ever part of the history: the new attempt's lineage
//! counts only the lines the coordinator acknowledged, and a worker stores a line before it
//! reports it, so every acknowledged line is there to be counted.
//!
//! Trials recorded before this layout kept one `metrics.jsonl` for all attempts, each line
//! tagged with its attempt; it is read as the lines of the attempts that have no directory.

use crate::error::CoreError;
use crate::ids::{ExperimentId, TrialId};
use crate::storage::{MetricsObject, Storage, parse_metrics_name};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use object_store::path::Path;
use serde::{Deserialize, Serialize};

/// A segment is sealed once it holds this many bytes, so the writer keeps at most this much.
pub const MAX_SEGMENT_BYTES: usize = 1024 * 1024;
/// Longer lines in storage are skipped when read (a writer never produces one).
pub const MAX_LINE_BYTES: usize = 1024 * 1024;
/// `lineage.json` larger than this is refused unread.
const MAX_LINEAGE_BYTES: u64 = 1024 * 1024;

/// What an attempt's history carries over from earlier attempts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lineage {
    pub attempt: u32,
    /// Earlier attempts, oldest first, with how many of their lines the history keeps.
    pub inherits: Vec<Inherited>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inherited {
    pub attempt: u32,
    pub lines: u64,
}

/// Writes an attempt's lineage; done once, before its first line.
pub async fn write_lineage(
    storage: &Storage,
    exp: ExperimentId,
    trial: TrialId,
    lineage: &Lineage,
) -> Result<(), CoreError> {
    let key = storage.metrics_lineage_key(exp, trial, lineage.attempt);
    let body = serde_json::to_vec(lineage).expect("lineage serialises");
    storage.store.put(&key, body.into()).await?;
    Ok(())
}

async fn read_lineage(storage: &Storage, key: &Path) -> Result<Option<Lineage>, CoreError> {
    let r = match storage.store.get(key).await {
        Ok(r) => r,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let bad = |reason: String| CoreError::CorruptRecord {
        key: key.to_string(),
        reason,
    };
    if r.meta.size > MAX_LINEAGE_BYTES {
        return Err(bad(format!(
            "{} bytes, over the limit of {MAX_LINEAGE_BYTES}",
            r.meta.size
        )));
    }
    let bytes = r.bytes().await?;
    serde_json::from_slice(&bytes).map(Some).map_err(|e| bad(e.to_string()))
}

/// Calls `visit` with each line of an object, at most `limit` of them; returns how many.
/// Memory is bounded by [`MAX_LINE_BYTES`] whatever the object holds.
async fn visit_object_lines(
    storage: &Storage,
    key: &Path,
    limit: u64,
    keep: &mut (dyn FnMut(&str) -> bool + Send),
    visit: &mut (dyn FnMut(&str) + Send),
) -> Result<u64, CoreError> {
    let mut stream = match storage.store.get(key).await {
        Ok(r) => r.into_stream(),
        Err(object_store::Error::NotFound { .. }) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let mut left = limit;
    let mut line: Vec<u8> = Vec::new();
    let mut too_long = false;
    let mut emit = |line: &mut Vec<u8>, too_long: &mut bool, left: &mut u64| {
        if !*too_long && *left > 0 {
            let text = String::from_utf8_lossy(line);
            let text = text.trim_end_matches('\r');
            if !text.trim().is_empty() && keep(text) {
                visit(text);
                *left -= 1;
            }
        }
        line.clear();
        *too_long = false;
    };
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        let mut rest = &chunk[..];
        while !rest.is_empty() && left > 0 {
            match rest.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    push_capped(&mut line, &rest[..i], &mut too_long);
                    emit(&mut line, &mut too_long, &mut left);
                    rest = &rest[i + 1..];
                }
                None => {
                    push_capped(&mut line, rest, &mut too_long);
                    rest = &[];
                }
            }
        }
        if left == 0 {
            return Ok(limit);
        }
    }
    emit(&mut line, &mut too_long, &mut left);
    Ok(limit - left)
}

fn push_capped(line: &mut Vec<u8>, part: &[u8], too_long: &mut bool) {
    if line.len() + part.len() > MAX_LINE_BYTES {
        *too_long = true;
        line.clear();
    }
    if !*too_long {
        line.extend_from_slice(part);
    }
}

/// What the trial's `metrics/` holds, by attempt: whether it has a lineage, and its segments'
/// keys in order.
type Listing = std::collections::BTreeMap<u32, (bool, Vec<(u32, Path)>)>;

async fn listing(storage: &Storage, exp: ExperimentId, trial: TrialId) -> Result<Listing, CoreError> {
    let mut by_attempt: Listing = Default::default();
    let objects: Vec<object_store::ObjectMeta> = storage
        .store
        .list(Some(&storage.metrics_prefix(exp, trial)))
        .try_collect()
        .await?;
    for o in objects {
        let Some((attempt, what)) = o.location.filename().and_then(parse_metrics_name) else {
            continue;
        };
        let entry = by_attempt.entry(attempt).or_default();
        match what {
            MetricsObject::Lineage => entry.0 = true,
            MetricsObject::Segment(n) => entry.1.push((n, o.location)),
        }
    }
    for (_, segments) in by_attempt.values_mut() {
        segments.sort();
    }
    Ok(by_attempt)
}

/// Calls `visit` with an attempt's own lines, oldest first, at most `limit` (all with `None`).
/// An attempt recorded before the per-attempt layout is read from the old shared file.
pub async fn visit_attempt_lines(
    storage: &Storage,
    exp: ExperimentId,
    trial: TrialId,
    attempt: u32,
    limit: Option<u64>,
    visit: &mut (dyn FnMut(&str) + Send),
) -> Result<u64, CoreError> {
    let listed = listing(storage, exp, trial).await?;
    visit_listed_lines(storage, exp, trial, &listed, attempt, limit, visit).await
}

async fn visit_listed_lines(
    storage: &Storage,
    exp: ExperimentId,
    trial: TrialId,
    listed: &Listing,
    attempt: u32,
    limit: Option<u64>,
    visit: &mut (dyn FnMut(&str) + Send),
) -> Result<u64, CoreError> {
    let mut left = limit.unwrap_or(u64::MAX);
    let Some((_, segments)) = listed.get(&attempt) else {
        let mut tagged = |line: &str| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("attempt").and_then(serde_json::Value::as_u64))
                == Some(u64::from(attempt))
        };
        return visit_object_lines(
            storage,
            &storage.legacy_metrics_key(exp, trial),
            left,
            &mut tagged,
            visit,
        )
        .await;
    };
    let mut total = 0;
    for (_, key) in segments {
        if left == 0 {
            break;
        }
        let n = visit_object_lines(storage, key, left, &mut |_| true, visit).await?;
        left -= n;
        total += n;
    }
    Ok(total)
}

/// Calls `visit` with the lines of earlier attempts that `lineage` carries over, oldest first
/// (what a new attempt reads to continue its history), listing the trial's records once.
pub async fn visit_lineage(
    storage: &Storage,
    exp: ExperimentId,
    trial: TrialId,
    lineage: &Lineage,
    visit: &mut (dyn FnMut(&str) + Send),
) -> Result<(), CoreError> {
    if lineage.inherits.is_empty() {
        return Ok(());
    }
    let listed = listing(storage, exp, trial).await?;
    visit_inherited(storage, exp, trial, &listed, lineage, visit).await
}

async fn visit_inherited(
    storage: &Storage,
    exp: ExperimentId,
    trial: TrialId,
    listed: &Listing,
    lineage: &Lineage,
    visit: &mut (dyn FnMut(&str) + Send),
) -> Result<(), CoreError> {
    for inh in &lineage.inherits {
        visit_listed_lines(storage, exp, trial, listed, inh.attempt, Some(inh.lines), visit).await?;
    }
    Ok(())
}

/// Calls `visit` with every line of a trial's history, oldest first: the lines its newest
/// attempt's lineage names, then that attempt's own. Returns the attempt whose history it is
/// (`None` for a trial recorded before the per-attempt layout, read whole from its old file).
pub async fn visit_history(
    storage: &Storage,
    exp: ExperimentId,
    trial: TrialId,
    visit: &mut (dyn FnMut(&str) + Send),
) -> Result<Option<u32>, CoreError> {
    let listed = listing(storage, exp, trial).await?;
    for (&attempt, (has_lineage, _)) in listed.iter().rev() {
        let lineage = if *has_lineage {
            read_lineage(storage, &storage.metrics_lineage_key(exp, trial, attempt)).await?
        } else {
            None
        };
        let lineage = match lineage {
            Some(l) => l,
            // A first attempt carries nothing; a later one without its lineage never started
            // (it writes the lineage before anything else), so an earlier one holds the history.
            None if attempt == 1 => Lineage::default(),
            None => continue,
        };
        visit_inherited(storage, exp, trial, &listed, &lineage, visit).await?;
        visit_listed_lines(storage, exp, trial, &listed, attempt, None, visit).await?;
        return Ok(Some(attempt));
    }
    visit_object_lines(
        storage,
        &storage.legacy_metrics_key(exp, trial),
        u64::MAX,
        &mut |_| true,
        visit,
    )
    .await?;
    Ok(None)
}

/// The whole history as lines; for tools and tests, so at most `max_lines` of it.
pub async fn read_history(
    storage: &Storage,
    exp: ExperimentId,
    trial: TrialId,
    max_lines: usize,
) -> Result<Vec<String>, CoreError> {
    let mut out = Vec::new();
    visit_history(storage, exp, trial, &mut |l| {
        if out.len() < max_lines {
            out.push(l.to_string());
        }
    })
    .await?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{StorageUri, open};

    fn mem(name: &str) -> Storage {
        open(
            &StorageUri::parse(&format!("memory://{name}")).unwrap(),
            &Default::default(),
        )
        .unwrap()
    }

    const E: ExperimentId = ExperimentId(1);
    const T: TrialId = TrialId(2);

    async fn segment(s: &Storage, attempt: u32, seg: u32, body: &str) {
        s.store
            .put(&s.metrics_segment_key(E, T, attempt, seg), body.to_string().into())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn history_is_the_newest_lineage_and_ignores_a_stale_attempts_late_lines() {
        let s = mem("history-lineage");
        write_lineage(
            &s,
            E,
            T,
            &Lineage {
                attempt: 1,
                inherits: vec![],
            },
        )
        .await
        .unwrap();
        segment(&s, 1, 0, "{\"step\":1}\n{\"step\":2}\n").await;
        // Attempt 2 starts; the coordinator had acknowledged two lines of attempt 1.
        write_lineage(
            &s,
            E,
            T,
            &Lineage {
                attempt: 2,
                inherits: vec![Inherited { attempt: 1, lines: 2 }],
            },
        )
        .await
        .unwrap();
        segment(&s, 2, 0, "{\"step\":3,\"attempt\":2}\n").await;
        // The stale attempt 1 wakes up and writes more of its own.
        segment(&s, 1, 0, "{\"step\":1}\n{\"step\":2}\n{\"step\":3,\"stale\":1}\n").await;
        segment(&s, 1, 1, "{\"step\":4,\"stale\":1}\n").await;
        let h = read_history(&s, E, T, 100).await.unwrap();
        assert_eq!(h, vec!["{\"step\":1}", "{\"step\":2}", "{\"step\":3,\"attempt\":2}"]);
    }

    #[tokio::test]
    async fn segments_are_read_in_order_and_limits_cut_across_them() {
        let s = mem("history-segments");
        write_lineage(
            &s,
            E,
            T,
            &Lineage {
                attempt: 3,
                inherits: vec![],
            },
        )
        .await
        .unwrap();
        segment(&s, 3, 1, "c\nd").await;
        segment(&s, 3, 0, "a\r\n\nb\n").await;
        let mut seen = Vec::new();
        let n = visit_attempt_lines(&s, E, T, 3, Some(3), &mut |l| seen.push(l.to_string()))
            .await
            .unwrap();
        assert_eq!((n, seen), (3, vec!["a".to_string(), "b".into(), "c".into()]));
        assert_eq!(read_history(&s, E, T, 10).await.unwrap(), vec!["a", "b", "c", "d"]);
    }

    #[tokio::test]
    async fn a_first_attempt_needs_no_lineage_but_a_later_one_does() {
        let s = mem("history-first");
        segment(&s, 1, 0, "{\"step\":1}\n").await;
        assert_eq!(read_history(&s, E, T, 10).await.unwrap(), vec!["{\"step\":1}"]);
        // Attempt 2 left segments but no lineage: it never properly started, attempt 1 stands.
        segment(&s, 2, 0, "{\"step\":9}\n").await;
        assert_eq!(read_history(&s, E, T, 10).await.unwrap(), vec!["{\"step\":1}"]);
    }

    #[tokio::test]
    async fn trials_recorded_in_one_shared_file_still_read() {
        let s = mem("history-legacy");
        let old = "{\"step\":1,\"attempt\":1}\n{\"step\":2,\"attempt\":1}\n{\"step\":2,\"attempt\":2}\n";
        s.store.put(&s.legacy_metrics_key(E, T), old.into()).await.unwrap();
        assert_eq!(read_history(&s, E, T, 10).await.unwrap().len(), 3);
        // A new attempt carries over the acknowledged lines of the old ones.
        write_lineage(
            &s,
            E,
            T,
            &Lineage {
                attempt: 3,
                inherits: vec![Inherited { attempt: 1, lines: 1 }, Inherited { attempt: 2, lines: 1 }],
            },
        )
        .await
        .unwrap();
        assert_eq!(
            read_history(&s, E, T, 10).await.unwrap(),
            vec!["{\"step\":1,\"attempt\":1}", "{\"step\":2,\"attempt\":2}"]
        );
    }

    #[tokio::test]
    async fn overlong_lines_are_skipped_not_held() {
        let s = mem("history-long");
        write_lineage(
            &s,
            E,
            T,
            &Lineage {
                attempt: 1,
                inherits: vec![],
            },
        )
        .await
        .unwrap();
        let body = format!("a\n{}\nb\n", "x".repeat(MAX_LINE_BYTES + 10));
        segment(&s, 1, 0, &body).await;
        assert_eq!(read_history(&s, E, T, 10).await.unwrap(), vec!["a", "b"]);
    }
}
