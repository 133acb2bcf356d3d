"""The shape of the code and the conventions around it: one-way imports (no cycle, none up the layers), an instant
command line, a package that installs, runs replayable from their args.json, and optional TensorBoard tracking."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

import train_stage2_effnet
from stage2.commands.cli import exit_on_error, parse_args


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT / "src").with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Edges module -> the modules of `stage2` it imports (absolute and relative), read from the source."""
    files = {_module_name(p): p for p in (ROOT / "src" / "stage2").rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def test_src_imports_have_no_cycle():
    graph = _import_graph()
    assert "stage2.scoring.evaluator" in graph["stage2.engine.trainer"]  # the graph is read, relative imports too:
    assert "stage2.models.genconvit.ed" in graph["stage2.models.genconvit.hybrid"]
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


# The package's layers, lowest first (README, Layout): a module imports from its own package or a lower layer.
LAYERS = (("errors", "atomic", "processes", "models.names"), ("data",), ("models",), ("experts",), ("run",),
          ("scoring",), ("engine", "embeddings"), ("commands",))


def _layer(module: str) -> tuple[int, str]:
    """(the layer of a stage2 module, its package: the layer's name for the bottom one, whose modules share it).
    The package's root (`from stage2 import FeatureExtractor`) sits on top of them all."""
    if module == "stage2":
        return len(LAYERS), module
    parts = module.split(".")[1:]
    for rank, names in enumerate(LAYERS):
        for name in names:
            if ".".join(parts[: name.count(".") + 1]) == name:
                return rank, names[0] if rank == 0 else name
    raise AssertionError(f"{module}: in no layer of LAYERS")


def test_src_imports_run_down_the_layers():
    graph = _import_graph()
    assert {"stage2.run.saver", "stage2.scoring.evaluator", "stage2.engine.loop", "stage2.commands.train_args"} <= set(
        graph)  # every package is read
    upward = [f"{a} -> {b}" for a in sorted(graph) for b in sorted(graph[a])
              if _layer(b)[1] != _layer(a)[1] and _layer(b)[0] >= _layer(a)[0]]
    assert not upward, "imports that run up (or across) the layers: " + "; ".join(upward)


@pytest.mark.parametrize("script", ["train_stage2_effnet.py", "train_stage2_genconvit.py", "feature_extractor.py"])
def test_help_and_argument_errors_import_neither_torch_nor_timm(script):
    bad_type = ["--batch-size", "many"] if "train" in script else ["--workers", "x"]
    for args, code in ((["--help"], 0), (bad_type, 2), (["--batch-size", "0"], 2)):  # a type, then a range
        ran = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / script), *args], capture_output=True,
                             text=True, timeout=60)
        assert ran.returncode == code, ran.stderr[-2000:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in ran.stderr.splitlines() if "import time:" in line}
        assert not imported & {"torch", "timm", "torchvision", "pandas"}, (script, args)
    assert ran.stderr.splitlines()[-1] == "error: --batch-size 0: expected an integer >= 1"
    assert "usage:" in subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                                      timeout=60).stdout


def _imports_of(script: str, args: list[str], env: dict[str, str] | None = None
                ) -> tuple[subprocess.CompletedProcess, set[str]]:
    ran = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / script), *args], capture_output=True,
                         text=True, timeout=120, env=env)
    return ran, {line.rsplit("|", 1)[-1].strip() for line in ran.stderr.splitlines() if "import time:" in line}


def test_a_taken_output_folder_or_a_missing_checkpoint_is_refused_before_torch_loads(tmp_path):
    # Importing torch and timm is most of half a minute on a busy box: a folder that cannot be used is said first.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(b"a run")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "robustness_val.png").write_bytes(b"a plot")
    (tmp_path / "gc" / "vae").mkdir(parents=True)
    (tmp_path / "gc" / "vae" / "last.pt").write_bytes(b"a run")
    cases = [
        ("train_stage2_effnet.py", ["--output-dir", str(tmp_path / "run")], "already holds a run (best.pt)"),
        ("train_stage2_effnet.py", ["--evaluate", "ckpt.pt", "--val-manifest", "val.csv", "--perturb", "jpeg:50",
                                    "--output-dir", str(tmp_path / "eval")], "already holds robustness_val.png"),
        # --variant both: the VAE's folder is checked before the ED trains, not hours later.
        ("train_stage2_genconvit.py", ["--output-dir", str(tmp_path / "gc")], f"{tmp_path / 'gc' / 'vae'} already"),
        ("feature_extractor.py", ["--checkpoint", str(tmp_path / "nope.pt"), "--images", str(tmp_path), "--out",
                                  str(tmp_path / "f.npz")], f"checkpoint {tmp_path / 'nope.pt'}: no such file"),
    ]
    for script, args, message in cases:
        ran, imported = _imports_of(script, args)
        assert ran.returncode == 2 and message in ran.stderr, (script, ran.stderr[-2000:])
        assert not imported & {"torch", "timm", "torchvision"}, script
    assert (tmp_path / "run" / "best.pt").read_bytes() == b"a run"


def test_missing_manifests_and_bad_settings_are_refused_before_torch_loads(tmp_path):
    train, val = tmp_path / "train.csv", tmp_path / "val.csv"
    for manifest in (train, val):
        manifest.write_text("path,label\n")
    out = ["--output-dir", str(tmp_path / "run")]
    cases = [
        ("train_stage2_effnet.py", ["--train-manifest", str(tmp_path / "nope.csv"), "--val-manifest", str(val), *out],
         f"error: {tmp_path / 'nope.csv'}: manifest file not found"),
        ("train_stage2_genconvit.py", ["--train-manifest", str(train), "--val-manifest", "gone.csv", *out],
         "error: gone.csv: manifest file not found"),
        ("train_stage2_effnet.py", ["--evaluate", str(tmp_path / "gone.pt"), "--val-manifest", str(val), *out],
         f"error: checkpoint {tmp_path / 'gone.pt'}: no such file"),
        ("train_stage2_effnet.py", ["--train-manifest", str(train), "--val-manifest", str(val), "--select-metric",
                                    "f1", *out], "error: --select-metric f1: unknown metric 'f1' for model selection"),
    ]
    for script, args, message in cases:
        ran, imported = _imports_of(script, args)
        assert ran.returncode == 2 and ran.stderr.splitlines()[-1].startswith(message), (script, ran.stderr[-2000:])
        assert not imported & {"torch", "timm", "torchvision"}, script
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.csv", "val.csv"]  # no run folder


@pytest.mark.parametrize("offline", [False, True], ids=["hub unreachable", "HF_HUB_OFFLINE"])
def test_hub_weights_that_cannot_come_are_one_line_before_torch_loads_and_the_run_folder(tiny_data, tmp_path,
                                                                                          offline):
    # The default model's weights, with an empty hub cache and the hub's address a closed local port: huggingface_hub
    # would retry for about a minute; the trainers find out with one refused connection (or none, when offline).
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env.pop("HF_HUB_OFFLINE", None)
    train, val = tiny_data
    manifests = ["--train-manifest", str(train), "--val-manifest", str(val)]
    cases = [
        ("train_stage2_effnet.py", [], "timm/tf_efficientnetv2_b3.in21k_ft_in1k", "--pretrained-file PATH"),
        ("train_stage2_genconvit.py", ["--variant", "ed"], "Deressa/GenConViT/genconvit_ed_inference.pth",
         "--weights PATH"),
        ("train_stage2_genconvit.py", ["--init", "imagenet", "--arch", "hybrid", "--backbone-file", str(train)],
         "timm/swin_tiny_patch4_window7_224", "--swin-file"),
    ]
    for script, args, repo, flag in cases:
        ran, imported = _imports_of(script, [*manifests, *args, "--output-dir", str(tmp_path / "run")], env)
        err = ran.stderr.splitlines()[-1]
        assert ran.returncode == 2 and err.startswith(f"error: the pretrained weights of {repo} are not in the local "
                                                      f"hub cache ({tmp_path / 'hf' / 'hub'})"), ran.stderr[-2000:]
        why = "HF_HUB_OFFLINE is set" if offline else "the hub is unreachable (127.0.0.1:9: Connection refused)"
        assert why in err and flag in err
        assert not imported & {"torch", "timm", "torchvision"}, script
    assert not (tmp_path / "run").exists()


def test_hub_weights_in_the_local_cache_need_no_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from stage2.errors import PretrainedWeightsError
    from stage2.models.hub import check_hub, timm_repo

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    needed = [(timm_repo("resnet18"), None), ("Deressa/GenConViT", "genconvit_ed_inference.pth")]
    with pytest.raises(PretrainedWeightsError, match=r"of timm/resnet18, Deressa/GenConViT/genconvit_ed_inf"):
        check_hub(needed, "--no-pretrained")
    (tmp_path / "models--timm--resnet18.a1_in1k" / "snapshots" / "abc").mkdir(parents=True)
    (tmp_path / "models--timm--resnet18.a1_in1k" / "snapshots" / "abc" / "model.safetensors").write_bytes(b"w")
    (tmp_path / "models--Deressa--GenConViT" / "snapshots" / "abc").mkdir(parents=True)
    (tmp_path / "models--Deressa--GenConViT" / "snapshots" / "abc" / "genconvit_vae_inference.pth").write_bytes(b"w")
    with pytest.raises(PretrainedWeightsError, match=r"of Deressa/GenConViT/genconvit_ed_inference.pth are not"):
        check_hub(needed, "--no-pretrained")  # the other variant's file is no substitute
    (tmp_path / "models--Deressa--GenConViT" / "snapshots" / "abc" / "genconvit_ed_inference.pth").write_bytes(b"w")
    check_hub(needed, "--no-pretrained")


def test_the_package_installs_and_its_commands_run(tmp_path):
    # A copy of what the package is built from, so that the build leaves nothing in the checkout.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "train_stage2_effnet.py", "train_stage2_genconvit.py",
                 "feature_extractor.py", "requirements.txt", "requirements-dev.txt"):
        shutil.copy(ROOT / name, source / name)
    # The set-up command (pip install -r requirements-dev.txt, in the checkout) installs the package itself, editable:
    # `python -m stage2...` and stage2-torchrun then work from any folder.
    plan = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps",
                           "--no-build-isolation", "--quiet", "--report", "-", "-r", "requirements-dev.txt"],
                          capture_output=True, text=True, cwd=source, timeout=300)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert [(item["metadata"]["name"], item["download_info"]) for item in json.loads(plan.stdout)["install"]] == [
        ("stage2-experts", {"url": source.as_uri(), "dir_info": {"editable": True}})]
    # Installed into a folder of its own with this interpreter's pip and setuptools (requirements-dev.txt brings a
    # setuptools that builds wheels): a nested venv would see the base interpreter's packages, not a venv's.
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                          "--target", str(site), str(source)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(site)}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for command in ("stage2-train-effnet", "stage2-train-genconvit", "stage2-extract"):
        ran = subprocess.run([str(site / "bin" / command), "--help"], capture_output=True, text=True, cwd=outside,
                             env=env, timeout=60)
        assert ran.returncode == 0 and ran.stdout.startswith(f"usage: {command}"), (command, ran.stderr[-2000:])
        assert f"\n    {command} --" in ran.stdout and ".py " not in ran.stdout  # the examples name the command
    assert (site / "bin" / "stage2-torchrun").is_file()  # torch's launcher, run in tests/end_to_end/test_reliability.py
    # Every module of the package is installed (the commands' --help above imports only the torch-free ones), and
    # imports resolve to the installed copy, not to the checkout.
    modules = {p.relative_to(ROOT / "src") for p in (ROOT / "src" / "stage2").rglob("*.py")}
    assert modules == {p.relative_to(site) for p in (site / "stage2").rglob("*.py")}
    where = subprocess.run([sys.executable, "-c", "import stage2.commands.train_effnet as c, feature_extractor as f; "
                            "print(c.__file__, f.__file__)"], capture_output=True, text=True, cwd=outside, env=env,
                           timeout=120)
    assert where.returncode == 0, where.stderr[-2000:]
    assert where.stdout.split() == [str(site / "stage2" / "commands" / "train_effnet.py"),
                                    str(site / "feature_extractor.py")]


def test_a_notebook_outside_the_checkout_imports_the_feature_extractor_from_the_package(tmp_path):
    # As after `pip install -e .`: the package importable, the working folder anywhere; torch loads on first use.
    code = ("import sys, stage2\n"
            "assert 'torch' not in sys.modules\n"
            "from stage2 import FeatureExtractor\n"
            "from stage2.embeddings import FeatureExtractor as same\n"
            "print(FeatureExtractor is same, FeatureExtractor.__module__, 'torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.split() == ["True", "stage2.embeddings.extract", "True"]


def test_a_run_replays_from_its_args_json_and_flags_win(trained_run, tmp_path):
    recorded = trained_run / "args.json"
    replay = parse_args(train_stage2_effnet.build_parser(), ["--config", str(recorded), "--output-dir",
                                                             str(tmp_path / "replay"), "--epochs", "1"])
    first = json.loads(recorded.read_text())
    assert (replay.lr, replay.model, replay.img_size, replay.epochs) == (1e-2, "test_efficientnet", 32, 1)
    assert replay.output_dir == str(tmp_path / "replay")  # given on the command line: flags win over the file
    train_stage2_effnet.main(["--config", str(recorded), "--output-dir", str(tmp_path / "replay"), "--epochs", "1"])
    second = json.loads((tmp_path / "replay" / "args.json").read_text())
    changed = {"output_dir", "epochs"}
    assert {k: v for k, v in second.items() if k not in changed} == {k: v for k, v in first.items()
                                                                      if k not in changed}
    assert (first["epochs"], second["epochs"]) == (2, 1)


def test_a_yaml_config_sets_defaults_and_unknown_keys_are_one_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("batch-size: 4\nlr: 0.002\nmodel: resnet10t\n")
    args = parse_args(train_stage2_effnet.build_parser(), ["--config", str(config), "--lr", "0.01"])
    assert (args.batch_size, args.lr, args.model) == (4, 0.01, "resnet10t")
    config.write_text("learning_rate: 0.002\n")
    with pytest.raises(SystemExit) as exit_info:
        exit_on_error(lambda: train_stage2_effnet.main(["--config", str(config)]))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "unknown setting 'learning_rate'" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_tensorboard_gets_steps_epochs_and_images(effnet_args, tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import train_stage2_genconvit

    train_stage2_effnet.main([*effnet_args, "--log-to", "tensorboard", "--log-every", "1"])
    train, val = tiny_data
    train_stage2_genconvit.main([
        "--train-manifest", str(train), "--val-manifest", str(val), "--init", "scratch", "--backbone", "test_convnext",
        "--img-size", "64", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--amp", "off", "--variant", "ed",
        "--output-dir", str(tmp_path / "gc"), "--log-to", "tensorboard", "--log-every", "1"])
    for run, image in ((Path(effnet_args[effnet_args.index("--output-dir") + 1]), "roc"),
                       (tmp_path / "gc" / "ed", "recon_samples")):
        events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
        events.Reload()
        tags = events.Tags()
        assert {"step/train_loss", "step/lr", "epoch/auc", "epoch/val_loss"} <= set(tags["scalars"]), run
        assert image in tags["images"], run
        assert len(events.Scalars("epoch/auc")) == (2 if image == "roc" else 1)


def test_the_readmes_export_folder_is_not_committed_by_accident():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("exported/effnet/model.onnx", "output/stage2_effnet/best.pt", "features/effnet_val.npz",
                 "weights/lite0.safetensors", "out/scores.csv"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, timeout=60)
        assert ignored.returncode == 0, path
