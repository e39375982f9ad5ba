"""Type stubs of the Rust extension ``bayeslora._core`` (rust/bayeslora-py)."""

from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Any, final

import numpy as np
from numpy.typing import NDArray
from typing_extensions import Self

__all__ = [
    "Runtime",
    "__version__",
    "analyze_modules",
    "fma_peak_gflops",
    "gemm_calls",
    "isa",
    "kl_additive",
    "kl_gate",
    "kl_molchanov",
    "low_rank_svd",
    "rank_scores_additive",
    "rank_scores_gate",
    "spearman",
    "subspace_angles",
]

__version__: str

# ---- KL and rank scores (docs/method.md §2, §3) --------------------------------------------------------
def kl_molchanov(log_alpha: NDArray[np.float64]) -> NDArray[np.float64]:
    """Elementwise Molchanov KL, ``[n] -> [n]``."""

def kl_gate(log_alpha: NDArray[np.float64], group_weight: float) -> float:
    """``group_weight · Σ_k KL(log_alpha_k)``; ``log_alpha [r]``."""

def kl_additive(log_sigma2: NDArray[np.float64], m_a: NDArray[np.float64], m_b: NDArray[np.float64]) -> float:
    """KL of an additive module; ``log_sigma2 [r]``, ``m_a [r, d_in]``, ``m_b [d_out, r]`` (C order)."""

def rank_scores_gate(log_alpha: NDArray[np.float64]) -> NDArray[np.float64]:
    """``log_alpha`` itself, ``[r]``."""

def rank_scores_additive(
    log_sigma2: NDArray[np.float64],
    m_a: NDArray[np.float64],
    m_b: NDArray[np.float64],
    eps: float | None = None,
) -> NDArray[np.float64]:
    """Median scores ``ℓ_k``, ``[r]``."""

def fma_peak_gflops(seconds: float = 0.3, threads: int = 1) -> float:
    """Measured f32 FMA peak in GFLOP/s of ``threads`` cores at once (0.0 without AVX2/FMA)."""

def isa() -> str:
    """The kernels' instruction set in this process: ``"avx512"``, ``"avx2"`` or ``"portable"``
    (``BAYESLORA_ISA``, else the widest of this CPU); ``IsaError`` if the variable is unusable."""

def gemm_calls() -> dict[str, int]:
    """``{"portable": n, "avx2": n, "avx512": n}``: matrix products run on each set so far."""

# ---- rank analysis (docs/method.md §8) ---------------------------------------------------------------
def low_rank_svd(
    a: NDArray[np.float64], b: NDArray[np.float64], ez: NDArray[np.float64], scale: float
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Thin SVD ``(U [d_out, p], s [p], V [d_in, p])`` of ``scale · B diag(ez) A``."""

def subspace_angles(x: NDArray[np.float64], y: NDArray[np.float64]) -> NDArray[np.float64]:
    """Principal angles between the column spans of ``x`` and ``y`` (as scipy)."""

def spearman(x: NDArray[np.float64], y: NDArray[np.float64]) -> float:
    """Spearman rank correlation with average ranks for ties."""

def analyze_modules(
    modules: Sequence[
        tuple[
            NDArray[np.float64],
            NDArray[np.float64],
            NDArray[np.float64],
            NDArray[np.float64] | None,
            float,
        ]
    ],
    num_threads: int | None = None,
) -> list[dict[str, Any]]:
    """Analyse ``(a, b, ez, relevance, scale)`` per module, in parallel."""

# ---- runtime (docs/method.md §6) ---------------------------------------------------------------------
@final
class Runtime:
    """A loaded, validated bundle."""

    def __new__(cls, bundle_dir: str | PathLike[str], num_threads: int | None = None) -> Self: ...
    @property
    def num_threads(self) -> int: ...
    @property
    def labels(self) -> list[str]: ...
    @property
    def num_labels(self) -> int: ...
    @property
    def max_length(self) -> int: ...
    @property
    def module_ranks(self) -> dict[str, int]: ...
    @property
    def isa(self) -> str: ...
    @property
    def uses_token_types(self) -> bool:
        """Whether the model takes segment ids from its tokenizer (BERT-family)."""
    def logits(
        self,
        input_ids: NDArray[np.int64],
        attention_mask: NDArray[np.int64],
        gates: Mapping[str, NDArray[np.float32]] | None = None,
        token_type_ids: NDArray[np.int64] | None = None,
    ) -> NDArray[np.float32]:
        """Logits ``[N, C]`` (mean mode, or explicit gates ``{module: [N, r]}``); segment ids
        ``token_type_ids [N, T]`` (None: 0)."""
    def sample_logits(
        self,
        input_ids: NDArray[np.int64],
        attention_mask: NDArray[np.int64],
        samples: int,
        seed: int | None = None,
        token_type_ids: NDArray[np.int64] | None = None,
    ) -> NDArray[np.float32]:
        """Per-sample logits ``[N, S, C]`` (``seed`` None: 0)."""
    def score(
        self,
        input_ids: NDArray[np.int64],
        attention_mask: NDArray[np.int64],
        samples: int | None = None,
        seed: int | None = None,
        first_index: int = 0,
        token_type_ids: NDArray[np.int64] | None = None,
    ) -> dict[str, NDArray[Any]]:
        """docs/method.md §6 fields per input (``first_index``: row 0's index in the request, for
        error messages)."""
