//! Activation buffers kept between calls: large fresh allocations cost page faults on every
//! layer, so a forward pass takes its buffers from a pool and gives them back.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// Activation buffers kept for the next call, at most this many bytes.
const KEEP_BYTES: usize = 96 << 20;

/// The buffers an [`Encoder`](super::Encoder) keeps between calls.
#[derive(Debug, Default)]
pub(super) struct BufferPool(Mutex<Vec<Vec<f32>>>);

impl BufferPool {
    /// A buffer of `n` floats, reusing a returned one when possible. Its contents are
    /// unspecified (stale values of a previous use): every caller overwrites all `n` entries
    /// (products with a Store/Bias epilogue, row copies), so no time goes into zeroing.
    pub(super) fn take(&self, n: usize) -> Buffer {
        let mut data = match self.0.lock() {
            Ok(mut pool) => {
                // best fit: the smallest buffer that holds `n` floats, else the largest (grown
                // below), so small requests do not take the big buffers the next layer needs
                let fits = pool
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| b.len() >= n)
                    .min_by_key(|(_, b)| b.len())
                    .map(|(i, _)| i);
                let best = fits.or_else(|| {
                    pool.iter()
                        .enumerate()
                        .max_by_key(|(_, b)| b.len())
                        .map(|(i, _)| i)
                });
                best.map(|i| pool.swap_remove(i)).unwrap_or_default()
            }
            Err(_) => Vec::new(),
        };
        if data.len() < n {
            // zeroed once when a buffer is created or grown; spare capacity is zeroed too, so
            // a pooled buffer is initialised to its capacity and never zeroed again
            data.resize(n, 0.0);
            data.resize(data.capacity(), 0.0);
        }
        Buffer { data, n }
    }

    /// Give a buffer back for reuse.
    pub(super) fn give(&self, b: Buffer) {
        if let Ok(mut pool) = self.0.lock() {
            pool.push(b.data);
        }
    }

    /// Keep the largest buffers for the next call, within [`KEEP_BYTES`].
    pub(super) fn trim(&self) {
        if let Ok(mut pool) = self.0.lock() {
            pool.sort_by_key(|b| std::cmp::Reverse(b.capacity()));
            let mut kept = 0;
            pool.retain(|b| {
                kept += b.capacity() * 4;
                kept <= KEEP_BYTES
            });
        }
    }
}

/// A pooled activation buffer: `n` floats in use of `data`, which is initialised to its full
/// length (so reusing it for a larger `n` needs no zeroing).
pub(super) struct Buffer {
    data: Vec<f32>,
    n: usize,
}

impl Deref for Buffer {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.data[..self.n]
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.data[..self.n]
    }
}
