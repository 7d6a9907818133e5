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
//!
//! [`plan_history`] says which parts make the history; each part's lines are pulled one at a
//! time, so a reader that streams the history elsewhere (the coordinator's `TrialMetrics`)
//! holds one line, never the history. [`visit_history`] and [`read_history`] read the same plan.

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

/// An object read line by line, oldest first. Memory is bounded by [`MAX_LINE_BYTES`] whatever
/// the object holds: a longer line is skipped, never held. Blank lines are skipped; a missing
/// object reads as empty.
struct ObjectLines {
    stream: Option<futures::stream::BoxStream<'static, object_store::Result<bytes::Bytes>>>,
    /// What the last chunk holds beyond the lines already returned.
    rest: bytes::Bytes,
    line: Vec<u8>,
    too_long: bool,
}

impl ObjectLines {
    async fn open(storage: &Storage, key: &Path) -> Result<ObjectLines, CoreError> {
        let stream = match storage.store.get(key).await {
            Ok(r) => Some(r.into_stream()),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        Ok(ObjectLines {
            stream,
            rest: bytes::Bytes::new(),
            line: Vec::new(),
            too_long: false,
        })
    }

    async fn next_line(&mut self) -> Result<Option<String>, CoreError> {
        loop {
            if let Some(i) = self.rest.iter().position(|&b| b == b'\n') {
                push_capped(&mut self.line, &self.rest[..i], &mut self.too_long);
                self.rest = self.rest.slice(i + 1..);
                if let Some(text) = self.take_line() {
                    return Ok(Some(text));
                }
                continue;
            }
            push_capped(&mut self.line, &self.rest, &mut self.too_long);
            self.rest = bytes::Bytes::new();
            let Some(stream) = self.stream.as_mut() else {
                return Ok(None);
            };
            match stream.next().await {
                Some(chunk) => self.rest = chunk?,
                None => {
                    // The last line need not end in a newline.
                    self.stream = None;
                    return Ok(self.take_line());
                }
            }
        }
    }

    fn take_line(&mut self) -> Option<String> {
        let text = (!self.too_long).then(|| {
            let text = String::from_utf8_lossy(&self.line);
            text.trim_end_matches('\r').to_string()
        });
        self.line.clear();
        self.too_long = false;
        text.filter(|t| !t.trim().is_empty())
    }
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

/// One run of consecutive lines of a trial's history: the first lines of one attempt's own
/// records (all of them, or as many as a later attempt's lineage carries over).
#[derive(Debug, Clone)]
pub struct HistoryPart {
    /// The attempt whose lines these are; `None` for a trial recorded before the per-attempt
    /// layout, whose one shared file is read whole.
    pub attempt: Option<u32>,
    keys: Vec<Path>,
    /// Only the lines tagged with this attempt (an attempt kept in the old shared file).
    tagged: Option<u32>,
    limit: Option<u64>,
}

impl HistoryPart {
    /// Attempt `attempt`'s own lines as listed, at most `limit`; an attempt recorded before the
    /// per-attempt layout is read from the old shared file.
    fn of(
        storage: &Storage,
        exp: ExperimentId,
        trial: TrialId,
        listed: &Listing,
        attempt: u32,
        limit: Option<u64>,
    ) -> Self {
        match listed.get(&attempt) {
            Some((_, segments)) => HistoryPart {
                attempt: Some(attempt),
                keys: segments.iter().map(|(_, k)| k.clone()).collect(),
                tagged: None,
                limit,
            },
            None => HistoryPart {
                attempt: Some(attempt),
                keys: vec![storage.legacy_metrics_key(exp, trial)],
                tagged: Some(attempt),
                limit,
            },
        }
    }

    /// Its lines, read as they are asked for.
    pub fn lines(&self, storage: &Storage) -> PartLines {
        PartLines {
            storage: storage.clone(),
            keys: self.keys.clone().into_iter(),
            tagged: self.tagged,
            left: self.limit.unwrap_or(u64::MAX),
            current: None,
        }
    }
}

/// The lines of one [`HistoryPart`], object after object, holding at most one line at a time.
pub struct PartLines {
    storage: Storage,
    keys: std::vec::IntoIter<Path>,
    tagged: Option<u32>,
    left: u64,
    current: Option<ObjectLines>,
}

impl PartLines {
    /// The next line, or `None` once the part is read.
    pub async fn next_line(&mut self) -> Result<Option<String>, CoreError> {
        while self.left > 0 {
            let Some(current) = self.current.as_mut() else {
                match self.keys.next() {
                    Some(key) => self.current = Some(ObjectLines::open(&self.storage, &key).await?),
                    None => return Ok(None),
                }
                continue;
            };
            let Some(line) = current.next_line().await? else {
                self.current = None;
                continue;
            };
            if let Some(attempt) = self.tagged {
                let tag = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v.get("attempt").and_then(serde_json::Value::as_u64));
                if tag != Some(u64::from(attempt)) {
                    continue;
                }
            }
            self.left -= 1;
            return Ok(Some(line));
        }
        Ok(None)
    }

    /// Calls `visit` with each remaining line; returns how many.
    async fn visit(&mut self, visit: &mut (dyn FnMut(&str) + Send)) -> Result<u64, CoreError> {
        let mut n = 0;
        while let Some(line) = self.next_line().await? {
            visit(&line);
            n += 1;
        }
        Ok(n)
    }
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
    HistoryPart::of(storage, exp, trial, &listed, attempt, limit)
        .lines(storage)
        .visit(visit)
        .await
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
    for part in inherited(storage, exp, trial, &listed, lineage) {
        part.lines(storage).visit(visit).await?;
    }
    Ok(())
}

fn inherited(
    storage: &Storage,
    exp: ExperimentId,
    trial: TrialId,
    listed: &Listing,
    lineage: &Lineage,
) -> Vec<HistoryPart> {
    lineage
        .inherits
        .iter()
        .map(|inh| HistoryPart::of(storage, exp, trial, listed, inh.attempt, Some(inh.lines)))
        .collect()
}

/// A trial's history as the parts to read, in order, from one listing of its records.
#[derive(Debug, Clone)]
pub struct HistoryPlan {
    /// The attempt whose history it is (`None` for a trial recorded before the per-attempt
    /// layout, read whole from its old file).
    pub attempt: Option<u32>,
    /// The lines its newest attempt's lineage names, then that attempt's own. Attempts appear
    /// in increasing order.
    pub parts: Vec<HistoryPart>,
}

/// Plans the reading of a trial's history: the newest attempt's lineage, then its own lines.
/// Reading the parts costs one line of memory at a time, so a caller can stream a history of
/// any length.
pub async fn plan_history(storage: &Storage, exp: ExperimentId, trial: TrialId) -> Result<HistoryPlan, CoreError> {
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
        let mut parts = inherited(storage, exp, trial, &listed, &lineage);
        parts.push(HistoryPart::of(storage, exp, trial, &listed, attempt, None));
        return Ok(HistoryPlan {
            attempt: Some(attempt),
            parts,
        });
    }
    Ok(HistoryPlan {
        attempt: None,
        parts: vec![HistoryPart {
            attempt: None,
            keys: vec![storage.legacy_metrics_key(exp, trial)],
            tagged: None,
            limit: None,
        }],
    })
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
    let plan = plan_history(storage, exp, trial).await?;
    for part in &plan.parts {
        part.lines(storage).visit(visit).await?;
    }
    Ok(plan.attempt)
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

    /// File storage hands an object over in chunks: lines cut across them come out whole.
    #[tokio::test]
    async fn lines_cut_across_read_chunks_come_out_whole() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&StorageUri::from_dir(dir.path()).unwrap(), &Default::default()).unwrap();
        let lines: Vec<String> = (0..20_000)
            .map(|i| format!("{{\"step\":{i},\"x\":\"{}\"}}", "y".repeat(i % 97)))
            .collect();
        let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
        assert!(body.len() > 1 << 20);
        segment(&s, 1, 0, &body).await;
        let plan = plan_history(&s, E, T).await.unwrap();
        assert_eq!((plan.attempt, plan.parts.len()), (Some(1), 1));
        let mut reader = plan.parts[0].lines(&s);
        let mut got = Vec::new();
        while let Some(l) = reader.next_line().await.unwrap() {
            got.push(l);
        }
        assert!(got == lines, "{} lines read back", got.len());
    }
}
