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
//! - Activation buffers come from a pool kept between calls (initialised once to their
//!   capacity, never zeroed again); with enough inputs × samples, attention runs one task per
//!   sequence copy and writes every head in place.
//!
//! Where things are: `build` (loading: packed weights, merged adapters), `layout` (row layouts
//! of stacked activations, moving rows between them), `adapter` (linear layers with their noisy
//! adapter terms), `attention` (per-head attention, the last layer's token-0 attention),
//! `pool` (activation buffers); this file holds the public API and the layer sequence.

use std::collections::HashMap;

use crate::bundle::{Activation, Arch, NoiseKind};
use crate::error::{Error, Result};
use crate::kernels;
use crate::mc;
use rayon::prelude::*;

mod adapter;
mod attention;
mod build;
mod layout;
mod pool;
#[cfg(test)]
mod tests;

use build::{LayerNorm, Linear};
use layout::{as_layout, Layout, Rows};
use pool::{Buffer, BufferPool};

/// Stacked rows kept below this per chunk of inputs (bounds the memory of MC mode).
const MAX_ROWS: usize = 8192;
/// Elementwise work below this many floats runs on the calling thread.
const PAR_MIN: usize = 1 << 14;

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
    /// `[vocab, hidden]`.
    word_embeddings: Vec<f32>,
    /// `[max_positions, hidden]`.
    position_embeddings: Vec<f32>,
    /// Row 0 of the token-type embeddings (every input is segment 0); none for DistilBERT.
    token_type0: Option<Vec<f32>>,
    embedding_norm: LayerNorm,
    layers: Vec<build::Layer>,
    /// The head's hidden → hidden linear (BERT's pooler, DistilBERT's pre-classifier,
    /// RoBERTa's `classifier.dense`), followed by tanh (ReLU for DistilBERT).
    head_hidden: Linear,
    /// The head's hidden → classes linear.
    head_out: Linear,
    /// rank of every module named in the bundle (0 for pruned-away modules)
    module_ranks: HashMap<String, usize>,
    /// Activation buffers kept between calls.
    buffers: BufferPool,
}

impl Encoder {
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

    fn forward_chunk(&self, seqs: &[Sequence], first_input: usize, noise: Noise<'_>) -> Vec<f32> {
        let h = self.hidden;
        let pass = Pass {
            noise,
            samples: noise.samples(),
            first_input,
            seqs,
            threads: rayon::current_num_threads(),
            buffers: &self.buffers,
        };
        // embeddings (shared)
        let mut layout = Layout {
            rows_per_copy: seqs.iter().map(|q| q.ids.len()).collect(),
            copies: 1,
        };
        let mut x = pass.buffer(layout.rows() * h);
        let mut r = 0;
        for q in seqs {
            for (&id, &pos) in q.ids.iter().zip(&q.positions) {
                let (id, pos) = (id as usize, pos as usize);
                let row = &mut x[r * h..(r + 1) * h];
                row.copy_from_slice(&self.word_embeddings[id * h..(id + 1) * h]);
                kernels::add_assign(row, &self.position_embeddings[pos * h..(pos + 1) * h]);
                if let Some(tt) = &self.token_type0 {
                    kernels::add_assign(row, tt);
                }
                r += 1;
            }
        }
        let norm = &self.embedding_norm;
        kernels::layer_norm(&mut x, &norm.gamma, &norm.beta, self.eps);
        for layer in &self.layers {
            (x, layout) = self.layer(layer, x, layout, &pass);
        }
        // token 0 of each copy
        let token0 = Layout::uniform(seqs.len(), 1, layout.copies);
        let x_token0 = as_layout(&x, &layout, &token0, h, &pass);
        let (mut y, hidden_layout) = self.linear(&self.head_hidden, &x_token0, &token0, &pass);
        pass.recycle_rows(x_token0);
        pass.recycle(x);
        match self.arch {
            Arch::DistilBert => kernels::relu(&mut y),
            _ => kernels::tanh(&mut y),
        }
        let (logits, logits_layout) = self.linear(&self.head_out, &y, &hidden_layout, &pass);
        pass.recycle(y);
        let full = Layout::uniform(seqs.len(), 1, pass.samples);
        // an exact-size result; every pool buffer goes back to the pool (a pool buffer may be
        // far larger than the logits)
        let per_copy = as_layout(&logits, &logits_layout, &full, self.num_labels, &pass);
        let out = per_copy.to_vec();
        pass.recycle_rows(per_copy);
        pass.recycle(logits);
        self.buffers.trim();
        out
    }

    /// One encoder layer; the last one (the one with `pooled`) for token 0 only.
    fn layer(
        &self,
        layer: &build::Layer,
        x: Buffer,
        layout: Layout,
        pass: &Pass<'_>,
    ) -> (Buffer, Layout) {
        let h = self.hidden;
        let last = layer.pooled.is_some();
        let key = &layer.qkv.parts[1];
        let key_noisy = key
            .adapter
            .as_ref()
            .is_some_and(|ad| self.noisy(ad, &key.module, pass));
        let (context, context_layout) = match &layer.pooled {
            Some(pooled) if !key_noisy => self.pooled_attention(layer, pooled, &x, &layout, pass),
            _ => {
                let (qkv, qkv_layout) = self.linear(&layer.qkv, &x, &layout, pass);
                let context_layout = if last {
                    Layout::uniform(qkv_layout.inputs(), 1, qkv_layout.copies)
                } else {
                    qkv_layout.clone()
                };
                let context = self.attention(&qkv, &qkv_layout, last, pass);
                pass.recycle(qkv);
                (context, context_layout)
            }
        };
        // attention block: output projection, residual, LayerNorm
        let (mut mid, mid_layout) = self.linear(&layer.attn_out, &context, &context_layout, pass);
        pass.recycle(context);
        let resid = as_layout(&x, &layout, &mid_layout, h, pass);
        par_add_layer_norm(&mut mid, &resid, &layer.attn_norm, self.eps);
        pass.recycle_rows(resid);
        pass.recycle(x);
        // feed-forward block
        let (mut inner, inner_layout) = self.linear(&layer.ffn_in, &mid, &mid_layout, pass);
        match self.activation {
            Activation::Gelu => par_elementwise(&mut inner, kernels::gelu),
            Activation::GeluTanh => par_elementwise(&mut inner, kernels::gelu_tanh),
            Activation::Relu => par_elementwise(&mut inner, kernels::relu),
        }
        let (mut out, out_layout) = self.linear(&layer.ffn_out, &inner, &inner_layout, pass);
        pass.recycle(inner);
        let resid = as_layout(&mid, &mid_layout, &out_layout, h, pass);
        par_add_layer_norm(&mut out, &resid, &layer.ffn_norm, self.eps);
        pass.recycle_rows(resid);
        pass.recycle(mid);
        (out, out_layout)
    }
}

/// What one forward pass over a chunk of inputs shares with every step of it.
struct Pass<'a> {
    noise: Noise<'a>,
    /// Copies per input once the samples diverge (1 unless sampling).
    samples: usize,
    /// Index of the chunk's first input among the call's inputs (rows of explicit gates).
    first_input: usize,
    seqs: &'a [Sequence],
    threads: usize,
    /// Recycled activation buffers.
    buffers: &'a BufferPool,
}

impl Pass<'_> {
    /// A pooled buffer of `n` floats with unspecified contents (see [`BufferPool::take`]).
    fn buffer(&self, n: usize) -> Buffer {
        self.buffers.take(n)
    }

    /// Give a buffer back for reuse.
    fn recycle(&self, b: Buffer) {
        self.buffers.give(b);
    }

    /// Give back the result of [`as_layout`] when it is a buffer of its own.
    fn recycle_rows(&self, r: Rows<'_>) {
        if let Rows::Owned(b) = r {
            self.recycle(b);
        }
    }
}

fn par_elementwise(x: &mut [f32], f: fn(&mut [f32])) {
    if x.len() <= PAR_MIN {
        f(x);
    } else {
        x.par_chunks_mut(PAR_MIN).for_each(f);
    }
}

/// `x ← LayerNorm(x + r)` over rows of `norm.gamma.len()`, blocks of rows in parallel (each
/// row's arithmetic is the same wherever it falls).
fn par_add_layer_norm(x: &mut [f32], r: &[f32], norm: &LayerNorm, eps: f32) {
    let h = norm.gamma.len().max(1);
    let block = PAR_MIN.div_ceil(h) * h;
    if x.len() <= block {
        kernels::add_layer_norm(x, r, &norm.gamma, &norm.beta, eps);
    } else {
        x.par_chunks_mut(block)
            .zip(r.par_chunks(block))
            .for_each(|(xb, rb)| kernels::add_layer_norm(xb, rb, &norm.gamma, &norm.beta, eps));
    }
}
