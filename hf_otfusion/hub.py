"""Push an output folder to the Hugging Face Hub: ``create_repo`` + ``upload_folder``, errors as ``PushError``.

Example:
    >>> from hf_otfusion.hub import push_to_hub
    >>> push_to_hub("fused-resnet18", "you/resnet18-fused", private=True)  # doctest: +SKIP
    'https://huggingface.co/you/resnet18-fused/commit/...'
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import validate_repo_id

from .errors import PushError

DEFAULT_COMMIT_MESSAGE = "Upload model fused with hf-otfusion"
_HF_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{20,}")
_BEARER_RE = re.compile(r"(Bearer\s+)\S+", re.IGNORECASE)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection errors of the HTTP client huggingface_hub uses (httpx2 in 2.x; requests' are OSErrors)."""
    errors: list[type[BaseException]] = []
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


# RuntimeError: upload_folder gives up with "Error while uploading ..." after its retries (a server gone mid-upload)
_HUB_ERRORS = (HfHubHTTPError, OSError, RuntimeError, *_transport_errors())



def scrub(text: str, secrets: list[str]) -> str:
    """``text`` with every secret, bearer credential and Hub-token-shaped string masked."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return _HF_TOKEN_RE.sub("hf_***", _BEARER_RE.sub(r"\1***", text))


def _cause(err: BaseException) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, RevisionNotFoundError):
        hint = "the branch or revision does not exist"
    elif isinstance(err, RepositoryNotFoundError):
        hint = "the repo was not found or the token cannot see it"
    elif status == 401:
        hint = "the Hub did not accept the credentials; pass a valid token, set HF_TOKEN or run `hf auth login`"
    elif status == 403:
        hint = "the token has no write access to this repo or namespace"
    elif isinstance(err, HfHubHTTPError):
        hint = f"the Hub answered HTTP {status}" if status else "the Hub answered with an error"
    else:
        hint = "the Hub could not be reached or the files could not be read"
    detail = " ".join(str(err).split())  # one paragraph: the client's messages span several lines
    return f"{hint} ({type(err).__name__}: {detail})" if detail else f"{hint} ({type(err).__name__})"


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | bool | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload every file of ``folder`` to the Hub model repo ``repo_id``, creating the repo if needed.

    Args:
        folder: the output folder of a merge (weights, config, README.md, ...).
        repo_id: ``"namespace/name"``.
        private: create the repo private (an existing repo keeps its visibility).
        revision: the branch to commit to (created from ``main`` if missing); default ``main``.
        create_pr: open a pull request against ``main`` instead of committing to it.
        token: a Hub token; None uses huggingface_hub's usual resolution (``HF_TOKEN``, then the stored token),
            False sends none.
        commit_message: default ``"Upload model fused with hf-otfusion"``.

    Returns:
        The URL of the commit, or of the pull request with ``create_pr=True``. When nothing changed since the
        last commit, no commit is made and the URL of that last commit is returned.

    Raises:
        PushError: the folder is missing or empty (before any request), or the Hub refused the push or could not be
            reached; the message names the repo and the cause and never contains the token.

    Example:
        >>> from hf_otfusion.hub import push_to_hub
        >>> push_to_hub("fused", "you/resnet18-fused", create_pr=True)  # doctest: +SKIP
        'https://huggingface.co/you/resnet18-fused/discussions/1'
    """
    path = Path(folder)
    if not path.is_dir():
        raise PushError(f"cannot push to {repo_id}: {path} is not a folder")
    if not any(p.is_file() for p in path.rglob("*")):
        raise PushError(f"cannot push to {repo_id}: {path} holds no files")
    try:
        validate_repo_id(repo_id)
    except ValueError as err:
        raise PushError(f"cannot push to {repo_id!r}: {err}") from None
    if create_pr and revision not in (None, "main"):
        raise PushError(
            f"cannot push to {repo_id}: a pull request (create_pr=True) is opened against main, "
            f"so it cannot target revision {revision!r}"
        )

    secrets = [token] if isinstance(token, str) and token else []
    if token is None and (resolved := get_token()):
        secrets.append(resolved)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main" and not create_pr and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            folder_path=path,
            repo_id=repo_id,
            revision=None if create_pr else revision,
            create_pr=create_pr,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
        )
    except _HUB_ERRORS as err:
        where = f"{repo_id}@{revision}" if revision else repo_id
        # `from None`: the original exception's text is not scrubbed, so it must not reach a traceback.
        raise PushError(scrub(f"pushing {path} to {where} on the Hub failed: {_cause(err)}", secrets)) from None
    return str(info.pr_url or info.commit_url)
