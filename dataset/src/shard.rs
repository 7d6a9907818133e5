//! One shard: a plain tar of `KEY.cls`, `KEY.png`, `KEY.wav`, `KEY.txt` files, WebDataset style.

use crate::error::{DatasetError, Result};
use crate::manifest::{IMAGE_PIXELS, Manifest, ModalityCounts, ShardInfo, Split};
use crate::sample::{Sample, decode_png, decode_wav, encode_png, encode_wav};
use std::collections::HashMap;
use std::io::Read;

/// Builds one shard in memory. Entries carry fixed metadata (mode 0644, mtime 0, no owner), so
/// the same samples always give the same bytes and the same checksum.
pub struct ShardWriter {
    key: String,
    split: Split,
    tar: tar::Builder<Vec<u8>>,
    samples: u64,
    class_counts: Vec<u64>,
    modalities: ModalityCounts,
}

impl ShardWriter {
    pub fn new(key: impl Into<String>, split: Split, num_classes: usize) -> Self {
        ShardWriter {
            key: key.into(),
            split,
            tar: tar::Builder::new(Vec::new()),
            samples: 0,
            class_counts: vec![0; num_classes],
            modalities: ModalityCounts::default(),
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Encodes and appends one sample. The caller keeps keys unique within the dataset.
    pub fn append(&mut self, sample: &Sample) -> Result<()> {
        let bad = |reason: String| DatasetError::sample(&self.key, &sample.key, reason);
        check_key(&sample.key).map_err(bad)?;
        if sample.label as usize >= self.class_counts.len() {
            return Err(bad(format!(
                "label {} is not a class index (the dataset has {} classes)",
                sample.label,
                self.class_counts.len()
            )));
        }
        let png = sample.image.as_deref().map(encode_png).transpose().map_err(bad)?;
        let wav = sample.audio.as_deref().map(encode_wav).transpose().map_err(bad)?;
        let key = &sample.key;
        self.add_file(&format!("{key}.cls"), sample.label.to_string().as_bytes())?;
        if let Some(png) = png {
            self.add_file(&format!("{key}.png"), &png)?;
            self.modalities.image += 1;
        }
        if let Some(wav) = wav {
            self.add_file(&format!("{key}.wav"), &wav)?;
            self.modalities.audio += 1;
        }
        if let Some(text) = &sample.text {
            self.add_file(&format!("{key}.txt"), text.as_bytes())?;
            self.modalities.text += 1;
        }
        self.class_counts[sample.label as usize] += 1;
        self.samples += 1;
        Ok(())
    }

    fn add_file(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        self.tar
            .append_data(&mut h, name, data)
            .map_err(|e| DatasetError::shard(&self.key, format!("cannot add {name}: {e}")))
    }

    /// The tar's bytes and the manifest entry that describes them.
    pub fn finish(self) -> Result<(ShardInfo, Vec<u8>)> {
        let bytes = self
            .tar
            .into_inner()
            .map_err(|e| DatasetError::shard(&self.key, format!("cannot finish tar: {e}")))?;
        let info = ShardInfo {
            key: self.key,
            split: self.split,
            samples: self.samples,
            bytes: bytes.len() as u64,
            crc32c: crc32c::crc32c(&bytes),
            class_counts: self.class_counts,
            modalities: self.modalities,
        };
        Ok((info, bytes))
    }
}

/// Keys become file names inside the tar, and WebDataset splits a name at its first `.`.
fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > 90 || key.contains(['.', '/', '\\']) || key.chars().any(char::is_control) {
        return Err(format!(
            "key {key:?} must be 1 to 90 characters without '.', '/', '\\' or control characters"
        ));
    }
    Ok(())
}

/// The files of one key, as found in the tar.
#[derive(Default)]
struct Parts {
    key: String,
    cls: Option<Vec<u8>>,
    png: Option<Vec<u8>>,
    wav: Option<Vec<u8>>,
    txt: Option<Vec<u8>>,
}

/// Decodes every sample of the shard `name` (its key in the manifest) and checks the shard
/// against the manifest's entry: sample count, class counts and modality counts. Checksums are
/// [`crate::fetch_shard`]'s job (or [`ShardInfo::verify`]'s, for a cached copy).
///
/// Files with other extensions are skipped, as WebDataset readers do; a sample is the files that
/// share a key, in order of first appearance.
pub fn parse_shard(name: &str, bytes: &[u8], manifest: &Manifest) -> Result<Vec<Sample>> {
    let info = manifest
        .shard(name)
        .ok_or_else(|| DatasetError::shard(name, "not listed in the manifest"))?;
    let parts = read_tar(name, bytes)?;
    let num_classes = manifest.classes.len();
    let mut samples = Vec::with_capacity(parts.len());
    let mut class_counts = vec![0u64; num_classes];
    let mut modalities = ModalityCounts::default();
    for p in parts {
        let bad = |reason: String| DatasetError::sample(name, &p.key, reason);
        let cls = p
            .cls
            .as_deref()
            .ok_or_else(|| bad("has no .cls file (the label is required)".into()))?;
        let label = parse_label(cls, num_classes).map_err(bad)?;
        let image = p.png.as_deref().map(decode_png).transpose().map_err(bad)?;
        let audio = p.wav.as_deref().map(decode_wav).transpose().map_err(bad)?;
        let text = p
            .txt
            .map(|t| String::from_utf8(t).map_err(|_| bad("text is not UTF-8".into())))
            .transpose()?;
        debug_assert!(image.as_ref().is_none_or(|i| i.len() == IMAGE_PIXELS));
        class_counts[label as usize] += 1;
        modalities.image += image.is_some() as u64;
        modalities.audio += audio.is_some() as u64;
        modalities.text += text.is_some() as u64;
        samples.push(Sample {
            key: p.key,
            image,
            audio,
            text,
            label,
        });
    }
    if samples.len() as u64 != info.samples {
        return Err(DatasetError::shard(
            name,
            format!(
                "holds {} samples but the manifest lists {}",
                samples.len(),
                info.samples
            ),
        ));
    }
    if class_counts != info.class_counts {
        return Err(DatasetError::shard(
            name,
            format!(
                "samples per class {class_counts:?} differ from the manifest's {:?}",
                info.class_counts
            ),
        ));
    }
    if modalities != info.modalities {
        return Err(DatasetError::shard(
            name,
            format!(
                "modality counts {modalities:?} differ from the manifest's {:?}",
                info.modalities
            ),
        ));
    }
    Ok(samples)
}

fn read_tar(name: &str, bytes: &[u8]) -> Result<Vec<Parts>> {
    let mut parts: Vec<Parts> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let corrupt = |parts: &[Parts], e: std::io::Error| {
        let after = parts
            .last()
            .map_or(String::new(), |p| format!(" after sample {}", p.key));
        DatasetError::shard(name, format!("not a readable tar{after}: {e}"))
    };
    let mut archive = tar::Archive::new(bytes);
    let entries = archive.entries().map_err(|e| corrupt(&parts, e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| corrupt(&parts, e))?;
        if !matches!(
            entry.header().entry_type(),
            tar::EntryType::Regular | tar::EntryType::Continuous
        ) {
            continue;
        }
        let path = entry
            .path()
            .map_err(|e| corrupt(&parts, e))?
            .to_string_lossy()
            .into_owned();
        // WebDataset: the key is the path up to the first '.' of the file name.
        let (dir, base) = path.rsplit_once('/').map_or(("", path.as_str()), |(d, b)| (d, b));
        let Some((stem, ext)) = base.split_once('.') else {
            continue;
        };
        let key = if dir.is_empty() {
            stem.to_string()
        } else {
            format!("{dir}/{stem}")
        };
        // The header's size is untrusted: it may claim far more than the shard holds (up to
        // 2^63 bytes in GNU's base-256 form), so it bounds nothing until checked.
        let size = entry.size();
        if size > bytes.len() as u64 {
            return Err(DatasetError::shard(
                name,
                format!(
                    "tar entry {path} claims {size} bytes, more than the whole shard's {}",
                    bytes.len()
                ),
            ));
        }
        let mut data = Vec::with_capacity(size as usize);
        entry.read_to_end(&mut data).map_err(|e| corrupt(&parts, e))?;
        let i = *index.entry(key.clone()).or_insert_with(|| {
            parts.push(Parts {
                key: key.clone(),
                ..Default::default()
            });
            parts.len() - 1
        });
        let slot = match ext {
            "cls" => &mut parts[i].cls,
            "png" => &mut parts[i].png,
            "wav" => &mut parts[i].wav,
            "txt" => &mut parts[i].txt,
            _ => continue,
        };
        if slot.replace(data).is_some() {
            return Err(DatasetError::sample(name, &key, format!("has two .{ext} files")));
        }
    }
    Ok(parts)
}

fn parse_label(cls: &[u8], num_classes: usize) -> Result<u8, String> {
    let text = std::str::from_utf8(cls).map_err(|_| "label is not UTF-8 text".to_string())?;
    let text = text.trim();
    let label: u64 = text
        .parse()
        .map_err(|_| format!("label {text:?} is not a non-negative integer"))?;
    if label >= num_classes as u64 {
        return Err(format!(
            "label {label} is not a class index (the dataset has {num_classes} classes)"
        ));
    }
    Ok(label as u8)
}
