//! The Kubernetes manifests (`deploy/kubernetes`): every overlay and the examples render with
//! `kubectl kustomize`, and what they render would run.
//!
//! Checked on the rendered objects: every container has resource requests and limits and runs as
//! non-root; images are ours at the workspace version; the coordinator and the workers have
//! readiness and liveness probes aimed at their health ports; a worker takes its id, instance
//! and advertise address from the downward API; every Secret, ConfigMap, claim and volume a pod
//! names exists. Checked with the real binaries: each container's command line, environment and
//! image defaults, with its mounts laid out in a temporary directory, pass the binary's
//! `--check-config` (or, for the CLI and subcommands, parse), and every `CHORUS_*` variable set is
//! one the binary reads. Skipped, with the reason printed, where kubectl is missing.

use serde_yaml_ng::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The workspace version: the tag every image in the manifests must carry.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The installable overlays, relative to `deploy/kubernetes`.
const OVERLAYS: [&str; 3] = ["overlays/cpu", "overlays/gpu", "overlays/s3"];
/// The examples, rendered together; they name objects of an installed overlay.
const EXAMPLES: &str = "examples";

/// Objects the manifests name but do not create: the coordinator's TLS Secret comes from
/// cert-manager (examples/cert-manager.yaml) or from whoever installs.
const PROVIDED_OUTSIDE: [&str; 1] = ["Secret/chorus-coordinator-tls"];

/// Env names a binary reads but does not list in `--help`: the CLI hides its token flag, which is
/// meant to come from the environment.
const HIDDEN_IN_HELP: [(&str, &str); 1] = [("chorus", "CHORUS_TOKEN")];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("deploy")
}

fn kubectl_available() -> bool {
    match Command::new("kubectl").args(["version", "--client"]).output() {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            eprintln!(
                "skipping: `kubectl version --client` failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            false
        }
        Err(e) => {
            eprintln!("skipping: kubectl is not installed ({e})");
            false
        }
    }
}

/// `kubectl kustomize deploy/kubernetes/DIR`, one value per object.
fn render(dir: &str) -> Vec<Value> {
    let path = deploy_dir().join("kubernetes").join(dir);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&path)
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 YAML");
    let mut objects = Vec::new();
    for doc in text.split("\n---\n") {
        let v: Value = serde_yaml_ng::from_str(doc).unwrap_or_else(|e| panic!("{dir}: bad YAML: {e}\n{doc}"));
        if !v.is_null() {
            objects.push(v);
        }
    }
    assert!(!objects.is_empty(), "{dir} renders nothing");
    objects
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or_default()
}

fn key(o: &Value) -> String {
    format!("{}/{}", s(&o["kind"]), s(&o["metadata"]["name"]))
}

/// One container of a rendered pod template, with where it comes from.
struct Container<'a> {
    /// `DIR Kind/name container NAME`, for messages.
    at: String,
    /// The workload's name (`chorus-coordinator`, `chorus-worker`, ...).
    workload: String,
    pod: &'a Value,
    c: &'a Value,
}

fn pod_spec(o: &Value) -> Option<&Value> {
    let spec = match s(&o["kind"]) {
        "Deployment" | "StatefulSet" | "DaemonSet" | "Job" | "ReplicaSet" => &o["spec"]["template"]["spec"],
        "CronJob" => &o["spec"]["jobTemplate"]["spec"]["template"]["spec"],
        "Pod" => &o["spec"],
        _ => return None,
    };
    Some(spec)
}

fn containers<'a>(dir: &str, objects: &'a [Value]) -> Vec<Container<'a>> {
    let mut all = Vec::new();
    for o in objects {
        let Some(pod) = pod_spec(o) else { continue };
        for field in ["initContainers", "containers"] {
            for c in seq(&pod[field]) {
                all.push(Container {
                    at: format!("{dir} {} {field} {}", key(o), s(&c["name"])),
                    workload: s(&o["metadata"]["name"]).to_string(),
                    pod,
                    c,
                });
            }
        }
    }
    all
}

/// The rendered ConfigMap or Secret `name`'s data (Secrets: decoded where base64).
fn object_data(objects: &[Value], kind: &str, name: &str) -> Option<BTreeMap<String, String>> {
    let o = objects
        .iter()
        .find(|o| s(&o["kind"]) == kind && s(&o["metadata"]["name"]) == name)?;
    let mut data = BTreeMap::new();
    for field in ["data", "stringData"] {
        if let Some(m) = o[field].as_mapping() {
            for (k, v) in m {
                let value = match v {
                    Value::String(x) => x.clone(),
                    other => serde_yaml_ng::to_string(other).unwrap().trim().to_string(),
                };
                data.insert(s(k).to_string(), value);
            }
        }
    }
    Some(data)
}

// --- the rendered objects --------------------------------------------------------------------------

#[test]
fn overlays_render_pods_that_are_complete() {
    if !kubectl_available() {
        return;
    }
    // What an install provides for the examples to name.
    let installed = render("overlays/cpu");
    for dir in OVERLAYS.into_iter().chain([EXAMPLES]) {
        let objects = render(dir);
        let mut problems = Vec::new();
        let mut provided: BTreeSet<String> = objects.iter().map(key).collect();
        if dir == EXAMPLES {
            provided.extend(installed.iter().map(key));
        }
        provided.extend(PROVIDED_OUTSIDE.iter().map(|k| k.to_string()));
        // A StatefulSet's claims are named TEMPLATE-SET-ORDINAL.
        for o in objects
            .iter()
            .chain(if dir == EXAMPLES { installed.as_slice() } else { &[] })
        {
            if s(&o["kind"]) == "StatefulSet" {
                for t in seq(&o["spec"]["volumeClaimTemplates"]) {
                    let replicas = o["spec"]["replicas"].as_u64().unwrap_or(1);
                    for i in 0..replicas {
                        provided.insert(format!(
                            "PersistentVolumeClaim/{}-{}-{i}",
                            s(&t["metadata"]["name"]),
                            s(&o["metadata"]["name"])
                        ));
                    }
                }
            }
        }

        let all = containers(dir, &objects);
        assert!(!all.is_empty(), "{dir}: no containers rendered");
        for c in &all {
            check_container(c, &mut problems);
            check_references(c, &objects, &provided, &mut problems);
        }
        for name in ["chorus-coordinator", "chorus-worker"] {
            let found: Vec<_> = all.iter().filter(|c| c.workload == name).collect();
            if dir != EXAMPLES && found.is_empty() {
                problems.push(format!("{dir}: no {name} workload"));
            }
            for c in found {
                check_probes(c, &objects, &mut problems);
                if name == "chorus-worker" {
                    check_worker_identity(c, &mut problems);
                }
            }
        }
        check_overlay_specifics(dir, &objects, &mut problems);
        assert!(problems.is_empty(), "{dir}:\n  {}", problems.join("\n  "));
    }
}

fn check_container(c: &Container, problems: &mut Vec<String>) {
    let at = &c.at;
    for part in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            if c.c["resources"][part][resource].is_null() {
                problems.push(format!("{at}: no resources.{part}.{resource}"));
            }
        }
    }
    let own = c.c["securityContext"]["runAsNonRoot"].as_bool();
    let pod = c.pod["securityContext"]["runAsNonRoot"].as_bool();
    if own.or(pod) != Some(true) {
        problems.push(format!("{at}: runAsNonRoot is not true"));
    }
    let image = s(&c.c["image"]);
    let ours = ["chorus/coordinator", "chorus/worker", "chorus/worker-cuda"]
        .iter()
        .any(|name| image == format!("{name}:{VERSION}"));
    if !ours {
        problems.push(format!(
            "{at}: image {image:?} is not chorus/{{coordinator,worker,worker-cuda}}:{VERSION}"
        ));
    }
}

/// Every Secret, ConfigMap and claim the pod names is rendered (or provided outside), and every
/// mount names a volume of the pod or a claim template.
fn check_references(c: &Container, objects: &[Value], provided: &BTreeSet<String>, problems: &mut Vec<String>) {
    let at = &c.at;
    let mut need = |kind: &str, name: &str, what: &str| {
        let k = format!("{kind}/{name}");
        if !provided.contains(&k) {
            problems.push(format!("{at}: {what} names {k}, which nothing creates"));
        }
    };
    for e in seq(&c.c["env"]) {
        let from = &e["valueFrom"];
        if !from["secretKeyRef"].is_null() {
            need("Secret", s(&from["secretKeyRef"]["name"]), s(&e["name"]));
        }
        if !from["configMapKeyRef"].is_null() {
            need("ConfigMap", s(&from["configMapKeyRef"]["name"]), s(&e["name"]));
        }
    }
    for e in seq(&c.c["envFrom"]) {
        if !e["configMapRef"].is_null() {
            need("ConfigMap", s(&e["configMapRef"]["name"]), "envFrom");
        }
        if !e["secretRef"].is_null() {
            need("Secret", s(&e["secretRef"]["name"]), "envFrom");
        }
    }
    let mut volumes = BTreeSet::new();
    for v in seq(&c.pod["volumes"]) {
        volumes.insert(s(&v["name"]).to_string());
        if !v["secret"].is_null() {
            need("Secret", s(&v["secret"]["secretName"]), "a volume");
        }
        if !v["configMap"].is_null() {
            need("ConfigMap", s(&v["configMap"]["name"]), "a volume");
        }
        if !v["persistentVolumeClaim"].is_null() {
            need(
                "PersistentVolumeClaim",
                s(&v["persistentVolumeClaim"]["claimName"]),
                "a volume",
            );
        }
    }
    // A StatefulSet's claim templates are volumes of its pods too.
    let templates: BTreeSet<String> = objects
        .iter()
        .filter(|o| s(&o["kind"]) == "StatefulSet" && s(&o["metadata"]["name"]) == c.workload)
        .flat_map(|o| seq(&o["spec"]["volumeClaimTemplates"]))
        .map(|t| s(&t["metadata"]["name"]).to_string())
        .collect();
    for m in seq(&c.c["volumeMounts"]) {
        let name = s(&m["name"]);
        if !volumes.contains(name) && !templates.contains(name) {
            problems.push(format!("{at}: mount {name} names no volume of the pod"));
        }
    }
}

/// The port of a `HOST:PORT` listen address.
fn port_of(addr: &str) -> Option<u64> {
    addr.rsplit_once(':')?.1.parse().ok()
}

fn check_probes(c: &Container, objects: &[Value], problems: &mut Vec<String>) {
    let at = &c.at;
    let env = resolved_env(c, objects, &BTreeMap::new());
    for probe in ["readinessProbe", "livenessProbe"] {
        if c.c[probe].is_null() {
            problems.push(format!("{at}: no {probe}"));
        }
    }
    if c.workload == "chorus-worker" {
        // Readiness is the health service (SERVING while registered), on the port the worker
        // serves it on.
        let health = env.get("CHORUS_HEALTH_LISTEN").and_then(|a| port_of(a));
        let grpc = c.c["readinessProbe"]["grpc"]["port"].as_u64();
        if health.is_none() || grpc != health {
            problems.push(format!(
                "{at}: readinessProbe.grpc.port {grpc:?} is not the CHORUS_HEALTH_LISTEN port {health:?}"
            ));
        }
        let live = c.c["livenessProbe"]["tcpSocket"]["port"]
            .as_u64()
            .or(c.c["livenessProbe"]["grpc"]["port"].as_u64());
        if live != health {
            problems.push(format!(
                "{at}: livenessProbe port {live:?} is not the health port {health:?}"
            ));
        }
    } else {
        // The coordinator's probes are the kubelet's gRPC probes on its plain-text health port
        // (its API port serves TLS, which those probes do not speak).
        let health = env.get("CHORUS_HEALTH_LISTEN").and_then(|a| port_of(a));
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            let p = &c.c[probe];
            if p.is_null() {
                continue;
            }
            let port = p["grpc"]["port"].as_u64();
            if health.is_none() || port != health {
                problems.push(format!(
                    "{at}: {probe} is not a gRPC probe of the CHORUS_HEALTH_LISTEN port {health:?} (it checks {port:?})"
                ));
            }
        }
    }
}

fn check_worker_identity(c: &Container, problems: &mut Vec<String>) {
    for (name, field) in [
        ("CHORUS_WORKER_ID", "metadata.name"),
        ("CHORUS_WORKER_INSTANCE", "metadata.uid"),
        ("CHORUS_ADVERTISE_ADDRESS", "status.podIP"),
    ] {
        let got = seq(&c.c["env"])
            .iter()
            .find(|e| s(&e["name"]) == name)
            .map(|e| s(&e["valueFrom"]["fieldRef"]["fieldPath"]));
        if got != Some(field) {
            problems.push(format!(
                "{}: {name} comes from {got:?}, not the downward API's {field}",
                c.at
            ));
        }
    }
}

fn check_overlay_specifics(dir: &str, objects: &[Value], problems: &mut Vec<String>) {
    if dir != EXAMPLES {
        // One coordinator (it locks its volume; a second would refuse to start), kept from
        // voluntary eviction.
        let sets: Vec<_> = objects
            .iter()
            .filter(|o| key(o) == "StatefulSet/chorus-coordinator")
            .collect();
        if sets.len() != 1 || sets[0]["spec"]["replicas"].as_u64() != Some(1) {
            problems.push("not exactly one StatefulSet/chorus-coordinator with replicas: 1".into());
        }
        let guarded = objects.iter().any(|o| {
            s(&o["kind"]) == "PodDisruptionBudget"
                && s(&o["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]) == "coordinator"
                && (o["spec"]["minAvailable"].as_u64() == Some(1) || o["spec"]["maxUnavailable"].as_u64() == Some(0))
        });
        if !guarded {
            problems.push("no PodDisruptionBudget keeps the coordinator".into());
        }
    }
    let workers: Vec<_> = containers(dir, objects)
        .into_iter()
        .filter(|c| c.workload == "chorus-worker")
        .collect();
    match dir {
        "overlays/gpu" => {
            for c in &workers {
                if s(&c.c["image"]) != format!("chorus/worker-cuda:{VERSION}") {
                    problems.push(format!("{}: a GPU worker runs {}", c.at, s(&c.c["image"])));
                }
                if c.c["resources"]["limits"]["nvidia.com/gpu"].is_null() {
                    problems.push(format!("{}: no nvidia.com/gpu limit", c.at));
                }
            }
        }
        "overlays/s3" => {
            let config = objects
                .iter()
                .map(|o| s(&o["metadata"]["name"]))
                .find(|name| name.starts_with("chorus-coordinator-config"))
                .and_then(|name| object_data(objects, "ConfigMap", name))
                .unwrap_or_default();
            let storage = config.get("CHORUS_STORAGE").map(String::as_str).unwrap_or_default();
            if !storage.starts_with("s3://") {
                problems.push(format!("CHORUS_STORAGE is {storage:?}, not s3://"));
            }
            // Pod identity, not static keys.
            for c in containers(dir, objects) {
                for e in seq(&c.c["env"]) {
                    if s(&e["name"]).starts_with("AWS_SECRET_ACCESS_KEY") || s(&e["name"]) == "AWS_ACCESS_KEY_ID" {
                        problems.push(format!("{}: static S3 credentials", c.at));
                    }
                }
            }
        }
        _ => {}
    }
}

// --- the binaries accept what the containers pass -------------------------------------------------

#[test]
fn container_command_lines_are_accepted_by_the_binaries() {
    if !kubectl_available() {
        return;
    }
    let Some(tls) = TlsFiles::make() else { return };
    let installed = render("overlays/cpu");
    let mut problems = Vec::new();
    for dir in OVERLAYS.into_iter().chain([EXAMPLES]) {
        let objects = render(dir);
        let mut lookup = objects.clone();
        if dir == EXAMPLES {
            lookup.extend(installed.iter().cloned());
        }
        for c in containers(dir, &objects) {
            check_command_line(&c, &lookup, &tls, &mut problems);
        }
    }
    assert!(problems.is_empty(), "\n  {}", problems.join("\n  "));
}

/// A self-signed certificate (for localhost) and its key, as the TLS Secret's files.
struct TlsFiles {
    _dir: tempfile::TempDir,
    cert: String,
    key: String,
}

impl TlsFiles {
    fn make() -> Option<TlsFiles> {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let out = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
            ])
            .args(["-days", "2", "-subj", "/CN=chorus-coordinator"])
            .args([
                "-addext",
                "subjectAltName=DNS:chorus-coordinator,DNS:localhost,IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(TlsFiles {
                cert: std::fs::read_to_string(&cert).unwrap(),
                key: std::fs::read_to_string(&key).unwrap(),
                _dir: dir,
            }),
            Ok(o) => panic!("openssl req failed: {}", String::from_utf8_lossy(&o.stderr)),
            Err(e) => {
                eprintln!("skipping: openssl (to make the TLS files the containers mount) is missing: {e}");
                None
            }
        }
    }
}

/// The container's environment as the pod would see it, `CHORUS_*` only: the image's defaults
/// (from its Dockerfile), then envFrom, then env; downward-API and Secret values made up.
/// Values that are paths under a mount are moved to where `mounts` laid that mount out.
fn resolved_env(c: &Container, objects: &[Value], mounts: &BTreeMap<String, PathBuf>) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for (k, v) in image_env(s(&c.c["image"])) {
        env.insert(k, v);
    }
    for e in seq(&c.c["envFrom"]) {
        let (kind, name) = if !e["configMapRef"].is_null() {
            ("ConfigMap", s(&e["configMapRef"]["name"]))
        } else {
            ("Secret", s(&e["secretRef"]["name"]))
        };
        for (k, v) in object_data(objects, kind, name).unwrap_or_default() {
            env.insert(k, v);
        }
    }
    for e in seq(&c.c["env"]) {
        let name = s(&e["name"]).to_string();
        let from = &e["valueFrom"];
        let value = if !e["value"].is_null() {
            s(&e["value"]).to_string()
        } else if !from["fieldRef"].is_null() {
            match s(&from["fieldRef"]["fieldPath"]) {
                "metadata.name" => format!("{}-6f9c7b8d4-x2x7k", c.workload),
                "metadata.uid" => "3f1c2a9e-5b7d-4c8e-9a21-6d0f4b8e7c15".into(),
                "metadata.namespace" => "chorus".into(),
                "status.podIP" => "10.244.1.23".into(),
                other => panic!("{}: no made-up value for fieldRef {other}", c.at),
            }
        } else if !from["secretKeyRef"].is_null() {
            format!(
                "test-{}",
                s(&from["secretKeyRef"]["key"]).to_lowercase().replace('_', "-")
            )
        } else if !from["configMapKeyRef"].is_null() {
            let r = &from["configMapKeyRef"];
            object_data(objects, "ConfigMap", s(&r["name"]))
                .and_then(|d| d.get(s(&r["key"])).cloned())
                .unwrap_or_default()
        } else {
            String::new()
        };
        env.insert(name, value);
    }
    env.retain(|k, _| k.starts_with("CHORUS_"));
    env.values_mut().for_each(|v| *v = remap(v, mounts));
    env
}

/// `CHORUS_*` defaults of an image, from the `ENV` instructions of its Dockerfile (and, for the
/// CUDA worker, of the worker's it builds on).
fn image_env(image: &str) -> Vec<(String, String)> {
    let name = image.split(':').next().unwrap_or_default();
    let files: &[&str] = match name {
        "chorus/coordinator" => &["coordinator.Dockerfile"],
        "chorus/worker" => &["worker.Dockerfile"],
        "chorus/worker-cuda" => &["worker.Dockerfile", "worker-cuda.Dockerfile"],
        _ => &[],
    };
    let mut env = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(deploy_dir().join("docker").join(f)).unwrap();
        let joined = text.replace("\\\n", " ");
        for line in joined.lines() {
            if let Some(rest) = line.trim().strip_prefix("ENV ") {
                for pair in rest.split_whitespace() {
                    if let Some((k, v)) = pair.split_once('=') {
                        env.push((k.to_string(), v.to_string()));
                    }
                }
            }
        }
    }
    env
}

/// `value` (or the value of `--flag=value`) with a leading mount path replaced by its local copy.
fn remap(value: &str, mounts: &BTreeMap<String, PathBuf>) -> String {
    if let Some((flag, v)) = value.split_once('=').filter(|(f, _)| f.starts_with("--")) {
        return format!("{flag}={}", remap(v, mounts));
    }
    // The longest mount path that holds the value wins (a mount inside another mount).
    let best = mounts
        .iter()
        .filter(|(m, _)| value == m.as_str() || value.starts_with(&format!("{m}/")))
        .max_by_key(|(m, _)| m.len());
    match best {
        Some((m, local)) => format!("{}{}", local.display(), &value[m.len()..]),
        None => value.to_string(),
    }
}

/// Lays the container's mounts out under `root`: Secrets and ConfigMaps as their files (the TLS
/// Secret as a certificate, key and CA), everything else as an empty directory.
fn lay_out_mounts(c: &Container, objects: &[Value], tls: &TlsFiles, root: &Path) -> BTreeMap<String, PathBuf> {
    let mut mounts = BTreeMap::new();
    for (i, m) in seq(&c.c["volumeMounts"]).iter().enumerate() {
        let name = s(&m["name"]);
        let local = root.join(format!("{i}-{name}"));
        std::fs::create_dir_all(&local).unwrap();
        let volume = seq(&c.pod["volumes"]).iter().find(|v| s(&v["name"]) == name);
        let mut files: BTreeMap<String, String> = BTreeMap::new();
        if let Some(v) = volume {
            let (source, data) = if !v["secret"].is_null() {
                let secret = s(&v["secret"]["secretName"]);
                let data = object_data(objects, "Secret", secret).unwrap_or_else(|| {
                    // The kubernetes.io/tls Secret made outside the manifests.
                    BTreeMap::from([
                        ("tls.crt".to_string(), tls.cert.clone()),
                        ("tls.key".to_string(), tls.key.clone()),
                        ("ca.crt".to_string(), tls.cert.clone()),
                    ])
                });
                (&v["secret"], data)
            } else if !v["configMap"].is_null() {
                let data = object_data(objects, "ConfigMap", s(&v["configMap"]["name"])).unwrap_or_default();
                (&v["configMap"], data)
            } else {
                (&Value::Null, BTreeMap::new())
            };
            let items = seq(&source["items"]);
            if items.is_empty() {
                files = data;
            } else {
                for item in items {
                    if let Some(content) = data.get(s(&item["key"])) {
                        files.insert(s(&item["path"]).to_string(), content.clone());
                    }
                }
            }
        }
        for (file, content) in files {
            std::fs::write(local.join(file), content).unwrap();
        }
        mounts.insert(s(&m["mountPath"]).trim_end_matches('/').to_string(), local);
    }
    mounts
}

/// A program the container runs: one of our binaries, with its arguments.
struct Invocation {
    binary: String,
    args: Vec<String>,
    /// Runs a subcommand or the CLI, which have no `--check-config`: they only parse.
    parse_only: bool,
    /// The container's environment applies (not for a program inside a shell script).
    with_env: bool,
}

/// The probes that run one of our binaries (the coordinator's `chorus health`): they must parse.
fn probe_invocations(c: &Container) -> Vec<Invocation> {
    let mut found = Vec::new();
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let command: Vec<String> = seq(&c.c[probe]["exec"]["command"])
            .iter()
            .map(|v| s(v).to_string())
            .collect();
        if let Some(binary) = command.first().and_then(|p| p.strip_prefix("/opt/chorus/bin/")) {
            found.push(Invocation {
                binary: binary.to_string(),
                args: command[1..].to_vec(),
                parse_only: true,
                with_env: false,
            });
        }
    }
    found
}

fn invocations(c: &Container) -> Vec<Invocation> {
    let command: Vec<String> = seq(&c.c["command"]).iter().map(|v| s(v).to_string()).collect();
    let args: Vec<String> = seq(&c.c["args"]).iter().map(|v| s(v).to_string()).collect();
    let mut line: Vec<String> = if command.is_empty() {
        // The image's entrypoint: tini, then the image's binary.
        vec![format!("/opt/chorus/bin/{}", image_binary(s(&c.c["image"])))]
    } else {
        command
    };
    line.extend(args);
    if line.first().map(String::as_str) == Some("/usr/bin/tini") {
        let at = line.iter().position(|a| a == "--").map_or(1, |i| i + 1);
        line.drain(..at);
    }
    if let Some(binary) = line.first().and_then(|p| p.strip_prefix("/opt/chorus/bin/")) {
        let args = line[1..].to_vec();
        let parse_only = binary == "chorus" || args.first().is_some_and(|a| !a.starts_with('-'));
        return vec![Invocation {
            binary: binary.to_string(),
            args,
            parse_only,
            with_env: true,
        }];
    }
    // A shell script: each of our binaries it runs, up to the end of its command; shell values
    // ($x, "$x") stand for a path.
    let script = match line.as_slice() {
        [sh, flag, script, ..] if sh.ends_with("sh") && flag == "-c" => script.clone(),
        _ => panic!("{}: cannot tell what {line:?} runs", c.at),
    };
    let mut found = Vec::new();
    for part in script.split([';', '\n', '|', '&']) {
        let words: Vec<&str> = part.split_whitespace().collect();
        if let Some(i) = words.iter().position(|w| w.starts_with("/opt/chorus/bin/")) {
            let args = words[i + 1..]
                .iter()
                .map(|w| {
                    if w.contains('$') {
                        "/tmp/chorus-k8s-test-value".to_string()
                    } else {
                        w.trim_matches('"').to_string()
                    }
                })
                .collect();
            found.push(Invocation {
                binary: words[i].trim_start_matches("/opt/chorus/bin/").to_string(),
                args,
                parse_only: true,
                with_env: false,
            });
        }
    }
    assert!(
        !found.is_empty(),
        "{}: the script runs none of our binaries: {script}",
        c.at
    );
    found
}

fn check_command_line(c: &Container, objects: &[Value], tls: &TlsFiles, problems: &mut Vec<String>) {
    let root = tempfile::tempdir().unwrap();
    let mounts = lay_out_mounts(c, objects, tls, root.path());
    for inv in invocations(c).into_iter().chain(probe_invocations(c)) {
        let binary = chorus_tests::binary(&inv.binary);
        let mut args: Vec<String> = inv.args.iter().map(|a| remap(a, &mounts)).collect();
        args.push(if inv.parse_only { "--help" } else { "--check-config" }.to_string());
        let env = if inv.with_env {
            resolved_env(c, objects, &mounts)
        } else {
            BTreeMap::new()
        };
        let mut cmd = Command::new(&binary);
        cmd.args(&args).current_dir(root.path());
        // Only what the pod sets: none of this machine's CHORUS_* variables.
        for (k, _) in std::env::vars() {
            if k.starts_with("CHORUS_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(&env);
        cmd.stdin(Stdio::null());
        // Bounded: a binary that ignored `--check-config` would start serving instead of exiting.
        let out = chorus_tests::output_within(cmd, Duration::from_secs(60)).expect("run the binary");
        if !out.status.success() {
            problems.push(format!(
                "{}: `{} {}` with {:?} exited {:?}: {}",
                c.at,
                inv.binary,
                args.join(" "),
                env.keys().collect::<Vec<_>>(),
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        if inv.with_env {
            check_env_names(c, &inv, objects, problems);
        }
    }
}

/// The binary an image runs by default.
fn image_binary(image: &str) -> &'static str {
    if image.starts_with("chorus/coordinator:") {
        "chorus-coordinator"
    } else {
        "chorus-worker"
    }
}

/// Every `CHORUS_*` variable the container sets, and those its image sets for the binary it
/// runs, is one the binary reads (its `--help` lists each flag's variable as `[env: NAME]`).
/// The coordinator image's defaults do not concern the CLI a Job runs in it.
fn check_env_names(c: &Container, inv: &Invocation, objects: &[Value], problems: &mut Vec<String>) {
    let image = s(&c.c["image"]);
    let mut names: BTreeSet<String> = seq(&c.c["env"]).iter().map(|e| s(&e["name"]).to_string()).collect();
    for e in seq(&c.c["envFrom"]) {
        let (kind, name) = if !e["configMapRef"].is_null() {
            ("ConfigMap", s(&e["configMapRef"]["name"]))
        } else {
            ("Secret", s(&e["secretRef"]["name"]))
        };
        names.extend(object_data(objects, kind, name).unwrap_or_default().into_keys());
    }
    if image_binary(image) == inv.binary {
        names.extend(image_env(image).into_iter().map(|(k, _)| k));
    }
    names.retain(|n| n.starts_with("CHORUS_"));
    let mut help_args: Vec<&str> = inv
        .args
        .iter()
        .take_while(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    help_args.push("--help");
    let mut cmd = Command::new(chorus_tests::binary(&inv.binary));
    cmd.args(&help_args);
    cmd.stdin(Stdio::null());
    let out = chorus_tests::output_within(cmd, Duration::from_secs(60)).expect("run the binary");
    // Help text wraps at spaces: compare with the whitespace folded.
    let help = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for name in &names {
        let listed = help.contains(&format!("[env: {name}]")) || help.contains(&format!("[env: {name}="));
        if !listed && !HIDDEN_IN_HELP.contains(&(inv.binary.as_str(), name.as_str())) {
            problems.push(format!("{}: {} does not read {name}", c.at, inv.binary));
        }
    }
}
