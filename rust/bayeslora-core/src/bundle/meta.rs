//! `bayeslora.json`: what was exported (method, posterior, dtype, labels) and every adapted
//! module's rank, scale and shape. Parsed into typed structs, then range-checked.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::hf_config::Arch;
use super::{bundle_err, read_json, FORMAT_VERSION};
use crate::error::{Error, Result};

/// The largest `|scale|` (`alpha / r0`) accepted: exports have O(1) scales; a larger one would
/// only overflow the merged weights.
pub const MAX_SCALE: f64 = 1e6;

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

/// How a module's adapter is perturbed in MC mode (docs/method.md §2, `python/bayeslora/nn/layer.py`).
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

    /// Read, parse and validate `bayeslora.json` at `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let meta: Self =
            serde_json::from_value(read_json(path)?).map_err(|source| Error::JsonSchema {
                path: path.to_path_buf(),
                source,
            })?;
        meta.validate(path)?;
        Ok(meta)
    }

    /// The encoder family of `architecture`.
    pub fn arch(&self, path: &Path) -> Result<Arch> {
        Arch::parse(&self.architecture).ok_or_else(|| {
            bundle_err(format!(
                "{}: unsupported architecture {:?}",
                path.display(),
                self.architecture
            ))
        })
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
        if !self.prune_threshold.is_finite() {
            return Err(bundle_err(format!(
                "{p}: prune_threshold {} is not finite",
                self.prune_threshold
            )));
        }
        // in f32 too: the runtime keeps z = 1/(1 − p), which 1 − 1e-10 would make infinite
        if !(0.0..1.0).contains(&self.dropout) || self.dropout as f32 >= 1.0 {
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
            if !m.scale.is_finite() || m.scale.abs() > MAX_SCALE {
                return Err(bundle_err(format!(
                    "{p}: module {name:?} has scale {}, outside [-{MAX_SCALE:e}, {MAX_SCALE:e}]",
                    m.scale
                )));
            }
        }
        Ok(())
    }
}
