//! Listing over real gRPC: server reflection in both versions, and paged `ListTrials` and
//! `ListExperiments` over a sweep of 20,000 trials that grows while a client pages through it.

use chorus_coordinator::{Options, run};
use chorus_core::limits::BudgetLimits;
use chorus_proto::pb;
use chorus_proto::pb::experiment_service_client::ExperimentServiceClient;
use std::time::{Duration, Instant};
use tonic::Code;
use tonic::transport::Channel;

struct Server {
    channel: Channel,
    client: ExperimentServiceClient<Channel>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
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
        let client =
            ExperimentServiceClient::new(channel.clone()).max_decoding_message_size(chorus_proto::MAX_MESSAGE_BYTES);
        Server {
            channel,
            client,
            stop: Some(stop),
            task,
            _dir: dir,
        }
    }

    async fn submit(&mut self, name: &str, max_trials: u64, parallel: u32) -> u64 {
        let spec_yaml = format!(
            "name: {name}\nmetric: {{name: loss, goal: minimize}}\nparameters:\n  lr: {{min: 0.001, max: 0.1}}\n\
             searcher: {{name: random, seed: 1}}\nmax_trials: {max_trials}\nparallel_trials: {parallel}\n\
             trial:\n  command: [train, '${{params.lr}}']\n"
        );
        let req = pb::SubmitExperimentRequest {
            spec_yaml,
            overrides: vec![],
        };
        self.client
            .submit_experiment(req)
            .await
            .unwrap()
            .into_inner()
            .experiment
            .unwrap()
            .id
    }

    async fn trials_page(&mut self, exp: u64, size: u32, token: &str) -> Result<pb::ListTrialsResponse, tonic::Status> {
        let req = pb::ListTrialsRequest {
            experiment_id: exp,
            page_size: size,
            page_token: token.to_string(),
        };
        Ok(self.client.list_trials(req).await?.into_inner())
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn reflection_lists_the_services_in_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1, v1alpha};
    let server = Server::start(BudgetLimits::default()).await;
    let want = [
        "chorus.v1.ExperimentLifecycleService",
        "chorus.v1.ExperimentService",
        "chorus.v1.WorkerService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];

    let mut c1 = v1::server_reflection_client::ServerReflectionClient::new(server.channel.clone());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut answers = c1
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = answers.message().await.unwrap().expect("a v1 answer");
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) = resp.message_response
    else {
        panic!("v1 answered {resp:?}")
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(names, want);

    let mut c0 = v1alpha::server_reflection_client::ServerReflectionClient::new(server.channel.clone());
    let list = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    // The descriptor of the experiment service, through v1alpha, names the new call.
    let symbol = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "chorus.v1.ExperimentService".into(),
            ),
        ),
    };
    let mut answers = c0
        .server_reflection_info(tokio_stream::iter([list, symbol]))
        .await
        .unwrap()
        .into_inner();
    let resp = answers.message().await.unwrap().expect("a v1alpha answer");
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) = resp.message_response
    else {
        panic!("v1alpha answered {resp:?}")
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(names, want);
    let resp = answers.message().await.unwrap().expect("a second v1alpha answer");
    let Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        resp.message_response
    else {
        panic!("v1alpha answered {resp:?}")
    };
    assert!(
        files
            .file_descriptor_proto
            .iter()
            .any(|f| f.windows(b"TrialMetrics".len()).any(|w| w == b"TrialMetrics")),
        "the experiment service's descriptor names TrialMetrics"
    );
    server.stop().await;
}

/// 20,000 trials (an experiment with no workers creates `parallel_trials` of them at once),
/// read in pages while 500 more are created: every trial exactly once, in creation order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trials_page_through_a_growing_sweep_exactly_once_in_order() {
    let mut server = Server::start(BudgetLimits {
        max_parallel_trials: 20_500,
        ..BudgetLimits::default()
    })
    .await;
    let t0 = Instant::now();
    let exp = server.submit("big", 20_500, 20_000).await;
    let other = server.submit("small", 3, 3).await;
    eprintln!("created 20,000 trials in {:.2?}", t0.elapsed());

    let first = server.trials_page(exp, 0, "").await.unwrap();
    assert_eq!(first.trials.len(), 1_000, "the default page size");
    assert_eq!((first.metric.as_str(), first.maximize), ("loss", false));
    assert!(!first.next_page_token.is_empty());
    let capped = server.trials_page(exp, 1_000_000, "").await.unwrap();
    assert_eq!(capped.trials.len(), 10_000, "the largest page");

    let mut ids = Vec::new();
    let mut seqs = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    let mut slowest = Duration::ZERO;
    loop {
        let t = Instant::now();
        let page = server.trials_page(exp, 777, &token).await.unwrap();
        slowest = slowest.max(t.elapsed());
        assert!(page.trials.len() <= 777);
        assert!(page.trials.iter().all(|t| t.experiment_id == exp));
        ids.extend(page.trials.iter().map(|t| t.id));
        seqs.extend(page.trials.iter().map(|t| t.seq));
        pages += 1;
        if pages == 10 {
            // More trials are created while the client pages: they come after its token.
            let req = pb::UpdateExperimentRequest {
                experiment_id: exp,
                parallel_trials: Some(20_500),
                ..Default::default()
            };
            server.client.update_experiment(req).await.unwrap();
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    eprintln!("{pages} pages of 777; the slowest took {slowest:.2?}");
    assert_eq!(ids.len(), 20_500);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids in order, none twice");
    assert_eq!(
        seqs,
        (0..20_500).collect::<Vec<u64>>(),
        "every trial, in creation order"
    );
    assert_eq!(pages, 20_500usize.div_ceil(777));

    // A token is bound to its listing, and a made-up one is refused with the reason.
    let page = server.trials_page(exp, 5, "").await.unwrap();
    for (bad, on) in [
        (page.next_page_token.as_str(), other),
        ("e.5", exp),
        ("garbage", exp),
        ("t1.", exp),
    ] {
        let err = server.trials_page(on, 5, bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
        assert!(
            err.message()
                .contains("is not a page token of the trials of experiment"),
            "{}",
            err.message()
        );
    }
    let err = server.trials_page(999, 5, "").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Experiments page the same way.
    for i in 0..3 {
        server.submit(&format!("more-{i}"), 1, 1).await;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let req = pb::ListExperimentsRequest {
            page_size: 2,
            page_token: token,
            ..Default::default()
        };
        let page = server.client.list_experiments(req).await.unwrap().into_inner();
        assert!(page.experiments.len() <= 2);
        seen.extend(page.experiments.iter().map(|e| e.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, [1, 2, 3, 4, 5]);
    let req = pb::ListExperimentsRequest {
        page_size: 2,
        page_token: "t1.1".into(),
        ..Default::default()
    };
    let err = server.client.list_experiments(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    server.stop().await;
}
