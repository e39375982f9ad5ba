//! How the rows of a stacked activation are laid out, and moving rows between layouts.
//!
//! All inputs of a call are stacked as rows of one matrix. Input `i` has `rows_per_copy[i]` rows
//! per copy and there are `copies` copies of each input: 1 while every sample would compute the
//! same rows ("shared"), S (the posterior samples) from the first noisy adapter on. Storage order
//! is input-major: input 0's copies, then input 1's, and so on.

use rayon::prelude::*;

use super::pool::Buffer;
use super::{Pass, PAR_MIN};

/// Row layout of a stacked activation (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Layout {
    /// Rows of one copy of each input.
    pub rows_per_copy: Vec<usize>,
    /// Copies of every input: 1 (shared) or S.
    pub copies: usize,
}

/// One copy of one input: a contiguous block of rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Segment {
    /// The input.
    pub input: usize,
    /// Which copy (sample) of it; 0 when shared.
    pub copy: usize,
    /// Its first row in the stacked matrix.
    pub start: usize,
    /// Its rows.
    pub rows: usize,
}

impl Layout {
    /// `rows` rows per copy of each of `inputs` inputs, `copies` copies.
    pub fn uniform(inputs: usize, rows: usize, copies: usize) -> Self {
        Self {
            rows_per_copy: vec![rows; inputs],
            copies,
        }
    }

    /// Inputs.
    pub fn inputs(&self) -> usize {
        self.rows_per_copy.len()
    }

    /// Rows of the whole stacked matrix.
    pub fn rows(&self) -> usize {
        self.rows_per_copy.iter().sum::<usize>() * self.copies
    }

    /// Every segment, in storage order.
    pub fn segments(&self) -> Vec<Segment> {
        let mut out = Vec::with_capacity(self.rows_per_copy.len() * self.copies);
        let mut start = 0;
        for (input, &rows) in self.rows_per_copy.iter().enumerate() {
            for copy in 0..self.copies {
                out.push(Segment {
                    input,
                    copy,
                    start,
                    rows,
                });
                start += rows;
            }
        }
        out
    }

    /// Index in [`Layout::segments`] of the rows that copy `copy` of `input` reads from this
    /// layout: its own copy, or the shared one when this layout has a single copy.
    pub fn source_of(&self, input: usize, copy: usize) -> usize {
        if self.copies == 1 {
            input
        } else {
            input * self.copies + copy
        }
    }
}

/// Split `data` (rows of `width`) into the mutable row blocks of `segments`.
pub(super) fn split_segments<'a>(
    mut data: &'a mut [f32],
    segments: &[Segment],
    width: usize,
) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(segments.len());
    for seg in segments {
        let (head, tail) = std::mem::take(&mut data).split_at_mut(seg.rows * width);
        out.push(head);
        data = tail;
    }
    out
}

/// Rows that are either another activation as it is or a re-laid copy in a pooled buffer.
pub(super) enum Rows<'x> {
    /// The activation itself (the layouts agreed).
    Borrowed(&'x [f32]),
    /// A copy in the layout asked for.
    Owned(Buffer),
}

impl std::ops::Deref for Rows<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Rows::Borrowed(x) => x,
            Rows::Owned(b) => b,
        }
    }
}

/// The rows of `x` (width `w`, laid out as `from`) in the layout `to`: `x` itself when the
/// layouts agree, else a copy ([`copy_to_layout`]).
pub(super) fn as_layout<'x>(
    x: &'x [f32],
    from: &Layout,
    to: &Layout,
    w: usize,
    pass: &Pass<'_>,
) -> Rows<'x> {
    if from == to {
        Rows::Borrowed(x)
    } else {
        Rows::Owned(copy_to_layout(x, from, to, w, pass))
    }
}

/// The rows of `x` (width `w`, laid out as `from`) copied into a pooled buffer laid out as `to`:
/// copy `s` of input `i` takes its source copy (or the shared one) and keeps its first
/// `to.rows_per_copy[i]` rows (all of them, or token 0 only). Expands a shared activation to S
/// copies, or narrows one to its first tokens.
pub(super) fn copy_to_layout(
    x: &[f32],
    from: &Layout,
    to: &Layout,
    w: usize,
    pass: &Pass<'_>,
) -> Buffer {
    let from_segs = from.segments();
    let to_segs = to.segments();
    let mut out = pass.buffer(to.rows() * w);
    let pieces = split_segments(&mut out, &to_segs, w);
    let copy = |(dst, seg): (&mut [f32], &Segment)| {
        let src = from_segs[from.source_of(seg.input, seg.copy)];
        assert!(
            seg.rows <= src.rows,
            "copy_to_layout: a copy keeps at most its source's rows"
        );
        dst.copy_from_slice(&x[src.start * w..(src.start + seg.rows) * w]);
    };
    if to.rows() * w < PAR_MIN {
        pieces.into_iter().zip(&to_segs).for_each(copy);
    } else {
        pieces
            .into_par_iter()
            .zip(to_segs.par_iter())
            .for_each(copy);
    }
    out
}
