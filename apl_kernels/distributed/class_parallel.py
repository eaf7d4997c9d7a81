"""Class-parallel losses: the logits (or the classifier) split over processes by class.

Rank r of a process group holds columns ``[c_r, c_r + K_r)`` of the logits, as Megatron-LM's
ColumnParallelLinear and DTensor's ``Shard(-1)`` leave them, and the whole targets. Every catalogue
loss is a function of a few per-row sums over the classes (docs/losses.md, "Class-parallel losses"),
so the global loss needs two all-reduces of per-row numbers, whatever the loss:

1. each rank's row maximum ``M_r`` and ``S_r = Σ_local e^{z - M_r}`` (in its own slot of a
   ``(P, 7 + 2R)`` tensor, with a header that checks the ranks agree), and the target's per-row
   totals (``C = Σ c``, the row weight, the number of nonzero coefficients) summed; every rank then
   knows ``lse = M + ln Σ_r S_r e^{M_r - M}`` and so the exact ``lp = z - lse`` of its columns;
2. the loss's partial sums over this rank's columns (``Σ c·x`` and ``Σ x`` of the loss's terms,
   clamps included: they are applied to the exact ``p``), batched into one ``(R, 2n)`` tensor with
   their derivatives ``D = ∂(sum)/∂lse`` (``(R, 3n)`` with ``E = ∂(sum)/∂C`` for the gradient of
   probability targets: a sum of the reverse family reads the row's total ``C``).

The backward needs no collective: the loss is a function ``F(H)`` of the global sums ``H``, replicated
on every rank, so ``∂F/∂H`` is known everywhere, and this rank's columns' gradient is
``Σ_k ∂F/∂H_k · ∂h_k/∂z + (Σ_k ∂F/∂H_k · D_k) · p`` (the second term: the sums depend on every rank's
logits through ``lse``, whose derivative is ``p``). The per-element derivatives are autograd's, on
the same code as the forward's, recomputed in the backward chunk by chunk (as the fused kernels'
GRAD_IN_BACKWARD mode recomputes them): nothing of size (R, K_r) is kept between the passes.
Probability targets that require grad get their columns' gradient alike, ``∂F/∂c`` through the
sums and through ``C`` (``E``), times ``∂c/∂t = (1 - ε) w`` (docs/losses.md).

The per-element formulas are the reference's (reference.Row's methods and its base functions):
a "local" or "reverse" base is a row sum of per-label terms, so the reference's own function on a
shard is this shard's part of the value; a "normalized" or "negative" base divides two such sums.
The fused C++/CUDA/Triton kernels are not used: they take whole rows (their softmax is over the
columns they are given) and return row losses, not the partial sums a shard must exchange.
"""

from __future__ import annotations

import math
import sys
import zlib

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..catalogue import BASE, LossSpec, canonical_name, check_classes, make_spec
from ..options import DEFAULTS, FLOAT_DTYPES, CallOptions, accumulation_dtype, check_target_range
from ..reference import BASE_FUNCTIONS, Row, expectation, reduce_rows

# Elements per chunk of rows (~16 MiB of float32): bounds what one pass holds besides the logits.
CHUNK_ELEMENTS = 1 << 22
HEADER = ("present", "class_offset", "local_classes", "num_classes", "rows", "fingerprint", "error")


def _ratio_terms(base: str, r: Row) -> tuple[Tensor, Tensor]:
    """A normalized or negative base's per-element numerator and denominator terms (reference.py)."""
    if base == "nce":
        return r.lp, r.lp
    if base == "nfl":
        f = r.focal(r.lp)
        return f, f
    if base == "ngce":
        powered = r.clamped().pow(r.spec.param("q"))
        return 1 - powered, powered
    if base == "nnce":
        s = -math.log(r.spec.param("min_prob")) + r.clamped_lp()
        return s, s
    m, gamma = r.spec.param("min_prob"), r.spec.param("gamma")
    g = -(1 - m) ** gamma * math.log(m) - r.focal(r.clamped_lp())  # nnfl: B - f̂
    # Where the clamp holds, f̂ = f(ln m) = B exactly; in float32 the two roundings differ by ~1e-7 B,
    # which a label of such a class turns into a numerator (and a gradient) that should be 0.
    g = torch.where(r.lp > math.log(m), g, 0)
    return g, g


def _ratio_value(base: str, numerator: Tensor, denominator: Tensor, total_c: Tensor, num_classes: int) -> Tensor:
    if base == "ngce":
        return numerator / (num_classes - denominator)
    if base in ("nnce", "nnfl"):
        return total_c - numerator / denominator
    return numerator / denominator


def _is_ratio(base: str) -> bool:
    return BASE[base].family in ("normalized", "negative")


def num_sums(spec: LossSpec) -> int:
    """How many per-row sums over classes loss ``spec`` exchanges (the second all-reduce's width / 2)."""
    return sum(2 if _is_ratio(base) else 1 for base, _ in spec.terms)


class ShardRow(Row):
    """reference.Row on this rank's columns, with the global log-softmax and the global K and C."""

    def __init__(self, lp: Tensor, c: Tensor, total_c: Tensor, num_classes: int, spec: LossSpec) -> None:
        self.lp, self.p, self.c, self.total_c, self.K, self.spec = lp, lp.exp(), c, total_c, num_classes, spec


def partial_sums(spec: LossSpec, r: ShardRow) -> Tensor:
    """(R, n): this rank's part of each per-row sum loss ``spec`` needs."""
    sums = []
    for base, _ in spec.terms:
        if _is_ratio(base):
            numerator, denominator = _ratio_terms(base, r)
            sums += [expectation(r.c, numerator), denominator.sum(1)]
        else:  # a sum of per-label terms: the reference's value on these columns is this rank's part
            sums.append(BASE_FUNCTIONS[base](r))
    return torch.stack(sums, 1)


def row_values(spec: LossSpec, sums: Tensor, total_c: Tensor, num_classes: int) -> Tensor:
    """The rows' losses from the global sums (R, n)."""
    rows, k = 0, 0
    for base, weight in spec.terms:
        if _is_ratio(base):
            value = _ratio_value(base, sums[:, k], sums[:, k + 1], total_c, num_classes)
            k += 2
        else:
            value = sums[:, k]
            k += 1
        rows = rows + weight * value
    return rows


class _Problem:
    """One class-parallel call: the inputs, the replicated per-row statistics, and the three passes
    over chunks of rows (statistics, partial sums, gradient). ``logits(start, end)`` gives a chunk of
    this rank's logits in the accumulation dtype."""

    def __init__(self, spec: LossSpec, options: CallOptions, target: Tensor, class_weight: Tensor | None,
                 class_offset: int, num_classes: int, local_classes: int, group, acc: torch.dtype,
                 chunk_rows: int, logits) -> None:
        self.spec, self.options, self.group, self.acc = spec, options, group, acc
        self.target, self.offset, self.K, self.Kr = target.detach(), class_offset, num_classes, local_classes
        self.class_weight = None if class_weight is None else class_weight.to(acc)
        self.probabilities = target.is_floating_point()
        self.target_grad = self.probabilities and target.requires_grad and torch.is_grad_enabled()
        self.rows = target.shape[0]
        self.chunk_rows = max(1, min(self.rows, chunk_rows))
        self.logits = logits

    def chunks(self):
        return ((s, min(s + self.chunk_rows, self.rows)) for s in range(0, self.rows, self.chunk_rows))

    def coefficients(self, start: int, end: int) -> tuple[Tensor, Tensor]:
        """This rank's columns of the rows' target coefficients ``c`` (reference.target_coefficients'
        rule with the global K), and this rank's part of each row's weight in a mean."""
        eps, w = self.options.label_smoothing, self.class_weight
        if self.probabilities:
            c = self.target[start:end].to(self.acc)
            if eps:
                c = (1 - eps) * c + eps / self.K
            if w is not None:
                c = c * w
            # every rank has every row: the rank holding class 0 counts each row once
            return c, torch.full((end - start,), float(self.offset == 0), dtype=self.acc, device=c.device)
        y = self.target[start:end]
        valid = y != self.options.ignore_index
        local = y - self.offset
        owned = valid & (local >= 0) & (local < self.Kr)
        index = torch.where(owned, local, 0)
        label_weight = owned.to(self.acc) if w is None else torch.where(owned, w[index], 0)
        c = torch.zeros(end - start, self.Kr, dtype=self.acc, device=y.device).scatter(
            1, index[:, None], ((1 - eps) * label_weight)[:, None])
        if eps:
            spread = eps / self.K * (torch.ones(self.Kr, dtype=self.acc, device=y.device) if w is None else w)
            c = c + valid[:, None] * spread
        return c, label_weight

    # -- pass 1 and the first all-reduce ----------------------------------------------------------
    def statistics(self, header: list[float], error: str | None) -> None:
        """The first all-reduce: every rank's header and (M_r, S_r) in its slot, and the rows' C,
        weight and count of nonzero coefficients summed. Raises on every rank if any rank's input is
        wrong or the ranks disagree."""
        P, rank, R = dist.get_world_size(self.group), dist.get_rank(self.group), self.rows
        H = len(HEADER)
        slots = torch.zeros(P, H + 2 * R, dtype=torch.float64, device=self.target.device)
        shared = torch.zeros(3, R, dtype=torch.float64, device=self.target.device)
        slots[rank, :H] = torch.tensor(header, dtype=torch.float64)
        if error is None:
            with torch.no_grad():
                for start, end in self.chunks():
                    z = self.logits(start, end)
                    m = z.amax(1)
                    m = torch.where(m == -math.inf, 0, m)  # a row of masked classes: S_r = 0
                    slots[rank, H + start:H + end] = m.double()
                    slots[rank, H + R + start:H + R + end] = (z - m[:, None]).exp().sum(1).double()
                    c, row_weight = self.coefficients(start, end)
                    shared[:, start:end] = torch.stack([c.sum(1), row_weight, (c != 0).sum(1).to(c.dtype)]).double()
        flat = torch.cat([slots.reshape(-1), shared.reshape(-1)])
        dist.all_reduce(flat, group=self.group)
        slots, shared = flat[:P * (H + 2 * R)].reshape(P, H + 2 * R), flat[P * (H + 2 * R):].reshape(3, R)
        _check_headers(slots[:, :H], error, rank)
        m_r, s_r = slots[:, H:H + R], slots[:, H + R:]
        m = m_r.amax(0)
        m_finite = torch.where(m == -math.inf, 0, m)
        lse = m_finite + (s_r * (m_r - m_finite).exp()).sum(0).log()
        self.lse = lse.to(self.acc)
        self.total_c, self.row_weight = shared[0].to(self.acc), shared[1].to(self.acc)
        self.counted = shared[2] > 0  # rows with some coefficient (reference: the others give 0)

    # -- pass 2 and the second all-reduce ---------------------------------------------------------
    def row(self, lp: Tensor, start: int, end: int, c: Tensor | None = None, total_c: Tensor | None = None):
        c = self.coefficients(start, end)[0] if c is None else c
        return ShardRow(lp, c, self.total_c[start:end] if total_c is None else total_c, self.K, self.spec)

    def sums(self, need_grad: bool) -> None:
        n = num_sums(self.spec)
        local = torch.zeros(self.rows, (3 if self.target_grad else 2) * n, dtype=self.acc, device=self.target.device)
        for start, end in self.chunks():
            lp = (self.logits(start, end).detach() - self.lse[start:end, None]).requires_grad_(need_grad)
            total_c = self.total_c[start:end].detach().requires_grad_(self.target_grad)
            with torch.enable_grad() if need_grad else torch.no_grad():
                h = partial_sums(self.spec, self.row(lp, start, end, total_c=total_c))
                if need_grad:  # D_k = ∂h_k/∂lse = -Σ_j ∂h_k/∂lp_j; E_k = ∂h_k/∂C
                    for k in range(n):
                        g = torch.autograd.grad(h[:, k].sum(), (lp, total_c) if self.target_grad else lp,
                                                retain_graph=k + 1 < n, allow_unused=True, materialize_grads=True)
                        local[start:end, n + k] = -g[0].sum(1)
                        if self.target_grad:
                            local[start:end, 2 * n + k] = g[1]
            local[start:end, :n] = h.detach()
        local = torch.where(self.counted[:, None], local, 0)  # ignored rows may hold anything
        dist.all_reduce(local, group=self.group)
        self.global_sums, self.lse_derivatives = local[:, :n], local[:, n:2 * n]
        self.total_derivatives = local[:, 2 * n:]  # (empty without the targets' gradient)

    def loss(self, sums: Tensor, total_c: Tensor | None = None) -> Tensor:
        total_c = self.total_c if total_c is None else total_c
        sums = torch.where(self.counted[:, None], sums, 1)  # (uncounted rows: finite values and gradients)
        rows = torch.where(self.counted, row_values(self.spec, sums, total_c, self.K), 0)
        # the mean's divisor (contract.mean_divisor's rule): the counted rows' summed weight, 1 if none
        divisor = self.row_weight.sum()
        return reduce_rows(rows, torch.where(divisor == 0, 1, divisor), self.options.reduction)

    def forward(self, need_grad: bool, header: list[float], error: str | None) -> Tensor:
        self.statistics(header, error)
        self.sums(need_grad)
        return self.loss(self.global_sums)

    # -- pass 3: the gradient, chunk by chunk, with no collective ---------------------------------
    def gradient_chunks(self, grad_loss: Tensor):
        """Yield (start, end, d loss / d logits of the chunk, d loss / d targets of the chunk or None)
        for the upstream ``grad_loss``."""
        sums = self.global_sums.detach().requires_grad_()
        total_c = self.total_c.detach().requires_grad_(self.target_grad)
        with torch.enable_grad():
            grads = torch.autograd.grad(self.loss(sums, total_c), (sums, total_c) if self.target_grad else sums,
                                        grad_loss.to(self.acc), allow_unused=True, materialize_grads=True)
        grad_sums = grads[0]
        grad_lse = (grad_sums * self.lse_derivatives).sum(1)
        if self.target_grad:  # ∂F/∂C, directly and through the sums; ∂c/∂t = (1 - ε) w
            grad_total = grads[1] + (grad_sums * self.total_derivatives).sum(1)
            keep = (1 - self.options.label_smoothing) * (1 if self.class_weight is None else self.class_weight)
        for start, end in self.chunks():
            lp = (self.logits(start, end).detach() - self.lse[start:end, None]).requires_grad_()
            c = self.coefficients(start, end)[0].detach().requires_grad_(self.target_grad)
            with torch.enable_grad():
                r = self.row(lp, start, end, c=c)
                g = torch.autograd.grad(partial_sums(self.spec, r), (lp, c) if self.target_grad else lp,
                                        grad_sums[start:end], materialize_grads=True)
            grad = g[0] + grad_lse[start:end, None] * r.p.detach()
            counted = self.counted[start:end, None]
            grad_target = None
            if self.target_grad:
                grad_target = torch.where(counted, (g[1] + grad_total[start:end, None]) * keep, 0)
            yield start, end, torch.where(counted, grad, 0), grad_target


def _check_headers(headers: Tensor, error: str | None, rank: int) -> None:
    """Every rank runs this on the same all-reduced headers, so every rank raises or none does."""
    h = {name: headers[:, i].tolist() for i, name in enumerate(HEADER)}
    if error is not None:
        raise ValueError(f"class-parallel loss, rank {rank}: {error}")
    bad = [r for r, e in enumerate(h["error"]) if e]
    if bad:
        raise ValueError(f"class-parallel loss: the input of rank(s) {bad} is invalid (see their error); every rank "
                         f"stops here")
    if min(h["present"]) != 1 or max(h["present"]) != 1:
        raise RuntimeError("class-parallel loss: a rank's slot was written twice or not at all (ranks of the group "
                           "disagree on their rank?)")
    for name, what in (("fingerprint", "the loss, its parameters or the call's options (reduction, ignore_index, "
                                       "label_smoothing, class weights or not, index or probability targets, "
                                       "whether these require grad)"),
                       ("num_classes", "num_classes"), ("rows", "the number of rows (targets)")):
        if len(set(h[name])) != 1:
            raise ValueError(f"class-parallel loss: the ranks disagree on {what}: {h[name]}; every rank must make "
                             f"the same call on its own shard")
    K = int(h["num_classes"][0])
    spans = sorted(zip(h["class_offset"], h["local_classes"]))
    expected, covered = 0, []
    for offset, size in spans:
        covered.append(f"[{int(offset)}, {int(offset + size)})")
        if offset != expected:
            break
        expected = offset + size
    if expected != K or len(covered) != len(spans):
        raise ValueError(f"class-parallel loss: the shards {', '.join(covered)} (rank order: offsets "
                         f"{[int(o) for o in h['class_offset']]}, sizes {[int(s) for s in h['local_classes']]}) do not "
                         f"cover the {K} classes exactly once: give each rank class_offset = the sum of the earlier "
                         f"ranks' shard sizes")


def _fingerprint(spec: LossSpec, options: CallOptions, weighted: bool, probabilities: bool, target_grad: bool) -> float:
    text = repr((spec.name, spec.terms, spec.params, spec.official_grad, options.reduction, options.ignore_index,
                 options.label_smoothing, weighted, probabilities, target_grad))
    return float(zlib.crc32(text.encode()))


class _ClassParallelFunction(torch.autograd.Function):
    """Autograd of a :class:`_Problem`: forward runs its passes; backward its gradient pass."""

    @staticmethod
    def forward(ctx, problem, backward, *inputs):
        ctx.problem, ctx.gradients = problem, backward
        return problem.result.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        return (None, None, *ctx.gradients(ctx.problem, grad_loss, ctx.needs_input_grad[2:]))


def _check_call(logits: Tensor, target: Tensor, class_offset, num_classes, weight, what: str) -> None:
    """Checks whose failure every rank sees alike (types, the call's integers): raised at once."""
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{what} and target must be tensors, got {type(logits).__name__} and {type(target).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be float16, bfloat16, float32 or float64; got {logits.dtype}")
    for name, value in (("class_offset", class_offset), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes (the global K) must be >= 2; got {num_classes}")
    if weight is not None and (not isinstance(weight, Tensor) or weight.dim() != 1 or not weight.is_floating_point()):
        raise ValueError("weight must be a 1-D floating tensor: this rank's slice of the class weights")


def _local_error(rows: int, local_classes: int, target: Tensor, class_offset: int, num_classes: int,
                 weight: Tensor | None, options: CallOptions, device) -> str | None:
    """What is wrong with this rank's own inputs (reported to every rank by the first all-reduce)."""
    if local_classes < 1:
        return "this rank's shard has no classes (logits_shard.shape[1] == 0)"
    if class_offset < 0 or class_offset + local_classes > num_classes:
        return (f"the shard [class_offset, class_offset + K_r) = [{class_offset}, {class_offset + local_classes}) "
                f"is not inside [0, num_classes = {num_classes})")
    if target.shape[0] != rows:
        return f"target has {target.shape[0]} rows but the logits shard has {rows}"
    if target.is_floating_point():
        if tuple(target.shape) != (rows, local_classes):
            return (f"probability targets must be this rank's columns, of the shard's shape {(rows, local_classes)}; "
                    f"got {tuple(target.shape)}")
    elif target.dim() != 1:
        return f"class-index targets must have shape ({rows},); got {tuple(target.shape)}"
    if weight is not None and weight.shape[0] != local_classes:
        return f"weight has {weight.shape[0]} entries; give this rank's slice, one per local class ({local_classes})"
    for name, t in (("target", target), ("weight", weight)):
        if t is not None and t.device != device:
            return f"{name} is on {t.device} but the logits are on {device}"
    if not target.is_floating_point():
        try:
            check_target_range(target, num_classes, options.ignore_index)
        except ValueError as err:
            return str(err)
    return None


def _prepare(logits: Tensor, target: Tensor, what: str, local_classes: int, class_offset: int, num_classes: int,
             weight, spec: LossSpec, options: CallOptions, group, chunk_rows: int, source):
    """The checks, and a :class:`_Problem` over the (already row-flattened) inputs."""
    if options.backend not in ("auto", "torch"):
        raise ValueError(f"backend {options.backend!r}: class-parallel losses run the PyTorch formulation (a fused "
                         f"kernel's softmax is over the columns it is given); use backend='auto' or 'torch'")
    if group is None and not dist.is_initialized():
        raise RuntimeError("class-parallel losses need torch.distributed: call dist.init_process_group first, or "
                           "pass group=")
    acc = accumulation_dtype(logits.dtype)
    target = target if target.is_floating_point() else target.long()
    try:  # the same on every rank that makes the same call; reported through the header all the same
        check_classes(spec, num_classes)
        error = _local_error(logits.shape[0], local_classes, target, class_offset, num_classes, weight, options,
                             logits.device)
    except ValueError as err:
        error = str(err)
    problem = _Problem(spec, options, target, weight if error is None else None, class_offset, num_classes,
                       local_classes, group, acc, chunk_rows, source)
    header = [1.0, float(class_offset), float(local_classes), float(num_classes), float(target.shape[0]),
              _fingerprint(spec, options, weight is not None, target.is_floating_point(), problem.target_grad),
              float(error is not None)]
    return problem, header, error


def _spatial_rows(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, tuple | None]:
    """(N, K_r, d1, ...) logits and their targets as rows, as functional.compute does."""
    if logits.dim() < 2:
        raise ValueError(f"logits_shard must have shape (N, K_r) or (N, K_r, d1, ...); got {tuple(logits.shape)}")
    if logits.dim() == 2:
        return logits, target, None
    k = logits.shape[1]
    rows = logits.movedim(1, -1).reshape(-1, k)
    labels = target.movedim(1, -1).reshape(-1, k) if target.is_floating_point() else target.reshape(-1)
    return rows, labels, (target.shape[:1] + target.shape[2:]) if target.is_floating_point() else target.shape


def _target_gradient(problem: _Problem) -> tuple:
    """(the probability targets' gradient, to fill) if they require grad, else ()."""
    return (torch.empty_like(problem.target, memory_format=torch.contiguous_format),) if problem.target_grad else ()


def _logits_gradients(problem: _Problem, grad_loss: Tensor, needs) -> tuple:
    grad = torch.empty(problem.rows, problem.Kr, dtype=problem.input_dtype, device=problem.target.device)
    grad_target = _target_gradient(problem)
    for start, end, g, g_target in problem.gradient_chunks(grad_loss):
        grad[start:end] = g
        if grad_target:
            grad_target[0][start:end] = g_target
    return (grad, *grad_target)


def _run_loss(spec: LossSpec, options: CallOptions, logits_shard: Tensor, target: Tensor, *, class_offset: int,
              num_classes: int, group, weight: Tensor | None) -> Tensor:
    _check_call(logits_shard, target, class_offset, num_classes, weight, "logits_shard")
    rows, labels, shape = _spatial_rows(logits_shard, target)
    acc = accumulation_dtype(rows.dtype)
    chunk_rows = max(1, CHUNK_ELEMENTS // max(rows.shape[1], 1))
    problem, header, error = _prepare(rows, labels, "logits_shard", rows.shape[1], class_offset, num_classes, weight,
                                      spec, options, group, chunk_rows, lambda s, e: rows[s:e].to(acc))
    problem.input_dtype = rows.dtype
    need_grad = torch.is_grad_enabled() and rows.requires_grad or problem.target_grad
    problem.result = problem.forward(need_grad, header, error).to(rows.dtype)
    loss = _ClassParallelFunction.apply(problem, _logits_gradients, rows, *((labels,) if problem.target_grad else ()))
    return loss.reshape(shape) if shape is not None and options.reduction == "none" else loss


def class_parallel_loss(logits_shard: Tensor, target: Tensor, name: str, *, class_offset: int, num_classes: int,
                        group=None, weight: Tensor | None = None, reduction: str = DEFAULTS.reduction,
                        ignore_index: int = DEFAULTS.ignore_index, label_smoothing: float = DEFAULTS.label_smoothing,
                        backend: str = DEFAULTS.backend, **params) -> Tensor:
    """Loss ``name`` of logits split over the ranks of ``group`` by class.

    Args:
        logits_shard: this rank's columns ``[class_offset, class_offset + K_r)`` of the logits,
            (N, K_r) or (N, K_r, d1, ...); any split over ranks (uneven, one class), each class on
            exactly one rank.
        target: the global class indices (N) / (N, d1, ...) in [0, num_classes) or ``ignore_index``,
            the same on every rank; or this rank's columns of class probabilities (the shard's shape).
        name, params: a catalogue loss and its parameters (``ak.available_losses()``).
        class_offset: the first global class of this shard. num_classes: the global K.
        group: the process group over which the classes are split (default: the world).
        weight: this rank's slice of the class weights (K_r), or None.
        reduction, ignore_index, label_smoothing: as ``F.cross_entropy``'s; label smoothing is the
            exact global ``ε / num_classes``.
        backend: ``'auto'`` or ``'torch'`` (the PyTorch formulation).

    Returns the global loss, the same on every rank; its backward gives this rank's columns'
    gradient with no collective. Every rank must call it with the same loss, options and targets
    and backpropagate the same upstream gradient (as it does when each rank computes the same
    objective from the returned loss). Two all-reduces per call.
    """
    options = CallOptions(reduction, ignore_index, label_smoothing, backend)
    return _run_loss(make_spec(name, **params), options, logits_shard, target, class_offset=class_offset,
                     num_classes=num_classes, group=group, weight=weight)


class ClassParallelLoss(nn.Module):
    """The module form: ``ClassParallelLoss("nce+rce", class_offset=o, num_classes=K, alpha=1.0)``;
    ``forward(logits_shard, target)``. ``weight`` (this rank's slice) is a buffer."""

    def __init__(self, name: str, *, class_offset: int, num_classes: int, group=None, weight: Tensor | None = None,
                 reduction: str = DEFAULTS.reduction, ignore_index: int = DEFAULTS.ignore_index,
                 label_smoothing: float = DEFAULTS.label_smoothing, backend: str = DEFAULTS.backend,
                 **params) -> None:
        super().__init__()
        self.spec = make_spec(canonical_name(name), **params)
        self.options = CallOptions(reduction, ignore_index, label_smoothing, backend)
        self.class_offset, self.num_classes, self.group = class_offset, num_classes, group
        self.register_buffer("weight", weight)

    def forward(self, logits_shard: Tensor, target: Tensor) -> Tensor:
        return _run_loss(self.spec, self.options, logits_shard, target, class_offset=self.class_offset,
                         num_classes=self.num_classes, group=self.group, weight=self.weight)

    def extra_repr(self) -> str:
        return f"{self.spec.name!r}, class_offset={self.class_offset}, num_classes={self.num_classes}"


# -- the class-parallel linear + loss ----------------------------------------------------------------

def _linear_gradients(problem: _Problem, grad_loss: Tensor, needs) -> tuple:
    hidden, weight, bias = problem.linear_inputs
    grad_hidden = torch.zeros_like(hidden) if needs[0] else None
    grad_weight = torch.zeros_like(weight) if needs[1] else None
    grad_bias = torch.zeros_like(bias) if bias is not None and needs[2] else None
    grad_target = _target_gradient(problem)
    for start, end, g, g_target in problem.gradient_chunks(grad_loss):
        if grad_target:
            grad_target[0][start:end] = g_target
        g = g.to(weight.dtype)
        if grad_hidden is not None:
            grad_hidden[start:end] = g @ weight
        if grad_weight is not None:
            grad_weight.addmm_(g.t(), hidden[start:end])
        if grad_bias is not None:
            grad_bias += g.sum(0)
    if grad_hidden is not None:  # hidden is replicated: its gradient is the sum of the ranks' parts
        dist.all_reduce(grad_hidden, group=problem.group)
    return (grad_hidden, grad_weight) + ((grad_bias,) if bias is not None else ()) + grad_target


def class_parallel_linear_loss(hidden: Tensor, weight_shard: Tensor, target: Tensor, name: str, *,
                               class_offset: int, num_classes: int, bias_shard: Tensor | None = None, group=None,
                               class_weight: Tensor | None = None, reduction: str = DEFAULTS.reduction,
                               ignore_index: int = DEFAULTS.ignore_index,
                               label_smoothing: float = DEFAULTS.label_smoothing, chunk_size: int | None = None,
                               backend: str = DEFAULTS.backend, **params) -> Tensor:
    """Loss ``name`` of ``hidden @ weight.T + bias`` with the classifier's rows split over ranks.

    ``hidden`` (N, H) is replicated; this rank holds rows ``[class_offset, class_offset + K_r)`` of
    the classifier (``weight_shard`` (K_r, H), ``bias_shard`` (K_r)), as ColumnParallelLinear does.
    The logits go ``chunk_size`` rows at a time (linear.py's default) and are never whole; the
    gradient of ``hidden`` is all-reduced once in the backward. Options as
    :func:`class_parallel_loss` (``class_weight`` is its ``weight``: this rank's slice).
    """
    from ..linear import default_chunk_size  # (linear imports functional, which imports this module)

    _check_call(hidden, target, class_offset, num_classes, class_weight, "hidden")
    if not isinstance(weight_shard, Tensor) or weight_shard.dim() != 2 or hidden.dim() != 2 \
            or weight_shard.shape[1] != hidden.shape[1] or weight_shard.dtype != hidden.dtype:
        raise ValueError(f"hidden (N, H) and weight_shard (K_r, H) must be 2-D of one dtype and the same H; got "
                         f"{tuple(hidden.shape)} {hidden.dtype} and {tuple(getattr(weight_shard, 'shape', ()))}")
    if bias_shard is not None and (bias_shard.shape != weight_shard.shape[:1] or bias_shard.dtype != hidden.dtype):
        raise ValueError(f"bias_shard must have shape ({weight_shard.shape[0]},) and hidden's dtype")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")
    spec = make_spec(name, **params)
    options = CallOptions(reduction, ignore_index, label_smoothing, backend)
    acc = accumulation_dtype(hidden.dtype)
    local_classes = weight_shard.shape[0]
    chunk_rows = chunk_size or default_chunk_size(hidden.shape[0], hidden.shape[1], local_classes, hidden.device.type)

    def logits(start: int, end: int) -> Tensor:
        chunk = hidden[start:end].detach() @ weight_shard.detach().t()
        return (chunk if bias_shard is None else chunk + bias_shard.detach()).to(acc)

    problem, header, error = _prepare(hidden, target, "hidden", local_classes, class_offset, num_classes,
                                      class_weight, spec, options, group, chunk_rows, logits)
    problem.linear_inputs = (hidden.detach(), weight_shard.detach(), None if bias_shard is None else bias_shard.detach())
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight_shard, bias_shard)) or problem.target_grad
    problem.result = problem.forward(need_grad, header, error).to(hidden.dtype)
    inputs = (hidden, weight_shard) + (() if bias_shard is None else (bias_shard,)) + (
        (target,) if problem.target_grad else ())
    return _ClassParallelFunction.apply(problem, _linear_gradients, *inputs)


# -- DTensor: logits sharded on the class dimension ---------------------------------------------------

def is_dtensor(x) -> bool:
    """Whether ``x`` is a DTensor (without importing torch.distributed.tensor where no one has)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def _local(x):
    """A replicated DTensor's local tensor (a plain tensor as it is)."""
    if is_dtensor(x):
        if not all(p.is_replicate() for p in x.placements):
            raise ValueError(f"a target or weight given as a DTensor must be replicated; got {x.placements}")
        return x.to_local()
    return x


def dtensor_loss(spec: LossSpec, input, target, weight, options: CallOptions) -> Tensor:
    """The ordinary loss functions' and modules' path for DTensor logits sharded on the class
    dimension (``Shard(1)``, or ``Shard(-1)`` of (N, K) logits) over a 1-D device mesh: the
    explicit form on the local shard. Returns the loss as a plain tensor, the same on every rank."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    explicit = ("use apl_kernels.distributed.class_parallel_loss(logits.to_local(), target, name, class_offset=..., "
                "num_classes=...) on each rank's shard")
    mesh, placements = input.device_mesh, input.placements
    class_dim = 1 if input.dim() > 1 else None
    sharded = [p.is_shard() and (p.dim % input.dim()) == class_dim for p in placements]
    if mesh.ndim != 1 or not all(sharded):
        raise ValueError(f"DTensor logits are accepted sharded on the class dimension (Shard(1)) over a 1-D mesh; "
                         f"got placements {placements} on a {mesh.ndim}-D mesh: {explicit}")
    shape, offsets = compute_local_shape_and_global_offset(input.shape, mesh, placements)
    class_offset, local_classes, num_classes = offsets[1], shape[1], input.shape[1]
    if is_dtensor(target) and not all(p.is_replicate() for p in target.placements):
        target = target.to_local()  # probabilities sharded as the logits are
    else:
        target = _local(target)
        if isinstance(target, Tensor) and target.is_floating_point() and target.dim() > 1 \
                and target.shape[1] == num_classes:
            target = target.narrow(1, class_offset, local_classes)  # global probabilities: this rank's columns
    weight = _local(weight)
    if weight is not None:
        if weight.shape[0] != num_classes:
            raise ValueError(f"weight must have one entry per class ({num_classes}); got {weight.shape[0]}")
        weight = weight.narrow(0, class_offset, local_classes)
    return _run_loss(spec, options, input.to_local(), target, class_offset=class_offset, num_classes=num_classes,
                     group=mesh.get_group(), weight=weight)
