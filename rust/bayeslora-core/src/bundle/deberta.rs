//! DeBERTa-v2's settings in `config.json` (the architecture DeBERTa-v3 uses): disentangled
//! attention, its relative-position table and the extra tensors of the state dict. Every option
//! the runtime does not implement is refused here with one line, never run differently.

use std::path::Path;

use serde_json::Value;

use super::bundle_err;
use super::hf_config::Activation;
use super::tensors::TensorSpec;
use crate::error::Result;

/// DeBERTa-v2's options beyond the BERT-style ones (`transformers`' `DebertaV2Config`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebertaConfig {
    /// `relative_attention`: adds content→position and position→content scores.
    pub relative_attention: bool,
    /// `"c2p"` in `pos_att_type` (also counts in the score scale without relative attention).
    pub c2p: bool,
    /// `"p2c"` in `pos_att_type` (idem).
    pub p2c: bool,
    /// `share_att_key`: the position projections are the layer's own query/key projections.
    pub share_att_key: bool,
    /// `position_buckets` when > 0 (log-bucketed distances), else 0.
    pub position_buckets: usize,
    /// `max_relative_positions` (values < 1 mean `max_position_embeddings`).
    pub max_relative_positions: usize,
    /// `att_span`: half the rows of `rel_embeddings` (buckets if any, else max relative positions).
    pub span: usize,
    /// `position_biased_input`: absolute position embeddings are added to the input.
    pub position_biased_input: bool,
    /// `"layer_norm"` in `norm_rel_ebd`: `rel_embeddings` go through `encoder.LayerNorm`.
    pub norm_rel_embeddings: bool,
    /// `pooler_hidden_act` of the `ContextPooler`.
    pub pooler_activation: Activation,
}

fn get_bool(cfg: &Value, key: &str, default: bool, path: &Path) -> Result<bool> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(bundle_err(format!(
            "{}: {key:?} must be true or false, got {v}",
            path.display()
        ))),
    }
}

/// An optional integer (HF's `-1` is "unset"): `default` when absent or null.
fn get_int(cfg: &Value, key: &str, default: i64, path: &Path) -> Result<i64> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_i64().ok_or_else(|| {
            bundle_err(format!(
                "{}: {key:?} must be an integer, got {v}",
                path.display()
            ))
        }),
    }
}

/// A `"a|b"` string or a list of strings, lower-cased and trimmed as `DebertaV2Config` does.
fn get_list(cfg: &Value, key: &str, path: &Path) -> Result<Vec<String>> {
    let bad = |v: &Value| {
        bundle_err(format!(
            "{}: {key:?} must be a string or a list of strings, got {v}",
            path.display()
        ))
    };
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(s.split('|').map(|x| x.trim().to_lowercase()).collect()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|x| {
                x.as_str()
                    .map(|s| s.trim().to_lowercase())
                    .ok_or_else(|| bad(x))
            })
            .collect(),
        Some(v) => Err(bad(v)),
    }
}

/// The activation of `pooler_hidden_act` (and of the FFN, `hidden_act`).
pub(super) fn activation(name: &str, path: &Path) -> Result<Activation> {
    match name {
        "gelu" => Ok(Activation::Gelu),
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
        "relu" => Ok(Activation::Relu),
        "tanh" => Ok(Activation::Tanh),
        other => Err(bundle_err(format!(
            "{}: activation {other:?} is not supported",
            path.display()
        ))),
    }
}

impl DebertaConfig {
    /// Parse and check the DeBERTa-v2 options of `cfg` (`hidden`, `heads`, `max_positions`
    /// already read from it).
    pub fn from_json(
        cfg: &Value,
        hidden: usize,
        heads: usize,
        max_positions: usize,
        path: &Path,
    ) -> Result<Self> {
        let p = path.display();
        let unsupported = |what: String| {
            Err(bundle_err(format!(
                "{p}: {what} is not supported by the runtime"
            )))
        };
        if get_int(cfg, "conv_kernel_size", 0, path)? > 0 {
            return unsupported("conv_kernel_size > 0 (the convolution layer)".into());
        }
        let same = |key: &str, want: usize| -> Result<bool> {
            Ok(get_int(cfg, key, want as i64, path)? == want as i64)
        };
        if !same("embedding_size", hidden)? {
            return unsupported(format!(
                "embedding_size ≠ hidden_size {hidden} (embed_proj)"
            ));
        }
        if !same("attention_head_size", hidden / heads)? {
            return unsupported(format!(
                "attention_head_size ≠ hidden_size / num_attention_heads = {}",
                hidden / heads
            ));
        }
        if !same("pooler_hidden_size", hidden)? {
            return unsupported(format!("pooler_hidden_size ≠ hidden_size {hidden}"));
        }
        let (mut c2p, mut p2c) = (false, false);
        for kind in get_list(cfg, "pos_att_type", path)? {
            match kind.as_str() {
                "c2p" => c2p = true,
                "p2c" => p2c = true,
                other => return unsupported(format!("pos_att_type {other:?}")),
            }
        }
        let relative_attention = get_bool(cfg, "relative_attention", false, path)?;
        let max_rel = get_int(cfg, "max_relative_positions", -1, path)?;
        let max_relative_positions = if max_rel < 1 {
            max_positions
        } else {
            usize::try_from(max_rel)
                .ok()
                .filter(|&m| m <= 1 << 20)
                .ok_or_else(|| {
                    bundle_err(format!(
                        "{p}: max_relative_positions = {max_rel} is out of range"
                    ))
                })?
        };
        let buckets = get_int(cfg, "position_buckets", -1, path)?;
        let position_buckets = if buckets < 1 {
            0
        } else {
            usize::try_from(buckets)
                .ok()
                .filter(|&b| b <= 1 << 20)
                .ok_or_else(|| {
                    bundle_err(format!("{p}: position_buckets = {buckets} is out of range"))
                })?
        };
        if relative_attention && position_buckets > 0 {
            // transformers' make_log_bucket_position divides by buckets / 2 and by
            // log((max_relative_positions − 1) / (buckets / 2)): both must be non-zero
            let mid = position_buckets / 2;
            if mid == 0 || max_relative_positions.saturating_sub(1) == mid {
                return unsupported(format!(
                    "position_buckets = {position_buckets} with max_relative_positions = \
                     {max_relative_positions} (log buckets divide by zero)"
                ));
            }
        }
        let span = if position_buckets > 0 {
            position_buckets
        } else {
            max_relative_positions
        };
        let norm_rel_embeddings = match cfg.get("norm_rel_ebd") {
            None | Some(Value::Null) => false,
            Some(_) => get_list(cfg, "norm_rel_ebd", path)?
                .iter()
                .any(|x| x == "layer_norm"),
        };
        let pooler_act = match cfg.get("pooler_hidden_act") {
            None | Some(Value::Null) => "gelu",
            Some(Value::String(s)) => s.as_str(),
            Some(v) => {
                return Err(bundle_err(format!(
                    "{p}: \"pooler_hidden_act\" must be a string, got {v}"
                )))
            }
        };
        Ok(Self {
            relative_attention,
            c2p,
            p2c,
            share_att_key: get_bool(cfg, "share_att_key", false, path)?,
            position_buckets,
            max_relative_positions,
            span,
            position_biased_input: get_bool(cfg, "position_biased_input", true, path)?,
            norm_rel_embeddings,
            pooler_activation: activation(pooler_act, path)?,
        })
    }

    /// Whether layers have their own `pos_query_proj` (p2c) and `pos_key_proj` (c2p).
    pub fn own_position_projections(&self) -> (bool, bool) {
        let own = self.relative_attention && !self.share_att_key;
        (own && self.p2c, own && self.c2p)
    }

    /// The encoder-level tensors: `rel_embeddings` `[2·span, H]` and its LayerNorm.
    pub fn encoder_tensors(&self, hidden: usize) -> Vec<TensorSpec> {
        let mut v = Vec::new();
        if self.relative_attention {
            v.push(TensorSpec::float(
                "deberta.encoder.rel_embeddings.weight".into(),
                vec![2 * self.span, hidden],
            ));
            if self.norm_rel_embeddings {
                for part in ["weight", "bias"] {
                    v.push(TensorSpec::float(
                        format!("deberta.encoder.LayerNorm.{part}"),
                        vec![hidden],
                    ));
                }
            }
        }
        v
    }
}

/// transformers' `make_log_bucket_position` of one distance, in float32 as torch computes it.
pub fn log_bucket(delta: i64, buckets: usize, max_position: usize) -> i64 {
    let mid = (buckets / 2) as i64;
    let abs = if delta < mid && delta > -mid {
        mid - 1
    } else {
        delta.abs()
    };
    if abs <= mid {
        return delta;
    }
    // torch: log(abs / mid) / log(tensor((max_position − 1) / mid)) · (mid − 1), ceil, + mid
    let denom = (((max_position as f64 - 1.0) / mid as f64) as f32).ln();
    let log_pos = ((abs as f32 / mid as f32).ln() / denom * (mid - 1) as f32).ceil() + mid as f32;
    // float → long as torch's `.to(long)` (finite here: the divisors are non-zero)
    (log_pos * delta.signum() as f32) as i64
}

#[cfg(test)]
mod tests {
    use super::log_bucket;

    /// transformers' `make_log_bucket_position` (torch 2, float32) of the same distances.
    #[test]
    fn log_buckets_are_those_of_transformers() {
        let deltas = [
            127, 128, 129, 130, 200, 300, 511, 512, 1000, 5000, -129, -300, -5000,
        ];
        let want = [
            127, 128, 129, 130, 169, 207, 255, 256, 317, 465, -129, -207, -465,
        ];
        for (d, w) in deltas.into_iter().zip(want) {
            assert_eq!(log_bucket(d, 256, 512), w, "delta {d}");
        }
        for d in -70..=70 {
            assert_eq!(log_bucket(d, 256, 512), d);
        }
        // buckets 8 (mid 4), max_relative_positions 20, distances -70..=70
        let runs: [(i64, usize); 21] = [
            (-10, 17),
            (-9, 22),
            (-8, 12),
            (-7, 8),
            (-6, 5),
            (-5, 2),
            (-4, 1),
            (-3, 1),
            (-2, 1),
            (-1, 1),
            (0, 1),
            (1, 1),
            (2, 1),
            (3, 1),
            (4, 1),
            (5, 2),
            (6, 5),
            (7, 8),
            (8, 12),
            (9, 22),
            (10, 17),
        ];
        let want: Vec<i64> = runs
            .iter()
            .flat_map(|&(v, k)| std::iter::repeat_n(v, k))
            .collect();
        let got: Vec<i64> = (-70..=70).map(|d| log_bucket(d, 8, 20)).collect();
        assert_eq!(got, want);
    }
}
