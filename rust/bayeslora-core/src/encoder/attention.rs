//! Scaled dot-product attention over the fused `qkv` rows of each segment, and the last layer's
//! attention from token 0 only without keys or values of all tokens (see the module docs of
//! [`super`]).

use rayon::prelude::*;

use super::build::{Layer, PooledAttention};
use super::disentangled::{CopyPositions, LayerPositions, RelativeScratch};
use super::layout::{as_layout, split_segments, Layout, Segment};
use super::pool::Buffer;
use super::{Encoder, Pass};
use crate::kernels::{self, Epilogue, Packed};

/// Per-thread scratch of the attention tasks, reused across segments and heads.
pub(super) struct AttentionScratch {
    /// The keys of a head (or the rows of a segment), packed transposed.
    keys: Packed,
    /// The values of a head (or the rows of a segment), packed.
    values: Packed,
    /// Attention scores, `queries × tokens`.
    scores: Vec<f32>,
    /// DeBERTa's relative scores.
    relative: RelativeScratch,
}

impl AttentionScratch {
    fn new() -> Self {
        Self {
            keys: Packed::empty(),
            values: Packed::empty(),
            scores: Vec::new(),
            relative: RelativeScratch::new(),
        }
    }
}

impl Encoder {
    /// Scaled dot-product attention per (segment, head); queries of token 0 only if
    /// `first_only`. `qkv` holds rows of `3 · hidden` laid out as `layout`; `positions`: the
    /// layer's relative-position projections (DeBERTa).
    pub(super) fn attention(
        &self,
        positions: &LayerPositions,
        qkv: &[f32],
        layout: &Layout,
        first_only: bool,
        pass: &Pass<'_>,
    ) -> Buffer {
        let (h, heads) = (self.hidden, self.heads);
        let dh = h / heads;
        let segs = layout.segments();
        let out_layout = Layout {
            rows_per_copy: if first_only {
                vec![1; layout.inputs()]
            } else {
                layout.rows_per_copy.clone()
            },
            copies: layout.copies,
        };
        let mut context = pass.buffer(out_layout.rows() * h);
        let parts = split_segments(&mut context, &out_layout.segments(), h);
        let rel_rows = self.all_copy_positions(positions, &segs, pass);
        let rel = |g: usize| {
            rel_rows
                .get(g)
                .and_then(|r| pass.positions.get(segs[g].input).map(|ip| (ip, r)))
        };
        if segs.len() >= 2 * pass.threads {
            // enough segments to keep the threads busy: one segment per task, all heads, each
            // head's output written in place into the segment's rows
            parts
                .into_par_iter()
                .zip(segs.par_iter())
                .enumerate()
                .for_each_init(AttentionScratch::new, |sc, (g, (rows, seg))| {
                    prefetch_head(qkv, seg, h, dh, 0);
                    for hd in 0..heads {
                        if hd + 1 < heads {
                            prefetch_head(qkv, seg, h, dh, hd + 1);
                        }
                        let out = &mut rows[hd * dh..];
                        self.head_attention(qkv, seg, first_only, hd, rel(g), sc, out, h);
                    }
                });
            return context;
        }
        // few segments (mean mode, small batches): one (segment, head) per task, then each
        // segment's rows gather their heads' blocks
        let tasks: Vec<(usize, usize)> = (0..segs.len())
            .flat_map(|g| (0..heads).map(move |hd| (g, hd)))
            .collect();
        let blocks: Vec<Vec<f32>> = tasks
            .par_iter()
            .map_init(AttentionScratch::new, |sc, &(g, hd)| {
                let seg = &segs[g];
                let nq = if first_only { 1 } else { seg.rows };
                let mut out = vec![0.0f32; nq * dh];
                self.head_attention(qkv, seg, first_only, hd, rel(g), sc, &mut out, dh);
                out
            })
            .collect();
        parts.into_par_iter().enumerate().for_each(|(g, rows)| {
            for hd in 0..heads {
                let block = &blocks[g * heads + hd];
                for (i, row) in rows.chunks_exact_mut(h).enumerate() {
                    row[hd * dh..(hd + 1) * dh].copy_from_slice(&block[i * dh..(i + 1) * dh]);
                }
            }
        });
        context
    }

    /// One head of one segment (its rows of the fused `qkv`): `softmax(q kᵀ / √dh) v` for every
    /// query row (token 0 only if `first_only`) into `out` (row stride `ldo`); with DeBERTa's
    /// relative scores added when `rel` (the input's rows and the copy's position rows) is given,
    /// and its scale.
    #[allow(clippy::too_many_arguments)]
    fn head_attention(
        &self,
        qkv: &[f32],
        seg: &Segment,
        first_only: bool,
        hd: usize,
        rel: Option<(&super::disentangled::InputPositions, &CopyPositions<'_>)>,
        sc: &mut AttentionScratch,
        out: &mut [f32],
        ldo: usize,
    ) {
        let h = self.hidden;
        let dh = h / self.heads;
        let n = seg.rows;
        let nq = if first_only { 1 } else { n };
        let base = &qkv[seg.start * 3 * h..(seg.start + n) * 3 * h];
        sc.keys.refill_nk(&base[h + hd * dh..], n, dh, 3 * h);
        sc.scores.resize(nq * n, 0.0);
        kernels::gemm(
            nq,
            &base[hd * dh..],
            3 * h,
            &sc.keys,
            &mut sc.scores,
            n,
            Epilogue::Store,
        );
        if let Some((input, rows)) = rel {
            let scores = &mut sc.scores;
            self.add_relative_scores(base, nq, n, hd, input, rows, &mut sc.relative, scores);
        }
        kernels::softmax_rows(&mut sc.scores, n, self.score_scale);
        sc.values.refill_kn(&base[2 * h + hd * dh..], n, dh, 3 * h);
        kernels::gemm(nq, &sc.scores, n, &sc.values, out, ldo, Epilogue::Store);
    }

    /// Token 0's attention output in the last layer from the layer input `x` without keys or
    /// values of all tokens (see the module docs); rows `[copies, hidden]`, one per copy.
    pub(super) fn pooled_attention(
        &self,
        layer: &Layer,
        pooled: &PooledAttention,
        x: &[f32],
        layout: &Layout,
        pass: &Pass<'_>,
    ) -> (Buffer, Layout) {
        let (h, heads) = (self.hidden, self.heads);
        let dh = h / heads;
        let d_in = layer.qkv.d_in;
        let scale = self.score_scale;
        let inputs = layout.inputs();
        // token 0's query (the fused product of one row per copy; it expands to S copies when
        // any of Q, K, V is noisy, so the copies below are those of the pooled value too)
        let token0 = Layout::uniform(inputs, 1, layout.copies);
        let x_token0 = as_layout(x, layout, &token0, h, pass);
        let (q, query_layout) = self.linear(&layer.qkv, &x_token0, &token0, pass);
        pass.recycle_rows(x_token0);
        let copies = query_layout.rows();
        let q0 = layer.qkv.parts[0].first_col;
        // key_queries[hd][g] = W_kᵀ q: copy g's query of head hd through the head's key rows
        let mut key_queries = pass.buffer(heads * copies * d_in);
        key_queries
            .par_chunks_mut(copies * d_in)
            .enumerate()
            .for_each(|(hd, uh)| {
                kernels::gemm(
                    copies,
                    &q[q0 + hd * dh..],
                    layer.qkv.d_out,
                    &pooled.key_rows[hd],
                    uh,
                    d_in,
                    Epilogue::Store,
                );
            });
        pass.recycle(q);
        // per copy: scores of every head over the copy's tokens, softmax, pooled rows Σ_j p_j x_j
        let x_segs = layout.segments();
        let mut pooled_rows = pass.buffer(copies * heads * d_in);
        pooled_rows
            .par_chunks_mut(heads * d_in)
            .zip(query_layout.segments().par_iter())
            .for_each_init(AttentionScratch::new, |sc, (out, seg)| {
                let g = seg.start;
                let src = x_segs[layout.source_of(seg.input, seg.copy)];
                let n = src.rows;
                let rows = &x[src.start * d_in..(src.start + n) * d_in];
                sc.scores.resize(heads * n, 0.0);
                sc.keys.refill_nk(rows, n, d_in, d_in);
                kernels::gemm(
                    heads,
                    &key_queries[g * d_in..],
                    copies * d_in,
                    &sc.keys,
                    &mut sc.scores,
                    n,
                    Epilogue::Store,
                );
                kernels::softmax_rows(&mut sc.scores, n, scale);
                sc.values.refill_kn(rows, n, d_in, d_in);
                kernels::gemm(heads, &sc.scores, n, &sc.values, out, d_in, Epilogue::Store);
            });
        pass.recycle(key_queries);
        // the value projection of the pooled rows; head hd keeps its own columns of row hd
        let pooled_layout = Layout::uniform(inputs, heads, query_layout.copies);
        let (v, value_layout) = self.linear(&pooled.value, &pooled_rows, &pooled_layout, pass);
        pass.recycle(pooled_rows);
        let context_layout = Layout::uniform(inputs, 1, value_layout.copies);
        let mut context = pass.buffer(context_layout.rows() * h);
        for (g, row) in context.chunks_exact_mut(h).enumerate() {
            for hd in 0..heads {
                let src = (g * heads + hd) * h + hd * dh;
                row[hd * dh..(hd + 1) * dh].copy_from_slice(&v[src..src + dh]);
            }
        }
        pass.recycle(v);
        (context, context_layout)
    }
}

/// Ask for head `hd`'s query, key and value columns of the segment's rows of the fused `qkv`
/// (rows of `3h`) to be brought into cache. Rows of `3h` floats are often more than a page
/// apart, where hardware prefetchers stop; the head's columns are read next.
fn prefetch_head(qkv: &[f32], seg: &Segment, h: usize, dh: usize, hd: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        for row in seg.start..seg.start + seg.rows {
            for part in 0..3 {
                let col = row * 3 * h + part * h + hd * dh;
                // every 16 floats (a cache line) and the last one, whatever the alignment
                for c in (col..col + dh).step_by(16).chain([col + dh - 1]) {
                    if let Some(v) = qkv.get(c) {
                        // SAFETY: a prefetch hint of an address inside `qkv`; it reads nothing.
                        unsafe { _mm_prefetch::<_MM_HINT_T0>((v as *const f32).cast::<i8>()) };
                    }
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (qkv, seg, h, dh, hd);
    }
}
