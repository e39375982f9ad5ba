//! KL divergence of a Gaussian multiplicative-noise posterior to the log-uniform prior,
//! after Molchanov, Ashukha & Vetrov (2017), docs/method.md §3.
//!
//! `-KL(α) ≈ k1·σ(k2 + k3·log α) − ½·log(1 + 1/α) − k1`, evaluated in `log α` with
//! `log(1 + 1/α) = softplus(−log α)` so that it never overflows.

use crate::error::{Error, Result};

/// Constants of the Molchanov approximation.
pub const K1: f64 = 0.63576;
pub const K2: f64 = 1.87320;
pub const K3: f64 = 1.48695;
/// `log α` is clamped to this range inside the KL (docs/method.md §3).
pub const LOG_ALPHA_CLAMP: (f64, f64) = (-10.0, 10.0);
/// `log σ²` of the additive family is clamped to this range where it enters forward/KL (docs/method.md §2b).
pub const LOG_SIGMA2_CLAMP: (f64, f64) = (-20.0, 2.0);
/// Added to `μ²` in the per-weight noise ratio of the additive family.
pub const MU2_EPS: f64 = 1e-8;

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

fn softplus(x: f64) -> f64 {
    // log(1 + e^x) without overflow for large x or loss of precision for very negative x.
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

fn check_finite(name: &str, xs: &[f64]) -> Result<()> {
    match xs.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(Error::Value(format!(
            "{name}[{i}] is {} (must be finite)",
            xs[i]
        ))),
        None => Ok(()),
    }
}

/// KL of one noise ratio, given `log α`. Non-negative, decreasing in `log α`, → 0 as α → ∞.
pub fn kl_molchanov(log_alpha: f64) -> f64 {
    let la = log_alpha.clamp(LOG_ALPHA_CLAMP.0, LOG_ALPHA_CLAMP.1);
    let neg_kl = K1 * sigmoid(K2 + K3 * la) - 0.5 * softplus(-la) - K1;
    -neg_kl
}

/// Elementwise [`kl_molchanov`]; rejects non-finite input.
pub fn kl_molchanov_vec(log_alpha: &[f64]) -> Result<Vec<f64>> {
    check_finite("log_alpha", log_alpha)?;
    Ok(log_alpha.iter().map(|&la| kl_molchanov(la)).collect())
}

/// KL of a `gate` module: `Σ_k g · KL(log α_k)`, `g` the group weight (docs/method.md §2a).
pub fn kl_gate(log_alpha: &[f64], group_weight: f64) -> Result<f64> {
    check_finite("log_alpha", log_alpha)?;
    if !(group_weight.is_finite() && group_weight >= 0.0) {
        return Err(Error::Value(format!(
            "group_weight must be finite and >= 0, got {group_weight}"
        )));
    }
    Ok(group_weight * log_alpha.iter().map(|&la| kl_molchanov(la)).sum::<f64>())
}

/// KL of an `additive` module: summed over every entry of `A` (r×d_in, row-major) and
/// `B` (d_out×r, row-major) with `α_w = σ_k² / (μ_w² + 1e-8)` (docs/method.md §2b).
pub fn kl_additive(
    log_sigma2: &[f64],
    m_a: &[f64],
    d_in: usize,
    m_b: &[f64],
    d_out: usize,
) -> Result<f64> {
    let r = log_sigma2.len();
    check_shapes(r, m_a, d_in, m_b, d_out)?;
    check_finite("log_sigma2", log_sigma2)?;
    check_finite("m_a", m_a)?;
    check_finite("m_b", m_b)?;
    let mut total = 0.0;
    for (k, &ls) in log_sigma2.iter().enumerate() {
        let ls = ls.clamp(LOG_SIGMA2_CLAMP.0, LOG_SIGMA2_CLAMP.1);
        let row = &m_a[k * d_in..(k + 1) * d_in];
        total += row
            .iter()
            .map(|&mu| kl_molchanov(ls - (mu * mu + MU2_EPS).ln()))
            .sum::<f64>();
        total += (0..d_out)
            .map(|j| {
                let mu = m_b[j * r + k];
                kl_molchanov(ls - (mu * mu + MU2_EPS).ln())
            })
            .sum::<f64>();
    }
    Ok(total)
}

pub(crate) fn check_shapes(
    r: usize,
    m_a: &[f64],
    d_in: usize,
    m_b: &[f64],
    d_out: usize,
) -> Result<()> {
    let want_a = r
        .checked_mul(d_in)
        .ok_or_else(|| Error::Shape("r*d_in overflows".into()))?;
    let want_b = r
        .checked_mul(d_out)
        .ok_or_else(|| Error::Shape("r*d_out overflows".into()))?;
    if m_a.len() != want_a {
        return Err(Error::Shape(format!(
            "m_a has {} entries, expected r*d_in = {r}*{d_in}",
            m_a.len()
        )));
    }
    if m_b.len() != want_b {
        return Err(Error::Shape(format!(
            "m_b has {} entries, expected d_out*r = {d_out}*{r}",
            m_b.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn kl_vanishes_at_large_alpha() {
        assert!(kl_molchanov(10.0) < 1e-3);
        assert!(kl_molchanov(-10.0) > 4.0);
    }

    #[test]
    fn kl_rejects_nan() {
        assert!(kl_molchanov_vec(&[0.0, f64::NAN]).is_err());
        assert!(kl_gate(&[0.0], -1.0).is_err());
    }

    #[test]
    fn additive_rejects_bad_shapes() {
        assert!(kl_additive(&[0.0, 0.0], &[0.0; 6], 3, &[0.0; 3], 2).is_err());
    }

    proptest! {
        #[test]
        fn kl_nonnegative_and_decreasing(a in -12.0f64..12.0, d in 0.0f64..5.0) {
            let lo = kl_molchanov(a);
            let hi = kl_molchanov(a + d);
            prop_assert!(lo >= 0.0);
            prop_assert!(hi <= lo + 1e-12);
        }

        #[test]
        fn gate_kl_is_weighted_sum(las in proptest::collection::vec(-10.0f64..10.0, 1..16), g in 0.0f64..2000.0) {
            let total = kl_gate(&las, g).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let direct: f64 = las.iter().map(|&x| g * kl_molchanov(x)).sum();
            prop_assert!((total - direct).abs() <= 1e-9 * (1.0 + direct.abs()));
        }
    }
}
