"""Reuse of a finished job folder is decided by the config's identity, never by existence."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import spec_of

from calibrate.config import resume


def finished(job_dir, spec, **extra):
    job_dir.mkdir(parents=True, exist_ok=True)
    data = {"status": "complete", "config_hash": spec.identity, "config": spec.relevant(), **extra}
    (job_dir / "metrics.json").write_text(json.dumps(data))
    return data


def test_an_empty_folder_runs(tmp_path):
    assert resume.decide(tmp_path, spec_of(), resume=True) is None


def test_same_config_is_reused_on_resume(tmp_path):
    spec = spec_of("dataset.limit=10")
    stored = finished(tmp_path, spec, marker=1)
    assert resume.decide(tmp_path, spec, resume=True) == stored
    # tracker and progress do not change the identity
    assert resume.decide(tmp_path, spec_of("dataset.limit=10", "tracker=none"), True) == stored


def test_same_config_without_resume_recomputes(tmp_path):
    spec = spec_of()
    finished(tmp_path, spec)
    assert resume.decide(tmp_path, spec, resume=False) is None


def test_changed_config_reruns_on_resume_and_names_the_keys(tmp_path, caplog):
    finished(tmp_path, spec_of("dataset.limit=10"))
    with caplog.at_level(logging.WARNING, logger="calibrate"):
        assert resume.decide(tmp_path, spec_of("dataset.limit=20"), resume=True) is None
    assert "dataset.limit: 10 -> 20" in caplog.text and "rerunning" in caplog.text


def test_changed_config_without_resume_is_refused(tmp_path):
    finished(tmp_path, spec_of("dataset.limit=10"))
    with pytest.raises(resume.FolderInUse, match=r"already holds the result of another config "
                                                 r"\(differs in dataset.limit: 10 -> 20\)"):
        resume.decide(tmp_path, spec_of("dataset.limit=20"), resume=False)


def test_a_result_without_identity_is_never_reused(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "complete"}))
    assert resume.decide(tmp_path, spec_of(), resume=True) is None
    with pytest.raises(resume.FolderInUse, match="no config identity"):
        resume.decide(tmp_path, spec_of(), resume=False)


def test_an_incomplete_result_is_not_a_result(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "running"}))
    assert resume.decide(tmp_path, spec_of(), resume=True) is None
