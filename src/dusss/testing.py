"""Test helpers: a stand-in VLM for code that consumes one (the grounding decoder, the Step-2 methods), and a
runner of many CLI commands that pays `import torch` once.

`BagOfWordsVLM` has `VisionLanguageModel`'s encode interface (`encode_image`, `encode_text`, `cfg.embed_dim`)
at a few thousand parameters and with no pretrained files: a strided conv patchifier for images and a hashed
bag-of-words embedding for texts. Use it to test a plug-in method or decoder without loading real encoders.

`run_cli_forked` runs `dusss` commands, each in its own forked child of one prepared interpreter: each command
is a separate process (its own exit code, stdout, stderr, working folder) that starts with the imports done.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class BagOfWordsVLM(nn.Module):
    """Tiny stand-in VLM. `batchnorm=True` puts a BatchNorm1d on the image global feature, so a test can
    check that a frozen VLM is run in eval mode (its running statistics must not move)."""

    def __init__(self, dim: int = 16, patch: int = 8, vocab: int = 97, batchnorm: bool = False) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(embed_dim=dim)
        self.patchify = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.BatchNorm1d(dim) if batchnorm else nn.Identity()
        self.words = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.vocab = vocab

    def encode_image(self, images: torch.Tensor, momentum: bool = False, with_global: bool = True) -> dict[str, Any]:
        """{"global": [B,d] unit, "local": [B,N,d] unit patch tokens, "grid": (h, w)} (global even when
        `with_global=False`, which the real VLM may skip: its BatchNorm still sees the batch)."""
        x = self.patchify(images)
        h, w = x.shape[-2:]
        tokens = x.flatten(2).transpose(1, 2)
        return {"global": F.normalize(self.norm(tokens.mean(1)), dim=-1), "local": F.normalize(tokens, dim=-1),
                "grid": (h, w)}

    def encode_text(self, texts: list[str], momentum: bool = False) -> dict[str, Any]:
        """{"global": [B,d] unit, "local": [B,1,d], "mask": [B,1]}: the mean of hashed word embeddings."""
        ids = [[zlib.crc32(t.encode()) % self.vocab for t in text.lower().split()] or [0] for text in texts]
        flat = torch.tensor([i for seq in ids for i in seq])
        offsets = torch.tensor([0] + [len(s) for s in ids[:-1]]).cumsum(0)
        g = F.normalize(self.words(flat, offsets), dim=-1)
        return {"global": g, "local": g[:, None], "mask": torch.ones(len(texts), 1, dtype=torch.bool)}


def square_lesion_batch(n: int, seed: int, labeled: bool, size: int = 32) -> dict[str, Any]:
    """A seeded batch dict for method tests: `n` random images of side `size`, each with one bright square
    lesion of half the side (its mask; all zeros and `has_mask` False when not `labeled`), empty texts."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g)
    masks = torch.zeros(n, 1, size, size)
    for i in range(n):
        r, c = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
        masks[i, 0, r : r + size // 2, c : c + size // 2] = 1.0
        images[i, :, r : r + size // 2, c : c + size // 2] += 0.5
    return {"image": images.clamp(0, 1), "mask": masks if labeled else torch.zeros_like(masks),
            "has_mask": torch.full((n,), labeled), "text": [""] * n, "key": [f"k{seed}_{i}" for i in range(n)]}


def run_ranks(script: Path, args: Sequence[str], world: int = 2, timeout: float = 150.0) -> list[tuple[int, str]]:
    """Run `python SCRIPT ARGS` as `world` processes with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT on a free local port; one thread each) and wait for all of them: (exit code, output) per
    rank. A process still running after `timeout` seconds is killed (the gloo tests of tests/engine)."""
    import socket
    import subprocess

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    procs = []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, log) for p, log in zip(procs, logs)]


def run_cli_in_process(argv: Sequence[str], capsys: Any) -> tuple[int, str, str]:
    """`dusss ARGV` through `dusss.cli.main` in this process: (exit code, stdout, stderr), the output read from
    pytest's `capsys` fixture (in-process CLI tests)."""
    from dusss.cli import main

    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0) if not isinstance(exc.code, str) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _child(argv: list[str], cwd: str, out: int, err: int) -> None:
    """In the forked child: run `dusss argv` in `cwd` with stdout/stderr on `out`/`err`, then `os._exit` with its
    exit code (never returns)."""
    code = 1
    try:
        os.chdir(cwd)
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.argv = ["dusss", *argv]
        from dusss.cli import main

        try:
            main(argv)
            code = 0
        except SystemExit as exc:  # what the interpreter would do with it
            if exc.code is None or isinstance(exc.code, int):
                code = int(exc.code or 0)
            else:
                print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 -- an escape from main() is a defect: show it as the interpreter would
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed or broken stream: nothing more to save
                stream.flush()
        os._exit(code)


def run_cli_forked(jobs: Sequence[tuple[Sequence[str], str]], preload: Sequence[str] = (),
                   timeout: float = 300.0) -> list[tuple[int, str, str, float]]:
    """Run `dusss ARGV` in folder CWD for each (ARGV, CWD) of `jobs`, one after another, each in a child forked
    from this process after importing the CLI and the modules in `preload`. Returns (exit code, stdout, stderr,
    seconds) per job; a child that outlives `timeout` is killed (exit code -9).

    Forking after torch has run compute can hang in the child (OpenMP's thread pool does not survive a fork), so
    call this from a fresh interpreter that has only imported (`python -c`; tests/cli/test_error_sweep.py).
    POSIX only (os.fork)."""
    import importlib

    import dusss.cli

    dusss.cli._register()
    for name in preload:
        importlib.import_module(name)
    results: list[tuple[int, str, str, float]] = []
    with tempfile.TemporaryDirectory(prefix="dusss-forked-") as tmp:
        for i, (argv, cwd) in enumerate(jobs):
            out_path, err_path = Path(tmp, f"{i}.out"), Path(tmp, f"{i}.err")
            out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            sys.stdout.flush()
            sys.stderr.flush()
            t0 = time.monotonic()
            pid = os.fork()
            if pid == 0:
                _child(list(argv), cwd, out, err)
            os.close(out)
            os.close(err)
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    code = os.waitstatus_to_exitcode(status)
                    break
                if time.monotonic() - t0 > timeout:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    code = -9
                    break
                time.sleep(0.005)
            results.append((code, out_path.read_text(errors="replace"), err_path.read_text(errors="replace"),
                            time.monotonic() - t0))
    return results


__all__ = ["BagOfWordsVLM", "run_cli_forked", "run_cli_in_process", "run_ranks", "square_lesion_batch"]
