//! What the criterion bench (`rust/bayeslora-core/benches/runtime.rs`) and the measuring examples
//! (`rust/bayeslora-core/examples/encoder_rows.rs`, `rust/bayeslora-core/examples/kernel_peak.rs`)
//! share: pseudo-random data, a thread's CPU time, a random BERT bundle built in memory, a batch
//! of inputs for it and the examples' positional arguments. They include this file with
//! `#[path]` (a `mod.rs` under `benches/common/` is not a bench target).

// each includer uses a part of this file
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};

use bayeslora_core::bundle::{
    Activation, AdapterTensors, Arch, Bundle, BundleMeta, ModelConfig, ModuleMeta, Tensor,
};
use bayeslora_core::encoder::{Encoder, Sequence};

/// `n` deterministic pseudo-random values in [-0.1, 0.1).
pub fn pseudo(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5) * 0.2
        })
        .collect()
}

/// Positional argument `i` (1 = the first) as a number, `default` when absent or not a number.
pub fn arg(i: usize, default: usize) -> usize {
    std::env::args()
        .nth(i)
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// CPU time of this thread in seconds (NaN if the clock cannot be read).
pub fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// `n` inputs of `t` token ids each (all attended, within [`random_minilm`]'s vocabulary),
/// prepared for `enc`: the examples' MiniLM-shaped batch.
pub fn minilm_inputs(enc: &Encoder, n: usize, t: usize) -> Vec<Sequence> {
    let ids: Vec<i64> = (0..n * t).map(|i| (i * 7 % 1999) as i64 + 1).collect();
    enc.prepare(&ids, &vec![1; n * t], n, t).expect("inputs")
}

/// A random BERT of the MiniLM-L6 shape (vocabulary 2000) with gate adapters of rank 8 on
/// query and value, as `benches/bench_runtime.py`.
pub fn random_minilm() -> Bundle {
    random_bert(2000, 384, 6, 12, 1536, 8)
}

/// A random BERT of the given shape (64 positions, 2 token types, GELU) with gate adapters of
/// rank `rank` on query and value.
pub fn random_bert(
    vocab_size: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    intermediate: usize,
    rank: usize,
) -> Bundle {
    let config = ModelConfig {
        arch: Arch::Bert,
        vocab_size,
        hidden,
        layers,
        heads,
        intermediate,
        max_positions: 64,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        activation: Activation::Gelu,
        pad_token_id: 0,
        deberta: None,
    };
    let mut tensors = HashMap::new();
    let mut seed = 10;
    let mut add = |name: String, shape: Vec<usize>, offset: f32| {
        seed += 1;
        let data = pseudo(shape.iter().product(), seed)
            .into_iter()
            .map(|v| v + offset)
            .collect();
        tensors.insert(name, Tensor { shape, data });
    };
    for t in config.embedding_tensors() {
        let offset = if t.name.ends_with("LayerNorm.weight") {
            1.0
        } else {
            0.0
        };
        add(t.name, t.shape, offset);
    }
    for l in 0..config.layers {
        for ln in config.layer_norm_suffixes() {
            let p = format!("{}.{ln}", config.layer_prefix(l));
            add(format!("{p}.weight"), vec![config.hidden], 1.0);
            add(format!("{p}.bias"), vec![config.hidden], 0.0);
        }
    }
    let mut modules = BTreeMap::new();
    let mut adapters = HashMap::new();
    for l in config.linears(2) {
        add(format!("{}.weight", l.name), vec![l.d_out, l.d_in], 0.0);
        add(format!("{}.bias", l.name), vec![l.d_out], 0.0);
        if l.name.ends_with("query") || l.name.ends_with("value") {
            let meta = ModuleMeta {
                rank,
                initial_rank: rank,
                scale: 2.0,
                d_in: l.d_in,
                d_out: l.d_out,
            };
            let tensors = AdapterTensors {
                lora_a: pseudo(rank * l.d_in, 5),
                lora_b: pseudo(l.d_out * rank, 6),
                rank_param: vec![-2.0; rank],
                rank_index: (0..rank as u64).collect(),
            };
            modules.insert(l.name.clone(), meta);
            adapters.insert(l.name, tensors);
        }
    }
    Bundle {
        dir: "in-memory".into(),
        meta: BundleMeta {
            format_version: 1,
            architecture: "bert".into(),
            model_type: "bert".into(),
            method: "bayeslora".into(),
            posterior: "gate".into(),
            num_labels: 2,
            labels: Vec::new(),
            prune_threshold: 3.0,
            dropout: 0.0,
            dtype: "float32".into(),
            max_length: 64,
            modules,
        },
        config,
        tensors,
        adapters,
    }
}
