//! Packing of the right operand of [`super::gemm`]: a `K × N` matrix as `ceil(N / NR)` panels
//! of `[K][NR]` floats, zero padded. A layer's weight is packed once at load; activations that
//! serve as right operands (keys, values, pooled rows) are re-packed into reused buffers.

#[cfg(target_arch = "aarch64")]
use super::aarch64_neon;
use super::gemm::NR;
use super::isa::Isa;
#[cfg(target_arch = "x86_64")]
use super::x86_avx512;

/// A `K × N` right operand packed into `ceil(N / NR)` panels of `[K][NR]` floats.
#[derive(Clone, Debug)]
pub struct Packed {
    pub(super) k: usize,
    pub(super) n: usize,
    /// `panels() × k × NR` floats: panel `p` holds columns `p·NR..(p + 1)·NR` as `[k][NR]`.
    pub(super) data: Vec<f32>,
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

    pub(super) fn panels(&self) -> usize {
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
        self.refill_nk_on(Isa::get(), b, n, k, ld);
    }

    /// [`Packed::refill_nk`] on the given instruction set (every set packs the same values).
    pub(crate) fn refill_nk_on(&mut self, isa: Isa, b: &[f32], n: usize, k: usize, ld: usize) {
        assert!(
            k == 0 || n == 0 || (b.len() >= (n - 1) * ld + k && ld >= k),
            "Packed::refill_nk: matrix too short"
        );
        self.reset(k, n);
        if k == 0 {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(t) = isa.avx512() {
            // 16 × 16 blocks transposed in registers
            for (p, panel) in self.data.chunks_exact_mut(k * NR).enumerate() {
                let (j0, cols) = (p * NR, NR.min(n - p * NR));
                x86_avx512::transpose_panel(t, &b[j0 * ld..], ld, cols, k, panel);
            }
            return;
        }
        #[cfg(target_arch = "aarch64")]
        if let Some(t) = isa.neon() {
            // 4 × 4 blocks transposed in registers
            for (p, panel) in self.data.chunks_exact_mut(k * NR).enumerate() {
                let (j0, cols) = (p * NR, NR.min(n - p * NR));
                aarch64_neon::transpose_panel(t, &b[j0 * ld..], ld, cols, k, panel);
            }
            return;
        }
        let _ = isa;
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
