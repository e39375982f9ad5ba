//! `cargo bench -p bayeslora-core`: the GEMM on every instruction set this CPU has (MiniLM
//! shapes), and one encoder pass on a small random BERT, in mean mode and with 8 samples.
//! Quick by default; `cargo bench -p bayeslora-core -- --measurement-time 10` for steadier
//! figures. Single-threaded (a one-thread rayon pool), like the 1-thread runtime benches.

use std::hint::black_box;
use std::time::Duration;

use bayeslora_core::bundle::Bundle;
use bayeslora_core::encoder::{Encoder, Noise};
use bayeslora_core::kernels::{gemm_on, Epilogue, Isa, Packed};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

#[path = "common/mod.rs"]
mod common;
use common::{pseudo, random_bert};

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
    random_bert(200, 128, 2, 4, 512, 4)
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
