//! `cargo run --release -p bayeslora-core --example gemm_cold [m] [rounds]`: the GEMM on MiniLM's
//! layer products (fused Q/K/V 384 → 1152, attention output 384 → 384, FFN 384 → 1536 and
//! 1536 → 384) with `m` rows (default 96: one row block, as the one-thread feed-forward runs),
//! as a share of the FMA peak of the process's instruction set (`BAYESLORA_ISA`), with the
//! weights **hot** (one weight matrix, called again and again) and **cold** (six, one per layer of
//! the model, cycled as a forward pass meets them: each call finds its weights in L3, not L2).
//! One thread; kernel times are the thread's CPU time, best of `rounds` rounds of six calls.

use std::hint::black_box;

use bayeslora_core::kernels::{fma_peak_gflops, gemm, Epilogue, Isa, Packed};

#[path = "../benches/common/mod.rs"]
mod common;
use common::{arg, pseudo, thread_cpu};

/// Layers of MiniLM, so six distinct weights per product.
const COPIES: usize = 6;

fn main() {
    let (m, rounds) = (arg(1, 96).max(1), arg(2, 8).max(1));
    let shapes = [(384usize, 1152usize), (384, 384), (384, 1536), (1536, 384)];
    let weights: Vec<Vec<Packed>> = shapes
        .iter()
        .map(|&(k, n)| {
            (0..COPIES)
                .map(|c| Packed::from_weight(&pseudo(n * k, 2 + c as u64), n, k))
                .collect()
        })
        .collect();
    let a = pseudo(m * 1536, 1);
    let bias = pseudo(1536, 3);
    let mut out = vec![0.0f32; m * 1536];
    let mut peak = 0.0f64;
    // [shape][hot, cold]: best seconds per call
    let mut best = vec![[f64::INFINITY; 2]; shapes.len()];
    for _ in 0..rounds {
        peak = peak.max(fma_peak_gflops(0.05, 1).unwrap_or(0.0));
        for (si, &(k, n)) in shapes.iter().enumerate() {
            for (cold, slot) in best[si].iter_mut().enumerate() {
                let t0 = thread_cpu();
                for c in 0..COPIES {
                    let w = &weights[si][if cold == 1 { c } else { 0 }];
                    gemm(m, black_box(&a), k, w, &mut out, n, Epilogue::Bias(&bias));
                    black_box(&out);
                }
                *slot = slot.min((thread_cpu() - t0) / COPIES as f64);
            }
        }
    }
    println!(
        "{}: FMA peak {peak:.1} GFLOP/s (best slice), m = {m}, best of {rounds} rounds",
        Isa::get().name()
    );
    for (si, &(k, n)) in shapes.iter().enumerate() {
        let flops = 2.0 * (m * k * n) as f64;
        let share = |secs: f64| 100.0 * flops / secs / 1e9 / peak;
        println!(
            "{m:5} x {k:4} x {n:4}: hot {:5.1} %, cold {:5.1} % of the peak",
            share(best[si][0]),
            share(best[si][1])
        );
    }
}
