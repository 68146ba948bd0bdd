"""The output.dir probe: a worker that cannot read the driver's token back is named with its node."""

from __future__ import annotations

from student_worker.shared_output import check_probe_replies, not_shared_message, read_probe, write_probe


def test_probe_round_trip_on_one_file_system(tmp_path):
    path, token = write_probe(tmp_path)
    assert path.is_absolute() and path.parent == tmp_path.resolve()
    reply = read_probe(str(path))
    assert reply["content"] == token and reply["error"] is None
    assert check_probe_replies(token, "10.0.0.1", [reply, reply]) == []


def test_missing_or_different_probe_names_rank_and_nodes(tmp_path):
    path, token = write_probe(tmp_path)
    missing = read_probe(str(tmp_path / "elsewhere" / path.name))  # what a node without the mount sees
    assert missing["content"] is None and "FileNotFoundError" in missing["error"]
    other = {"node": "10.0.0.9", "content": "another run's token", "error": None}
    problems = check_probe_replies(token, "10.0.0.1", [read_probe(str(path)), missing, other])
    assert len(problems) == 2
    assert problems[0].startswith("student rank 1 on node ") and "driver on node 10.0.0.1" in problems[0]
    assert "FileNotFoundError" in problems[0]
    assert problems[1].startswith("student rank 2 on node 10.0.0.9") and "another run" in problems[1]
    message = not_shared_message(tmp_path, problems)
    assert str(tmp_path) in message and "output.require_shared_dir=false" in message and "NFS" in message
