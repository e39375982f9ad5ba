//! Linear layers with their adapters' noise: the merged product once, then per copy (sample)
//! the noisy adapter terms, `s·B((z − 1) ⊙ A x)` (gate, dropout, explicit gates) or
//! `s·(B̃(Ã x) − B(A x))` (additive, sampled factors Ã, B̃).

use rayon::prelude::*;

use super::build::{Adapter, Linear, LinearPart};
use super::layout::{copy_to_layout, split_segments, Layout, Segment};
use super::pool::Buffer;
use super::{Encoder, Noise, Pass};
use crate::bundle::NoiseKind;
use crate::kernels::{self, Epilogue, Packed};
use crate::mc::Stream;

impl Encoder {
    /// Whether this part of a product has an adapter that adds noise in this pass.
    pub(super) fn part_noisy(&self, part: &LinearPart, pass: &Pass<'_>) -> bool {
        part.adapter
            .as_ref()
            .is_some_and(|a| self.noisy(a, &part.module, pass))
    }

    /// Whether `adapter` (of module `module`) adds noise in this pass.
    pub(super) fn noisy(&self, adapter: &Adapter, module: &str, pass: &Pass<'_>) -> bool {
        if adapter.rank == 0 {
            return false;
        }
        match pass.noise {
            Noise::Mean => false,
            Noise::Explicit(g) => g.contains_key(module),
            Noise::Sampled { .. } => match self.noise {
                NoiseKind::None => false,
                NoiseKind::Dropout => self.dropout > 0.0,
                NoiseKind::Gate | NoiseKind::Additive => true,
            },
        }
    }

    /// `y = x W'ᵀ + b` plus the noisy adapter terms; expands a shared input to S copies when
    /// one of its adapters is noisy. Returns the output and its layout.
    pub(super) fn linear(
        &self,
        lin: &Linear,
        x: &[f32],
        layout: &Layout,
        pass: &Pass<'_>,
    ) -> (Buffer, Layout) {
        let rows = layout.rows();
        let mut y = pass.buffer(rows * lin.d_out);
        kernels::par_gemm(
            rows,
            x,
            lin.d_in,
            &lin.weight,
            &mut y,
            lin.d_out,
            Epilogue::Bias(&lin.bias),
            pass.threads,
        );
        let noisy: Vec<&LinearPart> = lin
            .parts
            .iter()
            .filter(|p| self.part_noisy(p, pass))
            .collect();
        if noisy.is_empty() {
            return (y, layout.clone());
        }
        let out_layout = Layout {
            rows_per_copy: layout.rows_per_copy.clone(),
            copies: pass.samples,
        };
        if out_layout != *layout {
            let expanded = copy_to_layout(&y, layout, &out_layout, lin.d_out, pass);
            pass.recycle(std::mem::replace(&mut y, expanded));
        }
        let in_segs = layout.segments();
        let out_segs = out_layout.segments();
        let ys = split_segments(&mut y, &out_segs, lin.d_out);
        ys.into_par_iter()
            .zip(out_segs.par_iter())
            .for_each(|(yseg, seg)| {
                // the input rows of this copy: its own, or the shared ones
                let src = in_segs[layout.source_of(seg.input, seg.copy)];
                let xrows = &x[src.start * lin.d_in..(src.start + seg.rows) * lin.d_in];
                for part in &noisy {
                    if let Some(ad) = &part.adapter {
                        self.adapter_term(
                            ad,
                            &part.module,
                            xrows,
                            seg,
                            &mut yseg[part.first_col..],
                            lin.d_out,
                            pass,
                        );
                    }
                }
            });
        (y, out_layout)
    }

    /// Add one sample's noisy adapter term of segment `seg` (rows `x`) to `y` (row stride
    /// `ldy`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn adapter_term(
        &self,
        ad: &Adapter,
        module: &str,
        x: &[f32],
        seg: &Segment,
        y: &mut [f32],
        ldy: usize,
        pass: &Pass<'_>,
    ) {
        let (r, n, i) = (ad.rank, seg.rows, seg.input);
        let seq = &pass.seqs[i];
        let stream = match pass.noise {
            Noise::Sampled { seed, .. } => Some(Stream::new(
                seed,
                seq.hash,
                (pass.first_sample + seg.copy) as u64,
                ad.stream_key,
            )),
            _ => None,
        };
        let mut hbuf = vec![0.0f32; n * r];
        if let (NoiseKind::Additive, Some(st)) = (self.noise, stream) {
            // sampled factors Ã = A + σ ε, B̃ = B + σ ε'; term s·(B̃ Ã x − B A x). Rank k's
            // d_in + d_out normals (ε of its row of A, then ε' of its column of B) come in
            // Box–Muller pairs: normals 2p and 2p + 1 are the two branches of element 1 + p.
            let mut a_s = ad.lora_a.clone();
            let mut b_s = ad.lora_b.clone();
            let mut eps = vec![0.0f32; (ad.d_in + ad.d_out).next_multiple_of(2)];
            for k in 0..r {
                let (rk, sd) = (ad.rank_index[k], ad.noise_std[k]);
                for (p, pair) in eps.chunks_exact_mut(2).enumerate() {
                    let (c, s) = st.normal_pair(rk, 1 + p as u64);
                    pair[0] = sd * c as f32;
                    pair[1] = sd * s as f32;
                }
                for (v, e) in a_s[k * ad.d_in..(k + 1) * ad.d_in].iter_mut().zip(&eps) {
                    *v += e;
                }
                for (j, e) in eps[ad.d_in..ad.d_in + ad.d_out].iter().enumerate() {
                    b_s[j * r + k] += e;
                }
            }
            let a_t = Packed::from_nk(&a_s, r, ad.d_in, ad.d_in);
            let b_t = Packed::from_nk(&b_s, ad.d_out, r, r);
            kernels::gemm(n, x, ad.d_in, &a_t, &mut hbuf, r, Epilogue::Store);
            hbuf.iter_mut().for_each(|v| *v *= ad.scale);
            kernels::gemm(n, &hbuf, r, &b_t, y, ldy, Epilogue::Accumulate);
            kernels::gemm(
                n,
                x,
                ad.d_in,
                &ad.lora_a_packed,
                &mut hbuf,
                r,
                Epilogue::Store,
            );
            hbuf.iter_mut().for_each(|v| *v *= -ad.scale);
            kernels::gemm(n, &hbuf, r, &ad.lora_b_packed, y, ldy, Epilogue::Accumulate);
            return;
        }
        // gate-like: coefficient scale·(z − 1) per rank
        let coef: Vec<f32> = match (pass.noise, stream) {
            (Noise::Explicit(g), _) => {
                let Some(gv) = g.get(module) else { return };
                let row = &gv[(pass.first_input + i) * r..(pass.first_input + i + 1) * r];
                row.iter().map(|&z| ad.scale * (z - 1.0)).collect()
            }
            (_, Some(st)) => (0..r)
                .map(|k| {
                    let zm1 = match self.noise {
                        NoiseKind::Gate => ad.noise_std[k] * st.normal(ad.rank_index[k], 0) as f32,
                        NoiseKind::Dropout => {
                            let p = self.dropout;
                            if st.uniform(ad.rank_index[k], 0) as f32 >= p {
                                1.0 / (1.0 - p) - 1.0
                            } else {
                                -1.0
                            }
                        }
                        _ => 0.0,
                    };
                    ad.scale * zm1
                })
                .collect(),
            _ => return,
        };
        kernels::gemm(
            n,
            x,
            ad.d_in,
            &ad.lora_a_packed,
            &mut hbuf,
            r,
            Epilogue::Store,
        );
        for row in hbuf.chunks_exact_mut(r) {
            for (v, c) in row.iter_mut().zip(&coef) {
                *v *= c;
            }
        }
        kernels::gemm(n, &hbuf, r, &ad.lora_b_packed, y, ldy, Epilogue::Accumulate);
    }
}
