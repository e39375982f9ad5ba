"""The adapted layer: a frozen base linear map plus a LoRA update with a rank-wise posterior.

Shapes: ``x`` is ``[..., d_in]``; the base maps it to ``[..., d_out]``; the adapter factors are
``lora_A: [r, d_in]`` and ``lora_B: [d_out, r]``; the rank parameters (``log_alpha`` or
``log_sigma2``) are ``[r]``. ``r`` shrinks when ranks are pruned physically; ``rank_index[r]``
remembers each surviving rank's original position so that noise draws keyed by it (and so the
MC output) do not change when other ranks are removed.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BayesLoRAConfig

# Molchanov et al. (2017) constants, docs/method.md §3.
K1, K2, K3 = 0.63576, 1.87320, 1.48695
LOG_ALPHA_CLAMP = (-10.0, 10.0)
LOG_SIGMA2_CLAMP = (-20.0, 2.0)
MU2_EPS = 1e-8
LRT_EPS = 1e-8


def dtensor_class() -> type | None:
    """``torch.distributed.tensor.DTensor`` once imported, else None."""
    # No DTensor can exist before torch.distributed.tensor is imported (FSDP2 imports it): the
    # check costs nothing on the common, unsharded path.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the whole tensor of a sharded ``DTensor`` (an FSDP2 parameter outside the
    forward). Gathering is a collective: under FSDP2 every process must make the same call. The
    result keeps its autograd link to the shard (the backward of the gather is a local slice)."""
    cls = dtensor_class()
    if cls is not None and isinstance(t, cls):
        return t.full_tensor()
    return t


def kl_molchanov(log_alpha: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(q || log-uniform) of a Gaussian noise ratio α, given ``log α`` (any shape).

    Non-negative, decreasing in α, → 0 as α → ∞. ``log α`` is clamped to [−10, 10].
    """
    la = log_alpha.clamp(*LOG_ALPHA_CLAMP)
    neg_kl = K1 * torch.sigmoid(K2 + K3 * la) - 0.5 * F.softplus(-la) - K1
    return -neg_kl


def is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D without importing transformers: weight is [d_in, d_out].
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def base_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an ``nn.Linear`` or HF ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    raise TypeError(f"cannot adapt a {type(module).__name__}: only nn.Linear and HF Conv1D are supported")


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


class LRTSample(torch.autograd.Function):
    """``mean + sqrt(sq_norm · c + t) ⊙ eps`` with a hand-written backward.

    Shapes: ``mean, eps [..., d]``, ``sq_norm, t [..., 1]``, ``c [d]``. Autograd would keep and
    traverse five ``[..., d]`` intermediates; here the backward is one scaled copy of the incoming
    gradient and three reductions of it, which is most of the local reparameterisation's cost.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        mean: torch.Tensor,
        sq_norm: torch.Tensor,
        c: torch.Tensor,
        t: torch.Tensor,
        eps: torch.Tensor,
    ) -> torch.Tensor:
        std = torch.addcmul(t, sq_norm, c).sqrt_()
        ctx.save_for_backward(sq_norm, c, std, eps)
        return torch.addcmul(mean, std, eps)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, None]:
        sq_norm, c, std, eps = ctx.saved_tensors  # type: ignore[attr-defined]
        d = grad.shape[-1]
        g_var = (grad * eps).div_(std).mul_(0.5)  # ∂out/∂var = eps / (2 std)
        grad_t = g_var.sum(-1, keepdim=True)
        grad_sq = (g_var @ c).unsqueeze(-1)
        grad_c = (sq_norm.reshape(1, -1) @ g_var.reshape(-1, d)).reshape(d)
        return grad, grad_sq, grad_c, grad_t, None


class BayesLoRALayer(nn.Module):
    """``y = base(x) + s · Δ(x)`` with a rank-wise posterior on the adapter (docs/method.md §2).

    The base layer is frozen and kept as ``base_layer``. Noise is on only while ``sampling`` is
    True; ``train()``/``eval()`` never change that flag. In sampling mode, the ``gate`` family draws
    one gate vector per sequence (leading batch index) and ``mcdropout`` one Bernoulli mask per
    sequence; ``additive`` uses the local reparameterisation trick per token when the module is in
    training mode and samples whole factor matrices per sequence otherwise (true posterior samples,
    reproducible per input).
    """

    def __init__(self, base_layer: nn.Module, config: BayesLoRAConfig) -> None:
        super().__init__()
        d_in, d_out = base_dims(base_layer)
        self.base_layer = base_layer
        self.d_in, self.d_out = d_in, d_out
        self.method = config.method
        self.posterior = config.posterior
        self.initial_rank = config.rank
        self.scale = config.scale
        self.kl_group = config.kl_group
        self.dropout_p = config.dropout
        self.min_rank = config.min_rank
        self.gate_lrt = config.gate_lrt
        self.sampling = False
        self.generator: torch.Generator | None = None
        # One noise stream per sequence (row of the batch) for the per-sequence draws (gates,
        # dropout masks, sampled factors; not the per-token draws of the LRT paths): row b draws
        # from ``generators[b]`` alone, so its sample does not depend on the rows beside it, and
        # rows given identically seeded streams share one posterior sample (``bayeslora.lm``).
        self.generators: list[torch.Generator] | None = None
        # Explicit gate values [batch, r] (one row per sequence) that replace the sampled z of
        # gate/mcdropout when set; for exact parity tests against the Rust runtime.
        self.fixed_gates: torch.Tensor | None = None
        # Per-sequence samples kept for a second call on rows shared by the batch (DeBERTa's relative
        # position embeddings, see bayeslora.nn.deberta): while ``_held`` is a dict, every
        # per-sequence draw is stored there; while ``_row`` is set, a one-row input takes row
        # ``_row`` of the held draw (or of ``fixed_gates``) instead of drawing.
        self._held: dict[str, torch.Tensor] | None = None
        self._row: int | None = None

        r = config.rank
        device = base_layer.weight.device
        f32 = torch.float32
        self.lora_A = nn.Parameter(torch.empty(r, d_in, device=device, dtype=f32))
        self.lora_B = nn.Parameter(torch.empty(d_out, r, device=device, dtype=f32))
        self.register_buffer("rank_mask", torch.ones(r, device=device, dtype=f32))
        self.register_buffer("rank_index", torch.arange(r, device=device, dtype=torch.long))
        if self.uses_additive:
            self.log_sigma2 = nn.Parameter(torch.full((r,), config.init_log_sigma2, device=device, dtype=f32))
        elif self.uses_gate:
            self.log_alpha = nn.Parameter(torch.full((r,), config.init_log_alpha, device=device, dtype=f32))
        self.reset_factors(config.init_b_std)

    # ---- casting ---------------------------------------------------------------------------
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> BayesLoRALayer:
        """``model.to(...)``, ``.half()``, ``.bfloat16()``, ``.cuda()``, ... reach the base layer as
        usual, but never lower this layer's own tensors (factors, rank parameters, masks) below
        float32: they follow the device and keep their values exactly, as fp32 master weights do
        in mixed precision. The forward casts them to the input's dtype where it mixes them with
        activations, and runs the noise in float32.
        """
        if recurse:
            for child in self.children():
                child._apply(fn)

        def keep_fp32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if t.is_floating_point() and out.is_floating_point() and torch.finfo(out.dtype).bits < 32:
                return t.to(device=out.device, dtype=torch.float32)
            return out

        return super()._apply(keep_fp32, recurse=False)

    # ---- structure -------------------------------------------------------------------------
    @property
    def uses_gate(self) -> bool:
        return self.method == "bayeslora" and self.posterior == "gate"

    @property
    def uses_additive(self) -> bool:
        return self.method == "bayeslora" and self.posterior == "additive"

    @property
    def rank(self) -> int:
        """Current (physical) rank r."""
        return int(self.lora_A.shape[0])

    @property
    def active_rank(self) -> int:
        return int(self.rank_mask.sum().item())

    def rank_parameter(self) -> nn.Parameter | None:
        """``log_alpha`` (gate), ``log_sigma2`` (additive) or None (lora, mcdropout)."""
        if self.uses_gate:
            return self.log_alpha
        if self.uses_additive:
            return self.log_sigma2
        return None

    @torch.no_grad()
    def reset_factors(self, init_b_std: float = 0.0) -> None:
        if self.uses_additive:
            bound = 1.0 / math.sqrt(self.d_in)
            self.lora_A.uniform_(-bound, bound)
            self.lora_B.uniform_(-1e-3, 1e-3)  # not zero: α of a zero weight is infinite
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT
            if init_b_std > 0:
                self.lora_B.normal_(0.0, init_b_std)
            else:
                self.lora_B.zero_()

    # ---- forward ---------------------------------------------------------------------------
    def _randn(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.randn(shape, device=like.device, dtype=torch.float32, generator=self.generator)

    def _row_generators(self, batch: int) -> list[torch.Generator]:
        gens = self.generators
        if gens is None or len(gens) != batch:
            raise ValueError(f"generators holds {0 if gens is None else len(gens)} streams for {batch} rows")
        return gens

    def _rank_noise(self, batch: int, like: torch.Tensor, extra: tuple[int, ...] = ()) -> torch.Tensor:
        """Standard normal noise ``[batch, r, *extra]`` keyed by original rank index (row b from
        ``generators[b]`` when they are set)."""
        shape = (self.initial_rank, *extra)
        if self.generators is not None:
            eps = torch.stack(
                [
                    torch.randn(shape, device=like.device, dtype=torch.float32, generator=g)
                    for g in self._row_generators(batch)
                ]
            )
        else:
            eps = self._randn((batch, *shape), like)
        return eps.index_select(1, self.rank_index)

    def _rank_uniform(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """Uniform [0, 1) draws ``[batch, r]`` keyed by original rank index, as ``_rank_noise``."""
        if self.generators is not None:
            u = torch.stack(
                [
                    torch.rand((self.initial_rank,), device=like.device, generator=g)
                    for g in self._row_generators(batch)
                ]
            )
        else:
            u = torch.rand((batch, self.initial_rank), device=like.device, generator=self.generator)
        return u.index_select(1, self.rank_index)

    def _per_sequence(self, key: str, draw: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A per-sequence draw ``[N, ...]``: row ``_row`` of the held one (a ``[1, ...]``) when set,
        else a fresh ``draw()``, kept in ``_held`` while holding."""
        if self._row is not None:
            held = None if self._held is None else self._held.get(key)
            if held is None or self._row >= held.shape[0]:
                raise RuntimeError(
                    f"no per-sequence {key} sample for row {self._row}: the content rows come first"
                )
            return held[self._row : self._row + 1]
        value = draw()
        if self._held is not None:
            self._held[key] = value
        return value

    def _seq_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        # One draw per sequence: broadcast over every axis between the batch and the features.
        return (x.shape[0],) + (1,) * (x.dim() - 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0 = self.base_layer(x)
        if self.rank == 0 or self.lora_A.numel() == 0:
            return y0
        return y0 + self.delta(x).to(y0.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``s · Δ(x)``: ``[..., d_in] -> [..., d_out]``."""
        if x.dim() == 1:  # a single vector is a batch of one sequence
            return self.delta(x.unsqueeze(0)).squeeze(0)
        dtype = x.dtype
        A = self.lora_A.to(dtype)
        B = self.lora_B.to(dtype)
        mask = self.rank_mask.to(dtype)
        noisy = self.sampling and self.method != "lora"
        if self.uses_additive and noisy:
            if self.training:
                return self._additive_lrt(x)
            return self.scale * self._additive_weights(x)
        h = F.linear(x, A) * mask  # [..., r]
        if self.fixed_gates is not None:
            gates = self.fixed_gates.to(device=x.device, dtype=dtype)
            if self._row is not None and x.shape[0] == 1 and self._row < gates.shape[0]:
                gates = gates[self._row : self._row + 1]  # a row shared by the batch, for sequence _row
            if gates.shape != (x.shape[0], self.rank):
                raise ValueError(f"fixed_gates must be [{x.shape[0]}, {self.rank}], got {list(gates.shape)}")
            return self.scale * F.linear(h * gates.view(*self._seq_shape(x), self.rank), B)
        if noisy and self.uses_gate and self.training and self.gate_lrt:
            return self._gate_lrt(h, B)
        if noisy:
            seq = self._seq_shape(x)
            if self.uses_gate:
                eps = self._per_sequence("gate", lambda: self._rank_noise(x.shape[0], x))
                std = torch.exp(0.5 * self.log_alpha.clamp(*LOG_ALPHA_CLAMP))
                z = 1.0 + std * eps.view(*seq, self.rank)
                h = h * z.to(dtype)
            elif self.method == "mcdropout" and self.dropout_p > 0:
                u = self._per_sequence("dropout", lambda: self._rank_uniform(x.shape[0], x))
                keep = (u >= self.dropout_p).to(dtype) / (1.0 - self.dropout_p)
                h = h * keep.view(*seq, self.rank)
        return self.scale * F.linear(h, B)

    def _gate_lrt(self, h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``s · Δ`` with per-token output noise of the gates' exact marginal variance:
        ``h = A x ⊙ mask`` ``[..., r]``; mean ``s B h``, variance ``s² Σ_k α_k h_k² B_jk²``."""
        alpha = torch.exp(self.log_alpha.clamp(*LOG_ALPHA_CLAMP)).to(h.dtype)
        mean = F.linear(h, B)
        var = F.linear(h.pow(2) * alpha, B.pow(2))
        eps = self._randn(tuple(mean.shape), mean).to(h.dtype)
        return self.scale * (mean + torch.sqrt(var + LRT_EPS) * eps)

    def _sigma2(self) -> torch.Tensor:
        return torch.exp(self.log_sigma2.clamp(*LOG_SIGMA2_CLAMP))

    def _additive_lrt(self, x: torch.Tensor) -> torch.Tensor:
        """``s · Δ(x)`` by local reparameterisation with the exact marginal variance, per token
        (docs/method.md §2b).

        With ``v_k = σ_k² ‖x‖²`` the variance ``Σ_k (v_k B_jk² + m_k² σ_k² + v_k σ_k²)`` factorises as
        ``‖x‖² · c_j + t`` with ``c_j = Σ_k σ_k² (B_jk² + σ_k²)`` and ``t = Σ_k m_k² σ_k²``: a broadcast
        instead of an extra ``[tokens, r] × [r, d_out]`` product. Both terms are non-negative, and the
        scale ``s`` is folded into the r-sized factors, so the per-element work is one fused
        multiply-add for the variance, one square root and one for the sample.
        """
        mask = self.rank_mask.float()
        sigma2 = self._sigma2().float() * mask  # [r]
        A, B = self.lora_A.float(), self.lora_B.float()
        s2 = self.scale * self.scale
        xf = x.float()
        m = F.linear(xf, A) * mask  # [..., r]
        mean_y = F.linear(m, B * self.scale)  # [..., d_out]
        sq_norm = xf.pow(2).sum(-1, keepdim=True)  # [..., 1]
        c = (B.pow(2) + sigma2).mul(sigma2 * s2).sum(1)  # [d_out]
        t = (m.pow(2) * (sigma2 * s2)).sum(-1, keepdim=True) + LRT_EPS * s2  # [..., 1]
        eps = self._randn(tuple(mean_y.shape), mean_y)
        return LRTSample.apply(mean_y, sq_norm, c, t, eps).to(x.dtype)

    def _additive_weights(self, x: torch.Tensor) -> torch.Tensor:
        """One posterior sample of (A, B) per sequence: ``A_b = M_A + σ ⊙ ε``, ``B_b = M_B + σ ⊙ ε'``."""
        n = x.shape[0]
        sigma = torch.sqrt(self._sigma2())  # [r]
        eps_a = self._per_sequence("factor_a", lambda: self._rank_noise(n, x, (self.d_in,)))  # [n, r, d_in]
        eps_b = self._per_sequence("factor_b", lambda: self._rank_noise(n, x, (self.d_out,)))  # [n, r, d_out]
        sigma = sigma.float()
        A_s = self.lora_A.float().unsqueeze(0) + sigma.view(1, -1, 1) * eps_a  # [n, r, d_in]
        Bt_s = self.lora_B.float().t().unsqueeze(0) + sigma.view(1, -1, 1) * eps_b  # [n, r, d_out]
        xf = x.float().reshape(n, -1, self.d_in)  # [n, T, d_in]
        h = torch.bmm(xf, A_s.transpose(1, 2)) * self.rank_mask.float()  # [n, T, r]
        out = torch.bmm(h, Bt_s)  # [n, T, d_out]
        return out.reshape(*x.shape[:-1], self.d_out).to(x.dtype)

    # ---- KL and relevance ------------------------------------------------------------------
    def kl(self) -> torch.Tensor:
        """KL of this module's posterior to the log-uniform prior (scalar, fp32); 0 for baselines."""
        device = self.lora_A.device
        # Under FSDP2 the parameters are shards here (outside the forward): the KL is computed on
        # the gathered whole, and each process's gradient reaches its own shard.
        if self.uses_gate:
            g = float(self.d_in + self.d_out) if self.kl_group == "params" else 1.0
            return g * (kl_molchanov(full_tensor(self.log_alpha)) * self.rank_mask).sum()
        if self.uses_additive:
            ls = full_tensor(self.log_sigma2).clamp(*LOG_SIGMA2_CLAMP)
            A, B = full_tensor(self.lora_A), full_tensor(self.lora_B)
            kl_a = kl_molchanov(ls[:, None] - torch.log(A.pow(2) + MU2_EPS)).sum(1)
            kl_b = kl_molchanov(ls[None, :] - torch.log(B.pow(2) + MU2_EPS)).sum(0)
            return ((kl_a + kl_b) * self.rank_mask).sum()
        return torch.zeros((), device=device)

    @torch.no_grad()
    def rank_scores(self) -> torch.Tensor:
        """Relevance score per rank ``[r]`` (larger = noisier = less relevant), fp32.

        gate: ``log α_k``. additive: ``λ_k − ½[median_i log(M_A[k,i]²+ε) + median_j log(M_B[j,k]²+ε)]``
        (median as numpy computes it). Baselines have no posterior: their scores are ``-inf``.
        """
        if self.uses_gate:  # (whole tensors under FSDP2: a collective, as every caller runs it everywhere)
            return full_tensor(self.log_alpha.detach()).float().clone()
        if self.uses_additive:
            if self.lora_A.shape[0] == 0:  # shrunk to rank 0: no ranks, no scores
                return torch.empty(0, device=self.lora_A.device)
            A, B = full_tensor(self.lora_A.detach()), full_tensor(self.lora_B.detach())
            la = torch.quantile(torch.log(A.double().pow(2) + MU2_EPS), 0.5, dim=1)
            lb = torch.quantile(torch.log(B.double().pow(2) + MU2_EPS), 0.5, dim=0)
            return (full_tensor(self.log_sigma2.detach()).double() - 0.5 * (la + lb)).float()
        return torch.full((self.rank,), float("-inf"), device=self.lora_A.device)

    # ---- pruning ---------------------------------------------------------------------------
    @torch.no_grad()
    def prune_(self, threshold: float, min_rank: int | None = None) -> tuple[int, int]:
        """Mask active ranks whose score exceeds ``threshold``, keeping at least ``min_rank``
        (the least noisy ones). Returns (active before, active after)."""
        min_rank = self.min_rank if min_rank is None else min_rank
        before = self.active_rank
        if self.rank_parameter() is None:
            return before, before
        scores = self.rank_scores()
        active = self.rank_mask > 0
        keep = active & (scores <= threshold)
        need = min(min_rank, before) - int(keep.sum().item())
        if need > 0:
            candidates = torch.nonzero(active & ~keep).flatten()
            order = torch.argsort(scores[candidates])
            keep[candidates[order[:need]]] = True
        self.rank_mask.copy_(keep.to(self.rank_mask.dtype))
        return before, self.active_rank

    @torch.no_grad()
    def shrink_(self) -> list[tuple[nn.Parameter, nn.Parameter, int, torch.Tensor]]:
        """Physically remove masked ranks. Returns (old, new, rank_dim, kept) per replaced
        parameter so that an optimizer's state can be sliced the same way."""
        keep = torch.nonzero(self.rank_mask > 0).flatten()
        if keep.numel() == self.rank:
            return []
        replaced = []
        for name, dim in (("lora_A", 0), ("lora_B", 1), ("log_alpha", 0), ("log_sigma2", 0)):
            old = getattr(self, name, None)
            if not isinstance(old, nn.Parameter):
                continue
            new = nn.Parameter(old.detach().index_select(dim, keep).clone(), requires_grad=old.requires_grad)
            setattr(self, name, new)
            replaced.append((old, new, dim, keep))
        self.rank_index = self.rank_index.index_select(0, keep)
        self.rank_mask = self.rank_mask.index_select(0, keep)
        return replaced

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, method={self.method}, posterior={self.posterior}, "
            f"rank={self.active_rank}/{self.initial_rank}, scale={self.scale:g}, sampling={self.sampling}"
        )
