//! The BERT-family encoder for sequence classification (BERT/MiniLM, DistilBERT, RoBERTa) with
//! BayesLoRA adapters, in f32, in mean mode and in Monte-Carlo mode.
//!
//! How the work is laid out:
//! - Each input keeps only its attended tokens (mask = 1), with the position ids it had in the
//!   padded row; a sequence's numbers therefore never see padding or batch-mates.
//! - Activations of all inputs are stacked as rows of one matrix, so every linear layer is one
//!   product. An input has either one copy of its rows ("shared") or S copies ("expanded", one
//!   per posterior sample). Everything runs shared until the first linear layer whose adapter is
//!   noisy; that layer's base product is computed once and its output expanded to S rows, each
//!   plus its own sampled adapter term. So the part before the first adapted layer is computed
//!   once and shared by all samples, and after it the S samples are rows of the same products.
//! - Adapters are merged into the weights at load (`W' = W + s·B·A`): mean mode is the plain
//!   encoder; a sample adds `s·B((z − 1) ⊙ A x)` (gate, dropout, explicit gates) or
//!   `s·(B̃(Ã x) − B(A x))` (additive, sampled factors Ã, B̃).
//! - The classifier reads token 0 only, so the last layer computes the query, attention output and
//!   FFN for token 0 only, and no keys or values either, by linearity: with `q` token 0's query
//!   of a head and `W_k`, `W_v` that head's rows, the scores are `(W_kᵀ q) · x_j` (the key bias
//!   adds the same `q · b_k` to every score: softmax drops it) and the output is
//!   `W_v (Σ_j p_j x_j) + b_v` (plus the value adapter's term of the same pooled row: a sample's
//!   noise, gate coefficients or sampled factors, is the same for every token, so the term is
//!   linear in x). When the key adapter is noisy, keys are computed for all tokens as in the
//!   other layers.
//! - Activation buffers come from a pool kept between calls (`Buf`: initialised once to their
//!   capacity, never zeroed again); with enough inputs × samples, attention runs one task per
//!   sequence copy and writes every head in place.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

use rayon::prelude::*;

use crate::bundle::{Activation, Arch, Bundle, NoiseKind};
use crate::error::{Error, Result};
use crate::kernels::{self, Epilogue, Packed};
use crate::mc::{self, Stream};

/// Stacked rows kept below this per chunk of inputs (bounds the memory of MC mode).
const MAX_ROWS: usize = 8192;
/// Elementwise work below this many floats runs on the calling thread.
const PAR_MIN: usize = 1 << 14;
/// Activation buffers kept for the next call, at most this many bytes.
const KEEP_BYTES: usize = 96 << 20;

/// An adapter kept apart from the merged weight, for the noisy terms.
#[derive(Debug)]
struct Adapter {
    key: u64,
    rank: usize,
    d_in: usize,
    d_out: usize,
    scale: f32,
    a: Vec<f32>,
    b: Vec<f32>,
    a_t: Packed,
    b_t: Packed,
    /// gate: `exp(½·clamp(log α))`; additive: `σ = exp(½·clamp(λ))`; else empty.
    std: Vec<f32>,
    rank_index: Vec<u64>,
}

#[derive(Debug)]
struct Part {
    name: String,
    col: usize,
    adapter: Option<Adapter>,
}

/// One product: one or several HF linears with the same input, fused along the output.
#[derive(Debug)]
struct Linear {
    d_in: usize,
    d_out: usize,
    w: Packed,
    bias: Vec<f32>,
    parts: Vec<Part>,
}

/// What the last layer needs to attend from token 0 only without keys and values of all tokens.
#[derive(Debug)]
struct Pooled {
    /// Per head: the merged key weight rows of the head, packed as `dh × d_in`.
    key_t: Vec<Packed>,
    /// The value projection alone (a copy of the fused one's V part, adapter included).
    value: Linear,
}

#[derive(Debug)]
struct Layer {
    qkv: Linear,
    /// The last layer's (only that layer computes token 0 alone).
    pooled: Option<Pooled>,
    out: Linear,
    ln1: (Vec<f32>, Vec<f32>),
    ffn1: Linear,
    ffn2: Linear,
    ln2: (Vec<f32>, Vec<f32>),
}

/// How adapters are perturbed in one forward pass.
#[derive(Clone, Copy, Debug)]
pub enum Noise<'a> {
    /// No noise: z = 1 (mean mode), one row per input.
    Mean,
    /// `samples` posterior samples per input, seeded.
    Sampled {
        /// S ≥ 1.
        samples: usize,
        /// The seed of the streams.
        seed: u64,
    },
    /// One pass with the given gate values per module: `name → [N, r]` row-major (N inputs of
    /// this call); modules not named use z = 1.
    Explicit(&'a HashMap<String, Vec<f32>>),
}

impl Noise<'_> {
    fn samples(&self) -> usize {
        match self {
            Noise::Sampled { samples, .. } => (*samples).max(1),
            _ => 1,
        }
    }
}

/// One input, trimmed to its attended tokens.
#[derive(Clone, Debug)]
pub struct Sequence {
    ids: Vec<u32>,
    positions: Vec<u32>,
    hash: u64,
}

/// Row layout of a stacked activation: input `i` has `n[i]` rows per copy and `reps` copies.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Layout {
    n: Vec<usize>,
    reps: usize,
}

impl Layout {
    fn rows(&self) -> usize {
        self.n.iter().sum::<usize>() * self.reps
    }

    /// `(input, copy, first row, rows)` of every segment, in storage order.
    fn segments(&self) -> Vec<(usize, usize, usize, usize)> {
        let mut out = Vec::with_capacity(self.n.len() * self.reps);
        let mut start = 0;
        for (i, &n) in self.n.iter().enumerate() {
            for s in 0..self.reps {
                out.push((i, s, start, n));
                start += n;
            }
        }
        out
    }
}

/// Per-thread scratch of the attention tasks: two packings and a score buffer, reused.
type Scratch = (Packed, Packed, Vec<f32>);

fn scratch() -> Scratch {
    (Packed::empty(), Packed::empty(), Vec::new())
}

/// Split `data` (rows of `width`) into the mutable row blocks of `segments`.
fn split_segments<'a>(
    mut data: &'a mut [f32],
    segments: &[(usize, usize, usize, usize)],
    width: usize,
) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(segments.len());
    for &(_, _, _, n) in segments {
        let (head, tail) = std::mem::take(&mut data).split_at_mut(n * width);
        out.push(head);
        data = tail;
    }
    out
}

/// A loaded, ready-to-run classifier.
#[derive(Debug)]
pub struct Encoder {
    arch: Arch,
    hidden: usize,
    heads: usize,
    vocab_size: usize,
    max_positions: usize,
    pad_token_id: u32,
    eps: f32,
    activation: Activation,
    num_labels: usize,
    noise: NoiseKind,
    dropout: f32,
    word: Vec<f32>,
    position: Vec<f32>,
    token_type0: Option<Vec<f32>>,
    emb_ln: (Vec<f32>, Vec<f32>),
    layers: Vec<Layer>,
    head1: Linear,
    head2: Linear,
    /// rank of every module named in the bundle (0 for pruned-away modules)
    module_ranks: HashMap<String, usize>,
    /// Activation buffers kept between calls (bounded by [`KEEP_BYTES`]).
    buffers: Mutex<Vec<Vec<f32>>>,
}

fn take(bundle: &Bundle, name: &str) -> Result<Vec<f32>> {
    Ok(bundle.tensor(name)?.data.clone())
}

fn build_linear(bundle: &Bundle, names: &[String]) -> Result<Linear> {
    let mut rows: Vec<f32> = Vec::new();
    let mut bias = Vec::new();
    let mut parts = Vec::new();
    let mut d_in = 0;
    let noise = bundle.meta.noise();
    for name in names {
        let w = bundle.tensor(&format!("{name}.weight"))?;
        let (d_out, din) = (w.shape[0], w.shape[1]);
        d_in = din;
        let mut w = w.data.clone();
        let col = bias.len();
        bias.extend_from_slice(&bundle.tensor(&format!("{name}.bias"))?.data);
        let mut adapter = None;
        if let (Some(m), Some(t)) = (bundle.meta.modules.get(name), bundle.adapters.get(name)) {
            let r = m.rank;
            let scale = m.scale as f32;
            // W' = W + s·B·A
            for j in 0..d_out {
                for k in 0..r {
                    let c = scale * t.lora_b[j * r + k];
                    if c != 0.0 {
                        let a_row = &t.lora_a[k * din..(k + 1) * din];
                        for (wv, av) in w[j * din..(j + 1) * din].iter_mut().zip(a_row) {
                            *wv += c * av;
                        }
                    }
                }
            }
            let std = match noise {
                NoiseKind::Gate => t
                    .rank_param
                    .iter()
                    .map(|&la| (0.5 * la.clamp(-10.0, 10.0)).exp())
                    .collect(),
                NoiseKind::Additive => t
                    .rank_param
                    .iter()
                    .map(|&ls| (0.5 * ls.clamp(-20.0, 2.0)).exp())
                    .collect(),
                _ => Vec::new(),
            };
            adapter = Some(Adapter {
                key: mc::fnv1a(name.as_bytes()),
                rank: r,
                d_in: din,
                d_out,
                scale,
                a_t: Packed::from_nk(&t.lora_a, r, din, din),
                b_t: Packed::from_nk(&t.lora_b, d_out, r, r),
                a: t.lora_a.clone(),
                b: t.lora_b.clone(),
                std,
                rank_index: t.rank_index.clone(),
            });
        }
        rows.extend_from_slice(&w);
        parts.push(Part {
            name: name.clone(),
            col,
            adapter,
        });
    }
    let d_out = bias.len();
    Ok(Linear {
        d_in,
        d_out,
        w: Packed::from_weight(&rows, d_out, d_in),
        bias,
        parts,
    })
}

impl Encoder {
    /// Build from a validated bundle (packs the weights, merges the adapters).
    pub fn new(bundle: &Bundle) -> Result<Self> {
        let cfg = &bundle.config;
        let p = cfg.prefix();
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let lp = cfg.layer_prefix(l);
            let sfx = cfg.layer_linear_suffixes();
            let name = |i: usize| format!("{lp}.{}", sfx[i].0);
            let [ln1, ln2] = cfg.layer_norm_suffixes();
            let qkv = build_linear(bundle, &[name(0), name(1), name(2)])?;
            let pooled = if l + 1 == cfg.layers {
                let dh = cfg.hidden / cfg.heads;
                let k0 = qkv.parts[1].col;
                Some(Pooled {
                    key_t: (0..cfg.heads)
                        .map(|hd| qkv.w.transpose_cols(k0 + hd * dh, k0 + (hd + 1) * dh))
                        .collect(),
                    value: build_linear(bundle, &[name(2)])?,
                })
            } else {
                None
            };
            layers.push(Layer {
                qkv,
                pooled,
                out: build_linear(bundle, &[name(3)])?,
                ln1: (
                    take(bundle, &format!("{lp}.{ln1}.weight"))?,
                    take(bundle, &format!("{lp}.{ln1}.bias"))?,
                ),
                ffn1: build_linear(bundle, &[name(4)])?,
                ffn2: build_linear(bundle, &[name(5)])?,
                ln2: (
                    take(bundle, &format!("{lp}.{ln2}.weight"))?,
                    take(bundle, &format!("{lp}.{ln2}.bias"))?,
                ),
            });
        }
        let heads = cfg.head_linears(bundle.meta.num_labels);
        let token_type0 = if cfg.type_vocab_size > 0 {
            let t = bundle.tensor(&format!("{p}.embeddings.token_type_embeddings.weight"))?;
            Some(t.data[..cfg.hidden].to_vec())
        } else {
            None
        };
        Ok(Self {
            arch: cfg.arch,
            hidden: cfg.hidden,
            heads: cfg.heads,
            vocab_size: cfg.vocab_size,
            max_positions: cfg.max_positions,
            pad_token_id: cfg.pad_token_id as u32,
            eps: cfg.layer_norm_eps,
            activation: cfg.activation,
            num_labels: bundle.meta.num_labels,
            noise: bundle.meta.noise(),
            dropout: bundle.meta.dropout as f32,
            word: take(bundle, &format!("{p}.embeddings.word_embeddings.weight"))?,
            position: take(
                bundle,
                &format!("{p}.embeddings.position_embeddings.weight"),
            )?,
            token_type0,
            emb_ln: (
                take(bundle, &format!("{p}.embeddings.LayerNorm.weight"))?,
                take(bundle, &format!("{p}.embeddings.LayerNorm.bias"))?,
            ),
            layers,
            head1: build_linear(bundle, &[heads[0].0.clone()])?,
            head2: build_linear(bundle, &[heads[1].0.clone()])?,
            module_ranks: bundle
                .meta
                .modules
                .iter()
                .map(|(k, m)| (k.clone(), m.rank))
                .collect(),
            buffers: Mutex::new(Vec::new()),
        })
    }

    /// Classes of the head.
    pub fn num_labels(&self) -> usize {
        self.num_labels
    }

    /// Current rank of every module named in the bundle.
    pub fn module_ranks(&self) -> &HashMap<String, usize> {
        &self.module_ranks
    }

    /// Turn padded `ids`/`mask` rows (`[n, t]`, row-major) into trimmed sequences, validating
    /// token ids, lengths and positions.
    pub fn prepare(&self, ids: &[i64], mask: &[i64], n: usize, t: usize) -> Result<Vec<Sequence>> {
        if ids.len() != n * t || mask.len() != n * t {
            return Err(Error::Shape(format!(
                "input_ids has {} values and attention_mask {}, expected {n}×{t}",
                ids.len(),
                mask.len()
            )));
        }
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let row = &ids[i * t..(i + 1) * t];
            let m = &mask[i * t..(i + 1) * t];
            let mut seq = Sequence {
                ids: Vec::new(),
                positions: Vec::new(),
                hash: 0,
            };
            let mut keep = Vec::with_capacity(t);
            let mut roberta_count = 0u32;
            for (j, (&id, &mv)) in row.iter().zip(m).enumerate() {
                if id < 0 || id as u64 >= self.vocab_size as u64 {
                    return Err(Error::Value(format!(
                        "input {i}: token id {id} at position {j} is outside the vocabulary (size {})",
                        self.vocab_size
                    )));
                }
                let id = id as u32;
                // RoBERTa numbers non-padding tokens from padding_idx + 1 (HF
                // create_position_ids_from_input_ids), padding tokens get padding_idx.
                let pos = match self.arch {
                    Arch::Roberta => {
                        if id != self.pad_token_id {
                            roberta_count += 1;
                            roberta_count + self.pad_token_id
                        } else {
                            self.pad_token_id
                        }
                    }
                    _ => j as u32,
                };
                keep.push(mv != 0);
                if mv != 0 {
                    if pos as usize >= self.max_positions {
                        return Err(Error::Value(format!(
                            "input {i} is too long: position {pos} exceeds max_position_embeddings {}",
                            self.max_positions
                        )));
                    }
                    seq.ids.push(id);
                    seq.positions.push(pos);
                }
            }
            if seq.ids.is_empty() {
                return Err(Error::Value(format!(
                    "input {i} has no attended tokens (attention_mask is all 0)"
                )));
            }
            let ids_u32: Vec<u32> = row.iter().map(|&v| v as u32).collect();
            seq.hash = mc::input_hash(&ids_u32, &keep);
            out.push(seq);
        }
        Ok(out)
    }

    /// Check explicit gates: every name is a module of the bundle, every array `[n, rank]`.
    pub fn check_gates(&self, gates: &HashMap<String, Vec<f32>>, n: usize) -> Result<()> {
        for (name, g) in gates {
            let Some(&r) = self.module_ranks.get(name) else {
                return Err(Error::Value(format!(
                    "gates: {name:?} is not an adapted module of this bundle"
                )));
            };
            if g.len() != n * r {
                return Err(Error::Shape(format!(
                    "gates[{name:?}] has {} values, expected [{n}, {r}]",
                    g.len()
                )));
            }
            if g.iter().any(|v| !v.is_finite()) {
                return Err(Error::Value(format!(
                    "gates[{name:?}] contains NaN or infinite values"
                )));
            }
        }
        Ok(())
    }

    /// Logits `[N, S, C]` (S = 1 unless sampling) of the sequences, on the current rayon pool.
    pub fn forward(&self, seqs: &[Sequence], noise: Noise<'_>) -> Vec<f32> {
        let s = noise.samples();
        let c = self.num_labels;
        let mut out = vec![0.0f32; seqs.len() * s * c];
        let mut start = 0;
        while start < seqs.len() {
            let mut end = start;
            let mut rows = 0;
            while end < seqs.len() && (end == start || rows + seqs[end].ids.len() * s <= MAX_ROWS) {
                rows += seqs[end].ids.len() * s;
                end += 1;
            }
            let logits = self.forward_chunk(&seqs[start..end], start, noise);
            out[start * s * c..end * s * c].copy_from_slice(&logits);
            start = end;
        }
        out
    }

    fn forward_chunk(&self, seqs: &[Sequence], offset: usize, noise: Noise<'_>) -> Vec<f32> {
        let h = self.hidden;
        let ctx = Ctx {
            noise,
            samples: noise.samples(),
            offset,
            seqs,
            threads: rayon::current_num_threads(),
            buffers: &self.buffers,
        };
        // embeddings (shared)
        let mut lay = Layout {
            n: seqs.iter().map(|q| q.ids.len()).collect(),
            reps: 1,
        };
        let mut x = ctx.buf(lay.rows() * h);
        let mut r = 0;
        for q in seqs {
            for (&id, &pos) in q.ids.iter().zip(&q.positions) {
                let row = &mut x[r * h..(r + 1) * h];
                row.copy_from_slice(&self.word[id as usize * h..(id as usize + 1) * h]);
                kernels::add_assign(
                    row,
                    &self.position[pos as usize * h..(pos as usize + 1) * h],
                );
                if let Some(tt) = &self.token_type0 {
                    kernels::add_assign(row, tt);
                }
                r += 1;
            }
        }
        kernels::layer_norm(&mut x, &self.emb_ln.0, &self.emb_ln.1, self.eps);
        for layer in &self.layers {
            (x, lay) = self.layer(layer, x, lay, &ctx);
        }
        // token 0 of each copy
        let first = Layout {
            n: vec![1; seqs.len()],
            reps: lay.reps,
        };
        let x0 = conform(&x, &lay, &first, h, &ctx);
        let (mut y, lay1) = self.linear(&self.head1, &x0, &first, &ctx);
        ctx.put_rows(x0);
        ctx.put(x);
        match self.arch {
            Arch::DistilBert => kernels::relu(&mut y),
            _ => kernels::tanh(&mut y),
        }
        let (logits, lay2) = self.linear(&self.head2, &y, &lay1, &ctx);
        ctx.put(y);
        let full = Layout {
            n: vec![1; seqs.len()],
            reps: ctx.samples,
        };
        // an exact-size result; every pool buffer goes back to the pool (a pool buffer may be
        // far larger than the logits)
        let per_copy = conform(&logits, &lay2, &full, self.num_labels, &ctx);
        let out = per_copy.to_vec();
        ctx.put_rows(per_copy);
        ctx.put(logits);
        // keep the largest buffers for the next call, within KEEP_BYTES
        if let Ok(mut pool) = self.buffers.lock() {
            pool.sort_by_key(|b| std::cmp::Reverse(b.capacity()));
            let mut kept = 0;
            pool.retain(|b| {
                kept += b.capacity() * 4;
                kept <= KEEP_BYTES
            });
        }
        out
    }

    /// One encoder layer; the last one (the one with `pooled`) for token 0 only.
    fn layer(&self, layer: &Layer, x: Buf, lay: Layout, ctx: &Ctx<'_>) -> (Buf, Layout) {
        let h = self.hidden;
        let last = layer.pooled.is_some();
        let key = &layer.qkv.parts[1];
        let key_noisy = key
            .adapter
            .as_ref()
            .is_some_and(|ad| self.noisy(ad, &key.name, ctx));
        let (attn, lay_c) = match &layer.pooled {
            Some(pooled) if !key_noisy => self.pooled_attention(layer, pooled, &x, &lay, ctx),
            _ => {
                let (qkv, lay_q) = self.linear(&layer.qkv, &x, &lay, ctx);
                let lay_c = if last {
                    Layout {
                        n: vec![1; lay_q.n.len()],
                        reps: lay_q.reps,
                    }
                } else {
                    lay_q.clone()
                };
                let attn = self.attention(&qkv, &lay_q, last, ctx);
                ctx.put(qkv);
                (attn, lay_c)
            }
        };
        let (mut a, lay_a) = self.linear(&layer.out, &attn, &lay_c, ctx);
        ctx.put(attn);
        let resid = conform(&x, &lay, &lay_a, h, ctx);
        par_add_layer_norm(&mut a, &resid, &layer.ln1, self.eps);
        ctx.put_rows(resid);
        ctx.put(x);
        let (mut f, lay_f) = self.linear(&layer.ffn1, &a, &lay_a, ctx);
        match self.activation {
            Activation::Gelu => par_elementwise(&mut f, kernels::gelu),
            Activation::GeluTanh => par_elementwise(&mut f, kernels::gelu_tanh),
            Activation::Relu => par_elementwise(&mut f, kernels::relu),
        }
        let (mut g, lay_g) = self.linear(&layer.ffn2, &f, &lay_f, ctx);
        ctx.put(f);
        let resid = conform(&a, &lay_a, &lay_g, h, ctx);
        par_add_layer_norm(&mut g, &resid, &layer.ln2, self.eps);
        ctx.put_rows(resid);
        ctx.put(a);
        (g, lay_g)
    }

    /// Scaled dot-product attention per (segment, head); queries of token 0 only if `first_only`.
    fn attention(&self, qkv: &[f32], lay: &Layout, first_only: bool, ctx: &Ctx<'_>) -> Buf {
        let (h, heads) = (self.hidden, self.heads);
        let dh = h / heads;
        let segs = lay.segments();
        let out_lay = Layout {
            n: if first_only {
                vec![1; lay.n.len()]
            } else {
                lay.n.clone()
            },
            reps: lay.reps,
        };
        let mut ctxv = ctx.buf(out_lay.rows() * h);
        let parts = split_segments(&mut ctxv, &out_lay.segments(), h);
        if segs.len() >= 2 * ctx.threads {
            // enough segments to keep the threads busy: one segment per task, all heads, each
            // head's output written in place into the segment's rows
            parts.into_par_iter().zip(segs.par_iter()).for_each_init(
                scratch,
                |sc, (rows, &(_, _, start, n))| {
                    prefetch_head(qkv, start, n, h, dh, 0);
                    for hd in 0..heads {
                        if hd + 1 < heads {
                            prefetch_head(qkv, start, n, h, dh, hd + 1);
                        }
                        self.head_attention(
                            qkv,
                            start,
                            n,
                            first_only,
                            hd,
                            sc,
                            &mut rows[hd * dh..],
                            h,
                        );
                    }
                },
            );
            return ctxv;
        }
        // few segments (mean mode, small batches): one (segment, head) per task, then each
        // segment's rows gather their heads' blocks
        let tasks: Vec<(usize, usize)> = (0..segs.len())
            .flat_map(|g| (0..heads).map(move |hd| (g, hd)))
            .collect();
        let blocks: Vec<Vec<f32>> = tasks
            .par_iter()
            .map_init(scratch, |sc, &(g, hd)| {
                let (_, _, start, n) = segs[g];
                let nq = if first_only { 1 } else { n };
                let mut out = vec![0.0f32; nq * dh];
                self.head_attention(qkv, start, n, first_only, hd, sc, &mut out, dh);
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
        ctxv
    }

    /// One head of one segment (rows `start..start + n` of the fused `qkv`): `softmax(q kᵀ /
    /// √dh) v` for every query row (token 0 only if `first_only`) into `out` (row stride `ldo`).
    /// `sc` holds reusable packings and the score buffer.
    #[allow(clippy::too_many_arguments)]
    fn head_attention(
        &self,
        qkv: &[f32],
        start: usize,
        n: usize,
        first_only: bool,
        hd: usize,
        sc: &mut Scratch,
        out: &mut [f32],
        ldo: usize,
    ) {
        let h = self.hidden;
        let dh = h / self.heads;
        let nq = if first_only { 1 } else { n };
        let (kt, v, scores) = sc;
        let base = &qkv[start * 3 * h..(start + n) * 3 * h];
        kt.refill_nk(&base[h + hd * dh..], n, dh, 3 * h);
        scores.resize(nq * n, 0.0);
        kernels::gemm(nq, &base[hd * dh..], 3 * h, kt, scores, n, Epilogue::Store);
        kernels::softmax_rows(scores, n, 1.0 / (dh as f32).sqrt());
        v.refill_kn(&base[2 * h + hd * dh..], n, dh, 3 * h);
        kernels::gemm(nq, scores, n, v, out, ldo, Epilogue::Store);
    }

    /// Token 0's attention output in the last layer from the layer input `x` without keys or
    /// values of all tokens (see the module docs); rows `[copies, hidden]`, one per copy.
    fn pooled_attention(
        &self,
        layer: &Layer,
        pooled: &Pooled,
        x: &[f32],
        lay: &Layout,
        ctx: &Ctx<'_>,
    ) -> (Buf, Layout) {
        let (h, heads) = (self.hidden, self.heads);
        let dh = h / heads;
        let d_in = layer.qkv.d_in;
        let scale = 1.0 / (dh as f32).sqrt();
        let inputs = lay.n.len();
        // token 0's query (the fused product of one row per copy; it expands to S copies when
        // any of Q, K, V is noisy, so the copies below are those of the pooled value too)
        let first = Layout {
            n: vec![1; inputs],
            reps: lay.reps,
        };
        let x0 = conform(x, lay, &first, h, ctx);
        let (q, lay_q) = self.linear(&layer.qkv, &x0, &first, ctx);
        ctx.put_rows(x0);
        let copies = lay_q.rows();
        let q0 = layer.qkv.parts[0].col;
        // u[hd][g] = W_kᵀ q: copy g's query of head hd through the head's key rows
        let mut u = ctx.buf(heads * copies * d_in);
        u.par_chunks_mut(copies * d_in)
            .enumerate()
            .for_each(|(hd, uh)| {
                kernels::gemm(
                    copies,
                    &q[q0 + hd * dh..],
                    layer.qkv.d_out,
                    &pooled.key_t[hd],
                    uh,
                    d_in,
                    Epilogue::Store,
                );
            });
        ctx.put(q);
        // per copy: scores of every head over the copy's tokens, softmax, pooled rows Σ_j p_j x_j
        let x_segs = lay.segments();
        let mut pooled_x = ctx.buf(copies * heads * d_in);
        pooled_x
            .par_chunks_mut(heads * d_in)
            .zip(lay_q.segments().par_iter())
            .for_each_init(scratch, |(xt, xp, scores), (out, &(i, s, g, _))| {
                let src = if lay.reps == 1 { i } else { i * lay.reps + s };
                let (_, _, start, n) = x_segs[src];
                let rows = &x[start * d_in..(start + n) * d_in];
                scores.resize(heads * n, 0.0);
                xt.refill_nk(rows, n, d_in, d_in);
                kernels::gemm(
                    heads,
                    &u[g * d_in..],
                    copies * d_in,
                    xt,
                    scores,
                    n,
                    Epilogue::Store,
                );
                kernels::softmax_rows(scores, n, scale);
                xp.refill_kn(rows, n, d_in, d_in);
                kernels::gemm(heads, scores, n, xp, out, d_in, Epilogue::Store);
            });
        ctx.put(u);
        // the value projection of the pooled rows; head hd keeps its own columns of row hd
        let lay_p = Layout {
            n: vec![heads; inputs],
            reps: lay_q.reps,
        };
        let (v, lay_v) = self.linear(&pooled.value, &pooled_x, &lay_p, ctx);
        ctx.put(pooled_x);
        let lay_c = Layout {
            n: vec![1; inputs],
            reps: lay_v.reps,
        };
        let mut attn = ctx.buf(lay_c.rows() * h);
        for (g, row) in attn.chunks_exact_mut(h).enumerate() {
            for hd in 0..heads {
                let src = (g * heads + hd) * h + hd * dh;
                row[hd * dh..(hd + 1) * dh].copy_from_slice(&v[src..src + dh]);
            }
        }
        ctx.put(v);
        (attn, lay_c)
    }

    fn noisy(&self, ad: &Adapter, name: &str, ctx: &Ctx<'_>) -> bool {
        if ad.rank == 0 {
            return false;
        }
        match ctx.noise {
            Noise::Mean => false,
            Noise::Explicit(g) => g.contains_key(name),
            Noise::Sampled { .. } => match self.noise {
                NoiseKind::None => false,
                NoiseKind::Dropout => self.dropout > 0.0,
                NoiseKind::Gate | NoiseKind::Additive => true,
            },
        }
    }

    /// `y = x W'ᵀ + b` plus the noisy adapter terms; expands a shared input when needed.
    fn linear(&self, lin: &Linear, x: &[f32], lay: &Layout, ctx: &Ctx<'_>) -> (Buf, Layout) {
        let rows = lay.rows();
        let mut y = ctx.buf(rows * lin.d_out);
        kernels::par_gemm(
            rows,
            x,
            lin.d_in,
            &lin.w,
            &mut y,
            lin.d_out,
            Epilogue::Bias(&lin.bias),
            ctx.threads,
        );
        let noisy: Vec<&Part> = lin
            .parts
            .iter()
            .filter(|p| {
                p.adapter
                    .as_ref()
                    .is_some_and(|a| self.noisy(a, &p.name, ctx))
            })
            .collect();
        if noisy.is_empty() {
            return (y, lay.clone());
        }
        let out_lay = Layout {
            n: lay.n.clone(),
            reps: ctx.samples,
        };
        if out_lay != *lay {
            let expanded = relay(&y, lay, &out_lay, lin.d_out, ctx);
            ctx.put(std::mem::replace(&mut y, expanded));
        }
        let in_segs = lay.segments();
        let out_segs = out_lay.segments();
        let ys = split_segments(&mut y, &out_segs, lin.d_out);
        ys.into_par_iter()
            .zip(out_segs.par_iter())
            .for_each(|(yseg, &(i, s, _, n))| {
                // the input rows of this copy: its own, or the shared ones
                let src = if lay.reps == 1 { i } else { i * lay.reps + s };
                let (_, _, xs, _) = in_segs[src];
                let xrows = &x[xs * lin.d_in..(xs + n) * lin.d_in];
                for part in &noisy {
                    if let Some(ad) = &part.adapter {
                        self.adapter_term(
                            ad,
                            &part.name,
                            xrows,
                            n,
                            &mut yseg[part.col..],
                            lin.d_out,
                            i,
                            s,
                            ctx,
                        );
                    }
                }
            });
        (y, out_lay)
    }

    /// Add one sample's noisy adapter term of input `i`, copy `s` to `y` (row stride `ldy`).
    #[allow(clippy::too_many_arguments)]
    fn adapter_term(
        &self,
        ad: &Adapter,
        name: &str,
        x: &[f32],
        n: usize,
        y: &mut [f32],
        ldy: usize,
        i: usize,
        s: usize,
        ctx: &Ctx<'_>,
    ) {
        let r = ad.rank;
        let seq = &ctx.seqs[i];
        let stream = match ctx.noise {
            Noise::Sampled { seed, .. } => Some(Stream::new(seed, seq.hash, s as u64, ad.key)),
            _ => None,
        };
        let mut hbuf = vec![0.0f32; n * r];
        if let (NoiseKind::Additive, Some(st)) = (self.noise, stream) {
            // sampled factors Ã = A + σ ε, B̃ = B + σ ε'; term s·(B̃ Ã x − B A x)
            let mut a_s = ad.a.clone();
            let mut b_s = ad.b.clone();
            for k in 0..r {
                let (rk, sd) = (ad.rank_index[k], ad.std[k]);
                for (c, v) in a_s[k * ad.d_in..(k + 1) * ad.d_in].iter_mut().enumerate() {
                    *v += sd * st.normal(rk, 1 + c as u64) as f32;
                }
                for j in 0..ad.d_out {
                    b_s[j * r + k] += sd * st.normal(rk, (1 + ad.d_in + j) as u64) as f32;
                }
            }
            let a_t = Packed::from_nk(&a_s, r, ad.d_in, ad.d_in);
            let b_t = Packed::from_nk(&b_s, ad.d_out, r, r);
            kernels::gemm(n, x, ad.d_in, &a_t, &mut hbuf, r, Epilogue::Store);
            hbuf.iter_mut().for_each(|v| *v *= ad.scale);
            kernels::gemm(n, &hbuf, r, &b_t, y, ldy, Epilogue::Accumulate);
            kernels::gemm(n, x, ad.d_in, &ad.a_t, &mut hbuf, r, Epilogue::Store);
            hbuf.iter_mut().for_each(|v| *v *= -ad.scale);
            kernels::gemm(n, &hbuf, r, &ad.b_t, y, ldy, Epilogue::Accumulate);
            return;
        }
        // gate-like: coefficient scale·(z − 1) per rank
        let coef: Vec<f32> = match (ctx.noise, stream) {
            (Noise::Explicit(g), _) => {
                let Some(gv) = g.get(name) else { return };
                let row = &gv[(ctx.offset + i) * r..(ctx.offset + i + 1) * r];
                row.iter().map(|&z| ad.scale * (z - 1.0)).collect()
            }
            (_, Some(st)) => (0..r)
                .map(|k| {
                    let zm1 = match self.noise {
                        NoiseKind::Gate => ad.std[k] * st.normal(ad.rank_index[k], 0) as f32,
                        NoiseKind::Dropout => {
                            let p = self.dropout;
                            if st.uniform(ad.rank_index[k], 0) as f32 >= p {
                                1.0 / (1.0 - p) - 1.0
                            } else {
                                -1.0
                            }
                        }
                        _ => 0.0,
                    };
                    ad.scale * zm1
                })
                .collect(),
            _ => return,
        };
        kernels::gemm(n, x, ad.d_in, &ad.a_t, &mut hbuf, r, Epilogue::Store);
        for row in hbuf.chunks_exact_mut(r) {
            for (v, c) in row.iter_mut().zip(&coef) {
                *v *= c;
            }
        }
        kernels::gemm(n, &hbuf, r, &ad.b_t, y, ldy, Epilogue::Accumulate);
    }
}

struct Ctx<'a> {
    noise: Noise<'a>,
    samples: usize,
    offset: usize,
    seqs: &'a [Sequence],
    threads: usize,
    /// Recycled activation buffers: large fresh allocations cost page faults on every layer.
    buffers: &'a Mutex<Vec<Vec<f32>>>,
}

impl Ctx<'_> {
    /// A buffer of `n` floats, reusing a returned one when possible. Its contents are
    /// unspecified (stale values of a previous use): every caller overwrites all `n` entries
    /// (products with a Store/Bias epilogue, row copies), so no time goes into zeroing.
    fn buf(&self, n: usize) -> Buf {
        let mut data = match self.buffers.lock() {
            Ok(mut pool) => {
                // best fit: the smallest buffer that holds `n` floats, else the largest (grown
                // below), so small requests do not take the big buffers the next layer needs
                let fits = pool
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| b.len() >= n)
                    .min_by_key(|(_, b)| b.len())
                    .map(|(i, _)| i);
                let best = fits.or_else(|| {
                    pool.iter()
                        .enumerate()
                        .max_by_key(|(_, b)| b.len())
                        .map(|(i, _)| i)
                });
                best.map(|i| pool.swap_remove(i)).unwrap_or_default()
            }
            Err(_) => Vec::new(),
        };
        if data.len() < n {
            // zeroed once when a buffer is created or grown; spare capacity is zeroed too, so
            // a pooled buffer is initialised to its capacity and never zeroed again
            data.resize(n, 0.0);
            data.resize(data.capacity(), 0.0);
        }
        Buf { data, n }
    }

    /// Give a buffer back for reuse.
    fn put(&self, b: Buf) {
        if let Ok(mut pool) = self.buffers.lock() {
            pool.push(b.data);
        }
    }

    /// Give back the result of [`conform`] when it is a buffer of its own.
    fn put_rows(&self, r: Rows<'_>) {
        if let Rows::Owned(b) = r {
            self.put(b);
        }
    }
}

/// A pooled activation buffer: `n` floats in use of `data`, which is initialised to its full
/// length (so reusing it for a larger `n` needs no zeroing).
struct Buf {
    data: Vec<f32>,
    n: usize,
}

impl Deref for Buf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.data[..self.n]
    }
}

impl DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.data[..self.n]
    }
}

/// Rows that are either another activation as it is or a re-laid copy in a pooled buffer.
enum Rows<'x> {
    Borrowed(&'x [f32]),
    Owned(Buf),
}

impl Deref for Rows<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Rows::Borrowed(x) => x,
            Rows::Owned(b) => b,
        }
    }
}

/// Re-lay rows of width `w` from `from` into `to` (borrowed when the layouts agree): copy `s` of
/// input `i` takes its source copy (or the shared one) and keeps the first `to.n[i]` rows of it.
fn conform<'x>(x: &'x [f32], from: &Layout, to: &Layout, w: usize, ctx: &Ctx<'_>) -> Rows<'x> {
    if from == to {
        Rows::Borrowed(x)
    } else {
        Rows::Owned(relay(x, from, to, w, ctx))
    }
}

/// [`conform`] into a pooled buffer of its own, always.
fn relay(x: &[f32], from: &Layout, to: &Layout, w: usize, ctx: &Ctx<'_>) -> Buf {
    let from_segs = from.segments();
    let to_segs = to.segments();
    let mut out = ctx.buf(to.rows() * w);
    let pieces = split_segments(&mut out, &to_segs, w);
    let copy = |(dst, &(i, s, _, n)): (&mut [f32], &(usize, usize, usize, usize))| {
        let src = if from.reps == 1 { i } else { i * from.reps + s };
        let (_, _, start, len) = from_segs[src];
        assert!(n <= len, "conform: a copy keeps at most its source's rows");
        dst.copy_from_slice(&x[start * w..(start + n) * w]);
    };
    if to.rows() * w < PAR_MIN {
        pieces.into_iter().zip(&to_segs).for_each(copy);
    } else {
        pieces
            .into_par_iter()
            .zip(to_segs.par_iter())
            .for_each(copy);
    }
    out
}

/// Ask for head `hd`'s query, key and value columns of rows `start..start + n` of the fused
/// `qkv` (rows of `3h`) to be brought into cache. Rows of `3h` floats are often more than a page
/// apart, where hardware prefetchers stop; the head's columns are read next.
fn prefetch_head(qkv: &[f32], start: usize, n: usize, h: usize, dh: usize, hd: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        for row in start..start + n {
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
        let _ = (qkv, start, n, h, dh, hd);
    }
}

fn par_elementwise(x: &mut [f32], f: fn(&mut [f32])) {
    if x.len() <= PAR_MIN {
        f(x);
    } else {
        x.par_chunks_mut(PAR_MIN).for_each(f);
    }
}

/// `x ← LayerNorm(x + r)` over rows of `ln.0.len()`, blocks of rows in parallel (each row's
/// arithmetic is the same wherever it falls).
fn par_add_layer_norm(x: &mut [f32], r: &[f32], ln: &(Vec<f32>, Vec<f32>), eps: f32) {
    let h = ln.0.len().max(1);
    let block = PAR_MIN.div_ceil(h) * h;
    if x.len() <= block {
        kernels::add_layer_norm(x, r, &ln.0, &ln.1, eps);
    } else {
        x.par_chunks_mut(block)
            .zip(r.par_chunks(block))
            .for_each(|(xb, rb)| kernels::add_layer_norm(xb, rb, &ln.0, &ln.1, eps));
    }
}
