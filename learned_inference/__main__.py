"""``python -m learned_inference`` runs the command-line interface."""

from learned_inference.cli import main

raise SystemExit(main())
