//! The variational posterior of the adapters' ranks: its KL to the prior (SPEC §3) and the
//! per-rank scores pruning reads (SPEC §2). The runtime's sampling from it is in [`crate::mc`].

pub mod kl;
pub mod rank;
