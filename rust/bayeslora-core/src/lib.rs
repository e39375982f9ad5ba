//! Pure-Rust core of `bayeslora`.
//!
//! No Python here: the bindings live in `bayeslora-py`. Everything a caller controls
//! (shapes, values, files) is validated and reported through [`Error`], never a panic.
//!
//! Layout, one concern per module:
//! - [`posterior`]: the training-side math of the rank posterior (`kl`: KL to the prior,
//!   `rank`: the rank scores pruning reads);
//! - [`mc`]: the seeded noise streams of Monte-Carlo inference and the one reduction of
//!   per-sample logits to the uncertainty fields;
//! - [`bundle`]: reading and validating an exported bundle (`files`: regular files only, reads
//!   capped by the bytes read, never memory-mapped; `meta`: `bayeslora.json`, `hf_config`:
//!   `config.json` and the tensor names of each architecture, `tensors`: the safetensors file);
//! - [`kernels`]: the dense f32 kernels of the runtime; the instruction set is detected once and
//!   carried as a type (`isa`), one instruction set per file (`scalar`, `x86_avx2`,
//!   `x86_avx512`), with the GEMM driver (`gemm`), packing (`pack`), the portable elementwise
//!   ops (`elementwise`) and the FMA-peak probe (`peak`) apart;
//! - [`encoder`]: the BERT-family classifier built from a bundle (`build`), its row layouts
//!   (`layout`), adapters' noise (`adapter`), attention (`attention`) and buffer pool (`pool`);
//! - [`analysis`]: the rank analysis (docs/method.md §8) and its small f64 linear algebra (`linalg`).
//!
//! Departures from the layout first proposed: the element-wise AVX-512 ops live in
//! `kernels/x86_avx512.rs` with the AVX-512 micro-kernels (one instruction set, one file); the
//! encoder's, the bundle's and `linalg`'s unit tests live in a `tests.rs` beside them, so no file
//! passes ~650 lines.

pub mod analysis;
pub mod bundle;
pub mod encoder;
pub mod error;
pub mod kernels;
pub mod mc;
pub mod posterior;
#[cfg(test)]
mod test_data;

pub use error::{Error, ErrorKind, Result};
