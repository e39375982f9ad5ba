//! The AVX2 + FMA micro-kernels: 6 × 16 tiles, two 8-lane accumulators per row, one FMA chain
//! per output in `k` order. The safe entry points take an [`Avx2`] token, so they can only run
//! on a CPU that has the features; they check every bound the kernels rely on.

use std::arch::x86_64::*;

use super::gemm::{Epilogue, Tile, MR, NR, PREFETCH};
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
            // a hint, never a fault: past the panel's end it reads nothing
            _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(PREFETCH).cast());
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

// ---- elementwise and row ops --------------------------------------------------------------
//
// The portable formulas of `elementwise.rs` 8 lanes at a time, operation for operation (a
// multiply and an add where the portable code has them, never fused; the 8-lane partial sums of
// its `lane_sum` combined in its order), so they compute the portable numbers bit for bit. A
// row's ragged end goes through the same vector code under a lane mask (`maskload` /
// `maskstore`); only its part of a sum is added one element at a time, as the portable code does.

/// Mask of the first `n` (≤ 8) lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn lanes(n: usize) -> __m256i {
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(n.min(8) as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// The lanes of `v` as an array.
#[inline]
#[target_feature(enable = "avx2")]
fn to_array(v: __m256) -> [f32; 8] {
    let mut out = [0.0f32; 8];
    // SAFETY: `out` has 8 writable floats.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
    out
}

/// The portable combine of 8 partial sums: `((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7))`.
#[inline]
#[target_feature(enable = "avx2")]
fn combine(v: __m256) -> f32 {
    let a = to_array(v);
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// `a · b + c` as a multiply and an add (the portable `a * b + c`, not fused).
#[inline]
#[target_feature(enable = "avx2")]
fn mul_add(a: __m256, b: __m256, c: __m256) -> __m256 {
    _mm256_add_ps(_mm256_mul_ps(a, b), c)
}

/// `elementwise::exp_f32` on 8 lanes, operation for operation.
#[inline]
#[target_feature(enable = "avx2")]
fn exp8(x_in: __m256) -> __m256 {
    // clamp as `f32::clamp` (a NaN stays NaN): max/min return their second operand when unordered
    let x = _mm256_min_ps(
        _mm256_set1_ps(88.0),
        _mm256_max_ps(_mm256_set1_ps(-87.3), x_in),
    );
    let t = _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E));
    let big = _mm256_set1_ps(12_582_912.0);
    let n = _mm256_sub_ps(_mm256_add_ps(t, big), big);
    let r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693_359_4)));
    let r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-2.121_944_4e-4)));
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = mul_add(p, r, _mm256_set1_ps(c));
    }
    let p = _mm256_add_ps(
        _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r),
        _mm256_set1_ps(1.0),
    );
    let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvttps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    let e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
    let low = _mm256_cmp_ps::<_CMP_LT_OQ>(x_in, _mm256_set1_ps(-87.3));
    _mm256_andnot_ps(low, e)
}

/// Row-wise softmax of `rows × width` values after multiplying by `scale` (> 0).
pub(super) fn softmax_rows(_: Avx2, x: &mut [f32], width: usize, scale: f32) {
    // SAFETY: the token proves AVX2 and FMA; the kernel reads and writes inside `x` only.
    unsafe { softmax_rows_impl(x, width, scale) }
}

/// # Safety
/// AVX2 must be available.
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_rows_impl(x: &mut [f32], width: usize, scale: f32) {
    if width == 0 {
        return;
    }
    let (full, rem) = (width / 8 * 8, width % 8);
    let tail = lanes(rem);
    let sv = _mm256_set1_ps(scale);
    for row in x.chunks_exact_mut(width) {
        let p = row.as_mut_ptr();
        // scale in place and the max: 8 running maxima folded in lane order, then the tail
        let mut mx = _mm256_set1_ps(f32::NEG_INFINITY);
        for j in (0..full).step_by(8) {
            // SAFETY: j + 8 <= full <= width: inside the row.
            unsafe {
                let v = _mm256_mul_ps(_mm256_loadu_ps(p.add(j)), sv);
                _mm256_storeu_ps(p.add(j), v);
                // `if v > m { v } else { m }`, as the portable loop
                mx = _mm256_max_ps(v, mx);
            }
        }
        let mut m = to_array(mx)
            .iter()
            .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        if rem > 0 {
            // SAFETY: the masked lanes full..width lie inside the row; others are not touched.
            let v = unsafe {
                let v = _mm256_mul_ps(_mm256_maskload_ps(p.add(full), tail), sv);
                _mm256_maskstore_ps(p.add(full), tail, v);
                v
            };
            for &v in &to_array(v)[..rem] {
                m = m.max(v);
            }
        }
        // e^(v − m) in place and its sum (8 partial sums, then the tail in order)
        let mv = _mm256_set1_ps(m);
        let mut acc = _mm256_setzero_ps();
        for j in (0..full).step_by(8) {
            // SAFETY: as above.
            unsafe {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(j)), mv));
                _mm256_storeu_ps(p.add(j), e);
                acc = _mm256_add_ps(acc, e);
            }
        }
        let mut sum = combine(acc);
        if rem > 0 {
            // SAFETY: as above.
            let e = unsafe {
                let e = exp8(_mm256_sub_ps(_mm256_maskload_ps(p.add(full), tail), mv));
                _mm256_maskstore_ps(p.add(full), tail, e);
                e
            };
            for &v in &to_array(e)[..rem] {
                sum += v;
            }
        }
        let inv = _mm256_set1_ps(1.0 / sum);
        for j in (0..full).step_by(8) {
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(p.add(j), _mm256_mul_ps(_mm256_loadu_ps(p.add(j)), inv)) };
        }
        if rem > 0 {
            // SAFETY: as above.
            unsafe {
                let v = _mm256_mul_ps(_mm256_maskload_ps(p.add(full), tail), inv);
                _mm256_maskstore_ps(p.add(full), tail, v);
            }
        }
    }
}

/// Exact GELU in place: `elementwise::gelu` 8 lanes at a time.
pub(super) fn gelu(_: Avx2, x: &mut [f32]) {
    // SAFETY: the token proves AVX2 and FMA; the kernel reads and writes inside `x` only.
    unsafe { gelu_impl(x) }
}

/// `½x · (1 + erf(x/√2))` with `elementwise::erf_f32`, operation for operation.
#[inline]
#[target_feature(enable = "avx2")]
fn gelu8(v: __m256) -> __m256 {
    let x = _mm256_mul_ps(v, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
    let x = _mm256_min_ps(_mm256_set1_ps(4.0), _mm256_max_ps(_mm256_set1_ps(-4.0), x));
    let x2 = _mm256_mul_ps(x, x);
    let mut p = _mm256_set1_ps(-2.726_142_3e-10);
    for c in [
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.954_600_2e-3,
        -1.609_603_3e-2,
    ] {
        p = mul_add(p, x2, _mm256_set1_ps(c));
    }
    let p = _mm256_mul_ps(p, x);
    let mut q = _mm256_set1_ps(-1.456_607_2e-5);
    for c in [-2.133_740_6e-4, -1.682_827e-3, -7.373_329e-3, -1.426_474e-2] {
        q = mul_add(q, x2, _mm256_set1_ps(c));
    }
    let erf = _mm256_div_ps(p, q);
    let half_v = _mm256_mul_ps(_mm256_set1_ps(0.5), v);
    _mm256_mul_ps(half_v, _mm256_add_ps(_mm256_set1_ps(1.0), erf))
}

/// # Safety
/// AVX2 must be available.
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_impl(x: &mut [f32]) {
    let len = x.len();
    let (full, rem) = (len / 8 * 8, len % 8);
    let p = x.as_mut_ptr();
    for j in (0..full).step_by(8) {
        // SAFETY: j + 8 <= full <= len.
        unsafe { _mm256_storeu_ps(p.add(j), gelu8(_mm256_loadu_ps(p.add(j)))) };
    }
    if rem > 0 {
        let m = lanes(rem);
        // SAFETY: the masked lanes full..len lie inside `x`; others are not touched.
        unsafe { _mm256_maskstore_ps(p.add(full), m, gelu8(_mm256_maskload_ps(p.add(full), m))) };
    }
}

/// `x ← LayerNorm(x + r)` (or `LayerNorm(x)` without `r`) over rows of `gamma.len()` (> 0):
/// `elementwise::add_assign` then `elementwise::layer_norm_on`, bit for bit, in three passes
/// over each row (the residual added in the first).
pub(super) fn layer_norm(
    _: Avx2,
    x: &mut [f32],
    r: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    assert!(
        r.is_none_or(|r| r.len() >= x.len()) && !gamma.is_empty() && beta.len() >= gamma.len(),
        "layer_norm: residual or parameters too short"
    );
    // SAFETY: the token proves AVX2 and FMA; the lengths the kernel relies on are asserted above.
    unsafe { layer_norm_impl(x, r, gamma, beta, eps) }
}

/// # Safety
/// AVX2 must be available; `r` (when given) at least as long as `x`; `beta.len() >= gamma.len()
/// > 0`.
#[target_feature(enable = "avx2,fma")]
unsafe fn layer_norm_impl(x: &mut [f32], r: Option<&[f32]>, gamma: &[f32], beta: &[f32], eps: f32) {
    let h = gamma.len();
    let (full, rem) = (h / 8 * 8, h % 8);
    let tail = lanes(rem);
    let inv_h = 1.0 / h as f32;
    let (g, b) = (gamma.as_ptr(), beta.as_ptr());
    for (i, row) in x.chunks_exact_mut(h).enumerate() {
        // Below, lanes j..j + 8 (j + 8 <= full) and the masked lanes full..h lie inside the row,
        // inside row i of `r` and inside gamma and beta (h floats each); masked-off lanes are
        // not touched.
        let p = row.as_mut_ptr();
        let q = r.map(|r| r[i * h..(i + 1) * h].as_ptr());
        // pass 1: x + r stored, and the portable `lane_sum` of the row
        let mut acc = _mm256_setzero_ps();
        for j in (0..full).step_by(8) {
            // SAFETY: the lanes read and written lie inside the rows (see above).
            unsafe {
                let mut v = _mm256_loadu_ps(p.add(j));
                if let Some(q) = q {
                    v = _mm256_add_ps(v, _mm256_loadu_ps(q.add(j)));
                    _mm256_storeu_ps(p.add(j), v);
                }
                acc = _mm256_add_ps(acc, v);
            }
        }
        let mut sum = combine(acc);
        if rem > 0 {
            // SAFETY: the lanes read and written lie inside the rows (see above).
            let v = unsafe {
                let mut v = _mm256_maskload_ps(p.add(full), tail);
                if let Some(q) = q {
                    v = _mm256_add_ps(v, _mm256_maskload_ps(q.add(full), tail));
                    _mm256_maskstore_ps(p.add(full), tail, v);
                }
                v
            };
            for &v in &to_array(v)[..rem] {
                sum += v;
            }
        }
        let mean = sum * inv_h;
        let mv = _mm256_set1_ps(mean);
        // pass 2: the centred sum of squares, 8 partial sums then the tail
        let mut sq = _mm256_setzero_ps();
        for j in (0..full).step_by(8) {
            // SAFETY: the lanes read and written lie inside the rows (see above).
            unsafe {
                let d = _mm256_sub_ps(_mm256_loadu_ps(p.add(j)), mv);
                sq = _mm256_add_ps(sq, _mm256_mul_ps(d, d));
            }
        }
        let mut var = combine(sq);
        if rem > 0 {
            // SAFETY: the lanes read and written lie inside the rows (see above).
            let v = unsafe { _mm256_maskload_ps(p.add(full), tail) };
            for &v in &to_array(v)[..rem] {
                var += (v - mean) * (v - mean);
            }
        }
        let inv = _mm256_set1_ps(super::elementwise::inv_std(var * inv_h, eps));
        // pass 3: (v − mean) · inv · γ + β
        for j in (0..full).step_by(8) {
            // SAFETY: the lanes read and written lie inside the rows (see above).
            unsafe {
                let d = _mm256_sub_ps(_mm256_loadu_ps(p.add(j)), mv);
                let y = mul_add(
                    _mm256_mul_ps(d, inv),
                    _mm256_loadu_ps(g.add(j)),
                    _mm256_loadu_ps(b.add(j)),
                );
                _mm256_storeu_ps(p.add(j), y);
            }
        }
        if rem > 0 {
            // SAFETY: the lanes read and written lie inside the rows (see above).
            unsafe {
                let d = _mm256_sub_ps(_mm256_maskload_ps(p.add(full), tail), mv);
                let y = mul_add(
                    _mm256_mul_ps(d, inv),
                    _mm256_maskload_ps(g.add(full), tail),
                    _mm256_maskload_ps(b.add(full), tail),
                );
                _mm256_maskstore_ps(p.add(full), tail, y);
            }
        }
    }
}
