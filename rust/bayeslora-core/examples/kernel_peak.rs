//! `cargo run --release -p bayeslora-core --example kernel_peak [rounds]`: the GEMM of every
//! instruction set this CPU has on the MiniLM shapes as a share of the measured FMA peak of the
//! set the process runs on (`BAYESLORA_ISA`), and the elementwise ops of that set in ns per
//! element. One thread.
//!
//! Meant for a shared, loaded machine: every figure is the best of many short slices (load only
//! ever slows a slice down), the peak and the kernels are measured in alternation within one
//! run, and kernel times are the thread's CPU time, so a ratio is fair even when the wall clock
//! is not.

use std::hint::black_box;

use bayeslora_core::kernels::{self, fma_peak_gflops, gemm_on, Epilogue, Isa, Packed};

#[path = "../benches/common/mod.rs"]
mod common;
use common::{arg, pseudo, thread_cpu};

/// Best CPU seconds of one call of `f` over slices of about 20 ms.
fn best_of(mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::INFINITY;
    let start = thread_cpu();
    while thread_cpu() - start < 0.02 {
        let t0 = thread_cpu();
        f();
        best = best.min(thread_cpu() - t0);
    }
    best
}

fn main() {
    let rounds = arg(1, 20);
    let run_isa = Isa::get();
    println!("process ISA: {} (rounds {rounds})", run_isa.name());
    // the MiniLM products: fused QKV, attention output, FFN in/out (64 and 512 rows), and the
    // per-head attention products (64 × 32 · 32 × 64 and 64 × 64 · 64 × 32)
    let shapes = [
        (64, 384, 1152),
        (64, 384, 384),
        (64, 384, 1536),
        (64, 1536, 384),
        (512, 384, 1536),
        (512, 1536, 384),
        (64, 32, 64),
        (64, 64, 32),
    ];
    let mut peak = 0.0f64;
    let mut best: Vec<Vec<f64>> = vec![vec![f64::INFINITY; shapes.len()]; Isa::available().len()];
    let mut ew_best = [f64::INFINITY; 4];
    let gelu_x = pseudo(64 * 1536, 7);
    let ln_x = pseudo(64 * 384, 8);
    let ln_r = pseudo(64 * 384, 9);
    let gamma = pseudo(384, 10);
    let beta = pseudo(384, 11);
    let sm_x: Vec<f32> = pseudo(64 * 64 * 12, 12).iter().map(|v| v * 50.0).collect();
    let mut buf = vec![0.0f32; 64 * 1536];
    for _ in 0..rounds {
        peak = peak.max(fma_peak_gflops(0.05, 1).unwrap_or(0.0));
        for (si, &(m, k, n)) in shapes.iter().enumerate() {
            let a = pseudo(m * k, 1);
            let b = Packed::from_weight(&pseudo(n * k, 2), n, k);
            let bias = pseudo(n, 3);
            let mut out = vec![0.0f32; m * n];
            for (ii, isa) in Isa::available().into_iter().enumerate() {
                let t = best_of(|| {
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
                });
                best[ii][si] = best[ii][si].min(t);
            }
        }
        let t = best_of(|| {
            buf[..gelu_x.len()].copy_from_slice(&gelu_x);
            kernels::gelu(&mut buf[..gelu_x.len()]);
            black_box(&buf);
        });
        ew_best[0] = ew_best[0].min(t / gelu_x.len() as f64);
        let t = best_of(|| {
            buf[..ln_x.len()].copy_from_slice(&ln_x);
            kernels::add_layer_norm(&mut buf[..ln_x.len()], &ln_r, &gamma, &beta, 1e-12);
            black_box(&buf);
        });
        ew_best[1] = ew_best[1].min(t / ln_x.len() as f64);
        let t = best_of(|| {
            buf[..sm_x.len()].copy_from_slice(&sm_x);
            kernels::softmax_rows(&mut buf[..sm_x.len()], 64, 0.17);
            black_box(&buf);
        });
        ew_best[2] = ew_best[2].min(t / sm_x.len() as f64);
        let t = best_of(|| {
            buf[..ln_x.len()].copy_from_slice(&ln_x);
            kernels::layer_norm(&mut buf[..ln_x.len()], &gamma, &beta, 1e-12);
            black_box(&buf);
        });
        ew_best[3] = ew_best[3].min(t / ln_x.len() as f64);
    }
    println!(
        "FMA peak of {}: {peak:.1} GFLOP/s (best slice)",
        run_isa.name()
    );
    for (ii, isa) in Isa::available().into_iter().enumerate() {
        for (si, &(m, k, n)) in shapes.iter().enumerate() {
            let gflops = 2.0 * (m * k * n) as f64 / best[ii][si] / 1e9;
            println!(
                "gemm {:8} {m:4}x{k:4}x{n:4}: {gflops:7.1} GFLOP/s = {:5.1} % of the {} peak",
                isa.name(),
                100.0 * gflops / peak,
                run_isa.name()
            );
        }
    }
    for (name, v) in ["gelu", "add+layernorm", "softmax(64)", "layernorm"]
        .iter()
        .zip(ew_best)
    {
        println!(
            "{name:14} on {}: {:.3} ns/element (copy-in included)",
            run_isa.name(),
            v * 1e9
        );
    }
}
