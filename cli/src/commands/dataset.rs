//! `chorus dataset synth | pack | import | inspect`: the commands that need no coordinator; they
//! write and read a dataset in object storage through `chorus-dataset`.

use super::emit;
use crate::args::{DatasetCmd, DatasetOut, ImportCmd, ImportShards, MeldArgs, Output, StorageArgs};
use crate::error::CliError;
use crate::render;
use chorus_core::error::CoreError;
use chorus_core::storage::{Storage, StorageOptions, StorageUri, open};
use chorus_dataset::{
    DatasetError, EMOTIONS, Fer2013Options, ImportOptions, Imported, Manifest, MeldOptions, MeldPart, PackOptions,
    RavdessOptions, SynthOptions,
};
use std::process::ExitCode;

pub async fn run(cmd: DatasetCmd) -> Result<ExitCode, CliError> {
    match cmd {
        DatasetCmd::Synth(a) => {
            let storage = open_storage(&a.out.out, &a.out.storage, false)?;
            let opts = SynthOptions {
                name: dataset_name(&a.out),
                samples: a.samples,
                shards: a.shards as usize,
                seed: a.seed,
                val_fraction: a.fractions.val_fraction,
                test_fraction: a.fractions.test_fraction,
                missing: a.missing,
            };
            let m = chorus_dataset::synth(storage, &opts, a.out.force).await?;
            show(&a.out.out, &m, None, a.out.output)?;
            Ok(ExitCode::SUCCESS)
        }
        DatasetCmd::Pack(a) => {
            let storage = open_storage(&a.out.out, &a.out.storage, false)?;
            let classes = if a.classes.is_empty() {
                EMOTIONS.iter().map(|c| c.to_string()).collect()
            } else {
                a.classes.iter().map(|c| c.trim().to_string()).collect()
            };
            let opts = PackOptions {
                name: dataset_name(&a.out),
                csv: a.csv,
                classes,
                shards: a.shards.map(|k| k as usize),
                seed: a.seed,
                val_fraction: a.fractions.val_fraction,
                test_fraction: a.fractions.test_fraction,
                max_vocabulary: a.max_vocab as usize,
            };
            let m = chorus_dataset::pack(storage, &opts, a.out.force).await?;
            show(&a.out.out, &m, None, a.out.output)?;
            Ok(ExitCode::SUCCESS)
        }
        DatasetCmd::Import(cmd) => {
            let (out, imported) = import(cmd).await?;
            emit(&match out.output {
                Output::Table => render::import_summary(&out.out, &imported),
                Output::Json => render::json(&render::import_json(&out.out, &imported)),
            })?;
            Ok(ExitCode::SUCCESS)
        }
        DatasetCmd::Inspect {
            uri,
            verify,
            storage,
            output,
        } => {
            let st = open_storage(&uri, &storage, true)?;
            let m = chorus_dataset::read_manifest(&st).await.map_err(|e| match e {
                // The object key alone says nothing for `file://` URIs, whose root is the URI.
                DatasetError::NoManifest { .. } => DatasetError::NoManifest { key: uri.clone() },
                e => e,
            })?;
            let problems: Option<Vec<String>> = if verify {
                Some(
                    chorus_dataset::verify(&st, &m)
                        .await
                        .iter()
                        .map(ToString::to_string)
                        .collect(),
                )
            } else {
                None
            };
            show(&uri, &m, problems.as_deref(), output)?;
            let bad = problems.unwrap_or_default();
            for p in &bad {
                eprintln!("error: {p}");
            }
            Ok(if bad.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

/// Runs an importer; returns where it wrote, for the summary.
async fn import(cmd: ImportCmd) -> Result<(DatasetOut, Imported), CliError> {
    match cmd {
        ImportCmd::Fer2013(a) => {
            let storage = open_storage(&a.out.out, &a.out.storage, false)?;
            let opts = Fer2013Options {
                csv: a.csv,
                import: import_options(
                    &a.out,
                    &a.shards,
                    a.fractions.val_fraction,
                    a.fractions.test_fraction,
                    3,
                ),
            };
            let imported = chorus_dataset::import_fer2013(storage, &opts, a.out.force).await?;
            Ok((a.out, imported))
        }
        ImportCmd::Ravdess(a) => {
            let storage = open_storage(&a.out.out, &a.out.storage, false)?;
            let opts = RavdessOptions {
                dir: a.dir,
                val_actors: a.val_actors,
                test_actors: a.test_actors,
                speech_only: a.speech_only,
                // Two statements: the vocabulary never comes near a bound.
                import: import_options(&a.out, &a.shards, 0.0, 0.0, 1_000),
            };
            let imported = chorus_dataset::import_ravdess(storage, &opts, a.out.force).await?;
            Ok((a.out, imported))
        }
        ImportCmd::Meld(a) => {
            let storage = open_storage(&a.out.out, &a.out.storage, false)?;
            let opts = MeldOptions {
                parts: meld_parts(&a)?,
                import: import_options(&a.out, &a.shards, 0.0, 0.0, a.max_vocab as usize),
            };
            let imported = chorus_dataset::import_meld(storage, &opts, a.out.force).await?;
            Ok((a.out, imported))
        }
    }
}

fn import_options(
    out: &DatasetOut,
    shards: &ImportShards,
    val: f64,
    test: f64,
    max_vocabulary: usize,
) -> ImportOptions {
    ImportOptions {
        name: dataset_name(out),
        shards: shards.shards.map(|k| k as usize),
        seed: shards.seed,
        val_fraction: val,
        test_fraction: test,
        max_vocabulary,
    }
}

/// Pairs each --csv with its --audio-dir (one for all, or one each) and --split (none, or one
/// each), in the order given.
fn meld_parts(a: &MeldArgs) -> Result<Vec<MeldPart>, CliError> {
    let n = a.csv.len();
    if a.audio_dir.len() != 1 && a.audio_dir.len() != n {
        return Err(CliError::Usage(format!(
            "{n} --csv but {} --audio-dir: give one --audio-dir for all, or one per --csv in the same order",
            a.audio_dir.len()
        )));
    }
    if !a.split.is_empty() && a.split.len() != n {
        return Err(CliError::Usage(format!(
            "{n} --csv but {} --split: give none (split told by the file names) or one per --csv in the same order",
            a.split.len()
        )));
    }
    Ok(a.csv
        .iter()
        .enumerate()
        .map(|(i, csv)| MeldPart {
            csv: csv.clone(),
            audio_dir: a.audio_dir[if a.audio_dir.len() == 1 { 0 } else { i }].clone(),
            split: a.split.get(i).copied(),
        })
        .collect())
}

fn show(uri: &str, m: &Manifest, problems: Option<&[String]>, output: Output) -> Result<(), CliError> {
    emit(&match output {
        Output::Table => render::dataset_summary(uri, m, problems),
        Output::Json => render::json(&render::dataset_json(uri, m, problems)),
    })
}

/// `--name`, else the last segment of the URI's path (`emo` for `s3://b/datasets/emo/`), else
/// the bucket.
fn dataset_name(out: &DatasetOut) -> String {
    if let Some(n) = &out.name {
        return n.clone();
    }
    let without_query = out.out.split(['?', '#']).next().unwrap_or_default();
    let after_scheme = without_query.split_once("://").map_or(without_query, |(_, r)| r);
    after_scheme
        .split('/')
        .rfind(|s| !s.is_empty())
        .unwrap_or("dataset")
        .to_string()
}

/// Opens the store a dataset URI names. `existing`: a `file://` directory that is not there is
/// reported as "no dataset" rather than created, as opening a file store would.
fn open_storage(uri: &str, args: &StorageArgs, existing: bool) -> Result<Storage, CliError> {
    let parsed = StorageUri::parse(uri).map_err(|e| CliError::Usage(e.to_string()))?;
    if existing
        && let Ok(url) = url::Url::parse(uri)
        && url.scheme() == "file"
        && let Ok(dir) = url.to_file_path()
        && !dir.is_dir()
    {
        return Err(DatasetError::NoManifest { key: uri.to_string() }.into());
    }
    let opts = StorageOptions {
        s3_endpoint: args.s3_endpoint.clone(),
    };
    open(&parsed, &opts).map_err(|e| match e {
        CoreError::Io { path, source } => CliError::io(format!("cannot create {path}"), source),
        e => CliError::Usage(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(uri: &str) -> DatasetOut {
        DatasetOut {
            out: uri.into(),
            name: None,
            force: false,
            storage: StorageArgs { s3_endpoint: None },
            output: Output::Table,
        }
    }

    fn meld(args: &[&str]) -> MeldArgs {
        use clap::Parser;
        let mut argv = vec!["chorus", "dataset", "import", "meld", "--out", "file:///tmp/m"];
        argv.extend(args);
        match crate::args::Cli::try_parse_from(argv).unwrap().command {
            crate::args::Command::Dataset(DatasetCmd::Import(ImportCmd::Meld(a))) => a,
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn meld_csvs_pair_with_their_audio_dirs_and_splits() {
        let parts = meld_parts(&meld(&["--csv", "a.csv", "--csv", "b.csv", "--audio-dir", "wav"])).unwrap();
        let got: Vec<_> = parts
            .iter()
            .map(|p| (p.csv.to_str().unwrap(), p.audio_dir.to_str().unwrap(), p.split))
            .collect();
        assert_eq!(got, [("a.csv", "wav", None), ("b.csv", "wav", None)]);
        let parts = meld_parts(&meld(&[
            "--csv",
            "a.csv",
            "--audio-dir",
            "x",
            "--split",
            "dev",
            "--csv",
            "b.csv",
            "--audio-dir",
            "y",
            "--split",
            "test",
        ]))
        .unwrap();
        assert_eq!(parts[1].audio_dir.to_str(), Some("y"));
        assert_eq!(
            (parts[0].split, parts[1].split),
            (Some(chorus_dataset::Split::Val), Some(chorus_dataset::Split::Test))
        );
        let e = meld_parts(&meld(&[
            "--csv",
            "a.csv",
            "--audio-dir",
            "x",
            "--split",
            "val",
            "--split",
            "test",
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("1 --csv but 2 --split"), "{e}");
    }

    #[test]
    fn names_default_to_the_last_path_segment() {
        assert_eq!(dataset_name(&out("s3://bucket/datasets/emo")), "emo");
        assert_eq!(dataset_name(&out("file:///tmp/emo/")), "emo");
        assert_eq!(dataset_name(&out("s3://bucket")), "bucket");
        assert_eq!(dataset_name(&out("memory://")), "dataset");
        let mut named = out("s3://b/x");
        named.name = Some("fer".into());
        assert_eq!(dataset_name(&named), "fer");
    }
}
