//! Everything written with ARM64 NEON intrinsics: the GEMM micro-kernel (6 × 16 tiles, four
//! 4-lane accumulators per row), softmax, exact GELU, add + LayerNorm, the 4 × 4 register
//! transpose of the panel packing, and the FMA chains of the peak probe. The safe entry points
//! take a [`Neon`] token, so they can only run on a CPU that has the feature, and check the
//! bounds the kernels rely on.
//!
//! The GEMM keeps one fused multiply-add chain per output in `k` order, so it computes the
//! portable numbers bit for bit. The elementwise ops are the portable formulas of
//! `elementwise.rs` 4 lanes at a time with fused multiply-adds (equal to float rounding, as the
//! AVX-512 ones); a row's ragged end is loaded into a padded vector and goes through the same
//! code, so every element of a row is computed alike whatever the row's width.
//!
//! No ARM machine runs this project's benchmarks: these kernels are tested for correctness
//! under `qemu-aarch64` (`.ci/aarch64`), not measured for speed.

use std::arch::aarch64::*;

use super::gemm::{Epilogue, Tile, MR, NR};
use super::isa::Neon;

/// A full 16-column tile of `rows` rows over `k` terms straight into `c` (row stride `ldc`),
/// continuing from the partial sums in `c` when `load`; `epi` is applied at the end.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(super) fn full_tile(
    _: Neon,
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
        // SAFETY: the token proves NEON; rows r0..r0 + r of `a` hold `k` floats at stride
        // `lda`, `panel` `k * NR` floats, rows r0..r0 + r of `c` NR floats at stride `ldc`, and
        // a bias NR floats (all asserted above).
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
    t: Neon,
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
/// addition). `R` ≤ 6 rows × 4 registers = 24 accumulators, 4 for the panel row, one for the
/// broadcast: 29 of the 32 NEON registers.
///
/// # Safety
/// NEON must be available; `a` must point at `R` rows of `k` readable floats with row stride
/// `lda`; `panel` at `k * NR` readable floats; `c` at `R` rows of 16 writable floats at stride
/// `ldc` (readable too when `load` or [`Epilogue::Accumulate`]); an [`Epilogue::Bias`] must have
/// at least 16 floats.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "neon")]
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
    let mut acc = [[vdupq_n_f32(0.0); 4]; R];
    if load {
        for (i, row) in acc.iter_mut().enumerate() {
            for (q, v) in row.iter_mut().enumerate() {
                // SAFETY: row i of `c` has 16 readable floats (the partial sums).
                *v = unsafe { vld1q_f32(c.add(i * ldc + 4 * q)) };
            }
        }
    }
    let mut bp = panel;
    for kk in 0..k {
        // SAFETY: kk < k, so the four 4-float loads stay inside the panel and every broadcast
        // reads element (i, kk) of a row the caller guarantees.
        unsafe {
            let b = [
                vld1q_f32(bp),
                vld1q_f32(bp.add(4)),
                vld1q_f32(bp.add(8)),
                vld1q_f32(bp.add(12)),
            ];
            for (i, row) in acc.iter_mut().enumerate() {
                let av = vdupq_n_f32(*a.add(i * lda + kk));
                for (v, bq) in row.iter_mut().zip(b) {
                    *v = vfmaq_f32(*v, av, bq);
                }
            }
            bp = bp.add(NR);
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (q, v) in row.iter().enumerate() {
            // SAFETY: row i of `c` has 16 writable (and readable) floats; a bias has 16
            // readable ones.
            unsafe {
                let out = c.add(i * ldc + 4 * q);
                let o = match epi {
                    Epilogue::Bias(bias) => vaddq_f32(*v, vld1q_f32(bias.as_ptr().add(4 * q))),
                    Epilogue::Accumulate => vaddq_f32(vld1q_f32(out), *v),
                    Epilogue::Store => *v,
                };
                vst1q_f32(out, o);
            }
        }
    }
}

// ---- elementwise and packing ops ----------------------------------------------------------

/// Row-wise softmax of `rows × width` values after multiplying by `scale` (> 0).
pub(super) fn softmax_rows(_: Neon, x: &mut [f32], width: usize, scale: f32) {
    // SAFETY: the token proves NEON.
    unsafe { softmax_rows_impl(x, width, scale) }
}

/// `x ← LayerNorm(x + r)` over rows of `gamma.len()` (> 0).
pub(super) fn add_layer_norm(
    _: Neon,
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
    // SAFETY: the token proves NEON.
    unsafe { add_layer_norm_impl(x, r, gamma, &beta[..gamma.len()], eps) }
}

/// Exact GELU in place.
pub(super) fn gelu(_: Neon, x: &mut [f32]) {
    // SAFETY: the token proves NEON.
    unsafe { gelu_impl(x) }
}

/// Panel `[k][16]` of the transposes of `cols` (≤ 16) rows of `b` (row stride `ld`).
pub(super) fn transpose_panel(
    _: Neon,
    b: &[f32],
    ld: usize,
    cols: usize,
    k: usize,
    panel: &mut [f32],
) {
    assert!(
        (1..=NR).contains(&cols) && ld >= k && b.len() >= (cols - 1) * ld + k,
        "transpose_panel: matrix too short"
    );
    assert!(panel.len() >= NR * k, "transpose_panel: panel too short");
    // SAFETY: the token proves NEON.
    unsafe { transpose_panel_impl(b, ld, cols, k, panel) }
}

/// `iters` rounds of 12 independent 4-lane FMAs: (flops, a value that depends on them).
pub(super) fn fma_chains(_: Neon, iters: usize) -> (f64, f32) {
    // SAFETY: the token proves NEON.
    let s = unsafe { fma_chains_impl(iters) };
    ((iters * 12 * 4 * 2) as f64, s)
}

/// Lanes of `s` (up to 4 floats), the missing lanes set to `fill`: a row's ragged end as a
/// full vector.
#[inline]
#[target_feature(enable = "neon")]
fn load(s: &[f32], fill: f32) -> float32x4_t {
    if s.len() >= 4 {
        // SAFETY: `s` holds at least 4 floats.
        unsafe { vld1q_f32(s.as_ptr()) }
    } else {
        let mut buf = [fill; 4];
        buf[..s.len()].copy_from_slice(s);
        // SAFETY: `buf` holds 4 floats.
        unsafe { vld1q_f32(buf.as_ptr()) }
    }
}

/// The first `s.len()` (up to 4) lanes of `v` into `s`.
#[inline]
#[target_feature(enable = "neon")]
fn store(v: float32x4_t, s: &mut [f32]) {
    if s.len() >= 4 {
        // SAFETY: `s` holds at least 4 writable floats.
        unsafe { vst1q_f32(s.as_mut_ptr(), v) }
    } else {
        let mut buf = [0.0f32; 4];
        // SAFETY: `buf` holds 4 writable floats.
        unsafe { vst1q_f32(buf.as_mut_ptr(), v) };
        let n = s.len();
        s.copy_from_slice(&buf[..n]);
    }
}

/// 4 lanes of `exp_f32` (elementwise.rs): 2^n built in the exponent bits, 0 below −87.3.
#[inline]
#[target_feature(enable = "neon")]
fn exp4(x_in: float32x4_t) -> float32x4_t {
    let x = vminq_f32(vmaxq_f32(x_in, vdupq_n_f32(-87.3)), vdupq_n_f32(88.0));
    let t = vmulq_f32(x, vdupq_n_f32(std::f32::consts::LOG2_E));
    let n = vrndnq_f32(t);
    let r = vfmsq_f32(x, n, vdupq_n_f32(0.693_359_4));
    let r = vfmsq_f32(r, n, vdupq_n_f32(-2.121_944_4e-4));
    let mut p = vdupq_n_f32(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = vfmaq_f32(vdupq_n_f32(c), p, r);
    }
    let p = vaddq_f32(vfmaq_f32(r, vmulq_f32(p, r), r), vdupq_n_f32(1.0));
    // n ∈ [−126, 127] after the clamp: n + 127 is a normal exponent
    let bits = vshlq_n_s32::<23>(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)));
    let e = vmulq_f32(p, vreinterpretq_f32_s32(bits));
    vbslq_f32(vcltq_f32(x_in, vdupq_n_f32(-87.3)), vdupq_n_f32(0.0), e)
}

/// # Safety
/// NEON must be available.
#[target_feature(enable = "neon")]
unsafe fn softmax_rows_impl(x: &mut [f32], width: usize, scale: f32) {
    if width == 0 {
        return;
    }
    let sv = vdupq_n_f32(scale);
    for row in x.chunks_exact_mut(width) {
        // max of the raw row (scale > 0), then e^(scale·x − scale·max) in one pass
        let mut mx = vdupq_n_f32(f32::NEG_INFINITY);
        for c in row.chunks(4) {
            mx = vmaxq_f32(mx, load(c, f32::NEG_INFINITY));
        }
        let mv = vdupq_n_f32(vmaxvq_f32(mx) * scale);
        let mut sum = vdupq_n_f32(0.0);
        for c in row.chunks_mut(4) {
            // padding lanes are −∞: e^−∞ = 0 adds nothing to the sum
            let e = exp4(vsubq_f32(vmulq_f32(load(c, f32::NEG_INFINITY), sv), mv));
            store(e, c);
            sum = vaddq_f32(sum, e);
        }
        let inv = vdupq_n_f32(1.0 / vaddvq_f32(sum));
        for c in row.chunks_mut(4) {
            store(vmulq_f32(load(c, 0.0), inv), c);
        }
    }
}

/// `x ← LayerNorm(x + r)` over rows of `gamma.len()`: the sum, the centred sum of squares
/// and the affine map in three passes over the row, 4 lanes at a time (ragged end padded).
///
/// # Safety
/// NEON must be available; `r.len() >= x.len()`, `beta.len() == gamma.len() > 0`.
#[target_feature(enable = "neon")]
unsafe fn add_layer_norm_impl(x: &mut [f32], r: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let h = gamma.len();
    let inv_h = 1.0 / h as f32;
    for (row, res) in x.chunks_exact_mut(h).zip(r.chunks_exact(h)) {
        let mut sum = vdupq_n_f32(0.0);
        for (c, q) in row.chunks_mut(4).zip(res.chunks(4)) {
            let v = vaddq_f32(load(c, 0.0), load(q, 0.0));
            store(v, c);
            sum = vaddq_f32(sum, v);
        }
        let mean = vaddvq_f32(sum) * inv_h;
        let mv = vdupq_n_f32(mean);
        let mut sq = vdupq_n_f32(0.0);
        for c in row.chunks(4) {
            // padding lanes are the mean: they add 0
            let d = vsubq_f32(load(c, mean), mv);
            sq = vfmaq_f32(sq, d, d);
        }
        let var = vaddvq_f32(sq) * inv_h;
        let inv = vdupq_n_f32(super::elementwise::inv_std(var, eps));
        for ((c, g), b) in row.chunks_mut(4).zip(gamma.chunks(4)).zip(beta.chunks(4)) {
            let d = vsubq_f32(load(c, 0.0), mv);
            let y = vfmaq_f32(load(b, 0.0), vmulq_f32(d, inv), load(g, 0.0));
            store(y, c);
        }
    }
}

/// # Safety
/// NEON must be available.
#[target_feature(enable = "neon")]
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
    for c in x.chunks_mut(4) {
        let v = load(c, 0.0);
        let u = vmulq_f32(v, vdupq_n_f32(std::f32::consts::FRAC_1_SQRT_2));
        let u = vminq_f32(vmaxq_f32(u, vdupq_n_f32(-4.0)), vdupq_n_f32(4.0));
        let u2 = vmulq_f32(u, u);
        let mut p = vdupq_n_f32(-2.726_142_3e-10);
        for k in P {
            p = vfmaq_f32(vdupq_n_f32(k), p, u2);
        }
        let p = vmulq_f32(p, u);
        let mut q = vdupq_n_f32(-1.456_607_2e-5);
        for k in Q {
            q = vfmaq_f32(vdupq_n_f32(k), q, u2);
        }
        let erf = vdivq_f32(p, q);
        let half_v = vmulq_f32(vdupq_n_f32(0.5), v);
        store(vfmaq_f32(half_v, half_v, erf), c);
    }
}

/// Panel `[k][16]` of the transposes of `cols` rows of `b` (row stride `ld`): column `jj` of
/// the panel is row `jj`'s first `k` floats; the other columns are left as they are (the
/// caller zeroed them). Blocks of 4 × 4 are loaded row by row and transposed in registers;
/// the ragged edges are copied one float at a time.
///
/// # Safety
/// NEON must be available; `cols` ≤ 16, `ld` ≥ `k`, `b` holds `(cols − 1)·ld + k` floats and
/// `panel` `16·k` (the slices are indexed with bounds checks all the same).
#[target_feature(enable = "neon")]
unsafe fn transpose_panel_impl(b: &[f32], ld: usize, cols: usize, k: usize, panel: &mut [f32]) {
    let (k4, c4) = (k - k % 4, cols - cols % 4);
    for j0 in (0..c4).step_by(4) {
        for k0 in (0..k4).step_by(4) {
            let r = [0, 1, 2, 3].map(|i| {
                let s = (j0 + i) * ld + k0;
                load(&b[s..s + 4], 0.0)
            });
            let t0 = vreinterpretq_f64_f32(vtrn1q_f32(r[0], r[1]));
            let t1 = vreinterpretq_f64_f32(vtrn2q_f32(r[0], r[1]));
            let t2 = vreinterpretq_f64_f32(vtrn1q_f32(r[2], r[3]));
            let t3 = vreinterpretq_f64_f32(vtrn2q_f32(r[2], r[3]));
            let out = [
                vtrn1q_f64(t0, t2),
                vtrn1q_f64(t1, t3),
                vtrn2q_f64(t0, t2),
                vtrn2q_f64(t1, t3),
            ];
            for (kk, v) in out.into_iter().enumerate() {
                let d = (k0 + kk) * NR + j0;
                store(vreinterpretq_f32_f64(v), &mut panel[d..d + 4]);
            }
        }
        for jj in j0..j0 + 4 {
            for kk in k4..k {
                panel[kk * NR + jj] = b[jj * ld + kk];
            }
        }
    }
    for jj in c4..cols {
        for kk in 0..k {
            panel[kk * NR + jj] = b[jj * ld + kk];
        }
    }
}

/// # Safety
/// NEON must be available.
#[target_feature(enable = "neon")]
unsafe fn fma_chains_impl(iters: usize) -> f32 {
    // 12 named accumulators (an array went through memory every round): more chains than FMA
    // latency × FMA units on current ARM cores
    macro_rules! chains {
        ($($a:ident),*) => {{
            let (x, y) = (vdupq_n_f32(0.999_9), vdupq_n_f32(1e-5));
            let mut init = 0.0f32;
            $(init += 1e-3; let mut $a = vdupq_n_f32(init);)*
            for _ in 0..iters {
                $($a = vfmaq_f32(y, $a, x);)*
            }
            0.0f32 $(+ vgetq_lane_f32::<0>($a))*
        }};
    }
    chains!(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11)
}
