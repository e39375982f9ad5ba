//! `cargo bench -p bayeslora-core`: the GEMM on every instruction set this CPU has (MiniLM
//! shapes), and one encoder pass on a small random BERT, in mean mode and with 8 samples.
//! Quick by default; `cargo bench -p bayeslora-core -- --measurement-time 10` for steadier
//! figures. Single-threaded (a one-thread rayon pool), like the 1-thread runtime benches.

use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;
use std::time::Duration;

use bayeslora_core::bundle::{
    Activation, AdapterTensors, Arch, Bundle, BundleMeta, ModelConfig, ModuleMeta, Tensor,
};
use bayeslora_core::encoder::{Encoder, Noise};
use bayeslora_core::kernels::{gemm_on, Epilogue, Isa, Packed};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

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

fn bench_gemm(c: &mut Criterion) {
    let mut group = c.benchmark_group("gemm");
    // 64 tokens × (hidden 384 → fused Q/K/V 1152), and → FFN 1536
    for (m, k, n) in [(64, 384, 1152), (64, 384, 1536)] {
        let a = pseudo(m * k, 1);
        let b = Packed::from_weight(&pseudo(n * k, 2), n, k);
        let bias = pseudo(n, 3);
        let mut out = vec![0.0f32; m * n];
        // "elements" are FLOPs here: elem/s reads as FLOP/s
        group.throughput(Throughput::Elements((2 * m * k * n) as u64));
        for isa in Isa::available() {
            let id = BenchmarkId::new(isa.name(), format!("{m}x{k}x{n}"));
            group.bench_function(id, |bench| {
                bench.iter(|| {
                    gemm_on(
                        isa,
                        m,
                        black_box(&a),
                        k,
                        &b,
                        &mut out,
                        n,
                        Epilogue::Bias(&bias),
                    );
                    black_box(&out);
                })
            });
        }
    }
    group.finish();
}

/// A random BERT (hidden 128, 4 heads, 2 layers, FFN 512) with gate adapters of rank 4 on
/// query and value.
fn small_bert() -> Bundle {
    let config = ModelConfig {
        arch: Arch::Bert,
        vocab_size: 200,
        hidden: 128,
        layers: 2,
        heads: 4,
        intermediate: 512,
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
    let rank = 4;
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

fn bench_encoder(c: &mut Criterion) {
    let enc = Encoder::new(&small_bert()).expect("encoder");
    let (n, t) = (4, 32);
    let ids: Vec<i64> = (0..n * t).map(|i| (i * 7 % 199) as i64 + 1).collect();
    let seqs = enc.prepare(&ids, &vec![1; n * t], n, t).expect("inputs");
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    let mut group = c.benchmark_group("encoder (hidden 128, 2 layers, 4 × 32 tokens)");
    for (name, noise) in [
        ("mean", Noise::Mean),
        (
            "8 samples",
            Noise::Sampled {
                samples: 8,
                seed: 0,
            },
        ),
    ] {
        group.bench_function(name, |bench| {
            bench.iter(|| pool.install(|| black_box(enc.forward(&seqs, noise).expect("forward"))))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20);
    targets = bench_gemm, bench_encoder
}
criterion_main!(benches);
