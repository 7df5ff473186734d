"""The Kvasir-SEG sample shipped inside the package (40 image/mask pairs; its README says which)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["sample_data_path", "sample_images"]


def sample_data_path() -> Path:
    """Folder of the bundled Kvasir-SEG sample (``images/`` and ``masks/``, 40 pairs)."""
    return Path(str(resources.files("lmnet") / "sample_data" / "kvasir_sample"))


def sample_images(count: int | None = None) -> list[Path]:
    """The sample's image files in name order, the first ``count`` of them (all: None)."""
    from lmnet.data.io import list_images

    files = list_images(sample_data_path() / "images")
    return files if count is None else files[:count]
