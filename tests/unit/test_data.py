"""The student's data loader: sources, errors that name the culprit, tokenisation, collate, BatchPlan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.config import ColumnsConfig, DataConfig, EmbeddedConfig
from common.data.batching import (
    BatchPlan,
    DataError,
    TokenizedExample,
    collate,
    encode_prompt,
    load_examples,
    padding_stats,
    tokenize_examples,
)
from common.tiny_world.suite import generate_instruction_suite
from tests.tiny import make_tokenizer

ECFG = EmbeddedConfig(num_train=50, num_val=10, num_test=20)
DOLLY = [
    {"instruction": "sort the numbers : 3 1 2", "context": "", "response": "1 2 3"},
    {"instruction": "reverse the words", "context": "red green blue", "response": "blue green red"},
    {"instruction": "answer", "context": None, "response": "one"},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path_factory.mktemp("tok"), "### Instruction: Response: Input:")))


def _write_jsonl(path: Path, rows: list, bad_line: str | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if bad_line is not None:
        lines.insert(1, bad_line)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_embedded_train_and_eval() -> None:
    cfg = DataConfig(max_eval_examples=7)
    train = load_examples(cfg, "train", ECFG)
    test = load_examples(cfg, "eval", ECFG)
    suite = generate_instruction_suite(ECFG.seed, ECFG.num_train, ECFG.num_val, ECFG.num_test)
    assert len(train) == 50 and len(test) == 7
    assert [e["response"] for e in test] == [r["response"] for r in suite["test"][:7]]
    first = suite["train"][0]
    block = f"### Input:\n{first['context']}\n" if first["context"] else ""
    assert train[0]["prompt"] == f"### Instruction:\n{first['instruction']}\n{block}### Response:\n"
    capped = load_examples(DataConfig(max_train_examples=5), "train", ECFG)
    assert capped == train[:5]


def test_local_jsonl_with_dolly_columns(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", DOLLY)
    ex = load_examples(DataConfig(train=str(path)), "train", ECFG)
    assert [e["response"] for e in ex] == ["1 2 3", "blue green red", "one"]
    assert ex[0]["prompt"] == "### Instruction:\nsort the numbers : 3 1 2\n### Response:\n"
    assert ex[1]["prompt"] == "### Instruction:\nreverse the words\n### Input:\nred green blue\n### Response:\n"


def test_json_and_parquet_with_custom_columns(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"q": r["instruction"], "a": r["response"]} for r in DOLLY]
    cfg_cols = ColumnsConfig(instruction="q", response="a", context=None)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for name in ("d.parquet", "d.json"):
        ex = load_examples(DataConfig(eval=str(tmp_path / name), columns=cfg_cols), "eval", ECFG)
        assert [e["response"] for e in ex] == ["1 2 3", "blue green red", "one"], name
        assert "### Input" not in ex[1]["prompt"]


def test_malformed_jsonl_row_names_file_and_line(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", DOLLY, bad_line='{"instruction": "x", ')
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON"):
        load_examples(DataConfig(train=str(path)), "train", ECFG)


def test_missing_column_and_empty_fields(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError) as err:
        load_examples(DataConfig(train=str(path)), "train", ECFG)
    msg = str(err.value)
    assert "'response'" in msg and str(path) in msg and "['instruction', 'output']" in msg
    path = _write_jsonl(tmp_path / "e.jsonl", [DOLLY[0], {"instruction": "a", "response": "  "}])
    with pytest.raises(DataError, match=rf"{path}: row 1 has an empty .*'response'"):
        load_examples(DataConfig(train=str(path)), "train", ECFG)
    with pytest.raises(DataError, match="not found"):
        load_examples(DataConfig(train=str(tmp_path / "nope.jsonl")), "train", ECFG)


def test_tokenize_layout_truncate_and_reject(tokenizer) -> None:
    ex = [{"prompt": "### Instruction:\nsort the numbers\n### Response:\n", "response": "one two three"}]
    (tok,) = tokenize_examples(ex, tokenizer, DataConfig())
    prompt_ids = encode_prompt(ex[0]["prompt"], tokenizer)
    assert prompt_ids[0] == tokenizer.bos_token_id and tok.prompt_len == len(prompt_ids)
    assert tok.input_ids[: tok.prompt_len] == prompt_ids
    assert tok.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(tok.input_ids[tok.prompt_len : -1]) == "one two three"

    n = len(tok.input_ids)
    (cut,) = tokenize_examples(ex, tokenizer, DataConfig(max_length=tok.prompt_len + 1))
    assert cut.input_ids == tok.input_ids[: tok.prompt_len + 1]
    with pytest.raises(DataError, match="leave no response token"):
        tokenize_examples(ex, tokenizer, DataConfig(max_length=tok.prompt_len))
    with pytest.raises(DataError, match=rf"example 1 is {n} tokens long"):
        tokenize_examples([{"prompt": "sort", "response": "one"}, ex[0]], tokenizer, DataConfig(max_length=n - 1, overlong="reject"))
    assert tokenize_examples(ex, tokenizer, DataConfig(max_length=n, overlong="reject"))[0] == tok


def test_collate_follows_the_position_convention() -> None:
    a = TokenizedExample(input_ids=[1, 10, 11, 20, 21, 3], prompt_len=3)  # response 20 21 eos
    b = TokenizedExample(input_ids=[1, 12, 22, 3], prompt_len=2)  # response 22 eos
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].dtype == np.int32 and batch["labels"].dtype == np.int64
    np.testing.assert_array_equal(batch["input_ids"], [[1, 10, 11, 20, 21, 3], [1, 12, 22, 3, 0, 0]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    # Position t predicts token t+1: labels start at prompt_len - 1 and end one before the last token.
    np.testing.assert_array_equal(batch["labels"], [[-100, -100, 20, 21, 3, -100], [-100, 22, 3, -100, -100, -100]])
    np.testing.assert_array_equal(batch["loss_mask"], batch["labels"] != -100)
    assert batch["loss_mask"].dtype == bool
    # Every labelled position's label is the next input token.
    ids, lab = batch["input_ids"], batch["labels"]
    bi, ti = np.nonzero(batch["loss_mask"])
    np.testing.assert_array_equal(lab[bi, ti], ids[bi, ti + 1])


def test_batch_plan_is_deterministic_split_by_rank_and_reshuffles() -> None:
    plan = BatchPlan(num_examples=50, global_batch_size=8, num_workers=2, seed=7, shuffle=True)
    assert plan.steps_per_epoch == 6
    again = BatchPlan(num_examples=50, global_batch_size=8, num_workers=2, seed=7, shuffle=True)
    assert [plan.step_indices(s) for s in range(20)] == [again.step_indices(s) for s in range(20)]
    ranks = plan.step_indices(3)
    assert len(ranks) == 2 and all(len(r) == 4 for r in ranks)
    epoch0 = [i for s in range(6) for r in plan.step_indices(s) for i in r]
    epoch1 = [i for s in range(6, 12) for r in plan.step_indices(s) for i in r]
    assert len(set(epoch0)) == 48 and len(set(epoch1)) == 48  # no repeats within an epoch; 2 dropped
    assert epoch0 != epoch1  # a new permutation each epoch
    # A single-worker plan sees the same global batch concatenated: ranks only split it.
    solo = BatchPlan(num_examples=50, global_batch_size=8, num_workers=1, seed=7)
    assert solo.step_indices(9) == [sum(plan.step_indices(9), [])]
    assert BatchPlan(50, 8, seed=8).step_indices(0) != solo.step_indices(0)
    ordered = BatchPlan(num_examples=10, global_batch_size=4, shuffle=False)
    assert ordered.step_indices(0) == [[0, 1, 2, 3]] and ordered.step_indices(2) == [[0, 1, 2, 3]]
    with pytest.raises(DataError, match="multiple of 3"):
        BatchPlan(50, 8, num_workers=3)
    with pytest.raises(DataError, match="cannot fill"):
        BatchPlan(5, 8)


def _bucket_plan(lengths: list[int], buckets: int, **kw) -> BatchPlan:
    return BatchPlan(num_examples=len(lengths), global_batch_size=kw.pop("g", 8), num_workers=kw.pop("w", 2),
                     seed=kw.pop("seed", 3), length_buckets=buckets, lengths=tuple(lengths), **kw)


def test_length_buckets_are_deterministic_cover_each_epoch_and_group_lengths() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=203).tolist()
    plan = _bucket_plan(lengths, 5)
    steps = plan.steps_per_epoch
    assert steps == 25
    # A pure function of the step: a fresh plan (a resumed run) gives every step the same batches, in any
    # order of asking (a resume starts mid-epoch).
    again = _bucket_plan(lengths, 5)
    asked = list(range(3 * steps))
    assert [again.step_indices(s) for s in reversed(asked)][::-1] == [plan.step_indices(s) for s in asked]
    for epoch in range(3):
        used = [i for s in range(epoch * steps, (epoch + 1) * steps) for r in plan.step_indices(s) for i in r]
        # every kept example exactly once, and the same examples as without buckets (the dropped tail too)
        plain = BatchPlan(len(lengths), 8, 2, seed=3)
        plain_used = [i for s in range(epoch * steps, (epoch + 1) * steps) for r in plain.step_indices(s)
                      for i in r]
        assert len(used) == len(set(used)) == steps * 8 and sorted(used) == sorted(plain_used)
    # similar lengths together: the spread inside a batch is far below the plain shuffle's
    def spread(p: BatchPlan) -> float:
        return float(np.mean([np.ptp([lengths[i] for r in p.step_indices(s) for i in r]) for s in range(steps)]))

    assert spread(plan) < 0.4 * spread(BatchPlan(len(lengths), 8, 2, seed=3))
    assert spread(_bucket_plan(lengths, steps)) <= spread(plan)  # one bucket per batch: the whole epoch sorted
    # batches in a seeded random order (not sorted by length), a new order each epoch and seed
    first_len = [max(lengths[i] for r in plan.step_indices(s) for i in r) for s in range(steps)]
    assert first_len != sorted(first_len)
    assert plan.step_indices(0) != plan.step_indices(steps)
    assert _bucket_plan(lengths, 5, seed=4).step_indices(0) != plan.step_indices(0)


def test_length_buckets_padding_and_errors() -> None:
    rng = np.random.default_rng(1)
    examples = [TokenizedExample(input_ids=list(range(int(n))), prompt_len=int(p))
                for n, p in zip(rng.integers(10, 120, size=64), rng.integers(2, 9, size=64))]
    lengths = [len(e.input_ids) for e in examples]
    plain = padding_stats(BatchPlan(64, 8, 2, seed=0), examples, 8)
    bucketed = padding_stats(_bucket_plan(lengths, 4, seed=0), examples, 8)
    assert plain["real_tokens"] == bucketed["real_tokens"] == sum(lengths)  # one whole epoch each
    assert bucketed["padding_fraction"] < 0.5 * plain["padding_fraction"]
    assert 0 < plain["counted_fraction"] < 1 - plain["padding_fraction"]
    # shuffle off: no randomness at all, buckets in length order
    ordered = _bucket_plan(lengths, 2, seed=0, shuffle=False)
    maxes = [max(lengths[i] for r in ordered.step_indices(s) for i in r) for s in range(8)]
    assert maxes == sorted(maxes)
    with pytest.raises(DataError, match="needs one length per example"):
        BatchPlan(64, 8, 2, length_buckets=3)
    with pytest.raises(DataError, match="needs one length per example"):
        BatchPlan(64, 8, 2, length_buckets=3, lengths=(1, 2))
