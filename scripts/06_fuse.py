#!/usr/bin/env python
"""Step 6: fuse the LoRA adapters into the base -> models/retrained/fused/.

The result is a self-contained folder that `mlx_lm.load` reads with no adapter. It checks itself
before it is put in place: the logits of the fused model must match base + adapter on the test
messages, and every verdict on the test split must be the same; otherwise nothing is written.

By default the fused weights are de-quantized to float32 (540 MB): re-quantizing W + BA to 4 bits
rounds most of the small LoRA update away, and float16 rounding alone moves logits by ~0.03.
`--keep-quantized` gives mlx-lm's default 4-bit fuse anyway.
"""

from smslora import cli
from smslora.commands.fuse import main

if __name__ == "__main__":
    cli.run(main)
