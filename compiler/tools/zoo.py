"""The zoo comparison: `cnnc bench` on every model of examples/zoo at batch 1 and 64 on 1 and 2
threads, against ONNX Runtime, OpenVINO and PyTorch, in one run; written as a table (images/s,
cnnc / best peer, geometric mean and worst ratio, the measured peak, the CPU) between marker
comments in docs/performance.md, and as a plot beside it.

    python -m cnnc.tools.zoo [--models lenet,vgg_bn] [--rounds 7] [--out docs/performance.md]

It runs from a source checkout: the zoo's definitions and weights come from
examples/zoo/make_weights.py, which needs PyTorch.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import os
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType

import cnnc
from cnnc.profile import node_flops
from cnnc.target import host_cpu
from cnnc.tools.bench import Report, run_bench
from cnnc.tools.engines import EngineUnavailable

ROOT = Path(__file__).resolve().parents[2]
ZOO = ROOT / "examples" / "zoo"
BEGIN, END = "<!-- zoo:begin -->", "<!-- zoo:end -->"
BATCHES = [1, 64]
THREADS = [1, 2]
CNNC = "cnnc-llvm"
# Engine name in the bench -> (column title, distribution whose version the table names).
PEERS = {"onnxruntime": ("ONNX Runtime", "onnxruntime"), "openvino": ("OpenVINO", "openvino"),
         "torch": ("PyTorch", "torch")}
# CPUs busy above this share, measured just before the run, mark the numbers as provisional.
BUSY_LOAD_PER_CPU = 0.25
BUSY_SECONDS = 2.0  # how long that is measured


def busy_cpus(seconds: float = BUSY_SECONDS) -> float:
    """How many CPUs other work keeps busy now: from /proc/stat over `seconds` (a 1-minute
    load average would still count a test suite that ended before the run), else the load
    average where there is no /proc/stat."""

    def times() -> tuple[int, int]:
        with open("/proc/stat") as file:
            fields = [int(value) for value in file.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total, idle = times()
        time.sleep(seconds)
        total2, idle2 = times()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0]
    elapsed = max(total2 - total, 1)
    return (os.cpu_count() or 1) * (1 - (idle2 - idle) / elapsed)


@dataclass
class Point:
    """One model at one thread count and batch size: images/s per engine that agreed."""

    model: str
    threads: int
    batch: int
    rates: dict[str, float]

    @property
    def label(self) -> str:
        return f"{self.threads} thr b{self.batch}"

    @property
    def best_peer(self) -> float | None:
        peers = [rate for name, rate in self.rates.items() if name != CNNC]
        return max(peers) if peers else None

    @property
    def ratio(self) -> float | None:
        best = self.best_peer
        return self.rates[CNNC] / best if best and CNNC in self.rates else None


def load_make_weights(zoo: Path = ZOO) -> ModuleType:
    """examples/zoo/make_weights.py, a script rather than a module of the package."""
    path = zoo / "make_weights.py"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; run this from a source checkout of cnnc")
    spec = importlib.util.spec_from_file_location("zoo_make_weights", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mflops(graph: cnnc.Graph) -> float:
    return sum(node_flops(graph, node) for node in graph.order()[1:]) / 1e6


def compile_seconds(graph: cnnc.Graph) -> tuple[float, float]:
    """Seconds `cnnc.compile` takes for the llvm target: cold (LLVM runs, the compile cache is
    not read) and cached (its object code found in the cache; the passes run again)."""
    start = time.perf_counter()
    cnnc.compile(graph, use_cache=False)
    cold = time.perf_counter() - start
    cnnc.compile(graph)  # stores the object code
    start = time.perf_counter()
    cnnc.compile(graph)
    return cold, time.perf_counter() - start


def measure(names: list[str], rounds: int, zoo: Path = ZOO
            ) -> tuple[list[Point], dict[str, float], list[str], dict[str, tuple[float, float]]]:
    """Bench every model; returns the points, MFLOP/image per model, the bench's notes and
    each model's compile times (`compile_seconds`)."""
    make_weights = load_make_weights(zoo)
    points: list[Point] = []
    flops: dict[str, float] = {}
    notes: list[str] = []
    compiles: dict[str, tuple[float, float]] = {}
    for name in names:
        graph = cnnc.load(make_weights.write(name, zoo))
        flops[name] = mflops(graph)
        compiles[name] = compile_seconds(graph)
        print(f"zoo: {name} ({flops[name]:.1f} MFLOP/image)", file=sys.stderr, flush=True)
        report: Report = run_bench(graph, None, "llvm", BATCHES, THREADS, list(PEERS),
                                   rounds=rounds,
                                   progress=lambda line: print(f"  {line}", file=sys.stderr,
                                                               flush=True))
        notes += [f"{name}: {note}" for note in report.notes]
        for threads in THREADS:
            for batch in BATCHES:
                rates = {result.engine: result.images_per_second for result in report.results
                         if (result.threads, result.batch) == (threads, batch)}
                points.append(Point(name, threads, batch, rates))
    return points, flops, notes, compiles


def compile_table(compiles: dict[str, tuple[float, float]]) -> list[str]:
    return ["Compile time of `cnnc.compile(MODEL)` (llvm), in this process before the bench:",
            "", "| model | cold | cached |", "|---|---:|---:|",
            *(f"| {name} | {cold:.2f} s | {cached:.3f} s |"
              for name, (cold, cached) in compiles.items())]


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _rate(rate: float | None) -> str:
    return "–" if rate is None else f"{rate:,.0f}"


def _ratio(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:.2f}×"


def table(points: list[Point], flops: dict[str, float], peak_gflops: float) -> list[str]:
    """The markdown table; `% of peak` is cnnc's arithmetic rate over threads × the core peak."""
    lines = ["| model (MFLOP/img) | point | cnnc | "
             + " | ".join(title for title, _ in PEERS.values())
             + " | cnnc / best | cnnc % of peak |",
             "|---|---|" + "---:|" * (len(PEERS) + 3)]
    previous = ""
    for point in points:
        model = f"{point.model} ({flops[point.model]:.1f})" if point.model != previous else ""
        previous = point.model
        cnnc_rate = point.rates.get(CNNC)
        share = "–" if cnnc_rate is None else \
            f"{cnnc_rate * flops[point.model] / 1e3 / (peak_gflops * point.threads):.0%}"
        lines.append(f"| {model} | {point.label} | {_rate(cnnc_rate)} | "
                     + " | ".join(_rate(point.rates.get(name)) for name in PEERS)
                     + f" | {_ratio(point.ratio)} | {share} |")
    return lines


def summary(points: list[Point]) -> str:
    ratios = [(point.ratio, point) for point in points if point.ratio is not None]
    if not ratios:
        return "No point has both cnnc and a peer timed."
    mean = math.exp(sum(math.log(ratio) for ratio, _ in ratios) / len(ratios))
    worst, where = min(ratios, key=lambda item: item[0])
    # three places: the goal is a threshold (1.5x), which two places would round across
    return (f"Over {len(ratios)} points: geometric mean of cnnc / best peer **{mean:.3f}×**, "
            f"worst **{worst:.2f}×** ({where.model}, {where.label}).")


def section(points: list[Point], flops: dict[str, float], notes: list[str], rounds: int,
            command: str, plot_name: str | None, load: float,
            compiles: dict[str, tuple[float, float]] | None = None) -> str:
    cpu = host_cpu()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpus = os.cpu_count() or 1
    peers = ", ".join(f"{title} {_version(dist)}" for title, dist in PEERS.values())
    lines = [BEGIN, f"Measured {when} by `{command}`, in one run.", "",
             f"- Machine: {cpu.model} ({cpu.llvm_cpu}), {cpus} CPUs; {cpu.describe_peak()}.",
             f"- Engines: cnnc {cnnc.__version__} (llvm, the default heuristic's schedules), "
             f"{peers}. Each engine runs in a process of its own and is checked against the "
             "reference (rtol=1e-4, atol=1e-5) before it is timed; images/s are the median "
             f"of {rounds} interleaved rounds. The weights are PyTorch's default "
             "initialisation (examples/zoo/make_weights.py).",
             f"- CPUs busy with other work just before the run: {load:.2f} of {cpus}."]
    if load > BUSY_LOAD_PER_CPU * cpus:
        lines.append("- **The machine was busy with other work during this run: these numbers "
                     "are provisional; rerun the command on a quiet machine before quoting "
                     "them.**")
    lines += ["", *table(points, flops, cpu.peak_gflops_per_core), "", summary(points)]
    if compiles:
        lines += ["", *compile_table(compiles)]
    if plot_name:
        lines += ["", f"![cnnc / best peer per zoo model and point]({plot_name})"]
    if notes:
        lines += ["", "Notes of the bench:", *(f"- {note}" for note in notes)]
    return "\n".join([*lines, END])


def write_section(path: Path, text: str) -> None:
    """Replace the text between the markers in `path`, or add a section at its end."""
    document = path.read_text(encoding="utf-8") if path.exists() else "# Performance\n"
    if BEGIN in document and END in document:
        head, rest = document.split(BEGIN, 1)
        document = head + text + rest.split(END, 1)[1]
    else:
        document = document.rstrip("\n") + "\n\n## The zoo\n\n" + text + "\n"
    path.write_text(document, encoding="utf-8")


def plot(points: list[Point], path: Path) -> None:
    """cnnc / best peer per model, one bar per point, with the line of parity."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EngineUnavailable("matplotlib is not installed (pip install -e '.[bench]')") \
            from None
    models = list(dict.fromkeys(point.model for point in points))
    labels = list(dict.fromkeys(point.label for point in points))
    width = 0.8 / len(labels)
    figure, axis = plt.subplots(figsize=(max(6.0, 1.3 * len(models)), 4))
    for number, label in enumerate(labels):
        ratios = [next((point.ratio or 0.0 for point in points
                        if point.model == model and point.label == label), 0.0)
                  for model in models]
        axis.bar([index + number * width for index in range(len(models))], ratios, width,
                 label=label)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_xticks([index + width * (len(labels) - 1) / 2 for index in range(len(models))],
                    models, rotation=20)
    axis.set_ylabel("cnnc / best of ONNX Runtime, OpenVINO, PyTorch")
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnnc.tools.zoo",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated zoo models; default: all")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per engine")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md",
                        help="the markdown file whose zoo section is replaced")
    parser.add_argument("--plot", type=Path,
                        help="the PNG to draw; default: zoo.png beside --out")
    args = parser.parse_args(argv)
    known = list(load_make_weights().MODELS)
    names = args.models.split(",") if args.models else known
    for name in names:
        if name not in known:
            parser.error(f"unknown zoo model '{name}'; expected one of {', '.join(known)}")
    if args.rounds < 3:
        parser.error("--rounds must be at least 3")
    load = busy_cpus()
    points, flops, notes, compiles = measure(names, args.rounds)
    plot_path = args.plot or args.out.parent / "zoo.png"
    plot_name: str | None = os.path.relpath(plot_path, args.out.parent)
    try:
        plot(points, plot_path)
    except EngineUnavailable as error:
        print(f"zoo: no plot: {error}", file=sys.stderr)
        plot_name = None
    command = "python -m cnnc.tools.zoo " + " ".join(sys.argv[1:] if argv is None else argv)
    text = section(points, flops, notes, args.rounds, command.strip(), plot_name, load,
                   compiles)
    write_section(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
