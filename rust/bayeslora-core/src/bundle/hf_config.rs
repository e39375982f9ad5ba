//! What the encoder needs from the HF `config.json`, and the names and shapes of the tensors
//! of each architecture (the state-dict layout of BERT, DistilBERT, RoBERTa and DeBERTa-v2
//! classifiers; DeBERTa's own options are in [`super::deberta`]).

use std::path::Path;

use serde_json::Value;

use super::bundle_err;
use super::deberta::{self, DebertaConfig};
use super::tensors::TensorSpec;
use crate::error::Result;

/// Encoder family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `BertForSequenceClassification` (also MiniLM).
    Bert,
    /// `DistilBertForSequenceClassification`.
    DistilBert,
    /// `RobertaForSequenceClassification`.
    Roberta,
    /// `DebertaV2ForSequenceClassification` (DeBERTa-v2 and -v3).
    DebertaV2,
}

impl Arch {
    pub(super) fn parse(s: &str) -> Option<Self> {
        match s {
            "bert" => Some(Self::Bert),
            "distilbert" => Some(Self::DistilBert),
            "roberta" => Some(Self::Roberta),
            "deberta-v2" => Some(Self::DebertaV2),
            _ => None,
        }
    }
}

/// Feed-forward activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Exact erf GELU (`"gelu"`).
    Gelu,
    /// Tanh approximation (`"gelu_new"`, `"gelu_pytorch_tanh"`).
    GeluTanh,
    /// `"relu"`.
    Relu,
    /// `"tanh"` (DeBERTa's `pooler_hidden_act` may name it).
    Tanh,
}

/// What the encoder needs from the HF `config.json`.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// Family.
    pub arch: Arch,
    /// Vocabulary rows.
    pub vocab_size: usize,
    /// Hidden width H.
    pub hidden: usize,
    /// Encoder layers.
    pub layers: usize,
    /// Attention heads (divides H).
    pub heads: usize,
    /// Feed-forward width.
    pub intermediate: usize,
    /// Position-embedding rows.
    pub max_positions: usize,
    /// Token-type rows (0 for DistilBERT).
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f32,
    /// FFN activation.
    pub activation: Activation,
    /// RoBERTa's padding index (positions start after it).
    pub pad_token_id: usize,
    /// DeBERTa-v2's options (None for the other families).
    pub deberta: Option<DebertaConfig>,
}

fn get_usize(cfg: &Value, key: &str, path: &Path, max: usize) -> Result<usize> {
    let v = cfg
        .get(key)
        .ok_or_else(|| bundle_err(format!("{}: missing key {key:?}", path.display())))?;
    let n = v.as_u64().ok_or_else(|| {
        bundle_err(format!(
            "{}: {key:?} must be a non-negative integer, got {v}",
            path.display()
        ))
    })?;
    usize::try_from(n)
        .ok()
        .filter(|&n| (1..=max).contains(&n))
        .ok_or_else(|| {
            bundle_err(format!(
                "{}: {key:?} = {n} is out of range 1..={max}",
                path.display()
            ))
        })
}

/// An optional string: absent or `null` is `None`, anything but a string an error.
fn get_str<'a>(cfg: &'a Value, key: &str, path: &Path) -> Result<Option<&'a str>> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(bundle_err(format!(
            "{}: {key:?} must be a string, got {v}",
            path.display()
        ))),
    }
}

/// DeBERTa's `type_vocab_size`: 0 (the default) means no token-type table.
fn type_vocab_size_or_0(cfg: &Value, path: &Path, max: usize) -> Result<usize> {
    match cfg.get("type_vocab_size") {
        None | Some(Value::Null) => Ok(0),
        Some(v) if v.as_u64() == Some(0) => Ok(0),
        Some(_) => get_usize(cfg, "type_vocab_size", path, max),
    }
}

/// RoBERTa's `pad_token_id` (default 1): a token id (`< vocab_size`) whose next position still
/// has a row in the position table (`+ 1 < max_position_embeddings`: positions start after it).
/// Other families do not use it; if given, it must still be a token id or `null`.
fn pad_token_id(
    cfg: &Value,
    arch: Arch,
    vocab_size: usize,
    max_positions: usize,
    path: &Path,
) -> Result<usize> {
    let p = path.display();
    let roberta = arch == Arch::Roberta;
    let id = match cfg.get("pad_token_id") {
        None if roberta => 1,
        None | Some(Value::Null) if !roberta => return Ok(0),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                bundle_err(format!(
                    "{p}: \"pad_token_id\" must be a non-negative integer, got {v}"
                ))
            })?,
        None => 1,
    };
    if id >= vocab_size {
        return Err(bundle_err(format!(
            "{p}: \"pad_token_id\" = {id} is not a token id (vocab_size {vocab_size})"
        )));
    }
    if roberta && id.saturating_add(1) >= max_positions {
        return Err(bundle_err(format!(
            "{p}: \"pad_token_id\" = {id} leaves no position (RoBERTa numbers tokens from \
             pad_token_id + 1; max_position_embeddings {max_positions})"
        )));
    }
    Ok(if roberta { id } else { 0 })
}

impl ModelConfig {
    /// Parse the HF config of an architecture (`arch` from `bayeslora.json`).
    pub fn from_json(cfg: &Value, arch: Arch, path: &Path) -> Result<Self> {
        let p = path.display();
        let model_type = get_str(cfg, "model_type", path)?.unwrap_or("");
        let family_ok = match arch {
            Arch::Bert => model_type == "bert",
            Arch::DistilBert => model_type == "distilbert",
            Arch::Roberta => ["roberta", "xlm-roberta", "camembert"].contains(&model_type),
            Arch::DebertaV2 => model_type == "deberta-v2",
        };
        if !family_ok {
            return Err(bundle_err(format!(
                "{p}: model_type {model_type:?} does not match architecture {arch:?}"
            )));
        }
        const BIG: usize = 1 << 20;
        let (hidden, layers, heads, intermediate, act, eps, type_vocab) = match arch {
            Arch::DistilBert => {
                let act = get_str(cfg, "activation", path)?.unwrap_or("gelu");
                (
                    get_usize(cfg, "dim", path, 1 << 16)?,
                    get_usize(cfg, "n_layers", path, 1024)?,
                    get_usize(cfg, "n_heads", path, 1024)?,
                    get_usize(cfg, "hidden_dim", path, 1 << 18)?,
                    act,
                    1e-12,
                    0,
                )
            }
            Arch::Bert | Arch::Roberta | Arch::DebertaV2 => {
                let deberta = arch == Arch::DebertaV2;
                // as f32 too: the runtime adds it in f32, where 1e-50 would be 0
                let eps = match cfg.get("layer_norm_eps") {
                    None if deberta => 1e-7,
                    None => 1e-12,
                    Some(v) => v
                        .as_f64()
                        .filter(|e| e.is_finite() && *e > 0.0 && *e < 1.0 && (*e as f32) > 0.0)
                        .ok_or_else(|| {
                            bundle_err(format!(
                                "{p}: layer_norm_eps must be a number in (0, 1), got {v}"
                            ))
                        })?,
                };
                if let Some(kind) = get_str(cfg, "position_embedding_type", path)? {
                    if kind != "absolute" {
                        return Err(bundle_err(format!(
                            "{p}: position_embedding_type {kind:?} is not supported"
                        )));
                    }
                }
                (
                    get_usize(cfg, "hidden_size", path, 1 << 16)?,
                    get_usize(cfg, "num_hidden_layers", path, 1024)?,
                    get_usize(cfg, "num_attention_heads", path, 1024)?,
                    get_usize(cfg, "intermediate_size", path, 1 << 18)?,
                    get_str(cfg, "hidden_act", path)?.unwrap_or("gelu"),
                    eps,
                    if deberta {
                        type_vocab_size_or_0(cfg, path, BIG)?
                    } else {
                        get_usize(cfg, "type_vocab_size", path, BIG)?
                    },
                )
            }
        };
        if hidden % heads != 0 {
            return Err(bundle_err(format!(
                "{p}: hidden size {hidden} is not a multiple of heads {heads}"
            )));
        }
        let activation = match act {
            "tanh" => {
                return Err(bundle_err(format!(
                    "{p}: activation \"tanh\" is not supported"
                )))
            }
            other => deberta::activation(other, path)?,
        };
        let vocab_size = get_usize(cfg, "vocab_size", path, 1 << 24)?;
        let max_positions = get_usize(cfg, "max_position_embeddings", path, BIG)?;
        let pad_token_id = pad_token_id(cfg, arch, vocab_size, max_positions, path)?;
        let deberta = match arch {
            Arch::DebertaV2 => Some(DebertaConfig::from_json(
                cfg,
                hidden,
                heads,
                max_positions,
                path,
            )?),
            _ => None,
        };
        Ok(Self {
            arch,
            vocab_size,
            hidden,
            layers,
            heads,
            intermediate,
            max_positions,
            type_vocab_size: type_vocab,
            layer_norm_eps: eps as f32,
            activation,
            pad_token_id,
            deberta,
        })
    }

    /// State-dict prefix of the encoder.
    pub fn prefix(&self) -> &'static str {
        match self.arch {
            Arch::Bert => "bert",
            Arch::DistilBert => "distilbert",
            Arch::Roberta => "roberta",
            Arch::DebertaV2 => "deberta",
        }
    }

    /// Every linear layer the encoder runs, in execution order.
    pub fn linears(&self, num_labels: usize) -> Vec<LinearSpec> {
        let width = |w: Width| match w {
            Width::Hidden => self.hidden,
            Width::Intermediate => self.intermediate,
        };
        let mut out = Vec::new();
        for l in 0..self.layers {
            for ll in self.layer_linears() {
                out.push(LinearSpec {
                    name: format!("{}.{}", self.layer_prefix(l), ll.suffix),
                    d_in: width(ll.input),
                    d_out: width(ll.output),
                });
            }
            for suffix in self.position_projections().into_iter().flatten() {
                out.push(LinearSpec {
                    name: format!("{}.{suffix}", self.layer_prefix(l)),
                    d_in: self.hidden,
                    d_out: self.hidden,
                });
            }
        }
        out.extend(self.head_linears(num_labels));
        out
    }

    /// Prefix of layer `l`'s modules.
    pub fn layer_prefix(&self, l: usize) -> String {
        match self.arch {
            Arch::DistilBert => format!("distilbert.transformer.layer.{l}"),
            _ => format!("{}.encoder.layer.{l}", self.prefix()),
        }
    }

    /// DeBERTa's per-layer position projections of its own (without `share_att_key`):
    /// `[pos_query_proj (p2c), pos_key_proj (c2p)]`, each when the layer has it.
    pub fn position_projections(&self) -> [Option<&'static str>; 2] {
        match &self.deberta {
            Some(d) => {
                let (q, k) = d.own_position_projections();
                [
                    q.then_some("attention.self.pos_query_proj"),
                    k.then_some("attention.self.pos_key_proj"),
                ]
            }
            None => [None, None],
        }
    }

    /// One layer's linears: query, key, value, attention output, FFN in, FFN out.
    pub fn layer_linears(&self) -> [LayerLinear; 6] {
        use Width::{Hidden, Intermediate};
        let suffixes = match self.arch {
            Arch::DistilBert => [
                "attention.q_lin",
                "attention.k_lin",
                "attention.v_lin",
                "attention.out_lin",
                "ffn.lin1",
                "ffn.lin2",
            ],
            Arch::DebertaV2 => [
                "attention.self.query_proj",
                "attention.self.key_proj",
                "attention.self.value_proj",
                "attention.output.dense",
                "intermediate.dense",
                "output.dense",
            ],
            _ => [
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
                "attention.output.dense",
                "intermediate.dense",
                "output.dense",
            ],
        };
        let widths = [
            (Hidden, Hidden),
            (Hidden, Hidden),
            (Hidden, Hidden),
            (Hidden, Hidden),
            (Hidden, Intermediate),
            (Intermediate, Hidden),
        ];
        std::array::from_fn(|i| LayerLinear {
            suffix: suffixes[i],
            input: widths[i].0,
            output: widths[i].1,
        })
    }

    /// Suffixes of one layer's two LayerNorms (after attention, after the FFN).
    pub fn layer_norm_suffixes(&self) -> [&'static str; 2] {
        match self.arch {
            Arch::DistilBert => ["sa_layer_norm", "output_layer_norm"],
            _ => ["attention.output.LayerNorm", "output.LayerNorm"],
        }
    }

    /// The head's two linears: hidden → hidden (pooler / pre-classifier), hidden → classes.
    pub fn head_linears(&self, num_labels: usize) -> [LinearSpec; 2] {
        let h = self.hidden;
        let [dense, out] = match self.arch {
            Arch::Bert => ["bert.pooler.dense", "classifier"],
            Arch::DistilBert => ["pre_classifier", "classifier"],
            Arch::Roberta => ["classifier.dense", "classifier.out_proj"],
            Arch::DebertaV2 => ["pooler.dense", "classifier"],
        };
        [
            LinearSpec {
                name: dense.into(),
                d_in: h,
                d_out: h,
            },
            LinearSpec {
                name: out.into(),
                d_in: h,
                d_out: num_labels,
            },
        ]
    }

    /// Whether inputs get absolute position embeddings (all but DeBERTa without
    /// `position_biased_input`).
    pub fn has_position_embeddings(&self) -> bool {
        self.deberta
            .as_ref()
            .is_none_or(|d| d.position_biased_input)
    }

    /// Embedding tables and LayerNorm (and DeBERTa's relative-position table).
    pub fn embedding_tensors(&self) -> Vec<TensorSpec> {
        let p = self.prefix();
        let h = self.hidden;
        let mut v = vec![
            TensorSpec::float(
                format!("{p}.embeddings.word_embeddings.weight"),
                vec![self.vocab_size, h],
            ),
            TensorSpec::float(format!("{p}.embeddings.LayerNorm.weight"), vec![h]),
            TensorSpec::float(format!("{p}.embeddings.LayerNorm.bias"), vec![h]),
        ];
        if self.has_position_embeddings() {
            v.push(TensorSpec::float(
                format!("{p}.embeddings.position_embeddings.weight"),
                vec![self.max_positions, h],
            ));
        }
        if let Some(d) = &self.deberta {
            v.extend(d.encoder_tensors(h));
        }
        if self.type_vocab_size > 0 {
            v.push(TensorSpec::float(
                format!("{p}.embeddings.token_type_embeddings.weight"),
                vec![self.type_vocab_size, h],
            ));
        }
        v
    }
}

/// A linear layer of the model: its HF module name and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearSpec {
    /// HF module name (`….weight`, `….bias` are its tensors).
    pub name: String,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
}

/// Which width of the model a linear's input or output has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    /// The hidden size H.
    Hidden,
    /// The feed-forward size.
    Intermediate,
}

/// One of a layer's six linears: its name after the layer prefix, and its widths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerLinear {
    /// Module name after the layer prefix.
    pub suffix: &'static str,
    /// Width of the input.
    pub input: Width,
    /// Width of the output.
    pub output: Width,
}
