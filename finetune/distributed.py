"""Multi-process (DDP) runs: the run id every process shares, and the other ranks taking rank 0's
policy decision from policy.json. Separate so that what ranks share lives apart from what one process does."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only

from finetune.errors import FinetuneError
from finetune.resume import choice_from_record

log = logging.getLogger(__name__)

RUN_ID_ENV = "FINETUNE_RUN_ID"


def distributed_run_id() -> str | None:
    """An id every process of this run shares: set by rank 0 for the processes Lightning launches
    (they inherit its environment), or the launcher's own (torchrun, SLURM). None: one process."""
    if os.environ.get(RUN_ID_ENV):
        return os.environ[RUN_ID_ENV]
    elastic = os.environ.get("TORCHELASTIC_RUN_ID")
    shared = (elastic if elastic and elastic != "none" else None) or (
        f"slurm-{os.environ['SLURM_JOB_ID']}-{os.environ.get('SLURM_STEP_ID', '')}"
        if os.environ.get("SLURM_JOB_ID") else None)
    if shared is None and rank_zero_only.rank == 0:
        shared = uuid.uuid4().hex
    if shared is not None:
        os.environ[RUN_ID_ENV] = shared
    return shared


def decision_of_rank_zero(run_dir: Path, run_id: str, policy_cfg: dict[str, Any], timeout_s: float = 3600.0):
    """Other ranks: the plan rank 0 measured and wrote to policy.json, so all ranks apply one decision."""
    path = run_dir / "policy.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = None
        if record and record.get("run_id") == run_id:
            log.info("Rank %d: applying rank 0's policy decision (%s) from %s", rank_zero_only.rank,
                     record["policy_applied"], path)
            return choice_from_record(record, policy_cfg)
        time.sleep(0.5)
    raise FinetuneError(f"Rank {rank_zero_only.rank} waited {timeout_s:.0f} s for rank 0's policy decision in {path}; "
                        f"rank 0 may have failed (see its log), or run_dir is not on a filesystem all nodes share.")
