//! Element-wise and row ops of a BERT encoder: LayerNorm (and add + LayerNorm), exact and
//! tanh GELU, ReLU, tanh, and the row softmax of attention.
//!
//! The portable formulas are plain loops the compiler vectorises; [`multiversion!`] compiles
//! each once more with AVX2 + FMA enabled and picks the clone from the [`Isa`]. Softmax, exact
//! GELU and (add +) LayerNorm have hand-written AVX2 versions that compute the portable numbers
//! bit for bit (`x86_avx2.rs`), AVX-512 versions of the same formulas with fused
//! multiply-adds (`x86_avx512.rs`), and NEON ones on ARM64 (`aarch64_neon.rs`). The public
//! functions run on [`Isa::get`]; the `*_on` ones take the set.

#[cfg(target_arch = "aarch64")]
use super::aarch64_neon;
use super::isa::Isa;
#[cfg(target_arch = "x86_64")]
use super::{x86_avx2, x86_avx512};

/// `fn name(isa: Isa, args…)`: the body as written, compiled twice: as it is, and with AVX2 +
/// FMA enabled (an auto-vectorised clone), run when `isa` includes AVX2.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name(isa: Isa, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            if isa.avx2().is_some() {
                // SAFETY: the AVX2 token of `isa` proves the CPU has AVX2 and FMA.
                return unsafe { avx2($($arg),*) };
            }
            let _ = isa;
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

/// In place over rows of width `gamma.len()`: `x ← (x − mean) / sqrt(var + eps) · γ + β`.
pub fn layer_norm(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    layer_norm_on(Isa::get(), x, gamma, beta, eps);
}

/// [`layer_norm`] on the given instruction set.
pub(crate) fn layer_norm_on(isa: Isa, x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    #[cfg(target_arch = "x86_64")]
    if let (Some(t), false) = (isa.avx2(), gamma.is_empty() || beta.len() < gamma.len()) {
        x86_avx2::layer_norm(t, x, None, gamma, beta, eps);
        return;
    }
    layer_norm_portable(isa, x, gamma, beta, eps);
}

multiversion! {
    /// [`layer_norm`] without the hand-written kernels.
    fn layer_norm_portable(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
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
            let inv = inv_std(var * inv_h, eps);
            for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
                *v = (*v - mean) * inv * g + b;
            }
        }
    }
}

/// `1/√(var + eps)`, or NaN when the variance overflowed f32: the row then turns NaN (and so
/// do the logits, which the encoder refuses) instead of silently becoming `beta`.
#[inline(always)]
pub(super) fn inv_std(var: f32, eps: f32) -> f32 {
    if var.is_finite() {
        1.0 / (var + eps).sqrt()
    } else {
        f32::NAN
    }
}

/// `x ← LayerNorm(x + r)` over rows (the post-LN residual of BERT).
pub fn add_layer_norm(x: &mut [f32], r: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
    add_layer_norm_on(Isa::get(), x, r, gamma, beta, eps);
}

/// [`add_layer_norm`] on the given instruction set.
pub(crate) fn add_layer_norm_on(
    isa: Isa,
    x: &mut [f32],
    r: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    assert!(r.len() >= x.len(), "add_layer_norm: residual too short");
    #[cfg(target_arch = "x86_64")]
    if let (Some(t), false) = (isa.avx512(), gamma.is_empty()) {
        x86_avx512::add_layer_norm(t, x, r, gamma, beta, eps);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if let (Some(t), false) = (isa.avx2(), gamma.is_empty() || beta.len() < gamma.len()) {
        x86_avx2::layer_norm(t, x, Some(r), gamma, beta, eps);
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if let (Some(t), false) = (isa.neon(), gamma.is_empty()) {
        aarch64_neon::add_layer_norm(t, x, r, gamma, beta, eps);
        return;
    }
    add_assign_on(isa, x, r);
    layer_norm_on(isa, x, gamma, beta, eps);
}

/// `x ← x + r`.
pub fn add_assign(x: &mut [f32], r: &[f32]) {
    add_assign_on(Isa::get(), x, r);
}

multiversion! {
    /// [`add_assign`] on the given instruction set.
    fn add_assign_on(x: &mut [f32], r: &[f32]) {
        for (a, b) in x.iter_mut().zip(r) {
            *a += b;
        }
    }
}

/// erf(x) in f32: a rational minimax approximation on [−4, 4] (as in Eigen / XLA), absolute
/// error below 5e-7; outside the range erf is ±1 in f32.
#[inline(always)]
pub(super) fn erf_f32(x: f32) -> f32 {
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
    gelu_on(Isa::get(), x);
}

/// [`gelu`] on the given instruction set.
pub(crate) fn gelu_on(isa: Isa, x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = isa.avx512() {
        x86_avx512::gelu(t, x);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = isa.avx2() {
        x86_avx2::gelu(t, x);
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if let Some(t) = isa.neon() {
        aarch64_neon::gelu(t, x);
        return;
    }
    gelu_portable(isa, x);
}

multiversion! {
    /// [`gelu`] without the hand-written kernels.
    fn gelu_portable(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = 0.5 * *v * (1.0 + erf_f32(*v * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

/// Tanh-approximated GELU in place (HF `"gelu_new"`, `"gelu_pytorch_tanh"`).
pub fn gelu_tanh(x: &mut [f32]) {
    gelu_tanh_on(Isa::get(), x);
}

multiversion! {
    /// [`gelu_tanh`] on the given instruction set.
    pub(crate) fn gelu_tanh_on(x: &mut [f32]) {
        const C: f32 = 0.797_884_6; // sqrt(2/pi)
        for v in x.iter_mut() {
            let u = C * (*v + 0.044_715 * *v * *v * *v);
            // tanh(u) = 1 − 2 / (exp(2u) + 1)
            let t = 1.0 - 2.0 / (exp_f32(2.0 * u) + 1.0);
            *v = 0.5 * *v * (1.0 + t);
        }
    }
}

/// ReLU in place.
pub fn relu(x: &mut [f32]) {
    relu_on(Isa::get(), x);
}

multiversion! {
    /// [`relu`] on the given instruction set.
    fn relu_on(x: &mut [f32]) {
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
pub(super) fn exp_f32(x_in: f32) -> f32 {
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
    softmax_rows_on(Isa::get(), x, width, scale);
}

/// [`softmax_rows`] on the given instruction set.
pub(crate) fn softmax_rows_on(isa: Isa, x: &mut [f32], width: usize, scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = isa.avx512() {
        x86_avx512::softmax_rows(t, x, width, scale);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = isa.avx2() {
        x86_avx2::softmax_rows(t, x, width, scale);
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if let Some(t) = isa.neon() {
        aarch64_neon::softmax_rows(t, x, width, scale);
        return;
    }
    softmax_portable(isa, x, width, scale);
}

multiversion! {
    /// [`softmax_rows`] without the hand-written kernels.
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
