"""Output directories: never destroy what bayeslora did not write; atomic replacement; stale
temporary directories; permissions that follow the umask."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import bayeslora as bl
from bayeslora import _atomic, cli
from bayeslora._atomic import MARKER, write_dir_atomically
from bayeslora.errors import OutputError
from bayeslora.runtime import Scorer
from runtime_models import adapt, build
from subprocesses import run_cli


@pytest.fixture(scope="module")
def model():
    m = build("bert", 16, 2, 1, 24, 2, seed=41)
    adapt(m, ["query"], rank=2, seed=41)
    return m


def user_dir(path: Path) -> dict[str, bytes]:
    """A directory of the user's files; returns its contents."""
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    (path / "sub").mkdir()
    (path / "sub" / "data.csv").write_text("text,label\n")
    return snapshot(path)


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"" for p in sorted(path.rglob("*"))}


def fake_bundle(tmp: Path, tag: str = "x") -> None:
    meta = {"format_version": 1, "architecture": "bert", "modules": {}, "tag": tag}
    (tmp / "bayeslora.json").write_text(json.dumps(meta))
    (tmp / "model.safetensors").write_text(tag)


def tag_of(path: Path) -> str:
    return json.loads((path / "bayeslora.json").read_text())["tag"]


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---- refusals ----------------------------------------------------------------------------------
def test_a_users_directory_is_refused_and_untouched(model, tmp_path):
    before = user_dir(tmp_path / "mine")
    for write in (
        lambda: bl.export(model, None, tmp_path / "mine"),
        lambda: bl.save_adapter(model, tmp_path / "mine"),
        lambda: bl.export_peft(model, tmp_path / "mine"),
    ):
        with pytest.raises(OutputError, match=r"bayeslora did not write .*--force"):
            write()
        assert snapshot(tmp_path / "mine") == before
    assert leftovers(tmp_path) == []
    assert isinstance(OutputError("x"), OSError)


def test_force_replaces_a_users_directory(model, tmp_path):
    user_dir(tmp_path / "mine")
    out = bl.export(model, None, tmp_path / "mine", force=True)
    assert not (out / "notes.txt").exists()
    Scorer(out, num_threads=1)
    assert leftovers(tmp_path) == []


def test_an_empty_directory_is_used(model, tmp_path):
    (tmp_path / "empty").mkdir()
    bl.export(model, None, tmp_path / "empty")
    Scorer(tmp_path / "empty", num_threads=1)


def test_an_existing_file_is_refused_even_with_force(model, tmp_path):
    f = tmp_path / "out"
    f.write_text("precious")
    for force in (False, True):
        with pytest.raises(OutputError, match="is not a directory"):
            bl.export(model, None, f, force=force)
    assert f.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out.old


@pytest.mark.parametrize("where", [".", "..", "sub/.."])
def test_the_current_directory_is_refused(model, tmp_path, monkeypatch, where):
    cwd = tmp_path / "work" / "sub"
    cwd.mkdir(parents=True)
    (cwd / "file").write_text("x")
    monkeypatch.chdir(cwd)
    with pytest.raises(OutputError, match="current directory"):
        bl.export(model, None, where, force=True)
    assert (cwd / "file").read_text() == "x"


def test_the_source_is_refused_even_with_force(model, tmp_path):
    base = build("bert", 16, 2, 1, 24, 2, seed=42)
    base.save_pretrained(tmp_path / "base")
    loaded = type(base).from_pretrained(tmp_path / "base")
    adapt(loaded, ["query"], rank=2, seed=42)
    before = snapshot(tmp_path / "base")
    for out in (tmp_path / "base", tmp_path):
        with pytest.raises(OutputError, match="the input"):
            bl.export(loaded, None, out, force=True)
        with pytest.raises(OutputError, match="the input"):
            bl.save_adapter(loaded, out, force=True)
    assert snapshot(tmp_path / "base") == before
    tok = tmp_path / "tok.json"
    tok.write_text("{}")
    with pytest.raises(OutputError, match="the input"):
        bl.export(model, tok, tok)


def test_an_output_of_another_kind_is_refused(model, tmp_path):
    bl.save_adapter(model, tmp_path / "ad")
    before = snapshot(tmp_path / "ad")
    with pytest.raises(OutputError, match="holds a bayeslora adapter directory, not a runtime bundle"):
        bl.export(model, None, tmp_path / "ad")
    assert snapshot(tmp_path / "ad") == before


def test_our_output_with_a_users_file_in_it_is_refused(model, tmp_path):
    out = bl.export(model, None, tmp_path / "b")
    (out / "README.md").write_text("my notes")
    with pytest.raises(OutputError, match=r"files bayeslora did not write \(README.md\)"):
        bl.export(model, None, out)
    assert (out / "README.md").read_text() == "my notes"


def test_outputs_of_older_versions_are_replaced(model, tmp_path):
    b = bl.export(model, None, tmp_path / "b")
    a = bl.save_adapter(model, tmp_path / "a")
    p = bl.export_peft(model, tmp_path / "p")
    for d in (a, b, p):
        (d / MARKER).unlink()  # written before markers existed
    bl.export(model, None, b)
    bl.save_adapter(model, a)
    bl.export_peft(model, p)
    assert all((d / MARKER).is_file() for d in (a, b, p))
    (b / MARKER).unlink()
    (b / "README.md").write_text("mine")
    with pytest.raises(OutputError, match="bayeslora did not write"):
        bl.export(model, None, b)


def test_a_symlink_is_followed(model, tmp_path):
    bl.export(model, None, tmp_path / "real")
    (tmp_path / "link").symlink_to("real")
    bl.export(model, None, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / MARKER).is_file()


# ---- atomic replacement ------------------------------------------------------------------------
def test_an_interrupt_before_the_swap_leaves_the_old_output(tmp_path):
    write_dir_atomically(tmp_path / "b", lambda d: fake_bundle(d, "old"), kind="bundle")

    def interrupted(d: Path) -> None:
        fake_bundle(d, "new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dir_atomically(tmp_path / "b", interrupted, kind="bundle")
    assert tag_of(tmp_path / "b") == "old" and leftovers(tmp_path) == []


def test_two_rename_fallback_undoes_an_interrupted_swap(tmp_path, monkeypatch):
    write_dir_atomically(tmp_path / "b", lambda d: fake_bundle(d, "old"), kind="bundle")
    monkeypatch.setattr(_atomic, "_renameat2", lambda *a: False)  # no RENAME_EXCHANGE here
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new directory into place
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(_atomic.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        write_dir_atomically(tmp_path / "b", lambda d: fake_bundle(d, "new"), kind="bundle")
    monkeypatch.setattr(_atomic.os, "rename", real_rename)
    assert tag_of(tmp_path / "b") == "old" and leftovers(tmp_path) == []
    write_dir_atomically(tmp_path / "b", lambda d: fake_bundle(d, "new"), kind="bundle")
    assert tag_of(tmp_path / "b") == "new" and leftovers(tmp_path) == []


@pytest.mark.skipif(_atomic._renameat2_fn is None, reason="no renameat2 on this platform")
def test_a_reader_never_finds_the_output_missing(tmp_path):
    out = tmp_path / "b"
    write_dir_atomically(out, lambda d: fake_bundle(d, "0"), kind="bundle")
    stop, missing, seen = threading.Event(), [], set()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.add(tag_of(out))
            except OSError as e:
                missing.append(e)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(1, 150):
            write_dir_atomically(out, lambda d, i=i: fake_bundle(d, str(i)), kind="bundle")
    finally:
        stop.set()
        t.join()
    assert missing == [] and len(seen) > 1
    assert tag_of(out) == "149" and leftovers(tmp_path) == []


# ---- stale temporary directories ---------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporary_directories_are_swept(tmp_path):
    host = _atomic._HOST
    dead = tmp_path / f".b.bayeslora-tmp-{host}-{_dead_pid()}-abcd1234"
    live = tmp_path / f".b.bayeslora-tmp-{host}-{os.getppid()}-abcd1234"
    old = tmp_path / f".c.bayeslora-tmp-{host}-{os.getppid()}-zzzz9999"
    legacy = tmp_path / ".b.k2j4h5g6"  # tempfile.mkdtemp(prefix=".b.") of an older version
    not_ours = tmp_path / ".d.q1w2e3r4"
    for d in (dead, live, old, legacy, not_ours):
        d.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    (legacy / "model.safetensors").write_bytes(b"half")
    (not_ours / "diary.txt").write_text("mine")
    hours_ago = os.stat(tmp_path).st_mtime - 2 * 3600
    for d in (old, legacy, not_ours):
        os.utime(d, (hours_ago, hours_ago))
    write_dir_atomically(tmp_path / "b", fake_bundle, kind="bundle")
    assert not dead.exists() and not old.exists() and not legacy.exists()
    assert live.exists() and (not_ours / "diary.txt").exists()


def test_a_killed_two_rename_swap_is_restored(tmp_path):
    saved = tmp_path / f".b.bayeslora-old-{_atomic._HOST}-{_dead_pid()}-abcd1234"
    saved.mkdir()
    fake_bundle(saved, "old")
    write_dir_atomically(tmp_path / "c", fake_bundle, kind="bundle")  # any write into the parent
    assert tag_of(tmp_path / "b") == "old" and not saved.exists()


# ---- permissions -------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_permissions_follow_the_umask(model, tmp_path, umask):
    old = os.umask(umask)
    try:
        out = bl.export(model, None, tmp_path / "b")
        bl.export(model, None, out)  # the replacement too
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name


# ---- command line ------------------------------------------------------------------------------
def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(args, env_extra={"OMP_NUM_THREADS": "1"}, timeout=300)


@pytest.fixture()
def adapter_ckpt(tmp_path):
    base = build("bert", 16, 2, 1, 24, 2, seed=43)
    base.save_pretrained(tmp_path / "base")
    adapt(base, ["query"], rank=2, seed=43)
    with torch.no_grad():
        bl.save_adapter(base, tmp_path / "ckpt")
    return tmp_path / "ckpt", tmp_path / "base"


def test_cli_export_refuses_a_users_directory_in_one_line(adapter_ckpt, tmp_path):
    ckpt, base = adapter_ckpt
    before = user_dir(tmp_path / "mine")
    res = _run_cli("export", str(ckpt), "--model", str(base), "--out", str(tmp_path / "mine"))
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith("bayeslora: error: ") and res.stderr.count("\n") == 1, res.stderr
    assert "--force" in res.stderr and "Traceback" not in res.stderr
    assert snapshot(tmp_path / "mine") == before
    res = _run_cli("export", str(ckpt), "--model", str(base), "--out", str(tmp_path / "mine"), "--force")
    assert res.returncode == 0, res.stderr
    Scorer(tmp_path / "mine", num_threads=1)


@pytest.mark.parametrize("command", ["export", "export-peft"])
def test_cli_export_refuses_its_own_source(adapter_ckpt, command, capsys):
    ckpt, base = adapter_ckpt
    before = snapshot(ckpt)
    for out in (ckpt, ckpt.parent):
        code = cli.main([command, str(ckpt), "--model", str(base), "--out", str(out), "--force"])
        assert code == 1
        err = capsys.readouterr().err
        assert err.startswith("bayeslora: error: ") and "the input" in err, err
    assert snapshot(ckpt) == before


def test_cli_import_peft_refuses_an_existing_file(tmp_path, capsys):
    pytest.importorskip("peft")
    from test_peft_io import _peft_model, _tiny_base_dir

    base = _tiny_base_dir(tmp_path / "base")
    _peft_model("bert").save_pretrained(tmp_path / "peft")
    (tmp_path / "ck").write_text("precious")
    capsys.readouterr()
    args = ["import-peft", str(tmp_path / "peft"), "--model", str(base), "--out", str(tmp_path / "ck")]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("bayeslora: error: ") and "not a directory" in err, err
    assert (tmp_path / "ck").read_text() == "precious"
    (tmp_path / "ck").unlink()
    user_dir(tmp_path / "ck")
    assert cli.main(args) == 1 and "bayeslora did not write" in capsys.readouterr().err
    assert cli.main([*args, "--force"]) == 0
    assert (tmp_path / "ck" / "run.json").is_file() and not (tmp_path / "ck" / "notes.txt").exists()
    assert cli.main(args) == 0  # a checkpoint replaces a checkpoint


def test_cli_export_to_the_current_directory_or_an_unwritable_place(adapter_ckpt, monkeypatch, capsys):
    ckpt, base = adapter_ckpt
    monkeypatch.chdir(ckpt.parent)
    before = snapshot(ckpt.parent)
    assert cli.main(["export", str(ckpt), "--model", str(base), "--out", ".", "--force"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bayeslora: error: ") and "current directory" in err and err.count("\n") == 1
    assert snapshot(ckpt.parent) == before
    if Path("/proc/self").is_dir():
        assert cli.main(["export", str(ckpt), "--model", str(base), "--out", "/proc/x"]) == 1
        err = capsys.readouterr().err.splitlines()[-1]
        assert err.startswith("bayeslora: error: cannot write /proc/x"), err
