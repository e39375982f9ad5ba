//! `cargo run --release -p bayeslora-core --example encoder_rows`: one MiniLM-shaped forward
//! pass (batch 8 × 64 tokens, 16 samples; mean mode) on one thread for several
//! `Encoder::max_rows`, the thread's CPU time (best of several passes, alternating), so that
//! the effect of the piece size on cache use shows on a loaded machine.

use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;

use bayeslora_core::bundle::{
    Activation, AdapterTensors, Arch, Bundle, BundleMeta, ModelConfig, ModuleMeta, Tensor,
};
use bayeslora_core::encoder::{Encoder, Noise};

/// CPU time of this thread in seconds.
fn thread_cpu() -> f64 {
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

fn pseudo(n: usize, seed: u64) -> Vec<f32> {
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

/// A random BERT of the MiniLM-L6 shape (vocabulary 2000) with gate adapters of rank 8 on
/// query and value, as `benches/bench_runtime.py`.
fn minilm() -> Bundle {
    let config = ModelConfig {
        arch: Arch::Bert,
        vocab_size: 2000,
        hidden: 384,
        layers: 6,
        heads: 12,
        intermediate: 1536,
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
    let rank = 8;
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

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let rows: Vec<usize> = std::env::args()
        .skip(2)
        .filter_map(|s| s.parse().ok())
        .collect();
    let rows = if rows.is_empty() {
        vec![8192, 2048, 1024]
    } else {
        rows
    };
    let mut enc = Encoder::new(&minilm()).expect("encoder");
    let (n, t) = (8, 64);
    let ids: Vec<i64> = (0..n * t).map(|i| (i * 7 % 1999) as i64 + 1).collect();
    let seqs = enc.prepare(&ids, &vec![1; n * t], n, t).expect("inputs");
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    let noises = [
        ("mean", Noise::Mean),
        (
            "S=16",
            Noise::Sampled {
                samples: 16,
                seed: 0,
            },
        ),
    ];
    let mut best = vec![[f64::INFINITY; 2]; rows.len()];
    let mut reference: Vec<Option<Vec<f32>>> = vec![None, None];
    for _ in 0..reps {
        for (ri, &r) in rows.iter().enumerate() {
            enc.set_max_rows(r);
            for (ni, (_, noise)) in noises.iter().enumerate() {
                let (secs, out) = pool.install(|| {
                    let t0 = thread_cpu();
                    let out = black_box(enc.forward(&seqs, *noise).expect("forward"));
                    (thread_cpu() - t0, out)
                });
                match &reference[ni] {
                    None => reference[ni] = Some(out),
                    Some(want) => assert_eq!(want, &out, "results depend on max_rows"),
                }
                best[ri][ni] = best[ri][ni].min(secs);
            }
        }
    }
    for (ri, &r) in rows.iter().enumerate() {
        for (ni, (name, _)) in noises.iter().enumerate() {
            println!(
                "max_rows {r:5} {name:5}: {:.1} ms CPU (best of {reps})",
                best[ri][ni] * 1e3
            );
        }
    }
}
