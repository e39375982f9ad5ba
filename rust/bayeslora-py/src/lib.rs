//! `bayeslora._core`: a thin PyO3 layer over `bayeslora-core`. Numbers cross as numpy arrays,
//! long work runs with the GIL released, and every error goes through the one bridge in
//! [`errors`], which raises the matching `bayeslora.errors` class.
//!
//! - [`errors`]: core and Python errors → Python exceptions;
//! - [`arrays`]: numpy arrays borrowed as slices (C order only);
//! - [`posterior`]: KL terms and rank scores;
//! - [`analysis`]: the rank analysis (docs/method.md §8);
//! - [`runtime`]: the bundle runtime (`Runtime`), the FMA-peak probe and the kernels' instruction
//!   set (`isa`, `gemm_calls`).
//!
//! Not declared `gil_used = false`: the wheel is built for the abi3 stable ABI (`abi3-py310`),
//! which free-threaded CPython builds do not load, so the declaration would have no effect.

mod analysis;
mod arrays;
mod errors;
mod posterior;
mod runtime;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    posterior::register(m)?;
    analysis::register(m)?;
    runtime::register(m)?;
    Ok(())
}
