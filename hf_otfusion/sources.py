"""Model references → loaded ``nn.Module`` with its library; saving back in that library's format.

A reference is a Hub id with an optional ``@revision`` (``org/name@v1``), an ``hf-hub:`` name, or a local
folder (an existing path, or one written ``local-dir:PATH``, ``./PATH`` or ``/PATH``).

Example:
    >>> from hf_otfusion.sources import parse_ref
    >>> parse_ref("timm/resnet18.a1_in1k@main")
    ModelRef(text='timm/resnet18.a1_in1k@main', repo_id='timm/resnet18.a1_in1k', revision='main', path=None)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import FusionError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class SourceError(FusionError):
    """A model reference that cannot be parsed, found, loaded or saved."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: either a Hub repo (``repo_id``, ``revision``) or a local folder (``path``)."""

    text: str
    repo_id: str | None = None
    revision: str | None = None
    path: Path | None = None

    @property
    def is_local(self) -> bool:
        return self.path is not None


def parse_ref(text: str) -> ModelRef:
    """Parse a model reference; a ``SourceError`` says what is wrong with a malformed one."""
    raw = text.strip()
    if not raw:
        raise SourceError("empty model reference")
    if raw.startswith("local-dir:"):
        return ModelRef(text=text, path=Path(raw.removeprefix("local-dir:")).expanduser())
    if raw.startswith(("/", "./", "../", "~")) or Path(raw).expanduser().exists():
        return ModelRef(text=text, path=Path(raw).expanduser())
    name = raw.removeprefix("hf-hub:")
    repo_id, _, revision = name.partition("@")
    if not _REPO_ID.match(repo_id) or (_ and not revision):
        raise SourceError(
            f"{text!r} is neither an existing local folder nor a Hub model id ('org/name' with optional '@revision')"
        )
    return ModelRef(text=text, repo_id=repo_id, revision=revision or None)
