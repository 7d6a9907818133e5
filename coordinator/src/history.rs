//! A trial's metric history streamed out of object storage in pages of bounded size, for
//! `TrialMetrics`.
//!
//! The history is read the way `chorus_core::history` plans it (the newest attempt's lineage,
//! then that attempt's own lines), one line at a time, and each page goes out through a
//! bounded channel once it is full: memory stays at a page and a line whatever the history
//! holds, and a client that stops reading stops the reading. Nothing here takes the
//! coordinator's lock.
//!
//! A point's cursor is its place in the history: the attempt whose records hold it, and its
//! index among that attempt's lines in the history (whether or not a filter kept them).
//! Attempts appear in increasing order, so cursors do too, and a cursor keeps its meaning when a
//! restarted trial's history grows by a new attempt: the new attempt's lines come after it.

use crate::error::CoordError;
use chorus_core::history::plan_history;
use chorus_core::storage::Storage;
use chorus_core::{CoreError, ExperimentId, TrialId};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use tokio::sync::mpsc;

/// Points in a page when the request names no size.
pub const DEFAULT_PAGE_POINTS: u32 = 1_000;
/// Most points in a page; a larger request gets this many.
pub const MAX_PAGE_POINTS: u32 = 10_000;
/// A page ends once its points take about this much on the wire. A stored line is at most
/// 1 MiB and its point at most a few times that, so a page stays far below the message limit.
pub const PAGE_BYTES: usize = 1024 * 1024;
/// Most metric names one request may filter by.
pub const MAX_FILTER_NAMES: usize = 1_000;

/// Where a point stands in a trial's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    /// The attempt whose records hold the point; 0 for a trial recorded before the per-attempt
    /// layout, read whole from its one file.
    attempt: u32,
    /// Its index among that attempt's lines in the history.
    index: u64,
}

impl Cursor {
    /// `""` is the start; anything else must be a cursor this module wrote.
    pub fn parse(s: &str) -> Result<Option<Cursor>, CoordError> {
        if s.is_empty() {
            return Ok(None);
        }
        let parsed = s.split_once('.').and_then(|(a, i)| {
            let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
            (digits(a) && digits(i)).then_some(())?;
            Some(Cursor {
                attempt: a.parse().ok()?,
                index: i.parse().ok()?,
            })
        });
        parsed.map(Some).ok_or_else(|| {
            CoordError::InvalidArgument(format!(
                "after {s:?} is not a metrics cursor: pass the cursor of a page received earlier, or none to \
                 start at the beginning"
            ))
        })
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.attempt, self.index)
    }
}

/// One metric report of the history, with the requested metrics only.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub step: Option<i64>,
    pub attempt: u32,
    pub values: BTreeMap<String, f64>,
}

impl Point {
    /// An upper bound of the point's size as a protobuf message: per value, its name plus the
    /// map entry's tags, lengths and the double; then the step, the attempt and the framing.
    fn wire_bytes(&self) -> usize {
        32 + self.values.keys().map(|k| k.len() + 20).sum::<usize>()
    }
}

/// Points in history order, and the cursor of the last one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Page {
    pub points: Vec<Point>,
    pub cursor: String,
}

/// Which points a reader wants, checked before anything is read.
#[derive(Debug, Clone)]
pub struct Query {
    /// Empty: every metric.
    metrics: BTreeSet<String>,
    min_step: Option<i64>,
    max_step: Option<i64>,
    page_points: usize,
    after: Option<Cursor>,
}

impl Query {
    pub fn new(
        metrics: Vec<String>,
        min_step: Option<i64>,
        max_step: Option<i64>,
        page_size: u32,
        after: &str,
    ) -> Result<Query, CoordError> {
        let bad = |m: String| Err(CoordError::InvalidArgument(m));
        if metrics.len() > MAX_FILTER_NAMES {
            return bad(format!(
                "metrics: {} names, over the limit of {MAX_FILTER_NAMES}",
                metrics.len()
            ));
        }
        if metrics.iter().any(String::is_empty) {
            return bad("metrics: a metric name must not be empty".into());
        }
        if let (Some(lo), Some(hi)) = (min_step, max_step)
            && lo > hi
        {
            return bad(format!("min_step ({lo}) is greater than max_step ({hi})"));
        }
        Ok(Query {
            metrics: metrics.into_iter().collect(),
            min_step,
            max_step,
            page_points: match page_size {
                0 => DEFAULT_PAGE_POINTS,
                n => n.min(MAX_PAGE_POINTS),
            } as usize,
            after: Cursor::parse(after)?,
        })
    }

    /// The point a stored line makes, or `None` when the query leaves it out (or the line is
    /// not a report). A line's own `attempt` tag names its attempt; `part_attempt` is the
    /// fallback for a line without one.
    fn point(&self, line: &str, part_attempt: Option<u32>) -> Option<Point> {
        let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(line) else {
            return None;
        };
        let step = obj.get("step").and_then(Value::as_i64);
        if self.min_step.is_some() || self.max_step.is_some() {
            let s = step?;
            if self.min_step.is_some_and(|lo| s < lo) || self.max_step.is_some_and(|hi| s > hi) {
                return None;
            }
        }
        let attempt = obj
            .get("attempt")
            .and_then(Value::as_u64)
            .and_then(|a| u32::try_from(a).ok())
            .or(part_attempt)
            .unwrap_or(1);
        let values: BTreeMap<String, f64> = obj
            .into_iter()
            .filter(|(k, _)| k != "step" && k != "attempt")
            .filter(|(k, _)| self.metrics.is_empty() || self.metrics.contains(k))
            .filter_map(|(k, v)| v.as_f64().filter(|x| x.is_finite()).map(|x| (k, x)))
            .collect();
        (!values.is_empty()).then_some(Point { step, attempt, values })
    }
}

/// Reads a trial's history and sends it as pages on `tx`, until it is read, the receiver is
/// gone, or reading fails (the error is sent). `uri` names the storage in errors.
pub async fn send_history(
    storage: Storage,
    uri: String,
    exp: ExperimentId,
    trial: TrialId,
    query: Query,
    tx: mpsc::Sender<Result<Page, CoordError>>,
) {
    if let Err(e) = stream_pages(&storage, exp, trial, &query, &tx).await {
        let _ = tx.send(Err(read_error(&uri, trial, e))).await;
    }
}

/// `Ok` once everything was sent or nobody listens any more.
async fn stream_pages(
    storage: &Storage,
    exp: ExperimentId,
    trial: TrialId,
    query: &Query,
    tx: &mpsc::Sender<Result<Page, CoordError>>,
) -> Result<(), CoreError> {
    let plan = plan_history(storage, exp, trial).await?;
    let mut page = Page::default();
    let mut bytes = 0;
    for part in &plan.parts {
        let attempt = part.attempt.unwrap_or(0);
        let skip = match query.after {
            Some(c) if c.attempt > attempt => continue,
            Some(c) if c.attempt == attempt => c.index + 1,
            _ => 0,
        };
        let mut lines = part.lines(storage);
        let mut index = 0u64;
        while let Some(line) = lines.next_line().await? {
            let at = Cursor { attempt, index };
            index += 1;
            // A filter that keeps nothing must not read on for a client that left.
            if tx.is_closed() {
                return Ok(());
            }
            if at.index < skip {
                continue;
            }
            let Some(point) = query.point(&line, part.attempt) else {
                continue;
            };
            bytes += point.wire_bytes();
            page.points.push(point);
            page.cursor = at.to_string();
            if page.points.len() >= query.page_points || bytes >= PAGE_BYTES {
                bytes = 0;
                if tx.send(Ok(std::mem::take(&mut page))).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
    if !page.points.is_empty() {
        let _ = tx.send(Ok(page)).await;
    }
    Ok(())
}

fn read_error(uri: &str, trial: TrialId, e: CoreError) -> CoordError {
    let what = format!("read the metric history of trial {trial}");
    match e {
        CoreError::ObjectStore(e) => CoordError::storage(uri, &what, &e),
        CoreError::CorruptRecord { key, reason } => {
            CoordError::Storage(format!("storage {uri}: cannot {what}: {key} is damaged: {reason}"))
        }
        other => CoordError::Core(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_core::history::{Inherited, Lineage, write_lineage};
    use chorus_core::storage::{StorageUri, open};
    use object_store::ObjectStoreExt;

    const E: ExperimentId = ExperimentId(1);
    const T: TrialId = TrialId(7);

    fn mem(name: &str) -> Storage {
        open(
            &StorageUri::parse(&format!("memory://{name}")).unwrap(),
            &Default::default(),
        )
        .unwrap()
    }

    async fn segment(s: &Storage, attempt: u32, seg: u32, lines: &[String]) {
        let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
        s.store
            .put(&s.metrics_segment_key(E, T, attempt, seg), body.into())
            .await
            .unwrap();
    }

    fn line(step: i64, attempt: u32) -> String {
        format!(
            "{{\"step\":{step},\"loss\":{},\"acc\":{},\"attempt\":{attempt}}}",
            1.0 / (step + 1) as f64,
            step as f64 / 100.0
        )
    }

    async fn read(s: &Storage, q: Query) -> Result<Vec<Page>, CoordError> {
        let (tx, mut rx) = mpsc::channel(2);
        let task = tokio::spawn(send_history(s.clone(), "memory://t".into(), E, T, q, tx));
        let mut pages = Vec::new();
        while let Some(p) = rx.recv().await {
            pages.push(p?);
        }
        task.await.unwrap();
        Ok(pages)
    }

    fn q(metrics: &[&str], min: Option<i64>, max: Option<i64>, size: u32, after: &str) -> Query {
        Query::new(metrics.iter().map(|m| m.to_string()).collect(), min, max, size, after).unwrap()
    }

    /// Attempt 1 wrote steps 0..50, of which the coordinator acknowledged 40; attempt 2 carried
    /// those over and wrote steps 40..100.
    async fn restarted_trial(name: &str) -> Storage {
        let s = mem(name);
        segment(&s, 1, 0, &(0..30).map(|i| line(i, 1)).collect::<Vec<_>>()).await;
        segment(&s, 1, 1, &(30..50).map(|i| line(i, 1)).collect::<Vec<_>>()).await;
        let lineage = Lineage {
            attempt: 2,
            inherits: vec![Inherited { attempt: 1, lines: 40 }],
        };
        write_lineage(&s, E, T, &lineage).await.unwrap();
        segment(&s, 2, 0, &(40..100).map(|i| line(i, 2)).collect::<Vec<_>>()).await;
        s
    }

    #[tokio::test]
    async fn pages_follow_the_lineage_and_resume_after_any_cursor() {
        let s = restarted_trial("metrics-lineage").await;
        let pages = read(&s, q(&[], None, None, 7, "")).await.unwrap();
        let points: Vec<&Point> = pages.iter().flat_map(|p| &p.points).collect();
        assert_eq!(points.len(), 100);
        assert!(pages.iter().all(|p| p.points.len() <= 7));
        assert_eq!(
            points.iter().map(|p| p.step.unwrap()).collect::<Vec<_>>(),
            (0..100).collect::<Vec<_>>()
        );
        assert!(points[..40].iter().all(|p| p.attempt == 1));
        assert!(points[40..].iter().all(|p| p.attempt == 2));
        assert_eq!(points[3].values.keys().collect::<Vec<_>>(), ["acc", "loss"]);
        assert_eq!(points[3].values["loss"], 0.25);

        // From every page's cursor, the rest comes once, in order.
        for (k, page) in pages.iter().enumerate() {
            let rest = read(&s, q(&[], None, None, 1000, &page.cursor)).await.unwrap();
            let got: Vec<Point> = rest.into_iter().flat_map(|p| p.points).collect();
            let want: Vec<Point> = pages[k + 1..].iter().flat_map(|p| p.points.clone()).collect();
            assert_eq!(got, want, "after {}", page.cursor);
        }
    }

    #[tokio::test]
    async fn filters_keep_the_named_metrics_and_steps_and_cursors_still_resume() {
        let s = restarted_trial("metrics-filter").await;
        let pages = read(&s, q(&["loss", "nope"], Some(35), Some(44), 3, "")).await.unwrap();
        let points: Vec<Point> = pages.iter().flat_map(|p| p.points.clone()).collect();
        assert_eq!(
            points.iter().map(|p| (p.step.unwrap(), p.attempt)).collect::<Vec<_>>(),
            [
                (35, 1),
                (36, 1),
                (37, 1),
                (38, 1),
                (39, 1),
                (40, 2),
                (41, 2),
                (42, 2),
                (43, 2),
                (44, 2)
            ]
        );
        assert!(points.iter().all(|p| p.values.keys().eq(["loss"])));
        // Resuming mid-way with the same filter gives the rest.
        let rest = read(&s, q(&["loss"], Some(35), Some(44), 3, &pages[1].cursor))
            .await
            .unwrap();
        let got: Vec<Point> = rest.into_iter().flat_map(|p| p.points).collect();
        assert_eq!(got, points[6..]);
        // A metric nobody reported: no page at all.
        assert!(read(&s, q(&["nope"], None, None, 0, "")).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn pages_are_bounded_in_bytes_too() {
        let s = mem("metrics-wide");
        // 200 metrics of 64-byte names per line: about 17 KiB a point.
        let wide: String = (0..200)
            .map(|i| format!("\"{i:064}\":{i}"))
            .collect::<Vec<_>>()
            .join(",");
        let lines: Vec<String> = (0..300)
            .map(|st| format!("{{\"step\":{st},{wide},\"attempt\":1}}"))
            .collect();
        segment(&s, 1, 0, &lines).await;
        let pages = read(&s, q(&[], None, None, MAX_PAGE_POINTS, "")).await.unwrap();
        assert_eq!(pages.iter().map(|p| p.points.len()).sum::<usize>(), 300);
        assert!(pages.len() >= 3, "{} pages", pages.len());
        assert!(
            pages
                .iter()
                .all(|p| p.points.iter().map(Point::wire_bytes).sum::<usize>() < 2 * PAGE_BYTES)
        );
    }

    #[tokio::test]
    async fn a_trial_recorded_in_one_shared_file_reads_with_its_tags() {
        let s = mem("metrics-legacy");
        let old = format!("{}\n{}\nnot json\n{}\n", line(1, 1), line(2, 1), line(2, 2));
        s.store.put(&s.legacy_metrics_key(E, T), old.into()).await.unwrap();
        let pages = read(&s, q(&[], None, None, 2, "")).await.unwrap();
        let points: Vec<(i64, u32)> = pages
            .iter()
            .flat_map(|p| &p.points)
            .map(|p| (p.step.unwrap(), p.attempt))
            .collect();
        assert_eq!(points, [(1, 1), (2, 1), (2, 2)]);
        assert_eq!(pages[0].cursor, "0.1");
        // The unparsable line still has its place: the cursor counts it.
        assert_eq!(pages[1].cursor, "0.3");
    }

    #[tokio::test]
    async fn a_reader_that_leaves_stops_the_reading() {
        let s = restarted_trial("metrics-leave").await;
        let (tx, mut rx) = mpsc::channel(1);
        let task = tokio::spawn(send_history(
            s.clone(),
            "memory://t".into(),
            E,
            T,
            q(&[], None, None, 1, ""),
            tx,
        ));
        assert!(rx.recv().await.unwrap().is_ok());
        drop(rx);
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("the reader stopped")
            .unwrap();
    }

    #[test]
    fn bad_requests_are_invalid_arguments() {
        for after in ["x", "1", "1.", ".2", "1.2.3", "-1.2", "1.+2", "99999999999.1"] {
            let e = Query::new(vec![], None, None, 0, after).unwrap_err();
            assert!(
                matches!(&e, CoordError::InvalidArgument(m) if m.contains("not a metrics cursor")),
                "{after}: {e}"
            );
        }
        assert!(Query::new(vec![], Some(5), Some(4), 0, "").is_err());
        assert!(Query::new(vec![String::new()], None, None, 0, "").is_err());
        assert_eq!(
            Query::new(vec![], None, None, u32::MAX, "").unwrap().page_points,
            10_000
        );
        assert_eq!(
            Query::new(vec![], None, None, 0, "3.4").unwrap().after,
            Some(Cursor { attempt: 3, index: 4 })
        );
    }
}
