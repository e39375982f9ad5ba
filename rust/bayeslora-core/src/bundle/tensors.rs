//! `model.safetensors`: which tensors a bundle must hold (names, shapes, dtypes from the config
//! and `bayeslora.json`), the header checked against them, then the tensors copied out as f32.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use super::hf_config::ModelConfig;
use super::meta::{BundleMeta, NoiseKind};
use super::{bundle_err, files, AdapterTensors, Tensor, MAX_WEIGHTS_BYTES, META_FILE};
use crate::error::{Error, Result};

/// Tensor-name suffixes of an adapter; a tensor with one of them that `bayeslora.json` does not
/// describe is refused.
const ADAPTER_SUFFIXES: [&str; 6] = [
    "lora_A",
    "lora_B",
    "log_alpha",
    "log_sigma2",
    "rank_index",
    "rank_mask",
];

/// What a stored tensor holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorKind {
    /// Weights: f32, or the bundle's storage dtype (bf16).
    Float,
    /// Indices: i64.
    Index,
}

/// A tensor a bundle must hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// Its name in the safetensors file.
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// What it holds.
    pub kind: TensorKind,
}

impl TensorSpec {
    /// A weight tensor.
    pub fn float(name: String, shape: Vec<usize>) -> Self {
        Self {
            name,
            shape,
            kind: TensorKind::Float,
        }
    }

    /// Elements of the shape, `None` if the product overflows `usize`.
    pub fn numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
    }

    /// An index tensor.
    pub fn index(name: String, shape: Vec<usize>) -> Self {
        Self {
            name,
            shape,
            kind: TensorKind::Index,
        }
    }
}

/// Every tensor the encoder needs, then every adapter's; checks that each module named in
/// `bayeslora.json` is a linear of the model with the shape it says (`meta_path` for messages).
pub(super) fn expected(
    meta: &BundleMeta,
    config: &ModelConfig,
    meta_path: &Path,
) -> Result<Vec<TensorSpec>> {
    let linears = config.linears(meta.num_labels);
    let known: HashMap<&str, (usize, usize)> = linears
        .iter()
        .map(|l| (l.name.as_str(), (l.d_in, l.d_out)))
        .collect();
    let mut expect = config.embedding_tensors();
    for l in 0..config.layers {
        for ln in config.layer_norm_suffixes() {
            for part in ["weight", "bias"] {
                let name = format!("{}.{ln}.{part}", config.layer_prefix(l));
                expect.push(TensorSpec::float(name, vec![config.hidden]));
            }
        }
    }
    for l in &linears {
        let name = &l.name;
        expect.push(TensorSpec::float(
            format!("{name}.weight"),
            vec![l.d_out, l.d_in],
        ));
        expect.push(TensorSpec::float(format!("{name}.bias"), vec![l.d_out]));
    }
    let noise = meta.noise();
    for (name, m) in &meta.modules {
        let Some(&(d_in, d_out)) = known.get(name.as_str()) else {
            return Err(bundle_err(format!(
                "{}: adapted module {name:?} is not a linear layer of a {:?} classifier",
                meta_path.display(),
                config.arch
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
        expect.push(TensorSpec::float(format!("{name}.lora_A"), vec![r, d_in]));
        expect.push(TensorSpec::float(format!("{name}.lora_B"), vec![d_out, r]));
        expect.push(TensorSpec::index(format!("{name}.rank_index"), vec![r]));
        match noise {
            NoiseKind::Gate => expect.push(TensorSpec::float(format!("{name}.log_alpha"), vec![r])),
            NoiseKind::Additive => {
                expect.push(TensorSpec::float(format!("{name}.log_sigma2"), vec![r]))
            }
            _ => {}
        }
    }
    // every size product of the shapes fits (the allocations of the copies are sized by them)
    for e in &expect {
        if e.numel().is_none() {
            return Err(bundle_err(format!(
                "{}: tensor {:?} of shape {:?} is too large",
                meta_path.display(),
                e.name,
                e.shape
            )));
        }
    }
    Ok(expect)
}

/// The base tensors (by name) and the adapters (by module) of a validated bundle.
pub(super) struct Loaded {
    pub tensors: HashMap<String, Tensor>,
    pub adapters: HashMap<String, AdapterTensors>,
}

/// Read the tensor file at `path`, check its header against `expect`, and copy out the tensors.
pub(super) fn load(path: &Path, meta: &BundleMeta, expect: &[TensorSpec]) -> Result<Loaded> {
    let bytes = files::read_exact(path, MAX_WEIGHTS_BYTES)?;
    let invalid = |source| Error::SafeTensors {
        path: path.to_path_buf(),
        source,
    };
    let st = SafeTensors::deserialize(&bytes).map_err(invalid)?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(invalid)?;
    let file = StoredFile {
        path: path.display().to_string(),
        st,
    };
    if let Some(fmt) = header.metadata().as_ref().and_then(|md| md.get("format")) {
        if fmt != "bayeslora-bundle" && fmt != "pt" {
            return Err(bundle_err(format!(
                "{}: metadata format {fmt:?} is not a bayeslora bundle",
                file.path
            )));
        }
    }
    file.check_expected(meta, expect)?;
    file.check_unexpected(expect)?;
    file.copy_out(meta, expect)
}

/// A safetensors file read into memory, and its path for messages.
struct StoredFile<'data> {
    path: String,
    st: SafeTensors<'data>,
}

impl StoredFile<'_> {
    fn view(&self, name: &str) -> Result<safetensors::tensor::TensorView<'_>> {
        self.st
            .tensor(name)
            .map_err(|_| bundle_err(format!("{}: missing tensor {name:?}", self.path)))
    }

    /// Every expected tensor is present with its shape and an allowed dtype.
    fn check_expected(&self, meta: &BundleMeta, expect: &[TensorSpec]) -> Result<()> {
        let want_float = if meta.dtype == "bfloat16" {
            Dtype::BF16
        } else {
            Dtype::F32
        };
        for e in expect {
            let view = self.view(&e.name)?;
            if view.shape() != e.shape.as_slice() {
                return Err(bundle_err(format!(
                    "{}: tensor {:?} has shape {:?}, expected {:?}",
                    self.path,
                    e.name,
                    view.shape(),
                    e.shape
                )));
            }
            let ok = match e.kind {
                TensorKind::Index => view.dtype() == Dtype::I64,
                TensorKind::Float => view.dtype() == Dtype::F32 || view.dtype() == want_float,
            };
            if !ok {
                return Err(bundle_err(format!(
                    "{}: tensor {:?} has dtype {:?}, expected {}",
                    self.path,
                    e.name,
                    view.dtype(),
                    match e.kind {
                        TensorKind::Index => "I64".to_string(),
                        TensorKind::Float => format!("F32 or {want_float:?}"),
                    }
                )));
            }
        }
        Ok(())
    }

    /// No tensor of a PEFT wrapper or of an adapter that `bayeslora.json` does not describe.
    fn check_unexpected(&self, expect: &[TensorSpec]) -> Result<()> {
        let expected: HashSet<&str> = expect.iter().map(|e| e.name.as_str()).collect();
        for name in self.st.names() {
            if expected.contains(name) {
                continue;
            }
            if name.split('.').any(|part| part == "base_layer") {
                return Err(bundle_err(format!(
                    "{}: tensor {name:?} still has a `.base_layer` name",
                    self.path
                )));
            }
            if let Some((module, suffix)) = name.rsplit_once('.') {
                if ADAPTER_SUFFIXES.contains(&suffix) {
                    return Err(bundle_err(format!(
                        "{}: unexpected adapter tensor {name:?} (module {module:?} with this rank and method \
                         is not described so in {META_FILE})",
                        self.path
                    )));
                }
            }
        }
        Ok(())
    }

    /// A float tensor as f32, refused if any value is NaN or infinite.
    fn floats(&self, name: &str) -> Result<Vec<f32>> {
        let view = self.view(name)?;
        let data = to_f32(view.dtype(), view.data());
        if data.iter().any(|v| !v.is_finite()) {
            return Err(bundle_err(format!(
                "{}: tensor {name:?} contains NaN or infinite values",
                self.path
            )));
        }
        Ok(data)
    }

    /// The validated tensors, copied out: base tensors by name, adapters by module.
    fn copy_out(&self, meta: &BundleMeta, expect: &[TensorSpec]) -> Result<Loaded> {
        let mut tensors = HashMap::new();
        for e in expect.iter().filter(|e| e.kind == TensorKind::Float) {
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
                    data: self.floats(&e.name)?,
                },
            );
        }
        let noise = meta.noise();
        let mut adapters = HashMap::new();
        for (name, m) in &meta.modules {
            if m.rank == 0 {
                continue;
            }
            let idx_name = format!("{name}.rank_index");
            let view = self.view(&idx_name)?;
            let mut rank_index = Vec::with_capacity(m.rank);
            let mut seen = HashSet::new();
            for chunk in view.data().chunks_exact(8) {
                let mut b = [0u8; 8];
                b.copy_from_slice(chunk);
                let v = i64::from_le_bytes(b);
                let k = usize::try_from(v)
                    .ok()
                    .filter(|&k| k < m.initial_rank && seen.insert(k))
                    .ok_or_else(|| {
                        bundle_err(format!(
                            "{}: {idx_name:?} has {v}: entries must be distinct and in 0..{}",
                            self.path, m.initial_rank
                        ))
                    })?;
                rank_index.push(k as u64);
            }
            let rank_param = match noise {
                NoiseKind::Gate => self.floats(&format!("{name}.log_alpha"))?,
                NoiseKind::Additive => self.floats(&format!("{name}.log_sigma2"))?,
                _ => Vec::new(),
            };
            adapters.insert(
                name.clone(),
                AdapterTensors {
                    lora_a: self.floats(&format!("{name}.lora_A"))?,
                    lora_b: self.floats(&format!("{name}.lora_B"))?,
                    rank_param,
                    rank_index,
                },
            );
        }
        Ok(Loaded { tensors, adapters })
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
