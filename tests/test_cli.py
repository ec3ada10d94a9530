"""The seed's command line: flags and defaults (bad values: test_reliability.py)."""

import os

from conftest import quantize
from qwenvl_dq.cli import config_from_args, seed_parser


def test_seed_defaults_and_true_false_values():
    a = seed_parser().parse_args(["--model_path", "m", "--save_directory", "o"])
    cfg = config_from_args(a)
    assert (cfg.calib_images, cfg.part_file_size, cfg.w_bit, cfg.a_bit, cfg.device_type, cfg.trust_remote_code,
            cfg.anti_method, cfg.mindie_format) == ("../calibImages", None, 8, 8, "npu", False, "m2", False)
    a = seed_parser().parse_args(["--model_path", "m", "--save_directory", "o", "--trust_remote_code", "True",
                                  "--part_file_size", "0.5", "--mindie_format"])
    assert a.trust_remote_code is True and a.part_file_size == 0.5 and a.mindie_format is True
    assert config_from_args(a).part_bytes == 1 << 29


def test_corrupt_image_is_skipped_and_named(tiny_model, calib_dir, tmp_path, caplog):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "0_broken.jpg").write_bytes(b"not a jpeg at all")
    with open(os.path.join(calib_dir, "coffee.jpg"), "rb") as f:
        (imgs / "1_coffee.jpg").write_bytes(f.read())
    assert quantize(tiny_model, tmp_path / "o", calib=str(imgs)) == 0
    assert "0_broken.jpg" in caplog.text and "skipping" in caplog.text


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_model, tmp_path, capsys):
    assert quantize(tiny_model, tmp_path / "o", "--dry_run") == 0
    out = capsys.readouterr().out
    assert "2 vision blocks, 3 decoder layers" in out and "rank 0: decoder layers 0..2" in out
    assert not os.path.exists(tmp_path / "o")
