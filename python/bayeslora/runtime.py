"""Score texts with an exported bundle on CPU, with uncertainty, without torch.

This module imports only numpy, ``tokenizers``, the standard library and ``bayeslora._core``.

The Rust runtime computes in float32. Mean mode (``samples=0``) uses the adapters merged into
the weights. MC mode draws S posterior samples per input from counter-based streams keyed by
``(seed, hash of the input's token ids, sample, module, rank)`` (the hash is 64-bit FNV-1a over
the little-endian uint32 bytes of the ids whose mask is 1; see ``rust/bayeslora-core/src/mc.rs``),
so an input's scores depend only on the bundle, the input, the seed and S: not on its
batch-mates, its position in the batch, or the number of threads.

Sentence pairs (``text_pairs=``): the bundle's tokenizer encodes each (text, text pair) as its
model expects (``[CLS] A [SEP] B [SEP]`` with segment ids 0/1 for BERT-family models,
``<s> A </s></s> B </s>`` for RoBERTa, whose model takes no segment ids), truncating the longer
of the two first (``longest_first``, 🤗's default) to the bundle's ``max_length``. Segment ids
do not enter the noise key: a pair's MC scores depend on its token ids, as a text's do.

A :class:`Scorer` pickles by reference: the pickle holds the bundle path and the thread setting,
and unpickling reopens the bundle through :func:`shared_scorer`, which keeps one Scorer per
process for each (bundle, settings). This is how a Scorer reaches Dask workers or
``multiprocessing`` children (``bayeslora.distributed``); the path must be readable there.

The kernels run on the widest instruction set of the CPU (AVX-512, AVX2 + FMA, or portable
Rust), chosen once per process at run time; the environment variable ``BAYESLORA_ISA``
(``avx512``, ``avx2``, ``portable``; ``auto`` or unset: the widest) forces one, read on first use.
A set the CPU lacks, or an unknown name, raises :class:`bayeslora.errors.IsaError` when a
:class:`Scorer` is made (never a silent fallback). The sets agree within float rounding: the
matrix products bit for bit, AVX-512's softmax, GELU and LayerNorm within about 1e-6.
"""

from __future__ import annotations

import json
import operator
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _core
from .errors import BundleError, InvalidValueError, ShapeError
from .files import BUNDLE_FILES, BUNDLE_META, BUNDLE_TOKENIZER
from .files import UNCERTAINTY_FIELDS as FIELDS

_CHUNK = 1024  # texts tokenised and scored per call into the core (bounds padding memory)
MAX_SEED = 2**63 - 1  # seeds are 0..2^63-1 (the core's signed 64-bit argument)
MAX_SAMPLES = 2**20
MAX_THREADS = 1024


def check_int(name: str, value: Any, low: int, high: int) -> int:
    """``value`` as an int in ``low..high`` (Python or numpy integers, not bools or floats), else
    :class:`InvalidValueError` naming the range."""
    if isinstance(value, (bool, np.bool_)):
        raise InvalidValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise InvalidValueError(
            f"{name} must be an integer in {low}..{high}, got {type(value).__name__} {value!r}"
        ) from None
    if not low <= v <= high:
        raise InvalidValueError(f"{name} must be in {low}..{high}, got {v}")
    return v


def check_texts(texts: Sequence[Any]) -> list[str]:
    """``texts`` as a list of str (numpy ``str_`` items included), each encodable as UTF-8; else
    :class:`InvalidValueError` naming the first bad item."""
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise InvalidValueError(
                f"inputs must be texts (str), (input_ids, attention_mask) or a mapping of them; "
                f"item {i} is a {type(t).__name__}"
            )
        if not t.isascii():
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InvalidValueError(
                    f"text {i} is not valid Unicode: lone surrogate {t[e.start]!r} at position {e.start} "
                    "(undecodable bytes read with errors='surrogateescape'?)"
                ) from None
    return [str(t) for t in out]


def _looks_like_texts(x: Any) -> bool:
    """A text, a non-empty list or tuple of them, or a numpy array of strings."""
    if isinstance(x, np.ndarray):
        return x.dtype.kind in "UO"
    return isinstance(x, str) or (isinstance(x, list | tuple) and len(x) > 0 and isinstance(x[0], str))


def _listed(x: Any) -> Any:
    return [x] if isinstance(x, str) else x


# token ids, attention mask and segment ids (or None: 0 throughout) of a batch, int64 [N, T]
Batch = tuple[np.ndarray, np.ndarray, np.ndarray | None]


def _as_types(token_type_ids: Any | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if token_type_ids is None:
        return None
    types = np.ascontiguousarray(np.asarray(token_type_ids), dtype=np.int64)
    if types.ndim == 1:
        types = types[None, :]
    if types.shape != shape:
        raise ShapeError(f"token_type_ids is {types.shape} but input_ids is {shape}")
    return types


def _as_ids(input_ids: Any, attention_mask: Any | None) -> tuple[np.ndarray, np.ndarray]:
    ids = np.ascontiguousarray(np.asarray(input_ids), dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2:
        raise ShapeError(f"input_ids must be [N, T], got shape {ids.shape}")
    if attention_mask is None:
        mask = np.ones_like(ids)
    else:
        mask = np.ascontiguousarray(np.asarray(attention_mask), dtype=np.int64)
        if mask.ndim == 1:
            mask = mask[None, :]
    if mask.shape != ids.shape:
        raise ShapeError(f"attention_mask is {mask.shape} but input_ids is {ids.shape}")
    return ids, mask


class Scorer:
    """A loaded bundle.

    Args:
        bundle_dir: directory written by :func:`bayeslora.export`.
        num_threads: size of the runtime's thread pool, 1..1024 (None = all cores).

    Raises:
        bayeslora.errors.BundleError: the bundle is missing, malformed or inconsistent.
        bayeslora.errors.InvalidValueError: ``num_threads`` is not an integer in 1..1024.
        bayeslora.errors.IsaError: ``BAYESLORA_ISA`` names an unknown set or one this CPU lacks.

    Every method checks its arguments before calling into the core: counts and seeds must be
    integers in their range, texts must be ``str`` (numpy ``str_`` and arrays of strings are
    texts too) without lone surrogates; anything else raises ``InvalidValueError``.

    A Scorer pickles by reference (bundle path and ``num_threads``; see :meth:`__reduce__`): the
    process that unpickles it reopens the bundle, once per process, and must be able to read it.
    """

    def __init__(self, bundle_dir: str | os.PathLike, num_threads: int | None = None) -> None:
        if num_threads is not None:
            num_threads = check_int("num_threads", num_threads, 1, MAX_THREADS)
        self.bundle_dir = Path(bundle_dir)
        self._requested_threads = num_threads  # what a pickle carries (None: all cores *there*)
        self._rt = _core.Runtime(str(self.bundle_dir), num_threads)
        self._tokenizer: Any = None
        self.labels: list[str] = list(self._rt.labels)
        self.num_labels: int = int(self._rt.num_labels)
        self.max_length: int = int(self._rt.max_length)
        self.num_threads: int = int(self._rt.num_threads)
        self.isa: str = str(self._rt.isa)  # the kernels' instruction set, see isa()

    def __reduce__(self) -> tuple[Any, tuple[str, int | None]]:
        """Pickle by reference: the absolute bundle path and ``num_threads`` as requested (None
        stays None, i.e. all cores of the process that unpickles). Unpickling calls
        :func:`shared_scorer`, so the bundle must be readable at that path where the pickle is
        loaded, and a process reopens it once for all the pickles it receives."""
        return shared_scorer, (os.path.abspath(self.bundle_dir), self._requested_threads)

    @property
    def module_ranks(self) -> dict[str, int]:
        """``{module name: rank}`` of the bundle's adapted modules."""
        return dict(self._rt.module_ranks)

    @property
    def tokenizer(self) -> Any:
        """The bundle's ``tokenizers.Tokenizer``, truncating to ``max_length``, no padding."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            path = self.bundle_dir / BUNDLE_TOKENIZER
            if path.exists() and not path.is_file():  # a FIFO or a device: never opened
                raise BundleError(f"{path}: not a regular file")
            if not path.is_file():
                raise BundleError(f"{path} not found: this bundle scores token ids only")
            try:
                tok = Tokenizer.from_file(str(path))
            except Exception as e:  # tokenizers raises a bare Exception for bad files
                raise BundleError(f"cannot read {path}: {e}") from e
            tok.no_padding()
            tok.enable_truncation(self.max_length)
            self._tokenizer = tok
        return self._tokenizer

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask ``int64 [N, T]`` of ``texts`` (right-padded with id 0)."""
        encodings = self.tokenizer.encode_batch(list(texts))
        t = max((len(e.ids) for e in encodings), default=0)
        ids = np.zeros((len(encodings), max(t, 1)), dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, e in enumerate(encodings):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = e.attention_mask
        return ids, mask

    @property
    def uses_token_types(self) -> bool:
        """Whether the model takes segment ids (BERT-family token-type embeddings): then
        :meth:`score` passes the tokenizer's segment ids of sentence pairs to it; RoBERTa (whose
        tokenizer gives its model none) and DistilBERT (no token-type embeddings) get none."""
        return bool(self._rt.uses_token_types)

    def encode_pairs(
        self, texts: Sequence[str], text_pairs: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Token ids, attention mask and segment ids ``int64 [N, T]`` of the sentence pairs
        (``texts[i]``, ``text_pairs[i]``), as the bundle's tokenizer encodes pairs (its pair
        template, ``longest_first`` truncation to ``max_length``), right-padded with id 0."""
        if len(texts) != len(text_pairs):
            raise ShapeError(f"{len(texts)} texts but {len(text_pairs)} text pairs")
        encodings = self.tokenizer.encode_batch(list(zip(texts, text_pairs, strict=True)))
        t = max((len(e.ids) for e in encodings), default=0)
        ids = np.zeros((len(encodings), max(t, 1)), dtype=np.int64)
        mask, types = np.zeros_like(ids), np.zeros_like(ids)
        for i, e in enumerate(encodings):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = e.attention_mask
            types[i, : len(e.ids)] = e.type_ids
        return ids, mask, types

    def _encoded(self, texts: list[str], pairs: list[str] | None) -> Batch:
        if pairs is None:
            return (*self.encode(texts), None)
        ids, mask, types = self.encode_pairs(texts, pairs)
        return ids, mask, types if self.uses_token_types else None

    def _inputs(self, inputs: Any, text_pairs: Any | None = None) -> list[Batch]:
        if isinstance(inputs, str):
            inputs = [inputs]
        if isinstance(text_pairs, str):
            text_pairs = [text_pairs]
        ids_given = isinstance(inputs, Mapping) or (
            isinstance(inputs, tuple) and len(inputs) == 2 and not isinstance(inputs[0], str)
        )
        ids_given = ids_given or (isinstance(inputs, np.ndarray) and inputs.dtype.kind not in "UO")
        if ids_given and text_pairs is not None:
            raise InvalidValueError("text_pairs go with texts, not with token ids (pass token_type_ids)")
        if isinstance(inputs, Mapping):
            if "input_ids" not in inputs:
                raise InvalidValueError("a mapping of inputs needs 'input_ids' (and 'attention_mask')")
            ids, mask = _as_ids(inputs["input_ids"], inputs.get("attention_mask"))
            return [(ids, mask, _as_types(inputs.get("token_type_ids"), ids.shape))]
        if ids_given:
            return [
                (*_as_ids(*inputs), None) if isinstance(inputs, tuple) else (*_as_ids(inputs, None), None)
            ]
        texts = self._texts(inputs, "inputs")
        pairs = None if text_pairs is None else self._texts(text_pairs, "text_pairs")
        if pairs is not None and len(pairs) != len(texts):
            raise ShapeError(f"{len(texts)} texts but {len(pairs)} text pairs")
        chunks = [
            self._encoded(texts[i : i + _CHUNK], None if pairs is None else pairs[i : i + _CHUNK])
            for i in range(0, len(texts), _CHUNK)
        ]
        return chunks or [(np.zeros((0, 1), np.int64), np.zeros((0, 1), np.int64), None)]

    @staticmethod
    def _texts(values: Any, what: str) -> list[str]:
        """A sequence of str, or a 1-D numpy array of strings (dtype str_ or object), as a list."""
        if isinstance(values, np.ndarray) and values.ndim != 1:
            raise ShapeError(f"an array of texts must be one-dimensional, got shape {values.shape}")
        try:
            return check_texts(values)
        except TypeError:
            raise InvalidValueError(
                f"{what} must be texts, (input_ids, attention_mask) or a mapping of them, "
                f"not {type(values).__name__}"
            ) from None

    def score(
        self, inputs: Any, samples: int = 0, seed: int = 0, *, text_pairs: Any | None = None
    ) -> dict[str, np.ndarray]:
        """docs/method.md §6 prediction with uncertainty.

        Args:
            inputs: a text, a list (or 1-D numpy array) of texts, ``(input_ids, attention_mask)``
                (``[N, T]`` ints), or a mapping with those keys (and ``token_type_ids``).
            samples: S posterior samples per input, 0..2^20; 0 = mean mode (one deterministic pass).
            seed: seeds the noise streams, 0..2^63-1.
            text_pairs: for sentence pairs, the second text of each input (as many as texts);
                tokenised as the model expects (see the module docstring).

        Returns:
            ``probs float32[N, C]`` (mean over samples), ``label int64[N]``, and float32 ``[N]``:
            ``confidence`` (max prob), ``entropy`` (total), ``expected_entropy`` (aleatoric),
            ``mutual_info`` (epistemic), ``variance`` (of the predicted class's probability).
        """
        samples = check_int("samples", samples, 0, MAX_SAMPLES)
        seed = check_int("seed", seed, 0, MAX_SEED)
        parts = []
        first = 0
        for ids, mask, types in self._inputs(inputs, text_pairs):
            parts.append(self._rt.score(ids, mask, samples, seed, first, token_type_ids=types))
            first += len(ids)
        return {k: np.concatenate([p[k] for p in parts]) for k in FIELDS}

    def logits(
        self,
        input_ids: Any,
        attention_mask: Any | None = None,
        gates: Mapping[str, Any] | None = None,
        *,
        token_type_ids: Any | None = None,
        text_pairs: Any | None = None,
    ) -> np.ndarray:
        """Logits ``float32[N, C]``: mean mode, or one pass with explicit gate values
        ``gates = {module name: float32[N, r]}`` (z of each rank, one row per input; modules not
        named use z = 1). Matches torch's ``BayesLoRALayer.fixed_gates`` with sampling off.

        ``input_ids`` ``[N, T]`` with ``attention_mask`` and segment ids ``token_type_ids``
        (None: 0); or texts, with ``text_pairs`` for sentence pairs (tokenised as in
        :meth:`score`)."""
        if text_pairs is not None or _looks_like_texts(input_ids):
            if attention_mask is not None or token_type_ids is not None:
                raise InvalidValueError("texts come without attention_mask or token_type_ids")
            texts = self._texts(_listed(input_ids), "input_ids")
            pairs = None if text_pairs is None else self._texts(_listed(text_pairs), "text_pairs")
            if pairs is not None and len(pairs) != len(texts):
                raise ShapeError(f"{len(texts)} texts but {len(pairs)} text pairs")
            ids, mask, types = self._encoded(texts, pairs)
        else:
            ids, mask = _as_ids(input_ids, attention_mask)
            types = _as_types(token_type_ids, ids.shape)
        g = None
        if gates is not None:
            g = {k: np.ascontiguousarray(np.asarray(v), dtype=np.float32) for k, v in gates.items()}
        return self._rt.logits(ids, mask, g, token_type_ids=types)

    def sample_logits(
        self,
        input_ids: Any,
        attention_mask: Any | None = None,
        samples: int = 16,
        seed: int = 0,
        *,
        token_type_ids: Any | None = None,
    ) -> np.ndarray:
        """Per-sample logits ``float32[N, S, C]`` of S ≥ 1 posterior samples (at most 2^30 values in
        all: :meth:`score` reduces any S online instead); segment ids ``token_type_ids`` [N, T]."""
        samples = check_int("samples", samples, 1, MAX_SAMPLES)
        seed = check_int("seed", seed, 0, MAX_SEED)
        ids, mask = _as_ids(input_ids, attention_mask)
        types = _as_types(token_type_ids, ids.shape)
        return self._rt.sample_logits(ids, mask, samples, seed, token_type_ids=types)

    def label_name(self, label: int) -> str | int:
        """The class name of ``label`` when the bundle has names, else the index."""
        return self.labels[label] if self.labels else int(label)

    def records(
        self,
        texts: Sequence[str],
        samples: int = 0,
        seed: int = 0,
        *,
        text_pairs: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """One JSON-ready dict per text: ``text, label, probs, confidence, entropy,
        expected_entropy, mutual_info, variance`` (label as its name when the bundle has names);
        with ``text_pairs``, each record also has its ``text_pair``."""
        texts = check_texts(texts)
        pairs = None if text_pairs is None else check_texts(text_pairs)
        scores = self.score(texts, samples=samples, seed=seed, text_pairs=pairs)
        return self.records_of(texts, scores, text_pairs=pairs)

    def records_of(
        self,
        texts: Sequence[str],
        scores: Mapping[str, np.ndarray],
        text_pairs: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """The records of :meth:`records` from scores already computed (``scores[k][i]`` belongs
        to ``texts[i]``), e.g. those ``bayeslora.distributed.score`` gathered."""
        rows = []
        for i, text in enumerate(texts):
            rows.append(
                {
                    "text": text,
                    **({} if text_pairs is None else {"text_pair": text_pairs[i]}),
                    "label": self.label_name(int(scores["label"][i])),
                    "probs": [float(p) for p in scores["probs"][i]],
                    **{k: float(scores[k][i]) for k in FIELDS[2:]},
                }
            )
        return rows


_SHARED: dict[tuple[str, int | None], tuple[tuple[Any, ...], Scorer]] = {}
_SHARED_LOCK = threading.Lock()


def _fingerprint(bundle_dir: str) -> tuple[Any, ...]:
    """What changes when the bundle at ``bundle_dir`` is replaced (``bl.export`` swaps the
    directory, so its inode changes) or a file of it is rewritten."""
    parts: list[Any] = []
    for path in (bundle_dir, *(os.path.join(bundle_dir, f) for f in BUNDLE_FILES)):
        try:
            st = os.stat(path)
        except OSError:
            parts.append(None)
        else:
            parts.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(parts)


def shared_scorer(bundle_dir: str | os.PathLike, num_threads: int | None = None) -> Scorer:
    """This process's :class:`Scorer` of ``bundle_dir`` with ``num_threads``, opened on first use.

    Later calls with the same absolute path and ``num_threads`` return the same object (one
    runtime and thread pool per process, however many tasks or pickles arrive), until the bundle
    on disk changes (its directory or a file replaced): then it is reopened. Unpickling a Scorer
    calls this. Thread-safe; a forked child keeps its parent's Scorers (the runtime rebuilds its
    thread pool there).

    Raises:
        bayeslora.errors.BundleError, bayeslora.errors.InvalidValueError: as :class:`Scorer`.
    """
    if num_threads is not None:
        num_threads = check_int("num_threads", num_threads, 1, MAX_THREADS)
    key = (os.path.abspath(bundle_dir), num_threads)
    with _SHARED_LOCK:  # held while opening: concurrent first uses open the bundle once
        stamp = _fingerprint(key[0])
        hit = _SHARED.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        scorer = Scorer(key[0], num_threads=num_threads)
        _SHARED[key] = (stamp, scorer)
        return scorer


def fma_peak_gflops(seconds: float = 0.3, threads: int = 1) -> float:
    """This machine's f32 fused-multiply-add peak in GFLOP/s, measured now.

    ``threads`` OS threads each run independent FMA chains of the widest vectors the runtime's
    kernels use (AVX-512, else AVX2) for about ``seconds``; the sum is returned (0.0 without
    AVX2/FMA). It is the ceiling for the runtime's matrix products at the clock the cores run
    at, which the nominal clock of ``/proc/cpuinfo`` does not tell (cores boost). Raises
    ``bayeslora.errors.InvalidValueError`` for ``seconds <= 0`` or ``threads < 1``, and
    ``bayeslora.errors.IsaError`` for an unusable ``BAYESLORA_ISA`` (a forced set is the one
    measured; ``portable`` gives 0.0).
    """
    return float(_core.fma_peak_gflops(float(seconds), int(threads)))


def isa() -> str:
    """The instruction set the runtime's kernels run on in this process: ``"avx512"``,
    ``"avx2"`` or ``"portable"``. ``BAYESLORA_ISA`` when set (read once per process), else the
    widest this CPU has. Raises :class:`bayeslora.errors.IsaError` when ``BAYESLORA_ISA`` is
    unknown or names a set this CPU lacks."""
    return str(_core.isa())


def read_meta(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """The bundle's ``bayeslora.json`` as a dict (no validation beyond JSON)."""
    path = Path(bundle_dir) / BUNDLE_META
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"cannot read {path}: {e}") from e


__all__ = ["FIELDS", "Scorer", "fma_peak_gflops", "isa", "read_meta", "shared_scorer"]
