"""Step 1's library: a base model into a folder that `mlx_lm.load()` loads.

    step.py       the whole step: pick the source, convert or copy, check it loads, put it in place
    gguf_file.py  reading a GGUF file: metadata, tensor directory, de-quantized tensors
    layouts.py    llama.cpp blocks in MLX's quantized layout, number for number
    archs.py      each architecture's tensor names, conversion details and config.json
    tokenizer.py  the tokenizer, rebuilt from the GGUF's metadata
    to_mlx.py     one GGUF into one model folder

Importing it imports nothing heavy; mlx is loaded by the modules that use it.
"""
