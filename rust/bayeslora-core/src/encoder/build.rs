//! Building an [`Encoder`] from a validated bundle: the weights packed for the GEMM, the
//! adapters merged into them (`W' = W + s·B·A`) and kept apart for the noisy terms.

use std::collections::HashMap;

use super::disentangled::{LayerPositions, PositionProjection, Relative};
use super::pool::BufferPool;
use super::Encoder;
use crate::bundle::{Activation, Arch, Bundle, ModelConfig, NoiseKind};
use crate::error::{Error, Result};
use crate::kernels::{self, Epilogue, Isa, Packed};
use crate::mc;

/// An adapter kept apart from the merged weight, for the noisy terms.
#[derive(Debug)]
pub(super) struct Adapter {
    /// The module's key in the noise streams ([`mc::fnv1a`] of its name).
    pub stream_key: u64,
    pub rank: usize,
    pub d_in: usize,
    pub d_out: usize,
    /// `alpha / r0`.
    pub scale: f32,
    /// `A`, `[rank, d_in]` row-major.
    pub lora_a: Vec<f32>,
    /// `B`, `[d_out, rank]` row-major.
    pub lora_b: Vec<f32>,
    /// `Aᵀ` packed: `x · Aᵀ` is the rank activations of rows `x`.
    pub lora_a_packed: Packed,
    /// `Bᵀ` packed.
    pub lora_b_packed: Packed,
    /// Standard deviation of each rank's noise: gate `exp(½·clamp(log α))`, additive
    /// `σ = exp(½·clamp(log σ²))`; empty for the other methods.
    pub noise_std: Vec<f32>,
    /// Original position of each rank (keys its noise).
    pub rank_index: Vec<u64>,
}

/// One HF linear module inside a (possibly fused) [`Linear`].
#[derive(Debug)]
pub(super) struct LinearPart {
    /// The HF module name.
    pub module: String,
    /// Its first output column in the fused product.
    pub first_col: usize,
    /// Its adapter, if the bundle adapts it with rank > 0.
    pub adapter: Option<Adapter>,
}

/// One product: one or several HF linears with the same input, fused along the output.
#[derive(Debug)]
pub(super) struct Linear {
    pub d_in: usize,
    pub d_out: usize,
    /// `W'ᵀ` packed (adapters merged).
    pub weight: Packed,
    pub bias: Vec<f32>,
    pub parts: Vec<LinearPart>,
}

/// A LayerNorm's affine parameters.
#[derive(Debug)]
pub(super) struct LayerNorm {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
}

/// What the last layer needs to attend from token 0 only without keys and values of all tokens.
#[derive(Debug)]
pub(super) struct PooledAttention {
    /// Per head: the merged key weight rows of the head, packed as `dh × d_in`.
    pub key_rows: Vec<Packed>,
    /// The value projection alone (a copy of the fused one's V part, adapter included).
    pub value: Linear,
}

/// One encoder layer (post-LN BERT block).
#[derive(Debug)]
pub(super) struct Layer {
    /// Query, key and value fused (in that order along the output).
    pub qkv: Linear,
    /// The last layer (it computes token 0 alone).
    pub last: bool,
    /// The last layer's attention by linearity (not for DeBERTa, whose relative scores need
    /// every key).
    pub pooled: Option<PooledAttention>,
    /// DeBERTa's relative-position projections (empty otherwise).
    pub positions: LayerPositions,
    /// The attention output projection.
    pub attn_out: Linear,
    /// LayerNorm after the attention block's residual.
    pub attn_norm: LayerNorm,
    /// FFN: hidden → intermediate.
    pub ffn_in: Linear,
    /// FFN: intermediate → hidden.
    pub ffn_out: Linear,
    /// LayerNorm after the FFN's residual.
    pub ffn_norm: LayerNorm,
}

/// The widest activation of a token (floats): the fused Q/K/V (3·hidden) or the feed-forward's
/// intermediate. The default piece size ([`super::default_max_rows`]) keeps a piece's widest
/// activation near [`super::PIECE_BYTES`] with it: 1024 rows of MiniLM (its 1536-wide FFN).
/// The last layer's per-head rows (heads·hidden floats) are one per input and sample, not per
/// token, and do not count here (with them the default was a third as large, and a pass at
/// batch 1, S = 16 ran in four pieces instead of one).
pub(super) fn token_width(cfg: &ModelConfig) -> usize {
    (3 * cfg.hidden).max(cfg.intermediate)
}

fn copy_tensor(bundle: &Bundle, name: &str) -> Result<Vec<f32>> {
    Ok(bundle.tensor(name)?.data.clone())
}

fn layer_norm(bundle: &Bundle, prefix: &str) -> Result<LayerNorm> {
    Ok(LayerNorm {
        gamma: copy_tensor(bundle, &format!("{prefix}.weight"))?,
        beta: copy_tensor(bundle, &format!("{prefix}.bias"))?,
    })
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
        let first_col = bias.len();
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
            let noise_std = match noise {
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
                stream_key: mc::fnv1a(name.as_bytes()),
                rank: r,
                d_in: din,
                d_out,
                scale,
                lora_a_packed: Packed::from_nk(&t.lora_a, r, din, din),
                lora_b_packed: Packed::from_nk(&t.lora_b, d_out, r, r),
                lora_a: t.lora_a.clone(),
                lora_b: t.lora_b.clone(),
                noise_std,
                rank_index: t.rank_index.clone(),
            });
        }
        if w.iter().any(|v| !v.is_finite()) {
            return Err(Error::Bundle(format!(
                "{}: module {name:?}: the weight with its adapter merged (W + scale·B·A) \
                 overflows float32",
                bundle.dir.display()
            )));
        }
        rows.extend_from_slice(&w);
        parts.push(LinearPart {
            module: name.clone(),
            first_col,
            adapter,
        });
    }
    let d_out = bias.len();
    Ok(Linear {
        d_in,
        d_out,
        weight: Packed::from_weight(&rows, d_out, d_in),
        bias,
        parts,
    })
}

/// DeBERTa's relative embeddings (after their LayerNorm when the config asks for it).
fn relative(bundle: &Bundle) -> Result<Option<Relative>> {
    let cfg = &bundle.config;
    let Some(d) = cfg.deberta.as_ref().filter(|d| d.relative_attention) else {
        return Ok(None);
    };
    let mut embeddings = copy_tensor(bundle, "deberta.encoder.rel_embeddings.weight")?;
    if d.norm_rel_embeddings {
        let norm = layer_norm(bundle, "deberta.encoder.LayerNorm")?;
        kernels::layer_norm(&mut embeddings, &norm.gamma, &norm.beta, cfg.layer_norm_eps);
    }
    Ok(Some(Relative {
        span: d.span,
        buckets: d.position_buckets,
        max_relative: d.max_relative_positions,
        c2p: d.c2p,
        p2c: d.p2c,
        embeddings,
    }))
}

/// Module `name` applied to every relative embedding, with its adapter kept for the noise.
fn position_projection(bundle: &Bundle, name: &str, rel: &Relative) -> Result<PositionProjection> {
    let lin = build_linear(bundle, &[name.to_string()])?;
    let rows = 2 * rel.span;
    let mut mean = vec![0.0f32; rows * lin.d_out];
    kernels::par_gemm(
        rows,
        &rel.embeddings,
        lin.d_in,
        &lin.weight,
        &mut mean,
        lin.d_out,
        Epilogue::Bias(&lin.bias),
        rayon::current_num_threads(),
    );
    let part = lin
        .parts
        .into_iter()
        .next()
        .ok_or_else(|| Error::Bundle(format!("internal: module {name:?} has no part")))?;
    Ok(PositionProjection { mean, part })
}

/// Layer `lp`'s position projections: p2c queries and c2p keys, through the layer's own query
/// and key projections (`share_att_key`) or its `pos_query_proj`/`pos_key_proj`.
fn layer_positions(
    bundle: &Bundle,
    rel: Option<&Relative>,
    lp: &str,
    [query, key]: [&str; 2],
) -> Result<LayerPositions> {
    let cfg = &bundle.config;
    let Some(rel) = rel else {
        return Ok(LayerPositions::default());
    };
    let [own_query, own_key] = cfg.position_projections();
    let name =
        |own: Option<&str>, shared: &str| own.map_or(shared.to_string(), |s| format!("{lp}.{s}"));
    Ok(LayerPositions {
        query: rel
            .p2c
            .then(|| position_projection(bundle, &name(own_query, query), rel))
            .transpose()?,
        key: rel
            .c2p
            .then(|| position_projection(bundle, &name(own_key, key), rel))
            .transpose()?,
    })
}

impl Encoder {
    /// Build from a validated bundle (packs the weights, merges the adapters).
    pub fn new(bundle: &Bundle) -> Result<Self> {
        // the kernels' set (BAYESLORA_ISA) is refused here, before any kernel runs
        Isa::selected()?;
        let cfg = &bundle.config;
        let p = cfg.prefix();
        let relative = relative(bundle)?;
        let deberta = cfg.arch == Arch::DebertaV2;
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let lp = cfg.layer_prefix(l);
            let [query, key, value, attn_out, ffn_in, ffn_out] =
                cfg.layer_linears().map(|ll| format!("{lp}.{}", ll.suffix));
            let [attn_norm, ffn_norm] = cfg.layer_norm_suffixes();
            let positions = layer_positions(bundle, relative.as_ref(), &lp, [&query, &key])?;
            let qkv = build_linear(bundle, &[query, key, value.clone()])?;
            let last = l + 1 == cfg.layers;
            let pooled = if last && !deberta {
                let dh = cfg.hidden / cfg.heads;
                let k0 = qkv.parts[1].first_col;
                Some(PooledAttention {
                    key_rows: (0..cfg.heads)
                        .map(|hd| qkv.weight.transpose_cols(k0 + hd * dh, k0 + (hd + 1) * dh))
                        .collect(),
                    value: build_linear(bundle, &[value])?,
                })
            } else {
                None
            };
            layers.push(Layer {
                qkv,
                last,
                pooled,
                positions,
                attn_out: build_linear(bundle, &[attn_out])?,
                attn_norm: layer_norm(bundle, &format!("{lp}.{attn_norm}"))?,
                ffn_in: build_linear(bundle, &[ffn_in])?,
                ffn_out: build_linear(bundle, &[ffn_out])?,
                ffn_norm: layer_norm(bundle, &format!("{lp}.{ffn_norm}"))?,
            });
        }
        let [head_hidden, head_out] = cfg.head_linears(bundle.meta.num_labels);
        // the bundle checked the table's shape: [type_vocab_size, hidden]
        let token_types = if cfg.type_vocab_size > 0 {
            Some(copy_tensor(
                bundle,
                &format!("{p}.embeddings.token_type_embeddings.weight"),
            )?)
        } else {
            None
        };
        // heads·H: the last layer's per-head key queries and pooled rows (a row per copy, not
        // per token: they bound the buffers, not the piece size)
        let per_token = token_width(cfg);
        let max_width = per_token
            .max(cfg.heads * cfg.hidden)
            .max(bundle.meta.num_labels);
        Ok(Self {
            arch: cfg.arch,
            hidden: cfg.hidden,
            heads: cfg.heads,
            vocab_size: cfg.vocab_size,
            max_positions: cfg.max_positions,
            pad_token_id: u32::try_from(cfg.pad_token_id).map_err(|_| {
                Error::Bundle(format!(
                    "{}: pad_token_id {} is out of range",
                    bundle.dir.display(),
                    cfg.pad_token_id
                ))
            })?,
            eps: cfg.layer_norm_eps,
            activation: cfg.activation,
            head_activation: match (cfg.arch, &cfg.deberta) {
                (_, Some(d)) => d.pooler_activation,
                (Arch::DistilBert, _) => Activation::Relu,
                _ => Activation::Tanh,
            },
            // transformers: √(d_head · (1 + c2p + p2c)), whether or not attention is relative
            score_scale: {
                let terms = cfg
                    .deberta
                    .as_ref()
                    .map_or(1, |d| 1 + usize::from(d.c2p) + usize::from(d.p2c));
                1.0 / ((cfg.hidden / cfg.heads) as f32 * terms as f32).sqrt()
            },
            relative,
            num_labels: bundle.meta.num_labels,
            noise: bundle.meta.noise(),
            dropout: bundle.meta.dropout as f32,
            word_embeddings: copy_tensor(
                bundle,
                &format!("{p}.embeddings.word_embeddings.weight"),
            )?,
            position_embeddings: if cfg.has_position_embeddings() {
                Some(copy_tensor(
                    bundle,
                    &format!("{p}.embeddings.position_embeddings.weight"),
                )?)
            } else {
                None
            },
            token_types,
            type_vocab_size: cfg.type_vocab_size,
            embedding_norm: layer_norm(bundle, &format!("{p}.embeddings.LayerNorm"))?,
            layers,
            head_hidden: build_linear(bundle, &[head_hidden.name])?,
            head_out: build_linear(bundle, &[head_out.name])?,
            module_ranks: bundle
                .meta
                .modules
                .iter()
                .map(|(k, m)| (k.clone(), m.rank))
                .collect::<HashMap<_, _>>(),
            buffers: BufferPool::default(),
            max_rows: super::default_max_rows(per_token),
            max_width,
        })
    }
}
