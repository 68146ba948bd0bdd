"""The --methods variant syntax (student_worker/research/variants.py) and how the experiment turns variants into run
configs (student_worker.research.experiment.variant_configs)."""

from __future__ import annotations

import re

import pytest

from common.config import LOSS_METHODS, ConfigError, config_from_dict
from student_worker.research.variants import (
    KEY_ALIASES,
    Variant,
    VariantError,
    parse_methods,
    parse_variant,
    resolve_key,
    split_entries,
)
from tests.unit.test_config import MINIMAL


def test_plain_methods_are_variants_without_overrides():
    got = parse_methods("sft, kd,delta_kd", LOSS_METHODS)
    assert [v.label for v in got] == ["sft", "kd", "delta_kd"]
    assert got[2] == Variant(label="delta_kd", method="delta_kd", overrides=("loss.method=delta_kd",))
    assert got[2].settings == () and got[2].slug == "delta_kd"  # old run directories keep their names


def test_a_variant_keeps_the_commas_of_its_own_keys():
    text = "kd,delta_kd@alpha=0.5,tau=2,sft,delta_kd@tail=student_base,parallelogram@weights.kd=0.3,weights.delta_kd=0.7"
    assert split_entries(text) == ["kd", "delta_kd@alpha=0.5,tau=2", "sft", "delta_kd@tail=student_base",
                                   "parallelogram@weights.kd=0.3,weights.delta_kd=0.7"]
    got = parse_methods(text, LOSS_METHODS)
    assert [v.label for v in got] == ["kd", "delta_kd@alpha=0.5,tau=2", "sft", "delta_kd@tail=student_base",
                                      "parallelogram@weights.kd=0.3,weights.delta_kd=0.7"]
    assert got[1].overrides == ("loss.method=delta_kd", "loss.alpha=0.5", "loss.tau=2")
    assert got[1].settings == ("loss.alpha=0.5", "loss.tau=2")
    assert got[4].overrides == ("loss.method=parallelogram", "loss.weights.kd=0.3", "loss.weights.delta_kd=0.7")
    assert got[1].slug == "delta_kd+alpha=0.5+tau=2"


def test_spaces_are_dropped_from_the_label_and_full_keys_pass_through():
    v = parse_variant(" delta_kd @ loss.alpha = 1.5 , training.lr=5e-4 ", LOSS_METHODS)
    assert v.label == "delta_kd@loss.alpha=1.5,training.lr=5e-4"
    assert v.overrides == ("loss.method=delta_kd", "loss.alpha=1.5", "training.lr=5e-4")


def test_aliases_resolve_to_loss_and_training_keys():
    assert resolve_key("alpha") == "loss.alpha" and resolve_key("steps") == "training.max_steps"
    assert resolve_key("weights.kd") == "loss.weights.kd"
    assert all(v.partition(".")[0] in ("loss", "training") for v in KEY_ALIASES.values())


@pytest.mark.parametrize("text, match", [
    ("delta_kdd", "unknown method 'delta_kdd' \\(did you mean 'delta_kd'\\?\\)"),
    ("delta_kd@", "nothing after '@'"),
    ("delta_kd@alpha", "'alpha' is not key=value"),
    ("delta_kd@alpha=", "'alpha=' is not key=value"),
    ("delta_kd@alpah=0.5", "unknown key 'alpah' \\(did you mean 'alpha'\\?\\)"),
    ("delta_kd@alpha=0.5,loss.alpha=1", "loss.alpha is set twice \\('alpha' and 'loss.alpha'\\)"),
    ("kd@seed=3", "'seed' is set by the experiment"),
    ("kd@method=sft", "'method' is set by the experiment"),
    ("kd@loss.method=sft", "loss.method is set by the experiment"),
    ("kd@teachers.num_cpus=1", "a variant may change loss.\\*, training.\\* only"),
    ("kd@data.max_eval_examples=10", "a variant may change"),
    ("kd@a..b=1", "malformed key 'a..b'"),
    ("1kd", "bad method name '1kd'"),
])
def test_bad_entries_are_named(text, match):
    with pytest.raises(VariantError, match=match):
        parse_methods(text, LOSS_METHODS)


@pytest.mark.parametrize("text, match", [
    ("", "--methods is empty"),
    ("kd,,sft", "an empty entry"),
    ("alpha=0.5,kd", "'alpha=0.5' follows no method@ entry"),
    ("kd,tau=2", "'tau=2' follows no method@ entry"),
    ("kd,kd", "'kd' more than once"),
    ("kd@tau=2, kd@ tau=2", "'kd@tau=2' more than once"),
])
def test_bad_lists_are_named(text, match):
    with pytest.raises(VariantError, match=match):
        parse_methods(text, LOSS_METHODS)


def test_variant_configs_apply_overrides_and_refuse_bad_values_and_duplicate_runs():
    from student_worker.research.experiment import run_key, variant_configs

    cfg = config_from_dict({**MINIMAL, "loss": {"method": "delta_kd", "alpha": 1.0}})
    got = variant_configs(cfg, parse_methods("kd,delta_kd@alpha=0.5,tau=2,kd@tau=2,delta_kd@tail=student_base"))
    assert got["kd"].loss.method == "kd" and got["kd"].loss.tau == 1.0
    assert (got["delta_kd@alpha=0.5,tau=2"].loss.alpha, got["delta_kd@alpha=0.5,tau=2"].loss.tau) == (0.5, 2.0)
    assert got["kd@tau=2"].loss.method == "kd" and got["kd@tau=2"].loss.tau == 2.0
    assert got["delta_kd@tail=student_base"].loss.tail == "student_base"
    assert len({run_key(c) for c in got.values()}) == 4
    with pytest.raises(ConfigError, match="'delta_kd' and 'delta_kd@alpha=1' make the same runs"):
        variant_configs(cfg, parse_methods("delta_kd,delta_kd@alpha=1"))
    with pytest.raises(ConfigError, match="(?s)entry 'delta_kd@tau=-1'.*loss.tau"):
        variant_configs(cfg, parse_methods("delta_kd@tau=-1"))
    with pytest.raises(ConfigError, match="(?s)entry 'kd@tail=student_base'.*student_base"):
        variant_configs(cfg, parse_methods("kd@tail=student_base"))
    with pytest.raises(ConfigError, match="(?s)entry 'kd@training.nope=1'.*unknown key 'training.nope'"):
        variant_configs(cfg, parse_methods("kd@training.nope=1"))


def test_outputs_name_variants_in_aligned_tables_and_plots(tmp_path):
    from student_worker.research.outputs import (
        aggregate,
        comparison,
        comparison_lines,
        experiment_markdown,
        experiment_table,
        plot_experiment,
        plot_rouge_l_ci,
    )

    def run(method: str, seed: int, shift: float) -> dict:
        per = [min(1.0, x + shift) for x in (0.2, 0.5, 0.8, 0.4)]
        after = {k: sum(per) / 4 for k in ("rougeL", "rouge1", "rouge2")}
        after["per_example"] = {"rougeL": per}
        return {"method": method, "seed": seed, "report": {"rouge": {"student_after": after}}, "diagnostics": {}}

    labels = ["kd", "delta_kd", "delta_kd@tail=student_base", "delta_kd@alpha=0.5,tau=2"]
    runs = [run(m, s, 0.01 * i + 0.003 * s) for s in (0, 1) for i, m in enumerate(labels)]
    ref = {"rougeL": 0.1, "rouge1": 0.1, "rouge2": 0.0, "per_example": {"rougeL": [0.1, 0.1, 0.1, 0.1]}}
    exp = {"runs": runs, "aggregates": aggregate(runs), "references": {"student_base": ref, "sft_teacher": ref},
           "seeds": [0, 1], "budget": {"max_steps": 3}, "command": "c", "git": None, "shared_config_hash": "h",
           "loss": {}, "eval_examples": 4}
    exp["comparison"] = comparison(exp, "kd", replicates=200)
    table = experiment_table(exp).splitlines()
    assert table[-1].startswith("student delta_kd@alpha=0.5,tau=2 ")
    assert len({line.index("±") for line in table[3:]}) == 1  # the columns line up however long the names
    assert len({re.search(r" \d\.\d{4}", line).start() for line in table[1:]}) == 1
    lines = comparison_lines(exp["comparison"])
    assert any(line.startswith("  delta_kd@alpha=0.5,tau=2 - kd = +0.0300") for line in lines)
    starts = {line.index(" 0.") for line in lines[1:7]}
    assert len(starts) == 1, lines  # the means line up however long the names
    assert "delta_kd@tail=student_base" in experiment_markdown(exp)
    plot_experiment(exp, tmp_path / "a.png")
    plot_rouge_l_ci(exp, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes()[:4] == (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_on_policy_variants_set_the_on_policy_keys():
    text = "sft,kd,delta_kd,delta_kd@on_policy=0.5,delta_kd@on_policy=1,kd@on_policy=1,lag=1,objective=sampled_token"
    got = parse_methods(text, LOSS_METHODS)
    assert [v.label for v in got][3:] == ["delta_kd@on_policy=0.5", "delta_kd@on_policy=1",
                                          "kd@on_policy=1,lag=1,objective=sampled_token"]
    assert got[5].settings == ("training.on_policy.fraction=1", "training.on_policy.lag=1", "loss.objective=sampled_token")
    assert got[5].slug == "kd+on_policy=1+lag=1+objective=sampled_token"
    v = parse_variant("delta_kd@on_policy=1,temperature=0.7,top_p=0.9,max_new_tokens=16", LOSS_METHODS)
    assert v.settings == ("training.on_policy.fraction=1", "training.on_policy.temperature=0.7",
                          "training.on_policy.top_p=0.9", "training.on_policy.max_new_tokens=16")
    with pytest.raises(VariantError, match="training.on_policy.fraction is set twice"):
        parse_variant("kd@on_policy=1,training.on_policy.fraction=0.5", LOSS_METHODS)


def test_on_policy_variant_configs_validate_their_values():
    from student_worker.research.experiment import run_key, variant_configs

    cfg = config_from_dict(MINIMAL)
    got = variant_configs(cfg, parse_methods("delta_kd,delta_kd@on_policy=0.5,delta_kd@on_policy=1,lag=1,"
                                             "kd@on_policy=1,objective=sampled_token"))
    assert got["delta_kd"].training.on_policy.fraction == 0
    assert got["delta_kd@on_policy=0.5"].training.on_policy.fraction == 0.5
    lag1 = got["delta_kd@on_policy=1,lag=1"].training.on_policy
    assert (lag1.fraction, lag1.lag) == (1.0, 1)
    kd = got["kd@on_policy=1,objective=sampled_token"]
    assert kd.loss.method == "kd" and kd.loss.objective == "sampled_token" and kd.training.on_policy.enabled
    assert len({run_key(c) for c in got.values()}) == 4
    for text, match in [("delta_kd@on_policy=1.5", "(?s)entry 'delta_kd@on_policy=1.5'.*training.on_policy.fraction"),
                        ("kd@on_policy=1,temperature=0", "(?s)entry 'kd@on_policy=1,temperature=0'.*temperature > 0"),
                        ("sft@on_policy=1", "(?s)entry 'sft@on_policy=1'.*loss.method 'sft'"),
                        ("kd@on_policy=1,lag=2", "(?s)entry 'kd@on_policy=1,lag=2'.*training.on_policy.lag")]:
        with pytest.raises(ConfigError, match=match):
            variant_configs(cfg, parse_methods(text))


def test_issue_23_variants_the_label_term_and_the_paper_axis():
    """kd and delta_kd with lam in {0, 0.5}, the paper-axis sweep, and the first form as a variant."""
    from student_worker.research.experiment import run_key, variant_configs

    text = ("kd,kd@lam=0.5,delta_kd,delta_kd@lam=0.5,delta_kd@alpha=0.25,delta_kd@alpha=0.5,delta_kd@alpha=0.75,"
            "delta_kd@alpha=0.5,delta_form=student_shift")
    got = parse_methods(text, LOSS_METHODS)
    assert [v.label for v in got][-1] == "delta_kd@alpha=0.5,delta_form=student_shift"
    assert got[-1].settings == ("loss.alpha=0.5", "loss.delta_form=student_shift")
    assert resolve_key("delta_form") == "loss.delta_form"
    cfgs = variant_configs(config_from_dict(MINIMAL), got)
    assert cfgs["kd@lam=0.5"].loss.lam == 0.5 and cfgs["kd@lam=0.5"].loss.method == "kd"
    assert cfgs["delta_kd@alpha=0.25"].loss.alpha == 0.25 and cfgs["delta_kd@alpha=0.25"].loss.delta_form == "paper"
    assert cfgs["delta_kd@alpha=0.5,delta_form=student_shift"].loss.delta_form == "student_shift"
    assert len({run_key(c) for c in cfgs.values()}) == len(got)
    with pytest.raises(ConfigError, match="(?s)entry 'delta_kd@delta_form=paper_form'.*delta_form"):
        variant_configs(config_from_dict(MINIMAL), parse_methods("delta_kd@delta_form=paper_form"))


def test_runs_saved_before_delta_form_read_as_the_form_they_ran():
    """A saved config without loss.delta_form ran student_shift: where that changes the loss (alpha != 1,
    extra pairs) it is not the paper-form run a plan makes now; elsewhere it is (the same computation)."""
    from student_worker.research.experiment import run_key, saved_run_config

    def raw(loss, **models):
        return {**MINIMAL, "models": {**MINIMAL["models"], **models}, "loss": loss}

    old = saved_run_config(raw({"method": "delta_kd", "alpha": 0.5}), "old")
    assert old.loss.delta_form == "student_shift"
    assert run_key(old) != run_key(config_from_dict(raw({"method": "delta_kd", "alpha": 0.5})))
    for loss in ({"method": "delta_kd", "alpha": 1.0}, {"method": "kd", "alpha": 0.5}, {"method": "sft"}):
        same = saved_run_config(raw(loss), "old")
        assert same.loss.delta_form == "paper" and run_key(same) == run_key(config_from_dict(raw(loss)))
    pair = [{"base": {"path": "b1"}, "sft": {"path": "s1"}, "alpha": 0.5}]
    assert saved_run_config(raw({"method": "delta_kd"}, extra_pairs=pair), "old").loss.delta_form == "student_shift"
    new = saved_run_config(raw({"method": "delta_kd", "alpha": 0.5, "delta_form": "paper"}), "new")
    assert new.loss.delta_form == "paper"
