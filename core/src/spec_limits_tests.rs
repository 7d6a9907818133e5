//! Specs that try to cost more than a spec may: each is refused with the field and the line, in
//! bounded time, and every spec that is accepted reads back the same once normalised.

use super::*;
use crate::limits::*;
use proptest::prelude::*;
use std::time::{Duration as Elapsed, Instant};

const BASE: &str = "name: limits
metric: {name: loss, goal: minimize}
parameters:
  lr: {values: [0.1, 0.01]}
searcher: {name: random, seed: 3}
max_trials: 4
trial:
  command: [train, '${params.lr}']
";

fn errors_of(r: Result<ValidSpec, CoreError>) -> Vec<FieldError> {
    match r {
        Err(CoreError::Spec(SpecErrors(v))) => v,
        other => panic!("expected spec errors, got {other:?}"),
    }
}

fn errors(yaml: &str) -> Vec<FieldError> {
    errors_of(parse(yaml, &[]))
}

/// `BASE` with the parameters replaced by `params` (each a line under `parameters:`).
fn with_params(params: &[String], searcher: &str) -> String {
    let mut y = String::from("name: limits\nmetric: {name: loss, goal: minimize}\nparameters:\n");
    for p in params {
        y.push_str("  ");
        y.push_str(p);
        y.push('\n');
    }
    y.push_str(&format!("searcher: {searcher}\ntrial:\n  command: [train]\n"));
    y
}

#[test]
fn a_grid_is_sized_exactly_and_refused_above_the_limit() {
    // Ten parameters of 1,000 values: 10^30 points, once saturated to u64::MAX and accepted.
    let params: Vec<String> = (0..10).map(|i| format!("p{i}: {{min: 1, max: 1000}}")).collect();
    let e = errors(&with_params(&params, "{name: grid}"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].path, "parameters");
    assert_eq!(e[0].location, Some((3, 1)));
    assert!(
        e[0].message.contains("1000000000000000000000000000000 points") && e[0].message.contains("10000000 points"),
        "{e:?}"
    );
    assert!(
        e[0].message.contains("p0: 1000"),
        "names the parameters that make it large: {e:?}"
    );

    // Exactly at the limit it is accepted, one value more is not.
    let at = |b: u64| {
        with_params(
            &["a: {min: 1, max: 10000}".into(), format!("b: {{min: 1, max: {b}}}")],
            "{name: grid}",
        )
    };
    assert_eq!(parse(&at(1000), &[]).unwrap().max_trials, MAX_GRID_POINTS);
    let e = errors(&at(1001));
    assert!(e[0].message.contains("10010000 points"), "{e:?}");

    // Past u128, it says so rather than wrapping.
    let params: Vec<String> = (0..3)
        .map(|i| format!("p{i}: {{min: -9223372036854775808, max: 9223372036854775807}}"))
        .collect();
    let e = errors(&with_params(&params, "{name: grid}"));
    assert!(e[0].message.contains("more than 2^128 points"), "{e:?}");
}

#[test]
fn a_huge_condition_parent_costs_nothing_to_validate() {
    // A parent of 10^15 integers: validation once built every value and aborted the process.
    let params = [
        "big: {min: 0, max: 1000000000000000}".to_string(),
        "child: {values: [1, 2], when: {big: [5, 999999999999999]}}".to_string(),
    ];
    for searcher in ["{name: random}", "{name: tpe}"] {
        let started = Instant::now();
        let v = parse(
            &with_params(&params, searcher).replace("trial:", "max_trials: 3\ntrial:"),
            &[],
        )
        .unwrap();
        assert!(started.elapsed() < Elapsed::from_secs(2), "{:?}", started.elapsed());
        assert!(v.space.condition("child").is_some());
    }
    // As a grid it is sized exactly: 10^15 + 1 values, two of which carry two children each.
    let started = Instant::now();
    let e = errors(&with_params(&params, "{name: grid}"));
    assert!(started.elapsed() < Elapsed::from_secs(2), "{:?}", started.elapsed());
    assert!(e[0].message.contains("1000000000000003 points"), "{e:?}");

    // Conditions leading to more subtrees than the sizing may visit (600 named values, each
    // with 200 parameters below): still known too large, from the parameters always active.
    let mut params = vec!["big: {min: 0, max: 1000000000000000}".to_string()];
    for i in 0..200 {
        let named: Vec<String> = (0..3).map(|k| (k * 200 + i).to_string()).collect();
        params.push(format!(
            "c{i}: {{values: [1, 2], when: {{big: [{}]}}}}",
            named.join(",")
        ));
    }
    let started = Instant::now();
    let e = errors(&with_params(&params, "{name: grid}"));
    assert!(started.elapsed() < Elapsed::from_secs(5), "{:?}", started.elapsed());
    assert!(
        e[0].message.contains("the grid has at least 1000000000000001 points"),
        "{e:?}"
    );

    // A builtin trial type-checks with a representative value, not the whole range.
    let builtin = with_params(&params, "{name: random}")
        .replace("trial:\n  command: [train]\n", "max_trials: 2\ntrial:\n  builtin:\n    model: {modalities: [image]}\n    data: file:///tmp/emo\n    epochs: '${params.big}'\n");
    let started = Instant::now();
    let _ = parse(&builtin, &[]);
    assert!(started.elapsed() < Elapsed::from_secs(2), "{:?}", started.elapsed());
}

#[test]
fn a_condition_on_a_large_range_enumerates_in_value_order() {
    let params = [
        "a: {min: 0, max: 40}".to_string(),
        "b: {values: [x, y], when: {a: [3, 17, 40]}}".to_string(),
        "c: {values: [1, 2, 3], when: {a: 17}}".to_string(),
    ];
    let v = parse(&with_params(&params, "{name: grid}"), &[]).unwrap();
    // 38 values alone, 3 and 40 with two b each, 17 with two b and three c.
    assert_eq!(v.max_trials, 38 + 2 * 2 + 2 * 3);
    let points: Vec<Params> = (0..v.max_trials)
        .map(|i| space::grid_point(&v.space, i).unwrap())
        .collect();
    let mut want = Vec::new();
    for a in 0..=40i64 {
        let bs: Vec<Option<&str>> = if [3, 17, 40].contains(&a) {
            vec![Some("x"), Some("y")]
        } else {
            vec![None]
        };
        let cs: Vec<Option<i64>> = if a == 17 {
            vec![Some(1), Some(2), Some(3)]
        } else {
            vec![None]
        };
        for b in &bs {
            for c in &cs {
                let mut p = Params::from([("a".to_string(), a.into())]);
                if let Some(b) = b {
                    p.insert("b".into(), (*b).into());
                }
                if let Some(c) = c {
                    p.insert("c".into(), (*c).into());
                }
                want.push(p);
            }
        }
    }
    assert_eq!(points, want);
    assert!(space::grid_point(&v.space, v.max_trials).is_none());
}

#[test]
fn tangled_conditions_are_refused_within_a_step_budget() {
    // Every parameter depends on all the earlier ones: counting would visit 2^40 subtrees.
    let mut params = vec!["p00: {values: [0, 1]}".to_string()];
    for i in 1..40 {
        let when: Vec<String> = (0..i).map(|j| format!("p{j:02}: [0, 1]")).collect();
        params.push(format!("p{i:02}: {{values: [0, 1], when: {{{}}}}}", when.join(", ")));
    }
    let started = Instant::now();
    let e = errors(&with_params(&params, "{name: grid}"));
    assert!(started.elapsed() < Elapsed::from_secs(20), "{:?}", started.elapsed());
    assert_eq!(e[0].path, "parameters");
    assert!(e[0].message.contains("too intricate"), "{e:?}");
}

#[test]
fn a_long_cycle_is_found_once_in_linear_time() {
    let n = 1000;
    let params: Vec<String> = (0..n)
        .map(|i| format!("p{i:04}: {{values: [0, 1], when: {{p{:04}: 0}}}}", (i + 1) % n))
        .collect();
    let started = Instant::now();
    let e = errors(&with_params(&params, "{name: random}").replace("trial:", "max_trials: 1\ntrial:"));
    assert!(started.elapsed() < Elapsed::from_secs(5), "{:?}", started.elapsed());
    let cycles: Vec<&FieldError> = e.iter().filter(|e| e.message.contains("cycle")).collect();
    assert_eq!(cycles.len(), 1, "{e:?}");
    assert_eq!(cycles[0].path, "parameters.p0000.when.p0001");
}

#[test]
fn nan_and_infinities_are_refused_with_their_field_and_line() {
    // `.nan` once became `null`, and the stored spec could never be read again.
    let cases = [
        ("{values: [0.1, 0.01]}", "{value: .nan}", "parameters.lr.value", 4),
        (
            "{values: [0.1, 0.01]}",
            "{values: [0.1, -.inf]}",
            "parameters.lr.values[1]",
            4,
        ),
        ("{values: [0.1, 0.01]}", "{min: 0, max: .Inf}", "parameters.lr.max", 4),
        ("{values: [0.1, 0.01]}", "{min: 0, max: 1e999}", "parameters.lr.max", 4),
        ("goal: minimize}", "goal: minimize, target: .NaN}", "metric.target", 2),
        ("seed: 3}", "seed: 3, gamma: .nan}", "searcher.gamma", 5),
    ];
    for (from, to, path, line) in cases {
        let yaml = BASE.replace(from, to).replace(
            "name: random",
            if path.contains("gamma") {
                "name: tpe"
            } else {
                "name: random"
            },
        );
        let e = errors(&yaml);
        assert_eq!(e.len(), 1, "{to}: {e:?}");
        assert_eq!(
            (e[0].path.as_str(), e[0].location.map(|l| l.0)),
            (path, Some(line)),
            "{to}: {e:?}"
        );
        assert!(e[0].message.contains("finite"), "{e:?}");
    }
    // In a condition and in a builtin tree too.
    let e = errors(&BASE.replace(
        "  lr: {values: [0.1, 0.01]}\n",
        "  lr: {values: [0.1, 0.01]}\n  m: {values: [1], when: {lr: .nan}}\n",
    ));
    assert_eq!(e[0].path, "parameters.m.when.lr");
    // A quoted `.nan` is a string, as YAML says.
    parse(&BASE.replace("{values: [0.1, 0.01]}", "{values: ['.nan', nan]}"), &[]).unwrap();
    // And through --set, with the override named.
    let e = errors_of(parse(BASE, &["parameters.lr.value=.nan".into()]));
    assert_eq!(e[0].path, "parameters.lr.value");
    assert!(e[0].message.contains("(from --set)"), "{e:?}");
    let e = errors_of(parse(BASE, &["metric.target=[1, .inf]".into()]));
    assert_eq!(e[0].path, "metric.target[1]");
}

#[test]
fn a_duplicate_key_is_reported_where_it_is_repeated() {
    // Once reported at line 1, column 1 (the top level) or not at all (a parameter).
    let e = errors(&BASE.replace("max_trials: 4\n", "max_trials: 4\nmax_trials: 5\n"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!((e[0].path.as_str(), e[0].location), ("max_trials", Some((7, 1))));
    assert!(e[0].message.contains("first at line 6, column 1"), "{e:?}");
    let e = errors(&BASE.replace(
        "  lr: {values: [0.1, 0.01]}\n",
        "  lr: {values: [0.1, 0.01]}\n  lr: {values: [1]}\n",
    ));
    assert_eq!((e[0].path.as_str(), e[0].location), ("parameters.lr", Some((5, 3))));
    let e = errors(&BASE.replace("{values: [0.1, 0.01]}", "{values: [0.1], values: [1]}"));
    assert_eq!(
        (e[0].path.as_str(), e[0].location),
        ("parameters.lr.values", Some((4, 23)))
    );
}

#[test]
fn serde_errors_do_not_repeat_their_path() {
    let e = errors(&BASE.replace("{values: [0.1, 0.01]}", "{values: [1], distrib: x}"));
    assert!(e[0].message.starts_with("unknown field `distrib`"), "{e:?}");
}

#[test]
fn size_limits() {
    // Just over 1 MiB: refused before it is parsed.
    let big = format!("{BASE}description: '{}'\n", "x".repeat(MAX_SPEC_BYTES));
    let started = Instant::now();
    let e = errors(&big);
    assert!(started.elapsed() < Elapsed::from_millis(100), "{:?}", started.elapsed());
    assert!(e[0].message.contains("the limit is 1048576 bytes (1 MiB)"), "{e:?}");
    assert!(e[0].message.contains(&format!("{} bytes", big.len())), "{e:?}");
    // A stored (normalised) spec is read back whatever its length.
    let wide: Vec<String> = (0..MAX_ITEMS).map(|i| i.to_string()).collect();
    let long = BASE.replace("[0.1, 0.01]", &format!("[{}]", wide.join(",")));
    let v = parse(&long, &[]).unwrap();
    assert_eq!(parse_stored(&v.to_yaml()).unwrap(), v);
    // Too many or too long overrides.
    let many: Vec<String> = (0..=MAX_OVERRIDES).map(|_| "max_trials=3".to_string()).collect();
    assert!(errors_of(parse(BASE, &many))[0].message.contains("--set overrides"));
    let deep = format!("{}=1", vec!["a"; MAX_DEPTH + 1].join("."));
    assert!(errors_of(parse(BASE, &[deep]))[0].message.contains("levels"));
    // Structure.
    let e = errors(&BASE.replace("[0.1, 0.01]", &format!("[{}]", vec!["1"; MAX_ITEMS + 1].join(","))));
    // Found at the first item past the limit.
    assert_eq!(
        (e[0].path.as_str(), e[0].location),
        ("parameters.lr.values", Some((4, 20017)))
    );
    let e = errors(&BASE.replace("name: limits", &format!("name: {}", "n".repeat(MAX_STRING_BYTES + 1))));
    assert_eq!(e[0].path, "name");
    let params: Vec<String> = (0..=MAX_PARAMETERS).map(|i| format!("p{i}: {{value: 1}}")).collect();
    let e = errors(&with_params(&params, "{name: random}").replace("trial:", "max_trials: 1\ntrial:"));
    assert_eq!(e[0].path, "parameters");
    assert!(e[0].message.contains("the limit is 1000"), "{e:?}");
}

#[test]
fn errors_are_capped() {
    let params: Vec<String> = (0..300).map(|i| format!("p{i}: {{min: 2, max: 1}}")).collect();
    let e = errors(&with_params(&params, "{name: random}").replace("trial:", "max_trials: 1\ntrial:"));
    assert_eq!(e.len(), MAX_ERRORS + 1);
    assert_eq!(e[MAX_ERRORS].message, "... and 200 more problems");
}

#[test]
fn spec_text_checks_size_and_utf8() {
    assert_eq!(spec_text(b"name: x\n").unwrap(), "name: x\n");
    let e = errors_of(spec_text(b"name: x\nmetric: {name: l\xc3\xa9\xff}\n").map(|_| unreachable!()));
    assert_eq!(e[0].location, Some((2, 18)), "{e:?}");
    assert!(e[0].message.contains("0xFF at offset 26"), "{e:?}");
    let big = vec![b'#'; MAX_SPEC_BYTES + 1];
    let e = errors_of(spec_text(&big).map(|_| unreachable!()));
    assert!(e[0].message.contains("1048577 bytes"), "{e:?}");
}

#[test]
fn ranges_a_float_cannot_draw_from_are_refused() {
    let e = errors(&BASE.replace("{values: [0.1, 0.01]}", "{min: -1e308, max: 1e308}"));
    assert_eq!(e[0].path, "parameters.lr.max");
    assert!(e[0].message.contains("wider than a float"), "{e:?}");
    let e = errors(&BASE.replace(
        "{values: [0.1, 0.01]}",
        "{min: 0, max: 1e300, distribution: q_uniform, q: 1e-300}",
    ));
    assert_eq!(e[0].path, "parameters.lr.q");
    assert!(e[0].message.contains("2^53"), "{e:?}");
}

#[test]
fn budgets_are_checked_against_the_coordinators_limits() {
    let limits = BudgetLimits {
        max_trials: 100,
        max_parallel_trials: 8,
        max_restarts: 3,
    };
    let yaml = BASE.replace(
        "max_trials: 4\n",
        "max_trials: 4\nparallel_trials: 4000000000\nmax_restarts: 9\n",
    );
    // The CLI knows no limit; u32 itself holds four billion.
    assert_eq!(parse(&yaml, &[]).unwrap().spec.parallel_trials, 4_000_000_000);
    let e = errors_of(parse_with(&yaml, &[], &limits));
    let got: Vec<(&str, Option<usize>)> = e.iter().map(|e| (e.path.as_str(), e.location.map(|l| l.0))).collect();
    assert_eq!(got, vec![("parallel_trials", Some(7)), ("max_restarts", Some(8))]);
    assert!(e[0].message.contains("limit of 8 (--max-parallel-trials)"), "{e:?}");
    let e = errors_of(parse_with(BASE, &["max_trials=101".into()], &limits));
    assert!(
        e[0].message
            .contains("101 is above this coordinator's limit of 100 trials"),
        "{e:?}"
    );
    // A grid without max_trials asks for all its points.
    let grid = with_params(&["a: {min: 1, max: 200}".into()], "{name: grid}");
    let e = errors_of(parse_with(&grid, &[], &limits));
    assert!(e[0].message.contains("the grid has 200 points, more than"), "{e:?}");
    assert_eq!(
        parse_with(&grid, &["max_trials=50".into()], &limits)
            .unwrap()
            .max_trials,
        50
    );
    // TPE's candidates are bounded by the spec itself.
    let e = errors(&BASE.replace("{name: random, seed: 3}", "{name: tpe, n_ei_candidates: 4000000000}"));
    assert_eq!(e[0].path, "searcher.n_ei_candidates");
}

#[test]
fn stored_yaml_is_checked_to_read_back() {
    let v = parse(BASE, &[]).unwrap();
    assert_eq!(parse_stored(&v.to_stored_yaml().unwrap()).unwrap(), v);
    // A spec built by hand with a NaN (which no file can give) is refused, not stored as null.
    let mut bad = v.clone();
    bad.spec.parameters.get_mut("lr").unwrap().value = Some(serde_json::json!(1.0));
    bad.spec.parameters.get_mut("lr").unwrap().values = None;
    bad.spec.metric.as_mut().unwrap().target = Some(f64::NAN);
    assert!(bad.to_stored_yaml().is_err());
}

/// Strings that YAML may read as something else, and any text at all.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9_]{0,8}",
        prop::sample::select(vec![
            "true",
            "false",
            "null",
            "~",
            "yes",
            "no",
            "1",
            "-1",
            "0x1F",
            "0o17",
            "1e5",
            "1_000",
            ".5",
            ".nan",
            "-.inf",
            "012",
            "+1",
            "a: b",
            "- x",
            "#c",
            "'q'",
            "\"",
            "\\",
            " lead",
            "trail ",
            "",
            "\t",
            "a\nb",
            "@x",
            "`",
            "%x",
            "!tag",
            "&a",
            "*a",
            "{",
            "[",
            "? x",
            "2024-01-01",
            "\u{feff}x",
            "x\u{85}y",
            "\u{2028}",
            "é",
        ])
        .prop_map(str::to_string),
        any::<String>().prop_map(|s| s.chars().take(12).collect()),
    ]
}

fn nonempty_text() -> impl Strategy<Value = String> {
    text().prop_filter("a name", |s| !s.trim().is_empty())
}

fn finite() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>().prop_filter("finite", |f| f.is_finite()),
        -1e3f64..1e3,
        Just(0.0),
        Just(-0.0)
    ]
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        finite().prop_map(Value::from),
        text().prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map(text(), inner, 0..3).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn param() -> impl Strategy<Value = ParamSpec> {
    let ints = (-1000i64..1000, 0i64..1000).prop_map(|(lo, w)| ParamSpec {
        min: Some(lo.into()),
        max: Some((lo + w).into()),
        ..Default::default()
    });
    let floats = (finite(), 0f64..1e6, prop::option::of(Just(Distribution::Uniform))).prop_map(|(lo, w, d)| {
        let lo = lo.clamp(-1e12, 1e12);
        ParamSpec {
            min: Number::from_f64(lo),
            max: Number::from_f64(lo + w),
            distribution: d,
            ..Default::default()
        }
    });
    let log = (1e-6f64..1.0, 1.0f64..1e3).prop_map(|(lo, hi)| ParamSpec {
        min: Number::from_f64(lo),
        max: Number::from_f64(hi),
        distribution: Some(Distribution::LogUniform),
        ..Default::default()
    });
    let log_int = (1i64..2000, prop_oneof![0i64..10, 0i64..1_000_000, Just(i64::MAX)]).prop_map(|(lo, w)| ParamSpec {
        min: Some(lo.into()),
        max: Some(lo.saturating_add(w).into()),
        distribution: Some(Distribution::LogIntUniform),
        ..Default::default()
    });
    let quantised =
        (0i64..100, 1i64..100, prop::sample::select(vec![0.1, 0.25, 1.0, 2.5])).prop_map(|(lo, w, q)| ParamSpec {
            min: Number::from_f64(lo as f64 * q),
            max: Number::from_f64((lo + w) as f64 * q),
            distribution: Some(Distribution::QUniform),
            q: Some(q),
            ..Default::default()
        });
    prop_oneof![
        value()
            .prop_filter("a constant is not null", |v| !v.is_null())
            .prop_map(|v| ParamSpec {
                value: Some(v),
                ..Default::default()
            }),
        prop::collection::vec(value(), 1..4).prop_map(|vs| ParamSpec {
            values: Some(vs),
            ..Default::default()
        }),
        ints,
        floats,
        log,
        log_int,
        quantised,
    ]
}

/// Parameters, some conditional on an earlier list parameter taking some of its values.
fn parameters() -> impl Strategy<Value = BTreeMap<String, ParamSpec>> {
    prop::collection::vec((param(), any::<u64>()), 1..5).prop_map(|ps| {
        let mut out: BTreeMap<String, ParamSpec> = BTreeMap::new();
        for (i, (mut p, bits)) in ps.into_iter().enumerate() {
            let lists: Vec<(String, Vec<Value>)> = out
                .iter()
                .filter(|(_, q)| q.when.is_none())
                .filter_map(|(n, q)| Some((n.clone(), q.values.clone()?)))
                .collect();
            if bits % 3 == 0 && !lists.is_empty() {
                let (parent, values) = &lists[(bits as usize / 3) % lists.len()];
                let pick = values[(bits as usize >> 8) % values.len()].clone();
                let given = if bits & 1 << 20 == 0 {
                    pick
                } else {
                    Value::Array(vec![pick])
                };
                p.when = Some(BTreeMap::from([(parent.clone(), given)]));
            }
            out.insert(format!("p{i}"), p);
        }
        out
    })
}

fn spec() -> impl Strategy<Value = ExperimentSpec> {
    let searcher = prop_oneof![
        any::<u64>().prop_map(|seed| (SearcherName::Random, seed, None)),
        (any::<u64>(), 0.01f64..0.99).prop_map(|(seed, g)| (SearcherName::Tpe, seed, Some(g))),
        Just((SearcherName::Grid, 0, None)),
    ];
    let metric =
        (nonempty_text(), any::<bool>(), prop::option::of(finite())).prop_map(|(name, max, target)| MetricSpec {
            name,
            goal: if max { Goal::Maximize } else { Goal::Minimize },
            target,
        });
    let trial = (
        prop::collection::vec(text(), 0..4),
        prop::collection::btree_map("[A-Z_]{1,6}", text(), 0..3),
        prop::option::of(prop::sample::select(vec!["90s", "2h", "1m 30s"])),
    )
        .prop_map(|(args, env, timeout)| TrialSpec {
            command: std::iter::once("train".to_string()).chain(args).collect(),
            builtin: None,
            env,
            timeout: timeout.map(str::to_string),
        });
    let resources = (
        1u32..4,
        any::<bool>(),
        1u32..4,
        0u32..2,
        prop::collection::btree_map(nonempty_text(), text(), 0..2),
    )
        .prop_map(|(w, elastic, cpus, gpus, labels)| ResourceSpec {
            workers: if elastic {
                WorkerCount::Elastic { min: 1, max: w }
            } else {
                WorkerCount::Fixed(w)
            },
            cpus,
            gpus,
            labels,
        });
    (
        (nonempty_text(), text(), metric, parameters(), searcher),
        (
            prop::option::of(1u64..500),
            1u32..64,
            prop::option::of(0u64..9),
            0u32..5,
        ),
        (
            resources,
            trial,
            prop::option::of(Just("s3://bucket/chorus".to_string())),
            1u32..5,
            0u32..3,
        ),
    )
        .prop_map(
            |(
                (name, description, metric, parameters, (searcher, seed, gamma)),
                (max_trials, parallel_trials, max_failed_trials, max_restarts),
                (resources, trial, storage, keep_last, keep_best),
            )| ExperimentSpec {
                name,
                description,
                metric: Some(metric),
                metrics: Vec::new(),
                parameters,
                searcher: SearcherSpec {
                    name: searcher,
                    seed,
                    n_startup_trials: None,
                    n_ei_candidates: None,
                    gamma,
                    reduction_factor: None,
                    grace_period: None,
                    stop_once: None,
                    brackets: None,
                    sampler: None,
                    max_resource: None,
                    resource: None,
                    population_size: None,
                    perturbation_interval: None,
                    quantile_fraction: None,
                    resample_probability: None,
                },
                scheduler: None,
                max_trials: max_trials.or((searcher != SearcherName::Grid).then_some(10)),
                parallel_trials,
                max_failed_trials,
                max_restarts,
                resources,
                trial,
                storage,
                checkpoint: CheckpointSpec { keep_last, keep_best },
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// parse(to_yaml(parse(x))) == parse(x) for every accepted x, and what is stored reads back.
    #[test]
    fn every_accepted_spec_round_trips(spec in spec(), flow in any::<bool>()) {
        let x = serde_yaml_ng::to_string(&spec).unwrap();
        // Also as one line of flow style, as people write small specs.
        let x = if flow { serde_json::to_string(&spec).unwrap() } else { x };
        let Ok(first) = parse(&x, &[]) else {
            // Only grids of continuous or log-integer parameters are expected to be refused.
            prop_assume!(false);
            unreachable!()
        };
        let y = first.to_yaml();
        let again = parse(&y, &[]).unwrap_or_else(|e| panic!("{e}\n--- normalised:\n{y}\n--- from:\n{x}"));
        prop_assert_eq!(&again, &first, "normalised:\n{}", y);
        prop_assert_eq!(first.to_stored_yaml().unwrap(), y);
        prop_assert_eq!(again.to_yaml(), first.to_yaml());
    }
}
