#!/usr/bin/env python
"""Step 3: LoRA fine-tuning -> models/retrained/adapters/.

Settings come from configs/NAME.yaml (default: configs/default.yaml), then from the flags below;
the run folder keeps them in adapter_config.json. Ctrl-C or SIGTERM saves a checkpoint that
--resume continues.
"""

from smslora import cli
from smslora.commands.train import main

if __name__ == "__main__":
    cli.run(main)
