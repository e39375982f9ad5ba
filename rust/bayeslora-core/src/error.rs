//! The one error type of the core. `bayeslora-py` maps each variant to a class in
//! `bayeslora.errors`, so a new variant needs a line there too.

/// Every failure the core can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two inputs disagree in shape, or one has a shape the operation cannot take.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A value is NaN or infinite, or out of its allowed range.
    #[error("invalid value: {0}")]
    Value(String),
    /// A bundle on disk is missing, malformed, inconsistent, or uses something unsupported.
    #[error("bundle error: {0}")]
    Bundle(String),
}

/// Result alias for the core.
pub type Result<T> = std::result::Result<T, Error>;
