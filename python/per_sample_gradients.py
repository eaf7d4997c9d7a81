"""Per-sample gradients with torch.func and a robust loss: vmap(grad(...)) over the samples.

Per-sample gradients are what gradient-based sample selection, influence estimates and per-sample
clipping (DP-SGD) need; with apl_kernels they come from one batched call of the fused kernel (the
samples' rows are rows of one call), not one call per sample.

Run: python python/per_sample_gradients.py  (CPU, seconds)
"""

import time

import torch
from torch.func import functional_call, grad, vmap

import apl_kernels as ak


def per_sample_gradients(model, criterion, x, y):
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p, xi, yi):  # one sample: a batch of one row
        return criterion(functional_call(model, p, (xi[None],)), yi[None])

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def main() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    criterion = ak.NCERCE(1.0, 1.0)  # where you wrote nn.CrossEntropyLoss()
    grads = per_sample_gradients(model, criterion, x, y)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]).norm(dim=0)
    print(f"per-sample gradient norms of {len(norms)} samples: min {norms.min():.4f}, max {norms.max():.4f}")

    # The same gradients, one sample at a time, as a check (and to see what vmap saves).
    started = time.perf_counter()
    for i in (0, 17, 255):
        model.zero_grad()
        criterion(model(x[i:i + 1]), y[i:i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-4, atol=1e-6)
    print(f"checked against autograd one sample at a time ({time.perf_counter() - started:.3f} s for 3 samples)")


if __name__ == "__main__":
    main()
