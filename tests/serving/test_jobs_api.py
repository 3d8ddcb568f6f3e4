"""The jobs router's views."""

from __future__ import annotations

import json
import math

from serving.jobs.records import JobRecord
from serving.routers.jobs import job_view


def test_job_view_is_strict_json() -> None:
    record = JobRecord(id="0123456789abcdef", model="m", state="succeeded")
    record.report = {"candidates": [{"cosine": math.nan, "latency_ms": math.inf, "ok": 1.5}]}
    view = job_view(record)
    assert view["url"] == "/v2/optimize/jobs/0123456789abcdef"
    assert view["report"]["candidates"] == [{"cosine": None, "latency_ms": None, "ok": 1.5}]
    json.dumps(view, allow_nan=False)
    assert "report" not in job_view(record, full=False)
