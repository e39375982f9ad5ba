//! DeBERTa-v2's disentangled attention (transformers' `DisentangledSelfAttention`): the score of
//! query i and key j adds to `q_i · k_j` a content→position term `q_i · P_k[c(i, j)]` (c2p) and a
//! position→content term `k_j · P_q[p(i, j)]` (p2c), all divided by `√(d_head · (1 + #terms))`.
//!
//! - `P_k`, `P_q` `[2·span, H]` are the relative embeddings (after the optional LayerNorm)
//!   through the layer's key and query projections (`share_att_key`) or its own
//!   `pos_key_proj`/`pos_query_proj`; with adapters merged they are computed once at load.
//! - The rows: `c(i, j) = clamp(bucket(p_i − p_j) + span)`, `p(i, j) = clamp(−bucket(p_j − p_i) +
//!   span)`, with `p` the token's index in the padded input (kept by [`Sequence`]), `bucket` the
//!   log-bucketed distance when `position_buckets` > 0, and clamp to `0..2·span`.
//! - An input only reads the window of rows its distances reach ([`InputPositions`]), computed
//!   once per call and shared by every layer and sample.
//! - A sample whose projection adapter is noisy reads its own window: the merged rows plus its
//!   adapter term, the same [`Encoder::adapter_term`] (the same noise) as its content rows get.

use std::borrow::Cow;

use rayon::prelude::*;

use super::build::LinearPart;
use super::layout::{copy_to_layout, Layout, Segment};
use super::pool::Buffer;
use super::{Encoder, Pass, Sequence};
use crate::bundle::deberta::log_bucket;
use crate::kernels::{self, Epilogue, Packed};

/// The relative-position settings and table of the encoder.
#[derive(Debug)]
pub(super) struct Relative {
    /// `att_span`: the table has `2·span` rows.
    pub span: usize,
    /// `position_buckets` (0: distances are not bucketed).
    pub buckets: usize,
    /// `max_relative_positions` (the log buckets' scale).
    pub max_relative: usize,
    /// Content→position scores.
    pub c2p: bool,
    /// Position→content scores.
    pub p2c: bool,
    /// `rel_embeddings` `[2·span, H]`, after the LayerNorm when `norm_rel_ebd` asks for it.
    pub embeddings: Vec<f32>,
}

/// One layer's projection of the relative embeddings (queries for p2c, keys for c2p).
#[derive(Debug)]
pub(super) struct PositionProjection {
    /// `[2·span, H]`: every relative embedding through the projection, adapter merged.
    pub mean: Vec<f32>,
    /// The module and its adapter (a noisy sample adds its term to the rows it reads).
    pub part: LinearPart,
}

/// The position projections of one layer (none without relative attention).
#[derive(Debug, Default)]
pub(super) struct LayerPositions {
    /// `P_q` (p2c).
    pub query: Option<PositionProjection>,
    /// `P_k` (c2p).
    pub key: Option<PositionProjection>,
}

/// Which rows of the position tables one input's scores read.
pub(super) struct InputPositions {
    /// First row of the window.
    lo: usize,
    /// Rows of the window.
    width: usize,
    /// `[n, n]`: the c2p row (minus `lo`) of query i and key j.
    c2p: Vec<u32>,
    /// `[n, n]`: the p2c row (minus `lo`) of query i and key j.
    p2c: Vec<u32>,
}

/// The window rows `[width, H]` of `P_q` and `P_k` one copy reads (empty when unused).
pub(super) struct CopyPositions<'a> {
    query: Cow<'a, [f32]>,
    key: Cow<'a, [f32]>,
}

/// Per-thread scratch of the relative scores.
pub(super) struct RelativeScratch {
    /// One head's window rows, packed transposed.
    rows: Packed,
    /// Products with the window rows.
    products: Vec<f32>,
}

impl RelativeScratch {
    pub(super) fn new() -> Self {
        Self {
            rows: Packed::empty(),
            products: Vec::new(),
        }
    }
}

impl Relative {
    fn bucket(&self, delta: i64) -> i64 {
        if self.buckets > 0 {
            log_bucket(delta, self.buckets, self.max_relative)
        } else {
            delta
        }
    }

    fn row(&self, bucket: i64) -> usize {
        let span = self.span as i64;
        bucket.saturating_add(span).clamp(0, 2 * span - 1) as usize
    }

    /// The rows of the position tables `seq` reads.
    pub(super) fn input_positions(&self, seq: &Sequence) -> InputPositions {
        let pos = &seq.positions;
        let n = pos.len();
        let first = pos.iter().copied().min().unwrap_or(0) as i64;
        let reach = pos.iter().copied().max().unwrap_or(0) as i64 - first;
        // buckets of every distance -reach..=reach
        let table: Vec<i64> = (-reach..=reach).map(|d| self.bucket(d)).collect();
        let at = |d: i64| table[(d + reach) as usize];
        let mut c2p = Vec::with_capacity(n * n);
        let mut p2c = Vec::with_capacity(n * n);
        for &pi in pos {
            for &pj in pos {
                let d = pi as i64 - pj as i64;
                c2p.push(self.row(at(d)) as u32);
                p2c.push(self.row(-at(-d)) as u32);
            }
        }
        let lo = c2p.iter().chain(&p2c).copied().min().unwrap_or(0);
        let hi = c2p.iter().chain(&p2c).copied().max().unwrap_or(0);
        for v in c2p.iter_mut().chain(p2c.iter_mut()) {
            *v -= lo;
        }
        InputPositions {
            lo: lo as usize,
            width: (hi - lo) as usize + 1,
            c2p,
            p2c,
        }
    }
}

impl Encoder {
    /// Whether a projection adds noise in this pass.
    fn projection_noisy(&self, proj: &PositionProjection, pass: &Pass<'_>) -> bool {
        proj.part
            .adapter
            .as_ref()
            .is_some_and(|ad| self.noisy(ad, &proj.part.module, pass))
    }

    /// `qkv` laid out with one copy per sample when a position projection of the layer is noisy
    /// (its samples then differ even where the content projections do not).
    pub(super) fn expand_for_positions(
        &self,
        positions: &LayerPositions,
        qkv: Buffer,
        layout: Layout,
        width: usize,
        pass: &Pass<'_>,
    ) -> (Buffer, Layout) {
        let noisy = [&positions.query, &positions.key]
            .into_iter()
            .flatten()
            .any(|p| self.projection_noisy(p, pass));
        if !noisy || layout.copies == pass.samples {
            return (qkv, layout);
        }
        let to = Layout {
            rows_per_copy: layout.rows_per_copy.clone(),
            copies: pass.samples,
        };
        let expanded = copy_to_layout(&qkv, &layout, &to, width, pass);
        pass.recycle(qkv);
        (expanded, to)
    }

    /// The window rows of `P_q` and `P_k` that copy `seg` reads.
    pub(super) fn copy_positions<'a>(
        &'a self,
        positions: &'a LayerPositions,
        seg: &Segment,
        pass: &Pass<'_>,
    ) -> CopyPositions<'a> {
        let h = self.hidden;
        let (Some(rel), Some(ip)) = (&self.relative, pass.positions.get(seg.input)) else {
            return CopyPositions {
                query: Cow::Borrowed(&[]),
                key: Cow::Borrowed(&[]),
            };
        };
        let rows = |proj: &'a Option<PositionProjection>| -> Cow<'a, [f32]> {
            let Some(proj) = proj else {
                return Cow::Borrowed(&[]);
            };
            let window = &proj.mean[ip.lo * h..(ip.lo + ip.width) * h];
            match &proj.part.adapter {
                Some(ad) if self.noisy(ad, &proj.part.module, pass) => {
                    let mut own = window.to_vec();
                    let at = Segment {
                        input: seg.input,
                        copy: seg.copy,
                        start: 0,
                        rows: ip.width,
                    };
                    let x = &rel.embeddings[ip.lo * h..(ip.lo + ip.width) * h];
                    self.adapter_term(ad, &proj.part.module, x, &at, &mut own, h, pass);
                    Cow::Owned(own)
                }
                _ => Cow::Borrowed(window),
            }
        };
        CopyPositions {
            query: rows(&positions.query),
            key: rows(&positions.key),
        }
    }

    /// The [`CopyPositions`] of every segment (in parallel when some are computed).
    pub(super) fn all_copy_positions<'a>(
        &'a self,
        positions: &'a LayerPositions,
        segs: &[Segment],
        pass: &Pass<'_>,
    ) -> Vec<CopyPositions<'a>> {
        if self.relative.is_none() {
            return Vec::new();
        }
        segs.par_iter()
            .map(|seg| self.copy_positions(positions, seg, pass))
            .collect()
    }

    /// Add head `hd`'s relative scores of one copy to `scores` `[nq, n]` (unscaled): c2p
    /// `q_i · P_k[c(i, j)]` and p2c `k_j · P_q[p(i, j)]`. `base` holds the copy's rows of the
    /// fused `qkv` (row stride `3H`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn add_relative_scores(
        &self,
        base: &[f32],
        nq: usize,
        n: usize,
        hd: usize,
        input: &InputPositions,
        rows: &CopyPositions<'_>,
        sc: &mut RelativeScratch,
        scores: &mut [f32],
    ) {
        let Some(rel) = &self.relative else { return };
        let h = self.hidden;
        let dh = h / self.heads;
        let w = input.width;
        if rel.c2p {
            sc.rows.refill_nk(&rows.key[hd * dh..], w, dh, h);
            sc.products.resize(nq * w, 0.0);
            let q = &base[hd * dh..];
            kernels::gemm(nq, q, 3 * h, &sc.rows, &mut sc.products, w, Epilogue::Store);
            for (i, srow) in scores.chunks_exact_mut(n).enumerate().take(nq) {
                let idx = &input.c2p[i * n..(i + 1) * n];
                let prow = &sc.products[i * w..(i + 1) * w];
                for (s, &k) in srow.iter_mut().zip(idx) {
                    *s += prow[k as usize];
                }
            }
        }
        if rel.p2c {
            sc.rows.refill_nk(&rows.query[hd * dh..], w, dh, h);
            sc.products.resize(n * w, 0.0);
            let k = &base[h + hd * dh..];
            kernels::gemm(n, k, 3 * h, &sc.rows, &mut sc.products, w, Epilogue::Store);
            for (i, srow) in scores.chunks_exact_mut(n).enumerate().take(nq) {
                let idx = &input.p2c[i * n..(i + 1) * n];
                for (j, (s, &r)) in srow.iter_mut().zip(idx).enumerate() {
                    *s += sc.products[j * w + r as usize];
                }
            }
        }
    }
}
