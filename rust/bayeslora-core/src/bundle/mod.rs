//! The exported bundle: `bayeslora.json`, `config.json` (the HF model config) and
//! `model.safetensors`, read and validated before anything large is allocated.
//!
//! Order of work: the two JSON files are parsed into typed structs and range-checked
//! ([`meta`], [`hf_config`]); the tensor file is read into memory (never mapped: a file
//! truncated under the reader is an error, not a `SIGBUS`) and its header checked by
//! `safetensors` (offsets contiguous, sizes consistent with the file length); then every tensor
//! the encoder needs is checked by name, dtype and shape against the config, every adapter
//! against `bayeslora.json`; only then are the tensors copied out (converted to f32)
//! ([`tensors`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

pub mod deberta;
mod files;
pub mod hf_config;
pub mod meta;
pub mod tensors;
#[cfg(test)]
mod tests;

pub use deberta::DebertaConfig;
pub use hf_config::{Activation, Arch, LayerLinear, LinearSpec, ModelConfig, Width};
pub use meta::{BundleMeta, ModuleMeta, NoiseKind};
pub use tensors::{TensorKind, TensorSpec};

/// File names inside a bundle directory.
pub const META_FILE: &str = "bayeslora.json";
/// The HF model config.
pub const CONFIG_FILE: &str = "config.json";
/// Base weights and adapters.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Bundle format understood by this reader.
pub const FORMAT_VERSION: u32 = 1;
/// JSON files larger than this are refused (they are a few KiB in practice).
const MAX_JSON_BYTES: u64 = 64 << 20;
/// Tensor files larger than this are refused (read into memory whole: 64 GiB).
const MAX_WEIGHTS_BYTES: u64 = 64 << 30;

fn bundle_err(msg: impl Into<String>) -> Error {
    Error::Bundle(msg.into())
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

/// A JSON file: a regular file of at most [`MAX_JSON_BYTES`] bytes (see [`files`]).
fn read_json(path: &Path) -> Result<Value> {
    let bytes = files::read_capped(path, MAX_JSON_BYTES)?;
    serde_json::from_slice(&bytes).map_err(|source| Error::JsonSyntax {
        path: path.to_path_buf(),
        source,
    })
}

impl Bundle {
    /// Read and validate a bundle directory.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(bundle_err(format!("{}: not a directory", dir.display())));
        }
        let meta_path = dir.join(META_FILE);
        let meta = BundleMeta::read(&meta_path)?;
        let arch = meta.arch(&meta_path)?;
        let cfg_path = dir.join(CONFIG_FILE);
        let config = ModelConfig::from_json(&read_json(&cfg_path)?, arch, &cfg_path)?;
        // as export wrote it: inputs of max_length tokens have positions in the table
        let positions = match arch {
            Arch::Roberta => config
                .max_positions
                .saturating_sub(config.pad_token_id.saturating_add(1)),
            _ => config.max_positions,
        };
        if meta.max_length > positions {
            return Err(bundle_err(format!(
                "{}: max_length {} exceeds the {positions} positions config.json has for an input",
                meta_path.display(),
                meta.max_length
            )));
        }
        let expect = tensors::expected(&meta, &config, &meta_path)?;
        let loaded = tensors::load(&dir.join(WEIGHTS_FILE), &meta, &expect)?;
        Ok(Self {
            dir,
            meta,
            config,
            tensors: loaded.tensors,
            adapters: loaded.adapters,
        })
    }

    /// A base tensor by name (validated at open, so present).
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| bundle_err(format!("internal: tensor {name:?} was not loaded")))
    }
}
