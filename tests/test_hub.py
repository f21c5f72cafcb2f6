"""`push_to_hub` against a local fake Hub (tests/hub_server.py) with the real huggingface_hub client."""

import logging
import socket

import pytest
from conftest import tiny_model
from hub_server import FakeHub

from hf_minitron.hub import HubUploadError, push_to_hub


TOKEN = "hf_valid_test_token"
LFS_SIZE = 11 * 1024 * 1024  # above the 10 MB limit of regular files


@pytest.fixture
def hub(hub_env):
    with FakeHub(tokens=[TOKEN]) as server:
        yield server


@pytest.fixture
def checkpoint(tmp_path):
    """A saved tiny model plus a card and a plot, like the pipeline's final folder."""
    folder = tmp_path / "final"
    tiny_model("llama").save_pretrained(folder)
    (folder / "README.md").write_text("---\nlibrary_name: transformers\ntags:\n- minitron\n---\n\n# Tiny\n")
    (folder / "plots").mkdir()
    (folder / "plots" / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)) * 8)
    # Large enough for LFS whatever the suffix rules.
    (folder / "extra.safetensors").write_bytes(bytes(range(256)) * (LFS_SIZE // 256))
    return folder


def _local_files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_uploads_every_file_byte_for_byte(hub, checkpoint, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    url = push_to_hub(checkpoint, "tester/tiny-minitron", token=TOKEN, endpoint=hub.url, commit_message="Upload tiny")
    repo = hub.repos["tester/tiny-minitron"]
    assert url == f"{hub.url}/tester/tiny-minitron/commit/{repo['commits'][-1]}"
    assert repo["files"] == _local_files(checkpoint)
    assert repo["messages"] == ["Upload tiny"]
    assert repo["private"] is False
    # The weights, the plot and the large file went through LFS (batch + PUT + verify), the rest inline.
    assert sorted(hub.lfs_objects.values(), key=len) == sorted(
        [repo["files"][p] for p in ("model.safetensors", "plots/loss.png", "extra.safetensors")], key=len
    )
    puts = [path for method, path, _ in hub.requests if method == "PUT"]
    assert len(puts) == 3
    routes = {(method, path.split("?")[0]) for method, path, _ in hub.requests}
    assert ("POST", "/api/validate-yaml") in routes
    assert ("POST", "/tester/tiny-minitron.git/info/lfs/objects/batch") in routes
    assert all(status < 400 or path == "/api/repos/create" for _, path, status in hub.requests)
    out, err = capfd.readouterr()
    assert TOKEN not in out + err + caplog.text
    for content in repo["files"].values():
        assert TOKEN.encode() not in content


def test_push_again_reuses_repo_and_lfs_objects(hub, checkpoint):
    push_to_hub(checkpoint, "tester/tiny-minitron", token=TOKEN, endpoint=hub.url, private=True)
    puts = sum(method == "PUT" for method, _, _ in hub.requests)
    (checkpoint / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# Tiny v2\n")
    push_to_hub(checkpoint, "tester/tiny-minitron", token=TOKEN, endpoint=hub.url)
    repo = hub.repos["tester/tiny-minitron"]
    assert repo["private"] is True
    assert len(repo["commits"]) == 2
    assert repo["files"]["README.md"].startswith(b"---\nlicense: apache-2.0")
    assert sum(method == "PUT" for method, _, _ in hub.requests) == puts  # LFS content already stored
    assert ("POST", "/api/repos/create", 409) in hub.requests  # exist_ok


def test_token_and_endpoint_from_environment(hub, checkpoint, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    push_to_hub(checkpoint, "tiny-minitron")  # the namespace comes from whoami
    assert "tester/tiny-minitron" in hub.repos


def test_missing_token_fails_before_any_request(hub, checkpoint):
    with pytest.raises(ValueError, match="HF_TOKEN"):
        push_to_hub(checkpoint, "tester/tiny-minitron", endpoint=hub.url)
    with pytest.raises(ValueError, match="token"):
        push_to_hub(checkpoint, "tester/tiny-minitron", token="  ", endpoint=hub.url)
    assert hub.requests == []


def test_invalid_arguments_fail_before_any_request(hub, checkpoint, tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        push_to_hub(tmp_path / "missing", "tester/x", token=TOKEN, endpoint=hub.url)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no file"):
        push_to_hub(tmp_path / "empty", "tester/x", token=TOKEN, endpoint=hub.url)
    with pytest.raises(ValueError, match="repo_id='a/b/c'"):
        push_to_hub(checkpoint, "a/b/c", token=TOKEN, endpoint=hub.url)
    with pytest.raises(ValueError, match="endpoint"):
        push_to_hub(checkpoint, "tester/x", token=TOKEN, endpoint="127.0.0.1:1")
    assert hub.requests == []


def test_offline_mode_is_refused(hub, checkpoint, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        push_to_hub(checkpoint, "tester/x", token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


def test_invalid_token_gives_clear_error(hub, checkpoint, capfd, caplog):
    bad = "hf_this_token_is_revoked"
    with pytest.raises(HubUploadError, match="rejected the token.*HTTP 401") as info:
        push_to_hub(checkpoint, "tester/tiny-minitron", token=bad, endpoint=hub.url)
    assert bad not in str(info.value) and info.value.__cause__ is None
    assert hub.requests == [("GET", "/api/whoami-v2", 401)]
    assert hub.repos == {}
    out, err = capfd.readouterr()
    assert bad not in out + err + caplog.text


def test_unreachable_endpoint_gives_clear_error(hub_env, checkpoint):
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(HubUploadError, match=f"Could not reach the Hub at http://127.0.0.1:{port}") as info:
        push_to_hub(checkpoint, "tester/tiny-minitron", token=TOKEN, endpoint=f"http://127.0.0.1:{port}")
    assert TOKEN not in str(info.value)


def test_invalid_card_metadata_is_reported(hub, checkpoint):
    (checkpoint / "README.md").write_text("---\n: [unbalanced\n---\n")
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        push_to_hub(checkpoint, "tester/tiny-minitron", token=TOKEN, endpoint=hub.url)
    assert hub.repos["tester/tiny-minitron"]["files"] == {}


def test_only_main_process_pushes(hub, checkpoint, monkeypatch):
    from accelerate import PartialState

    monkeypatch.setattr(PartialState, "is_main_process", property(lambda self: False))
    assert push_to_hub(checkpoint, "tester/tiny-minitron", token=TOKEN, endpoint=hub.url) is None
    assert hub.requests == []


def test_push_writes_the_repository_id_into_the_cards_quick_start(hub, checkpoint):
    card = '---\nlibrary_name: transformers\n---\n\n```python\nmodel_id = "<namespace>/Tiny"  # or the local folder\n```\n'
    (checkpoint / "README.md").write_text(card)
    push_to_hub(checkpoint, "tester/tiny-minitron", token=TOKEN, endpoint=hub.url)
    published = hub.repos["tester/tiny-minitron"]["files"]["README.md"].decode()
    assert 'model_id = "tester/tiny-minitron"  # or the local folder' in published
    assert (checkpoint / "README.md").read_text() == card  # the local folder is left as it was
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["final"]  # no staging copy left behind
    files = hub.repos["tester/tiny-minitron"]["files"]
    assert files["model.safetensors"] == (checkpoint / "model.safetensors").read_bytes()
