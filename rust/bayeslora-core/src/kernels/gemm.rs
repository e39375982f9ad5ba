//! The GEMM driver: `C ⟵ A · B` (plus an [`Epilogue`]) against a [`Packed`] right operand,
//! cut into cache blocks and register tiles, each tile computed by the micro-kernel of the
//! chosen [`Isa`].
//!
//! Every output element is one fused multiply-add chain over `k = 0..K` in order, on every
//! instruction set and in every kind of tile (a pair of panels, a full panel, a ragged edge):
//! so the result of a row never depends on the other rows, on how rows are split across
//! threads, or on the instruction set.

use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;

#[cfg(target_arch = "aarch64")]
use super::aarch64_neon;
use super::isa::Isa;
use super::pack::Packed;
use super::scalar;
#[cfg(target_arch = "x86_64")]
use super::{x86_avx2, x86_avx512};

/// Columns per packed panel (two 8-lane AVX registers).
pub const NR: usize = 16;
/// Rows per micro-kernel call (AVX2 and scalar).
pub const MR: usize = 6;
/// Rows per micro-kernel call with AVX-512 (one 16-lane register per row).
pub(super) const MR_WIDE: usize = 12;
/// How far ahead of the FMAs the x86 micro-kernels prefetch their packed panels, in floats (32
/// rows of a panel, 2 KiB): a layer's weights do not fit in L2, so each row block's first tile
/// meets every panel cold, and the hardware prefetchers (which stop at every 4 KiB page) do not
/// run far enough ahead. Measured on a 2-core Intel Xeon (Emerald Rapids, 2 MiB L2) with busy
/// neighbours, MiniLM, 8 inputs × 16 samples, one thread: 14–16 % less time per pass on AVX-512
/// and AVX2 than without, alternating within one process; 3–6 % less as the best of four
/// alternating runs of the two builds. 256, 384, 768 and 1024 floats gave less than 512.
#[cfg(target_arch = "x86_64")]
pub(super) const PREFETCH: usize = 512;
/// Rows per cache block: the left block (`MB × K`) stays in L2 while the panels stream past it.
pub(crate) const MB: usize = 96;
/// K block of the full-tile path. Measured on Zen 4 with the MiniLM shapes (K ≤ 1536), blocking
/// at 256 or 512 did not pay; it is kept for the long K of larger models.
const KC: usize = 2048;

/// The sets this architecture has kernels for, portable first: the slots of [`GEMM_CALLS`].
#[cfg(target_arch = "x86_64")]
const SETS: [&str; 3] = ["portable", "avx2", "avx512"];
#[cfg(target_arch = "aarch64")]
const SETS: [&str; 2] = ["portable", "neon"];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const SETS: [&str; 1] = ["portable"];

/// Calls of [`gemm_on`] per instruction set ([`SETS`]) since the process started: which
/// kernels ran, for tests that force a set through `BAYESLORA_ISA`. One relaxed add per
/// product, not per tile.
static GEMM_CALLS: [AtomicU64; SETS.len()] = [const { AtomicU64::new(0) }; SETS.len()];

/// `(set name, products run on it)` for every set of this architecture, portable first
/// (x86-64: portable, avx2, avx512; ARM64: portable, neon): the count of [`gemm_on`] calls
/// (through [`gemm`] and [`par_gemm`] too) on each set in this process so far.
pub fn gemm_calls() -> [(&'static str, u64); SETS.len()] {
    std::array::from_fn(|i| (SETS[i], GEMM_CALLS[i].load(Ordering::Relaxed)))
}

/// The accumulators of one micro-tile, spilled: up to [`MR_WIDE`] rows of one panel.
pub(super) type Tile = [[f32; NR]; MR_WIDE];

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

impl Epilogue<'_> {
    /// This epilogue for the output columns `j0..j0 + cols` (the bias sliced to them).
    #[inline]
    fn columns(self, j0: usize, cols: usize) -> Self {
        match self {
            Epilogue::Bias(bias) => Epilogue::Bias(&bias[j0..j0 + cols]),
            other => other,
        }
    }

    /// The bias has at least `cols` entries (or there is none): what the kernels read.
    #[inline]
    pub(super) fn covers(self, cols: usize) -> bool {
        match self {
            Epilogue::Bias(bias) => bias.len() >= cols,
            _ => true,
        }
    }

    /// Store one row of results `acc` into `out` (as many columns as `out` has).
    #[inline]
    fn store_row(self, acc: &[f32], out: &mut [f32]) {
        match self {
            Epilogue::Bias(bias) => {
                for ((o, &v), &b) in out.iter_mut().zip(acc).zip(bias) {
                    *o = v + b;
                }
            }
            Epilogue::Accumulate => {
                for (o, &v) in out.iter_mut().zip(acc) {
                    *o += v;
                }
            }
            Epilogue::Store => out.copy_from_slice(&acc[..out.len()]),
        }
    }
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
    gemm_on(Isa::get(), m, a, lda, b, c, ldc, epi);
}

/// [`gemm`] on the given instruction set; every set computes the same numbers, bit for bit.
#[allow(clippy::too_many_arguments)]
pub fn gemm_on(
    isa: Isa,
    m: usize,
    a: &[f32],
    lda: usize,
    b: &Packed,
    c: &mut [f32],
    ldc: usize,
    epi: Epilogue<'_>,
) {
    gemm_panels(isa, m, a, lda, b, 0..b.panels(), c, ldc, epi);
}

/// [`gemm_on`] for the output columns of `b`'s panels `panels` only: `c` holds those columns
/// (column 0 of `c` is column `panels.start · NR` of the product), `epi` is indexed by the
/// product's columns. An element's FMA chain is the same as in the whole product.
#[allow(clippy::too_many_arguments)]
fn gemm_panels(
    isa: Isa,
    m: usize,
    a: &[f32],
    lda: usize,
    b: &Packed,
    panels: std::ops::Range<usize>,
    c: &mut [f32],
    ldc: usize,
    epi: Epilogue<'_>,
) {
    let n_end = (panels.end * NR).min(b.n);
    let col0 = panels.start * NR;
    if m == 0 || n_end <= col0 {
        return;
    }
    let width = n_end - col0;
    let slot = match isa {
        Isa::Scalar => 0,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2(_) => 1,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512(_) => 2,
        #[cfg(target_arch = "aarch64")]
        Isa::Neon(_) => 1,
    };
    GEMM_CALLS[slot].fetch_add(1, Ordering::Relaxed);
    let k = b.k;
    assert!(
        lda >= k && ldc >= width,
        "gemm: leading dimensions too small"
    );
    assert!(a.len() >= (m - 1) * lda + k, "gemm: left operand too short");
    assert!(c.len() >= (m - 1) * ldc + width, "gemm: output too short");
    assert!(epi.covers(b.n), "gemm: bias too short");
    let mr = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512(_) => MR_WIDE,
        _ => MR,
    };
    // K blocks keep the panel slice and the left rows in L1. A block's partial sums go through
    // `c` as f32 and are reloaded into the registers: the FMA chain of every element is the same
    // as without blocking, bit for bit. `C += A·B` needs `c` for its old values: not blocked.
    let kc = if matches!(epi, Epilogue::Accumulate) || k <= KC {
        k.max(1)
    } else {
        KC
    };
    for i_block in (0..m).step_by(MB) {
        let i_end = (i_block + MB).min(m);
        let mut kb = 0;
        loop {
            let klen = kc.min(k - kb);
            let (first, last) = (kb == 0, kb + klen >= k);
            // the full-tile kernels store partial sums until the last K block
            let block_epi = if last { epi } else { Epilogue::Store };
            let mut p = panels.start;
            while p < panels.end {
                let j0 = p * NR;
                // this panel's first column in `c`
                let cj = j0 - col0;
                // AVX-512: two full panels at once (12 × 32 tile, 24 accumulators): half the
                // broadcasts of A per FMA, and the A block is read half as often.
                #[cfg(target_arch = "x86_64")]
                if let (Isa::Avx512(t), true) = (isa, j0 + 2 * NR <= b.n && p + 2 <= panels.end) {
                    let pair = &b.data[p * k * NR..(p + 2) * k * NR];
                    let tile_epi = block_epi.columns(j0, 2 * NR);
                    let mut i0 = i_block;
                    while i0 < i_end {
                        let rows = MR_WIDE.min(i_end - i0);
                        x86_avx512::pair_tile(
                            t,
                            rows,
                            klen,
                            &a[i0 * lda + kb..],
                            lda,
                            &pair[kb * NR..],
                            k * NR,
                            &mut c[i0 * ldc + cj..],
                            ldc,
                            tile_epi,
                            !first,
                        );
                        i0 += rows;
                    }
                    p += 2;
                    continue;
                }
                let panel = &b.data[p * k * NR..(p + 1) * k * NR];
                let cols = NR.min(b.n - j0);
                let tile_epi = block_epi.columns(j0, cols);
                let edge_epi = epi.columns(j0, cols);
                let mut i0 = i_block;
                while i0 < i_end {
                    let rows = mr.min(i_end - i0);
                    let a_rows = &a[i0 * lda..];
                    let c_rows = &mut c[i0 * ldc + cj..];
                    match isa {
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx512(t) if cols == NR => x86_avx512::full_tile(
                            t,
                            rows,
                            klen,
                            &a_rows[kb..],
                            lda,
                            &panel[kb * NR..],
                            c_rows,
                            ldc,
                            tile_epi,
                            !first,
                        ),
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx2(t) if cols == NR => x86_avx2::full_tile(
                            t,
                            rows,
                            klen,
                            &a_rows[kb..],
                            lda,
                            &panel[kb * NR..],
                            c_rows,
                            ldc,
                            tile_epi,
                            !first,
                        ),
                        #[cfg(target_arch = "aarch64")]
                        Isa::Neon(t) if cols == NR => aarch64_neon::full_tile(
                            t,
                            rows,
                            klen,
                            &a_rows[kb..],
                            lda,
                            &panel[kb * NR..],
                            c_rows,
                            ldc,
                            tile_epi,
                            !first,
                        ),
                        // a partial panel, or no full-tile kernel: the whole chain at once
                        // (same arithmetic) in the first K block
                        _ if first => {
                            let (a, c) = (a_rows, c_rows);
                            edge_tile(isa, rows, k, a, lda, panel, c, ldc, cols, edge_epi);
                        }
                        _ => {}
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

/// `rows` rows of one panel over all `k` terms into a local [`Tile`], then its first `cols`
/// columns stored into `c` with `epi`: the path of a ragged last panel, and of every panel on
/// the scalar set.
#[allow(clippy::too_many_arguments)]
#[inline]
fn edge_tile(
    isa: Isa,
    rows: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    panel: &[f32],
    c: &mut [f32],
    ldc: usize,
    cols: usize,
    epi: Epilogue<'_>,
) {
    let mut tile: Tile = [[0.0f32; NR]; MR_WIDE];
    match isa {
        // the zero-padded panel through the 16-lane kernel (up to 12 rows) into the tile
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512(t) => x86_avx512::full_tile(
            t,
            rows,
            k,
            a,
            lda,
            panel,
            tile.as_flattened_mut(),
            NR,
            Epilogue::Store,
            false,
        ),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2(t) => x86_avx2::tile(t, rows, k, a, lda, panel, &mut tile),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon(t) => aarch64_neon::tile(t, rows, k, a, lda, panel, &mut tile),
        Isa::Scalar => scalar::tile(rows, k, a, lda, panel, &mut tile),
    }
    for (i, acc) in tile.iter().enumerate().take(rows) {
        epi.store_row(acc, &mut c[i * ldc..i * ldc + cols]);
    }
}

/// [`gemm`] with the rows split into chunks run on the current rayon pool (at most one row
/// block of rows: the columns, see `par_gemm_columns`). The split never changes a result (see
/// the module docs).
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
    if threads > 1 && m <= MB && b.panels() >= 2 * threads {
        par_gemm_columns(m, a, lda, b, c, ldc, epi, threads);
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

/// [`par_gemm`] for few rows (one sequence, or token 0 of a few): the threads share the columns
/// instead of the rows, so each reads only its part of the weights (split by rows, every thread
/// would stream all of them for a few rows' work). Each part is computed into a block of its
/// own (holding the old values of `c` under [`Epilogue::Accumulate`]) and copied into `c`.
#[allow(clippy::too_many_arguments)]
fn par_gemm_columns(
    m: usize,
    a: &[f32],
    lda: usize,
    b: &Packed,
    c: &mut [f32],
    ldc: usize,
    epi: Epilogue<'_>,
    threads: usize,
) {
    let isa = Isa::get();
    assert!(
        lda >= b.k && ldc >= b.n,
        "gemm: leading dimensions too small"
    );
    assert!(c.len() >= (m - 1) * ldc + b.n, "gemm: output too short");
    let panels = b.panels();
    // an even number of panels per part (AVX-512 tiles take them in pairs), two parts per thread;
    // a part: its panels, its first column, its width
    let per = panels.div_ceil(2 * threads).next_multiple_of(2);
    let parts: Vec<(std::ops::Range<usize>, usize, usize)> = (0..panels)
        .step_by(per)
        .map(|p| {
            let end = (p + per).min(panels);
            (p..end, p * NR, (end * NR).min(b.n) - p * NR)
        })
        .collect();
    let blocks: Vec<Vec<f32>> = parts
        .par_iter()
        .with_max_len(1)
        .map(|(range, col0, width)| {
            let (col0, width) = (*col0, *width);
            let mut block = vec![0.0f32; m * width];
            if matches!(epi, Epilogue::Accumulate) {
                for (dst, src) in block.chunks_exact_mut(width).zip(c.chunks(ldc)) {
                    dst.copy_from_slice(&src[col0..col0 + width]);
                }
            }
            gemm_panels(isa, m, a, lda, b, range.clone(), &mut block, width, epi);
            block
        })
        .collect();
    for ((_, col0, width), block) in parts.iter().zip(&blocks) {
        for (src, dst) in block.chunks_exact(*width).zip(c.chunks_mut(ldc)) {
            dst[*col0..*col0 + *width].copy_from_slice(src);
        }
    }
}
