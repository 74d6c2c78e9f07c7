"""`python -m mezo_vllm` is the `mezo-vllm` command (the benchmark runs it as a child process)."""

from .cli import main

main(prog_name="mezo-vllm")
