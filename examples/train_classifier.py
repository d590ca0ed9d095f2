"""Train the small feature classifiers behind ``qdiff eval``'s Fréchet distance (CPU, a few minutes each).

    python examples/train_classifier.py --dataset mnist   --out qcompile/assets/classifiers/mnist
    python examples/train_classifier.py --dataset cifar10 --out qcompile/assets/classifiers/cifar10

Network: ``qcompile.fdist.FeatureClassifier`` (4 conv layers 32/32/64/64, a 64-d ReLU feature layer,
linear head). MNIST: the shared folder has only the 10,000-image MNIST test set, so a seeded permutation
of it gives 7,000 training images and 3,000 held-out ones (accuracy, FD reference, real-vs-real floor);
random shifts of up to 2 px. CIFAR-10: the 50,000 train images with random flips and 2-px shifts; the
10,000 test images are held out. AdamW, one-cycle learning rate, batch 128, fixed seed, 2 CPU threads:
the same command gives the same weights on the same machine. Writes fp16 ``model.safetensors`` and
``config.json`` (config plus a training record: steps, seconds, held-out accuracy of the fp16 weights).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qcompile.fdist import ClassifierConfig, FeatureClassifier, held_out_split, load_classifier, predict, save_classifier  # noqa: E402

CONFIGS = {
    "mnist": ClassifierConfig("mnist", "mnist", 1, 28, (0.1307,), (0.3081,), train_count=7000, reference_count=2000, floor_count=1000),
    "cifar10": ClassifierConfig(
        "cifar10", "cifar10", 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), reference_count=5000, floor_count=1000
    ),
}


def augment(x: torch.Tensor, flip: bool, shift: int, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to ``shift`` pixels (zero padding for MNIST, reflection for CIFAR) and optional flips."""
    n, _, h, w = x.shape
    if flip:
        mask = torch.rand(n, generator=g) < 0.5
        x = torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (shift,) * 4, mode="reflect" if flip else "constant")
    dy, dx = torch.randint(0, 2 * shift + 1, (2,), generator=g).tolist()  # one shift per batch: cheap and enough
    return padded[:, :, dy : dy + h, dx : dx + w]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(CONFIGS), required=True)
    p.add_argument("--out", required=True, help="output folder (e.g. qcompile/assets/classifiers/mnist)")
    p.add_argument("--epochs", type=float, default=None, help="default: 10 for mnist, 3 for cifar10")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = CONFIGS[args.dataset]
    epochs = args.epochs or {"mnist": 10, "cifar10": 3}[args.dataset]

    held_x, held_y, train_x, train_y = held_out_split(cfg)
    if train_x is None:
        from qcompile.zoo import load_cifar10

        train_x, train_y = load_cifar10("train")
    flip = args.dataset == "cifar10"
    steps = int(epochs * len(train_x) / args.batch)
    print(f"{args.dataset}: {len(train_x)} train, {len(held_x)} held out, {steps} steps of batch {args.batch}", flush=True)

    model = FeatureClassifier(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(args.seed)
    t0, step, order = time.perf_counter(), 0, torch.empty(0, dtype=torch.int64)
    model.train()
    while step < steps:
        if len(order) < args.batch:
            order = torch.randperm(len(train_x), generator=g)
        idx, order = order[: args.batch], order[args.batch :]
        x = augment(train_x[idx], flip, 2, g)
        loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        if step % 200 == 0 or step == steps:
            print(f"step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    train_s = time.perf_counter() - t0

    model.eval()
    out = Path(args.out)
    record = {
        "command": "python examples/train_classifier.py " + " ".join(sys.argv[1:]),
        "steps": steps, "batch": args.batch, "epochs": epochs, "lr": args.lr, "seed": args.seed,
        "train_images": len(train_x), "train_s": round(train_s, 1), "threads": args.threads, "torch": torch.__version__,
    }
    save_classifier(model, out, record)
    shipped = load_classifier(str(out))  # the fp16 weights as shipped
    acc = float((predict(shipped, held_x) == held_y).double().mean())
    record.update({"held_out_images": len(held_x), "held_out_accuracy": round(acc, 4)})
    save_classifier(model, out, record)
    size = (out / "model.safetensors").stat().st_size
    print(f"{args.dataset}: held-out accuracy {acc:.4f} ({len(held_x)} images), {train_s:.0f} s training, {size / 1e3:.0f} kB -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
