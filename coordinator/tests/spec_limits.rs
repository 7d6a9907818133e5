//! The coordinator's own checks of what a client sends, over real gRPC: a client that skips the
//! CLI's local validation still gets `INVALID_ARGUMENT` with the field and the limit named, and
//! the coordinator keeps serving.

use chorus_coordinator::{Options, run};
use chorus_core::limits::{BudgetLimits, MAX_SPEC_BYTES};
use chorus_proto::pb;
use chorus_proto::pb::experiment_service_client::ExperimentServiceClient;
use std::time::{Duration, Instant};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

const SPEC: &str = "name: limits
metric: {name: loss, goal: minimize}
parameters:
  lr: {values: [0.1, 0.01]}
searcher: {name: random}
max_trials: 4
parallel_trials: 2
trial:
  command: [train, '${params.lr}']
";

struct Server {
    client: ExperimentServiceClient<Channel>,
    dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    async fn start(budgets: BudgetLimits) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = Options::new(dir.path().join("coordinator"));
        opts.budgets = budgets;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run(listener, opts, |_| {}, async {
            let _ = stopped.await;
        }));
        let channel = loop {
            match Channel::from_shared(format!("http://{addr}")).unwrap().connect().await {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        // As large as anything a client could send, to see what the server does with it.
        let client = ExperimentServiceClient::new(channel)
            .max_encoding_message_size(usize::MAX)
            .max_decoding_message_size(usize::MAX);
        Server {
            client,
            dir,
            stop: Some(stop),
            task,
        }
    }

    async fn submit(&mut self, yaml: &str, overrides: &[&str]) -> Result<pb::Experiment, tonic::Status> {
        let req = pb::SubmitExperimentRequest {
            spec_yaml: yaml.to_string(),
            overrides: overrides.iter().map(|s| s.to_string()).collect(),
        };
        Ok(self
            .client
            .submit_experiment(req)
            .await?
            .into_inner()
            .experiment
            .unwrap())
    }

    async fn validate(&mut self, yaml: &str) -> Result<pb::ValidateExperimentResponse, tonic::Status> {
        let req = pb::ValidateExperimentRequest {
            spec_yaml: yaml.to_string(),
            overrides: Vec::new(),
        };
        Ok(self.client.validate_experiment(req).await?.into_inner())
    }

    async fn experiments(&mut self) -> usize {
        let resp = self
            .client
            .list_experiments(pb::ListExperimentsRequest::default())
            .await
            .unwrap();
        resp.into_inner().experiments.len()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
        drop(self.dir);
    }
}

/// The field violations of a status, as `field: description`.
fn violations(s: &tonic::Status) -> Vec<String> {
    s.get_details_bad_request()
        .map(|b| {
            b.field_violations
                .iter()
                .map(|v| format!("{}: {}", v.field, v.description))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn an_oversized_spec_reaches_the_handler_and_is_refused_with_the_limit() {
    let mut s = Server::start(BudgetLimits::default()).await;
    // Twice the limit: well under the transport's message limit, so the handler answers.
    let big = format!("{SPEC}description: '{}'\n", "x".repeat(2 * MAX_SPEC_BYTES));
    for result in [
        s.submit(&big, &[]).await.map(|_| ()),
        s.validate(&big).await.map(|_| ()),
    ] {
        let e = result.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let v = violations(&e);
        assert!(v[0].contains("the limit is 1048576 bytes (1 MiB)"), "{v:?}");
    }
    // Past the transport's own limit, the refusal still says what is too large.
    let huge = format!("{SPEC}description: '{}'\n", "x".repeat(chorus_proto::MAX_MESSAGE_BYTES));
    let e = s.submit(&huge, &[]).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("too large"), "{e:?}");
    assert_eq!(s.experiments().await, 0);
    s.stop().await;
}

#[tokio::test]
async fn validating_a_huge_condition_parent_is_cheap_and_the_server_lives() {
    let mut s = Server::start(BudgetLimits::default()).await;
    let spec = SPEC.replace(
        "  lr: {values: [0.1, 0.01]}\n",
        "  lr: {values: [0.1, 0.01]}\n  big: {min: 0, max: 1000000000000000}\n  m: {values: [1, 2], when: {big: 7}}\n",
    );
    let started = Instant::now();
    let ok = s.validate(&spec).await.unwrap();
    assert_eq!(ok.grid_size, 0, "a random search over a space too large for a grid");
    let e = s
        .validate(&spec.replace("{name: random}", "{name: grid}"))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        violations(&e)[0].starts_with("parameters: line 3, column 1: the grid has 2000000000000004 points"),
        "{:?}",
        violations(&e)
    );
    // Still serving.
    s.submit(SPEC, &[]).await.unwrap();
    s.stop().await;
}

#[tokio::test]
async fn budgets_are_capped_by_the_coordinators_limits_at_submit_and_update() {
    let limits = BudgetLimits {
        max_trials: 50,
        max_parallel_trials: 4,
        max_restarts: 2,
    };
    let mut s = Server::start(limits).await;
    let e = s
        .submit(&SPEC.replace("parallel_trials: 2", "parallel_trials: 4000000000"), &[])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        violations(&e),
        vec![
            "parallel_trials: line 7, column 1: 4000000000 is above this coordinator's limit of 4 (--max-parallel-trials)"
        ]
    );
    let e = s.submit(SPEC, &["max_trials=51", "max_restarts=3"]).await.unwrap_err();
    let v = violations(&e);
    // Named as coming from --set, not at the file's own max_trials line.
    assert!(
        v[0].starts_with("max_trials: 51 is above this coordinator's limit of 50"),
        "{v:?}"
    );
    assert!(v[0].ends_with("(from --set)"), "{v:?}");
    assert!(v[1].starts_with("max_restarts: 3 is above"), "{v:?}");
    assert_eq!(s.experiments().await, 0, "nothing stored");

    let exp = s.submit(SPEC, &[]).await.unwrap();
    let update = |max_trials: Option<u64>, parallel_trials: Option<u32>| pb::UpdateExperimentRequest {
        experiment_id: exp.id,
        max_trials,
        parallel_trials,
        max_failed_trials: None,
    };
    let e = s
        .client
        .update_experiment(update(None, Some(4_000_000_000)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("limit of 4 (--max-parallel-trials)"), "{e:?}");
    let e = s
        .client
        .update_experiment(update(Some(1_000_000), None))
        .await
        .unwrap_err();
    assert!(e.message().contains("--max-trials-per-experiment"), "{e:?}");
    let ok = s
        .client
        .update_experiment(update(Some(50), Some(4)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((ok.max_trials, ok.parallel_trials), (50, 4));
    s.stop().await;
}

#[tokio::test]
async fn nan_is_refused_and_nothing_is_stored() {
    let mut s = Server::start(BudgetLimits::default()).await;
    let e = s
        .submit(&SPEC.replace("{values: [0.1, 0.01]}", "{value: .nan}"), &[])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        violations(&e)[0].starts_with("parameters.lr.value: line 4, column 15: `.nan` is NaN"),
        "{:?}",
        violations(&e)
    );
    assert_eq!(s.experiments().await, 0);
    s.stop().await;
}
