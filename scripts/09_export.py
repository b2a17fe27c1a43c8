#!/usr/bin/env python
"""Step 9: the classifier outside MLX (docs/export.md).

--gguf f16|q8_0 writes the fused model as one GGUF file for llama.cpp, with an Ollama Modelfile
beside it; --peft writes the LoRA adapter in Hugging Face PEFT's format. The export folder is
built beside --out and put in place whole; an existing one is replaced only with --force.
"""

from smslora import cli
from smslora.commands.export import main

if __name__ == "__main__":
    cli.run(main)
