"""Turn the suite's results into the generated part of BENCHMARKS.md (between two marker lines;
everything outside them is hand-written and kept)."""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

from finetune.conf import preset

BEGIN = "<!-- bench.sh: generated from here to the end marker; rerun scripts/bench.sh to refresh -->"
END = "<!-- bench.sh: end of the generated part; hand-written one-off measurements follow -->"
ZERO = "zero-config"
ORDER = [ZERO, "auto", "linear_probe", "stage_probe", "partial", "full", "lp_ft", "gradual", "scratch"]
FIXED = ["linear_probe", "stage_probe", "partial", "full", "lp_ft", "gradual"]
RUN_LIMIT_MIN = {"full": 60, "quick": 5}  # the whole suite (or its accuracy part alone with --accuracy-only)
WALL_LIMIT = 1.2  # zero-config's wall time / the best fixed policy's
# Goal rows and sections that --accuracy-only does not rerun: carried over from the previous generated part.
KEPT_GOALS = ("| overhead:", "| feature cache:", "| loader:")
KEPT_FROM = "\n## Overhead against a plain PyTorch loop"
# The large-data goals and section (scripts/bench/scale.py): rendered when the results have them, else carried.
SCALE_GOALS = ("| scale:", "| streaming memory:")
SCALE_FROM = "\n## Large data: training throughput and memory on 60k and 300k files"
SCALE_MIN_RATIO = 0.95
SET_NOTES = {
    "fmnist": ("Fashion-MNIST few-shot (`fmnist-10` / `-50` / `-200`: 10 / 50 / 200 training images per class, the "
               "same 10 validation and 200 test images per class; 28 px grayscale)"),
    "digits": "scikit-learn's 8x8 handwritten `digits` (50% / 10% / 40% train / val / test)",
    "stamps": ("`stamps`: Tux Paint's colour stamps of everyday things (Debian `tuxpaint-stamps-default`, mostly "
               "photo cut-outs on white; 10 classes such as mammals, fruit, vehicles, household; 18-71 pictures "
               "per class, 60/40 train/test; RGB, longest side at most 256 px, median shorter side ~140 px)"),
    "emoji-objects": ("`emoji-objects`: emoji of 12 Unicode subgroups (animal-mammal, food-fruit, "
                      "transport-ground, ...) drawn in three art styles (Twemoji, OpenMoji, Noto Color Emoji), "
                      "split by emoji so the test asks for emoji never seen in training (36 train / 24 test per "
                      "class, 72 px RGB)"),
    "glyphs": ("`glyphs`: the letters A-J rendered from real fonts of Debian font packages, one face per family, "
               "families split between train and test so the test letters come from unseen typefaces (the "
               "notMNIST task; 40 train / ~60 test per class, 64 px grayscale)"),
    "terrain": ("`terrain`: aerial photographs of 11 land covers (FlightGear's terrain textures, Debian "
                "`flightgear-data-base`; urban, forest, cropland, sand, snow_ice, ...), split by photograph so the "
                "test patches come from photographs never seen in training (50 train / 60 test per class, 64 px RGB, "
                "like EuroSAT)"),
}
NO_VAL_SETS = ("stamps", "emoji-objects", "glyphs", "terrain")


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _noise(a: list[float], b: list[float]) -> float:
    """Two standard errors of the difference of two means (0 with one seed: nothing to judge by)."""
    if min(len(a), len(b)) < 2:
        return 0.0
    return 2 * math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))


def _distinct(values) -> str:
    """The values the seeds gave, once each in order ('a' or 'a / b')."""
    seen = list(dict.fromkeys(str(v) for v in values))
    return " / ".join(seen) if seen else "–"


def _zero_config_choices(runs: list[dict]) -> dict[str, str]:
    """Key -> what zero-config chose over the seeds (from RUN/recipe.json)."""
    per_key: dict[str, list[str]] = {}
    for r in runs:
        for item in r.get("recipe", []):
            key, value = item.split("=", 1)
            per_key.setdefault(key, []).append(value)
    return {k: _distinct(v) for k, v in per_key.items()}


def accuracy_rows(acc: dict) -> list[dict]:
    rows = []
    for name in acc["sets"]:
        runs = [r for r in acc["runs"] if r["set"] == name]
        if not runs:
            continue
        by = {p: sorted((r for r in runs if r["policy"] == p), key=lambda r: r["seed"]) for p in acc["policies"]}
        accs = {p: [r["test_acc"] for r in rs] for p, rs in by.items() if rs}
        fixed = [p for p in FIXED if p in accs]
        best = max(fixed, key=lambda p: statistics.mean(accs[p])) if fixed else None
        plan = acc.get("plans", {}).get(name, {})
        wall = {p: statistics.mean(r["wall_s"] for r in rs) for p, rs in by.items() if rs}
        zero = by.get(ZERO, [])
        row = {"set": name, "n_train": acc["train_images"][name], "size": plan.get("image_size"),
               "epochs": plan.get("epochs", runs[0].get("epochs")), "accs": accs, "wall": wall, "best": best,
               "auto_applied": sorted({r["applied"] for r in by.get("auto", [])}),
               "auto_cell": sorted({r.get("cell") or r.get("quadrant") for r in by.get("auto", [])} - {None}),
               "zero": {"runs": zero, "choices": _zero_config_choices(zero),
                        "applied": _distinct(r["applied"] for r in zero),
                        "cell": _distinct(r.get("cell") or "–" for r in zero),
                        "size": _distinct(r["image_size"] for r in zero),
                        "epochs": _distinct(r["epochs"] for r in zero),
                        "lr": _distinct(f"{r['lr']:g}" for r in zero),
                        "holdout": _distinct(_holdout(r, plan) for r in zero)}}
        if ZERO in accs and best:
            row["zero_gap"] = statistics.mean(accs[ZERO]) - statistics.mean(accs[best])
            row["zero_noise"] = _noise(accs[ZERO], accs[best])
            row["zero_wall_ratio"] = wall[ZERO] / wall[best]
        if "auto" in accs and best:
            row["gap_best"] = statistics.mean(accs[best]) - statistics.mean(accs["auto"])
            row["noise_best"] = _noise(accs[best], accs["auto"])
        if "auto" in accs and "scratch" in accs:
            row["gap_scratch"] = statistics.mean(accs["auto"]) - statistics.mean(accs["scratch"])
            row["noise_scratch"] = _noise(accs["auto"], accs["scratch"])
        rows.append(row)
    return rows


def _holdout(run: dict, plan: dict) -> str:
    """Where a run's validation images came from."""
    if plan.get("facts", {}).get("val_split_on_disk"):
        return "val/ folder"
    fraction = float(run["val_fraction"])
    return f"{fraction:.0%} of train held out" if fraction > 0 else "none (val_fraction=0: every image trains)"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def _carried(previous: str | None) -> tuple[list[str], str, str]:
    """From the previous generated part: the goal rows and sections --accuracy-only does not rerun, and
    where they come from ('DATE (commit C)')."""
    if not previous or KEPT_FROM not in previous:
        return [], "", ""
    goals = [line for line in previous.splitlines() if line.startswith(KEPT_GOALS)]
    sections = KEPT_FROM.lstrip("\n") + previous.split(KEPT_FROM, 1)[1].split(END, 1)[0].rstrip("\n")
    source = (re.search(r"carried over from the run of (\S+ \(commit [^)]+\))", previous)
              or re.search(r"Generated by .*? on (\S+ \(commit [^)]+\))", previous))
    return goals, sections, source.group(1) if source else "an earlier run"


def _datasets_prose(sets: list[str]) -> str:
    notes = list(dict.fromkeys(SET_NOTES["fmnist" if s.startswith("fmnist") else s] for s in sets if
                               (s.startswith("fmnist") or s in SET_NOTES)))
    text = "Data: " + "; ".join(notes) + "."
    no_val = [f"`{s}`" for s in sets if s in NO_VAL_SETS]
    if no_val:
        names = ", ".join(no_val[:-1]) + (" and " if len(no_val) > 1 else "") + no_val[-1]
        are, have = ("are", "have") if len(no_val) > 1 else ("is", "has")
        text += (f" {names} {are} built by `scripts/bench/real_sets.py` from Debian / PyPI packages and {have} no "
                 "`val/` folder, like most users' folders: finetune holds out 20% of the training images for "
                 "validation, unless zero-config's small-data rule (at most "
                 f"{preset('recipe', 'auto')['no_holdout_max_per_class']} training images per class, median) "
                 "trains on all of them (`data.val_fraction=0`; the scores then come from the last epoch and "
                 "`train_eval/acc` replaces `val/acc`).")
    return text


def markdown(results: dict, previous: str | None = None) -> str:
    """The generated part. ``previous``: the current generated part, whose overhead, cache and loader
    goals and sections are kept when ``results`` has none (an --accuracy-only run)."""
    env, mode = results["environment"], results["mode"]
    accuracy_only = "overhead" not in results
    acc = results["accuracy"]
    rows = accuracy_rows(acc)
    n_seeds = len(acc["seeds"])
    out = [BEGIN, "# Benchmarks", ""]
    gpu = env["gpu"] or "no GPU"
    flags = (" --quick" if mode == "quick" else "") + (" --accuracy-only" if accuracy_only else "")
    out += [(f"Generated by `scripts/bench.sh{flags}` on {env['date']} "
            f"(commit {env['commit']}) in **{results['total_s'] / 60:.1f} min**."),
            (f"Machine: {env['cores']} cores ({env['cpu']}), {env['memory_gb']} GiB, {gpu}. "
            f"Python {env['python']}, torch {env['torch']}, timm {env['timm']}, lightning {env['lightning']}, "
            f"albumentations {env['albumentations']}, hydra {env['hydra']}, scikit-learn {env['scikit-learn']}."),
            ("Backbone: timm `tf_efficientnet_lite0` with the bundled offline ImageNet weights. Timings on shared "
            "machines are noisy: each speed goal is a ratio of two things measured in the same run."),
            ("Reproduce: `scripts/bench.sh` (full), `scripts/bench.sh --accuracy-only` (the accuracy part alone) or "
            "`scripts/bench.sh --quick` (a smoke run of the same code: one seed, two datasets, three columns, a "
            "small budget). Raw numbers: `bench_results/results_<mode>[_accuracy].json`."), ""]
    if mode == "quick":
        out += [("**This is a --quick run**: one seed and a short budget, too few numbers to judge the "
                "accuracy goals; run the full benchmark for those."), ""]
    if acc.get("skipped"):
        out += ["Skipped (material not installed, see `scripts/bench/real_sets.py`): " + "; ".join(
            f"{name} ({why})" for name, why in acc["skipped"].items()) + ".", ""]

    # Goals
    judged = n_seeds > 1
    zero = [r for r in rows if "zero_gap" in r]
    zero_ok = all(r["zero_gap"] >= -r["zero_noise"] for r in zero) if judged and zero else None
    wall_ok = all(r["zero_wall_ratio"] <= WALL_LIMIT for r in zero) if zero else None
    near = [r for r in rows if "gap_best" in r]
    near_ok = all(r["gap_best"] <= r["noise_best"] for r in near) if judged and near else None
    far = [r for r in rows if "gap_scratch" in r]
    far_ok = (all(r["gap_scratch"] >= 0.05 and r["gap_scratch"] > r["noise_scratch"] for r in far)
              if judged and far else None)
    limit_min = RUN_LIMIT_MIN[mode]
    out += ["## Goals", "", "| benchmark | goal | result | |", "|---|---|---|---|"]
    if zero:
        out.append("| accuracy: zero-config (`finetune data.root=DIR`) against the best fixed policy with the hand "
                   "recipe, every dataset | within noise (2 standard errors of the difference) or above | " + "; ".join(
                       f"{r['set']}: {r['zero_gap']:+.4f} vs {r['best']} (noise {r['zero_noise']:.4f})" for r in zero)
                   + f" | {_verdict(zero_ok)} |")
        out.append(f"| wall time: zero-config / the best fixed policy's (same row: same input size and epochs) | "
                   f"at most {WALL_LIMIT}x | " + "; ".join(f"{r['set']}: {r['zero_wall_ratio']:.2f}x" for r in zero)
                   + f" | {_verdict(wall_ok)} |")
    if near:
        out.append("| accuracy: `auto` against the best fixed policy (both with the hand recipe), every dataset | "
                   "within noise (2 standard errors of the difference) | " + "; ".join(
                       f"{r['set']}: {-r['gap_best']:+.4f} vs {r['best']} (noise {r['noise_best']:.4f})"
                       for r in near) + f" | {_verdict(near_ok)} |")
    if far:
        out.append("| accuracy: `auto` against training from scratch, same budget | far above (by 0.05 and beyond "
                   "noise) | " + "; ".join(f"{r['set']}: {r['gap_scratch']:+.4f}" for r in far)
                   + f" | {_verdict(far_ok)} |")
    carried_goals, carried_sections, carried_source = _carried(previous) if accuracy_only else ([], "", "")
    if accuracy_only:
        out += carried_goals
    else:
        ov, cache = results["overhead"], results["cache"]
        loader_ratios = [row["ratio"] for block in results["loader"] for row in block["rows"]]
        out.append(f"| overhead: one epoch through finetune / the same epoch as a plain PyTorch loop | at most 1.10 | "
                   f"{ov['ratio']:.3f} (median epochs: {ov['median_ratio']:.3f}) | {_verdict(ov['ratio'] <= 1.10)} |")
        out.append(f"| feature cache: 10-epoch linear probe without / with the cache | at least 5x | "
                   f"{cache['ratio']:.1f}x (default L-BFGS head: {cache['ratio_lbfgs']:.1f}x) | "
                   f"{_verdict(cache['ratio'] >= 5)} |")
        out.append(f"| loader: albumentations `medium` / torchvision v2, images/s | at least 1.0x | lowest of "
                   f"{len(loader_ratios)} rows {min(loader_ratios):.2f}x | {_verdict(min(loader_ratios) >= 1.0)} |")
    scale = results.get("scale")
    out += scale_goals(scale) if scale else [line for line in (previous or "").splitlines()
                                             if line.startswith(SCALE_GOALS)]
    what = f"{mode}, accuracy only" if accuracy_only else mode
    out.append(f"| run time ({what}) | at most {limit_min} min | {results['total_s'] / 60:.1f} min | "
               f"{_verdict(results['total_s'] <= limit_min * 60)} |")
    out.append("")
    if carried_goals:
        out += [(f"The overhead, feature cache and loader rows and sections are carried over from the run of "
                 f"{carried_source}: `--accuracy-only` did not rerun them."), ""]

    # Accuracy
    budget = acc.get("budget")
    budget_text = (f"`recipe.budget={budget}` (training images seen at 64 px)" if budget
                   else "the recipe's default budget (`fast`)")
    out += ["## Accuracy: zero-config against every policy with the hand recipe", "",
            (f"Test accuracy, mean ± std over seeds {', '.join(map(str, acc['seeds']))} (the training seed; data draw "
             "and policy measurement fixed). **zero-config** is `finetune data.root=DIR` with nothing else "
             "(issue #13): its only overrides are the seed, the run folder, `report=false`, no progress bar, "
             f"`recipe=auto` (explicit, so the column does not depend on the config default) and {budget_text}; "
             "`recipe=auto` chooses the input size and crop, the epochs, a one-cycle schedule without early "
             "stopping, the LR by the measured domain, label smoothing, augmentation by a flip probe, and no holdout "
             "on small data "
             "(RUN/recipe.json; what it chose is listed below the tables). Every other column is one policy with "
             "the **hand recipe** (the policy issue's demo, `recipe=off`): AdamW lr 1e-3 with one-cycle, no "
             "augmentation, the whole frame (`data.crop_pct=1.0`), early stopping removed, batch 32, "
             "`model.channels_last=true`, BatchNorm statistics kept (`regularization.trainable_bn=eval`), at the "
             "**input size, for the epochs and with the holdout zero-config chooses for that row** (computed once "
             "per row from the data, before training), so a row's columns train on the same images at the same "
             "input for as many epochs and differ only by policy and recipe; lp_ft probes for 30% of the epochs. "
             "The last epoch is scored (`score_checkpoint=auto`: one-cycle anneals the LR to ~0)."
             + (" `scratch` is `policy=full model.weights=none`." if "scratch" in acc["policies"] else "")),
            "", _datasets_prose(acc["sets"]) + " Best fixed policy of each row in bold.", ""]
    policies = [p for p in ORDER if p in acc["policies"]]
    out.append("| dataset | train images | input px | epochs | " + " | ".join(policies) + " |")
    out.append("|---|---|---|---|" + "---|" * len(policies))
    for r in rows:
        cells = []
        for p in policies:
            if p not in r["accs"]:
                cells.append("–")
                continue
            m, s = _stats(r["accs"][p])
            text = f"{m:.4f} ± {s:.4f}" if n_seeds > 1 else f"{m:.4f}"
            cells.append(f"**{text}**" if p == r["best"] else text)
        out.append(f"| {r['set']} | {r['n_train']} | {r['size'] or '–'} | {r['epochs']} | " + " | ".join(cells) + " |")
    out += ["", ("Wall seconds per run (mean; each run is `train(cfg)` in-process with "
                 f"{acc.get('threads_per_worker', 1)} thread(s), {acc.get('workers', 2)} run(s) at a time; "
                 "measurement, caching and test evaluation included). Last column: zero-config / the best fixed "
                 "policy:"), ""]
    ratio = ZERO in policies
    out.append("| dataset | " + " | ".join(policies) + (" | zero-config / best |" if ratio else " |"))
    out.append("|---|" + "---|" * (len(policies) + ratio))
    for r in rows:
        cells = [f"{r['wall'][p]:.1f}" if p in r["wall"] else "–" for p in policies]
        if ratio:
            cells.append(f"{r['zero_wall_ratio']:.2f}x" if "zero_wall_ratio" in r else "–")
        out.append(f"| {r['set']} | " + " | ".join(cells) + " |")
    if ratio:
        out += ["", "What zero-config chose (over the seeds; `a / b` where they differ):", ""]
        for r in rows:
            z = r["zero"]
            if not z["runs"]:
                continue
            c = z["choices"]
            per_seed = " / ".join(f"{a:.4f}" for a in r["accs"].get(ZERO, []))
            out.append(f"- {r['set']}: {z['size']} px (crop {c.get('data.crop_pct', 'pretrained')}), {z['epochs']} "
                       f"epochs, lr {z['lr']}, augment {c.get('augment', '–')}, validation {z['holdout']}, "
                       f"policy {z['applied']} (cell {z['cell']}); test acc per seed {per_seed}.")
    if "auto" in policies:
        out += ["", "What `auto` (with the hand recipe) chose:", ""]
        for r in rows:
            per_seed = " / ".join(f"{a:.4f}" for a in r["accs"].get("auto", []))
            out.append(f"- {r['set']}: cell {', '.join(r['auto_cell']) or '–'} → {', '.join(r['auto_applied'])}; "
                       f"per seed {per_seed}.")
    carried = acc.get("carried")
    if carried:
        n_new = sum("from" not in r for r in acc["runs"])
        for origin, by_set in carried.items():
            cells = "; ".join(f"{s}: {', '.join(ps)}" for s, ps in by_set.items())
            out += ["", (f"Carried from the run of {origin} (`suite.py --keep-rows`; the changes measured here "
                         f"cannot move them): {cells}.")]
        out += ["", f"The {n_new} runs of the other cells took {acc['total_s'] / 60:.1f} min.", ""]
    else:
        out += ["", f"All {len(acc['runs'])} runs took {acc['total_s'] / 60:.1f} min.", ""]

    if scale:
        out += scale_section(scale)
    elif previous and SCALE_FROM in previous:
        out += [SCALE_FROM.lstrip("\n") + previous.split(SCALE_FROM, 1)[1].split("\n## ", 1)[0].rstrip("\n"), ""]
    if accuracy_only:
        out += ([carried_sections, ""] if carried_sections else []) + [END]
        return "\n".join(out) + "\n"

    # Overhead
    ov, cache = results["overhead"], results["cache"]
    out += ["## Overhead against a plain PyTorch loop", "",
            (f"One training epoch of a full fine-tune ({ov['train_images']} images of {ov['root'].rsplit('/', 1)[-1]}, "
            f"{ov['image_size']} px, batch {ov['batch']}, AdamW, the default `light` augmentation, {ov['threads']} "
            "threads) through `finetune` (Lightning, metrics, logging, checkpoint callbacks, default settings) "
            "against a minimal loop (timm model, DataLoader over the same decoded images and albumentations "
            "pipeline, AdamW, cross-entropy). Each side trains 3 epochs per round and epochs 2-3 are timed; "
            f"{ov['rounds']} alternating round(s). `scripts/bench/overhead.py`."), "",
            "| | fastest epoch s | median epoch s | epochs timed (s) |", "|---|---|---|---|",
            (f"| finetune | {ov['finetune_min_s']:.2f} | {statistics.median(ov['finetune_s']):.2f} | "
            f"{', '.join(f'{t:.2f}' for t in ov['finetune_s'])} |"),
            (f"| plain loop | {ov['plain_min_s']:.2f} | {statistics.median(ov['plain_s']):.2f} | "
            f"{', '.join(f'{t:.2f}' for t in ov['plain_s'])} |"),
            f"| **ratio** | **{ov['ratio']:.3f}** | {ov['median_ratio']:.3f} | |", ""]

    # Cache
    out += ["## Feature cache", "",
            (f"`policy=linear_probe` for {cache['epochs']} epochs on {cache['root'].rsplit('/', 1)[-1]} "
            f"({cache['train_images']} training images, 64 px, no augmentation, early stopping off). Fit seconds "
            "include computing the cached features. `scripts/bench/feature_cache.py`."), "",
            "| variant | fit s | wall s (whole run) | test acc |", "|---|---|---|---|"]
    for name, v in cache["variants"].items():
        out.append(f"| {name} | {v['fit_s']:.2f} | {v['wall_s']:.2f} | {v['test_acc']:.4f} |")
    out += ["", (f"Ratio without / with the cache (same AdamW epochs): **{cache['ratio']:.1f}x**; against the "
            f"default L-BFGS head: {cache['ratio_lbfgs']:.1f}x."), ""]

    # Loader
    out += ["## Loader: albumentations against torchvision.transforms.v2", "",
            ("The `medium` pipeline (random resized crop, horizontal flip, colour jitter p 0.8, affine p 0.5, "
            "normalize, CHW float tensor) in finetune (albumentations) and the same operations in torchvision "
            f"v2, on {results['loader'][0]['images']} JPEGs cut from scikit-image's photos (320-512 px), one thread, "
            f"median of {results['loader'][0]['rounds']} alternating round(s). \"decode + transform\" includes "
            "decoding each file (finetune: PIL with reduced-scale JPEG decoding, as training does; v2: "
            "`torchvision.io.decode_image`); \"transform only\" starts from decoded images, as finetune's "
            "in-memory preload does. `scripts/bench/loader.py`."), "",
            "| output | mode | albumentations img/s | torchvision v2 img/s | ratio |", "|---|---|---|---|---|"]
    for block in results["loader"]:
        for row in block["rows"]:
            out.append(f"| {block['size']} px | {row['mode']} | {row['albumentations']} | {row['torchvision_v2']} | "
                       f"**{row['ratio']:.2f}** |")
    out += ["", END]
    return "\n".join(out) + "\n"


def scale_goals(sc: dict) -> list[str]:
    """The large-data goal rows: finetune's images/s against the plain loop, and streaming memory."""
    mem, stream = sc["ratio_in_memory"], sc["ratio_streaming"]
    timm, default = sc.get("ratio_timm"), sc.get("ratio_timm_default")
    # Against timm, "at least" within noise: the per-round ratios' mean + 2 standard errors reaches 1, like the
    # accuracy goals (the fastest rounds alone swing +-5% between runs). Both finetune as it runs by default on
    # this set (decoded once, in memory) and like for like (both streaming) must pass.
    def within_noise(r: dict) -> bool:
        return r["paired"] + 2 * (r.get("paired_se") or 0) >= 1.0

    def shown(r: dict) -> str:
        se = f" ± {r['paired_se']:.2f}" if r.get("paired_se") is not None else ""
        return f"{r['paired']:.2f}x{se} paired by round (fastest {r['fastest']:.2f}x, medians {r['median']:.2f}x)"

    ok = (min(mem["fastest"], stream["fastest"]) >= SCALE_MIN_RATIO
          and (timm is None or (within_noise(timm) and within_noise(default))))
    timm_text = (f"; against timm's train.py: finetune's default (in memory) {shown(default)}, both streaming "
                 f"{shown(timm)}" if timm and "paired" in timm else
                 "; timm's train.py not run (not in the wheel or sdist: `--timm-train PATH`)")
    rss = sc["rows"]
    base = rss["finetune, streaming"]["peak_rss_gb"]["process"]
    many = rss[f"finetune, streaming, {sc['many_set']}"]["peak_rss_gb"]["process"]
    return [(f"| scale: finetune / a plain PyTorch loop and / timm's train.py, training images/s on "
             f"{sc['train_files']:,} files | at least {SCALE_MIN_RATIO}x the loop; timm's or within noise (2 SE) | "
             f"in memory {mem['fastest']:.2f}x (medians {mem['median']:.2f}x); streaming {stream['fastest']:.2f}x "
             f"(medians {stream['median']:.2f}x){timm_text} | {_verdict(ok)} |"),
            (f"| streaming memory: peak RSS with {sc['many_files']:,} files / with {sc['train_files']:,} | reported; "
             f"far below 5x (the files' count) | {many:.2f} / {base:.2f} GB = {sc['rss_many_over_base']:.2f}x | "
             f"{_verdict(sc['rss_many_over_base'] < 1.5)} |")]


def share(value: float | None) -> str:
    """A fraction as a percentage; n/a where it does not apply (the loader measured alone waits by definition)."""
    return "n/a" if value is None else f"{100 * value:.0f}%"


def scale_section(sc: dict) -> list[str]:
    rows = sc["rows"]
    out = [SCALE_FROM.lstrip("\n"), "",
           (f"Measured {sc.get('date', '')} (commit {sc.get('commit', '?')}), {sc['cpus']} cores, no GPU. "
            f"`{sc['set']}`: the real Fashion-MNIST training file as {sc['train_files']:,} PNG files (28 px "
            f"grayscale), and `{sc['many_set']}`: the same images written at five sizes (28-84 px, "
            f"{sc['many_files']:,} files). Every contender trains tf_efficientnet_lite0 (bundled ImageNet weights, "
            f"new 10-class head, every layer, channels_last) at {sc['image_size']} px, batch {sc['batch']}, AdamW, no "
            f"augmentation, for {sc['steps']} steps (the first 5 not timed), each in its own process, one at a "
            f"time; images/s counts the time waiting for batches plus the steps, validation excluded. In memory: "
            f"finetune's default (`data.preload=auto`, 0 loader workers) against a loop over the same decoded "
            f"arrays; streaming: `data.preload=false` (decoded per item in `num_workers=auto` workers) against "
            f"torchvision `ImageFolder` with the same number of workers, finetune's training loader alone (no "
            f"model; what the input pipeline can deliver, batches moved and normalised as in a run), and timm's own "
            f"`train.py` (its "
            f"prefetching loader: uint8 batches normalised after the transfer; `--no-aug --smoothing 0`, the same "
            f"weights through `--initial-checkpoint`, stopped after the timed updates), when a copy is given. "
            f"{sc['rounds']} alternating rounds; the "
            f"fastest round of each is compared (interference only slows a run). `scripts/bench/scale.py`."), "",
           ("| contender | loader workers | images/s trained, or delivered by the loader alone (rounds) | waiting for "
            "data | peak RSS, process / largest worker GB | wall s |"), "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        rounds = ", ".join(f"{v:g}" for v in r.get("rounds_images_per_s", [r["images_per_s"]]))
        out.append(f"| {name} | {r['workers']} | **{r['images_per_s']:g}** ({rounds}) | "
                   f"{share(r['wait_share'])} | {r['peak_rss_gb']['process']:.2f} / "
                   f"{r['peak_rss_gb']['largest_child']:.2f} | {r['wall_s']:g} |")
    out += ["", f"timm's `train.py`: {sc['timm_train']}.", ""]
    return out


def generated_part(path: Path) -> str | None:
    """The generated part of ``path`` (markers included), or None."""
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        return BEGIN + old.split(BEGIN, 1)[1].split(END, 1)[0] + END
    return None


def write_into(path: Path, generated: str) -> None:
    """Replace the generated part of ``path`` (or put it on top, keeping the rest below)."""
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        before, rest = old.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        path.write_text(before + generated.rstrip("\n") + after)
    else:
        path.write_text(generated + ("\n" + old if old else ""))
