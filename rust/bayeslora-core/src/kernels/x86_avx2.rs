//! The AVX2 + FMA micro-kernels: 6 × 16 tiles, two 8-lane accumulators per row, one FMA chain
//! per output in `k` order. The safe entry points take an [`Avx2`] token, so they can only run
//! on a CPU that has the features; they check every bound the kernels rely on.

use std::arch::x86_64::*;

use super::gemm::{Epilogue, Tile, MR, NR};
use super::isa::Avx2;

/// A full 16-column tile of `rows` rows over `k` terms straight into `c` (row stride `ldc`),
/// continuing from the partial sums in `c` when `load`; `epi` is applied at the end.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(super) fn full_tile(
    _: Avx2,
    rows: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    panel: &[f32],
    c: &mut [f32],
    ldc: usize,
    epi: Epilogue<'_>,
    load: bool,
) {
    assert!(rows >= 1, "full_tile: no rows");
    assert!(
        a.len() >= (rows - 1) * lda + k && panel.len() >= k * NR,
        "full_tile: operands too short"
    );
    assert!(
        c.len() >= (rows - 1) * ldc + NR && epi.covers(NR),
        "full_tile: output or bias too short"
    );
    let (a, p, cp) = (a.as_ptr(), panel.as_ptr(), c.as_mut_ptr());
    let mut r0 = 0;
    while r0 < rows {
        let r = MR.min(rows - r0);
        // SAFETY: the token proves AVX2 and FMA; rows r0..r0 + r of `a` hold `k` floats at
        // stride `lda`, `panel` `k * NR` floats, rows r0..r0 + r of `c` NR floats at stride
        // `ldc`, and a bias NR floats (all asserted above).
        unsafe {
            let (a, cp) = (a.add(r0 * lda), cp.add(r0 * ldc));
            match r {
                6 => kernel_out::<6>(k, a, lda, p, cp, ldc, epi, load),
                5 => kernel_out::<5>(k, a, lda, p, cp, ldc, epi, load),
                4 => kernel_out::<4>(k, a, lda, p, cp, ldc, epi, load),
                3 => kernel_out::<3>(k, a, lda, p, cp, ldc, epi, load),
                2 => kernel_out::<2>(k, a, lda, p, cp, ldc, epi, load),
                _ => kernel_out::<1>(k, a, lda, p, cp, ldc, epi, load),
            }
        }
        r0 += r;
    }
}

/// `tile[0..rows] = A[0..rows, 0..k] · panel` for up to [`MR`] rows: [`full_tile`] storing
/// into the tile, whose rows are contiguous (a 16-column output with row stride `NR`).
#[inline]
pub(super) fn tile(
    t: Avx2,
    rows: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    panel: &[f32],
    tile: &mut Tile,
) {
    assert!((1..=MR).contains(&rows), "tile: 1 to {MR} rows");
    let c = tile.as_flattened_mut();
    full_tile(t, rows, k, a, lda, panel, c, NR, Epilogue::Store, false);
}

/// `A[0..R, 0..k] · panel`, one FMA chain per output in `k` order (starting from the partial
/// sums in `c` when `load`), stored as a full 16-column tile into `c` (row stride `ldc`):
/// `c = acc`, `c = acc + bias` or `c += acc` as `epi` says (the product first, then one
/// addition).
///
/// # Safety
/// AVX2 and FMA must be available; `a` must point at `R` rows of `k` readable floats with row
/// stride `lda`; `panel` at `k * NR` readable floats; `c` at `R` rows of 16 writable floats at
/// stride `ldc` (readable too when `load` or [`Epilogue::Accumulate`]); an [`Epilogue::Bias`]
/// must have at least 16 floats.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_out<const R: usize>(
    k: usize,
    a: *const f32,
    lda: usize,
    panel: *const f32,
    c: *mut f32,
    ldc: usize,
    epi: Epilogue<'_>,
    load: bool,
) {
    let mut acc0 = [_mm256_setzero_ps(); R];
    let mut acc1 = [_mm256_setzero_ps(); R];
    if load {
        for i in 0..R {
            // SAFETY: row i of `c` has 16 readable floats (the partial sums).
            unsafe {
                acc0[i] = _mm256_loadu_ps(c.add(i * ldc));
                acc1[i] = _mm256_loadu_ps(c.add(i * ldc + 8));
            }
        }
    }
    let mut bp = panel;
    for kk in 0..k {
        // SAFETY: kk < k, so both 8-float loads stay inside the panel and every broadcast
        // reads element (i, kk) of a row the caller guarantees.
        unsafe {
            let b0 = _mm256_loadu_ps(bp);
            let b1 = _mm256_loadu_ps(bp.add(8));
            for i in 0..R {
                let av = _mm256_broadcast_ss(&*a.add(i * lda + kk));
                acc0[i] = _mm256_fmadd_ps(av, b0, acc0[i]);
                acc1[i] = _mm256_fmadd_ps(av, b1, acc1[i]);
            }
            bp = bp.add(NR);
        }
    }
    // SAFETY: row i of `c` has 16 writable floats; a bias has 16 readable ones.
    unsafe {
        let (e0, e1) = match epi {
            Epilogue::Bias(bias) => (
                _mm256_loadu_ps(bias.as_ptr()),
                _mm256_loadu_ps(bias.as_ptr().add(8)),
            ),
            _ => (_mm256_setzero_ps(), _mm256_setzero_ps()),
        };
        for i in 0..R {
            let row = c.add(i * ldc);
            let (o0, o1) = match epi {
                Epilogue::Bias(_) => (_mm256_add_ps(acc0[i], e0), _mm256_add_ps(acc1[i], e1)),
                Epilogue::Accumulate => (
                    _mm256_add_ps(_mm256_loadu_ps(row), acc0[i]),
                    _mm256_add_ps(_mm256_loadu_ps(row.add(8)), acc1[i]),
                ),
                Epilogue::Store => (acc0[i], acc1[i]),
            };
            _mm256_storeu_ps(row, o0);
            _mm256_storeu_ps(row.add(8), o1);
        }
    }
}
