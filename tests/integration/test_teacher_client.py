"""A client in a separate Python process gets the engines' numbers from a running service, and the `status`
CLI reports it.

The service is the session's (tests/integration/session_teachers.py: the tiny world's teachers, started once
for every module that only reads them); `serve` and `stop` from the CLI are test_shared_service's, on the
dashboard head. Both subprocesses here only read the service, so they run side by side.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from common.config import ModelSpec, dump_config
from common.topk import rows_from_mask
from teacher_service import TeacherEngine
from tests.integration.side_by_side import run_together

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-5  # fp32 CPU, same model and math on both sides
TIMEOUT_S = 120


def _run_together(*argvs: list[str]) -> list[str]:
    """Independent interpreters at once (tests/integration/side_by_side.py); their stdouts, each run checked."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = run_together([([sys.executable, *args], env) for args in argvs], ROOT, TIMEOUT_S)
    for d in done:
        assert d.returncode == 0, f"{d.args} failed:\nstdout:\n{d.stdout}\nstderr:\n{d.stderr[-4000:]}"
    return [d.stdout for d in done]


@pytest.fixture(scope="module")
def served(ray_cluster: dict, session_teachers, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The session's service, its config file (what `status --config` reads) and a client's numbers from it."""
    session_teachers.ensure()
    cfg = session_teachers.config()
    root = tmp_path_factory.mktemp("client")
    cfg_path = root / "teachers.yaml"
    dump_config(cfg, cfg_path)
    gcs = ray_cluster["gcs_address"]
    ns, prefix = cfg.teachers.namespace, cfg.teachers.name_prefix
    out_file = root / "client_out.npz"
    script = textwrap.dedent(f"""
        import numpy as np, ray
        from teacher_service import TeacherClient
        ray.init(address={gcs!r}, namespace={ns!r}, logging_level="ERROR")
        c = TeacherClient(namespace={ns!r}, address={gcs!r}, name_prefix={prefix!r})
        texts = ["the quick brown fox jumps", "red green"]
        ids, am = c.encode(texts)
        t_ids, t_lp, t_tail = c.topk(texts, k=8, tau=1.5)
        g_lp, g_tail = c.gather(ids, t_ids, tau=1.5, attention_mask=am)
        rec = c.record(texts, k=8, tau=1.5)
        np.savez({str(out_file)!r}, ids=ids, am=am, t_ids=t_ids, t_lp=t_lp, t_tail=t_tail, g_lp=g_lp,
                 g_tail=g_tail, rec_ids=rec.ids, rec_rows=rec.rows, rec_base=rec.role_logprobs("base"),
                 roles=np.array(rec.roles))
    """)
    status, _ = _run_together(["-m", "teacher_service", "status", "--config", str(cfg_path), "--address", gcs],
                              ["-c", script])
    return {"paths": session_teachers.paths, "status": status, "client": np.load(out_file)}


def test_client_in_other_process_matches_engine(served: dict) -> None:
    got = served["client"]
    sft = TeacherEngine(ModelSpec(path=str(served["paths"]["sft_teacher"])))
    base = TeacherEngine(ModelSpec(path=str(served["paths"]["base_teacher"])))
    ids, am = sft.encode(["the quick brown fox jumps", "red green"])
    np.testing.assert_array_equal(got["ids"], ids)
    np.testing.assert_array_equal(got["am"], am)
    assert am[1].tolist() == [1, 1, 0, 0, 0]  # right padded by the service's tokenizer
    v = am.astype(bool)
    rows = rows_from_mask(v)  # the client scores every attended position by default
    e_ids, e_lp, e_tail = (x.numpy() for x in sft.topk(ids, am, rows, 8, 1.5))
    assert got["t_ids"].shape == (2, 5, 8) and got["t_tail"].shape == (2, 5)  # per text and position
    np.testing.assert_array_equal(got["t_ids"][v], e_ids)
    np.testing.assert_allclose(got["t_lp"][v], e_lp, atol=ATOL)
    np.testing.assert_allclose(got["t_tail"][v], e_tail, atol=ATOL)
    assert (got["t_ids"][~v] == -1).all() and np.isnan(got["t_lp"][~v]).all()  # padding: nothing scored
    b_lp, b_tail = (x.numpy() for x in base.gather(ids, am, rows, e_ids, 1.5))
    np.testing.assert_allclose(got["g_lp"][v], b_lp, atol=ATOL)
    np.testing.assert_allclose(got["g_tail"][v], b_tail, atol=ATOL)
    assert list(got["roles"]) == ["sft", "base"]
    np.testing.assert_array_equal(got["rec_rows"], rows)
    np.testing.assert_array_equal(got["rec_ids"], e_ids)
    np.testing.assert_allclose(got["rec_base"], b_lp, atol=ATOL)


def test_cli_status_reports_replicas_and_stats(served: dict) -> None:
    out = served["status"]
    assert "sft: 1 replica(s)" in out and "base: 1 replica(s)" in out
    assert "ok=True" in out and str(served["paths"]["sft_teacher"]) in out
