//! TensorBoard event files for an experiment, written without TensorFlow: one run directory per
//! trial (`trial-{id}`) holding its metric history as scalars, plus the HParams plugin's data, so
//! TensorBoard's HParams tab compares the trials.
//!
//! The layout is the one the HParams plugin reads (see its `plugin_data.proto`): the experiment
//! summary in the top-level (empty) run, and each trial's session start and end info in the
//! trial's own run, next to its scalars (so each metric is `MetricName{group: "", tag}`).
//!
//! This module knows nothing of gRPC: `commands/export.rs` fetches the experiment and hands over
//! an [`Export`]; everything here is a pure function of it except [`write`].

pub mod proto;
pub mod record;

use chorus_core::space::Param;
use prost::Message;
use prost_types::value::Kind;
use proto::{event, h_param_info, h_params_plugin_data, summary_value};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// What TensorBoard reads first in every event file.
const FILE_VERSION: &str = "brain.Event:2";
const PLUGIN_NAME: &str = "hparams";
/// `HParamsPluginData.version` the plugin understands.
const PLUGIN_DATA_VERSION: i32 = 0;
const EXPERIMENT_TAG: &str = "_hparams_/experiment";
const SESSION_START_INFO_TAG: &str = "_hparams_/session_start_info";
const SESSION_END_INFO_TAG: &str = "_hparams_/session_end_info";
/// Our event files end in this, so a re-export replaces only files Chorus wrote.
const FILE_SUFFIX: &str = ".chorus";

/// An experiment as the export needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Export {
    pub name: String,
    pub description: String,
    pub created_secs: f64,
    /// The spec's parameters by name; `None` when the spec could not be read, so hparam types
    /// are taken from the trials' values instead.
    pub space: Option<BTreeMap<String, Param>>,
    /// The experiment's objectives, primary first.
    pub objectives: Vec<String>,
    pub trials: Vec<TrialExport>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrialExport {
    pub id: u64,
    pub params: BTreeMap<String, Value>,
    pub status: SessionStatus,
    pub start_secs: f64,
    /// When it ended; `None` while it may still run.
    pub end_secs: Option<f64>,
    /// Its metric history, oldest report first.
    pub points: Vec<ScalarPoint>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScalarPoint {
    /// `None` for a report without a step: its position in the history stands in.
    pub step: Option<i64>,
    /// When it was reported, where the history knows.
    pub wall_time: Option<f64>,
    pub values: BTreeMap<String, f64>,
}

/// How a trial ended, in the HParams plugin's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionStatus {
    Success,
    Failure,
    Running,
}

/// The run directory of a trial, relative to the output directory.
pub fn run_name(trial: u64) -> String {
    format!("trial-{trial}")
}

/// The events of the top-level run: the experiment summary.
pub fn experiment_events(exp: &Export, now: f64) -> Vec<proto::Event> {
    let summary = proto::Experiment {
        name: exp.name.clone(),
        description: exp.description.clone(),
        user: String::new(),
        time_created_secs: exp.created_secs,
        hparam_infos: hparam_infos(exp),
        metric_infos: metric_names(exp)
            .into_iter()
            .map(|tag| proto::MetricInfo {
                name: Some(proto::MetricName {
                    group: String::new(),
                    tag,
                }),
                ..Default::default()
            })
            .collect(),
    };
    vec![
        file_version(now),
        hparams_event(
            EXPERIMENT_TAG,
            exp.created_secs,
            h_params_plugin_data::Data::Experiment(summary),
        ),
    ]
}

/// The events of one trial's run: session start, one scalar per (step, metric), session end.
pub fn trial_events(trial: &TrialExport, now: f64) -> Vec<proto::Event> {
    let mut events = vec![file_version(now)];
    let hparams = trial.params.iter().map(|(k, v)| (k.clone(), hparam_value(v))).collect();
    events.push(hparams_event(
        SESSION_START_INFO_TAG,
        trial.start_secs,
        h_params_plugin_data::Data::SessionStartInfo(proto::SessionStartInfo {
            hparams,
            group_name: group_name(&trial.params),
            start_time_secs: trial.start_secs,
            ..Default::default()
        }),
    ));
    let mut last_wall = trial.start_secs;
    for (i, point) in trial.points.iter().enumerate() {
        // The history keeps no report times today; a synthetic clock 1 ms per report after the
        // start keeps wall time monotone, which TensorBoard's relative-time axis needs.
        let wall = point
            .wall_time
            .unwrap_or(trial.start_secs + i as f64 * 1e-3)
            .max(last_wall);
        last_wall = wall;
        let step = point.step.unwrap_or(i as i64);
        for (tag, &v) in &point.values {
            events.push(proto::Event {
                wall_time: wall,
                step,
                what: Some(event::What::Summary(proto::Summary {
                    value: vec![proto::SummaryValue {
                        tag: tag.clone(),
                        metadata: None,
                        // TensorBoard's scalar plugin stores f32 (`simple_value`).
                        value: Some(summary_value::Value::SimpleValue(v as f32)),
                    }],
                })),
            });
        }
    }
    if let Some(end) = trial.end_secs {
        let status = match trial.status {
            SessionStatus::Success => proto::Status::Success,
            SessionStatus::Failure => proto::Status::Failure,
            SessionStatus::Running => proto::Status::Running,
        };
        events.push(hparams_event(
            SESSION_END_INFO_TAG,
            end.max(last_wall),
            h_params_plugin_data::Data::SessionEndInfo(proto::SessionEndInfo {
                status: status as i32,
                end_time_secs: end,
            }),
        ));
    }
    events
}

/// Writes the experiment's run and every trial's run under `dir`, replacing the event files an
/// earlier export wrote there (only ours: other tools' files are left alone). Returns the files
/// written.
pub fn write(dir: &Path, exp: &Export, now: f64, host: &str) -> io::Result<Vec<PathBuf>> {
    let mut written = vec![write_run(dir, &experiment_events(exp, now), now, host)?];
    for trial in &exp.trials {
        written.push(write_run(
            &dir.join(run_name(trial.id)),
            &trial_events(trial, now),
            now,
            host,
        )?);
    }
    Ok(written)
}

/// The event file name TensorBoard looks for: `events.out.tfevents.{secs}.{host}` plus a suffix.
pub fn file_name(now: f64, host: &str) -> String {
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("events.out.tfevents.{}.{host}{FILE_SUFFIX}", now as u64)
}

fn write_run(dir: &Path, events: &[proto::Event], now: f64, host: &str) -> io::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    // A run with two event files shows every point twice: drop what an earlier export wrote.
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("events.out.tfevents.") && name.ends_with(FILE_SUFFIX) && entry.file_type()?.is_file() {
            fs::remove_file(entry.path())?;
        }
    }
    let path = dir.join(file_name(now, host));
    let mut out = BufWriter::new(fs::File::create(&path)?);
    for e in events {
        record::write_record(&mut out, &e.encode_to_vec())?;
    }
    out.flush()?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(path)
}

fn file_version(now: f64) -> proto::Event {
    proto::Event {
        wall_time: now,
        step: 0,
        what: Some(event::What::FileVersion(FILE_VERSION.to_string())),
    }
}

/// A summary event carrying HParams plugin data, shaped as tensorboard's own hparams writer
/// shapes it: the data in the metadata, and an empty string tensor as the value.
fn hparams_event(tag: &str, wall_time: f64, data: h_params_plugin_data::Data) -> proto::Event {
    let content = proto::HParamsPluginData {
        version: PLUGIN_DATA_VERSION,
        data: Some(data),
    }
    .encode_to_vec();
    proto::Event {
        wall_time,
        step: 0,
        what: Some(event::What::Summary(proto::Summary {
            value: vec![proto::SummaryValue {
                tag: tag.to_string(),
                metadata: Some(proto::SummaryMetadata {
                    plugin_data: Some(proto::PluginData {
                        plugin_name: PLUGIN_NAME.to_string(),
                        content,
                    }),
                }),
                value: Some(summary_value::Value::Tensor(proto::TensorProto {
                    dtype: proto::DT_STRING,
                    tensor_shape: Some(proto::TensorShapeProto {}),
                    string_val: vec![Vec::new()],
                })),
            }],
        })),
    }
}

/// Sessions with equal hyperparameters form one group in the HParams tab (repeats of a point
/// are then aggregated); the name is the parameters in name order.
fn group_name(params: &BTreeMap<String, Value>) -> String {
    params
        .iter()
        .map(|(k, v)| format!("{k}={}", chorus_core::space::render_value(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// The objectives first, then every other metric some trial reported, by name.
fn metric_names(exp: &Export) -> Vec<String> {
    let mut names = exp.objectives.clone();
    let mut others: Vec<&String> = exp
        .trials
        .iter()
        .flat_map(|t| t.points.iter().flat_map(|p| p.values.keys()))
        .filter(|n| !exp.objectives.contains(n))
        .collect();
    others.sort();
    others.dedup();
    names.extend(others.into_iter().cloned());
    names
}

/// One `HParamInfo` per parameter: from the spec's domains, or, without a spec, from the values
/// the trials took.
fn hparam_infos(exp: &Export) -> Vec<proto::HParamInfo> {
    match &exp.space {
        Some(space) => space.iter().map(|(name, p)| hparam_info(name, p)).collect(),
        None => {
            let mut seen: BTreeMap<&String, Vec<&Value>> = BTreeMap::new();
            for t in &exp.trials {
                for (k, v) in &t.params {
                    seen.entry(k).or_default().push(v);
                }
            }
            seen.into_iter()
                .map(|(name, values)| proto::HParamInfo {
                    name: name.clone(),
                    r#type: data_type(values.iter().copied()) as i32,
                    ..Default::default()
                })
                .collect()
        }
    }
}

fn hparam_info(name: &str, param: &Param) -> proto::HParamInfo {
    let interval = |min: f64, max: f64| {
        (
            proto::DataType::Float64,
            Some(h_param_info::Domain::DomainInterval(proto::Interval {
                min_value: min,
                max_value: max,
            })),
        )
    };
    let discrete = |values: &[Value]| {
        (
            data_type(values.iter()),
            Some(h_param_info::Domain::DomainDiscrete(prost_types::ListValue {
                values: values.iter().map(hparam_value).collect(),
            })),
        )
    };
    let (ty, domain) = match param {
        Param::Constant { value } => discrete(std::slice::from_ref(value)),
        Param::Categorical { values } => discrete(values),
        Param::Uniform { min, max } | Param::LogUniform { min, max } | Param::QUniform { min, max, .. } => {
            interval(*min, *max)
        }
        // TensorBoard has no integer type: integers are float64 with an interval.
        Param::IntUniform { min, max } | Param::LogIntUniform { min, max } => interval(*min as f64, *max as f64),
    };
    proto::HParamInfo {
        name: name.to_string(),
        r#type: ty as i32,
        domain,
        ..Default::default()
    }
}

/// The type of a parameter taking these values: one scalar type shared by all, else string
/// (mixed lists and structured values are shown as their JSON text; see [`hparam_value`]).
fn data_type<'a>(values: impl Iterator<Item = &'a Value>) -> proto::DataType {
    let mut ty = None;
    for v in values {
        let this = match v {
            Value::Number(_) => proto::DataType::Float64,
            Value::Bool(_) => proto::DataType::Bool,
            _ => proto::DataType::String,
        };
        match ty {
            None => ty = Some(this),
            Some(t) if t == this => {}
            Some(_) => return proto::DataType::String,
        }
    }
    ty.unwrap_or(proto::DataType::String)
}

/// A hyperparameter value for TensorBoard, which shows scalars only: numbers, strings and bools
/// as themselves, anything else as its JSON text.
fn hparam_value(v: &Value) -> prost_types::Value {
    let kind = match v {
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::String(s) => Kind::StringValue(s.clone()),
        other => Kind::StringValue(other.to_string()),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn export() -> Export {
        let point = |step: Option<i64>, loss: f64, acc: Option<f64>| ScalarPoint {
            step,
            wall_time: None,
            values: std::iter::once(("loss".to_string(), loss))
                .chain(acc.map(|a| ("acc".to_string(), a)))
                .collect(),
        };
        Export {
            name: "grid".into(),
            description: "a test".into(),
            created_secs: 1_700_000_000.0,
            space: Some(BTreeMap::from([
                (
                    "a".into(),
                    Param::Categorical {
                        values: vec![json!(1), json!(2)],
                    },
                ),
                ("lr".into(), Param::LogUniform { min: 1e-4, max: 0.1 }),
                ("opt".into(), Param::Constant { value: json!("sgd") }),
                ("n".into(), Param::IntUniform { min: 1, max: 8 }),
            ])),
            objectives: vec!["loss".into()],
            trials: vec![
                TrialExport {
                    id: 7,
                    params: BTreeMap::from([
                        ("a".into(), json!(2)),
                        ("lr".into(), json!(0.01)),
                        ("opt".into(), json!("sgd")),
                        ("n".into(), json!(4)),
                    ]),
                    status: SessionStatus::Success,
                    start_secs: 1_700_000_010.0,
                    end_secs: Some(1_700_000_020.0),
                    points: vec![
                        point(Some(1), 3.5, None),
                        point(Some(2), 2.25, Some(0.5)),
                        point(None, 1.0, None),
                    ],
                },
                TrialExport {
                    id: 8,
                    params: BTreeMap::from([("a".into(), json!(1))]),
                    status: SessionStatus::Running,
                    start_secs: 1_700_000_011.0,
                    end_secs: None,
                    points: vec![],
                },
            ],
        }
    }

    fn hparams_data(e: &proto::Event, tag: &str) -> h_params_plugin_data::Data {
        let Some(event::What::Summary(s)) = &e.what else {
            panic!("not a summary: {e:?}")
        };
        assert_eq!(s.value[0].tag, tag);
        let pd = s.value[0].metadata.as_ref().unwrap().plugin_data.as_ref().unwrap();
        assert_eq!(pd.plugin_name, "hparams");
        let data = proto::HParamsPluginData::decode(pd.content.as_slice()).unwrap();
        assert_eq!(data.version, 0);
        data.data.unwrap()
    }

    /// Reads a written file back through the record reader and the Event decoder.
    fn read_events(path: &Path) -> Vec<proto::Event> {
        let bytes = fs::read(path).unwrap();
        record::read_records(&bytes)
            .unwrap()
            .iter()
            .map(|r| proto::Event::decode(r.as_slice()).unwrap())
            .collect()
    }

    #[test]
    fn files_hold_the_version_scalars_and_hparams() {
        let dir = tempfile::tempdir().unwrap();
        let exp = export();
        let files = write(dir.path(), &exp, 1_700_000_100.5, "host one").unwrap();
        assert_eq!(files.len(), 3);
        assert_eq!(files[0].parent().unwrap(), dir.path());
        assert_eq!(
            files[1].strip_prefix(dir.path()).unwrap().to_str().unwrap(),
            "trial-7/events.out.tfevents.1700000100.host_one.chorus"
        );

        let top = read_events(&files[0]);
        assert_eq!(top[0].what, Some(event::What::FileVersion("brain.Event:2".into())));
        let h_params_plugin_data::Data::Experiment(x) = hparams_data(&top[1], EXPERIMENT_TAG) else {
            panic!()
        };
        assert_eq!(x.name, "grid");
        let infos: Vec<(&str, i32)> = x.hparam_infos.iter().map(|h| (h.name.as_str(), h.r#type)).collect();
        assert_eq!(
            infos,
            [("a", 3), ("lr", 3), ("n", 3), ("opt", 1)],
            "float64 = 3, string = 1"
        );
        assert_eq!(
            x.hparam_infos[1].domain,
            Some(h_param_info::Domain::DomainInterval(proto::Interval {
                min_value: 1e-4,
                max_value: 0.1
            }))
        );
        let Some(h_param_info::Domain::DomainDiscrete(l)) = &x.hparam_infos[0].domain else {
            panic!()
        };
        assert_eq!(l.values.len(), 2);
        let metrics: Vec<&str> = x
            .metric_infos
            .iter()
            .map(|m| m.name.as_ref().unwrap().tag.as_str())
            .collect();
        assert_eq!(metrics, ["loss", "acc"], "objectives first, then the rest");

        let t7 = read_events(&files[1]);
        let h_params_plugin_data::Data::SessionStartInfo(s) = hparams_data(&t7[1], SESSION_START_INFO_TAG) else {
            panic!()
        };
        assert_eq!(s.hparams["a"].kind, Some(Kind::NumberValue(2.0)));
        assert_eq!(s.hparams["opt"].kind, Some(Kind::StringValue("sgd".into())));
        assert_eq!(s.group_name, "a=2,lr=0.01,n=4,opt=sgd");
        let scalars: Vec<(i64, &str, f32)> = t7[2..t7.len() - 1]
            .iter()
            .map(|e| {
                let Some(event::What::Summary(s)) = &e.what else {
                    panic!()
                };
                let Some(summary_value::Value::SimpleValue(v)) = s.value[0].value else {
                    panic!()
                };
                (e.step, s.value[0].tag.as_str(), v)
            })
            .collect();
        // A report without a step takes its position in the history.
        assert_eq!(
            scalars,
            [(1, "loss", 3.5), (2, "acc", 0.5), (2, "loss", 2.25), (2, "loss", 1.0)]
        );
        let walls: Vec<f64> = t7.iter().skip(1).map(|e| e.wall_time).collect();
        assert!(walls.windows(2).all(|w| w[0] <= w[1]), "monotone wall time: {walls:?}");
        let h_params_plugin_data::Data::SessionEndInfo(end) = hparams_data(t7.last().unwrap(), SESSION_END_INFO_TAG)
        else {
            panic!()
        };
        assert_eq!((end.status, end.end_time_secs), (1, 1_700_000_020.0));

        // A trial that may still run has no end info.
        let t8 = read_events(&files[2]);
        assert_eq!(t8.len(), 2);
    }

    #[test]
    fn a_second_export_replaces_ours_and_keeps_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let exp = export();
        write(dir.path(), &exp, 1_700_000_100.0, "h").unwrap();
        let foreign = dir.path().join("trial-7/events.out.tfevents.1.other");
        fs::write(&foreign, b"").unwrap();
        write(dir.path(), &exp, 1_700_000_200.0, "h").unwrap();
        let mut names: Vec<String> = fs::read_dir(dir.path().join("trial-7"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["events.out.tfevents.1.other", "events.out.tfevents.1700000200.h.chorus"]
        );
    }

    #[test]
    fn without_a_spec_types_come_from_the_values() {
        let mut exp = export();
        exp.space = None;
        exp.trials[1].params.insert("opt".into(), json!(true));
        let infos = hparam_infos(&exp);
        let types: Vec<(&str, i32)> = infos.iter().map(|h| (h.name.as_str(), h.r#type)).collect();
        // `opt` was "sgd" in one trial and true in another: shown as a string.
        assert_eq!(types, [("a", 3), ("lr", 3), ("n", 3), ("opt", 1)]);
        assert!(infos.iter().all(|h| h.domain.is_none()));
    }
}
