//! The FMA-peak probe: what this machine's cores can at best execute, measured, so that
//! benchmarks can report a kernel's speed as a share of it. The chains of both vector widths
//! live here beside their shared macro (a measurement, not a kernel).

use super::isa::Isa;
use crate::error::{Error, Result};

/// The f32 FMA peak of this machine in GFLOP/s, measured: `threads` OS threads at once, each
/// running independent fused multiply-add chains (12 accumulators, more than FMA latency ×
/// FMA units) of the widest vectors the kernels use (AVX-512, else AVX2; NEON on ARM64) for
/// about `seconds`. The sum over the threads is returned; 0 on the portable set; an
/// error for `seconds` ≤ 0 (at most 60 are run), no threads, threads the OS will not start, or
/// an unusable `BAYESLORA_ISA` (the set it forces is the one measured).
/// It is what a matrix kernel could at best execute at the clock the cores run now, which
/// the nominal clock in `/proc/cpuinfo` does not tell (cores boost).
pub fn fma_peak_gflops(seconds: f64, threads: usize) -> Result<f64> {
    if !(seconds.is_finite() && seconds > 0.0) || threads == 0 {
        return Err(Error::Value(format!(
            "seconds must be > 0 and threads >= 1, got {seconds} and {threads}"
        )));
    }
    Isa::selected()?;
    let seconds = seconds.min(60.0);
    std::thread::scope(|scope| {
        let mut runs = Vec::with_capacity(threads);
        for _ in 0..threads {
            let run = std::thread::Builder::new()
                .spawn_scoped(scope, move || fma_chains(seconds))
                .map_err(|e| Error::Value(format!("cannot start {threads} threads: {e}")))?;
            runs.push(run);
        }
        Ok(runs.into_iter().map(|r| r.join().unwrap_or(0.0)).sum())
    })
}

/// One thread of [`fma_peak_gflops`].
fn fma_chains(seconds: f64) -> f64 {
    let isa = Isa::get();
    if isa == Isa::Scalar {
        return 0.0;
    }
    let start = std::time::Instant::now();
    let mut flops = 0.0f64;
    let mut sink = 0.0f32;
    while start.elapsed().as_secs_f64() < seconds {
        let (f, s) = match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512(t) => chains::avx512(t, 1 << 16),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2(t) => chains::avx2(t, 1 << 16),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon(t) => super::aarch64_neon::fma_chains(t, 1 << 16),
            Isa::Scalar => (0.0, 0.0),
        };
        flops += f;
        sink += s;
    }
    std::hint::black_box(sink);
    flops / start.elapsed().as_secs_f64() / 1e9
}

#[cfg(target_arch = "x86_64")]
mod chains {
    use crate::kernels::isa::{Avx2, Avx512};
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
    pub(super) fn avx512(_: Avx512, iters: usize) -> (f64, f32) {
        #[target_feature(enable = "avx512f")]
        fn run(iters: usize) -> f32 {
            chains!(_mm512_set1_ps, _mm512_fmadd_ps, _mm512_reduce_add_ps, iters)
        }
        // SAFETY: the token proves AVX-512F.
        let s = unsafe { run(iters) };
        ((iters * 12 * 16 * 2) as f64, s)
    }

    /// `iters` rounds of 12 independent 8-lane FMAs.
    pub(super) fn avx2(_: Avx2, iters: usize) -> (f64, f32) {
        #[target_feature(enable = "avx2,fma")]
        fn run(iters: usize) -> f32 {
            let first = |v: __m256| _mm_cvtss_f32(_mm256_castps256_ps128(v));
            chains!(_mm256_set1_ps, _mm256_fmadd_ps, first, iters)
        }
        // SAFETY: the token proves AVX2 and FMA.
        let s = unsafe { run(iters) };
        ((iters * 12 * 8 * 2) as f64, s)
    }
}
