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
//! - AVX-512 (a 12 × 32 tile over two panels) or AVX2+FMA is used when the CPU has it, detected
//!   once per process ([`Isa::get`]); otherwise a portable path with the same arithmetic
//!   (`mul_add`) runs. `BAYESLORA_ISA=avx512|avx2|portable` forces one ([`ISA_ENV`]; a set the
//!   CPU lacks is an error, never a fallback), so one machine runs every path. On ARM64 the set
//!   is NEON (a 6 × 16 tile of 4-lane registers), else portable (`BAYESLORA_ISA=neon|portable`).
//!   On the MiniLM shapes the AVX-512 kernel runs at 96–100 % of the FMA peak
//!   [`fma_peak_gflops`] measures.
//! - Softmax, exact GELU and add + LayerNorm have AVX-512 versions of the portable formulas (a
//!   row's ragged end under a lane mask, so every element of a row is computed alike); K panels
//!   are transposed 16 × 16 in registers. They, and LayerNorm, have AVX2 versions too, written
//!   operation for operation as the portable code (ragged ends under `maskload`/`maskstore`), so
//!   AVX2 and portable agree bit for bit.

//!
//! Where things are:
//! - [`isa`]: the instruction set, detected once, as a type; the tokens (`Avx2`, `Avx512`,
//!   `Neon`) that the safe entry points of the SIMD kernels require;
//! - `pack`: [`Packed`], the panel layout of the right operand;
//! - `gemm`: the driver (cache blocks, tiles, epilogues) and [`par_gemm`];
//! - `scalar`, `x86_avx2`, `x86_avx512`, `aarch64_neon`: the micro-kernels, one instruction set
//!   per file (`x86_avx2`, `x86_avx512` and `aarch64_neon` also hold their set's softmax, exact
//!   GELU, (add +) LayerNorm; `x86_avx512` and `aarch64_neon` the panel transpose; NEON is tested
//!   under qemu, not measured);
//! - `elementwise`: the portable elementwise and row ops (with compiler-made AVX2 clones);
//! - `peak`: the FMA-peak probe.

pub mod isa;

#[cfg(target_arch = "aarch64")]
mod aarch64_neon;
mod elementwise;
mod gemm;
mod pack;
mod peak;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;
#[cfg(target_arch = "x86_64")]
mod x86_avx512;

pub use elementwise::{
    add_assign, add_layer_norm, gelu, gelu_tanh, layer_norm, relu, softmax_rows, tanh,
};
pub(crate) use gemm::MB;
pub use gemm::{gemm, gemm_calls, gemm_on, par_gemm, Epilogue, MR, NR};
pub use isa::{Isa, IsaError, ISA_ENV};
pub use pack::Packed;
pub use peak::fma_peak_gflops;

#[cfg(test)]
mod tests {
    use super::elementwise::{
        add_layer_norm_on, erf_f32, exp_f32, gelu_on, gelu_tanh_on, layer_norm_on, softmax_rows_on,
    };
    use super::*;
    use crate::test_data::pseudo;

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
    fn few_rows_split_by_columns_give_the_serial_product_bit_for_bit() {
        // m ≤ MB rows with enough panels: the threads share the columns (par_gemm_columns);
        // every epilogue, ragged widths, a strided output whose padding must stay untouched,
        // and K past the K block (partial sums through the output)
        for &(m, k, n) in &[(1, 50, 100), (5, 33, 100), (37, 384, 1152), (96, 2100, 113)] {
            let a = pseudo(m * k, 6);
            let b = Packed::from_weight(&pseudo(n * k, 7), n, k);
            let bias = pseudo(n, 8);
            let ldc = n + 3;
            let old = pseudo(m * ldc, 9);
            for epi in [Epilogue::Store, Epilogue::Bias(&bias), Epilogue::Accumulate] {
                let mut want = old.clone();
                gemm(m, &a, k, &b, &mut want, ldc, epi);
                for threads in [2, 3] {
                    assert!(b.panels() >= 2 * threads && m <= 96);
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .expect("pool");
                    let mut got = old.clone();
                    pool.install(|| par_gemm(m, &a, k, &b, &mut got, ldc, epi, threads));
                    let same = want
                        .iter()
                        .zip(&got)
                        .all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{m}x{k}x{n}, {epi:?}, {threads} threads");
                }
            }
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
        // A rate, not a timing bound: a floor in GFLOP/s failed whenever other processes held the
        // cores (0.44 measured at load 13), and qemu emulates NEON at well under 1 GFLOP/s. The
        // rates themselves are benchmarks (examples/kernel_peak.rs, benches/). Positive and below
        // what any core does (10 TFLOP/s) is what the probe must return.
        if Isa::get() != Isa::Scalar {
            assert!(one > 0.0 && one < 10_000.0, "{one}");
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

    /// Every instruction set this CPU has against the scalar one: the AVX2 clones compute the
    /// portable formulas bit for bit; the AVX-512 ops match them to float rounding, on every row
    /// width (ragged ends go through lane masks).
    #[test]
    fn every_isa_matches_the_scalar_elementwise_ops() {
        let x = pseudo(4 * 1000, 11);
        let close = |isa: Isa, u: f32, v: f32, tol: f32| match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512(_) => (u - v).abs() <= tol * (1.0 + v.abs()),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon(_) => (u - v).abs() <= tol * (1.0 + v.abs()),
            _ => u.to_bits() == v.to_bits(),
        };
        for isa in Isa::available() {
            let name = isa.name();
            let mut a: Vec<f32> = x.iter().map(|v| v * 12.0).collect();
            let mut b = a.clone();
            gelu_on(isa, &mut a);
            gelu_on(Isa::Scalar, &mut b);
            for (u, v) in a.iter().zip(&b) {
                assert!(close(isa, *u, *v, 1e-6), "{name} gelu {u} vs {v}");
            }
            // ragged ends (masked or padded lanes): every element as in a full vector
            for len in [1, 2, 3, 5, 7, 9, 15, 17, 31, 33] {
                let mut a: Vec<f32> = x[..len].iter().map(|v| v * 12.0).collect();
                let mut b = a.clone();
                gelu_on(isa, &mut a);
                gelu_on(Isa::Scalar, &mut b);
                for (u, v) in a.iter().zip(&b) {
                    assert!(
                        close(isa, *u, *v, 1e-6),
                        "{name} gelu len {len}: {u} vs {v}"
                    );
                }
            }
            let mut a: Vec<f32> = x.iter().map(|v| v * 6.0).collect();
            let mut b = a.clone();
            gelu_tanh_on(isa, &mut a);
            gelu_tanh_on(Isa::Scalar, &mut b);
            assert!(a.iter().zip(&b).all(|(u, v)| u.to_bits() == v.to_bits()));
            for h in [1, 7, 16, 33, 384] {
                let gamma: Vec<f32> = x[..h].iter().map(|v| 1.0 + v).collect();
                let beta: Vec<f32> = x[h..2 * h].to_vec();
                let res: Vec<f32> = x[..3 * h].iter().rev().map(|v| v * 3.0).collect();
                let mut a: Vec<f32> = x[..3 * h].iter().map(|v| v * 5.0 + 0.3).collect();
                let mut b = a.clone();
                let mut c = a.clone();
                add_layer_norm_on(isa, &mut a, &res, &gamma, &beta, 1e-12);
                add_layer_norm_on(Isa::Scalar, &mut b, &res, &gamma, &beta, 1e-12);
                for (u, v) in a.iter().zip(&b) {
                    assert!(
                        close(isa, *u, *v, 1e-5),
                        "{name} add + LN h={h}: {u} vs {v}"
                    );
                }
                let mut d = c.clone();
                layer_norm_on(isa, &mut c, &gamma, &beta, 1e-12);
                layer_norm_on(Isa::Scalar, &mut d, &gamma, &beta, 1e-12);
                assert_eq!(c, d, "{name} layer norm h={h}");
            }
            for width in 1..70 {
                let mut a: Vec<f32> = x[..3 * width].iter().map(|v| v * 40.0).collect();
                a[width / 2] = -1e30;
                let mut b = a.clone();
                softmax_rows_on(isa, &mut a, width, 0.17);
                softmax_rows_on(Isa::Scalar, &mut b, width, 0.17);
                for (u, v) in a.iter().zip(&b) {
                    assert!(
                        close(isa, *u, *v, 1e-6),
                        "{name} softmax {width}: {u} vs {v}"
                    );
                }
                for row in a.chunks(width) {
                    assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
                }
            }
        }
    }

    /// Every instruction set's GEMM against the scalar one, bit for bit, on ragged shapes: rows
    /// that are not a multiple of any tile height, columns that leave a panel pair, a single
    /// panel and a partial panel, K above the K block; all three epilogues.
    #[test]
    fn every_isa_computes_the_scalar_gemm_bit_for_bit() {
        // every ARM64 CPU Linux runs on has NEON (qemu-aarch64 too): without it these tests
        // would compare the portable path with itself
        #[cfg(target_arch = "aarch64")]
        assert!(
            Isa::available().iter().any(|i| i.neon().is_some()),
            "no NEON on this ARM64 CPU"
        );
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 3, 15),
            (13, 17, 47),
            (25, 64, 49),
            (97, 40, 80),
            (7, 2100, 33),
        ] {
            let a = pseudo(m * k, 21);
            let w = pseudo(n * k, 22);
            let bias = pseudo(n, 23);
            let old = pseudo(m * n, 24);
            let b = Packed::from_weight(&w, n, k);
            for epi in [Epilogue::Store, Epilogue::Bias(&bias), Epilogue::Accumulate] {
                let mut want = old.clone();
                gemm_on(Isa::Scalar, m, &a, k, &b, &mut want, n, epi);
                for isa in Isa::available() {
                    let mut got = old.clone();
                    gemm_on(isa, m, &a, k, &b, &mut got, n, epi);
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(u, v)| u.to_bits() == v.to_bits()),
                        "{} {m}x{k}x{n} {epi:?}",
                        isa.name()
                    );
                }
            }
            // packing a transpose is a copy on every set
            for isa in Isa::available() {
                let mut p = Packed::empty();
                p.refill_nk_on(isa, &w, n, k, k);
                assert_eq!(p.data, b.data, "{} pack {n}x{k}", isa.name());
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

    /// Every vector length and row width, ragged ends included (a masked tail of 1 to 7 lanes on
    /// AVX2, 1 to 15 on AVX-512), values from tiny to past the clamps of exp and erf: the AVX2
    /// kernels give the portable numbers bit for bit, the AVX-512 and NEON ones within a few ulp.
    mod ragged {
        use super::super::elementwise::{
            add_layer_norm_on, gelu_on, layer_norm_on, softmax_rows_on,
        };
        use super::super::Isa;
        use crate::test_data::pseudo;
        use proptest::prelude::*;

        fn same(isa: Isa, got: &[f32], want: &[f32], tol: f32) -> bool {
            got.iter().zip(want).all(|(u, v)| match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512(_) => (u - v).abs() <= tol * (1.0 + v.abs()),
                // NEON runs AVX-512's fused formulas, 4 lanes at a time
                #[cfg(target_arch = "aarch64")]
                Isa::Neon(_) => (u - v).abs() <= tol * (1.0 + v.abs()),
                _ => u.to_bits() == v.to_bits(),
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(96))]

            #[test]
            fn gelu_of_any_length(len in 0usize..80, seed in 0u64..1000, mag in 0.01f32..20.0) {
                let x: Vec<f32> = pseudo(len, seed).iter().map(|v| v * mag).collect();
                let mut want = x.clone();
                gelu_on(Isa::Scalar, &mut want);
                for isa in Isa::available() {
                    let mut got = x.clone();
                    gelu_on(isa, &mut got);
                    // AVX-512's fused ½x·erf + ½x differs from ½x·(1 + erf) by up to about 1e-6 where
                    // 1 + erf cancels (x near −4); the AVX2 kernel is the portable formula
                    prop_assert!(same(isa, &got, &want, 4e-6), "{} len {len}", isa.name());
                }
            }

            #[test]
            fn softmax_of_any_width(
                width in 1usize..90,
                rows in 1usize..4,
                seed in 0u64..1000,
                mag in 0.1f32..400.0,
                scale in 0.01f32..2.0,
            ) {
                let x: Vec<f32> = pseudo(width * rows, seed).iter().map(|v| v * mag).collect();
                let mut want = x.clone();
                softmax_rows_on(Isa::Scalar, &mut want, width, scale);
                for isa in Isa::available() {
                    let mut got = x.clone();
                    softmax_rows_on(isa, &mut got, width, scale);
                    prop_assert!(
                        same(isa, &got, &want, 1e-6),
                        "{} width {width} rows {rows}",
                        isa.name()
                    );
                }
            }

            #[test]
            fn layer_norms_of_any_width(
                h in 1usize..90,
                rows in 1usize..4,
                seed in 0u64..1000,
                mag in 0.01f32..50.0,
            ) {
                let x: Vec<f32> = pseudo(h * rows, seed).iter().map(|v| v * mag + 0.3).collect();
                let res: Vec<f32> = pseudo(h * rows, seed + 1).iter().map(|v| v * mag).collect();
                let gamma: Vec<f32> = pseudo(h, seed + 2).iter().map(|v| 1.0 + v).collect();
                let beta = pseudo(h, seed + 3);
                let mut want = x.clone();
                add_layer_norm_on(Isa::Scalar, &mut want, &res, &gamma, &beta, 1e-12);
                let mut want_plain = x.clone();
                layer_norm_on(Isa::Scalar, &mut want_plain, &gamma, &beta, 1e-12);
                for isa in Isa::available() {
                    let mut got = x.clone();
                    add_layer_norm_on(isa, &mut got, &res, &gamma, &beta, 1e-12);
                    prop_assert!(same(isa, &got, &want, 1e-5), "{} add + LN h {h}", isa.name());
                    let mut got = x.clone();
                    layer_norm_on(isa, &mut got, &gamma, &beta, 1e-12);
                    prop_assert_eq!(&got, &want_plain, "{} LN h {}", isa.name(), h);
                }
            }
        }
    }
}
