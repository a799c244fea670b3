"""``--model`` as a hub id: resolved through a Hugging Face cache laid out on disk by the test
(``models--org--name/blobs``, ``snapshots/<commit>/`` symlinks, ``refs/<revision>``), with
``HF_HUB_OFFLINE=1`` and no network; hub errors mapped to one line each; every rank exits."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from dstp.model import hub
from dstp.model.default_model import STORIES
from dstp.model.hub import ModelNotFoundError, resolve, resolve_on_ranks
from tests.helpers.hub_cache import OTHER_COMMIT, lay_out_hub_cache, stories_files
from tests.helpers.launcher import REPO, run_ranks


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 and an empty default cache: nothing can reach the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "default-cache"))
    return tmp_path


def test_local_folder_is_used_as_is(offline):
    path = str(STORIES.locate())
    assert resolve(path) == hub.ResolvedModel(path)


@pytest.mark.parametrize("model", ["/no/such/folder", "./missing", "a/b/c", "not a repo!"])
def test_missing_path_is_one_line(offline, model):
    with pytest.raises(ModelNotFoundError, match="does not exist") as info:
        resolve(model)
    assert "\n" not in str(info.value)


def test_file_instead_of_folder(offline):
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve(str(STORIES.locate() / "config.json"))


def test_hub_id_from_download_dir(offline):
    cache = offline / "hub"
    snapshot = lay_out_hub_cache(cache, "dstp-test/stories", stories_files())
    got = resolve("dstp-test/stories", download_dir=str(cache))
    assert got.repo_id == "dstp-test/stories"
    assert Path(got.path).resolve() == snapshot.resolve()
    assert (Path(got.path) / "model.safetensors").is_file()


def test_hub_id_from_hf_hub_cache(offline, monkeypatch):
    cache = offline / "env-cache"
    snapshot = lay_out_hub_cache(cache, "dstp-test/stories", stories_files())
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert Path(resolve("dstp-test/stories").path).resolve() == snapshot.resolve()


def test_revision_branch_and_commit(offline):
    cache = offline / "hub"
    main = lay_out_hub_cache(cache, "org/m", stories_files())
    v2 = lay_out_hub_cache(cache, "org/m", stories_files(), commit=OTHER_COMMIT, revision="v2")
    kw = {"download_dir": str(cache)}
    assert Path(resolve("org/m", **kw).path).resolve() == main.resolve()
    assert Path(resolve("org/m", revision="v2", **kw).path).resolve() == v2.resolve()
    assert Path(resolve("org/m", revision=OTHER_COMMIT, **kw).path).resolve() == v2.resolve()
    with pytest.raises(ModelNotFoundError, match="revision 'v3'.*not in the Hugging Face cache"):
        resolve("org/m", revision="v3", **kw)


def test_unknown_repo_offline(offline):
    with pytest.raises(ModelNotFoundError) as info:
        resolve("org/absent", download_dir=str(offline / "hub"))
    text = str(info.value)
    assert "not in the Hugging Face cache" in text and "HF_HUB_OFFLINE" in text
    assert "\n" not in text


def test_pickle_only_snapshot(offline):
    cache = offline / "hub"
    files = {"config.json": STORIES.locate() / "config.json", "pytorch_model.bin": b"pickle"}
    snapshot = lay_out_hub_cache(cache, "org/pickled", files)
    with pytest.raises(ModelNotFoundError, match="only pickled weights .*pytorch_model.bin"):
        resolve("org/pickled", download_dir=str(cache))
    # already on disk and explicitly allowed: handed to the checkpoint reader
    got = resolve("org/pickled", download_dir=str(cache), allow_pickle=True)
    assert Path(got.path).resolve() == snapshot.resolve()


def test_no_weights_snapshot(offline):
    cache = offline / "hub"
    lay_out_hub_cache(cache, "org/config-only", {"config.json": STORIES.locate() / "config.json"})
    with pytest.raises(ModelNotFoundError, match=r"no \*\.safetensors weights"):
        resolve("org/config-only", download_dir=str(cache))


# -- online paths, with the hub's calls replaced (nothing leaves the machine) ----------
def _http_error(cls, message="error"):
    response = SimpleNamespace(headers={}, request=None, status_code=404)
    return cls(message, response=response)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=0 with list_repo_files / snapshot_download replaced by fakes."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    state = SimpleNamespace(repo_files=[], list_error=None, downloads=[])
    real_snapshot_download = huggingface_hub.snapshot_download

    def list_repo_files(self, repo_id, revision=None, **_):
        if state.list_error is not None:
            raise state.list_error
        return state.repo_files

    def snapshot_download(repo_id, *, local_files_only=False, cache_dir=None, **kw):
        if local_files_only:  # the real cache look-up: it never touches the network
            return real_snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir, **kw)
        state.downloads.append(kw["allow_patterns"])
        from huggingface_hub.utils import filter_repo_objects

        wanted = list(filter_repo_objects(state.repo_files, allow_patterns=kw["allow_patterns"]))
        available = stories_files()
        files = {n: available.get(n, b"x") for n in wanted}
        return str(lay_out_hub_cache(Path(cache_dir), repo_id, files))

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    state.cache = str(tmp_path / "hub")
    return state


def test_download_fetches_serving_files_only(fake_hub):
    fake_hub.repo_files = [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "pytorch_model.bin",
        "original/consolidated.00.pth",
        "model.gguf",
        "README.md",
        "modeling_custom.py",
    ]
    got = resolve("org/model", download_dir=fake_hub.cache)
    fetched = sorted(p.name for p in Path(got.path).iterdir())
    assert fetched == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    # a second resolve is served from the cache: no second download
    assert resolve("org/model", download_dir=fake_hub.cache).path == got.path
    assert len(fake_hub.downloads) == 1
    resolve("org/model2", download_dir=fake_hub.cache, trust_remote_code=True)
    assert "*.py" in fake_hub.downloads[-1]


def test_bin_only_repo_is_refused_before_downloading(fake_hub):
    fake_hub.repo_files = ["config.json", "pytorch_model.bin", "tokenizer.json"]
    with pytest.raises(ModelNotFoundError, match="only pickled weights.*pytorch_model.bin"):
        resolve("org/old", download_dir=fake_hub.cache, allow_pickle=True)
    fake_hub.repo_files = ["config.json", "README.md"]
    with pytest.raises(ModelNotFoundError, match=r"no \*\.safetensors"):
        resolve("org/empty", download_dir=fake_hub.cache)
    assert fake_hub.downloads == []


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("GatedRepoError", "is a gated repo: accept its terms on https://huggingface.co/org/x"),
        ("RepositoryNotFoundError", "no such repo on the Hugging Face Hub"),
        ("RevisionNotFoundError", "no such revision"),
        ("HfHubHTTPError", "cannot fetch it from the Hugging Face Hub"),
    ],
)
def test_hub_errors_are_one_line(fake_hub, error, expected):
    from huggingface_hub import errors

    fake_hub.list_error = _http_error(getattr(errors, error), "404 Client Error\nlong details")
    with pytest.raises(ModelNotFoundError, match=expected) as info:
        resolve("org/x", download_dir=fake_hub.cache)
    assert "\n" not in str(info.value)


def test_network_down(fake_hub):
    fake_hub.list_error = ConnectionError("Connection refused")
    with pytest.raises(ModelNotFoundError, match="cannot fetch .*Connection refused"):
        resolve("org/x", download_dir=fake_hub.cache)


# -- across ranks ------------------------------------------------------------------------
def test_first_rank_of_a_node_resolves_the_others_read_the_cache(offline, fake_hub):
    fake_hub.repo_files = ["config.json", "model.safetensors", "tokenizer.json"]
    polls = []

    def world_min(value: int) -> int:  # the other ranks agree with this one
        polls.append(value)
        return value

    kw = {"world_min": world_min, "download_dir": fake_hub.cache, "poll_s": 0.01}
    with pytest.raises(ModelNotFoundError, match="node's first rank did not fetch it"):
        resolve_on_ranks("org/m", local_rank=1, **kw)  # nothing cached yet
    leader = resolve_on_ranks("org/m", local_rank=0, **kw)
    assert resolve_on_ranks("org/m", local_rank=1, **kw) == leader
    assert len(fake_hub.downloads) == 1
    # leader and follower make the same collectives once the wait is over (the last poll,
    # then two agreements); before that the leader reports 0 while it is still resolving
    polls.clear()
    resolve_on_ranks("org/m", local_rank=0, **kw)
    assert polls[-3:] == [1, 1, 1] and set(polls[:-3]) <= {0}
    polls.clear()
    resolve_on_ranks("org/m", local_rank=1, **kw)
    assert polls == [1, 1, 1]


def _serve(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "dstp", "serve", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_rank_exits_with_one_line(tmp_path):
    """Two ranks, an unknown hub id offline: both exit non-zero, one ERROR line, no traceback."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    procs = run_ranks(
        2, ["-m", "dstp", "serve", "--model", "org/absent", "--port", "0"], 120, **env
    )
    for rank, proc in enumerate(procs):
        assert proc.returncode != 0, proc.stdout[-2000:]
        assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
        errors = [line for line in proc.stdout.splitlines() if " ERROR " in line]
        assert len(errors) == 1, (rank, errors)
    assert "'org/absent' is not a local folder and not in the Hugging Face cache" in procs[0].stdout
    assert "another rank failed" in procs[1].stdout


def test_missing_path_single_process(tmp_path):
    proc = _serve("--model", str(tmp_path / "nope"), "--port", "0", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Repo id must" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "does not exist" in errors[0], proc.stderr[-2000:]


def test_pickle_only_local_folder_single_process(tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(STORIES.locate(), folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    proc = _serve("--model", str(folder), "--port", "0", env={})
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "only pickle checkpoints" in errors[0], errors


def test_builtin_names_and_existing_paths(tmp_path, monkeypatch):
    from dstp.model.default_model import STORIES, resolve_model

    assert resolve_model("stories260k") == (str(STORIES.locate()), STORIES)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "random").mkdir()  # a folder named like a built-in is that folder
    assert resolve_model("random") == ("random", None)
