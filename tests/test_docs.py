"""Every fenced code block of README.md and docs/*.md is run or checked, so the docs cannot drift.

- ```python blocks run, in order, one namespace per file (a block may use the names of the
  blocks before it in the same file), on the CPU, in a scratch working directory. Blocks are
  compiled with the markdown file's name and line numbers, so a failure's traceback points at
  the line of the .md file.
- ```bash (or sh, shell) blocks are checked, not run (they build, install or train): each
  command's program must be one the checkers below know. `python -m pytest` flags must be
  pytest's and its test paths must exist. `python -m MODULE ARGS` and
  `python SCRIPT ARGS` (also under `torchrun`) have ARGS parsed by the program's own argparse
  parser (its `parse_args` stopped before the program does anything; no abbreviated flags);
  `pip install` flags must appear in `pip install --help` and its requirement files and paths
  must exist; `bash run.sh X` needs the subcommand X in run.sh; `bash SCRIPT` needs the script,
  and the environment variables set before it must be read by it.
- ```text and untagged blocks are output or file layouts, not code: not checked. Any other
  language fails until a checker is added here.
- A block is left out only when the line before its fence is `<!-- not run: REASON -->`; the
  reasons are listed as skips (`pytest -rs tests/test_docs.py`). Keep them rare: prefer small
  stand-ins, visibly defined in the block or an earlier one, over marking a block.

- Links: every relative link of README.md and docs/*.md points to an existing file, and to an
  existing heading where it names an anchor; every docs/*.md page is reachable from
  docs/index.md.
- docs/results.md: its tables are generated from benchmarks/results/*.csv
  (`python tests/test_docs.py --write-results`) and must equal what the CSVs give.

The examples run at the sizes written in the docs: they are small by design (the paper's sizes
are named in their comments), so there is no hidden size substitution here.
"""

import argparse
import contextlib
import io
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional
from unittest import mock

import pytest
import torch

from neurokern import dispatch

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_CODE = {"", "text"}
BASH = {"bash", "sh", "shell"}
FENCE = re.compile(r"^( *)(```+)\s*([\w+-]*)")   # indented: a block in a list item
NOT_RUN = re.compile(r"^\s*<!--\s*not run:\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    path: Path
    line: int                   # 1-based line of the first code line (after the fence)
    lang: str
    code: str
    not_run: Optional[str]      # the reason of a `<!-- not run: ... -->` marker, else None

    @property
    def where(self):
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def extract_blocks(path: Path) -> List[Block]:
    """The fenced code blocks of a markdown file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, k = [], 0
    while k < len(lines):
        m = FENCE.match(lines[k])
        if not m:
            k += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3).lower()
        end = k + 1
        while end < len(lines) and not re.fullmatch(rf"\s*{fence}`*\s*", lines[end]):
            end += 1
        if end == len(lines):
            raise ValueError(f"{path}:{k + 1}: code fence never closed")
        before = next((lines[j] for j in range(k - 1, -1, -1) if lines[j].strip()), "")
        marker = NOT_RUN.match(before)
        reason = None
        if marker:
            reason = marker.group(1)
            if not reason:
                raise ValueError(f"{path}:{k}: `<!-- not run: -->` needs a reason")
        code = "".join(line[indent:] + "\n" for line in lines[k + 1:end])
        blocks.append(Block(path, k + 2, lang, code, reason))
        k = end + 1
    return blocks


ALL_BLOCKS = [b for path in DOC_FILES for b in extract_blocks(path)]
CHECKED = [b for b in ALL_BLOCKS if b.lang not in NOT_CODE]


def test_docs_found():
    """The extraction sees the docs (a wrong glob would make every other test vacuous)."""
    assert (ROOT / "README.md") in DOC_FILES and len(DOC_FILES) > 5
    assert sum(b.lang == "python" for b in ALL_BLOCKS) >= 5
    assert sum(b.lang in BASH for b in ALL_BLOCKS) >= 3


def test_no_unchecked_language():
    unchecked = [f"{b.where} ```{b.lang}" for b in CHECKED if b.lang not in ("python", *BASH)]
    assert not unchecked, (f"no checker in tests/test_docs.py for the blocks {unchecked}; add "
                           "one, or tag a block ```text if it is not code")


@pytest.mark.parametrize("block", [b for b in CHECKED if b.not_run], ids=lambda b: b.where)
def test_marked_not_run(block):
    pytest.skip(f"{block.where} ```{block.lang}: not run: {block.not_run}")


# ---------------------------------------------------------------------------------------------
# ```python: run
# ---------------------------------------------------------------------------------------------

PYTHON_FILES = sorted({b.path for b in CHECKED if b.lang == "python" and not b.not_run})


@pytest.mark.parametrize("path", PYTHON_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path, tmp_path, monkeypatch):
    """The file's python blocks, in order, in one namespace (on the CPU: tensors are created
    on the CPU unless a block asks for a device, and CI has none)."""
    monkeypatch.chdir(tmp_path)           # files a block writes land in a scratch folder
    # docs/extending.md registers a backend: into a copy of the registry, dropped afterwards
    monkeypatch.setattr(dispatch, "_IMPLEMENTATIONS", dict(dispatch._IMPLEMENTATIONS))
    monkeypatch.setattr(dispatch, "_resolved", {})
    namespace = {"__name__": "__main__"}
    for block in extract_blocks(path):
        if block.lang != "python" or block.not_run:
            continue
        # leading newlines: the code object's line numbers are the .md file's
        code = compile("\n" * (block.line - 1) + block.code, str(path), "exec")
        try:
            exec(code, namespace)
        except Exception as e:
            raise AssertionError(f"the ```python block at {block.where} fails: "
                                 f"{type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------------------------------
# ```bash: check each command
# ---------------------------------------------------------------------------------------------

SEPARATORS = {"&&", "||", ";", "|"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def bash_commands(code):
    """Each command of a bash block as argv: continuations joined, comments dropped, `$(...)`
    substitutions checked as commands of their own and replaced by a placeholder word."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        for inner in re.findall(r"\$\(([^()]*)\)", line):
            commands += bash_commands(inner)
        line = re.sub(r"\$\([^()]*\)", "SUBSTITUTED", line)
        argv = []
        for word in shlex.split(line, comments=True):
            if word in SEPARATORS:
                commands.append(argv)
                argv = []
            else:
                argv.append(word)
        commands.append(argv)
    return [c for c in commands if c]


class _Parsed(Exception):
    """Raised by the patched `ArgumentParser.parse_args`: the arguments parsed, stop here."""


def parse_cli(where, name, run, args, stop=True):
    """Run `run()` (a program's `__main__`) with `sys.argv = [name, *args]` until it has parsed
    its arguments, then stop it and return them (`stop`: by patching
    `ArgumentParser.parse_args`; else `run` raises `_Parsed` itself); fail with argparse's
    message if they do not parse. Abbreviated flags are refused: a flag the docs shorten would
    break when another flag shares its start."""
    parse_args = argparse.ArgumentParser.parse_args

    def parse_exact(self, argv=None, namespace=None):
        self.allow_abbrev = False
        parsed = parse_args(self, argv, namespace)
        if stop:
            raise _Parsed(parsed)
        return parsed

    stderr = io.StringIO()
    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_exact), \
            mock.patch.object(sys, "argv", [name, *args]), \
            contextlib.redirect_stderr(stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # runpy: module already imported
        try:
            run()
        except _Parsed as parsed:
            return parsed.args[0]     # the argparse.Namespace
        except SystemExit as e:
            pytest.fail(f"{where}: `{name} {shlex.join(args)}`: the arguments do not parse "
                        f"(exit {e.code}): {stderr.getvalue().strip()}")
    pytest.fail(f"{where}: `{name} {shlex.join(args)}` never parsed its arguments with argparse")


def check_python(where, args):
    if args[:1] == ["-m"] and len(args) > 1:
        module, rest = args[1], args[2:]
        if module == "pip":
            return check_pip(where, rest)
        if module == "pytest":
            return check_pytest(where, rest)
        if module == "neurokern" or module.startswith("neurokern."):
            __import__(module)
            parser_fn = getattr(sys.modules[module], "parse_args", None)
            if callable(parser_fn):   # the module's own parse_args, with its value checks

                def run():
                    raise _Parsed(parser_fn(rest))

                return parse_cli(where, f"python -m {module}", run, rest, stop=False)
            return parse_cli(where, f"python -m {module}", lambda: runpy.run_module(
                module, run_name="__main__", alter_sys=True), rest)
        pytest.fail(f"{where}: no check for `python -m {module}` in tests/test_docs.py")
    if args and args[0].endswith(".py"):
        script = ROOT / args[0]
        assert script.is_file(), f"{where}: {args[0]} does not exist"
        with mock.patch.object(sys, "path", [str(script.parent), *sys.path]):
            return parse_cli(where, f"python {args[0]}",
                             lambda: runpy.run_path(str(script), run_name="__main__"), args[1:])
    pytest.fail(f"{where}: no check for `python {shlex.join(args)}` in tests/test_docs.py")


_pip_help = {}


def check_pip(where, args):
    """`pip install` / `pip download`: flags must be that command's, files named must exist,
    requirements must parse."""
    command = args[0] if args else ""
    assert command in ("install", "download"), f"{where}: no check for `pip {shlex.join(args)}`"
    if command not in _pip_help:
        _pip_help[command] = subprocess.run(
            [sys.executable, "-m", "pip", command, "--help"], capture_output=True, text=True,
            check=True).stdout
    words = iter(args[1:])
    for word in words:
        if word.startswith("-"):
            flag = word.split("=")[0]
            assert re.search(rf"(^|[\s,]){re.escape(flag)}([\s,=]|$)", _pip_help[command],
                             re.M), f"{where}: `pip {command} {flag}` is not a pip option"
            if flag in ("-r", "--requirement", "-e", "--editable"):
                word = next(words)
                assert (ROOT / word).exists(), f"{where}: {word} (after {flag}) does not exist"
            elif flag in ("-d", "--dest", "--python-version") and "=" not in word:
                next(words)  # a folder pip creates, a version: nothing to check
        elif word.startswith((".", "/")):
            assert (ROOT / word).exists(), f"{where}: {word} does not exist"
        else:   # a requirement, e.g. torch==2.13.0
            from packaging.requirements import Requirement
            Requirement(word)


def check_pytest(where, args):
    """`python -m pytest` flags must be pytest's, and its test paths (before `::`) must exist."""
    if "pytest" not in _pip_help:
        _pip_help["pytest"] = subprocess.run(
            [sys.executable, "-m", "pytest", "--help"], capture_output=True, text=True,
            check=True, cwd=ROOT).stdout
    for word in args:
        if word.startswith("-"):
            flag = word.split("=")[0]
            assert re.search(rf"(^|[\s,]){re.escape(flag)}([\s,=]|$)", _pip_help["pytest"],
                             re.M), f"{where}: `pytest {flag}` is not a pytest option"
        elif word.startswith("tests"):
            path = word.split("::")[0]
            assert (ROOT / path).exists(), f"{where}: {path} does not exist"


def check_torchrun(where, args):
    from torch.distributed.run import get_args_parser
    parser = get_args_parser()

    def run():
        raise _Parsed(parser.parse_args(args))

    ns = parse_cli(where, "torchrun", run, args, stop=False)
    inner = ["-m", ns.training_script] if ns.module else [ns.training_script]
    check_python(where, inner + ns.training_script_args)


def check_bash(where, args, env):
    script = ROOT / args[0]
    assert script.is_file(), f"{where}: {args[0]} does not exist"
    text = script.read_text()
    for name in env:
        assert re.search(rf"\${{?{name}\b", text), \
            f"{where}: {name}= is set for {args[0]}, which never reads ${name}"
    if args[0] == "run.sh":
        commands = re.findall(r"^\s+([\w|-]+)\)", text, re.M)   # the case labels
        assert len(args) > 1 and any(args[1] in c.split("|") for c in commands), \
            f"{where}: `bash run.sh {' '.join(args[1:2])}`: run.sh has the commands {commands}"


@pytest.mark.parametrize("block", [b for b in CHECKED if b.lang in BASH and not b.not_run],
                         ids=lambda b: b.where)
def test_bash_block_commands(block, monkeypatch):
    monkeypatch.chdir(ROOT)
    for argv in bash_commands(block.code):
        env = []
        while argv and ENV_ASSIGNMENT.match(argv[0]):
            env.append(argv.pop(0).split("=")[0])
        program, args = argv[0], argv[1:]
        if program in ("python", "python3"):
            check_python(block.where, args)
        elif program == "pip":
            check_pip(block.where, args)
        elif program == "torchrun":
            check_torchrun(block.where, args)
        elif program == "bash":
            check_bash(block.where, args, env)
        elif program == "git":
            pass   # only in `$(git rev-parse ...)`: a standard tool, nothing of ours to check
        else:
            pytest.fail(f"{block.where}: no check for the program `{program}` in "
                        "tests/test_docs.py")


# ---------------------------------------------------------------------------------------------
# Links: every relative link resolves, every page is reachable from docs/index.md
# ---------------------------------------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^()\s]+)\)")   # [text](target); images have no check


def _prose(text, inline_code=False):
    """`text` without fenced code blocks and (unless `inline_code`) inline code: a link there
    is not a link."""
    text = re.sub(r"^( *)(```+).*?^\1\2`*\s*$", "", text, flags=re.M | re.S)
    return text if inline_code else re.sub(r"`[^`\n]*`", "", text)


def heading_anchors(path: Path):
    """GitHub's anchors of a page's headings: lower case, punctuation but `-` and `_` dropped,
    spaces to `-`; a repeated heading gets `-1`, `-2`, ..."""
    anchors, seen = set(), {}
    for line in _prose(path.read_text(encoding="utf-8"), inline_code=True).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def relative_links(path: Path):
    """`(target path relative to ROOT, anchor or None)` of every relative link of a page."""
    out = []
    for target in LINK.findall(_prose(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        out.append((resolved.relative_to(ROOT).as_posix(), anchor or None))
    return out


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    broken = []
    for target, anchor in relative_links(path):
        if not (ROOT / target).exists():
            broken.append(f"{target}: no such file")
        elif anchor and target.endswith(".md") and anchor not in heading_anchors(ROOT / target):
            broken.append(f"{target}#{anchor}: no such heading")
    assert not broken, f"{path.relative_to(ROOT)} links to {broken}"


def test_every_page_is_reachable_from_the_index():
    index = "docs/index.md"
    seen, todo = {index}, [index]
    while todo:
        for target, _ in relative_links(ROOT / todo.pop()):
            if target.endswith(".md") and target not in seen and (ROOT / target).exists():
                seen.add(target)
                todo.append(target)
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    assert pages - seen == set(), f"pages no link chain from {index} reaches: {pages - seen}"
    assert index in {t for t, _ in relative_links(ROOT / "README.md")}, \
        f"README.md does not link to {index}"


def test_link_checks_can_fail(tmp_path, monkeypatch):
    """The checks see a broken link, a broken anchor and an unlinked page, and skip code."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("[docs](docs/index.md)\n")
    index = tmp_path / "docs/index.md"
    index.write_text("# Index\n[a](a.md#usage-the-x-op) `[b](b.md)`\n")
    (tmp_path / "docs/a.md").write_text("# Usage: the `x` op\n```\n# not a heading\n```\n")
    (tmp_path / "docs/b.md").write_text("[gone](gone.md)\n")
    test_relative_links_resolve(index)        # the anchor exists
    with pytest.raises(AssertionError, match="docs/b.md"):
        test_every_page_is_reachable_from_the_index()   # b.md: its link is inline code
    with pytest.raises(AssertionError, match="gone.md: no such file"):
        test_relative_links_resolve(tmp_path / "docs/b.md")
    index.write_text("[a](a.md#not-a-heading) [b](b.md)\n")
    with pytest.raises(AssertionError, match="no such heading"):
        test_relative_links_resolve(index)


# ---------------------------------------------------------------------------------------------
# docs/results.md: its tables are generated from benchmarks/results/*.csv, never typed
# ---------------------------------------------------------------------------------------------

RESULTS_PAGE = ROOT / "docs" / "results.md"
RESULTS_DIR = ROOT / "benchmarks" / "results"
BEGIN_GENERATED = ("<!-- generated from benchmarks/results/*.csv by "
                   "`python tests/test_docs.py --write-results`; do not edit by hand -->")
END_GENERATED = "<!-- end of the generated tables -->"
RESULT_FILES = [  # (csv, title, script)
    ("spikgru2plus", "SpikGRU2+", "bench_spikgru2plus.py"),
    ("plif", "PLIF", "bench_plif.py"),
    ("spike", "Spike activations", "bench_spike.py"),
    ("train_step", "One training step (forward, cross-entropy, backward, Adam)",
     "bench_train_step.py"),
    ("compat", "SpikingJelly and snnTorch neurons beside neurokern.compat", "bench_compat.py"),
]
MODES = ("forward", "backward", "fwd+bwd")
HEADLINE_CASES = {   # the cases of the "At a glance" table: the paper's sizes, the CPU defaults
    "layer L1 B32 T90 I512 H1024", "stack L3 B32 T90 I512 H1024", "32x90x64x22x22",
    "paper B32 T90", "layer L1 B8 T90 I256 H256", "4x90x64x11x11", "small B16 T16",
}


def left_out(row):
    """Why a CSV row is not a current result (None: it is). The CSVs keep every run."""
    if "[commit " in row["provider"]:
        return "rows whose provider names a `[commit ...]`: code since replaced"
    if (row["provider"].startswith("neurokern cuda") and row["dtype"] != "float32"
            and row["date"] <= "2026-11-23"):
        return ("`neurokern cuda` rows in bfloat16 of 2026-11-23 and before: the persistent "
                "loops' former SIMT path for 16-bit weights, replaced by the tensor-core loops")
    return None


def result_command(script, row):
    """The command that produces `row` (a full run: a superset of the quick runs' rows)."""
    device = "cuda" if not row["device"].startswith("CPU") else "cpu"
    words = [f"python benchmarks/{script}", f"--device {device}"]
    if "(split products)" in row["provider"]:
        words.append("--split-products")
    if row["size"].startswith("varlen") and device == "cpu":
        words.append("--lengths")
    threads = re.search(r"x(\d+) threads", row["device"])
    prefix = f"OMP_NUM_THREADS={threads.group(1)} " if threads else ""
    return prefix + " ".join(words)


def results_tables():
    """The generated part of docs/results.md: per benchmark, device and command, the latest
    row of every (case, dtype, provider, mode) as it stands in the CSV."""
    import csv
    out, dropped, glance = [], {}, []
    for name, title, script in RESULT_FILES:
        with open(RESULTS_DIR / f"{name}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        groups = {}   # (device, command) -> {(case, dtype, provider): {mode: row}}
        for row in rows:
            reason = left_out(row)
            if reason:
                dropped[reason] = dropped.get(reason, 0) + 1
                continue
            case = row["size"] if name not in ("spike", "compat") else f"{row['op']} {row['size']}"
            key = (row["device"], result_command(script, row))
            groups.setdefault(key, {}).setdefault((case, row["dtype"], row["provider"]),
                                                  {})[row["mode"]] = row
        for (device, command), lines in sorted(groups.items(), key=lambda g: (
                g[0][0].startswith("CPU"), g[0][0], g[0][1])):
            chosen = [r for modes in lines.values() for r in modes.values()]
            dates = sorted({r["date"] for r in chosen})
            torch_versions = ", ".join(sorted({r["torch"] for r in chosen}))
            triton_versions = ", ".join(sorted({r["triton"] for r in chosen}))
            flags = " ".join(w for w in command.split() if w.startswith("--")
                             and w != "--device")
            out += [f"### {title}: {device}" + (f" ({flags})" if flags else ""), "",
                    f"- date: {dates[0]}" + (f" to {dates[-1]}" if len(dates) > 1 else ""),
                    f"- device: {device}",
                    f"- torch {torch_versions}, Triton {triton_versions}",
                    f"- data: `benchmarks/results/{name}.csv`", "",
                    "```bash", command, "```", "",
                    "| case | dtype | provider | forward ms | backward ms | fwd+bwd ms | "
                    "fwd+bwd q20-q80 ms | peak MB | floor fwd ms | floor fwd+bwd ms | date |",
                    "|---|---|---|---|---|---|---|---|---|---|---|"]
            first = {}   # each case, dtype and provider in the order the CSV first has it
            for key in lines:
                for k, part in enumerate(key):
                    first.setdefault((k, part), len(first))
            for (case, dtype, provider), modes in sorted(lines.items(), key=lambda line: [
                    first[(k, part)] for k, part in enumerate(line[0])]):
                full = modes.get("fwd+bwd", {})
                floors = [modes[m]["floor_ms"] if m in modes else "" for m in ("forward",
                                                                               "fwd+bwd")]
                quantiles = f"{full['q20_ms']}-{full['q80_ms']}" if full else ""
                row_dates = ", ".join(sorted({r["date"] for r in modes.values()}))
                if case in HEADLINE_CASES and full and "(split products)" not in provider:
                    glance.append((device.startswith("CPU"), device, title.split(" (")[0],
                                   case, dtype, provider, full["ms"], row_dates))
                out.append(" | ".join(
                    ["", case, dtype, provider, *(modes[m]["ms"] if m in modes else ""
                                                  for m in MODES),
                     quantiles, full.get("peak_mb", ""), *floors, row_dates, ""]).strip())
            out.append("")
    summary = ["### At a glance: forward+backward at the paper's sizes (GPU) and the CPU "
               "defaults", "",
               "The same rows as in the tables below; those give the command, the versions, "
               "the forward and backward alone, the quantiles and the memory.", "",
               "| device | benchmark | case | dtype | provider | fwd+bwd ms | date |",
               "|---|---|---|---|---|---|---|"]
    summary += [" | ".join(["", *line[1:], ""]).strip()
                for line in sorted(glance, key=lambda line: line[0])]
    out = summary + [""] + out
    out += ["Left out of these tables (still in the CSVs):", ""]
    out += [f"- {reason} ({n} rows)" for reason, n in dropped.items()]
    return "\n".join([BEGIN_GENERATED, "", *out, "", END_GENERATED])


def _results_page_with(tables):
    text = RESULTS_PAGE.read_text(encoding="utf-8")
    start, end = text.index(BEGIN_GENERATED), text.index(END_GENERATED) + len(END_GENERATED)
    return text[:start] + tables + text[end:]


def test_every_results_csv_is_on_the_page():
    listed = {name for name, _, _ in RESULT_FILES}
    assert listed == {p.stem for p in RESULTS_DIR.glob("*.csv")}, "add it to RESULT_FILES"


def test_results_page_is_the_csvs():
    """docs/results.md quotes the latest CSV rows, and nothing typed by hand in its tables."""
    text = RESULTS_PAGE.read_text(encoding="utf-8")
    assert BEGIN_GENERATED in text and END_GENERATED in text
    assert text == _results_page_with(results_tables()), (
        "docs/results.md is not what benchmarks/results/*.csv say (new rows?): run "
        "`python tests/test_docs.py --write-results` and commit docs/results.md")
    outside = text.replace(text[text.index(BEGIN_GENERATED):text.index(END_GENERATED)], "")
    typed = re.findall(r"^\|.*\b\d+\.\d+\b.*$", outside, re.M)
    assert not typed, f"measured numbers outside the generated part of docs/results.md: {typed}"


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description="Regenerate the tables of docs/results.md.")
    cli.add_argument("--write-results", action="store_true", required=True,
                     help="write docs/results.md's tables from benchmarks/results/*.csv")
    cli.parse_args()
    RESULTS_PAGE.write_text(_results_page_with(results_tables()), encoding="utf-8")
    print(f"wrote {RESULTS_PAGE.relative_to(ROOT)}")
