"""push_to_hub against the test Hub server: files, visibility, branches, pull requests and errors."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import save_file

from hf_otfusion.card import render_card
from hf_otfusion.config import MergeConfig
from hf_otfusion.errors import FusionError
from hf_otfusion.hub import DEFAULT_COMMIT_MESSAGE, PushError, push_to_hub

try:
    from hub_server import DUMMY_TOKEN, HubServer, hub_server, point_hub_at  # noqa: F401 - hub_server is a fixture
except ModuleNotFoundError:  # tests/ imported as a package
    from tests.hub_server import DUMMY_TOKEN, HubServer, hub_server, point_hub_at  # noqa: F401

SECRET = "hf_NotARealTokenButShapedLikeOne0123456789"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A fused-model folder: config.json, model.safetensors and the README.md model card."""
    root = tmp_path / "fused"
    root.mkdir()
    gen = torch.Generator().manual_seed(0)
    save_file(
        {"fc.weight": torch.randn(3, 4, generator=gen), "fc.bias": torch.zeros(3)}, str(root / "model.safetensors")
    )
    (root / "config.json").write_text(json.dumps({"architecture": "tiny", "num_classes": 3}))
    config = MergeConfig.model_validate({"models": [{"model": "org/a"}, {"model": "org/b"}]})
    render_card(config, library="timm", pipeline_tag="image-classification", repo_id="me/fused").save(
        root / "README.md"
    )
    return root


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _assert_arrived(server: HubServer, repo_id: str, folder: Path, revision: str = "main") -> None:
    expected = _local_files(folder)
    assert server.list_files(repo_id, revision) == sorted([".gitattributes", *expected])
    for name, content in expected.items():
        assert server.file_bytes(repo_id, name, revision) == content


def test_push_uploads_the_folder(hub_server: HubServer, folder: Path) -> None:
    url = push_to_hub(folder, "me/fused")
    repo = hub_server.repo("me/fused")
    assert url == f"{hub_server.endpoint}/me/fused/commit/{repo.head}"
    _assert_arrived(hub_server, "me/fused", folder)
    assert repo.files_at("main")["model.safetensors"].lfs
    assert repo.commits[repo.head].title == DEFAULT_COMMIT_MESSAGE
    assert not repo.private
    assert all(r.authorized for r in hub_server.find_requests("POST"))  # HF_TOKEN was used
    assert not hub_server.unhandled

    # Unchanged files: no new commit, the URL of the last one.
    hub_server.clear_requests()
    assert push_to_hub(folder, "me/fused", commit_message="again") == url
    assert not hub_server.commit_requests()


def test_private_reaches_create(hub_server: HubServer, folder: Path) -> None:
    push_to_hub(folder, "me/secret-fused", private=True, commit_message="first upload")
    repo = hub_server.repo("me/secret-fused")
    assert repo.private
    assert repo.commits[repo.head].title == "first upload"
    assert len(hub_server.find_requests("POST", "/api/repos/create")) == 1


def test_push_to_a_new_branch(hub_server: HubServer, folder: Path) -> None:
    hub_server.create_branch_on_commit = False  # as on the real Hub: the branch must exist before the commit
    url = push_to_hub(folder, "me/fused", revision="experiment")
    repo = hub_server.repo("me/fused")
    assert url == f"{hub_server.endpoint}/me/fused/commit/{repo.branches['experiment']}"
    assert hub_server.find_requests("POST", "/api/models/me/fused/branch/experiment")
    _assert_arrived(hub_server, "me/fused", folder, revision="experiment")
    assert hub_server.list_files("me/fused") == [".gitattributes"]  # main untouched

    # The branch exists now: pushing to it again is fine (create_branch with exist_ok).
    (folder / "notes.txt").write_text("second round\n")
    push_to_hub(folder, "me/fused", revision="experiment")
    assert hub_server.file_bytes("me/fused", "notes.txt", "experiment") == b"second round\n"


def test_create_pr_returns_the_pr_url(hub_server: HubServer, folder: Path) -> None:
    hub_server.seed_repo("me/fused", {"README.md": "old card"})
    head = hub_server.repo("me/fused").head
    url = push_to_hub(folder, "me/fused", create_pr=True)
    assert url == f"{hub_server.endpoint}/me/fused/discussions/1"
    assert hub_server.commit_requests()[-1].query == {"create_pr": ["1"]}
    _assert_arrived(hub_server, "me/fused", folder, revision="refs/pr/1")
    assert hub_server.repo("me/fused").head == head
    assert hub_server.file_bytes("me/fused", "README.md") == b"old card"
    assert not hub_server.find_requests("POST", "/branch/")


def test_create_pr_against_another_branch_is_refused(hub_server: HubServer, folder: Path) -> None:
    with pytest.raises(PushError, match="pull request"):
        push_to_hub(folder, "me/fused", create_pr=True, revision="dev")
    assert not hub_server.requests


@pytest.mark.parametrize("kind", ["missing", "empty", "file"])
def test_bad_folder_fails_before_any_request(hub_server: HubServer, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "out"
    if kind == "empty":
        (path / "sub").mkdir(parents=True)
    elif kind == "file":
        path.write_text("not a folder")
    with pytest.raises(PushError, match="me/fused") as err:
        push_to_hub(path, "me/fused")
    assert isinstance(err.value, FusionError)
    assert not hub_server.requests


def test_invalid_repo_id_fails_before_any_request(hub_server: HubServer, folder: Path) -> None:
    with pytest.raises(PushError, match="not a repo"):
        push_to_hub(folder, "not a repo")
    assert not hub_server.requests


def _assert_no_leak(err: PushError, token: str, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture):
    assert token not in str(err) and token not in repr(err)
    assert err.__cause__ is None and err.__suppress_context__
    out, errout = capfd.readouterr()
    assert token not in out and token not in errout and token not in caplog.text


def test_rejected_token_is_not_leaked(
    hub_server: HubServer,
    folder: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    hub_server.write_tokens = frozenset({DUMMY_TOKEN})
    with pytest.raises(PushError) as err:
        push_to_hub(folder, "me/fused", token=SECRET)
    message = str(err.value)
    assert "me/fused" in message and "403" in message and "no write access" in message
    assert "\n" not in message
    assert hub_server.find_requests("POST", "/api/repos/create")
    assert not hub_server.has_repo("me/fused")
    _assert_no_leak(err.value, SECRET, capfd, caplog)


def test_missing_token_is_a_401(
    hub_server: HubServer,
    folder: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(PushError, match="credentials") as err:
        push_to_hub(folder, "me/fused", token=False)
    assert "401" in str(err.value) and "me/fused" in str(err.value)
    _assert_no_leak(err.value, DUMMY_TOKEN, capfd, caplog)


def test_unknown_pull_request_revision(hub_server: HubServer, folder: Path) -> None:
    with pytest.raises(PushError, match=r"me/fused@refs/pr/7.*does not exist"):
        push_to_hub(folder, "me/fused", revision="refs/pr/7")
    assert not hub_server.find_requests("POST", "/branch/")


def test_unreachable_hub(hub_server: HubServer, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    point_hub_at(f"http://127.0.0.1:{port}", monkeypatch)
    with pytest.raises(PushError, match="could not be reached") as err:
        push_to_hub(folder, "me/fused")
    assert "me/fused" in str(err.value)


@pytest.mark.parametrize("token", [SECRET, None])
def test_token_in_an_exception_text_is_scrubbed(
    hub_server: HubServer,
    folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    token: str | None,
) -> None:
    used = token or DUMMY_TOKEN  # None: the token comes from HF_TOKEN, set by the fixture

    def leaky_create_repo(self: HfApi, *args: object, **kwargs: object) -> None:
        raise OSError(f"proxy said: Authorization: Bearer {used}; token={used}")

    monkeypatch.setattr(HfApi, "create_repo", leaky_create_repo)
    with pytest.raises(PushError, match="me/fused") as err:
        push_to_hub(folder, "me/fused", token=token)
    assert "proxy said" in str(err.value)
    _assert_no_leak(err.value, used, capfd, caplog)
