"""Where a method comparison's ROUGE-L comes from, per task family of the embedded suite, and in which style
the students answer. Reads a finished `student_worker.research.experiment` output dir (experiment.json, each run's
config.yaml and final_model); writes a markdown report (stdout, or --out).

    .venv/bin/python scripts/experiment_by_family.py runs/exp-style [--styles] [--out by_family.md]

- Per family: mean ROUGE-L over seeds and that family's evaluation examples, for every method and the two
  reference models (from the per-example scores the experiment kept; nothing is recomputed).
- `--styles`: greedy decoding (the evaluation's own function and settings) of every evaluation prompt by
  each method's seed-`--seed` final model, the student base and the SFT teacher; per model the share of
  answers that are the reference exactly, that are the terse (base-style) answer exactly (style_shift
  only), and that end with " ." (the sentence style). CPU, a few seconds to a minute per model.
- `--gaps`: per family, each method's difference from the baseline (`--baseline`, kd by default) with the
  experiment's 95 % paired t-interval (seeds x that family's examples; `student_worker.research.stats`),
  raw, no multiplicity correction (a family table is read beside the overall Holm verdicts, not instead).

Embedded data only (the families are the generator's). Numbers are what the models print on this machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common.config import config_from_dict  # noqa: E402
from common.data.examples import load_examples  # noqa: E402
from common.tiny_world.suite import embedded_suite  # noqa: E402


def _family_means(scores: np.ndarray, families: list[str]) -> dict[str, float]:
    """scores [S, N] (or [N]) -> {family: mean over seeds and the family's examples, "all": overall}."""
    s = np.atleast_2d(scores)
    out = {f: float(s[:, [i for i, g in enumerate(families) if g == f]].mean()) for f in sorted(set(families))}
    out["all"] = float(s.mean())
    return out


def _styles(model_path: str, examples: list[dict[str, str]], rows: list[dict[str, Any]], cfg: Any) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.reproducibility import apply_compute_settings
    from student_worker.evaluate import greedy_generate

    apply_compute_settings(cfg.reproducibility, where="experiment_by_family")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_path)
    preds = greedy_generate(model, tok, [e["prompt"] for e in examples], cfg.evaluation.max_new_tokens,
                            cfg.evaluation.batch_size)
    n = len(preds)
    out = {"exact reference": sum(p == e["response"] for p, e in zip(preds, examples)) / n,
           "ends with ' .'": sum(p.endswith(" .") for p in preds) / n,
           "mean words": float(np.mean([len(p.split()) for p in preds]))}
    if "terse" in rows[0]:
        out["exact terse answer"] = sum(p == r["terse"] for p, r in zip(preds, rows)) / n
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment_dir", type=Path)
    p.add_argument("--styles", action="store_true", help="decode with each method's final model (see above)")
    p.add_argument("--seed", type=int, default=0, help="the seed whose final models --styles decodes with")
    p.add_argument("--gaps", action="store_true", help="per-family paired differences from --baseline (see above)")
    p.add_argument("--baseline", default="kd")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    exp = json.loads((args.experiment_dir / "experiment.json").read_text())
    first = Path(exp["runs"][0]["output_dir"])
    cfg = config_from_dict(yaml.safe_load((first / "config.yaml").read_text()), source=str(first / "config.yaml"))
    if cfg.data.eval != "embedded":
        print("error: the families are the embedded suite's; this experiment's eval set is not embedded",
              file=sys.stderr)
        return 2
    examples = load_examples(cfg.data, "eval", cfg.embedded)
    rows = embedded_suite(cfg.embedded)[cfg.data.eval_split][: len(examples)]
    families = [r["family"] for r in rows]
    assert [r["response"] for r in rows] == [e["response"] for e in examples]

    by_method: dict[str, list[tuple[int, list[float]]]] = defaultdict(list)
    for run in exp["runs"]:
        by_method[run["method"]].append((run["seed"], run["report"]["rouge"]["student_after"]["per_example"]["rougeL"]))
    table: dict[str, dict[str, float]] = {}
    for name, ref in exp["references"].items():
        table[{"student_base": "student base", "sft_teacher": "SFT teacher"}.get(name, name)] = _family_means(
            np.asarray(ref["per_example"]["rougeL"]), families)
    for method, runs in by_method.items():
        table[method] = _family_means(np.asarray([s for _, s in sorted(runs)]), families)

    fams = sorted(set(families)) + ["all"]
    counts = {f: families.count(f) for f in fams[:-1]} | {"all": len(families)}
    md = [f"# ROUGE-L by task family: {args.experiment_dir}", "",
          f"preset {cfg.embedded.preset}, {len(examples)} evaluation examples, seeds {exp['seeds']}; "
          "mean over seeds and the family's examples", "",
          "| model | " + " | ".join(f"{f} ({counts[f]})" for f in fams) + " |", "|---" * (len(fams) + 1) + "|"]
    md += [f"| {m} | " + " | ".join(f"{v[f]:.3f}" for f in fams) + " |" for m, v in table.items()]
    if args.gaps and args.baseline in by_method:
        from student_worker.research.stats import paired_t

        mats = {m: np.asarray([s for _, s in sorted(runs)]) for m, runs in by_method.items()}
        md += ["", f"## Differences from {args.baseline} per family (95 % paired t-interval, raw)", "",
               "| method | " + " | ".join(f"{f} ({counts[f]})" for f in fams) + " |", "|---" * (len(fams) + 1) + "|"]
        for method, mat in mats.items():
            if method == args.baseline or mat.shape != mats[args.baseline].shape:
                continue
            cells = []
            for f in fams:
                cols = list(range(len(families))) if f == "all" else [i for i, g in enumerate(families) if g == f]
                iv = paired_t(mat[:, cols], mats[args.baseline][:, cols])
                cells.append(f"{iv.mean:+.3f} [{iv.lo:+.3f}, {iv.hi:+.3f}]")
            md += [f"| {method} | " + " | ".join(cells) + " |"]
    if args.styles:
        models = {"student base": str(cfg.models.student.path), "SFT teacher": str(cfg.models.sft_teacher.path)}
        for method in by_method:
            run = next(r for r in exp["runs"] if r["method"] == method and r["seed"] == args.seed)
            models[method] = str(Path(run["output_dir"]) / "final_model")
        styles = {name: _styles(path, examples, rows, cfg) for name, path in models.items()}
        keys = list(next(iter(styles.values())))
        md += ["", f"## Answer style (greedy, seed {args.seed}'s final models)", "",
               "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        md += [f"| {m} | " + " | ".join(f"{v[k]:.3f}" for k in keys) + " |" for m, v in styles.items()]
    text = "\n".join(md) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
