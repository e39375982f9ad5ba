"""Hardening of the Rust runtime (issue 13), from Python: special files in a bundle, files that
change while they are loaded, bounded memory for many samples, non-finite results, out-of-range
numbers in a bundle, and a soak of one Scorer under threads, a fork and bundles replaced under it.

Whatever could hang or kill the interpreter runs in a subprocess with a timeout, so a regression
fails the test instead of the suite."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import bayeslora as bl
from bayeslora import _core
from bayeslora.errors import BundleError, InvalidValueError
from bayeslora.runtime import MAX_SAMPLES, Scorer
from runtime_models import adapt, build, word_tokenizer

PYTHON_DIR = Path(bl.__file__).resolve().parent.parent
TESTS_DIR = Path(__file__).resolve().parent
FILES = ("bayeslora.json", "config.json", "model.safetensors")
WORDS = "w4 w5 w6"
BIG = 3e38  # finite in float32, overflows when added to itself


def tiny(family: str = "bert", seed: int = 3):
    model = build(family, 8, 2, 1, 8, 2, seed=seed)
    targets = ["query", "classifier"] if family == "bert" else ["query", "out_proj"]
    return adapt(model, targets, rank=2, seed=seed)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return bl.export(tiny(), word_tokenizer(), tmp_path_factory.mktemp("hard") / "bundle")


@pytest.fixture(scope="module")
def roberta_bundle(tmp_path_factory) -> Path:
    return bl.export(tiny("roberta"), None, tmp_path_factory.mktemp("hard") / "roberta")


def copy_bundle(src: Path, tmp_path: Path, name: str = "bad") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def run_py(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (this checkout's package first); killed after ``timeout``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PYTHON_DIR), str(TESTS_DIR)])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def signal_name(returncode: int) -> str:
    return signal.Signals(-returncode).name if returncode < 0 else f"exit {returncode}"


# ---- special files: refused from their type, never opened for a read that could block or not end
LOAD_EXPECTING_BUNDLE_ERROR = """
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    from bayeslora.errors import BundleError
    from bayeslora.runtime import Scorer
    try:
        Scorer({path!r}, num_threads=1)
    except BundleError as e:
        print(e)
        sys.exit(0)
    sys.exit("loaded")
"""


def make_special(path: Path, how: str, tmp_path: Path) -> None:
    """Put a special file of kind ``how`` at ``path`` (which must not exist)."""
    if how == "fifo":
        os.mkfifo(path)
    elif how == "symlink to a fifo":
        os.mkfifo(tmp_path / "pipe")
        path.symlink_to(tmp_path / "pipe")
    elif how == "symlink to /dev/zero":
        path.symlink_to("/dev/zero")
    elif how == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))  # the socket file stays after the socket closes
        sock.close()
    else:
        path.mkdir()


SPECIAL = ["fifo", "symlink to a fifo", "symlink to /dev/zero", "socket", "directory"]


@pytest.mark.parametrize("how", SPECIAL)
@pytest.mark.parametrize("name", FILES)
def test_special_files_are_refused_quickly(name, how, bundle, tmp_path):
    bad = copy_bundle(bundle, tmp_path)
    (bad / name).unlink()
    make_special(bad / name, how, tmp_path)
    res = run_py(LOAD_EXPECTING_BUNDLE_ERROR.format(path=str(bad)))
    assert res.returncode == 0, (signal_name(res.returncode), res.stdout, res.stderr)
    assert "not a regular file" in res.stdout and name in res.stdout, res.stdout


@pytest.mark.parametrize("how", SPECIAL)
def test_special_tokenizer_file_is_refused_quickly(how, bundle, tmp_path):
    bad = copy_bundle(bundle, tmp_path)
    (bad / "tokenizer.json").unlink()
    make_special(bad / "tokenizer.json", how, tmp_path)
    code = f"""
        import sys
        from bayeslora.errors import BundleError
        from bayeslora.runtime import Scorer
        s = Scorer({str(bad)!r}, num_threads=1)
        try:
            s.score(["w4"])
        except BundleError as e:
            print(e)
            sys.exit(0)
        sys.exit("scored")
    """
    res = run_py(code)
    assert res.returncode == 0, (signal_name(res.returncode), res.stdout, res.stderr)
    assert "tokenizer.json" in res.stdout, res.stdout


def test_truncated_weights_are_bundle_errors(bundle, tmp_path):
    bad = copy_bundle(bundle, tmp_path)
    data = (bundle / "model.safetensors").read_bytes()
    for keep in (0, 7, 8, 100, len(data) // 2, len(data) - 1):
        (bad / "model.safetensors").write_bytes(data[:keep])
        with pytest.raises(BundleError):
            Scorer(bad, num_threads=1)


def test_truncation_while_loading_never_kills_the_process(tmp_path):
    """A writer rewrites and truncates model.safetensors in a loop while Scorers load it: each load
    succeeds or raises BundleError; the process is never killed by a signal (it was, by SIGBUS,
    when the file was memory-mapped: a 7 MB file leaves the copy-out enough time to be cut short)."""
    model = adapt(build("bert", 256, 4, 2, 1024, 2, seed=1), ["query"], rank=2)
    bad = bl.export(model, None, tmp_path / "big")
    code = f"""
        import os, sys, threading
        from bayeslora.errors import BundleError
        from bayeslora.runtime import Scorer
        path = {str(bad / "model.safetensors")!r}
        data = open(path, "rb").read()
        stop = threading.Event()
        def writer():
            i = 0
            while not stop.is_set():
                with open(path, "r+b") as f:
                    f.write(data)
                    f.flush()
                    f.truncate((i * 7919) % len(data))
                i += 1
        t = threading.Thread(target=writer)
        t.start()
        outcomes = {{"ok": 0, "error": 0}}
        try:
            for _ in range(100):
                try:
                    Scorer({str(bad)!r}, num_threads=1)
                    outcomes["ok"] += 1
                except BundleError:
                    outcomes["error"] += 1
        finally:
            stop.set()
            t.join()
        print(outcomes)
    """
    res = run_py(code, timeout=120)
    assert res.returncode == 0, (signal_name(res.returncode), res.stdout, res.stderr)


# ---- bounded memory and a core that checks S itself -----------------------------------------------
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_many_samples_keep_memory_bounded(bundle):
    """S = 2^20 on one short input, under a 2 GiB address-space limit: the samples run in chunks
    reduced online, so the peak RSS stays small (one block of S copies took ~330 MiB here)."""
    code = f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        import numpy as np
        from bayeslora.runtime import Scorer
        s = Scorer({str(bundle)!r}, num_threads=1)
        out = s.score([{WORDS!r}], samples={MAX_SAMPLES}, seed=0)
        assert all(np.isfinite(v).all() for v in out.values()), out
        # peak RSS of this image (ru_maxrss would include the forking parent's)
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
        print(int(hwm.split()[1]) // 1024)
    """
    res = run_py(code, timeout=120)
    assert res.returncode == 0, (signal_name(res.returncode), res.stderr)
    assert int(res.stdout.split()[-1]) < 200, f"peak RSS {res.stdout.split()[-1]} MiB"


def test_the_core_checks_the_sample_count_itself(bundle):
    rt = _core.Runtime(str(bundle), 1)
    ids = np.array([[2, 4, 5, 3]], dtype=np.int64)
    mask = np.ones_like(ids)
    for samples in (MAX_SAMPLES + 1, 10**7, 2**62):
        with pytest.raises(InvalidValueError, match="samples must be in"):
            rt.score(ids, mask, samples, 0)
        with pytest.raises(InvalidValueError, match="samples must be in"):
            rt.sample_logits(ids, mask, samples, 0)
    for samples in (2**64, 2**200, -1):
        with pytest.raises(InvalidValueError, match="samples must be in"):
            rt.score(ids, mask, samples, 0)
    with pytest.raises(InvalidValueError, match="samples must be in"):
        rt.sample_logits(ids, mask, 0, 0)
    for seed in (-1, 2**63, 2**64, 2**100):
        with pytest.raises(InvalidValueError, match="seed must be in"):
            rt.score(ids, mask, 2, seed)
    for bad in (True, 2.0, "3", None):
        with pytest.raises(InvalidValueError, match="samples must be an integer"):
            rt.sample_logits(ids, mask, bad, 0)
    assert rt.score(ids, mask, np.int64(3), np.uint64(5))["probs"].shape == (1, 2)
    assert rt.score(ids, mask, 3, 0)["probs"].shape == (1, 2)


def test_chunked_samples_match_a_reference_reduction(bundle):
    """The online reduction of S samples (run in chunks when S is large) equals the reduction of
    the per-sample logits computed here."""
    s = Scorer(bundle, num_threads=2)
    ids, mask = s.encode([WORDS, "w7 w8"])
    samples = 3000  # 3000 × 5 rows > the 8192-row budget: this input's samples run in chunks
    logits = s.sample_logits(ids, mask, samples=samples, seed=4).astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    mean = p.mean(1)
    ent = lambda q: -(q * np.log(np.maximum(q, 1e-30))).sum(-1)  # noqa: E731
    out = s.score((ids, mask), samples=samples, seed=4)
    np.testing.assert_allclose(out["probs"], mean, atol=1e-6)
    np.testing.assert_allclose(out["entropy"], ent(mean), atol=1e-6)
    np.testing.assert_allclose(out["expected_entropy"], ent(p).mean(1), atol=1e-6)
    label = mean.argmax(-1)
    np.testing.assert_array_equal(out["label"], label)
    np.testing.assert_allclose(out["variance"], p[np.arange(2), :, label].var(1), atol=1e-6)
    # one input alone is scored as in the batch
    alone = s.score((ids[1:], mask[1:]), samples=samples, seed=4)
    np.testing.assert_array_equal(alone["probs"], out["probs"][1:])


# ---- no silent garbage ----------------------------------------------------------------------------
def rewrite_tensors(path: Path, edit) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_non_finite_logits_name_the_input(bundle, tmp_path):
    bad = copy_bundle(bundle, tmp_path)

    def poison(t):  # token "w9" embeds to 3e38: the embedding LayerNorm overflows
        t["bert.embeddings.word_embeddings.weight"][9] = BIG

    rewrite_tensors(bad, poison)
    s = Scorer(bad, num_threads=1)
    for samples in (0, 4):
        with pytest.raises(InvalidValueError, match=r"\binput 1: .*not finite"):
            s.score(["w4 w5", "w9 w4", "w5"], samples=samples)
    # the index is the input's index in the whole request (texts are scored 1024 at a time)
    texts = ["w4"] * 1030
    texts[1027] = "w9"
    with pytest.raises(InvalidValueError, match=r"\binput 1027: "):
        s.score(texts)
    ids, mask = s.encode(["w5", "w9"])
    with pytest.raises(InvalidValueError, match=r"\binput 1: "):
        s.logits(ids, mask)
    with pytest.raises(InvalidValueError, match=r"\binput 1: "):
        s.sample_logits(ids, mask, samples=2)
    assert np.isfinite(s.score(["w4 w5"], samples=4)["probs"]).all()


def test_explicit_gates_that_overflow_name_the_input(tmp_path):
    model = adapt(build("bert", 8, 2, 1, 8, 2, seed=5), ["value"], rank=2, seed=5)
    s = Scorer(bl.export(model, word_tokenizer(), tmp_path / "b"), num_threads=1)
    ids, mask = s.encode(["w4 w5", "w6", "w7 w8"])
    (name, rank), *_ = s.module_ranks.items()
    gates = np.ones((3, rank), np.float32)
    gates[2] = 1e38
    with pytest.raises(InvalidValueError, match=r"\binput 2: "):
        s.logits(ids, mask, gates={name: gates})


@pytest.mark.parametrize("scale", [1e308, -1e308, 1e7])
def test_absurd_scale_is_a_bundle_error(scale, bundle, tmp_path):
    bad = copy_bundle(bundle, tmp_path)

    def edit(d):
        for m in d["modules"].values():
            m["scale"] = scale

    edit_json(bad / "bayeslora.json", edit)
    with pytest.raises(BundleError, match="scale"):
        Scorer(bad)


# ---- integers and floats of config.json / bayeslora.json are range-checked --------------------------
CONFIG_CASES = [
    ("pad_token_id", 2**32 - 1),
    ("pad_token_id", 2**64 - 1),
    ("pad_token_id", 2**63),
    ("pad_token_id", -1),
    ("pad_token_id", 1.5),
    ("pad_token_id", "1"),
    ("pad_token_id", None),
    ("vocab_size", 2**64 - 1),
    ("vocab_size", 2**32),
    ("vocab_size", 0),
    ("max_position_embeddings", 2**32 + 66),
    ("max_position_embeddings", 1),
    ("num_attention_heads", 3),
    ("num_attention_heads", 0),
    ("num_attention_heads", 2**32 + 2),
    ("hidden_size", 2**32 + 8),
    ("num_hidden_layers", 2**64 - 1),
    ("intermediate_size", -8),
    ("type_vocab_size", 0),
    ("type_vocab_size", 2**32 + 1),
    ("layer_norm_eps", 0.0),
    ("layer_norm_eps", -1e-5),
    ("layer_norm_eps", 1e-50),
    ("layer_norm_eps", 2.0),
    ("hidden_act", 7),
]


@pytest.mark.parametrize(("key", "value"), CONFIG_CASES, ids=[f"{k}={v}" for k, v in CONFIG_CASES])
def test_out_of_range_config_numbers_are_bundle_errors(key, value, roberta_bundle, tmp_path):
    bad = copy_bundle(roberta_bundle, tmp_path)
    edit_json(bad / "config.json", lambda d: d.update({key: value}))
    with pytest.raises(BundleError) as info:
        Scorer(bad, num_threads=1)
    assert "config.json" in str(info.value)


def test_pad_token_id_in_range_is_still_used(roberta_bundle, tmp_path):
    """A valid pad_token_id other than 1 changes the positions (the logits), as in HF."""
    other = copy_bundle(roberta_bundle, tmp_path)
    edit_json(other / "config.json", lambda d: d.update(pad_token_id=0))
    ids = np.array([[0, 5, 6, 2]], dtype=np.int64)
    a = Scorer(roberta_bundle, num_threads=1).logits(ids)
    b = Scorer(other, num_threads=1).logits(ids)
    assert np.isfinite(a).all() and np.isfinite(b).all() and not np.array_equal(a, b)


META_CASES = [
    ("num_labels", 2**64 - 1),
    ("num_labels", 2**32 + 2),
    ("max_length", 2**64 - 1),
    ("max_length", 65),  # the tiny BERT has 64 positions
    ("format_version", 2**32 + 1),
    ("dropout", 1.0 - 1e-12),
    ("dropout", -0.5),
    ("modules.rank", 2**64 - 1),
    ("modules.initial_rank", 2**32 + 4),
    ("modules.d_in", 2**64 - 1),
    ("modules.d_out", -1),
]


@pytest.mark.parametrize(("key", "value"), META_CASES, ids=[f"{k}={v}" for k, v in META_CASES])
def test_out_of_range_bundle_json_numbers_are_bundle_errors(key, value, bundle, tmp_path):
    bad = copy_bundle(bundle, tmp_path)

    def edit(d):
        if key.startswith("modules."):
            for m in d["modules"].values():
                m[key.split(".", 1)[1]] = value
        else:
            d[key] = value

    edit_json(bad / "bayeslora.json", edit)
    with pytest.raises(BundleError):
        Scorer(bad, num_threads=1)


# ---- soak: one Scorer, threads, a fork, bundles replaced in the same directory --------------------
SOAK = """
    import os, shutil, signal, sys, threading, time
    import numpy as np
    import bayeslora as bl
    from bayeslora._atomic import write_dir_atomically
    from bayeslora.runtime import Scorer
    from test_hardening_runtime import tiny
    from runtime_models import word_tokenizer

    signal.alarm(100)  # a deadlock fails the test instead of hanging it
    parent = {parent!r}
    model, tok = tiny(), word_tokenizer()
    path = bl.export(model, tok, os.path.join(parent, "model"))
    scorer = Scorer(path, num_threads=2)
    texts = [["w4 w5 w6", "w7"], ["w8 w9 w10 w11", "w12 w4"], ["w13"]]
    requests = [(texts[i % 3], s, seed) for i, (s, seed) in enumerate([(0, 0), (4, 1), (16, 2), (9, 3)] * 2)]
    expected = [scorer.score(t, samples=s, seed=seed) for t, s, seed in requests]

    def same(a, b):
        return all(np.array_equal(a[k], b[k]) for k in a)

    failures, missing = [], [0]
    done = threading.Event()

    def worker(k):
        for m in range({calls}):
            i = (k + m) % len(requests)
            t, s, seed = requests[i]
            if not same(scorer.score(t, samples=s, seed=seed), expected[i]):
                failures.append(("worker", k, m))

    def poller():  # the bundle is replaced, never missing
        while not done.is_set():
            if not os.path.exists(os.path.join(path, "bayeslora.json")):
                missing[0] += 1
            time.sleep(0.0002)  # let the others run (no assertion depends on timing)

    def exporter():
        for j in range({exports}):
            bl.export(model, tok, path)  # replace the bundle in place (same contents)
            bl.export(model, tok, os.path.join(parent, f"other{{j % 2}}"))
            copy = os.path.join(parent, f"copy{{j}}")
            shutil.copytree(path, copy)
            write_dir_atomically(
                path,
                lambda d: [shutil.copy(os.path.join(copy, f), d) for f in os.listdir(copy) if f[0] != "."],
                kind="bundle",
            )
            # a Scorer loaded from the replaced bundle scores as the first one
            if not same(Scorer(path, num_threads=1).score(*requests[1][:1], samples=4, seed=1), expected[1]):
                failures.append(("reload", j))

    def forker():
        for j in range(2):
            pid = os.fork()
            if pid == 0:
                signal.alarm(60)
                got = [scorer.score(t, samples=s, seed=seed) for t, s, seed in requests]
                ok = all(same(g, e) for g, e in zip(got, expected))
                os._exit(0 if ok else 3)
            _, status = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                failures.append(("fork", j, os.waitstatus_to_exitcode(status)))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range({threads})]
    threads += [threading.Thread(target=f) for f in (exporter, forker)]
    watcher = threading.Thread(target=poller)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    print("failures", failures, "missing", missing[0])
    sys.exit(1 if failures or missing[0] else 0)
"""


def test_soak_threads_fork_and_replaced_bundles(tmp_path):
    code = SOAK.format(parent=str(tmp_path), calls=12, exports=4, threads=4)
    res = run_py(code, timeout=180)
    assert res.returncode == 0, (signal_name(res.returncode), res.stdout, res.stderr[-3000:])
