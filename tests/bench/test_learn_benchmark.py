"""The learnability benchmark on tiny plans: per trace type, leave one type out, and real mode, through its CLI."""

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from benchmarks import learn
from benchmarks.traces import split_items, write_set
from stage2.run.checkpoint import BestCheckpoint, read_last

TINY = ["--seeds", "0", "--epochs", "1", "--n-train", "24", "--n-val", "20", "--img-size", "32", "--batch", "8"]


def test_per_type_trains_both_sides_scores_every_perturbation_and_judges_the_default(tmp_path):
    out = tmp_path / "learn.json"
    result = learn.main([*TINY, "--types", "resample,splice", "--levels", "standard", "--json", str(out),
                         "--work-dir", str(tmp_path / "work")])
    assert json.loads(out.read_text())["protocol"] == "per-type"
    assert [(r["type"], r["case"]) for r in result["runs"]] == [
        ("resample", learn.PLAIN), ("resample", "ours --aug standard"),
        ("splice", learn.PLAIN), ("splice", "ours --aug standard")]
    for r in result["runs"]:
        perturbed = [r[k] for k in ("jpeg:50-70", "down:0.5", "blur:1", "noise:0.02")]
        assert all(0 <= v <= 1 for v in [r["clean"], *perturbed])
        assert r["perturbed"] == pytest.approx(np.mean(perturbed))
    plain = [r for r in result["summary"] if r["case"] == learn.PLAIN]
    assert all(r["clean_vs_plain"] == 1.0 for r in plain)
    verdict = result["verdict"]  # {} when the tiny plain loop learnt neither type
    table = out.with_suffix(".md").read_text()
    assert "| resample |" in table and "| splice |" in table and "Perturbed val AUC" in table
    assert ("meets the bar" in table) == verdict.get("passes", False)

    halves = [{**result, "runs": [r for r in result["runs"] if r["type"] == t]} for t in ("resample", "splice")]
    for half, path in zip(halves, ("a.json", "b.json")):
        (tmp_path / path).write_text(json.dumps(half))
    merged = learn.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json", str(out)])
    assert merged["summary"] == result["summary"] and merged["verdict"] == verdict
    with pytest.raises(ValueError, match="share runs"):
        learn.merge([result, result])


def _per_type(figures: dict[tuple[str, str], tuple[float, float]]) -> dict:
    """A per-type result from (type, case) -> (clean, perturbed) runs, summarised as the benchmark does."""
    runs = [{"type": t, "case": c, "seed": 0, "clean": clean, "perturbed": perturbed}
            for (t, c), (clean, perturbed) in figures.items()]
    summary = learn.summarise(runs, ["clean", "perturbed"])
    plan = {**vars(learn.LearnPlan()), "seeds": [0]}
    return {"protocol": "per-type", "plan": plan, "runs": runs, "summary": summary,
            "verdict": learn.verdict(summary, "ours --aug standard")}


def test_the_verdict_judges_the_default_on_every_type_the_plain_loop_learnt():
    ours = "ours --aug standard"
    figures = {("a", learn.PLAIN): (0.90, 0.70), ("a", ours): (0.89, 0.75),
               ("b", learn.PLAIN): (0.80, 0.60), ("b", ours): (0.79, 0.66),
               ("c", learn.PLAIN): (0.55, 0.50), ("c", ours): (0.40, 0.45)}  # c: not learnt by the plain loop
    verdict = _per_type(figures)["verdict"]
    assert verdict["worst_type"] == "b" and verdict["not_learnt"] == ["c"] and verdict["passes"]
    assert verdict["perturbed_mean"] == pytest.approx(0.705) and verdict["plain_perturbed_mean"] == pytest.approx(0.65)
    figures["b", ours] = (0.78, 0.66)  # 0.975x the plain loop
    assert not _per_type(figures)["verdict"]["passes"]
    figures["b", ours] = (0.80, 0.50)  # as good clean, less robust: the perturbed mean falls below
    assert not _per_type(figures)["verdict"]["passes"]


def test_a_failing_verdict_is_written_and_both_tables_give_ratios_to_the_plain_loop(tmp_path):
    ours = "ours --aug standard"
    result = _per_type({("a", learn.PLAIN): (0.80, 0.70), ("a", ours): (0.72, 0.77)})  # 0.9x clean: misses
    assert result["verdict"]["passes"] is False
    learn.write_result(result, tmp_path / "r.json")  # a numpy bool here once crashed json.dumps after the table
    assert json.loads((tmp_path / "r.json").read_text())["verdict"]["passes"] is False
    clean, perturbed = (tmp_path / "r.md").read_text().split("Perturbed val AUC")
    assert "| a | 0.8000 (1.000x) | 0.7200 (0.900x) |" in clean
    assert "| a | 0.7000 (1.000x) | 0.7700 (1.100x) |" in perturbed and "misses the bar" in perturbed


def test_held_out_scores_the_type_it_never_trained_on_with_each_variant(tmp_path):
    # Three types, one of them held out (each in turn is the same code, three times the training).
    result = learn.main([*TINY, "--protocol", "held-out", "--types", "colour,sharpen,splice", "--hold-out", "colour",
                         "--variant", "self-blend=--self-blend 0.9", "--json", str(tmp_path / "h.json"),
                         "--work-dir", str(tmp_path / "work")])
    assert [(r["type"], r["case"]) for r in result["summary"]] == [
        ("colour", c) for c in (learn.PLAIN, "ours --aug standard", "ours self-blend")]
    assert all(0 <= r["held_out"] <= 1 for r in result["runs"])
    train = pd.read_csv(tmp_path / "work" / "traces" / "train_no_colour.csv")
    test = pd.read_csv(tmp_path / "work" / "traces" / "test_colour.csv")
    assert set(train["method"]) == {"real", "sharpen", "splice"} and set(test["method"]) == {"real", "colour"}
    assert "self-blend 0.9" in (tmp_path / "work" / "runs" / "colour_oursself-blend_0" / "train.log").read_text()
    assert "mean in-domain" in (tmp_path / "h.md").read_text()


def test_bad_flags_are_one_line_errors(capsys, tmp_path):
    (tmp_path / "junk.json").write_text("{not json")
    cases = ((["--train-manifest", "t.csv"], "both --train-manifest and --val-manifest"),
             (["--cross", "a=b.csv"], "only in real mode"), (["--genconvit", "ed"], "only in real mode"),
             (["--cross", "a/b", "--train-manifest", "t", "--val-manifest", "v"], "expected NAME=MANIFEST"),
             (["--n-train", "0"], "positive integer"), (["--n-train", "8"], "at least 14 crops"),
             (["--seeds", "0,0"], "distinct"), (["--lr", "-1", "--train-manifest", "t", "--val-manifest", "v"],
                                                "positive number"),
             (["--types", "splice", "--n-val", "2"], "--n-val 2: at least 20 val crops (10 real and 10 fake)"),
             *((["--train-manifest", "t", "--val-manifest", "v", flag, value], f"{flag}: only in the synthetic")
               for flag, value in (("--protocol", "held-out"), ("--types", "splice"), ("--n-val", "50"))))
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            learn.parse_args(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, argv
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: torch sees no CUDA device here"):
            learn.main(["--device", "cuda"])
    with pytest.raises(SystemExit, match=r"--n-train 16: 16 train images, fewer than one batch \(--batch 32\)"):
        learn.main(["--types", "splice", "--n-train", "16", "--work-dir", str(tmp_path / "work")])
    assert not (tmp_path / "work").exists()
    for path in (tmp_path / "missing.json", tmp_path / "junk.json"):
        with pytest.raises(SystemExit, match=rf"--merge {path}: cannot read a result"):
            learn.main(["--merge", str(path)])


def test_real_mode_audits_every_set_trains_every_expert_and_stacks_them(tmp_path, capsys):
    data = tmp_path / "data"
    train = write_set(data, "train", split_items(0, 32, ["resample"]), size=32)
    val = write_set(data, "val", split_items(32, 24, ["resample"]), size=32)
    cross = pd.read_csv(write_set(data, "cross", split_items(56, 12, ["splice"]), size=32))
    for i, row in cross.iterrows():  # a cross set whose fakes were saved at another JPEG quality: a shortcut
        jpeg = data / row["path"].replace(".png", ".jpg")
        Image.open(data / row["path"]).save(jpeg, quality=95 if row["label"] else 90)
        cross.loc[i, "path"] = str(jpeg)
    cross.to_csv(data / "cross_jpeg.csv", index=False)
    plan = learn.LearnPlan(model="test_efficientnet", img_size=32, batch=8, epochs=1, seeds=(0,),
                           levels=("standard",), plain=("random", "zero"), genconvit=("ed",))
    result = learn.run_real(plan, train, val, {"splice": data / "cross_jpeg.csv"}, tmp_path / "work")
    printed = capsys.readouterr().out
    assert printed.index("shortcut audit") < printed.index(learn.PLAIN)
    assert "jpeg_quality alone separates real from fake in splice" in printed
    audit = pd.DataFrame(result["audit"]).set_index(["set", "feature"])
    assert audit.loc[("splice", "jpeg_quality"), "auc"] == 1.0 and not audit.loc[("train", "format"), "shortcut"]
    assert [r["case"] for r in result["summary"]] == [learn.PLAIN, learn.PLAIN_ZERO, "ours --aug standard",
                                                      "genconvit ed", "stack: ours + genconvit ed"]
    runs = {r["case"]: r for r in result["runs"]}
    assert all(0 <= r["cross:splice"] <= 1 and 0 <= r["clean"] <= 1 for r in runs.values())
    assert all(r["cpu_seconds"] > 0 for case, r in runs.items() if not case.startswith("stack"))
    # GenConViT's figures: its reconstruction against the flat image, from its own metrics.csv
    history = pd.read_csv(tmp_path / "work" / "runs" / "real_genconvited_0" / "ed" / "metrics.csv")
    assert runs["genconvit ed"]["recon_psnr"] == pytest.approx(history["val_recon_psnr"].iloc[-1])
    stack = runs["stack: ours + genconvit ed"]
    assert stack["gain"] == pytest.approx(stack["clean"] - stack["best_expert"])
    assert stack["gain_last"] == pytest.approx(stack["clean_last"] - stack["best_expert_last"])
    assert -1 <= stack["corr"] <= 1 and -1 <= stack["corr_last"] <= 1
    # every run's last epoch beside its best, in-domain and cross; the reconstruction error's own AUC
    for case, r in runs.items():
        assert all(0 <= r[k] <= 1 for k in ("clean_last", "cross:splice_last")), case
    assert {k for k in runs["genconvit ed"] if k.startswith("recon_auc")} == {
        "recon_auc", "recon_auc_last", "recon_auc:splice", "recon_auc:splice_last"}
    assert not any(k.startswith("recon_auc") for k in runs["ours --aug standard"])
    folder = tmp_path / "work" / "runs" / "real_ours--augstandard_0"
    last = read_last(folder / "last.pt")  # ours' last epoch
    last_model = learn.model_from_checkpoint(BestCheckpoint(model=last.model, meta=last.meta,
                                                            data_config=last.data_config).to_dict())
    ours = replace(learn.from_run(folder, learn.Case("ours --aug standard", "ours"), 0, plan), model=last_model)
    val_frame = pd.read_csv(val)
    val_frame["path"] = [str(data / p) for p in val_frame["path"]]
    assert runs["ours --aug standard"]["clean_last"] == pytest.approx(learn.auc(ours, val_frame))
    table = learn.markdown(result)
    assert "splice AUC (cross)" in table and "mean colour" in table and "best expert" in table
    assert "Last epoch:" in table and "reconstruction error alone" in table and "logits' r" in table
    # an ablation run on the same budget (ours with other flags only) merges with it: one table, the plain loops
    # of the first run as its reference
    # with GenConViT's autoencoder trained on the reals alone, stacked by name (ours' default case not run)
    ablation = replace(plan, plain=(), genconvit=(), levels=("none",),
                       variants=(("no drop-path", ("--drop-path", "0")),),
                       genconvit_variants=(("ed reals", ("--variant", "ed", "--recon-on", "reals")),),
                       stacks=(("ours no drop-path", "genconvit ed reals"),))
    (tmp_path / "ablation.json").write_text(json.dumps(
        learn.run_real(ablation, train, val, {"splice": data / "cross_jpeg.csv"}, tmp_path / "work2")))
    args = json.loads((tmp_path / "work2" / "runs" / "real_genconvitedreals_0" / "ed" / "args.json").read_text())
    assert args["recon_on"] == "reals"
    merged = learn.merge([result, json.loads((tmp_path / "ablation.json").read_text())])
    cases = [r["case"] for r in merged["summary"]]
    assert cases[:5] == [r["case"] for r in result["summary"]] and cases[5:] == [
        "ours --aug none", "ours no drop-path", "genconvit ed reals", "stack: ours no drop-path + genconvit ed reals"]
    assert merged["plan"]["plain"] == ["random", "zero"] and merged["plan"]["genconvit"] == ["ed"]
    assert merged["plan"]["stacks"] == [("ours no drop-path", "genconvit ed reals")]
    assert "clean_vs_plain" in merged["summary"][5] and "recon_auc:splice_last" in merged["summary"][7]


def test_real_mode_refuses_a_missing_set_or_a_train_set_under_a_batch_before_training(tmp_path):
    train = write_set(tmp_path / "data", "train", split_items(0, 8, ["resample"]), size=32)
    val = write_set(tmp_path / "data", "val", split_items(8, 8, ["resample"]), size=32)
    argv = ["--train-manifest", str(train), "--val-manifest", str(val), "--model", "test_efficientnet",
            "--work-dir", str(tmp_path / "work"), "--json", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit, match=rf"^error: {tmp_path / 'MISSING.csv'}: manifest file not found$"):
        learn.main([*argv, "--cross", f"c={tmp_path / 'MISSING.csv'}"])
    with pytest.raises(SystemExit, match=rf"--train-manifest {train}: 8 train images, fewer than one batch"):
        learn.main(argv)
    assert not (tmp_path / "work" / "runs").exists()
    learn.main([*argv, "--plain", "none", "--genconvit", "none", "--levels", "standard", "--epochs", "1",
                "--seeds", "0", "--img-size", "32"])
    assert (tmp_path / "work" / "runs").exists()  # ours takes a set under a batch


def test_the_reals_only_manifest_keeps_the_real_rows_and_their_columns(tmp_path):
    data = tmp_path / "data"
    train = write_set(data, "train", split_items(0, 16, ["resample"]), size=32)
    written = learn.reals_only_manifest(train, tmp_path / "work")
    assert written == tmp_path / "work" / "reals_only" / "train.csv"
    reals, rows = pd.read_csv(written), pd.read_csv(train)
    assert set(reals.columns) == set(rows.columns) and (reals["label"] == 0).all()
    assert reals["path"].tolist() == [str(data / p) for p in rows.loc[rows["label"] == 0, "path"]]
    assert (reals["method"] == "real").all() and len(reals) == (rows["label"] == 0).sum() > 0


def test_a_reals_only_case_trains_on_the_reals_alone_and_stacks_with_ours(tmp_path):
    data = tmp_path / "data"
    train = write_set(data, "train", split_items(0, 32, ["resample"]), size=32)
    val = write_set(data, "val", split_items(32, 24, ["resample"]), size=32)
    plan = learn.LearnPlan(model="test_efficientnet", img_size=32, batch=8, epochs=1, seeds=(0,), plain=(),
                           levels=("standard",), reals_only=(("sbi", ("--self-blend", "0.5")),))
    result = learn.run_real(plan, train, val, {}, tmp_path / "work")
    args = json.loads((tmp_path / "work" / "runs" / "real_oursreals-onlysbi_0" / "args.json").read_text())
    assert args["train_manifest"] == str(tmp_path / "work" / "reals_only" / "train.csv")
    runs = {r["case"]: r for r in result["runs"]}
    assert list(runs) == ["ours --aug standard", "ours reals-only sbi", "stack: ours + ours reals-only sbi"]
    assert -1 <= runs["stack: ours + ours reals-only sbi"]["corr"] <= 1


def test_levels_off_runs_the_other_cases_without_ours(tmp_path, capsys):
    data = tmp_path / "data"
    train = write_set(data, "train", split_items(0, 32, ["resample"]), size=32)
    val = write_set(data, "val", split_items(32, 24, ["resample"]), size=32)
    real = ["--train-manifest", str(train), "--val-manifest", str(val), "--genconvit", "none", "--plain", "none"]
    plan = learn.plan_from_args(learn.parse_args([*real, "--levels", "off", "--reals-only-variant",
                                                  "sbi=--self-blend paired"]))
    assert plan.levels == () and learn.stack_members(plan) == []
    result = learn.run_real(replace(plan, model="test_efficientnet", img_size=32, batch=8, epochs=1, seeds=(0,)),
                            train, val, {}, tmp_path / "work")
    assert [r["case"] for r in result["runs"]] == ["ours reals-only sbi"]
    for argv, message in (([*real, "--levels", "off"], "no case to run"),
                          ([*real, "--levels", "off,standard"], "off stands alone"),
                          (["--levels", "off"], "off stands alone")):
        with pytest.raises(SystemExit) as exit_info:
            learn.parse_args(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, argv


def test_bad_case_and_stack_flags_are_one_line_errors(capsys):
    real = ["--train-manifest", "t.csv", "--val-manifest", "v.csv"]
    cases = ((["--stack", "ours+genconvit ed"], "only in real mode"),
             ([*real, "--stack", "ours"], "two or more distinct case names"),
             ([*real, "--stack", "ours+genconvit vae"], "no case 'genconvit vae'"),
             ([*real, "--levels", "none", "--stack", "ours+genconvit ed"], "no case 'ours'"),
             ([*real, "--genconvit-variant", "r=--recon-on reals"], "must name --variant"),
             ([*real, "--variant", "a=--aug none", "--variant", "a=--aug light"], "two cases named 'ours a'"),
             # each case's command line, read by its trainer before anything trains (this one died hours in)
             ([*real, "--reals-only-variant", "a=--self-blend paired --lr 1e-3"],
              "case 'ours reals-only a': --lr given twice (0.0003, then 0.001): it takes one value"),
             ([*real, "--variant", "b=--blend-without shapes"],
              "case 'ours b': --blend-without shapes: only with --self-blend"),
             ([*real, "--variant", "c=--bogus 1"], "case 'ours c': unrecognized arguments: --bogus 1"),
             ([*real, "--genconvit-variant", "g=--variant ed --ae-lr -1"],
              "case 'genconvit g': --ae-lr -1.0: expected a number > 0"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            learn.parse_args(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, argv
    args = learn.parse_args([*real, "--reals-only-variant", "sbi=--self-blend 0.5",
                             "--stack", "ours reals-only sbi+ours"])
    plan = learn.plan_from_args(args)
    assert learn.stack_members(plan) == [("ours reals-only sbi", "ours --aug standard")]
    assert learn.stack_members(replace(plan, stacks=())) == [("ours --aug standard", "genconvit ed"),
                                                             ("ours --aug standard", "ours reals-only sbi")]
