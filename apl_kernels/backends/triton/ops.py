"""The Triton ops: the launch table, the kernels' arguments, the launches and the two ops
``apl::triton_loss`` and ``apl::triton_loss_backward`` with the contract of ``contract.py``."""

import contextlib
import math
import struct
import threading
from typing import NamedTuple, Optional

import torch
import triton
from torch import Tensor

from ...catalogue import BASE_INDEX, FOCAL
from ...options import FLOAT_DTYPES, accumulation_dtype
from .. import BackendUnavailable, contract, fused
from ..contract import Call
from .backward import backward_kernel
from .forward import forward_kernel
from .rowmath import NO_TERM

INTERPRETED = bool(triton.knobs.runtime.interpret)  # what @triton.jit saw

# ---------------------------------------------------------------- the launch table

WARP = 32
MAX_WARPS = 32
# Per accumulation dtype (float32, float64): elements of the logits a thread holds (registers: a
# float64 takes two), rows of at most ON_CHIP classes (ON_CHIP_DENSE with coefficients held beside
# them) kept in registers from their one read to their last use. docs/kernels.md ("Triton",
# "Launch table") gives the reasoning and the sm_80/sm_90 register counts they were chosen by.
PER_THREAD = {False: 16, True: 8}
# Dense float64 rows hold each element's coefficient beside it: at eight elements a thread,
# nce+agce's smoothed float64 forward (AGCE's expm1/log1p form) kept 8 bytes of stack on sm_90.
PER_THREAD_DENSE = {False: 16, True: 4}
ON_CHIP = {False: 8192, True: 2048}
ON_CHIP_DENSE = {False: 4096, True: 1024}
# Longer rows stream through chunks, one 8-warp program a row (2048 classes, 8 elements a thread;
# dense rows 1024, 4 a thread) under a register budget (.maxnreg). Left to itself, ptxas trades registers for
# occupancy in the chunk loop: it kept 48, 64, 80 or 128 registers and spilled 8 to 24 bytes in 23
# of the 108 kinds of launch compiled at K = 128,000 (every dense and float64 one of the heaviest
# losses), whatever the tile; a budget ends the trade, and 128 (two programs an SM) holds these
# chunks without a spill, where 16 elements a thread spilled up to 152 bytes within it and dense
# 2048-class chunks 8 bytes (nfl+nnfl, bfloat16, sm_90). Float64 chunks need more than 128: their
# budget is the cap.
CHUNK = {False: 2048, True: 2048}
CHUNK_DENSE = {False: 1024, True: 1024}
CHUNK_WARPS = 8
CHUNK_REGISTERS = {False: 128, True: 255}
# Float64 programs of rows kept on chip get the cap as their budget too: nce+anorm's dense forward
# at 1024 classes (8 warps) kept 128 registers and 16 bytes of stack on sm_80 without one.
ON_CHIP_REGISTERS = {False: None, True: 255}
# Rows shorter than a tile, several a program: each thread holds every per-row value (label, record,
# coefficients, sums: about 30) of each row it has an element of. A row takes a warp, its lanes
# holding BLOCK_K / 32 elements each, down to SMALL_ROW_PER_THREAD; shorter rows share a warp, a row
# of up to 32 classes over as many lanes, so that a thread holds as many rows as elements: four. At
# sixteen, K <= 100 compiled to 255 registers with spills, and K = 200 (two rows a thread) to 255
# (docs/kernels.md, "Registers and spills").
SMALL_ROW_PER_THREAD = 4


class Launch(NamedTuple):
    rows: int  # rows per program
    block: int  # classes per tile: the whole row, or a chunk (a power of two)
    warps: int
    chunked: bool  # the row streams through chunks of `block` classes
    registers: Optional[int] = None  # the register budget (.maxnreg), if any


def launch_config(num_classes: int, dtype: torch.dtype, dense: bool = False, backward: bool = False) -> Launch:
    """Rows per program, tile, warps and path for rows of ``num_classes`` classes of ``dtype``.
    The backward reads each element once whatever the tile, so it streams every row longer than a
    chunk: holding a load's and a store's 64-bit address for each of 16 elements, a 32-warp
    program (64 registers a thread) would spill."""
    wide = dtype == torch.float64
    block = triton.next_power_of_2(num_classes)
    limit = (ON_CHIP_DENSE if dense else ON_CHIP)[wide]
    chunk = (CHUNK_DENSE if dense else CHUNK)[wide]
    if block > (chunk if backward else limit):
        return Launch(1, chunk, CHUNK_WARPS, True, CHUNK_REGISTERS[wide])
    per_thread = min((PER_THREAD_DENSE if dense else PER_THREAD)[wide], max(SMALL_ROW_PER_THREAD, block // WARP))
    rows = max(1, WARP * 4 * per_thread // block)  # small rows: four warps of them per program
    warps = min(MAX_WARPS, max(1, rows * block // (WARP * per_thread)))
    return Launch(rows, block, warps, False, ON_CHIP_REGISTERS[wide])


# ---------------------------------------------------------------- the ops' arguments

NONE, MEAN, SUM = (contract.REDUCTION_CODES[r] for r in ("none", "mean", "sum"))
_FOCAL_INDICES = frozenset(BASE_INDEX[name] for name in FOCAL)


def decode_call(logits: Tensor, target: Tensor, weight: Optional[Tensor], bases, coefficients, options) -> Call:
    """The op's arguments decoded and checked (contract.decode), on a device Triton runs on here."""
    call = contract.decode(logits, target, weight, bases, coefficients, options)
    if logits.device.type != "cuda" and not (INTERPRETED and logits.device.type == "cpu"):
        raise ValueError(f"apl::triton_loss runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1 set "
                         f"before apl_kernels is imported); got a {logits.device.type} tensor")
    return call


# Floating arguments travel as the int64 bits of a float64: Triton would pass a Python float as
# float32 (rounding a float64 loss's parameters), and typing them int64 by annotation, never
# specialized, keeps one compiled kernel whatever their values (0.0's bits would otherwise be an i32).
def float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _power_or_inf(x: float, y: float) -> float:
    try:
        return x**y
    except OverflowError:  # as std::pow: (a + 1)^q of a parameter no loss of this call uses
        return math.inf


def kernel_arguments(call: Call, num_classes: int) -> tuple[tuple, dict]:
    """The kernels' float arguments (FLOAT_ARGS, as bits: LossParams with what derive() computes)
    and the constexprs that choose their specialization."""
    log_min_prob = math.log(call.min_prob)
    values = (call.weights[0], call.weights[-1], call.gamma, call.q, call.a, log_min_prob, call.a - 1,
              -((1 - call.min_prob) ** call.gamma) * log_min_prob, _power_or_inf(call.a + 1, call.q),
              _power_or_inf(call.a - 1, call.q) if call.a > 1 else 0.0, 1 - call.label_smoothing,
              call.label_smoothing / num_classes)
    meta = dict(BASE0=call.bases[0], BASE1=call.bases[1] if len(call.bases) == 2 else NO_TERM.value,
                OFFICIAL=call.official_grad and any(b in _FOCAL_INDICES for b in call.bases),
                PROBS=call.probabilities, DENSE=call.dense, TARGET_GRAD=call.target_grad)
    return tuple(float_bits(v) for v in values), meta


def launch_meta(launch: Launch) -> dict:
    meta = dict(ROWS=launch.rows, BLOCK_K=launch.block, CHUNKED=launch.chunked, num_warps=launch.warps)
    if launch.registers and not triton.knobs.runtime.interpret:  # the interpreter has no registers
        meta["maxnreg"] = launch.registers
    return meta


# ---------------------------------------------------------------- launching


# Triton's interpreter is not thread-safe: for the time of a launch it patches triton.language's
# functions and keeps the program ids in module state, so two threads' launches at once raise
# InterpreterError or mix each other's values. Interpreted launches run one at a time (on a GPU the
# launches are asynchronous and need no lock).
_INTERPRETER_LOCK = threading.Lock()


def launch(kernel, grid: tuple, *args, **meta) -> None:
    """Every kernel launch of the ops (the tests count them here)."""
    with _INTERPRETER_LOCK if INTERPRETED else contextlib.nullcontext():
        torch.library.wrap_triton(kernel)[grid](*args, **meta)


def on_device(tensor: Tensor):
    """Triton launches on the current device: make it the logits' (logits on cuda:1 while cuda:0
    is current). Traced calls launch nothing (a compiled graph guards its own devices)."""
    if tensor.device.type != "cuda" or fused.traced(tensor):
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)


COUNTERS: dict = {}


def counter_of(logits: Tensor) -> Tensor:
    """The int32 ticket counter of the in-kernel reduction, 0 between launches: the last program of
    each launch sets it back. One per (device, stream), since kernels on two streams may run at
    once; created (zeroed) once. A traced call (torch.compile, fake tensors) or a CUDA graph's
    capture gets its own, zeroed in the graph, which must not capture a tensor of the eager world."""
    device = logits.device
    if fused.traced(logits) or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return torch.zeros(1, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    counter = COUNTERS.get((device, stream))
    if counter is None:
        counter = COUNTERS[(device, stream)] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


def strides_of(logits: Tensor, target: Tensor, call: Call) -> tuple:
    return (logits.stride(0), logits.stride(1), target.stride(0), target.stride(1) if call.probabilities else 0)


# On GPUs the ops are triton_ops: torch.compile traces their bodies and sees the kernels. Under the
# interpreter a kernel cannot be traced (wrap_triton hands back the interpreted function, which would
# run on fake tensors): there they are opaque custom ops with contract.py's fakes, so that opcheck and
# aot_autograd still run them.
_define_op = torch.library.custom_op if INTERPRETED else torch.library.triton_op


@_define_op("apl::triton_loss", mutates_args=())
def triton_loss(logits: Tensor, target: Tensor, weight: Optional[Tensor], bases: list[int], coefficients: list[float],
                options: list[int]) -> tuple[Tensor, Tensor]:
    """The fused op of ``contract.py`` computed by one launch of the Triton forward kernel.

    Strided logits and targets are read in place (their strides go to the kernel); the loss is
    float32 (float64 for float64 logits)."""
    call = decode_call(logits, target, weight, bases, coefficients, options)
    rows, num_classes = logits.shape[0], int(logits.shape[1])  # the kernels specialize on K (a guard when traced)
    acc = accumulation_dtype(logits.dtype)
    loss = logits.new_empty((rows,) if call.reduction == NONE else (), dtype=acc)
    saved = contract.saved_output(logits, call.grad_mode, target if call.target_grad else None)
    if rows == 0:  # nothing to launch: a reduced loss is 0, the divisor 1
        loss.zero_()
        if call.grad_mode == contract.GRAD_IN_BACKWARD:
            saved.copy_(torch.eye(1, contract.STATS, dtype=acc, device=logits.device))
        return loss, saved
    plan = launch_config(num_classes, logits.dtype, call.dense)
    programs = triton.cdiv(rows, plan.rows)
    floats, meta = kernel_arguments(call, num_classes)
    with on_device(logits):
        partials = counter = divisor = None
        if call.reduction != NONE:
            partials = logits.new_empty((2 * programs,), dtype=torch.float64)
            counter = counter_of(logits)
        if call.grad_mode == contract.GRAD_IN_FORWARD and call.reduction == MEAN:
            divisor = contract.mean_divisor(target, weight, call.ignore_index, torch.float64)
        launch(forward_kernel, (programs,), logits, target, weight, loss,
               saved if call.grad_mode != contract.NO_GRAD else None, partials, counter, divisor,
               rows, num_classes, *strides_of(logits, target, call), call.ignore_index, *floats,
               **meta, WEIGHTED=weight is not None, REDUCTION=call.reduction, GRAD_MODE=call.grad_mode,
               **launch_meta(plan))
    return loss, saved


@_define_op("apl::triton_loss_backward", mutates_args=())
def triton_loss_backward(logits: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor, grad_loss: Tensor,
                         bases: list[int], coefficients: list[float], options: list[int]) -> Tensor:
    """``contract.py``'s backward op: the gradient from the forward's Records (``stats``) times
    ``grad_loss`` (a scalar, or one value per row with any stride), in one launch."""
    call = decode_call(logits, target, weight, bases, coefficients, options)
    rows, num_classes = logits.shape[0], int(logits.shape[1])
    acc = accumulation_dtype(logits.dtype)
    if stats.shape != (rows + 1, contract.STATS) or stats.dtype != acc or not stats.is_contiguous():
        raise ValueError(f"apl: stats must be the forward's contiguous ({rows + 1}, {contract.STATS}) {acc} records; "
                         f"got {stats.dtype} of shape {list(stats.shape)}")
    if grad_loss.shape != ((rows,) if call.reduction == NONE else ()) or grad_loss.dtype not in FLOAT_DTYPES:
        raise ValueError(f"apl: grad_loss must be floating with the loss's shape; got {grad_loss.dtype} of shape "
                         f"{list(grad_loss.shape)}")
    grad = contract.gradient_output(logits, target if call.target_grad else None)
    if rows == 0:
        return grad
    plan = launch_config(num_classes, logits.dtype, call.dense, backward=True)
    floats, meta = kernel_arguments(call, num_classes)
    with on_device(logits):
        launch(backward_kernel, (triton.cdiv(rows, plan.rows),), logits, target, weight, stats, grad_loss, grad,
               rows, num_classes, *strides_of(logits, target, call), grad_loss.stride(0) if grad_loss.dim() else 0,
               call.ignore_index, *floats, **meta, WEIGHTED=weight is not None, **launch_meta(plan))
    return grad


fused.register("apl::triton_loss", "apl::triton_loss_backward", fake=INTERPRETED)


def load():
    """The backend function of ``backend="triton"``, or BackendUnavailable saying why not."""
    if not INTERPRETED and not torch.cuda.is_available():
        raise BackendUnavailable(
            "no CUDA device (set TRITON_INTERPRET=1 before importing apl_kernels to run the "
            "Triton kernels on CPU tensors, slowly, as the tests do)"
        )
    return fused.backend_function(torch.ops.apl.triton_loss.default, contract.GRAD_IN_BACKWARD)
