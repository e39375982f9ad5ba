//! `cargo run --release -p bayeslora-core --example thread_scaling [reps] [batch] [samples]
//! [threads]`:
//! wall-clock time of one MiniLM-shaped forward pass (batch × 64 tokens, `samples` posterior
//! samples, 0 = mean mode) on pools of one and of two threads, alternating, best of `reps`; the
//! speedup, and the FMA peak measured on one and two cores, with the share of it each pool
//! reached (the FLOPs the runtime executes, as `benches/bench_runtime.py` counts them). With
//! `threads` (1 or 2), only that pool runs (for a profiler).

use std::hint::black_box;
use std::time::Instant;

use bayeslora_core::encoder::{Encoder, Noise};
use bayeslora_core::kernels;

#[path = "../benches/common/mod.rs"]
mod common;
use common::{arg, minilm_inputs, random_minilm};

/// FLOPs the runtime executes for `batch` inputs of `t` tokens with `samples` posterior samples
/// (0 = mean mode) on MiniLM's shape: `runtime_flops` of `benches/bench_runtime.py`.
fn runtime_flops(batch: usize, samples: usize, t: usize) -> f64 {
    let (layers, h, i, heads) = (6.0, 384.0, 1536.0, 12.0);
    let (s, t) = (samples.max(1) as f64, t as f64);
    let full_layer = t * 2.0 * (4.0 * h * h + 2.0 * h * i + 2.0 * t * h);
    let qkv = t * 2.0 * 3.0 * h * h;
    let last_layer = 2.0 * 3.0 * h * h
        + 2.0 * h * h
        + 2.0 * 2.0 * heads * t * h
        + 2.0 * heads * h * h
        + 2.0 * (h * h + 2.0 * h * i);
    batch as f64 * (s * ((layers - 1.0) * full_layer + last_layer) - (s - 1.0) * qkv)
}

fn main() {
    let (reps, n, s) = (arg(1, 5), arg(2, 8), arg(3, 16));
    let t = 64;
    let enc = Encoder::new(&random_minilm()).expect("encoder");
    let seqs = minilm_inputs(&enc, n, t);
    let noise = if s == 0 {
        Noise::Mean
    } else {
        Noise::Sampled {
            samples: s,
            seed: 0,
        }
    };
    let only = arg(4, 0);
    let counts: Vec<usize> = if only == 0 { vec![1, 2] } else { vec![only] };
    let pools: Vec<rayon::ThreadPool> = counts
        .iter()
        .map(|&k| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(k)
                .build()
                .expect("pool")
        })
        .collect();
    let mut best = vec![f64::INFINITY; counts.len()];
    for _ in 0..reps {
        for (i, pool) in pools.iter().enumerate() {
            let secs = pool.install(|| {
                let t0 = Instant::now();
                black_box(enc.forward(&seqs, noise).expect("forward"));
                t0.elapsed().as_secs_f64()
            });
            best[i] = best[i].min(secs);
        }
    }
    if only != 0 {
        println!("batch {n} S {s}: {only} threads {:.1} ms", best[0] * 1e3);
        return;
    }
    let peaks: Vec<f64> = [1, 2]
        .iter()
        .map(|&k| kernels::fma_peak_gflops(0.3, k).unwrap_or(f64::NAN))
        .collect();
    let gflops: Vec<f64> = best
        .iter()
        .map(|secs| runtime_flops(n, s, t) / secs / 1e9)
        .collect();
    println!(
        "batch {n} S {s}: 1 thread {:.1} ms, 2 threads {:.1} ms, speedup {:.2}x; peak {:.1} / {:.1} GFLOP/s, reached {:.0} % / {:.0} %",
        best[0] * 1e3,
        best[1] * 1e3,
        best[0] / best[1],
        peaks[0],
        peaks[1],
        100.0 * gflops[0] / peaks[0],
        100.0 * gflops[1] / peaks[1]
    );
}
