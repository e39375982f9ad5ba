//! The portable micro-kernel: the FMA chain of the SIMD kernels with `f32::mul_add`, one
//! element at a time (the same numbers, bit for bit).

use super::gemm::{Tile, NR};

/// `tile[0..rows] += A[0..rows, 0..k] · panel` (`tile` starts at zero), one `mul_add` chain per
/// output in `k` order.
pub(super) fn tile(rows: usize, k: usize, a: &[f32], lda: usize, panel: &[f32], tile: &mut Tile) {
    for kk in 0..k {
        let b = &panel[kk * NR..kk * NR + NR];
        for i in 0..rows {
            let av = a[i * lda + kk];
            for j in 0..NR {
                tile[i][j] = av.mul_add(b[j], tile[i][j]);
            }
        }
    }
}
