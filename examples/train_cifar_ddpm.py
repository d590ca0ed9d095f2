"""Train the bundled default models on CIFAR-10 32x32 (run on the GPU machine).

    python examples/train_cifar_ddpm.py --model unet --minutes 9 --out out/unet --data ../shared/data/cifar10-train-jpeg.npz
    python examples/train_cifar_ddpm.py --model dit  --minutes 9 --out out/dit  --data ...

``unet``: diffusers ``UNet2DModel`` (eps-prediction DDPM, linear betas, 1000 steps) with attention at
16x16 and the usual concat skips. ``dit``: class-conditional diffusers ``DiTTransformer2DModel`` (patch 2,
pixel space) with a 10% null label for classifier-free guidance. Both: AdamW, bf16 autocast, EMA
0.999, random horizontal flips. Resumable: ``--resume DIR`` continues from ``DIR/checkpoint.pt``.
Writes ``save_pretrained`` folders (fp16 EMA weights, config, scheduler), a sample grid and a log.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def load_cifar(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images as uint8 (N, 3, 32, 32) and labels (N,) from the shared JPEG npz."""
    d = np.load(path)
    jpeg, off = d["jpeg"], d["offsets"]
    imgs = np.stack([np.asarray(Image.open(io.BytesIO(jpeg[off[i] : off[i + 1]].tobytes())).convert("RGB")) for i in range(len(off) - 1)])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(d["labels"].astype(np.int64))


def build(kind: str) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel, UNet2DModel

    if kind == "unet":
        return UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(64, 128, 128), layers_per_block=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=32, norm_num_groups=32, dropout=0.1,
        )
    return DiTTransformer2DModel(
        sample_size=32, patch_size=2, in_channels=3, out_channels=3, num_layers=4, num_attention_heads=3,
        attention_head_dim=64, num_embeds_ada_norm=10, norm_type="ada_norm_zero",
    )


def denoise(model: torch.nn.Module, kind: str, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    if kind == "unet":
        return model(x, t, return_dict=False)[0]
    return model(x, timestep=t, class_labels=y, return_dict=False)[0]


@torch.no_grad()
def sample(model, kind, n, device, steps=50, guidance=2.0):
    """DDIM (eta 0) samples in [-1, 1]; the DiT uses classifier-free guidance with labels 0..9."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    sched.set_timesteps(steps)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g).to(device)
    y = (torch.arange(n) % 10).to(device)
    for t in sched.timesteps:
        tt = torch.full((n,), int(t), device=device)
        if kind == "unet":
            eps = denoise(model, kind, x, tt, None)
        else:
            both = denoise(model, kind, torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, 10)]))
            cond, uncond = both.chunk(2)
            eps = uncond + guidance * (cond - uncond)
        x = sched.step(eps, t, x).prev_sample
    return x.clamp(-1, 1)


def save_grid(x: torch.Tensor, path: Path, cols: int = 10) -> None:
    x = ((x.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    n = x.shape[0]
    rows = math.ceil(n / cols)
    grid = torch.full((3, rows * 34, cols * 34), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[:, r * 34 + 1 : r * 34 + 33, c * 34 + 1 : c * 34 + 33] = x[i]
    Image.fromarray(grid.permute(1, 2, 0).numpy()).resize((cols * 34 * 2, rows * 34 * 2), Image.NEAREST).save(path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["unet", "dit"], required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=15.0)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-steps", type=int, default=10**9)
    p.add_argument("--resume")
    args = p.parse_args()

    from diffusers import DDPMScheduler

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    images, labels = load_cifar(args.data)
    print(f"loaded {len(images)} images in {time.time() - t0:.1f} s", flush=True)
    images, labels = images.to(device), labels.to(device)
    model = build(args.model).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    step, trained_s = 0, 0.0
    if args.resume:
        ck = torch.load(Path(args.resume) / "checkpoint.pt", map_location=device, weights_only=True)
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        step, trained_s = ck["step"], ck["trained_s"]
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    acp = sched.alphas_cumprod.to(device)
    params = sum(q.numel() for q in model.parameters())
    print(f"{args.model}: {params / 1e6:.2f} M parameters, device {device}", flush=True)
    losses = []
    start = time.time()
    while time.time() - start < args.minutes * 60 and step < args.max_steps:
        idx = torch.randint(len(images), (args.batch,), device=device)
        x0 = images[idx].float() / 127.5 - 1
        flip = torch.rand(args.batch, device=device) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        y = labels[idx]
        y = torch.where(torch.rand(args.batch, device=device) < 0.1, torch.full_like(y, 10), y)
        t = torch.randint(1000, (args.batch,), device=device)
        noise = torch.randn_like(x0)
        a = acp[t].sqrt()[:, None, None, None]
        s = (1 - acp[t]).sqrt()[:, None, None, None]
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            pred = denoise(model, args.model, a * x0 + s * noise, t, y if args.model == "dit" else None)
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        step += 1
        if step % 50 == 0:
            losses.append(loss.item())
        if step % 1000 == 0:
            print(f"step {step} loss {np.mean(losses[-20:]):.4f} {time.time() - start:.0f} s", flush=True)
    trained_s += time.time() - start
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step, "trained_s": trained_s}, out / "checkpoint.pt")
    final = out / "pretrained"
    ema.to(torch.float16).save_pretrained(final / ("unet" if args.model == "unet" else "transformer"), safe_serialization=True)
    sched.save_pretrained(final / "scheduler")
    ema.float()
    save_grid(sample(ema, args.model, 40, device), out / "samples.png")
    log = {"model": args.model, "params": params, "steps": step, "batch": args.batch, "train_seconds": trained_s,
           "final_loss": float(np.mean(losses[-20:])) if losses else None, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "torch": torch.__version__, "command": "python " + " ".join(__import__("sys").argv)}
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    print(json.dumps(log), flush=True)


if __name__ == "__main__":
    main()
