//! The coordinator's durable state: one SQLite database in WAL mode in the data directory.
//!
//! The coordinator is its only writer, through one thread ([`writer`]) that owns the
//! connection: changes queue there in batches, and each group of batches is committed in one
//! transaction with `synchronous=FULL` before any of them is acknowledged or acted on.
//! Everything the coordinator knows at start is read back from here. Rows hold domain names
//! (`"running"`), never protobuf numbers.
//!
//! What is written per report stays small and flat: a trial row (updated in place), and one
//! searcher journal entry. A searcher's state is a snapshot plus the journal of calls made on
//! it since; the snapshot is rewritten only once the journal outweighs it, so the bytes written
//! per report do not grow with the sweep. An experiment's spec is written once, when it is
//! created. Metric history is not kept here: it lives in the experiment's storage, written by
//! the workers; the store counts, per attempt, the lines it acknowledged.
//!
//! Each store has a cluster id, random and made with it (or added to a store that predates
//! it), kept for its life: experiment storage paths include it, so a fresh store never meets
//! another store's records under the same storage prefix.

pub mod backup;
pub mod lock;
pub mod writer;

/// The database file inside the data directory.
pub const DB_FILE: &str = "chorus.db";

use crate::cluster::WorkerEpoch;
use crate::experiment::lifecycle::{Deletion, Lifecycle};
use crate::trial::{Live, RankLive, TrialRecord};
use chorus_core::convert::{ExperimentState, TrialState};
use chorus_core::{ExperimentId, TrialId, WorkerId};
use rusqlite::{Connection, OptionalExtension, params};
use std::path::{Path, PathBuf};

const SCHEMA_VERSION: i64 = 7;

/// Brings a store of an older schema up to [`SCHEMA_VERSION`], one step at a time.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "ALTER TABLE trials ADD COLUMN live_ranks TEXT NOT NULL DEFAULT '';
     ALTER TABLE trials ADD COLUMN data_position TEXT NOT NULL DEFAULT '';",
    ),
    (2, "ALTER TABLE trials ADD COLUMN exploit_from INTEGER;"),
    (
        3,
        "ALTER TABLE trials ADD COLUMN checkpoint_attempt INTEGER NOT NULL DEFAULT 0;",
    ),
    // Searcher state moves out of the experiment row into a snapshot and a journal; metric
    // history (kept in storage) is replaced by the count of acknowledged lines per attempt.
    (
        4,
        "CREATE TABLE searcher_snapshots (experiment_id INTEGER PRIMARY KEY, seq INTEGER NOT NULL, state TEXT NOT NULL);
     CREATE TABLE searcher_journal (experiment_id INTEGER NOT NULL, seq INTEGER NOT NULL, call TEXT NOT NULL,
         PRIMARY KEY (experiment_id, seq));
     INSERT INTO searcher_snapshots (experiment_id, seq, state) SELECT id, 0, searcher_state FROM experiments;
     UPDATE experiments SET searcher_state = '';
     ALTER TABLE trials ADD COLUMN acked_metrics TEXT NOT NULL DEFAULT '';
     UPDATE trials SET acked_metrics = COALESCE((SELECT json_group_object(attempt, n)
         FROM (SELECT attempt, COUNT(*) AS n FROM metrics WHERE trial_id = trials.id GROUP BY attempt)), '');
     DROP TABLE metrics;",
    ),
    (
        5,
        "CREATE TABLE IF NOT EXISTS worker_epochs (worker_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, instance TEXT NOT NULL,
         registered_ms INTEGER NOT NULL);",
    ),
    // Experiment lifecycle: labels, a note, archival, a deletion in progress, and the
    // experiment a continued one came from.
    (6, LIFECYCLE_COLUMNS),
];

const LIFECYCLE_COLUMNS: &str = "ALTER TABLE experiments ADD COLUMN labels TEXT NOT NULL DEFAULT '';
     ALTER TABLE experiments ADD COLUMN note TEXT NOT NULL DEFAULT '';
     ALTER TABLE experiments ADD COLUMN archived INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE experiments ADD COLUMN deleting TEXT NOT NULL DEFAULT '';
     ALTER TABLE experiments ADD COLUMN continued_from INTEGER;";

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS experiments (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    spec_yaml TEXT NOT NULL,
    state TEXT NOT NULL,
    storage TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    ended_ms INTEGER NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    max_trials INTEGER NOT NULL,
    parallel_trials INTEGER NOT NULL,
    max_failed_trials INTEGER,
    -- Unused since searcher state has tables of its own; kept so older stores need no rewrite.
    searcher_state TEXT NOT NULL DEFAULT '',
    created_trials INTEGER NOT NULL DEFAULT 0,
    -- Labels as a JSON object; empty when none.
    labels TEXT NOT NULL DEFAULT '',
    note TEXT NOT NULL DEFAULT '',
    archived INTEGER NOT NULL DEFAULT 0,
    -- A deletion begun and not finished: 'all' or 'keep-best:N'; empty when none.
    deleting TEXT NOT NULL DEFAULT '',
    continued_from INTEGER
);
CREATE TABLE IF NOT EXISTS trials (
    id INTEGER PRIMARY KEY,
    experiment_id INTEGER NOT NULL REFERENCES experiments(id),
    seq INTEGER NOT NULL,
    params TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    restarts INTEGER NOT NULL,
    live_worker TEXT,
    live_started INTEGER NOT NULL DEFAULT 0,
    live_assigned_ms INTEGER NOT NULL DEFAULT 0,
    live_started_ms INTEGER NOT NULL DEFAULT 0,
    last_seq INTEGER NOT NULL DEFAULT 0,
    best_value REAL,
    best_step INTEGER,
    last_metrics TEXT NOT NULL DEFAULT '',
    started_ms INTEGER NOT NULL DEFAULT 0,
    ended_ms INTEGER NOT NULL DEFAULT 0,
    run_ms INTEGER NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    checkpoint_step INTEGER,
    malformed INTEGER NOT NULL DEFAULT 0,
    -- Every rank of the live attempt as JSON ([{worker, started, last_seq, finished}]); the
    -- live_* columns above describe rank 0.
    live_ranks TEXT NOT NULL DEFAULT '',
    data_position TEXT NOT NULL DEFAULT '',
    exploit_from INTEGER,
    checkpoint_attempt INTEGER NOT NULL DEFAULT 0,
    -- Metric lines acknowledged per attempt, as a JSON object {"attempt": count}.
    acked_metrics TEXT NOT NULL DEFAULT '',
    UNIQUE (experiment_id, seq)
);
CREATE TABLE IF NOT EXISTS searcher_snapshots (
    experiment_id INTEGER PRIMARY KEY,
    -- The last journal entry the snapshot includes.
    seq INTEGER NOT NULL,
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS searcher_journal (
    experiment_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    call TEXT NOT NULL,
    PRIMARY KEY (experiment_id, seq)
);
CREATE TABLE IF NOT EXISTS attempts (
    trial_id INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    worker_id TEXT NOT NULL,
    assigned_ms INTEGER NOT NULL,
    ended_ms INTEGER NOT NULL DEFAULT 0,
    outcome TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (trial_id, attempt)
);
-- Each worker id's newest registration: a call carrying an older epoch is fenced.
CREATE TABLE IF NOT EXISTS worker_epochs (
    worker_id TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    instance TEXT NOT NULL,
    registered_ms INTEGER NOT NULL
);
"#;

pub struct Store {
    conn: Connection,
    path: PathBuf,
    cluster_id: String,
    /// Opened read-only because a full disk left no room to open it for writing; the first
    /// commit that finds room opens it again for writing.
    read_only: bool,
}

/// An experiment row as stored; the experiment module turns it back into a live experiment.
#[derive(Debug, Clone)]
pub struct ExperimentRow {
    pub id: ExperimentId,
    pub name: String,
    /// Read at load; written only with a new experiment (a spec never changes).
    pub spec_yaml: Option<String>,
    pub state: ExperimentState,
    pub storage: String,
    pub created_ms: i64,
    pub ended_ms: i64,
    pub message: String,
    pub max_trials: u64,
    pub parallel_trials: u32,
    pub max_failed_trials: Option<u64>,
    pub created_trials: u64,
    pub lifecycle: Lifecycle,
}

/// A searcher's saved state as stored: the newest snapshot and the calls made since, kept as
/// text so the experiment decides what a state it cannot read means.
#[derive(Debug, Clone, Default)]
pub struct SearcherRecord {
    /// The snapshot and the last journal entry it includes.
    pub snapshot: Option<(u64, String)>,
    /// Journal entries after the snapshot, in order.
    pub journal: Vec<(u64, String)>,
}

/// A write to a searcher's saved state.
#[derive(Debug, Clone)]
pub enum SearcherWrite {
    /// A new snapshot including every journal entry up to `seq`, which are then dropped.
    Snapshot {
        experiment: ExperimentId,
        seq: u64,
        state: String,
    },
    Journal {
        experiment: ExperimentId,
        seq: u64,
        call: String,
    },
}

/// One placement of a trial on a worker, opened when assigned and closed when it ends.
#[derive(Debug, Clone)]
pub struct AttemptRow {
    pub trial: TrialId,
    pub attempt: u32,
    pub worker: WorkerId,
    pub assigned_ms: i64,
    pub ended_ms: i64,
    pub outcome: String,
}

/// Everything one change writes, committed together.
#[derive(Debug, Default)]
pub struct Batch {
    pub experiments: Vec<ExperimentRow>,
    pub trials: Vec<TrialRecord>,
    pub searchers: Vec<SearcherWrite>,
    pub attempts: Vec<AttemptRow>,
    /// Worker registrations, in order (the newest of a worker id wins).
    pub epochs: Vec<WorkerEpoch>,
    /// The workers drained of new trials, when the set changed.
    pub drained: Option<Vec<WorkerId>>,
    /// Experiments whose rows go, with their trials, attempts and searcher state.
    pub removed_experiments: Vec<ExperimentId>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.experiments.is_empty()
            && self.trials.is_empty()
            && self.searchers.is_empty()
            && self.attempts.is_empty()
            && self.epochs.is_empty()
            && self.drained.is_none()
            && self.removed_experiments.is_empty()
    }
}

fn parse_state<T: std::str::FromStr>(s: String, idx: usize) -> rusqlite::Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    s.parse()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e)))
}

impl Store {
    /// Opens (or creates) the store. On a full disk, a store that was closed cleanly is opened
    /// read-only rather than not at all: the coordinator then serves reads, answers changes
    /// with "disk full", and becomes writable by itself once there is room.
    pub fn open(path: &Path) -> rusqlite::Result<Store> {
        match Self::open_writable(path) {
            Ok(s) => Ok(s),
            Err(e) if path.exists() && crate::error::disk_full(path) => match Self::open_read_only(path) {
                Ok(s) => {
                    tracing::warn!(store = %path.display(), error = %e, "disk full: store opened read-only");
                    Ok(s)
                }
                Err(_) => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Reads the main database file alone, which holds everything only when the write-ahead
    /// log is empty (the store was closed cleanly): otherwise this fails.
    fn open_read_only(path: &Path) -> rusqlite::Result<Store> {
        let refuse = |why: &str| rusqlite::Error::InvalidPath(PathBuf::from(format!("{}: {why}", path.display())));
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        if std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0) {
            return Err(refuse("its write-ahead log holds commits"));
        }
        let text = path.to_str().ok_or_else(|| refuse("not UTF-8"))?;
        let uri = format!(
            "file:{}?immutable=1",
            text.replace('%', "%25").replace('?', "%3f").replace('#', "%23")
        );
        let conn = Connection::open_with_flags(
            uri,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI,
        )?;
        let version: String =
            conn.query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0))?;
        if version != SCHEMA_VERSION.to_string() {
            return Err(refuse("its schema needs migrating"));
        }
        let cluster_id = conn.query_row("SELECT value FROM meta WHERE key = 'cluster_id'", [], |r| r.get(0))?;
        Ok(Store {
            conn,
            path: path.to_path_buf(),
            cluster_id,
            read_only: true,
        })
    }

    /// Makes a read-only store writable, when the disk now has room.
    fn writable(&mut self) -> rusqlite::Result<()> {
        if self.read_only {
            let s = Self::open_writable(&self.path)?;
            if s.cluster_id != self.cluster_id {
                return Err(rusqlite::Error::InvalidPath(self.path.clone()));
            }
            self.conn = s.conn;
            self.read_only = false;
            tracing::info!(store = %self.path.display(), "store opened for writing again");
        }
        Ok(())
    }

    fn open_writable(path: &Path) -> rusqlite::Result<Store> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a commit has reached the disk before we acknowledge it.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0))
            .optional()
            // A new database has no meta table yet.
            .or_else(|e| match e {
                rusqlite::Error::SqliteFailure(_, Some(ref m)) if m.contains("no such table") => Ok(None),
                e => Err(e),
            })?;
        match version.map(|v| v.parse::<i64>().unwrap_or(-1)) {
            None => {
                conn.execute_batch(SCHEMA)?;
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)",
                    [SCHEMA_VERSION.to_string()],
                )?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(mut v) if (1..SCHEMA_VERSION).contains(&v) => {
                let tx = conn.unchecked_transaction()?;
                while v < SCHEMA_VERSION {
                    let (_, sql) = MIGRATIONS
                        .iter()
                        .find(|(from, _)| *from == v)
                        .expect("a migration per version");
                    tx.execute_batch(sql)?;
                    v += 1;
                }
                tx.execute(
                    "UPDATE meta SET value = ?1 WHERE key = 'schema_version'",
                    [SCHEMA_VERSION.to_string()],
                )?;
                tx.commit()?;
            }
            Some(v) => {
                return Err(rusqlite::Error::InvalidParameterName(format!(
                    "store schema version {v} is not supported by this coordinator (expects {SCHEMA_VERSION})"
                )));
            }
        }
        let cluster_id = match conn
            .query_row("SELECT value FROM meta WHERE key = 'cluster_id'", [], |r| r.get(0))
            .optional()?
        {
            Some(id) => id,
            None => {
                let id = format!("{:016x}", rand::random::<u64>());
                conn.execute("INSERT INTO meta (key, value) VALUES ('cluster_id', ?1)", [&id])?;
                id
            }
        };
        Ok(Store {
            conn,
            path: path.to_path_buf(),
            cluster_id,
            read_only: false,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This store's cluster id: 16 hex digits, the same for the store's whole life.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// Caps the database at its current size plus `extra_pages`, or lifts the cap (`None`):
    /// a real `SQLITE_FULL` for tests, without filling a disk.
    #[cfg(test)]
    pub fn cap_pages(&self, extra_pages: Option<u64>) {
        let count: u64 = self.conn.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
        let max = extra_pages.map_or(u32::MAX as u64 - 1, |e| count + e);
        let _: u64 = self
            .conn
            .query_row(&format!("PRAGMA max_page_count = {max}"), [], |r| r.get(0))
            .unwrap();
    }

    pub fn load_experiments(&self) -> rusqlite::Result<Vec<ExperimentRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, name, spec_yaml, state, storage, created_ms, ended_ms, message, max_trials, parallel_trials,
                    max_failed_trials, created_trials, labels, note, archived, deleting, continued_from
             FROM experiments ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(ExperimentRow {
                id: ExperimentId(r.get::<_, i64>(0)? as u64),
                name: r.get(1)?,
                spec_yaml: Some(r.get(2)?),
                state: parse_state(r.get(3)?, 3)?,
                storage: r.get(4)?,
                created_ms: r.get(5)?,
                ended_ms: r.get(6)?,
                message: r.get(7)?,
                max_trials: r.get::<_, i64>(8)? as u64,
                parallel_trials: r.get::<_, i64>(9)? as u32,
                max_failed_trials: r.get::<_, Option<i64>>(10)?.map(|v| v as u64),
                created_trials: r.get::<_, i64>(11)? as u64,
                lifecycle: Lifecycle {
                    labels: {
                        let text: String = r.get(12)?;
                        if text.is_empty() {
                            Default::default()
                        } else {
                            serde_json::from_str(&text).map_err(|e| {
                                rusqlite::Error::FromSqlConversionFailure(12, rusqlite::types::Type::Text, Box::new(e))
                            })?
                        }
                    },
                    note: r.get(13)?,
                    archived: r.get::<_, i64>(14)? != 0,
                    deleting: Deletion::from_stored(&r.get::<_, String>(15)?).map_err(|e| {
                        rusqlite::Error::FromSqlConversionFailure(15, rusqlite::types::Type::Text, e.into())
                    })?,
                    continued_from: r.get::<_, Option<i64>>(16)?.map(|v| ExperimentId(v as u64)),
                },
            })
        })?;
        rows.collect()
    }

    pub fn load_trials(&self) -> rusqlite::Result<Vec<TrialRecord>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, experiment_id, seq, params, state, attempt, restarts, live_worker, live_started,
                    live_assigned_ms, live_started_ms, last_seq, best_value, best_step, last_metrics, started_ms,
                    ended_ms, run_ms, message, checkpoint_step, malformed, live_ranks, data_position,
                    exploit_from, checkpoint_attempt, acked_metrics FROM trials ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            let live_worker: Option<String> = r.get(7)?;
            Ok(TrialRecord {
                id: TrialId(r.get::<_, i64>(0)? as u64),
                experiment: ExperimentId(r.get::<_, i64>(1)? as u64),
                seq: r.get::<_, i64>(2)? as u64,
                params: serde_json::from_str(&r.get::<_, String>(3)?).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(3, rusqlite::types::Type::Text, Box::new(e))
                })?,
                state: parse_state::<TrialState>(r.get(4)?, 4)?,
                attempt: r.get::<_, i64>(5)? as u32,
                restarts: r.get::<_, i64>(6)? as u32,
                live: match live_worker {
                    Some(w) => {
                        let ranks_json: String = r.get(21)?;
                        let ranks = if ranks_json.is_empty() {
                            // Written before multi-rank attempts: rank 0 is all there is.
                            vec![RankLive {
                                started: r.get::<_, i64>(8)? != 0,
                                last_seq: r.get::<_, i64>(11)? as u64,
                                ..RankLive::new(WorkerId(w))
                            }]
                        } else {
                            serde_json::from_str(&ranks_json).map_err(|e| {
                                rusqlite::Error::FromSqlConversionFailure(21, rusqlite::types::Type::Text, Box::new(e))
                            })?
                        };
                        Some(Live {
                            ranks,
                            assigned_ms: r.get(9)?,
                            started_ms: r.get(10)?,
                        })
                    }
                    None => None,
                },
                best_value: r.get(12)?,
                best_step: r.get(13)?,
                last_metrics: r.get(14)?,
                started_ms: r.get(15)?,
                ended_ms: r.get(16)?,
                run_ms: r.get(17)?,
                message: r.get(18)?,
                checkpoint_step: r.get(19)?,
                malformed: r.get::<_, i64>(20)? as u64,
                data_position: r.get(22)?,
                exploit_from: r.get::<_, Option<i64>>(23)?.map(|v| TrialId(v as u64)),
                checkpoint_attempt: r.get::<_, i64>(24)? as u32,
                acked_metrics: {
                    let text: String = r.get(25)?;
                    if text.is_empty() {
                        Default::default()
                    } else {
                        serde_json::from_str(&text).map_err(|e| {
                            rusqlite::Error::FromSqlConversionFailure(25, rusqlite::types::Type::Text, Box::new(e))
                        })?
                    }
                },
            })
        })?;
        rows.collect()
    }

    /// The workers drained of new trials (kept in `meta`: a short list that outlives every
    /// worker's registration).
    pub fn load_drained(&self) -> rusqlite::Result<Vec<WorkerId>> {
        let json: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'drained_workers'", [], |r| r.get(0))
            .optional()?;
        Ok(json
            .and_then(|j| serde_json::from_str::<Vec<String>>(&j).ok())
            .unwrap_or_default()
            .into_iter()
            .map(WorkerId)
            .collect())
    }

    /// Every worker id's newest registration.
    pub fn load_worker_epochs(&self) -> rusqlite::Result<Vec<WorkerEpoch>> {
        let mut stmt = self
            .conn
            .prepare("SELECT worker_id, epoch, instance, registered_ms FROM worker_epochs")?;
        let rows = stmt.query_map([], |r| {
            Ok(WorkerEpoch {
                worker: WorkerId(r.get(0)?),
                epoch: r.get::<_, i64>(1)? as u64,
                instance: r.get(2)?,
                registered_ms: r.get(3)?,
            })
        })?;
        rows.collect()
    }

    /// Every experiment's saved searcher state: its snapshot and the journal after it.
    pub fn load_searchers(&self) -> rusqlite::Result<std::collections::BTreeMap<ExperimentId, SearcherRecord>> {
        let mut out: std::collections::BTreeMap<ExperimentId, SearcherRecord> = Default::default();
        let mut stmt = self
            .conn
            .prepare("SELECT experiment_id, seq, state FROM searcher_snapshots")?;
        for row in stmt.query_map([], |r| {
            Ok((
                ExperimentId(r.get::<_, i64>(0)? as u64),
                r.get::<_, i64>(1)? as u64,
                r.get(2)?,
            ))
        })? {
            let (id, seq, state) = row?;
            out.entry(id).or_default().snapshot = Some((seq, state));
        }
        let mut stmt = self
            .conn
            .prepare("SELECT experiment_id, seq, call FROM searcher_journal ORDER BY experiment_id, seq")?;
        for row in stmt.query_map([], |r| {
            Ok((
                ExperimentId(r.get::<_, i64>(0)? as u64),
                r.get::<_, i64>(1)? as u64,
                r.get(2)?,
            ))
        })? {
            let (id, seq, call) = row?;
            let rec = out.entry(id).or_default();
            // Entries the snapshot already includes (a crash between the two writes cannot
            // happen: they share a transaction; this keeps a replay exact regardless).
            if rec.snapshot.as_ref().is_none_or(|(s, _)| seq > *s) {
                rec.journal.push((seq, call));
            }
        }
        Ok(out)
    }

    /// Writes a batch in one durable transaction.
    pub fn commit(&mut self, batch: &Batch) -> rusqlite::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.writable()?;
        let tx = self.conn.transaction()?;
        if let Some(drained) = &batch.drained {
            let ids: Vec<&str> = drained.iter().map(|w| w.0.as_str()).collect();
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('drained_workers', ?1)",
                params![serde_json::to_string(&ids).expect("strings serialise")],
            )?;
        }
        {
            // New experiments carry their spec; every later write is an update of the few
            // columns that change (no delete and re-insert: that would check every trial's
            // foreign key).
            let mut insert_exp = tx.prepare_cached(
                "INSERT INTO experiments (id, name, spec_yaml, state, storage, created_ms, ended_ms, message,
                    max_trials, parallel_trials, max_failed_trials, created_trials, labels, note, archived, deleting,
                    continued_from)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
            )?;
            let mut update_exp = tx.prepare_cached(
                "UPDATE experiments SET state = ?2, ended_ms = ?3, message = ?4, max_trials = ?5, parallel_trials = ?6,
                    max_failed_trials = ?7, created_trials = ?8, labels = ?9, note = ?10, archived = ?11,
                    deleting = ?12 WHERE id = ?1",
            )?;
            for e in &batch.experiments {
                let l = &e.lifecycle;
                let labels = if l.labels.is_empty() {
                    String::new()
                } else {
                    serde_json::to_string(&l.labels).expect("labels serialise")
                };
                let deleting = l.deleting.map(|d| d.as_stored()).unwrap_or_default();
                match &e.spec_yaml {
                    Some(spec) => insert_exp.execute(params![
                        e.id.0 as i64,
                        e.name,
                        spec,
                        e.state.as_str(),
                        e.storage,
                        e.created_ms,
                        e.ended_ms,
                        e.message,
                        e.max_trials as i64,
                        e.parallel_trials as i64,
                        e.max_failed_trials.map(|v| v as i64),
                        e.created_trials as i64,
                        labels,
                        l.note,
                        l.archived as i64,
                        deleting,
                        l.continued_from.map(|v| v.0 as i64),
                    ])?,
                    None => update_exp.execute(params![
                        e.id.0 as i64,
                        e.state.as_str(),
                        e.ended_ms,
                        e.message,
                        e.max_trials as i64,
                        e.parallel_trials as i64,
                        e.max_failed_trials.map(|v| v as i64),
                        e.created_trials as i64,
                        labels,
                        l.note,
                        l.archived as i64,
                        deleting,
                    ])?,
                };
            }
            let mut put_trial = tx.prepare_cached(
                "INSERT INTO trials (id, experiment_id, seq, params, state, attempt, restarts, live_worker,
                    live_started, live_assigned_ms, live_started_ms, last_seq, best_value, best_step, last_metrics,
                    started_ms, ended_ms, run_ms, message, checkpoint_step, malformed, live_ranks, data_position, exploit_from,
                    checkpoint_attempt, acked_metrics)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21,
                    ?22, ?23, ?24, ?25, ?26)
                 ON CONFLICT (id) DO UPDATE SET params = excluded.params, state = excluded.state,
                    attempt = excluded.attempt, restarts = excluded.restarts, live_worker = excluded.live_worker,
                    live_started = excluded.live_started, live_assigned_ms = excluded.live_assigned_ms,
                    live_started_ms = excluded.live_started_ms, last_seq = excluded.last_seq,
                    best_value = excluded.best_value, best_step = excluded.best_step,
                    last_metrics = excluded.last_metrics, started_ms = excluded.started_ms,
                    ended_ms = excluded.ended_ms, run_ms = excluded.run_ms, message = excluded.message,
                    checkpoint_step = excluded.checkpoint_step, malformed = excluded.malformed,
                    live_ranks = excluded.live_ranks, data_position = excluded.data_position,
                    exploit_from = excluded.exploit_from, checkpoint_attempt = excluded.checkpoint_attempt,
                    acked_metrics = excluded.acked_metrics",
            )?;
            for t in &batch.trials {
                put_trial.execute(params![
                    t.id.0 as i64,
                    t.experiment.0 as i64,
                    t.seq as i64,
                    serde_json::to_string(&t.params).expect("params serialise"),
                    t.state.as_str(),
                    t.attempt as i64,
                    t.restarts as i64,
                    t.live.as_ref().map(|l| l.ranks[0].worker.0.clone()),
                    t.live.as_ref().is_some_and(|l| l.ranks[0].started) as i64,
                    t.live.as_ref().map_or(0, |l| l.assigned_ms),
                    t.live.as_ref().map_or(0, |l| l.started_ms),
                    t.live.as_ref().map_or(0, |l| l.ranks[0].last_seq) as i64,
                    t.best_value,
                    t.best_step,
                    t.last_metrics,
                    t.started_ms,
                    t.ended_ms,
                    t.run_ms,
                    t.message,
                    t.checkpoint_step,
                    t.malformed as i64,
                    t.live
                        .as_ref()
                        .map(|l| serde_json::to_string(&l.ranks).expect("ranks serialise"))
                        .unwrap_or_default(),
                    t.data_position,
                    t.exploit_from.map(|t| t.0 as i64),
                    t.checkpoint_attempt as i64,
                    if t.acked_metrics.is_empty() {
                        String::new()
                    } else {
                        serde_json::to_string(&t.acked_metrics).expect("counts serialise")
                    },
                ])?;
            }
            let mut snapshot = tx.prepare_cached(
                "INSERT OR REPLACE INTO searcher_snapshots (experiment_id, seq, state) VALUES (?1, ?2, ?3)",
            )?;
            let mut compact =
                tx.prepare_cached("DELETE FROM searcher_journal WHERE experiment_id = ?1 AND seq <= ?2")?;
            let mut journal = tx.prepare_cached(
                "INSERT OR REPLACE INTO searcher_journal (experiment_id, seq, call) VALUES (?1, ?2, ?3)",
            )?;
            for w in &batch.searchers {
                match w {
                    SearcherWrite::Snapshot { experiment, seq, state } => {
                        snapshot.execute(params![experiment.0 as i64, *seq as i64, state])?;
                        compact.execute(params![experiment.0 as i64, *seq as i64])?;
                    }
                    SearcherWrite::Journal { experiment, seq, call } => {
                        journal.execute(params![experiment.0 as i64, *seq as i64, call])?;
                    }
                }
            }
            // An attempt's row is opened at placement and closed at its end; closing keeps the
            // time it was assigned.
            let mut put_attempt = tx.prepare_cached(
                "INSERT INTO attempts (trial_id, attempt, worker_id, assigned_ms, ended_ms, outcome)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (trial_id, attempt) DO UPDATE SET worker_id = excluded.worker_id,
                    assigned_ms = CASE WHEN excluded.assigned_ms > 0 THEN excluded.assigned_ms ELSE attempts.assigned_ms END,
                    ended_ms = excluded.ended_ms, outcome = excluded.outcome",
            )?;
            let mut put_epoch = tx.prepare_cached(
                "INSERT OR REPLACE INTO worker_epochs (worker_id, epoch, instance, registered_ms) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for e in &batch.epochs {
                put_epoch.execute(params![e.worker.0, e.epoch as i64, e.instance, e.registered_ms])?;
            }
            for a in &batch.attempts {
                put_attempt.execute(params![
                    a.trial.0 as i64,
                    a.attempt as i64,
                    a.worker.0,
                    a.assigned_ms,
                    a.ended_ms,
                    a.outcome
                ])?;
            }
            // Last: a removal wins over any update of the same experiment in the batch.
            for id in &batch.removed_experiments {
                let id = id.0 as i64;
                tx.execute(
                    "DELETE FROM attempts WHERE trial_id IN (SELECT id FROM trials WHERE experiment_id = ?1)",
                    [id],
                )?;
                tx.execute("DELETE FROM trials WHERE experiment_id = ?1", [id])?;
                tx.execute("DELETE FROM searcher_journal WHERE experiment_id = ?1", [id])?;
                tx.execute("DELETE FROM searcher_snapshots WHERE experiment_id = ?1", [id])?;
                tx.execute("DELETE FROM experiments WHERE id = ?1", [id])?;
            }
        }
        tx.commit()
    }
}
