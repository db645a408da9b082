"""Error types users see. Each names the file (or key) and the problem in one sentence."""

from __future__ import annotations

from pathlib import Path


class DefectlabError(Exception):
    """Base class: every error raised on purpose by defectlab derives from it."""


class DatasetError(DefectlabError, ValueError):
    """A dataset file or folder is unusable. Message: '<path>: <problem>'."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class ResourceMissingError(DefectlabError, FileNotFoundError):
    """A resource (dataset, weights, textures) is not present and cannot be fetched; says how to get it."""


class DownloadError(DefectlabError, IOError):
    """Download failed or its checksum did not match."""


class UnsafeArchiveError(DefectlabError, ValueError):
    """An archive member would land outside the extraction target (absolute path, '..', or link)."""


class ConfigError(DefectlabError, ValueError):
    """params.yaml (or a CLI option) holds an invalid value; the message names the key."""
