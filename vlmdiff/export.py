"""Export the weights of a trained VLMDiff run: one safetensors file, no optimiser state.

A Lightning checkpoint of train.py holds the model's weights plus AdamW's two moments of every trainable
weight, the epoch/step counters and the callbacks' state, which only --resume needs. The export keeps
the weights (as the model names them, i.e. upstream's names) and stores the resolved model config and the
run's provenance as safetensors metadata (JSON strings), so test.py builds the model from it alone:

  python -m vlmdiff.export ckpt_vlmdiff_mvtec/model_epoch=299.ckpt vlmdiff_mvtec.safetensors
  python test.py --data_set mvtec --data_path data/mvtec --resume_path vlmdiff_mvtec.safetensors ...

The output is written to a temporary file beside it and renamed when complete; tensors keep their dtype
(float32 for train.py's runs).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from utils.cli import run_main, setup_logging
from utils.errors import UserError

log = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m vlmdiff.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "checkpoint",
        help="a VLMDiff checkpoint: train.py's model_epoch=NNN.ckpt / last.ckpt, build_model.py's output or upstream's",
    )
    p.add_argument("output", help="the weights-only file to write (.safetensors)")
    p.add_argument("--unsafe_legacy_pickle", action="store_true", help="allow arbitrary pickles (trusted files only)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def export_weights(checkpoint: str | Path, output: str | Path, allow_unsafe_pickle: bool = False) -> Path:
    """Write the model weights of ``checkpoint`` with its resolved config to ``output`` (safetensors).

    The weights are loaded into a VLMDiff model first (strict: every name and shape checked), so a file
    that test.py could not use is refused here rather than exported.
    """
    from ldm.checkpoint import save_checkpoint
    from ldm.config import to_dict
    from vlmdiff.checkpoint import load_vlmdiff

    output = Path(output)
    if output.suffix != ".safetensors":
        raise UserError(f"{output}: the export is a safetensors file; name it *.safetensors")
    if Path(checkpoint).resolve() == output.resolve():
        raise UserError(f"{output} is the checkpoint being exported; choose another output file")
    model, ckpt = load_vlmdiff(checkpoint, allow_unsafe_pickle=allow_unsafe_pickle)
    extra = {"format": "vlmdiff-weights", "source": str(checkpoint)}
    if isinstance(ckpt.get("provenance"), dict):
        extra["provenance"] = ckpt["provenance"]
    save_checkpoint(output, model.state_dict(), config=to_dict(model.cfg), extra=extra)
    log.info("wrote %s (%.1f MiB) from %s", output, output.stat().st_size / 2**20, checkpoint)
    return output


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    setup_logging(args.verbose)
    return export_weights(args.checkpoint, args.output, args.unsafe_legacy_pickle)


if __name__ == "__main__":
    sys.exit(run_main(main))
