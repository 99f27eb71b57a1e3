"""CPU forward time of the UNet with fused SDPA attention vs explicit softmax(QK^T)V.

Default: the SD-1.5-size UNet (860 M parameters, random weights) at batch 1, latent 4x32x32, context
1x77x768, fp32. Both variants share the same weight tensors. Prints a table and writes
bench/results/unet_attention.json.

    python bench/bench_unet_attention.py [--config sd15|mid|tiny] [--batch 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import peak_rss_mb, table, time_call, write_results  # noqa: E402
from ldm.config import LatentDiffusionConfig, load_config  # noqa: E402
from ldm.modules.unet import UNetModel  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="sd15")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    cfg = load_config(args.config, LatentDiffusionConfig, only_own_sections=True)
    side = cfg.image_size // 8
    torch.manual_seed(0)
    sdpa = UNetModel(dataclasses.replace(cfg.unet, attention="sdpa")).eval()
    with torch.device("meta"):
        math = UNetModel(dataclasses.replace(cfg.unet, attention="math")).eval()
    math.load_state_dict(sdpa.state_dict(), assign=True)  # same tensors, no second copy
    n_params = sum(p.numel() for p in sdpa.parameters())
    x = torch.randn(args.batch, cfg.unet.in_channels, side, side)
    t = torch.full((args.batch,), 901, dtype=torch.long)
    ctx = torch.randn(args.batch, 77, cfg.unet.context_dim)

    rows, out = [], {}
    with torch.inference_mode():
        ref = None
        for name, model in (("math (softmax(QK^T)V)", math), ("sdpa", sdpa)):
            times = time_call(lambda: model(x, t, ctx), repeats=args.repeats)  # noqa: B023 (called at once)
            y = model(x, t, ctx)
            ref = y if ref is None else ref
            diff = (y - ref).abs().max().item()
            best = min(times)
            rows.append([name, best, sum(times) / len(times), diff])
            out[name] = {"best_s": best, "times_s": times, "max_abs_diff_vs_math": diff}
    speedup = rows[0][1] / rows[1][1]
    print(
        f"UNet '{args.config}' ({n_params / 1e6:.1f} M params), batch {args.batch}, latent {side}x{side}, "
        f"fp32, {torch.get_num_threads()} threads"
    )
    print(table(["attention", "best s/forward", "mean s/forward", "max |diff| vs math"], rows))
    print(f"sdpa speed-up: {speedup:.2f}x   peak RSS {peak_rss_mb():.0f} MiB")
    path = write_results(
        "unet_attention",
        {
            "config": args.config,
            "batch": args.batch,
            "latent": side,
            "params": n_params,
            "results": out,
            "sdpa_speedup": speedup,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
