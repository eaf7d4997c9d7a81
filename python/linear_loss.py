"""Train a wide classification head with a fused linear + Active Passive loss, never forming the logits.

``LinearNCERCE`` computes ``NCERCE(head(hidden), target)`` in chunks of rows: the (N, K) logits and
their gradient never exist at once, which is what matters when K is a vocabulary (32,000 to
128,000 classes). Here K = 1,000 so that it runs in a few seconds on a CPU.

Run: python python/linear_loss.py  (CPU, a few seconds)
"""

import torch

import apl_kernels as ak
import apl_kernels.linear as AL


def main() -> None:
    torch.manual_seed(0)
    n, features, hidden_size, k = 2048, 32, 64, 1000
    # Rows near one of k class centres; 30 % of the training labels replaced by random ones.
    centres = torch.randn(k, features)
    labels = torch.randint(0, k, (n,))
    points = centres[labels] + 0.2 * torch.randn(n, features)
    noisy = torch.where(torch.rand(n) < 0.3, torch.randint(0, k, (n,)), labels)

    body = torch.nn.Sequential(torch.nn.Linear(features, hidden_size), torch.nn.GELU())
    head = torch.nn.Linear(hidden_size, k)
    # NCE+RCE with the paper's CIFAR-100 weights, in chunks of 512 rows: loss(head(hidden), target).
    criterion = AL.LinearNCERCE(alpha=10.0, beta=0.1, chunk_size=512)
    optimizer = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(40):
        optimizer.zero_grad()
        loss = criterion(body(points), head.weight, noisy, head.bias)  # Liger's forward(hidden, weight, target, bias)
        loss.backward()
        optimizer.step()

    with torch.no_grad():
        hidden = body(points)
        fused = criterion(hidden, head.weight, noisy, head.bias)
        materialized = ak.NCERCE(10.0, 0.1)(head(hidden), noisy)  # the same loss on the (n, k) logits
        accuracy = (head(hidden).argmax(1) == labels).float().mean().item()
    print(f"{criterion}: loss {fused.item():.5f} (materialized logits: {materialized.item():.5f}), "
          f"accuracy on the clean labels {accuracy:.1%}")
    torch.testing.assert_close(fused, materialized, rtol=1e-5, atol=1e-6)
    assert accuracy > 0.6, accuracy


if __name__ == "__main__":
    main()
