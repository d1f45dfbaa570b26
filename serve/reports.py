"""What every evaluation report starts with: the JSON written, the markdown and PNG paths, and
matplotlib on its file backend."""

from __future__ import annotations

import json
from pathlib import Path


def start_report(result: dict, stem: Path):
    """Write ``<stem>.json``; return ([json, md, png] paths, pyplot with the Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    return paths, plt
