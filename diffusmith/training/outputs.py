"""The output folder of a run: who owns it, and the final weights."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from ..core.lora import LoraPair, lora_state_dict, save_lora
from ..errors import DiffusmithError
from .distributed import whole_tensor

logger = logging.getLogger(__name__)
RUN_FILE = "run.json"


def check_output_folder(out: Path, fingerprint: dict[str, Any], *, resume: str | None) -> None:
    """A new run needs an empty (or new) folder; a resumed run needs the folder of the same run. Writes
    nothing: :func:`claim_output_folder` marks the folder once the run has been set up, so that a run refused
    while setting up (a stale cache, a missing model) leaves the folder as it was."""
    run_file = out / RUN_FILE
    if out.exists() and not out.is_dir():
        raise DiffusmithError(f"--output {out} is a file; pass a folder")
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        if not resume:
            raise DiffusmithError(f"output folder {out} already holds a training run; pass --resume latest to "
                                  "continue it, or choose another --output")
        changed = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
        if changed:
            what = (f"the option {changed[0]} differs" if len(changed) == 1
                    else f"the options {', '.join(changed)} differ")
            raise DiffusmithError(f"cannot resume {out}: {what} from the run that made it; use the same options or "
                                  "another --output")
        return
    if out.is_dir() and any(out.iterdir()) and not resume:
        raise DiffusmithError(f"output folder {out} is not empty and holds no diffusmith run; "
                              "choose a new or empty --output")


def claim_output_folder(out: Path, fingerprint: dict[str, Any]) -> None:
    """Mark ``out`` as this run's folder (``run.json``: the options a resume must repeat), once checked by
    :func:`check_output_folder`; a resumed run's folder keeps its mark."""
    run_file = out / RUN_FILE
    if run_file.exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = run_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(fingerprint, indent=2))
    os.replace(tmp, run_file)


def save_final_weights(out: Path, module, *, is_main_process: bool = True) -> Path:
    """``lora.safetensors`` (diffusers/ComfyUI keys) or ``model.safetensors`` (full fine-tune, the
    checkpoint's own key layout, loadable with ``--transformer``).

    Every process must call this: weights sharded over the processes (FSDP) are gathered first."""
    if module.spec.full:
        path = out / "model.safetensors"
        # stored in the dtype the frozen weights were loaded in (bf16 under --mixed-precision bf16)
        dtype = module.pipe.torch_dtype
        state = {}
        for k, v in module.model.state_dict().items():
            v = whole_tensor(v.detach())  # one tensor gathered at a time; only the main process keeps it
            if is_main_process:
                state[k] = (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu()
        if is_main_process:
            tmp = path.with_name(".model.safetensors.tmp")
            save_file(state, tmp)
            os.replace(tmp, path)
    else:
        path = out / "lora.safetensors"
        pairs = {name: LoraPair(down=whole_tensor(p.down), up=whole_tensor(p.up), alpha=p.alpha)
                 for name, p in lora_state_dict(module.model).items()}
        if is_main_process:
            save_lora(path, pairs, rank=module.spec.rank, alpha=module.spec.lora_alpha)
    return path
