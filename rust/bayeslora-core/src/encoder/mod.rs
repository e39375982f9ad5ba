//! The BERT-family encoder for sequence classification (BERT/MiniLM, DistilBERT, RoBERTa,
//! DeBERTa-v2/v3) with BayesLoRA adapters, in f32, in mean mode and in Monte-Carlo mode.
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
//! - DeBERTa adds relative-position scores to attention (`disentangled`); its last layer
//!   computes keys of all tokens (the position→content scores need them).
//! - The classifier reads token 0 only, so the last layer computes the query, attention output and
//!   FFN for token 0 only, and no keys or values either, by linearity: with `q` token 0's query
//!   of a head and `W_k`, `W_v` that head's rows, the scores are `(W_kᵀ q) · x_j` (the key bias
//!   adds the same `q · b_k` to every score: softmax drops it) and the output is
//!   `W_v (Σ_j p_j x_j) + b_v` (plus the value adapter's term of the same pooled row: a sample's
//!   noise, gate coefficients or sampled factors, is the same for every token, so the term is
//!   linear in x). When the key adapter is noisy, keys are computed for all tokens as in the
//!   other layers.
//! - A request runs in pieces of at most [`Encoder::max_rows`] stacked rows: whole inputs with all
//!   their samples while they fit, else one input's samples in as few chunks as fit, of equal
//!   sizes where they can be (copy `s` of a chunk is
//!   sample `first_sample + s`, which keys its noise). [`Encoder::score`] reduces each piece's
//!   logits online, so memory is O(chunk) for any S, and an input's result does not depend on the
//!   pieces (tested: chunked and unchunked results are bit-identical). Logits that are not finite
//!   are refused, naming the input.
//! - Threads: on a pool of several threads a request is cut into pieces of at most half an even
//!   share of its rows, and whole pieces run side by side, one per thread, products unsplit (a
//!   piece's activations stay in the cache of the core that made them, and no thread waits at the
//!   end of every product for the other); only a request that is one piece (a single sequence in
//!   mean mode) splits each product between the threads (by columns when it has few rows).
//!   Results do not depend on the threads (tested on pools of 1, 2, 3 and 5).
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
mod disentangled;
mod ffn;
mod layout;
mod pool;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_pieces;

use build::{LayerNorm, Linear};
use disentangled::{InputPositions, Relative};
use layout::{as_layout, Layout, Rows};
use pool::{Buffer, BufferPool};

/// Stacked rows kept below this per chunk of inputs and samples (bounds the memory of MC mode):
/// the most [`Encoder::max_rows`] is by default.
pub const MAX_ROWS: usize = 8192;
/// The size the widest activation of one piece is kept near by default (see
/// [`default_max_rows`]).
pub const PIECE_BYTES: usize = 6 << 20;
/// The fewest rows [`default_max_rows`] gives.
const MIN_PIECE_ROWS: usize = 256;

/// The default of [`Encoder::max_rows`] for activations at most `max_width` floats wide: pieces
/// whose widest activation is about [`PIECE_BYTES`] (1024 rows of MiniLM's 1536-wide FFN), so
/// that a layer's activations stay in the last-level cache between its products instead of
/// streaming through memory; at least 256 rows, at most [`MAX_ROWS`]. Measured on one
/// core of Zen 4 (AVX2 kernels), MiniLM, 8 inputs × 64 tokens × 16 samples: 6–9 % less CPU time
/// per pass than pieces of 8192 rows, and the same numbers (results never depend on pieces).
pub fn default_max_rows(max_width: usize) -> usize {
    (PIECE_BYTES / (4 * max_width.max(1))).clamp(MIN_PIECE_ROWS, MAX_ROWS)
}
/// The most per-sample logits one [`Encoder::forward`] returns (4 GiB of f32): more is refused
/// ([`Encoder::score`] reduces any number of samples online instead).
pub const MAX_LOGITS: usize = 1 << 30;
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

/// One input, trimmed to its attended tokens.
#[derive(Clone, Debug)]
pub struct Sequence {
    ids: Vec<u32>,
    positions: Vec<u32>,
    /// Segment id of each kept token (0 for single texts; 1 on the second text of a pair).
    types: Vec<u32>,
    hash: u64,
    /// Its index in the request (for messages).
    index: usize,
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
    /// The head's hidden → hidden activation (tanh, ReLU for DistilBERT, DeBERTa's
    /// `pooler_hidden_act`).
    head_activation: Activation,
    /// `1/√d_head`, DeBERTa's `1/√(d_head · (1 + c2p + p2c))`.
    score_scale: f32,
    /// DeBERTa's relative attention.
    relative: Option<Relative>,
    num_labels: usize,
    noise: NoiseKind,
    dropout: f32,
    /// `[vocab, hidden]`.
    word_embeddings: Vec<f32>,
    /// `[max_positions, hidden]`; none for DeBERTa without `position_biased_input`.
    position_embeddings: Option<Vec<f32>>,
    /// The token-type (segment) embeddings `[type_vocab_size, hidden]`; none for DistilBERT and
    /// DeBERTa with `type_vocab_size` 0.
    token_types: Option<Vec<f32>>,
    /// Rows of `token_types` (0 without them).
    type_vocab_size: usize,
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
    /// See [`Encoder::max_rows`].
    max_rows: usize,
    /// The widest activation row (floats): bounds every buffer of a pass by rows × this.
    max_width: usize,
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
        self.prepare_at(ids, mask, n, t, 0)
    }

    /// Whether the model's own tokenizer pipeline feeds it segment ids: BERT-family models with
    /// token-type embeddings. RoBERTa's tokenizer gives its model none (segment 0 throughout,
    /// whatever the separator pattern), DistilBERT has no token-type embeddings.
    pub fn uses_token_types(&self) -> bool {
        self.token_types.is_some() && self.arch != Arch::Roberta
    }

    /// [`Encoder::prepare_at`] with segment ids: `types` `[n, t]` (row-major, as `ids`), each in
    /// `0..type_vocab_size` where the mask is 1 (a model without token-type embeddings accepts
    /// only 0); `None` = segment 0 throughout. Segment ids do not enter the MC noise key.
    pub fn prepare_typed_at(
        &self,
        ids: &[i64],
        mask: &[i64],
        types: Option<&[i64]>,
        n: usize,
        t: usize,
        first: usize,
    ) -> Result<Vec<Sequence>> {
        let mut seqs = self.prepare_at(ids, mask, n, t, first)?;
        let Some(types) = types else {
            return Ok(seqs);
        };
        if Some(types.len()) != n.checked_mul(t) {
            return Err(Error::Shape(format!(
                "token_type_ids has {} values, expected {n}×{t}",
                types.len()
            )));
        }
        let rows = self.type_vocab_size.max(1);
        for (seq, (row, m)) in seqs.iter_mut().zip(
            types
                .chunks_exact(t.max(1))
                .zip(mask.chunks_exact(t.max(1))),
        ) {
            seq.types.clear();
            for (j, (&ty, &mv)) in row.iter().zip(m).enumerate() {
                if mv == 0 {
                    continue;
                }
                let ty = u32::try_from(ty)
                    .ok()
                    .filter(|&v| (v as usize) < rows)
                    .ok_or_else(|| {
                        let allowed = if self.type_vocab_size == 0 {
                            "only 0: the model has no token-type embeddings".to_string()
                        } else {
                            format!("type_vocab_size is {}", self.type_vocab_size)
                        };
                        Error::Value(format!(
                            "input {}: token type {ty} at position {j} is out of range ({allowed})",
                            seq.index
                        ))
                    })?;
                seq.types.push(ty);
            }
        }
        Ok(seqs)
    }

    /// [`Encoder::prepare`] for rows that are inputs `first..first + n` of a larger request:
    /// errors, here and when scoring them, name an input by its index in that request.
    pub fn prepare_at(
        &self,
        ids: &[i64],
        mask: &[i64],
        n: usize,
        t: usize,
        first: usize,
    ) -> Result<Vec<Sequence>> {
        let values = n.checked_mul(t);
        if values != Some(ids.len()) || values != Some(mask.len()) {
            return Err(Error::Shape(format!(
                "input_ids has {} values and attention_mask {}, expected {n}×{t}",
                ids.len(),
                mask.len()
            )));
        }
        let mut out = Vec::with_capacity(n);
        for (i, (row, m)) in ids
            .chunks_exact(t.max(1))
            .zip(mask.chunks_exact(t.max(1)))
            .enumerate()
        {
            let index = first.saturating_add(i);
            let mut seq = Sequence {
                ids: Vec::new(),
                positions: Vec::new(),
                types: Vec::new(),
                hash: 0,
                index,
            };
            let mut keep = Vec::with_capacity(t);
            let mut ids_u32 = Vec::with_capacity(t);
            let mut roberta_count = 0usize;
            for (j, (&id, &mv)) in row.iter().zip(m).enumerate() {
                let id = u32::try_from(id)
                    .ok()
                    .filter(|&v| (v as usize) < self.vocab_size)
                    .ok_or_else(|| {
                        Error::Value(format!(
                            "input {index}: token id {id} at position {j} is outside the vocabulary (size {})",
                            self.vocab_size
                        ))
                    })?;
                ids_u32.push(id);
                // RoBERTa numbers non-padding tokens from padding_idx + 1 (HF
                // create_position_ids_from_input_ids), padding tokens get padding_idx.
                let pos = match self.arch {
                    Arch::Roberta => {
                        if id != self.pad_token_id {
                            roberta_count += 1;
                            roberta_count.saturating_add(self.pad_token_id as usize)
                        } else {
                            self.pad_token_id as usize
                        }
                    }
                    _ => j,
                };
                keep.push(mv != 0);
                if mv != 0 {
                    // max_positions ≤ 2^20 (checked at load), so a position below it fits u32
                    let pos = u32::try_from(pos)
                        .ok()
                        .filter(|&p| (p as usize) < self.max_positions)
                        .ok_or_else(|| {
                            Error::Value(format!(
                                "input {index} is too long: position {pos} exceeds max_position_embeddings {}",
                                self.max_positions
                            ))
                        })?;
                    seq.ids.push(id);
                    seq.positions.push(pos);
                    seq.types.push(0);
                }
            }
            if seq.ids.is_empty() {
                return Err(Error::Value(format!(
                    "input {index} has no attended tokens (attention_mask is all 0)"
                )));
            }
            seq.hash = mc::input_hash(&ids_u32, &keep);
            out.push(seq);
        }
        if out.len() != n {
            // t = 0 with n > 0: rows without tokens
            return Err(Error::Value(format!(
                "input {first} has no attended tokens (attention_mask is all 0)"
            )));
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
            if n.checked_mul(r) != Some(g.len()) {
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
    ///
    /// Errors: `samples` outside `1..=`[`mc::MAX_SAMPLES`], explicit gates that
    /// [`Encoder::check_gates`] refuses, a result of more than [`MAX_LOGITS`] values, or an input whose
    /// logits are not finite (the bundle's numbers overflow float32; the error names the input).
    pub fn forward(&self, seqs: &[Sequence], noise: Noise<'_>) -> Result<Vec<f32>> {
        let s = self.check_noise(seqs, noise)?;
        let c = self.num_labels;
        let per_input = s
            .checked_mul(c)
            .ok_or_else(|| too_large(seqs.len(), s, c))?;
        let total = seqs
            .len()
            .checked_mul(per_input)
            .ok_or_else(|| too_large(seqs.len(), s, c))?;
        if total > MAX_LOGITS {
            return Err(too_large(seqs.len(), s, c));
        }
        let mut out = Vec::new();
        out.try_reserve_exact(total)
            .map_err(|_| too_large(seqs.len(), s, c))?;
        out.resize(total, 0.0f32);
        self.run_pieces(seqs, noise, s, |input, first_sample, logits| {
            let at = input * per_input + first_sample * c;
            out[at..at + logits.len()].copy_from_slice(logits);
        })?;
        Ok(out)
    }

    /// The docs/method.md §6 fields of each sequence (S = 1 in mean mode), reduced online over
    /// its samples: memory does not grow with S (samples run in chunks of at most
    /// [`Encoder::max_rows`] rows), and the result is that of [`mc::summarize`] of
    /// [`Encoder::forward`]'s logits. Errors as [`Encoder::forward`].
    pub fn score(&self, seqs: &[Sequence], noise: Noise<'_>) -> Result<mc::UncertaintyColumns> {
        let s = self.check_noise(seqs, noise)?;
        let c = self.num_labels;
        let mut acc: Vec<mc::OnlineSummary> =
            (0..seqs.len()).map(|_| mc::OnlineSummary::new(c)).collect();
        self.run_pieces(seqs, noise, s, |input, _, logits| {
            // pieces come in order of inputs, then of samples: each input sees its samples in
            // order 0..S, however they were chunked
            for sample in logits.chunks_exact(c) {
                acc[input].push_logits(sample);
            }
        })?;
        let mut out = mc::UncertaintyColumns::with_capacity(seqs.len(), c);
        for a in &acc {
            out.push(&a.finish());
        }
        Ok(out)
    }

    /// Rows of stacked activations one piece of a forward pass keeps below (inputs × tokens ×
    /// samples per chunk; a single sample of a single input may exceed it); [`default_max_rows`]
    /// of the model's widest activation per token (fused Q/K/V or feed-forward) unless set. On a
    /// pool of T > 1 threads pieces run side by side, at most 4·T of them in flight (a thread
    /// waiting inside its piece may start another), so a pass holds at most 4·T pieces'
    /// activations.
    pub fn max_rows(&self) -> usize {
        self.max_rows
    }

    /// Set [`Encoder::max_rows`] (≥ 1): a memory/speed trade-off, and the way tests make the
    /// chunking of samples happen on small inputs. Results do not depend on it.
    pub fn set_max_rows(&mut self, rows: usize) {
        self.max_rows = rows.max(1);
    }

    /// S of `noise` (1 unless sampling), validated, with explicit gates checked.
    fn check_noise(&self, seqs: &[Sequence], noise: Noise<'_>) -> Result<usize> {
        match noise {
            Noise::Mean => Ok(1),
            Noise::Sampled { samples, .. } => mc::check_samples(samples),
            Noise::Explicit(gates) => {
                self.check_gates(gates, seqs.len())?;
                Ok(1)
            }
        }
    }

    /// Run the sequences in pieces of at most [`Encoder::max_rows`] rows: whole inputs with all
    /// their `s` samples while they fit, else one input's samples in chunks. Hands each input's
    /// logits `[samples of the piece, C]` to `sink(input, first sample, logits)`, in order of
    /// inputs, then of samples; an input's logits never depend on the pieces (each sample's noise
    /// is keyed by its index in 0..S, and rows are computed independently of their neighbours).
    ///
    /// On a pool of several threads the pieces are no larger than half an even share of the
    /// rows, and when there are at least two, whole pieces run side by side, each on one thread
    /// (its products unsplit, its smaller parallel loops left to idle threads to steal): a piece's
    /// activations stay in the cache of the core that made them, and no thread waits for the
    /// other at the end of every product, softmax or LayerNorm. One piece (a single sequence in
    /// mean mode, or a tiny request) is split inside instead, product by product.
    fn run_pieces(
        &self,
        seqs: &[Sequence],
        noise: Noise<'_>,
        s: usize,
        mut sink: impl FnMut(usize, usize, &[f32]),
    ) -> Result<()> {
        let c = self.num_labels;
        let threads = rayon::current_num_threads().max(1);
        let pieces = self.plan_pieces(seqs, s, threads)?;
        let side_by_side = threads > 1 && pieces.len() > 1;
        // the logits of at most this many pieces are held at once (memory stays O(pieces), not
        // O(N·S), in `score`)
        let wave = if side_by_side { 4 * threads } else { 1 };
        for group in pieces.chunks(wave) {
            let logits: Vec<Vec<f32>> = if side_by_side {
                group
                    .par_iter()
                    .with_max_len(1)
                    .map(|p| self.forward_chunk(seqs, p, noise, 1))
                    .collect()
            } else {
                group
                    .iter()
                    .map(|p| self.forward_chunk(seqs, p, noise, threads))
                    .collect()
            };
            for (p, logits) in group.iter().zip(&logits) {
                for (k, per_input) in logits.chunks_exact(p.copies * c).enumerate() {
                    if per_input.iter().any(|v| !v.is_finite()) {
                        return Err(Error::Value(format!(
                            "input {}: the model's logits are not finite (NaN or infinite): the \
                             bundle's weights, scales or gates overflow float32",
                            seqs[p.start + k].index
                        )));
                    }
                    sink(p.start + k, p.first_sample, per_input);
                }
            }
        }
        Ok(())
    }

    /// The pieces of a request, in order of inputs, then of samples: at most
    /// [`Encoder::max_rows`] rows each, and on `threads` > 1 threads at most half of an even
    /// share of all the rows, so that every thread has two pieces when the request allows (one
    /// piece per thread left the second core idle for a fifth of the time at batch 1, S = 16;
    /// measured on a 2-core Xeon with `rust/bayeslora-core/examples/thread_scaling.rs`: 91 ms
    /// with two pieces, 71–74 ms with four, 81–86 ms with eight).
    fn plan_pieces(&self, seqs: &[Sequence], s: usize, threads: usize) -> Result<Vec<Piece>> {
        let total = seqs.iter().fold(0usize, |acc, q| {
            acc.saturating_add(q.ids.len().saturating_mul(s))
        });
        let budget = if threads > 1 {
            self.max_rows.min(total.div_ceil(2 * threads)).max(1)
        } else {
            self.max_rows
        };
        let mut pieces = Vec::new();
        let mut start = 0;
        while start < seqs.len() {
            let len = seqs[start].ids.len();
            let (end, sample_chunk) = if len.saturating_mul(s) > budget {
                // one input, its samples in as few chunks as the budget allows, of sizes as
                // equal as they can be (16 samples of at most 5: 4 × 4, not 5, 5, 5, 1)
                let most = (budget / len.max(1)).clamp(1, s);
                (start + 1, s.div_ceil(s.div_ceil(most)))
            } else {
                let mut end = start;
                let mut rows = 0usize;
                while end < seqs.len() {
                    let more = seqs[end].ids.len().saturating_mul(s);
                    if rows.saturating_add(more) > budget {
                        break;
                    }
                    rows += more;
                    end += 1;
                }
                (end, s)
            };
            self.check_piece_size(&seqs[start..end], sample_chunk)?;
            let mut first_sample = 0;
            while first_sample < s {
                let copies = sample_chunk.min(s - first_sample);
                pieces.push(Piece {
                    start,
                    end,
                    first_sample,
                    copies,
                });
                first_sample += copies;
            }
            start = end;
        }
        Ok(pieces)
    }

    /// Every activation of a piece (`copies` copies of its rows, at most the widest layer wide)
    /// has a size that fits `usize`, so the products sizing its buffers cannot overflow.
    fn check_piece_size(&self, piece: &[Sequence], copies: usize) -> Result<()> {
        let rows = piece
            .iter()
            .try_fold(0usize, |acc, q| acc.checked_add(q.ids.len()))
            .and_then(|r| r.checked_mul(copies));
        let floats = rows.and_then(|r| r.checked_mul(self.max_width));
        match floats {
            Some(_) => Ok(()),
            None => Err(Error::Value(format!(
                "a chunk of {} inputs × {copies} samples is too large to allocate",
                piece.len()
            ))),
        }
    }

    /// Logits `[inputs, copies, C]` of `piece` of the call's sequences `all` (its inputs
    /// `start..end`, samples `first_sample..first_sample + copies`), its products split for
    /// `threads` threads.
    fn forward_chunk(
        &self,
        all: &[Sequence],
        piece: &Piece,
        noise: Noise<'_>,
        threads: usize,
    ) -> Vec<f32> {
        let seqs = &all[piece.start..piece.end];
        let h = self.hidden;
        let positions: Vec<InputPositions> = match &self.relative {
            Some(rel) => seqs.par_iter().map(|q| rel.input_positions(q)).collect(),
            None => Vec::new(),
        };
        let pass = Pass {
            noise,
            positions: &positions,
            samples: piece.copies,
            first_sample: piece.first_sample,
            first_input: piece.start,
            seqs,
            threads,
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
            for ((&id, &pos), &ty) in q.ids.iter().zip(&q.positions).zip(&q.types) {
                let (id, pos, ty) = (id as usize, pos as usize, ty as usize);
                let row = &mut x[r * h..(r + 1) * h];
                row.copy_from_slice(&self.word_embeddings[id * h..(id + 1) * h]);
                if let Some(table) = &self.position_embeddings {
                    kernels::add_assign(row, &table[pos * h..(pos + 1) * h]);
                }
                if let Some(tt) = &self.token_types {
                    // ty < type_vocab_size (prepare_typed_at), the table's rows
                    kernels::add_assign(row, &tt[ty * h..(ty + 1) * h]);
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
        par_elementwise(&mut y, activation_fn(self.head_activation));
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
        let last = layer.last;
        let key = &layer.qkv.parts[1];
        let key_noisy = key
            .adapter
            .as_ref()
            .is_some_and(|ad| self.noisy(ad, &key.module, pass));
        let (context, context_layout) = match &layer.pooled {
            Some(pooled) if !key_noisy => self.pooled_attention(layer, pooled, &x, &layout, pass),
            _ => {
                let (qkv, qkv_layout) = self.linear(&layer.qkv, &x, &layout, pass);
                let (qkv, qkv_layout) =
                    self.expand_for_positions(&layer.positions, qkv, qkv_layout, 3 * h, pass);
                let context_layout = if last {
                    Layout::uniform(qkv_layout.inputs(), 1, qkv_layout.copies)
                } else {
                    qkv_layout.clone()
                };
                let context = self.attention(&layer.positions, &qkv, &qkv_layout, last, pass);
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
        self.feed_forward(layer, mid, mid_layout, pass)
    }
}

/// One piece of a request: samples `first_sample..first_sample + copies` of the inputs
/// `start..end`.
#[derive(Clone, Copy, Debug)]
struct Piece {
    start: usize,
    end: usize,
    first_sample: usize,
    copies: usize,
}

/// What one forward pass over a chunk of inputs shares with every step of it.
struct Pass<'a> {
    noise: Noise<'a>,
    /// DeBERTa: the relative-position rows of each input of the chunk (empty otherwise).
    positions: &'a [InputPositions],
    /// Copies per input once the samples diverge (1 unless sampling): the samples
    /// `first_sample..first_sample + samples` of each input.
    samples: usize,
    /// Index in 0..S of copy 0 (keys the noise streams).
    first_sample: usize,
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

fn activation_fn(a: Activation) -> fn(&mut [f32]) {
    match a {
        Activation::Gelu => kernels::gelu,
        Activation::GeluTanh => kernels::gelu_tanh,
        Activation::Relu => kernels::relu,
        Activation::Tanh => kernels::tanh,
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

fn too_large(inputs: usize, samples: usize, classes: usize) -> Error {
    Error::Value(format!(
        "logits of {inputs} inputs × {samples} samples × {classes} classes are more than \
         {MAX_LOGITS} values: ask for fewer, or for the reduced scores (score), whose memory does \
         not grow with the samples"
    ))
}
