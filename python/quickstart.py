"""Replace nn.CrossEntropyLoss with an Active Passive Loss and train a small classifier.

Run: python python/quickstart.py  (CPU, a few seconds)
"""

import torch

import apl_kernels as ak


def main() -> None:
    torch.manual_seed(0)
    # Three Gaussian blobs, 20 % of the training labels flipped at random.
    centers = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    labels = torch.randint(0, 3, (600,))
    points = centers[labels] + 0.6 * torch.randn(600, 2)
    noisy = torch.where(torch.rand(600) < 0.2, torch.randint(0, 3, (600,)), labels)

    model = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    criterion = ak.NCERCE(alpha=1.0, beta=1.0)  # where you wrote nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(50):
        optimizer.zero_grad()
        loss = criterion(model(points), noisy)
        loss.backward()
        optimizer.step()
    accuracy = (model(points).argmax(1) == labels).float().mean().item()
    print(f"{criterion}: final loss {loss.item():.4f}, accuracy on the clean labels {accuracy:.1%}")
    print("available losses:", ", ".join(ak.available_losses()))
    assert accuracy > 0.85, accuracy


if __name__ == "__main__":
    main()
