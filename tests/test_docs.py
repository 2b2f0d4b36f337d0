"""Every shell command in README.md and docs/*.md is run here or checked against the code it calls.

Fenced ```bash, ```sh and ```console blocks are split into commands (backslash continuations joined, comments
dropped, `&&`, `|`, `;` and `$(...)` split apart; in console blocks only the `$ ` lines). Each command is

- **run**, when it is cheap and needs nothing from outside: `python -m data_prep` train-tokenizer / build /
  inspect / verify / merge on a tiny corpus, in a sandbox folder that holds the documented input paths
  (`corpus/`, `more/*.jsonl.zst`, `extra.parquet`, `books/`), in documentation order; or
- **checked**, everything else (STATIC_ONLY says why each kind cannot run here: a SLURM cluster, GPUs,
  several nodes, a download, minutes of training): the program is one this project knows, its script or
  module exists, every option is accepted by that entry point's own argparse parser (called for real and
  stopped right after parsing), pretrain's `--section.field` overrides, config file and DeepSpeed JSON load
  through `alectra.config.load_config` and the batch arithmetic holds at the command's world size, every
  environment variable given to a SLURM template is read by it, and every repository path it names exists.

So renaming a flag, a config field, a script or a config file fails here with the doc file and line. The
entry points' `--help` and bad-input exits (2, one line) are run below as well.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gzip
import importlib
import inspect
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest

from tests.waiting import deadline

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(bash|sh|shell|console)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
SUBSTITUTION = re.compile(r"\$\(([^()]*)\)")
SEPARATORS = {"&&", "||", "|", ";", "&"}
REPO_DIRS = ("alectra/", "configs/", "ds_configs/", "slurm/", "benchmarks/", "data_prep/", "kernels/")
REPO_DIRS += ("tests/", "docs/", ".ci/")
EXAMPLE_ENV = {"SLURM_ARRAY_TASK_ID": "0"}
"""Values of the variables a documented command reads from its job (`$SLURM_ARRAY_TASK_ID` is an integer)."""
SHELL_TOOLS = {"head", "tail", "cd", "export", "echo", "cat", "ls", "mkdir", "grep"}
"""Standard tools in a pipeline: nothing of this project to check."""

MODULE_MAINS = {
    "data_prep": "data_prep.cli:main",
    "alectra.export": "alectra.export:main",
    "alectra.glue": "alectra.glue.__main__:main",
    "alectra.distributed": "alectra.distributed:main",
    "kernels.compile_check": "kernels.compile_check:main",
}
"""`python -m MODULE` -> the function that parses its arguments."""

STATIC_ONLY = {
    "sbatch": "needs a SLURM cluster (tests/test_slurm.py runs the templates on a real 2-node one)",
    "srun": "needs a SLURM allocation",
    "bash slurm/": "submits SLURM jobs",
    "mpirun": "several ranks of a training run or build (tests/test_mpi.py runs one)",
    "deepspeed": "a training run: minutes (tests/test_engine.py runs the demo command, shortened)",
    "torchrun": "a multi-rank training run",
    "alectra/pretrain.py": "a training run: minutes",
    "alectra.glue": "fine-tuning: minutes, GLUE data",
    "alectra.export": "needs a trained checkpoint (tests/test_export.py exports one)",
    "alectra.distributed": "reads a SLURM node list",
    "kernels.compile_check": "compiles every kernel for two GPU targets: ~30 s (test_kernels_compile.py)",
    "zero_to_fp32.py": "needs a DeepSpeed checkpoint",
    "pip": "installs packages",
    "pytest": "the whole test suite",
    "python -c": "builds the whole demo corpus",
    "data_prep": "reads a hub dataset or tokenizer, or a dataset the sandbox does not hold",
    "benchmarks/": "a benchmark (GPU or minutes)",
}
"""Why a kind of documented command is checked, not run, here."""

# sbatch options the docs may use (SLURM 22.05 `man sbatch`); the man page's list is used when installed.
SBATCH_VALUE_OPTIONS = {
    "--nodes", "--ntasks", "--ntasks-per-node", "--gpus-per-node", "--gpus-per-task", "--gpus", "--gres",
    "--cpus-per-task", "--mem", "--time", "--array", "--output", "--error", "--job-name", "--partition",
    "--account", "--qos", "--signal", "--open-mode", "--dependency", "--wrap", "--gpu-bind", "--export",
    "--constraint",
}  # fmt: skip
SBATCH_FLAGS = {"--requeue", "--no-requeue", "--parsable", "--wait", "--test-only", "--exclusive"}


@dataclass
class Command:
    where: str
    """doc file:line of the command."""
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        return f"{self.where}: {(env + ' ') if env else ''}{shlex.join(self.argv)}"


def _logical_lines(body: str, console: bool) -> list[tuple[int, str]]:
    """(offset of the first line, text) of each command line, continuations joined."""
    lines, out, buffer, start, continued = body.split("\n"), [], "", None, False
    for i, line in enumerate(lines):
        if console and not continued:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if start is None:
            start = i
        continued = line.rstrip().endswith("\\")
        if continued:
            buffer += line.rstrip()[:-1] + " "
            continue
        out.append((start, buffer + line))
        buffer, start = "", None
    return out


def split_commands(where: str, line: str) -> list[Command]:
    """One shell line -> its simple commands (substitutions first), env assignments separated."""
    commands = []
    for inner in SUBSTITUTION.findall(line):
        commands += split_commands(where, inner)
    lexer = shlex.shlex(SUBSTITUTION.sub("SUBSTITUTED", line), posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    words: list[str] = []
    for token in [*lexer, ";"]:
        if token not in SEPARATORS:
            words.append(token)
            continue
        env = {}
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            name, value = words.pop(0).split("=", 1)
            env[name] = value
        if words:
            words = [re.sub(r"\$\{?(\w+)\}?", lambda m: EXAMPLE_ENV.get(m[1], m[0]), w) for w in words]
            commands.append(Command(where, words, env))
        words = []
    return commands


def doc_commands() -> list[Command]:
    commands = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        for block in FENCE.finditer(text):
            first_line = text.count("\n", 0, block.start(2)) + 1
            for offset, line in _logical_lines(block.group(2), block.group(1) == "console"):
                commands += split_commands(f"{path.relative_to(ROOT)}:{first_line + offset}", line)
    return commands


# ---------------------------------------------------------------------------------------------------------
# Static checks: each entry point's own parser


class Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


def parse_only(main: Callable[..., object], argv: list[str]) -> argparse.Namespace:
    """Call an entry point on `argv` and stop it right after its top-level `parse_args` succeeded (an unknown
    option, a missing required one or a bad value fails the way the user would see it). Abbreviations are
    off: `--output-dir` renamed to `--output-directory` would otherwise still accept the documented name."""
    original_parse, original_init = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.__init__

    def parse_and_stop(self, args=None, namespace=None):
        raise Parsed(original_parse(self, args, namespace))

    def exact_options_only(self, *args, **kwargs):  # a documented prefix of a renamed option must fail
        original_init(self, *args, **{**kwargs, "allow_abbrev": False})

    stderr = io.StringIO()
    with (
        mock.patch.object(argparse.ArgumentParser, "parse_args", parse_and_stop),
        mock.patch.object(argparse.ArgumentParser, "__init__", exact_options_only),
    ):
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                main(argv)
            except Parsed as done:
                return done.namespace
            except SystemExit as exc:
                raise AssertionError(f"rejected ({exc.code}): {stderr.getvalue().strip()}") from None
    raise AssertionError("the entry point returned without parsing its arguments")


# Entry points whose import changes this process: kernels.compile_check drops TRITON_INTERPRET from the
# environment and refuses to load after triton was imported with it (as it is here, tests/conftest.py).
FRESH_PROCESS = {"kernels.compile_check"}


def parse_in_fresh_process(target: str, argv: list[str]) -> None:
    """parse_only in a new interpreter without TRITON_INTERPRET, for the FRESH_PROCESS entry points."""
    code = (
        "import sys; from tests.test_docs import parse_only, resolve; "
        "parse_only(resolve(sys.argv[1]), sys.argv[2:])"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", code, target, *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if run.returncode != 0:
        lines = run.stderr.strip().splitlines()
        raise AssertionError(lines[-1] if lines else f"exit {run.returncode}")


def resolve(target: str) -> Callable[..., object]:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def pyproject_table(name: str) -> dict[str, str]:
    """`key = value` lines of one table of pyproject.toml (no tomllib: the project supports Python 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    body = text.split(f"\n[{name}]\n", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^"?([\w-]+)"?\s*=\s*"?([^"\n]*)"?', body, re.M))


def console_scripts() -> dict[str, str]:
    return pyproject_table("project.scripts")


class Checker:
    """Checks one documented command; `status` says whether it ran or why it was only checked."""

    def __init__(self, sandbox: Path | None = None) -> None:
        self.sandbox = sandbox
        self.statuses: list[tuple[str, str]] = []

    def note(self, cmd: Command, status: str) -> None:
        self.statuses.append((str(cmd), status))

    def check(self, cmd: Command) -> str:
        """Check (or run) `cmd`; returns and records its one status (the launcher's, when it starts another
        command that was checked on the way)."""
        before = len(self.statuses)
        self._dispatch(cmd)
        assert len(self.statuses) > before, f"{cmd}: nothing checked it"
        status = self.statuses[-1]
        del self.statuses[before:]
        self.statuses.append(status)
        return status[1]

    def _dispatch(self, cmd: Command) -> None:
        for token in [*cmd.argv, *cmd.env.values()]:
            for part in token.split("="):
                if part.startswith(REPO_DIRS) and "$" not in part and "..." not in part:
                    assert list(ROOT.glob(part.rstrip("/"))), f"{part}: no such file in the repository"
        program = cmd.argv[0]
        if program in SHELL_TOOLS:
            return self.note(cmd, "shell tool")
        handler = {
            "python": self.python,
            "python3": self.python,
            "pip": self.pip,
            "deepspeed": self.deepspeed,
            "torchrun": self.torchrun,
            "mpirun": self.mpirun,
            "srun": self.srun,
            "sbatch": self.sbatch,
            "bash": self.bash,
        }.get(program)
        if handler is None and program in console_scripts():
            return self.entry_point(cmd, console_scripts()[program], cmd.argv[1:], program)
        assert handler is not None, f"no check for program {program!r}: add one to tests/test_docs.py"
        handler(cmd)

    # -- launchers: take their own options, then check the command they start --------------------------

    def python(self, cmd: Command, world_size: int | None = 1) -> None:
        args = cmd.argv[1:]
        if args[0] == "-m":
            module, rest = args[1], args[2:]
            if module == "pytest":
                return self.pytest(cmd, rest)
            assert module in MODULE_MAINS, f"python -m {module}: not an entry point of this project"
            return self.entry_point(cmd, MODULE_MAINS[module], rest, module)
        if args[0] == "-c":
            return self.python_code(cmd, args[1])
        script, rest = args[0], args[1:]
        if script == "alectra/pretrain.py":
            return self.pretrain(cmd, rest, world_size)
        if script.endswith("/zero_to_fp32.py"):  # DeepSpeed copies its script into every checkpoint folder
            import deepspeed

            path = Path(deepspeed.__file__).parent / "utils" / "zero_to_fp32.py"
            parse_only(lambda argv: _run_script(path, argv), rest)
            return self.note(cmd, f"checked: {STATIC_ONLY['zero_to_fp32.py']}")
        assert (ROOT / script).is_file(), f"{script}: no such script"
        parse_only(lambda argv: _run_script(ROOT / script, argv), rest)
        self.note(cmd, f"checked: {STATIC_ONLY['benchmarks/']}")

    def deepspeed(self, cmd: Command) -> None:
        from deepspeed.launcher import runner

        with contextlib.redirect_stderr(io.StringIO()):
            args = runner.parse_args(cmd.argv[1:])
        world = args.num_gpus if args.num_gpus > 0 else None  # None: every local GPU, or the hostfile's
        self.python(Command(cmd.where, ["python", args.user_script, *args.user_args]), world)
        self.note(cmd, f"checked: {STATIC_ONLY['deepspeed']}")

    def torchrun(self, cmd: Command) -> None:
        from torch.distributed.run import get_args_parser

        args = get_args_parser().parse_args(cmd.argv[1:])
        world = int(args.nproc_per_node) if str(args.nproc_per_node).isdigit() else None
        script = ["python", args.training_script, *args.training_script_args]
        self.python(Command(cmd.where, script), world)
        self.note(cmd, f"checked: {STATIC_ONLY['torchrun']}")

    def mpirun(self, cmd: Command) -> None:
        args, world = cmd.argv[1:], None
        while args[0].startswith("-"):
            option = args.pop(0)
            if option in ("-np", "-n", "--np", "--map-by", "--bind-to", "-x", "--mca"):
                value = args.pop(0)
                if option in ("-np", "-n", "--np"):
                    world = int(value)
            else:
                assert option in ("--allow-run-as-root", "--oversubscribe"), f"mpirun {option}: unknown here"
        self._launched(cmd, args, world)
        self.note(cmd, f"checked: {STATIC_ONLY['mpirun']}")

    def srun(self, cmd: Command) -> None:
        args = cmd.argv[1:]
        while args[0].startswith("-"):
            args.pop(0)
        self._launched(cmd, args, None)
        self.note(cmd, f"checked: {STATIC_ONLY['srun']}")

    def _launched(self, cmd: Command, args: list[str], world: int | None) -> None:
        assert args[0] in ("python", "python3"), f"{cmd.argv[0]} starts {args[0]!r}: expected python"
        self.python(Command(cmd.where, args), world)

    def sbatch(self, cmd: Command) -> None:
        args, options = cmd.argv[1:], {}
        valid_values, valid_flags = _sbatch_options()
        while args and args[0].startswith("-"):
            option = args.pop(0)
            name, _, value = option.partition("=")
            if name in valid_flags and not value:
                options[name] = True
                continue
            assert name in valid_values, f"sbatch {name}: not an sbatch option"
            options[name] = value or args.pop(0)
        if "--wrap" in options:
            assert not args, "sbatch --wrap takes no script"
            for inner in split_commands(cmd.where, options["--wrap"]):
                self._dispatch(inner)
        else:
            self.slurm_script(cmd, args[0], args[1:], options)
        self.note(cmd, f"checked: {STATIC_ONLY['sbatch']}")

    def bash(self, cmd: Command) -> None:
        script, rest = cmd.argv[1], cmd.argv[2:]
        assert (ROOT / script).is_file(), f"{script}: no such script"
        if script.startswith("slurm/"):
            self.slurm_script(cmd, script, rest, {})
            return self.note(cmd, f"checked: {STATIC_ONLY['bash slurm/']}")
        assert not rest, f"bash {script}: takes no arguments"
        self.note(cmd, f"checked: {STATIC_ONLY['benchmarks/']}")

    def slurm_script(self, cmd: Command, script: str, args: list[str], options: dict[str, str]) -> None:
        """A template's environment variables are read by it; its arguments pass its program's parser."""
        assert (ROOT / script).is_file(), f"{script}: no such script"
        text = (ROOT / script).read_text()
        for name in cmd.env:
            assert re.search(rf"\$\{{?{name}\b", text), f"{script} does not read {name}"
        env = cmd.env
        if script == "slurm/pretrain.sh":
            argv = ["--deepspeed", env.get("DS_CONFIG", "ds_configs/zero2.json")]
            argv += ["--config", env["CONFIG"]] if "CONFIG" in env else []
            argv += ["--output_dir", env.get("OUTPUT", "runs/job")]
            argv += ["--data.paths", json.dumps(env["DATA"].split(","))] if "DATA" in env else []
            self.pretrain(cmd, argv + args, _sbatch_world_size(text, options, env))
        elif script == "slurm/finetune_glue.sh":
            argv = ["--model", env.get("MODEL", "runs/x/export"), "--tasks", env.get("TASKS", "rte")]
            argv += ["--data-dir", env["GLUE_DIR"]] if "GLUE_DIR" in env else []
            parse_only(resolve(MODULE_MAINS["alectra.glue"]), argv + args)
        elif script == "slurm/preprocess.sh":
            parse_only(resolve(MODULE_MAINS["data_prep"]), ["build", *args])
        else:
            raise AssertionError(f"{script}: no check for this template")

    # -- this project's entry points --------------------------------------------------------------------

    def pretrain(self, cmd: Command, args: list[str], world_size: int | None) -> None:
        """argparse, then the run config as load_config builds it (overrides, YAML, the JSON's path), then
        the batch arithmetic at the command's world size."""
        from alectra.config import ConfigError, load_config
        from alectra.pretrain import parse_args

        with contextlib.redirect_stderr(io.StringIO()) as stderr:
            try:
                parsed = parse_args(args)
            except SystemExit:
                raise AssertionError(f"pretrain.py rejects it: {stderr.getvalue().strip()}") from None
        assert (ROOT / parsed.deepspeed).is_file(), f"--deepspeed {parsed.deepspeed}: no such file"
        try:
            cfg = load_config(ROOT / parsed.config if parsed.config else None, parsed.overrides)
            if world_size is not None:
                cfg.at_world_size(world_size)
        except ConfigError as exc:
            raise AssertionError(f"pretrain.py at world size {world_size}: {exc}") from None
        self.note(cmd, f"checked: {STATIC_ONLY['alectra/pretrain.py']}")

    def entry_point(self, cmd: Command, target: str, args: list[str], name: str) -> None:
        module = target.split(":")[0]
        if module == "data_prep.cli" and self.run_data_prep(cmd, args):
            return
        if module in FRESH_PROCESS:
            parse_in_fresh_process(target, args)
        else:
            parse_only(resolve(target), args)
        reason = STATIC_ONLY.get(name) or STATIC_ONLY[module.removesuffix(".__main__").removesuffix(".cli")]
        self.note(cmd, f"checked: {reason}")

    def run_data_prep(self, cmd: Command, args: list[str]) -> bool:
        """Run a data_prep command in the sandbox when every input it names is there (documentation order:
        the tokenizer and datasets earlier commands made are there for later ones)."""
        if self.sandbox is None:
            return False
        ns = parse_only(resolve(MODULE_MAINS["data_prep"]), args)
        needs = [*(getattr(ns, "input", None) or []), *(getattr(ns, "prefix", None) or [])]
        needs += [getattr(ns, name) for name in ("tokenizer", "dataset") if getattr(ns, name, None)]
        needs += [ns.output_dir] if ns.cmd == "merge" else []
        if (
            getattr(ns, "hf_dataset", None)
            or getattr(ns, "demo", False)  # the whole demo corpus: checked, not run
            or any(os.path.isabs(need) for need in needs)  # outside the sandbox: checked, not run
            or not all(list(self.sandbox.glob(need.rstrip("/"))) for need in needs)
        ):
            return False
        from data_prep.cli import main

        previous = os.getcwd()
        os.chdir(self.sandbox)
        try:
            with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(out):
                code = main(args)
        finally:
            os.chdir(previous)
        assert code == 0, f"exit {code}:\n{out.getvalue()[-3000:]}"
        self.note(cmd, "ran")
        return True

    def pytest(self, cmd: Command, args: list[str]) -> None:
        for arg in args:
            if not arg.startswith("-"):
                assert (ROOT / arg.split("::")[0]).exists(), f"pytest {arg}: no such test path"
        self.note(cmd, f"checked: {STATIC_ONLY['pytest']}")

    def pip(self, cmd: Command) -> None:
        assert cmd.argv[1] == "install", f"pip {cmd.argv[1]}: only `pip install` is documented"
        for arg in cmd.argv[2:]:
            if arg.startswith("torch=="):
                import torch

                wanted = arg.removeprefix("torch==")
                assert torch.__version__.split("+")[0] == wanted, f"{arg}, tested with {torch.__version__}"
            elif arg.startswith("."):
                extras = re.fullmatch(r"\.(?:\[(.*)\])?", arg)
                assert extras, f"pip install {arg}: expected . or .[extra]"
                known = pyproject_table("project.optional-dependencies")
                for extra in filter(None, (extras.group(1) or "").split(",")):
                    assert extra in known, f"pip install {arg}: pyproject.toml has no extra {extra!r}"
            else:
                assert arg in ("-e", "-q", "--index-url") or arg.startswith("https://"), f"pip {arg}?"
        self.note(cmd, f"checked: {STATIC_ONLY['pip']}")

    def python_code(self, cmd: Command, code: str) -> None:
        """`python -c`: every call of a module's function binds to its signature (nothing is executed)."""
        tree = ast.parse(code)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if isinstance(node.func.value, ast.Name):
                    module = importlib.import_module(node.func.value.id)
                    function = getattr(module, node.func.attr)
                    args = [ast.literal_eval(a) for a in node.args]
                    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
                    inspect.signature(function).bind(*args, **kwargs)
        self.note(cmd, f"checked: {STATIC_ONLY['python -c']}")


def _run_script(path: Path, argv: list[str]) -> None:
    with mock.patch.object(sys, "argv", [str(path), *argv]):
        runpy.run_path(str(path), run_name="__main__")


def _sbatch_options() -> tuple[set[str], set[str]]:
    man = Path("/usr/share/man/man1/sbatch.1.gz")
    if not man.is_file():
        return SBATCH_VALUE_OPTIONS, SBATCH_FLAGS
    text = gzip.open(man, "rt", errors="replace").read().replace("\\-", "-")
    documented = set(re.findall(r"(--[a-z][a-z-]+)", text))
    return SBATCH_VALUE_OPTIONS & documented, SBATCH_FLAGS & documented


def _sbatch_world_size(script_text: str, options: dict[str, str], env: dict[str, str]) -> int | None:
    """Ranks slurm/pretrain.sh starts: nodes x (GPUs per node, or 1 on CPU-only nodes); the #SBATCH lines
    give the defaults."""
    defaults = dict(re.findall(r"^#SBATCH (--[a-z-]+)=(\S+)", script_text, re.M))
    nodes = options.get("--nodes", defaults.get("--nodes", "1"))
    gpus = env.get("GPUS_PER_NODE", options.get("--gpus-per-node", defaults.get("--gpus-per-node", "0")))
    if not (nodes.isdigit() and gpus.isdigit()):
        return None
    return int(nodes) * max(1, int(gpus))


# ---------------------------------------------------------------------------------------------------------
# The tests


def _write_sandbox(root: Path) -> None:
    """The input paths the docs' data_prep commands name, holding a few documents of English."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    sentences = [
        "The quick brown fox jumps over the lazy dog. It was not amused by the early morning noise.",
        "Pretraining an encoder takes a corpus, a tokenizer and many steps. Each step masks some tokens.",
        "A discriminator learns which tokens were replaced. The generator proposes the replacements.",
        "Shards are written once and read by every rank. Nothing is copied between the nodes of a job.",
    ]
    docs = [" ".join(sentences[i:] + sentences[:i]) for i in range(len(sentences))] * 6
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("\n\n".join(docs) + "\n")
    with gzip.open(root / "corpus" / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs))
    (root / "more").mkdir()
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    (root / "more" / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    pq.write_table(pa.table({"text": docs}), root / "extra.parquet")
    (root / "books").mkdir()
    (root / "books" / "one.txt").write_text("\n".join(docs) + "\n")


def test_every_documented_command_runs_or_passes_its_parser(tmp_path):
    commands = doc_commands()
    assert len(commands) > 30, f"only {len(commands)} commands found: is the fence pattern still right?"
    _write_sandbox(tmp_path)
    checker = Checker(sandbox=tmp_path)
    failures = []
    for cmd in commands:
        try:
            checker.check(cmd)
        except AssertionError as exc:
            failures.append(f"{cmd}\n    {exc}")
    print("\n" + "\n".join(f"{status[:40]:<40}  {where}" for where, status in checker.statuses))
    assert not failures, "documented commands that would fail:\n" + "\n".join(failures)
    cluster = [where for where, _ in checker.statuses if where.startswith("docs/cluster.md")]
    cpu_nodes = [where for where in cluster if "--gpus-per-node=0" in where]
    assert cpu_nodes, "docs/cluster.md lost its CPU-only multi-node example (checked at its world size)"
    ran = [where for where, status in checker.statuses if status == "ran"]
    for subcommand in ("train-tokenizer", "build", "inspect", "verify"):
        assert any(f"data_prep {subcommand}" in where for where in ran), f"no `data_prep {subcommand}` ran"


def test_a_renamed_flag_fails_the_check():
    """The checks reject what the entry points reject: a misspelt override, flag, extra or config file."""
    checker = Checker()
    bad = [
        "python alectra/pretrain.py --train.learning_rate 1e-3",
        "deepspeed --num_gpus 8 alectra/pretrain.py --config configs/alectra_small_owt.yaml",  # 128 x 8 > 512
        "python -m data_prep build --input corpus/ --tokenizer t --out data/x",
        "sbatch --nodes=2 --gpu-per-node=0 slurm/pretrain.sh",
        "CONFG=configs/demo.yaml sbatch slurm/pretrain.sh",
        "python -m alectra.glue --model m --task rte",
        "pip install -e .[devel]",
        "python alectra/pretrain.py --config configs/no_such.yaml",
    ]
    for line in bad:
        (cmd,) = split_commands("test", line)
        with pytest.raises(AssertionError):
            checker.check(cmd)
            print(f"accepted: {line}")


def test_readme_test_command_is_what_ci_runs():
    """The README's test command is .ci/run's: the same two installs, then the same pytest line."""
    lines = _logical_lines((ROOT / ".ci" / "run").read_text(), console=False)
    ci = [c.argv for _, line in lines for c in split_commands(".ci/run", line)]
    ci = [argv[2:] if argv[:2] == ["python", "-m"] else argv for argv in ci]
    readme = [c.argv for c in doc_commands() if c.where.startswith("README.md")]
    for wanted in (
        ["pytest", "tests"],
        ["pip", "install", "torch==2.13.0"],
        ["pip", "install", "-e", ".[dev]"],
    ):
        in_ci = [a for a in ci if [w for w in a if w != "-q"] == wanted]
        assert in_ci, f".ci/run does not run {shlex.join(wanted)}"
        as_readme = ["python", "-m", *wanted] if wanted[0] == "pytest" else wanted
        assert as_readme in readme, f"README.md: no `{shlex.join(as_readme)}` (.ci/run runs it)"


def test_links_and_repository_paths_exist():
    """Every relative Markdown link in README.md and docs/ resolves, and every repository file they name
    (in backticks, or a path with a file suffix in the prose) exists: a moved or deleted file fails here."""
    prose = re.compile(r"(?<![\w/`])((?:alectra|kernels|data_prep|tests|benchmarks|slurm|configs|ds_configs)/"
                       r"[\w/.-]+\.(?:py|sh|yaml|json|md))")  # fmt: skip
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", text):
            if "://" not in target:
                assert (path.parent / target).exists(), f"{path.relative_to(ROOT)}: broken link {target}"
        named = [n.split("::")[0].rstrip(",.") for n in re.findall(r"`([^`\s]+)`", text)]
        for name in [n for n in named if n.startswith(REPO_DIRS)] + prose.findall(text):
            if "<" not in name and "*" not in name:
                assert (ROOT / name).exists(), f"{path.relative_to(ROOT)} names {name}, which does not exist"


def test_cluster_env_table_matches_the_template():
    """docs/cluster.md's table of slurm/pretrain.sh's environment: every variable is read by the template,
    and a numeric default in the table is the template's `${VAR:-default}`."""
    doc = (ROOT / "docs" / "cluster.md").read_text()
    script = (ROOT / "slurm" / "pretrain.sh").read_text()
    table = doc.split("Environment variables of `slurm/pretrain.sh`", 1)[1].split("\n\n", 2)[1]
    rows = [row.split("|")[1:3] for row in table.splitlines()[2:]]
    assert len(rows) > 10, "docs/cluster.md: the environment table of slurm/pretrain.sh is gone"
    for names, default in rows:
        for name in re.findall(r"`([A-Z_]+)`", names):
            assert name in script, f"docs/cluster.md documents {name}, which slurm/pretrain.sh does not read"
            in_script = re.search(rf"\$\{{{name}:-(\d+)\}}", script)
            if default.strip().isdigit() and in_script:
                documented = default.strip()
                assert documented == in_script[1], f"{name}: docs say {documented}, the script {in_script[1]}"


def parser_options(main: Callable[..., object]) -> dict[str, object]:
    """Every option string of an entry point's parser and its subcommands' parsers -> its default."""
    found: dict[str, object] = {}

    def collect(self, args=None, namespace=None):
        parsers = [self]
        while parsers:
            parser = parsers.pop()
            for action in parser._actions:
                found.update(dict.fromkeys(action.option_strings, action.default))
                if isinstance(action, argparse._SubParsersAction):
                    parsers += action.choices.values()
        raise Parsed(argparse.Namespace())

    with mock.patch.object(argparse.ArgumentParser, "parse_args", collect), contextlib.suppress(Parsed):
        main([])
    return found


def _same_default(documented: str, default: object) -> bool:
    """A table's default cell (a number or one `literal`) against the parser's; other cells are prose."""
    cell = documented.strip().strip("`")
    if re.fullmatch(r"[-+]?\d+(\.\d*)?(e[-+]?\d+)?", cell):
        return isinstance(default, (int, float)) and float(cell) == float(default)
    if re.fullmatch(r"`[\w-]+`", documented.strip()):
        return cell == default
    return True


def test_documented_options_exist():
    """Options named in the prose and tables: every `--section.field` in README.md and docs/ is a run-config
    field; the options in the first column of docs/glue.md's and docs/data_prep.md's tables belong to
    alectra.glue / data_prep, with the default the table gives (a number or a `literal`). A renamed option
    or a changed default fails here even where no command uses it."""
    import dataclasses

    from alectra.config import RunConfig

    defaults = RunConfig()
    fields = {"--" + f.name for f in dataclasses.fields(RunConfig)}
    for section in dataclasses.fields(RunConfig):
        value = getattr(defaults, section.name)
        if dataclasses.is_dataclass(value):
            fields |= {f"--{section.name}.{f.name}" for f in dataclasses.fields(value)}
    for path in DOC_FILES:
        for flag in re.findall(r"`[^`]*?(--(?:model|data|train|checkpoint|logging)\.\w+)", path.read_text()):
            assert flag in fields, f"{path.relative_to(ROOT)} names {flag}, which is not a run-config field"
    compared = 0
    for doc, main in (("glue.md", MODULE_MAINS["alectra.glue"]), ("data_prep.md", MODULE_MAINS["data_prep"])):
        known = parser_options(resolve(main))
        rows = re.findall(r"^\| (`--[^|]*)\|([^|]*)\|", (ROOT / "docs" / doc).read_text(), re.M)
        assert len(rows) > 5, f"docs/{doc}: no option table found"
        for options, default in rows:
            flags = re.findall(r"`(--[\w-]+)", options)
            for flag in flags:
                assert flag in known, f"docs/{doc} documents {flag}, which {main} does not accept"
            if len(flags) == 1 and default.strip():
                assert _same_default(default, known[flags[0]]), (
                    f"docs/{doc}: {flags[0]} defaults to {default.strip()} in the table, "
                    f"{known[flags[0]]!r} in {main}"
                )
                compared += 1
    assert compared > 10, f"only {compared} defaults compared: is the table still `| option | default |`?"


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=deadline(120)
    )


def test_pretrain_help_lists_every_config_field_and_points_to_the_docs():
    import dataclasses

    from alectra.config import RunConfig

    done = _run(["alectra/pretrain.py", "--help"])
    assert done.returncode == 0, done.stderr
    flags = set(re.findall(r"(--[a-z0-9_.]+)", done.stdout))
    for section in dataclasses.fields(RunConfig):
        value = getattr(RunConfig(), section.name)
        names = [f.name for f in dataclasses.fields(value)] if dataclasses.is_dataclass(value) else [None]
        for name in names:
            flag = f"--{section.name}.{name}" if name else f"--{section.name}"
            assert flag in flags, f"--help does not list {flag}"
    assert "docs/training.md" in done.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train.learning_rate", "1e-3"], "unknown config key(s) ['train.learning_rate']"),
        (["--config", "configs/no_such.yaml"], "--config: no such file"),
        (["--deepspeed", "ds_configs/no_such.json"], "no_such.json"),
    ],
)
def test_pretrain_bad_input_is_one_line_and_exit_2(args, message):
    done = _run(["alectra/pretrain.py", *args])
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr


def test_data_prep_export_and_glue_bad_input_exit_2(tmp_path, capsys):
    """docs/data_prep.md "The exit code is 2 for bad input", docs/glue.md "Exit status 2" (a missing task
    folder, before any model is loaded), and the export of a missing checkpoint: one `error:` line each."""
    from alectra.export import main as export_main
    from alectra.glue.__main__ import main as glue_main
    from data_prep.cli import main as data_prep_main

    missing = str(tmp_path / "missing")
    assert (
        data_prep_main(["build", "--input", missing, "--tokenizer", missing, "-o", str(tmp_path / "o")]) == 2
    )
    assert data_prep_main(["verify", missing]) == 2
    assert export_main([missing, str(tmp_path / "out")]) == 2
    assert glue_main(["--model", missing, "--tasks", "rte", "--data-dir", str(tmp_path)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and all("error: " in line for line in errors), errors
    assert f"GLUE task folder not found: {tmp_path}/RTE" in errors[3]
