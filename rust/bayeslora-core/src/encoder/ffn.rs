//! The feed-forward block of a layer: both products, the activation, the residual and the
//! LayerNorm, on one thread in blocks of rows that stay in L2.

use super::build::{self, Linear};
use super::layout::{as_layout, Layout};
use super::pool::Buffer;
use super::{activation_fn, par_add_layer_norm, par_elementwise, Encoder, Pass};
use crate::kernels;

/// Rows per block of the one-thread feed-forward block (`Encoder::feed_forward`): one row block
/// of the products (`kernels::MB`), whose intermediate activations (96 rows × 4·H: 576 KiB for
/// MiniLM) stay in L2.
const FFN_ROWS: usize = kernels::MB;

impl Encoder {
    /// The feed-forward block of `layer` on `mid` (laid out as `mid_layout`): both products, the
    /// activation, the residual and the LayerNorm.
    ///
    /// On one thread with no noisy adapter in either product (so the rows keep their layout), the
    /// whole block runs [`FFN_ROWS`] rows at a time: those rows' intermediate activations (4·H
    /// wide) stay in L2 between the two products instead of going out to memory and back, and the
    /// output rows are normalised while they are still in cache. The weights stream past each
    /// block of rows either way (the products block their rows the same), and every row's
    /// arithmetic is the same as in the whole-layer path, so the results are identical.
    pub(super) fn feed_forward(
        &self,
        layer: &build::Layer,
        mid: Buffer,
        mid_layout: Layout,
        pass: &Pass<'_>,
    ) -> (Buffer, Layout) {
        let h = self.hidden;
        let (ffn_in, ffn_out) = (&layer.ffn_in, &layer.ffn_out);
        let noisy = |lin: &Linear| lin.parts.iter().any(|p| self.part_noisy(p, pass));
        if pass.threads > 1 || noisy(ffn_in) || noisy(ffn_out) || whole_ffn_asked() {
            let (mut inner, inner_layout) = self.linear(ffn_in, &mid, &mid_layout, pass);
            par_elementwise(&mut inner, activation_fn(self.activation));
            let (mut out, out_layout) = self.linear(ffn_out, &inner, &inner_layout, pass);
            pass.recycle(inner);
            let resid = as_layout(&mid, &mid_layout, &out_layout, h, pass);
            par_add_layer_norm(&mut out, &resid, &layer.ffn_norm, self.eps);
            pass.recycle_rows(resid);
            pass.recycle(mid);
            return (out, out_layout);
        }
        let rows = mid_layout.rows();
        let (d_in, d_mid, d_out) = (ffn_in.d_in, ffn_in.d_out, ffn_out.d_out);
        let mut out = pass.buffer(rows * d_out);
        let mut inner = pass.buffer(FFN_ROWS.min(rows) * d_mid);
        let activation = activation_fn(self.activation);
        let norm = &layer.ffn_norm;
        for r0 in (0..rows).step_by(FFN_ROWS) {
            let n = FFN_ROWS.min(rows - r0);
            let x = &mid[r0 * d_in..(r0 + n) * d_in];
            let inner = &mut inner[..n * d_mid];
            let y = &mut out[r0 * d_out..(r0 + n) * d_out];
            let (w_in, b_in) = (&ffn_in.weight, kernels::Epilogue::Bias(&ffn_in.bias));
            kernels::gemm(n, x, d_in, w_in, inner, d_mid, b_in);
            activation(inner);
            let (w_out, b_out) = (&ffn_out.weight, kernels::Epilogue::Bias(&ffn_out.bias));
            kernels::gemm(n, inner, d_mid, w_out, y, d_out, b_out);
            kernels::add_layer_norm(y, x, &norm.gamma, &norm.beta, self.eps);
        }
        pass.recycle(inner);
        pass.recycle(mid);
        (out, mid_layout)
    }
}

/// Tests: whether the calling thread asked `Encoder::feed_forward` for its whole-layer path
/// (always false outside tests).
#[inline]
fn whole_ffn_asked() -> bool {
    #[cfg(test)]
    return tests::whole_ffn();
    #[cfg(not(test))]
    false
}

#[cfg(test)]
mod tests {
    use super::super::tests::{bundle, padded, INPUTS};
    use super::super::tests_pieces::on_threads;
    use super::super::{Encoder, Noise};

    thread_local! {
        /// Set on a thread: `Encoder::feed_forward` takes its whole-layer path there.
        static WHOLE_FFN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Whether the calling thread asked for the whole-layer feed-forward path.
    pub(super) fn whole_ffn() -> bool {
        WHOLE_FFN.with(|c| c.get())
    }

    #[test]
    fn the_feed_forward_block_by_row_blocks_gives_the_whole_layer_numbers_bit_for_bit() {
        // adapters outside the FFN, so its products keep the layout and one thread blocks the rows
        let b = bundle(&["query", "value"]);
        let mut enc = Encoder::new(&b).expect("encoder");
        enc.set_max_rows(super::super::MAX_ROWS);
        let (ids, mask, t) = padded(&INPUTS);
        let seqs = enc.prepare(&ids, &mask, INPUTS.len(), t).expect("inputs");
        let tokens: usize = INPUTS.iter().map(|x| x.len()).sum();
        let samples = 20;
        // several row blocks and a ragged last one
        assert!(
            tokens * samples > 2 * super::FFN_ROWS
                && !(tokens * samples).is_multiple_of(super::FFN_ROWS)
        );
        for noise in [Noise::Mean, Noise::Sampled { samples, seed: 3 }] {
            let (blocked, whole) = on_threads(1, || {
                let blocked = enc.forward(&seqs, noise);
                WHOLE_FFN.with(|c| c.set(true));
                let whole = enc.forward(&seqs, noise);
                WHOLE_FFN.with(|c| c.set(false));
                (blocked, whole)
            });
            assert_eq!(
                blocked.expect("blocked"),
                whole.expect("whole"),
                "{noise:?}"
            );
        }
    }
}
