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
logits through ``lse``, whose derivative is ``p``). The per-element derivatives are recomputed in
the backward chunk by chunk (as the fused kernels' GRAD_IN_BACKWARD mode recomputes them): nothing
of size (R, K_r) is kept between the passes.
Probability targets that require grad get their columns' gradient alike, ``∂F/∂c`` through the
sums and through ``C`` (``E``), times ``∂c/∂t = (1 - ε) w`` (docs/losses.md).

Two formulations of the per-shard passes (shard_math.py): the fused C++ shard kernel for CPU tensors
(``backend='auto'`` or ``'cpp'``: one pass over a chunk for the sums and their derivatives, one for
the gradient, written over the chunk's logits in the linear + loss), and the PyTorch reference's
per-element functions with autograd (``'torch'``, and every other device: the CUDA and Triton
kernels take whole rows).
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..backends import contract, resolve
from ..backends.fused import released_after_this_backward
from ..catalogue import LossSpec, canonical_name, check_classes, make_spec
from ..options import DEFAULTS, FLOAT_DTYPES, CallOptions, accumulation_dtype, check_target_range
from ..reference import reduce_rows
from .shard_math import ShardRow, fused_gradient, fused_sums, gradient_record, num_sums, partial_sums, row_values

# Elements per chunk of rows (~16 MiB of float32) of given logits: bounds what one pass holds.
CHUNK_ELEMENTS = 1 << 22
# The PyTorch formulation's elements at a time (~2 MiB of float32) within a chunk: its autograd
# holds 7 to 20 tensors of that size at once (bench/run_class_parallel.py --working-set).
SLICE_ELEMENTS = 1 << 19
HEADER = ("present", "class_offset", "local_classes", "num_classes", "rows", "fingerprint", "error")


class _Problem:
    """One class-parallel call: the inputs, the replicated per-row statistics, and the three passes
    over chunks of rows (statistics, partial sums, gradient). ``logits(start, end)`` gives a chunk of
    this rank's logits in the accumulation dtype."""

    def __init__(self, spec: LossSpec, options: CallOptions, target: Tensor, class_weight: Tensor | None,
                 class_offset: int, num_classes: int, local_classes: int, group, acc: torch.dtype,
                 chunk_rows: int, logits, fused: bool) -> None:
        self.spec, self.options, self.group, self.acc, self.fused = spec, options, group, acc, fused
        self.target, self.offset, self.K, self.Kr = target.detach(), class_offset, num_classes, local_classes
        self.class_weight = None if class_weight is None else class_weight.to(acc)
        self.probabilities = target.is_floating_point()
        self.target_grad = self.probabilities and target.requires_grad and torch.is_grad_enabled()
        self.rows = target.shape[0]
        self.chunk_rows = max(1, min(self.rows, chunk_rows))
        self.logits = logits

    def chunks(self):
        return ((s, min(s + self.chunk_rows, self.rows)) for s in range(0, self.rows, self.chunk_rows))

    def slices(self, start: int, end: int):
        """The PyTorch formulation's pieces of chunk [start, end): at most SLICE_ELEMENTS each."""
        step = max(1, SLICE_ELEMENTS // max(self.Kr, 1))
        return ((s, min(s + step, end)) for s in range(start, end, step))

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
        valid, column, label_weight = self.labels(start, end)
        c = torch.zeros(end - start, self.Kr, dtype=self.acc, device=valid.device).scatter(
            1, column.clamp(min=0)[:, None], ((1 - eps) * label_weight)[:, None])
        if eps:
            c = c + valid[:, None] * self.spread()
        return c, label_weight

    def labels(self, start: int, end: int) -> tuple[Tensor, Tensor, Tensor]:
        """Class-index rows: whether each counts (not ignore_index), its label's column on this
        shard (-1 where another rank holds it) and that label's class weight (0 there)."""
        y = self.target[start:end]
        valid, local = y != self.options.ignore_index, y - self.offset
        owned = valid & (local >= 0) & (local < self.Kr)
        column = torch.where(owned, local, -1)
        w = self.class_weight
        label_weight = owned.to(self.acc) if w is None else torch.where(owned, w[column.clamp(min=0)], 0)
        return valid, column, label_weight

    def spread(self) -> Tensor:
        """What label smoothing puts on each of this rank's classes: ε / K times the class weight."""
        w = self.class_weight
        ones = torch.ones(self.Kr, dtype=self.acc, device=self.target.device)
        return self.options.label_smoothing / self.K * (ones if w is None else w)

    def row_totals(self, start: int, end: int) -> Tensor:
        """(3, rows) of this rank's part of the rows' C = Σ c, weight in a mean, and a count that is
        0 exactly where all of c is; for class indices without forming c (one label, one spread)."""
        if self.probabilities:
            c, row_weight = self.coefficients(start, end)
            return torch.stack([c.sum(1), row_weight, (c != 0).sum(1).to(c.dtype)])
        valid, _, label_weight = self.labels(start, end)
        spread = self.spread()
        label_c = (1 - self.options.label_smoothing) * label_weight
        # (the label's own spread has its weight's sign: it never cancels label_c)
        nonzero = (label_c != 0).to(self.acc) + valid * (spread != 0).sum()
        return torch.stack([label_c + valid * spread.sum(), label_weight, nonzero])

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
                    # M_r as it is (-inf where this rank's part of a row is all masked: the global max
                    # is then another rank's, which the shard kernel takes as the row's max), and
                    # S_r = 0 there, from a finite reference
                    slots[rank, H + start:H + end] = m.double()
                    m = torch.where(m == -math.inf, 0, m)
                    slots[rank, H + R + start:H + R + end] = torch.sub(z, m[:, None]).exp_().sum(1).double()
                    del z  # (before the next chunk's logits are formed)
                    shared[:, start:end] = self.row_totals(start, end).double()
        flat = torch.cat([slots.reshape(-1), shared.reshape(-1)])
        dist.all_reduce(flat, group=self.group)
        slots, shared = flat[:P * (H + 2 * R)].reshape(P, H + 2 * R), flat[P * (H + 2 * R):].reshape(3, R)
        _check_headers(slots[:, :H], error, rank)
        m_r, s_r = slots[:, H:H + R], slots[:, H + R:]
        m = m_r.amax(0)
        m_finite = torch.where(m == -math.inf, 0, m)
        log_s = (s_r * (m_r - m_finite).exp()).sum(0).log()
        self.lse = (m_finite + log_s).to(self.acc)
        if self.fused:  # the rows' global max, log s and C, as the shard ops read them (contract.RECORD)
            self.record = torch.zeros(R, contract.STATS, dtype=torch.float64, device=self.target.device)
            self.record[:, :3] = torch.stack([m_finite, log_s, shared[0]], 1)
        self.total_c, self.row_weight = shared[0].to(self.acc), shared[1].to(self.acc)
        self.counted = shared[2] > 0  # rows with some coefficient (reference: the others give 0)

    # -- pass 2 and the second all-reduce ---------------------------------------------------------
    def row(self, lp: Tensor, start: int, end: int, c: Tensor | None = None, total_c: Tensor | None = None):
        c = self.coefficients(start, end)[0] if c is None else c
        return ShardRow(lp, c, self.total_c[start:end] if total_c is None else total_c, self.K, self.spec)

    def shard_target(self, start: int, end: int) -> Tensor:
        """The fused ops' target: the rows' label columns on this shard (-1 elsewhere), or this
        shard's probabilities."""
        return self.target[start:end] if self.probabilities else self.labels(start, end)[1]

    def fused_arguments(self, start: int, end: int) -> tuple:
        return (self.spec, self.options, self.logits(start, end), self.shard_target(start, end), self.class_weight)

    def fused_chunk_gradient(self, record: Tensor, start: int, end: int, into) -> tuple[Tensor, Tensor | None]:
        """The fused path's gradients of a chunk (gradient_chunks)."""
        spec, options, z, target, weight = self.fused_arguments(start, end)
        grad = z if into is None else into(start, end)
        grad_target = torch.empty_like(grad) if self.target_grad else None
        fused_gradient(spec, options, z, target, weight, record[start:end], self.counted[start:end], self.K, grad,
                       grad_target)
        return grad, grad_target

    def torch_sums(self, z: Tensor, start: int, end: int, local: Tensor, need_grad: bool) -> None:
        """The PyTorch formulation of rows [start, end) of sums(), from their logits ``z``."""
        n = num_sums(self.spec)
        lp = (z.detach() - self.lse[start:end, None]).requires_grad_(need_grad)
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

    def sums(self, need_grad: bool) -> None:
        n = num_sums(self.spec)
        local = torch.zeros(self.rows, (3 if self.target_grad else 2) * n, dtype=self.acc, device=self.target.device)
        for start, end in self.chunks():
            if self.fused:  # every sum and its derivatives in one pass (D, E are cheap: always taken)
                local[start:end] = fused_sums(*self.fused_arguments(start, end), self.record[start:end],
                                              self.counted[start:end], self.K, self.target_grad)
                continue
            z = self.logits(start, end)
            for s, e in self.slices(start, end):
                self.torch_sums(z[s - start:e - start], s, e, local, need_grad)
            del z  # (before the next chunk's logits are formed)
        local = torch.where(self.counted[:, None], local, 0)  # ignored rows may hold anything
        dist.all_reduce(local, group=self.group)
        self.global_sums, self.lse_derivatives = local[:, :n], local[:, n:2 * n]
        self.total_derivatives = local[:, 2 * n:]  # (empty without the targets' gradient)

    def loss(self, sums: Tensor, total_c: Tensor | None = None) -> Tensor:
        total_c = self.total_c if total_c is None else total_c
        sums = torch.where(self.counted[:, None], sums, 1)  # (uncounted rows: finite values and gradients)
        rows = torch.where(self.counted, row_values(self.spec, sums, total_c), 0)
        # the mean's divisor (contract.mean_divisor's rule): the counted rows' summed weight, 1 if none
        divisor = self.row_weight.sum()
        return reduce_rows(rows, torch.where(divisor == 0, 1, divisor), self.options.reduction)

    def forward(self, need_grad: bool, header: list[float], error: str | None) -> Tensor:
        self.statistics(header, error)
        self.sums(need_grad)
        return self.loss(self.global_sums)

    # -- pass 3: the gradient, chunk by chunk, with no collective ---------------------------------
    def gradient_chunks(self, grad_loss: Tensor, into=None):
        """Yield (start, end, d loss / d logits of the chunk, d loss / d targets of the chunk or None)
        for the upstream ``grad_loss``. ``into(start, end)``: where a chunk's gradient may be written
        (contiguous, the accumulation dtype); None: a new tensor, or (the fused path) over the chunk's
        logits, which ``logits(start, end)`` must then make anew."""
        sums = self.global_sums.detach().requires_grad_()
        total_c = self.total_c.detach().requires_grad_(self.target_grad)
        with torch.enable_grad():
            grads = torch.autograd.grad(self.loss(sums, total_c), (sums, total_c) if self.target_grad else sums,
                                        grad_loss.to(self.acc), allow_unused=True, materialize_grads=True)
        grad_sums = grads[0]
        grad_lse = (grad_sums * self.lse_derivatives).sum(1)
        grad_total = None
        if self.target_grad:  # ∂F/∂C, directly and through the sums; ∂c/∂t = (1 - ε) w
            grad_total = grads[1] + (grad_sums * self.total_derivatives).sum(1)
            keep = (1 - self.options.label_smoothing) * (1 if self.class_weight is None else self.class_weight)
        if self.fused:
            record = gradient_record(self.spec, self.record, grad_sums, grad_lse, grad_total)
            for start, end in self.chunks():
                yield start, end, *self.fused_chunk_gradient(record, start, end, into)
            return
        for start, end in self.chunks():
            z = self.logits(start, end)
            grad = torch.empty(end - start, self.Kr, dtype=self.acc, device=z.device) if into is None \
                else into(start, end)
            grad_target = torch.empty_like(grad) if self.target_grad else None
            for s, e in self.slices(start, end):
                lp = (z[s - start:e - start].detach() - self.lse[s:e, None]).requires_grad_()
                c = self.coefficients(s, e)[0].detach().requires_grad_(self.target_grad)
                with torch.enable_grad():
                    r = self.row(lp, s, e, c=c)
                    g = torch.autograd.grad(partial_sums(self.spec, r), (lp, c) if self.target_grad else lp,
                                            grad_sums[s:e], materialize_grads=True)
                counted = self.counted[s:e, None]
                grad[s - start:e - start] = torch.where(counted, g[0] + grad_lse[s:e, None] * r.p.detach(), 0)
                if self.target_grad:
                    grad_target[s - start:e - start] = torch.where(counted, (g[1] + grad_total[s:e, None]) * keep, 0)
            del z
            yield start, end, grad, grad_target


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
        if torch.is_grad_enabled():  # backward(create_graph=True): a gradient to be differentiated
            raise RuntimeError("class-parallel losses give first derivatives only: backward with create_graph=True "
                               "(a gradient penalty, a Hessian) is refused; compute the loss with "
                               "apl_kernels.functional on gathered logits (backend='torch') for those")
        gradients = ctx.gradients(ctx.problem, grad_loss, ctx.needs_input_grad[2:])
        if released_after_this_backward(grad_loss):  # the inputs and sums go, as saved tensors would
            ctx.problem = None
        return (None, None, *gradients)


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


def _local_error(rows: int, local_classes: int, target: Tensor, class_offset: int, num_classes: int,
                 weight: Tensor | None, options: CallOptions, device) -> str | None:
    """What is wrong with this rank's own inputs (reported to every rank by the first all-reduce)."""
    if local_classes < 1:
        return "this rank's shard has no classes (logits_shard.shape[1] == 0)"
    if weight is not None and (not isinstance(weight, Tensor) or weight.dim() != 1 or not weight.is_floating_point()):
        return "weight must be a 1-D floating tensor: this rank's slice of the class weights"
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        return "class-parallel losses give no gradient of the class weights: pass weight.detach()"
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
             weight, spec: LossSpec, options: CallOptions, group, chunk_rows: int, source,
             input_error: str | None = None):
    """The checks, and a :class:`_Problem` over the (already row-flattened) inputs. ``input_error``:
    what the caller found wrong with this rank's own inputs (reported like _local_error's)."""
    if options.backend not in ("auto", "cpp", "torch"):
        raise ValueError(f"backend {options.backend!r}: class-parallel losses run the fused C++ shard kernel (CPU "
                         f"tensors) or the PyTorch formulation (any device); use backend='auto', 'cpp' or 'torch'")
    if options.backend == "cpp" and logits.device.type != "cpu":
        raise ValueError(f"backend 'cpp' runs on CPU tensors; these are on {logits.device} (use 'auto' or 'torch')")
    fused = options.backend != "torch" and logits.device.type == "cpu" and resolve(options.backend, "cpu").name == "cpp"
    if group is None and not dist.is_initialized():
        raise RuntimeError("class-parallel losses need torch.distributed: call dist.init_process_group first, or "
                           "pass group=")
    acc = accumulation_dtype(logits.dtype)
    target = target if target.is_floating_point() else target.long()
    try:  # the same on every rank that makes the same call; reported through the header all the same
        check_classes(spec, num_classes)
        error = input_error or _local_error(logits.shape[0], local_classes, target, class_offset, num_classes,
                                            weight, options, logits.device)
    except ValueError as err:
        error = str(err)
    problem = _Problem(spec, options, target, weight if error is None else None, class_offset, num_classes,
                       local_classes, group, acc, chunk_rows, source, fused)
    header = [1.0, float(class_offset), float(local_classes), float(num_classes), float(target.shape[0]),
              _fingerprint(spec, options, weight is not None, target.is_floating_point(), problem.target_grad),
              float(error is not None)]
    return problem, header, error


def _spatial_rows(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, tuple | None, str | None]:
    """(N, K_r, d1, ...) logits and their targets as rows, as functional.compute does, and what is
    wrong with the target's shape (then replaced by zeros, so that this rank still meets the others
    at the first all-reduce and every rank raises there)."""
    if logits.dim() < 2:
        raise ValueError(f"logits_shard must have shape (N, K_r) or (N, K_r, d1, ...); got {tuple(logits.shape)}")
    if logits.dim() == 2:
        return logits, target, None, None
    k, error = logits.shape[1], None
    rows = logits.movedim(1, -1).reshape(-1, k)
    spatial = logits.shape[:1] + logits.shape[2:]
    want = logits.shape if target.is_floating_point() else spatial
    if target.shape != want:
        error = (f"target has shape {tuple(target.shape)}; logits of shape {tuple(logits.shape)} take class indices "
                 f"of shape {tuple(spatial)} or this rank's probabilities of the logits' shape")
        target = torch.zeros(want, dtype=target.dtype, device=logits.device)
    labels = target.movedim(1, -1).reshape(-1, k) if target.is_floating_point() else target.reshape(-1)
    return rows, labels, spatial, error


def _target_gradient(problem: _Problem) -> tuple:
    """(the probability targets' gradient, to fill) if they require grad, else ()."""
    return (torch.empty_like(problem.target, memory_format=torch.contiguous_format),) if problem.target_grad else ()


def _logits_gradients(problem: _Problem, grad_loss: Tensor, needs) -> tuple:
    grad = torch.empty(problem.rows, problem.Kr, dtype=problem.input_dtype, device=problem.target.device)
    grad_target = _target_gradient(problem)
    direct = grad.dtype == problem.acc  # the fused path writes into grad's rows themselves

    def into(start: int, end: int) -> Tensor:
        return grad[start:end] if direct else torch.empty(end - start, problem.Kr, dtype=problem.acc, device=grad.device)

    for start, end, g, g_target in problem.gradient_chunks(grad_loss, into):
        if g.data_ptr() != grad[start:end].data_ptr():
            grad[start:end] = g
        if grad_target:
            grad_target[0][start:end] = g_target
    return (grad, *grad_target)


def run_loss(spec: LossSpec, options: CallOptions, logits_shard: Tensor, target: Tensor, *, class_offset: int,
              num_classes: int, group, weight: Tensor | None) -> Tensor:
    _check_call(logits_shard, target, class_offset, num_classes, weight, "logits_shard")
    rows, labels, shape, shape_error = _spatial_rows(logits_shard, target)
    acc = accumulation_dtype(rows.dtype)
    chunk_rows = max(1, CHUNK_ELEMENTS // max(rows.shape[1], 1))
    problem, header, error = _prepare(rows, labels, "logits_shard", rows.shape[1], class_offset, num_classes, weight,
                                      spec, options, group, chunk_rows, lambda s, e: rows[s:e].detach().to(acc),
                                      shape_error)
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
        backend: ``'auto'`` (the fused C++ shard kernel for CPU tensors, else the PyTorch
            formulation), ``'cpp'`` or ``'torch'``.

    Returns the global loss, the same on every rank; its backward gives this rank's columns'
    gradient with no collective. Every rank must call it with the same loss, options and targets
    and backpropagate the same upstream gradient (as it does when each rank computes the same
    objective from the returned loss). Two all-reduces per call.
    """
    options = CallOptions(reduction, ignore_index, label_smoothing, backend)
    return run_loss(make_spec(name, **params), options, logits_shard, target, class_offset=class_offset,
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
        return run_loss(self.spec, self.options, logits_shard, target, class_offset=self.class_offset,
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
        del g, g_target  # (before the next chunk's logits are formed)
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
    if hidden.dim() != 2:
        raise ValueError(f"hidden must have shape (N, H); got {tuple(hidden.shape)}")
    # This rank's own classifier shard: what is wrong with it goes to every rank at the first all-reduce.
    shard_error = None
    if not isinstance(weight_shard, Tensor) or weight_shard.dim() != 2 or weight_shard.shape[1] != hidden.shape[1] \
            or weight_shard.dtype != hidden.dtype or weight_shard.device != hidden.device:
        shard_error = (f"weight_shard must be (K_r, H = {hidden.shape[1]}) of hidden's dtype {hidden.dtype} and device "
                       f"{hidden.device}; got {tuple(getattr(weight_shard, 'shape', ()))} "
                       f"{getattr(weight_shard, 'dtype', type(weight_shard).__name__)} "
                       f"{getattr(weight_shard, 'device', '')}")
    elif bias_shard is not None and (not isinstance(bias_shard, Tensor) or bias_shard.shape != weight_shard.shape[:1]
                                     or bias_shard.dtype != hidden.dtype or bias_shard.device != hidden.device):
        shard_error = f"bias_shard must have shape ({weight_shard.shape[0]},) and hidden's dtype and device"
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")
    spec = make_spec(name, **params)
    options = CallOptions(reduction, ignore_index, label_smoothing, backend)
    acc = accumulation_dtype(hidden.dtype)
    local_classes = weight_shard.shape[0] if shard_error is None else 1
    chunk_rows = chunk_size or default_chunk_size(hidden.shape[0], hidden.shape[1], local_classes, hidden.device.type)

    def logits(start: int, end: int) -> Tensor:  # a new tensor each time (the gradient is written over it)
        rows, w = hidden[start:end].detach(), weight_shard.detach().t()
        return (rows @ w if bias_shard is None else torch.addmm(bias_shard.detach(), rows, w)).to(acc)

    problem, header, error = _prepare(hidden, target, "hidden", local_classes, class_offset, num_classes,
                                      class_weight, spec, options, group, chunk_rows, logits, shard_error)
    problem.linear_inputs = (hidden.detach(), weight_shard.detach(), None if bias_shard is None else bias_shard.detach()) \
        if shard_error is None else None
    need_grad = torch.is_grad_enabled() and any(
        getattr(t, "requires_grad", False) for t in (hidden, weight_shard, bias_shard)) or problem.target_grad
    problem.result = problem.forward(need_grad, header, error).to(hidden.dtype)
    inputs = (hidden, weight_shard) + (() if bias_shard is None else (bias_shard,)) + (
        (target,) if problem.target_grad else ())
    return _ClassParallelFunction.apply(problem, _linear_gradients, *inputs)
