"""The seed's command line: flags, defaults, and one clear error per bad value."""

import os

import pytest

from conftest import dir_hashes, quantize
from qwenvl_dq.cli import config_from_args, main, seed_parser


def test_seed_defaults_and_true_false_values():
    a = seed_parser().parse_args(["--model_path", "m", "--save_directory", "o"])
    cfg = config_from_args(a)
    assert (cfg.calib_images, cfg.part_file_size, cfg.w_bit, cfg.a_bit, cfg.device_type, cfg.trust_remote_code,
            cfg.anti_method, cfg.mindie_format) == ("../calibImages", None, 8, 8, "npu", False, "m2", False)
    a = seed_parser().parse_args(["--model_path", "m", "--save_directory", "o", "--trust_remote_code", "True",
                                  "--part_file_size", "0.5", "--mindie_format"])
    assert a.trust_remote_code is True and a.part_file_size == 0.5 and a.mindie_format is True
    assert config_from_args(a).part_bytes == 1 << 29


@pytest.mark.parametrize("argv, message", [
    (["--w_bit", "4"], "w_bit: 4 is not supported"),
    (["--a_bit", "16"], "a_bit: 16 is not supported"),
])
def test_bad_bits_exit_non_zero_with_the_value(tiny_model, tmp_path, capsys, argv, message):
    assert quantize(tiny_model, tmp_path / "o", *argv) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("size", ["0", "-1", "abc"])
def test_bad_part_file_size_is_refused_by_the_parser(tiny_model, tmp_path, capsys, size):
    with pytest.raises(SystemExit) as e:
        quantize(tiny_model, tmp_path / "o", "--part_file_size", size)
    assert e.value.code == 2
    assert "part_file_size" in capsys.readouterr().err


def test_save_directory_inside_model_path_is_refused(tiny_model, capsys):
    before = dir_hashes(tiny_model)
    assert quantize(tiny_model, os.path.join(tiny_model, "out")) == 2
    assert "is inside model_path" in capsys.readouterr().err
    assert dir_hashes(tiny_model) == before and not os.path.exists(os.path.join(tiny_model, "out"))


def test_non_empty_save_directory_needs_overwrite(tiny_model, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert quantize(tiny_model, out) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert quantize(tiny_model, out, "--overwrite", "--calib_num", "1") == 0
    assert not (out / "keep.txt").exists() and (out / "quant_model_description.json").exists()


def test_missing_image_folder_and_non_qwen_model(tiny_model, tmp_path, capsys):
    assert quantize(tiny_model, tmp_path / "o", calib=str(tmp_path / "nope")) == 2
    assert f"calib_images: {tmp_path / 'nope'} is not a directory" in capsys.readouterr().err
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.txt").write_text("x")
    assert quantize(tiny_model, tmp_path / "o", calib=str(tmp_path / "imgs")) == 2
    assert "holds no image files" in capsys.readouterr().err
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"model_type": "llama"}')
    assert quantize(str(llama), tmp_path / "o2") == 2
    assert "holds model_type 'llama', not a Qwen2-VL" in capsys.readouterr().err


def test_corrupt_image_is_skipped_and_named(tiny_model, calib_dir, tmp_path, caplog):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "0_broken.jpg").write_bytes(b"not a jpeg at all")
    with open(os.path.join(calib_dir, "coffee.jpg"), "rb") as f:
        (imgs / "1_coffee.jpg").write_bytes(f.read())
    assert quantize(tiny_model, tmp_path / "o", calib=str(imgs)) == 0
    assert "0_broken.jpg" in caplog.text and "skipping" in caplog.text


def test_npu_without_torch_npu_says_how_to_install(tiny_model, tmp_path, capsys):
    code = main(["quantize", "--model_path", tiny_model, "--save_directory", str(tmp_path / "o"),
                 "--anti_method", "none"])  # device_type defaults to npu, as in the seed
    assert code == 2
    assert "npu needs torch_npu" in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_model, tmp_path, capsys):
    assert quantize(tiny_model, tmp_path / "o", "--dry_run") == 0
    out = capsys.readouterr().out
    assert "2 vision blocks, 3 decoder layers" in out and "rank 0: decoder layers 0..2" in out
    assert not os.path.exists(tmp_path / "o")
