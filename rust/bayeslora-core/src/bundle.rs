//! The exported bundle: `bayeslora.json`, `config.json` (the HF model config) and
//! `model.safetensors`, read and validated before anything large is allocated.
//!
//! Order of work: the two JSON files are parsed into typed structs and range-checked; the
//! tensor file is memory-mapped and its header checked by `safetensors` (offsets contiguous,
//! sizes consistent with the file length); then every tensor the encoder needs is checked by
//! name, dtype and shape against the config, every adapter against `bayeslora.json`; only then
//! are the tensors copied out (converted to f32).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// File names inside a bundle directory.
pub const META_FILE: &str = "bayeslora.json";
/// The HF model config.
pub const CONFIG_FILE: &str = "config.json";
/// Base weights and adapters.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Bundle format understood by this reader.
pub const FORMAT_VERSION: u32 = 1;
/// JSON files larger than this are refused before reading (they are a few KiB in practice).
const MAX_JSON_BYTES: u64 = 64 << 20;

fn bundle_err(msg: impl Into<String>) -> Error {
    Error::Bundle(msg.into())
}

/// Per adapted module, from `bayeslora.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct ModuleMeta {
    /// Current (physical) rank after pruning; 0 = the module contributes nothing.
    pub rank: usize,
    /// Rank at initialisation (`r0`; noise is keyed by positions in `0..r0`).
    pub initial_rank: usize,
    /// `alpha / r0`.
    pub scale: f64,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
}

/// `bayeslora.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct BundleMeta {
    /// Must equal [`FORMAT_VERSION`].
    pub format_version: u32,
    /// `"bert"`, `"distilbert"` or `"roberta"`.
    pub architecture: String,
    /// The HF `model_type`.
    pub model_type: String,
    /// `"bayeslora"`, `"lora"` or `"mcdropout"`.
    pub method: String,
    /// `"gate"` or `"additive"`.
    pub posterior: String,
    /// Classes of the head.
    pub num_labels: usize,
    /// Class names (may be empty).
    #[serde(default)]
    pub labels: Vec<String>,
    /// τ the export pruned with.
    pub prune_threshold: f64,
    /// Drop probability of `mcdropout`.
    pub dropout: f64,
    /// `"float32"` or `"bfloat16"`: storage dtype of the weights.
    pub dtype: String,
    /// Tokens per input the tokenizer truncates to.
    pub max_length: usize,
    /// Adapted modules by HF module name.
    pub modules: BTreeMap<String, ModuleMeta>,
}

/// How a module's adapter is perturbed in MC mode (SPEC §2, `layers.py`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoiseKind {
    /// `lora`: deterministic.
    None,
    /// `bayeslora` + `gate`: `z = 1 + exp(½·clamp(log α, −10, 10))·ε`.
    Gate,
    /// `bayeslora` + `additive`: `A = M_A + σ ε`, `B = M_B + σ ε'`.
    Additive,
    /// `mcdropout`: `z ∈ {0, 1/(1−p)}`.
    Dropout,
}

impl BundleMeta {
    /// The noise family of the adapters.
    pub fn noise(&self) -> NoiseKind {
        match (self.method.as_str(), self.posterior.as_str()) {
            ("bayeslora", "additive") => NoiseKind::Additive,
            ("bayeslora", _) => NoiseKind::Gate,
            ("mcdropout", _) => NoiseKind::Dropout,
            _ => NoiseKind::None,
        }
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let p = path.display();
        if self.format_version != FORMAT_VERSION {
            return Err(bundle_err(format!(
                "{p}: unsupported format_version {} (this reader understands {FORMAT_VERSION})",
                self.format_version
            )));
        }
        if !["bayeslora", "lora", "mcdropout"].contains(&self.method.as_str()) {
            return Err(bundle_err(format!("{p}: unknown method {:?}", self.method)));
        }
        if !["gate", "additive"].contains(&self.posterior.as_str()) {
            return Err(bundle_err(format!(
                "{p}: unknown posterior {:?}",
                self.posterior
            )));
        }
        if !["float32", "bfloat16"].contains(&self.dtype.as_str()) {
            return Err(bundle_err(format!(
                "{p}: unsupported dtype {:?}",
                self.dtype
            )));
        }
        if self.num_labels == 0 || self.num_labels > 1_000_000 {
            return Err(bundle_err(format!(
                "{p}: num_labels {} out of range",
                self.num_labels
            )));
        }
        if !self.labels.is_empty() && self.labels.len() != self.num_labels {
            return Err(bundle_err(format!(
                "{p}: {} label names for num_labels = {}",
                self.labels.len(),
                self.num_labels
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(bundle_err(format!(
                "{p}: dropout {} not in [0, 1)",
                self.dropout
            )));
        }
        if self.max_length == 0 || self.max_length > 1 << 20 {
            return Err(bundle_err(format!(
                "{p}: max_length {} out of range",
                self.max_length
            )));
        }
        for (name, m) in &self.modules {
            if m.rank > m.initial_rank || m.initial_rank > 1 << 16 {
                return Err(bundle_err(format!(
                    "{p}: module {name:?} has rank {} > initial_rank {} (or an absurd initial_rank)",
                    m.rank, m.initial_rank
                )));
            }
            if !m.scale.is_finite() {
                return Err(bundle_err(format!(
                    "{p}: module {name:?} has a non-finite scale"
                )));
            }
        }
        Ok(())
    }
}

/// Encoder family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `BertForSequenceClassification` (also MiniLM).
    Bert,
    /// `DistilBertForSequenceClassification`.
    DistilBert,
    /// `RobertaForSequenceClassification`.
    Roberta,
}

impl Arch {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "bert" => Some(Self::Bert),
            "distilbert" => Some(Self::DistilBert),
            "roberta" => Some(Self::Roberta),
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
    if n == 0 || n as u128 > max as u128 {
        return Err(bundle_err(format!(
            "{}: {key:?} = {n} is out of range 1..={max}",
            path.display()
        )));
    }
    Ok(n as usize)
}

fn get_str<'a>(cfg: &'a Value, key: &str) -> Option<&'a str> {
    cfg.get(key).and_then(Value::as_str)
}

impl ModelConfig {
    /// Parse the HF config of an architecture (`arch` from `bayeslora.json`).
    pub fn from_json(cfg: &Value, arch: Arch, path: &Path) -> Result<Self> {
        let p = path.display();
        let model_type = get_str(cfg, "model_type").unwrap_or("");
        let family_ok = match arch {
            Arch::Bert => model_type == "bert",
            Arch::DistilBert => model_type == "distilbert",
            Arch::Roberta => ["roberta", "xlm-roberta", "camembert"].contains(&model_type),
        };
        if !family_ok {
            return Err(bundle_err(format!(
                "{p}: model_type {model_type:?} does not match architecture {arch:?}"
            )));
        }
        const BIG: usize = 1 << 20;
        let (hidden, layers, heads, intermediate, act, eps, type_vocab) = match arch {
            Arch::DistilBert => {
                let act = get_str(cfg, "activation").unwrap_or("gelu");
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
            Arch::Bert | Arch::Roberta => {
                let eps = match cfg.get("layer_norm_eps") {
                    None => 1e-12,
                    Some(v) => v
                        .as_f64()
                        .filter(|e| e.is_finite() && *e >= 0.0 && *e < 1.0)
                        .ok_or_else(|| {
                            bundle_err(format!("{p}: layer_norm_eps must be a number in [0, 1)"))
                        })?,
                };
                if let Some(kind) = get_str(cfg, "position_embedding_type") {
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
                    get_str(cfg, "hidden_act").unwrap_or("gelu"),
                    eps,
                    get_usize(cfg, "type_vocab_size", path, BIG)?,
                )
            }
        };
        if hidden % heads != 0 {
            return Err(bundle_err(format!(
                "{p}: hidden size {hidden} is not a multiple of heads {heads}"
            )));
        }
        let activation = match act {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => {
                return Err(bundle_err(format!(
                    "{p}: activation {other:?} is not supported"
                )))
            }
        };
        let pad_token_id = match arch {
            Arch::Roberta => cfg.get("pad_token_id").and_then(Value::as_u64).unwrap_or(1) as usize,
            _ => 0,
        };
        Ok(Self {
            arch,
            vocab_size: get_usize(cfg, "vocab_size", path, 1 << 24)?,
            hidden,
            layers,
            heads,
            intermediate,
            max_positions: get_usize(cfg, "max_position_embeddings", path, BIG)?,
            type_vocab_size: type_vocab,
            layer_norm_eps: eps as f32,
            activation,
            pad_token_id,
        })
    }

    /// State-dict prefix of the encoder.
    pub fn prefix(&self) -> &'static str {
        match self.arch {
            Arch::Bert => "bert",
            Arch::DistilBert => "distilbert",
            Arch::Roberta => "roberta",
        }
    }

    /// `(name, d_in, d_out)` of every linear layer the encoder runs, in execution order.
    pub fn linears(&self, num_labels: usize) -> Vec<(String, usize, usize)> {
        let (h, i) = (self.hidden, self.intermediate);
        let mut out = Vec::new();
        for l in 0..self.layers {
            for (suffix, d_in, d_out) in self.layer_linear_suffixes() {
                let d_in = if d_in == 0 { i } else { h };
                let d_out = if d_out == 0 { i } else { h };
                out.push((format!("{}.{suffix}", self.layer_prefix(l)), d_in, d_out));
            }
        }
        for (name, d_out) in self.head_linears(num_labels) {
            out.push((name, h, d_out));
        }
        out
    }

    /// Prefix of layer `l`'s modules.
    pub fn layer_prefix(&self, l: usize) -> String {
        match self.arch {
            Arch::DistilBert => format!("distilbert.transformer.layer.{l}"),
            _ => format!("{}.encoder.layer.{l}", self.prefix()),
        }
    }

    /// Suffixes of one layer's linears with (d_in, d_out) codes: 1 = hidden, 0 = intermediate.
    /// Order: query, key, value, attention output, FFN in, FFN out.
    pub fn layer_linear_suffixes(&self) -> [(&'static str, usize, usize); 6] {
        match self.arch {
            Arch::DistilBert => [
                ("attention.q_lin", 1, 1),
                ("attention.k_lin", 1, 1),
                ("attention.v_lin", 1, 1),
                ("attention.out_lin", 1, 1),
                ("ffn.lin1", 1, 0),
                ("ffn.lin2", 0, 1),
            ],
            _ => [
                ("attention.self.query", 1, 1),
                ("attention.self.key", 1, 1),
                ("attention.self.value", 1, 1),
                ("attention.output.dense", 1, 1),
                ("intermediate.dense", 1, 0),
                ("output.dense", 0, 1),
            ],
        }
    }

    /// Suffixes of one layer's two LayerNorms (after attention, after the FFN).
    pub fn layer_norm_suffixes(&self) -> [&'static str; 2] {
        match self.arch {
            Arch::DistilBert => ["sa_layer_norm", "output_layer_norm"],
            _ => ["attention.output.LayerNorm", "output.LayerNorm"],
        }
    }

    /// The head's linears `(name, d_out)` in order; all take H inputs.
    pub fn head_linears(&self, num_labels: usize) -> Vec<(String, usize)> {
        let h = self.hidden;
        match self.arch {
            Arch::Bert => vec![
                ("bert.pooler.dense".into(), h),
                ("classifier".into(), num_labels),
            ],
            Arch::DistilBert => vec![
                ("pre_classifier".into(), h),
                ("classifier".into(), num_labels),
            ],
            Arch::Roberta => vec![
                ("classifier.dense".into(), h),
                ("classifier.out_proj".into(), num_labels),
            ],
        }
    }

    /// Embedding tables and LayerNorm `(name, shape)`.
    pub fn embedding_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let p = self.prefix();
        let h = self.hidden;
        let mut v = vec![
            (
                format!("{p}.embeddings.word_embeddings.weight"),
                vec![self.vocab_size, h],
            ),
            (
                format!("{p}.embeddings.position_embeddings.weight"),
                vec![self.max_positions, h],
            ),
            (format!("{p}.embeddings.LayerNorm.weight"), vec![h]),
            (format!("{p}.embeddings.LayerNorm.bias"), vec![h]),
        ];
        if self.type_vocab_size > 0 {
            v.push((
                format!("{p}.embeddings.token_type_embeddings.weight"),
                vec![self.type_vocab_size, h],
            ));
        }
        v
    }
}

/// A tensor copied out of the bundle as f32, with its shape.
#[derive(Clone, Debug)]
pub struct Tensor {
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Values.
    pub data: Vec<f32>,
}

/// One adapted module's tensors (rank > 0).
#[derive(Clone, Debug)]
pub struct AdapterTensors {
    /// `[r, d_in]`.
    pub lora_a: Vec<f32>,
    /// `[d_out, r]`.
    pub lora_b: Vec<f32>,
    /// `log_alpha` (gate) or `log_sigma2` (additive), `[r]`; empty otherwise.
    pub rank_param: Vec<f32>,
    /// Original rank positions `[r]`.
    pub rank_index: Vec<u64>,
}

/// A validated bundle in memory.
#[derive(Debug)]
pub struct Bundle {
    /// Where it was read from.
    pub dir: PathBuf,
    /// `bayeslora.json`.
    pub meta: BundleMeta,
    /// What the encoder needs from `config.json`.
    pub config: ModelConfig,
    /// Base tensors by name (f32).
    pub tensors: HashMap<String, Tensor>,
    /// Adapters of modules with rank > 0, by module name.
    pub adapters: HashMap<String, AdapterTensors>,
}

fn read_json(path: &Path) -> Result<Value> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let size = std::fs::metadata(path).map_err(io)?.len();
    if size > MAX_JSON_BYTES {
        return Err(bundle_err(format!(
            "{}: {size} bytes is too large for a JSON file",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    serde_json::from_str(&text).map_err(|source| Error::JsonSyntax {
        path: path.to_path_buf(),
        source,
    })
}

const ADAPTER_SUFFIXES: [&str; 6] = [
    "lora_A",
    "lora_B",
    "log_alpha",
    "log_sigma2",
    "rank_index",
    "rank_mask",
];

struct Expect {
    name: String,
    shape: Vec<usize>,
    int: bool,
}

impl Bundle {
    /// Read and validate a bundle directory.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(bundle_err(format!("{}: not a directory", dir.display())));
        }
        let meta_path = dir.join(META_FILE);
        let meta: BundleMeta =
            serde_json::from_value(read_json(&meta_path)?).map_err(|source| Error::JsonSchema {
                path: meta_path.clone(),
                source,
            })?;
        meta.validate(&meta_path)?;
        let arch = Arch::parse(&meta.architecture).ok_or_else(|| {
            bundle_err(format!(
                "{}: unsupported architecture {:?}",
                meta_path.display(),
                meta.architecture
            ))
        })?;
        let cfg_path = dir.join(CONFIG_FILE);
        let config = ModelConfig::from_json(&read_json(&cfg_path)?, arch, &cfg_path)?;

        // every expected tensor, then every adapter, checked against the header
        let linears = config.linears(meta.num_labels);
        let known: HashMap<&str, (usize, usize)> = linears
            .iter()
            .map(|(n, i, o)| (n.as_str(), (*i, *o)))
            .collect();
        let mut expect: Vec<Expect> = Vec::new();
        for (name, shape) in config.embedding_tensors() {
            expect.push(Expect {
                name,
                shape,
                int: false,
            });
        }
        for l in 0..config.layers {
            for ln in config.layer_norm_suffixes() {
                for part in ["weight", "bias"] {
                    let name = format!("{}.{ln}.{part}", config.layer_prefix(l));
                    expect.push(Expect {
                        name,
                        shape: vec![config.hidden],
                        int: false,
                    });
                }
            }
        }
        for (name, d_in, d_out) in &linears {
            expect.push(Expect {
                name: format!("{name}.weight"),
                shape: vec![*d_out, *d_in],
                int: false,
            });
            expect.push(Expect {
                name: format!("{name}.bias"),
                shape: vec![*d_out],
                int: false,
            });
        }
        let noise = meta.noise();
        for (name, m) in &meta.modules {
            let Some(&(d_in, d_out)) = known.get(name.as_str()) else {
                return Err(bundle_err(format!(
                    "{}: adapted module {name:?} is not a linear layer of a {:?} classifier",
                    meta_path.display(),
                    arch
                )));
            };
            if (m.d_in, m.d_out) != (d_in, d_out) {
                return Err(bundle_err(format!(
                    "{}: module {name:?} says d_in={}, d_out={} but the model has {d_in}, {d_out}",
                    meta_path.display(),
                    m.d_in,
                    m.d_out
                )));
            }
            if m.rank == 0 {
                continue;
            }
            let r = m.rank;
            expect.push(Expect {
                name: format!("{name}.lora_A"),
                shape: vec![r, d_in],
                int: false,
            });
            expect.push(Expect {
                name: format!("{name}.lora_B"),
                shape: vec![d_out, r],
                int: false,
            });
            expect.push(Expect {
                name: format!("{name}.rank_index"),
                shape: vec![r],
                int: true,
            });
            match noise {
                NoiseKind::Gate => expect.push(Expect {
                    name: format!("{name}.log_alpha"),
                    shape: vec![r],
                    int: false,
                }),
                NoiseKind::Additive => expect.push(Expect {
                    name: format!("{name}.log_sigma2"),
                    shape: vec![r],
                    int: false,
                }),
                _ => {}
            }
        }

        let weights_path = dir.join(WEIGHTS_FILE);
        let wp = weights_path.display().to_string();
        let file = File::open(&weights_path).map_err(|source| Error::Io {
            path: weights_path.clone(),
            source,
        })?;
        // SAFETY: the map is read-only and dropped before this function returns; the bundle's
        // files are not expected to change while being opened (a concurrent truncation would be
        // the caller's bug, as for any memory-mapped reader).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Map {
            path: weights_path.clone(),
            source,
        })?;
        let invalid = |source| Error::SafeTensors {
            path: weights_path.clone(),
            source,
        };
        let st = SafeTensors::deserialize(&mmap).map_err(invalid)?;
        let (_, header) = SafeTensors::read_metadata(&mmap).map_err(invalid)?;
        if let Some(md) = header.metadata() {
            if let Some(fmt) = md.get("format") {
                if fmt != "bayeslora-bundle" && fmt != "pt" {
                    return Err(bundle_err(format!(
                        "{wp}: metadata format {fmt:?} is not a bayeslora bundle"
                    )));
                }
            }
        }
        let want_float = if meta.dtype == "bfloat16" {
            Dtype::BF16
        } else {
            Dtype::F32
        };
        for e in &expect {
            let view = st
                .tensor(&e.name)
                .map_err(|_| bundle_err(format!("{wp}: missing tensor {:?}", e.name)))?;
            if view.shape() != e.shape.as_slice() {
                return Err(bundle_err(format!(
                    "{wp}: tensor {:?} has shape {:?}, expected {:?}",
                    e.name,
                    view.shape(),
                    e.shape
                )));
            }
            let ok = if e.int {
                view.dtype() == Dtype::I64
            } else {
                view.dtype() == Dtype::F32 || view.dtype() == want_float
            };
            if !ok {
                return Err(bundle_err(format!(
                    "{wp}: tensor {:?} has dtype {:?}, expected {}",
                    e.name,
                    view.dtype(),
                    if e.int {
                        "I64".to_string()
                    } else {
                        format!("F32 or {want_float:?}")
                    }
                )));
            }
        }
        let expected: HashSet<&str> = expect.iter().map(|e| e.name.as_str()).collect();
        for name in st.names() {
            if expected.contains(name) {
                continue;
            }
            if name.split('.').any(|part| part == "base_layer") {
                return Err(bundle_err(format!(
                    "{wp}: tensor {name:?} still has a `.base_layer` name"
                )));
            }
            if let Some((module, suffix)) = name.rsplit_once('.') {
                if ADAPTER_SUFFIXES.contains(&suffix) {
                    return Err(bundle_err(format!(
                        "{wp}: unexpected adapter tensor {name:?} (module {module:?} with this rank and method \
                         is not described so in {META_FILE})"
                    )));
                }
            }
        }

        // validated: copy out
        let mut tensors = HashMap::new();
        let mut adapters = HashMap::new();
        let take = |name: &str| -> Result<Vec<f32>> {
            let view = st
                .tensor(name)
                .map_err(|_| bundle_err(format!("{wp}: missing tensor {name:?}")))?;
            let data = to_f32(view.dtype(), view.data());
            if data.iter().any(|v| !v.is_finite()) {
                return Err(bundle_err(format!(
                    "{wp}: tensor {name:?} contains NaN or infinite values"
                )));
            }
            Ok(data)
        };
        for e in expect.iter().filter(|e| !e.int) {
            let module = e.name.rsplit_once('.').map(|(m, _)| m).unwrap_or("");
            if meta.modules.get(module).is_some_and(|m| m.rank > 0)
                && !e.name.ends_with(".weight")
                && !e.name.ends_with(".bias")
            {
                continue;
            }
            tensors.insert(
                e.name.clone(),
                Tensor {
                    shape: e.shape.clone(),
                    data: take(&e.name)?,
                },
            );
        }
        for (name, m) in &meta.modules {
            if m.rank == 0 {
                continue;
            }
            let idx_name = format!("{name}.rank_index");
            let view = st
                .tensor(&idx_name)
                .map_err(|_| bundle_err(format!("{wp}: missing tensor {idx_name:?}")))?;
            let mut rank_index = Vec::with_capacity(m.rank);
            let mut seen = HashSet::new();
            for chunk in view.data().chunks_exact(8) {
                let mut b = [0u8; 8];
                b.copy_from_slice(chunk);
                let v = i64::from_le_bytes(b);
                if v < 0 || v as u64 >= m.initial_rank as u64 || !seen.insert(v) {
                    return Err(bundle_err(format!(
                        "{wp}: {idx_name:?} has {v}: entries must be distinct and in 0..{}",
                        m.initial_rank
                    )));
                }
                rank_index.push(v as u64);
            }
            let rank_param = match noise {
                NoiseKind::Gate => take(&format!("{name}.log_alpha"))?,
                NoiseKind::Additive => take(&format!("{name}.log_sigma2"))?,
                _ => Vec::new(),
            };
            adapters.insert(
                name.clone(),
                AdapterTensors {
                    lora_a: take(&format!("{name}.lora_A"))?,
                    lora_b: take(&format!("{name}.lora_B"))?,
                    rank_param,
                    rank_index,
                },
            );
        }
        drop(st);
        drop(mmap);
        Ok(Self {
            dir,
            meta,
            config,
            tensors,
            adapters,
        })
    }

    /// A base tensor by name (validated at open, so present).
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| bundle_err(format!("internal: tensor {name:?} was not loaded")))
    }
}

fn to_f32(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| f32::from_bits(((u16::from_le_bytes([c[0], c[1]])) as u32) << 16))
            .collect(),
        _ => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    }
}
