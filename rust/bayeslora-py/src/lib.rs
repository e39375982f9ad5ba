//! `bayeslora._core`: a thin PyO3 layer over `bayeslora-core`. Numbers cross as numpy arrays,
//! long work runs with the GIL released, and every core error becomes a `bayeslora.errors` class.

mod analysis;

use bayeslora_core as core;
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

mod runtime;

/// The one place that maps core errors to Python exception classes (docs/architecture.md, polars style).
pub(crate) fn to_pyerr(py: Python<'_>, err: core::Error) -> PyErr {
    let class = match &err {
        core::Error::Shape(_) => "ShapeError",
        core::Error::Value(_) => "InvalidValueError",
        core::Error::Bundle(_) => "BundleError",
    };
    let msg = err.to_string();
    match py.import("bayeslora.errors").and_then(|m| m.getattr(class)) {
        Ok(cls) => match cls.call1((msg.clone(),)) {
            Ok(inst) => PyErr::from_value(inst),
            Err(e) => e,
        },
        // The Python package is always present beside _core; fall back to ValueError anyway.
        Err(_) => PyValueError::new_err(msg),
    }
}

fn contiguous<'a>(name: &str, a: &'a PyReadonlyArray1<'_, f64>) -> PyResult<&'a [f64]> {
    if !a.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{name} must be a C-contiguous float64 array"
        )));
    }
    a.as_slice()
        .map_err(|_| PyValueError::new_err(format!("{name} must be a C-contiguous float64 array")))
}

/// Elementwise Molchanov KL of `log_alpha` (float64[n]) → float64[n].
#[pyfunction]
fn kl_molchanov<'py>(
    py: Python<'py>,
    log_alpha: PyReadonlyArray1<'py, f64>,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let v = core::kl::kl_molchanov_vec(contiguous("log_alpha", &log_alpha)?)
        .map_err(|e| to_pyerr(py, e))?;
    Ok(v.into_pyarray(py))
}

/// KL of a gate module: `group_weight * Σ_k KL(log_alpha_k)`; `log_alpha` float64[r].
#[pyfunction]
fn kl_gate(
    py: Python<'_>,
    log_alpha: PyReadonlyArray1<'_, f64>,
    group_weight: f64,
) -> PyResult<f64> {
    core::kl::kl_gate(contiguous("log_alpha", &log_alpha)?, group_weight)
        .map_err(|e| to_pyerr(py, e))
}

/// Owned, validated copies of an additive module's parameters: (log_sigma2, m_a, d_in, m_b, d_out).
type AdditiveInputs = (Vec<f64>, Vec<f64>, usize, Vec<f64>, usize);

fn additive_inputs(
    py: Python<'_>,
    log_sigma2: &PyReadonlyArray1<'_, f64>,
    m_a: &PyReadonlyArray2<'_, f64>,
    m_b: &PyReadonlyArray2<'_, f64>,
) -> PyResult<AdditiveInputs> {
    let ls = contiguous("log_sigma2", log_sigma2)?;
    if !m_a.is_c_contiguous() || !m_b.is_c_contiguous() {
        // as_slice() also accepts Fortran order, which would be read transposed here
        return Err(PyValueError::new_err(
            "m_a and m_b must be C-contiguous float64 arrays",
        ));
    }
    let a = m_a
        .as_slice()
        .map_err(|_| PyValueError::new_err("m_a must be a C-contiguous float64 array"))?;
    let b = m_b
        .as_slice()
        .map_err(|_| PyValueError::new_err("m_b must be a C-contiguous float64 array"))?;
    if m_a.shape()[0] != ls.len() || m_b.shape()[1] != ls.len() {
        let msg = format!(
            "log_sigma2 has r={}, m_a is {:?}, m_b is {:?}",
            ls.len(),
            m_a.shape(),
            m_b.shape()
        );
        return Err(to_pyerr(py, core::Error::Shape(msg)));
    }
    Ok((
        ls.to_vec(),
        a.to_vec(),
        m_a.shape()[1],
        b.to_vec(),
        m_b.shape()[0],
    ))
}

/// KL of an additive module; `log_sigma2` float64[r], `m_a` float64[r, d_in], `m_b` float64[d_out, r].
#[pyfunction]
fn kl_additive(
    py: Python<'_>,
    log_sigma2: PyReadonlyArray1<'_, f64>,
    m_a: PyReadonlyArray2<'_, f64>,
    m_b: PyReadonlyArray2<'_, f64>,
) -> PyResult<f64> {
    let (ls, a, d_in, b, d_out) = additive_inputs(py, &log_sigma2, &m_a, &m_b)?;
    py.detach(|| core::kl::kl_additive(&ls, &a, d_in, &b, d_out))
        .map_err(|e| to_pyerr(py, e))
}

/// Rank scores of a gate module: `log_alpha` itself (float64[r]).
#[pyfunction]
fn rank_scores_gate<'py>(
    py: Python<'py>,
    log_alpha: PyReadonlyArray1<'py, f64>,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let v = core::rank::rank_scores_gate(contiguous("log_alpha", &log_alpha)?)
        .map_err(|e| to_pyerr(py, e))?;
    Ok(v.into_pyarray(py))
}

/// Median rank scores `ℓ_k` of an additive module (docs/method.md §2b) → float64[r].
#[pyfunction]
#[pyo3(signature = (log_sigma2, m_a, m_b, eps=None))]
fn rank_scores_additive<'py>(
    py: Python<'py>,
    log_sigma2: PyReadonlyArray1<'py, f64>,
    m_a: PyReadonlyArray2<'py, f64>,
    m_b: PyReadonlyArray2<'py, f64>,
    eps: Option<f64>,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let (ls, a, d_in, b, d_out) = additive_inputs(py, &log_sigma2, &m_a, &m_b)?;
    let v = py
        .detach(|| core::rank::rank_scores_additive(&ls, &a, d_in, &b, d_out, eps))
        .map_err(|e| to_pyerr(py, e))?;
    Ok(v.into_pyarray(py))
}

/// Measured f32 FMA peak in GFLOP/s of `threads` cores running at once for about `seconds`.
#[pyfunction]
#[pyo3(signature = (seconds=0.3, threads=1))]
fn fma_peak_gflops(py: Python<'_>, seconds: f64, threads: usize) -> PyResult<f64> {
    py.detach(|| core::kernels::fma_peak_gflops(seconds, threads))
        .map_err(|e| to_pyerr(py, e))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(kl_molchanov, m)?)?;
    m.add_function(wrap_pyfunction!(kl_gate, m)?)?;
    m.add_function(wrap_pyfunction!(kl_additive, m)?)?;
    m.add_function(wrap_pyfunction!(rank_scores_gate, m)?)?;
    m.add_function(wrap_pyfunction!(rank_scores_additive, m)?)?;
    m.add_function(wrap_pyfunction!(fma_peak_gflops, m)?)?;
    analysis::register(m)?;
    runtime::register(m)?;
    Ok(())
}
