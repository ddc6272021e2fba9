"""Model versions in an own-model folder, as deploy/README.md ("Your own model") rolls them: a bundle per version
written beside the others, and the configured path (a relative symlink) repointed at the new one atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from model.checkpoint import DEFAULT_BUNDLE, METADATA_FILE


def write_version(models: Path, version: str) -> Path:
    """A copy of the bundled model with ``version`` in its ``model.json`` (the checksum covers the weights only),
    written beside the others in ``models`` and readable by any user (the container's is uid 10001); returns it."""
    bundle = models / f"shapes-{version}"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    metadata = json.loads((bundle / METADATA_FILE).read_text())
    metadata["version"] = version
    (bundle / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    bundle.chmod(0o755)
    for file in bundle.iterdir():
        file.chmod(0o644)
    return bundle


def point(link: Path, bundle: Path) -> None:
    """Repoint ``link`` at ``bundle`` atomically: a new symlink renamed over the old one. Relative, so that it
    resolves inside a container too."""
    staging = link.with_name(link.name + ".new")
    staging.symlink_to(bundle.name)
    staging.replace(link)
