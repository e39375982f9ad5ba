//! The one bridge from errors to Python exceptions (as polars' `PyPolarsErr`): every binding
//! returns [`BindingResult`], so a core error and a Python error both propagate with `?`, and
//! the core's [`ErrorKind`](core::ErrorKind) alone decides the Python class.
//!
//! The classes are those of `bayeslora.errors` (imported once, on first use, by
//! `import_exception!`), so they keep deriving from both `BayesLoRAError` and the builtin a
//! caller would catch without knowing us (`ValueError`, `OSError`).

use bayeslora_core as core;
use core::ErrorKind;
use pyo3::PyErr;

pyo3::import_exception!(bayeslora.errors, ShapeError);
pyo3::import_exception!(bayeslora.errors, InvalidValueError);
pyo3::import_exception!(bayeslora.errors, BundleError);
pyo3::import_exception!(bayeslora.errors, IsaError);

/// An error on its way to Python: from the core (classified by its kind) or already Python's
/// own (a failed conversion, an exception raised by a callee).
#[derive(Debug)]
pub(crate) enum BindingError {
    /// Raised as `ShapeError`, `InvalidValueError`, `BundleError` or `IsaError`.
    Core(core::Error),
    /// Raised as it is.
    Python(PyErr),
}

/// What every binding returns.
pub(crate) type BindingResult<T> = Result<T, BindingError>;

impl From<core::Error> for BindingError {
    fn from(e: core::Error) -> Self {
        Self::Core(e)
    }
}

impl From<PyErr> for BindingError {
    fn from(e: PyErr) -> Self {
        Self::Python(e)
    }
}

impl From<BindingError> for PyErr {
    fn from(e: BindingError) -> Self {
        match e {
            BindingError::Python(e) => e,
            BindingError::Core(e) => {
                let msg = e.to_string();
                match e.kind() {
                    ErrorKind::Shape => ShapeError::new_err(msg),
                    ErrorKind::Value => InvalidValueError::new_err(msg),
                    ErrorKind::Bundle => BundleError::new_err(msg),
                    ErrorKind::Isa => IsaError::new_err(msg),
                }
            }
        }
    }
}

/// A caller's argument that is not acceptable (raised as `InvalidValueError`).
pub(crate) fn invalid(msg: impl Into<String>) -> BindingError {
    BindingError::Core(core::Error::Value(msg.into()))
}

/// Arguments that disagree in shape (raised as `ShapeError`).
pub(crate) fn shape(msg: impl Into<String>) -> BindingError {
    BindingError::Core(core::Error::Shape(msg.into()))
}
