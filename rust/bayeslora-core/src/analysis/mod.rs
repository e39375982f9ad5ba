//! Rank analysis of a trained adapter (docs/method.md §8): which rank directions did the posterior keep, and
//! do they line up with the singular directions of `ΔW = s · B diag(E z) A`?
//!
//! Everything is computed from the factors, never from the dense `d_out × d_in` product: the thin
//! SVD goes through two QR factorisations and an `r × r` core, `O((d_in + d_out) r²)`.

pub mod linalg;

use rayon::prelude::*;

use crate::error::{Error, Result};
use linalg::{
    dot, householder_qr, jacobi_svd, norm2, spearman, subspace_angles_orthonormal_b, Mat, Svd,
};

/// The factors of one adapted module, row-major as torch stores them.
#[derive(Clone, Copy, Debug)]
pub struct LowRank<'a> {
    /// `A`, `rank × d_in`.
    pub a: &'a [f64],
    /// `B`, `d_out × rank`.
    pub b: &'a [f64],
    /// `E z` per rank (1 for the gate family and for the additive means).
    pub ez: &'a [f64],
    pub rank: usize,
    pub d_in: usize,
    pub d_out: usize,
    /// `s = alpha / r0`.
    pub scale: f64,
}

impl LowRank<'_> {
    fn validate(&self) -> Result<()> {
        let want = |n: usize, m: usize, what: &str| -> Result<usize> {
            n.checked_mul(m)
                .ok_or_else(|| Error::Shape(format!("{what} of {n}x{m} is too large")))
        };
        let (r, di, dout) = (self.rank, self.d_in, self.d_out);
        if self.a.len() != want(r, di, "A")? {
            return Err(Error::Shape(format!(
                "A has {} values, expected rank x d_in = {r}x{di}",
                self.a.len()
            )));
        }
        if self.b.len() != want(dout, r, "B")? {
            return Err(Error::Shape(format!(
                "B has {} values, expected d_out x rank = {dout}x{r}",
                self.b.len()
            )));
        }
        if self.ez.len() != r {
            return Err(Error::Shape(format!(
                "E z has {} values, expected rank = {r}",
                self.ez.len()
            )));
        }
        if !self.scale.is_finite() {
            return Err(Error::Value(format!("scale is {}", self.scale)));
        }
        for (name, xs) in [("A", self.a), ("B", self.b), ("E z", self.ez)] {
            if let Some(i) = xs.iter().position(|x| !x.is_finite()) {
                return Err(Error::Value(format!(
                    "{name}[{i}] is {} (must be finite)",
                    xs[i]
                )));
            }
        }
        Ok(())
    }

    /// `Aᵀ` as a `d_in × rank` column-major matrix (its columns are the rows `a_k`).
    fn a_t(&self) -> Result<Mat> {
        Mat::from_col_major(self.d_in, self.rank, self.a.to_vec())
    }

    fn b_mat(&self) -> Result<Mat> {
        Mat::from_row_major(self.d_out, self.rank, self.b)
    }
}

/// Thin SVD of `ΔW = s · B diag(E z) A` (`d_out × d_in`) from its factors: `B = Q_B R_B`,
/// `Aᵀ = Q_A R_A` (Householder), SVD of the core `s R_B diag(E z) R_Aᵀ` (one-sided Jacobi), then
/// `U = Q_B U_c`, `V = Q_A V_c`. `U` is `d_out × p`, `V` is `d_in × p`, `p = min(rank, d_in, d_out)`.
pub fn low_rank_svd(f: &LowRank<'_>) -> Result<Svd> {
    f.validate()?;
    low_rank_svd_of(&f.b_mat()?, &f.a_t()?, f.ez, f.scale)
}

/// The factored form of ΔW: `B = Q_B R_B`, `Aᵀ = Q_A R_A`, and the SVD of the core.
struct Factored {
    q_b: Mat,
    r_b: Mat,
    q_a: Mat,
    r_a: Mat,
    core: Svd,
}

fn factorize(b: &Mat, a_t: &Mat, ez: &[f64], scale: f64) -> Result<Factored> {
    let (q_b, r_b) = householder_qr(b)?;
    let (q_a, r_a) = householder_qr(a_t)?;
    let (kb, ka) = (r_b.rows(), r_a.rows());
    // core[i, l] = s Σ_k R_B[i, k] ez_k R_A[l, k]
    let mut core = Vec::with_capacity(kb * ka);
    for l in 0..ka {
        for i in 0..kb {
            let mut acc = 0.0;
            for (k, &e) in ez.iter().enumerate() {
                acc += r_b.get(i, k) * e * r_a.get(l, k);
            }
            core.push(scale * acc);
        }
    }
    let core = Mat::from_col_major(kb, ka, core)?;
    if core.data().iter().any(|x| !x.is_finite()) {
        return Err(Error::Value(
            "ΔW overflows f64 (factors or scale too large)".into(),
        ));
    }
    let core = jacobi_svd(&core)?;
    Ok(Factored {
        q_b,
        r_b,
        q_a,
        r_a,
        core,
    })
}

fn low_rank_svd_of(b: &Mat, a_t: &Mat, ez: &[f64], scale: f64) -> Result<Svd> {
    let f = factorize(b, a_t, ez, scale)?;
    Ok(Svd {
        u: f.q_b.matmul(&f.core.u)?,
        s: f.core.s,
        v: f.q_a.matmul(&f.core.v)?,
    })
}

/// One module to analyse: its factors and, for Bayesian adapters, a relevance score per rank
/// (`log α_k` or `ℓ_k`; lower = more relevant). Without relevance (plain LoRA) the components
/// are ordered by magnitude.
#[derive(Clone, Copy, Debug)]
pub struct ModuleInput<'a> {
    pub factors: LowRank<'a>,
    pub relevance: Option<&'a [f64]>,
}

/// Everything §8 asks for, for one module. Component-indexed vectors have length `rank`;
/// singular-indexed ones `p = min(rank, d_in, d_out)`; `r_eff` is the numerical rank of ΔW.
#[derive(Clone, Debug)]
pub struct ModuleAnalysis {
    pub rank: usize,
    pub d_in: usize,
    pub d_out: usize,
    /// Singular values of ΔW, descending, length p.
    pub singular_values: Vec<f64>,
    /// Left singular vectors, `d_out × p` row-major.
    pub u: Vec<f64>,
    /// Right singular vectors, `d_in × p` row-major.
    pub v: Vec<f64>,
    /// Numerical rank of ΔW: `σ_i > σ_1 · eps · max(d_out, d_in)` (as `numpy.linalg.matrix_rank`).
    pub r_eff: usize,
    /// `c_k = s |E z_k| ‖b_k‖ ‖a_k‖`.
    pub magnitudes: Vec<f64>,
    /// Best `|cos|` of `a_k/‖a_k‖` against the first `r_eff` columns of V (NaN for a zero `a_k`
    /// or a zero ΔW), and which column it is (-1 then).
    pub cos_a: Vec<f64>,
    pub match_a: Vec<i64>,
    /// The same for `b_k/‖b_k‖` against U.
    pub cos_b: Vec<f64>,
    pub match_b: Vec<i64>,
    /// Components, most relevant first (relevance ascending; by magnitude descending without
    /// relevance). Ties keep index order.
    pub order: Vec<usize>,
    /// Components by magnitude, largest first.
    pub magnitude_order: Vec<usize>,
    /// For j = 1..=r_eff: principal angles (descending, radians) between span{a_k : k in the j
    /// first of `order`} and span V[:, :j]; `angles_u` the same for b_k and U.
    pub angles_v: Vec<Vec<f64>>,
    pub angles_u: Vec<Vec<f64>>,
    /// The same with `magnitude_order`.
    pub magnitude_angles_v: Vec<Vec<f64>>,
    pub magnitude_angles_u: Vec<Vec<f64>>,
    /// `E_j = Σ_{i≤j} σ_i² / Σ σ_i²`, j = 1..=r_eff.
    pub energy: Vec<f64>,
    /// `exp(−Σ p_i log p_i)`, `p = σ / Σσ` (0 for a zero ΔW).
    pub effective_rank: f64,
    /// `Σσ² / σ_1²` (0 for a zero ΔW).
    pub stable_rank: f64,
    /// Spearman(relevance, magnitude); NaN without relevance or when undefined.
    pub spearman: f64,
}

fn order_by(keys: &[f64], descending: bool) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..keys.len()).collect();
    idx.sort_by(|&x, &y| {
        let c = keys[x].total_cmp(&keys[y]);
        (if descending { c.reverse() } else { c }).then(x.cmp(&y))
    });
    idx
}

fn best_cos(x: &[f64], basis: &Mat, n: usize) -> (f64, i64) {
    let nx = norm2(x);
    if nx == 0.0 || n == 0 {
        return (f64::NAN, -1);
    }
    let mut best = (f64::NEG_INFINITY, -1_i64);
    for i in 0..n {
        let c = (dot(x, basis.col(i)) / nx).abs().min(1.0);
        if c > best.0 {
            best = (c, i as i64);
        }
    }
    best
}

/// Angles for j = 1..=r_eff between the first j components (in `order`) and the first j singular
/// vectors. Both are given in the coordinates of the same isometry Q (`a_k = Q R[:, k]`,
/// `V = Q V_c`), so the work is r-dimensional; `dim` is the ambient dimension (d_in or d_out).
fn angles_per_j(
    comp: &Mat,
    sing: &Mat,
    order: &[usize],
    r_eff: usize,
    dim: usize,
) -> Result<Vec<Vec<f64>>> {
    (1..=r_eff.min(order.len()))
        .map(|j| {
            subspace_angles_orthonormal_b(&comp.select_cols(&order[..j]), &sing.first_cols(j), dim)
        })
        .collect()
}

/// Analyse one module.
pub fn analyze_module(input: &ModuleInput<'_>) -> Result<ModuleAnalysis> {
    let f = &input.factors;
    f.validate()?;
    let r = f.rank;
    if let Some(rel) = input.relevance {
        if rel.len() != r {
            return Err(Error::Shape(format!(
                "relevance has {} values, expected rank = {r}",
                rel.len()
            )));
        }
        if let Some(i) = rel.iter().position(|x| x.is_nan()) {
            return Err(Error::Value(format!("relevance[{i}] is NaN")));
        }
    }
    let a_t = f.a_t()?;
    let b = f.b_mat()?;
    let fac = factorize(&b, &a_t, f.ez, f.scale)?;
    let s = &fac.core.s;
    let sigma1 = s.first().copied().unwrap_or(0.0);
    let tol = sigma1 * f64::EPSILON * (f.d_in.max(f.d_out) as f64);
    let r_eff = s.iter().filter(|&&x| x > tol).count();

    let magnitudes: Vec<f64> = (0..r)
        .map(|k| f.scale.abs() * f.ez[k].abs() * norm2(b.col(k)) * norm2(a_t.col(k)))
        .collect();
    // In Q coordinates: a_k·v_i = R_A[:, k]·V_c[:, i] and ‖a_k‖ = ‖R_A[:, k]‖.
    let (v_c, u_c) = (&fac.core.v, &fac.core.u);
    let (cos_a, match_a): (Vec<f64>, Vec<i64>) =
        (0..r).map(|k| best_cos(fac.r_a.col(k), v_c, r_eff)).unzip();
    let (cos_b, match_b): (Vec<f64>, Vec<i64>) =
        (0..r).map(|k| best_cos(fac.r_b.col(k), u_c, r_eff)).unzip();

    let magnitude_order = order_by(&magnitudes, true);
    let order = match input.relevance {
        Some(rel) => order_by(rel, false),
        None => magnitude_order.clone(),
    };
    let (di, dout) = (f.d_in, f.d_out);
    let angles_v = angles_per_j(&fac.r_a, v_c, &order, r_eff, di)?;
    let angles_u = angles_per_j(&fac.r_b, u_c, &order, r_eff, dout)?;
    let (magnitude_angles_v, magnitude_angles_u) = if input.relevance.is_some() {
        (
            angles_per_j(&fac.r_a, v_c, &magnitude_order, r_eff, di)?,
            angles_per_j(&fac.r_b, u_c, &magnitude_order, r_eff, dout)?,
        )
    } else {
        (angles_v.clone(), angles_u.clone())
    };

    let (energy, effective_rank, stable_rank) = if r_eff == 0 {
        (Vec::new(), 0.0, 0.0)
    } else {
        // Relative to σ_1 so that squares cannot overflow.
        let rel: Vec<f64> = s.iter().map(|x| x / sigma1).collect();
        let total2: f64 = rel.iter().map(|x| x * x).sum();
        let mut acc = 0.0;
        let energy = rel[..r_eff]
            .iter()
            .map(|x| {
                acc += x * x;
                (acc / total2).min(1.0)
            })
            .collect();
        let total: f64 = rel.iter().sum();
        let h: f64 = rel
            .iter()
            .map(|x| x / total)
            .filter(|&p| p > 0.0)
            .map(|p| -p * p.ln())
            .sum();
        (energy, h.exp(), total2)
    };
    let spearman = match input.relevance {
        Some(rel) if rel.iter().all(|x| x.is_finite()) => spearman(rel, &magnitudes)?,
        _ => f64::NAN,
    };
    let u = fac.q_b.matmul(&fac.core.u)?;
    let v = fac.q_a.matmul(&fac.core.v)?;
    Ok(ModuleAnalysis {
        rank: r,
        d_in: f.d_in,
        d_out: f.d_out,
        u: u.to_row_major(),
        v: v.to_row_major(),
        singular_values: fac.core.s,
        r_eff,
        magnitudes,
        cos_a,
        match_a,
        cos_b,
        match_b,
        order,
        magnitude_order,
        angles_v,
        angles_u,
        magnitude_angles_v,
        magnitude_angles_u,
        energy,
        effective_rank,
        stable_rank,
        spearman,
    })
}

/// Analyse every module, in parallel on a pool of `num_threads` threads (`None` or 0: rayon's
/// default; 1: serially on the calling thread). Results keep the input order; the first error
/// wins. The pool lives for this call only: a cached pool would not survive a `fork()` (data
/// loader workers), and building one costs far less than the analysis.
pub fn analyze_modules(
    inputs: &[ModuleInput<'_>],
    num_threads: Option<usize>,
) -> Result<Vec<ModuleAnalysis>> {
    if num_threads == Some(1) || inputs.len() <= 1 {
        return inputs.iter().map(analyze_module).collect();
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(num_threads.unwrap_or(0))
        .build()
        .map_err(|e| Error::Value(format!("cannot start a thread pool: {e}")))?;
    pool.install(|| inputs.par_iter().map(analyze_module).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lcg(seed: u64) -> impl FnMut() -> f64 {
        let mut s = seed ^ 0x9E37_79B9_7F4A_7C15;
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        }
    }

    fn randv(n: usize, seed: u64) -> Vec<f64> {
        let mut r = lcg(seed);
        (0..n).map(|_| r()).collect()
    }

    /// Dense ΔW (row-major d_out × d_in) the slow way.
    fn dense(f: &LowRank<'_>) -> Vec<f64> {
        let mut w = vec![0.0; f.d_out * f.d_in];
        for i in 0..f.d_out {
            for j in 0..f.d_in {
                w[i * f.d_in + j] = f.scale
                    * (0..f.rank)
                        .map(|k| f.b[i * f.rank + k] * f.ez[k] * f.a[k * f.d_in + j])
                        .sum::<f64>();
            }
        }
        w
    }

    fn frob(x: &[f64]) -> f64 {
        x.iter().map(|v| v * v).sum::<f64>().sqrt()
    }

    #[test]
    fn svd_reconstructs_dense_product() {
        let (r, di, dout) = (5, 11, 7);
        let a = randv(r * di, 1);
        let b = randv(dout * r, 2);
        let ez = vec![1.0, 0.5, 2.0, 1.0, 0.0];
        let f = LowRank {
            a: &a,
            b: &b,
            ez: &ez,
            rank: r,
            d_in: di,
            d_out: dout,
            scale: 2.0,
        };
        let svd = low_rank_svd(&f).expect("svd");
        let w = dense(&f);
        let us = Mat::from_row_major(dout, r, &svd.u.to_row_major()).expect("u");
        let mut rec = vec![0.0; dout * di];
        for i in 0..dout {
            for j in 0..di {
                rec[i * di + j] = (0..svd.s.len())
                    .map(|k| us.get(i, k) * svd.s[k] * svd.v.get(j, k))
                    .sum();
            }
        }
        let err: Vec<f64> = w.iter().zip(&rec).map(|(x, y)| x - y).collect();
        assert!(frob(&err) < 1e-13 * frob(&w));
        // ez_4 = 0 removes one direction
        assert!(svd.s[4] < 1e-14 * svd.s[0]);
    }

    #[test]
    fn rank_zero_module() {
        let f = LowRank {
            a: &[],
            b: &[],
            ez: &[],
            rank: 0,
            d_in: 4,
            d_out: 3,
            scale: 1.0,
        };
        let m = analyze_module(&ModuleInput {
            factors: f,
            relevance: Some(&[]),
        })
        .expect("analysis");
        assert_eq!(m.r_eff, 0);
        assert!(m.singular_values.is_empty() && m.angles_u.is_empty() && m.energy.is_empty());
        assert_eq!(m.effective_rank, 0.0);
        assert!(m.spearman.is_nan());
    }

    #[test]
    fn zero_columns_and_zero_product() {
        let (r, di, dout) = (3, 6, 5);
        let mut a = randv(r * di, 3);
        let b = vec![0.0; dout * r];
        a[..di].fill(0.0);
        let f = LowRank {
            a: &a,
            b: &b,
            ez: &[1.0; 3],
            rank: r,
            d_in: di,
            d_out: dout,
            scale: 1.0,
        };
        let m = analyze_module(&ModuleInput {
            factors: f,
            relevance: Some(&[-3.0, 1.0, 0.0]),
        })
        .expect("analysis");
        assert_eq!(m.r_eff, 0);
        assert!(m.singular_values.iter().all(|&s| s == 0.0));
        assert!(m.cos_a.iter().all(|c| c.is_nan()));
        assert_eq!(m.stable_rank, 0.0);
        // zero magnitudes everywhere: Spearman undefined
        assert!(m.spearman.is_nan());
    }

    #[test]
    fn aligned_factors_are_recognised() {
        // A's rows and B's columns orthogonal with distinct norms: the components ARE the SVD.
        let (di, dout) = (4, 3);
        let a = vec![
            0.0, 3.0, 0.0, 0.0, //
            1.0, 0.0, 0.0, 0.0, //
            0.0, 0.0, 0.0, 2.0,
        ];
        let b = vec![
            1.0, 0.0, 0.0, //
            0.0, 0.0, 1.0, //
            0.0, 1.0, 0.0,
        ];
        let f = LowRank {
            a: &a,
            b: &b,
            ez: &[1.0; 3],
            rank: 3,
            d_in: di,
            d_out: dout,
            scale: 1.0,
        };
        let m = analyze_module(&ModuleInput {
            factors: f,
            relevance: Some(&[-5.0, 0.0, -2.0]),
        })
        .expect("analysis");
        for (s, want) in m.singular_values.iter().zip([3.0, 2.0, 1.0]) {
            assert!((s - want).abs() < 1e-14);
        }
        assert_eq!(m.order, vec![0, 2, 1]);
        assert_eq!(m.match_a, vec![0, 2, 1]);
        assert!(m
            .cos_a
            .iter()
            .chain(&m.cos_b)
            .all(|c| (c - 1.0).abs() < 1e-15));
        for th in m.angles_v.iter().chain(&m.angles_u) {
            assert!(th.iter().all(|t| t.abs() < 1e-7));
        }
        assert!((m.spearman + 1.0).abs() < 1e-15);
        assert!((m.stable_rank - 14.0 / 9.0).abs() < 1e-14);
        let p = [0.5, 1.0 / 3.0, 1.0 / 6.0];
        let h: f64 = p.iter().map(|x: &f64| -x * x.ln()).sum();
        assert!((m.effective_rank - h.exp()).abs() < 1e-14);
        assert!((m.energy[0] - 9.0 / 14.0).abs() < 1e-14);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let a = [1.0, 2.0];
        let f = LowRank {
            a: &a,
            b: &[1.0],
            ez: &[1.0],
            rank: 1,
            d_in: 3,
            d_out: 1,
            scale: 1.0,
        };
        assert!(matches!(low_rank_svd(&f), Err(Error::Shape(_))));
        let f = LowRank {
            d_in: 2,
            scale: f64::NAN,
            ..f
        };
        assert!(matches!(low_rank_svd(&f), Err(Error::Value(_))));
        let f = LowRank { scale: 1.0, ..f };
        let bad = ModuleInput {
            factors: f,
            relevance: Some(&[f64::NAN]),
        };
        assert!(matches!(analyze_module(&bad), Err(Error::Value(_))));
        let bad = ModuleInput {
            factors: f,
            relevance: Some(&[1.0, 2.0]),
        };
        assert!(matches!(analyze_module(&bad), Err(Error::Shape(_))));
        let huge = LowRank {
            a: &[1e200, 1e200],
            b: &[1e200],
            ..f
        };
        assert!(matches!(low_rank_svd(&huge), Err(Error::Value(_))));
    }

    #[test]
    fn parallel_equals_serial() {
        let data: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = (0..6)
            .map(|i| (randv(4 * 9, i), randv(7 * 4, 100 + i), randv(4, 200 + i)))
            .collect();
        let inputs: Vec<ModuleInput<'_>> = data
            .iter()
            .map(|(a, b, rel)| ModuleInput {
                factors: LowRank {
                    a,
                    b,
                    ez: &[1.0; 4],
                    rank: 4,
                    d_in: 9,
                    d_out: 7,
                    scale: 0.5,
                },
                relevance: Some(rel),
            })
            .collect();
        let par = analyze_modules(&inputs, Some(2)).expect("parallel");
        for (p, i) in par.iter().zip(&inputs) {
            let s = analyze_module(i).expect("serial");
            assert_eq!(p.singular_values, s.singular_values);
            assert_eq!(p.angles_v, s.angles_v);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn singular_values_match_dense_frobenius(r in 0usize..7, di in 1usize..10,
                                                 dout in 1usize..10, seed in 0u64..500,
                                                 zero in proptest::option::of(0usize..7)) {
            let mut a = randv(r * di, seed);
            let b = randv(dout * r, seed + 1);
            if let Some(z) = zero { if z < r { a[z * di..(z + 1) * di].fill(0.0); } }
            let ez = vec![1.0; r];
            let f = LowRank { a: &a, b: &b, ez: &ez, rank: r, d_in: di, d_out: dout, scale: 1.5 };
            let svd = low_rank_svd(&f).expect("svd");
            prop_assert_eq!(svd.s.len(), r.min(di).min(dout));
            // Σσ² = ‖ΔW‖_F² and the vectors are orthonormal
            let w = dense(&f);
            let s2: f64 = svd.s.iter().map(|x| x * x).sum();
            let f2: f64 = w.iter().map(|x| x * x).sum();
            prop_assert!((s2 - f2).abs() <= 1e-12 * f2.max(1.0));
            let utu = svd.u.t_matmul(&svd.u).expect("shape");
            let eye = Mat::eye(utu.rows(), utu.cols()).expect("shape");
            prop_assert!(utu.data().iter().zip(eye.data()).all(|(x, y)| (x - y).abs() < 1e-12));
            let m = analyze_module(&ModuleInput { factors: f, relevance: None }).expect("analysis");
            prop_assert_eq!(m.angles_u.len(), m.r_eff);
            prop_assert!(m.energy.last().is_none_or(|e| (e - 1.0).abs() < 1e-12));
        }
    }
}
