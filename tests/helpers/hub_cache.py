"""A Hugging Face hub cache laid out by hand, as huggingface_hub writes it (no network)."""

from __future__ import annotations

from pathlib import Path

from dstp.model.default_model import STORIES

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def lay_out_hub_cache(
    cache: Path,
    repo_id: str,
    files: dict[str, Path | bytes],
    commit: str = COMMIT,
    revision: str | None = "main",
) -> Path:
    """The hub's cache layout for ``repo_id`` at ``commit`` (``revision`` pointing at it);
    returns the snapshot folder. Files are blobs named by their content, linked from the
    snapshot as huggingface_hub does."""
    import hashlib

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("../../blobs") / blob.name)
    if revision:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
    return snapshot


def stories_files() -> dict[str, Path]:
    return {p.name: p for p in STORIES.locate().iterdir() if p.name not in ("README.md", "LICENSE")}
