//! Builtin trials: the multimodal emotion models trained by workers on a synthetic sharded
//! dataset made with `chorus dataset synth`.

use super::*;
use chorus_tests::ClusterConfig;
use serde_json::Value;

fn synth(c: &TestCluster, name: &str, samples: u32) -> String {
    let uri = format!("file://{}", c.dir.path().join(name).display());
    let out = c.chorus(&[
        "dataset",
        "synth",
        "--out",
        &uri,
        "--samples",
        &samples.to_string(),
        "--shards",
        "6",
        "--seed",
        "1",
    ]);
    assert!(out.status.success(), "synth: {}", String::from_utf8_lossy(&out.stderr));
    uri
}

fn spec(name: &str, data: &str, extra_params: &str, model: &str, epochs: u32) -> String {
    format!(
        r#"
name: {name}
metric: {{name: val_accuracy, goal: maximize}}
parameters:
  seed: {{value: 3}}
{extra_params}
searcher: {{name: grid}}
parallel_trials: 4
max_restarts: 1
resources: {{cpus: 1}}
trial:
  builtin:
    model: {model}
    data: {data}
    epochs: {epochs}
    batch_size: 32
    lr: 0.003
    seed: ${{params.seed}}
"#
    )
}

fn by_modalities(ts: &[Value]) -> Vec<(String, f64)> {
    ts.iter()
        .map(|t| (t["params"]["mods"].to_string(), t["best_value"].as_f64().unwrap_or(0.0)))
        .collect()
}

#[test]
fn each_modality_learns_and_fusion_learns_best() {
    let c = TestCluster::start(ClusterConfig::default()).unwrap();
    let data = synth(&c, "emo", 2800);
    let yaml = spec(
        "modalities",
        &data,
        "  mods: {values: [[image], [text], [audio], [image, text, audio]]}",
        "{kind: multimodal, modalities: \"${params.mods}\"}",
        2,
    );
    let id = submit(&c, &c.write("mods.yaml", &yaml));
    assert_eq!(
        wait_ended(&c, id, Duration::from_secs(600)),
        "completed",
        "{}",
        c.logs_tail()
    );
    let ts = trials(&c, id);
    assert!(ts.iter().all(|t| t["state"] == "completed"), "{ts:?}");
    let acc = by_modalities(&ts);
    eprintln!("validation accuracy by modalities: {acc:?}");
    let fusion = acc
        .iter()
        .find(|(m, _)| m.contains("text") && m.contains("image"))
        .unwrap()
        .1;
    let best_single = acc
        .iter()
        .filter(|(m, _)| !m.contains(','))
        .map(|(_, a)| *a)
        .fold(0.0f64, f64::max);
    for (m, a) in &acc {
        // Chance is 1/7 ≈ 0.14; on 140 validation samples its standard deviation is ≈ 0.03.
        assert!(*a > 0.22, "{m} should learn above chance (1/7): {a} ({acc:?})");
    }
    assert!(fusion >= 0.8, "fusion after 2 epochs: {fusion} ({acc:?})");
    assert!(
        fusion > best_single,
        "fusion {fusion} should beat the best single modality {best_single}"
    );
    // Classification metrics reach the records.
    let last: Value = serde_json::from_str(&ts[0]["last_metrics"].to_string()).unwrap();
    for key in ["val_loss", "val_accuracy", "macro_f1", "f1_anger", "f1_neutral"] {
        assert!(last.get(key).is_some(), "{key} missing from {last}");
    }
}

#[test]
fn gan_augmentation_reports_both_losses() {
    let c = TestCluster::start(ClusterConfig {
        workers: 1,
        ..Default::default()
    })
    .unwrap();
    let data = synth(&c, "emo", 700);
    let yaml = spec("gan", &data, "", "{kind: multimodal, augment: gan}", 1);
    let id = submit(&c, &c.write("gan.yaml", &yaml));
    assert_eq!(
        wait_ended(&c, id, Duration::from_secs(300)),
        "completed",
        "{}",
        c.logs_tail()
    );
    let t = &trials(&c, id)[0];
    let logs = c.chorus(&["trial", "logs", &t["id"].to_string()]);
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(
        text.contains("\"confusion.anger.anger\""),
        "no confusion matrix in the metrics:\n{text}"
    );
    let gan_line = text
        .lines()
        .filter(|l| l.starts_with("chorus:metric"))
        .find(|l| l.contains("generator_loss") && l.contains("discriminator_loss"));
    assert!(gan_line.is_some(), "no GAN losses in the log:\n{text}");
}

/// The data path's and the trainer's settings through a real cluster: loader threads, cached
/// features and bf16 autocast learn as the defaults do; fp16 on a CPU worker fails its trial
/// with the alternative named, and nothing else.
#[test]
fn precision_and_data_settings_run_end_to_end() {
    let c = TestCluster::start(ClusterConfig {
        workers: 1,
        ..Default::default()
    })
    .unwrap();
    let data = synth(&c, "emo", 1400);
    let yaml = spec(
        "precision",
        &data,
        "  precision: {values: [fp32, bf16, fp16]}",
        "{kind: multimodal}",
        2,
    )
    .replace("max_restarts: 1", "max_restarts: 0\nmax_failed_trials: 2")
    .replace(
        "    seed: ${params.seed}\n",
        "    seed: ${params.seed}\n    precision: ${params.precision}\n    data_threads: 2\n    feature_cache: true\n",
    );
    let id = submit(&c, &c.write("precision.yaml", &yaml));
    wait_ended(&c, id, Duration::from_secs(600));
    let ts = trials(&c, id);
    let by_precision = |p: &str| {
        ts.iter()
            .find(|t| t["params"]["precision"] == p)
            .unwrap_or_else(|| panic!("no {p} trial in {ts:?}"))
    };
    for p in ["fp32", "bf16"] {
        let t = by_precision(p);
        assert_eq!(t["state"], "completed", "{p}: {t}\n{}", c.logs_tail());
        let acc = t["best_value"].as_f64().unwrap_or(0.0);
        assert!(acc > 0.5, "{p} validation accuracy {acc}");
    }
    let fp16 = by_precision("fp16");
    assert_eq!(fp16["state"], "failed", "{fp16}");
    let why = "fp16 needs a GPU; on the CPU use bf16";
    assert!(fp16["message"].as_str().unwrap_or_default().contains(why), "{fp16}");
    let logs = c.chorus(&["trial", "logs", &fp16["id"].to_string()]);
    assert!(String::from_utf8_lossy(&logs.stdout).contains(why), "{fp16}");
}

#[test]
fn a_corrupt_shard_fails_its_trial_by_name_and_nothing_else() {
    let c = TestCluster::start(ClusterConfig::default()).unwrap();
    let good = synth(&c, "good", 350);
    let bad = synth(&c, "bad", 350);
    let shard = c.dir.path().join("bad/shard-00001.tar");
    let mut bytes = std::fs::read(&shard).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&shard, bytes).unwrap();

    let broken = submit(
        &c,
        &c.write("bad.yaml", &spec("bad", &bad, "", "{kind: multimodal}", 1)),
    );
    let fine = submit(
        &c,
        &c.write("good.yaml", &spec("good", &good, "", "{kind: multimodal}", 1)),
    );
    assert_eq!(
        wait_ended(&c, fine, Duration::from_secs(300)),
        "completed",
        "{}",
        c.logs_tail()
    );
    wait_ended(&c, broken, Duration::from_secs(300));
    let t = &trials(&c, broken)[0];
    assert_eq!(t["state"], "failed", "{t}");
    let msg = t["message"].as_str().unwrap();
    assert!(msg.contains("shard-00001.tar") && msg.contains("checksum"), "{msg}");
}

#[test]
fn a_trial_moved_off_a_killed_worker_resumes_with_identical_results() {
    let mut c = TestCluster::start(ClusterConfig {
        lease_ttl: Duration::from_secs(2),
        ..Default::default()
    })
    .unwrap();
    let data = synth(&c, "emo", 700);
    let yaml = spec("resume", &data, "", "{kind: multimodal}", 2);
    let reference = submit(&c, &c.write("ref.yaml", &yaml));
    assert_eq!(
        wait_ended(&c, reference, Duration::from_secs(300)),
        "completed",
        "{}",
        c.logs_tail()
    );

    let id = submit(&c, &c.write("run.yaml", &yaml));
    let mut victim = String::new();
    c.wait_until(Duration::from_secs(300), "the first epoch's checkpoint", |c| {
        let t = &trials(c, id)[0];
        victim = t["worker_id"].as_str().unwrap_or_default().to_string();
        Ok(t["checkpoint_step"].as_i64().unwrap_or(0) > 0 && !victim.is_empty())
    })
    .unwrap();
    c.kill_worker(victim.trim_start_matches("worker-").parse().unwrap());
    assert_eq!(
        wait_ended(&c, id, Duration::from_secs(300)),
        "completed",
        "{}",
        c.logs_tail()
    );

    let (r, t) = (&trials(&c, reference)[0], &trials(&c, id)[0]);
    assert_eq!(t["attempt"], 2, "{t}");
    // Same data order, same weights, same optimiser state: the same final metrics, bit for bit.
    assert_eq!(r["last_metrics"], t["last_metrics"]);
    assert_eq!(r["best_value"], t["best_value"]);
}
