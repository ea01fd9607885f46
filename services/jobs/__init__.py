"""The jobs service: train jobs, their replicas, logs and metrics (cloudml.jobs.v1).

    __main__.py    flags (read once) -> JobsApp
    server.py      JobsApp: the index, core, scheduler and runtime of one process
    servicer.py    the gRPC servicer: request shape -> core -> response
    core.py        API-side rules: validation, exactly-once submit, cancel, delete, lists
    scheduler.py   the leader's queue (gang admission: quota + capacity), one runner
                   per started job, adoption after a restart or failover
    runner.py      JobRunner: drives one started job (prepare, attempts, restarts,
                   cancel) to its final state
    policy.py      the state machine, outcome and restart rules (pure)
    tfconfig.py    replica names and TF_CONFIG as Kubeflow's TFJob builds it (pure)
    records.py     helpers over a TrainJob record (events, ids of what it holds)
    store.py       the etcd layout under /cloudml/jobs/ and the in-memory job index
    logs.py        a job's files under DIR/jobs/<tenant>/<job>/ and StreamLogs
    metrics.py     metrics-file ingestion, series, the TensorBoard event reader
    quota.py       calls to the auth service's quota API
    envs.py        trainer environments cached by package hash (uv)

It never imports TensorFlow (tests/unit/test_jobs_no_tensorflow.py).

The environment of every replica process
----------------------------------------
Agreed with the trainer side (`cloudml.report`, examples/trainers); the
proto's header documents the same list.

    TF_CONFIG               {"cluster": {role: [host:port, ...]}, "task": {"type": role,
                            "index": i}, "environment": "cloud"}: roles lower case in
                            index order; MASTER stays "master", CHIEF "chief"; the
                            evaluator is not in `cluster` (see tfconfig.py)
    CLOUDML_JOB_NAME        the job's name
    CLOUDML_TENANT          its tenant
    CLOUDML_REPLICA_TYPE    master | chief | ps | worker | evaluator
    CLOUDML_REPLICA_INDEX   0-based index within the type
    CLOUDML_ATTEMPT         1-based attempt (a restart counts up)
    CLOUDML_OUTPUT_PATH     the spec's output_path (default DIR/storage/<tenant>/jobs/<job>)
    CLOUDML_METRICS_FILE    DIR/jobs/<tenant>/<job>/metrics/attempt-<n>/<replica>.jsonl:
                            `cloudml.report()` appends {"step", "metrics", "time",
                            "replica", "attempt"} lines; the scheduler ingests them
    CUDA_VISIBLE_DEVICES    set by the runtime: the replica's whole GPUs, "" for none
                            (kubernetes: "" for none; with GPUs the device plugin's)
    PYTHONUNBUFFERED        1 (unless spec.env says otherwise), so logs are live
    TF_CPP_MIN_LOG_LEVEL    2 (unless spec.env says otherwise): TensorFlow's C++
                            INFO/WARNING chatter (CPU features) stays out of the
                            job's logs. The few lines TF 2.21 prints before its
                            logging starts (oneDNN on, CUDA probing) ignore the
                            level and still appear.

plus the spec's own `env` and the runtime's minimal base (PATH, HOME, LANG, ...).
"""
