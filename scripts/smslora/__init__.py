"""smslora: LoRA fine-tuning of a small language model into an SMS spam classifier, on MLX.

The numbered scripts in scripts/ are thin command lines over these modules; docs/design.md maps
them. Importing the package imports nothing heavy: mlx is loaded by the modules that use it, after
a script's entry point has set up the fast BLAS (fastblas.ensure).
"""
