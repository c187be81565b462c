"""Upload a written model folder to the Hugging Face Hub (``--push-to-hub REPO [--private]``).

Through huggingface_hub's ``HfApi``: ``create_repo`` (kept if it exists) then ``upload_folder`` of the whole
folder in one commit. The token is huggingface_hub's own (``HF_TOKEN`` or ``huggingface-cli login``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from dam.errors import DamError

logger = logging.getLogger(__name__)


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a valid Hub model id (``name`` or ``org/name``), else DamError; checked before any
    heavy work, so a typo does not cost a merge."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise DamError(f"--push-to-hub {repo_id!r}: not a valid Hub repo id ({e})") from None
    return repo_id


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, message: str | None = None) -> str:
    """Create ``repo_id`` (a model repo, ``private`` if asked; an existing one is kept) and upload every file of
    ``folder`` to it in one commit. Returns the commit URL. A failure is a DamError saying the folder is intact."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            commit_message=message or f"Upload {folder.name} with dam",
        )
    except Exception as e:  # network, auth and Hub errors of every kind become one line
        raise DamError(f"--push-to-hub {repo_id!r}: upload failed ({e}); the output at {folder} is complete") from e
    url = getattr(info, "commit_url", None) or str(info)
    logger.info("pushed %s to %s", folder, url)
    return url


__all__ = ["check_repo_id", "push_folder"]
