//! Bundles written to a temporary directory: a valid tiny one loads (f32 and bf16 storage), and
//! each kind of damage is reported as the matching [`Error`] variant. Special and changing files
//! in `tests/files.rs`, the mutation fuzzer in `tests/fuzz.rs`.

mod files;
mod fuzz;

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

use super::{Bundle, CONFIG_FILE, META_FILE, WEIGHTS_FILE};
use crate::encoder::{Encoder, Noise};
use crate::error::Error;

const QUERY: &str = "bert.encoder.layer.0.attention.self.query";

/// The three files of a bundle, before they are written.
#[derive(Clone)]
struct Fixture {
    meta: Value,
    config: Value,
    /// name → (dtype, shape, little-endian bytes)
    tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
}

fn floats(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32 * 7 + seed * 13) % 17) as f32 / 17.0 - 0.4)
        .collect()
}

impl Fixture {
    /// A valid BERT bundle: hidden 4, 2 heads, 1 layer, a gate adapter of rank 2 on the query.
    fn valid() -> Self {
        let config = json!({
            "model_type": "bert", "vocab_size": 5, "hidden_size": 4, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 6, "max_position_embeddings": 6,
            "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
        });
        let meta = json!({
            "format_version": 1, "architecture": "bert", "model_type": "bert",
            "method": "bayeslora", "posterior": "gate", "num_labels": 2, "labels": ["no", "yes"],
            "prune_threshold": 3.0, "dropout": 0.0, "dtype": "float32", "max_length": 6,
            "modules": {QUERY: {"rank": 2, "initial_rank": 3, "scale": 0.5, "d_in": 4, "d_out": 4}},
        });
        let mut f = Self {
            meta,
            config,
            tensors: BTreeMap::new(),
        };
        let cfg =
            super::ModelConfig::from_json(&f.config, super::Arch::Bert, Path::new(CONFIG_FILE))
                .expect("valid config");
        let mut seed = 0;
        let mut shapes: Vec<(String, Vec<usize>)> = cfg
            .embedding_tensors()
            .into_iter()
            .map(|t| (t.name, t.shape))
            .collect();
        for ln in cfg.layer_norm_suffixes() {
            for part in ["weight", "bias"] {
                shapes.push((format!("{}.{ln}.{part}", cfg.layer_prefix(0)), vec![4]));
            }
        }
        for l in cfg.linears(2) {
            shapes.push((format!("{}.weight", l.name), vec![l.d_out, l.d_in]));
            shapes.push((format!("{}.bias", l.name), vec![l.d_out]));
        }
        shapes.push((format!("{QUERY}.lora_A"), vec![2, 4]));
        shapes.push((format!("{QUERY}.lora_B"), vec![4, 2]));
        shapes.push((format!("{QUERY}.log_alpha"), vec![2]));
        for (name, shape) in shapes {
            seed += 1;
            f.set_f32(&name, shape.clone(), &floats(shape.iter().product(), seed));
        }
        f.set_i64(&format!("{QUERY}.rank_index"), &[2, 0]);
        f
    }

    fn set_f32(&mut self, name: &str, shape: Vec<usize>, v: &[f32]) {
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensors.insert(name.into(), (Dtype::F32, shape, bytes));
    }

    fn set_i64(&mut self, name: &str, v: &[i64]) {
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensors
            .insert(name.into(), (Dtype::I64, vec![v.len()], bytes));
    }

    /// Every float tensor stored as bf16 (the top half of its f32 bits).
    fn store_as_bf16(&mut self) {
        self.meta["dtype"] = json!("bfloat16");
        for (dtype, _, bytes) in self.tensors.values_mut() {
            if *dtype == Dtype::F32 {
                *bytes = bytes.chunks_exact(4).flat_map(|c| [c[2], c[3]]).collect();
                *dtype = Dtype::BF16;
            }
        }
    }

    fn write(&self, dir: &Path) {
        std::fs::write(dir.join(META_FILE), self.meta.to_string()).expect("write meta");
        std::fs::write(dir.join(CONFIG_FILE), self.config.to_string()).expect("write config");
        let views: Vec<(String, TensorView<'_>)> = self
            .tensors
            .iter()
            .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).expect("view")))
            .collect();
        let bytes = safetensors::serialize(views, None).expect("serialize");
        std::fs::write(dir.join(WEIGHTS_FILE), bytes).expect("write weights");
    }

    fn open(&self) -> crate::Result<Bundle> {
        let dir = tempfile::tempdir().expect("temp dir");
        self.write(dir.path());
        Bundle::open(dir.path())
    }
}

/// Something done to a valid bundle before it is written.
type Damage = Box<dyn FnOnce(&mut Fixture)>;

/// The bundle of `f` once `damage` is done to it, expected to fail: its error.
fn broken(damage: impl FnOnce(&mut Fixture)) -> Error {
    let mut f = Fixture::valid();
    damage(&mut f);
    match f.open() {
        Ok(_) => panic!("a damaged bundle opened"),
        Err(e) => e,
    }
}

/// Each case's damage makes the bundle fail with a `Bundle` error whose message names its `what`.
fn assert_bundle_errors(cases: Vec<(&str, Damage)>) {
    for (what, damage) in cases {
        let e = broken(damage);
        assert!(
            matches!(&e, Error::Bundle(m) if m.contains(what)),
            "{what}: {e:?}"
        );
    }
}

#[test]
fn a_valid_bundle_loads_and_runs() {
    let f = Fixture::valid();
    let b = f.open().expect("valid bundle");
    assert_eq!(
        (b.config.hidden, b.config.heads, b.config.layers),
        (4, 2, 1)
    );
    assert_eq!(b.meta.labels, ["no", "yes"]);
    let ad = &b.adapters[QUERY];
    assert_eq!(ad.rank_index, [2, 0]);
    assert_eq!(ad.lora_a.len(), 8);
    // adapter tensors are not base tensors; base tensors are copied as stored
    assert!(!b.tensors.contains_key(&format!("{QUERY}.lora_A")));
    let (_, _, bytes) = &f.tensors["classifier.weight"];
    let want: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(b.tensor("classifier.weight").expect("head").data, want);
    let enc = Encoder::new(&b).expect("encoder");
    let seqs = enc.prepare(&[1, 3, 2], &[1, 1, 1], 1, 3).expect("input");
    let logits = enc
        .forward(
            &seqs,
            Noise::Sampled {
                samples: 2,
                seed: 0,
            },
        )
        .expect("forward");
    assert!(logits.len() == 4 && logits.iter().all(|v| v.is_finite()));
}

#[test]
fn bf16_storage_is_widened_exactly() {
    let mut f = Fixture::valid();
    f.store_as_bf16();
    let b = f.open().expect("bf16 bundle");
    let (_, _, bytes) = &f.tensors["classifier.bias"];
    let want: Vec<f32> = bytes
        .chunks_exact(2)
        .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
        .collect();
    assert_eq!(b.tensor("classifier.bias").expect("bias").data, want);
}

#[test]
fn unreadable_files_keep_their_io_cause() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("nothing-here");
    assert!(matches!(Bundle::open(&missing), Err(Error::Bundle(_))));
    // no bayeslora.json
    let e = Bundle::open(dir.path()).expect_err("empty dir");
    let Error::Io { path, source } = &e else {
        panic!("{e:?}")
    };
    assert!(path.ends_with(META_FILE) && source.kind() == std::io::ErrorKind::NotFound);
    assert!(std::error::Error::source(&e).is_some());
    assert!(e.to_string().starts_with("bundle error: "));
    // no model.safetensors
    Fixture::valid().write(dir.path());
    std::fs::remove_file(dir.path().join(WEIGHTS_FILE)).expect("remove");
    let e = Bundle::open(dir.path()).expect_err("no weights");
    assert!(
        matches!(&e, Error::Io { path, .. } if path.ends_with(WEIGHTS_FILE)),
        "{e:?}"
    );
}

#[test]
fn malformed_json_is_a_syntax_or_schema_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    Fixture::valid().write(dir.path());
    std::fs::write(dir.path().join(META_FILE), "{ not json").expect("write");
    let e = Bundle::open(dir.path()).expect_err("bad json");
    assert!(matches!(&e, Error::JsonSyntax { .. }), "{e:?}");
    assert!(e.to_string().contains("invalid JSON"));
    Fixture::valid().write(dir.path());
    std::fs::write(dir.path().join(CONFIG_FILE), "[1, 2").expect("write");
    let e = Bundle::open(dir.path()).expect_err("bad config json");
    assert!(matches!(&e, Error::JsonSyntax { path, .. } if path.ends_with(CONFIG_FILE)));
    let e = broken(|f| {
        f.meta.as_object_mut().expect("object").remove("num_labels");
    });
    assert!(matches!(&e, Error::JsonSchema { .. }), "{e:?}");
    assert!(e.to_string().contains("num_labels"));
}

#[test]
fn inconsistent_metadata_is_a_bundle_error() {
    let cases: Vec<(&str, Damage)> = vec![
        (
            "format_version",
            Box::new(|f| f.meta["format_version"] = json!(2)),
        ),
        ("method", Box::new(|f| f.meta["method"] = json!("vera"))),
        (
            "architecture",
            Box::new(|f| f.meta["architecture"] = json!("gpt2")),
        ),
        (
            "label names",
            Box::new(|f| f.meta["labels"] = json!(["one"])),
        ),
        (
            "model_type",
            Box::new(|f| f.config["model_type"] = json!("roberta")),
        ),
        (
            "multiple of heads",
            Box::new(|f| f.config["num_attention_heads"] = json!(3)),
        ),
        (
            "\"vocab_size\"",
            Box::new(|f| f.config["vocab_size"] = json!(-1)),
        ),
        (
            "activation",
            Box::new(|f| f.config["hidden_act"] = json!("swish")),
        ),
        (
            "not a linear layer",
            Box::new(|f| {
                f.meta["modules"]["bert.embeddings"] =
                    json!({"rank": 0, "initial_rank": 1, "scale": 1.0, "d_in": 4, "d_out": 4})
            }),
        ),
        (
            "says d_in=",
            Box::new(|f| f.meta["modules"][QUERY]["d_in"] = json!(5)),
        ),
        (
            "max_length 7 exceeds the 6 positions",
            Box::new(|f| f.meta["max_length"] = json!(7)),
        ),
        (
            "has scale",
            Box::new(|f| f.meta["modules"][QUERY]["scale"] = json!(1e308)),
        ),
        (
            "has scale",
            Box::new(|f| f.meta["modules"][QUERY]["scale"] = json!(-2e6)),
        ),
        (
            "dropout",
            Box::new(|f| f.meta["dropout"] = json!(1.0 - 1e-12)),
        ),
        (
            "layer_norm_eps",
            Box::new(|f| f.config["layer_norm_eps"] = json!(0.0)),
        ),
        (
            "layer_norm_eps",
            Box::new(|f| f.config["layer_norm_eps"] = json!(1e-50)),
        ),
        (
            "layer_norm_eps",
            Box::new(|f| f.config["layer_norm_eps"] = json!("small")),
        ),
        (
            "\"hidden_act\" must be a string",
            Box::new(|f| f.config["hidden_act"] = json!(1)),
        ),
        (
            "\"position_embedding_type\" must be a string",
            Box::new(|f| f.config["position_embedding_type"] = json!(["absolute"])),
        ),
        (
            "\"pad_token_id\" = 4294967295",
            Box::new(|f| f.config["pad_token_id"] = json!(u32::MAX)),
        ),
        (
            "\"pad_token_id\" = 18446744073709551615",
            Box::new(|f| f.config["pad_token_id"] = json!(u64::MAX)),
        ),
        (
            "\"pad_token_id\" must be",
            Box::new(|f| f.config["pad_token_id"] = json!(-1)),
        ),
        (
            "\"vocab_size\" = 18446744073709551615",
            Box::new(|f| f.config["vocab_size"] = json!(u64::MAX)),
        ),
        (
            "\"max_position_embeddings\" = 4294967296",
            Box::new(|f| f.config["max_position_embeddings"] = json!(1u64 << 32)),
        ),
        (
            "\"num_attention_heads\" = 0",
            Box::new(|f| f.config["num_attention_heads"] = json!(0)),
        ),
        (
            "\"type_vocab_size\" = 0",
            Box::new(|f| f.config["type_vocab_size"] = json!(0)),
        ),
        (
            "\"hidden_size\" must be a non-negative integer",
            Box::new(|f| f.config["hidden_size"] = json!(4.5)),
        ),
    ];
    assert_bundle_errors(cases);
}

#[test]
fn bad_tensors_are_bundle_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    Fixture::valid().write(dir.path());
    std::fs::write(
        dir.path().join(WEIGHTS_FILE),
        b"\x08\0\0\0\0\0\0\0{}garbage",
    )
    .expect("write");
    let e = Bundle::open(dir.path()).expect_err("garbage");
    assert!(matches!(&e, Error::SafeTensors { .. }), "{e:?}");
    assert!(e.to_string().contains("not a valid safetensors file"));

    let cases: Vec<(&str, Damage)> = vec![
        (
            "missing tensor",
            Box::new(|f| {
                f.tensors.remove("classifier.bias");
            }),
        ),
        (
            "has shape",
            Box::new(|f| f.set_f32("classifier.bias", vec![3], &[0.0; 3])),
        ),
        (
            "has dtype",
            Box::new(|f| f.set_i64(&format!("{QUERY}.log_alpha"), &[0, 0])),
        ),
        (
            "NaN or infinite",
            Box::new(|f| f.set_f32("classifier.bias", vec![2], &[0.0, f32::NAN])),
        ),
        (
            "must be distinct",
            Box::new(|f| f.set_i64(&format!("{QUERY}.rank_index"), &[1, 1])),
        ),
        (
            "must be distinct",
            Box::new(|f| f.set_i64(&format!("{QUERY}.rank_index"), &[0, 3])),
        ),
        (
            "unexpected adapter tensor",
            Box::new(|f| f.set_f32("classifier.lora_A", vec![1, 4], &[0.0; 4])),
        ),
        (
            "base_layer",
            Box::new(|f| f.set_f32("classifier.base_layer.weight", vec![1], &[0.0])),
        ),
    ];
    assert_bundle_errors(cases);
}

#[test]
fn roberta_pad_token_id_is_a_token_with_a_position_after_it() {
    let cfg = |pad: Value| {
        let mut c = json!({
            "model_type": "roberta", "vocab_size": 50, "hidden_size": 4, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 6, "max_position_embeddings": 10,
            "type_vocab_size": 1,
        });
        if !pad.is_null() {
            c["pad_token_id"] = pad;
        }
        super::ModelConfig::from_json(&c, super::Arch::Roberta, Path::new(CONFIG_FILE))
    };
    assert_eq!(cfg(Value::Null).expect("default").pad_token_id, 1);
    assert_eq!(cfg(json!(7)).expect("7").pad_token_id, 7);
    for bad in [
        json!(u32::MAX),
        json!(u64::MAX),
        json!(1u64 << 32),
        json!(-1),
        json!(1.5),
        json!("1"),
        json!(50),
        json!(9),
    ] {
        let e = cfg(bad.clone()).expect_err("out of range");
        assert!(
            matches!(&e, Error::Bundle(m) if m.contains("pad_token_id")),
            "{bad}: {e:?}"
        );
    }
    // explicit null is refused for RoBERTa (it numbers positions from it)
    let mut c = json!({
        "model_type": "roberta", "vocab_size": 50, "hidden_size": 4, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 6, "max_position_embeddings": 10,
        "type_vocab_size": 1, "pad_token_id": null,
    });
    assert!(
        super::ModelConfig::from_json(&c, super::Arch::Roberta, Path::new(CONFIG_FILE)).is_err()
    );
    c["model_type"] = json!("bert");
    assert!(super::ModelConfig::from_json(&c, super::Arch::Bert, Path::new(CONFIG_FILE)).is_ok());
}

#[test]
fn a_merged_weight_that_overflows_is_a_bundle_error() {
    let mut f = Fixture::valid();
    f.meta["modules"][QUERY]["scale"] = json!(1e6);
    f.set_f32(&format!("{QUERY}.lora_B"), vec![4, 2], &[3e37; 8]);
    let b = f.open().expect("loads: every value is finite");
    let e = Encoder::new(&b).expect_err("merged weight overflows");
    assert!(
        matches!(&e, Error::Bundle(m) if m.contains("overflows float32")),
        "{e:?}"
    );
}
