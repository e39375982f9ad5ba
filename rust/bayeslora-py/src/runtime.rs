//! `bayeslora._core.Runtime`: a loaded bundle that scores token ids with uncertainty.
//!
//! The work runs with the GIL released on a rayon pool of the size the caller chose. Fork
//! guard (as in `tokenizers`): the pool remembers the pid that built it; in a forked child the
//! parent's worker threads do not exist, so a pool from another pid is dropped and rebuilt.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bayeslora_core as core;
use core::encoder::{Encoder, Noise, Sequence};
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict};

use crate::arrays::c_slice;
use crate::errors::{invalid, shape, BindingResult};

struct Pool {
    pid: u32,
    pool: Arc<rayon::ThreadPool>,
}

/// A validated bundle ready to score; see `bayeslora.runtime.Scorer` for the Python face.
#[pyclass(frozen, module = "bayeslora._core")]
pub struct Runtime {
    encoder: Arc<Encoder>,
    labels: Vec<String>,
    max_length: usize,
    threads: usize,
    /// [`core::kernels::Isa::name`] of the process's set.
    isa: &'static str,
    pool: Mutex<Option<Pool>>,
}

impl Runtime {
    /// The pool of this process. Its two failures (a poisoned lock, threads the OS will not
    /// start) are faults of the process, not of the caller's input, so they stay `RuntimeError`
    /// rather than a `bayeslora.errors` class.
    fn pool(&self) -> PyResult<Arc<rayon::ThreadPool>> {
        let mut guard = self
            .pool
            .lock()
            .map_err(|_| PyRuntimeError::new_err("runtime pool lock poisoned"))?;
        let pid = std::process::id();
        if let Some(p) = guard.as_ref() {
            if p.pid == pid {
                return Ok(p.pool.clone());
            }
        }
        // built here, or inherited through fork from another process: (re)build it
        if let Some(old) = guard.take() {
            // the parent's threads do not exist in this process; never join or drop them here
            std::mem::forget(old);
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.threads)
            .thread_name(|i| format!("bayeslora-{i}"))
            .build()
            .map_err(|e| {
                PyRuntimeError::new_err(format!("cannot start {} threads: {e}", self.threads))
            })?;
        let pool = Arc::new(pool);
        *guard = Some(Pool {
            pid,
            pool: pool.clone(),
        });
        Ok(pool)
    }

    fn sequences(
        &self,
        input_ids: &PyReadonlyArray2<'_, i64>,
        attention_mask: &PyReadonlyArray2<'_, i64>,
        token_type_ids: Option<&PyReadonlyArray2<'_, i64>>,
        first_index: usize,
    ) -> BindingResult<Vec<Sequence>> {
        let (shape_i, shape_m) = (input_ids.shape(), attention_mask.shape());
        if shape_i != shape_m {
            return Err(shape(format!(
                "input_ids is {shape_i:?} but attention_mask is {shape_m:?}"
            )));
        }
        let types = match token_type_ids {
            None => None,
            Some(tt) => {
                if tt.shape() != shape_i {
                    return Err(shape(format!(
                        "input_ids is {shape_i:?} but token_type_ids is {:?}",
                        tt.shape()
                    )));
                }
                Some(c_slice("token_type_ids", tt)?)
            }
        };
        let ids = c_slice("input_ids", input_ids)?;
        let mask = c_slice("attention_mask", attention_mask)?;
        Ok(self
            .encoder
            .prepare_typed_at(ids, mask, types, shape_i[0], shape_i[1], first_index)?)
    }

    fn run(&self, py: Python<'_>, seqs: &[Sequence], noise: Noise<'_>) -> BindingResult<Vec<f32>> {
        let pool = self.pool()?;
        let enc = &self.encoder;
        Ok(py.detach(|| pool.install(|| enc.forward(seqs, noise)))?)
    }
}

/// An integer argument (a Python or numpy integer of any size, not a bool) in `low..=high`, else
/// `InvalidValueError`: the Python layer checks the same first, but the core's callers are not
/// trusted (an int beyond 64 bits would otherwise be an `OverflowError`).
fn int_in(name: &str, v: &Bound<'_, PyAny>, low: u64, high: u64) -> BindingResult<u64> {
    let not_int = || {
        invalid(format!(
            "{name} must be an integer in {low}..{high}, got {v}"
        ))
    };
    let out_of_range = || invalid(format!("{name} must be in {low}..{high}, got {v}"));
    if v.is_instance_of::<PyBool>() || v.call_method0("__index__").is_err() {
        return Err(not_int());
    }
    // an integer: beyond i128 it is out of range too
    let n: i128 = v.extract().map_err(|_| out_of_range())?;
    u64::try_from(n)
        .ok()
        .filter(|n| (low..=high).contains(n))
        .ok_or_else(out_of_range)
}

/// Seeds are 0..2^63-1 (as in the Python layer); none given is 0.
fn check_seed(seed: Option<&Bound<'_, PyAny>>) -> BindingResult<u64> {
    seed.map_or(Ok(0), |v| int_in("seed", v, 0, i64::MAX.unsigned_abs()))
}

/// S in `low..=MAX_SAMPLES`; none given is 0 (mean mode).
fn check_samples(samples: Option<&Bound<'_, PyAny>>, low: u64) -> BindingResult<usize> {
    let high = u64::try_from(core::mc::MAX_SAMPLES).unwrap_or(u64::MAX);
    let n = samples.map_or(Ok(0), |v| int_in("samples", v, low, high))?;
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

#[pymethods]
impl Runtime {
    /// Load and validate a bundle directory; `num_threads` None = all available cores.
    #[new]
    #[pyo3(signature = (bundle_dir, num_threads=None))]
    fn new(py: Python<'_>, bundle_dir: PathBuf, num_threads: Option<usize>) -> BindingResult<Self> {
        let threads = match num_threads {
            Some(0) => return Err(invalid("num_threads must be >= 1")),
            Some(n) => n,
            None => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        };
        let isa = core::kernels::Isa::selected().map_err(core::Error::from)?;
        let (encoder, labels, max_length) = py.detach(|| -> core::Result<_> {
            let bundle = core::bundle::Bundle::open(&bundle_dir)?;
            let labels = bundle.meta.labels.clone();
            let max_length = bundle.meta.max_length;
            Ok((Encoder::new(&bundle)?, labels, max_length))
        })?;
        Ok(Self {
            encoder: Arc::new(encoder),
            labels,
            max_length,
            threads,
            isa: isa.name(),
            pool: Mutex::new(None),
        })
    }

    /// The instruction set the kernels run on (`"avx512"`, `"avx2"` or `"portable"`).
    #[getter]
    fn isa(&self) -> &'static str {
        self.isa
    }

    /// Threads of the pool.
    #[getter]
    fn num_threads(&self) -> usize {
        self.threads
    }

    /// Class names (empty if the bundle has none).
    #[getter]
    fn labels(&self) -> Vec<String> {
        self.labels.clone()
    }

    /// Classes.
    #[getter]
    fn num_labels(&self) -> usize {
        self.encoder.num_labels()
    }

    /// Tokens per input the tokenizer should truncate to.
    #[getter]
    fn max_length(&self) -> usize {
        self.max_length
    }

    /// Whether the model takes segment ids from its tokenizer (BERT-family token-type
    /// embeddings; not RoBERTa, whose tokenizer gives none, nor DistilBERT, which has none).
    #[getter]
    fn uses_token_types(&self) -> bool {
        self.encoder.uses_token_types()
    }

    /// `{module name: current rank}` of every adapted module.
    #[getter]
    fn module_ranks(&self) -> HashMap<String, usize> {
        self.encoder.module_ranks().clone()
    }

    /// Logits float32[N, C]: mean mode, or one pass with explicit gate values
    /// `gates = {module name: float32[N, r]}` (modules not named use z = 1). `token_type_ids`:
    /// segment ids `[N, T]` (None: 0 throughout).
    #[pyo3(signature = (input_ids, attention_mask, gates=None, token_type_ids=None))]
    fn logits<'py>(
        &self,
        py: Python<'py>,
        input_ids: PyReadonlyArray2<'py, i64>,
        attention_mask: PyReadonlyArray2<'py, i64>,
        gates: Option<Bound<'py, PyDict>>,
        token_type_ids: Option<PyReadonlyArray2<'py, i64>>,
    ) -> BindingResult<Bound<'py, PyAny>> {
        let seqs = self.sequences(&input_ids, &attention_mask, token_type_ids.as_ref(), 0)?;
        let n = seqs.len();
        let logits = match gates {
            None => self.run(py, &seqs, Noise::Mean)?,
            Some(d) => {
                let mut map = HashMap::new();
                for (k, v) in d.iter() {
                    let name: String = k.extract()?;
                    let arr: PyReadonlyArray2<'_, f32> = v.extract().map_err(|_| {
                        invalid(format!("gates[{name:?}] must be a 2-d float32 array"))
                    })?;
                    if arr.shape()[0] != n {
                        return Err(shape(format!(
                            "gates[{name:?}] has {} rows for {n} inputs",
                            arr.shape()[0]
                        )));
                    }
                    let vals = c_slice(&format!("gates[{name:?}]"), &arr)?;
                    map.insert(name, vals.to_vec());
                }
                self.run(py, &seqs, Noise::Explicit(&map))?
            }
        };
        let c = self.encoder.num_labels();
        Ok(PyArray1::from_vec(py, logits).reshape([n, c])?.into_any())
    }

    /// Per-sample logits float32[N, S, C] of S posterior samples (S ≥ 1); `token_type_ids` as
    /// in `logits`.
    #[pyo3(signature = (input_ids, attention_mask, samples, seed=None, token_type_ids=None))]
    fn sample_logits<'py>(
        &self,
        py: Python<'py>,
        input_ids: PyReadonlyArray2<'py, i64>,
        attention_mask: PyReadonlyArray2<'py, i64>,
        samples: Bound<'py, PyAny>,
        seed: Option<Bound<'py, PyAny>>,
        token_type_ids: Option<PyReadonlyArray2<'py, i64>>,
    ) -> BindingResult<Bound<'py, PyAny>> {
        let samples = check_samples(Some(&samples), 1)?;
        let seed = check_seed(seed.as_ref())?;
        let seqs = self.sequences(&input_ids, &attention_mask, token_type_ids.as_ref(), 0)?;
        let n = seqs.len();
        let logits = self.run(py, &seqs, Noise::Sampled { samples, seed })?;
        let c = self.encoder.num_labels();
        Ok(PyArray1::from_vec(py, logits)
            .reshape([n, samples, c])?
            .into_any())
    }

    /// docs/method.md §6 fields of S samples per input (S = 0: mean mode), reduced online (memory
    /// does not grow with S): dict of numpy arrays `probs [N, C]`, `label [N]` (int64),
    /// `confidence`, `entropy`, `expected_entropy`, `mutual_info`, `variance` (float32 [N]).
    /// `first_index`: the index of row 0 in the caller's whole request, for error messages;
    /// `token_type_ids` as in `logits`.
    #[pyo3(signature = (input_ids, attention_mask, samples=None, seed=None, first_index=0, token_type_ids=None))]
    #[allow(clippy::too_many_arguments)] // the Python signature: keyword arguments
    fn score<'py>(
        &self,
        py: Python<'py>,
        input_ids: PyReadonlyArray2<'py, i64>,
        attention_mask: PyReadonlyArray2<'py, i64>,
        samples: Option<Bound<'py, PyAny>>,
        seed: Option<Bound<'py, PyAny>>,
        first_index: usize,
        token_type_ids: Option<PyReadonlyArray2<'py, i64>>,
    ) -> BindingResult<Bound<'py, PyDict>> {
        let samples = check_samples(samples.as_ref(), 0)?;
        let seed = check_seed(seed.as_ref())?;
        let noise = if samples == 0 {
            Noise::Mean
        } else {
            Noise::Sampled { samples, seed }
        };
        let seqs = self.sequences(
            &input_ids,
            &attention_mask,
            token_type_ids.as_ref(),
            first_index,
        )?;
        let n = seqs.len();
        let pool = self.pool()?;
        let enc = &self.encoder;
        let cols = py.detach(|| pool.install(|| enc.score(&seqs, noise)))?;
        let c = self.encoder.num_labels();
        let label: Vec<i64> = cols.label.iter().map(|&l| l as i64).collect();
        let out = PyDict::new(py);
        out.set_item("probs", PyArray1::from_vec(py, cols.probs).reshape([n, c])?)?;
        out.set_item("label", PyArray1::from_vec(py, label))?;
        for (name, col) in [
            ("confidence", cols.confidence),
            ("entropy", cols.entropy),
            ("expected_entropy", cols.expected_entropy),
            ("mutual_info", cols.mutual_info),
            ("variance", cols.variance),
        ] {
            out.set_item(name, PyArray1::from_vec(py, col))?;
        }
        Ok(out)
    }
}

/// Measured f32 FMA peak in GFLOP/s of `threads` cores running at once for about `seconds`.
#[pyfunction]
#[pyo3(signature = (seconds=0.3, threads=1))]
fn fma_peak_gflops(py: Python<'_>, seconds: f64, threads: usize) -> BindingResult<f64> {
    Ok(py.detach(|| core::kernels::fma_peak_gflops(seconds, threads))?)
}

/// The instruction set the kernels of this process run on (`"avx512"`, `"avx2"` or
/// `"portable"`): `BAYESLORA_ISA` if set, else the widest of this CPU. `IsaError` when the
/// variable names an unknown set or one this CPU lacks.
#[pyfunction]
fn isa() -> BindingResult<&'static str> {
    let isa = core::kernels::Isa::selected().map_err(core::Error::from)?;
    Ok(isa.name())
}

/// `{set name: matrix products run on it}` in this process so far: which kernels ran.
#[pyfunction]
fn gemm_calls() -> HashMap<&'static str, u64> {
    core::kernels::gemm_calls().into_iter().collect()
}

/// Register the runtime class, the FMA-peak probe and the instruction-set queries.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Runtime>()?;
    m.add_function(wrap_pyfunction!(fma_peak_gflops, m)?)?;
    m.add_function(wrap_pyfunction!(isa, m)?)?;
    m.add_function(wrap_pyfunction!(gemm_calls, m)?)?;
    Ok(())
}
