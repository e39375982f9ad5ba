//! How a request is cut into pieces: the default piece size, chunks of samples, pieces side by
//! side on several threads, and that results never depend on any of it.

use super::tests::{bundle, bundle_of, config, padded, INPUTS};
use super::{Encoder, Noise};
use crate::bundle::ModelConfig;

#[test]
fn default_pieces_keep_the_widest_activation_near_piece_bytes() {
    use super::{default_max_rows, MAX_ROWS, PIECE_BYTES};
    // MiniLM's 1536-wide FFN: 1024 rows of 6 MiB
    assert_eq!(default_max_rows(1536), 1024);
    assert_eq!(default_max_rows(1536) * 1536 * 4, PIECE_BYTES);
    // narrow models stop at the memory bound, very wide ones at 256 rows
    assert_eq!(default_max_rows(8), MAX_ROWS);
    assert_eq!(default_max_rows(0), MAX_ROWS);
    assert_eq!(default_max_rows(1 << 20), 256);
    // an encoder starts with the default of its widest activation per token: MiniLM's shape
    // gets 1024 rows (not a third of that for the last layer's 12 · 384-wide per-input rows)
    let minilm = ModelConfig {
        hidden: 384,
        heads: 12,
        intermediate: 1536,
        ..config()
    };
    assert_eq!(default_max_rows(super::build::token_width(&minilm)), 1024);
    let wide_qkv = ModelConfig {
        hidden: 1024,
        intermediate: 1536,
        ..config()
    };
    assert_eq!(super::build::token_width(&wide_qkv), 3 * 1024);
    // an encoder whose per-input rows (heads · hidden = 1024 floats) are far wider than its
    // per-token ones (3 · hidden = 192): the default follows the latter
    let many_heads = ModelConfig {
        hidden: 64,
        heads: 16,
        intermediate: 64,
        layers: 1,
        ..config()
    };
    let enc = Encoder::new(&bundle_of(many_heads, &["query"])).expect("encoder");
    assert_eq!(enc.max_rows(), default_max_rows(3 * 64));
    assert_eq!(enc.max_rows(), MAX_ROWS);
    assert_eq!(enc.max_width, 16 * 64);
}

/// `f` on a fresh rayon pool of `threads` threads.
pub(super) fn on_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool")
        .install(f)
}

#[test]
fn results_do_not_depend_on_threads_or_on_pieces_run_side_by_side() {
    let b = bundle(&["query", "value", "intermediate.dense"]);
    let mut enc = Encoder::new(&b).expect("encoder");
    let (ids, mask, t) = padded(&INPUTS);
    let seqs = enc.prepare(&ids, &mask, INPUTS.len(), t).expect("inputs");
    for (noise, s) in [
        (Noise::Mean, 1),
        (
            Noise::Sampled {
                samples: 9,
                seed: 4,
            },
            9,
        ),
    ] {
        let logits = on_threads(1, || enc.forward(&seqs, noise)).expect("one thread");
        let summary = on_threads(1, || enc.score(&seqs, noise)).expect("one thread");
        for rows in [1, 4, 7, 30, enc.max_rows()] {
            enc.set_max_rows(rows);
            for threads in [2, 3, 5] {
                let pieces = enc.plan_pieces(&seqs, s, threads).expect("plan");
                assert!(
                    pieces.len() >= 2,
                    "{rows} rows, {threads} threads: one piece"
                );
                let got = on_threads(threads, || enc.forward(&seqs, noise)).expect("forward");
                assert_eq!(got, logits, "{noise:?}, max_rows {rows}, {threads} threads");
                let got = on_threads(threads, || enc.score(&seqs, noise)).expect("score");
                assert_eq!(
                    got, summary,
                    "{noise:?}, max_rows {rows}, {threads} threads"
                );
            }
        }
    }
}

#[test]
fn pieces_cover_every_input_and_sample_once_and_share_the_rows_between_threads() {
    let mut enc = Encoder::new(&bundle(&["query"])).expect("encoder");
    let (ids, mask, t) = padded(&INPUTS);
    let seqs = enc.prepare(&ids, &mask, INPUTS.len(), t).expect("inputs");
    let lens: Vec<usize> = seqs.iter().map(|q| q.ids.len()).collect();
    let total: usize = lens.iter().sum();
    let default_rows = enc.max_rows();
    for max_rows in [default_rows, 13, 7] {
        enc.set_max_rows(max_rows);
        for s in [1, 2, 9, 16, 64] {
            for threads in [1, 2, 3, 8] {
                let at = format!("max_rows {max_rows}, s {s}, threads {threads}");
                let pieces = enc.plan_pieces(&seqs, s, threads).expect("plan");
                let budget = if threads > 1 {
                    max_rows.min((total * s).div_ceil(2 * threads))
                } else {
                    max_rows
                };
                let mut seen = vec![0usize; seqs.len()];
                let mut next = (0, 0);
                for p in &pieces {
                    // in order of inputs, then of samples, with no gap and no overlap
                    assert_eq!((p.start, p.first_sample), next, "{at}");
                    assert!(p.copies >= 1 && p.end > p.start);
                    let rows: usize = lens[p.start..p.end].iter().sum::<usize>() * p.copies;
                    // a piece is at most the budget, unless it is one sample of one input
                    assert!(
                        rows <= budget || (p.copies == 1 && p.end == p.start + 1),
                        "{at}: {rows} rows"
                    );
                    for count in &mut seen[p.start..p.end] {
                        *count += p.copies;
                    }
                    next = if p.first_sample + p.copies == s {
                        (p.end, 0)
                    } else {
                        (p.start, p.first_sample + p.copies)
                    };
                }
                assert_eq!(next, (seqs.len(), 0));
                assert!(seen.iter().all(|&c| c == s), "{at}");
                // an input whose samples do not fit the budget: as few chunks as it allows,
                // the largest as small as that many chunks allow (16 of at most 5: 4 × 4)
                for (i, &len) in lens.iter().enumerate() {
                    if len * s <= budget {
                        continue;
                    }
                    let chunks: Vec<usize> = pieces
                        .iter()
                        .filter(|p| p.start == i)
                        .map(|p| {
                            assert_eq!(p.end, i + 1, "{at}");
                            p.copies
                        })
                        .collect();
                    let most = (budget / len).clamp(1, s);
                    assert_eq!(chunks.len(), s.div_ceil(most), "{at}, input {i}");
                    let largest = chunks.iter().copied().max().unwrap_or(0);
                    assert_eq!(largest, s.div_ceil(chunks.len()), "{at}, input {i}");
                }
                if threads == 1 && max_rows == default_rows {
                    // one thread: as few pieces as the budget allows
                    assert_eq!(pieces.len(), 1, "{at}");
                } else if threads > 1 && s >= threads {
                    assert!(pieces.len() >= threads, "{at}");
                }
            }
        }
    }
}
