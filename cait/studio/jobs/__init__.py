"""Background fine-tune jobs, one process each (``python -m cait.finetune``), under one runs directory.

::

    model      Job, JobStatus, the job-id format, where runs live
    store      job.json files and logs on disk, the runs directory's file lock
    validate   every field of a request checked and named before anything is written
    process    the engine's command line; start, watch, stop its process group
    retention  what public mode deletes, and when
    manager    JobManager: submit, schedule, cancel, progress
    views      the Fine-tune and Compactors tabs' answers
"""
