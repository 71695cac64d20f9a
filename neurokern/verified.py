"""Which GPU kernel variants passed the GPU test suite on which GPU architecture, and the
variant `auto` runs on a GPU because of it.

A *variant* is one GPU code path of a backend (`VARIANTS`), recorded per dtype: the key
`"triton.plif.packed/bfloat16"` is the PACKED Triton PLIF on bf16 tensors. The record,
`neurokern/verified.json` (shipped with the package), holds per key and per GPU architecture
(the compute capability's major version, "9" for an H100) the latest run where the variant
passed and the latest where it failed: GPU name, torch and Triton versions, commit, time and the
tests. Only the writer below produces it, from the JUnit XML of a GPU test run
(`benchmarks/gpu_run.sh`; `python -m neurokern record`): the tests run with the
`record_variants` fixture of tests/conftest.py, which stores the keys of the variants each test
launched on a GPU (`note`) as a property of the test case.

The choice (`choose`), among the variants that could run a call, fastest first:
1. the first one opted in (`NEUROKERN_OPT_IN`) or whose latest result on this GPU's
   architecture is a pass;
2. else the first one whose latest result on some other architecture is a pass;
3. else the one that last passed longest ago (it passed once, failed since);
4. else none: the variants are opt-in. `auto` then takes the next backend (in the end the
   reference) and logs why; an explicitly named backend runs its baseline variant.
On CPU tensors (the Triton interpreter, the CUDA emulation) the record plays no part.
"""

import argparse
import contextlib
import csv
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "verified.json")
ENV_OPT_IN = "NEUROKERN_OPT_IN"
PROPERTY = "neurokern_variants"  # the JUnit property holding a test's launched variant keys

_ALL = ("float16", "bfloat16", "float32", "float64")
_GRU = ("spikgru2plus", "spikgru2plus_bidirectional")
_SPIKE = ("spike", "signed_spike")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One GPU code path. `baseline`: what its backend runs when no optional variant applies;
    an optional one (not baseline) is chosen inside the backend, where the call allows it."""

    name: str
    backend: str
    ops: tuple
    dtypes: tuple  # x's dtype; for SpikGRU2+ the products' dtype (autocast's, else x's compute)
    baseline: bool
    what: str
    min_arch: int = 0  # the oldest compute capability (major) its code supports
    switch: str = ""  # the setting that turns it on, where its trade-off is the user's to make


VARIANTS = {v.name: v for v in (
    Variant("triton.spike.scalar", "triton", _SPIKE, _ALL, True,
            "elementwise kernels, n not specialised: one scalar access per element"),
    Variant("triton.spike.vector", "triton", _SPIKE, _ALL, False,
            "n specialised: 16-byte vector accesses where n is a multiple of 16"),
    Variant("triton.plif.strided", "triton", ("plif",), _ALL, True,
            "time-loop kernels addressing neurons through strides"),
    Variant("triton.plif.packed", "triton", ("plif",), _ALL, False,
            "PACKED path: vector accesses where C*S1*S2 fills whole blocks and strides align"),
    # plif with any option of the generalised neuron (docs/neurons.md): its own kernels' code,
    # so its own record (functional.plif resolves such a call with the variants of
    # "plif_general"); strided addressing only
    Variant("triton.plif.general", "triton", ("plif_general",), _ALL, True,
            "time-loop kernels of the generalised neuron (reset, order, input decay, threshold, "
            "surrogate options), addressing neurons through strides"),
    Variant("triton.spikgru2plus.loops", "triton", _GRU, _ALL, True,
            "per step a cuBLAS product and a fused step kernel, loop replayed in a CUDA graph"),
    Variant("cuda.spikgru2plus.simt", "cuda", _GRU, ("float32", "float64"), True,
            "persistent loops on the FMA units (U in the compute dtype)"),
    Variant("cuda.spikgru2plus.tensor_cores", "cuda", _GRU, ("float16", "bfloat16"), True,
            "persistent loops on the tensor cores (WMMA, 16-bit U under autocast)", min_arch=8),
    Variant("triton.spikgru2plus.split_products", "triton", _GRU, ("float32",), False,
            "float32 products with spike inputs as split bf16 ones (about 7x the error)",
            switch="NEUROKERN_SPLIT_PRODUCTS=1"),
    Variant("cuda.spikgru2plus.split_products", "cuda", _GRU, ("float32",), False,
            "float32 products with spike inputs as split bf16 ones (about 7x the error)",
            switch="NEUROKERN_SPLIT_PRODUCTS=1"),
)}


def key(name: str, dtype) -> str:
    """The record's key of variant `name` on `dtype` (a torch.dtype or its name)."""
    return f"{name}/{str(dtype).removeprefix('torch.')}"


def all_keys() -> List[str]:
    return [key(v.name, d) for v in VARIANTS.values() for d in v.dtypes]


def _load(path: str) -> dict:
    with open(path) as f:
        table = json.load(f)
    if not isinstance(table, dict) or not isinstance(table.get("variants"), dict):
        raise ValueError(f"{path}: not a neurokern record of verified variants "
                         "(expected {\"variants\": {...}})")
    return table


# Read once at import: the choice runs inside torch.compile's traces, which cannot open files.
TABLE = _load(TABLE_PATH)


# ---------------------------------------------------------------------------------------------
# The choice
# ---------------------------------------------------------------------------------------------


def arch(device: torch.device) -> int:
    """The compute capability's major version of CUDA `device` (the record's architecture)."""
    return torch.cuda.get_device_properties(device).major


def _opt_in_names() -> set:
    return {n.strip() for n in os.environ.get(ENV_OPT_IN, "").split(",")} - {""}


def opted_in(k: str) -> bool:
    """Whether `NEUROKERN_OPT_IN` names key `k`: `all`, the variant's name (every dtype) or the
    key itself, comma-separated."""
    return bool(_opt_in_names() & {"all", k, k.split("/")[0]})


def check_opt_in() -> None:
    """Raise ValueError naming NEUROKERN_OPT_IN if it names something that is not a variant."""
    unknown = _opt_in_names() - {"all", *VARIANTS, *all_keys()}
    if unknown:
        raise ValueError(f"environment variable {ENV_OPT_IN} names {sorted(unknown)}, which are "
                         f"no variants; variants are {sorted(VARIANTS)} (or 'all', or a "
                         "'<variant>/<dtype>' key)")


def passed(k: str, architecture, table: Optional[dict] = None) -> bool:
    """Whether the latest result of `k` on `architecture` (major version) is a pass."""
    table = TABLE if table is None else table
    runs = table["variants"].get(k, {}).get(str(architecture), {})
    return "passed" in runs and ("failed" not in runs
                                 or runs["passed"]["time"] > runs["failed"]["time"])


def choose(keys: Sequence[str], architecture: int, table: Optional[dict] = None
           ) -> Optional[str]:
    """The key among `keys` (fastest first) to run on a GPU of `architecture`, or None if
    every one is opt-in (see the module's docstring)."""
    table = TABLE if table is None else table
    keys = [k for k in keys if VARIANTS[k.split("/")[0]].min_arch <= architecture]
    for k in keys:
        if opted_in(k) or passed(k, architecture, table):
            return k
    for k in keys:
        if any(passed(k, a, table) for a in table["variants"].get(k, {})):
            return k
    once = [(runs["passed"]["time"], k) for k in keys
            for runs in table["variants"].get(k, {}).values() if "passed" in runs]
    return min(once)[1] if once else None


_picked: Dict[tuple, str] = {}


def pick(names: Sequence[str], dtype: torch.dtype, device: torch.device) -> str:
    """The variant (of `names`, alternatives of one backend, fastest first, the baseline last)
    that a launcher runs for tensors of `dtype` on `device`: on a GPU `choose`'s, or the baseline
    where every one is opt-in (the backend was chosen, by `auto` for its baseline or by name);
    on the CPU the first. Cached per arguments and NEUROKERN_OPT_IN."""
    if device.type != "cuda":
        return names[0]
    cache = (tuple(names), dtype, device, os.environ.get(ENV_OPT_IN))
    found = _picked.get(cache)
    if found is None:
        chosen = choose([key(n, dtype) for n in names], arch(device))
        found = names[-1] if chosen is None else chosen.split("/")[0]
        if not torch.compiler.is_compiling():
            _picked[cache] = found
    return found


def why(k: str, architecture: Optional[int], table: Optional[dict] = None) -> Tuple[str, str]:
    """`(word, reason)`: whether `auto` may run `k` on a GPU of `architecture` (None: no GPU
    here, the record alone), "verified", "opted in" or "opt-in", and why."""
    table = TABLE if table is None else table
    runs = table["variants"].get(k, {})
    here = str(architecture)
    if opted_in(k):
        return "opted in", f"by {ENV_OPT_IN}"
    if architecture is not None and passed(k, here, table):
        return "verified", f"on sm {here}: {_describe(runs[here]['passed'])}"
    elsewhere = [a for a in runs if passed(k, a, table)]
    if elsewhere:
        other = "" if architecture is None else f", not on this GPU's sm {here}"
        described = _describe(runs[elsewhere[0]]["passed"])
        return "verified", f"on sm {elsewhere[0]}{other}: {described}"
    failed = [f"sm {a}: {_describe(r['failed'])}" for a, r in runs.items() if "failed" in r]
    before = [f"sm {a}: {_describe(r['passed'])}" for a, r in runs.items() if "passed" in r]
    if before:  # choose's third rule: auto takes it where no alternative has passed
        return "failed since", ("failed on " + "; ".join(failed) + "; passed before on "
                                + "; ".join(before))
    if failed:
        return "opt-in", "failed on " + "; ".join(failed)
    return "opt-in", "has not passed the GPU tests yet"


def _describe(entry: dict) -> str:
    text = (f"{entry['gpu']}, torch {entry['torch']}, triton {entry['triton']}, commit "
            f"{entry['commit']}, {entry['time'][:10]}, {entry['source']}")
    if "message" in entry:
        text += f" ({entry['failures']} failed, first {entry['first']}: {entry['message']})"
    return text


# ---------------------------------------------------------------------------------------------
# Recording during a GPU test run
# ---------------------------------------------------------------------------------------------


_launched: Optional[set] = None


def note(name: str, dtype: torch.dtype, device: torch.device) -> None:
    """Called by the launchers: variant `name` runs on `dtype` tensors of `device`. Kept (for
    the test's JUnit property) only inside `recording()` and only on a GPU."""
    # (under torch.compile's tracing of a Function's forward the launch happens later)
    if _launched is not None and device.type == "cuda" and not torch.compiler.is_compiling():
        _launched.add(key(name, dtype))


@contextlib.contextmanager
def recording():
    """Collect the keys `note` sees inside the block into the set it yields."""
    global _launched
    previous, _launched = _launched, set()
    try:
        yield _launched
    finally:
        _launched = previous


# ---------------------------------------------------------------------------------------------
# The writer
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """What the tests that launched one variant key gave: passes and (test id, message) fails."""

    passed: int = 0
    failed: List[tuple] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Run:
    """Where a GPU run happened."""

    gpu: str
    capability: str  # "9.0"
    torch: str
    triton: str
    commit: str
    time: str  # ISO 8601, UTC
    source: str  # "tests" or "benchmark rows (no test results)"

    @property
    def architecture(self) -> str:
        return self.capability.split(".")[0]

    @classmethod
    def here(cls, commit: str) -> "Run":
        """This machine's first GPU and versions, now."""
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: the record is written on the GPU that ran the "
                               "tests")
        from neurokern.triton_kernels import triton_error

        major, minor = torch.cuda.get_device_capability(0)
        triton_version = "none"
        if triton_error is None:
            import triton

            triton_version = triton.__version__
        return cls(torch.cuda.get_device_name(0), f"{major}.{minor}", torch.__version__,
                   triton_version, commit, _now(), "tests")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def junit_outcomes(path: str) -> Dict[str, Outcome]:
    """Per variant key, the outcomes of the test cases of the pytest JUnit XML `path` that
    launched it (the `neurokern_variants` property); skipped tests count for nothing."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as exc:
        raise ValueError(f"{path}: not a readable JUnit XML file ({exc})") from exc
    known = set(all_keys())
    outcomes: Dict[str, Outcome] = {}
    for case in root.iter("testcase"):
        launched = [p.get("value", "") for p in case.iter("property")
                    if p.get("name") == PROPERTY]
        keys = " ".join(launched).split()
        if not keys or case.find("skipped") is not None:
            continue
        unknown = set(keys) - known
        if unknown:
            raise ValueError(f"{path}: test {case.get('name')} names unknown variants "
                             f"{sorted(unknown)}")
        problem = case.find("failure")
        problem = case.find("error") if problem is None else problem
        test = f"{case.get('classname')}::{case.get('name')}"
        for k in keys:
            outcome = outcomes.setdefault(k, Outcome())
            if problem is None:
                outcome.passed += 1
            else:
                message = (problem.get("message") or problem.text or "").strip().splitlines()
                outcome.failed.append((test, message[0][:200] if message else "?"))
    return outcomes


def update(table: dict, run: Run, outcomes: Dict[str, Outcome]) -> dict:
    """`table` with `run`'s outcomes written in: per key and architecture, "passed" (every
    test that launched it passed) or "failed" (with the first failing test and its message)."""
    unknown = set(outcomes) - set(all_keys())
    if unknown:
        raise ValueError(f"no such variants: {sorted(unknown)}")
    table = json.loads(json.dumps(table))  # a copy
    entry = dataclasses.asdict(run)
    for k, outcome in sorted(outcomes.items()):
        runs = table["variants"].setdefault(k, {}).setdefault(run.architecture, {})
        if outcome.failed:
            test, message = outcome.failed[0]
            runs["failed"] = {**entry, "passes": outcome.passed,
                              "failures": len(outcome.failed), "first": test,
                              "message": message}
        else:
            runs["passed"] = {**entry, "passes": outcome.passed}
    table["variants"] = dict(sorted(table["variants"].items()))
    return table


def summary(outcomes: Dict[str, Outcome]) -> List[str]:
    """One line per variant key: passed, FAILED (with the first failing test) or not run."""
    lines = []
    for k in all_keys():
        outcome = outcomes.get(k)
        if outcome is None:
            lines.append(f"not run  {k}")
        elif outcome.failed:
            test, message = outcome.failed[0]
            lines.append(f"FAILED   {k}: {len(outcome.failed)} of "
                         f"{len(outcome.failed) + outcome.passed} tests, first {test}: {message}")
        else:
            lines.append(f"passed   {k} ({outcome.passed} tests)")
    return lines


def save(table: dict, path: str = TABLE_PATH) -> None:
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")


# The benchmark rows of GPU runs before this record existed: (op, provider, dtype) -> variant.
# Every such row predates the optional variants (PACKED PLIF, vector spike kernels, tensor-core
# loops) and the removal of the persistent loops' SIMT path for 16-bit U, so rows name only
# baselines; bf16 rows of "neurokern cuda" ran that removed path and count for nothing.
_BENCHMARK_PROVIDERS = {
    ("plif", "neurokern triton"): "triton.plif.strided",
    ("spike", "neurokern triton"): "triton.spike.scalar",
    ("signed_spike", "neurokern triton"): "triton.spike.scalar",
    ("spikgru2plus", "neurokern triton"): "triton.spikgru2plus.loops",
    ("spikgru2plus", "neurokern cuda"): "cuda.spikgru2plus.simt",
    ("spikgru2plus", "neurokern triton (split products)"): "triton.spikgru2plus.split_products",
    ("spikgru2plus", "neurokern cuda (split products)"): "cuda.spikgru2plus.split_products",
}


def benchmark_runs(paths: Iterable[str], device: str, capability: str
                   ) -> List[tuple]:
    """`[(Run, {key: Outcome})]` from the rows of benchmark CSVs (benchmarks/results) that a GPU
    run wrote on `device`, one Run per commit that added rows (`git blame`; the run was of that
    commit or an earlier one) or per `[commit X]` the provider names. A row is a variant that ran
    there without an error; the benchmarks compare no results, so the Run's source says so."""
    runs: Dict[tuple, Dict[str, Outcome]] = {}
    for path in paths:
        blame = _blame(path)
        with open(path, newline="") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                if row["device"] != device:
                    continue
                provider, _, tagged = row["provider"].partition(" [commit ")
                name = _BENCHMARK_PROVIDERS.get((row["op"], provider))
                if name is None or row["dtype"] not in VARIANTS[name].dtypes:
                    continue
                commit, committed = blame[line]
                run = (tagged.rstrip("]") or commit, committed, row["torch"], row["triton"])
                outcomes = runs.setdefault(run, {})
                outcomes.setdefault(key(name, row["dtype"]), Outcome()).passed += 1
    return [(Run(device, capability, torch_version, triton_version, commit, committed,
                 "benchmark rows (no test results)"), outcomes)
            for (commit, committed, torch_version, triton_version), outcomes
            in sorted(runs.items(), key=lambda item: item[0][1])]


def _blame(path: str) -> Dict[int, tuple]:
    """Line number -> (short commit, commit time) of the commit that added each line."""
    out = subprocess.run(["git", "blame", "--line-porcelain", "--", os.path.basename(path)],
                         cwd=os.path.dirname(os.path.abspath(path)), capture_output=True,
                         text=True, check=True).stdout
    lines, commit = {}, None
    for text in out.splitlines():
        fields = text.split()
        if len(fields) >= 3 and len(fields[0]) == 40 and not text.startswith("\t"):
            commit, line = fields[0][:7], int(fields[2])
        elif text.startswith("committer-time "):
            stamp = datetime.datetime.fromtimestamp(int(fields[1]), datetime.timezone.utc)
            lines[line] = (commit, stamp.isoformat(timespec="seconds"))
    return lines


def main(argv=None) -> int:
    """`python -m neurokern record ...` and `python -m neurokern import-benchmarks ...`."""
    parser = argparse.ArgumentParser(prog="python -m neurokern", description=__doc__
                                     .splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    record = sub.add_parser("record", help="write a GPU test run's results into the record")
    record.add_argument("junit", help="pytest --junitxml file of the GPU test run")
    record.add_argument("--commit", required=True, help="the commit the tests ran")
    record.add_argument("--table", default=TABLE_PATH, help="the record (default: the package's)")
    legacy = sub.add_parser("import-benchmarks",
                            help="write the variants of earlier GPU benchmark rows")
    legacy.add_argument("csv", nargs="+")
    legacy.add_argument("--device", required=True, help="the CSVs' device column")
    legacy.add_argument("--capability", required=True, help="that GPU's, e.g. 9.0")
    legacy.add_argument("--table", default=TABLE_PATH, help="the record (default: the package's)")
    args = parser.parse_args(argv)
    try:
        return _write(args)
    except (ValueError, RuntimeError) as exc:
        print(f"neurokern {args.command}: {exc}", file=sys.stderr)
        return 2


def _write(args) -> int:
    table = _load(args.table) if os.path.exists(args.table) else {"variants": {}}
    if args.command == "record":
        outcomes = junit_outcomes(args.junit)
        run = Run.here(args.commit)
        print(f"variants on {run.gpu} (sm {run.capability}), torch {run.torch}, "
              f"triton {run.triton}, commit {run.commit}:")
        print("\n".join("  " + line for line in summary(outcomes)))
        save(update(table, run, outcomes), args.table)
        return 1 if any(o.failed for o in outcomes.values()) else 0
    for run, outcomes in benchmark_runs(args.csv, args.device, args.capability):
        print(f"{run.commit} {run.time}: {', '.join(sorted(outcomes))}")
        table = update(table, run, outcomes)
    save(table, args.table)
    return 0

