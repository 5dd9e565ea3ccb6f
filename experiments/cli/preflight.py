"""Check every job of a command before Hydra launches any, and say all that is wrong at once.

Hydra checks each YAML file and override against the schema (experiments.cli.schema) when it
composes a job; its messages are several lines with a hint to set HYDRA_FULL_ERROR. Here
each job of the command (every combination of the sweep's values) is composed and turned
into the library's config first, and each problem is one `error:` line; exit status 2.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from experiments.cli.schema import compose_config

# Flags after which Hydra does something other than run jobs (help, config dumps).
NOT_A_RUN = {
    "--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc",
    "--version", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
    "--experimental-rerun", "--resolve", "-p", "--package",
}  # fmt: skip
MULTIRUN = {"-m", "--multirun"}
MAX_JOBS_CHECKED = 256  # beyond this, a sweep's later jobs are checked when they start


def expand(args: list[str]) -> list[list[str]]:
    """Every combination of the sweep overrides' values, as plain override lists."""
    choices = []
    for override in OverridesParser.create().parse_overrides(args):
        key = override.get_key_element()
        if override.is_sweep_override():
            choices.append([f"{key}={v}" for v in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(job) for job in itertools.islice(itertools.product(*choices), MAX_JOBS_CHECKED)]


def sweep_params(cfg: DictConfig, args: list[str]) -> list[str]:
    """The preset's hydra.sweeper.params as overrides, less the keys the command sets."""
    params = cfg.hydra.get("sweeper", {}).get("params") or {}
    given = {a.split("=", 1)[0].lstrip("+~") for a in args}
    return [f"{key}={value}" for key, value in params.items() if key not in given]


def one_line(err: Exception) -> str:
    """Hydra's or OmegaConf's composition error as one line naming the key and where."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    if "Could not find" in text:  # a group option: name the ones there are
        start = next((i for i, line in enumerate(lines) if "Available options" in line), 0)
        listed = itertools.takewhile(lambda line: not line.endswith(":"), lines[start + 1 :])
        return f"{text.split(': ', 1)[-1]}; available: {', '.join(listed)}"
    where = ""
    if text.startswith("In '") or text.startswith("Error merging"):
        where = next(iter(text.split("'")[1:2]), "")
    cause = err
    while not isinstance(cause, OmegaConfBaseException) and (cause.__cause__ or cause.__context__):
        cause = cause.__cause__ or cause.__context__
    key = getattr(cause, "full_key", None)
    message = str(cause).splitlines()[0] if str(cause) else text
    if "not in struct" in message or "not in '" in message:
        message = f"unknown key {key!r}; see docs/usage.md for the keys"
    elif key:
        message = f"{key}: {message}"
    source = f"{where}: " if where else ""
    return f"{source}{message}"


def problems(args: list[str], config_name: str, check: Callable[[DictConfig], object]) -> list:
    """One line per problem of the command's jobs (empty when every job can start)."""
    multirun = any(a in MULTIRUN for a in args)
    overrides = [a for a in args if a not in MULTIRUN]
    found = []
    jobs = expand(overrides) if multirun else [overrides]
    if multirun:  # the preset's own sweep (hydra.sweeper.params) is known once composed
        try:
            first = compose_config(jobs[0], config_name)
        except (HydraException, OmegaConfBaseException) as err:
            return [one_line(err)]
        jobs = expand(overrides + sweep_params(first, overrides))
    for job in jobs:
        try:
            check(compose_config(job, config_name))
        except (HydraException, OmegaConfBaseException) as err:
            line = one_line(err)
        except ValueError as err:  # the library's config errors
            line = str(err)
        else:
            continue
        label = f"job {' '.join(job)}: " if len(jobs) > 1 else ""
        if f"{label}{line}" not in found:
            found.append(f"{label}{line}")
    return found


def run_checked(main: Callable[[], object], config_name: str, check: Callable) -> None:
    """Run a Hydra main after checking every job of the command line (exit 2 on a problem)."""
    args = sys.argv[1:]
    if not any(a in NOT_A_RUN or a.split("=")[0] in NOT_A_RUN for a in args):
        found = problems(args, config_name, check)
        for line in found:
            print(f"error: {line}", file=sys.stderr)
        if found:
            sys.exit(2)
    main()
