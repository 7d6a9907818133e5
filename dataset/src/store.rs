//! A dataset in object storage: the manifest and shards directly under a storage root.

use crate::error::{DatasetError, Result};
use crate::manifest::{
    FORMAT_VERSION, IMAGE_SIZE, MANIFEST, Manifest, SAMPLE_RATE, ShardInfo, Split, SplitCounts, shard_key,
};
use crate::sample::Sample;
use crate::shard::ShardWriter;
use crate::vocab::Vocabulary;
use bytes::Bytes;
use chorus_core::storage::Storage;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

fn object(storage: &Storage, name: &str) -> Path {
    storage.root.clone().join(name)
}

/// Reads and validates `manifest.json` under the storage root. A missing manifest is
/// [`DatasetError::NoManifest`]: the dataset was never committed.
pub async fn read_manifest(storage: &Storage) -> Result<Manifest> {
    let key = object(storage, MANIFEST);
    let bytes = match storage.store.get(&key).await {
        Ok(r) => r.bytes().await.map_err(|e| DatasetError::store(&key, e))?,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(DatasetError::NoManifest { key: key.to_string() });
        }
        Err(e) => return Err(DatasetError::store(&key, e)),
    };
    let bad = |reason: String| DatasetError::Manifest {
        key: key.to_string(),
        reason,
    };
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a dataset manifest: {e}")))?;
    manifest.validate().map_err(bad)?;
    Ok(manifest)
}

/// Downloads one shard and checks its size and CRC-32C against the manifest, so a truncated or
/// replaced shard is caught before any sample is decoded.
pub async fn fetch_shard(storage: &Storage, shard: &ShardInfo) -> Result<Bytes> {
    let key = object(storage, &shard.key);
    let bytes = match storage.store.get(&key).await {
        Ok(r) => r.bytes().await.map_err(|e| DatasetError::store(&key, e))?,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(DatasetError::shard(
                &shard.key,
                "listed in the manifest but missing from storage",
            ));
        }
        Err(e) => return Err(DatasetError::store(&key, e)),
    };
    shard.verify(&bytes)?;
    Ok(bytes)
}

/// Fetches and decodes every shard, as a trainer would, and returns one error per bad shard
/// (none when the dataset is sound). For `chorus dataset inspect --verify`.
pub async fn verify(storage: &Storage, manifest: &Manifest) -> Vec<DatasetError> {
    let mut problems = Vec::new();
    for shard in &manifest.shards {
        let checked = match fetch_shard(storage, shard).await {
            Ok(bytes) => crate::shard::parse_shard(&shard.key, &bytes, manifest).map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = checked {
            problems.push(e);
        }
    }
    problems
}

/// One shard to be written: its key, split and exact number of samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedShard {
    pub key: String,
    pub split: Split,
    pub samples: u64,
}

/// How samples are cut into shards: each shard holds one split, every non-empty split gets at
/// least one shard (the worker needs a val shard to report val metrics), and the remaining
/// shards go where shards are fullest, so sizes stay even.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    /// Train shards first, then val, then test; keys numbered in that order.
    pub shards: Vec<PlannedShard>,
}

impl ShardPlan {
    pub fn new(counts: SplitCounts, shards: usize) -> Result<Self> {
        let non_empty: Vec<Split> = Split::ALL.into_iter().filter(|s| counts.get(*s) > 0).collect();
        if non_empty.is_empty() {
            return Err(DatasetError::InvalidArgument(
                "a dataset needs at least one sample".into(),
            ));
        }
        if shards < non_empty.len() {
            let names: Vec<&str> = non_empty.iter().map(|s| s.as_str()).collect();
            return Err(DatasetError::InvalidArgument(format!(
                "{shards} shard(s) cannot hold {} non-empty splits ({}): each split needs its own shard",
                non_empty.len(),
                names.join(", ")
            )));
        }
        if shards as u64 > counts.total() {
            return Err(DatasetError::InvalidArgument(format!(
                "{shards} shards for {} samples would leave shards empty",
                counts.total()
            )));
        }
        let mut per_split = [0u64; 3];
        for s in &non_empty {
            per_split[*s as usize] = 1;
        }
        for _ in non_empty.len()..shards {
            // Fullest shards first; a split never gets more shards than samples.
            let (best, _) = Split::ALL
                .iter()
                .enumerate()
                .filter(|(i, s)| per_split[*i] > 0 && per_split[*i] < counts.get(**s))
                .map(|(i, s)| (i, counts.get(*s) as f64 / per_split[i] as f64))
                .fold((usize::MAX, 0.0), |acc, x| if x.1 > acc.1 { x } else { acc });
            per_split[best] += 1;
        }
        let mut out = Vec::with_capacity(shards);
        for (i, split) in Split::ALL.into_iter().enumerate() {
            let (n, total) = (per_split[i], counts.get(split));
            for j in 0..n {
                // Spread the remainder over the first shards: sizes differ by at most one.
                let samples = total / n + u64::from(j < total % n);
                out.push(PlannedShard {
                    key: shard_key(out.len()),
                    split,
                    samples,
                });
            }
        }
        Ok(ShardPlan { shards: out })
    }
}

/// What the manifest says about a dataset besides its shards.
#[derive(Debug, Clone)]
pub struct DatasetHeader {
    pub name: String,
    pub source: Option<String>,
    pub classes: Vec<String>,
    pub vocabulary: Vocabulary,
}

/// Writes a dataset under a storage root: samples go to the open shard of their split, each
/// shard is uploaded as soon as it is full (one open shard per split in memory), and the
/// manifest is put last, so readers see either the whole dataset or none of it.
pub struct DatasetWriter {
    storage: Storage,
    header: DatasetHeader,
    plan: ShardPlan,
    open: [Option<(usize, ShardWriter)>; 3],
    written: Vec<Option<ShardInfo>>,
}

impl DatasetWriter {
    /// Refuses to write over a committed dataset unless `replace`; replacing first deletes the
    /// old manifest (so the old dataset stops being readable before any shard changes) and its
    /// shards.
    pub async fn create(storage: Storage, header: DatasetHeader, plan: ShardPlan, replace: bool) -> Result<Self> {
        if header.classes.is_empty() {
            return Err(DatasetError::InvalidArgument(
                "a dataset needs at least one class".into(),
            ));
        }
        let manifest_key = object(&storage, MANIFEST);
        match storage.store.head(&manifest_key).await {
            Ok(_) if !replace => {
                return Err(DatasetError::AlreadyExists {
                    key: manifest_key.to_string(),
                });
            }
            Ok(_) => {
                storage
                    .store
                    .delete(&manifest_key)
                    .await
                    .map_err(|e| DatasetError::store(&manifest_key, e))?;
                delete_shards(&storage).await?;
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(DatasetError::store(&manifest_key, e)),
        }
        let written = vec![None; plan.shards.len()];
        Ok(DatasetWriter {
            storage,
            header,
            plan,
            open: [None, None, None],
            written,
        })
    }

    /// Appends a sample to its split; uploads the shard it completes.
    pub async fn add(&mut self, split: Split, sample: &Sample) -> Result<()> {
        let slot = split as usize;
        if self.open[slot].is_none() {
            // Shards of a split fill in order, so the first unwritten one is the next.
            let next =
                (0..self.plan.shards.len()).find(|i| self.plan.shards[*i].split == split && self.written[*i].is_none());
            let Some(i) = next else {
                return Err(DatasetError::InvalidArgument(format!(
                    "more {split} samples than the {} planned",
                    self.planned(split)
                )));
            };
            let w = ShardWriter::new(self.plan.shards[i].key.clone(), split, self.header.classes.len());
            self.open[slot] = Some((i, w));
        }
        let (i, w) = self.open[slot].as_mut().expect("opened above");
        w.append(sample)?;
        if w.samples() == self.plan.shards[*i].samples {
            let (i, w) = self.open[slot].take().expect("opened above");
            let (info, bytes) = w.finish()?;
            let key = object(&self.storage, &info.key);
            self.storage
                .store
                .put(&key, PutPayload::from(bytes))
                .await
                .map_err(|e| DatasetError::store(&key, e))?;
            self.written[i] = Some(info);
        }
        Ok(())
    }

    fn planned(&self, split: Split) -> u64 {
        self.plan
            .shards
            .iter()
            .filter(|p| p.split == split)
            .map(|p| p.samples)
            .sum()
    }

    /// Commits the dataset by putting its manifest; fails if fewer samples came than planned.
    pub async fn finish(self) -> Result<Manifest> {
        let mut splits = SplitCounts::default();
        let mut shards = Vec::with_capacity(self.written.len());
        for (info, planned) in self.written.into_iter().zip(&self.plan.shards) {
            let Some(info) = info else {
                return Err(DatasetError::InvalidArgument(format!(
                    "shard {} got fewer than its {} planned samples",
                    planned.key, planned.samples
                )));
            };
            *splits.get_mut(info.split) += info.samples;
            shards.push(info);
        }
        let manifest = Manifest {
            version: FORMAT_VERSION,
            name: self.header.name,
            source: self.header.source,
            classes: self.header.classes,
            sample_rate: SAMPLE_RATE,
            image_size: IMAGE_SIZE,
            splits,
            shards,
            vocabulary: self.header.vocabulary,
        };
        let key = object(&self.storage, MANIFEST);
        manifest.validate().map_err(|reason| DatasetError::Manifest {
            key: key.to_string(),
            reason,
        })?;
        let body = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
        self.storage
            .store
            .put(&key, PutPayload::from(body))
            .await
            .map_err(|e| DatasetError::store(&key, e))?;
        Ok(manifest)
    }
}

/// Deletes `shard-*.tar` directly under the root, leaving anything else a user keeps there.
async fn delete_shards(storage: &Storage) -> Result<()> {
    let prefix = (!storage.root.as_ref().is_empty()).then_some(&storage.root);
    let depth = storage.root.parts().count() + 1;
    let stale: Vec<Path> = storage
        .store
        .list(prefix)
        .try_filter_map(|meta| async move {
            let name = meta.location.filename().unwrap_or_default();
            let ours = name.starts_with("shard-") && name.ends_with(".tar") && meta.location.parts().count() == depth;
            Ok(ours.then_some(meta.location))
        })
        .try_collect()
        .await
        .map_err(|e| DatasetError::store(&storage.root, e))?;
    for key in stale {
        match storage.store.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(DatasetError::store(&key, e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(train: u64, val: u64, test: u64) -> SplitCounts {
        SplitCounts { train, val, test }
    }

    fn sizes(plan: &ShardPlan) -> Vec<(Split, u64)> {
        plan.shards.iter().map(|p| (p.split, p.samples)).collect()
    }

    #[test]
    fn plans_give_every_split_a_shard_and_keep_sizes_even() {
        let p = ShardPlan::new(counts(800, 100, 100), 10).unwrap();
        assert_eq!(
            sizes(&p),
            [
                (Split::Train, 100),
                (Split::Train, 100),
                (Split::Train, 100),
                (Split::Train, 100),
                (Split::Train, 100),
                (Split::Train, 100),
                (Split::Train, 100),
                (Split::Train, 100),
                (Split::Val, 100),
                (Split::Test, 100)
            ]
        );
        assert_eq!(p.shards[9].key, "shard-00009.tar");
        let p = ShardPlan::new(counts(10, 0, 3), 4).unwrap();
        assert_eq!(
            sizes(&p),
            [
                (Split::Train, 4),
                (Split::Train, 3),
                (Split::Train, 3),
                (Split::Test, 3)
            ]
        );
        let p = ShardPlan::new(counts(2, 0, 0), 2).unwrap();
        assert_eq!(sizes(&p), [(Split::Train, 1), (Split::Train, 1)]);
    }

    #[test]
    fn impossible_plans_say_why() {
        let e = ShardPlan::new(counts(10, 1, 1), 2).unwrap_err().to_string();
        assert!(e.contains("3 non-empty splits (train, val, test)"), "{e}");
        let e = ShardPlan::new(counts(2, 0, 0), 3).unwrap_err().to_string();
        assert!(e.contains("leave shards empty"), "{e}");
        assert!(ShardPlan::new(counts(0, 0, 0), 1).is_err());
    }
}
