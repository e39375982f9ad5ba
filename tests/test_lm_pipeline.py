"""Causal LMs end to end (issue #14, part 2), on tiny random models: the blocks, pairs and the
dynamic-padding collator by hand, ``bayeslora train --task causal-lm`` / ``evaluate`` / ``export-peft``
through a subprocess (PEFT's own loader as the reference), the one-line refusals, bf16 and
gradient checkpointing, and the text sources. The real SmolLM2 is in tests/test_lm_real.py."""

from __future__ import annotations

import json
import math
import random
import warnings

import pytest
import torch
from peft import PeftModel, PeftModelForCausalLM
from transformers import AutoModelForCausalLM

import bayeslora as bl
import tiny_models as tm
from bayeslora.data.text import _contiguous_parts, load_text_source, play_text, read_jsonl
from bayeslora.errors import DataError
from bayeslora.lm import IGNORE_INDEX, encode_texts
from bayeslora.nn.model import adapted_layers
from bayeslora.train.lm_data import CausalLMCollator, block_rows, pair_rows
from bayeslora.train.lm_pipeline import LMSettings, load_lm_checkpoint, train_lm
from subprocesses import run_cli
from test_lm import _tokenizer

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")


def _cli(*args: str, timeout: int = 600):
    return run_cli(args, env_extra={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, timeout=timeout)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A tiny random Llama causal LM with a word-level tokenizer (w4 … w63), a text file whose words
    follow a pattern, an out-of-domain text of other words, and a prompt/response jsonl file."""
    root = tmp_path_factory.mktemp("tiny-lm")
    tm.build_causal_lm("llama").save_pretrained(root / "model")
    _tokenizer().save_pretrained(root / "model")
    r = random.Random(0)
    lines = [
        " ".join(
            f"w{4 + (i * 3 + j) % 20}" if r.random() < 0.8 else f"w{r.randrange(4, 64)}" for j in range(12)
        )
        for i in range(200)
    ]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    ood = [" ".join(f"w{r.randrange(40, 64)}" for _ in range(12)) for _ in range(40)]
    (root / "ood.txt").write_text("\n".join(ood) + "\n")
    with open(root / "pairs.jsonl", "w") as f:
        for i in range(60):
            f.write(
                json.dumps({"prompt": f"w{4 + i % 10} w5", "response": f" w{10 + i % 10} w{11 + i % 10}"})
                + "\n"
            )
    return root


# ---- rows and the collator ------------------------------------------------------------------------
def test_block_rows_join_documents_with_eos_and_cut_blocks():
    tok = _tokenizer()
    rows = block_rows(tok, ["w4 w5 w6", "w7", "w8 w9"], block_size=4)
    # <s> w4 w5 w6 </s> <s> w7 </s> <s> w8 w9 </s>  (BOS 1, EOS 2)
    stream = [1, 4, 5, 6, 2, 1, 7, 2, 1, 8, 9, 2]
    assert [r["input_ids"] for r in rows] == [stream[0:4], stream[4:8], stream[8:12]]
    assert all(r["labels"] == r["input_ids"] for r in rows)
    # <s> w4 w5 w6 w7 | </s>: a last block of one token predicts nothing and is dropped
    assert [r["input_ids"] for r in block_rows(tok, ["w4 w5 w6 w7"], 5)] == [[1, 4, 5, 6, 7]]


def test_pair_rows_label_only_the_response():
    tok = _tokenizer()
    rows = pair_rows(tok, [("w4 w5", " w6 w7"), ("w8", " w9")], max_length=16)
    assert rows[0] == {"input_ids": [1, 4, 5, 6, 7, 2], "labels": [-100, -100, -100, 6, 7, 2]}
    assert rows[1] == {"input_ids": [1, 8, 9, 2], "labels": [-100, -100, 9, 2]}
    # cut inside the prompt: nothing to predict, the row is dropped
    assert pair_rows(tok, [("w4 w5 w6 w7", " w8")], max_length=3) == []


def test_collator_pads_dynamically_like_encode_texts():
    tok = _tokenizer()
    texts = ["w4 w5 w6 w7 w8", "w9", "w10 w11"]
    rows = [{"input_ids": tok(t)["input_ids"]} for t in texts]
    batch = CausalLMCollator.for_tokenizer(tok)(rows)
    ref = encode_texts(tok, texts)
    for k in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch[k], ref[k]), k
    assert batch["input_ids"].shape == (3, 6)  # the longest row of this batch, not of a data set
    assert batch["input_ids"][1, 2:].tolist() == [0] * 4 and batch["labels"][1, 2:].tolist() == [-100] * 4
    padded = CausalLMCollator(pad_id=0, pad_to_multiple_of=4)(rows)
    assert padded["input_ids"].shape == (3, 8) and int(padded["attention_mask"].sum()) == 6 + 2 + 3
    labels = CausalLMCollator(pad_id=0)([{"input_ids": [1, 4, 5], "labels": [-100, 4, 5]}])["labels"]
    assert labels.tolist() == [[IGNORE_INDEX, 4, 5]]
    with pytest.raises(DataError):
        CausalLMCollator(pad_id=0)([{"input_ids": [1, 2], "labels": [1]}])


# ---- text sources -------------------------------------------------------------------------------
def test_text_file_parts_are_contiguous_and_cover_the_text():
    text = "".join(f"line {i}\n" for i in range(100))
    parts = _contiguous_parts(text)
    assert "".join(parts["train"] + parts["validation"] + parts["test"]) == text
    assert parts["train"][0].startswith("line 0\n") and parts["test"][0].endswith("line 99\n")
    assert 0.75 < len(parts["train"][0]) / len(text) < 0.85


def test_jsonl_records_and_their_errors(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"prompt": "a", "response": " b"}\n\n{"prompt": "c", "response": " d"}\n')
    assert read_jsonl(p) == ([], [("a", " b"), ("c", " d")])
    p.write_text('{"text": "a"}\n{"prompt": "c", "response": " d"}\n')
    with pytest.raises(DataError, match="mixes"):
        read_jsonl(p)
    p.write_text('{"prompt": "c"}\n')
    with pytest.raises(DataError, match="line 1"):
        read_jsonl(p)
    with pytest.raises(DataError, match="unknown text source"):
        load_text_source("csv:x")


def test_play_markdown_becomes_plain_text():
    md = (
        "# Macbeth\n\n## ACT I\n\n_Thunder. Enter three Witches_\n\n"
        "**First Witch**  \nWhen shall we meet  \nIn rain?\n"
    )
    assert (
        play_text(md)
        == "Macbeth\n\nACT I\n\nThunder. Enter three Witches\n\nFirst Witch:\nWhen shall we meet\nIn rain?\n"
    )


# ---- the command line --------------------------------------------------------------------------------
def _train_args(lm_dir, out, data: str, *extra: str) -> list[str]:
    return [
        "train",
        "--task",
        "causal-lm",
        "--model",
        str(lm_dir / "model"),
        "--data",
        data,
        "--rank",
        "4",
        "--max-length",
        "16",
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--lr",
        "5e-3",
        "--samples",
        "2",
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.slow
def test_cli_train_evaluate_export_peft_on_text(lm_dir, tmp_path):
    out = tmp_path / "run"
    res = _cli(*_train_args(lm_dir, out, f"text:{lm_dir / 'train.txt'}", "--kl-temper", "0.1"), "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    run = json.loads((out / "run.json").read_text())
    assert run["task"] == "causal-lm" and summary["num_train"] == run["num_train"] > 0
    assert run["kl_scale"] == pytest.approx(0.1 / run["tokens_per_sequence"])  # --kl-temper 0.1
    history = [h for h in run["log_history"] if "nll" in h]
    assert history[-1]["nll"] < history[0]["nll"]  # it learnt the pattern
    for key in ("test_mean", "test_mc", "validation_mean", "validation_mc"):
        m = run["metrics"][key]
        assert m["perplexity"] == pytest.approx(math.exp(m["nll"]))

    # evaluate: mean mode and MC, OOD AUROC from per-sequence scores
    res = _cli("evaluate", str(out), "--ood", f"text:{lm_dir / 'ood.txt'}", "--samples", "2", "--json")
    assert res.returncode == 0, res.stderr
    ev = json.loads(res.stdout)
    assert ev["task"] == "causal-lm" and set(ev["in_domain"]) == {"mean", "mc"}
    ood = ev["ood"][f"text:{lm_dir / 'ood.txt'}"]
    assert {"auroc_sequence_nll", "auroc_sequence_mutual_info", "fpr95_sequence_entropy"} <= set(ood)
    assert ood["auroc_sequence_nll"] > 0.7  # words outside the pattern surprise it (0.83 seen; chance 0.5)
    # its in-domain numbers are the checkpoint's own, recomputed from the file
    model, tok, _ = load_lm_checkpoint(out)
    from bayeslora.train.lm_data import source_rows
    from bayeslora.train.lm_pipeline import lm_metrics

    rows = source_rows(tok, load_text_source(f"text:{lm_dir / 'train.txt'}"), "all", 16)
    assert ev["in_domain"]["mean"]["nll"] == pytest.approx(lm_metrics(model, rows, 0, 0)["nll"], rel=1e-6)

    # export-peft: task_type CAUSAL_LM, and PEFT's model gives our mean-mode logits
    res = _cli("export-peft", str(out), "--out", str(tmp_path / "peft"), "--json")
    assert res.returncode == 0, res.stderr
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM"
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(lm_dir / "model"), str(tmp_path / "peft")
    ).eval()
    assert isinstance(peft, PeftModelForCausalLM)
    inputs = tm.batch(n=3, t=8, seed=2)
    with torch.no_grad(), bl.sampling(model, False):
        assert torch.allclose(model(**inputs).logits, peft(**inputs).logits, atol=1e-5)

    # the runtime bundle refuses a causal LM in one line
    res = _cli("export", str(out), "--out", str(tmp_path / "bundle"))
    assert res.returncode == 1 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_train_on_prompt_response_pairs(lm_dir, tmp_path):
    out = tmp_path / "pairs"
    res = _cli(*_train_args(lm_dir, out, f"jsonl:{lm_dir / 'pairs.jsonl'}", "--method", "lora"), "--json")
    assert res.returncode == 0, res.stderr
    run = json.loads((out / "run.json").read_text())
    # 48 training pairs of 6 tokens, the 3 response tokens (w, w, EOS) predicted
    assert run["num_train"] == 48 and run["tokens_per_sequence"] == 3.0
    assert "test_mc" not in run["metrics"] and run["metrics"]["test_mean"]["tokens"] == 6 * 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--rank-select", "threshold"], "does not take --rank-select"),
        (["--bf16", "--fp16"], "exclude each other"),
    ],
)
def test_cli_refusals_are_one_line(lm_dir, tmp_path, extra, message):
    res = _cli(*_train_args(lm_dir, tmp_path / "x", f"text:{lm_dir / 'train.txt'}", *extra))
    assert res.returncode == 1 and message in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_causal_lm_options_without_the_task_are_refused_in_one_line(tmp_path):
    res = _cli("train", "--out", str(tmp_path / "x"), "--bf16", "--kl-temper", "0.3")
    assert res.returncode == 1 and "--bf16, --kl-temper: for --task causal-lm only" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_the_default_kl_tempering_is_the_validation_choice():
    from bayeslora.train.lm_pipeline import LM_KL_TEMPER

    # benches/RESULTS_lm.md: 0 had the lowest validation MC NLL of {1, 0.3, 0.1, 0.01, 0}
    assert LMSettings().kl_temper == LM_KL_TEMPER == 0.0
    with pytest.raises(bl.errors.ConfigError, match="kl_temper must be >= 0"):
        LMSettings(kl_temper=-1.0)


def test_cli_refuses_a_bad_jsonl_in_one_line(lm_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w4"}\n')
    res = _cli(*_train_args(lm_dir, tmp_path / "x", f"jsonl:{bad}"))
    assert res.returncode == 1 and "line 1" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()  # the failed run removed the output directory it created


# ---- dtypes and gradient checkpointing -------------------------------------------------------------
def _short_run(model_dir, lm_dir, out, **options):
    """A 4-step rank-4 run on the pattern text, noise and KL from the first step; its summary."""
    settings = LMSettings(
        model=str(model_dir),
        data=f"text:{lm_dir / 'train.txt'}",
        rank=4,
        max_length=16,
        epochs=1,
        max_train=32,
        max_eval=8,
        samples=2,
        kl_freeze=0,
        sample_start=0,
        **options,
    )
    return train_lm(settings, out, progress=False, log=lambda *a: None)


def test_bf16_training_keeps_the_adapters_float32(lm_dir, tmp_path):
    summary = _short_run(lm_dir / "model", lm_dir, tmp_path / "bf16", bf16=True)
    model = summary["model"]
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    layers = [layer for _, layer in adapted_layers(model)]
    assert layers and all(
        p.dtype == torch.float32 for layer in layers for p in layer.parameters(recurse=False)
    )
    assert all(v == v for v in summary["metrics"]["test_mc"].values())  # no NaN


def test_load_in_4bit_trains_float32_adapters_on_bitsandbytes_nf4_layers(lm_dir, tmp_path):
    """QLoRA: the base's linear layers are bitsandbytes' NF4 ``Linear4bit`` (on the CPU here), the
    adapters float32; the Trainer accepts the quantized base, training moves the factors, and the
    saved adapter evaluates on the float32 base through the CLI."""
    import bitsandbytes as bnb

    model_dir = tmp_path / "m64"  # bitsandbytes' CPU kernel packs the output rows in blocks of 32
    tm.build_causal_lm("llama", hidden=64, heads=4, inter=128).save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    summary = _short_run(model_dir, lm_dir, tmp_path / "q", load_in_4bit=True)
    model = summary["model"]
    assert model.is_quantized and "_hf_peft_config_loaded" not in vars(model)  # the flag was scoped
    layers = [layer for _, layer in adapted_layers(model)]
    assert layers and all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for layer in layers)
    assert all(p.dtype == torch.float32 for layer in layers for p in layer.parameters(recurse=False))
    # lora_B starts in U(-1e-3, 1e-3): beyond that, the optimiser moved it through the 4-bit base
    assert all(layer.lora_B.abs().max() > 1.5e-3 for layer in layers)
    assert all(math.isfinite(v) for v in summary["metrics"]["test_mc"].values())
    res = _cli("evaluate", str(tmp_path / "q"), "--samples", "2", "--json")
    assert res.returncode == 0, res.stderr
    assert math.isfinite(json.loads(res.stdout)["in_domain"]["mc"]["perplexity"])


def test_load_in_4bit_without_bitsandbytes_is_one_config_error(monkeypatch):
    import importlib.util

    from bayeslora.errors import ConfigError
    from bayeslora.train.lm_pipeline import quantization_config

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"needs bitsandbytes: pip install 'bayeslora\[qlora\]'"):
        quantization_config(LMSettings(load_in_4bit=True))
    assert quantization_config(LMSettings()) is None


def test_load_in_4bit_on_cpu_refuses_layers_bitsandbytes_cannot_pack(lm_dir):
    from bayeslora.errors import ConfigError
    from bayeslora.train.lm_pipeline import load_lm

    if torch.cuda.is_available():
        pytest.skip("the block-of-32 rule is bitsandbytes' CPU kernel's; CUDA has none")
    with pytest.raises(ConfigError, match=r"out_features.*multiple of 32"):
        load_lm(lm_dir / "model", LMSettings(load_in_4bit=True))  # hidden 16


def test_gradient_checkpointing_replays_the_same_noise():
    """With the noise on, the gradients with checkpointing equal those without: the recomputed
    forward draws the same noise from the restored global RNG."""
    from bayeslora.train.lm_pipeline import cast_and_checkpoint

    batch = tm.batch(n=3, t=8, seed=1)
    grads = []
    for checkpointing in (False, True):
        model = bl.inject(
            tm.build_causal_lm("llama"),
            bl.BayesLoRAConfig(
                rank=4, target_modules=["q_proj", "v_proj"], posterior="gate", init_log_alpha=0.0
            ),
        )
        cast_and_checkpoint(model, LMSettings(gradient_checkpointing=checkpointing))
        model.train()
        torch.manual_seed(7)
        with bl.sampling(model, True):
            model(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
