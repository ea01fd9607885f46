"""Trainers that misbehave on purpose, for the platform's failure-path tests.

    python -m faulty_trainer.exit_code --code 1      exits with that code
    python -m faulty_trainer.hog_memory --mb 500     allocates and touches memory, then holds it
    python -m faulty_trainer.sleep --seconds 600     sleeps (for timeouts and cancels)
    python -m faulty_trainer.flaky --fail-times 2    fails on attempts 1..N ($CLOUDML_ATTEMPT), then succeeds

Plain Python only; none imports TensorFlow.
"""
