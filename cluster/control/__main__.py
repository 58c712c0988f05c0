"""``python -m tuneloop.control …``: the `tuneloop` command without its script, for a Ray
Job's entrypoint (``python -m tuneloop.control train <model> --config …``)."""

from tuneloop.control.cli import main

main()
