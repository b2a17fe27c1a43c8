"""The command lines of the numbered scripts: each module's build_parser() and main(argv).

They import nothing heavy at module level (so --help is instant and the script's entry point can
set up the fast BLAS before mlx loads); main() imports the stage it runs."""
