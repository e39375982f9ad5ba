//! Borrowing numpy arrays as Rust slices: only C-contiguous arrays are accepted, because
//! `as_slice` also takes Fortran order, which would be read transposed.

use numpy::ndarray::Dimension;
use numpy::{Element, PyReadonlyArray, PyUntypedArrayMethods};

use crate::errors::{invalid, BindingResult};

/// The numpy name of an element type, for messages.
pub(crate) trait DtypeName: Element {
    /// `"float64"`, ...
    const NAME: &'static str;
}

impl DtypeName for f64 {
    const NAME: &'static str = "float64";
}

impl DtypeName for f32 {
    const NAME: &'static str = "float32";
}

impl DtypeName for i64 {
    const NAME: &'static str = "int64";
}

/// The elements of `array` in row-major order; `what` names it in the error.
pub(crate) fn c_slice<'a, T: DtypeName, D: Dimension>(
    what: &str,
    array: &'a PyReadonlyArray<'_, T, D>,
) -> BindingResult<&'a [T]> {
    let err = || invalid(format!("{what} must be a C-contiguous {} array", T::NAME));
    if !array.is_c_contiguous() {
        return Err(err());
    }
    array.as_slice().map_err(|_| err())
}
