"""Issue 23, world B: how many steps S0+ (the style_shift student base further trained on the terse
answers; common/tiny_world/style.py) needs to give the exact terse answer on the validation split.

    .venv/bin/python scripts/student_plus_ladder.py [--steps 50,100,200,400] [--out ladder.md] [--set k=v ...]

Builds (and caches) S0+ at each step count of the ladder with `build_student_plus`, decodes every
validation prompt greedily with the evaluation's own function and settings, and prints, per model (the
student base at 0 steps, then each rung), the share of exact terse answers, overall and per family, the
share of sentence-style answers (ending " .") and the mean answer length. Validation split only: the
pre-registered condition (docs/EXPERIMENT.md, world B) is >= 80 % exact terse answers there, with the
fewest steps; the test split is never read. Numbers are what the models print on this machine.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common.config import DEFAULT_CONFIG, load_config  # noqa: E402
from common.data.examples import format_prompt  # noqa: E402
from common.reproducibility import apply_compute_settings  # noqa: E402
from common.tiny_world.build import build_embedded_models, build_student_plus  # noqa: E402
from common.tiny_world.style import STUDENT_PLUS_LADDER  # noqa: E402
from common.tiny_world.suite import embedded_suite  # noqa: E402


def measure(model_dir: Path, rows: list[dict[str, str]], cfg) -> dict[str, float]:  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from student_worker.evaluate import greedy_generate

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = [format_prompt(r["instruction"], r["context"], cfg.data) for r in rows]
    preds = greedy_generate(model, tok, prompts, cfg.evaluation.max_new_tokens, cfg.evaluation.batch_size)
    hits: dict[str, list[bool]] = defaultdict(list)
    for p, r in zip(preds, rows):
        hits[r["family"]].append(p == r["terse"])
    n = len(preds)
    out = {"exact terse": sum(p == r["terse"] for p, r in zip(preds, rows)) / n,
           "ends ' .'": sum(p.endswith(" .") for p in preds) / n,
           "mean words": sum(len(p.split()) for p in preds) / n}
    out.update({f: sum(h) / len(h) for f, h in sorted(hits.items())})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default=",".join(map(str, STUDENT_PLUS_LADDER)))
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    apply_compute_settings(cfg.reproducibility, where="student_plus_ladder")
    rows = embedded_suite(cfg.embedded)["validation"]
    table = {"student base (0 steps)": measure(build_embedded_models(cfg.embedded)["student"], rows, cfg)}
    print(table, flush=True)
    for steps in [int(s) for s in args.steps.split(",")]:
        table[f"S0+ {steps} steps"] = measure(build_student_plus(cfg.embedded, steps), rows, cfg)
        print(steps, table[f"S0+ {steps} steps"], flush=True)
    keys = list(next(iter(table.values())))
    md = [f"# S0+ ladder: exact terse answers on the validation split ({len(rows)} examples, greedy, "
          f"{cfg.evaluation.max_new_tokens} new tokens)", "",
          "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    md += [f"| {m} | " + " | ".join(f"{v[k]:.3f}" for k in keys) + " |" for m, v in table.items()]
    text = "\n".join(md) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
