//! The variational posterior of the adapters' ranks: its KL to the prior (docs/method.md §3) and the
//! per-rank scores pruning reads (docs/method.md §2). The runtime's sampling from it is in [`crate::mc`].

pub mod kl;
pub mod rank;
