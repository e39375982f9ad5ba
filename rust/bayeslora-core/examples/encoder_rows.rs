//! `cargo run --release -p bayeslora-core --example encoder_rows`: one MiniLM-shaped forward
//! pass (batch 8 × 64 tokens, 16 samples; mean mode) on one thread for several
//! `Encoder::max_rows`, the thread's CPU time (best of several passes, alternating), so that
//! the effect of the piece size on cache use shows on a loaded machine.

use std::hint::black_box;

use bayeslora_core::encoder::{Encoder, Noise};

#[path = "../benches/common/mod.rs"]
mod common;
use common::{arg, minilm_inputs, random_minilm, thread_cpu};

fn main() {
    let reps = arg(1, 3);
    let rows: Vec<usize> = std::env::args()
        .skip(2)
        .filter_map(|s| s.parse().ok())
        .collect();
    let rows = if rows.is_empty() {
        vec![8192, 2048, 1024]
    } else {
        rows
    };
    let mut enc = Encoder::new(&random_minilm()).expect("encoder");
    let (n, t) = (8, 64);
    let seqs = minilm_inputs(&enc, n, t);
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
