//! Dense f32 kernels of the runtime: a register-blocked matrix product against a prepacked right
//! operand, and the elementwise/row ops of a BERT encoder (LayerNorm, exact GELU, softmax).
//!
//! Design choices, and why:
//! - The right operand (a layer's weight, transposed) is packed once at load into panels of
//!   [`NR`] columns (`[K][NR]`, zero padded), so a product never re-packs weights; the left
//!   operand is read in place (any row stride), so no copies of activations either.
//! - Every output element is accumulated by one fused multiply-add chain over `k = 0..K` in
//!   order, whatever the row's position in the matrix or the number of rows: the result of a
//!   row never depends on the other rows or on how rows are split across threads. The runtime's
//!   "an input's score does not depend on its batch-mates or the thread count" rests on this.
//! - AVX-512 (a 12 × 32 tile over two panels) or AVX2+FMA is used when the CPU has it (runtime
//!   detection); otherwise a scalar path with the same arithmetic (`mul_add`) runs. On the MiniLM
//!   shapes the AVX-512 kernel runs at 96–100 % of the FMA peak [`fma_peak_gflops`] measures.
//! - Softmax, exact GELU and add + LayerNorm have AVX-512 versions of the portable formulas (a
//!   row's ragged end under a lane mask, so every element of a row is computed alike); K panels
//!   are transposed 16 × 16 in registers.

use rayon::prelude::*;

/// Columns per packed panel (two 8-lane AVX registers).
pub const NR: usize = 16;
/// Rows per micro-kernel call.
pub const MR: usize = 6;
/// Rows per cache block: the left block (`MB × K`) stays in L2 while the panels stream past it.
const MB: usize = 96;

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    // std caches the CPUID answer; this is a load and a test.
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx2_fma() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    std::is_x86_feature_detected!("avx512f") && has_avx2_fma()
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx512() -> bool {
    false
}

/// Rows per micro-kernel call with AVX-512 (one 16-lane register per row).
const MR_WIDE: usize = 12;

/// A `K × N` right operand packed into `ceil(N / NR)` panels of `[K][NR]` floats.
#[derive(Clone, Debug)]
pub struct Packed {
    k: usize,
    n: usize,
    data: Vec<f32>,
}

impl Packed {
    /// Rows of the logical `K × N` operand.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns of the logical `K × N` operand.
    pub fn n(&self) -> usize {
        self.n
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    fn with_fill(k: usize, n: usize, mut get: impl FnMut(usize, usize) -> f32) -> Self {
        let panels = n.div_ceil(NR);
        let mut data = vec![0.0f32; panels * k * NR];
        for p in 0..panels {
            let panel = &mut data[p * k * NR..(p + 1) * k * NR];
            let cols = NR.min(n - p * NR);
            for kk in 0..k {
                let row = &mut panel[kk * NR..kk * NR + cols];
                for (j, v) in row.iter_mut().enumerate() {
                    *v = get(kk, p * NR + j);
                }
            }
        }
        Self { k, n, data }
    }

    /// Pack `Wᵀ` of a torch-layout weight `w: [n_out, k_in]` (row-major), i.e. `y = x Wᵀ`.
    pub fn from_weight(w: &[f32], n_out: usize, k_in: usize) -> Self {
        debug_assert_eq!(w.len(), n_out * k_in);
        Self::from_nk(w, n_out, k_in, k_in)
    }

    /// Pack a row-major `K × N` matrix stored with row stride `ld`.
    pub fn from_kn(b: &[f32], k: usize, n: usize, ld: usize) -> Self {
        let mut p = Self::empty();
        p.refill_kn(b, k, n, ld);
        p
    }

    /// Pack the transpose of a row-major `N × K` matrix stored with row stride `ld` (so the
    /// product is `A · Bᵀ`).
    pub fn from_nk(b: &[f32], n: usize, k: usize, ld: usize) -> Self {
        let mut p = Self::empty();
        p.refill_nk(b, n, k, ld);
        p
    }

    /// Storage for a `k × n` operand, reusing the buffer: the padding columns of a ragged last
    /// panel are zeroed, everything else is left for the caller to overwrite.
    fn reset(&mut self, k: usize, n: usize) {
        self.k = k;
        self.n = n;
        let panels = n.div_ceil(NR);
        self.data.resize(panels * k * NR, 0.0);
        let cols = n % NR;
        if cols != 0 {
            let last = &mut self.data[(panels - 1) * k * NR..];
            for row in last.chunks_exact_mut(NR) {
                row[cols..].fill(0.0);
            }
        }
    }

    /// Overwrite this packing with a row-major `K × N` matrix (row stride `ld`), reusing the
    /// buffer; `k`, `n` may change.
    pub fn refill_kn(&mut self, b: &[f32], k: usize, n: usize, ld: usize) {
        assert!(
            k == 0 || n == 0 || (b.len() >= (k - 1) * ld + n && ld >= n),
            "Packed::refill_kn: matrix too short"
        );
        self.reset(k, n);
        if k == 0 {
            return;
        }
        for (p, panel) in self.data.chunks_exact_mut(k * NR).enumerate() {
            let (j0, cols) = (p * NR, NR.min(n - p * NR));
            for (kk, row) in panel.chunks_exact_mut(NR).enumerate() {
                row[..cols].copy_from_slice(&b[kk * ld + j0..kk * ld + j0 + cols]);
            }
        }
    }

    /// Like [`Packed::refill_kn`] for the transpose of a row-major `N × K` matrix.
    pub fn refill_nk(&mut self, b: &[f32], n: usize, k: usize, ld: usize) {
        assert!(
            k == 0 || n == 0 || (b.len() >= (n - 1) * ld + k && ld >= k),
            "Packed::refill_nk: matrix too short"
        );
        self.reset(k, n);
        if k == 0 {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            // 16 × 16 blocks transposed in registers
            if has_avx512() {
                for (p, panel) in self.data.chunks_exact_mut(k * NR).enumerate() {
                    let (j0, cols) = (p * NR, NR.min(n - p * NR));
                    // SAFETY: AVX-512F present; rows j0..j0 + cols of `b` hold `k` floats from
                    // their start (asserted above), the panel `k * NR` floats.
                    unsafe { avx512_elem::transpose_panel(&b[j0 * ld..], ld, cols, k, panel) };
                }
                return;
            }
        }
        for (p, panel) in self.data.chunks_exact_mut(k * NR).enumerate() {
            let (j0, cols) = (p * NR, NR.min(n - p * NR));
            for jj in 0..cols {
                let src = &b[(j0 + jj) * ld..(j0 + jj) * ld + k];
                for (kk, &v) in src.iter().enumerate() {
                    panel[kk * NR + jj] = v;
                }
            }
        }
    }

    /// Element `(kk, j)` of the logical `K × N` operand.
    pub fn at(&self, kk: usize, j: usize) -> f32 {
        assert!(kk < self.k && j < self.n, "Packed::at: index out of range");
        self.data[(j / NR) * self.k * NR + kk * NR + j % NR]
    }

    /// Columns `n0..n1` of this operand, transposed: a `(n1 − n0) × K` operand. For a packed
    /// weight `Wᵀ` this is the block of output rows `n0..n1` of `W`, so `q · result` is
    /// `q · W[n0..n1, :]`.
    pub fn transpose_cols(&self, n0: usize, n1: usize) -> Self {
        assert!(
            n0 <= n1 && n1 <= self.n,
            "Packed::transpose_cols: columns out of range"
        );
        Self::with_fill(n1 - n0, self.k, |kk, j| self.at(j, n0 + kk))
    }

    /// An empty packing (0 × 0) to be refilled.
    pub fn empty() -> Self {
        Self {
            k: 0,
            n: 0,
            data: Vec::new(),
        }
    }
}

/// What is added to the product `A·B` when it is stored into `C`.
#[derive(Clone, Copy, Debug)]
pub enum Epilogue<'a> {
    /// `C = A·B`.
    Store,
    /// `C = A·B + bias` (bias has `N` entries, broadcast over rows).
    Bias(&'a [f32]),
    /// `C += A·B`.
    Accumulate,
}

/// `C[m × N] (row stride ldc) ⟵ A[m × K] (row stride lda) · B` with the given epilogue,
/// single-threaded. `a` must hold `(m−1)·lda + K` floats and `c` `(m−1)·ldc + N`.
pub fn gemm(
    m: usize,
    a: &[f32],
    lda: usize,
    b: &Packed,
    c: &mut [f32],
    ldc: usize,
    epi: Epilogue<'_>,
) {
    if m == 0 || b.n == 0 {
        return;
    }
    let k = b.k;
    assert!(lda >= k && ldc >= b.n, "gemm: leading dimensions too small");
    assert!(a.len() >= (m - 1) * lda + k, "gemm: left operand too short");
    assert!(c.len() >= (m - 1) * ldc + b.n, "gemm: output too short");
    if let Epilogue::Bias(bias) = epi {
        assert!(bias.len() >= b.n, "gemm: bias too short");
    }
    let avx = has_avx2_fma();
    let wide = has_avx512();
    let mr = if wide { MR_WIDE } else { MR };
    let acc_in = matches!(epi, Epilogue::Accumulate);
    // K blocks keep the panel slice and the left rows in L1. A block's partial sums go through
    // `c` as f32 and are reloaded into the registers: the FMA chain of every element is the same
    // as without blocking, bit for bit. `C += A·B` needs `c` for its old values: not blocked.
    let kc = if acc_in || k <= KC { k.max(1) } else { KC };
    for i_block in (0..m).step_by(MB) {
        let i_end = (i_block + MB).min(m);
        let mut kb = 0;
        loop {
            let klen = kc.min(k - kb);
            let (first, last) = (kb == 0, kb + klen >= k);
            // epilogue of the full-tile kernels: partial sums until the last K block
            let mode = match (last, matches!(epi, Epilogue::Bias(_)), acc_in) {
                (false, _, _) => STORE,
                (true, true, _) => BIAS,
                (true, false, true) => ACCUMULATE,
                (true, false, false) => STORE,
            };
            let panels = b.panels();
            let mut p = 0;
            while p < panels {
                let j0 = p * NR;
                // AVX-512: two full panels at once (12 × 32 tile, 24 accumulators): half the
                // broadcasts of A per FMA, and the A block is read half as often.
                if avx && wide && j0 + 2 * NR <= b.n {
                    let pair = &b.data[p * k * NR..(p + 2) * k * NR];
                    let bias = match epi {
                        Epilogue::Bias(bias) => Some(&bias[j0..j0 + 2 * NR]),
                        _ => None,
                    };
                    let mut i0 = i_block;
                    while i0 < i_end {
                        let rows = MR_WIDE.min(i_end - i0);
                        pair_tile(
                            rows,
                            klen,
                            &a[i0 * lda + kb..],
                            lda,
                            &pair[kb * NR..],
                            k * NR,
                            &mut c[i0 * ldc + j0..],
                            ldc,
                            bias,
                            mode,
                            !first,
                        );
                        i0 += rows;
                    }
                    p += 2;
                    continue;
                }
                let panel = &b.data[p * k * NR..(p + 1) * k * NR];
                let cols = NR.min(b.n - j0);
                let bias = match epi {
                    Epilogue::Bias(bias) => Some(&bias[j0..j0 + cols]),
                    _ => None,
                };
                let mut i0 = i_block;
                while i0 < i_end {
                    let rows = mr.min(i_end - i0);
                    let a_rows = &a[i0 * lda..];
                    let c_rows = &mut c[i0 * ldc + j0..];
                    if avx && cols == NR {
                        full_tile(
                            wide,
                            rows,
                            klen,
                            &a_rows[kb..],
                            lda,
                            &panel[kb * NR..],
                            c_rows,
                            ldc,
                            bias,
                            mode,
                            !first,
                        );
                    } else if first {
                        // partial panel or no AVX2: the whole chain at once, same arithmetic
                        let mut r0 = 0;
                        while r0 < rows {
                            let r = if avx && wide { MR_WIDE } else { MR }.min(rows - r0);
                            micro(
                                avx,
                                wide,
                                r,
                                k,
                                &a_rows[r0 * lda..],
                                lda,
                                panel,
                                &mut c_rows[r0 * ldc..],
                                ldc,
                                cols,
                                bias,
                                acc_in,
                            );
                            r0 += r;
                        }
                    }
                    i0 += rows;
                }
                p += 1;
            }
            kb += klen;
            if kb >= k {
                break;
            }
        }
    }
}

const STORE: u8 = 0;
const BIAS: u8 = 1;
const ACCUMULATE: u8 = 2;
/// K block of the full-tile path. Measured on Zen 4 with the MiniLM shapes (K ≤ 1536), blocking
/// at 256 or 512 did not pay; it is kept for the long K of larger models.
const KC: usize = 2048;

/// One full 16-column tile of up to 12 (AVX-512) or 6 (AVX2) rows over `k` terms, continuing
/// from the partial sums in `c` when `load`; the epilogue `mode` is applied at the end.
#[allow(clippy::too_many_arguments)]
#[inline]
fn full_tile(
    wide: bool,
    rows: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    panel: &[f32],
    c: &mut [f32],
    ldc: usize,
    bias: Option<&[f32]>,
    mode: u8,
    load: bool,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let bp = bias.map_or(std::ptr::null(), |b| b.as_ptr());
        let (a, p, cp) = (a.as_ptr(), panel.as_ptr(), c.as_mut_ptr());
        if wide {
            // SAFETY: AVX-512F present (`has_avx512`); `a` holds `rows` rows of `k` floats at
            // stride `lda`, `panel` `k * NR` floats, `c` `rows` rows of NR floats at stride
            // `ldc` (asserted by `gemm`), and `bias` NR floats when given.
            unsafe {
                match rows {
                    12 => avx512::kernel_out::<12>(k, a, lda, p, cp, ldc, bp, mode, load),
                    11 => avx512::kernel_out::<11>(k, a, lda, p, cp, ldc, bp, mode, load),
                    10 => avx512::kernel_out::<10>(k, a, lda, p, cp, ldc, bp, mode, load),
                    9 => avx512::kernel_out::<9>(k, a, lda, p, cp, ldc, bp, mode, load),
                    8 => avx512::kernel_out::<8>(k, a, lda, p, cp, ldc, bp, mode, load),
                    7 => avx512::kernel_out::<7>(k, a, lda, p, cp, ldc, bp, mode, load),
                    6 => avx512::kernel_out::<6>(k, a, lda, p, cp, ldc, bp, mode, load),
                    5 => avx512::kernel_out::<5>(k, a, lda, p, cp, ldc, bp, mode, load),
                    4 => avx512::kernel_out::<4>(k, a, lda, p, cp, ldc, bp, mode, load),
                    3 => avx512::kernel_out::<3>(k, a, lda, p, cp, ldc, bp, mode, load),
                    2 => avx512::kernel_out::<2>(k, a, lda, p, cp, ldc, bp, mode, load),
                    _ => avx512::kernel_out::<1>(k, a, lda, p, cp, ldc, bp, mode, load),
                }
            }
            return;
        }
        let mut r0 = 0;
        while r0 < rows {
            let r = MR.min(rows - r0);
            // SAFETY: AVX2/FMA present (the caller checked `has_avx2_fma`); bounds as above.
            unsafe {
                let (a, cp) = (a.add(r0 * lda), cp.add(r0 * ldc));
                match r {
                    6 => avx2::kernel_out::<6>(k, a, lda, p, cp, ldc, bp, mode, load),
                    5 => avx2::kernel_out::<5>(k, a, lda, p, cp, ldc, bp, mode, load),
                    4 => avx2::kernel_out::<4>(k, a, lda, p, cp, ldc, bp, mode, load),
                    3 => avx2::kernel_out::<3>(k, a, lda, p, cp, ldc, bp, mode, load),
                    2 => avx2::kernel_out::<2>(k, a, lda, p, cp, ldc, bp, mode, load),
                    _ => avx2::kernel_out::<1>(k, a, lda, p, cp, ldc, bp, mode, load),
                }
            }
            r0 += r;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (wide, rows, k, a, lda, panel, c, ldc, bias, mode, load);
        unreachable!("the full-tile kernels are x86_64 only");
    }
}

/// Two adjacent full panels (32 columns) of up to 12 rows over `k` terms with AVX-512; `pair`
/// starts at the first panel's `kb`-th row and the second panel lies `stride` floats further.
/// Same FMA chain per output as [`full_tile`], so the same numbers.
#[allow(clippy::too_many_arguments)]
#[inline]
fn pair_tile(
    rows: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    pair: &[f32],
    stride: usize,
    c: &mut [f32],
    ldc: usize,
    bias: Option<&[f32]>,
    mode: u8,
    load: bool,
) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(
            (1..=MR_WIDE).contains(&rows),
            "pair_tile: rows out of range"
        );
        assert!(pair.len() >= stride + k * NR, "pair_tile: panels too short");
        assert!(
            a.len() >= (rows - 1) * lda + k,
            "pair_tile: left operand too short"
        );
        assert!(
            c.len() >= (rows - 1) * ldc + 2 * NR,
            "pair_tile: output too short"
        );
        let bp = bias.map_or(std::ptr::null(), |b| b.as_ptr());
        let (a, p, cp) = (a.as_ptr(), pair.as_ptr(), c.as_mut_ptr());
        // SAFETY: AVX-512F present (the caller checked `has_avx512`); the asserts above bound
        // every read of `a` and of both panels and every write of `c`; `bias` has 32 floats
        // when given (sliced by `gemm`).
        unsafe {
            let q = p.add(stride);
            match rows {
                12 => avx512::kernel_pair::<12>(k, a, lda, p, q, cp, ldc, bp, mode, load),
                11 => avx512::kernel_pair::<11>(k, a, lda, p, q, cp, ldc, bp, mode, load),
                10 => avx512::kernel_pair::<10>(k, a, lda, p, q, cp, ldc, bp, mode, load),
                9 => avx512::kernel_pair::<9>(k, a, lda, p, q, cp, ldc, bp, mode, load),
                8 => avx512::kernel_pair::<8>(k, a, lda, p, q, cp, ldc, bp, mode, load),
                7 => avx512::kernel_pair::<7>(k, a, lda, p, q, cp, ldc, bp, mode, load),
                6 => avx512::kernel_pair::<6>(k, a, lda, p, q, cp, ldc, bp, mode, load),
                5 => avx512::kernel_pair::<5>(k, a, lda, p, q, cp, ldc, bp, mode, load),
                4 => avx512::kernel_pair::<4>(k, a, lda, p, q, cp, ldc, bp, mode, load),
                3 => avx512::kernel_pair::<3>(k, a, lda, p, q, cp, ldc, bp, mode, load),
                2 => avx512::kernel_pair::<2>(k, a, lda, p, q, cp, ldc, bp, mode, load),
                _ => avx512::kernel_pair::<1>(k, a, lda, p, q, cp, ldc, bp, mode, load),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (rows, k, a, lda, pair, stride, c, ldc, bias, mode, load);
        unreachable!("the pair kernels are x86_64 only");
    }
}

/// [`gemm`] with the rows split into chunks run on the current rayon pool. The split never
/// changes a result (see the module docs).
#[allow(clippy::too_many_arguments)]
pub fn par_gemm(
    m: usize,
    a: &[f32],
    lda: usize,
    b: &Packed,
    c: &mut [f32],
    ldc: usize,
    epi: Epilogue<'_>,
    threads: usize,
) {
    if m == 0 || b.n == 0 {
        return;
    }
    // Enough chunks to balance two threads with uneven speed; chunks of whole micro-tiles.
    let target = (threads.max(1) * 2).max(1);
    let chunk = m.div_ceil(target).div_ceil(MR_WIDE).max(1) * MR_WIDE;
    let chunk = chunk.max(if threads <= 1 { m } else { MR_WIDE });
    if chunk >= m {
        gemm(m, a, lda, b, c, ldc, epi);
        return;
    }
    let c_len = (m - 1) * ldc + b.n;
    c[..c_len]
        .par_chunks_mut(chunk * ldc)
        .enumerate()
        .for_each(|(t, c_chunk)| {
            let i0 = t * chunk;
            let rows = chunk.min(m - i0);
            gemm(rows, &a[i0 * lda..], lda, b, c_chunk, ldc, epi);
        });
}

#[allow(clippy::too_many_arguments)]
#[inline]
fn micro(
    avx: bool,
    wide: bool,
    rows: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    panel: &[f32],
    c: &mut [f32],
    ldc: usize,
    cols: usize,
    bias: Option<&[f32]>,
    acc_in: bool,
) {
    let mut tile = [[0.0f32; NR]; MR_WIDE];
    #[cfg(target_arch = "x86_64")]
    {
        if avx && wide {
            // the zero-padded panel through the 16-lane kernel (up to 12 rows) into the tile
            let t = tile.as_flattened_mut();
            full_tile(true, rows, k, a, lda, panel, t, NR, None, STORE, false);
        } else if avx {
            // SAFETY: the CPU supports AVX2 and FMA (checked by `has_avx2_fma`); `a` holds
            // `rows` rows of `k` floats at stride `lda` and `panel` holds `k * NR` floats
            // (bounds asserted by `gemm`), which is all the kernel reads.
            unsafe {
                match rows {
                    6 => avx2::kernel::<6>(k, a.as_ptr(), lda, panel.as_ptr(), &mut tile),
                    5 => avx2::kernel::<5>(k, a.as_ptr(), lda, panel.as_ptr(), &mut tile),
                    4 => avx2::kernel::<4>(k, a.as_ptr(), lda, panel.as_ptr(), &mut tile),
                    3 => avx2::kernel::<3>(k, a.as_ptr(), lda, panel.as_ptr(), &mut tile),
                    2 => avx2::kernel::<2>(k, a.as_ptr(), lda, panel.as_ptr(), &mut tile),
                    _ => avx2::kernel::<1>(k, a.as_ptr(), lda, panel.as_ptr(), &mut tile),
                }
            }
        } else {
            scalar_kernel(rows, k, a, lda, panel, &mut tile);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (avx, wide);
        scalar_kernel(rows, k, a, lda, panel, &mut tile);
    }
    for (i, t) in tile.iter().enumerate().take(rows) {
        let out = &mut c[i * ldc..i * ldc + cols];
        match (bias, acc_in) {
            (Some(b), _) => {
                for j in 0..cols {
                    out[j] = t[j] + b[j];
                }
            }
            (None, true) => {
                for j in 0..cols {
                    out[j] += t[j];
                }
            }
            (None, false) => out.copy_from_slice(&t[..cols]),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{ACCUMULATE, BIAS, NR};
    use std::arch::x86_64::*;

    /// 16-lane version of `avx2::kernel_out` for up to 12 rows: the same FMA chain per output
    /// in `k` order, so the same numbers.
    ///
    /// # Safety
    /// AVX-512F must be available; `a` must point at `R` rows of `k` readable floats with row
    /// stride `lda`; `panel` at `k * NR` readable floats; `c` at `R` rows of 16 writable floats
    /// with stride `ldc`; `bias` at 16 readable floats when `mode == BIAS`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn kernel_out<const R: usize>(
        k: usize,
        a: *const f32,
        lda: usize,
        panel: *const f32,
        c: *mut f32,
        ldc: usize,
        bias: *const f32,
        mode: u8,
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
                let b = _mm512_loadu_ps(bp);
                for (i, v) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a.add(i * lda + kk));
                    *v = _mm512_fmadd_ps(av, b, *v);
                }
                bp = bp.add(NR);
            }
        }
        // SAFETY: row i of `c` has 16 writable floats; `bias` 16 readable ones in BIAS mode.
        unsafe {
            let e = if mode == BIAS {
                _mm512_loadu_ps(bias)
            } else {
                _mm512_setzero_ps()
            };
            for (i, v) in acc.iter().enumerate() {
                let row = c.add(i * ldc);
                let o = match mode {
                    BIAS => _mm512_add_ps(*v, e),
                    ACCUMULATE => _mm512_add_ps(_mm512_loadu_ps(row), *v),
                    _ => *v,
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
    /// writable floats with stride `ldc`; `bias` at 32 readable floats when `mode == BIAS`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn kernel_pair<const R: usize>(
        k: usize,
        a: *const f32,
        lda: usize,
        p0: *const f32,
        p1: *const f32,
        c: *mut f32,
        ldc: usize,
        bias: *const f32,
        mode: u8,
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
        // SAFETY: row i of `c` has 32 writable floats; `bias` 32 readable ones in BIAS mode.
        unsafe {
            let (e0, e1) = if mode == BIAS {
                (_mm512_loadu_ps(bias), _mm512_loadu_ps(bias.add(NR)))
            } else {
                (_mm512_setzero_ps(), _mm512_setzero_ps())
            };
            for i in 0..R {
                let row = c.add(i * ldc);
                let (o0, o1) = match mode {
                    BIAS => (_mm512_add_ps(acc0[i], e0), _mm512_add_ps(acc1[i], e1)),
                    ACCUMULATE => (
                        _mm512_add_ps(_mm512_loadu_ps(row), acc0[i]),
                        _mm512_add_ps(_mm512_loadu_ps(row.add(NR)), acc1[i]),
                    ),
                    _ => (acc0[i], acc1[i]),
                };
                _mm512_storeu_ps(row, o0);
                _mm512_storeu_ps(row.add(NR), o1);
            }
        }
    }
}

fn scalar_kernel(
    rows: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    panel: &[f32],
    tile: &mut [[f32; NR]; MR_WIDE],
) {
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

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{MR_WIDE, NR};
    use std::arch::x86_64::*;

    use super::{ACCUMULATE, BIAS};

    /// Like [`kernel`], storing a full 16-column tile straight into `c` (row stride `ldc`):
    /// `c = acc` (STORE), `c = acc + bias` (BIAS) or `c += acc` (ACCUMULATE). Same arithmetic
    /// as the tile path (the product first, then one addition).
    ///
    /// # Safety
    /// As [`kernel`]; also `c` must point at `R` rows of 16 writable floats at stride `ldc`, and
    /// `bias` at 16 readable floats when `mode == BIAS`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kernel_out<const R: usize>(
        k: usize,
        a: *const f32,
        lda: usize,
        panel: *const f32,
        c: *mut f32,
        ldc: usize,
        bias: *const f32,
        mode: u8,
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
            // SAFETY: as in `kernel`.
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
        // SAFETY: row i of `c` has 16 writable floats; `bias` 16 readable ones in BIAS mode.
        unsafe {
            let (e0, e1) = if mode == BIAS {
                (_mm256_loadu_ps(bias), _mm256_loadu_ps(bias.add(8)))
            } else {
                (_mm256_setzero_ps(), _mm256_setzero_ps())
            };
            for i in 0..R {
                let row = c.add(i * ldc);
                let (o0, o1) = match mode {
                    BIAS => (_mm256_add_ps(acc0[i], e0), _mm256_add_ps(acc1[i], e1)),
                    ACCUMULATE => (
                        _mm256_add_ps(_mm256_loadu_ps(row), acc0[i]),
                        _mm256_add_ps(_mm256_loadu_ps(row.add(8)), acc1[i]),
                    ),
                    _ => (acc0[i], acc1[i]),
                };
                _mm256_storeu_ps(row, o0);
                _mm256_storeu_ps(row.add(8), o1);
            }
        }
    }

    /// `tile[0..R] = A[0..R, 0..k] · panel`, one FMA chain per output in `k` order.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `a` must point at `R` rows of `k` readable floats with row
    /// stride `lda`; `panel` at `k * NR` readable floats.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kernel<const R: usize>(
        k: usize,
        a: *const f32,
        lda: usize,
        panel: *const f32,
        tile: &mut [[f32; NR]; MR_WIDE],
    ) {
        let mut acc0 = [_mm256_setzero_ps(); R];
        let mut acc1 = [_mm256_setzero_ps(); R];
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
        for i in 0..R {
            // SAFETY: each tile row holds NR = 16 floats.
            unsafe {
                _mm256_storeu_ps(tile[i].as_mut_ptr(), acc0[i]);
                _mm256_storeu_ps(tile[i].as_mut_ptr().add(8), acc1[i]);
            }
        }
    }
}

/// The f32 FMA peak of this machine in GFLOP/s, measured: `threads` OS threads at once, each
/// running independent fused multiply-add chains (12 accumulators, more than FMA latency ×
/// FMA units) of the widest vectors the kernels use (AVX-512, else AVX2) for about `seconds`.
/// The sum over the threads is returned; 0 when neither AVX2+FMA nor AVX-512 is available; an
/// error for `seconds` ≤ 0 (at most 60 are run), no threads, or threads the OS will not start.
/// It is what a matrix kernel could at best execute at the clock the cores run now, which
/// the nominal clock in `/proc/cpuinfo` does not tell (cores boost).
pub fn fma_peak_gflops(seconds: f64, threads: usize) -> crate::error::Result<f64> {
    if !(seconds.is_finite() && seconds > 0.0) || threads == 0 {
        return Err(crate::error::Error::Value(format!(
            "seconds must be > 0 and threads >= 1, got {seconds} and {threads}"
        )));
    }
    let seconds = seconds.min(60.0);
    std::thread::scope(|scope| {
        let mut runs = Vec::with_capacity(threads);
        for _ in 0..threads {
            let run = std::thread::Builder::new()
                .spawn_scoped(scope, move || fma_chains(seconds))
                .map_err(|e| {
                    crate::error::Error::Value(format!("cannot start {threads} threads: {e}"))
                })?;
            runs.push(run);
        }
        Ok(runs.into_iter().map(|r| r.join().unwrap_or(0.0)).sum())
    })
}

/// One thread of [`fma_peak_gflops`].
fn fma_chains(seconds: f64) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        let start = std::time::Instant::now();
        let mut flops = 0.0f64;
        let mut sink = 0.0f32;
        while start.elapsed().as_secs_f64() < seconds {
            // SAFETY: each branch runs only on a CPU with the features it enables.
            let (f, s) = unsafe {
                if has_avx512() {
                    peak::avx512(1 << 16)
                } else if has_avx2_fma() {
                    peak::avx2(1 << 16)
                } else {
                    return 0.0;
                }
            };
            flops += f;
            sink += s;
        }
        std::hint::black_box(sink);
        flops / start.elapsed().as_secs_f64() / 1e9
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = seconds;
        0.0
    }
}

#[cfg(target_arch = "x86_64")]
mod peak {
    use std::arch::x86_64::*;

    /// `iters` rounds of FMAs on 12 named accumulators (an array went through memory every
    /// round), more chains than FMA latency × FMA units on current x86 cores; `$set1`, `$fma`
    /// and `$sum` are one vector width's intrinsics. Evaluates to the sum of the accumulators.
    macro_rules! chains {
        ($set1:ident, $fma:ident, $sum:expr, $iters:expr) => {{
            let (x, y) = ($set1(0.999_9), $set1(1e-5));
            chains!(@run $set1, $fma, $sum, $iters, x, y; a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11)
        }};
        (@run $set1:ident, $fma:ident, $sum:expr, $iters:expr, $x:ident, $y:ident; $($a:ident),*) => {{
            let mut init = 0.0f32;
            $(init += 1e-3; let mut $a = $set1(init);)*
            for _ in 0..$iters {
                $($a = $fma($a, $x, $y);)*
            }
            0.0f32 $(+ $sum($a))*
        }};
    }

    /// `iters` rounds of 12 independent 16-lane FMAs: (flops, a value that depends on them).
    ///
    /// # Safety
    /// AVX-512F must be available.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512(iters: usize) -> (f64, f32) {
        let s = chains!(_mm512_set1_ps, _mm512_fmadd_ps, _mm512_reduce_add_ps, iters);
        ((iters * 12 * 16 * 2) as f64, s)
    }

    /// `iters` rounds of 12 independent 8-lane FMAs.
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2(iters: usize) -> (f64, f32) {
        let first = |v: __m256| _mm_cvtss_f32(_mm256_castps256_ps128(v));
        let s = chains!(_mm256_set1_ps, _mm256_fmadd_ps, first, iters);
        ((iters * 12 * 8 * 2) as f64, s)
    }
}

// ---- elementwise and row ops (auto-vectorised; AVX2 clones chosen at run time) --------------

macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            {
                if has_avx2_fma() {
                    // SAFETY: the CPU has AVX2 and FMA.
                    return unsafe { avx($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// Sum of a slice with 8 independent lanes (vectorisable; a fixed order, so deterministic).
#[inline(always)]
fn lane_sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for j in 0..8 {
            acc[j] += c[j];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for v in chunks.remainder() {
        s += v;
    }
    s
}

multiversion! {
    /// In place over rows of width `gamma.len()`: `x ← (x − mean) / sqrt(var + eps) · γ + β`.
    pub fn layer_norm(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
        let h = gamma.len();
        let inv_h = 1.0 / h as f32;
        for row in x.chunks_exact_mut(h) {
            let mean = lane_sum(row) * inv_h;
            let mut sq = [0.0f32; 8];
            let mut chunks = row.chunks_exact(8);
            for c in &mut chunks {
                for j in 0..8 {
                    let d = c[j] - mean;
                    sq[j] += d * d;
                }
            }
            let mut var = ((sq[0] + sq[4]) + (sq[1] + sq[5])) + ((sq[2] + sq[6]) + (sq[3] + sq[7]));
            for v in chunks.remainder() {
                var += (v - mean) * (v - mean);
            }
            let inv = 1.0 / (var * inv_h + eps).sqrt();
            for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
                *v = (*v - mean) * inv * g + b;
            }
        }
    }
}

/// `x ← LayerNorm(x + r)` over rows (the post-LN residual of BERT).
pub fn add_layer_norm(x: &mut [f32], r: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
    assert!(r.len() >= x.len(), "add_layer_norm: residual too short");
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() && !gamma.is_empty() {
            // SAFETY: the CPU has AVX-512F (checked above); `r` covers `x` (asserted).
            unsafe { avx512_elem::add_layer_norm(x, r, gamma, beta, eps) };
            return;
        }
    }
    add_assign(x, r);
    layer_norm(x, gamma, beta, eps);
}

multiversion! {
    /// `x ← x + r`.
    pub fn add_assign(x: &mut [f32], r: &[f32]) {
        for (a, b) in x.iter_mut().zip(r) {
            *a += b;
        }
    }
}

/// erf(x) in f32: a rational minimax approximation on [−4, 4] (as in Eigen / XLA), absolute
/// error below 5e-7; outside the range erf is ±1 in f32.
#[inline(always)]
fn erf_f32(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.954_600_2e-3;
    p = p * x2 + -1.609_603_3e-2;
    let p = p * x;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329e-3;
    q = q * x2 + -1.426_474e-2;
    p / q
}

/// Exact (erf) GELU in place: `x · ½ · (1 + erf(x / √2))`, as `nn.GELU()` / HF `"gelu"`.
pub fn gelu(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            // SAFETY: the CPU has AVX-512F (checked above).
            unsafe { avx512_elem::gelu(x) };
            return;
        }
    }
    gelu_portable(x);
}

multiversion! {
    /// [`gelu`] without AVX-512 (auto-vectorised, AVX2 clone at run time).
    fn gelu_portable(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = 0.5 * *v * (1.0 + erf_f32(*v * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

multiversion! {
    /// Tanh-approximated GELU in place (HF `"gelu_new"`, `"gelu_pytorch_tanh"`).
    pub fn gelu_tanh(x: &mut [f32]) {
        const C: f32 = 0.797_884_6; // sqrt(2/pi)
        for v in x.iter_mut() {
            let u = C * (*v + 0.044_715 * *v * *v * *v);
            // tanh(u) = 1 − 2 / (exp(2u) + 1)
            let t = 1.0 - 2.0 / (exp_f32(2.0 * u) + 1.0);
            *v = 0.5 * *v * (1.0 + t);
        }
    }
}

multiversion! {
    /// ReLU in place.
    pub fn relu(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = v.max(0.0);
        }
    }
}

/// tanh in place (only used on the few pooled rows).
pub fn tanh(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = v.tanh();
    }
}

/// e^x in f32 for the softmax: Cephes-style range reduction `x = n·ln2 + r` and a degree-6
/// polynomial; relative error about 2 ulp; flushes to 0 below −87.3 and saturates above 88.
#[inline(always)]
fn exp_f32(x_in: f32) -> f32 {
    let x = x_in.clamp(-87.3, 88.0);
    // round-to-nearest of x·log2(e) without a libm call (vectorises on plain SSE2)
    let t = x * std::f32::consts::LOG2_E;
    let n = (t + 12_582_912.0) - 12_582_912.0;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let p = p * r * r + r + 1.0;
    let bits = ((n as i32 + 127) as u32) << 23;
    let e = p * f32::from_bits(bits);
    if x_in < -87.3 {
        0.0
    } else {
        e
    }
}

/// Row-wise softmax in place of `rows × width` values after multiplying by `scale` (> 0).
pub fn softmax_rows(x: &mut [f32], width: usize, scale: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            // SAFETY: the CPU has AVX-512F (checked above).
            unsafe { avx512_elem::softmax_rows(x, width, scale) };
            return;
        }
    }
    softmax_portable(x, width, scale);
}

multiversion! {
    /// [`softmax_rows`] without AVX-512 (auto-vectorised, AVX2 clone at run time).
    fn softmax_portable(x: &mut [f32], width: usize, scale: f32) {
        for row in x.chunks_exact_mut(width) {
            let mut lanes = [f32::NEG_INFINITY; 8];
            let mut chunks = row.chunks_exact_mut(8);
            for c in &mut chunks {
                for j in 0..8 {
                    c[j] *= scale;
                    lanes[j] = if c[j] > lanes[j] { c[j] } else { lanes[j] };
                }
            }
            let mut m = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            for v in chunks.into_remainder() {
                *v *= scale;
                m = m.max(*v);
            }
            for v in row.iter_mut() {
                *v = exp_f32(*v - m);
            }
            let inv = 1.0 / lane_sum(row);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

/// AVX-512 versions of the elementwise ops: the same formulas as [`exp_f32`] and [`erf_f32`],
/// 16 lanes at a time; a row's ragged end goes through the same code under a lane mask, so every
/// element of a row is computed the same way whatever the row's width.
#[cfg(target_arch = "x86_64")]
mod avx512_elem {
    use std::arch::x86_64::*;

    /// 16 lanes of [`super::exp_f32`] (2^n applied with `scalef`), 0 below −87.3.
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
    pub(super) unsafe fn softmax_rows(x: &mut [f32], width: usize, scale: f32) {
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
    pub(super) unsafe fn add_layer_norm(
        x: &mut [f32],
        r: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
    ) {
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
            let inv = _mm512_set1_ps(1.0 / (var + eps).sqrt());
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
    pub(super) unsafe fn transpose_panel(
        b: &[f32],
        ld: usize,
        cols: usize,
        k: usize,
        panel: &mut [f32],
    ) {
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
    pub(super) unsafe fn gelu(x: &mut [f32]) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, k: usize, n: usize, a: &[f32], w: &[f32]) -> Vec<f64> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for kk in 0..k {
                    s += a[i * k + kk] as f64 * w[j * k + kk] as f64;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn gemm_matches_naive_on_ragged_shapes() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 5, 17),
            (13, 33, 40),
            (100, 64, 48),
            (6, 384, 16),
        ] {
            let a = pseudo(m * k, 1);
            let w = pseudo(n * k, 2);
            let bias = pseudo(n, 3);
            let b = Packed::from_weight(&w, n, k);
            let mut c = vec![0.0f32; m * n];
            gemm(m, &a, k, &b, &mut c, n, Epilogue::Bias(&bias));
            let r = naive(m, k, n, &a, &w);
            for i in 0..m * n {
                let want = r[i] + bias[i % n] as f64;
                assert!((c[i] as f64 - want).abs() < 1e-4, "{m}x{k}x{n} at {i}");
            }
        }
    }

    #[test]
    fn every_path_computes_the_same_fma_chain_bit_for_bit() {
        // K > KC (blocked full tiles), ragged N (a panel pair, a single full panel, a partial
        // panel), ragged M (short micro tiles)
        let (m, k, n) = (29, 2100, 53);
        let a = pseudo(m * k, 7);
        let w = pseudo(n * k, 8);
        let bias = pseudo(n, 9);
        let b = Packed::from_weight(&w, n, k);
        let mut c = vec![0.0f32; m * n];
        gemm(m, &a, k, &b, &mut c, n, Epilogue::Bias(&bias));
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0f32;
                for kk in 0..k {
                    acc = a[i * k + kk].mul_add(w[j * k + kk], acc);
                }
                assert_eq!(
                    c[i * n + j].to_bits(),
                    (acc + bias[j]).to_bits(),
                    "({i}, {j})"
                );
            }
        }
        let mut acc_c = c.clone();
        gemm(m, &a, k, &b, &mut acc_c, n, Epilogue::Accumulate);
        for i in 0..m * n {
            let mut acc = 0.0f32;
            for kk in 0..k {
                acc = a[(i / n) * k + kk].mul_add(w[(i % n) * k + kk], acc);
            }
            assert_eq!(acc_c[i].to_bits(), (c[i] + acc).to_bits());
        }
    }

    #[test]
    fn row_results_do_not_depend_on_other_rows_or_threads() {
        let (m, k, n) = (37, 50, 33);
        let a = pseudo(m * k, 4);
        let w = pseudo(n * k, 5);
        let b = Packed::from_weight(&w, n, k);
        let mut full = vec![0.0f32; m * n];
        gemm(m, &a, k, &b, &mut full, n, Epilogue::Store);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("pool");
        let mut par = vec![0.0f32; m * n];
        pool.install(|| par_gemm(m, &a, k, &b, &mut par, n, Epilogue::Store, 2));
        assert_eq!(full, par);
        for i in [0, 5, 6, 36] {
            let mut one = vec![0.0f32; n];
            gemm(1, &a[i * k..], k, &b, &mut one, n, Epilogue::Store);
            assert_eq!(&full[i * n..(i + 1) * n], &one[..]);
        }
    }

    #[test]
    fn exp_and_erf_are_accurate() {
        let mut x = -20.0f32;
        while x < 20.0 {
            let e = exp_f32(x) as f64;
            let want = (x as f64).exp();
            assert!(((e - want) / want).abs() < 1e-6, "exp({x})");
            x += 0.01;
        }
        // erf against a 60-term Taylor series in f64 on [-3, 3]
        let mut x = -3.0f64;
        while x <= 3.0 {
            let mut term = x;
            let mut sum = x;
            for n in 1..200 {
                term *= -x * x / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            let want = sum * 2.0 / std::f64::consts::PI.sqrt();
            assert!((erf_f32(x as f32) as f64 - want).abs() < 1e-6, "erf({x})");
            x += 0.01;
        }
    }

    #[test]
    fn fma_peak_is_measured() {
        let one = fma_peak_gflops(0.05, 1).expect("one thread starts");
        assert!(fma_peak_gflops(0.0, 1).is_err() && fma_peak_gflops(0.1, 0).is_err());
        // any x86-64 CPU with AVX2 does several GFLOP/s; nothing does 10 TFLOP/s per core
        if has_avx2_fma() {
            assert!(one > 1.0 && one < 10_000.0, "{one}");
        } else {
            assert_eq!(one, 0.0);
        }
    }

    #[test]
    fn transposed_column_blocks_are_weight_rows() {
        // Wᵀ packed from a [37, 19] weight; its columns 5..29 transposed are rows 5..29 of W
        let (n_out, k_in) = (37, 19);
        let w = pseudo(n_out * k_in, 5);
        let p = Packed::from_weight(&w, n_out, k_in);
        let t = p.transpose_cols(5, 29);
        let want = Packed::from_kn(&w[5 * k_in..29 * k_in], 24, k_in, k_in);
        assert_eq!((t.k(), t.n()), (24, k_in));
        assert_eq!(t.data, want.data);
        assert_eq!(p.at(3, 30), w[30 * k_in + 3]);
        // row-major and transposed packings of strided matrices, ragged last panel zero padded
        for (k, n, ld) in [(5, 37, 40), (1, 1, 1), (19, 16, 19), (3, 33, 33)] {
            let b = pseudo(k.max(n) * ld + ld, (k * n) as u64);
            let kn = Packed::from_kn(&b, k, n, ld);
            let nk = Packed::from_nk(&b, n, k, ld);
            for kk in 0..k {
                for j in 0..n {
                    assert_eq!(kn.at(kk, j), b[kk * ld + j]);
                    assert_eq!(nk.at(kk, j), b[j * ld + kk]);
                }
            }
            let pad = |p: &Packed| p.data.len() - p.data.iter().filter(|v| **v != 0.0).count();
            assert_eq!(pad(&kn), (n.div_ceil(NR) * NR - n) * k);
            assert_eq!(pad(&nk), (n.div_ceil(NR) * NR - n) * k);
        }
        // a reused packing: the old values in the new padding are cleared
        let full: Vec<f32> = (0..4 * 32).map(|i| 1.0 + i as f32).collect();
        let mut p = Packed::from_kn(&full, 4, 32, 32);
        p.refill_nk(&full[..20 * 4], 20, 4, 4);
        assert_eq!(p.data.len(), 2 * 4 * NR);
        assert!(p.data[4 * NR..]
            .chunks(NR)
            .all(|r| r[4..].iter().all(|v| *v == 0.0)));
        assert_eq!(p.at(3, 19), full[19 * 4 + 3]);
    }

    #[test]
    fn simd_and_portable_elementwise_ops_agree() {
        // whichever path this CPU takes, it must match the portable formulas to float rounding,
        // on every row width (ragged ends go through lane masks)
        let x = pseudo(4 * 1000, 11);
        let mut a: Vec<f32> = x.iter().map(|v| v * 12.0).collect();
        let mut b = a.clone();
        gelu(&mut a);
        gelu_portable(&mut b);
        for (u, v) in a.iter().zip(&b) {
            assert!((u - v).abs() <= 1e-6 * (1.0 + v.abs()), "gelu {u} vs {v}");
        }
        for h in [1, 7, 16, 33, 384] {
            let gamma: Vec<f32> = x[..h].iter().map(|v| 1.0 + v).collect();
            let beta: Vec<f32> = x[h..2 * h].to_vec();
            let res: Vec<f32> = x[..3 * h].iter().rev().map(|v| v * 3.0).collect();
            let mut a: Vec<f32> = x[..3 * h].iter().map(|v| v * 5.0 + 0.3).collect();
            let mut b = a.clone();
            add_layer_norm(&mut a, &res, &gamma, &beta, 1e-12);
            add_assign(&mut b, &res);
            layer_norm(&mut b, &gamma, &beta, 1e-12);
            for (u, v) in a.iter().zip(&b) {
                assert!(
                    (u - v).abs() <= 1e-5 * (1.0 + v.abs()),
                    "layer norm h={h}: {u} vs {v}"
                );
            }
        }
        for width in 1..70 {
            let mut a: Vec<f32> = x[..3 * width].iter().map(|v| v * 40.0).collect();
            a[width / 2] = -1e30;
            let mut b = a.clone();
            softmax_rows(&mut a, width, 0.17);
            softmax_portable(&mut b, width, 0.17);
            for (u, v) in a.iter().zip(&b) {
                assert!((u - v).abs() <= 1e-6, "softmax width {width}: {u} vs {v}");
            }
            for row in a.chunks(width) {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn layer_norm_and_softmax_basics() {
        let mut x = vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        layer_norm(&mut x, &[1.0; 10], &[0.0; 10], 1e-12);
        let mean: f32 = x.iter().sum::<f32>() / 10.0;
        let var: f32 = x.iter().map(|v| v * v).sum::<f32>() / 10.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5);
        let mut s = vec![0.0f32, 1.0, 2.0, -1e30];
        softmax_rows(&mut s, 4, 1.0);
        assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-6 && s[3] == 0.0);
    }
}
