//! Small dense linear algebra in f64 for the rank analysis (docs/method.md §8): Householder QR, one-sided
//! Jacobi SVD, `orth`, principal angles between subspaces, Spearman correlation.
//!
//! The matrices here are thin (d × r with r ≤ a few dozen), so plain loops over contiguous columns
//! are fast enough and keep the numerics transparent. Storage is column-major: a column is a slice.

use crate::error::{Error, Result};

/// A dense column-major f64 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Mat {
    rows: usize,
    cols: usize,
    data: Vec<f64>,
}

impl Mat {
    /// An all-zero `rows × cols` matrix.
    pub fn zeros(rows: usize, cols: usize) -> Result<Self> {
        let n = checked_len(rows, cols)?;
        Ok(Self {
            rows,
            cols,
            data: vec![0.0; n],
        })
    }

    /// The first `cols` columns of the `rows × rows` identity (`cols ≤ rows`).
    pub fn eye(rows: usize, cols: usize) -> Result<Self> {
        let mut m = Self::zeros(rows, cols)?;
        for j in 0..cols.min(rows) {
            m.data[j * rows + j] = 1.0;
        }
        Ok(m)
    }

    /// From column-major data.
    pub fn from_col_major(rows: usize, cols: usize, data: Vec<f64>) -> Result<Self> {
        if checked_len(rows, cols)? != data.len() {
            return Err(Error::Shape(format!(
                "{} values cannot fill a {rows}x{cols} matrix",
                data.len()
            )));
        }
        Ok(Self { rows, cols, data })
    }

    /// From row-major data (numpy's C order).
    pub fn from_row_major(rows: usize, cols: usize, data: &[f64]) -> Result<Self> {
        if checked_len(rows, cols)? != data.len() {
            return Err(Error::Shape(format!(
                "{} values cannot fill a {rows}x{cols} matrix",
                data.len()
            )));
        }
        let mut m = Self::zeros(rows, cols)?;
        for i in 0..rows {
            for j in 0..cols {
                m.data[j * rows + i] = data[i * cols + j];
            }
        }
        Ok(m)
    }

    /// Row-major copy of the data (numpy's C order).
    pub fn to_row_major(&self) -> Vec<f64> {
        let mut out = vec![0.0; self.data.len()];
        for j in 0..self.cols {
            for i in 0..self.rows {
                out[i * self.cols + j] = self.data[j * self.rows + i];
            }
        }
        out
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Column-major data.
    pub fn data(&self) -> &[f64] {
        &self.data
    }

    pub fn get(&self, i: usize, j: usize) -> f64 {
        self.data[j * self.rows + i]
    }

    pub fn col(&self, j: usize) -> &[f64] {
        &self.data[j * self.rows..(j + 1) * self.rows]
    }

    pub fn col_mut(&mut self, j: usize) -> &mut [f64] {
        &mut self.data[j * self.rows..(j + 1) * self.rows]
    }

    /// Two distinct columns, both mutable (`i != j`).
    fn col_pair_mut(&mut self, i: usize, j: usize) -> (&mut [f64], &mut [f64]) {
        debug_assert!(i < j);
        let r = self.rows;
        let (lo, hi) = self.data.split_at_mut(j * r);
        (&mut lo[i * r..(i + 1) * r], &mut hi[..r])
    }

    /// The first `k` columns.
    pub fn first_cols(&self, k: usize) -> Self {
        let k = k.min(self.cols);
        Self {
            rows: self.rows,
            cols: k,
            data: self.data[..k * self.rows].to_vec(),
        }
    }

    /// The columns listed in `idx`, in that order (indices must be `< cols`).
    pub fn select_cols(&self, idx: &[usize]) -> Self {
        let mut data = Vec::with_capacity(idx.len() * self.rows);
        for &j in idx {
            data.extend_from_slice(self.col(j));
        }
        Self {
            rows: self.rows,
            cols: idx.len(),
            data,
        }
    }

    pub fn transpose(&self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            data: self.to_row_major(),
        }
    }

    /// `self · other`.
    pub fn matmul(&self, other: &Self) -> Result<Self> {
        if self.cols != other.rows {
            return Err(Error::Shape(format!(
                "cannot multiply {}x{} by {}x{}",
                self.rows, self.cols, other.rows, other.cols
            )));
        }
        let mut out = Self::zeros(self.rows, other.cols)?;
        for j in 0..other.cols {
            let oc = other.col(j);
            let dst = &mut out.data[j * self.rows..(j + 1) * self.rows];
            for (l, &w) in oc.iter().enumerate() {
                if w != 0.0 {
                    axpy(w, self.col(l), dst);
                }
            }
        }
        Ok(out)
    }

    /// `selfᵀ · other`.
    pub fn t_matmul(&self, other: &Self) -> Result<Self> {
        if self.rows != other.rows {
            return Err(Error::Shape(format!(
                "cannot multiply ({}x{})ᵀ by {}x{}",
                self.rows, self.cols, other.rows, other.cols
            )));
        }
        let mut out = Self::zeros(self.cols, other.cols)?;
        for j in 0..other.cols {
            for i in 0..self.cols {
                out.data[j * self.cols + i] = dot(self.col(i), other.col(j));
            }
        }
        Ok(out)
    }
}

fn checked_len(rows: usize, cols: usize) -> Result<usize> {
    rows.checked_mul(cols)
        .filter(|&n| n <= isize::MAX as usize / std::mem::size_of::<f64>())
        .ok_or_else(|| Error::Shape(format!("a {rows}x{cols} matrix is too large")))
}

/// Dot product with four independent accumulators (vectorises; the order of the additions is
/// fixed, so results are deterministic).
pub(crate) fn dot(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    let mut acc = [0.0_f64; 4];
    let mut xc = x.chunks_exact(4);
    let mut yc = y.chunks_exact(4);
    for (a, b) in (&mut xc).zip(&mut yc) {
        acc[0] += a[0] * b[0];
        acc[1] += a[1] * b[1];
        acc[2] += a[2] * b[2];
        acc[3] += a[3] * b[3];
    }
    let tail: f64 = xc
        .remainder()
        .iter()
        .zip(yc.remainder())
        .map(|(a, b)| a * b)
        .sum();
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

fn axpy(w: f64, x: &[f64], y: &mut [f64]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += w * xi;
    }
}

/// Euclidean norm without overflow or underflow for any finite input (scaled sum of squares).
pub fn norm2(x: &[f64]) -> f64 {
    let amax = x.iter().fold(0.0_f64, |m, v| m.max(v.abs()));
    if amax == 0.0 || !amax.is_finite() {
        return amax;
    }
    // Squares of values in this range cannot overflow or lose everything to underflow.
    if (1e-100..=1e100).contains(&amax) {
        return dot(x, x).sqrt();
    }
    let s: f64 = x.iter().map(|v| (v / amax) * (v / amax)).sum();
    amax * s.sqrt()
}

/// Thin QR factorisation `A = Q R` of an `m × n` matrix: `Q` is `m × k` with orthonormal
/// columns, `R` is `k × n` upper triangular, `k = min(m, n)`. Householder reflections, no
/// pivoting: rank-deficient inputs are fine (R gets zeros on its diagonal, Q stays orthonormal).
pub fn householder_qr(a: &Mat) -> Result<(Mat, Mat)> {
    let (m, n) = (a.rows, a.cols);
    let k = m.min(n);
    let mut w = a.clone();
    // Unit Householder vectors v_j (length m − j); H_j = I − 2 v_j v_jᵀ. Empty = identity.
    let mut vs: Vec<Vec<f64>> = Vec::with_capacity(k);
    for j in 0..k {
        let x = &w.col(j)[j..];
        let nx = norm2(x);
        if nx == 0.0 {
            vs.push(Vec::new());
            continue;
        }
        let alpha = if x[0] >= 0.0 { -nx } else { nx };
        let mut v = x.to_vec();
        v[0] -= alpha;
        let nv = norm2(&v);
        if nv == 0.0 {
            vs.push(Vec::new());
            continue;
        }
        for vi in v.iter_mut() {
            *vi /= nv;
        }
        for c in j + 1..n {
            let col = &mut w.col_mut(c)[j..];
            let t = 2.0 * dot(&v, col);
            axpy(-t, &v, col);
        }
        let col = &mut w.col_mut(j)[j..];
        col[0] = alpha;
        col[1..].fill(0.0);
        vs.push(v);
    }
    let mut r = Mat::zeros(k, n)?;
    if k > 0 {
        for c in 0..n {
            for i in 0..=c.min(k - 1) {
                r.data[c * k + i] = w.get(i, c);
            }
        }
    }
    // Q = H_0 H_1 … H_{k−1} I[:, :k], applied right to left.
    let mut q = Mat::eye(m, k)?;
    for j in (0..k).rev() {
        let v = &vs[j];
        if v.is_empty() {
            continue;
        }
        for c in 0..k {
            let col = &mut q.col_mut(c)[j..];
            let t = 2.0 * dot(v, col);
            if t != 0.0 {
                axpy(-t, v, col);
            }
        }
    }
    Ok((q, r))
}

/// A thin singular value decomposition `A = U diag(s) Vᵀ`, `s` descending, `p = min(m, n)`.
#[derive(Clone, Debug)]
pub struct Svd {
    /// `m × p`, orthonormal columns.
    pub u: Mat,
    /// `p` singular values, descending, ≥ 0.
    pub s: Vec<f64>,
    /// `n × p`, orthonormal columns.
    pub v: Mat,
}

const MAX_SWEEPS: usize = 80;

/// One-sided (Hestenes) Jacobi SVD of a small matrix. Accurate to high relative precision in
/// every singular value; columns of `U` for zero singular values are completed to an orthonormal
/// set. Use [`thin_svd`] for tall matrices (it reduces them by QR first).
pub fn jacobi_svd(a: &Mat) -> Result<Svd> {
    if a.data.iter().any(|x| !x.is_finite()) {
        return Err(Error::Value("SVD input has a non-finite entry".into()));
    }
    if a.rows < a.cols {
        let t = jacobi_svd(&a.transpose())?;
        return Ok(Svd {
            u: t.v,
            s: t.s,
            v: t.u,
        });
    }
    let (m, n) = (a.rows, a.cols);
    // Scale to unit max-abs so that squared norms neither overflow nor underflow.
    let amax = a.data.iter().fold(0.0_f64, |mx, v| mx.max(v.abs()));
    let mut g = a.clone();
    if amax > 0.0 {
        g.data.iter_mut().for_each(|x| *x /= amax);
    }
    let mut v = Mat::eye(n, n)?;
    let tol = f64::EPSILON * (m.max(1) as f64);
    // A column whose norm is at the rounding level of the whole matrix is numerically zero: its
    // direction is noise, so rotating against it never converges. Leave it alone (its σ is
    // reported as is, ≤ this level, and its U column is completed orthonormally).
    let negligible = tol * norm2(&g.data);
    let mut converged = n < 2;
    for _ in 0..MAX_SWEEPS {
        let mut rotated = false;
        for i in 0..n {
            for j in i + 1..n {
                let (gi, gj) = g.col_pair_mut(i, j);
                let alpha = dot(gi, gi);
                let beta = dot(gj, gj);
                let gamma = dot(gi, gj);
                if alpha.sqrt() <= negligible || beta.sqrt() <= negligible {
                    continue;
                }
                if gamma == 0.0 || gamma.abs() <= tol * alpha.sqrt() * beta.sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = if zeta.abs() > 1e150 {
                    0.5 / zeta
                } else {
                    zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt())
                };
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                rotate(gi, gj, c, s);
                let (vi, vj) = v.col_pair_mut(i, j);
                rotate(vi, vj, c, s);
            }
        }
        if !rotated {
            converged = true;
            break;
        }
    }
    if !converged {
        return Err(Error::Value(format!(
            "Jacobi SVD of a {m}x{n} matrix did not converge in {MAX_SWEEPS} sweeps"
        )));
    }
    let mut norms: Vec<f64> = (0..n).map(|j| norm2(g.col(j))).collect();
    // A skipped (negligible) column still holds its components along the others — exactly what
    // the skipped rotations would have moved out. Its singular value is the norm of what is left
    // after projecting them away (absolute accuracy ~eps·‖A‖, as LAPACK's), not its raw norm,
    // which can be orders of magnitude larger and would flip rank decisions.
    let big: Vec<usize> = (0..n).filter(|&j| norms[j] > negligible).collect();
    for j in 0..n {
        if norms[j] > negligible || norms[j] == 0.0 {
            continue;
        }
        let mut x = g.col(j).to_vec();
        for _ in 0..2 {
            for &i in &big {
                let gi = g.col(i);
                let t = dot(gi, &x) / (norms[i] * norms[i]);
                axpy(-t, gi, &mut x);
            }
        }
        norms[j] = norm2(&x);
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| norms[y].total_cmp(&norms[x]).then(x.cmp(&y)));
    let mut u = Mat::zeros(m, n)?;
    let mut vv = Mat::zeros(n, n)?;
    let mut s = Vec::with_capacity(n);
    let mut missing = Vec::new();
    for (dst, &src) in order.iter().enumerate() {
        let sigma = norms[src];
        s.push(sigma * amax);
        vv.col_mut(dst).copy_from_slice(v.col(src));
        if sigma > negligible {
            for (o, x) in u.col_mut(dst).iter_mut().zip(g.col(src)) {
                *o = x / sigma;
            }
        } else {
            missing.push(dst);
        }
    }
    complete_orthonormal(&mut u, &missing);
    Ok(Svd { u, s, v: vv })
}

fn rotate(x: &mut [f64], y: &mut [f64], c: f64, s: f64) {
    for (a, b) in x.iter_mut().zip(y.iter_mut()) {
        let (xa, yb) = (*a, *b);
        *a = c * xa - s * yb;
        *b = s * xa + c * yb;
    }
}

/// Fill the listed columns of `u` with unit vectors orthogonal to every other column (Gram–Schmidt
/// twice over the standard basis). Needs `u.cols ≤ u.rows`, which the callers guarantee.
fn complete_orthonormal(u: &mut Mat, missing: &[usize]) {
    if missing.is_empty() {
        return;
    }
    let m = u.rows;
    let mut filled: Vec<bool> = vec![true; u.cols];
    for &j in missing {
        filled[j] = false;
    }
    for &j in missing {
        let mut best: Option<Vec<f64>> = None;
        for e in 0..m {
            let mut x = vec![0.0; m];
            x[e] = 1.0;
            for _ in 0..2 {
                for (c, &ok) in filled.iter().enumerate() {
                    if ok {
                        let t = dot(u.col(c), &x);
                        axpy(-t, u.col(c), &mut x);
                    }
                }
            }
            let nx = norm2(&x);
            if nx > 0.5 {
                x.iter_mut().for_each(|v| *v /= nx);
                best = Some(x);
                break;
            }
            if best.as_ref().is_none_or(|b| norm2(b) < nx) && nx > 1e-8 {
                x.iter_mut().for_each(|v| *v /= nx);
                best = Some(x);
            }
        }
        if let Some(x) = best {
            u.col_mut(j).copy_from_slice(&x);
            filled[j] = true;
        }
    }
}

/// Thin SVD of any matrix; tall ones are reduced by Householder QR first (`A = Q R`,
/// `R = U_r S Vᵀ`, `U = Q U_r`), which is both faster and the classic preconditioning for Jacobi.
pub fn thin_svd(a: &Mat) -> Result<Svd> {
    if a.rows < a.cols {
        let t = thin_svd(&a.transpose())?;
        return Ok(Svd {
            u: t.v,
            s: t.s,
            v: t.u,
        });
    }
    if a.rows <= 2 * a.cols || a.cols <= 2 {
        return jacobi_svd(a);
    }
    if a.data.iter().any(|x| !x.is_finite()) {
        return Err(Error::Value("SVD input has a non-finite entry".into()));
    }
    let (q, r) = householder_qr(a)?;
    let core = jacobi_svd(&r)?;
    Ok(Svd {
        u: q.matmul(&core.u)?,
        s: core.s,
        v: core.v,
    })
}

/// Orthonormal basis of the column space, as `scipy.linalg.orth`: the left singular vectors whose
/// singular value exceeds `max(s) · eps · max(m, n)`.
pub fn orth(a: &Mat) -> Result<Mat> {
    orth_in(a, a.rows)
}

/// [`orth`] of a matrix given in coordinates of an isometric embedding into a space of `dim`
/// rows (the rank tolerance is the one scipy would use in that space).
fn orth_in(a: &Mat, dim: usize) -> Result<Mat> {
    let svd = thin_svd(a)?;
    let smax = svd.s.iter().fold(0.0_f64, |m, &v| m.max(v));
    let tol = smax * f64::EPSILON * (dim.max(a.rows).max(a.cols) as f64);
    let num = svd.s.iter().filter(|&&s| s > tol).count();
    Ok(svd.u.first_cols(num))
}

/// Principal angles (radians) between the column spaces of `a` (m × n) and `b` (m × k), computed
/// exactly as `scipy.linalg.subspace_angles` (Knyazev & Argentati 2002, sine/cosine version):
/// orthonormalise both with [`orth`]; cosines σ from the SVD of `QAᵀQB`; sines from the SVD of
/// `QB − QA(QAᵀQB)` (or the mirrored form when QA has fewer columns); the sine is used where
/// `σ² ≥ ½`, with the mask indexed as scipy indexes it (by descending cosine, applied to the
/// descending angles: an angle near 0 can then come from arccos, accurate to ~1e-8 only, exactly
/// as in scipy). Returns `min(rank a, rank b)` angles, descending.
pub fn subspace_angles(a: &Mat, b: &Mat) -> Result<Vec<f64>> {
    subspace_angles_in(a, b, a.rows)
}

/// [`subspace_angles`] of two matrices given in coordinates `Q x` of a common isometry
/// `Q` (`dim × rows`, orthonormal columns): angles are invariant under `Q`, and the rank
/// tolerances are those of the `dim`-row originals, so this equals `subspace_angles(Q a, Q b)`
/// at a fraction of the cost.
pub fn subspace_angles_in(a: &Mat, b: &Mat, dim: usize) -> Result<Vec<f64>> {
    angles_impl(a, b, dim, false)
}

/// [`subspace_angles_in`] where `b` already has orthonormal columns (singular vectors): `orth(b)`
/// would return `b` rotated, which spans the same space, so it is skipped.
pub(crate) fn subspace_angles_orthonormal_b(a: &Mat, b: &Mat, dim: usize) -> Result<Vec<f64>> {
    angles_impl(a, b, dim, true)
}

fn angles_impl(a: &Mat, b: &Mat, dim: usize, b_orthonormal: bool) -> Result<Vec<f64>> {
    if a.rows != b.rows {
        return Err(Error::Shape(format!(
            "subspaces live in different spaces: {} and {} rows",
            a.rows, b.rows
        )));
    }
    let qa = orth_in(a, dim)?;
    let qb = if b_orthonormal {
        b.clone()
    } else {
        orth_in(b, dim)?
    };
    let k = qa.cols.min(qb.cols);
    if k == 0 {
        return Ok(Vec::new());
    }
    let qa_h_qb = qa.t_matmul(&qb)?;
    let sigma = jacobi_svd(&qa_h_qb)?.s;
    let resid = if qa.cols >= qb.cols {
        let mut r = qb.clone();
        let proj = qa.matmul(&qa_h_qb)?;
        r.data.iter_mut().zip(&proj.data).for_each(|(x, p)| *x -= p);
        r
    } else {
        let mut r = qa.clone();
        let proj = qb.matmul(&qa_h_qb.transpose())?;
        r.data.iter_mut().zip(&proj.data).for_each(|(x, p)| *x -= p);
        r
    };
    let mask: Vec<bool> = sigma.iter().map(|s| s * s >= 0.5).collect();
    let mu: Vec<f64> = if mask.iter().any(|&x| x) {
        thin_svd(&resid)?
            .s
            .iter()
            .map(|s| s.clamp(-1.0, 1.0).asin())
            .collect()
    } else {
        Vec::new()
    };
    Ok((0..k)
        .map(|i| {
            if mask[i] {
                mu.get(i).copied().unwrap_or(0.0)
            } else {
                sigma[k - 1 - i].clamp(-1.0, 1.0).acos()
            }
        })
        .collect())
}

/// Ranks 1..n with ties given their average rank (`scipy.stats.rankdata(method="average")`).
pub fn average_ranks(x: &[f64]) -> Vec<f64> {
    let n = x.len();
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut ranks = vec![0.0; n];
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && x[idx[j + 1]] == x[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for &t in &idx[i..=j] {
            ranks[t] = r;
        }
        i = j + 1;
    }
    ranks
}

/// Pearson correlation; NaN when either input is constant or shorter than 2.
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len();
    if n < 2 || y.len() != n {
        return f64::NAN;
    }
    let mx = x.iter().sum::<f64>() / n as f64;
    let my = y.iter().sum::<f64>() / n as f64;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        let (da, db) = (a - mx, b - my);
        sxy += da * db;
        sxx += da * da;
        syy += db * db;
    }
    if sxx == 0.0 || syy == 0.0 {
        return f64::NAN;
    }
    (sxy / (sxx.sqrt() * syy.sqrt())).clamp(-1.0, 1.0)
}

/// Spearman rank correlation with average ranks for ties (`scipy.stats.spearmanr`); NaN when
/// undefined (fewer than 2 values, or a constant input). Inputs must be NaN-free.
pub fn spearman(x: &[f64], y: &[f64]) -> Result<f64> {
    if x.len() != y.len() {
        return Err(Error::Shape(format!(
            "spearman of {} and {} values",
            x.len(),
            y.len()
        )));
    }
    if x.iter().chain(y).any(|v| v.is_nan()) {
        return Err(Error::Value("spearman input contains NaN".into()));
    }
    Ok(pearson(&average_ranks(x), &average_ranks(y)))
}

#[cfg(test)]
mod tests;
