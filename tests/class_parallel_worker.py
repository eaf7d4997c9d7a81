"""One rank of tests/test_class_parallel.py's process groups (gloo, CPU): runs a job, writes a JSON
report (failures, collective counts, errors raised) to OUT/rank<r>.json.

    python tests/class_parallel_worker.py JOB[,JOB...] RANK WORLD SEED[,SEED...] OUT  (the ranks meet in OUT/store)
"""

from __future__ import annotations

import datetime
import json
import math
import sys
import traceback
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

import apl_kernels as ak
from apl_kernels.distributed import ClassParallelLoss, class_parallel, class_parallel_linear_loss, class_parallel_loss
from apl_kernels.testing.cases import (
    LOSS_CASES, TARGET_MODES, assert_parity, case_id, clamp_levels, make_target, off_kinks, random_logits, run,
    term_magnitudes,
)
from test_target_grad import target_magnitudes  # (this file's directory is on the path)

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "all_to_all", "all_to_all_single", "reduce", "gather", "scatter", "barrier")
CALLS: Counter = Counter()


def count_collectives() -> None:
    """Wrap every torch.distributed collective with a counter (the module calls them as dist.X)."""
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def counted(*args, __original=original, __name=name, **kwargs):
            CALLS[__name] += 1
            return __original(*args, **kwargs)

        setattr(dist, name, counted)


def splits(world: int, seed: int) -> tuple[int, list[int]]:
    """K and an uneven split of it over ``world`` ranks, one rank holding a single class."""
    g = torch.Generator().manual_seed(seed + 7)
    sizes = [int(s) for s in torch.randint(1, 6, (world,), generator=g)]
    sizes[int(torch.randint(0, world, (1,), generator=g))] = 1
    if sum(sizes) < 2:
        sizes[0] += 1
    return sum(sizes), sizes


def gather(x: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every rank's ``x`` (padded to the widest along dim 1), on every rank; outside the counted calls."""
    width = torch.tensor([x.shape[-1]])
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    padded = torch.nn.functional.pad(x.detach(), (0, int(width) - x.shape[-1]))
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return out


def counted_call(fn):
    """Run fn() -> loss, then its backward; the collectives of each."""
    CALLS.clear()
    loss, backward = fn()
    forward = sum(CALLS.values())
    CALLS.clear()
    backward()
    return loss, forward, sum(CALLS.values())


def parity_job(rank: int, world: int, seed: int, rows: int = 7) -> dict:
    """Every catalogue case against the single-process reference on the whole logits. The (case,
    target mode) pairs are dealt over the groups of 2, 3 and 4 ranks (each case meets each group):
    float64 on 2 ranks, float32 on 3, both in turn on 4; each with the fused C++ shard kernel
    ("auto" on CPU) and the PyTorch formulation. Probability targets require grad: their columns'
    gradient too."""
    group = world - 2
    dtypes_of = {0: lambda i: (torch.float64,), 1: lambda i: (torch.float32,),
                 2: lambda i: ((torch.float64, torch.float32)[i % 2],)}[group]
    K, sizes = splits(world, seed)
    offset, kr = sum(sizes[:rank]), sizes[rank]
    failures, counts = [], Counter()
    for i, (name, params) in enumerate(LOSS_CASES):
        for mode in [m for j, m in enumerate(TARGET_MODES) if (i + j) % 3 == group]:
            for dtype, backend in [(d, b) for d in dtypes_of(i) for b in ("auto", "torch")]:
                reduction = ("none", "mean", "sum")[i % 3]
                s = seed + 1000 * i + 10 * TARGET_MODES.index(mode)
                z = off_kinks(random_logits(rows, K, s).to(dtype), clamp_levels(params))
                target, options = make_target(mode, rows, K, s)
                if not target.is_floating_point():
                    target[i % rows] = -100  # an ignored row
                if mode == "probabilities":
                    options["label_smoothing"] = 0.1
                g = torch.Generator().manual_seed(s + 5)
                upstream = torch.rand(rows if reduction == "none" else (), generator=g, dtype=torch.float64) + 0.5
                where = f"seed {seed} {case_id((name, params))} {mode} {dtype} {reduction} {backend} split {sizes}"
                shard = z[:, offset:offset + kr].clone().requires_grad_()
                local_target = target[:, offset:offset + kr].to(dtype) if mode == "probabilities" else target
                local_target.requires_grad_(mode == "probabilities")
                weight = options.get("weight")

                def call():
                    loss = class_parallel_loss(
                        shard, local_target, name, class_offset=offset, num_classes=K, reduction=reduction,
                        weight=None if weight is None else weight[offset:offset + kr].to(dtype),
                        label_smoothing=options.get("label_smoothing", 0.0), backend=backend, **params)
                    return loss, lambda: loss.backward(upstream.to(dtype))

                try:
                    got, forward, backward = counted_call(call)
                    counts[(forward, backward)] += 1
                    assert got.dtype == dtype, f"loss dtype {got.dtype}"
                    got, grad = got.detach(), shard.grad
                    grad_t = local_target.grad if mode == "probabilities" else torch.zeros_like(shard)
                    assert grad_t.dtype == dtype and grad_t.shape == shard.shape, f"targets' gradient {grad_t}"
                except Exception as err:  # noqa: BLE001  (reported to the test; the gathers below go on)
                    failures.append(f"rank {rank} {where}: {type(err).__name__}: {err}")
                    got, grad = torch.full(upstream.shape, math.nan, dtype=dtype), torch.full_like(shard, math.nan)
                    grad_t = torch.full_like(shard, math.nan)
                # Rank 0 checks the whole loss (the same on every rank) and gradient against the reference.
                values, grads, grads_t = gather(got.reshape(-1), world), gather(grad, world), gather(grad_t, world)
                if rank != 0:
                    continue
                try:
                    assert all(torch.equal(v, values[0]) for v in values), f"the ranks' losses differ: {values}"
                    full_grad = torch.cat([g[:, :k] for g, k in zip(grads, sizes)], 1)
                    t64 = target.double().requires_grad_() if target.is_floating_point() else target
                    truth = run(z.double(), t64, name, params, "torch", reduction, upstream, **dict(options))
                    if mode == "probabilities":  # test_target_grad's rule
                        full_grad_t = torch.cat([g[:, :k] for g, k in zip(grads_t, sizes)], 1)
                        magnitude = target_magnitudes(z, name, params, options.get("weight"),
                                                      options["label_smoothing"], reduction, upstream)
                        assert_parity(full_grad_t, t64.grad, magnitude, dtype, 1, where + " targets' gradient")
                    value_terms, grad_terms = term_magnitudes(z, target, name, params, reduction, upstream,
                                                              **options)
                    assert_parity(values[0], truth[0], torch.maximum(value_terms, truth[0].abs().reshape(
                        value_terms.shape)), dtype, 1, where + " value")
                    assert_parity(full_grad, truth[1], grad_terms, dtype, 1, where + " gradient")
                except Exception as err:  # noqa: BLE001
                    failures.append(f"{where}: {type(err).__name__}: {err}")
    return {"failures": failures[:20], "failed": len(failures), "counts": {str(k): v for k, v in counts.items()}}


def linear_job(rank: int, world: int, seed: int) -> dict:
    """The class-parallel linear + loss's three gradients against the single-device linear + loss."""
    K, sizes = splits(world, seed)
    offset, kr = sum(sizes[:rank]), sizes[rank]
    failures, counts = [], Counter()
    cases = [("nce+rce", {}, "index", "mean"), ("nfl+nnfl", {"official_grad": True}, "smoothed", "sum"),
             ("ngce+mae", {"q": 0.1}, "weighted", "none"), ("sce", {}, "probabilities", "mean"),
             ("ce", {}, "index", "sum")]
    for j, (name, params, mode, reduction) in enumerate(cases):
        for dtype, backend in [(d, b) for d in (torch.float64, torch.float32) for b in ("auto", "torch")]:
            s = seed + 100 * j
            g = torch.Generator().manual_seed(s)
            hidden = torch.randn(9, 5, generator=g, dtype=torch.float64).to(dtype)
            weight = torch.randn(K, 5, generator=g, dtype=torch.float64).mul(2).to(dtype)
            bias = torch.randn(K, generator=g, dtype=torch.float64).to(dtype)
            target, options = make_target(mode, 9, K, s)
            upstream = torch.rand(9 if reduction == "none" else (), generator=g, dtype=torch.float64).to(dtype) + 0.5
            class_weight = options.get("weight")
            smoothing = options.get("label_smoothing", 0.0)
            where = f"rank {rank} linear {name} {mode} {dtype} {reduction} {backend} split {sizes}"
            try:
                x = hidden.clone().requires_grad_()
                w = weight[offset:offset + kr].clone().requires_grad_()
                b = bias[offset:offset + kr].clone().requires_grad_()
                local_target = target[:, offset:offset + kr].to(dtype) if mode == "probabilities" else target
                local_target.requires_grad_(mode == "probabilities")

                def call():
                    loss = class_parallel_linear_loss(
                        x, w, local_target, name, class_offset=offset, num_classes=K, bias_shard=b,
                        class_weight=None if class_weight is None else class_weight[offset:offset + kr].to(dtype),
                        reduction=reduction, label_smoothing=smoothing, chunk_size=4, backend=backend, **params)
                    return loss, lambda: loss.backward(upstream)

                got, forward, backward = counted_call(call)
                counts[(forward, backward)] += 1
                # The truth: the single-device linear + loss in float64 on the same (rounded) inputs. Each
                # gradient is a matmul of the logits' gradient G: its rounding is relative to the terms
                # |G| |W| (|G|^T |hidden|, Σ|G|), with |G| the largest term of G's row (testing.cases).
                x1, w1, b1 = (t.double().requires_grad_() for t in (hidden, weight, bias))
                t64 = target.double().requires_grad_() if mode == "probabilities" else target
                want = ak.linear_loss(x1, w1, t64, name, bias=b1, class_weight=class_weight, reduction=reduction,
                                      label_smoothing=smoothing, **params)
                want.backward(upstream.double())
                logits = x1.detach() @ w1.detach().t() + b1.detach()
                g = term_magnitudes(logits, target, name, params, reduction, upstream, weight=class_weight,
                                    label_smoothing=smoothing)[1]
                g = g.amax(1, keepdim=True).expand_as(g)
                magnitudes = {"hidden": g @ w1.detach().abs(), "weight": (g.t() @ x1.detach().abs())[offset:offset + kr],
                              "bias": g.sum(0)[offset:offset + kr]}
                checks = [("value", got.detach(), want.detach()), ("hidden", x.grad, x1.grad),
                          ("weight", w.grad, w1.grad[offset:offset + kr]),
                          ("bias", b.grad, b1.grad[offset:offset + kr])]
                if mode == "probabilities":  # (test_target_grad's rule)
                    magnitudes["target"] = target_magnitudes(logits, name, params, class_weight, smoothing, reduction,
                                                             upstream)[:, offset:offset + kr]
                    checks.append(("target", local_target.grad, t64.grad[:, offset:offset + kr]))
                for label, a, e in checks:
                    e = e.reshape(1, -1) if e.dim() < 2 else e
                    m = magnitudes.get(label, e.abs()).reshape(e.shape)
                    assert_parity(a.reshape(e.shape), e, torch.maximum(m, e.abs()), dtype, 1, f"{where} {label}")
            except Exception as err:  # noqa: BLE001
                failures.append(f"{where}: {type(err).__name__}: {err}")
    return {"failures": failures, "failed": len(failures), "counts": {str(k): v for k, v in counts.items()}}


def dtensor_job(rank: int, world: int, seed: int) -> dict:
    """DTensor logits (Shard(1)) through the ordinary function and module = the explicit form."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    failures = []
    K = 2 * world + 3  # torch.chunk's split: uneven
    z = random_logits(6, K, seed)
    target = torch.randint(0, K, (6,), generator=torch.Generator().manual_seed(seed))
    probabilities = torch.softmax(random_logits(6, K, seed + 1), 1)
    weight = torch.rand(K, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64) + 0.5
    for label, fn in (
        ("apl_loss nce+rce", lambda x, t: ak.functional.apl_loss(x, t, "nce+rce", label_smoothing=0.1)),
        ("module NNFL weighted", lambda x, t: ak.NNFL(weight=weight, reduction="sum")(x, t)),
        ("nfl_mae probabilities", lambda x, t: ak.functional.nfl_mae(x, probabilities, reduction="none").sum()),
    ):
        try:
            dz = distribute_tensor(z, mesh, [Shard(1)]).requires_grad_()
            dz.retain_grad()
            got = fn(dz, target)
            got.backward()
            local = dz.to_local()
            offset = sum(s for s in [(K + world - 1) // world] * rank)
            full = z.clone().requires_grad_()
            want = fn(full, target)
            want.backward()
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
            grad = dz.grad.to_local()
            torch.testing.assert_close(grad, full.grad[:, offset:offset + local.shape[1]], rtol=1e-12, atol=1e-14)
        except Exception as err:  # noqa: BLE001
            failures.append(f"rank {rank} dtensor {label}: {type(err).__name__}: {err}\n{traceback.format_exc()}")
    # Not sharded on the class dimension: a clear error naming the explicit form.
    try:
        ak.functional.nce(distribute_tensor(z, mesh, [Replicate()]), target)
        failures.append("replicated DTensor logits were accepted")
    except ValueError as err:
        if "class_parallel_loss" not in str(err):
            failures.append(f"replicated DTensor: unclear error {err}")
    return {"failures": failures, "failed": len(failures)}


def extras_job(rank: int, world: int, seed: int) -> dict:
    """(N, K, d) logits with (N, d) targets, a non-contiguous shard, bfloat16, the module form, no
    gradient needed, a shard whose rows are all masked: the same as the single-process loss on the
    whole logits; the call's state released by the last backward; and a double backward refused."""
    K, sizes = splits(world, seed)
    offset, kr = sum(sizes[:rank]), sizes[rank]
    failures = []
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(4, K, 3, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, K, (4, 3), generator=g)
    target[1, 2] = -100
    checks = [
        ("spatial none", lambda x, t, **kw: class_parallel_loss(x, t, "ngce+rce", reduction="none", **kw),
         lambda x, t: ak.functional.ngce_rce(x, t, reduction="none", backend="torch"), z, target),
        ("non-contiguous", lambda x, t, **kw: class_parallel_loss(x, t, "nfl", label_smoothing=0.2, **kw),
         lambda x, t: ak.functional.nfl(x, t, label_smoothing=0.2, backend="torch"),
         z[:, :, 0].t().contiguous().t(), target[:, 0]),
        ("module", lambda x, t, **kw: ClassParallelLoss("nce+nnce", reduction="sum", alpha=2.0, **kw)(x, t),
         lambda x, t: ak.ANLCE(2.0, reduction="sum", backend="torch")(x, t), z[:, :, 1], target[:, 1]),
    ]
    for label, parallel, single, full, t in checks:
        try:
            shard = full[:, offset:offset + kr].detach().requires_grad_()
            got = parallel(shard, t, class_offset=offset, num_classes=K)
            got.sum().backward()
            whole = full.detach().clone().requires_grad_()
            want = single(whole, t)
            want.sum().backward()
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(shard.grad, whole.grad[:, offset:offset + kr], rtol=1e-10, atol=1e-12)
        except Exception as err:  # noqa: BLE001
            failures.append(f"rank {rank} {label}: {type(err).__name__}: {err}")
    try:  # bfloat16: accumulated in float32, returned in bfloat16, within bfloat16's rounding
        x = z[:, :, 2].to(torch.bfloat16)
        shard = x[:, offset:offset + kr].clone().requires_grad_()
        got = class_parallel_loss(shard, target[:, 2], "nce+mae", class_offset=offset, num_classes=K)
        got.backward()
        whole = x.clone().requires_grad_()
        want = ak.functional.nce_mae(whole, target[:, 2], backend="torch")
        want.backward()
        assert got.dtype == torch.bfloat16 and shard.grad.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(shard.grad, whole.grad[:, offset:offset + kr], rtol=1e-2, atol=1e-3)
        with torch.no_grad():
            plain = class_parallel_loss(z[:, offset:offset + kr, 0], target[:, 0], "ce", class_offset=offset,
                                        num_classes=K)
        torch.testing.assert_close(plain, torch.nn.functional.cross_entropy(z[:, :, 0], target[:, 0]))
    except Exception as err:  # noqa: BLE001
        failures.append(f"rank {rank} bfloat16 / no_grad: {type(err).__name__}: {err}")
    # Rows whose part on rank 0 is all -inf (masked classes) and whose other logits are all negative
    # (the global max is then below 0, and in float32 below the exponential's range): the global
    # max is another rank's, never rank 0's missing one.
    for dtype, low in ((torch.float64, 2.0), (torch.float32, 95.0)):
        zm = -(torch.rand(4, K, generator=g, dtype=torch.float64) * 10 + low)
        zm[[0, 2], :sizes[0]] = -math.inf
        ym = torch.randint(sizes[0], K, (4,), generator=g)
        zm = zm.to(dtype)
        for backend in ("auto", "torch"):
            for name in ("mae", "fl", "nfl+rce", "ce"):
                try:
                    shard = zm[:, offset:offset + kr].clone().requires_grad_()
                    got = class_parallel_loss(shard, ym, name, class_offset=offset, num_classes=K, backend=backend)
                    got.backward()
                    whole = zm.detach().double().clone().requires_grad_()
                    want = ak.functional.apl_loss(whole, ym, name, backend="torch")
                    want.backward()
                    # (float32: |z| ~ 100 puts z - lse's rounding near 1e-5)
                    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
                    torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance)
                    torch.testing.assert_close(shard.grad.double(), whole.grad[:, offset:offset + kr], rtol=tolerance,
                                               atol=tolerance)
                except Exception as err:  # noqa: BLE001
                    failures.append(f"rank {rank} masked shard {name} {dtype} {backend}: {type(err).__name__}: {err}")
    try:  # the call's inputs and sums are released by backward, kept with retain_graph=True
        shard = z[:, offset:offset + kr, 0].clone().requires_grad_()
        loss = class_parallel_loss(shard, target[:, 0], "nfl+rce", class_offset=offset, num_classes=K)
        (first,) = torch.autograd.grad(loss, shard, retain_graph=True)
        assert loss.grad_fn.problem is not None, "released by a backward with retain_graph=True"
        (second,) = torch.autograd.grad(loss, shard)
        assert torch.equal(first, second) and loss.grad_fn.problem is None, "kept after the last backward"
    except Exception as err:  # noqa: BLE001
        failures.append(f"rank {rank} release after backward: {type(err).__name__}: {err}")
    try:  # first derivatives only: a gradient to be differentiated is refused, not given as a constant
        shard = z[:, offset:offset + kr, 0].clone().requires_grad_()
        loss = class_parallel_loss(shard, target[:, 0], "nce+rce", class_offset=offset, num_classes=K)
        try:
            torch.autograd.grad(loss, shard, create_graph=True)
            failures.append(f"rank {rank}: backward(create_graph=True) through the class-parallel loss did not raise")
        except RuntimeError as err:
            if "first derivatives only" not in str(err):
                raise
    except Exception as err:  # noqa: BLE001
        failures.append(f"rank {rank} double backward: {type(err).__name__}: {err}")
    return {"failures": failures, "failed": len(failures)}


def errors_job(rank: int, world: int, seed: int) -> dict:
    """Bad input: every rank raises a clear error (none hangs), and the group stays usable."""
    K, sizes = splits(world, seed)
    offset, kr = sum(sizes[:rank]), sizes[rank]
    z = random_logits(5, K, seed)
    target = torch.randint(0, K, (5,), generator=torch.Generator().manual_seed(seed))
    raised = {}
    bad_target = target.clone()
    if rank == world - 1:
        bad_target[2] = K  # one rank's target is outside [0, K)
    cases = {
        "overlap": dict(class_offset=0 if rank == 1 else offset),
        "gap": dict(num_classes=K + 1),  # every rank agrees, but no rank holds class K
        "num_classes": dict(num_classes=K + (rank == 0)),
        "target": dict(target=bad_target),
        "params": dict(gamma=0.5 + 0.1 * rank),
        "official_grad": dict(official_grad=rank == 0),
        "reduction": dict(reduction="sum" if rank == 0 else "mean"),
        "weight_size": dict(weight=torch.ones(kr + (rank == 0), dtype=torch.float64)),
        "weight_dtype": dict(weight=torch.ones(kr, dtype=torch.int64 if rank == 0 else torch.float64)),
        "weight_grad": dict(weight=torch.ones(kr, dtype=torch.float64).requires_grad_(rank == 0)),
        # probability targets whose gradient one rank alone asks for (the second all-reduce's width differs)
        "target_grad": dict(target=torch.full((5, kr), 1 / K, dtype=torch.float64).requires_grad_(rank == 0)),
    }
    for label, change in cases.items():
        args = {"class_offset": offset, "num_classes": K, "target": target, **change}
        t = args.pop("target")
        try:
            class_parallel_loss(z[:, offset:offset + kr], t, "nfl+rce", **args)
            raised[label] = None
        except (ValueError, RuntimeError) as err:
            raised[label] = str(err)
    # One rank's own inputs wrong where only that rank can see it: (N, K_r, d) logits with a target
    # of the wrong spatial shape, and a classifier shard's bias of the wrong size.
    spatial = z[:, offset:offset + kr, None].expand(5, kr, 2)
    rank_cases = {
        "spatial_target": lambda: class_parallel_loss(spatial, target[:, None].expand(5, 3 if rank == 0 else 2),
                                                      "nce+rce", class_offset=offset, num_classes=K),
        "bias": lambda: class_parallel_linear_loss(torch.ones(5, 4, dtype=torch.float64),
                                                   torch.ones(kr, 4, dtype=torch.float64), target, "ce",
                                                   class_offset=offset, num_classes=K,
                                                   bias_shard=torch.zeros(kr + (rank == 0), dtype=torch.float64)),
    }
    for label, call in rank_cases.items():
        try:
            call()
            raised[label] = None
        except (ValueError, RuntimeError) as err:
            raised[label] = str(err)
    # After every refusal the ranks are still in step: a good call works.
    module = ClassParallelLoss("nce+mae", class_offset=offset, num_classes=K)
    value = float(module(z[:, offset:offset + kr], target))
    want = float(ak.functional.nce_mae(z, target, backend="torch"))
    return {"raised": raised, "after": [value, want], "failures": [], "failed": 0}


JOBS = {"parity": parity_job, "linear": linear_job, "dtensor": dtensor_job, "extras": extras_job,
        "errors": errors_job}


def main() -> int:
    jobs, rank, world, out = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[5])
    seeds = [int(s) for s in sys.argv[4].split(",")]
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=180))
    count_collectives()
    # Chunks and slices of a few rows, so that the tests' 5 to 9 rows go in several of each (the
    # defaults, sized for large K, would give one).
    class_parallel.CHUNK_ELEMENTS, class_parallel.SLICE_ELEMENTS = 24, 8
    reports = {}
    for job in jobs:
        reports[job] = []
        for seed in seeds:
            try:
                reports[job].append(JOBS[job](rank, world, seed))
            except Exception:  # noqa: BLE001
                reports[job].append({"failures": [traceback.format_exc()], "failed": 1})
    (out / f"rank{rank}.json").write_text(json.dumps(reports))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
