"""`python -m sllm` runs the CLI."""

from sllm.cli import main

main()
