"""Checkpoints by Hugging Face Hub repo id: downloaded once into the Hub's cache (``hub`` extra)."""

from __future__ import annotations

import os

DEFAULT_MODEL_ID = "HKUSTAudio/xcodec2-hf"
# The files a checkpoint of any supported format needs; weights in other formats are skipped.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "_CHECKPOINT_METADATA", "params/**"]


def resolve_checkpoint(
    path_or_repo_id: str | os.PathLike, revision: str | None = None, cache_dir: str | None = None
) -> str:
    """A local checkpoint directory for ``path_or_repo_id``: the directory itself, or the Hub repo's
    snapshot downloaded with ``huggingface_hub`` (``revision``: branch, tag or commit; ``cache_dir``:
    the Hub's download folder). Raises ``OSError`` saying why neither worked."""
    path_or_repo_id = os.fspath(path_or_repo_id)
    if os.path.isdir(path_or_repo_id):
        return path_or_repo_id
    tried = f"{path_or_repo_id!r} is not a local directory"
    try:
        from huggingface_hub import snapshot_download  # optional dependency: the ``hub`` extra
    except ImportError:
        raise OSError(
            f"cannot load {tried}, and huggingface_hub is not installed to download it as a hub repo "
            "(pip install 'xcodec2_jax[hub]')"
        ) from None
    try:
        return snapshot_download(
            path_or_repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=ALLOW_PATTERNS
        )
    except Exception as e:  # offline, unknown repo, bad revision, ...
        first = str(e).splitlines()[0] if str(e) else ""
        raise OSError(
            f"cannot load {tried}, and downloading it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {first})"
        ) from e
