//! Deterministic test data shared by the unit tests of several modules.

/// `n` values in [-0.5, 0.5) from a 64-bit LCG; the same `(n, seed)` gives the same values.
pub(crate) fn pseudo(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}
