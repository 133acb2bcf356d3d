"""What the commands do around their work: parsing (with --config and --demo defaults) and one-line errors.

Torch-free at import, like the parsers: `--help` and argument errors answer at once, before any heavy import.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stage2.commands.flags import check_args, config_value
from stage2.commands.train_args import NOT_REPLAYED
from stage2.errors import USER_ERRORS, ConfigError, StopRequested, TrainingDiverged, first_line
from stage2.run.files import ARGS, RUN_FILES

DEMO_ROOT = Path("data/demo")
# A full disk (or quota, or file size limit) or an output folder we may not write to: one line naming the file;
# what was written stays intact.
OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help of the commands: the docstring as written, and every flag's default after its help text.

    Not for a flag whose default is None (its help says what happens without it) or a plain switch (off).
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:  # the hook ArgumentDefaults overrides too
        plain_switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if action.default is None or plain_switch:
            return action.help
        return super()._get_help_string(action)


def command_help(doc: str, script: str, command: str) -> str:
    """A script's docstring as its --help shows it: the examples name the program as it was started, the script
    (`python SCRIPT ...`) or the installed COMMAND (pyproject's [project.scripts]; torchrun runs it with
    --no-python)."""
    if Path(sys.argv[0]).name != command:
        return doc
    return doc.replace(f"python {script}", command).replace(f" {script}", f" --no-python {command}")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None,
               recipe: Callable[[argparse.Namespace], dict[str, Any]] | None = None, **demo: Any) -> argparse.Namespace:
    """Parse the command line. Defaults come, weakest first, from the parser, from `demo` (with --demo, which
    also generates the built-in dataset), from `recipe` (defaults that follow other settings: it is given them as
    parsed so far), then from the --config file; a flag given on the command line wins over all of them, even one
    given at its usual default."""
    given = parser.parse_known_args(argv)[0]
    if given.demo:  # the images are made by make_demo_data, once the output folder is checked
        train, val = DEMO_ROOT / "train.csv", DEMO_ROOT / "val.csv"  # what make_demo_dataset(DEMO_ROOT) writes
        output_dir = parser.get_default("output_dir") + "_demo"
        parser.set_defaults(train_manifest=str(train), val_manifest=str(val), data_root=None, output_dir=output_dir,
                            overwrite=True, **demo)
    config = config_defaults(parser, Path(given.config)) if given.config else {}
    parser.set_defaults(**config)
    if recipe is not None:
        settled = parser.parse_known_args(argv)[0]
        parser.set_defaults(**{key: value for key, value in recipe(settled).items() if key not in config})
    args = parser.parse_args(argv)
    check_args(parser, args)
    out = Path(args.output_dir)
    if given.demo and not (args.evaluate_checkpoint or args.resume or args.audit_only) and out.is_dir():
        _demo_replaces(out, Path(args.train_manifest), given.overwrite)
    return args


def make_demo_data(args: argparse.Namespace) -> None:
    """With --demo, generate the built-in dataset (reused when already there), once the command has checked its
    output folder: a refused folder costs no images."""
    if args.demo:
        from stage2.data.demo import make_demo_dataset  # numpy/PIL work, only when asked for

        # Logging is set up later, by the run: the demo speaks for itself before that.
        make_demo_dataset(DEMO_ROOT, progress=True)


def _demo_replaces(out: Path, train: Path, overwrite: bool) -> None:
    """--demo replaces an earlier demo run in its folder (it says so); another run there only with --overwrite."""
    runs = sorted({path.parent for path in out.rglob("*") if path.name in RUN_FILES})  # GenConViT's: out/ed, out/vae
    if not runs:
        return
    others = [run for run in runs if _trained_on(run) != train.resolve()]
    if others and not overwrite:
        raise ConfigError(f"--demo: --output-dir {others[0]} holds a run that is not a demo (trained on "
                          f"{_trained_on(others[0]) or 'unknown data'}): pass --overwrite to replace it, or choose "
                          "another --output-dir")
    print(f"demo: replacing the earlier run in {out} (--demo overwrites its output folder)", flush=True)


def _trained_on(run: Path) -> Path | None:
    """The train manifest the run in `run` recorded (args.json), resolved; None when it recorded none."""
    try:
        return Path(json.loads((run / ARGS).read_text())["train_manifest"]).resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return None


def config_defaults(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """Settings from a YAML or JSON file (a run's args.json replays that run) as parser defaults.

    Keys are flag names with or without the dashes (`batch-size`, `batch_size`); an unknown key is an error, and
    so are a key given twice and a value the flag's own type and choices do not take (`"false"` for a switch, 1.5
    for an integer). What describes a command rather than a run (--resume, --overwrite, --evaluate, --demo,
    --config) is refused when set: it goes on the command line (null or false, as older args.json hold, is no
    setting).
    """
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot read it ({err.strerror})") from None
    try:
        values = json.loads(text, object_pairs_hook=_unique_keys(path)) if path.suffix == ".json" else _yaml(text, path)
    except ConfigError:
        raise
    except Exception as err:  # json and yaml raise their own many kinds; all mean "not a config file"
        kind = path.suffix.lstrip(".") or "YAML"
        raise ConfigError(f"--config {path}: not valid {kind} ({first_line(err)})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings, found {type(values).__name__}")
    # argparse keeps no public list of its options
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    defaults = {}
    for key, value in values.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest == "evaluate":
            dest = "evaluate_checkpoint"
        if dest == "expert":  # what args.json records about the model, for reading
            continue
        if dest not in actions:
            negated = dest.removeprefix("no_")
            hint = f" (--no-{negated.replace('_', '-')} is `{negated}: false`)" if negated in actions else ""
            raise ConfigError(f"--config {path}: unknown setting {key!r}{hint}")
        if dest in NOT_REPLAYED:
            if value is not None and value is not False:
                raise ConfigError(f"--config {path}: {key!r} describes a command, not a run's settings: give "
                                  f"{actions[dest].option_strings[0]} on the command line")
            continue
        if dest in defaults:  # batch-size and batch_size
            raise ConfigError(f"--config {path}: {key!r} sets {actions[dest].option_strings[0]} a second time")
        try:
            defaults[dest] = config_value(actions[dest], value)
        except ValueError as err:
            raise ConfigError(f"--config {path}: {key} {err}") from None
    return defaults


def _unique_keys(path: Path) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """json's object_pairs_hook: a key given twice is an error naming it (json keeps the last silently)."""

    def mapping(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if repeated := next((key for key in keys if keys.count(key) > 1), None):
            raise ConfigError(f"--config {path}: {repeated!r} given twice")
        return dict(pairs)

    return mapping


def _yaml(text: str, path: Path) -> Any:
    """yaml.safe_load, but a key given twice in a mapping is an error naming it and its line (PyYAML keeps the last
    silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise ConfigError(f"--config {path}: {key!r} given twice (lines {seen[key]} and {line})")
                seen[key] = line
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: no arbitrary objects


def exit_on_error(main: Callable[[], object]) -> None:
    """Run `main`; turn bad input into `error: ...` on stderr with exit code 2, a diverged run into exit code 3,
    and a stop by signal (after last.pt was written) into 128 + the signal number, as shells report it."""
    try:
        main()
    except StopRequested as err:
        print(f"stopped: {err}", file=sys.stderr)
        sys.exit(128 + err.signum)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno not in OUTPUT_ERRNOS:
            raise
        # Every write of ours names its file (stage2.atomic.naming); a library's own write may not.
        where = err.filename or "an output file"
        print(f"error: cannot write {where}: {err.strerror}", file=sys.stderr)
        sys.exit(2)
