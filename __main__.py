"""``python -m comfyui_quantizer`` runs the command-line tool."""

from .cli import main

raise SystemExit(main())
