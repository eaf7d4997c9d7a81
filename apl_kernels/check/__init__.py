"""Check this installation: the fused backends of one device against the reference, with torch, and their speed.

``python -m apl_kernels.check [--device cpu|cuda|cuda:N] [--quick] [--out DIR]``:

1. Environment: versions, compilers, CPU vector width, GPU, and which backends run on the device
   (and why the others do not).
2. Parity: every case of the test suite (``apl_kernels.testing.cases.LOSS_CASES``) on every fused
   backend of the device against the reference, held to the suite's tolerance rule.
3. Integration: ``torch.library.opcheck`` of the fused ops, ``torch.compile(fullgraph=True)`` of a
   small model with each fused backend, and on CUDA a CUDA-graph capture and replay.
4. Speed (not with ``--quick``): forward plus backward against the reference, ``torch.compile`` of
   it, ``F.cross_entropy`` and a copy of the same bytes; then CNN8's training throughput.

One module per phase (``environment``, ``parity``, ``integration``, ``speed``, ``report``; ``cli``
runs them). Writes ``apl-check-<device>.md`` into ``--out`` (or to ``--out`` itself, a path ending in ``.md``)
and prints its summary. Exit code 0 when everything ran passes, 1 when something failed, 2 without
the requested device. Every phase is budgeted by time (at most 5 minutes on a GPU); what a budget
cut is reported as not run. Inputs are fresh each
run; ``APL_TEST_SEED=<seed>`` (printed) repeats one.
"""
