"""``advise(cfg)``: measure the data and show the table's decision (and recipe=auto's choices) without training.

Costs about one forward pass over the (subsampled) training split plus the cross-validated probes. With
recipe=auto the measurement runs at the input size training would choose, so the cell shown is the one
training will apply.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from finetune.config import validate_train_config
from finetune.data.datasets import scan_configured
from finetune.data.transforms import resolve_preprocessing
from finetune.models.backbone import check_backbone_name, load_pretrained
from finetune.policy.choose import choose_policy, format_policy_block
from finetune.prepare import checked_index, recipe_before_measurement
from finetune.recipe.auto import after_measurement, format_recipe_block

log = logging.getLogger(__name__)


def advise(cfg: DictConfig) -> dict[str, Any]:
    validate_train_config(cfg)  # the same checks as training: a typo fails here, not after the measurement
    check_backbone_name(cfg.model.backbone)
    cfg, recipe = recipe_before_measurement(cfg)  # the input size (and holdout) training would use
    index = scan_configured(cfg)
    backbone, _, pretrained_head = load_pretrained(
        cfg.model.backbone, cfg.model.weights, **OmegaConf.to_container(cfg.model.kwargs)
    )
    preprocessing = resolve_preprocessing(backbone, cfg.data)
    index, _ = checked_index(index, cfg, preprocessing.image_size)  # measure on the files training would use
    policy_cfg = OmegaConf.to_container(cfg.policy, resolve=True)
    policy_cfg["measure"]["enabled"] = "true"  # advising is measuring, whatever policy is forced
    choice = choose_policy(policy_cfg, backbone, index, preprocessing, pretrained_head, cfg.seed,
                           flip=recipe.wants_flip_probe)
    after_measurement(cfg, recipe, choice)
    record = choice.record()
    print(format_policy_block(record))
    task = " task=multilabel" if str(cfg.task) == "multilabel" else ""  # the command must read the CSV the same way
    if recipe.mode == "auto":
        record["recipe"] = recipe.to_dict()
        print("\n" + format_recipe_block(record["recipe"]))
        forced = f" policy={record['policy_requested']}" if record["policy_requested"] != "auto" else ""
        print(f"\nTrain with it: finetune data.root={cfg.data.root}{task}{forced} (recipe=auto makes these choices "
              f"again)")
    else:
        print(f"\nTrain with it: finetune data.root={cfg.data.root}{task} policy={record['policy_requested']}"
              + (f" data.image_size={cfg.data.image_size}" if cfg.data.image_size else ""))
    return record
