"""read_manifest on real CSV files: columns, labels, path resolution and every validation error."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, subprocess_env
from PIL import Image

from stage2.commands.cli import exit_on_error
from stage2.data.manifest import check_source_leak, manifest_fingerprint, read_manifest
from stage2.errors import ManifestError


def _csv(folder: Path, text: str, name: str = "train.csv") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def _touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")  # only existence is checked here


def _error(manifest: Path, **kwargs) -> str:
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest, **kwargs)
    message = str(info.value)
    assert "\n" not in message and manifest.name in message
    return message


def test_reads_paths_labels_and_optional_columns(tmp_path):
    _touch(tmp_path, "a.png", "sub/b.png", "c.png")
    manifest = _csv(tmp_path, "path,label,video_id,method\na.png,0,v1,real\nsub/b.png,fake,v2,\nc.png,1,,deepfakes\n")
    frame = read_manifest(manifest)
    assert list(frame.columns) == ["path", "label", "video_id", "method"]
    assert list(frame.index) == [0, 1, 2]
    assert frame["path"].tolist() == [str(tmp_path / n) for n in ("a.png", "sub/b.png", "c.png")]
    assert frame["label"].dtype == "int64" and frame["label"].tolist() == [0, 1, 1]
    assert frame["video_id"].tolist() == ["v1", "v2", ""]
    assert frame["method"].tolist() == ["real", "", "deepfakes"]
    assert frame.attrs["manifest"] == str(manifest)


def test_optional_columns_only_when_present(tmp_path):
    _touch(tmp_path, "a.png", "b.png")
    frame = read_manifest(_csv(tmp_path, "label,path\n0,a.png\n1,b.png\n"))
    assert list(frame.columns) == ["path", "label"]


@pytest.mark.parametrize(
    ("cell", "expected"),
    [("0", 0), ("1", 1), ("real", 0), ("fake", 1), ("FAKE", 1), ("Real", 0), ("0.0", 0), ("1.0", 1), (" 1 ", 1)],
)
def test_label_spellings(tmp_path, cell, expected):
    _touch(tmp_path, "a.png")
    frame = read_manifest(_csv(tmp_path, f"path,label\na.png,{cell}\n"))
    assert frame["label"].tolist() == [expected]


@pytest.mark.parametrize(
    ("header", "used"),
    [
        ("filepath,label,image", "filepath"),
        ("Image_Path,Label", "Image_Path"),
        ("IMAGE,label", "IMAGE"),
        ("file,label", "file"),
        ("file,image,label,Path", "Path"),  # several candidates: path wins, then filepath, image_path, image, file
        ("file,image,label", "image"),
    ],
)
def test_path_column_aliases_and_preference(tmp_path, header, used):
    names = header.split(",")
    _touch(tmp_path, *(f"{n}.png" for n in names))
    row = ",".join("1" if n.lower() == "label" else f"{n}.png" for n in names)
    frame = read_manifest(_csv(tmp_path, f"{header}\n{row}\n"))
    assert frame["path"].tolist() == [str(tmp_path / f"{used}.png")]


def test_relative_paths_resolve_against_the_manifest_folder_or_data_root(tmp_path):
    lists, images = tmp_path / "lists", tmp_path / "images"
    lists.mkdir()
    _touch(images, "x/a.png")
    _touch(tmp_path, "outside.png")
    manifest = _csv(lists, f"path,label\n../images/x/a.png,0\n{tmp_path / 'outside.png'},1\n")
    frame = read_manifest(manifest)
    assert frame["path"].tolist() == [str(images / "x/a.png"), str(tmp_path / "outside.png")]

    manifest = _csv(lists, f"path,label\nx/a.png,0\n{tmp_path / 'outside.png'},1\n")
    frame = read_manifest(manifest, data_root=images)
    assert frame["path"].tolist() == [str(images / "x/a.png"), str(tmp_path / "outside.png")]
    assert all(os.path.isabs(p) for p in frame["path"])


# Paths that are plain (joined to the base as they are) and paths that normpath or expanduser change.
PLAIN = ["a.png", "x/b.png", "..c.png", "d..png", "e./f.png", " g.png", "h~.png", "sub/i j.png", "é.png"]
NOT_PLAIN = ["./k.png", "x/../l.png", "x//m.png", "x/./n.png", "~/o.png", ".hidden/p.png", "/abs//q.png", "r/.."]


@pytest.mark.parametrize("paths", [PLAIN, [*PLAIN, "/abs/s.png"], [*PLAIN, *NOT_PLAIN], NOT_PLAIN],
                         ids=["plain", "plain-and-absolute", "mixed", "not-plain"])
def test_every_path_resolves_as_normpath_and_expanduser_give_it(tmp_path, paths):
    rows = "".join(f"{p},1,v{i},m\n" for i, p in enumerate(paths))
    frame = read_manifest(_csv(tmp_path, f"path,label,video_id,method\n{rows}"), data_root="/data/root",
                          check_files=False)
    assert frame["path"].tolist() == [os.path.normpath(os.path.join("/data/root", os.path.expanduser(p)))
                                      for p in paths]


@pytest.mark.parametrize("space", [" ", "\t", "\x1c", "\u00a0", "\u2003"])
def test_whitespace_around_any_cell_is_stripped(tmp_path, space):
    _touch(tmp_path, "a.png", "b.png")
    frame = read_manifest(_csv(tmp_path, f"path,label,video_id\na.png,0,v1\nb.png,1{space},{space}v2\n"))
    assert frame["label"].tolist() == [0, 1] and frame["video_id"].tolist() == ["v1", "v2"]


@pytest.mark.parametrize("rows", [
    "path,label,video_id,method\na.png,1,v1,m\nb.png,0,v2,\n",
    "path,label,source_id\n\"a,1.png\",1,s1\nb.png,0,\"say \"\"x\"\"\"\n",  # cells that need quoting
    "path\na.png\nb.png\n",  # unlabeled
], ids=["plain", "quoted", "unlabeled"])
def test_the_fingerprint_is_the_sha256_of_the_frame_as_to_csv_writes_it(tmp_path, rows):
    frame = read_manifest(_csv(tmp_path, rows), check_files=False, require_labels=False)
    expected = hashlib.sha256(frame.to_csv(index=False).encode()).hexdigest()  # what runs' last.pt files hold
    assert manifest_fingerprint(frame) == {"rows": 2, "sha256": expected}


def test_relative_data_root_becomes_absolute(tmp_path, monkeypatch):
    _touch(tmp_path, "data/a.png")
    monkeypatch.chdir(tmp_path)
    frame = read_manifest(_csv(tmp_path, "path,label\na.png,1\n"), data_root="data")
    assert frame["path"].tolist() == [str(tmp_path / "data/a.png")]


def test_missing_manifest(tmp_path):
    assert "not found" in _error(tmp_path / "absent.csv")
    (tmp_path / "folder.csv").mkdir()
    assert "not found" in _error(tmp_path / "folder.csv")


def test_zero_byte_manifest(tmp_path):
    assert "empty file" in _error(_csv(tmp_path, ""))


def test_binary_file_is_not_a_csv(tmp_path):
    manifest = tmp_path / "train.csv"
    manifest.write_bytes(bytes(range(256)) * 8)
    assert "not a readable CSV" in _error(manifest)


@pytest.mark.parametrize("text", ["path,label\n", "path,label\n\n\n"])
def test_manifest_without_data_rows(tmp_path, text):
    assert "no data rows" in _error(_csv(tmp_path, text))


def test_missing_columns_name_what_was_found(tmp_path):
    message = _error(_csv(tmp_path, "image_file,video_id\na.png,v\n"))
    assert "missing column(s) path, label" in message and "found: image_file, video_id" in message
    message = _error(_csv(tmp_path, "path,is_fake\na.png,1\n"))
    assert "missing column(s) label" in message and "found: path, is_fake" in message


def test_columns_repeated_in_another_case(tmp_path):
    assert "repeated column(s) path" in _error(_csv(tmp_path, "path,label,Path\na.png,0,b.png\n"))


def test_empty_path_cell_names_the_line(tmp_path):
    _touch(tmp_path, "a.png")
    assert "train.csv line 3: empty image path" in _error(_csv(tmp_path, "path,label\na.png,0\n,1\n"))


@pytest.mark.parametrize("bad", ["maybe", "2", "0.5", "", "true"])
def test_unknown_label_names_the_first_bad_line(tmp_path, bad):
    _touch(tmp_path, "a.png", "b.png", "c.png", "d.png")
    manifest = _csv(tmp_path, f"path,label\na.png,0\nb.png,1\nc.png,real\nd.png,{bad}\n")
    message = _error(manifest)
    assert message.endswith(f"train.csv line 5: unknown label '{bad}' (expected 0/1 or real/fake)")


def test_blank_lines_do_not_shift_line_numbers(tmp_path):
    _touch(tmp_path, "a.png", "b.png")
    assert "train.csv line 4: unknown label 'maybe'" in _error(_csv(tmp_path, "path,label\na.png,0\n\nb.png,maybe\n"))


def test_duplicate_paths_name_both_lines(tmp_path):
    _touch(tmp_path, "a.png", "b.png")
    message = _error(_csv(tmp_path, "path,label\na.png,0\nb.png,1\n./sub/../a.png,1\n"))
    assert f"train.csv lines 2 and 4: duplicate image path {tmp_path / 'a.png'}" in message


def test_missing_images_are_counted_and_the_first_five_listed(tmp_path):
    names = [f"img{i}.png" for i in range(8)]
    _touch(tmp_path, names[0])
    manifest = _csv(tmp_path, "path,label\n" + "".join(f"{n},{i % 2}\n" for i, n in enumerate(names)))
    message = _error(manifest)
    assert "7 of 8 image files not found" in message and f"resolve against {tmp_path}" in message
    assert all(n in message for n in names[1:6]) and names[6] not in message and names[7] not in message
    assert len(read_manifest(manifest, check_files=False)) == 8


def test_require_both_classes(tmp_path):
    _touch(tmp_path, "a.png", "b.png")
    manifest = _csv(tmp_path, "path,label\na.png,fake\nb.png,1\n", name="val.csv")
    assert len(read_manifest(manifest)) == 2
    message = _error(manifest, require_both_classes=True)
    assert message.startswith(f"{manifest}: manifest has only 'fake' rows")


def test_an_exact_repeated_header_is_refused(tmp_path):
    _touch(tmp_path, "a.png")
    assert "repeated column(s) label" in _error(_csv(tmp_path, "path,label,label\na.png,0,1\n"))


def test_a_header_of_many_columns_is_read_in_linear_time(tmp_path):
    # 200,000 columns: seconds; the old check (list.count per column) needed hours. A subprocess, so that a
    # relapse fails on its timeout instead of hanging the suite.
    _touch(tmp_path, "a.png")
    extra = [f"c{i}" for i in range(200_000)]
    wide = _csv(tmp_path, ",".join(["path", "label", *extra]) + "\n" + ",".join(["a.png", "1", *"0" * len(extra)])
                + "\n", name="wide.csv")
    repeated = _csv(tmp_path, ",".join(["path", "label", *extra, "c7"]) + "\na.png,1\n", name="repeated.csv")
    code = ("import sys; from stage2.data.manifest import read_manifest; from stage2.errors import ManifestError\n"
            f"print(read_manifest({str(wide)!r})['label'].tolist())\n"
            f"try:\n    read_manifest({str(repeated)!r})\nexcept ManifestError as err:\n    print(err)")
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env=subprocess_env())
    assert ran.returncode == 0, ran.stderr[-2000:]
    lines = ran.stdout.splitlines()
    assert lines[0] == "[1]" and lines[1].endswith("repeated column(s) c7 (headers ignore case)")


@pytest.mark.parametrize("header", ["path,label", "path,label,"])
def test_an_excel_trailing_comma_on_each_row_is_an_ignored_empty_column(tmp_path, header):
    _touch(tmp_path, "a.png", "b.png")
    frame = read_manifest(_csv(tmp_path, f"{header}\na.png,1,\nb.png,0,\n"))
    assert frame["path"].tolist() == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert frame["label"].tolist() == [1, 0]


def test_path_cells_are_kept_exactly_other_cells_are_stripped(tmp_path):
    _touch(tmp_path, " a.png", "b.png")
    frame = read_manifest(_csv(tmp_path, "path,label,video_id\n a.png, 1 , v1 \nb.png,0,v2\n"))
    assert frame["path"].tolist() == [str(tmp_path / " a.png"), str(tmp_path / "b.png")]
    assert frame["label"].tolist() == [1, 0] and frame["video_id"].tolist() == ["v1", "v2"]


@pytest.mark.parametrize("column", ["label", "path"])
def test_a_huge_cell_is_cut_in_the_error_line(tmp_path, column):
    huge = "x" * 2_000_000
    _touch(tmp_path, "a.png")
    row = f"a.png,{huge}" if column == "label" else f"{huge}.png,1"
    message = _error(_csv(tmp_path, f"path,label\na.png,0\n{row}\n"))
    assert len(message) < 1000 and " characters)" in message


# ---------------------------------------------------------------- source_id: one source on both sides of a split
def _split(folder: Path, train_sources: list[str], val_sources: list[str]) -> tuple[Path, Path]:
    names = [f"{side}{i}.png" for side, sources in (("t", train_sources), ("v", val_sources))
             for i in range(len(sources))]
    _touch(folder, *names)
    rows = [f"t{i}.png,{i % 2},{s}" for i, s in enumerate(train_sources)]
    train = _csv(folder, "path,label,source_id\n" + "\n".join(rows) + "\n", "train.csv")
    rows = [f"v{i}.png,{i % 2},{s}" for i, s in enumerate(val_sources)]
    return train, _csv(folder, "path,label,source_id\n" + "\n".join(rows) + "\n", "val.csv")


def test_a_source_on_both_sides_of_the_split_is_refused_naming_it(tmp_path):
    train, val = _split(tmp_path, ["alice", "alice", "bob", "bob"], ["carol", "bob", "", ""])
    frames = read_manifest(train), read_manifest(val)
    assert frames[0]["source_id"].tolist() == ["alice", "alice", "bob", "bob"]
    with pytest.raises(ManifestError) as info:
        check_source_leak(*frames)
    message = str(info.value)
    assert "\n" not in message and "train.csv" in message and "val.csv" in message
    assert "1 source_id(s)" in message and "'bob'" in message and "alice" not in message and "carol" not in message


def test_disjoint_sources_blank_ones_and_a_single_column_pass(tmp_path):
    train, val = _split(tmp_path, ["alice", "", "bob", ""], ["carol", "", "dave", ""])
    check_source_leak(read_manifest(train), read_manifest(val))
    _touch(tmp_path, "x.png", "y.png")
    no_column = _csv(tmp_path, "path,label\nx.png,0\ny.png,1\n", "plain.csv")
    check_source_leak(read_manifest(train), read_manifest(no_column))


def test_a_video_with_both_labels_points_to_source_id(tmp_path):
    _touch(tmp_path, "a.png", "b.png")
    manifest = _csv(tmp_path, "path,label,video_id\na.png,0,v1\nb.png,1,v1\n")
    assert "source_id column" in _error(manifest)


def test_training_refuses_a_leaking_split(effnet_args, tmp_path, capsys):
    import train_stage2_effnet

    train, val = _split(tmp_path / "data", ["s1", "s2", "s3", "s4"], ["s9", "s3"])
    for path in (tmp_path / "data").glob("*.png"):  # real images this time: the trainer decodes val up front
        Image.new("RGB", (32, 32), (len(path.stem) * 40, 90, 30)).save(path)
    args = list(effnet_args)
    args[args.index("--train-manifest") + 1], args[args.index("--val-manifest") + 1] = str(train), str(val)
    with pytest.raises(SystemExit) as exit_info:
        exit_on_error(lambda: train_stage2_effnet.main(args))
    assert exit_info.value.code == 2 and "source_id(s) on both sides" in capsys.readouterr().err
    assert not (tmp_path / "run" / "best.pt").exists()
