"""`bayeslora score` / `bayeslora export`, scoring without torch, malformed bundles, fork safety."""

from __future__ import annotations

import json
import shutil
import struct
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import bayeslora as bl
from bayeslora import cli
from bayeslora.errors import BundleError, InvalidValueError, ShapeError
from bayeslora.nn.model import adapted_layers
from bayeslora.runtime import Scorer
from runtime_models import adapt, batch, build, softmax, torch_logits, word_tokenizer
from subprocesses import TORCH_MODULES, blocking_shim, run_cli, run_python


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    model = build("bert", 16, 2, 2, 24, 3, seed=21)
    adapt(model, ["query", "value", "classifier"], rank=4, seed=21, log_alpha=(-1.0, 0.5))
    with torch.no_grad():
        next(iter(adapted_layers(model)))[1].rank_mask.zero_()  # a module pruned to rank 0
    return bl.export(model, word_tokenizer(), tmp_path_factory.mktemp("cli") / "bundle")


def test_score_cli_runs_where_torch_cannot_be_imported(bundle, tmp_path):
    shim = blocking_shim(tmp_path / "shim")
    check = run_python("import torch", shim=shim)
    assert check.returncode != 0 and "blocked" in check.stderr
    texts = ["w5 w6 w7", "w40 w41", "w9"]
    res = run_cli(
        ["score", str(bundle), "--text", *texts, "--samples", "8", "--seed", "3", "--threads", "2", "--json"],
        shim=shim,
    )
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["text"] for r in rows] == texts
    want = Scorer(bundle, num_threads=1).score(texts, samples=8, seed=3)
    for i, r in enumerate(rows):
        assert set(r) == {
            "text",
            "label",
            "probs",
            "confidence",
            "entropy",
            "expected_entropy",
            "mutual_info",
            "variance",
        }
        assert r["label"] == f"class_{want['label'][i]}"
        np.testing.assert_allclose(r["probs"], want["probs"][i], rtol=1e-6)
        for k in ("confidence", "entropy", "expected_entropy", "mutual_info", "variance"):
            assert r[k] == pytest.approx(float(want[k][i]), rel=1e-6, abs=1e-9)


def test_runtime_module_never_imports_torch(bundle):
    code = f"""
        import sys
        from bayeslora.runtime import Scorer
        Scorer({str(bundle)!r}).score(["w4 w5"], samples=2)
        bad = [m for m in {TORCH_MODULES!r} if m in sys.modules]
        assert not bad, bad
    """
    res = run_python(code)
    assert res.returncode == 0, res.stderr


def test_score_cli_reads_a_file_and_matches_the_torch_model(tmp_path, capsys):
    model = build("distilbert", 16, 2, 2, 24, 2, seed=22)
    adapt(model, ["q_lin", "v_lin"], rank=3, seed=22)
    out = bl.export(model, word_tokenizer(), tmp_path / "b")
    texts = ["w4 w8 w15", "w60 w61 w62 w63 w5"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n\n")
    assert cli.main(["score", str(out), "--file", str(tmp_path / "in.txt"), "--samples", "0"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tok = word_tokenizer()
    for text, row in zip(texts, rows, strict=True):
        ids = torch.tensor([tok.encode(text).ids])
        want = softmax(torch_logits(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}))[0]
        np.testing.assert_allclose(row["probs"], want, atol=1e-4)
        assert row["mutual_info"] == 0.0 and row["variance"] == 0.0


def test_score_cli_reports_a_bad_bundle_without_a_traceback(tmp_path):
    res = run_cli(["score", str(tmp_path), "--text", "hello"])
    assert res.returncode == 1  # not a usage error: the bundle is bad
    assert "bayeslora.json" in res.stderr and "Traceback" not in res.stderr


def test_export_cli_from_a_saved_adapter_and_base_model(tmp_path, capsys):
    model = build("bert", 16, 2, 2, 24, 3, seed=23)
    model.save_pretrained(tmp_path / "base")
    adapt(model, ["query", "value"], rank=4, seed=23, modules_to_save=["classifier"])
    with torch.no_grad():
        model.classifier.weight.mul_(2.0)  # a trained head travels in modules_to_save
    bl.save_adapter(model, tmp_path / "ckpt")
    code = cli.main(
        [
            "export",
            str(tmp_path / "ckpt"),
            "--model",
            str(tmp_path / "base"),
            "--out",
            str(tmp_path / "bundle"),
            "--json",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total_rank"] == 16
    x = batch(3, 9, seed=24)
    got = Scorer(tmp_path / "bundle").logits(x["input_ids"].numpy(), x["attention_mask"].numpy())
    np.testing.assert_allclose(got, torch_logits(model, x), atol=1e-4)


def test_scorer_forks_safely(bundle):
    code = textwrap.dedent(f"""
        import os, signal, sys
        import numpy as np
        from bayeslora.runtime import Scorer
        s = Scorer({str(bundle)!r}, num_threads=2)
        before = s.score(["w4 w5 w6"] * 8, samples=4, seed=1)["probs"]
        pid = os.fork()
        if pid == 0:
            signal.alarm(60)  # a pool inherited from the parent would hang here
            after = s.score(["w4 w5 w6"] * 8, samples=4, seed=1)["probs"]
            os._exit(0 if np.array_equal(before, after) else 3)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    res = run_python(code)
    assert res.returncode == 0, (res.returncode, res.stderr)


# ---- malformed bundles: a clear BundleError naming the problem, never a crash or a hang ------------
def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bad"
    shutil.copytree(bundle, dst)
    return dst


def rewrite_tensors(path: Path, edit) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def edit_json(path: Path, name: str, edit) -> None:
    data = json.loads((path / name).read_text())
    edit(data)
    (path / name).write_text(json.dumps(data))


Q = "bert.encoder.layer.1.attention.self.query"


def _truncate(p):
    f = p / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _header_len(p):
    f = p / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 1 << 62) + data[8:])


def _absurd_shape(p):
    f = p / "model.safetensors"
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    name = "bert.embeddings.word_embeddings.weight"
    header[name]["shape"] = [10**12, 10**7]
    text = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])


def _del(name):
    return lambda p: rewrite_tensors(p, lambda t: t.pop(name))


def _set(name, value):
    def edit(t):
        t[name] = value(t[name])

    return lambda p: rewrite_tensors(p, edit)


def _put(name, value):
    return lambda p: rewrite_tensors(p, lambda t: t.__setitem__(name, value))


MALFORMED = {
    "truncated file": (_truncate, "not a valid safetensors file"),
    "absurd header length": (_header_len, "not a valid safetensors file"),
    "absurd tensor shape": (_absurd_shape, "not a valid safetensors file"),
    "empty file": (lambda p: (p / "model.safetensors").write_bytes(b""), "not a valid safetensors file"),
    "missing weights file": (lambda p: (p / "model.safetensors").unlink(), "model.safetensors"),
    "missing base tensor": (_del("bert.pooler.dense.weight"), 'missing tensor "bert.pooler.dense.weight"'),
    "missing adapter tensor": (_del(f"{Q}.lora_B"), f'missing tensor "{Q}.lora_B"'),
    "wrong base shape": (_set("classifier.weight", lambda v: v[:2]), '"classifier.weight" has shape [2, 16]'),
    "wrong adapter shape": (_set(f"{Q}.lora_A", lambda v: v[:, :8]), f'"{Q}.lora_A" has shape [4, 8]'),
    "wrong dtype": (
        _set("classifier.bias", lambda v: v.astype(np.float16)),
        '"classifier.bias" has dtype F16',
    ),
    "NaN weights": (_set("classifier.bias", lambda v: v * np.nan), "NaN"),
    "rank_index out of range": (_set(f"{Q}.rank_index", lambda v: v + 7), "rank_index"),
    "duplicate rank_index": (_set(f"{Q}.rank_index", lambda v: np.zeros_like(v)), "distinct"),
    "stray adapter tensor": (
        _put("bert.encoder.layer.0.attention.self.key.lora_A", np.zeros((4, 16), np.float32)),
        "unexpected adapter tensor",
    ),
    "base_layer name": (_put(f"{Q}.base_layer.weight", np.zeros((16, 16), np.float32)), "base_layer"),
    "bad bayeslora.json": (lambda p: (p / "bayeslora.json").write_text("{not json"), "invalid JSON"),
    "bad config.json": (lambda p: (p / "config.json").write_text("[1, 2"), "invalid JSON"),
    "missing field": (lambda p: edit_json(p, "bayeslora.json", lambda d: d.pop("modules")), "modules"),
    "wrong format version": (
        lambda p: edit_json(p, "bayeslora.json", lambda d: d.update(format_version=9)),
        "format_version",
    ),
    "unknown architecture": (
        lambda p: edit_json(p, "bayeslora.json", lambda d: d.update(architecture="gpt2")),
        "architecture",
    ),
    "absurd hidden size": (
        lambda p: edit_json(p, "config.json", lambda d: d.update(hidden_size=10**12)),
        "hidden_size",
    ),
    "rank above initial rank": (
        lambda p: edit_json(p, "bayeslora.json", lambda d: d["modules"][Q].update(rank=9)),
        "initial_rank",
    ),
    "module that is not a linear": (
        lambda p: edit_json(
            p,
            "bayeslora.json",
            lambda d: d["modules"].update(
                {"bert.embeddings": {"rank": 0, "initial_rank": 4, "scale": 1.0, "d_in": 1, "d_out": 1}}
            ),
        ),
        "not a linear layer",
    ),
    "labels do not match": (
        lambda p: edit_json(p, "bayeslora.json", lambda d: d.update(labels=["a"])),
        "label",
    ),
    "missing bundle json": (lambda p: (p / "bayeslora.json").unlink(), "bayeslora.json"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_bundle_raises_bundle_error(case, bundle, tmp_path):
    corrupt, message = MALFORMED[case]
    bad = copy_bundle(bundle, tmp_path)
    corrupt(bad)
    with pytest.raises(BundleError) as info:
        Scorer(bad)
    assert message in str(info.value)
    assert isinstance(info.value, OSError)


def test_bundle_that_is_not_a_directory(tmp_path):
    with pytest.raises(BundleError, match="not a directory"):
        Scorer(tmp_path / "nothing")


def test_bad_inputs_raise_typed_errors(bundle):
    s = Scorer(bundle, num_threads=1)
    ids = np.array([[2, 5, 6, 3]])
    with pytest.raises(InvalidValueError, match="outside the vocabulary"):
        s.score((np.array([[2, 64]]), np.ones((1, 2))))
    with pytest.raises(InvalidValueError, match="no attended tokens"):
        s.score((ids, np.zeros_like(ids)))
    with pytest.raises(ShapeError):
        s.score((ids, np.ones((1, 3))))
    with pytest.raises(InvalidValueError, match="too long"):
        s.score(np.full((1, 80), 5))
    with pytest.raises(ShapeError, match="gates"):
        s.logits(ids, gates={Q: np.ones((2, 4), np.float32)})
    with pytest.raises(InvalidValueError, match="not an adapted module"):
        s.logits(ids, gates={"bert.pooler.dense": np.ones((1, 4), np.float32)})
    with pytest.raises(ValueError, match="seed"):
        s.score(ids, samples=2, seed=-1)


def test_scorer_checks_its_arguments_before_the_core(bundle):
    with pytest.raises(InvalidValueError, match=r"num_threads must be in 1\.\.1024, got 0"):
        Scorer(bundle, num_threads=0)
    for bad in (True, 2.0, "2", 10**30):
        with pytest.raises(InvalidValueError, match="num_threads"):
            Scorer(bundle, num_threads=bad)
    s = Scorer(bundle, num_threads=np.int64(1))
    ids = np.array([[2, 5, 6, 3]])
    for kwargs, message in [
        ({"samples": -1}, r"samples must be in 0\.\.1048576, got -1"),
        ({"samples": 2**64}, r"samples must be in 0\.\.1048576"),
        ({"samples": 1.5}, "samples must be an integer"),
        ({"seed": -1}, r"seed must be in 0\.\.9223372036854775807, got -1"),
        ({"seed": 2**64}, r"seed must be in 0\.\.9223372036854775807"),
        ({"seed": None}, "seed must be an integer"),
    ]:
        with pytest.raises(InvalidValueError, match=message):
            s.score(ids, **kwargs)
        with pytest.raises(InvalidValueError, match=message):
            s.records(["w5"], **kwargs)
    with pytest.raises(InvalidValueError, match=r"samples must be in 1\.\."):
        s.sample_logits(ids, samples=0)
    with pytest.raises(InvalidValueError, match="seed"):
        s.sample_logits(ids, samples=2, seed=2**63)
    want = s.score(["w5 w6", "w7"], samples=2, seed=np.uint64(3))
    for texts in (
        np.array(["w5 w6", "w7"]),
        np.array(["w5 w6", "w7"], dtype=object),
        [np.str_("w5 w6"), "w7"],
    ):
        got = s.score(texts, samples=2, seed=3)
        np.testing.assert_array_equal(got["probs"], want["probs"])
    assert s.records(np.array(["w5"]))[0]["text"] == "w5"
    for inputs, message in [
        (["w5", 3], "item 1 is a int"),
        (["w5", b"w6"], "item 1 is a bytes"),
        (["w5", "w6 \udcff"], "text 1 is not valid Unicode: lone surrogate"),
        (5, "not int"),
        ({"attention_mask": ids}, "input_ids"),
    ]:
        with pytest.raises(InvalidValueError, match=message):
            s.score(inputs)
    with pytest.raises(ShapeError, match="one-dimensional"):
        s.score(np.array([["w5"]]))


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--threads", "0"], 2, "--threads must be in 1..1024"),
        (["--seed", "-1"], 2, "--seed must be in 0..9223372036854775807"),
        (["--seed", str(2**64)], 2, "--seed must be in"),
        (["--samples", "-2"], 2, "--samples must be in 0..1048576"),
        (["--text", "w5", "\udcff"], 2, "--text: argument 2 is not valid UTF-8"),
        (["--file", "BINARY"], 1, "is not UTF-8 text (byte 2, line 1)"),
        (["--file", "MISSING"], 1, "cannot read"),
    ],
)
def test_score_cli_bad_arguments_print_one_line(bundle, tmp_path, args, code, message):
    (tmp_path / "BINARY").write_bytes(b"w5\xff\xfe\x00\x01\n")
    args = [str(tmp_path / a) if a in ("BINARY", "MISSING") else a for a in args]
    if "--text" not in args and "--file" not in args:
        args = ["--text", "w5", *args]
    res = run_cli(["score", str(bundle), *args])
    assert res.returncode == code, res.stderr
    assert res.stderr.startswith("bayeslora: error: ") and res.stderr.count("\n") == 1, res.stderr
    assert message in res.stderr and res.stdout == ""


def test_cli_guard_maps_every_exception_to_one_line(bundle, monkeypatch, capsys):
    import bayeslora.runtime

    for error, code, want in [
        (
            PermissionError(13, "Permission denied", "/x"),
            1,
            "PermissionError: [Errno 13] Permission denied: '/x'",
        ),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), 1, "UnicodeDecodeError: 'utf-8'"),
        (ValueError("bad\nvalue"), 1, "ValueError: bad value"),
        (RuntimeError("boom"), 1, "internal error, RuntimeError: boom"),
    ]:

        def broken(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(bayeslora.runtime, "Scorer", broken)
        assert cli.main(["score", str(bundle), "--text", "w5"]) == code
        err = capsys.readouterr().err
        assert err.startswith("bayeslora: error: ") and err.count("\n") == 1 and want in err, err
    monkeypatch.setenv("BAYESLORA_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["score", str(bundle), "--text", "w5"])
