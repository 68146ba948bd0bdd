"""The CLI serves detached teachers; a client in a separate Python process gets the engines' numbers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from common.config import ModelSpec
from common.topk import rows_from_mask
from teacher_service import TeacherEngine
from tests.tiny import make_model_set

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-5  # fp32 CPU, same model and math on both sides


def _run(args: list[str], timeout: int = 120) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def served(ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("client")
    paths = make_model_set(root)
    cfg_path = root / "teachers.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "models": {"base_teacher": {"path": str(paths["base_teacher"])},
                   "sft_teacher": {"path": str(paths["sft_teacher"])}, "student": {"path": str(paths["student"])}},
        "loss": {"k": 8},
        "teachers": {"namespace": "deltakd-client-test", "name_prefix": "svc", "num_cpus": 0.5},
    }))
    gcs = ray_cluster["gcs_address"]
    out = _run(["-m", "teacher_service", "serve", "--config", str(cfg_path), "--address", gcs])
    assert "namespace='deltakd-client-test'" in out and "TeacherClient(" in out
    info = {"cfg": str(cfg_path), "gcs": gcs, "paths": paths, "root": root}
    yield info
    _run(["-m", "teacher_service", "stop", "--config", str(cfg_path), "--address", gcs])


def test_client_in_other_process_matches_engine(served: dict) -> None:
    out_file = served["root"] / "client_out.npz"
    script = textwrap.dedent(f"""
        import numpy as np, ray
        from teacher_service import TeacherClient
        ray.init(address={served['gcs']!r}, namespace="deltakd-client-test", logging_level="ERROR")
        c = TeacherClient(namespace="deltakd-client-test", address={served['gcs']!r}, name_prefix="svc")
        texts = ["the quick brown fox jumps", "red green"]
        ids, am = c.encode(texts)
        t_ids, t_lp, t_tail = c.topk(texts, k=8, tau=1.5)
        g_lp, g_tail = c.gather(ids, t_ids, tau=1.5, attention_mask=am)
        rec = c.record(texts, k=8, tau=1.5)
        np.savez({str(out_file)!r}, ids=ids, am=am, t_ids=t_ids, t_lp=t_lp, t_tail=t_tail, g_lp=g_lp,
                 g_tail=g_tail, rec_ids=rec.ids, rec_rows=rec.rows, rec_base=rec.role_logprobs("base"),
                 roles=np.array(rec.roles))
    """)
    _run(["-c", script])
    got = np.load(out_file)
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
    out = _run(["-m", "teacher_service", "status", "--config", served["cfg"], "--address", served["gcs"]])
    assert "sft: 1 replica(s)" in out and "base: 1 replica(s)" in out
    assert "ok=True" in out and str(served["paths"]["sft_teacher"]) in out
