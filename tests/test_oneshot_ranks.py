"""tp_ollama.oneshot_ranks: the ranks of `generate --tp N`, started here by torchrun's agent. Rank 0 writes the
text (the text of the engine in this process) and its timings, the other ranks only follow; a failure is one
line on stderr and an exit code that tells the launcher the user has been told."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import test_oneshot
from tests.test_oneshot import GREEDY, PROMPT
from tp_ollama.launch import Cluster, ReportedError, run_workers
from tp_ollama.oneshot_ranks import WorkerJob, worker_main

# The fixtures of test_oneshot.py: a tiny llama and the text of the engine in this process (one for this module).
tiny_dir, reference = test_oneshot.tiny_dir, test_oneshot.reference


def test_rank_0_writes_the_text_and_its_timings_once(tiny_dir: Path, reference: str, capfd: pytest.CaptureFixture[str]):
    job = WorkerJob(model=str(tiny_dir), prompt=PROMPT, options=GREEDY, verbose=True, timeout_s=60.0)
    results = run_workers(Cluster(nproc_per_node=2), worker_main, job)
    assert results == {0: None, 1: None}
    captured = capfd.readouterr()
    assert captured.out == reference
    timings = [line for line in captured.err.splitlines() if line.startswith(("total duration:", "eval count:"))]
    assert len(timings) == 2, captured.err  # rank 0's, once


def test_a_failure_is_one_line_and_the_launcher_is_told_it_was_reported(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
):
    missing = tmp_path / "missing.gguf"
    with pytest.raises(ReportedError, match="engine rank 0 failed"):
        run_workers(Cluster(), worker_main, WorkerJob(model=str(missing), timeout_s=60.0))
    errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and errors[0].startswith("Error: ") and str(missing) in errors[0], errors
