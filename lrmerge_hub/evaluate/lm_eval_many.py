"""Several lm-eval command lines in one Python process, in order:
`python -m lrmerge_hub.evaluate.lm_eval_many < JOBS`, JOBS a JSON list of {"argv": [...], "log": path}.

Each argv is exactly what follows `python -m lm_eval` on a command line, and lm-eval's own
entry point (`lm_eval.__main__.cli_evaluate`) parses and runs it, so a model is evaluated as
that command would evaluate it. Only the imports (torch, transformers, lm-eval's model
classes: half of a small model's evaluation on a CPU) are paid once, and so is lm-eval's task
index (`index_once`). Each job's output is appended to its log. The process stops at the
first job that fails, with its exit status.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any


def run_job(argv: list[str], log_path: str) -> int:
    """lm-eval's CLI on `argv`, with file descriptors 1 and 2 sent to `log_path` (so
    lm-eval's logging, tqdm and warnings land there too); its exit status."""
    from lm_eval.__main__ import cli_evaluate

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            sys.argv = ["lm_eval", *argv]
            cli_evaluate()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # noqa: BLE001 - the job failed: its traceback goes to its log
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, old in ((1, saved[0]), (2, saved[1])):
                os.dup2(old, fd)
                os.close(old)
    gc.collect()  # the model of this job is unreachable now: free it before the next loads
    return code


def index_once() -> None:
    """lm-eval indexes its task folders (about 14,700 YAML files: 9-10 s on a 2-core machine)
    for every command line it runs; the folders do not change between the jobs of this process,
    so the first index of a set of folders serves every later job, each a deep copy of it
    (about 2 s) so that no job sees what another changed in it."""
    from lm_eval.tasks import _index

    build = _index.TaskIndex.build
    built: dict[tuple[Any, ...], Any] = {}

    def build_once(paths: Any, *, resolve_includes: bool = True) -> Any:
        paths = list(paths)
        key = (tuple(str(Path(p).resolve()) for p in paths), resolve_includes)
        if key not in built:
            built[key] = build(paths, resolve_includes=resolve_includes)
        return copy.deepcopy(built[key])

    _index.TaskIndex.build = staticmethod(build_once)


def main() -> None:
    jobs = json.loads(sys.stdin.read())
    if len(jobs) > 1:
        index_once()
    for job in jobs:
        code = run_job(job["argv"], job["log"])
        if code:
            sys.exit(code)


if __name__ == "__main__":
    main()
