"""On-policy pieces without Ray (student_worker/on_policy.py): the per-step choice, the prompts, sampling with
a tiny real Llama (seeded, no other RNG stream moved, the distribution exactly softmax(logits / T) cut to
top_p), the batch built from samples, the counts, the checkpointed samples, the driver's schedule, and the
worker's sample call (order check, its time as the step's `sample_s`)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ConfigError, OnPolicyConfig, config_from_dict
from common.data.batching import IGNORE_INDEX, TokenizedExample
from common.data.examples import DataError
from student_worker import checkpoint as ckpt
from student_worker.on_policy import (
    OnPolicyError,
    SampleSchedule,
    generate_samples,
    generation_eos_ids,
    is_on_policy_step,
    load_samples,
    on_policy_prompts,
    sample_seed,
    sample_stats,
    sampled_batch,
    samples_from_generated,
    save_samples,
    student_eos_ids,
)
from tests.tiny import make_llama, make_tokenizer

BASE = {"models": {"base_teacher": {"path": "b"}, "sft_teacher": {"path": "s"}, "student": {"path": "st"}}}


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("onpolicy")
    return make_llama(root / "student", make_tokenizer(root / "tok"), seed=1)


@pytest.fixture(scope="module")
def lm(student: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(student)).float()


def test_config_keys_and_their_errors() -> None:
    op = config_from_dict(BASE).training.on_policy
    assert op.fraction == 0 and not op.enabled and op.lag == 0
    for bad, match in (("training.on_policy.fraction=1.5", "training.on_policy.fraction"),
                       ("training.on_policy.fraction=-0.1", "training.on_policy.fraction"),
                       ("training.on_policy.lag=2", "training.on_policy.lag"),
                       ("training.on_policy.top_p=0", "training.on_policy.top_p")):
        with pytest.raises(ConfigError, match=match):
            config_from_dict(BASE, [bad])
    with pytest.raises(ConfigError, match=r"temperature=0.0 with fraction=0.5: sampling needs a temperature > 0"):
        config_from_dict(BASE, ["training.on_policy.fraction=0.5", "training.on_policy.temperature=0"])
    config_from_dict(BASE, ["training.on_policy.temperature=0"])  # no sampling, no error
    with pytest.raises(ConfigError, match="loss.method 'sft' has none"):
        config_from_dict(BASE, ["training.on_policy.fraction=1", "loss.method=sft"])
    with pytest.raises(ConfigError, match="max_new_tokens=256 leaves no room for a prompt in data.max_length=256"):
        config_from_dict(BASE, ["training.on_policy.fraction=1", "training.on_policy.max_new_tokens=256"])


def test_the_choice_per_step_is_seeded_and_follows_the_fraction() -> None:
    steps = range(400)
    assert not any(is_on_policy_step(OnPolicyConfig(fraction=0), 0, s) for s in steps)
    assert all(is_on_policy_step(OnPolicyConfig(fraction=1), 0, s) for s in steps)
    half = OnPolicyConfig(fraction=0.5)
    picks = [is_on_policy_step(half, 0, s) for s in steps]
    assert picks == [is_on_policy_step(half, 0, s) for s in steps]  # deterministic
    assert 160 < sum(picks) < 240  # binomial(400, 0.5): 4 standard deviations either side
    assert picks != [is_on_policy_step(half, 1, s) for s in steps]  # another seed, other steps
    assert sample_seed(0, 3) == sample_seed(0, 3) != sample_seed(0, 4) != sample_seed(1, 3)


def test_prompts_are_cut_to_their_end_or_refused_by_name() -> None:
    examples = [TokenizedExample([2, 5, 6, 7, 8, 9, 3], prompt_len=5), TokenizedExample([2, 5, 9, 3], prompt_len=2)]
    assert on_policy_prompts(examples, 8, "truncate", 2) == [[2, 5, 6, 7, 8], [2, 5]]
    assert on_policy_prompts(examples, 3, "truncate", 2) == [[2, 7, 8], [2, 5]]  # BOS kept, then the last tokens
    assert on_policy_prompts(examples, 3, "truncate", None) == [[6, 7, 8], [2, 5]]
    with pytest.raises(DataError, match=r"example 0: its prompt is 5 tokens, over data.max_length - "
                                        r"training.on_policy.max_new_tokens = 3 \(data.overlong=reject\)"):
        on_policy_prompts(examples, 3, "reject", 2)


def test_eos_ids_come_from_the_generation_config(student: Path, tmp_path: Path) -> None:
    assert student_eos_ids(str(student)) == [3]
    assert generation_eos_ids(type("G", (), {"eos_token_id": [3, 4]})(), "m") == [3, 4]
    gen = json.loads((student / "generation_config.json").read_text())
    gen.pop("eos_token_id")
    broken = tmp_path / "no_eos"
    broken.mkdir()
    for f in student.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "generation_config.json").write_text(json.dumps(gen))
    with pytest.raises(OnPolicyError, match=f"student {broken}: its generation config has no eos_token_id"):
        student_eos_ids(str(broken))


def test_sample_rows_end_at_the_first_eos_or_at_the_cap() -> None:
    new = torch.tensor([[5, 3, 7, 3], [3, 8, 8, 8], [5, 6, 7, 8], [5, 6, 4, 0]])
    got = samples_from_generated(new, eos_ids=[3, 4], pad_id=0)
    assert got["lengths"].tolist() == [2, 1, 4, 3]
    assert got["eos"].tolist() == [True, True, False, True]
    assert got["tokens"].tolist() == [[5, 3, 0, 0], [3, 0, 0, 0], [5, 6, 7, 8], [5, 6, 4, 0]]
    assert sample_stats([got]) == {"on_policy": 1, "sampled_sequences": 4, "sampled_tokens": 10, "sampled_eos": 3,
                                   "sampled_truncated": 1, "sampled_empty": 1}
    assert set(sample_stats(None).values()) == {0}


def _gen(lm, prompts, seed: int, **kw):
    args = dict(eos_ids=[3], pad_id=0, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=seed)
    args.update(kw)
    return generate_samples(lm, prompts, **args)


def test_sampling_is_seeded_and_leaves_every_other_rng_stream_alone(lm) -> None:
    prompts = [[2, 10, 11, 12], [2, 13], [2, 14, 15]]
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    a = _gen(lm, prompts, seed=11)
    after = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    b = _gen(lm, prompts, seed=11)
    for key in ("tokens", "lengths", "eos"):
        assert np.array_equal(a[key], b[key])
    c = _gen(lm, prompts, seed=12)
    assert not np.array_equal(a["tokens"], c["tokens"])
    assert a["tokens"].shape[0] == 3 and (a["lengths"] >= 1).all() and (a["lengths"] <= 6).all()
    lm.train()  # the model's mode is restored after sampling (which runs in eval mode)
    _gen(lm, prompts, seed=1)
    assert lm.training
    lm.eval()


def test_the_sampling_distribution_is_softmax_over_temperature_cut_to_top_p_and_nothing_else(lm) -> None:
    """The model's own generation defaults (top_k=50 in transformers' global defaults) are not applied: at a
    high temperature the first token's empirical frequencies match softmax(logits / T) over the whole
    vocabulary (~70 tokens, more than 50), and with top_p only the nucleus appears."""
    prompt = [2, 10, 11]
    n = 3000
    with torch.no_grad():
        logits = lm(input_ids=torch.tensor([prompt])).logits[0, -1].float()
    temperature = 4.0
    probs = torch.softmax(logits / temperature, dim=-1).numpy()
    got = _gen(lm, [prompt] * n, seed=3, temperature=temperature, max_new_tokens=1, eos_ids=[10_000])
    counts = np.bincount(got["tokens"][:, 0], minlength=probs.size) / n
    assert (counts[probs < 1e-9] == 0).all()
    assert np.abs(counts - probs).max() < 5 * np.sqrt(probs.max() / n)  # 5 sigma of the largest cell
    assert (counts > 0).sum() > 50  # more distinct tokens than a top-k of 50 would allow
    top_p = 0.5
    order = np.argsort(-probs)
    nucleus = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)]
    cut = _gen(lm, [prompt] * 500, seed=4, temperature=temperature, top_p=top_p, max_new_tokens=1, eos_ids=[10_000])
    assert set(cut["tokens"][:, 0].tolist()) <= set(nucleus.tolist())


def test_the_batch_of_a_sample_trains_on_exactly_the_sampled_tokens() -> None:
    prompts = [[2, 5, 6], [2, 7]]
    sample = {"tokens": np.array([[8, 9, 3], [3, 0, 0]], dtype=np.int32), "lengths": np.array([3, 1], dtype=np.int32),
              "eos": np.array([True, True])}
    a = sampled_batch(prompts, sample, pad_id=0)
    assert a["input_ids"].tolist() == [[2, 5, 6, 8, 9, 3], [2, 7, 3, 0, 0, 0]]
    assert a["labels"][0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 8, 9, 3, IGNORE_INDEX]
    assert a["labels"][1].tolist() == [IGNORE_INDEX, 3] + [IGNORE_INDEX] * 4
    assert int(a["loss_mask"].sum()) == 4


def test_checkpointed_samples_round_trip_and_a_wrong_file_is_named(tmp_path: Path) -> None:
    samples = [{"tokens": np.array([[4, 3]], dtype=np.int32), "lengths": np.array([2], dtype=np.int32),
                "eos": np.array([True])} for _ in range(2)]
    save_samples(tmp_path, 5, samples)
    back = load_samples(tmp_path, 5, 2)
    assert all(np.array_equal(b[k], s[k]) for b, s in zip(back, samples) for k in s)
    with pytest.raises(ckpt.CheckpointError, match="holds the samples of step 5 for 2 ranks; expected step 6"):
        load_samples(tmp_path, 6, 2)
    with pytest.raises(ckpt.CheckpointError, match="missing; a checkpoint of a training.on_policy.lag=1 run"):
        load_samples(tmp_path / "nope", 5, 2)


def test_the_schedule_asks_for_each_sample_once_in_order_and_restarts_from_a_checkpoint() -> None:
    mixed = SampleSchedule(OnPolicyConfig(fraction=0.5, lag=1), seed=0, max_steps=12)
    on = [s for s in range(12) if mixed.on_policy(s)]
    assert 0 < len(on) < 12
    asked = mixed.to_request(3) + mixed.to_request(3) + mixed.to_request(20)
    assert asked == on  # each on-policy step once, in order, none past max_steps
    full = SampleSchedule(OnPolicyConfig(fraction=1, lag=1), seed=0, max_steps=10)
    assert full.needs_stored(4) and not full.needs_stored(0) and not full.needs_stored(10)
    full.restart(4, stored=[{"lengths": np.array([1])}])
    assert full.to_request(5) == [5] and 4 in full.results
    assert not SampleSchedule(OnPolicyConfig(fraction=1, lag=0), 0, 10).needs_stored(4)


def test_the_worker_draws_in_order_and_books_the_time_as_sample_s(student: Path, tmp_path: Path) -> None:
    from student_worker.worker import STEP_PARTS, StepOrderError, StudentWorkerImpl
    from tests.unit.test_worker_steps import _batch

    spec = {"path": str(student)}
    cfg = config_from_dict({"models": {"base_teacher": spec, "sft_teacher": spec, "student": spec},
                            "loss": {"method": "sft"}, "output": {"dir": str(tmp_path)}})
    worker = StudentWorkerImpl(cfg.model_dump(mode="json"), rank=0, world_size=1)
    worker.setup(worker.rendezvous_address())
    # the step itself is sft (no teacher here): only the sample call's protocol is under test
    op = OnPolicyConfig(fraction=1, lag=1, max_new_tokens=4)
    worker.cfg = worker.cfg.model_copy(update={"training": worker.cfg.training.model_copy(update={"on_policy": op})})
    worker.eos_ids, worker.pad_id = [3], 0
    batch = _batch()
    tokens = int(batch["loss_mask"].sum())
    with pytest.raises(StepOrderError, match="the sample of step 2 .* after 0 completed steps"):
        worker.sample(2, 2, [[2, 10]])
    first = worker.sample(1, 1, [[2, 10], [2, 11, 12]])  # lag 1: step 1's sample before step 0 trains
    assert first["batch_id"] == 1 and first["tokens"].shape[0] == 2
    row = worker.train_step(0, batch, tokens)
    parts = row["step_parts"]
    assert list(parts) == list(STEP_PARTS) and parts["sample_s"] > 0
    assert sum(parts.values()) == pytest.approx(row["step_s"], rel=1e-12, abs=1e-12)
    row = worker.train_step(1, batch, tokens)
    assert row["step_parts"]["sample_s"] == 0
