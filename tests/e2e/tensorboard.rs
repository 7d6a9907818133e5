//! `chorus export tensorboard` writes files that TensorBoard itself reads: a grid of command
//! trials is exported, then read back with the real `tensorboard` Python package (its
//! `EventAccumulator` for the scalars, its hparams plugin's metadata parsers for the HParams
//! data), installed from PyPI into a venv outside the repository.

use super::*;
use chorus_tests::ClusterConfig;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The TensorBoard release the export is checked against.
const TENSORBOARD: &str = "2.21.0";

const SPEC: &str = r#"
name: e2e-tensorboard
metric: {name: loss, goal: minimize}
parameters:
  a: {values: [1, 2, 3]}
  opt: {values: [sgd, adam]}
searcher: {name: grid}
parallel_trials: 3
trial:
  command: [sh, -c, 'for s in 1 2 3; do echo "chorus:metric {\"step\": $s, \"loss\": $(( ${params.a} * 10 + $s )), \"acc\": $s}"; done']
"#;

/// Reads every run under the log directory with TensorBoard's own readers and prints what it
/// found as JSON, for the test to compare with what the trials reported.
const READER: &str = r#"
import json, os, sys
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.hparams import metadata
from google.protobuf import json_format

logdir = sys.argv[1]
runs = {}
for name in ["."] + sorted(d for d in os.listdir(logdir) if os.path.isdir(os.path.join(logdir, d))):
    acc = ea.EventAccumulator(os.path.join(logdir, name), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    scalars = {
        tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
    }
    run = {"scalars": scalars}
    try:
        content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    except KeyError:
        content = {}
    for tag, data in content.items():
        if tag == metadata.EXPERIMENT_TAG:
            msg = metadata.parse_experiment_plugin_data(data)
        elif tag == metadata.SESSION_START_INFO_TAG:
            msg = metadata.parse_session_start_info_plugin_data(data)
        elif tag == metadata.SESSION_END_INFO_TAG:
            msg = metadata.parse_session_end_info_plugin_data(data)
        else:
            raise SystemExit("unexpected hparams tag " + tag)
        run[tag] = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    runs[name] = run

# What the HParams tab shows: the plugin's session groups, as its HTTP API serves them from a
# TensorBoard app over the same log directory, best loss first.
from tensorboard import default, program
from tensorboard.backend import application
from tensorboard.backend.event_processing import data_ingester
from werkzeug.test import Client

tb = program.TensorBoard(plugins=default.get_plugins())
tb.configure(argv=[None, "--logdir", logdir, "--load_fast=false", "--reload_interval=0"])
ingester = data_ingester.LocalDataIngester(tb.flags)
ingester.start()
app = application.TensorBoardWSGIApp(
    tb.flags, tb.plugin_loaders, ingester.data_provider, tb.assets_zip_provider,
    ingester.deprecated_multiplexer,
)
resp = Client(app).post(
    "/data/plugin/hparams/session_groups",
    headers={"X-XSRF-Protected": "1"},
    json={
        "experimentName": "",
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        "colParams": [{"metric": {"group": "", "tag": "loss"}, "order": "ORDER_ASC"}],
        "startIndex": 0,
        "sliceSize": 100,
    },
)
if resp.status_code != 200:
    raise SystemExit("session_groups: %s %s" % (resp.status_code, resp.get_data(as_text=True)))
groups = resp.get_json()["sessionGroups"]
print(json.dumps({"runs": runs, "session_groups": groups}))
"#;

/// A Python with `tensorboard==TENSORBOARD`, or `None` (with the reason printed) when PyPI
/// cannot be reached to install it.
fn tensorboard_python() -> Option<PathBuf> {
    let cache = std::env::var_os("CHORUS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/chorus"));
    let venv = cache.join("tb-venv");
    let python = venv.join("bin/python");
    let check = format!("import sys, tensorboard; sys.exit(tensorboard.__version__ != {TENSORBOARD:?})");
    let ready = |p: &Path| {
        Command::new(p)
            .args(["-c", &check])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if ready(&python) {
        return Some(python);
    }
    if !python.exists() {
        std::fs::create_dir_all(&cache).expect("create the cache directory");
        let out = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .output()
            .expect("run python3 -m venv");
        assert!(
            out.status.success(),
            "python3 -m venv failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .arg(format!("tensorboard=={TENSORBOARD}"))
        .output()
        .expect("run pip");
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let offline = [
            "NewConnectionError",
            "Temporary failure in name resolution",
            "Network is unreachable",
            "ConnectTimeoutError",
            "Max retries exceeded",
            "ProxyError",
        ];
        if offline.iter().any(|m| err.contains(m)) {
            println!("skipped: pip cannot reach PyPI to install tensorboard=={TENSORBOARD}:\n{err}");
            return None;
        }
        panic!("pip install tensorboard=={TENSORBOARD} failed:\n{err}");
    }
    assert!(
        ready(&python),
        "tensorboard=={TENSORBOARD} is not importable after installing it"
    );
    Some(python)
}

#[test]
fn tensorboard_reads_the_exported_scalars_and_hparams() {
    let Some(python) = tensorboard_python() else { return };
    let c = TestCluster::start(ClusterConfig::default()).unwrap();
    let id = submit_and_wait(&c, "tb.yaml", SPEC);
    let ts = trials(&c, id);
    assert_eq!(ts.len(), 6);

    let logdir = c.dir.path().join("tb");
    // Exported twice: the second export replaces the files rather than adding to them (each
    // point would show twice).
    for pass in ["first", "second"] {
        let out = c.chorus(&[
            "export",
            "tensorboard",
            &id.to_string(),
            "--out",
            logdir.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{pass} export failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let script = c.write("read_tb.py", READER);
    let out = Command::new(&python).arg(&script).arg(&logdir).output().unwrap();
    assert!(
        out.status.success(),
        "the reader failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read: Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = &read["runs"];

    // The experiment: both parameters with their types and domains, both metrics.
    let x = &runs["."]["_hparams_/experiment"];
    assert_eq!(x["name"], "e2e-tensorboard", "{x}");
    let infos = x["hparam_infos"].as_array().unwrap();
    assert_eq!(infos.len(), 2, "{x}");
    assert_eq!(
        (&infos[0]["name"], &infos[0]["type"]),
        (&"a".into(), &"DATA_TYPE_FLOAT64".into())
    );
    assert_eq!(infos[0]["domain_discrete"], serde_json::json!([1.0, 2.0, 3.0]));
    assert_eq!(
        (&infos[1]["name"], &infos[1]["type"]),
        (&"opt".into(), &"DATA_TYPE_STRING".into())
    );
    assert_eq!(infos[1]["domain_discrete"], serde_json::json!(["sgd", "adam"]));
    let metrics: Vec<&str> = x["metric_infos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"]["tag"].as_str().unwrap())
        .collect();
    assert_eq!(metrics, ["loss", "acc"]);

    // Each trial: its own run, with every step of every metric, its hparams and its status.
    assert_eq!(
        runs.as_object().unwrap().len(),
        7,
        "the experiment run and one per trial"
    );
    for t in &ts {
        let run = &runs[format!("trial-{}", t["id"])];
        let a = t["params"]["a"].as_i64().unwrap();
        let opt = t["params"]["opt"].as_str().unwrap();
        let loss: Vec<(i64, f64)> = (1..=3).map(|s| (s, (a * 10 + s) as f64)).collect();
        let acc: Vec<(i64, f64)> = (1..=3).map(|s| (s, s as f64)).collect();
        let read = |tag: &str| -> Vec<(i64, f64)> {
            run["scalars"][tag]
                .as_array()
                .unwrap_or_else(|| panic!("no {tag} in {run}"))
                .iter()
                .map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap()))
                .collect()
        };
        assert_eq!(read("loss"), loss, "trial {}", t["id"]);
        assert_eq!(read("acc"), acc, "trial {}", t["id"]);
        let start = &run["_hparams_/session_start_info"];
        assert_eq!(
            start["hparams"],
            serde_json::json!({"a": a as f64, "opt": opt}),
            "{run}"
        );
        assert_eq!(start["group_name"], format!("a={a},opt={opt}"));
        assert_eq!(run["_hparams_/session_end_info"]["status"], "STATUS_SUCCESS", "{run}");
    }

    // The HParams tab: one group per grid point, each the one trial that ran it, ranked by the
    // last loss reported (10a + 3), with the hparams and status the trial had.
    let groups = read["session_groups"].as_array().unwrap();
    assert_eq!(groups.len(), 6, "{groups:?}");
    let mut last_loss = f64::MIN;
    for g in groups {
        let sessions = g["sessions"].as_array().unwrap();
        assert_eq!(sessions.len(), 1, "{g}");
        let name = sessions[0]["name"].as_str().unwrap();
        let t = ts
            .iter()
            .find(|t| format!("trial-{}", t["id"]) == name)
            .unwrap_or_else(|| panic!("no trial for session {name}"));
        let a = t["params"]["a"].as_i64().unwrap();
        assert_eq!(
            g["hparams"],
            serde_json::json!({"a": a as f64, "opt": t["params"]["opt"]}),
            "{g}"
        );
        assert_eq!(sessions[0]["status"], "STATUS_SUCCESS", "{g}");
        let loss = g["metricValues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"]["tag"] == "loss")
            .unwrap_or_else(|| panic!("no loss in {g}"));
        assert_eq!(
            (loss["value"].as_f64(), loss["trainingStep"].as_i64()),
            (Some((a * 10 + 3) as f64), Some(3))
        );
        assert!(
            loss["value"].as_f64().unwrap() >= last_loss,
            "best loss first: {groups:?}"
        );
        last_loss = loss["value"].as_f64().unwrap();
    }
}
