//! `chorus dataset synth`: a 7-class emotion dataset in which every modality carries a
//! learnable but noisy signal, so each single-modality model learns above chance and fusion
//! beats the best of them.
//!
//! Every sample is a pure function of `(seed, index)`: its random stream is ChaCha8 seeded with
//! the seed, on stream `index` (labels use their own stream). So the dataset is the same for a
//! seed whatever the number of shards or threads, and samples can be made in parallel.
//!
//! - **Faces** (48x48 gray): an oval head on a background, two eyes, two brows, a nose and a
//!   mouth. Per class: mouth curvature (smile or frown), openness and asymmetry, brow slope
//!   (inner ends down for anger, up for fear and sadness) and height, and eye size. Each face
//!   shows its class with an intensity drawn from 0.4 to 1.2 (a faint face lies between its
//!   class and neutral), and jitter on every parameter makes neighbouring classes overlap
//!   (anger/disgust, fear/surprise); then head position and size, brightness, contrast and
//!   pixel noise vary at random.
//! - **Tones** (16 kHz, 0.5-0.7 s): a harmonic tone whose base pitch, loudness, tremolo rate and
//!   depth (the "tempo" of its pulses), pitch glide and brightness (harmonic strength) depend
//!   on the class, with an intensity of its own toward the neutral voice and jitter on each,
//!   plus a random onset and white noise.
//! - **Sentences**: neutral filler words with one or two class words ("furious", "annoyed" for
//!   anger). One sentence in five carries no class word, and one in seven also carries a word
//!   of another class, so text alone is right about three times in four.
//! - Each modality is missing from a sample with probability `missing` (5% by default),
//!   independently.

use crate::error::{DatasetError, Result};
use crate::manifest::{EMOTIONS, IMAGE_PIXELS, IMAGE_SIZE, Manifest, SAMPLE_RATE, Split, SplitCounts};
use crate::sample::Sample;
use crate::store::{DatasetHeader, DatasetWriter, ShardPlan};
use crate::vocab::Vocabulary;
use chorus_core::storage::Storage;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::f32::consts::PI;

/// Bumped whenever the generator changes what a seed produces.
pub const GENERATOR_VERSION: u32 = 1;

#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub name: String,
    pub samples: u64,
    pub shards: usize,
    pub seed: u64,
    pub val_fraction: f64,
    pub test_fraction: f64,
    /// Probability that a sample lacks a given modality.
    pub missing: f64,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            name: "synth".into(),
            samples: 2000,
            shards: 8,
            seed: 0,
            val_fraction: 0.1,
            test_fraction: 0.1,
            missing: 0.05,
        }
    }
}

/// Samples per split for fractions of `samples`, rounded; train takes the rest.
pub fn split_counts(samples: u64, val_fraction: f64, test_fraction: f64) -> Result<SplitCounts> {
    let ok = |f: f64| (0.0..=1.0).contains(&f);
    if !ok(val_fraction) || !ok(test_fraction) || val_fraction + test_fraction > 1.0 {
        return Err(DatasetError::InvalidArgument(format!(
            "--val-fraction {val_fraction} and --test-fraction {test_fraction} must lie in [0, 1] and add up to at most 1"
        )));
    }
    let val = (samples as f64 * val_fraction).round() as u64;
    let test = ((samples as f64 * test_fraction).round() as u64).min(samples - val);
    Ok(SplitCounts {
        train: samples - val - test,
        val,
        test,
    })
}

/// Generates the dataset and writes it under `storage`, manifest last.
pub async fn synth(storage: Storage, opts: &SynthOptions, replace: bool) -> Result<Manifest> {
    if !(0.0..=1.0).contains(&opts.missing) {
        return Err(DatasetError::InvalidArgument(format!(
            "the missing-modality probability {} must lie in [0, 1]",
            opts.missing
        )));
    }
    let counts = split_counts(opts.samples, opts.val_fraction, opts.test_fraction)?;
    let plan = ShardPlan::new(counts, opts.shards)?;
    let header = DatasetHeader {
        name: opts.name.clone(),
        source: Some(format!(
            "chorus dataset synth (generator v{GENERATOR_VERSION}) --samples {} --seed {} --val-fraction {} --test-fraction {}",
            opts.samples, opts.seed, opts.val_fraction, opts.test_fraction
        )),
        classes: crate::manifest::emotion_classes(),
        vocabulary: vocabulary(),
    };
    let labels = labels(opts.seed, &counts);
    let mut writer = DatasetWriter::create(storage, header, plan.clone(), replace).await?;
    // Plan order is train, val, test, so consecutive indices fill consecutive shards.
    let mut start = 0u64;
    for shard in &plan.shards {
        let end = start + shard.samples;
        let samples = generate_range(opts.seed, start..end, &labels, opts.missing);
        for s in &samples {
            writer.add(shard.split, s).await?;
        }
        start = end;
    }
    writer.finish().await
}

/// The split of sample `index` for these counts: train first, then val, then test.
pub fn split_of(index: u64, counts: &SplitCounts) -> Split {
    if index < counts.train {
        Split::Train
    } else if index < counts.train + counts.val {
        Split::Val
    } else {
        Split::Test
    }
}

/// Makes samples on all cores; the result does not depend on how many there are.
fn generate_range(seed: u64, range: std::ops::Range<u64>, labels: &[u8], missing: f64) -> Vec<Sample> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let len = range.end - range.start;
    let chunk = len.div_ceil(threads).max(16);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (range.start..range.end)
            .step_by(chunk as usize)
            .map(|lo| {
                let hi = (lo + chunk).min(range.end);
                scope.spawn(move || {
                    (lo..hi)
                        .map(|i| synth_sample(seed, i, labels[i as usize], missing))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a generator thread panicked"))
            .collect()
    })
}

/// Class labels of all samples, split by split (train, val, test, as [`split_of`] orders
/// them): within each split as balanced as its size allows (each class `n / 7` or one more
/// times), so val metrics are not skewed by chance, in a seeded random order.
pub fn labels(seed: u64, counts: &SplitCounts) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(u64::MAX);
    let k = EMOTIONS.len() as u64;
    let mut out = Vec::with_capacity(counts.total() as usize);
    for split in Split::ALL {
        // Which classes get the remainder is random too, so small sets are not biased to anger.
        let mut order: Vec<u8> = (0..k as u8).collect();
        order.shuffle(&mut rng);
        let mut part: Vec<u8> = (0..counts.get(split)).map(|i| order[(i % k) as usize]).collect();
        part.shuffle(&mut rng);
        out.extend(part);
    }
    out
}

/// Sample `index` of the dataset for `seed`, with class `label`.
pub fn synth_sample(seed: u64, index: u64, label: u8, missing: f64) -> Sample {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    let class = label as usize;
    // Draw every modality even when it will be dropped, so dropping one does not shift the
    // random stream of the others.
    let image = face(&mut rng, class);
    let audio = tone(&mut rng, class);
    let text = sentence(&mut rng, class);
    let mut keep = || rng.random::<f64>() >= missing;
    let (ki, ka, kt) = (keep(), keep(), keep());
    Sample {
        key: format!("{index:08}"),
        image: ki.then_some(image),
        audio: ka.then_some(audio),
        text: kt.then_some(text),
        label,
    }
}

/// Standard normal, by Box-Muller (rand 0.9 has no normal distribution without rand_distr).
fn normal(rng: &mut impl Rng) -> f32 {
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()
}

/// xorshift64*, seeded from the sample's ChaCha stream: per-pixel and per-sample noise needs
/// tens of thousands of draws a sample, which ChaCha makes slow in debug builds.
struct FastNoise(u64);

impl FastNoise {
    fn new(rng: &mut impl Rng) -> Self {
        FastNoise(rng.random::<u64>() | 1)
    }

    /// Uniform in [-1, 1).
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
        bits as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Roughly normal with unit variance: the sum of three uniforms, scaled.
    fn gauss(&mut self) -> f32 {
        self.next() + self.next() + self.next()
    }
}

// ---------------------------------------------------------------------------------------------
// Faces

/// Index of `neutral` in `EMOTIONS`: faint expressions and voices drift toward it.
const NEUTRAL: usize = 6;

/// Mean expression of each class, in `EMOTIONS` order.
struct Expression {
    /// Mouth corners up (+) or down (-), in units of 3 px.
    curve: f32,
    /// Lips apart, in units of 3 px at the middle.
    open: f32,
    /// One corner up, the other down (a sneer), in units of 2 px; its side is random.
    skew: f32,
    /// Inner brow ends down (+, anger) or up (-, fear, sadness), in units of 2 px.
    brow_slope: f32,
    /// Brows raised (+) or lowered (-), in units of 1.5 px.
    brow_raise: f32,
    /// Eye radius relative to neutral.
    eye: f32,
}

const EXPRESSIONS: [Expression; 7] = [
    // anger
    Expression {
        curve: -0.35,
        open: 0.15,
        skew: 0.0,
        brow_slope: 1.0,
        brow_raise: -1.0,
        eye: 0.75,
    },
    // disgust
    Expression {
        curve: -0.4,
        open: 0.1,
        skew: 0.8,
        brow_slope: 0.5,
        brow_raise: -0.5,
        eye: 0.6,
    },
    // fear
    Expression {
        curve: -0.3,
        open: 0.6,
        skew: 0.0,
        brow_slope: -0.8,
        brow_raise: 1.0,
        eye: 1.3,
    },
    // happiness
    Expression {
        curve: 1.0,
        open: 0.35,
        skew: 0.0,
        brow_slope: 0.0,
        brow_raise: 0.2,
        eye: 0.85,
    },
    // sadness
    Expression {
        curve: -0.9,
        open: 0.0,
        skew: 0.0,
        brow_slope: -1.0,
        brow_raise: 0.3,
        eye: 0.8,
    },
    // surprise
    Expression {
        curve: 0.0,
        open: 1.0,
        skew: 0.0,
        brow_slope: 0.0,
        brow_raise: 1.8,
        eye: 1.45,
    },
    // neutral
    Expression {
        curve: 0.0,
        open: 0.0,
        skew: 0.0,
        brow_slope: 0.0,
        brow_raise: 0.0,
        eye: 1.0,
    },
];

/// Coverage of a pixel by a shape whose signed distance (negative inside) is `d` pixels: a
/// one-pixel soft edge, so small parameter changes change pixels smoothly.
fn cover(d: f32) -> f32 {
    (0.5 - d).clamp(0.0, 1.0)
}

/// Approximate signed distance to an axis-aligned ellipse.
fn ellipse(x: f32, y: f32, cx: f32, cy: f32, rx: f32, ry: f32) -> f32 {
    let (u, v) = ((x - cx) / rx, (y - cy) / ry);
    ((u * u + v * v).sqrt() - 1.0) * rx.min(ry)
}

/// Distance to the segment from `a` to `b`, minus half its thickness.
fn segment(x: f32, y: f32, a: (f32, f32), b: (f32, f32), half_thickness: f32) -> f32 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let t = (((x - a.0) * dx + (y - a.1) * dy) / (dx * dx + dy * dy)).clamp(0.0, 1.0);
    let (px, py) = (a.0 + t * dx - x, a.1 + t * dy - y);
    (px * px + py * py).sqrt() - half_thickness
}

/// How strongly a modality shows its class, drawn per sample and modality: faint expressions
/// drift toward neutral, as in real data, and since each modality draws its own, a sample
/// faint in one modality is often clear in another, which is what fusion exploits.
fn intensity(rng: &mut impl Rng) -> f32 {
    rng.random_range(0.4..1.2f32)
}

fn face(rng: &mut ChaCha8Rng, class: usize) -> Vec<u8> {
    let (e, n) = (&EXPRESSIONS[class], &EXPRESSIONS[NEUTRAL]);
    let k = intensity(rng);
    let mix = |c: f32, n: f32| n + k * (c - n);
    let curve = mix(e.curve, n.curve) + 0.3 * normal(rng);
    let open = (mix(e.open, n.open) + 0.2 * normal(rng)).max(0.0);
    let side = if rng.random::<bool>() { 1.0 } else { -1.0 };
    let skew = side * (mix(e.skew, n.skew) + 0.25 * normal(rng));
    let brow_slope = mix(e.brow_slope, n.brow_slope) + 0.35 * normal(rng);
    let brow_raise = mix(e.brow_raise, n.brow_raise) + 0.5 * normal(rng);
    let eye = (mix(e.eye, n.eye) + 0.15 * normal(rng)).max(0.35);

    let scale = 1.0 + 0.06 * normal(rng);
    let cx = 24.0 + 1.5 * normal(rng);
    let cy = 25.0 + 1.5 * normal(rng);
    let background = rng.random_range(10.0..90.0f32);
    let skin = background + rng.random_range(70.0..140.0f32);
    let feature = rng.random_range(0.0..40.0f32);
    let contrast = rng.random_range(0.75..1.15f32);
    let noise_sd = rng.random_range(4.0..14.0f32);
    let mut noise = FastNoise::new(rng);

    let (hrx, hry) = (15.5 * scale, 20.0 * scale);
    let eye_y = cy - 4.0 * scale;
    let eye_dx = 7.0 * scale;
    let (erx, ery) = (2.6 * eye * scale, 1.9 * eye * scale);
    let brow_y = eye_y - (4.5 + 1.5 * brow_raise) * scale;
    let brow_in = 2.0 * brow_slope;
    let mouth_y = cy + 9.5 * scale;
    let mouth_w = 6.5 * scale;

    let mut out = vec![0u8; IMAGE_PIXELS];
    for (i, px) in out.iter_mut().enumerate() {
        let x = (i % IMAGE_SIZE as usize) as f32 + 0.5;
        let y = (i / IMAGE_SIZE as usize) as f32 + 0.5;
        // A vertical light gradient, so brightness is not one constant per image.
        let mut v = background + (y - 24.0) * 0.4;
        let head = cover(ellipse(x, y, cx, cy, hrx, hry));
        if head > 0.0 {
            v += head * (skin - v);
            let mut dark = 0.0f32;
            for s in [-1.0f32, 1.0] {
                let ex = cx + s * eye_dx;
                dark = dark.max(cover(ellipse(x, y, ex, eye_y, erx, ery)));
                let inner = (cx + s * 2.5 * scale, brow_y + brow_in);
                let outer = (cx + s * 10.5 * scale, brow_y - 0.5 * brow_in);
                dark = dark.max(cover(segment(x, y, inner, outer, 0.9)));
            }
            dark = dark.max(0.5 * cover(segment(x, y, (cx, cy - 1.0), (cx, cy + 4.0 * scale), 0.6)));
            let t = (x - cx) / mouth_w;
            if t.abs() <= 1.15 {
                let t = t.clamp(-1.0, 1.0);
                let centre = mouth_y + curve * 3.0 * (0.5 - t * t) + skew * 2.0 * t;
                let half = 0.7 + open * 3.0 * (1.0 - t * t);
                let edge = ((x - cx).abs() - mouth_w).max(0.0);
                dark = dark.max(cover((y - centre).abs() - half + edge));
            }
            v += dark * (feature - v);
        }
        let v = (v - 128.0) * contrast + 128.0 + noise_sd * noise.gauss();
        *px = v.clamp(0.0, 255.0) as u8;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Tones

struct Voice {
    /// Base pitch in Hz.
    pitch: f32,
    /// Peak amplitude.
    loudness: f32,
    /// Tremolo pulses per second (the tone's tempo) and how deep they go (0..1).
    tremolo: f32,
    depth: f32,
    /// Pitch change over the clip, in octaves.
    glide: f32,
    /// Strength of the second and third harmonics relative to the first.
    brightness: f32,
}

const VOICES: [Voice; 7] = [
    // anger: low-mid, loud, fast harsh pulses
    Voice {
        pitch: 180.0,
        loudness: 0.8,
        tremolo: 9.0,
        depth: 0.5,
        glide: 0.0,
        brightness: 0.8,
    },
    // disgust: low, falling
    Voice {
        pitch: 150.0,
        loudness: 0.45,
        tremolo: 3.0,
        depth: 0.3,
        glide: -0.4,
        brightness: 0.5,
    },
    // fear: high, quiet, fast trembling
    Voice {
        pitch: 380.0,
        loudness: 0.35,
        tremolo: 12.0,
        depth: 0.6,
        glide: 0.15,
        brightness: 0.2,
    },
    // happiness: mid-high, lively, rising
    Voice {
        pitch: 300.0,
        loudness: 0.65,
        tremolo: 5.0,
        depth: 0.3,
        glide: 0.3,
        brightness: 0.5,
    },
    // sadness: low, soft, slow
    Voice {
        pitch: 130.0,
        loudness: 0.2,
        tremolo: 1.5,
        depth: 0.2,
        glide: -0.2,
        brightness: 0.1,
    },
    // surprise: high, steeply rising
    Voice {
        pitch: 450.0,
        loudness: 0.7,
        tremolo: 0.0,
        depth: 0.0,
        glide: 0.8,
        brightness: 0.4,
    },
    // neutral: mid, steady
    Voice {
        pitch: 220.0,
        loudness: 0.35,
        tremolo: 0.0,
        depth: 0.0,
        glide: 0.0,
        brightness: 0.3,
    },
];

const SINE_TABLE: usize = 1024;

/// One period of a sine: a table lookup per oscillator sample instead of `sin`, which
/// dominates synthesis time in debug builds.
fn sine_table() -> &'static [f32; SINE_TABLE] {
    static TABLE: std::sync::OnceLock<[f32; SINE_TABLE]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|i| (2.0 * PI * i as f32 / SINE_TABLE as f32).sin()))
}

fn sin_cycles(table: &[f32; SINE_TABLE], phase: f32) -> f32 {
    table[((phase * SINE_TABLE as f32) as usize) & (SINE_TABLE - 1)]
}

fn tone(rng: &mut ChaCha8Rng, class: usize) -> Vec<f32> {
    let (v, n) = (&VOICES[class], &VOICES[NEUTRAL]);
    let k = intensity(rng);
    let mix = |c: f32, n: f32| n + k * (c - n);
    // Pitch and loudness are heard on a log scale, so they are mixed there.
    let pitch = n.pitch * (v.pitch / n.pitch).powf(k) * (0.15 * normal(rng)).exp();
    let loudness = (n.loudness * (v.loudness / n.loudness).powf(k) * (0.3 * normal(rng)).exp()).min(0.95);
    let tremolo = mix(v.tremolo, n.tremolo) * (0.2 * normal(rng)).exp();
    let depth = (mix(v.depth, n.depth) + 0.1 * normal(rng)).clamp(0.0, 0.9);
    let glide = mix(v.glide, n.glide) + 0.15 * normal(rng);
    let brightness = (mix(v.brightness, n.brightness) + 0.15 * normal(rng)).clamp(0.0, 1.0);
    let secs = rng.random_range(0.5..0.7f32);
    let onset = rng.random_range(0.0..0.05f32);
    let noise_level = rng.random_range(0.01..0.08f32);
    let trem_phase0: f32 = rng.random();
    let mut noise = FastNoise::new(rng);

    let sr = SAMPLE_RATE as f32;
    let n = (secs * sr) as usize;
    let start = (onset * sr) as usize;
    let sound = n - start;
    let attack = (0.02 * sr) as usize;
    let release = (0.08 * sr) as usize;
    let table = sine_table();
    // Per-sample pitch ratio, so the glide is exponential without a `powf` per sample.
    let ratio = 2f32.powf(glide / sound as f32);
    let mut freq = pitch / sr;
    let (mut phase, mut trem_phase) = (0.0f32, trem_phase0);
    let trem_step = tremolo / sr;
    let (b2, b3) = (0.5 * brightness, 0.33 * brightness * brightness);
    let norm = 1.0 / (1.0 + b2 + b3);
    let mut out = Vec::with_capacity(n);
    out.extend((0..start).map(|_| noise_level * noise.next()));
    for j in 0..sound {
        let env = (j as f32 / attack as f32).min(1.0) * ((sound - j) as f32 / release as f32).min(1.0);
        let trem = 1.0 - depth * 0.5 * (1.0 - sin_cycles(table, trem_phase + 0.25));
        let s = sin_cycles(table, phase) + b2 * sin_cycles(table, 2.0 * phase) + b3 * sin_cycles(table, 3.0 * phase);
        out.push(loudness * env * trem * s * norm + noise_level * noise.next());
        phase = (phase + freq).fract();
        trem_phase = (trem_phase + trem_step).fract();
        freq *= ratio;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Sentences

const CLASS_WORDS: [&[&str]; 7] = [
    &["furious", "annoyed", "angry", "outraged", "irritated", "hostile"],
    &["disgusting", "gross", "revolting", "nasty", "sickening", "repulsive"],
    &["scared", "afraid", "terrified", "nervous", "anxious", "frightened"],
    &["happy", "delighted", "joyful", "glad", "cheerful", "wonderful"],
    &["sad", "unhappy", "miserable", "gloomy", "heartbroken", "lonely"],
    &["surprised", "astonished", "amazed", "shocked", "unexpected", "wow"],
    &["okay", "fine", "usual", "ordinary", "calm", "normal"],
];

const FILLER: &[&str] = &[
    "the",
    "a",
    "today",
    "i",
    "feel",
    "it",
    "was",
    "meeting",
    "weather",
    "train",
    "we",
    "went",
    "to",
    "store",
    "this",
    "is",
    "about",
    "report",
    "and",
    "then",
    "really",
    "quite",
    "very",
    "just",
    "after",
    "lunch",
    "my",
    "friend",
    "said",
    "so",
    "that",
    "office",
    "call",
    "again",
    "yesterday",
    "with",
    "team",
    "news",
    "of",
    "our",
    "plan",
    "at",
    "home",
];

/// Every word the generator uses, sorted: the synthetic dataset's vocabulary.
pub fn vocabulary() -> Vocabulary {
    let mut words: Vec<&str> = CLASS_WORDS
        .iter()
        .flat_map(|w| w.iter().copied())
        .chain(FILLER.iter().copied())
        .collect();
    words.sort_unstable();
    words.dedup();
    Vocabulary::new(words)
}

fn pick<'a>(rng: &mut impl Rng, words: &[&'a str]) -> &'a str {
    words[rng.random_range(0..words.len())]
}

fn sentence(rng: &mut ChaCha8Rng, class: usize) -> String {
    let len = rng.random_range(5..11);
    let mut words: Vec<String> = (0..len).map(|_| pick(rng, FILLER).to_string()).collect();
    let roll: f32 = rng.random();
    let own = if roll < 0.2 {
        0
    } else if roll < 0.68 {
        1
    } else {
        2
    };
    let mut cues: Vec<String> = (0..own).map(|_| pick(rng, CLASS_WORDS[class]).to_string()).collect();
    if own == 2 {
        // "furious, annoyed": two cues read as a list.
        cues[0].push(',');
    }
    if rng.random::<f32>() < 0.15 {
        let other = (class + rng.random_range(1..CLASS_WORDS.len())) % CLASS_WORDS.len();
        cues.push(pick(rng, CLASS_WORDS[other]).to_string());
        cues.shuffle(rng);
    }
    let at = rng.random_range(0..=words.len());
    words.splice(at..at, cues);
    let mut text = words.join(" ");
    if let Some(first) = text.get(..1) {
        let upper = first.to_uppercase();
        text.replace_range(..1, &upper);
    }
    text.push(['.', '!', '?', '.'][rng.random_range(0..4)]);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_a_function_of_seed_and_index() {
        let a = synth_sample(7, 42, 3, 0.05);
        assert_eq!(a, synth_sample(7, 42, 3, 0.05));
        assert_ne!(a, synth_sample(8, 42, 3, 0.05));
        assert_ne!(a.image, synth_sample(7, 43, 3, 0.05).image);
        assert_eq!(a.key, "00000042");
        let counts = split_counts(100, 0.1, 0.1).unwrap();
        assert_eq!(labels(7, &counts), labels(7, &counts));
        assert_ne!(labels(7, &counts), labels(8, &counts));
    }

    #[test]
    fn labels_are_balanced_within_each_split() {
        let counts = SplitCounts {
            train: 7 * 30 + 3,
            val: 7 * 4 + 6,
            test: 5,
        };
        let l = labels(1, &counts);
        assert_eq!(l.len(), 252);
        let tally = |part: &[u8]| {
            let mut c = [0; 7];
            for x in part {
                c[*x as usize] += 1;
            }
            c
        };
        let train = tally(&l[..213]);
        assert!(train.iter().all(|c| *c == 30 || *c == 31), "{train:?}");
        let val = tally(&l[213..247]);
        assert!(val.iter().all(|c| *c == 4 || *c == 5), "{val:?}");
        let test = tally(&l[247..]);
        assert!(test.iter().all(|c| *c <= 1), "{test:?}");
    }

    #[test]
    fn every_modality_is_present_well_formed_and_sometimes_missing() {
        let n = 700;
        let (mut images, mut audios, mut texts) = (0, 0, 0);
        for i in 0..n {
            let s = synth_sample(3, i, (i % 7) as u8, 0.05);
            if let Some(img) = &s.image {
                images += 1;
                assert_eq!(img.len(), IMAGE_PIXELS);
            }
            if let Some(a) = &s.audio {
                audios += 1;
                assert!((8000..=11200).contains(&a.len()), "{}", a.len());
                assert!(a.iter().all(|x| x.abs() <= 1.0));
            }
            if let Some(t) = &s.text {
                texts += 1;
                let v = vocabulary();
                assert!(v.encode(t, 32).iter().all(|id| *id != crate::vocab::UNK), "{t}");
            }
        }
        for count in [images, audios, texts] {
            // 5% missing: 665 expected of 700.
            assert!((630..700).contains(&count), "{images} {audios} {texts}");
        }
        let none = synth_sample(3, 1, 0, 1.0);
        assert!(none.image.is_none() && none.audio.is_none() && none.text.is_none());
    }

    /// Each modality's class signal survives its noise: the class means of a simple feature
    /// are ordered as the generator intends.
    #[test]
    fn class_signals_are_there() {
        let mean = |class: u8, f: &dyn Fn(&Sample) -> f32| {
            (0..60).map(|i| f(&synth_sample(11, i, class, 0.0))).sum::<f32>() / 60.0
        };
        // Sadness is quieter than anger.
        let rms = |s: &Sample| {
            let a = s.audio.as_ref().unwrap();
            (a.iter().map(|x| x * x).sum::<f32>() / a.len() as f32).sqrt()
        };
        assert!(mean(0, &rms) > 2.0 * mean(4, &rms));
        // Surprise's open mouth darkens the mouth region more than neutral's closed one.
        let mouth_dark = |s: &Sample| {
            let img = s.image.as_ref().unwrap();
            let mut d = 0.0;
            for y in 31..39 {
                for x in 18..30 {
                    d += 255.0 - img[y * 48 + x] as f32;
                }
            }
            d
        };
        assert!(mean(5, &mouth_dark) > mean(6, &mouth_dark) * 1.05);
        // Text names its own class most of the time.
        let hits = (0..200)
            .filter(|i| {
                let s = synth_sample(5, *i, 3, 0.0);
                CLASS_WORDS[3]
                    .iter()
                    .any(|w| s.text.as_ref().unwrap().to_lowercase().contains(w))
            })
            .count();
        assert!((140..190).contains(&hits), "{hits}");
    }

    #[test]
    fn split_counts_round_and_check() {
        assert_eq!(
            split_counts(1000, 0.1, 0.15).unwrap(),
            SplitCounts {
                train: 750,
                val: 100,
                test: 150
            }
        );
        assert_eq!(split_counts(3, 0.5, 0.5).unwrap().total(), 3);
        assert!(split_counts(10, 0.7, 0.5).is_err());
        assert!(split_counts(10, -0.1, 0.0).is_err());
    }
}
