"""One tiny model set and ONE restartable teacher service for the whole session's training modules.

test_faults, test_on_policy, test_student_training and test_teacher_cache all train the same
tiny world (tests/integration/test_student_training.py's `tiny_setup`: seeded models, the same data) against
teachers they attach to. Starting a teacher pair costs ~20 s on 2 cores (two processes importing torch and
loading models), so they share one: the `session_teachers` fixture (tests/integration/conftest.py);
test_teacher_faults restarts a replica of it, and test_teacher_client only reads it. (test_rdt keeps pools of its
own: a teacher that joined a gloo RDT group of 3 cannot join a larger one later, Ray's gloo groups ride on torch's
default process group.)

The service is restartable (teachers.max_restarts=2, max_task_retries=-1): tests that kill a teacher with
`no_restart=False` see Ray restart it. A test that kills a replica for good brings it back with `revive()`
(test_faults' last test: only the dead replica is started again, ~half the cost of `restart()`); `ensure()` at
each module's start brings the service back if a replica is gone, so a module never depends on what an earlier
one did.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import ray

OVERRIDES = ["teachers.max_restarts=2", "teachers.max_task_retries=-1"]
ROLES = ("sft", "base")
RELEASE_TIMEOUT_S = 60.0


class SessionTeachers:
    """The shared service: `ensure()` -> (tag, overrides that attach), started or restarted as needed."""

    def __init__(self, paths: dict[str, Path], root: Path) -> None:
        self.paths, self.root = paths, root
        self.tag = uuid.uuid4().hex[:8]
        self.pool: Any = None
        self.revived: list[Any] = []  # replicas revive() started (kept: Ray ends a named actor with no handle)
        self.starts = 0

    def config(self) -> Any:
        """The service's RunConfig (its namespace and name prefix are what a client attaches by)."""
        from tests.integration.test_student_training import make_cfg

        return make_cfg(self.paths, self.root / f"svc{self.starts}", OVERRIDES, tag=self.tag)


    def _handles(self) -> list[Any]:
        from teacher_service.naming import replica_name

        cfg = self.config()
        found = []
        for role in ROLES:
            try:
                found.append(ray.get_actor(replica_name(cfg.teachers.name_prefix, role, 0),
                                           namespace=cfg.teachers.namespace))
            except ValueError:
                pass
        return found

    def alive(self) -> bool:
        handles = self._handles()
        if len(handles) < len(ROLES):
            return False
        try:
            ray.get([h.health.remote() for h in handles], timeout=60)
        except Exception:  # dead for good (or not answering): restart
            return False
        return True

    def ensure(self) -> tuple[str, list[str]]:
        if self.pool is None or not self.alive():
            self.restart()
        return self.tag, ["teachers.attach=true"]

    def restart(self) -> tuple[str, list[str]]:
        """Kill what is left of the service (same names), wait until the names are released, start it again."""
        from teacher_service import TeacherPool

        cfg = self.config()
        ns, prefix = cfg.teachers.namespace, cfg.teachers.name_prefix
        for h in self._handles():
            ray.kill(h, no_restart=True)
        deadline = time.monotonic() + RELEASE_TIMEOUT_S
        while any(a["namespace"] == ns and a["name"].startswith(prefix)
                  for a in ray.util.list_named_actors(all_namespaces=True)):
            assert time.monotonic() < deadline, "old teacher names were not released"
            time.sleep(0.1)
        self.starts += 1
        self.pool, self.revived = TeacherPool.start(self.config()), []
        return self.tag, ["teachers.attach=true"]

    def revive(self) -> tuple[str, list[str]]:
        """Start again, under the same names, only the replicas that are gone for good (once their names are
        released); the live ones are left as they are."""
        from common.roles import teacher_role_specs
        from teacher_service import TeacherPool
        from teacher_service.naming import replica_name

        cfg = self.config()
        ns, prefix = cfg.teachers.namespace, cfg.teachers.name_prefix
        specs = teacher_role_specs(cfg)
        started = []
        for role in ROLES:
            name = replica_name(prefix, role, 0)
            try:
                ray.get_actor(name, namespace=ns)
                continue  # alive (or being restarted by Ray)
            except ValueError:
                pass
            deadline = time.monotonic() + RELEASE_TIMEOUT_S
            while any(a["namespace"] == ns and a["name"] == name
                      for a in ray.util.list_named_actors(all_namespaces=True)):
                assert time.monotonic() < deadline, f"the dead teacher's name {name} was not released"
                time.sleep(0.1)
            started.append(TeacherPool._create(cfg, role, specs[role].model_dump(), 0, False))
        ray.get([h.health.remote() for h in started], timeout=RELEASE_TIMEOUT_S)
        self.revived += started  # a named actor without a handle left is ended by Ray: keep one
        return self.tag, ["teachers.attach=true"]

    def shutdown(self) -> None:
        for h in self._handles():
            ray.kill(h, no_restart=True)
        self.pool, self.revived = None, []
