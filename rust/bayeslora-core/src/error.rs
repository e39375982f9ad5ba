//! The one error type of the core. `bayeslora-py` maps each [`ErrorKind`] to a class in
//! `bayeslora.errors` (in `rust/bayeslora-py/src/errors.rs`), so a new kind needs a line there.
//!
//! Failures that come from another library (reading a file, parsing JSON, a safetensors header)
//! keep that library's error as their [`std::error::Error::source`], with the file's path beside
//! it, instead of flattening it into a string. Their messages read as they always did.

use std::path::PathBuf;

use crate::kernels::IsaError;

/// Every failure the core can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two inputs disagree in shape, or one has a shape the operation cannot take.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A value is NaN or infinite, or out of its allowed range.
    #[error("invalid value: {0}")]
    Value(String),
    /// A bundle on disk is malformed, inconsistent, or uses something unsupported.
    #[error("bundle error: {0}")]
    Bundle(String),
    /// A file of a bundle cannot be read (missing, unreadable, ...).
    #[error("bundle error: {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A file of a bundle is not a regular file (after following symlinks): a FIFO, a device,
    /// a socket or a directory is refused before it is read.
    #[error("bundle error: {}: is {what}, not a regular file", path.display())]
    NotRegularFile {
        /// The file.
        path: PathBuf,
        /// What it is instead (`"a FIFO"`, `"a character device"`, ...).
        what: &'static str,
    },
    /// A file of a bundle is larger than the reader accepts, or its size changed while it was
    /// read (a file truncated or appended to under the reader).
    #[error("bundle error: {}: {detail}", path.display())]
    FileSize {
        /// The file.
        path: PathBuf,
        /// Sizes expected and found.
        detail: String,
    },
    /// A JSON file of a bundle is not JSON.
    #[error("bundle error: {}: invalid JSON: {source}", path.display())]
    JsonSyntax {
        /// The file.
        path: PathBuf,
        /// Where the parser stopped.
        #[source]
        source: serde_json::Error,
    },
    /// A JSON file of a bundle is JSON, but not of the expected form (a missing or mistyped key).
    #[error("bundle error: {}: {source}", path.display())]
    JsonSchema {
        /// The file.
        path: PathBuf,
        /// The key that is missing or has the wrong type.
        #[source]
        source: serde_json::Error,
    },
    /// The tensor file of a bundle is not a valid safetensors file.
    #[error("bundle error: {}: not a valid safetensors file: {source}", path.display())]
    SafeTensors {
        /// The file.
        path: PathBuf,
        /// What `safetensors` found wrong with its header.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// `BAYESLORA_ISA` names an unknown instruction set, or one this CPU lacks.
    #[error(transparent)]
    Isa(#[from] IsaError),
}

/// The family of an [`Error`]: what a caller would catch it as. The Python bindings raise
/// `ShapeError`, `InvalidValueError`, `BundleError` and `IsaError` respectively.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// [`Error::Shape`].
    Shape,
    /// [`Error::Value`].
    Value,
    /// Anything wrong with a bundle on disk, read or parsed.
    Bundle,
    /// [`Error::Isa`]: the kernels' instruction set cannot be the one asked for.
    Isa,
}

impl Error {
    /// The family of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Shape(_) => ErrorKind::Shape,
            Error::Value(_) => ErrorKind::Value,
            Error::Bundle(_)
            | Error::Io { .. }
            | Error::NotRegularFile { .. }
            | Error::FileSize { .. }
            | Error::JsonSyntax { .. }
            | Error::JsonSchema { .. }
            | Error::SafeTensors { .. } => ErrorKind::Bundle,
            Error::Isa(_) => ErrorKind::Isa,
        }
    }
}

/// Result alias for the core.
pub type Result<T> = std::result::Result<T, Error>;
