"""`python -m groundcam` (and `accelerate launch -m groundcam eval ...`) runs the CLI."""

from groundcam.cli import main

main(prog_name="groundcam")
