"""One run of the reproduction through the Python API: NCE+RCE on scikit-learn's digits with 40 %
symmetric label noise, a few epochs on CPU (seconds), and the same run with ANL's L1 penalty.
The whole grid is ``python -m apl_kernels.reproduce --preset quick``."""

import dataclasses

import torch

from apl_kernels.reproduce import datasets, grid, train


def main() -> None:
    torch.set_num_threads(1)  # the small digits network runs best on one thread (see the quick preset)
    digits = datasets.load("digits", device="cpu")  # bundled with scikit-learn: no download
    # The run with its published parameters (CIFAR-10's for digits: alpha = beta = 1), 5 epochs.
    config = grid.build_grid("digits", ["nce+rce"], [("sym", 0.4)], seeds=[1], epochs=5)[0]
    # backend="torch": the PyTorch reference loss, so this example never waits for the C++ backend to
    # compile; backend="auto" (the default) picks the fastest one available.
    options = train.Options(device="cpu", backend="torch", progress=False)
    record = train.train_run(config, digits, options)
    history = record["history"]
    print(f"{config.run_id} {config.loss_params}: realized noise {record['noise']['realized_rate']:.3f}")
    print("epoch  train loss  train acc (noisy labels)  train acc (true labels)  test acc")
    for epoch in range(record["epochs_done"]):
        print(f"{epoch + 1:5d}  {history['train_loss'][epoch]:10.4f}  {history['train_acc_noisy'][epoch]:24.2f}"
              f"  {history['train_acc_clean'][epoch]:23.2f}  {history['test_acc'][epoch]:8.2f}")
    print(f"final clean test accuracy {record['final_test_acc']:.2f} % after {record['wall_time_s']:.1f} s")

    # Training settings change through overrides: here the L1 penalty delta * sum|theta| of ANL,
    # with weight decay 0 (part of the run's identity, so it is recorded with the run).
    penalized = dataclasses.replace(config, overrides={"l1": 5e-5, "weight_decay": 0.0})
    result = train.train_run(penalized, digits, options)
    print(f"with {penalized.overrides}: final clean test accuracy {result['final_test_acc']:.2f} %")


if __name__ == "__main__":
    main()
