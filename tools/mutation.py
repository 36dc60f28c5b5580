"""Mutation score for the math (issue 18, item 4) -- not part of ``make test``.

Install once with ``.venv/bin/pip install -e ".[mutation]"`` (mutmut 3.x); then, from the repository root::

    .venv/bin/python tools/mutation.py --clean    # fresh run (needed after tests change), then the report
    .venv/bin/python tools/mutation.py            # run mutmut (cached verdicts reused), then the report
    .venv/bin/python tools/mutation.py --report   # only re-read the last run's results

What it does:

* runs ``mutmut run --max-children 1`` (mutmut 3.x, PyPI) with ``OMP_NUM_THREADS=1``, one test
  process at a time. The files to mutate and the tests to run are configured in ``[tool.mutmut]``
  in ``pyproject.toml``: ``losses/{segmentation,uncertainty,contrastive}.py``, ``metrics.py``,
  ``models/ema.py`` and ``methods/segmentation.py``, against ``tests/losses/``,
  ``tests/test_metrics.py``, ``tests/models/test_ema.py`` and
  ``tests/methods/test_segmentation_methods.py`` only (mutmut's coverage pass then runs, per
  mutant, just the tests that call the mutated function).
* writes ``mutants/mutation-report.md``: the per-module score (killed / total) and the diff of
  every surviving mutant, which is what docs/mutation.md is triaged from.

mutmut keeps its working copy and its result cache in ``mutants/`` (git-ignored). Its cache keys
on the mutated functions, not on the tests: after adding tests, run with ``--clean`` (removes
``mutants/`` first), or the old verdicts are reported again. About 15 minutes for the ~3060 mutants
on one CPU core.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def run_mutmut() -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.call([str(VENV_BIN / "mutmut"), "run", "--max-children", "1"], cwd=ROOT, env=env)


def report() -> str:
    os.chdir(ROOT)  # mutmut reads pyproject.toml and mutants/ relative to the cwd
    from mutmut.__main__ import (  # mutmut is a tool dependency, imported only here
        SourceFileMutationData,
        get_diff_for_mutant,
        status_by_exit_code,
        walk_mutatable_files,
    )

    counts: dict[str, collections.Counter] = {}
    survivors: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        module = str(path)
        counter = counts.setdefault(module, collections.Counter())
        for name, code in data.exit_code_by_key.items():
            status = status_by_exit_code[code]
            counter[status] += 1
            if status in ("survived", "no tests"):
                survivors[module].append((name, get_diff_for_mutant(name, path=path)))

    lines = ["# mutmut results", "", "| module | killed / total | survived | no tests | other |", "|---|---|---|---|---|"]
    total = collections.Counter()
    for module, c in counts.items():
        total.update(c)
        n = sum(c.values())
        other = n - c["killed"] - c["survived"] - c["no tests"]
        lines.append(
            f"| {module} | {c['killed']} / {n} ({100 * c['killed'] / max(n, 1):.1f} %) "
            f"| {c['survived']} | {c['no tests']} | {other} |"
        )
    n = sum(total.values())
    lines.append(f"| **all** | {total['killed']} / {n} ({100 * total['killed'] / max(n, 1):.1f} %) "
                 f"| {total['survived']} | {total['no tests']} | "
                 f"{n - total['killed'] - total['survived'] - total['no tests']} |")
    for module, items in survivors.items():
        lines += ["", f"## {module}", ""]
        for name, diff in items:
            lines += [f"### {name}", "```diff", diff.strip(), "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="skip the run, only write the report")
    parser.add_argument("--clean", action="store_true", help="remove mutants/ (the cache) before the run")
    args = parser.parse_args()
    if args.clean:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    if not args.report:
        rc = run_mutmut()
        if rc:
            print(f"mutmut run exited {rc}", file=sys.stderr)
    text = report()
    out = ROOT / "mutants" / "mutation-report.md"
    out.write_text(text)
    print(text.split("\n## ")[0])
    print(f"survivor diffs: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
