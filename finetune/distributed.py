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

import lightning as L
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


# Lightning's names for its DDP strategy with each start method (lightning.pytorch.strategies.ddp).
_DDP_START_METHODS = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}


def strategy_with_timeout(strategy: Any, timeout_s: Any) -> Any:
    """``trainer.strategy`` as Lightning's DDPStrategy with ``ddp_timeout_s`` as the collectives' timeout, so a
    process that waits for a lost one stops after that long instead of torch's default (30 min; NCCL 10 min).
    Any other strategy is passed on as given. (``ddp_timeout_s`` is checked with the config's values.)"""
    if not isinstance(strategy, str) or strategy not in _DDP_START_METHODS or timeout_s in (None, 0):
        return strategy
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(start_method=_DDP_START_METHODS[strategy], timeout=timedelta(seconds=float(timeout_s)))


def is_lost_process(error: BaseException) -> bool:
    """A collective that failed because another process died or stopped answering (gloo/NCCL, a timeout)."""
    import re

    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    lost = r"gloo|nccl|connection (reset|closed|refused)|broken pipe|timed out|timeout"
    return isinstance(error, RuntimeError) and bool(re.search(lost, str(error), re.IGNORECASE))


def lost_process_message(error: BaseException, run_dir: Path, world_size: int, timeout_s: Any) -> str:
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = (f"The last checkpoint is intact: {last}. Continue with: finetune resume={run_dir} (on these devices, "
             f"or others: trainer.devices=N trainer.num_nodes=M trainer.strategy=..., the global batch and the "
             f"LR then follow the new number of processes)" if last.is_file()
             else "No checkpoint was saved yet (the first epoch had not finished): start the run again")
    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    return (f"Another process of this {world_size}-process run stopped or stopped answering during training, so this "
            f"one stopped too ({first}). {saved}. A process that hangs instead of dying is given up on after "
            f"ddp_timeout_s={timeout_s} s.")


class SameBatchSizeOnEveryRank(L.Callback):
    """Under DDP, every rank must train on the same batch size (else their step counts differ and the run hangs at
    the end of an epoch). data.batch_size=auto probes each process's GPU under torchrun or SLURM, so at the start of
    fit the ranks compare theirs; all of them see the gathered sizes and stop together with one clear error."""

    def __init__(self, batch_size: int):
        self.batch_size = int(batch_size)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size < 2:
            return
        import torch

        sizes = pl_module.all_gather(torch.tensor(self.batch_size, device=pl_module.device)).flatten().tolist()
        if len(set(sizes)) > 1:
            raise FinetuneError(
                f"The ranks of this DDP run chose different batch sizes ({sizes}, by rank): data.batch_size=auto "
                f"probed GPUs that differ. Set data.batch_size={min(sizes)} (the smallest) to train on all of them.")
