"""``python -m streamer``: the same entry point as the ``streamer`` console script."""

from streamer.cli import main

raise SystemExit(main())
