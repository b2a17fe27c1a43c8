"""Step 9: the classifier outside MLX. `gguf` writes the fused model as one GGUF file for llama.cpp
(`archs` what each architecture, llama or gemma3, needs; `vocab` and `sentencepiece` its
tokenizer metadata; `ollama` the Modelfile beside it), `peft` the LoRA adapter in
Hugging Face PEFT's format; `step` is the stage. `check` verifies an export with its real
consumers, each in its own virtual environment: llama.cpp through llama-cpp-python
(`consumers/run_llama_cpp.py`), transformers + PEFT on PyTorch (`consumers/run_peft.py`)."""
