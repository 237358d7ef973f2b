"""Turning what the user typed (a folder or a hub repo id) into a local folder."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ..errors import DiffusmithError

logger = logging.getLogger(__name__)

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# what a pipeline needs from a repo: configs, tokenizer files and safetensors weights (never pickles)
DOWNLOAD_PATTERNS = ["*.json", "*.txt", "*.safetensors", "tokenizer/*", "*.model", "*.tiktoken"]


def resolve_model_path(model: str | Path) -> Path:
    """A local folder as is; ``org/name`` downloaded from the Hugging Face hub (cached) when not local."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    text = str(model)
    if not REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise DiffusmithError(f"model folder not found: {path}; pass a local folder in the official layout "
                              "or a hub repo id such as Qwen/Qwen-Image")
    try:
        from huggingface_hub import snapshot_download

        logger.info("downloading %s from the Hugging Face hub (first use only)", text)
        return Path(snapshot_download(text, allow_patterns=DOWNLOAD_PATTERNS))
    except Exception as e:  # network, auth, missing repo: all end the same way for the user
        raise DiffusmithError(f"{text} is not a local folder and could not be downloaded from the hub "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              "check the name, your network or HF_TOKEN, or pass a local folder") from None
