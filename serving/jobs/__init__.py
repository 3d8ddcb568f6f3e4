"""Upload-and-optimize jobs: records, worker processes, and the manager that runs them.

Importing this package pulls in neither FastAPI nor torch; the worker process imports the
pipeline (``optimizers.api``) only when it runs.
"""

from serving.jobs.manager import JobManager
from serving.jobs.records import JobRecord, JobStore

__all__ = ["JobManager", "JobRecord", "JobStore"]
