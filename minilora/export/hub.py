"""The Hugging Face hub, outbound: upload a finished adapter or merged folder (`--push-to-hub`).

Downloads (a model or data set id given to --model / --data) are checkpoint.py's and data.py's.
"""
from __future__ import annotations

import os
from pathlib import Path


def hub_token() -> str:
    """The write token from $HF_TOKEN; checked before any long work, so a missing token fails at once."""
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise PermissionError("pushing to the Hugging Face hub needs a write token: create one at "
                           "https://huggingface.co/settings/tokens and set it with `export HF_TOKEN=hf_...`.")
    return token


def push_to_hub(folder, repo_id: str, private: bool = False) -> str:
    """Upload a finished folder (adapter or merged model) to the hub repo `repo_id`, creating it if needed.

    Hidden files (our `.tmp-*` leftovers) are not uploaded. Returns the repo URL.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder to push.")
    api = HfApi(token=hub_token())
    url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", ignore_patterns=[".*", "**/.*"],
                      commit_message=f"Upload {folder.name} with minilora")
    return str(url)
