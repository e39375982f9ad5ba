//! `cargo run --release -p bayeslora-core --example posterior_cost [reps] [batch] [samples]`:
//! the MiniLM-shaped forward pass of `benches/bench_runtime.py` (batch × 64 tokens, `samples`
//! posterior samples) on one thread with the bundle's posterior `gate` (what the bench times) and
//! `additive` (the default recipe's), alternating: best wall time of each and the median of the
//! per-pair ratios. An additive sample draws rank · (d_in + d_out) normals per adapted module;
//! a gate sample draws one per rank.

use std::hint::black_box;
use std::time::Instant;

use bayeslora_core::encoder::{Encoder, Noise};

#[path = "../benches/common/mod.rs"]
mod common;
use common::{arg, minilm_inputs, random_minilm};

fn main() {
    let (reps, n, s) = (arg(1, 6).max(1), arg(2, 1).max(1), arg(3, 16).max(1));
    let t = 64;
    let gate = Encoder::new(&random_minilm()).expect("encoder");
    let mut bundle = random_minilm();
    bundle.meta.posterior = "additive".into();
    let additive = Encoder::new(&bundle).expect("encoder");
    let seqs = minilm_inputs(&gate, n, t);
    let noise = Noise::Sampled {
        samples: s,
        seed: 0,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    let time = |enc: &Encoder| {
        pool.install(|| {
            let t0 = Instant::now();
            black_box(enc.forward(&seqs, noise).expect("forward"));
            t0.elapsed().as_secs_f64()
        })
    };
    let (mut best_gate, mut best_additive) = (f64::INFINITY, f64::INFINITY);
    let mut ratios = Vec::with_capacity(reps);
    for _ in 0..reps {
        let (g, a) = (time(&gate), time(&additive));
        best_gate = best_gate.min(g);
        best_additive = best_additive.min(a);
        ratios.push(a / g);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "batch {n} S {s}, one thread: gate {:.1} ms, additive {:.1} ms (best of {reps}); \
         additive / gate {:.3} (median of pairs)",
        best_gate * 1e3,
        best_additive * 1e3,
        ratios[reps / 2]
    );
}
