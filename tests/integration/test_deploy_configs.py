"""The deploy/ files, checked offline: the cluster launcher YAML with Ray's own validator, the KubeRay
RayJob's entrypoint against the real module and config, the run configs against the schema, submit.sh.

`ray.autoscaler._private.util.prepare_config/validate_config` is a private API (docs/PLATFORM.md): the tests
below pin the behaviour we rely on (defaults filled, setup commands merged, broken copies rejected), so a
Ray upgrade that changes it fails here rather than at `ray up`.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CONFIGS = sorted((DEPLOY / "configs").glob("*.yaml"))


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _validate_cluster(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


# ----------------------------------------------------------------------------------------------------
# cluster.yaml


@pytest.fixture(scope="module")
def cluster_cfg() -> dict:
    return _load_yaml(DEPLOY / "cluster.yaml")


def test_cluster_yaml_passes_rays_validator(cluster_cfg: dict) -> None:
    prepared = _validate_cluster(cluster_cfg)
    # Pinned behaviour of prepare_config: defaults filled in, the head never scales, setup commands merged.
    assert "cluster_synced_files" in prepared
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0
    assert prepared["head_setup_commands"][: len(cluster_cfg["setup_commands"])] == cluster_cfg["setup_commands"]
    assert prepared["provider"]["type"] == "aws"


@pytest.mark.parametrize(
    "break_it, error",
    [
        (lambda c: c["available_node_types"]["teacher_gpu_node"].update(resourcez={}), "resourcez"),
        (lambda c: c.update(head_node_type="no_such_type"), "head_node_type"),
        (lambda c: c["available_node_types"]["student_gpu_node"].update(min_workers=99), "max_workers"),
        (lambda c: c.update(docker={"imagee": "x"}), "imagee"),
    ],
    ids=["unknown-node-key", "bad-head-type", "min-over-max", "unknown-docker-key"],
)
def test_broken_cluster_yaml_is_rejected(cluster_cfg: dict, break_it, error: str) -> None:
    import jsonschema

    broken = copy.deepcopy(cluster_cfg)
    break_it(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)) as info:
        _validate_cluster(broken)
    assert error in str(info.value)


def test_cluster_yaml_security_and_layout(cluster_cfg: dict) -> None:
    head_start = " ".join(cluster_cfg["head_start_ray_commands"])
    worker_start = " ".join(cluster_cfg["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start
    # The token reaches the nodes as a file copied from this machine, never as a value in the YAML.
    assert cluster_cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    text = (DEPLOY / "cluster.yaml").read_text()
    assert not re.search(r"RAY_AUTH_TOKEN\s*=", text), "a literal token in cluster.yaml"
    # The project is copied from the repo root and installed on every node.
    assert cluster_cfg["file_mounts"]["~/deltakd"] == "."
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = cluster_cfg[key]
        assert any("torch==" in c for c in cmds) and any("pip install" in c and "~/deltakd" in c for c in cmds)
        torch_at = next(i for i, c in enumerate(cmds) if "torch==" in c)
        project_at = next(i for i, c in enumerate(cmds) if "~/deltakd" in c)
        assert torch_at < project_at, f"{key}: torch must be installed before the project"
    for excluded in (".venv", "runs"):
        assert excluded in cluster_cfg["rsync_exclude"]
    types = cluster_cfg["available_node_types"]
    assert set(types["teacher_gpu_node"]["resources"]) == {"teacher_gpu"}
    assert set(types["student_gpu_node"]["resources"]) == {"student_gpu"}


# GPUs per instance type named in cluster.yaml (AWS's published figures), so the layout can be checked.
GPUS_PER_INSTANCE = {"p4d.24xlarge": 8, "p4de.24xlarge": 8, "p5.48xlarge": 8, "g5.2xlarge": 1}


def test_cluster_has_room_for_the_paper_config(cluster_cfg: dict) -> None:
    """The node types host the paper config: every teacher replica, and ALL student ranks on one node
    (their DDP all-reduce stays on NVLink); each node type's custom resource equals its GPU count."""
    cfg = load_config(DEPLOY / "configs" / "qwen2_7b_dolly.yaml")
    types = cluster_cfg["available_node_types"]
    per_node = {name: GPUS_PER_INSTANCE[types[name]["node_config"]["InstanceType"]]
                for name in ("teacher_gpu_node", "student_gpu_node")}
    assert types["teacher_gpu_node"]["resources"]["teacher_gpu"] == per_node["teacher_gpu_node"]
    assert types["student_gpu_node"]["resources"]["student_gpu"] == per_node["student_gpu_node"]
    teacher_gpus = sum(cfg.teachers.replicas.values()) * cfg.teachers.num_gpus
    student_gpus = cfg.training.num_workers * cfg.training.num_gpus_per_worker
    assert types["teacher_gpu_node"]["max_workers"] * per_node["teacher_gpu_node"] >= teacher_gpus
    assert per_node["student_gpu_node"] >= student_gpus, "the student ranks must fit on ONE node"
    assert cfg.training.resources_per_worker == {"student_gpu": 1} and cfg.teachers.resources == {"teacher_gpu": 1}
    nodes = -(-teacher_gpus // per_node["teacher_gpu_node"]) + 1
    assert cluster_cfg["max_workers"] >= nodes


# ----------------------------------------------------------------------------------------------------
# kuberay/rayjob.yaml


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _load_yaml(DEPLOY / "kuberay" / "rayjob.yaml")


def _containers(rayjob: dict) -> dict[str, dict]:
    spec = rayjob["spec"]
    out = {"head": spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0],
           "submitter": spec["submitterPodTemplate"]["spec"]["containers"][0]}
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        out[group["groupName"]] = group["template"]["spec"]["containers"][0]
    return out


def test_rayjob_entrypoint_names_a_real_module_and_config(rayjob: dict) -> None:
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"], argv
    module = argv[2]
    assert module == "student_worker.train"
    assert importlib.util.find_spec(module) is not None, f"entrypoint module {module} is not importable"
    config_path = REPO / argv[argv.index("--config") + 1]
    assert config_path.is_file(), config_path
    load_config(config_path)  # raises ConfigError naming the key if the config is invalid


def test_rayjob_cluster_spec(rayjob: dict) -> None:
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    groups = {g["groupName"]: g for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
    assert set(groups) == {"teacher-gpu", "student-gpu"}
    cfg = load_config(REPO / shlex.split(spec["entrypoint"])[-1])
    gpus = {name: int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
            * g["replicas"] for name, g in groups.items()}
    assert gpus["teacher-gpu"] >= sum(cfg.teachers.replicas.values()) * cfg.teachers.num_gpus
    assert gpus["student-gpu"] >= cfg.training.num_workers * cfg.training.num_gpus_per_worker
    assert "teacher_gpu" in groups["teacher-gpu"]["rayStartParams"]["resources"]
    assert "student_gpu" in groups["student-gpu"]["rayStartParams"]["resources"]


def test_rayjob_pods_have_a_memory_backed_dev_shm(rayjob: dict) -> None:
    spec = rayjob["spec"]["rayClusterSpec"]
    templates = [spec["headGroupSpec"]["template"], *[g["template"] for g in spec["workerGroupSpecs"]]]
    for template in templates:
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert "/dev/shm" in mounts, template["spec"]["containers"][0]["name"]
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def test_rayjob_token_auth_from_a_secret(rayjob: dict) -> None:
    for role, container in _containers(rayjob).items():
        env = {e["name"]: e for e in container.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", role
        token = env.get("RAY_AUTH_TOKEN", {})
        assert "value" not in token, f"{role}: literal token in the manifest"
        assert token["valueFrom"]["secretKeyRef"]["name"], role


# ----------------------------------------------------------------------------------------------------
# Run configs


def test_paper_config_is_the_paper_setup() -> None:
    cfg = load_config(DEPLOY / "configs" / "qwen2_7b_dolly.yaml")
    assert cfg.models.base_teacher.path == "Qwen/Qwen2-7B"
    assert cfg.models.sft_teacher.path == "Qwen/Qwen2-7B-Instruct"
    assert cfg.models.student.path == "Qwen/Qwen2-0.5B"
    assert cfg.teachers.num_gpus == 1
    assert cfg.training.num_workers > 1 and cfg.training.num_gpus_per_worker == 1
    assert cfg.data.train == "databricks/databricks-dolly-15k"
    assert (cfg.data.columns.instruction, cfg.data.columns.context, cfg.data.columns.response) == (
        "instruction", "context", "response")
    assert cfg.loss.method == "delta_kd" and cfg.loss.k == 64
    assert (cfg.teachers.dtype, cfg.teachers.wire_dtype, cfg.training.bf16) == ("bfloat16", "float16", "on")


def _qwen2_params(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int) -> int:
    """Parameters of a Qwen2 decoder with untied embeddings, from its config.json numbers."""
    head_dim = hidden // heads
    attention = 2 * hidden * hidden + hidden + 2 * (hidden * kv_heads * head_dim + kv_heads * head_dim)
    layer = attention + 3 * hidden * intermediate + 2 * hidden
    return layers * layer + 2 * vocab * hidden + hidden


def test_72b_teacher_layout_fits_its_nodes() -> None:
    """docs/CLUSTER.md section 11: each Qwen2-72B replica's bf16 weights fit its 2 H200s within the HF device
    map's share; 12 + 12 replicas fill six 8-GPU teacher nodes (and not five); the 8 student ranks fit one
    node; the teacher is not evaluated on one device."""
    from teacher_service.engine_hf import SPREAD_HEADROOM
    from teacher_service.placement import PlacementError
    from teacher_service.pool import check_teacher_layout

    cfg = load_config(DEPLOY / "configs" / "qwen2_72b_teachers.yaml")
    assert cfg.models.base_teacher.path == "Qwen/Qwen2-72B" and cfg.models.student.path == "Qwen/Qwen2-7B"
    t = cfg.teachers
    teacher = _qwen2_params(8192, 29568, 80, 64, 8, 152064)
    assert round(teacher / 1e9, 2) == 72.71  # Qwen2-72B's published size
    h200 = 141e9
    assert 2 * teacher / t.num_gpus <= (1 - SPREAD_HEADROOM) * h200  # 72.7 GB of 119.9 GB per GPU
    # on 80 GB GPUs it needs 4 per replica: 72.7 GB each on 2 is more than their 68 GB share, 36.4 GB on 4 fits
    assert 2 * teacher / 2 > (1 - SPREAD_HEADROOM) * 80e9 and 2 * teacher / 4 <= (1 - SPREAD_HEADROOM) * 80e9
    teacher_node = {"CPU": 192.0, "GPU": 8.0, "teacher_gpu": 8.0}
    student_node = {"CPU": 192.0, "GPU": 8.0, "student_gpu": 8.0}
    check_teacher_layout(cfg, [teacher_node] * 6 + [student_node])
    with pytest.raises(PlacementError, match=r"24 replicas of .* do not fit: the nodes hold 20 at once"):
        check_teacher_layout(cfg, [teacher_node] * 5 + [student_node])
    assert t.resources == {"teacher_gpu": t.num_gpus} and t.placement_wait_s > 0
    student = _qwen2_params(3584, 18944, 28, 28, 4, 152064)
    assert round(student / 1e9, 2) == 7.62
    # bf16 weights + gradients + AdamW's 2 moments + the frozen lp_S0 copy + DDP's gradient buckets
    assert 6 * 2 * student < 0.75 * h200 and cfg.training.gradient_checkpointing
    assert cfg.training.num_workers * cfg.training.num_gpus_per_worker <= student_node["GPU"]
    assert cfg.evaluation.evaluate_teacher is False


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_validates_and_says_its_command(path: Path) -> None:
    load_config(path)
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    assert header, f"{path.name}: no header comment"
    commands = ("python -m student_worker.train", "deploy/submit.sh", "python -m teacher_service")
    assert any(c in text for c in commands), f"{path.name}: the header does not say the command that runs it"
    assert f"deploy/configs/{path.name}" in text, f"{path.name}: the header's command does not name this file"


def test_a_broken_copy_of_the_paper_config_is_rejected(tmp_path: Path) -> None:
    data = _load_yaml(DEPLOY / "configs" / "qwen2_7b_dolly.yaml")
    data["teachers"]["num_gpu"] = 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="num_gpu"):
        load_config(bad)


# ----------------------------------------------------------------------------------------------------
# submit.sh and the docs


def test_submit_script_usage_and_runtime_env() -> None:
    script = DEPLOY / "submit.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    usage = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "--config" in usage.stdout
    missing = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert missing.returncode == 2 and "--config is required" in missing.stderr
    wrong = subprocess.run(["bash", str(script), "--config", "no/such.yaml"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "no/such.yaml" in wrong.stderr
    text = script.read_text()
    assert "job submit" in text and "--working-dir ." in text and "-m student_worker.train" in text
    for excluded in ('".venv"', '"runs"'):
        assert excluded in text


def test_cluster_doc_names_only_existing_files() -> None:
    doc = REPO / "docs" / "CLUSTER.md"
    paths = set(re.findall(r"\b((?:deploy|docs|scripts)/[\w./-]+\.(?:yaml|sh|md|py)|deploy/kuberay/Dockerfile)\b",
                           doc.read_text()))
    assert paths, "docs/CLUSTER.md names no deploy files"
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"docs/CLUSTER.md names files that do not exist: {missing}"


# ----------------------------------------------------------------------------------------------------
# tiny_lora.yaml: the embedded default with its SFT teacher as a LoRA adapter (one pair actor)


def test_tiny_lora_is_tiny_with_a_lora_pair() -> None:
    lora, tiny = load_config(DEPLOY / "configs" / "tiny_lora.yaml"), load_config(DEPLOY / "configs" / "tiny.yaml")
    assert lora.embedded.sft_teacher == "lora" and tiny.embedded.sft_teacher == "full"
    assert lora.teachers.replicas == {"sft": 1}
    a, b = lora.model_dump(), tiny.model_dump()
    for d in (a, b):  # everything else is tiny.yaml's, so the two stay comparable
        d.pop("run_name")
        for key in ("namespace", "replicas"):
            d["teachers"].pop(key)
        d["embedded"].pop("sft_teacher")
    assert a == b


def _check_lora_build(adapter: Path, base_dir: Path) -> None:
    """The embedded LoRA build: an adapter (no full copy) that names its final base, loads on it and moved it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(base_dir) and conf["r"] == 8
    assert not (adapter / "model.safetensors").exists() and (adapter / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    prompt = torch.arange(4, 12)[None]
    want = base(input_ids=prompt).logits
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32),
                                    str(adapter))
    assert not torch.allclose(sft(input_ids=prompt).logits, want, atol=1e-4)  # the adapter learned something
    with sft.disable_adapter():
        assert torch.equal(sft(input_ids=prompt).logits, want)


def test_tiny_lora_trains_with_one_pair_actor(ray_cluster: dict, tmp_path: Path, monkeypatch, warm_ranks) -> None:
    """The main job on tiny_lora.yaml (its world reduced to seconds, 3 steps): the pool starts one actor, the
    pair of the base teacher and the adapter, and no base actor."""
    from common.tiny_world.build import resolve_model_paths
    from student_worker.driver import run_training
    from teacher_service import TeacherPool

    created: list[tuple[str, Any]] = []
    create = TeacherPool._create

    def spy(cfg, role, spec, i, detached, faults=None, group=None, pair_base=None):
        created.append((role, pair_base))
        return create(cfg, role, spec, i, detached, faults, group, pair_base)

    monkeypatch.setattr(TeacherPool, "_create", staticmethod(spy))
    shape = "{hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32}"
    reduced = ["embedded.num_train=32", "embedded.num_val=4", "embedded.num_test=4", "embedded.num_pretrain=100",
               "embedded.corpus_sentences=200", "embedded.pretrain_steps=8", "embedded.sft_steps=8",
               "embedded.batch_size=4", "embedded.max_length=64", f"embedded.teacher={shape}",
               f"embedded.student={shape}", f"embedded.cache_dir={tmp_path / 'models'}"]
    # one student worker: what is checked is the pool's one pair actor (a second worker adds a process start)
    run = ["training.max_steps=3", "training.batch_size=8", "training.num_workers=1", "training.checkpoint_every=3",
           "evaluation.enabled=false",
           "data.max_length=64", f"output.dir={tmp_path / 'run'}", "output.plot=false",
           f"teachers.namespace=lora-{tmp_path.name}"]
    cfg = resolve_model_paths(load_config(DEPLOY / "configs" / "tiny_lora.yaml", reduced + run))
    _check_lora_build(Path(cfg.models.sft_teacher.path), Path(cfg.models.base_teacher.path))
    report = run_training(cfg, progress=False, warm=warm_ranks)
    assert [(role, base["path"]) for role, base in created] == [("sft", cfg.models.base_teacher.path)]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert report is not None
