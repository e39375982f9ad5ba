//! Bindings of the rank analysis (docs/method.md §8): low-rank SVD, principal angles, Spearman, and the
//! per-module analysis of a whole model in parallel. float64 numpy arrays in and out; the GIL is
//! released around the numerical work.

use bayeslora_core as core;
use core::analysis::linalg::Mat;
use core::analysis::{LowRank, ModuleAnalysis, ModuleInput};
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::arrays::c_slice;
use crate::errors::{shape, BindingResult};

/// Validated borrowed factors: `a` [r, d_in], `b` [d_out, r], `ez` [r].
fn factors<'a>(
    a: &'a PyReadonlyArray2<'_, f64>,
    b: &'a PyReadonlyArray2<'_, f64>,
    ez: &'a PyReadonlyArray1<'_, f64>,
    scale: f64,
) -> BindingResult<LowRank<'a>> {
    let (r, d_in) = (a.shape()[0], a.shape()[1]);
    let (d_out, rb) = (b.shape()[0], b.shape()[1]);
    if rb != r || ez.len() != r {
        return Err(shape(format!(
            "lora_A is {:?}, lora_B is {:?}, ez has {} values: ranks disagree",
            a.shape(),
            b.shape(),
            ez.len()
        )));
    }
    Ok(LowRank {
        a: c_slice("a", a)?,
        b: c_slice("b", b)?,
        ez: c_slice("ez", ez)?,
        rank: r,
        d_in,
        d_out,
        scale,
    })
}

fn mat_to_py<'py>(py: Python<'py>, m: &Mat) -> PyResult<Bound<'py, PyArray2<f64>>> {
    m.to_row_major()
        .into_pyarray(py)
        .reshape([m.rows(), m.cols()])
}

fn rows_to_py<'py>(
    py: Python<'py>,
    v: Vec<f64>,
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'py, PyArray2<f64>>> {
    v.into_pyarray(py).reshape([rows, cols])
}

/// Thin SVD of `ΔW = scale · b diag(ez) a` from its factors → `(u [d_out, p], s [p], v [d_in, p])`,
/// `p = min(r, d_in, d_out)`, `s` descending; `ΔW = u diag(s) vᵀ`.
#[pyfunction]
#[pyo3(signature = (a, b, ez, scale))]
#[allow(clippy::type_complexity)]
fn low_rank_svd<'py>(
    py: Python<'py>,
    a: PyReadonlyArray2<'py, f64>,
    b: PyReadonlyArray2<'py, f64>,
    ez: PyReadonlyArray1<'py, f64>,
    scale: f64,
) -> BindingResult<(
    Bound<'py, PyArray2<f64>>,
    Bound<'py, PyArray1<f64>>,
    Bound<'py, PyArray2<f64>>,
)> {
    let f = factors(&a, &b, &ez, scale)?;
    let svd = py.detach(|| core::analysis::low_rank_svd(&f))?;
    Ok((
        mat_to_py(py, &svd.u)?,
        svd.s.into_pyarray(py),
        mat_to_py(py, &svd.v)?,
    ))
}

/// Principal angles (radians, descending) between the column spaces of `x` [m, n] and `y` [m, k],
/// as `scipy.linalg.subspace_angles`.
#[pyfunction]
fn subspace_angles<'py>(
    py: Python<'py>,
    x: PyReadonlyArray2<'py, f64>,
    y: PyReadonlyArray2<'py, f64>,
) -> BindingResult<Bound<'py, PyArray1<f64>>> {
    // Any memory layout: copied in logical (row-major) order.
    let xs: Vec<f64> = x.as_array().iter().copied().collect();
    let ys: Vec<f64> = y.as_array().iter().copied().collect();
    let (xr, xc, yr, yc) = (x.shape()[0], x.shape()[1], y.shape()[0], y.shape()[1]);
    let th = py.detach(|| {
        let xm = Mat::from_row_major(xr, xc, &xs)?;
        let ym = Mat::from_row_major(yr, yc, &ys)?;
        core::analysis::linalg::subspace_angles(&xm, &ym)
    })?;
    Ok(th.into_pyarray(py))
}

/// Spearman rank correlation with average ranks for ties (as `scipy.stats.spearmanr`); NaN when
/// undefined.
#[pyfunction]
fn spearman(x: PyReadonlyArray1<'_, f64>, y: PyReadonlyArray1<'_, f64>) -> BindingResult<f64> {
    let xs: Vec<f64> = x.as_array().iter().copied().collect();
    let ys: Vec<f64> = y.as_array().iter().copied().collect();
    Ok(core::analysis::linalg::spearman(&xs, &ys)?)
}

/// One module of `analyze_modules`: `(a, b, ez, relevance, scale)` (a Python tuple).
type ModuleArgs<'py> = (
    PyReadonlyArray2<'py, f64>,
    PyReadonlyArray2<'py, f64>,
    PyReadonlyArray1<'py, f64>,
    Option<PyReadonlyArray1<'py, f64>>,
    f64,
);

fn ragged<'py>(py: Python<'py>, v: Vec<Vec<f64>>) -> PyResult<Bound<'py, PyList>> {
    PyList::new(py, v.into_iter().map(|x| x.into_pyarray(py)))
}

fn analysis_to_dict<'py>(py: Python<'py>, m: ModuleAnalysis) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let p = m.singular_values.len();
    d.set_item("rank", m.rank)?;
    d.set_item("d_in", m.d_in)?;
    d.set_item("d_out", m.d_out)?;
    d.set_item("r_eff", m.r_eff)?;
    d.set_item("singular_values", m.singular_values.into_pyarray(py))?;
    d.set_item("u", rows_to_py(py, m.u, m.d_out, p)?)?;
    d.set_item("v", rows_to_py(py, m.v, m.d_in, p)?)?;
    d.set_item("magnitudes", m.magnitudes.into_pyarray(py))?;
    d.set_item("cos_a", m.cos_a.into_pyarray(py))?;
    d.set_item("match_a", m.match_a.into_pyarray(py))?;
    d.set_item("cos_b", m.cos_b.into_pyarray(py))?;
    d.set_item("match_b", m.match_b.into_pyarray(py))?;
    let to_i64 = |v: Vec<usize>| v.into_iter().map(|x| x as i64).collect::<Vec<i64>>();
    d.set_item("order", to_i64(m.order).into_pyarray(py))?;
    d.set_item(
        "magnitude_order",
        to_i64(m.magnitude_order).into_pyarray(py),
    )?;
    d.set_item("angles_v", ragged(py, m.angles_v)?)?;
    d.set_item("angles_u", ragged(py, m.angles_u)?)?;
    d.set_item("magnitude_angles_v", ragged(py, m.magnitude_angles_v)?)?;
    d.set_item("magnitude_angles_u", ragged(py, m.magnitude_angles_u)?)?;
    d.set_item("energy", m.energy.into_pyarray(py))?;
    d.set_item("effective_rank", m.effective_rank)?;
    d.set_item("stable_rank", m.stable_rank)?;
    d.set_item("spearman", m.spearman)?;
    Ok(d)
}

/// Analyse many modules in parallel (docs/method.md §8). `modules`: a sequence of tuples
/// `(a [r, d_in], b [d_out, r], ez [r], relevance [r] | None, scale)` (float64, C-contiguous).
/// `num_threads`: size of the thread pool (None: all cores). Returns one dict per module with
/// `rank, d_in, d_out, r_eff, singular_values, u, v, magnitudes, cos_a, match_a, cos_b, match_b,
/// order, magnitude_order, angles_v, angles_u, magnitude_angles_v, magnitude_angles_u, energy,
/// effective_rank, stable_rank, spearman` (see `bayeslora.analysis` for their meaning).
#[pyfunction]
#[pyo3(signature = (modules, num_threads=None))]
fn analyze_modules<'py>(
    py: Python<'py>,
    modules: Vec<ModuleArgs<'py>>,
    num_threads: Option<usize>,
) -> BindingResult<Bound<'py, PyList>> {
    let mut inputs = Vec::with_capacity(modules.len());
    for (a, b, ez, rel, scale) in modules.iter() {
        let f = factors(a, b, ez, *scale)?;
        let relevance = match rel {
            Some(r) => Some(c_slice("relevance", r)?),
            None => None,
        };
        inputs.push(ModuleInput {
            factors: f,
            relevance,
        });
    }
    let out = py.detach(|| core::analysis::analyze_modules(&inputs, num_threads))?;
    Ok(PyList::new(
        py,
        out.into_iter()
            .map(|m| analysis_to_dict(py, m))
            .collect::<PyResult<Vec<_>>>()?,
    )?)
}

/// Register the analysis functions.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(low_rank_svd, m)?)?;
    m.add_function(wrap_pyfunction!(subspace_angles, m)?)?;
    m.add_function(wrap_pyfunction!(spearman, m)?)?;
    m.add_function(wrap_pyfunction!(analyze_modules, m)?)?;
    Ok(())
}
