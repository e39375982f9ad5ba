//! The encoder against a BERT computed here with plain f64 loops: hidden 4, 2 heads, 2 layers,
//! exact GELU, a tanh pooler; with and without adapters, with explicit gates and with sampled
//! gates (the noise streams' contract of `mc` reproduced by hand).

use std::collections::{BTreeMap, HashMap};

use super::{Encoder, Noise};
use crate::bundle::{
    Activation, AdapterTensors, Arch, Bundle, BundleMeta, LinearSpec, ModelConfig, ModuleMeta,
    Tensor,
};
use crate::mc::{self, fnv1a, input_hash, Stream, MAX_SAMPLES};
use crate::test_data::pseudo;

const HIDDEN: usize = 4;
const HEADS: usize = 2;
const LAYERS: usize = 2;
const INTER: usize = 6;
const VOCAB: usize = 9;
const LABELS: usize = 3;
const RANK: usize = 2;
const SCALE: f64 = 0.75;

pub(super) fn config() -> ModelConfig {
    ModelConfig {
        arch: Arch::Bert,
        vocab_size: VOCAB,
        hidden: HIDDEN,
        layers: LAYERS,
        heads: HEADS,
        intermediate: INTER,
        max_positions: 8,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        activation: Activation::Gelu,
        pad_token_id: 0,
        deberta: None,
    }
}

/// A bundle in memory with random weights; gate adapters of rank 2 on `adapted` modules.
pub(super) fn bundle(adapted: &[&str]) -> Bundle {
    bundle_of(config(), adapted)
}

/// [`bundle`] of a model of shape `config`.
pub(super) fn bundle_of(config: ModelConfig, adapted: &[&str]) -> Bundle {
    let mut tensors = HashMap::new();
    let mut seed = 1;
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        seed += 1;
        let data = pseudo(shape.iter().product(), seed)
            .into_iter()
            .map(|v| v * scale + offset)
            .collect();
        tensors.insert(name, Tensor { shape, data });
    };
    for spec in config.embedding_tensors() {
        let gamma = spec.name.ends_with("LayerNorm.weight");
        let (scale, offset) = if gamma { (0.2, 1.0) } else { (1.0, 0.0) };
        add(spec.name, spec.shape, scale, offset);
    }
    for l in 0..config.layers {
        for ln in config.layer_norm_suffixes() {
            let p = format!("{}.{ln}", config.layer_prefix(l));
            add(format!("{p}.weight"), vec![config.hidden], 0.2, 1.0);
            add(format!("{p}.bias"), vec![config.hidden], 0.2, 0.0);
        }
    }
    for l in config.linears(LABELS) {
        add(
            format!("{}.weight", l.name),
            vec![l.d_out, l.d_in],
            1.5,
            0.0,
        );
        add(format!("{}.bias", l.name), vec![l.d_out], 0.5, 0.0);
    }
    let mut modules = BTreeMap::new();
    let mut adapters = HashMap::new();
    for LinearSpec { name, d_in, d_out } in config.linears(LABELS) {
        if !adapted.iter().any(|a| name.ends_with(a)) {
            continue;
        }
        modules.insert(
            name.clone(),
            ModuleMeta {
                rank: RANK,
                initial_rank: RANK + 2,
                scale: SCALE,
                d_in,
                d_out,
            },
        );
        seed += 1;
        adapters.insert(
            name,
            AdapterTensors {
                lora_a: pseudo(RANK * d_in, seed),
                lora_b: pseudo(d_out * RANK, seed + 100),
                rank_param: vec![-1.0, 0.5],
                rank_index: vec![3, 1],
            },
        );
    }
    Bundle {
        dir: "in-memory".into(),
        meta: BundleMeta {
            format_version: 1,
            architecture: "bert".into(),
            model_type: "bert".into(),
            method: "bayeslora".into(),
            posterior: "gate".into(),
            num_labels: LABELS,
            labels: Vec::new(),
            prune_threshold: 3.0,
            dropout: 0.0,
            dtype: "float32".into(),
            max_length: 8,
            modules,
        },
        config,
        tensors,
        adapters,
    }
}

/// `erf` in f64 by its Taylor series (|x| ≤ 3 here), 1 beyond.
fn erf(x: f64) -> f64 {
    if x.abs() > 5.0 {
        return x.signum();
    }
    let (mut term, mut sum) = (x, x);
    for n in 1..200 {
        term *= -x * x / n as f64;
        sum += term / (2 * n + 1) as f64;
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

fn layer_norm(x: &[f64], gamma: &[f32], beta: &[f32]) -> Vec<f64> {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    let inv = 1.0 / (var + 1e-12).sqrt();
    (0..x.len())
        .map(|j| (x[j] - mean) * inv * gamma[j] as f64 + beta[j] as f64)
        .collect()
}

/// The reference model: weights in f64 with each adapter merged with its gates,
/// `W + s·B diag(z) A` (z = 1 in mean mode).
struct Reference<'a> {
    bundle: &'a Bundle,
    gates: HashMap<String, Vec<f64>>,
    /// Segment id of each token (none given: 0).
    types: Vec<usize>,
}

impl Reference<'_> {
    fn t(&self, name: &str) -> &[f32] {
        &self.bundle.tensors[name].data
    }

    /// `y = W' x + b` of module `name` for one row `x`.
    fn linear(&self, name: &str, x: &[f64]) -> Vec<f64> {
        let w = &self.bundle.tensors[&format!("{name}.weight")];
        let (d_out, d_in) = (w.shape[0], w.shape[1]);
        let b = self.t(&format!("{name}.bias"));
        let mut y: Vec<f64> = (0..d_out)
            .map(|j| {
                b[j] as f64
                    + (0..d_in)
                        .map(|i| w.data[j * d_in + i] as f64 * x[i])
                        .sum::<f64>()
            })
            .collect();
        if let Some(ad) = self.bundle.adapters.get(name) {
            let ones = vec![1.0; RANK];
            let z = self.gates.get(name).unwrap_or(&ones);
            for (k, zk) in z.iter().enumerate() {
                let ax: f64 = (0..d_in)
                    .map(|i| ad.lora_a[k * d_in + i] as f64 * x[i])
                    .sum();
                for (j, yj) in y.iter_mut().enumerate() {
                    *yj += SCALE * ad.lora_b[j * RANK + k] as f64 * zk * ax;
                }
            }
        }
        y
    }

    fn logits(&self, ids: &[usize]) -> Vec<f64> {
        let cfg = &self.bundle.config;
        let (h, dh) = (HIDDEN, HIDDEN / HEADS);
        let (word, pos, tt) = (
            self.t("bert.embeddings.word_embeddings.weight"),
            self.t("bert.embeddings.position_embeddings.weight"),
            self.t("bert.embeddings.token_type_embeddings.weight"),
        );
        let mut x: Vec<Vec<f64>> = ids
            .iter()
            .enumerate()
            .map(|(p, &id)| {
                let ty = self.types.get(p).copied().unwrap_or(0);
                let e: Vec<f64> = (0..h)
                    .map(|j| {
                        word[id * h + j] as f64 + pos[p * h + j] as f64 + tt[ty * h + j] as f64
                    })
                    .collect();
                layer_norm(
                    &e,
                    self.t("bert.embeddings.LayerNorm.weight"),
                    self.t("bert.embeddings.LayerNorm.bias"),
                )
            })
            .collect();
        for l in 0..LAYERS {
            let lp = cfg.layer_prefix(l);
            let q: Vec<_> = x
                .iter()
                .map(|r| self.linear(&format!("{lp}.attention.self.query"), r))
                .collect();
            let k: Vec<_> = x
                .iter()
                .map(|r| self.linear(&format!("{lp}.attention.self.key"), r))
                .collect();
            let v: Vec<_> = x
                .iter()
                .map(|r| self.linear(&format!("{lp}.attention.self.value"), r))
                .collect();
            let mut next = Vec::new();
            for (t, xt) in x.iter().enumerate() {
                let mut context = vec![0.0; h];
                for hd in 0..HEADS {
                    let cols = hd * dh..(hd + 1) * dh;
                    let scores: Vec<f64> = k
                        .iter()
                        .map(|kj| {
                            cols.clone().map(|c| q[t][c] * kj[c]).sum::<f64>() / (dh as f64).sqrt()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for (j, vj) in v.iter().enumerate() {
                        for c in cols.clone() {
                            context[c] += e[j] / z * vj[c];
                        }
                    }
                }
                let a = self.linear(&format!("{lp}.attention.output.dense"), &context);
                let a: Vec<f64> = a.iter().zip(xt).map(|(u, w)| u + w).collect();
                let ln1 = format!("{lp}.attention.output.LayerNorm");
                let mid = layer_norm(
                    &a,
                    self.t(&format!("{ln1}.weight")),
                    self.t(&format!("{ln1}.bias")),
                );
                let inner: Vec<f64> = self
                    .linear(&format!("{lp}.intermediate.dense"), &mid)
                    .into_iter()
                    .map(|u| 0.5 * u * (1.0 + erf(u / std::f64::consts::SQRT_2)))
                    .collect();
                let out = self.linear(&format!("{lp}.output.dense"), &inner);
                let out: Vec<f64> = out.iter().zip(&mid).map(|(u, w)| u + w).collect();
                let ln2 = format!("{lp}.output.LayerNorm");
                next.push(layer_norm(
                    &out,
                    self.t(&format!("{ln2}.weight")),
                    self.t(&format!("{ln2}.bias")),
                ));
            }
            x = next;
        }
        let pooled: Vec<f64> = self
            .linear("bert.pooler.dense", &x[0])
            .into_iter()
            .map(f64::tanh)
            .collect();
        self.linear("classifier", &pooled)
    }
}

fn reference(bundle: &Bundle, ids: &[usize], gates: HashMap<String, Vec<f64>>) -> Vec<f64> {
    Reference {
        bundle,
        gates,
        types: Vec::new(),
    }
    .logits(ids)
}

/// Sentence pairs: segment ids select rows of the token-type table; out-of-range ids are refused.
#[test]
fn segment_ids_match_the_reference_model() {
    let b = bundle(&["query", "value"]);
    let enc = Encoder::new(&b).expect("encoder");
    assert!(enc.uses_token_types());
    let (ids, mask, t) = padded(&INPUTS);
    let segments: [&[usize]; 3] = [&[0, 0, 1, 1, 1], &[0, 1], &[0, 0, 0, 0]];
    let mut types = vec![0i64; ids.len()];
    for (i, s) in segments.iter().enumerate() {
        for (j, &v) in s.iter().enumerate() {
            types[i * t + j] = v as i64;
        }
    }
    types[t + 3] = 7; // under the mask of a padded position: never read
    let seqs = enc
        .prepare_typed_at(&ids, &mask, Some(&types), INPUTS.len(), t, 0)
        .expect("inputs");
    let logits = enc.forward(&seqs, Noise::Mean).expect("mean");
    for (i, x) in INPUTS.iter().enumerate() {
        let want = Reference {
            bundle: &b,
            gates: HashMap::new(),
            types: segments[i].to_vec(),
        }
        .logits(x);
        assert_close(
            &logits[i * LABELS..(i + 1) * LABELS],
            &want,
            &format!("input {i}"),
        );
    }
    // segment 1 changes the logits; all-zero segment ids are the untyped pass
    let plain = enc.prepare(&ids, &mask, INPUTS.len(), t).expect("inputs");
    let untyped = enc.forward(&plain, Noise::Mean).expect("mean");
    assert_eq!(untyped[2 * LABELS..], logits[2 * LABELS..]);
    assert_ne!(untyped[..LABELS], logits[..LABELS]);
    let mut bad = types.clone();
    bad[1] = 2; // type_vocab_size is 2
    assert!(matches!(
        enc.prepare_typed_at(&ids, &mask, Some(&bad), INPUTS.len(), t, 0),
        Err(crate::Error::Value(m)) if m.contains("token type 2")
    ));
    bad[1] = -1;
    assert!(matches!(
        enc.prepare_typed_at(&ids, &mask, Some(&bad), INPUTS.len(), t, 0),
        Err(crate::Error::Value(_))
    ));
    assert!(matches!(
        enc.prepare_typed_at(&ids, &mask, Some(&types[1..]), INPUTS.len(), t, 0),
        Err(crate::Error::Shape(_))
    ));
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!((*g as f64 - w).abs() < 2e-5, "{what}: {got:?} vs {want:?}");
    }
}

/// `[n, t]` ids and mask of right-padded inputs.
pub(super) fn padded(inputs: &[&[usize]]) -> (Vec<i64>, Vec<i64>, usize) {
    let t = inputs.iter().map(|x| x.len()).max().unwrap_or(0);
    let (mut ids, mut mask) = (vec![0; inputs.len() * t], vec![0; inputs.len() * t]);
    for (i, x) in inputs.iter().enumerate() {
        for (j, &id) in x.iter().enumerate() {
            ids[i * t + j] = id as i64;
            mask[i * t + j] = 1;
        }
    }
    (ids, mask, t)
}

pub(super) const INPUTS: [&[usize]; 3] = [&[1, 4, 2, 8, 3], &[5, 2], &[7, 7, 6, 0]];

#[test]
fn mean_mode_matches_the_reference_model() {
    for adapted in [
        &[][..],
        &["query", "key", "value", "intermediate.dense", "classifier"],
    ] {
        let b = bundle(adapted);
        let enc = Encoder::new(&b).expect("encoder");
        let (ids, mask, t) = padded(&INPUTS);
        let seqs = enc.prepare(&ids, &mask, INPUTS.len(), t).expect("inputs");
        let logits = enc.forward(&seqs, Noise::Mean).expect("mean");
        for (i, x) in INPUTS.iter().enumerate() {
            let want = reference(&b, x, HashMap::new());
            assert_close(
                &logits[i * LABELS..(i + 1) * LABELS],
                &want,
                &format!("{adapted:?} input {i}"),
            );
        }
        // an input's logits do not depend on its batch-mates or its padding
        let (one_ids, one_mask, one_t) = padded(&INPUTS[1..2]);
        let one = enc
            .prepare(&one_ids, &one_mask, 1, one_t)
            .expect("one input");
        assert_eq!(
            enc.forward(&one, Noise::Mean).expect("mean"),
            logits[LABELS..2 * LABELS].to_vec()
        );
    }
}

#[test]
fn explicit_and_sampled_gates_match_the_reference_model() {
    // noise on the key (the last layer then attends over all tokens), the FFN and the head
    let adapted = ["key", "output.dense", "classifier"];
    let b = bundle(&adapted);
    let enc = Encoder::new(&b).expect("encoder");
    let (ids, mask, t) = padded(&INPUTS);
    let seqs = enc.prepare(&ids, &mask, INPUTS.len(), t).expect("inputs");
    // explicit gates: module → [N, r]
    let names: Vec<String> = b.meta.modules.keys().cloned().collect();
    let gates: HashMap<String, Vec<f32>> = names
        .iter()
        .enumerate()
        .map(|(m, name)| {
            (
                name.clone(),
                pseudo(INPUTS.len() * RANK, 50 + m as u64)
                    .iter()
                    .map(|v| 1.0 + 2.0 * v)
                    .collect(),
            )
        })
        .collect();
    enc.check_gates(&gates, INPUTS.len()).expect("valid gates");
    let logits = enc.forward(&seqs, Noise::Explicit(&gates)).expect("gates");
    for (i, x) in INPUTS.iter().enumerate() {
        let z = gates
            .iter()
            .map(|(n, g)| {
                (
                    n.clone(),
                    g[i * RANK..(i + 1) * RANK]
                        .iter()
                        .map(|&v| v as f64)
                        .collect(),
                )
            })
            .collect();
        assert_close(
            &logits[i * LABELS..(i + 1) * LABELS],
            &reference(&b, x, z),
            &format!("gates, input {i}"),
        );
    }
    // sampled gates: z_k = 1 + exp(½ log α_k) ε, ε from the stream of (seed, input, sample, module)
    let (samples, seed) = (3, 17);
    let logits = enc
        .forward(&seqs, Noise::Sampled { samples, seed })
        .expect("sampled");
    for (i, x) in INPUTS.iter().enumerate() {
        let ids_u32: Vec<u32> = x.iter().map(|&v| v as u32).collect();
        let hash = input_hash(&ids_u32, &vec![true; x.len()]);
        for s in 0..samples {
            let mut z = HashMap::new();
            for (name, ad) in &b.adapters {
                let stream = Stream::new(seed, hash, s as u64, fnv1a(name.as_bytes()));
                let zk = (0..RANK)
                    .map(|k| {
                        let std = (0.5 * ad.rank_param[k] as f64).exp() as f32;
                        1.0 + (std * stream.normal(ad.rank_index[k], 0) as f32) as f64
                    })
                    .collect();
                z.insert(name.clone(), zk);
            }
            let got = &logits[(i * samples + s) * LABELS..(i * samples + s + 1) * LABELS];
            assert_close(
                got,
                &reference(&b, x, z),
                &format!("sample {s} of input {i}"),
            );
        }
    }
}

#[test]
fn bad_inputs_are_rejected() {
    let enc = Encoder::new(&bundle(&["query"])).expect("encoder");
    assert!(matches!(
        enc.prepare(&[1, 2], &[1], 1, 2),
        Err(crate::Error::Shape(_))
    ));
    assert!(matches!(
        enc.prepare(&[1, VOCAB as i64], &[1, 1], 1, 2),
        Err(crate::Error::Value(_))
    ));
    assert!(matches!(
        enc.prepare(&[1, 2], &[0, 0], 1, 2),
        Err(crate::Error::Value(_))
    ));
    assert!(matches!(
        enc.prepare(&[1; 9], &[1; 9], 1, 9),
        Err(crate::Error::Value(_))
    ));
    let name = "bert.encoder.layer.0.attention.self.query".to_string();
    let bad = HashMap::from([(name.clone(), vec![1.0; RANK + 1])]);
    assert!(matches!(
        enc.check_gates(&bad, 1),
        Err(crate::Error::Shape(_))
    ));
    let nan = HashMap::from([(name, vec![f32::NAN; RANK])]);
    assert!(matches!(
        enc.check_gates(&nan, 1),
        Err(crate::Error::Value(_))
    ));
    let unknown = HashMap::from([("classifier".to_string(), vec![1.0; RANK])]);
    assert!(matches!(
        enc.check_gates(&unknown, 1),
        Err(crate::Error::Value(_))
    ));
}

#[test]
fn samples_in_chunks_give_what_one_block_gives() {
    // noise on the key (every token of the last layer runs per sample) and the FFN
    let b = bundle(&["key", "intermediate.dense"]);
    let mut enc = Encoder::new(&b).expect("encoder");
    let (ids, mask, t) = padded(&INPUTS);
    let seqs = enc.prepare(&ids, &mask, INPUTS.len(), t).expect("inputs");
    let samples = 37;
    let noise = Noise::Sampled { samples, seed: 5 };
    assert!(INPUTS.iter().map(|x| x.len() * samples).sum::<usize>() <= enc.max_rows());
    let logits = enc.forward(&seqs, noise).expect("one block");
    let whole = enc.score(&seqs, noise).expect("one block");
    // the online reduction over chunks is the reduction of all the logits at once
    assert_eq!(
        whole,
        mc::summarize(&logits, samples, LABELS).expect("reference")
    );
    for rows in [1, 2, 5, 13, 64, 100] {
        enc.set_max_rows(rows);
        let chunked = enc.forward(&seqs, noise).expect("chunked");
        assert_eq!(chunked, logits, "logits, max_rows {rows}");
        assert_eq!(
            enc.score(&seqs, noise).expect("chunked"),
            whole,
            "summary, max_rows {rows}"
        );
        // an input alone, in chunks, is scored as in the batch
        let one = enc
            .prepare(&ids[t..2 * t], &mask[t..2 * t], 1, t)
            .expect("one");
        let alone = enc.score(&one, noise).expect("alone");
        assert_eq!(alone.probs, whole.probs[LABELS..2 * LABELS]);
        assert_eq!(alone.mutual_info, whole.mutual_info[1..2]);
    }
    // mean mode and explicit gates are one sample: unchanged by the budget
    enc.set_max_rows(1);
    let mean = enc.score(&seqs, Noise::Mean).expect("mean");
    let mean_logits = enc.forward(&seqs, Noise::Mean).expect("mean");
    assert_eq!(
        mean,
        mc::summarize(&mean_logits, 1, LABELS).expect("reference")
    );
}

#[test]
fn sample_counts_outside_the_range_are_value_errors() {
    let enc = Encoder::new(&bundle(&["query"])).expect("encoder");
    let seqs = enc.prepare(&[1, 2], &[1, 1], 1, 2).expect("input");
    for samples in [0, MAX_SAMPLES + 1, 10_000_000, 1 << 62, usize::MAX] {
        let noise = Noise::Sampled { samples, seed: 0 };
        for e in [
            enc.forward(&seqs, noise).map(|_| ()),
            enc.score(&seqs, noise).map(|_| ()),
        ] {
            assert!(
                matches!(&e, Err(crate::Error::Value(m)) if m.contains("samples must be in")),
                "{samples}: {e:?}"
            );
        }
    }
    // per-sample logits beyond MAX_LOGITS values are refused before anything is allocated
    let many = vec![1i64; 2048];
    let seqs2k = enc.prepare(&many, &many, 2048, 1).expect("2048 inputs");
    let e = enc.forward(
        &seqs2k,
        Noise::Sampled {
            samples: MAX_SAMPLES,
            seed: 0,
        },
    );
    assert!(
        matches!(&e, Err(crate::Error::Value(m)) if m.contains("more than")),
        "{e:?}"
    );
    // the largest count allowed runs in bounded memory (chunks of max_rows rows)
    let mut enc = enc;
    enc.set_max_rows(4096);
    let big = enc
        .score(
            &seqs,
            Noise::Sampled {
                samples: 1 << 14,
                seed: 0,
            },
        )
        .expect("many samples");
    assert!(big.probs.iter().all(|p| p.is_finite()));
}

#[test]
fn non_finite_logits_name_the_input() {
    let mut b = bundle(&["query"]);
    // token 5 embeds to 3e38: the LayerNorm's sum over the row overflows, it gives NaN
    let words = b
        .tensors
        .get_mut("bert.embeddings.word_embeddings.weight")
        .expect("embeddings");
    words.data[5 * HIDDEN..6 * HIDDEN].fill(3e38);
    let enc = Encoder::new(&b).expect("encoder");
    let (ids, mask, t) = padded(&INPUTS);
    let seqs = enc
        .prepare_at(&ids, &mask, INPUTS.len(), t, 40)
        .expect("inputs");
    let sampled = Noise::Sampled {
        samples: 4,
        seed: 0,
    };
    for noise in [Noise::Mean, sampled] {
        for e in [
            enc.forward(&seqs, noise).map(|_| ()),
            enc.score(&seqs, noise).map(|_| ()),
        ] {
            assert!(
                matches!(&e, Err(crate::Error::Value(m)) if m.starts_with("input 41:") && m.contains("not finite")),
                "{e:?}"
            );
        }
    }
    // its batch-mates alone are fine
    let first = enc.prepare(&ids[..t], &mask[..t], 1, t).expect("input 0");
    assert!(enc.score(&first, sampled).is_ok());
}

#[test]
fn explicit_gates_that_overflow_name_the_input() {
    // finite gates of 1e38 on input 2 only: the values overflow inside the model (a LayerNorm's
    // variance), which must not come out as a finite, meaningless row
    // (on a query they would only saturate the softmax, on the classifier give logits of 1e37:
    // finite, as in torch)
    let b = bundle(&["value", "intermediate.dense"]);
    let enc = Encoder::new(&b).expect("encoder");
    let (ids, mask, t) = padded(&INPUTS);
    let seqs = enc.prepare(&ids, &mask, INPUTS.len(), t).expect("inputs");
    for module in [
        "bert.encoder.layer.0.attention.self.value",
        "bert.encoder.layer.1.intermediate.dense",
    ] {
        let mut z = vec![1.0f32; INPUTS.len() * RANK];
        z[2 * RANK..].fill(1e38);
        let gates = HashMap::from([(module.to_string(), z)]);
        let e = enc.forward(&seqs, Noise::Explicit(&gates));
        assert!(
            matches!(&e, Err(crate::Error::Value(m)) if m.starts_with("input 2:")),
            "{module}: {e:?}"
        );
    }
}
