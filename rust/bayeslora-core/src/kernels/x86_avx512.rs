//! Everything written with AVX-512 intrinsics: the GEMM micro-kernels (12 × 16 tiles, and
//! 12 × 32 tiles over two panels), softmax, exact GELU, add + LayerNorm, and the 16 × 16
//! register transpose of the panel packing. The safe entry points take an [`Avx512`] token, so
//! they can only run on a CPU that has the features, and check the bounds the kernels rely on.
//!
//! The elementwise ops are the portable formulas of `elementwise.rs` 16 lanes at a time; a row's
//! ragged end goes through the same code under a lane mask, so every element of a row is
//! computed alike whatever the row's width.

use std::arch::x86_64::*;

use super::gemm::{Epilogue, MR_WIDE, NR, PREFETCH};
use super::isa::Avx512;

/// A full 16-column tile of up to 12 rows over `k` terms straight into `c` (row stride `ldc`),
/// continuing from the partial sums in `c` when `load`; `epi` is applied at the end.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(super) fn full_tile(
    _: Avx512,
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
    assert!(
        (1..=MR_WIDE).contains(&rows),
        "full_tile: rows out of range"
    );
    assert!(
        a.len() >= (rows - 1) * lda + k && panel.len() >= k * NR,
        "full_tile: operands too short"
    );
    assert!(
        c.len() >= (rows - 1) * ldc + NR && epi.covers(NR),
        "full_tile: output or bias too short"
    );
    let (a, p, cp) = (a.as_ptr(), panel.as_ptr(), c.as_mut_ptr());
    // SAFETY: the token proves AVX-512F, AVX2 and FMA; `a` holds `rows` rows of `k` floats at
    // stride `lda`, `panel` `k * NR` floats, `c` `rows` rows of NR floats at stride `ldc`, and a
    // bias NR floats (all asserted above).
    unsafe {
        match rows {
            12 => kernel_out::<12>(k, a, lda, p, cp, ldc, epi, load),
            11 => kernel_out::<11>(k, a, lda, p, cp, ldc, epi, load),
            10 => kernel_out::<10>(k, a, lda, p, cp, ldc, epi, load),
            9 => kernel_out::<9>(k, a, lda, p, cp, ldc, epi, load),
            8 => kernel_out::<8>(k, a, lda, p, cp, ldc, epi, load),
            7 => kernel_out::<7>(k, a, lda, p, cp, ldc, epi, load),
            6 => kernel_out::<6>(k, a, lda, p, cp, ldc, epi, load),
            5 => kernel_out::<5>(k, a, lda, p, cp, ldc, epi, load),
            4 => kernel_out::<4>(k, a, lda, p, cp, ldc, epi, load),
            3 => kernel_out::<3>(k, a, lda, p, cp, ldc, epi, load),
            2 => kernel_out::<2>(k, a, lda, p, cp, ldc, epi, load),
            _ => kernel_out::<1>(k, a, lda, p, cp, ldc, epi, load),
        }
    }
}

/// Two adjacent full panels (32 columns) of up to 12 rows over `k` terms; `pair` starts at the
/// first panel's `kb`-th row and the second panel lies `stride` floats further. Same FMA chain
/// per output as [`full_tile`], so the same numbers.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(super) fn pair_tile(
    _: Avx512,
    rows: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    pair: &[f32],
    stride: usize,
    c: &mut [f32],
    ldc: usize,
    epi: Epilogue<'_>,
    load: bool,
) {
    assert!(
        (1..=MR_WIDE).contains(&rows),
        "pair_tile: rows out of range"
    );
    assert!(
        stride >= k * NR && pair.len() >= stride + k * NR,
        "pair_tile: panels too short"
    );
    assert!(
        a.len() >= (rows - 1) * lda + k,
        "pair_tile: left operand too short"
    );
    assert!(
        c.len() >= (rows - 1) * ldc + 2 * NR && epi.covers(2 * NR),
        "pair_tile: output or bias too short"
    );
    let (a, p, cp) = (a.as_ptr(), pair.as_ptr(), c.as_mut_ptr());
    // SAFETY: the token proves AVX-512F, AVX2 and FMA; the asserts above bound every read of
    // `a`, of both panels and of a bias, and every write of `c`.
    unsafe {
        let q = p.add(stride);
        match rows {
            12 => kernel_pair::<12>(k, a, lda, p, q, cp, ldc, epi, load),
            11 => kernel_pair::<11>(k, a, lda, p, q, cp, ldc, epi, load),
            10 => kernel_pair::<10>(k, a, lda, p, q, cp, ldc, epi, load),
            9 => kernel_pair::<9>(k, a, lda, p, q, cp, ldc, epi, load),
            8 => kernel_pair::<8>(k, a, lda, p, q, cp, ldc, epi, load),
            7 => kernel_pair::<7>(k, a, lda, p, q, cp, ldc, epi, load),
            6 => kernel_pair::<6>(k, a, lda, p, q, cp, ldc, epi, load),
            5 => kernel_pair::<5>(k, a, lda, p, q, cp, ldc, epi, load),
            4 => kernel_pair::<4>(k, a, lda, p, q, cp, ldc, epi, load),
            3 => kernel_pair::<3>(k, a, lda, p, q, cp, ldc, epi, load),
            2 => kernel_pair::<2>(k, a, lda, p, q, cp, ldc, epi, load),
            _ => kernel_pair::<1>(k, a, lda, p, q, cp, ldc, epi, load),
        }
    }
}

/// 16-lane version of the AVX2 `kernel_out` for up to 12 rows: the same FMA chain per output
/// in `k` order, so the same numbers.
///
/// # Safety
/// AVX-512F must be available; `a` must point at `R` rows of `k` readable floats with row
/// stride `lda`; `panel` at `k * NR` readable floats; `c` at `R` rows of 16 writable floats
/// with stride `ldc`; an [`Epilogue::Bias`] must have at least 16 floats.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma")]
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
    let mut acc = [_mm512_setzero_ps(); R];
    if load {
        for (i, v) in acc.iter_mut().enumerate() {
            // SAFETY: row i of `c` has 16 readable floats (the partial sums).
            *v = unsafe { _mm512_loadu_ps(c.add(i * ldc)) };
        }
    }
    let mut bp = panel;
    for kk in 0..k {
        // SAFETY: kk < k: the 16-float load stays in the panel, each scalar read is
        // element (i, kk) of a row the caller guarantees.
        unsafe {
            // a hint, never a fault: past the panel's end it reads nothing
            _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(PREFETCH).cast());
            let b = _mm512_loadu_ps(bp);
            for (i, v) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(i * lda + kk));
                *v = _mm512_fmadd_ps(av, b, *v);
            }
            bp = bp.add(NR);
        }
    }
    // SAFETY: row i of `c` has 16 writable floats; a bias has 16 readable ones.
    unsafe {
        let e = match epi {
            Epilogue::Bias(bias) => _mm512_loadu_ps(bias.as_ptr()),
            _ => _mm512_setzero_ps(),
        };
        for (i, v) in acc.iter().enumerate() {
            let row = c.add(i * ldc);
            let o = match epi {
                Epilogue::Bias(_) => _mm512_add_ps(*v, e),
                Epilogue::Accumulate => _mm512_add_ps(_mm512_loadu_ps(row), *v),
                Epilogue::Store => *v,
            };
            _mm512_storeu_ps(row, o);
        }
    }
}

/// [`kernel_out`] over two panels at once (`p0`, `p1`: `[k][16]` each) into 32 columns of
/// `c`: 24 accumulators, one broadcast of `a` feeding two FMAs. Each output keeps its own
/// FMA chain in `k` order, so the numbers are those of two [`kernel_out`] calls.
///
/// # Safety
/// AVX-512F must be available; `a` must point at `R` rows of `k` readable floats with row
/// stride `lda`; `p0` and `p1` at `k * NR` readable floats each; `c` at `R` rows of 32
/// writable floats with stride `ldc`; an [`Epilogue::Bias`] must have at least 32 floats.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn kernel_pair<const R: usize>(
    k: usize,
    a: *const f32,
    lda: usize,
    p0: *const f32,
    p1: *const f32,
    c: *mut f32,
    ldc: usize,
    epi: Epilogue<'_>,
    load: bool,
) {
    let mut acc0 = [_mm512_setzero_ps(); R];
    let mut acc1 = [_mm512_setzero_ps(); R];
    if load {
        for i in 0..R {
            // SAFETY: row i of `c` has 32 readable floats (the partial sums).
            unsafe {
                acc0[i] = _mm512_loadu_ps(c.add(i * ldc));
                acc1[i] = _mm512_loadu_ps(c.add(i * ldc + NR));
            }
        }
    }
    let (mut b0p, mut b1p) = (p0, p1);
    for kk in 0..k {
        // SAFETY: kk < k: both 16-float loads stay in their panels, each scalar read is
        // element (i, kk) of a row the caller guarantees.
        unsafe {
            // hints, never faults: past a panel's end they read nothing
            _mm_prefetch::<_MM_HINT_T0>(b0p.wrapping_add(PREFETCH).cast());
            _mm_prefetch::<_MM_HINT_T0>(b1p.wrapping_add(PREFETCH).cast());
            let b0 = _mm512_loadu_ps(b0p);
            let b1 = _mm512_loadu_ps(b1p);
            for i in 0..R {
                let av = _mm512_set1_ps(*a.add(i * lda + kk));
                acc0[i] = _mm512_fmadd_ps(av, b0, acc0[i]);
                acc1[i] = _mm512_fmadd_ps(av, b1, acc1[i]);
            }
            b0p = b0p.add(NR);
            b1p = b1p.add(NR);
        }
    }
    // SAFETY: row i of `c` has 32 writable floats; a bias has 32 readable ones.
    unsafe {
        let (e0, e1) = match epi {
            Epilogue::Bias(bias) => (
                _mm512_loadu_ps(bias.as_ptr()),
                _mm512_loadu_ps(bias.as_ptr().add(NR)),
            ),
            _ => (_mm512_setzero_ps(), _mm512_setzero_ps()),
        };
        for i in 0..R {
            let row = c.add(i * ldc);
            let (o0, o1) = match epi {
                Epilogue::Bias(_) => (_mm512_add_ps(acc0[i], e0), _mm512_add_ps(acc1[i], e1)),
                Epilogue::Accumulate => (
                    _mm512_add_ps(_mm512_loadu_ps(row), acc0[i]),
                    _mm512_add_ps(_mm512_loadu_ps(row.add(NR)), acc1[i]),
                ),
                Epilogue::Store => (acc0[i], acc1[i]),
            };
            _mm512_storeu_ps(row, o0);
            _mm512_storeu_ps(row.add(NR), o1);
        }
    }
}

// ---- elementwise and packing ops ----------------------------------------------------------

/// Row-wise softmax of `rows × width` values after multiplying by `scale` (> 0).
pub(super) fn softmax_rows(_: Avx512, x: &mut [f32], width: usize, scale: f32) {
    // SAFETY: the token proves AVX-512F; the kernel reads and writes inside `x` only.
    unsafe { softmax_rows_impl(x, width, scale) }
}

/// `x ← LayerNorm(x + r)` over rows of `gamma.len()` (> 0).
pub(super) fn add_layer_norm(
    _: Avx512,
    x: &mut [f32],
    r: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    assert!(
        r.len() >= x.len() && !gamma.is_empty() && beta.len() >= gamma.len(),
        "add_layer_norm: residual or parameters too short"
    );
    // SAFETY: the token proves AVX-512F; the lengths the kernel relies on are asserted above.
    unsafe { add_layer_norm_impl(x, r, gamma, beta, eps) }
}

/// Exact GELU in place.
pub(super) fn gelu(_: Avx512, x: &mut [f32]) {
    // SAFETY: the token proves AVX-512F; the kernel reads and writes inside `x` only.
    unsafe { gelu_impl(x) }
}

/// Panel `[k][16]` of the transposes of `cols` (≤ 16) rows of `b` (row stride `ld`).
pub(super) fn transpose_panel(
    _: Avx512,
    b: &[f32],
    ld: usize,
    cols: usize,
    k: usize,
    panel: &mut [f32],
) {
    // SAFETY: the token proves AVX-512F; the kernel asserts its bounds itself.
    unsafe { transpose_panel_impl(b, ld, cols, k, panel) }
}

/// 16 lanes of `exp_f32` (elementwise.rs) (2^n applied with `scalef`), 0 below −87.3.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp16(x_in: __m512) -> __m512 {
    let x = _mm512_min_ps(
        _mm512_max_ps(x_in, _mm512_set1_ps(-87.3)),
        _mm512_set1_ps(88.0),
    );
    let t = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let p = _mm512_add_ps(
        _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r),
        _mm512_set1_ps(1.0),
    );
    let e = _mm512_scalef_ps(p, n);
    let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x_in, _mm512_set1_ps(-87.3));
    _mm512_maskz_mov_ps(keep, e)
}

/// Lane mask of the first `n` (≤ 16) lanes.
#[inline]
fn lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// `(offset, mask)` of the 16-lane chunks of `len` floats, the last one masked.
#[inline]
fn chunks16(len: usize) -> impl Iterator<Item = (usize, __mmask16)> {
    (0..len).step_by(16).map(move |j| (j, lanes(len - j)))
}

/// # Safety
/// AVX-512F must be available.
#[target_feature(enable = "avx512f")]
unsafe fn softmax_rows_impl(x: &mut [f32], width: usize, scale: f32) {
    if width == 0 {
        return;
    }
    let sv = _mm512_set1_ps(scale);
    for row in x.chunks_exact_mut(width) {
        let p = row.as_mut_ptr();
        // max of the raw row (scale > 0), then e^(scale·x − scale·max) in one pass
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        for (j, m) in chunks16(width) {
            // SAFETY: lanes j..j + popcount(m) lie inside the row; masked lanes are not touched.
            unsafe {
                mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, p.add(j)));
            }
        }
        let mv = _mm512_set1_ps(_mm512_reduce_max_ps(mx) * scale);
        let mut sum = _mm512_setzero_ps();
        for (j, m) in chunks16(width) {
            // SAFETY: as above.
            unsafe {
                let v = _mm512_maskz_loadu_ps(m, p.add(j));
                let e = exp16(_mm512_sub_ps(_mm512_mul_ps(v, sv), mv));
                _mm512_mask_storeu_ps(p.add(j), m, e);
                sum = _mm512_mask_add_ps(sum, m, sum, e);
            }
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        for (j, m) in chunks16(width) {
            // SAFETY: as above.
            unsafe {
                let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p.add(j)), inv);
                _mm512_mask_storeu_ps(p.add(j), m, v);
            }
        }
    }
}

/// `x ← LayerNorm(x + r)` over rows of `gamma.len()`: the sum, the centred sum of squares
/// and the affine map in three passes over the row, 16 lanes at a time (ragged end masked).
///
/// # Safety
/// AVX-512F must be available; `r.len() >= x.len()`, `beta.len() >= gamma.len() > 0`.
#[target_feature(enable = "avx512f")]
unsafe fn add_layer_norm_impl(x: &mut [f32], r: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let h = gamma.len();
    assert!(beta.len() >= h, "add_layer_norm: beta too short");
    let inv_h = 1.0 / h as f32;
    for (row, res) in x.chunks_exact_mut(h).zip(r.chunks_exact(h)) {
        let (p, q) = (row.as_mut_ptr(), res.as_ptr());
        let mut sum = _mm512_setzero_ps();
        for (j, m) in chunks16(h) {
            // SAFETY: lanes j..j + popcount(m) lie inside the row (and the residual row).
            unsafe {
                let v = _mm512_add_ps(
                    _mm512_maskz_loadu_ps(m, p.add(j)),
                    _mm512_maskz_loadu_ps(m, q.add(j)),
                );
                _mm512_mask_storeu_ps(p.add(j), m, v);
                sum = _mm512_add_ps(sum, v);
            }
        }
        let mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) * inv_h);
        let mut sq = _mm512_setzero_ps();
        for (j, m) in chunks16(h) {
            // SAFETY: as above.
            unsafe {
                let d = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, p.add(j)), mean);
                sq = _mm512_fmadd_ps(d, d, sq);
            }
        }
        let var = _mm512_reduce_add_ps(sq) * inv_h;
        let inv = _mm512_set1_ps(super::elementwise::inv_std(var, eps));
        for (j, m) in chunks16(h) {
            // SAFETY: as above; gamma and beta hold h floats.
            unsafe {
                let d = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(j)), mean);
                let g = _mm512_maskz_loadu_ps(m, gamma.as_ptr().add(j));
                let b = _mm512_maskz_loadu_ps(m, beta.as_ptr().add(j));
                let y = _mm512_fmadd_ps(_mm512_mul_ps(d, inv), g, b);
                _mm512_mask_storeu_ps(p.add(j), m, y);
            }
        }
    }
}

/// Panel `[k][16]` of the transposes of `cols` (≤ 16) rows of `b` (row stride `ld`): column
/// `jj` of the panel is row `jj`'s first `k` floats; the other columns are zero. Blocks of
/// 16 × 16 are loaded row by row (contiguous reads) and transposed in registers.
///
/// # Safety
/// AVX-512F must be available; `b` must hold `(cols − 1)·ld + k` floats, `panel` `16·k`.
#[target_feature(enable = "avx512f")]
unsafe fn transpose_panel_impl(b: &[f32], ld: usize, cols: usize, k: usize, panel: &mut [f32]) {
    assert!(
        (1..=16).contains(&cols) && b.len() >= (cols - 1) * ld + k && panel.len() >= 16 * k,
        "transpose_panel: operands too short"
    );
    for (kb, m) in chunks16(k) {
        let klen = 16.min(k - kb);
        let mut r = [_mm512_setzero_ps(); 16];
        for (jj, v) in r.iter_mut().enumerate().take(cols) {
            // SAFETY: row jj < cols holds floats kb..kb + klen (asserted above).
            *v = unsafe { _mm512_maskz_loadu_ps(m, b.as_ptr().add(jj * ld + kb)) };
        }
        let t = transpose16(r);
        for (kk, v) in t.iter().enumerate().take(klen) {
            // SAFETY: kb + kk < k: the 16 floats lie inside the panel.
            unsafe { _mm512_storeu_ps(panel.as_mut_ptr().add((kb + kk) * 16), *v) };
        }
    }
}

/// The 16 × 16 transpose of rows `r` (row `i` lane `j` → row `j` lane `i`).
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    // 32-bit interleave of row pairs, then 64-bit interleave: each 128-bit lane holds a
    // transposed 4 × 4 block; two rounds of 128-bit lane shuffles put the blocks in place
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    let pd = _mm512_castps_pd;
    let ps = _mm512_castpd_ps;
    let mut u = [_mm512_setzero_ps(); 16];
    for q in 0..4 {
        let (a, b, c, d) = (t[4 * q], t[4 * q + 1], t[4 * q + 2], t[4 * q + 3]);
        u[4 * q] = ps(_mm512_unpacklo_pd(pd(a), pd(c)));
        u[4 * q + 1] = ps(_mm512_unpackhi_pd(pd(a), pd(c)));
        u[4 * q + 2] = ps(_mm512_unpacklo_pd(pd(b), pd(d)));
        u[4 * q + 3] = ps(_mm512_unpackhi_pd(pd(b), pd(d)));
    }
    // u[4q + c] lane L: rows 4q..4q+4 of column 4L + c
    let mut v = [_mm512_setzero_ps(); 16];
    for c in 0..4 {
        v[c] = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
        v[4 + c] = _mm512_shuffle_f32x4::<0xdd>(u[c], u[4 + c]);
        v[8 + c] = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
        v[12 + c] = _mm512_shuffle_f32x4::<0xdd>(u[8 + c], u[12 + c]);
    }
    let mut out = [_mm512_setzero_ps(); 16];
    for c in 0..4 {
        out[c] = _mm512_shuffle_f32x4::<0x88>(v[c], v[8 + c]);
        out[4 + c] = _mm512_shuffle_f32x4::<0x88>(v[4 + c], v[12 + c]);
        out[8 + c] = _mm512_shuffle_f32x4::<0xdd>(v[c], v[8 + c]);
        out[12 + c] = _mm512_shuffle_f32x4::<0xdd>(v[4 + c], v[12 + c]);
    }
    out
}

/// # Safety
/// AVX-512F must be available.
#[target_feature(enable = "avx512f")]
unsafe fn gelu_impl(x: &mut [f32]) {
    const P: [f32; 6] = [
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.954_600_2e-3,
        -1.609_603_3e-2,
    ];
    const Q: [f32; 4] = [-2.133_740_6e-4, -1.682_827e-3, -7.373_329e-3, -1.426_474e-2];
    let p0 = x.as_mut_ptr();
    let len = x.len();
    for (j, m) in chunks16(len) {
        // SAFETY: lanes j..j + popcount(m) lie inside `x`; masked lanes are not touched.
        unsafe {
            let v = _mm512_maskz_loadu_ps(m, p0.add(j));
            let u = _mm512_mul_ps(v, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
            let u = _mm512_min_ps(_mm512_max_ps(u, _mm512_set1_ps(-4.0)), _mm512_set1_ps(4.0));
            let u2 = _mm512_mul_ps(u, u);
            let mut p = _mm512_set1_ps(-2.726_142_3e-10);
            for c in P {
                p = _mm512_fmadd_ps(p, u2, _mm512_set1_ps(c));
            }
            let p = _mm512_mul_ps(p, u);
            let mut q = _mm512_set1_ps(-1.456_607_2e-5);
            for c in Q {
                q = _mm512_fmadd_ps(q, u2, _mm512_set1_ps(c));
            }
            let erf = _mm512_div_ps(p, q);
            let half_v = _mm512_mul_ps(_mm512_set1_ps(0.5), v);
            let out = _mm512_fmadd_ps(half_v, erf, half_v);
            _mm512_mask_storeu_ps(p0.add(j), m, out);
        }
    }
}
