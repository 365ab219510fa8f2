"""Which lm-eval task directories may run Python, and the check of every other one.

An lm-eval task YAML can name Python to run: ``custom_dataset: !function utils.load`` imports
``utils.py`` next to the YAML and calls it, in whatever process loads the task (the server at
submit time, every worker that leases a trial). So Python runs only from *trusted* directories:
the bundled ``evals/tasks``, lm-eval's own tasks, and those the operator lists in
``MMMO_TRUSTED_TASK_PATHS``. Any other directory a spec names is read here first, with a YAML
loader that constructs nothing (no ``!function``, no ``!!python/...`` tag, no alias), and refused
naming the file; its datasets must be local files under the data roots (or hub datasets).

Two guards back that check up where the files are used, so a file changed after it was checked
runs nothing either: :func:`install_guards` makes lm-eval refuse to import a ``!function`` from
an untrusted directory (:func:`trusting` says which are trusted in the current context), and
renders lm-eval's Jinja templates (``doc_to_text``...) in a sandbox, where a template cannot
reach Python objects' internals.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import yaml

from evals.texts import within_roots

BUNDLED_TASKS_DIR = Path(__file__).parent / "tasks"
MAX_YAML_FILES = 1000  # YAML files under one task directory
MAX_YAML_BYTES = 2**20  # one task YAML file
MAX_YAML_DEPTH = 32  # nesting of one task YAML
_CORE_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map",
                                                  "timestamp", "binary", "merge", "value")}
_GLOB = set("*?[")

_trusted: ContextVar[tuple[Path, ...]] = ContextVar("mmmo_trusted_task_dirs", default=())


class UnsafeTaskDir(ValueError):
    """A task directory (or a file it includes) that is not trusted and would run Python, read
    files outside the data roots, or cannot be read safely. ``file`` is the offending file."""

    def __init__(self, message: str, file: Path | None = None) -> None:
        super().__init__(message)
        self.file = file


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def always_trusted() -> tuple[Path, ...]:
    """The bundled tasks and lm-eval's own (their YAML names their modules: ``!function utils.x``)."""
    import lm_eval.tasks

    return BUNDLED_TASKS_DIR, Path(lm_eval.tasks.__file__).parent


def is_trusted(path: str | Path, trusted: Sequence[Path] = ()) -> bool:
    """Whether Python named by task YAML under ``path`` may run: it lies in a trusted directory."""
    return within_roots(Path(path), [*always_trusted(), *trusted])


@contextmanager
def trusting(dirs: Sequence[str | Path]) -> Iterator[None]:
    """Within this context (this thread, this task), lm-eval may import ``!function`` modules from
    ``dirs`` as well as from the always-trusted ones."""
    token = _trusted.set(tuple(Path(d) for d in dirs))
    try:
        yield
    finally:
        _trusted.reset(token)


class _CheckLoader(yaml.SafeLoader):
    """Composes (never constructs) a YAML document, refusing aliases and deep nesting."""

    depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not accepted here",
                                              event.start_mark)
        self.depth += 1
        if self.depth > MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                                              self.peek_event().start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _foreign_tag(node: yaml.Node) -> yaml.Node | None:
    """The first node whose tag is not a plain YAML type (``!function``, ``!!python/name:...``)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n.tag not in _CORE_TAGS:
            return n
        if isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
        elif isinstance(n, yaml.MappingNode):
            stack.extend(x for pair in n.value for x in pair)
    return None


def _load_checked(path: Path) -> object:
    """A task YAML's data, read without constructing anything but plain values."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise UnsafeTaskDir(f"task file '{path}' is not a regular file", path)
        if size > MAX_YAML_BYTES:
            raise UnsafeTaskDir(f"task file '{path}' is larger than {MAX_YAML_BYTES} bytes", path)
        text = path.read_bytes()
    except OSError as exc:
        raise UnsafeTaskDir(f"task file '{path}' cannot be read: {exc.strerror}", path) from None
    loader = _CheckLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        foreign = _foreign_tag(node)
        if foreign is not None:
            line, tag = foreign.start_mark.line + 1, foreign.tag
            if tag == "!function" or tag.startswith("tag:yaml.org,2002:python/"):
                raise UnsafeTaskDir(f"task file '{path}' (line {line}) names Python ({tag}): task YAML may only "
                                    "run Python from directories the operator trusts (MMMO_TRUSTED_TASK_PATHS)", path)
            raise UnsafeTaskDir(f"task file '{path}' (line {line}) uses the YAML tag {tag}, which a task directory "
                                "the operator has not trusted may not", path)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        # The problem and its line, not the mark's excerpt of the file.
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UnsafeTaskDir(f"task file '{path}' is not plain YAML{where}: "
                            f"{getattr(exc, 'problem', None) or type(exc).__name__}", path) from None
    finally:
        loader.dispose()


def _packaged_builders() -> set[str]:
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
    except ImportError:  # pragma: no cover - lm-eval depends on datasets
        return set()
    return set(_PACKAGED_DATASETS_MODULES)


def _metric_problems(config: object) -> list[str]:
    """Metrics that are not lm-eval's own: an unknown name (or ``hf_evaluate``) makes lm-eval load
    a Hugging Face ``evaluate`` metric, whose Python runs wherever the task loads."""
    problems: list[str] = []
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
            for metric in item.get("metric_list") or [] if isinstance(item.get("metric_list"), list) else []:
                name = metric.get("metric") if isinstance(metric, dict) else None
                if not isinstance(name, str) or name not in registered_metrics() or "hf_evaluate" in metric:
                    problems.append(f"metric {name!r} is not one of lm-eval's registered metrics "
                                    f"({sorted(registered_metrics())}): others load Python")
    return problems


def registered_metrics() -> set[str]:
    import lm_eval.api.metrics  # noqa: F401 - fills the registry
    from lm_eval.api.registry import METRIC_REGISTRY

    return set(METRIC_REGISTRY)


def _local_data_problem(value: str, roots: Sequence[Path], relative_ok: bool) -> str | None:
    """Why a data file named by a task may not be read, or None."""
    if "://" in value or "::" in value:
        return "URLs are not accepted in the data files of an untrusted task"
    if _GLOB & set(value):
        return "wildcards are not accepted in the data files of an untrusted task; name the files"
    path = Path(value)
    if ".." in path.parts:
        return "'..' is not accepted in the data files of an untrusted task"
    if path.is_absolute() or value.startswith("~"):
        return None if within_roots(path.expanduser(), roots) else "not a file under the server's data roots"
    return None if relative_ok else "relative data files are read from the server's working directory: give " \
                                    "an absolute path under the data roots"


def _data_problems(config: object, roots: Sequence[Path]) -> list[str]:
    """Every local dataset a task config (or a task inlined in a group) would read, outside ``roots``."""
    problems: list[str] = []
    builders = _packaged_builders()
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            continue
        if not isinstance(item, dict):
            continue
        stack.extend(item.values())
        dataset = item.get("dataset_path")
        if isinstance(dataset, str) and dataset not in builders:
            local = Path(dataset)
            if local.is_absolute() or dataset.startswith(("~", ".")) or ".." in local.parts or local.exists():
                if ".." in local.parts or not within_roots(local.expanduser(), roots):
                    problems.append(f"dataset_path '{dataset}': not a directory under the server's data roots")
        kwargs = item.get("dataset_kwargs")
        if isinstance(kwargs, dict):
            relative_ok = isinstance(dataset, str) and dataset not in builders
            named: list[object] = [kwargs.get("data_files"), kwargs.get("data_dir")]
            while named:
                value = named.pop()
                if isinstance(value, dict):
                    named.extend(value.values())
                elif isinstance(value, list):
                    named.extend(value)
                elif isinstance(value, str):
                    problem = _local_data_problem(value, roots, relative_ok)
                    if problem:
                        problems.append(f"data file '{value}': {problem}")
    return problems


def _check_file(path: Path, roots: Sequence[Path] | None, trusted: Sequence[Path], seen: set[Path]) -> None:
    real = _real(path)
    if real in seen:
        return
    seen.add(real)
    if roots is not None and not within_roots(real, roots):  # e.g. a link to a file elsewhere
        raise UnsafeTaskDir(f"task file '{path}' is not a file under the server's data roots", path)
    config = _load_checked(path)
    problems = _metric_problems(config)
    if problems:
        raise UnsafeTaskDir(f"task file '{path}': {problems[0]}", path)
    if roots is not None:
        problems = _data_problems(config, roots)
        if problems:
            raise UnsafeTaskDir(f"task file '{path}': {problems[0]}", path)
    includes = config.get("include") if isinstance(config, dict) else None
    for inc in includes if isinstance(includes, list) else [includes] if includes is not None else []:
        if not isinstance(inc, str):
            raise UnsafeTaskDir(f"task file '{path}': 'include' must name files", path)
        target = Path(inc) if Path(inc).is_absolute() else path.parent / inc
        if is_trusted(target.parent, trusted):
            # Its Python would run with the settings of the file including it (dataset_kwargs, metadata).
            raise UnsafeTaskDir(f"task file '{path}' includes '{inc}', a file of a trusted task directory: an "
                                "untrusted task may not run trusted Python with its own settings", path)
        if roots is not None and not within_roots(target, roots):
            raise UnsafeTaskDir(f"task file '{path}' includes '{inc}', not a file under the server's data roots",
                                path)
        _check_file(target, roots, trusted, seen)


def check_task_dir(path: str | Path, *, trusted: Sequence[Path] = (), roots: Sequence[Path] | None = None) -> None:
    """Refuse (:class:`UnsafeTaskDir`, naming the file) an untrusted task directory whose YAML, or a
    file it includes, names Python, uses aliases or, with ``roots``, reads local data outside them.

    Checks what lm-eval would index: every ``*.yaml`` below ``path``. Trusted directories pass as
    they are. ``roots=None`` skips the data check (a worker: its files are the operator's layout).
    """
    directory = Path(path)
    if is_trusted(directory, trusted):
        return
    seen: set[Path] = set()
    files = sorted(p for p in directory.glob("**/*.yaml") if not {"__pycache__", ".ipynb_checkpoints"} & set(p.parts))
    if len(files) > MAX_YAML_FILES:
        raise UnsafeTaskDir(f"task directory '{directory}' holds more than {MAX_YAML_FILES} YAML files")
    for file in files:
        _check_file(file, roots, trusted, seen)


def _guarded_import(original):
    def import_func_in_yml(qual: str, base_dir: Path):
        if not is_trusted(base_dir, _trusted.get()):
            raise UnsafeTaskDir(f"'!function {qual}' in a task under '{base_dir}': task YAML may only run Python "
                                "from directories the operator trusts (MMMO_TRUSTED_TASK_PATHS)")
        return original(qual, base_dir)

    import_func_in_yml.mmmo_guard = True
    return import_func_in_yml


def _registered_only(original):
    def get_metric(name: str, hf_evaluate_metric: bool = False):
        if hf_evaluate_metric or name not in registered_metrics():
            raise UnsafeTaskDir(f"metric '{name}' is not one of lm-eval's registered metrics: Hugging Face "
                                "evaluate metrics run Python, and mmmo loads none")
        return original(name, hf_evaluate_metric)

    get_metric.mmmo_guard = True
    return get_metric


def install_guards() -> None:
    """Make this process's lm-eval import ``!function`` modules from trusted directories only and
    render its templates in a Jinja sandbox. Idempotent; raises if lm-eval's internals moved (the
    guards must not silently vanish with an upgrade)."""
    import lm_eval.utils
    from jinja2 import BaseLoader, StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from lm_eval.tasks import _yaml_loader

    original = getattr(_yaml_loader, "_import_func_in_yml", None)
    if original is None or not hasattr(lm_eval.utils, "env") or not hasattr(lm_eval.utils, "regex_replace"):
        raise RuntimeError("lm-eval's task loader changed: mmmo's task-code guard cannot be installed")
    if not getattr(original, "mmmo_guard", False):
        _yaml_loader._import_func_in_yml = _guarded_import(original)
    import lm_eval.api.task as task_module

    if not hasattr(task_module, "get_metric"):
        raise RuntimeError("lm-eval's metric lookup changed: mmmo's metric guard cannot be installed")
    if not getattr(task_module.get_metric, "mmmo_guard", False):
        task_module.get_metric = _registered_only(task_module.get_metric)
    if not isinstance(lm_eval.utils.env, ImmutableSandboxedEnvironment):
        env = ImmutableSandboxedEnvironment(loader=BaseLoader, undefined=StrictUndefined, keep_trailing_newline=True)
        env.filters["regex_replace"] = lm_eval.utils.regex_replace
        lm_eval.utils.env = env
