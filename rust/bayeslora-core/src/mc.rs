//! Seeded Monte-Carlo noise, and the one reduction of per-sample logits to the uncertainty
//! fields of docs/method.md §6 ([`OnlineSummary`] per input, [`summarize`] for a batch).
//!
//! # Noise streams (a fixed, documented contract)
//! Every random number is a pure function of `(seed, input hash, sample, module, rank, element)`:
//! - input hash: 64-bit FNV-1a over the little-endian `u32` bytes of the input's token ids whose
//!   attention mask is non-zero, in order ([`input_hash`]);
//! - module key: 64-bit FNV-1a over the UTF-8 bytes of the module's HF name ([`fnv1a`]);
//! - rank: the rank's *original* position `rank_index[k]`, so pruning other ranks never changes it;
//! - element: 0 for a rank gate; `1 + i` for entry `i` of row `k` of A and `1 + d_in + j` for
//!   entry `j` of column `k` of B (additive family).
//!
//! The key is folded with SplitMix64 (`h ← splitmix64(h ⊕ part)` over the parts, starting from
//! `splitmix64(seed)`), and a draw uses two more SplitMix64 outputs `a = splitmix64(h)`,
//! `b = splitmix64(h + γ)`: uniform `u = (a >> 11)·2⁻⁵³ ∈ [0, 1)`, standard normal by Box–Muller
//! `√(−2 ln u₁)·cos(2π u₂)` with `u₁ = ((a >> 11) + 1)·2⁻⁵³ ∈ (0, 1]`, `u₂ = (b >> 11)·2⁻⁵³`.
//! So an input's scores depend on the bundle, the input, the seed and S only.

use crate::error::{Error, Result};

/// The most posterior samples one request may ask for (the Python `Scorer` checks the same
/// bound first; the core checks it again with [`check_samples`]). Memory does not grow with S:
/// the encoder runs the samples of an input in chunks and reduces them online.
pub const MAX_SAMPLES: usize = 1 << 20;

/// `samples` if it is in `1..=MAX_SAMPLES`, else [`Error::Value`].
pub fn check_samples(samples: usize) -> Result<usize> {
    if (1..=MAX_SAMPLES).contains(&samples) {
        Ok(samples)
    } else {
        Err(Error::Value(format!(
            "samples must be in 1..{MAX_SAMPLES}, got {samples}"
        )))
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// 64-bit FNV-1a of bytes.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// FNV-1a over the little-endian u32 bytes of the ids with a non-zero mask.
pub fn input_hash(ids: &[u32], mask: &[bool]) -> u64 {
    let mut h = FNV_OFFSET;
    for (&id, &m) in ids.iter().zip(mask) {
        if m {
            for b in id.to_le_bytes() {
                h ^= b as u64;
                h = h.wrapping_mul(FNV_PRIME);
            }
        }
    }
    h
}

/// SplitMix64 finaliser (Steele, Lea & Flood 2014).
#[inline]
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The stream of one (seed, input, sample, module): draws are indexed by (rank, element).
#[derive(Clone, Copy, Debug)]
pub struct Stream(u64);

impl Stream {
    /// Key a stream by `(seed, input hash, sample, module key)`.
    pub fn new(seed: u64, input: u64, sample: u64, module: u64) -> Self {
        let mut h = splitmix64(seed);
        for part in [input, sample, module] {
            h = splitmix64(h ^ part);
        }
        Self(h)
    }

    #[inline]
    fn key(&self, rank: u64, element: u64) -> u64 {
        splitmix64(splitmix64(self.0 ^ rank) ^ element)
    }

    /// Uniform in [0, 1).
    #[inline]
    pub fn uniform(&self, rank: u64, element: u64) -> f64 {
        let a = splitmix64(self.key(rank, element));
        (a >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box–Muller, cosine branch).
    #[inline]
    pub fn normal(&self, rank: u64, element: u64) -> f64 {
        let (radius, angle) = self.polar(rank, element);
        radius * angle.cos()
    }

    /// Two independent standard normals from one draw: both Box–Muller branches, `(cosine,
    /// sine)`; the first is [`Stream::normal`] of the same `(rank, element)`. Half the hashing and
    /// logarithms of two [`Stream::normal`] calls, for callers that need many normals.
    #[inline]
    pub fn normal_pair(&self, rank: u64, element: u64) -> (f64, f64) {
        let (radius, angle) = self.polar(rank, element);
        let (sin, cos) = angle.sin_cos();
        (radius * cos, radius * sin)
    }

    /// Box–Muller's radius `√(−2 ln u1)` and angle `2π u2` of draw `(rank, element)`.
    #[inline]
    fn polar(&self, rank: u64, element: u64) -> (f64, f64) {
        let h = self.key(rank, element);
        let a = splitmix64(h);
        let b = splitmix64(h.wrapping_add(GOLDEN));
        let u1 = ((a >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64);
        let u2 = (b >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        ((-2.0 * u1.ln()).sqrt(), std::f64::consts::TAU * u2)
    }
}

/// The docs/method.md §6 summary of one input, reduced online over its samples.
#[derive(Clone, Debug)]
pub struct Summary {
    /// Mean class probabilities `[C]`.
    pub probs: Vec<f64>,
    /// argmax of `probs` (first maximum).
    pub label: usize,
    /// `max probs`.
    pub confidence: f64,
    /// `H[p̄]` (total).
    pub entropy: f64,
    /// `mean_s H[p_s]` (aleatoric).
    pub expected_entropy: f64,
    /// `entropy − expected_entropy`, clamped at 0 (epistemic).
    pub mutual_info: f64,
    /// Population variance over samples of the predicted class's probability.
    pub variance: f64,
}

/// Running mean and M2 (Welford) of the class probabilities, and the mean per-sample entropy.
#[derive(Clone, Debug)]
pub struct OnlineSummary {
    n: u64,
    mean: Vec<f64>,
    m2: Vec<f64>,
    mean_entropy: f64,
    probs: Vec<f64>,
}

fn entropy(p: &[f64]) -> f64 {
    -p.iter().map(|&v| v * v.max(1e-30).ln()).sum::<f64>()
}

impl OnlineSummary {
    /// An empty accumulator for `classes` classes.
    pub fn new(classes: usize) -> Self {
        Self {
            n: 0,
            mean: vec![0.0; classes],
            m2: vec![0.0; classes],
            mean_entropy: 0.0,
            probs: vec![0.0; classes],
        }
    }

    /// Add one sample's logits (softmax taken here, in f64).
    pub fn push_logits(&mut self, logits: &[f32]) {
        let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let mut z = 0.0;
        for (p, &l) in self.probs.iter_mut().zip(logits) {
            *p = (l as f64 - m).exp();
            z += *p;
        }
        for p in self.probs.iter_mut() {
            *p /= z;
        }
        self.n += 1;
        let n = self.n as f64;
        for c in 0..self.mean.len() {
            let d = self.probs[c] - self.mean[c];
            self.mean[c] += d / n;
            self.m2[c] += d * (self.probs[c] - self.mean[c]);
        }
        self.mean_entropy += (entropy(&self.probs) - self.mean_entropy) / n;
    }

    /// The summary of the samples pushed so far (at least one).
    pub fn finish(&self) -> Summary {
        let mut label = 0;
        for (c, &p) in self.mean.iter().enumerate() {
            if p > self.mean[label] {
                label = c;
            }
        }
        let total = entropy(&self.mean);
        Summary {
            probs: self.mean.clone(),
            label,
            confidence: self.mean.get(label).copied().unwrap_or(0.0),
            entropy: total,
            expected_entropy: self.mean_entropy,
            mutual_info: (total - self.mean_entropy).max(0.0),
            variance: if self.n > 0 {
                self.m2.get(label).copied().unwrap_or(0.0) / self.n as f64
            } else {
                0.0
            },
        }
    }
}

/// The docs/method.md §6 fields of a batch of inputs, one column each, in the precision they are handed
/// out in (f32; the reduction itself runs in f64).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UncertaintyColumns {
    /// Mean class probabilities `[N, C]`, row-major.
    pub probs: Vec<f32>,
    /// Predicted class `[N]`.
    pub label: Vec<usize>,
    /// `[N]`: see [`Summary::confidence`].
    pub confidence: Vec<f32>,
    /// `[N]`: see [`Summary::entropy`].
    pub entropy: Vec<f32>,
    /// `[N]`: see [`Summary::expected_entropy`].
    pub expected_entropy: Vec<f32>,
    /// `[N]`: see [`Summary::mutual_info`].
    pub mutual_info: Vec<f32>,
    /// `[N]`: see [`Summary::variance`].
    pub variance: Vec<f32>,
}

impl UncertaintyColumns {
    /// Room for `inputs` inputs of `classes` classes.
    pub fn with_capacity(inputs: usize, classes: usize) -> Self {
        Self {
            probs: Vec::with_capacity(inputs.saturating_mul(classes)),
            label: Vec::with_capacity(inputs),
            confidence: Vec::with_capacity(inputs),
            entropy: Vec::with_capacity(inputs),
            expected_entropy: Vec::with_capacity(inputs),
            mutual_info: Vec::with_capacity(inputs),
            variance: Vec::with_capacity(inputs),
        }
    }

    /// Append one input's summary.
    pub fn push(&mut self, s: &Summary) {
        self.probs.extend(s.probs.iter().map(|&p| p as f32));
        self.label.push(s.label);
        self.confidence.push(s.confidence as f32);
        self.entropy.push(s.entropy as f32);
        self.expected_entropy.push(s.expected_entropy as f32);
        self.mutual_info.push(s.mutual_info as f32);
        self.variance.push(s.variance as f32);
    }
}

/// Reduce per-sample logits `[N, S, C]` (row-major) to the docs/method.md §6 fields of each input, online
/// over its `samples` samples (S = 1 for mean mode).
pub fn summarize(logits: &[f32], samples: usize, classes: usize) -> Result<UncertaintyColumns> {
    let per_input = samples.checked_mul(classes).unwrap_or(0);
    if per_input == 0 || !logits.len().is_multiple_of(per_input) {
        return Err(Error::Shape(format!(
            "{} logits are not [N, {samples}, {classes}]",
            logits.len()
        )));
    }
    let n = logits.len() / per_input;
    let mut out = UncertaintyColumns::with_capacity(n, classes);
    for input in logits.chunks_exact(per_input) {
        let mut acc = OnlineSummary::new(classes);
        for sample in input.chunks_exact(classes) {
            acc.push_logits(sample);
        }
        out.push(&acc.finish());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_reference_vectors() {
        assert_eq!(fnv1a(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x85944171f73967e8);
        assert_eq!(
            input_hash(&[0x6f6f66, 0x726162], &[true, true]),
            fnv1a(b"foo\0bar\0")
        );
        assert_eq!(
            input_hash(&[1, 2, 3], &[true, false, true]),
            input_hash(&[1, 3], &[true, true])
        );
    }

    #[test]
    fn normals_have_unit_moments_and_streams_differ() {
        let s = Stream::new(7, 11, 0, 13);
        let n = 200_000u64;
        let (mut m1, mut m2) = (0.0, 0.0);
        for i in 0..n {
            let x = s.normal(i % 64, i / 64);
            m1 += x;
            m2 += x * x;
        }
        m1 /= n as f64;
        m2 /= n as f64;
        assert!(m1.abs() < 0.01 && (m2 - 1.0).abs() < 0.02, "{m1} {m2}");
        let t = Stream::new(7, 11, 1, 13);
        assert_ne!(s.normal(0, 0), t.normal(0, 0));
        // both branches of a pair: unit moments, uncorrelated; the cosine one is `normal`
        let (mut c1, mut c2, mut s1, mut s2, mut cs) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for i in 0..n {
            let (c, si) = s.normal_pair(i % 64, i / 64);
            assert_eq!(c.to_bits(), s.normal(i % 64, i / 64).to_bits());
            (c1, c2, s1, s2, cs) = (c1 + c, c2 + c * c, s1 + si, s2 + si * si, cs + c * si);
        }
        let nf = n as f64;
        for (m1, m2) in [(c1 / nf, c2 / nf), (s1 / nf, s2 / nf)] {
            assert!(m1.abs() < 0.01 && (m2 - 1.0).abs() < 0.02, "{m1} {m2}");
        }
        assert!((cs / nf).abs() < 0.01, "correlation {}", cs / nf);
        let u: f64 = (0..n).map(|i| s.uniform(i, 0)).sum::<f64>() / n as f64;
        assert!((u - 0.5).abs() < 0.005);
    }

    #[test]
    fn online_summary_matches_two_pass() {
        let samples = [[0.1f32, 2.0, -1.0], [1.5, 0.3, 0.0], [0.0, 0.0, 0.0]];
        let mut acc = OnlineSummary::new(3);
        let mut probs = vec![];
        for l in &samples {
            acc.push_logits(l);
            let z: f64 = l.iter().map(|&v| (v as f64).exp()).sum();
            probs.push(l.iter().map(|&v| (v as f64).exp() / z).collect::<Vec<_>>());
        }
        let s = acc.finish();
        let mean: Vec<f64> = (0..3)
            .map(|c| probs.iter().map(|p| p[c]).sum::<f64>() / 3.0)
            .collect();
        for (got, want) in s.probs.iter().zip(&mean) {
            assert!((got - want).abs() < 1e-12);
        }
        let var = probs
            .iter()
            .map(|p| (p[s.label] - mean[s.label]).powi(2))
            .sum::<f64>()
            / 3.0;
        assert!((s.variance - var).abs() < 1e-12);
        let eh = probs.iter().map(|p| entropy(p)).sum::<f64>() / 3.0;
        assert!((s.expected_entropy - eh).abs() < 1e-12);
    }

    #[test]
    fn summarize_is_the_online_summary_of_each_input() {
        let (n, samples, classes) = (3, 4, 5);
        let logits: Vec<f32> = (0..n * samples * classes)
            .map(|i| ((i * 37) % 11) as f32 * 0.3 - 1.5)
            .collect();
        let cols = summarize(&logits, samples, classes).expect("shape");
        assert_eq!(
            (cols.probs.len(), cols.label.len(), cols.variance.len()),
            (15, 3, 3)
        );
        for (i, input) in logits.chunks_exact(samples * classes).enumerate() {
            let mut acc = OnlineSummary::new(classes);
            input.chunks_exact(classes).for_each(|l| acc.push_logits(l));
            let s = acc.finish();
            assert_eq!(cols.label[i], s.label);
            assert_eq!(cols.mutual_info[i], s.mutual_info as f32);
            assert_eq!(cols.expected_entropy[i], s.expected_entropy as f32);
            let probs: Vec<f32> = s.probs.iter().map(|&p| p as f32).collect();
            assert_eq!(&cols.probs[i * classes..(i + 1) * classes], &probs[..]);
        }
        assert!(matches!(
            summarize(&logits, 7, classes),
            Err(Error::Shape(_))
        ));
        assert!(matches!(
            summarize(&logits, 0, classes),
            Err(Error::Shape(_))
        ));
        assert_eq!(summarize(&[], 2, 3).expect("empty batch").label.len(), 0);
    }
}
