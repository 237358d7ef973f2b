"""The mistakes a newcomer makes, through the command line: one line each, exit code 2, no traceback."""

from __future__ import annotations

import errno

from test_training import make_dataset

from diffusmith.cli import main


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    return code, err


def assert_one_line(code, err, *fragments):
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def train(model, data, out, *extra):
    return ["train", "--model", str(model), "--dataset", str(data), "--output", str(out), "--height", "64",
            "--width", "64", "--device", "cpu", "--max-steps", "2", "--lora-rank", "4", *extra]


def test_typo_in_a_flag(capsys):
    code, err = run(["generate", "--model", "m", "--promt", "x", "-o", "o.png"], capsys)
    assert_one_line(code, err, "did you mean --prompt")


def test_model_path_that_does_not_exist(tmp_path, capsys):
    code, err = run(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x", "-o", "o.png"], capsys)
    assert_one_line(code, err, "model folder not found", str(tmp_path / "nope"))


def test_dataset_folder_with_no_images(tiny_qwen, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    code, err = run(train(tiny_qwen[0], tmp_path / "empty", tmp_path / "out"), capsys)
    assert_one_line(code, err, "no images")


def test_missing_txt_caption(tiny_qwen, tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    (data / "red.txt").unlink()
    code, err = run(train(tiny_qwen[0], data, tmp_path / "out"), capsys)
    assert_one_line(code, err, "red.png", ".txt")


def test_output_folder_from_another_run(tiny_qwen, tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    assert main(train(tiny_qwen[0], data, tmp_path / "out")) == 0
    capsys.readouterr()
    code, err = run(train(tiny_qwen[0], data, tmp_path / "out"), capsys)
    assert_one_line(code, err, "already holds a training run", "--resume latest")


def test_output_folder_with_other_files(tiny_qwen, tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "holiday.jpg").write_bytes(b"x")
    code, err = run(train(tiny_qwen[0], data, tmp_path / "out"), capsys)
    assert_one_line(code, err, "not empty")


def test_no_disk_space_for_a_checkpoint(tiny_qwen, tmp_path, capsys, monkeypatch):
    from diffusmith.training import checkpoint

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    data = make_dataset(tmp_path / "data")
    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    code, err = run(train(tiny_qwen[0], data, tmp_path / "out", "--save-every", "1"), capsys)
    assert_one_line(code, err, "no space left on device")
    assert not [p for p in (tmp_path / "out" / "checkpoints").iterdir() if (p / "COMPLETE").exists()]


def test_unreadable_input_image(tiny_qwen, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    code, err = run(["generate", "--model", str(tiny_qwen[0]), "--prompt", "x", "--input-image", str(bad),
                     "--steps", "1", "-o", str(tmp_path / "o.png")], capsys)
    assert_one_line(code, err, "cannot read input image")
