"""Upload a converted model directory to the Hugging Face hub (card included)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import HubError


def upload(directory: Path, repo_id: str, private: bool = False, api: Any = None) -> str:
    """Create ``repo_id`` (if needed) and upload ``directory``; return the repo URL.

    ``api`` is an ``huggingface_hub.HfApi`` (injectable so tests can stand in for the hub).
    """
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(directory),
            repo_id=repo_id,
            repo_type="model",
            commit_message="Upload mint-mlx quantized model",
        )
    except Exception as e:  # noqa: BLE001 - network, auth and hub errors all end the same way
        raise HubError(
            f"upload to {repo_id} failed ({type(e).__name__}: {e}); check `huggingface-cli login` "
            f"and the network, then re-run the upload with the model in {directory}"
        ) from e
    return str(url)
