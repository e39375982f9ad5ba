//! Bindings of the posterior's KL terms and rank scores (docs/method.md §2, §3): float64 numpy arrays in
//! and out; the GIL is released around the work that grows with the module's size.

use bayeslora_core as core;
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::arrays::c_slice;
use crate::errors::{shape, BindingResult};

/// Elementwise Molchanov KL of `log_alpha` (float64[n]) → float64[n].
#[pyfunction]
fn kl_molchanov<'py>(
    py: Python<'py>,
    log_alpha: PyReadonlyArray1<'py, f64>,
) -> BindingResult<Bound<'py, PyArray1<f64>>> {
    let v = core::posterior::kl::kl_molchanov_vec(c_slice("log_alpha", &log_alpha)?)?;
    Ok(v.into_pyarray(py))
}

/// KL of a gate module: `group_weight * Σ_k KL(log_alpha_k)`; `log_alpha` float64[r].
#[pyfunction]
fn kl_gate(log_alpha: PyReadonlyArray1<'_, f64>, group_weight: f64) -> BindingResult<f64> {
    Ok(core::posterior::kl::kl_gate(
        c_slice("log_alpha", &log_alpha)?,
        group_weight,
    )?)
}

/// Owned, validated copies of an additive module's parameters (owned so that the GIL can be
/// released while they are read).
struct AdditiveModule {
    log_sigma2: Vec<f64>,
    /// `M_A`, `[r, d_in]` row-major.
    m_a: Vec<f64>,
    d_in: usize,
    /// `M_B`, `[d_out, r]` row-major.
    m_b: Vec<f64>,
    d_out: usize,
}

impl AdditiveModule {
    fn new(
        log_sigma2: &PyReadonlyArray1<'_, f64>,
        m_a: &PyReadonlyArray2<'_, f64>,
        m_b: &PyReadonlyArray2<'_, f64>,
    ) -> BindingResult<Self> {
        let ls = c_slice("log_sigma2", log_sigma2)?;
        let a = c_slice("m_a", m_a)?;
        let b = c_slice("m_b", m_b)?;
        if m_a.shape()[0] != ls.len() || m_b.shape()[1] != ls.len() {
            return Err(shape(format!(
                "log_sigma2 has r={}, m_a is {:?}, m_b is {:?}",
                ls.len(),
                m_a.shape(),
                m_b.shape()
            )));
        }
        Ok(Self {
            log_sigma2: ls.to_vec(),
            m_a: a.to_vec(),
            d_in: m_a.shape()[1],
            m_b: b.to_vec(),
            d_out: m_b.shape()[0],
        })
    }
}

/// KL of an additive module; `log_sigma2` float64[r], `m_a` float64[r, d_in], `m_b` float64[d_out, r].
#[pyfunction]
fn kl_additive(
    py: Python<'_>,
    log_sigma2: PyReadonlyArray1<'_, f64>,
    m_a: PyReadonlyArray2<'_, f64>,
    m_b: PyReadonlyArray2<'_, f64>,
) -> BindingResult<f64> {
    let m = AdditiveModule::new(&log_sigma2, &m_a, &m_b)?;
    Ok(py.detach(|| {
        core::posterior::kl::kl_additive(&m.log_sigma2, &m.m_a, m.d_in, &m.m_b, m.d_out)
    })?)
}

/// Rank scores of a gate module: `log_alpha` itself (float64[r]).
#[pyfunction]
fn rank_scores_gate<'py>(
    py: Python<'py>,
    log_alpha: PyReadonlyArray1<'py, f64>,
) -> BindingResult<Bound<'py, PyArray1<f64>>> {
    let v = core::posterior::rank::rank_scores_gate(c_slice("log_alpha", &log_alpha)?)?;
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
) -> BindingResult<Bound<'py, PyArray1<f64>>> {
    let m = AdditiveModule::new(&log_sigma2, &m_a, &m_b)?;
    let v = py.detach(|| {
        core::posterior::rank::rank_scores_additive(
            &m.log_sigma2,
            &m.m_a,
            m.d_in,
            &m.m_b,
            m.d_out,
            eps,
        )
    })?;
    Ok(v.into_pyarray(py))
}

/// Register the KL and rank-score functions.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(kl_molchanov, m)?)?;
    m.add_function(wrap_pyfunction!(kl_gate, m)?)?;
    m.add_function(wrap_pyfunction!(kl_additive, m)?)?;
    m.add_function(wrap_pyfunction!(rank_scores_gate, m)?)?;
    m.add_function(wrap_pyfunction!(rank_scores_additive, m)?)?;
    Ok(())
}
