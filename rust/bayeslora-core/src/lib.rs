//! Pure-Rust core of `bayeslora`.
//!
//! No Python here: the bindings live in `bayeslora-py`. Everything a caller controls
//! (shapes, values, files) is validated and reported through [`Error`], never a panic.

pub mod analysis;
pub mod bundle;
pub mod encoder;
pub mod error;
pub mod kernels;
pub mod mc;
pub mod posterior;

pub use error::{Error, ErrorKind, Result};
