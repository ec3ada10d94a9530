#!/usr/bin/env python3
"""Drop-in for msModelSlim's example/multimodal_vlm/Qwen2-VL/quant_qwen2vl.py: the same flags and defaults.

Run it from scripts/ (as the reference is run from its folder) and the default --calib_images ../calibImages
is the repository's bundled calibImages/.

    python quant_qwen2vl.py --model_path M --save_directory OUT --device_type cpu --anti_method m2 --mindie_format
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from qwenvl_dq.cli import seed_entry  # noqa: E402

if __name__ == "__main__":
    seed_entry()
