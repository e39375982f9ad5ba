//! Rank relevance scores of both posterior families (docs/method.md §2). Larger = more noise per unit of
//! signal = less relevant; a rank is pruned when its score exceeds the threshold τ.

use super::kl::{check_shapes, MU2_EPS};
use crate::error::Result;

/// `gate`: the score of rank k is `log α_k` itself.
pub fn rank_scores_gate(log_alpha: &[f64]) -> Result<Vec<f64>> {
    Ok(log_alpha.to_vec())
}

/// Median as numpy computes it: the mean of the two middle values for an even count.
/// NaN-free input is required (the callers check).
fn median(mut xs: Vec<f64>) -> f64 {
    let n = xs.len();
    if n == 0 {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        0.5 * (xs[n / 2 - 1] + xs[n / 2])
    }
}

/// `additive`: `ℓ_k = λ_k − ½[median_i log(M_A[k,i]² + ε) + median_j log(M_B[j,k]² + ε)]`.
/// `m_a` is r×d_in row-major, `m_b` is d_out×r row-major; `eps` is the ε of the formula.
pub fn rank_scores_additive(
    log_sigma2: &[f64],
    m_a: &[f64],
    d_in: usize,
    m_b: &[f64],
    d_out: usize,
    eps: Option<f64>,
) -> Result<Vec<f64>> {
    let r = log_sigma2.len();
    check_shapes(r, m_a, d_in, m_b, d_out)?;
    for (name, xs) in [("log_sigma2", log_sigma2), ("m_a", m_a), ("m_b", m_b)] {
        if let Some(i) = xs.iter().position(|x| !x.is_finite()) {
            return Err(crate::Error::Value(format!(
                "{name}[{i}] is {} (must be finite)",
                xs[i]
            )));
        }
    }
    let eps = eps.unwrap_or(MU2_EPS);
    Ok((0..r)
        .map(|k| {
            let la = median(
                m_a[k * d_in..(k + 1) * d_in]
                    .iter()
                    .map(|&m| (m * m + eps).ln())
                    .collect(),
            );
            let lb = median(
                (0..d_out)
                    .map(|j| (m_b[j * r + k] * m_b[j * r + k] + eps).ln())
                    .collect(),
            );
            log_sigma2[k] - 0.5 * (la + lb)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_even_and_odd() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn additive_score_of_uniform_factors() {
        // All |μ| = 0.1 → both medians are ln(0.01 + ε); ℓ = λ − ln(0.01 + ε).
        let s =
            rank_scores_additive(&[-8.0], &[0.1; 4], 4, &[-0.1; 3], 3, Some(0.0)).expect("valid");
        assert!((s[0] - (-8.0 - 0.01f64.ln())).abs() < 1e-12);
    }

    #[test]
    fn additive_score_rejects_bad_shapes() {
        assert!(rank_scores_additive(&[0.0], &[0.1; 4], 3, &[0.1; 3], 3, None).is_err());
    }
}
