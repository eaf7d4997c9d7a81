"""One run of the reproduction through the Python API: NCE+RCE on scikit-learn's digits with 40 %
symmetric label noise, a few epochs on CPU (seconds). The whole grid is
``python -m apl_kernels.reproduce --preset quick``."""

import torch

from apl_kernels.reproduce import datasets, settings, train


def main() -> None:
    torch.set_num_threads(1)  # the small digits network runs best on one thread (see the quick preset)
    digits = datasets.load("digits", device="cpu")  # bundled with scikit-learn: no download
    loss = "nce+rce"
    config = train.RunConfig(
        dataset="digits", loss=loss, noise="sym", rate=0.4, seed=1, epochs=5,
        loss_params=settings.loss_params(loss, "sym", digits.num_classes),  # the paper's: alpha = beta = 1
    )
    # backend="torch": the PyTorch reference loss, so this example never waits for the C++ backend to
    # compile; backend="auto" (the default) picks the fastest one available.
    record = train.train_run(config, digits, train.Options(device="cpu", backend="torch", progress=False))
    history = record["history"]
    print(f"{config.run_id}: realized noise {record['noise']['realized_rate']:.3f}")
    print("epoch  train loss  train acc (noisy labels)  train acc (true labels)  test acc")
    for epoch in range(record["epochs_done"]):
        print(f"{epoch + 1:5d}  {history['train_loss'][epoch]:10.4f}  {history['train_acc_noisy'][epoch]:24.2f}"
              f"  {history['train_acc_clean'][epoch]:23.2f}  {history['test_acc'][epoch]:8.2f}")
    print(f"final clean test accuracy {record['final_test_acc']:.2f} % after {record['wall_time_s']:.1f} s")


if __name__ == "__main__":
    main()
