"""The test Hub server against the real huggingface_hub, timm and transformers clients."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    hf_hub_url,
    list_repo_files,
    model_info,
    repo_exists,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import save_file

try:
    from hub_server import HubServer, hub_server, point_hub_at  # noqa: F401 - hub_server is a fixture
except ModuleNotFoundError:  # tests/ imported as a package
    from tests.hub_server import HubServer, hub_server, point_hub_at  # noqa: F401


def _model_folder(root: Path) -> Path:
    """A small folder: LFS-bound safetensors, regular json, nested text file."""
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    save_file({"w": torch.randn(4, 3, generator=gen), "b": torch.zeros(3)}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden": 3}))
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "notes.txt").write_text("hello hub\n")
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_client_is_pointed_at_server(hub_server: HubServer) -> None:
    import huggingface_hub.hf_api

    assert hub_server.endpoint == constants.ENDPOINT
    assert huggingface_hub.hf_api.api.endpoint == hub_server.endpoint
    assert HfApi().endpoint == hub_server.endpoint
    assert hf_hub_url("org/x", "a/b.txt").startswith(hub_server.endpoint + "/org/x/resolve/main/")
    assert constants.HF_HUB_DISABLE_XET and not constants.HF_HUB_OFFLINE
    assert Path(constants.HF_HUB_CACHE).is_dir() and "hf_home" in constants.HF_HUB_CACHE


def test_upload_folder_download_roundtrip(hub_server: HubServer, tmp_path: Path) -> None:
    api = HfApi()
    url = api.create_repo("org/roundtrip", private=True)
    assert url.repo_id == "org/roundtrip" and url.startswith(hub_server.endpoint)
    assert hub_server.repo("org/roundtrip").private
    api.create_repo("org/roundtrip", exist_ok=True)  # 409 answered, accepted
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("org/roundtrip")
    assert err.value.response.status_code == 409

    folder = _model_folder(tmp_path / "model")
    info = api.upload_folder(folder_path=folder, repo_id="org/roundtrip", commit_message="add model")
    assert info.oid == hub_server.repo("org/roundtrip").head
    assert info.commit_url == f"{hub_server.endpoint}/org/roundtrip/commit/{info.oid}"
    stored = hub_server.repo("org/roundtrip").files_at("main")
    assert stored["model.safetensors"].lfs and not stored["config.json"].lfs
    # The LFS path was used: batch + PUT of the bytes, then an ndjson commit naming it as lfsFile.
    assert hub_server.find_requests("POST", "/org/roundtrip.git/info/lfs/objects/batch")
    assert len(hub_server.find_requests("PUT", "/lfs-upload/")) == 1
    assert len(hub_server.commit_requests()) == 1

    expected = _files(folder)
    for name, content in expected.items():
        assert Path(hf_hub_download("org/roundtrip", name)).read_bytes() == content
    assert (
        Path(hf_hub_download("org/roundtrip", "config.json", revision=info.oid)).read_bytes()
        == (expected["config.json"])
    )
    snapshot = Path(snapshot_download("org/roundtrip"))
    assert snapshot.name == info.oid
    assert {k: v for k, v in _files(snapshot).items() if k != ".gitattributes"} == expected
    assert list_repo_files("org/roundtrip") == sorted([".gitattributes", *expected])
    assert model_info("org/roundtrip").sha == info.oid and model_info("org/roundtrip").private
    assert repo_exists("org/roundtrip")
    assert hub_server.file_bytes("org/roundtrip", "sub/notes.txt") == b"hello hub\n"

    # Same content again: the client sees identical oids in the preupload answer and makes no commit.
    hub_server.clear_requests()
    api.upload_folder(folder_path=folder, repo_id="org/roundtrip")
    assert hub_server.find_requests("POST", "/preupload/main")
    assert not hub_server.commit_requests() and not hub_server.find_requests("PUT")
    assert hub_server.repo("org/roundtrip").head == info.oid


def test_revisions_branches_and_pull_requests(hub_server: HubServer) -> None:
    first = hub_server.seed_repo("org/revs", {"a.txt": b"v1", "weights.bin": b"\0\1\2"})
    assert hub_server.repo("org/revs").files_at(first)["weights.bin"].lfs
    api = HfApi()

    dev = api.upload_file(path_or_fileobj=b"v2", path_in_repo="a.txt", repo_id="org/revs", revision="dev")
    assert hub_server.repo("org/revs").branches["dev"] == dev.oid
    assert Path(hf_hub_download("org/revs", "a.txt", revision="dev")).read_bytes() == b"v2"
    assert Path(hf_hub_download("org/revs", "a.txt")).read_bytes() == b"v1"
    assert Path(hf_hub_download("org/revs", "a.txt", revision=first)).read_bytes() == b"v1"

    pr = api.create_commit(
        repo_id="org/revs",
        operations=[
            CommitOperationAdd(path_in_repo="new/file.safetensors", path_or_fileobj=b"\0" * 64),
            CommitOperationDelete(path_in_repo="weights.bin"),
        ],
        commit_message="propose",
        create_pr=True,
    )
    assert pr.pr_url == f"{hub_server.endpoint}/org/revs/discussions/1"
    assert pr.pr_revision == "refs/pr/1" and pr.pr_num == 1
    assert hub_server.repo("org/revs").head == first  # main untouched
    assert hub_server.find_requests("POST", "/commit/main") and hub_server.commit_requests()[-1].query == {
        "create_pr": ["1"]
    }
    assert api.list_repo_files("org/revs", revision="refs/pr/1") == [
        ".gitattributes",
        "a.txt",
        "new/file.safetensors",
    ]
    assert Path(hf_hub_download("org/revs", "new/file.safetensors", revision="refs/pr/1")).read_bytes() == (b"\0" * 64)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/revs", "new/file.safetensors")
    follow_up = api.upload_file(path_or_fileobj=b"v3", path_in_repo="a.txt", repo_id="org/revs", revision="refs/pr/1")
    assert hub_server.repo("org/revs").pull_requests[1] == follow_up.oid
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"v4", path_in_repo="a.txt", repo_id="org/revs", revision="refs/pr/9")

    refs = api.list_repo_refs("org/revs", include_pull_requests=True)
    assert {b.name for b in refs.branches} == {"main", "dev"}
    assert [p.ref for p in refs.pull_requests or []] == ["refs/pr/1"]
    api.create_branch("org/revs", branch="release", revision=first)
    api.create_branch("org/revs", branch="release", exist_ok=True)
    assert hub_server.repo("org/revs").branches["release"] == first
    assert [c.commit_id for c in api.list_repo_commits("org/revs", revision="dev")][:2] == [dev.oid, first]
    assert {f.path for f in api.list_repo_tree("org/revs", revision="refs/pr/1")} == {
        ".gitattributes",
        "a.txt",
        "new",
    }
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/revs", "a.txt", revision="no-such-branch")


def test_missing_repo_and_missing_file(hub_server: HubServer) -> None:
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        model_info("org/missing")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/missing")
    assert not repo_exists("org/missing")

    hub_server.seed_repo("org/present", {"config.json": "{}"}, private=True)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("org/present", "nope.json")
    with pytest.raises(RepositoryNotFoundError):  # private repo, no token
        hf_hub_download("org/present", "config.json", token=False)
    assert hub_server.find_requests("HEAD", "/org/present/resolve/main/nope.json")
    assert not hub_server.commit_requests()
    assert not hub_server.unhandled


def test_write_tokens(hub_server: HubServer) -> None:
    hub_server.seed_repo("org/guarded", {"config.json": "{}"})
    hub_server.write_tokens = frozenset({"hf_writer"})
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_reader").create_repo("org/other")
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token=False).upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="org/guarded")
    assert err.value.response.status_code == 401
    assert Path(hf_hub_download("org/guarded", "config.json", token="hf_reader")).read_text() == "{}"  # reads pass
    HfApi(token="hf_writer").upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="org/guarded")
    assert hub_server.file_bytes("org/guarded", "x.txt") == b"x"
    assert not hub_server.has_repo("org/other")
    assert all("hf_" not in repr(r) for r in hub_server.requests)  # tokens are never recorded


def test_hub_server_context_manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with HubServer() as server:
        point_hub_at(server.endpoint, monkeypatch)
        monkeypatch.setenv("HF_TOKEN", "dummy")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        server.seed_repo("org/ctx", {"x.json": "1"})
        assert Path(hf_hub_download("org/ctx", "x.json")).read_text() == "1"
        port = int(server.endpoint.rsplit(":", 1)[1])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def _timm() -> object:
    from hf_otfusion._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import timm

    return timm


def test_timm_create_model_from_hub(hub_server: HubServer, tmp_path: Path) -> None:
    timm = _timm()
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=3).eval()  # type: ignore[attr-defined]
    timm.models.save_for_hf(model, str(tmp_path / "timm"), safe_serialization=True)  # type: ignore[attr-defined]
    hub_server.seed_repo("org/tiny-resnet", tmp_path / "timm")

    loaded = timm.create_model("hf-hub:org/tiny-resnet", pretrained=True).eval()  # type: ignore[attr-defined]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert hub_server.find_requests("GET", "/org/tiny-resnet/resolve/")
    assert not hub_server.unhandled


def _tiny_vit() -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=3,
    )
    return ViTForImageClassification(config).eval()


def test_transformers_from_pretrained_seeded(hub_server: HubServer, tmp_path: Path) -> None:
    from transformers import AutoModelForImageClassification

    model = _tiny_vit()
    model.save_pretrained(tmp_path / "vit")
    hub_server.seed_repo("org/tiny-vit", tmp_path / "vit")

    loaded = AutoModelForImageClassification.from_pretrained("org/tiny-vit").eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, loaded(pixel_values=x).logits)
    assert not hub_server.unhandled


def test_transformers_push_to_hub_and_upload_folder(hub_server: HubServer, tmp_path: Path) -> None:
    from transformers import AutoModelForImageClassification

    model = _tiny_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(pixel_values=x).logits

    model.push_to_hub("org/pushed-vit", private=True)
    repo = hub_server.repo("org/pushed-vit")
    assert repo.private
    assert {"config.json", "model.safetensors", "README.md"} <= set(repo.files_at("main"))
    assert repo.files_at("main")["model.safetensors"].lfs
    assert hub_server.find_requests("POST", "/api/validate-yaml")
    loaded = AutoModelForImageClassification.from_pretrained("org/pushed-vit").eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).logits, expected)

    # Pushing unchanged weights again makes no commit; changed weights pushed as a PR leave main alone.
    hub_server.clear_requests()
    model.push_to_hub("org/pushed-vit")
    assert not hub_server.commit_requests()
    with torch.no_grad():
        model.classifier.bias.add_(1.0)
    commit = model.push_to_hub("org/pushed-vit", create_pr=True, commit_message="shift bias")
    assert commit.pr_revision == "refs/pr/1"
    from_pr = AutoModelForImageClassification.from_pretrained("org/pushed-vit", revision="refs/pr/1").eval()
    from_main = AutoModelForImageClassification.from_pretrained("org/pushed-vit").eval()
    with torch.no_grad():
        assert torch.allclose(from_pr(pixel_values=x).logits, expected + 1.0, atol=1e-6)
        assert torch.equal(from_main(pixel_values=x).logits, expected)
        model.classifier.bias.sub_(1.0)

    # upload_folder of a save_pretrained folder into another repo.

    model.save_pretrained(tmp_path / "vit")
    HfApi().create_repo("org/uploaded-vit")
    HfApi().upload_folder(folder_path=tmp_path / "vit", repo_id="org/uploaded-vit")
    reloaded = AutoModelForImageClassification.from_pretrained("org/uploaded-vit").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=x).logits, expected)
    assert not hub_server.unhandled
