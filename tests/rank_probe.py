"""Run one rank of `qwenvl-dq quantize` (the seed's flags) and print what the tests measure about it, as one line:
PROBE {"rank", "read" (tensors read during calibration, in order), "bytes_read" (in the whole run), "bytes_written"
(rank 0: all ranks'), "peak_rss" (bytes per phase), "seconds"}."""

import json
import sys

from qwenvl_dq import cli, job

if __name__ == "__main__":
    cfg = cli.config_from_args(cli.seed_parser().parse_args(sys.argv[1:]))
    cli.setup_logging(cfg.log_level)
    s = job.quantize(cfg)
    print("PROBE " + json.dumps({"rank": s.rank, "read": s.tensors_read, "bytes_read": s.bytes_read,
                                 "bytes_written": s.bytes_written, "peak_rss": s.peak_rss,
                                 "seconds": s.seconds}), flush=True)
