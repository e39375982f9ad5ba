//! Tests of the linear algebra: reconstructions, orthonormality, known subspaces and ranks, and
//! properties (proptest) of the SVD and the principal angles.

use super::*;
use proptest::prelude::*;

fn lcg(seed: u64) -> impl FnMut() -> f64 {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        // uniform in [-1, 1)
        ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }
}

fn random(rows: usize, cols: usize, seed: u64) -> Mat {
    let mut r = lcg(seed);
    Mat::from_col_major(rows, cols, (0..rows * cols).map(|_| r()).collect()).expect("shape")
}

fn max_abs_diff(a: &Mat, b: &Mat) -> f64 {
    a.data
        .iter()
        .zip(&b.data)
        .fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

fn orthonormality_error(q: &Mat) -> f64 {
    let g = q.t_matmul(q).expect("shape");
    let eye = Mat::eye(q.cols, q.cols).expect("shape");
    max_abs_diff(&g, &eye)
}

fn reconstruct(svd: &Svd) -> Mat {
    let mut us = svd.u.clone();
    for (j, s) in svd.s.iter().enumerate() {
        us.col_mut(j).iter_mut().for_each(|x| *x *= s);
    }
    us.matmul(&svd.v.transpose()).expect("shape")
}

#[test]
fn qr_reconstructs_and_is_orthonormal() {
    for (m, n) in [(7, 3), (3, 7), (5, 5), (1, 4), (4, 1)] {
        let a = random(m, n, (m * 31 + n) as u64);
        let (q, r) = householder_qr(&a).expect("qr");
        assert!(orthonormality_error(&q) < 1e-14);
        assert!(max_abs_diff(&q.matmul(&r).expect("shape"), &a) < 1e-14);
        for c in 0..r.cols {
            for i in c + 1..r.rows {
                assert_eq!(r.get(i, c), 0.0);
            }
        }
    }
}

#[test]
fn qr_of_zero_columns() {
    let mut a = random(6, 4, 3);
    a.col_mut(1).fill(0.0);
    a.col_mut(3).fill(0.0);
    let (q, r) = householder_qr(&a).expect("qr");
    assert!(orthonormality_error(&q) < 1e-14);
    assert!(max_abs_diff(&q.matmul(&r).expect("shape"), &a) < 1e-14);
    let z = Mat::zeros(5, 3).expect("shape");
    let (q, r) = householder_qr(&z).expect("qr");
    assert!(orthonormality_error(&q) < 1e-15);
    assert!(r.data.iter().all(|&x| x == 0.0));
}

#[test]
fn svd_of_diagonal_is_sorted() {
    let a =
        Mat::from_row_major(3, 3, &[1.0, 0.0, 0.0, 0.0, -5.0, 0.0, 0.0, 0.0, 3.0]).expect("shape");
    let svd = jacobi_svd(&a).expect("svd");
    assert_eq!(svd.s, vec![5.0, 3.0, 1.0]);
    assert!(max_abs_diff(&reconstruct(&svd), &a) < 1e-15);
}

#[test]
fn svd_completes_u_for_zero_singular_values() {
    let mut a = random(5, 3, 9);
    a.col_mut(2).fill(0.0);
    a.col_mut(0).fill(0.0);
    let svd = jacobi_svd(&a).expect("svd");
    assert_eq!(svd.s[1], 0.0);
    assert_eq!(svd.s[2], 0.0);
    assert!(orthonormality_error(&svd.u) < 1e-14);
    assert!(orthonormality_error(&svd.v) < 1e-14);
    assert!(max_abs_diff(&reconstruct(&svd), &a) < 1e-15);
}

#[test]
fn square_rank_deficient_has_tiny_singular_value() {
    // last column = first + half the second: rank n − 1; the smallest σ must be at rounding
    // level of the whole matrix, not the raw norm of a column Jacobi left alone.
    for seed in 0..50 {
        let n = 3 + (seed as usize % 8);
        let mut a = random(n, n, seed);
        let (c0, c1) = (a.col(0).to_vec(), a.col(1).to_vec());
        for (i, x) in a.col_mut(n - 1).iter_mut().enumerate() {
            *x = c0[i] + 0.5 * c1[i];
        }
        let s = thin_svd(&a).expect("svd").s;
        assert!(
            s[n - 1] <= f64::EPSILON * s[0],
            "seed {seed}: {:e}",
            s[n - 1] / s[0]
        );
        assert_eq!(orth(&a).expect("orth").cols(), n - 1);
    }
}

#[test]
fn svd_rejects_non_finite() {
    let a = Mat::from_col_major(1, 2, vec![1.0, f64::NAN]).expect("shape");
    assert!(matches!(jacobi_svd(&a), Err(Error::Value(_))));
}

#[test]
fn graded_matrix_small_singular_values_are_relatively_accurate() {
    // diag(1, 1e-8, 1e-16) rotated on both sides by exact permutations/sign flips.
    let a = Mat::from_row_major(3, 3, &[0.0, 1e-8, 0.0, 0.0, 0.0, -1e-16, 1.0, 0.0, 0.0])
        .expect("shape");
    let s = jacobi_svd(&a).expect("svd").s;
    assert_eq!(s, vec![1.0, 1e-8, 1e-16]);
}

#[test]
fn angles_of_known_subspaces() {
    // span{e0} vs span{(cos t, sin t)}: one angle t.
    let t = 0.3_f64;
    let a = Mat::from_col_major(3, 1, vec![1.0, 0.0, 0.0]).expect("shape");
    let b = Mat::from_col_major(3, 1, vec![t.cos(), t.sin(), 0.0]).expect("shape");
    let th = subspace_angles(&a, &b).expect("angles");
    assert!((th[0] - t).abs() < 1e-15);
    // orthogonal planes
    let a = Mat::from_col_major(4, 2, vec![1., 0., 0., 0., 0., 1., 0., 0.]).expect("shape");
    let b = Mat::from_col_major(4, 2, vec![0., 0., 1., 0., 0., 0., 0., 1.]).expect("shape");
    let th = subspace_angles(&a, &b).expect("angles");
    assert!(th
        .iter()
        .all(|x| (x - std::f64::consts::FRAC_PI_2).abs() < 1e-15));
    // a zero matrix has an empty column space
    let z = Mat::zeros(4, 2).expect("shape");
    assert!(subspace_angles(&a, &z).expect("angles").is_empty());
    assert!(matches!(
        subspace_angles(&a, &Mat::zeros(3, 1).expect("shape")),
        Err(Error::Shape(_))
    ));
}

#[test]
fn ranks_and_spearman() {
    assert_eq!(
        average_ranks(&[3.0, 1.0, 3.0, 2.0]),
        vec![3.5, 1.0, 3.5, 2.0]
    );
    let s = spearman(&[1.0, 2.0, 3.0], &[30.0, 20.0, 10.0]).expect("ok");
    assert!((s + 1.0).abs() < 1e-15);
    assert!(spearman(&[1.0, 1.0], &[1.0, 2.0]).expect("ok").is_nan());
    assert!(spearman(&[1.0], &[1.0, 2.0]).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn angles_in_isometric_coordinates(m in 6usize..20, r in 1usize..6, j in 1usize..6,
                                       seed in 0u64..1000) {
        // x, y in R^r; Q: m × r orthonormal. angles(Qx, Qy) == angles_in(x, y, m).
        let r = r.min(m);
        let (q, _) = householder_qr(&random(m, r, seed)).expect("qr");
        let x = random(r, j.min(r), seed + 1);
        let y = random(r, r, seed + 2).first_cols(j.min(r));
        let full = subspace_angles(&q.matmul(&x).expect("x"), &q.matmul(&y).expect("y"))
            .expect("angles");
        let reduced = subspace_angles_in(&x, &y, m).expect("angles");
        prop_assert_eq!(full.len(), reduced.len());
        for (a, b) in full.iter().zip(&reduced) {
            prop_assert!((a - b).abs() < 1e-7);
        }
    }

    #[test]
    fn thin_svd_reconstructs(m in 1usize..12, n in 1usize..12, seed in 0u64..1000,
                             zero_col in proptest::option::of(0usize..12),
                             log_scale in -6i32..6) {
        let mut a = random(m, n, seed);
        if let Some(z) = zero_col { if z < n { a.col_mut(z).fill(0.0); } }
        let scale = 10f64.powi(log_scale);
        a.data.iter_mut().for_each(|x| *x *= scale);
        let svd = thin_svd(&a).expect("svd");
        prop_assert_eq!(svd.s.len(), m.min(n));
        prop_assert!(svd.s.windows(2).all(|w| w[0] >= w[1]));
        prop_assert!(orthonormality_error(&svd.u) < 1e-12);
        prop_assert!(orthonormality_error(&svd.v) < 1e-12);
        prop_assert!(max_abs_diff(&reconstruct(&svd), &a) < 1e-13 * scale * (m.max(n) as f64));
    }

    #[test]
    fn angles_are_symmetric_and_bounded(m in 2usize..10, n in 1usize..5, k in 1usize..5,
                                        seed in 0u64..1000) {
        let a = random(m, n.min(m), seed);
        let b = random(m, k.min(m), seed + 7);
        let t1 = subspace_angles(&a, &b).expect("angles");
        let t2 = subspace_angles(&b, &a).expect("angles");
        prop_assert_eq!(t1.len(), n.min(k).min(m));
        // scipy pairs its σ² ≥ ½ mask with the angles in opposite orders, so an angle near 0
        // can come from arccos (error ~sqrt(eps)); we reproduce that, hence 1e-7 here.
        for (x, y) in t1.iter().zip(&t2) {
            prop_assert!((x - y).abs() < 1e-7);
            prop_assert!((0.0..=std::f64::consts::FRAC_PI_2 + 1e-12).contains(x));
        }
        // a subspace against itself: all angles ~0
        let t0 = subspace_angles(&a, &a).expect("angles");
        prop_assert!(t0.iter().all(|x| x.abs() < 1e-7));
    }
}
