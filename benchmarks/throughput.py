"""Throughput benchmark: images/s, peak memory, and where a training step's time goes, for

  (i)   VLM pre-training steps (DuSSS objective, the default VLM: ViT-192x4 + MiniLM-L6, 128 px, batch 16);
  (ii)  U-Net training steps at the paper's size (224 px, U-Net base width 64, 14.75 M parameters) and the
        demo's (96 px, width 16, batch 8 + 8), fp32 and bf16 autocast + channels_last, three ways: the
        `dusss` method (student + EMA teacher + text masks from the frozen default VLM), the `mt` method
        (student + EMA teacher), and a bare step of the same U-Net on the same images (one forward, BCE,
        backward, AdamW: no method);
  (iii) inference of the student alone (no text), same sizes and precisions.

    python benchmarks/throughput.py                    # CPU (<= 10 minutes on 2 cores)
    python benchmarks/throughput.py --device cuda      # same cases on a GPU (bigger batches, more steps)
    python benchmarks/throughput.py --quick            # smoke run (tiny steps and networks)

Method. Each case runs one untimed step (it counts the FLOPs the first time a model/batch is seen), then
`warmup` more untimed steps and `steps` timed ones; it reports the fastest timed step (on a shared machine
the least disturbed one; the median and all step times are in the JSON). Ratios, per case: `× bare step` =
the method's step over the bare step of the same U-Net, batch, precision and allocator (what the method adds
to the network's own forward + backward + optimizer step); `dusss × mt` = the dusss step over the mt step
(what the text branch adds; issue 14's target is <= 1.3); `speed-up vs fp32` = the fp32 step of the case over
its bf16 (+ channels_last) step. Model FLOPs (matmuls, convolutions, attention; torch's FlopCounterMode) are
reported per image. There is no "fraction of peak" any more: dividing counted FLOPs by a matmul's FLOP/s gave
140 % for the paper U-Net step (convolution algorithms such as Winograd do fewer multiplies than counted), so
it said nothing about headroom. The share of a whole run's wall time spent in the optimizer steps is
`benchmarks/loop_overhead.py`'s figure. Peak memory: on CPU the process's peak resident set (VmHWM, reset per
case through /proc/self/clear_refs after glibc's malloc_trim; the cases share one process, so it includes what
is resident anyway: the "mem at start" column); on CUDA `torch.cuda.max_memory_allocated`. tcmalloc (Debian's
google-perftools) is used for a second pass of the U-Net training cases when its library is installed;
otherwise the JSON says so.

Writes benchmarks/results/throughput.json (or --out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "throughput.json"
TCMALLOC_GLOBS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so*", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so*",
                  "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so*", "/usr/lib/aarch64-linux-gnu/libtcmalloc.so*")

REPORTS = [
    "Bilateral pulmonary infection, two infected areas, middle left lung and middle right lung.",
    "Unilateral pulmonary infection, one infected area, lower left lung.",
    "No pulmonary infection.",
    "Bilateral pulmonary infection, three infected areas, upper left lung and lower right lung.",
]


@dataclass
class Sizes:
    """Batches and step counts per device (CPU: fits 5 minutes on 2 cores)."""

    vlm_batch: int = 16
    paper_batch: int = 1  # labeled = unlabeled = paper_batch at 224 px (2 images per step through the student)
    demo_batch: int = 8
    infer_paper_batch: int = 2
    infer_demo_batch: int = 16
    warmup: int = 0  # extra untimed steps; the FLOP-counting (or first) step of each case always warms up
    steps: int = 2
    paper: tuple[int, int] = (224, 64)  # (px, U-Net base width) of the paper-size cases
    demo: tuple[int, int] = (96, 16)  # ... and of the demo-size ones


CPU_SIZES = Sizes()
CUDA_SIZES = Sizes(vlm_batch=16, paper_batch=8, demo_batch=8, infer_paper_batch=32, infer_demo_batch=64,
                   warmup=3, steps=10)
QUICK_SIZES = Sizes(vlm_batch=4, paper_batch=1, demo_batch=2, infer_paper_batch=1, infer_demo_batch=2,
                    warmup=0, steps=1, paper=(64, 8), demo=(48, 8))  # a smoke run: small networks


@dataclass
class Result:
    case: str
    kind: str  # pretrain | train | inference
    image_size: int
    model: str
    batch: int  # images per step
    precision: str
    channels_last: bool
    allocator: str = "default"
    step_s: float = 0.0
    median_step_s: float = 0.0
    images_per_s: float = 0.0
    flops_per_step: float = 0.0
    tflops: float = 0.0
    peak_mem_mb: float = 0.0
    base_mem_mb: float = 0.0
    step_times: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- measurement
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mb(field_name: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def reset_peak(device: torch.device) -> float:
    """Reset the peak-memory counter; returns the memory in use now (MB)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:  # hand freed heap pages back to the OS, so that the previous case's memory does not count here
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass
    return _rss_mb("VmRSS")


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _rss_mb("VmHWM")


def time_steps(step: Callable[[int], Any], device: torch.device, warmup: int, steps: int) -> list[float]:
    for i in range(warmup):
        step(i)
    _sync(device)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(warmup + i)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def count_flops(step: Callable[[int], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(0)
    return float(counter.get_total_flops())


def autocast(device: torch.device, precision: str) -> Any:
    from dusss.engine.precision import autocast_context

    return autocast_context(device, precision)


# ---------------------------------------------------------------------------------------------- cases
def vlm_pretrain_case(device: torch.device, precision: str, sz: Sizes) -> tuple[Callable[[int], Any], Result]:
    from dusss.methods.pretrain import build_pretrain_objective
    from dusss.models.vlm import VisionLanguageModel, VLMConfig

    torch.manual_seed(0)
    cfg = VLMConfig()
    cfg.image.image_size = 128
    vlm = VisionLanguageModel(cfg).to(device).train()
    objective = build_pretrain_objective("dusss")
    params = [p for p in vlm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    b = sz.vlm_batch
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(b, 3, 128, 128, generator=g).to(device),
             "image_aug": torch.rand(b, 3, 128, 128, generator=g).to(device),
             "text": [REPORTS[i % len(REPORTS)] for i in range(b)],
             "text_aug": [REPORTS[(i + 1) % len(REPORTS)] for i in range(b)]}

    def step(_: int) -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss, _logs = objective(vlm, batch)
        loss.backward()
        opt.step()
        vlm.update_momentum()

    n_params = sum(p.numel() for n, p in vlm.named_parameters() if not n.split(".")[0].endswith("_m"))
    return step, Result(case="VLM pre-training step", kind="pretrain", image_size=128,
                        model=f"default VLM ({n_params / 1e6:.1f} M online)", batch=b, precision=precision,
                        channels_last=False)


def _seg_batches(b: int, size: int, device: torch.device, channels_last: bool) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def one(labeled: bool) -> dict:
        img = torch.rand(b, 3, size, size, generator=g).to(device).contiguous(memory_format=fmt)
        mask = (torch.rand(b, 1, size, size, generator=g) > 0.7).float().to(device)
        return {"image": img, "mask": mask if labeled else torch.zeros_like(mask),
                "has_mask": torch.full((b,), labeled), "text": [REPORTS[i % len(REPORTS)] for i in range(b)]}

    return one(True), one(False)


_VLM_CACHE: dict[tuple[int, str], Any] = {}


def _frozen_vlm(size: int, device: torch.device) -> Any:
    """The default VLM at `size` px (random ViT, packaged MiniLM), built once per size: Step 2 freezes it."""
    from dusss.models.vlm import VisionLanguageModel, VLMConfig

    key = (size, str(device))
    if key not in _VLM_CACHE:
        torch.manual_seed(0)
        cfg = VLMConfig()
        cfg.image.image_size = size
        _VLM_CACHE.clear()
        _VLM_CACHE[key] = VisionLanguageModel(cfg).to(device).eval()
    return _VLM_CACHE[key]


TRAIN_CASES = {"dusss": "U-Net training step (dusss: student + EMA teacher + text mask)",
               "mt": "U-Net training step (mt: student + EMA teacher)",
               "bare": "U-Net bare step (forward + backward + AdamW of the student alone)"}


def unet_bare_case(device: torch.device, precision: str, channels_last: bool, size: int, width: int, b: int
                   ) -> tuple[Callable[[int], Any], Result]:
    """The floor a method's step is measured against: the same U-Net on the same 2b images (the labeled and
    unlabeled batch the student sees), one forward, BCE on a mask, backward and an AdamW step; no method."""
    import torch.nn.functional as F

    from dusss.engine.precision import maybe_channels_last
    from dusss.models.unet import UNet, UNetConfig

    torch.manual_seed(0)
    model = maybe_channels_last(UNet(UNetConfig(base_width=width)).to(device), channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    lab, unl = _seg_batches(b, size, device, channels_last)
    x, y = torch.cat([lab["image"], unl["image"]]), torch.cat([lab["mask"], lab["mask"]])

    def step(_: int) -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = F.binary_cross_entropy_with_logits(model(x).float(), y)
        loss.backward()
        opt.step()

    return step, Result(case=TRAIN_CASES["bare"], kind="train", image_size=size,
                        model=f"U-Net w{width} ({model.num_parameters() / 1e6:.2f} M)", batch=2 * b,
                        precision=precision, channels_last=channels_last)


def unet_train_case(device: torch.device, precision: str, channels_last: bool, size: int, width: int, b: int,
                    method_name: str = "dusss") -> tuple[Callable[[int], Any], Result]:
    from dusss.engine.precision import maybe_channels_last
    from dusss.methods.segmentation import SegMethodConfig, build_seg_method
    from dusss.models.unet import UNet, UNetConfig

    torch.manual_seed(0)
    student = maybe_channels_last(UNet(UNetConfig(base_width=width)).to(device), channels_last)
    method = build_seg_method(method_name, SegMethodConfig(), student,
                              _frozen_vlm(size, device) if method_name == "dusss" else None)
    method.to(device)
    method.train()
    params = method.parameters()
    opt = torch.optim.AdamW(params, lr=3e-4)
    lab, unl = _seg_batches(b, size, device, channels_last)

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss, _logs = method.loss(lab, unl, i, 100)
        loss.backward()
        opt.step()
        method.after_step(i)

    return step, Result(case=TRAIN_CASES[method_name], kind="train",
                        image_size=size, model=f"U-Net w{width} ({student.num_parameters() / 1e6:.2f} M)",
                        batch=2 * b, precision=precision, channels_last=channels_last)


def unet_infer_case(device: torch.device, precision: str, channels_last: bool, size: int, width: int, b: int
                    ) -> tuple[Callable[[int], Any], Result]:
    from dusss.engine.precision import maybe_channels_last
    from dusss.models.unet import UNet, UNetConfig

    torch.manual_seed(0)
    model = maybe_channels_last(UNet(UNetConfig(base_width=width)).to(device), channels_last).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.rand(b, 3, size, size, device=device).contiguous(memory_format=fmt)

    def step(_: int) -> None:
        with torch.inference_mode(), autocast(device, precision):
            torch.sigmoid(model(x).float())

    return step, Result(case="U-Net inference (student only)", kind="inference", image_size=size,
                        model=f"U-Net w{width} ({model.num_parameters() / 1e6:.2f} M)", batch=b,
                        precision=precision, channels_last=channels_last)


_FLOPS: dict[tuple[Any, ...], float] = {}


def run_case(build: Callable[[], tuple[Callable[[int], Any], Result]], device: torch.device, sz: Sizes,
             allocator: str) -> Result:
    if not getattr(build, "needs_vlm", False):
        _VLM_CACHE.clear()  # only the U-Net training cases use the frozen VLM
    base = reset_peak(device)
    step, res = build()
    res.allocator = allocator
    key = (res.case, res.image_size, res.model, res.batch)
    if key not in _FLOPS:  # the same ops in every precision: count once (this step also warms up)
        _FLOPS[key] = count_flops(step)
    else:
        step(0)
    res.flops_per_step = _FLOPS[key]
    times = time_steps(step, device, sz.warmup, max(sz.steps, 1))
    res.step_times = [round(t, 4) for t in times]
    res.step_s = min(times)  # the least disturbed step (the machine may be shared); all are in step_times
    res.median_step_s = statistics.median(times)
    res.images_per_s = res.batch / res.step_s
    res.tflops = res.flops_per_step / res.step_s / 1e12
    res.peak_mem_mb = peak_mb(device)
    res.base_mem_mb = base
    print(f"  {res.case} {res.image_size}px {res.model} {res.precision}{' +CL' if res.channels_last else ''}: "
          f"{res.images_per_s:.2f} img/s, {res.tflops * 1e3:.1f} GFLOP/s, "
          f"peak {res.peak_mem_mb:.0f} MB", flush=True)
    del step
    gc.collect()
    return res


def build_cases(device: torch.device, sz: Sizes, only_train: bool = False
                ) -> list[Callable[[], tuple[Callable[[int], Any], Result]]]:
    bf16 = device.type == "cpu" or torch.cuda.is_bf16_supported()
    precisions = [("fp32", False)] + ([("bf16", True)] if bf16 else [("fp16", True)])
    cases: list[Callable[[], tuple[Callable[[int], Any], Result]]] = []
    if not only_train:
        for prec, _ in precisions:
            cases.append(lambda prec=prec: vlm_pretrain_case(device, prec, sz))
    for (size, width), b in ((sz.paper, sz.paper_batch), (sz.demo, sz.demo_batch)):
        for prec, cl in precisions:
            cases.append(lambda prec=prec, cl=cl, size=size, width=width, b=b:
                         unet_bare_case(device, prec, cl, size, width, b))
            cases.append(lambda prec=prec, cl=cl, size=size, width=width, b=b:
                         unet_train_case(device, prec, cl, size, width, b, "mt"))

            def train_case(prec: str = prec, cl: bool = cl, size: int = size, width: int = width, b: int = b
                           ) -> tuple[Callable[[int], Any], Result]:
                return unet_train_case(device, prec, cl, size, width, b)

            train_case.needs_vlm = True  # type: ignore[attr-defined]
            cases.append(train_case)
    if not only_train:
        for (size, width), b in ((sz.paper, sz.infer_paper_batch), (sz.demo, sz.infer_demo_batch)):
            for prec, cl in precisions:
                cases.append(lambda prec=prec, cl=cl, size=size, width=width, b=b:
                             unet_infer_case(device, prec, cl, size, width, b))
    return cases


# ---------------------------------------------------------------------------------------------- reporting
def find_tcmalloc() -> str | None:
    import glob

    for pattern in TCMALLOC_GLOBS:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "platform": platform.platform(), "device": str(device),
                            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        info["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    return info


def ratios(results: list[dict[str, Any]]) -> None:
    """Add, in place, the figures that say where a step's time goes (instead of a fraction of a matmul peak,
    which convolution algorithms and uncounted work make meaningless): `x_bare` = step / the bare step of the
    same U-Net, batch, precision and allocator; `x_mt` = a dusss step / the mt step; `low_vs_fp32` = the fp32
    step of the same case / this one (the bf16 + channels_last speed-up, > 1 = faster)."""
    def key(r: dict[str, Any], case: str, precision: str | None = None) -> tuple[Any, ...]:
        return (case, r["image_size"], r["model"], r["batch"], precision or r["precision"], r["allocator"])

    index = {key(r, r["case"]): r for r in results}
    for r in results:
        if r["kind"] == "train" and r["case"] != TRAIN_CASES["bare"]:
            bare = index.get(key(r, TRAIN_CASES["bare"]))
            r["x_bare"] = r["step_s"] / bare["step_s"] if bare else None
        if r["case"] == TRAIN_CASES["dusss"]:
            mt = index.get(key(r, TRAIN_CASES["mt"]))
            r["x_mt"] = r["step_s"] / mt["step_s"] if mt else None
        if r["precision"] != "fp32":
            fp32 = index.get(key(r, r["case"], "fp32"))
            r["low_vs_fp32"] = fp32["step_s"] / r["step_s"] if fp32 else None


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    head = (f"Machine: {machine.get('gpu') or machine.get('cpu', '?')}, {machine['threads']} threads, "
            f"torch {machine['torch']}.")
    columns = ("case", "px", "model", "images/step", "precision", "alloc", "step (s)", "images/s", "GFLOP/image",
               "× bare step", "dusss × mt", "speed-up vs fp32", "peak mem (MB)", "mem at start (MB)")
    lines = [head, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]

    def x(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}"

    for r in report["results"]:
        prec = r["precision"] + (" + channels_last" if r["channels_last"] else "")
        lines.append(f"| {r['case']} | {r['image_size']} | {r['model']} | {r['batch']} | {prec} | {r['allocator']} | "
                     f"{r['step_s']:.3f} | {r['images_per_s']:.2f} | {r['flops_per_step'] / r['batch'] / 1e9:.2f} | "
                     f"{x(r.get('x_bare'))} | {x(r.get('x_mt'))} | {x(r.get('low_vs_fp32'))} | "
                     f"{r['peak_mem_mb']:.0f} | {r['base_mem_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--quick", action="store_true", help="tiny batches and 1 step per case (smoke test)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON to write")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--no-tcmalloc", action="store_true", help="skip the tcmalloc pass even if it is installed")
    ap.add_argument("--table", type=Path, default=None, help="print the markdown table of an existing JSON and exit")
    ap.add_argument("--only-train", action="store_true", help=argparse.SUPPRESS)  # the tcmalloc child pass
    ap.add_argument("--allocator", default="default", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.table is not None:
        print(markdown(json.loads(args.table.read_text())))
        return 0
    sys.path.insert(0, str(ROOT / "src"))
    from dusss.engine.precision import resolve_device, set_threads

    t_start = time.time()
    device = resolve_device(args.device)
    set_threads(args.threads)
    sz = QUICK_SIZES if args.quick else (CUDA_SIZES if device.type == "cuda" else CPU_SIZES)
    print(f"device {device}, {torch.get_num_threads()} threads", flush=True)
    results = [run_case(build, device, sz, args.allocator)
               for build in build_cases(device, sz, only_train=args.only_train)]

    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(device), "sizes": asdict(sz),
        "results": [asdict(r) for r in results],
    }
    if args.only_train:  # child pass: hand the results to the parent
        print("JSON:" + json.dumps(report))
        return 0

    lib = find_tcmalloc()
    if device.type != "cpu":
        report["tcmalloc"] = {"status": "not applicable (GPU run)"}
    elif lib is None:
        report["tcmalloc"] = {"status": "not installed", "looked_for": list(TCMALLOC_GLOBS)}
    elif args.no_tcmalloc:
        report["tcmalloc"] = {"status": f"skipped (--no-tcmalloc); found {lib}"}
    else:
        env = {**os.environ, "LD_PRELOAD": f"{lib} {os.environ.get('LD_PRELOAD', '')}".strip()}
        cmd = [sys.executable, __file__, "--device", args.device, "--only-train", "--allocator", "tcmalloc",
               "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("JSON:")), None)
        if proc.returncode or line is None:
            report["tcmalloc"] = {"status": f"failed (exit {proc.returncode})", "library": lib,
                                  "stderr": proc.stderr[-2000:]}
        else:
            child = json.loads(line[5:])
            report["results"].extend(child["results"])
            report["tcmalloc"] = {"status": "used for a second pass of the U-Net training cases", "library": lib}
    ratios(report["results"])
    report["seconds"] = round(time.time() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(markdown(report))
    print(f"\ntcmalloc: {report['tcmalloc']['status']}")
    print(f"wrote {args.out} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
